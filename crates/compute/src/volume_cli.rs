//! `compute volume …`: volumes of the admin client's environment, through the running server's API (the SDK's
//! VolumeService for what it has, the operator endpoints for the rest).

use compute_proto::chalk::volume::v2::version_selector::Selector;
use compute_proto::chalk::volume::v2::volume_service_client::VolumeServiceClient;
use compute_proto::chalk::volume::v2::{
    CreateRefRequest, DeleteVolumeRequest, FileKind, ListFilesRequest, ListVolumeVersionsRequest, ListVolumesRequest,
    VersionSelector, VolumeRef,
};
use serde_json::json;

use crate::client::{ago, message_json, status_error, ApiClient};

/// `NAME` or `NAME@VERSION`.
pub fn split_version(spec: &str) -> anyhow::Result<(String, Option<u64>)> {
    match spec.split_once('@') {
        Some((name, v)) => {
            let v = v.parse().map_err(|_| anyhow::anyhow!("{spec:?}: the version after '@' must be a number"))?;
            Ok((name.to_string(), Some(v)))
        }
        None => Ok((spec.to_string(), None)),
    }
}

fn vref(name: &str) -> Option<VolumeRef> {
    Some(VolumeRef { name: name.into(), volume_id: String::new() })
}

impl ApiClient {
    fn volumes(&self) -> VolumeServiceClient<tonic::transport::Channel> {
        VolumeServiceClient::new(self.channel())
    }

    /// `compute volume ls`.
    pub async fn volume_ls(&self) -> anyhow::Result<()> {
        let mut cursor = String::new();
        let mut json = Vec::new();
        if !self.json() {
            println!("{:<22} {:<32} {:<12} CREATED", "ID", "NAME", "KIND");
        }
        loop {
            let req = ListVolumesRequest { limit: 1000, cursor: cursor.clone(), ..Default::default() };
            let page = self.volumes().list_volumes(self.req(req)).await.map_err(status_error)?.into_inner();
            for v in page.volumes {
                if self.json() {
                    json.push(message_json("chalk.volume.v2.ListedVolume", &v)?);
                    continue;
                }
                let kind = if v.volume_kind == Some(1) { "source_code" } else { "data" };
                println!(
                    "{:<22} {:<32} {:<12} {}",
                    v.volume_id,
                    v.name,
                    kind,
                    ago(v.created_at.map(|t| t.seconds).unwrap_or(0))
                );
            }
            if page.next_cursor.is_empty() {
                return self.finish_json(json);
            }
            cursor = page.next_cursor;
        }
    }

