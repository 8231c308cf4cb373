//! What the store holds, for operators: listing, inspection, removal and garbage collection of images, bases and
//! layers.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::{ImageError, ImageStore, Manifest, BUILT_PREFIX};

/// One stored image or base.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StoredImage {
    /// The reference that resolves to it (`compute.local/image@sha256:…` or the base's cache key).
    pub reference: String,
    /// `built` or `base`.
    pub kind: &'static str,
    /// Layer directories, top first.
    pub layers: Vec<PathBuf>,
    /// Bytes on disk of its own files (a built image's layers; a base's root filesystem).
    pub size_bytes: u64,
    /// Where the base came from.
    pub provenance: String,
    /// Last modification, unix seconds.
    pub created: i64,
    /// The base directory, for bases.
    #[serde(skip)]
    base_dir: Option<PathBuf>,
}

/// What a garbage collection removed.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ImageGcReport {
    /// Layers no image or live workload uses.
    pub layers_removed: usize,
    /// Bases no image or live workload uses.
    pub bases_removed: usize,
    /// Bytes freed.
    pub bytes_freed: u64,
}

fn du(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else { return 0 };
    if !meta.is_dir() {
        return meta.blocks() * 512;
    }
    let mut total = meta.blocks() * 512;
    if let Ok(entries) = std::fs::read_dir(path) {
        for e in entries.flatten() {
            total += du(&e.path());
        }
    }
    total
}

fn mtime(path: &Path) -> i64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map(|m| m.mtime()).unwrap_or(0)
}

