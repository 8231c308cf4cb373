//! The OCI base providers: pulling from registries (mirrors, credentials, multi-arch indexes, every blob
//! verified) and importing OCI archives for machines with no registry. Both store each layer once, keyed by its
//! uncompressed digest, and record the image as a base: `base/<key>/oci.json`.

mod docker_archive;
mod http;
mod layer;
pub mod name;
pub mod progress;
mod pull;
pub mod registry;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use name::ImageName;
use pull::Source;

use crate::{ImageConfig, ImageError, ImageStore};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A pull's counters, registered while it runs (see [`ImageStore::pull_progress`]).
pub(crate) struct PullTracker<'a> {
    store: &'a ImageStore,
    key: String,
    progress: Arc<progress::PullProgress>,
}

impl std::ops::Deref for PullTracker<'_> {
    type Target = progress::PullProgress;
    fn deref(&self) -> &Self::Target {
        &self.progress
    }
}

impl Drop for PullTracker<'_> {
    fn drop(&mut self) {
        let mut pulls = lock(&self.store.pulls);
        if pulls.get(&self.key).is_some_and(|p| Arc::ptr_eq(p, &self.progress)) {
            pulls.remove(&self.key);
        }
    }
}

/// The record of a pulled or imported image.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct OciBase {
    /// The normalised name it is stored under.
    pub reference: String,
    /// Digest of what the name pointed at (an index or a manifest).
    pub top_digest: String,
    /// Digest of this platform's manifest.
    pub manifest_digest: String,
    /// Layer keys in the store, top first.
    pub layers: Vec<String>,
    /// Run settings from the image config.
    pub config: ImageConfig,
    /// Where it came from.
    pub provenance: String,
}

/// The file a base directory holds for a pulled or imported image.
pub const RECORD: &str = "oci.json";

/// The base directory name of the image `name`.
pub fn base_key(name: &ImageName) -> String {
    let flat: String = name
        .canonical()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' })
        .collect();
    if flat.len() <= 180 {
        format!("oci-{flat}")
    } else {
        use sha2::Digest;
        format!("oci-{}-{}", &flat[..100], &layer::hex(&sha2::Sha256::digest(flat.as_bytes()))[..32])
    }
}

/// What an import stored.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Imported {
    /// The name it is stored (and resolvable) under.
    pub reference: String,
    /// Its manifest digest.
    pub manifest_digest: String,
    /// Its layers, top first.
    pub layers: Vec<PathBuf>,
}

