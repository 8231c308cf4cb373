use rusqlite::{Connection, OptionalExtension, Row};

use crate::{Result, StoreError};

/// Where a sandbox is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxStatus {
    /// Accepted; image and runtime are being prepared.
    Pending,
    /// Its agent is up; it accepts exec.
    Running,
    /// Its entrypoint exited 0.
    Succeeded,
    /// It could not start, or its entrypoint failed.
    Failed,
    /// Stopped by a user, by its lifetime, or by the server.
    Terminated,
}

impl SandboxStatus {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxStatus::Pending => "pending",
            SandboxStatus::Running => "running",
            SandboxStatus::Succeeded => "succeeded",
            SandboxStatus::Failed => "failed",
            SandboxStatus::Terminated => "terminated",
        }
    }

    fn parse(s: &str) -> SandboxStatus {
        match s {
            "pending" => SandboxStatus::Pending,
            "running" => SandboxStatus::Running,
            "succeeded" => SandboxStatus::Succeeded,
            "terminated" => SandboxStatus::Terminated,
            _ => SandboxStatus::Failed,
        }
    }

    /// Whether it is still live (pending or running).
    pub fn is_live(self) -> bool {
        matches!(self, SandboxStatus::Pending | SandboxStatus::Running)
    }
}

/// A sandbox or container as recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxRecord {
    /// Id.
    pub id: String,
    /// Environment it belongs to.
    pub environment_id: String,
    /// `sandbox` or `container`: which API created it (and lists it); `replica` for a scaling group's.
    pub kind: String,
    /// Name, unique among the environment's live workloads.
    pub name: String,
    /// Image reference.
    pub image: String,
    /// The spec as the client sent it (encoded), echoed back in responses.
    pub spec: Vec<u8>,
    /// Status.
    pub status: SandboxStatus,
    /// Why it is in that status, in a sentence.
    pub status_message: Option<String>,
    /// Details (e.g. the last lines of output).
    pub status_details: Option<String>,
    /// The entrypoint's exit code.
    pub exit_code: Option<i32>,
    /// Client that created it.
    pub created_by: String,
    /// ms since the epoch.
    pub created_at: i64,
    /// When it became running.
    pub started_at: Option<i64>,
    /// When it ended.
    pub finished_at: Option<i64>,
}

const COLUMNS: &str =
    "id, environment_id, kind, name, image, spec, status, status_message, status_details, exit_code, \
                       created_by, created_at, started_at, finished_at";

/// Repository of [`SandboxRecord`]s.
pub struct Sandboxes<'c> {
    conn: &'c Connection,
}

impl<'c> Sandboxes<'c> {
    pub(crate) fn new(conn: &'c Connection) -> Self {
        Self { conn }
    }

    /// Inserts a record; [`StoreError::AlreadyExists`] when a live workload of the environment has its name.
    pub fn insert(&self, r: &SandboxRecord) -> Result<()> {
        self.conn
            .execute(
                &format!("INSERT INTO sandboxes ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"),
                rusqlite::params![
                    r.id,
                    r.environment_id,
                    r.kind,
                    r.name,
                    r.image,
                    r.spec,
                    r.status.as_str(),
                    r.status_message,
                    r.status_details,
                    r.exit_code,
                    r.created_by,
                    r.created_at,
                    r.started_at,
                    r.finished_at
                ],
            )
            .map_err(|e| StoreError::on_insert(e, || format!("a live workload named {:?}", r.name)))?;
        Ok(())
    }

    /// By id within an environment.
    pub fn get(&self, environment_id: &str, id: &str) -> Result<Option<SandboxRecord>> {
        Ok(self
            .conn
            .prepare_cached(&format!("SELECT {COLUMNS} FROM sandboxes WHERE id = ?1 AND environment_id = ?2"))?
            .query_row((id, environment_id), row)
            .optional()?)
    }

    /// The live workload with this name, else the most recent finished one.
    pub fn get_by_name(&self, environment_id: &str, name: &str) -> Result<Option<SandboxRecord>> {
        Ok(self
            .conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM sandboxes WHERE environment_id = ?1 AND name = ?2 \
                 ORDER BY status IN ('pending', 'running') DESC, created_at DESC LIMIT 1"
            ))?
            .query_row((environment_id, name), row)
            .optional()?)
    }

    /// An environment's workloads of one kind (or all kinds), newest first, from `offset`.
    pub fn list(
        &self,
        environment_id: &str,
        kind: Option<&str>,
        live_only: bool,
        limit: u32,
        offset: u32,
    ) -> Result<Vec<SandboxRecord>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM sandboxes WHERE environment_id = ?1 AND (?2 IS NULL OR kind = ?2) \
             AND (?3 = 0 OR status IN ('pending', 'running')) ORDER BY created_at DESC, id DESC LIMIT ?4 OFFSET ?5"
        ))?;
        let rows = stmt.query_map(rusqlite::params![environment_id, kind, live_only, limit, offset], row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Every live workload of every environment (for reconciliation at start).
    pub fn live(&self) -> Result<Vec<SandboxRecord>> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!("SELECT {COLUMNS} FROM sandboxes WHERE status IN ('pending', 'running')"))?;
        let rows = stmt.query_map([], row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Moves a live workload to `status`. Returns false if it was no longer live (a finished workload never
    /// changes again), so racing transitions resolve to the first.
    pub fn transition(
        &self,
        id: &str,
        status: SandboxStatus,
        message: Option<&str>,
        details: Option<&str>,
        exit_code: Option<i32>,
        at: i64,
    ) -> Result<bool> {
        let n = self.conn.execute(
            "UPDATE sandboxes SET status = ?2, status_message = COALESCE(?3, status_message), \
             status_details = COALESCE(?4, status_details), exit_code = COALESCE(?5, exit_code), \
             started_at = CASE WHEN ?2 = 'running' THEN ?6 ELSE started_at END, \
             finished_at = CASE WHEN ?2 IN ('pending', 'running') THEN finished_at ELSE ?6 END \
             WHERE id = ?1 AND status IN ('pending', 'running') AND NOT (status = 'running' AND ?2 = 'pending')",
            rusqlite::params![id, status.as_str(), message, details, exit_code, at],
        )?;
        Ok(n > 0)
    }
}

fn row(r: &Row<'_>) -> rusqlite::Result<SandboxRecord> {
    Ok(SandboxRecord {
        id: r.get(0)?,
        environment_id: r.get(1)?,
        kind: r.get(2)?,
        name: r.get(3)?,
        image: r.get(4)?,
        spec: r.get(5)?,
        status: SandboxStatus::parse(&r.get::<_, String>(6)?),
        status_message: r.get(7)?,
        status_details: r.get(8)?,
        exit_code: r.get(9)?,
        created_by: r.get(10)?,
        created_at: r.get(11)?,
        started_at: r.get(12)?,
        finished_at: r.get(13)?,
    })
}
