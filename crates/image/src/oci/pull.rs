//! Turning an OCI image — in a registry or in an OCI layout on disk — into stored layers and a base record:
//! index → this machine's platform → manifest → config → layers, every blob checked against its digest.

use std::path::{Path, PathBuf};

use futures_util::{StreamExt, TryStreamExt};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::layer::hex;
use super::progress::PullProgress;
use super::registry::{Endpoint, Registry};
use crate::{ImageConfig, ImageStore};

const INDEX_TYPES: &[&str] =
    &["application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"];
const CONFIG_TYPES: &[&str] =
    &["application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json"];
/// Layers fetched and unpacked at once.
const PARALLEL_LAYERS: usize = 4;
/// The largest manifest or config accepted.
const MAX_JSON: u64 = 8 << 20;

/// A content descriptor.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type.
    #[serde(default)]
    pub media_type: String,
    /// `sha256:…`.
    pub digest: String,
    /// Bytes.
    #[serde(default)]
    pub size: u64,
    /// For index entries.
    pub platform: Option<Platform>,
    /// Annotations (an OCI layout's `index.json` names its images with them).
    #[serde(default)]
    pub annotations: std::collections::HashMap<String, String>,
}

/// An index entry's platform.
#[derive(Debug, Clone, Deserialize)]
pub struct Platform {
    /// `amd64`, `arm64`, …
    pub architecture: String,
    /// `linux`, …
    pub os: String,
    /// `v8`, …
    pub variant: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    #[serde(default)]
    media_type: String,
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
    schema_version: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct ConfigFile {
    config: Option<RunConfig>,
    rootfs: RootFs,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RunConfig {
    env: Option<Vec<String>>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    working_dir: Option<String>,
    user: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RootFs {
    diff_ids: Vec<String>,
}

/// The platform this machine runs, as image indexes spell it.
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        other => other,
    }
}

/// Where the blobs of one image come from.
pub enum Source<'a> {
    /// A registry endpoint.
    Registry {
        /// The client.
        registry: &'a Registry,
        /// The endpoint that answered for the manifest.
        endpoint: Endpoint,
        /// Repository.
        repository: String,
    },
    /// An OCI image layout directory (`oci-layout`, `index.json`, `blobs/sha256/…`).
    Layout(PathBuf),
}

