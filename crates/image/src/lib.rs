//! Images: turning an image reference into read-only root filesystem layers and an image config.
//!
//! Today's provider builds Debian-based equivalents of `python:X.Y-slim-SUITE` (and `debian:SUITE[-slim]`)
//! from the Debian archive with `mmdebstrap`, once per reference, cached in the layer store. A Python version
//! that no Debian suite ships is an error that says which versions exist; nothing is substituted silently.

#![warn(missing_docs)]

mod debian;
mod inventory;
mod recipe;
mod reference;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub use debian::Mirror;
pub use inventory::{ImageGcReport, StoredImage};
pub use recipe::{Recipe, Step};
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
    /// The user processes run as (Dockerfile `USER`); root when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
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

/// Prefix of the references of images this store built: `compute.local/image@sha256:<key>`.
pub const BUILT_PREFIX: &str = "compute.local/image@sha256:";

/// A built image: its layers (top first) and config.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// Layer directories, top first (the base's last).
    pub layers: Vec<PathBuf>,
    /// Config.
    pub config: ImageConfig,
    /// How the base was obtained.
    pub provenance: String,
}

/// The image store of a node.
pub struct ImageStore {
    dir: PathBuf,
    mirror: Mirror,
    aliases: HashMap<String, String>,
    building: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl ImageStore {
    /// A store in `dir` fetching from `mirror`.
    pub fn new(dir: &Path, mirror: Mirror, aliases: HashMap<String, String>) -> Result<Self, ImageError> {
        for sub in ["base", "layers", "images"] {
            std::fs::create_dir_all(dir.join(sub))
                .map_err(|e| ImageError::Io(format!("creating {}: {e}", dir.join(sub).display())))?;
        }
        // Base builds a crash interrupted (another process's would be live: the pid is in the name).
        if let Ok(entries) = std::fs::read_dir(dir.join("base")) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some((_, pid)) = name.rsplit_once(".building-") else { continue };
                let alive = pid.parse::<i32>().is_ok_and(|p| Path::new(&format!("/proc/{p}")).exists());
                if !alive || pid == std::process::id().to_string() {
                    tracing::warn!(dir = %e.path().display(), "removing a base build a crash interrupted");
                    debian::remove_build_dir(&e.path());
                }
            }
        }
        Ok(Self { dir: dir.to_path_buf(), mirror, aliases, building: Mutex::default() })
    }

    /// The reference an operator alias maps `reference` to, if any.
    pub fn alias(&self, reference: &str) -> Option<&str> {
        self.aliases.get(reference.trim()).map(String::as_str)
    }

    /// Checks that `reference` names something this store can provide (without building it).
    pub fn check(&self, reference: &str) -> Result<(), ImageError> {
        if let Some(key) = reference.strip_prefix(BUILT_PREFIX) {
            return if self.manifest_path(key).exists() {
                Ok(())
            } else {
                Err(ImageError::Unsupported(format!("image {reference:?} was not built by this server")))
            };
        }
        BaseRef::parse(self.alias(reference).unwrap_or(reference)).map(|_| ())
    }

    /// The key a base reference's layers are derived from.
    pub fn base_key(&self, reference: &str) -> Result<String, ImageError> {
        Ok(format!("base:{}", BaseRef::parse(self.alias(reference).unwrap_or(reference))?.cache_key()))
    }

    /// Where the layer with `key` lives once committed.
    pub fn layer_dir(&self, key: &str) -> PathBuf {
        self.dir.join("layers").join(key)
    }

    /// Whether the layer with `key` is committed.
    pub fn has_layer(&self, key: &str) -> bool {
        self.layer_dir(key).join(".complete").exists()
    }

    /// A fresh scratch directory, on the store's filesystem (so committing is a rename).
    pub fn scratch(&self, name: &str) -> Result<PathBuf, ImageError> {
        let d = self.dir.join("layers").join(format!(".tmp-{name}"));
        let _ = std::fs::remove_dir_all(&d);
        let _ = std::fs::remove_dir_all(d.with_extension("work"));
        std::fs::create_dir_all(&d).map_err(|e| ImageError::Io(format!("creating {}: {e}", d.display())))?;
        Ok(d)
    }

    /// Moves a finished layer into place under `key`: a layer is `<key>/diff` plus a `.complete` marker written
    /// last, so an interrupted commit is never taken for a layer.
    pub fn commit_layer(&self, key: &str, scratch: &Path) -> Result<PathBuf, ImageError> {
        let dir = self.layer_dir(key);
        let io = |e: std::io::Error| ImageError::Io(format!("committing layer {key}: {e}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(io)?;
        std::fs::rename(scratch, dir.join("diff")).map_err(io)?;
        let _ = std::fs::remove_dir_all(scratch.with_extension("work"));
        std::fs::write(dir.join(".complete"), b"").map_err(io)?;
        Ok(dir.join("diff"))
    }

    fn manifest_path(&self, key: &str) -> PathBuf {
        self.dir.join("images").join(format!("{key}.json"))
    }

    /// Records a built image; returns its reference.
    pub fn save_manifest(&self, key: &str, manifest: &Manifest) -> Result<String, ImageError> {
        let path = self.manifest_path(key);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(manifest).expect("manifests serialize"))
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| ImageError::Io(format!("writing {}: {e}", path.display())))?;
        Ok(format!("{BUILT_PREFIX}{key}"))
    }

    /// The reference of the built image whose key starts with `prefix`, if exactly one does.
    pub fn built_with_prefix(&self, prefix: &str) -> Option<String> {
        let mut found = std::fs::read_dir(self.dir.join("images"))
            .ok()?
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".json")).map(str::to_string))
            .filter(|k| k.starts_with(prefix));
        let key = found.next()?;
        found.next().is_none().then(|| format!("{BUILT_PREFIX}{key}"))
    }

    /// The built image with `key`, if any.
    pub fn manifest(&self, key: &str) -> Option<Manifest> {
        std::fs::read(self.manifest_path(key)).ok().and_then(|b| serde_json::from_slice(&b).ok())
    }

    /// Resolves `reference` to layers, building its base on first use. Concurrent calls for the same
    /// reference share one build.
    pub async fn resolve(&self, reference: &str) -> Result<ResolvedImage, ImageError> {
        if let Some(key) = reference.strip_prefix(BUILT_PREFIX) {
            let m = self
                .manifest(key)
                .ok_or_else(|| ImageError::Unsupported(format!("image {reference:?} was not built by this server")))?;
            return Ok(ResolvedImage {
                reference: reference.into(),
                layers: m.layers,
                config: m.config,
                provenance: m.provenance,
            });
        }
        let aliased = self.alias(reference);
        if let Some(target) = aliased {
            tracing::info!(image = reference, alias = target, "operator alias applied");
        }
        let base = BaseRef::parse(aliased.unwrap_or(reference))?;
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
        let mut provenance = std::fs::read_to_string(target.join("provenance")).unwrap_or_default();
        if let Some(alias) = aliased {
            provenance = format!("operator alias {reference} -> {alias}; {provenance}");
        }
        Ok(ResolvedImage { reference: reference.to_string(), layers: vec![target.join("rootfs")], config, provenance })
    }
}
