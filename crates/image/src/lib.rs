//! Images: turning an image reference into read-only root filesystem layers and an image config.
//!
//! Base images come from providers tried in a configured order:
//! - `debian`: Debian-based equivalents of `python:X.Y-slim-SUITE` (and `debian:SUITE[-slim]`) built from the
//!   Debian archive with `mmdebstrap`. A Python version that no Debian suite ships is an error that says which
//!   versions exist; nothing is substituted silently.
//! - `registry`: OCI registries (mirrors and credentials configurable, multi-arch indexes resolved to this
//!   machine's platform, every blob verified against its digest).
//!
//! `compute image import` adds images from OCI archives. Whatever a provider produced is cached in the store and
//! resolved without it afterwards; an image pulled or imported under a name wins over building that name.

#![warn(missing_docs)]

pub mod copy;
mod debian;
mod inventory;
pub mod oci;
mod recipe;
mod reference;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub use debian::Mirror;
pub use inventory::{ImageGcReport, StoredImage};
pub use oci::name::ImageName;
pub use oci::progress::ProgressView;
pub use oci::registry::{Credentials, RegistryConfig, DOCKER_HUB_ENDPOINT};
pub use oci::Imported;
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
    /// No provider could produce the image (each one's reason is in the message).
    #[error("{0}")]
    Unavailable(String),
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

/// A source of base images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// Builds `python:X.Y-slim-SUITE` and `debian:SUITE[-slim]` from the Debian archive.
    Debian,
    /// Pulls from OCI registries.
    Registry,
}

impl std::str::FromStr for Provider {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "debian" => Ok(Provider::Debian),
            "registry" => Ok(Provider::Registry),
            other => Err(format!("image provider {other:?} is not one of: debian, registry")),
        }
    }
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Provider::Debian => "debian",
            Provider::Registry => "registry",
        })
    }
}

/// How a store gets base images.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// The Debian archive (default: the one this machine's apt uses).
    pub debian_mirror: Option<Mirror>,
    /// Operator aliases: reference → the reference used instead.
    pub aliases: HashMap<String, String>,
    /// Providers, in the order they are tried.
    pub providers: Vec<Provider>,
    /// Registry access.
    pub registry: RegistryConfig,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            debian_mirror: Mirror::from_host(),
            aliases: HashMap::new(),
            providers: vec![Provider::Debian, Provider::Registry],
            registry: RegistryConfig::default(),
        }
    }
}

/// Why providers refused a reference, by provider.
type Refusals = Vec<(Provider, String)>;

/// One way a provider would produce a base.
enum Route {
    Debian(BaseRef),
    Registry(ImageName),
}

impl Route {
    /// The base directory name (also the root of the layer keys built on it).
    fn key(&self) -> String {
        match self {
            Route::Debian(b) => b.cache_key(),
            Route::Registry(n) => oci::base_key(n),
        }
    }
}

/// The image store of a node.
pub struct ImageStore {
    dir: PathBuf,
    mirror: Option<Mirror>,
    aliases: HashMap<String, String>,
    providers: Vec<Provider>,
    registry: oci::registry::Registry,
    building: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Pulls in flight, by canonical name, with their progress.
    pulls: Mutex<HashMap<String, Arc<oci::progress::PullProgress>>>,
}

