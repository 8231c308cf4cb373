//! Docker's `docker save` archives (`manifest.json`, a config and uncompressed layer tars under names of their
//! own), rewritten in place as an OCI image layout, so that one import path — and its digest checks — serves both.

use std::path::Path;

use serde::Deserialize;

use super::pull::sha256_file;

const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SavedImage {
    config: String,
    #[serde(default)]
    repo_tags: Vec<String>,
    layers: Vec<String>,
}

/// Whether `dir` (an extracted archive) is in Docker's format and not an OCI layout.
pub fn is_docker_archive(dir: &Path) -> bool {
    !dir.join("oci-layout").exists() && dir.join("manifest.json").exists()
}

/// Moves the file `rel` under `dir` to `blobs/sha256/<its digest>`; returns its descriptor.
fn to_blob(dir: &Path, rel: &str, media_type: &str) -> Result<serde_json::Value, String> {
    if rel.split('/').any(|c| c == "..") || rel.starts_with('/') {
        return Err(format!("manifest.json names {rel:?}, outside the archive"));
    }
    let path = dir.join(rel);
    let blobs = dir.join("blobs/sha256");
    let (hex, size) = sha256_file(&path).map_err(|e| format!("reading {rel} from the archive: {e}"))?;
    let target = blobs.join(&hex);
    if target != path && !target.exists() {
        std::fs::create_dir_all(&blobs).map_err(|e| format!("creating {}: {e}", blobs.display()))?;
        std::fs::hard_link(&path, &target)
            .or_else(|_| std::fs::copy(&path, &target).map(|_| ()))
            .map_err(|e| format!("storing {rel}: {e}"))?;
    }
    Ok(serde_json::json!({"mediaType": media_type, "digest": format!("sha256:{hex}"), "size": size}))
}

/// Rewrites the Docker archive extracted at `dir` as an OCI layout: one index entry per saved image, named (for
/// `compute image import`) by its first repository tag.
pub fn to_oci_layout(dir: &Path) -> Result<(), String> {
    let listed = std::fs::read(dir.join("manifest.json")).map_err(|e| format!("reading manifest.json: {e}"))?;
    let saved: Vec<SavedImage> =
        serde_json::from_slice(&listed).map_err(|e| format!("manifest.json is not Docker's save format: {e}"))?;
    if saved.is_empty() {
        return Err("manifest.json lists no image".into());
    }
    let mut entries = Vec::new();
    for (i, image) in saved.iter().enumerate() {
        let config = to_blob(dir, &image.config, CONFIG)?;
        let layers = image.layers.iter().map(|l| to_blob(dir, l, LAYER)).collect::<Result<Vec<_>, _>>()?;
        let manifest =
            serde_json::json!({"schemaVersion": 2, "mediaType": MANIFEST, "config": config, "layers": layers});
        let bytes = serde_json::to_vec(&manifest).expect("manifests serialize");
        // Written under a name of its own and linked into blobs/, then the name goes (writing a second manifest
        // through a reused name would rewrite the first blob through its link).
        let name = format!(".manifest-{i}.json");
        std::fs::write(dir.join(&name), &bytes).map_err(|e| format!("writing {name}: {e}"))?;
        let mut entry = to_blob(dir, &name, MANIFEST)?;
        let _ = std::fs::remove_file(dir.join(&name));
        if let Some(tag) = image.repo_tags.first() {
            entry["annotations"] = serde_json::json!({ "io.containerd.image.name": tag });
        }
        entries.push(entry);
    }
    let index = serde_json::json!({"schemaVersion": 2, "manifests": entries});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).expect("indexes serialize"))
        .and_then(|()| std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#))
        .map_err(|e| format!("writing the layout: {e}"))
}