    /// `compute volume versions`.
    pub async fn volume_versions(&self, name: &str, r#ref: Option<String>) -> anyhow::Result<()> {
        let mut cursor = String::new();
        let mut json = Vec::new();
        if !self.json() {
            println!("{:<9} {:<9} {:<16} {:<38} CREATED", "VERSION", "PARENT", "REF", "COMMIT");
        }
        loop {
            let req = ListVolumeVersionsRequest {
                volume: vref(name),
                limit: 1000,
                cursor: cursor.clone(),
                r#ref: r#ref.clone(),
            };
            let page = self.volumes().list_volume_versions(self.req(req)).await.map_err(status_error)?.into_inner();
            for v in page.versions {
                if self.json() {
                    json.push(message_json("chalk.volume.v2.VersionInfo", &v)?);
                    continue;
                }
                let parent = v.parent_id.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
                let created = ago(v.created_at.map(|t| t.seconds).unwrap_or(0));
                println!("{:<9} {:<9} {:<16} {:<38} {created}", v.version_id, parent, v.r#ref, v.commit_id);
            }
            if page.next_cursor.is_empty() {
                return self.finish_json(json);
            }
            cursor = page.next_cursor;
        }
    }

    /// `compute volume ls-files`.
    pub async fn volume_ls_files(&self, spec: &str, path: &str) -> anyhow::Result<()> {
        let (name, version) = split_version(spec)?;
        let selector = version.map(|v| VersionSelector { selector: Some(Selector::VersionId(v)) });
        let mut cursor = String::new();
        let mut json = Vec::new();
        if !self.json() {
            println!("{:<5} {:>12} {:<6} PATH", "KIND", "SIZE", "MODE");
        }
        loop {
            let req = ListFilesRequest {
                volume: vref(&name),
                path: path.into(),
                recursive: true,
                limit: 10_000,
                cursor: cursor.clone(),
                selector: selector.clone(),
            };
            let page = self.volumes().list_files(self.req(req)).await.map_err(status_error)?.into_inner();
            for f in page.files {
                if self.json() {
                    json.push(message_json("chalk.volume.v2.FileInfo", &f)?);
                    continue;
                }
                let kind = match FileKind::try_from(f.kind) {
                    Ok(FileKind::Directory) => "dir",
                    Ok(FileKind::Symlink) => "link",
                    _ => "file",
                };
                println!("{kind:<5} {:>12} {:<6o} {}", f.size, f.mode.unwrap_or(0), f.path);
            }
            if page.next_cursor.is_empty() {
                return self.finish_json(json);
            }
            cursor = page.next_cursor;
        }
    }

    /// `compute volume fork SRC[@VERSION] DST`: a new volume, or with `as_ref` a ref of SRC.
    pub async fn volume_fork(&self, src: &str, dst: &str, as_ref: bool) -> anyhow::Result<()> {
        let (name, version) = split_version(src)?;
        if as_ref {
            let version = match version {
                Some(v) => v,
                None => {
                    let req = ListVolumeVersionsRequest {
                        volume: vref(&name),
                        limit: 1,
                        cursor: String::new(),
                        r#ref: Some("main".into()),
                    };
                    let page = self.volumes().list_volume_versions(self.req(req)).await.map_err(status_error)?;
                    page.into_inner()
                        .versions
                        .first()
                        .map(|v| v.version_id)
                        .ok_or_else(|| anyhow::anyhow!("volume {name:?} has no version to fork"))?
                }
            };
            let req = CreateRefRequest { volume: vref(&name), name: dst.into(), from_version_id: version };
            let r = self.volumes().create_ref(self.req(req)).await.map_err(status_error)?.into_inner();
            let r = r.r#ref.unwrap_or_default();
            println!("ref {dst:?} of {name} at version {}", r.version_id);
            return Ok(());
        }
        let out = self.admin("volumes/fork", json!({"volume": name, "version": version, "to": dst})).await?;
        println!(
            "volume {} ({}) at version {}, from {src}",
            out["volume"].as_str().unwrap_or(dst),
            out["volume_id"].as_str().unwrap_or(""),
            out["version"]
        );
        Ok(())
    }

    /// `compute volume diff NAME V1 V2`.
    pub async fn volume_diff(&self, name: &str, from: u64, to: u64) -> anyhow::Result<()> {
        let d = self.admin("volumes/diff", json!({"volume": name, "from": from, "to": to})).await?;
        for (key, mark) in [("added", "+"), ("modified", "~"), ("removed", "-")] {
            for p in d[key].as_array().into_iter().flatten() {
                println!("{mark} {}", p.as_str().unwrap_or(""));
            }
        }
        Ok(())
    }

    /// `compute volume rollback NAME VERSION`.
    pub async fn volume_rollback(&self, name: &str, version: u64, r#ref: &str) -> anyhow::Result<()> {
        let out = self.admin("volumes/rollback", json!({"volume": name, "version": version, "ref": r#ref})).await?;
        println!(
            "{name}: ref {ref} now at version {} (the content of version {version})",
            out["version"],
            r#ref = r#ref
        );
        Ok(())
    }

    /// `compute volume rm NAME`.
    pub async fn volume_rm(&self, name: &str) -> anyhow::Result<()> {
        self.volumes()
            .delete_volume(self.req(DeleteVolumeRequest { volume: vref(name) }))
            .await
            .map_err(status_error)?;
        println!("deleted volume {name} (its objects go at the next garbage collection: compute volume gc)");
        Ok(())
    }

    /// `compute volume sync SANDBOX`.
    pub async fn volume_sync(&self, sandbox: &str) -> anyhow::Result<()> {
        let out = self.admin("volumes/sync", json!({"sandbox": sandbox})).await?;
        let list = out["synced"].as_array().cloned().unwrap_or_default();
        if list.is_empty() {
            println!("{sandbox} has no writable volume mounts");
        }
        for s in list {
            match s["version"].as_u64() {
                Some(v) => println!("{}: version {v}", s["volume"].as_str().unwrap_or("")),
                None => println!("{}: nothing changed", s["volume"].as_str().unwrap_or("")),
            }
        }
        Ok(())
    }

    /// `compute volume gc`.
    pub async fn volume_gc(&self, grace_seconds: Option<u64>) -> anyhow::Result<()> {
        let r = self.admin("volumes/gc", json!({"grace_seconds": grace_seconds})).await?;
        println!(
            "deleted {} objects ({} bytes) and {} trees; pruned {} versions; kept {} objects",
            r["objects_deleted"], r["bytes_freed"], r["trees_deleted"], r["versions_pruned"], r["objects_kept"]
        );
        Ok(())
    }
}
