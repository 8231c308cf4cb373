//! Functions and their versions: a function is a stable name; each version is an immutable deployment (a spec,
//! identified by a digest of what it runs) served by one revision of the function's scaling group.

use rusqlite::{Connection, OptionalExtension, Row};

use crate::Result;

/// A function as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionRecord {
    /// Id.
    pub id: String,
    /// Environment it belongs to.
    pub environment_id: String,
    /// Name (the SDK's function name), unique among the environment's functions that are not deleted.
    pub name: String,
    /// The scaling group that serves it.
    pub group_name: String,
    /// The version it serves; `None` while its first deploy is under way.
    pub version_id: Option<String>,
    /// Client that created it.
    pub created_by: String,
    /// ms since the epoch.
    pub created_at: i64,
    /// When its version last changed.
    pub updated_at: i64,
    /// When it was deleted (its record stays for history).
    pub deleted_at: Option<i64>,
}

/// One immutable version of a function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionVersionRecord {
    /// Id.
    pub id: String,
    /// The function.
    pub function_id: String,
    /// 1 for the first, then counting up.
    pub number: i64,
    /// Digest of the image and version spec: the same code and config give the same digest.
    pub digest: String,
    /// The version spec as the API encodes it, with the built image filled in.
    pub spec: Vec<u8>,
    /// The scaling group that serves it.
    pub group_name: String,
    /// The revision of that group it was deployed as.
    pub group_revision_id: String,
    /// Client that made it.
    pub created_by: String,
    /// ms since the epoch.
    pub created_at: i64,
}

const FUNCTION_COLUMNS: &str =
    "id, environment_id, name, group_name, version_id, created_by, created_at, updated_at, deleted_at";
const VERSION_COLUMNS: &str =
    "id, function_id, number, digest, spec, group_name, group_revision_id, created_by, created_at";

/// Repository of [`FunctionRecord`]s and their [`FunctionVersionRecord`]s.
pub struct Functions<'c> {
    conn: &'c Connection,
}

impl<'c> Functions<'c> {
    pub(crate) fn new(conn: &'c Connection) -> Self {
        Self { conn }
    }

    /// Inserts a function; [`crate::StoreError::AlreadyExists`] when a live one has its name.
    pub fn insert(&self, f: &FunctionRecord) -> Result<()> {
        self.conn
            .execute(
                &format!("INSERT INTO functions ({FUNCTION_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"),
                rusqlite::params![
                    f.id,
                    f.environment_id,
                    f.name,
                    f.group_name,
                    f.version_id,
                    f.created_by,
                    f.created_at,
                    f.updated_at,
                    f.deleted_at
                ],
            )
            .map_err(|e| crate::StoreError::on_insert(e, || format!("a function named {:?}", f.name)))?;
        Ok(())
    }

    /// Removes a function that never got a version (its first deploy failed).
    pub fn remove_unversioned(&self, id: &str) -> Result<()> {
        self.conn.execute("DELETE FROM functions WHERE id = ?1 AND version_id IS NULL", [id])?;
        Ok(())
    }

    /// Adds a version (not yet served: see [`Functions::select`]).
    pub fn add_version(&self, v: &FunctionVersionRecord) -> Result<()> {
        self.conn.execute(
            &format!("INSERT INTO function_versions ({VERSION_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"),
            rusqlite::params![
                v.id,
                v.function_id,
                v.number,
                v.digest,
                v.spec,
                v.group_name,
                v.group_revision_id,
                v.created_by,
                v.created_at
            ],
        )?;
        Ok(())
    }

    /// Makes the function serve one of its versions, through `group_name`.
    pub fn select(&self, function_id: &str, version_id: &str, group_name: &str, at: i64) -> Result<()> {
        self.conn.execute(
            "UPDATE functions SET version_id = ?2, group_name = ?3, updated_at = ?4 WHERE id = ?1",
            rusqlite::params![function_id, version_id, group_name, at],
        )?;
        Ok(())
    }

    /// Records which revision of its group a version was (re)deployed as.
    pub fn set_group_revision(&self, version_id: &str, revision_id: &str) -> Result<()> {
        self.conn
            .execute("UPDATE function_versions SET group_revision_id = ?2 WHERE id = ?1", (version_id, revision_id))?;
        Ok(())
    }

    /// The live function of this name, else (with `include_deleted`) the most recently deleted one.
    pub fn get_by_name(
        &self,
        environment_id: &str,
        name: &str,
        include_deleted: bool,
    ) -> Result<Option<FunctionRecord>> {
        Ok(self
            .conn
            .prepare_cached(&format!(
                "SELECT {FUNCTION_COLUMNS} FROM functions WHERE environment_id = ?1 AND name = ?2 \
                 AND (?3 OR deleted_at IS NULL) ORDER BY deleted_at IS NULL DESC, deleted_at DESC LIMIT 1"
            ))?
            .query_row(rusqlite::params![environment_id, name, include_deleted], function_row)
            .optional()?)
    }

