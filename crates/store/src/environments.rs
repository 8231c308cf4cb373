use rusqlite::{Connection, OptionalExtension, Row};

use crate::{Result, StoreError};

/// A namespace of resources. Every resource belongs to exactly one environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Environment {
    /// Stable id, sent by the SDK as `x-chalk-env-id`.
    pub id: String,
    /// Unique human name.
    pub name: String,
    /// Creation time, ms since the epoch.
    pub created_at: i64,
}

/// Repository of [`Environment`]s.
pub struct Environments<'c> {
    conn: &'c Connection,
}

impl<'c> Environments<'c> {
    pub(crate) fn new(conn: &'c Connection) -> Self {
        Self { conn }
    }

    /// Inserts `env`; fails with [`StoreError::AlreadyExists`] if its id or name is taken.
    pub fn insert(&self, env: &Environment) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO environments (id, name, created_at) VALUES (?1, ?2, ?3)",
                (&env.id, &env.name, env.created_at),
            )
            .map_err(|e| StoreError::on_insert(e, || format!("environment {:?}", env.name)))?;
        Ok(())
    }

    /// The environment with this id.
    pub fn get(&self, id: &str) -> Result<Option<Environment>> {
        Ok(self.conn.query_row("SELECT id, name, created_at FROM environments WHERE id = ?1", [id], row).optional()?)
    }

    /// The environment with this name.
    pub fn get_by_name(&self, name: &str) -> Result<Option<Environment>> {
        Ok(self
            .conn
            .query_row("SELECT id, name, created_at FROM environments WHERE name = ?1", [name], row)
            .optional()?)
    }

    /// Every environment, oldest first.
    pub fn list(&self) -> Result<Vec<Environment>> {
        let mut stmt =
            self.conn.prepare_cached("SELECT id, name, created_at FROM environments ORDER BY created_at, id")?;
        let rows = stmt.query_map([], row)?.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }
}

fn row(r: &Row<'_>) -> rusqlite::Result<Environment> {
    Ok(Environment { id: r.get(0)?, name: r.get(1)?, created_at: r.get(2)? })
}
