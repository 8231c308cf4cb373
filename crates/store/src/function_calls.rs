//! Deferred function calls (`.defer()`): a durable queue in the store. A call is pending until a worker claims it,
//! running while it is tried, then completed or failed with its answer kept until it expires. A server that stops
//! (or is killed) with calls running puts them back to pending when it starts again: each call runs at least once.

use rusqlite::{Connection, OptionalExtension, Row};

use crate::Result;

/// Where a deferred call is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallState {
    /// Waiting for a worker.
    Pending,
    /// Being tried.
    Running,
    /// Answered; its results are kept until it expires.
    Completed,
    /// Failed (after its retries); its error is kept until it expires.
    Failed,
}

impl CallState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            CallState::Pending => "pending",
            CallState::Running => "running",
            CallState::Completed => "completed",
            CallState::Failed => "failed",
        }
    }

    fn parse(s: &str) -> CallState {
        match s {
            "pending" => CallState::Pending,
            "running" => CallState::Running,
            "completed" => CallState::Completed,
            _ => CallState::Failed,
        }
    }

    /// Whether the call has its final answer.
    pub fn is_finished(self) -> bool {
        matches!(self, CallState::Completed | CallState::Failed)
    }
}

/// What started a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOrigin {
    /// `.defer()` (EnqueueRemoteCall).
    Deferred,
    /// The function's `schedule`.
    Scheduled,
}

impl CallOrigin {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            CallOrigin::Deferred => "deferred",
            CallOrigin::Scheduled => "scheduled",
        }
    }

    fn parse(s: &str) -> CallOrigin {
        if s == "scheduled" {
            CallOrigin::Scheduled
        } else {
            CallOrigin::Deferred
        }
    }
}

/// One deferred call as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallRecord {
    /// Id (what the SDK polls with).
    pub id: String,
    /// Environment it belongs to.
    pub environment_id: String,
    /// The function called (whichever version it serves when the call runs).
    pub function_id: String,
    /// The queue it counts against (`queue_policy.key`, or the function's own).
    pub queue_key: String,
    /// Its state.
    pub state: CallState,
    /// The request message (an encoded `CallFunctionRequest`).
    pub request: Vec<u8>,
    /// The answer's messages, gRPC-framed, once completed.
    pub results: Option<Vec<u8>>,
    /// The error the caller gets, once failed.
    pub error: Option<String>,
    /// Times it was claimed to run.
    pub attempts: i64,
    /// Client that enqueued it.
    pub created_by: String,
    /// ms since the epoch.
    pub created_at: i64,
    /// When its last run started.
    pub started_at: Option<i64>,
    /// When it finished.
    pub finished_at: Option<i64>,
    /// When its answer is dropped.
    pub expires_at: Option<i64>,
    /// What started it.
    pub origin: CallOrigin,
}

const COLUMNS: &str = "id, environment_id, function_id, queue_key, state, request, results, error, attempts, \
                       created_by, created_at, started_at, finished_at, expires_at, origin";

/// Repository of [`CallRecord`]s.
pub struct FunctionCalls<'c> {
    conn: &'c Connection,
}

impl<'c> FunctionCalls<'c> {
    pub(crate) fn new(conn: &'c Connection) -> Self {
        Self { conn }
    }

    /// Records a new pending call.
    pub fn insert(&self, c: &CallRecord) -> Result<()> {
        self.conn.execute(
            &format!("INSERT INTO function_calls ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)"),
            rusqlite::params![
                c.id,
                c.environment_id,
                c.function_id,
                c.queue_key,
                c.state.as_str(),
                c.request,
                c.results,
                c.error,
                c.attempts,
                c.created_by,
                c.created_at,
                c.started_at,
                c.finished_at,
                c.expires_at,
                c.origin.as_str()
            ],
        )?;
        Ok(())
    }

    /// Calls of `queue_key` not yet finished (what `queue_policy.max_items` bounds).
    pub fn unfinished(&self, queue_key: &str) -> Result<u64> {
        let n: i64 = self.conn.query_row(
            "SELECT count(*) FROM function_calls WHERE queue_key = ?1 AND state IN ('pending', 'running')",
            [queue_key],
            |r| r.get(0),
        )?;
        Ok(n as u64)
    }

    /// The functions with pending calls (environment id, function id) and how many each has, oldest waiting first.
    pub fn pending_by_function(&self) -> Result<Vec<(String, String, u64)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT environment_id, function_id, count(*), min(created_at) AS oldest FROM function_calls \
             WHERE state = 'pending' GROUP BY environment_id, function_id ORDER BY oldest",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64)))?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Calls not yet finished of the live function named `name` in an environment (a queue-depth trigger's depth).
    pub fn unfinished_of_named(&self, environment_id: &str, name: &str) -> Result<u64> {
        let n: i64 = self.conn.query_row(
            "SELECT count(*) FROM function_calls c JOIN functions f ON c.function_id = f.id \
             WHERE f.environment_id = ?1 AND f.name = ?2 AND f.deleted_at IS NULL \
             AND c.state IN ('pending', 'running')",
            [environment_id, name],
            |r| r.get(0),
        )?;
        Ok(n as u64)
    }

