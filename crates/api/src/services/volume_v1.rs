//! `chalk.volume.v1.VolumeService`: the hosted service's first volume API, which its public examples use to populate
//! volumes without the SDK (Connect JSON or gRPC). It is served over the same store as v2: a v1 write is a v2
//! version of the volume's main ref, and a v1 read sees the main ref's head.

use std::sync::Arc;

use compute_control::volume::{
    self as vol, Changes, CommitRequest, Extent, FileContent, FileData, Metadata, NodeSpec, ObjectKey, Remove,
    Selector, Upsert, VolumeSel, VolumeStore, WriteMode,
};
use compute_proto::chalk::volume::v1::volume_service_server::VolumeService;
use compute_proto::chalk::volume::v1::*;
use compute_store::VolumeRecord;
use tonic::{Request, Response, Status};

use super::workload::timestamp;
use super::{base_url, principal};
use crate::status::from_volume;

/// The largest file GetFile returns in its response; a larger one is read through `get_signed_uri`.
const DATA_MAX: u64 = 8 << 20;

/// The v1 VolumeService handler.
pub struct VolumeV1Api {
    volumes: Arc<VolumeStore>,
}

impl VolumeV1Api {
    /// A handler over `volumes` (the v2 store).
    pub fn new(volumes: Arc<VolumeStore>) -> Self {
        Self { volumes }
    }

    /// Commits `changes` to the volume's main ref, as one v2 version.
    async fn commit(
        &self,
        env: &str,
        volume: &str,
        who: &str,
        changes: Changes,
        uploaded: Vec<ObjectKey>,
    ) -> Result<(), Status> {
        let req = CommitRequest {
            volume: by_name(volume)?,
            commit_id: format!("v1-{}", compute_control::ids::random_token(24)),
            ref_name: None,
            author: who.to_string(),
            uploaded,
            primary_pack: None,
            changes,
        };
        self.volumes.commit(env, req).await.map_err(from_volume)?;
        Ok(())
    }
}

fn info(v: &VolumeRecord) -> VolumeInfo {
    VolumeInfo { name: v.name.clone(), created_at: Some(timestamp(v.created_at)) }
}

fn by_name(name: &str) -> Result<VolumeSel, Status> {
    if name.is_empty() {
        return Err(Status::invalid_argument("name (volume_name) is required: the volume's name"));
    }
    Ok(VolumeSel { id: String::new(), name: name.into() })
}

fn path_of(path: &str) -> Result<String, Status> {
    let parts = vol::edit::components(path, "path").map_err(from_volume)?;
    if parts.is_empty() {
        return Err(Status::invalid_argument("path is required: a file's path in the volume, e.g. data/input.csv"));
    }
    Ok(parts.join("/"))
}

#[tonic::async_trait]
impl VolumeService for VolumeV1Api {
    async fn create_volume(&self, req: Request<CreateVolumeRequest>) -> Result<Response<CreateVolumeResponse>, Status> {
        let env = principal(&req)?.environment_id.clone();
        let v = self.volumes.create(&env, &req.get_ref().name, "data").map_err(from_volume)?;
        Ok(Response::new(CreateVolumeResponse { volume: Some(info(&v)) }))
    }

    async fn get_volume(&self, req: Request<GetVolumeRequest>) -> Result<Response<GetVolumeResponse>, Status> {
        let env = principal(&req)?.environment_id.clone();
        let v = self.volumes.resolve(&env, &by_name(&req.get_ref().name)?).map_err(from_volume)?;
        Ok(Response::new(GetVolumeResponse { volume: Some(info(&v)) }))
    }

    async fn list_volumes(&self, req: Request<ListVolumesRequest>) -> Result<Response<ListVolumesResponse>, Status> {
        let env = principal(&req)?.environment_id.clone();
        let r = req.into_inner();
        if r.page_size < 0 {
            return Err(Status::invalid_argument("page_size must not be negative (0: the default, 100)"));
        }
        let limit = if r.page_size == 0 { 100 } else { r.page_size as usize };
        let (vols, next) = self.volumes.list(&env, "", &r.page_token, limit, None).map_err(from_volume)?;
        Ok(Response::new(ListVolumesResponse { volumes: vols.iter().map(info).collect(), next_page_token: next }))
    }

    async fn delete_volume(&self, req: Request<DeleteVolumeRequest>) -> Result<Response<DeleteVolumeResponse>, Status> {
        let env = principal(&req)?.environment_id.clone();
        self.volumes.delete(&env, &by_name(&req.get_ref().name)?).await.map_err(from_volume)?;
        Ok(Response::new(DeleteVolumeResponse {}))
    }

