//! Compute's state store: one embedded SQLite database in the data directory, opened in WAL mode with a busy
//! timeout, evolved by numbered migrations, and read and written through typed repositories.
//!
//! The control plane is the only writer. Every multi-row change runs in one transaction ([`Store::write`]), so
//! killing the process at any instant leaves the previous or the next consistent state, never a mix.

#![warn(missing_docs)]

mod clients;
mod environments;
mod error;
mod function_calls;
mod functions;
mod migrations;
mod sandboxes;
mod scaling_groups;
mod secrets;
mod signing_keys;
mod volumes;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, TransactionBehavior};

pub use clients::{Client, Clients, NewClient};
pub use environments::{Environment, Environments};
pub use error::StoreError;
pub use function_calls::{CallAnswer, CallOrigin, CallRecord, CallState, FunctionCalls};
pub use functions::{FunctionRecord, FunctionVersionRecord, Functions};
pub use migrations::SCHEMA_VERSION;
pub use sandboxes::{SandboxRecord, SandboxStatus, Sandboxes};
pub use scaling_groups::{RevisionRecord, ScalingGroupRecord, ScalingGroups};
pub use secrets::{IntegrationRecord, ScopeKind, SealedTable, SecretRecord, Secrets};
pub use signing_keys::{SigningKey, SigningKeys};
pub use volumes::{RefRecord, VersionRecord, VolumeRecord, Volumes};

/// Result type of every store operation.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// How long a statement waits for another connection's write lock before failing with `SQLITE_BUSY`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The state store of one data directory.
pub struct Store {
    conn: Mutex<Connection>,
    path: PathBuf,
}

impl Store {
    /// Opens (creating if needed) the database at `path` and brings its schema up to [`SCHEMA_VERSION`].
    ///
    /// Fails with [`StoreError::TooNew`] when the file was written by a newer Compute, rather than guessing.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mut conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| StoreError::Open { path: path.clone(), source })?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // WAL keeps readers and the writer out of each other's way and makes every commit atomic on crash;
        // synchronous=NORMAL is durable against process crashes (only an OS crash may lose the last commits).
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // Freed and overwritten content is zeroed, so a rotated or deleted secret's ciphertext leaves the file.
        conn.pragma_update(None, "secure_delete", "ON")?;
        migrations::migrate(&mut conn)?;
        Ok(Self { conn: Mutex::new(conn), path })
    }

    /// The database file this store was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` against the current committed state.
    pub fn read<T>(&self, f: impl FnOnce(&Repos<'_>) -> Result<T>) -> Result<T> {
        let conn = self.lock();
        f(&Repos { conn: &conn })
    }

    /// Runs `f` in one immediate transaction: all of its writes commit together, or none do.
    pub fn write<T>(&self, f: impl FnOnce(&Repos<'_>) -> Result<T>) -> Result<T> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f(&Repos { conn: &tx })?;
        tx.commit()?;
        Ok(out)
    }

    /// Checks the database file's integrity (`PRAGMA integrity_check`), returning SQLite's findings if any.
    pub fn integrity_check(&self) -> Result<Vec<String>> {
        let conn = self.lock();
        let mut stmt = conn.prepare("PRAGMA integrity_check")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows.into_iter().filter(|r| r != "ok").collect())
    }

    /// Copies the write-ahead log into the database file and truncates it, so no older page image (a secret's
    /// previous ciphertext, say) is left in the log.
    pub fn checkpoint(&self) -> Result<()> {
        let conn = self.lock();
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-applied transaction (SQLite rolls it back when the
        // Transaction drops), so the connection is still sound: recover it instead of poisoning every caller.
        self.conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The typed repositories, bound to one connection or transaction.
pub struct Repos<'c> {
    conn: &'c Connection,
}

impl<'c> Repos<'c> {
    /// Environments: the namespaces every resource belongs to.
    pub fn environments(&self) -> Environments<'c> {
        Environments::new(self.conn)
    }

    /// API clients (id + hashed secret).
    pub fn clients(&self) -> Clients<'c> {
        Clients::new(self.conn)
    }

    /// Sandboxes and containers.
    pub fn sandboxes(&self) -> Sandboxes<'c> {
        Sandboxes::new(self.conn)
    }

    /// Scaling groups and their revisions.
    pub fn scaling_groups(&self) -> ScalingGroups<'c> {
        ScalingGroups::new(self.conn)
    }

    /// Functions and their versions.
    pub fn functions(&self) -> Functions<'c> {
        Functions::new(self.conn)
    }

    /// Deferred function calls.
    pub fn function_calls(&self) -> FunctionCalls<'c> {
        FunctionCalls::new(self.conn)
    }

    /// Secrets and integrations (sealed values).
    pub fn secrets(&self) -> Secrets<'c> {
        Secrets::new(self.conn)
    }

    /// Token signing keys.
    pub fn signing_keys(&self) -> SigningKeys<'c> {
        SigningKeys::new(self.conn)
    }

    /// Volumes, their versions, refs and trees.
    pub fn volumes(&self) -> Volumes<'c> {
        Volumes::new(self.conn)
    }
}

/// Milliseconds since the Unix epoch, the store's one time representation.
pub fn now_millis() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