    /// Calls of function `function_id` from `origin` not yet finished.
    pub fn unfinished_of(&self, function_id: &str, origin: CallOrigin) -> Result<u64> {
        let n: i64 = self.conn.query_row(
            "SELECT count(*) FROM function_calls WHERE function_id = ?1 AND origin = ?2 \
             AND state IN ('pending', 'running')",
            [function_id, origin.as_str()],
            |r| r.get(0),
        )?;
        Ok(n as u64)
    }

    /// Marks up to `limit` of function `function_id`'s oldest pending calls running and returns them, oldest first.
    pub fn claim(&self, function_id: &str, limit: u32, now: i64) -> Result<Vec<CallRecord>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "UPDATE function_calls SET state = 'running', started_at = ?3, attempts = attempts + 1 \
             WHERE id IN (SELECT id FROM function_calls WHERE function_id = ?1 AND state = 'pending' \
             ORDER BY created_at, id LIMIT ?2) RETURNING {COLUMNS}"
        ))?;
        let mut calls = stmt
            .query_map(rusqlite::params![function_id, limit, now], call_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        calls.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(calls)
    }

    /// Records a running call's answer; false if it was not running (purged meanwhile).
    pub fn finish(&self, id: &str, answer: CallAnswer<'_>, now: i64, expires_at: i64) -> Result<bool> {
        let (state, results, error) = match answer {
            CallAnswer::Completed(r) => (CallState::Completed, Some(r), None),
            CallAnswer::Failed(e) => (CallState::Failed, None, Some(e)),
        };
        let n = self.conn.execute(
            "UPDATE function_calls SET state = ?2, results = ?3, error = ?4, finished_at = ?5, expires_at = ?6 \
             WHERE id = ?1 AND state = 'running'",
            rusqlite::params![id, state.as_str(), results, error, now, expires_at],
        )?;
        Ok(n > 0)
    }

    /// Puts every running call back to pending (a server starting again after it stopped with calls running).
    pub fn requeue_running(&self) -> Result<usize> {
        Ok(self.conn.execute("UPDATE function_calls SET state = 'pending' WHERE state = 'running'", [])?)
    }

    /// One call of an environment.
    pub fn get(&self, environment_id: &str, id: &str) -> Result<Option<CallRecord>> {
        Ok(self
            .conn
            .prepare_cached(&format!("SELECT {COLUMNS} FROM function_calls WHERE id = ?1 AND environment_id = ?2"))?
            .query_row([id, environment_id], call_row)
            .optional()?)
    }

    /// A function's calls, newest first, from `offset`.
    pub fn of_function(&self, function_id: &str, limit: u32, offset: u32) -> Result<Vec<CallRecord>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM function_calls WHERE function_id = ?1 ORDER BY created_at DESC, id DESC \
             LIMIT ?2 OFFSET ?3"
        ))?;
        let rows = stmt.query_map(rusqlite::params![function_id, limit, offset], call_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Drops a function's calls that have not started (its deletion); returns how many.
    pub fn drop_pending(&self, function_id: &str) -> Result<usize> {
        Ok(self
            .conn
            .execute("DELETE FROM function_calls WHERE function_id = ?1 AND state = 'pending'", [function_id])?)
    }

    /// Drops finished calls whose answers expired; returns how many.
    pub fn expire(&self, now: i64) -> Result<usize> {
        Ok(self.conn.execute("DELETE FROM function_calls WHERE expires_at IS NOT NULL AND expires_at <= ?1", [now])?)
    }
}

/// How a call ended.
#[derive(Debug, Clone, Copy)]
pub enum CallAnswer<'a> {
    /// The answer's messages, gRPC-framed.
    Completed(&'a [u8]),
    /// The error the caller gets.
    Failed(&'a str),
}

fn call_row(r: &Row<'_>) -> rusqlite::Result<CallRecord> {
    Ok(CallRecord {
        id: r.get(0)?,
        environment_id: r.get(1)?,
        function_id: r.get(2)?,
        queue_key: r.get(3)?,
        state: CallState::parse(&r.get::<_, String>(4)?),
        request: r.get(5)?,
        results: r.get(6)?,
        error: r.get(7)?,
        attempts: r.get(8)?,
        created_by: r.get(9)?,
        created_at: r.get(10)?,
        started_at: r.get(11)?,
        finished_at: r.get(12)?,
        expires_at: r.get(13)?,
        origin: CallOrigin::parse(&r.get::<_, String>(14)?),
    })
}