impl Source<'_> {
    fn describe(&self) -> String {
        match self {
            Source::Registry { endpoint, repository, .. } => format!("{}/{repository}", endpoint.base),
            Source::Layout(dir) => format!("OCI layout {}", dir.display()),
        }
    }

    /// The manifest `digest` (an index entry's): its bytes and media type.
    async fn manifest(&self, digest: &str) -> Result<(Vec<u8>, String), String> {
        match self {
            Source::Registry { registry, endpoint, repository } => {
                registry.manifest(endpoint, repository, digest).await
            }
            Source::Layout(dir) => {
                let bytes = tokio::fs::read(layout_blob(dir, digest)?)
                    .await
                    .map_err(|e| format!("reading manifest {digest} from the layout: {e}"))?;
                Ok((bytes, String::new()))
            }
        }
    }

    /// A file holding the blob `desc`, verified against its digest and size. Blobs of a layout are checked
    /// where they lie; a registry's are downloaded to `scratch` (the caller removes it).
    async fn blob(&self, desc: &Descriptor, scratch: &Path, progress: &PullProgress) -> Result<PathBuf, String> {
        match self {
            Source::Layout(dir) => {
                let path = layout_blob(dir, &desc.digest)?;
                let path2 = path.clone();
                let got = tokio::task::spawn_blocking(move || sha256_file(&path2))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("reading blob {} from the layout: {e}", desc.digest))?;
                check(desc, &got.0, got.1)?;
                progress.add_bytes(got.1);
                Ok(path)
            }
            Source::Registry { registry, endpoint, repository } => {
                let downloaded = Self::download(registry, endpoint, repository, desc, scratch, progress).await;
                if downloaded.is_err() {
                    // A partial download is nobody's.
                    let _ = tokio::fs::remove_file(scratch).await;
                }
                downloaded
            }
        }
    }

    /// Downloads the blob `desc` to `scratch`, checking its size as it arrives and its digest at the end.
    async fn download(
        registry: &Registry,
        endpoint: &Endpoint,
        repository: &str,
        desc: &Descriptor,
        scratch: &Path,
        progress: &PullProgress,
    ) -> Result<PathBuf, String> {
        let mut resp = registry.blob(endpoint, repository, &desc.digest).await?;
        let mut file =
            tokio::fs::File::create(scratch).await.map_err(|e| format!("creating {}: {e}", scratch.display()))?;
        let mut h = Sha256::new();
        let mut n = 0u64;
        while let Some(chunk) = resp.chunk().await? {
            n += chunk.len() as u64;
            if desc.size > 0 && n > desc.size {
                return Err(format!("blob {} is larger than the {} bytes its descriptor says", desc.digest, desc.size));
            }
            h.update(&chunk);
            file.write_all(&chunk).await.map_err(|e| format!("writing {}: {e}", scratch.display()))?;
            progress.add_bytes(chunk.len() as u64);
        }
        file.flush().await.map_err(|e| format!("writing {}: {e}", scratch.display()))?;
        check(desc, &hex(&h.finalize()), n)?;
        Ok(scratch.to_path_buf())
    }

    async fn json_blob(&self, desc: &Descriptor, scratch: &Path) -> Result<Vec<u8>, String> {
        if desc.size > MAX_JSON {
            return Err(format!("{} is {} bytes, more than a config may be", desc.digest, desc.size));
        }
        let path = self.blob(desc, scratch, &PullProgress::default()).await?;
        let bytes = tokio::fs::read(&path).await.map_err(|e| format!("reading {}: {e}", path.display()));
        self.release(&path).await;
        bytes
    }

    /// Done with a file `blob` gave: a download is removed; a layout's own blob stays.
    async fn release(&self, path: &Path) {
        if matches!(self, Source::Registry { .. }) {
            let _ = tokio::fs::remove_file(path).await;
        }
    }
}

/// The lowercase hex SHA-256 of the file at `path`, and its size.
pub fn sha256_file(path: &Path) -> std::io::Result<(String, u64)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((hex(&h.finalize()), n))
}

fn digest_hex(digest: &str) -> Result<&str, String> {
    let hexd = digest.strip_prefix("sha256:").ok_or_else(|| format!("unsupported digest {digest:?} (only sha256)"))?;
    if hexd.len() != 64 || !hexd.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("malformed digest {digest:?}"));
    }
    Ok(hexd)
}

fn layout_blob(dir: &Path, digest: &str) -> Result<PathBuf, String> {
    let hexd = digest_hex(digest)?;
    Ok(dir.join("blobs").join("sha256").join(hexd))
}

fn check(desc: &Descriptor, got_hex: &str, got_size: u64) -> Result<(), String> {
    let want = desc.digest.strip_prefix("sha256:").unwrap_or(&desc.digest);
    if got_hex != want {
        return Err(format!(
            "blob {} failed verification: its content hashes to sha256:{got_hex} ({got_size} bytes); refusing it",
            desc.digest
        ));
    }
    if desc.size > 0 && got_size != desc.size {
        return Err(format!("blob {} is {got_size} bytes, its descriptor says {}", desc.digest, desc.size));
    }
    Ok(())
}

/// An image pulled into the store.
#[derive(Debug, Clone)]
pub struct Pulled {
    /// The digest of the image manifest used (for this platform).
    pub manifest_digest: String,
    /// The digest of what the name pointed at (an index, or the manifest itself).
    pub top_digest: String,
    /// Layer keys in the store, top first.
    pub layers: Vec<String>,
    /// The config's run settings.
    pub config: ImageConfig,
    /// Bytes fetched (compressed) for layers the store did not have.
    pub fetched_bytes: u64,
    /// Layers already in the store.
    pub reused_layers: usize,
}

