//! Images: turning an image reference into read-only root filesystem layers and an image config.
//!
//! Today's provider builds Debian-based equivalents of `python:X.Y-slim-SUITE` (and `debian:SUITE[-slim]`)
//! from the Debian archive with `mmdebstrap`, once per reference, cached in the layer store. A Python version
//! that no Debian suite ships is an error that says which versions exist; nothing is substituted silently.

#![warn(missing_docs)]

mod debian;
mod reference;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub use debian::Mirror;
pub use reference::{BaseRef, Distro};

/// Why an image could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The reference is malformed or names something no provider offers.
    #[error("{0}")]
    Unsupported(String),
    /// Building the base failed.
    #[error("building {reference}: {message}")]
    Build {
        /// The image.
        reference: String,
        /// What went wrong (with the tail of the build's output).
        message: String,
    },
    /// The layer store failed.
    #[error("image store: {0}")]
    Io(String),
}

/// The parts of an image config a sandbox uses.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageConfig {
    /// Environment.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub workdir: String,
    /// Entrypoint.
    pub entrypoint: Vec<String>,
    /// Default command.
    pub cmd: Vec<String>,
}

/// An image ready to run.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    /// The reference asked for.
    pub reference: String,
    /// Read-only layers, top first.
    pub layers: Vec<PathBuf>,
    /// Its config.
    pub config: ImageConfig,
    /// How it was obtained, for logs and inspection (e.g. which suite provided the Python).
    pub provenance: String,
}

/// The image store of a node.
pub struct ImageStore {
    dir: PathBuf,
    mirror: Mirror,
    building: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl ImageStore {
    /// A store in `dir` fetching from `mirror`.
    pub fn new(dir: &Path, mirror: Mirror) -> Result<Self, ImageError> {
        std::fs::create_dir_all(dir.join("base"))
            .map_err(|e| ImageError::Io(format!("creating {}: {e}", dir.display())))?;
        Ok(Self { dir: dir.to_path_buf(), mirror, building: Mutex::default() })
    }

    /// Resolves `reference` to layers, building its base on first use. Concurrent calls for the same
    /// reference share one build.
    pub async fn resolve(&self, reference: &str) -> Result<ResolvedImage, ImageError> {
        let base = BaseRef::parse(reference)?;
        let key = base.cache_key();
        let target = self.dir.join("base").join(&key);
        let lock = self.building.lock().unwrap_or_else(|p| p.into_inner()).entry(key.clone()).or_default().clone();
        let _guard = lock.lock().await;
        if !target.join("rootfs").is_dir() {
            debian::build(&base, &self.mirror, &target).await?;
        }
        let config: ImageConfig = std::fs::read(target.join("config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| ImageError::Io(format!("{} has no readable config.json", target.display())))?;
        let provenance = std::fs::read_to_string(target.join("provenance")).unwrap_or_default();
        Ok(ResolvedImage { reference: reference.to_string(), layers: vec![target.join("rootfs")], config, provenance })
    }
}