    /// By id within an environment (deleted ones too).
    pub fn get(&self, environment_id: &str, id: &str) -> Result<Option<FunctionRecord>> {
        Ok(self
            .conn
            .prepare_cached(&format!("SELECT {FUNCTION_COLUMNS} FROM functions WHERE id = ?1 AND environment_id = ?2"))?
            .query_row((id, environment_id), function_row)
            .optional()?)
    }

    /// The live function a scaling group serves, if it serves one.
    pub fn by_group(&self, environment_id: &str, group_name: &str) -> Result<Option<FunctionRecord>> {
        Ok(self
            .conn
            .prepare_cached(&format!(
                "SELECT {FUNCTION_COLUMNS} FROM functions WHERE environment_id = ?1 AND group_name = ?2 \
                 AND deleted_at IS NULL LIMIT 1"
            ))?
            .query_row((environment_id, group_name), function_row)
            .optional()?)
    }

    /// An environment's deployed functions whose names contain `search` ("" matches all), newest first, from `offset`.
    pub fn list(
        &self,
        environment_id: &str,
        search: &str,
        include_deleted: bool,
        limit: u32,
        offset: u32,
    ) -> Result<Vec<FunctionRecord>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {FUNCTION_COLUMNS} FROM functions WHERE environment_id = ?1 AND (?2 OR deleted_at IS NULL) \
             AND version_id IS NOT NULL AND instr(name, ?5) > 0 ORDER BY created_at DESC, id DESC LIMIT ?3 OFFSET ?4"
        ))?;
        let rows =
            stmt.query_map(rusqlite::params![environment_id, include_deleted, limit, offset, search], function_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Every environment's live deployed functions (the scheduler's view).
    pub fn live(&self) -> Result<Vec<FunctionRecord>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {FUNCTION_COLUMNS} FROM functions WHERE deleted_at IS NULL AND version_id IS NOT NULL \
             ORDER BY created_at, id"
        ))?;
        let rows = stmt.query_map([], function_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Marks a function deleted; false if it already was.
    pub fn delete(&self, id: &str, at: i64) -> Result<bool> {
        let n =
            self.conn.execute("UPDATE functions SET deleted_at = ?2 WHERE id = ?1 AND deleted_at IS NULL", (id, at))?;
        Ok(n > 0)
    }

    /// One version, by id.
    pub fn version(&self, id: &str) -> Result<Option<FunctionVersionRecord>> {
        Ok(self
            .conn
            .prepare_cached(&format!("SELECT {VERSION_COLUMNS} FROM function_versions WHERE id = ?1"))?
            .query_row([id], version_row)
            .optional()?)
    }

    /// A function's version by number.
    pub fn version_by_number(&self, function_id: &str, number: i64) -> Result<Option<FunctionVersionRecord>> {
        Ok(self
            .conn
            .prepare_cached(&format!(
                "SELECT {VERSION_COLUMNS} FROM function_versions WHERE function_id = ?1 AND number = ?2"
            ))?
            .query_row(rusqlite::params![function_id, number], version_row)
            .optional()?)
    }

    /// The newest of a function's versions with this digest.
    pub fn version_by_digest(&self, function_id: &str, digest: &str) -> Result<Option<FunctionVersionRecord>> {
        Ok(self
            .conn
            .prepare_cached(&format!(
                "SELECT {VERSION_COLUMNS} FROM function_versions WHERE function_id = ?1 AND digest = ?2 \
                 ORDER BY number DESC LIMIT 1"
            ))?
            .query_row((function_id, digest), version_row)
            .optional()?)
    }

    /// A function's versions, newest first, from `offset`.
    pub fn versions(&self, function_id: &str, limit: u32, offset: u32) -> Result<Vec<FunctionVersionRecord>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {VERSION_COLUMNS} FROM function_versions WHERE function_id = ?1 \
             ORDER BY number DESC LIMIT ?2 OFFSET ?3"
        ))?;
        let rows = stmt.query_map(rusqlite::params![function_id, limit, offset], version_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// The highest version number a function has.
    pub fn last_version_number(&self, function_id: &str) -> Result<i64> {
        Ok(self.conn.query_row(
            "SELECT COALESCE(MAX(number), 0) FROM function_versions WHERE function_id = ?1",
            [function_id],
            |r| r.get(0),
        )?)
    }
}

fn function_row(r: &Row<'_>) -> rusqlite::Result<FunctionRecord> {
    Ok(FunctionRecord {
        id: r.get(0)?,
        environment_id: r.get(1)?,
        name: r.get(2)?,
        group_name: r.get(3)?,
        version_id: r.get(4)?,
        created_by: r.get(5)?,
        created_at: r.get(6)?,
        updated_at: r.get(7)?,
        deleted_at: r.get(8)?,
    })
}

fn version_row(r: &Row<'_>) -> rusqlite::Result<FunctionVersionRecord> {
    Ok(FunctionVersionRecord {
        id: r.get(0)?,
        function_id: r.get(1)?,
        number: r.get(2)?,
        digest: r.get(3)?,
        spec: r.get(4)?,
        group_name: r.get(5)?,
        group_revision_id: r.get(6)?,
        created_by: r.get(7)?,
        created_at: r.get(8)?,
    })
}
