//! Endpoints the SDK's API has no method for, behind `POST /v1/admin/<resource>/<op>` with a JSON body:
//! - `volumes/{sync,gc,diff,rollback,fork}` (`compute volume …`), acting in the token's environment; `sync` (commit
//!   what a running workload wrote to its volumes) is open to any client of the environment;
//! - `images/{ls,inspect,rm,resolve,pull,import,gc}` (`compute image …`), on the node's image store.
//!
//! Everything but `volumes/sync` is for operator clients only.

use std::time::Duration;

use compute_control::volume::{Selector, VolumeSel};
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::json;
use tonic::body::Body;
use tonic::Status;

use crate::front_door::{authenticate, Shared};
use crate::http_util::{connect_error, json};
use crate::status::{from_control, from_volume};

/// Path prefix of the endpoints.
pub const PREFIX: &str = "/v1/admin/";

#[derive(Deserialize)]
struct ImageRef {
    reference: String,
}

#[derive(Deserialize)]
struct ImageImport {
    /// An OCI archive (or OCI layout directory) on the server's machine.
    path: String,
    /// The name to store it under (default: the archive's own).
    name: Option<String>,
}

#[derive(Deserialize)]
struct ImageGc {
    /// Layers younger than this are kept (a build in progress has some no image names yet); default 3600.
    grace_seconds: Option<u64>,
}

#[derive(Deserialize)]
struct Sync {
    /// The workload's id or name.
    sandbox: String,
}

#[derive(Deserialize)]
struct Gc {
    /// Objects and trees younger than this many seconds are kept (default: the server's grace period).
    grace_seconds: Option<u64>,
}

#[derive(Deserialize)]
struct Diff {
    volume: String,
    from: u64,
    to: u64,
}

#[derive(Deserialize)]
struct Rollback {
    volume: String,
    version: u64,
    #[serde(default = "main_ref")]
    r#ref: String,
}

#[derive(Deserialize)]
struct Fork {
    volume: String,
    version: Option<u64>,
    r#ref: Option<String>,
    to: String,
}

fn main_ref() -> String {
    "main".into()
}

/// Serves one operator request; `op` is the path after [`PREFIX`].
pub async fn serve(shared: &Shared, op: &str, req: Request<Incoming>) -> Response<Body> {
    match handle(shared, op, req).await {
        Ok(v) => json(StatusCode::OK, &v),
        Err(status) => connect_error(&status),
    }
}

