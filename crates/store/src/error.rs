use std::path::PathBuf;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database file could not be opened or created.
    #[error("cannot open the state store at {path}: {source}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// SQLite's reason.
        source: rusqlite::Error,
    },
    /// The file's schema is newer than this binary knows.
    #[error("the state store has schema version {found}, newer than this Compute understands ({supported}); upgrade Compute")]
    TooNew {
        /// Version recorded in the file.
        found: i64,
        /// Newest version this binary can migrate to.
        supported: i64,
    },
    /// A uniqueness constraint rejected the write (e.g. a name already taken).
    #[error("{what} already exists")]
    AlreadyExists {
        /// What collided, for the message.
        what: String,
    },
    /// The caller gave up on a transaction part-way (it was rolled back).
    #[error("transaction rolled back: {0}")]
    Aborted(String),
    /// Any other SQLite failure.
    #[error("state store: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

impl StoreError {
    /// Maps a constraint violation on insert to [`StoreError::AlreadyExists`], leaving other errors as they are.
    pub(crate) fn on_insert(err: rusqlite::Error, what: impl FnOnce() -> String) -> Self {
        match &err {
            rusqlite::Error::SqliteFailure(e, _) if e.code == rusqlite::ErrorCode::ConstraintViolation => {
                StoreError::AlreadyExists { what: what() }
            }
            _ => StoreError::Sqlite(err),
        }
    }
}