    async fn list_files(&self, req: Request<ListFilesRequest>) -> Result<Response<ListFilesResponse>, Status> {
        let env = principal(&req)?.environment_id.clone();
        let r = req.into_inner();
        let sel = by_name(&r.volume_name)?;
        // The prefix is a string prefix of paths; listing starts at the directory it lies in.
        let prefix = r.prefix.trim_start_matches('/');
        let dir = prefix.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
        let mut files = Vec::new();
        let mut cursor = String::new();
        loop {
            let listed = self.volumes.list_files(&env, &sel, &Selector::default(), dir, true, &cursor, 1000);
            let (_, page, next) = match listed {
                Ok(l) => l,
                // A prefix under a directory that does not exist matches nothing.
                Err(vol::VolumeError::NotFound(_)) if !dir.is_empty() => break,
                Err(e) => return Err(from_volume(e)),
            };
            files.extend(page.into_iter().filter(|f| f.entry.is_file() && f.path.starts_with(prefix)).map(|f| {
                FileInfo { path: f.path, size: f.entry.size as i64, updated_at: Some(timestamp(f.entry.mtime_ms)) }
            }));
            if next.is_empty() {
                break;
            }
            cursor = next;
        }
        Ok(Response::new(ListFilesResponse { files }))
    }

    async fn get_file(&self, req: Request<GetFileRequest>) -> Result<Response<GetFileResponse>, Status> {
        let env = principal(&req)?.environment_id.clone();
        let base = base_url(&req)?;
        let r = req.into_inner();
        let path = path_of(&r.path)?;
        let f = self
            .volumes
            .get_file(&env, &by_name(&r.volume_name)?, &Selector::default(), &path, &base)
            .await
            .map_err(from_volume)?;
        if r.get_signed_uri.unwrap_or(false) {
            if let FileData::Packed(p) = &f.data {
                let key = ObjectKey::from_hash(&p.object, "object").map_err(from_volume)?;
                let whole = self.volumes.objects().size(&env, &key).await.map_err(from_volume)?;
                // The URL reads the whole object: it is the file only when the file is the whole object.
                if p.offset == 0 && whole == Some(p.size) {
                    let content = get_file_response::Content::SignedDownloadUri(p.url.clone());
                    return Ok(Response::new(GetFileResponse { content: Some(content) }));
                }
            }
        }
        if f.entry.size > DATA_MAX {
            return Err(Status::failed_precondition(format!(
                "{path:?} is {} bytes, more than GetFile returns in a response ({DATA_MAX}); read it with the SDK \
                 (Volume.read_file) or chalk.volume.v2.VolumeService/GetFile, which hand out signed URLs for each part",
                f.entry.size
            )));
        }
        let data = match f.data {
            FileData::Bytes(b) => b.to_vec(),
            _ => self.volumes.read_range(&env, &f.entry, 0, f.entry.size).await.map_err(from_volume)?.to_vec(),
        };
        Ok(Response::new(GetFileResponse { content: Some(get_file_response::Content::Data(data)) }))
    }

    async fn put_file(&self, req: Request<PutFileRequest>) -> Result<Response<PutFileResponse>, Status> {
        let who = principal(&req)?.clone();
        let r = req.into_inner();
        let path = path_of(&r.path)?;
        let (content, uploaded) = match r.content {
            Some(put_file_request::Content::Data(data)) if data.is_empty() => (FileContent::Empty, vec![]),
            Some(put_file_request::Content::Data(data)) => (FileContent::Inline { data }, vec![]),
            Some(put_file_request::Content::StorageObjectId(id)) => {
                let key = ObjectKey::parse(&id, "storage_object_id").map_err(from_volume)?;
                let size = self.volumes.objects().size(&who.environment_id, &key).await.map_err(from_volume)?;
                let Some(size) = size else {
                    return Err(Status::failed_precondition(format!(
                        "storage_object_id {id:?} names no object on this server: upload it first (RequestUploadURLs \
                         of chalk.volume.v2.VolumeService, then PUT), or send the bytes as data"
                    )));
                };
                let hash = key.hash().to_string();
                let extents = vec![Extent { object: hash.clone(), offset: 0, size, hash: String::new() }];
                (FileContent::Located { hash, size, extents, chunked: false }, vec![key])
            }
            None => return Err(Status::invalid_argument("content is required: set data (or storage_object_id)")),
        };
        let upsert = Upsert { path, node: NodeSpec::File(content), meta: Metadata::default(), mode: WriteMode::Upsert };
        let changes = Changes { upserts: vec![upsert], removes: vec![] };
        self.commit(&who.environment_id, &r.volume_name, &who.client_id, changes, uploaded).await?;
        Ok(Response::new(PutFileResponse {}))
    }

    async fn remove_file(&self, req: Request<RemoveFileRequest>) -> Result<Response<RemoveFileResponse>, Status> {
        let who = principal(&req)?.clone();
        let r = req.into_inner();
        let changes = Changes { upserts: vec![], removes: vec![Remove { path: path_of(&r.path)?, recursive: false }] };
        self.commit(&who.environment_id, &r.volume_name, &who.client_id, changes, vec![]).await?;
        Ok(Response::new(RemoveFileResponse {}))
    }
}