async fn handle(shared: &Shared, op: &str, req: Request<Incoming>) -> Result<serde_json::Value, Status> {
    if req.method() != Method::POST {
        return Err(Status::unimplemented(format!("{PREFIX}{op} takes POST with a JSON body")));
    }
    let who = authenticate(shared, &req)?;
    if op != "volumes/sync" && !shared.control.auth().is_operator(&who.client_id).map_err(from_control)? {
        return Err(Status::permission_denied(format!(
            "{PREFIX}{op} is for operator clients (the admin client of `compute env`); client {} is not one",
            who.client_id
        )));
    }
    let is_json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|ct| ct.starts_with("application/json"));
    if !is_json {
        return Err(Status::invalid_argument("send the body as application/json"));
    }
    let body = Limited::new(req.into_body(), 1 << 20)
        .collect()
        .await
        .map_err(|e| Status::invalid_argument(format!("reading the body: {e}")))?
        .to_bytes();
    let body = if body.is_empty() { &b"{}"[..] } else { &body[..] };
    fn parse<'a, T: Deserialize<'a>>(op: &str, body: &'a [u8]) -> Result<T, Status> {
        serde_json::from_slice(body).map_err(|e| Status::invalid_argument(format!("{op}: {e}")))
    }
    let env = who.environment_id.as_str();
    let v = &shared.volumes;
    let name = |n: &str| VolumeSel { id: String::new(), name: n.into() };
    let images = shared.workloads.images();
    let image_err = |e: compute_image::ImageError| match e {
        compute_image::ImageError::Unsupported(m) => Status::not_found(m),
        other => Status::internal(other.to_string()),
    };
    match op {
        "images/ls" => Ok(json!({ "images": images.list().map_err(image_err)? })),
        "images/inspect" => {
            let r: ImageRef = parse(op, body)?;
            let (img, manifest) = images.inspect(&r.reference).map_err(image_err)?;
            let alias = images.alias(&r.reference).map(str::to_string);
            Ok(json!({ "image": img, "config": manifest.map(|m| m.config), "alias": alias }))
        }
        "images/rm" => {
            let r: ImageRef = parse(op, body)?;
            let live = live_layers(shared)?;
            let (img, _) = images.inspect(&r.reference).map_err(image_err)?;
            if img.layers.iter().any(|l| live.contains(l)) {
                return Err(Status::failed_precondition(format!(
                    "image {} is used by a live workload or scaling group; stop or delete it first",
                    img.reference
                )));
            }
            Ok(json!({ "removed": images.remove(&r.reference).map_err(image_err)? }))
        }
        "images/resolve" => {
            let r: ImageRef = parse(op, body)?;
            let img = images.resolve(&r.reference).await.map_err(|e| Status::invalid_argument(e.to_string()))?;
            Ok(json!({
                "reference": img.reference,
                "layers": img.layers,
                "config": img.config,
                "provenance": img.provenance,
            }))
        }
        "images/pull" => {
            let r: ImageRef = parse(op, body)?;
            let img = images.pull_now(&r.reference).await.map_err(|e| match e {
                compute_image::ImageError::Unsupported(m) => Status::invalid_argument(m),
                other => Status::failed_precondition(other.to_string()),
            })?;
            Ok(
                json!({ "reference": img.reference, "layers": img.layers, "config": img.config, "provenance": img.provenance }),
            )
        }
        "images/pull-progress" => {
            let r: ImageRef = parse(op, body)?;
            Ok(json!({ "progress": images.pull_progress(&r.reference) }))
        }
        "images/import" => {
            let r: ImageImport = parse(op, body)?;
            let path = std::path::Path::new(&r.path);
            if !path.is_absolute() {
                return Err(Status::invalid_argument(format!("path {:?} must be absolute", r.path)));
            }
            let imported = images.import(path, r.name.as_deref()).await.map_err(|e| match e {
                compute_image::ImageError::Unsupported(m) => Status::invalid_argument(m),
                other => Status::invalid_argument(other.to_string()),
            })?;
            Ok(json!(imported))
        }
        "images/gc" => {
            let r: ImageGc = parse(op, body)?;
            let live = live_layers(shared)?;
            Ok(json!(images.gc(&live, r.grace_seconds.unwrap_or(3600)).map_err(image_err)?))
        }
        "volumes/sync" => {
            let r: Sync = parse(op, body)?;
            let synced = shared.workloads.sync_volumes(&who, &r.sandbox).await.map_err(from_control)?;
            let list: Vec<_> =
                synced.into_iter().map(|(volume, version)| json!({"volume": volume, "version": version})).collect();
            Ok(json!({ "synced": list }))
        }
        "volumes/gc" => {
            let r: Gc = parse(op, body)?;
            let report = v.gc(r.grace_seconds.map(Duration::from_secs)).await.map_err(from_volume)?;
            Ok(json!({
                "versions_pruned": report.versions_pruned,
                "trees_deleted": report.trees_deleted,
                "objects_deleted": report.objects_deleted,
                "bytes_freed": report.bytes_freed,
                "objects_kept": report.objects_kept,
            }))
        }
        "volumes/diff" => {
            let r: Diff = parse(op, body)?;
            let from = v.view(env, &name(&r.volume), &Selector::Version(r.from)).map_err(from_volume)?.version;
            let to = v.view(env, &name(&r.volume), &Selector::Version(r.to)).map_err(from_volume)?.version;
            let to = to.ok_or_else(|| Status::not_found(format!("volume {:?} has no version {}", r.volume, r.to)))?;
            let d = v.diff(from.as_ref(), &to).map_err(from_volume)?;
            Ok(json!({"added": d.added, "modified": d.modified, "removed": d.removed}))
        }
        "volumes/rollback" => {
            let r: Rollback = parse(op, body)?;
            let ver = v.rollback(env, &name(&r.volume), &r.r#ref, r.version).await.map_err(from_volume)?;
            Ok(json!({"version": ver.version_id, "ref": ver.ref_name, "root": ver.root_tree}))
        }
        "volumes/fork" => {
            let r: Fork = parse(op, body)?;
            let selector = match (r.version, r.r#ref) {
                (Some(ver), _) => Selector::Version(ver),
                (None, Some(rf)) => Selector::Ref(rf),
                (None, None) => Selector::default(),
            };
            let (vol, ver) = v.fork_volume(env, &name(&r.volume), &selector, &r.to).await.map_err(from_volume)?;
            Ok(json!({"volume": vol.name, "volume_id": vol.id, "version": ver.version_id}))
        }
        other => Err(Status::not_found(format!("no endpoint {PREFIX}{other}: use sync, gc, diff, rollback or fork"))),
    }
}

/// Image layers in use: those of live workloads, and those live scaling groups start replicas from (a group at
/// zero replicas still needs its image).
fn live_layers(shared: &Shared) -> Result<std::collections::HashSet<std::path::PathBuf>, Status> {
    let mut live = shared.workloads.live_image_layers().map_err(from_control)?;
    live.extend(shared.scaling.image_layers_in_use().map_err(from_control)?);
    Ok(live)
}