impl ImageStore {
    /// The stored record of the pulled or imported image `name`, if any.
    pub(crate) fn oci_record(&self, name: &ImageName) -> Option<OciBase> {
        let path = self.dir.join("base").join(base_key(name)).join(RECORD);
        std::fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok())
    }

    /// The layer directories of a record, top first.
    pub(crate) fn record_layers(&self, record: &OciBase) -> Vec<PathBuf> {
        record.layers.iter().map(|k| self.layer_dir(k).join("diff")).collect()
    }

    fn save_record(&self, name: &ImageName, record: &OciBase) -> Result<(), ImageError> {
        let dir = self.dir.join("base").join(base_key(name));
        let io = |e: std::io::Error| ImageError::Io(format!("recording {}: {e}", record.reference));
        std::fs::create_dir_all(&dir).map_err(io)?;
        let tmp = dir.join(format!("{RECORD}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(record).expect("records serialize")).map_err(io)?;
        std::fs::rename(&tmp, dir.join(RECORD)).map_err(io)?;
        std::fs::write(dir.join("provenance"), &record.provenance).map_err(io)
    }

    /// Counts a pull of `name` where [`ImageStore::pull_progress`] reads it, until the returned handle is dropped.
    fn track_pull(&self, name: &ImageName) -> PullTracker<'_> {
        let progress = Arc::new(progress::PullProgress::default());
        let key = name.canonical();
        lock(&self.pulls).insert(key.clone(), progress.clone());
        PullTracker { store: self, key, progress }
    }

    /// How far a pull of `reference` (as `compute image pull` names it) has come, while it runs.
    pub fn pull_progress(&self, reference: &str) -> Option<progress::ProgressView> {
        let target = self.alias(reference).unwrap_or(reference);
        let name = ImageName::parse(target).ok()?;
        lock(&self.pulls).get(&name.canonical()).map(|p| p.view())
    }

    /// Pulls `name` from its registry (mirrors first) into the store.
    pub(crate) async fn pull(&self, name: &ImageName) -> Result<OciBase, String> {
        let started = std::time::Instant::now();
        let endpoints = self.registry.endpoints(name).map_err(|e| e.to_string())?;
        self.registry.check_destination(name).await.map_err(|e| e.to_string())?;
        let mut tried = Vec::new();
        for endpoint in endpoints {
            let top = match self.registry.manifest(&endpoint, &name.repository, name.manifest_reference()).await {
                Ok(top) => top,
                Err(e) => {
                    tracing::info!(image = %name.canonical(), endpoint = %endpoint.base, error = %e, "endpoint could not serve the image");
                    tried.push(e);
                    continue;
                }
            };
            let base = endpoint.base.clone();
            let source = Source::Registry { registry: &self.registry, endpoint, repository: name.repository.clone() };
            let progress = self.track_pull(name);
            let pulled = pull::assemble(self, &source, top, name.digest.as_deref(), &progress).await?;
            let via_index = if pulled.top_digest == pulled.manifest_digest {
                String::new()
            } else {
                format!("index {} -> ", pulled.top_digest)
            };
            let provenance = format!(
                "registry {base}, {}:{}: {via_index}manifest {} (linux/{}); {} layers, {} already stored, {} bytes \
                 fetched",
                name.repository,
                name.manifest_reference(),
                pulled.manifest_digest,
                pull::host_architecture(),
                pulled.layers.len(),
                pulled.reused_layers,
                pulled.fetched_bytes,
            );
            let record = OciBase {
                reference: name.canonical(),
                top_digest: pulled.top_digest,
                manifest_digest: pulled.manifest_digest,
                layers: pulled.layers,
                config: pulled.config,
                provenance,
            };
            self.save_record(name, &record).map_err(|e| e.to_string())?;
            tracing::info!(image = %record.reference, seconds = started.elapsed().as_secs_f64(), provenance = %record.provenance, "image pulled");
            return Ok(record);
        }
        Err(tried.join("; "))
    }

    /// Pulls `reference` from its registry now, even if the store holds it (a tag that moved is updated).
    pub async fn pull_now(&self, reference: &str) -> Result<crate::ResolvedImage, ImageError> {
        let target = self.alias(reference).unwrap_or(reference).to_string();
        let name = ImageName::parse(&target)?;
        let lock = self.lock_for(&base_key(&name));
        let _guard = lock.lock().await;
        let record =
            self.pull(&name).await.map_err(|message| ImageError::Unavailable(format!("{reference}: {message}")))?;
        Ok(crate::ResolvedImage {
            reference: reference.to_string(),
            layers: self.record_layers(&record),
            config: record.config,
            provenance: record.provenance,
        })
    }

    /// Imports the image in the OCI archive (a tar, optionally gzipped, of an OCI image layout), `docker save`
    /// archive or OCI layout directory at `path`, storing it as `name` (default: the name the archive gives it).
    /// Workloads then use it by that name with no registry at all.
    pub async fn import(&self, path: &Path, name: Option<&str>) -> Result<Imported, ImageError> {
        let fail = |m: String| ImageError::Unavailable(format!("importing {}: {m}", path.display()));
        let meta = std::fs::metadata(path).map_err(|e| fail(format!("cannot read it: {e}")))?;
        let (layout, extracted) = if meta.is_dir() {
            (path.to_path_buf(), None)
        } else {
            let dir = self.dir.join("base").join(format!(".import-{}-{}", std::process::id(), unique()));
            let (src, dst) = (path.to_path_buf(), dir.clone());
            tokio::task::spawn_blocking(move || extract(&src, &dst)).await.map_err(|e| fail(e.to_string()))?.map_err(
                |e| {
                    let _ = std::fs::remove_dir_all(&dir);
                    fail(e)
                },
            )?;
            (dir.clone(), Some(dir))
        };
        if extracted.is_some() && docker_archive::is_docker_archive(&layout) {
            let dir = layout.clone();
            let converted = tokio::task::spawn_blocking(move || docker_archive::to_oci_layout(&dir))
                .await
                .map_err(|e| fail(e.to_string()))
                .and_then(|r| r.map_err(fail));
            if let Err(e) = converted {
                let _ = std::fs::remove_dir_all(&layout);
                return Err(e);
            }
        }
        let result = self.import_layout(&layout, path, name).await.map_err(fail);
        if let Some(dir) = extracted {
            let _ = std::fs::remove_dir_all(dir);
        }
        result
    }

    async fn import_layout(&self, layout: &Path, origin: &Path, name: Option<&str>) -> Result<Imported, String> {
        if !layout.join("oci-layout").exists() {
            return Err(
                "neither an OCI image layout (no oci-layout file) nor a `docker save` archive (no manifest.json); \
                 a directory must be an OCI layout"
                    .into(),
            );
        }
        // A name given may also select among several images in the archive.
        let (entry, annotated) = match pull::layout_entry(layout, name) {
            Ok(found) => found,
            Err(_) if name.is_some() => pull::layout_entry(layout, None)?,
            Err(e) => return Err(e),
        };
        let chosen = name
            .map(str::to_string)
            .or(annotated.clone())
            .ok_or("the archive does not name its image; give a name (compute image import FILE --name NAME:TAG)")?;
        let image = ImageName::parse(&chosen).map_err(|e| {
            format!("{e}; the archive calls its image {annotated:?}, give a full name with --name NAME:TAG")
        })?;
        let source = Source::Layout(layout.to_path_buf());
        let top = tokio::fs::read(layout.join("blobs/sha256").join(entry.digest.trim_start_matches("sha256:")))
            .await
            .map_err(|e| format!("reading {}: {e}", entry.digest))?;
        let lock = self.lock_for(&base_key(&image));
        let _guard = lock.lock().await;
        let progress = progress::PullProgress::default();
        let pulled =
            pull::assemble(self, &source, (top, entry.media_type.clone()), Some(&entry.digest), &progress).await?;
        let layer_count = pulled.layers.len();
        let record = OciBase {
            reference: image.canonical(),
            top_digest: pulled.top_digest,
            manifest_digest: pulled.manifest_digest.clone(),
            layers: pulled.layers,
            config: pulled.config,
            provenance: format!(
                "imported from the OCI archive {} (manifest {}); {} layers, {} already stored",
                origin.display(),
                pulled.manifest_digest,
                layer_count,
                pulled.reused_layers
            ),
        };
        self.save_record(&image, &record).map_err(|e| e.to_string())?;
        tracing::info!(image = %record.reference, provenance = %record.provenance, "image imported");
        Ok(Imported {
            reference: record.reference.clone(),
            manifest_digest: record.manifest_digest.clone(),
            layers: self.record_layers(&record),
        })
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Extracts an OCI archive (tar or tar.gz) into `dir` as plain files.
fn extract(archive: &Path, dir: &Path) -> Result<(), String> {
    use std::io::{BufRead, BufReader};
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let mut file = BufReader::new(std::fs::File::open(archive).map_err(|e| format!("opening it: {e}"))?);
    let gz = file.fill_buf().map_err(|e| format!("reading it: {e}"))?.starts_with(&[0x1f, 0x8b]);
    let reader: Box<dyn std::io::Read> =
        if gz { Box::new(flate2::bufread::MultiGzDecoder::new(file)) } else { Box::new(file) };
    let mut tar = tar::Archive::new(reader);
    tar.set_preserve_ownerships(false);
    tar.unpack(dir).map_err(|e| format!("it is not a readable tar archive: {e}"))
}
