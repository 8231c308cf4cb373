//! Secrets and integrations as recorded: names and scopes in clear, values sealed by the control plane (the
//! store never sees a value, only its ciphertext and the id of the key that sealed it).

use rusqlite::{Connection, OptionalExtension, Row};

use crate::{Result, StoreError};

/// What a secret belongs to: the whole environment, or one named workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ScopeKind {
    /// Every workload of the environment.
    Environment,
    /// The sandbox or container of that name.
    Sandbox,
    /// The replicas of the scaling group of that name.
    ScalingGroup,
    /// The replicas of the function of that name.
    Function,
}

impl ScopeKind {
    /// The stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            ScopeKind::Environment => "environment",
            ScopeKind::Sandbox => "sandbox",
            ScopeKind::ScalingGroup => "scaling_group",
            ScopeKind::Function => "function",
        }
    }

    /// Reads the stored form.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "environment" => ScopeKind::Environment,
            "sandbox" => ScopeKind::Sandbox,
            "scaling_group" => ScopeKind::ScalingGroup,
            "function" => ScopeKind::Function,
            _ => return None,
        })
    }
}

/// One secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRecord {
    /// Id.
    pub id: String,
    /// Environment it belongs to.
    pub environment_id: String,
    /// Name (the variable it becomes, unless renamed).
    pub name: String,
    /// Its scope's kind.
    pub scope: ScopeKind,
    /// The workload's name for a workload scope; empty for the environment.
    pub scope_ref: String,
    /// Id of the key that sealed it.
    pub key_id: String,
    /// Nonce and ciphertext.
    pub sealed: Vec<u8>,
    /// Client that wrote it.
    pub created_by: String,
    /// ms since the epoch.
    pub created_at: i64,
    /// When its value last changed.
    pub updated_at: i64,
}

/// One integration: a named bundle of keys of a kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntegrationRecord {
    /// Id.
    pub id: String,
    /// Environment it belongs to.
    pub environment_id: String,
    /// Name.
    pub name: String,
    /// Its kind (`postgres`, `redis`, …), as the control plane names it.
    pub kind: String,
    /// The names of its keys (not their values), comma-separated.
    pub key_names: String,
    /// Id of the key that sealed it.
    pub key_id: String,
    /// Nonce and ciphertext of its keys and values.
    pub sealed: Vec<u8>,
    /// ms since the epoch.
    pub created_at: i64,
    /// When it last changed.
    pub updated_at: i64,
}

const SECRET_COLUMNS: &str =
    "id, environment_id, name, scope_type, scope_ref, key_id, sealed, created_by, created_at, updated_at";
const INTEGRATION_COLUMNS: &str = "id, environment_id, name, kind, key_names, key_id, sealed, created_at, updated_at";

/// Repository of [`SecretRecord`]s and [`IntegrationRecord`]s.
pub struct Secrets<'c> {
    conn: &'c Connection,
}

fn secret_row(r: &Row<'_>) -> rusqlite::Result<SecretRecord> {
    let scope: String = r.get(3)?;
    Ok(SecretRecord {
        id: r.get(0)?,
        environment_id: r.get(1)?,
        name: r.get(2)?,
        scope: ScopeKind::parse(&scope).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(3, rusqlite::types::Type::Text, format!("scope {scope:?}").into())
        })?,
        scope_ref: r.get(4)?,
        key_id: r.get(5)?,
        sealed: r.get(6)?,
        created_by: r.get(7)?,
        created_at: r.get(8)?,
        updated_at: r.get(9)?,
    })
}

fn integration_row(r: &Row<'_>) -> rusqlite::Result<IntegrationRecord> {
    Ok(IntegrationRecord {
        id: r.get(0)?,
        environment_id: r.get(1)?,
        name: r.get(2)?,
        kind: r.get(3)?,
        key_names: r.get(4)?,
        key_id: r.get(5)?,
        sealed: r.get(6)?,
        created_at: r.get(7)?,
        updated_at: r.get(8)?,
    })
}

impl<'c> Secrets<'c> {
    pub(crate) fn new(conn: &'c Connection) -> Self {
        Self { conn }
    }

    /// Inserts a secret, or replaces the value of the one with its name and scope (keeping its id and creation
    /// time). Returns the record as stored.
    pub fn upsert(&self, s: &SecretRecord) -> Result<SecretRecord> {
        self.conn.execute(
            &format!(
                "INSERT INTO secrets ({SECRET_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                 ON CONFLICT (environment_id, scope_type, scope_ref, name)
                 DO UPDATE SET key_id = excluded.key_id, sealed = excluded.sealed, updated_at = excluded.updated_at"
            ),
            rusqlite::params![
                s.id,
                s.environment_id,
                s.name,
                s.scope.as_str(),
                s.scope_ref,
                s.key_id,
                s.sealed,
                s.created_by,
                s.created_at,
                s.updated_at
            ],
        )?;
        self.get(&s.environment_id, s.scope, &s.scope_ref, &s.name)?
            .ok_or_else(|| StoreError::Sqlite(rusqlite::Error::QueryReturnedNoRows))
    }