/// Picks this machine's image from an index.
fn select_platform(index: &Manifest) -> Result<&Descriptor, String> {
    let arch = host_architecture();
    let candidates: Vec<&Descriptor> = index
        .manifests
        .iter()
        .filter(|d| d.platform.as_ref().is_some_and(|p| p.os == "linux" && p.architecture == arch))
        .collect();
    let preferred = candidates
        .iter()
        .find(|d| {
            let v = d.platform.as_ref().and_then(|p| p.variant.as_deref());
            arch != "arm64" || v.is_none() || v == Some("v8")
        })
        .or(candidates.first());
    preferred.copied().ok_or_else(|| {
        let have: Vec<String> = index
            .manifests
            .iter()
            .filter_map(|d| d.platform.as_ref())
            .map(|p| match &p.variant {
                Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                None => format!("{}/{}", p.os, p.architecture),
            })
            .collect();
        format!("the image has no linux/{arch} variant (it has: {})", have.join(", "))
    })
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Pulls the image whose top manifest (or index) is `top` from `source` into `store`. `pinned` is the digest the
/// caller asked for, if any: the top object must hash to it. Layers and bytes are counted in `progress`.
pub async fn assemble(
    store: &ImageStore,
    source: &Source<'_>,
    top: (Vec<u8>, String),
    pinned: Option<&str>,
    progress: &PullProgress,
) -> Result<Pulled, String> {
    let top_digest = format!("sha256:{}", sha256_hex(&top.0));
    if let Some(want) = pinned {
        if want != top_digest {
            return Err(format!(
                "{} answered content with digest {top_digest}, not the {want} asked for",
                source.describe()
            ));
        }
    }
    let parsed: Manifest = serde_json::from_slice(&top.0)
        .map_err(|e| format!("{} sent an unreadable manifest: {e}", source.describe()))?;
    if parsed.schema_version == Some(1) {
        return Err("the image uses a Docker schema 1 manifest, which is deprecated and not supported".into());
    }
    let media = if parsed.media_type.is_empty() { top.1.clone() } else { parsed.media_type.clone() };
    let is_index = INDEX_TYPES.contains(&media.as_str()) || (!parsed.manifests.is_empty() && parsed.config.is_none());
    let (manifest, manifest_digest) = if is_index {
        let chosen = select_platform(&parsed)?.clone();
        let (bytes, _) = source.manifest(&chosen.digest).await?;
        check(&chosen, &sha256_hex(&bytes), bytes.len() as u64)?;
        let m: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{} sent an unreadable manifest: {e}", source.describe()))?;
        (m, chosen.digest.clone())
    } else {
        (parsed, top_digest.clone())
    };
    let config_desc = manifest.config.clone().ok_or("the manifest names no config")?;
    if !config_desc.media_type.is_empty() && !CONFIG_TYPES.contains(&config_desc.media_type.as_str()) {
        return Err(format!(
            "the artifact is not a container image (its config is {}); only images can be run",
            config_desc.media_type
        ));
    }
    let scratch_blob = |name: &str| store.dir.join("layers").join(format!(".tmp-{name}.blob"));
    let config_hex = digest_hex(&config_desc.digest)?;
    let config_bytes = source.json_blob(&config_desc, &scratch_blob(&format!("config-{config_hex}"))).await?;
    let config: ConfigFile =
        serde_json::from_slice(&config_bytes).map_err(|e| format!("the image config is unreadable: {e}"))?;
    if config.rootfs.diff_ids.len() != manifest.layers.len() {
        return Err(format!(
            "the manifest lists {} layers but the config {}; the image is inconsistent",
            manifest.layers.len(),
            config.rootfs.diff_ids.len()
        ));
    }
    let jobs: Vec<(Descriptor, String)> =
        manifest.layers.iter().cloned().zip(config.rootfs.diff_ids.iter().cloned()).collect();
    progress.start(jobs.len(), jobs.iter().map(|(d, _)| d.size).sum());
    let results: Vec<(String, u64, bool)> =
        futures_util::stream::iter(jobs.into_iter().map(|(desc, diff_id)| async move {
            let diff_hex = digest_hex(&diff_id)?;
            let key = format!("oci-{diff_hex}");
            let lock = store.lock_for(&format!("layer:{key}"));
            let _guard = lock.lock().await;
            if store.has_layer(&key) {
                progress.add_bytes(desc.size);
                progress.layer_done();
                return Ok::<_, String>((key, 0, true));
            }
            let blob_path = source.blob(&desc, &scratch_blob(&key), progress).await?;
            let unpacked = async {
                let scratch = store.scratch(&key).map_err(|e| e.to_string())?;
                let (b, s, d) = (blob_path.clone(), scratch.clone(), diff_id.clone());
                let done = tokio::task::spawn_blocking(move || super::layer::unpack(&b, Some(&d), &s))
                    .await
                    .map_err(|e| e.to_string())?;
                if let Err(e) = done {
                    let _ = std::fs::remove_dir_all(&scratch);
                    return Err(format!("layer {}: {e}", desc.digest));
                }
                Ok(scratch)
            }
            .await;
            source.release(&blob_path).await;
            store.commit_layer(&key, &unpacked?).map_err(|e| e.to_string())?;
            progress.layer_done();
            Ok((key, desc.size, false))
        }))
        .buffered(PARALLEL_LAYERS)
        .try_collect()
        .await?;
    let run = config.config.unwrap_or_default();
    let mut env: Vec<(String, String)> = run
        .env
        .unwrap_or_default()
        .into_iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (kv, String::new()),
        })
        .collect();
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.insert(0, ("PATH".into(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()));
    }
    let workdir = run.working_dir.filter(|w| !w.is_empty()).unwrap_or_else(|| "/".into());
    let image_config = ImageConfig {
        env,
        workdir,
        entrypoint: run.entrypoint.unwrap_or_default(),
        cmd: run.cmd.unwrap_or_default(),
        user: run.user.filter(|u| !u.is_empty()),
    };
    Ok(Pulled {
        manifest_digest,
        top_digest,
        reused_layers: results.iter().filter(|r| r.2).count(),
        fetched_bytes: results.iter().map(|r| r.1).sum(),
        layers: results.into_iter().rev().map(|r| r.0).collect(),
        config: image_config,
    })
}