impl ImageStore {
    /// A store in `dir`.
    pub fn new(dir: &Path, options: StoreOptions) -> Result<Self, ImageError> {
        if options.providers.is_empty() {
            return Err(ImageError::Unsupported(
                "image_providers is empty: name at least one of debian, registry".into(),
            ));
        }
        for sub in ["base", "layers", "images"] {
            std::fs::create_dir_all(dir.join(sub))
                .map_err(|e| ImageError::Io(format!("creating {}: {e}", dir.join(sub).display())))?;
        }
        // Base builds a crash interrupted (another process's would be live: the pid is in the name).
        if let Ok(entries) = std::fs::read_dir(dir.join("base")) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let pid = match name.rsplit_once(".building-") {
                    Some((_, pid)) => pid,
                    // An OCI archive extracted for an import.
                    None => match name.strip_prefix(".import-").and_then(|r| r.split_once('-')) {
                        Some((pid, _)) => pid,
                        None => continue,
                    },
                };
                let alive = pid.parse::<i32>().is_ok_and(|p| Path::new(&format!("/proc/{p}")).exists());
                if !alive || pid == std::process::id().to_string() {
                    tracing::warn!(dir = %e.path().display(), "removing a base build a crash interrupted");
                    debian::remove_build_dir(&e.path());
                }
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            mirror: options.debian_mirror,
            aliases: options.aliases,
            providers: options.providers,
            registry: oci::registry::Registry::new(options.registry)?,
            building: Mutex::default(),
            pulls: Mutex::default(),
        })
    }

    /// The lock that serializes work on `key` (a base, a layer).
    pub(crate) fn lock_for(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.building.lock().unwrap_or_else(|p| p.into_inner()).entry(key.to_string()).or_default().clone()
    }

    /// The ways the configured providers would produce `reference` (after aliases), in order; an error naming
    /// why each refused when none would.
    fn routes(&self, reference: &str) -> Result<Vec<Route>, ImageError> {
        self.routes_and_refusals(reference).map(|(routes, _)| routes)
    }

    /// [`Self::routes`], with why each other provider refused (for the error if every route then fails).
    fn routes_and_refusals(&self, reference: &str) -> Result<(Vec<Route>, Refusals), ImageError> {
        let pulls = self.providers.contains(&Provider::Registry);
        let target = self.alias(reference).unwrap_or(reference);
        let mut routes = Vec::new();
        let mut refusals = Vec::new();
        for p in &self.providers {
            let route = match p {
                Provider::Debian => BaseRef::parse(target).map(Route::Debian),
                // A name whose registry has no endpoint (a Docker Hub name with no configured mirror) is refused
                // here, so a workload naming it fails at once.
                Provider::Registry => {
                    ImageName::parse(target).and_then(|n| self.registry.endpoints(&n).map(|_| n)).map(Route::Registry)
                }
            };
            match route {
                Ok(r) => routes.push(r),
                // Its refusal of a name it never builds says nothing the user needs when the registry tries it.
                Err(_) if *p == Provider::Debian && !BaseRef::covers(target) && pulls => {}
                Err(e) => refusals.push((*p, e.to_string())),
            }
        }
        if routes.is_empty() {
            let all: Vec<String> = refusals.iter().map(|(p, e)| format!("{p}: {e}")).collect();
            return Err(ImageError::Unsupported(all.join("; ")));
        }
        Ok((routes, refusals))
    }

    /// The stored record of an image pulled or imported under `reference`'s name, which wins over every provider.
    fn stored_record(&self, reference: &str) -> Option<oci::OciBase> {
        let target = self.alias(reference).unwrap_or(reference);
        ImageName::parse(target).ok().and_then(|n| self.oci_record(&n))
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
        self.routes(reference).map(|_| ())
    }

    /// The key a base reference's layers are derived from: its stored record's, or the first provider's that
    /// would produce it.
    pub fn base_key(&self, reference: &str) -> Result<String, ImageError> {
        if let Some(record) = self.stored_record(reference) {
            return Ok(format!("base:{}@{}", record.reference, record.manifest_digest));
        }
        Ok(format!("base:{}", self.routes(reference)?[0].key()))
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
        let with_alias = |provenance: String| match aliased {
            Some(alias) => format!("operator alias {reference} -> {alias}; {provenance}"),
            None => provenance,
        };
        let oci = |record: oci::OciBase| ResolvedImage {
            reference: reference.to_string(),
            layers: self.record_layers(&record),
            config: record.config,
            provenance: with_alias(record.provenance),
        };
        if let Some(record) = self.stored_record(reference) {
            return Ok(oci(record));
        }
        let (routes, mut failures) = self.routes_and_refusals(reference)?;
        for route in routes {
            let key = route.key();
            let lock = self.lock_for(&key);
            let _guard = lock.lock().await;
            match route {
                Route::Registry(name) => {
                    if let Some(record) = self.oci_record(&name) {
                        return Ok(oci(record));
                    }
                    match self.pull(&name).await {
                        Ok(record) => return Ok(oci(record)),
                        Err(e) => failures.push((Provider::Registry, e)),
                    }
                }
                Route::Debian(base) => {
                    let target = self.dir.join("base").join(&key);
                    if !target.join("rootfs").is_dir() {
                        let built = match &self.mirror {
                            Some(mirror) => debian::build(&base, mirror, &target).await,
                            None => Err(ImageError::Unsupported(
                                "this machine's apt configuration names no Debian archive; set debian_mirror in the \
                                 settings"
                                    .into(),
                            )),
                        };
                        if let Err(e) = built {
                            failures.push((Provider::Debian, e.to_string()));
                            continue;
                        }
                    }
                    let config: ImageConfig = std::fs::read(target.join("config.json"))
                        .ok()
                        .and_then(|b| serde_json::from_slice(&b).ok())
                        .ok_or_else(|| ImageError::Io(format!("{} has no readable config.json", target.display())))?;
                    let provenance = with_alias(std::fs::read_to_string(target.join("provenance")).unwrap_or_default());
                    return Ok(ResolvedImage {
                        reference: reference.to_string(),
                        layers: vec![target.join("rootfs")],
                        config,
                        provenance,
                    });
                }
            }
        }
        Err(ImageError::Unavailable(match failures.as_slice() {
            [(_, only)] => only.clone(),
            all => all.iter().map(|(p, e)| format!("{p} provider: {e}")).collect::<Vec<_>>().join("; "),
        }))
    }
}