    /// The secret of that name in exactly that scope.
    pub fn get(&self, env: &str, scope: ScopeKind, scope_ref: &str, name: &str) -> Result<Option<SecretRecord>> {
        Ok(self
            .conn
            .query_row(
                &format!(
                    "SELECT {SECRET_COLUMNS} FROM secrets
                     WHERE environment_id = ?1 AND scope_type = ?2 AND scope_ref = ?3 AND name = ?4"
                ),
                rusqlite::params![env, scope.as_str(), scope_ref, name],
                secret_row,
            )
            .optional()?)
    }

    /// A secret by id.
    pub fn get_by_id(&self, env: &str, id: &str) -> Result<Option<SecretRecord>> {
        Ok(self
            .conn
            .query_row(
                &format!("SELECT {SECRET_COLUMNS} FROM secrets WHERE environment_id = ?1 AND id = ?2"),
                rusqlite::params![env, id],
                secret_row,
            )
            .optional()?)
    }

    /// An environment's secrets (environment-wide only, unless `include_scoped`), by name.
    pub fn list(&self, env: &str, include_scoped: bool) -> Result<Vec<SecretRecord>> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {SECRET_COLUMNS} FROM secrets WHERE environment_id = ?1 AND (?2 OR scope_type = 'environment')
             ORDER BY name, scope_type, scope_ref"
        ))?;
        let rows = stmt.query_map(rusqlite::params![env, include_scoped], secret_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Deletes the secret of that name and scope; whether there was one.
    pub fn delete(&self, env: &str, scope: ScopeKind, scope_ref: &str, name: &str) -> Result<bool> {
        let n = self.conn.execute(
            "DELETE FROM secrets WHERE environment_id = ?1 AND scope_type = ?2 AND scope_ref = ?3 AND name = ?4",
            rusqlite::params![env, scope.as_str(), scope_ref, name],
        )?;
        Ok(n > 0)
    }

    /// Every secret of every environment (key rotation).
    pub fn all(&self) -> Result<Vec<SecretRecord>> {
        let mut stmt = self.conn.prepare(&format!("SELECT {SECRET_COLUMNS} FROM secrets ORDER BY id"))?;
        let rows = stmt.query_map([], secret_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Replaces a secret's or an integration's ciphertext (key rotation).
    pub fn reseal(&self, table: SealedTable, id: &str, key_id: &str, sealed: &[u8]) -> Result<()> {
        let sql = match table {
            SealedTable::Secrets => "UPDATE secrets SET key_id = ?2, sealed = ?3 WHERE id = ?1",
            SealedTable::Integrations => "UPDATE integrations SET key_id = ?2, sealed = ?3 WHERE id = ?1",
        };
        self.conn.execute(sql, rusqlite::params![id, key_id, sealed])?;
        Ok(())
    }

    /// Inserts an integration, or replaces the kind and keys of the one with its name.
    pub fn upsert_integration(&self, i: &IntegrationRecord) -> Result<()> {
        self.conn.execute(
            &format!(
                "INSERT INTO integrations ({INTEGRATION_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT (environment_id, name)
                 DO UPDATE SET kind = excluded.kind, key_names = excluded.key_names, key_id = excluded.key_id,
                               sealed = excluded.sealed, updated_at = excluded.updated_at"
            ),
            rusqlite::params![
                i.id,
                i.environment_id,
                i.name,
                i.kind,
                i.key_names,
                i.key_id,
                i.sealed,
                i.created_at,
                i.updated_at
            ],
        )?;
        Ok(())
    }

    /// An integration by name.
    pub fn integration(&self, env: &str, name: &str) -> Result<Option<IntegrationRecord>> {
        Ok(self
            .conn
            .query_row(
                &format!("SELECT {INTEGRATION_COLUMNS} FROM integrations WHERE environment_id = ?1 AND name = ?2"),
                rusqlite::params![env, name],
                integration_row,
            )
            .optional()?)
    }

    /// An environment's integrations (all of them with `env` None), by name.
    pub fn integrations(&self, env: Option<&str>) -> Result<Vec<IntegrationRecord>> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {INTEGRATION_COLUMNS} FROM integrations WHERE ?1 IS NULL OR environment_id = ?1 ORDER BY name, id"
        ))?;
        let rows = stmt.query_map(rusqlite::params![env], integration_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Deletes an integration; whether there was one.
    pub fn delete_integration(&self, env: &str, name: &str) -> Result<bool> {
        let n = self.conn.execute(
            "DELETE FROM integrations WHERE environment_id = ?1 AND name = ?2",
            rusqlite::params![env, name],
        )?;
        Ok(n > 0)
    }
}

/// Which table a sealed value lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealedTable {
    /// `secrets`.
    Secrets,
    /// `integrations`.
    Integrations,
}