impl ImageStore {
    /// Every built image and every base in the store.
    pub fn list(&self) -> Result<Vec<StoredImage>, ImageError> {
        let mut out = Vec::new();
        let io = |p: &Path, e: std::io::Error| ImageError::Io(format!("reading {}: {e}", p.display()));
        let images = self.dir.join("images");
        for e in std::fs::read_dir(&images).map_err(|e| io(&images, e))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(key) = name.strip_suffix(".json") else { continue };
            let Some(m) = self.manifest(key) else { continue };
            // Its own layers (the base's root filesystem is listed, and counted, as the base).
            let own: u64 = m.layers.iter().filter(|l| l.ends_with("diff")).map(|l| du(l)).sum();
            out.push(StoredImage {
                reference: format!("{BUILT_PREFIX}{key}"),
                kind: "built",
                size_bytes: own,
                provenance: m.provenance.clone(),
                created: mtime(&e.path()),
                layers: m.layers,
                base_dir: None,
            });
        }
        let bases = self.dir.join("base");
        for e in std::fs::read_dir(&bases).map_err(|e| io(&bases, e))?.flatten() {
            let rootfs = e.path().join("rootfs");
            let record: Option<crate::oci::OciBase> =
                std::fs::read(e.path().join(crate::oci::RECORD)).ok().and_then(|b| serde_json::from_slice(&b).ok());
            if let Some(record) = record {
                let layers = self.record_layers(&record);
                out.push(StoredImage {
                    reference: record.reference,
                    kind: "pulled",
                    size_bytes: layers.iter().map(|l| du(l)).sum(),
                    provenance: record.provenance,
                    created: mtime(&e.path().join(crate::oci::RECORD)),
                    layers,
                    base_dir: Some(e.path()),
                });
                continue;
            }
            // A base still being built is not a base yet.
            if !rootfs.is_dir() || e.file_name().to_string_lossy().contains(".building-") {
                continue;
            }
            out.push(StoredImage {
                reference: e.file_name().to_string_lossy().into_owned(),
                kind: "base",
                size_bytes: du(&rootfs),
                provenance: std::fs::read_to_string(e.path().join("provenance")).unwrap_or_default(),
                created: mtime(&e.path()),
                layers: vec![rootfs],
                base_dir: Some(e.path()),
            });
        }
        out.sort_by_key(|i| std::cmp::Reverse(i.created));
        Ok(out)
    }

    /// The layer directories `reference` uses, if the store holds it (nothing is built).
    pub fn layers_of(&self, reference: &str) -> Option<Vec<PathBuf>> {
        if let Some(key) = reference.strip_prefix(BUILT_PREFIX) {
            return self.manifest(key).map(|m| m.layers);
        }
        if let Some(record) = self.stored_record(reference) {
            return Some(self.record_layers(&record));
        }
        // The first provider's product is what resolving would use.
        let key = self.routes(reference).ok()?.first()?.key();
        let rootfs = self.dir.join("base").join(key).join("rootfs");
        rootfs.is_dir().then(|| vec![rootfs])
    }

    /// The stored image `reference` names: a built image's reference, a base reference (`python:3.13-slim-trixie`,
    /// a pulled image's name) or a base's cache key as `compute image ls` prints it.
    pub fn inspect(&self, reference: &str) -> Result<(StoredImage, Option<Manifest>), ImageError> {
        let all = self.list()?;
        let wanted = match self.layers_of(reference) {
            Some(layers) => all.into_iter().find(|i| i.layers == layers || i.reference == reference),
            None => all.into_iter().find(|i| i.reference == reference),
        };
        let img = wanted.ok_or_else(|| ImageError::Unsupported(format!("the store holds no image {reference:?}")))?;
        let manifest = match img.reference.strip_prefix(BUILT_PREFIX) {
            Some(k) => self.manifest(k),
            None => self.stored_record(&img.reference).map(|r| Manifest {
                layers: self.record_layers(&r),
                config: r.config,
                provenance: r.provenance,
            }),
        };
        Ok((img, manifest))
    }

    /// Forgets an image (a built image's manifest, or a base); its layers go at the next garbage collection.
    pub fn remove(&self, reference: &str) -> Result<StoredImage, ImageError> {
        let (img, _) = self.inspect(reference)?;
        let io = |e: std::io::Error| ImageError::Io(format!("removing {}: {e}", img.reference));
        match (img.reference.strip_prefix(BUILT_PREFIX), &img.base_dir) {
            (Some(key), _) => std::fs::remove_file(self.dir.join("images").join(format!("{key}.json"))).map_err(io)?,
            (None, Some(dir)) => std::fs::remove_dir_all(dir).map_err(io)?,
            (None, None) => return Err(ImageError::Io(format!("{} has no base directory", img.reference))),
        }
        Ok(img)
    }

    /// Removes layers and bases that no built image and none of `live` (the layers of running workloads) use,
    /// and that are older than `grace_secs` (a build in progress has committed layers no manifest names yet).
    pub fn gc(&self, live: &HashSet<PathBuf>, grace_secs: u64) -> Result<ImageGcReport, ImageError> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let young = |p: &Path| now.saturating_sub(mtime(p).max(0) as u64) < grace_secs;
        // By name (`layers/<key>/diff`, `base/<name>/rootfs`), so a store that was moved or copied keeps what its
        // manifests name.
        let name_of = |p: &Path| p.parent().and_then(Path::file_name).map(|n| n.to_string_lossy().into_owned());
        let mut report = ImageGcReport::default();
        let live_names: HashSet<String> = live.iter().filter_map(|p| name_of(p)).collect();
        // One listing serves every decision below (listing measures every layer on disk).
        let stored = self.list()?;
        let layer_names = |kind: &str| -> HashSet<String> {
            stored.iter().filter(|i| i.kind == kind).flat_map(|i| i.layers.iter().filter_map(|p| name_of(p))).collect()
        };
        let built_names = layer_names("built");
        // Bases built from the Debian archive are a cache: unused ones go. Pulled and imported images stay until
        // `compute image rm` (an imported one could not be had again).
        for img in stored.iter().filter(|i| i.kind == "base") {
            let Some(dir) = &img.base_dir else { continue };
            let names: Vec<String> = img.layers.iter().filter_map(|p| name_of(p)).collect();
            let in_use = names.iter().any(|n| live_names.contains(n) || built_names.contains(n));
            if in_use || young(dir) {
                continue;
            }
            report.bytes_freed += du(dir);
            report.bases_removed += 1;
            let _ = std::fs::remove_dir_all(dir);
        }
        let mut used = live_names;
        used.extend(built_names);
        used.extend(layer_names("pulled"));
        // Leftovers of pulls and builds a crash interrupted (a pull or build in progress is younger than a day).
        let stale = |p: &Path| now.saturating_sub(mtime(p).max(0) as u64) > grace_secs.max(24 * 3600);
        let layers = self.dir.join("layers");
        for e in std::fs::read_dir(&layers).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp-") {
                if stale(&e.path()) {
                    report.bytes_freed += du(&e.path());
                    let _ = std::fs::remove_dir_all(e.path()).or_else(|_| std::fs::remove_file(e.path()));
                }
                continue;
            }
            if used.contains(&name) || young(&e.path()) {
                continue;
            }
            report.bytes_freed += du(&e.path());
            report.layers_removed += 1;
            let _ = std::fs::remove_dir_all(e.path());
        }
        Ok(report)
    }
}
