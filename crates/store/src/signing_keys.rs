use rusqlite::{Connection, Row};

use crate::{Result, StoreError};

/// A secret used to sign access tokens. The newest unretired key signs; every unretired key verifies, so a
/// rotation does not cut off tokens already issued until the old key is retired.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningKey {
    /// Key id, carried in the token header (`kid`).
    pub kid: String,
    /// The HMAC secret.
    pub secret: Vec<u8>,
    /// Creation time, ms since the epoch.
    pub created_at: i64,
    /// When the key stopped being accepted.
    pub retired_at: Option<i64>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("created_at", &self.created_at)
            .field("retired_at", &self.retired_at)
            .finish_non_exhaustive()
    }
}

/// Repository of [`SigningKey`]s.
pub struct SigningKeys<'c> {
    conn: &'c Connection,
}

impl<'c> SigningKeys<'c> {
    pub(crate) fn new(conn: &'c Connection) -> Self {
        Self { conn }
    }

    /// Inserts a key.
    pub fn insert(&self, k: &SigningKey) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO signing_keys (kid, secret, created_at, retired_at) VALUES (?1, ?2, ?3, ?4)",
                (&k.kid, &k.secret, k.created_at, k.retired_at),
            )
            .map_err(|e| StoreError::on_insert(e, || format!("signing key {:?}", k.kid)))?;
        Ok(())
    }

    /// Unretired keys, newest first: the first one signs.
    pub fn active(&self) -> Result<Vec<SigningKey>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT kid, secret, created_at, retired_at FROM signing_keys WHERE retired_at IS NULL \
             ORDER BY created_at DESC, rowid DESC",
        )?;
        let rows = stmt.query_map([], row)?.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// Retires every unretired key except `keep`. Returns how many were retired.
    pub fn retire_all_but(&self, keep: &str, at: i64) -> Result<usize> {
        Ok(self
            .conn
            .execute("UPDATE signing_keys SET retired_at = ?2 WHERE retired_at IS NULL AND kid != ?1", (keep, at))?)
    }
}

fn row(r: &Row<'_>) -> rusqlite::Result<SigningKey> {
    Ok(SigningKey { kid: r.get(0)?, secret: r.get(1)?, created_at: r.get(2)?, retired_at: r.get(3)? })
}
