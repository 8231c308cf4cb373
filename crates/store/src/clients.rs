use rusqlite::{Connection, OptionalExtension, Row};

use crate::{Result, StoreError};

/// An API client: the holder of a client id and secret. Only a slow hash of the secret is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// Public client id (`CHALK_CLIENT_ID`).
    pub id: String,
    /// Human label.
    pub name: String,
    /// PHC-format password hash of the secret.
    pub secret_hash: String,
    /// The client's primary environment.
    pub environment_id: String,
    /// Whether the client may obtain tokens for every environment (the admin client), or only its primary one.
    pub all_environments: bool,
    /// Creation time, ms since the epoch.
    pub created_at: i64,
    /// When the client was revoked; its tokens stop working from then on.
    pub revoked_at: Option<i64>,
}

/// What is needed to create a [`Client`].
pub type NewClient = Client;

/// Repository of [`Client`]s.
pub struct Clients<'c> {
    conn: &'c Connection,
}

const COLUMNS: &str = "id, name, secret_hash, environment_id, all_environments, created_at, revoked_at";

impl<'c> Clients<'c> {
    pub(crate) fn new(conn: &'c Connection) -> Self {
        Self { conn }
    }

    /// Inserts a client.
    pub fn insert(&self, c: &NewClient) -> Result<()> {
        self.conn
            .execute(
                &format!("INSERT INTO clients ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"),
                (&c.id, &c.name, &c.secret_hash, &c.environment_id, c.all_environments, c.created_at, c.revoked_at),
            )
            .map_err(|e| StoreError::on_insert(e, || format!("client {:?}", c.id)))?;
        Ok(())
    }

    /// The client with this id, revoked or not.
    pub fn get(&self, id: &str) -> Result<Option<Client>> {
        Ok(self
            .conn
            .prepare_cached(&format!("SELECT {COLUMNS} FROM clients WHERE id = ?1"))?
            .query_row([id], row)
            .optional()?)
    }

    /// Every client, oldest first.
    pub fn list(&self) -> Result<Vec<Client>> {
        let mut stmt = self.conn.prepare_cached(&format!("SELECT {COLUMNS} FROM clients ORDER BY created_at, id"))?;
        let rows = stmt.query_map([], row)?.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// Marks the client revoked at `at`. Returns false when no such client exists; revoking twice keeps the
    /// first time.
    pub fn revoke(&self, id: &str, at: i64) -> Result<bool> {
        let n =
            self.conn.execute("UPDATE clients SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1", (id, at))?;
        Ok(n > 0)
    }
}

fn row(r: &Row<'_>) -> rusqlite::Result<Client> {
    Ok(Client {
        id: r.get(0)?,
        name: r.get(1)?,
        secret_hash: r.get(2)?,
        environment_id: r.get(3)?,
        all_environments: r.get(4)?,
        created_at: r.get(5)?,
        revoked_at: r.get(6)?,
    })
}
