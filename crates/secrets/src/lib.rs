//! Secrets for Compute's workloads: values sealed with XChaCha20-Poly1305 under a key kept apart from the state
//! store ([`Keyring`]), integration kinds that expose the variables their clients expect ([`IntegrationKind`]),
//! and the rules that turn a workload's secret references into environment variables ([`SecretRef`]).
//!
//! This crate never touches the store: the control plane seals before it writes and opens after it reads, so
//! the database only ever holds ciphertext.

#![warn(missing_docs)]

mod integration;
mod keyring;
mod reference;

pub use integration::{IntegrationKind, Variable};
pub use keyring::{Keyring, KEY_FILE, NEXT_KEY_FILE};
pub use reference::{RefSource, SecretRef};

/// Why a secrets operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    /// Reading or writing a key file failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The system's reason.
        #[source]
        source: std::io::Error,
    },
    /// A key file or variable does not hold a key.
    #[error("{0}")]
    BadKey(String),
    /// The key file can be read by users other than its owner.
    #[error("{path} has mode {mode:o}: a secrets key must be readable by its owner alone (chmod 600 it)")]
    Permissions {
        /// The file.
        path: std::path::PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A value was sealed under a key this keyring does not hold.
    #[error("a secret was sealed under key {0}, which this server does not have (was secrets.key replaced?)")]
    UnknownKey(String),
    /// The ciphertext does not open under its key (tampered with, or moved to another row).
    #[error("a secret sealed under key {0} does not decrypt: it was altered or belongs to another record")]
    Decrypt(String),
}