/// Reads an OCI layout's `index.json` and picks the image named `wanted` (matched against the
/// `org.opencontainers.image.ref.name` and `io.containerd.image.name` annotations), or its only image.
pub fn layout_entry(dir: &Path, wanted: Option<&str>) -> Result<(Descriptor, Option<String>), String> {
    let index =
        std::fs::read(dir.join("index.json")).map_err(|e| format!("the archive has no readable index.json: {e}"))?;
    let index: Manifest = serde_json::from_slice(&index).map_err(|e| format!("index.json is unreadable: {e}"))?;
    // `org.opencontainers.image.ref.name` is often a bare tag ("1", "latest"), which names no image.
    let name_of = |d: &Descriptor| {
        d.annotations
            .get("io.containerd.image.name")
            .or_else(|| d.annotations.get("org.opencontainers.image.ref.name").filter(|n| n.contains([':', '/'])))
            .cloned()
    };
    let entries = &index.manifests;
    let chosen = match wanted {
        Some(w) => entries.iter().find(|d| {
            d.annotations.get("org.opencontainers.image.ref.name").map(String::as_str) == Some(w)
                || d.annotations.get("io.containerd.image.name").map(String::as_str) == Some(w)
        }),
        None if entries.len() == 1 => entries.first(),
        None => None,
    };
    let chosen = chosen.ok_or_else(|| {
        let names: Vec<String> = entries.iter().map(|d| name_of(d).unwrap_or_else(|| d.digest.clone())).collect();
        match wanted {
            Some(w) => format!("the archive holds no image named {w:?} (it holds: {})", names.join(", ")),
            None => format!("the archive holds {} images; say which (it holds: {})", entries.len(), names.join(", ")),
        }
    })?;
    Ok((chosen.clone(), name_of(chosen)))
}
