//! `chalk.volume.v2.VolumeService`: the typed control plane (gRPC from Python) and the data plane the SDK's native
//! client drives over Connect (upload URLs, commits, commit status, file reads).

use std::sync::Arc;

use compute_control::volume::{
    self as vol, CommitRequest, Entry, FileContent, FileData, Metadata, NodeSpec, ObjectKey, Selector, VolumeSel,
    VolumeStore, WriteMode,
};
use compute_proto::chalk::volume::v2::volume_service_server::VolumeService;
use compute_proto::chalk::volume::v2::*;
use compute_store::{RefRecord, VersionRecord, VolumeRecord};
use tonic::{Request, Response, Status};

use super::workload::timestamp;
use super::{base_url, principal};
use crate::status::from_volume;

/// The VolumeService handler.
pub struct VolumeApi {
    volumes: Arc<VolumeStore>,
}

impl VolumeApi {
    /// A handler over `volumes`.
    pub fn new(volumes: Arc<VolumeStore>) -> Self {
        Self { volumes }
    }

    fn info(&self, v: &VolumeRecord, ref_name: &str) -> VolumeInfo {
        VolumeInfo {
            volume_id: v.id.clone(),
            name: v.name.clone(),
            created_at: Some(timestamp(v.created_at)),
            access_mode: VolumeAccessMode::ReadWrite as i32,
            r#ref: ref_name.into(),
            object_store_uri: String::new(),
        }
    }
}

fn env<T>(req: &Request<T>) -> Result<String, Status> {
    Ok(principal(req)?.environment_id.clone())
}

fn sel(r: Option<&VolumeRef>) -> Result<VolumeSel, Status> {
    let r = r.ok_or_else(|| Status::invalid_argument("volume is required: set volume.name (or volume.volume_id)"))?;
    if r.name.is_empty() && r.volume_id.is_empty() {
        return Err(Status::invalid_argument("volume: set volume.name (or volume.volume_id)"));
    }
    Ok(VolumeSel { id: r.volume_id.clone(), name: r.name.clone() })
}

fn selector(s: Option<&VersionSelector>) -> Selector {
    use version_selector::Selector as S;
    match s.and_then(|s| s.selector.as_ref()) {
        Some(S::VersionId(v)) => Selector::Version(*v),
        Some(S::Ref(r)) if !r.is_empty() => Selector::Ref(r.clone()),
        _ => Selector::default(),
    }
}

fn kind_name(k: i32) -> Result<&'static str, Status> {
    match VolumeKind::try_from(k) {
        Ok(VolumeKind::Unspecified) => Ok("data"),
        Ok(VolumeKind::SourceCode) => Ok("source_code"),
        Err(_) => Err(Status::invalid_argument(format!(
            "volume_type {k} is not a VolumeKind: use VOLUME_KIND_UNSPECIFIED or VOLUME_KIND_SOURCE_CODE"
        ))),
    }
}

fn kind_of(v: &VolumeRecord) -> VolumeKind {
    if v.kind == "source_code" {
        VolumeKind::SourceCode
    } else {
        VolumeKind::Unspecified
    }
}

/// The wire form of a version.
pub fn version_info(v: &VersionRecord) -> VersionInfo {
    VersionInfo {
        version_id: v.version_id,
        sequence_number: v.version_id,
        parent_id: v.parent_id,
        created_at: Some(timestamp(v.created_at)),
        r#ref: v.ref_name.clone(),
        primary_pack_id: v.primary_pack_id.clone(),
        commit_id: v.commit_id.clone(),
    }
}

fn ref_info(r: &RefRecord) -> RefInfo {
    RefInfo {
        name: r.name.clone(),
        version_id: r.version_id,
        sequence_number: r.sequence_number,
        commit_id: r.commit_id.clone(),
        updated_at: Some(timestamp(r.updated_at)),
        parent_version_id: r.parent_version_id,
    }
}

fn file_info(path: &str, e: &Entry) -> FileInfo {
    let kind = match e.kind {
        vol::tree::kind::DIRECTORY => FileKind::Directory,
        vol::tree::kind::SYMLINK => FileKind::Symlink,
        _ => FileKind::File,
    };
    FileInfo {
        path: path.into(),
        size: e.size,
        mode: Some(e.mode),
        updated_at: Some(timestamp(e.mtime_ms)),
        kind: kind as i32,
        hash: if e.is_dir() { String::new() } else { e.hash.clone() },
        uid: e.uid,
        gid: e.gid,
        nlink: 1,
    }
}

fn commit_status(volume: &VolumeRecord, commit_id: &str, out: Option<&vol::CommitOutcome>) -> CommitStatus {
    CommitStatus {
        volume: Some(VolumeRef { volume_id: volume.id.clone(), name: volume.name.clone() }),
        commit_id: commit_id.into(),
        result: if out.is_some() { CommitResult::Committed } else { CommitResult::Unspecified } as i32,
        version: out.map(|o| version_info(&o.version)),
        latest_version: out.map(|o| version_info(&o.latest)),
        created_at: out.map(|o| timestamp(o.version.created_at)),
        intent: None,
    }
}

/// Translates the wire's path deltas into the store's changes.
fn changes(deltas: PathDeltaList) -> Result<vol::Changes, Status> {
    let mut out = vol::Changes::default();
    for r in deltas.removes {
        out.removes.push(vol::Remove { path: r.path, recursive: r.recursive });
    }
    for u in deltas.upserts {
        let path = u.path;
        let node = u.node.ok_or_else(|| Status::invalid_argument(format!("upserts[{path:?}].node is required")))?;
        let meta = node.metadata.map(|m| Metadata {
            mode: m.mode,
            mtime_ms: m.updated_at.map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000),
            uid: m.uid,
            gid: m.gid,
        });
        let spec = match node.node {
            Some(file_node::Node::Directory(_)) => NodeSpec::Directory,
            Some(file_node::Node::Symlink(s)) => NodeSpec::Symlink(s.target),
            Some(file_node::Node::File(f)) => NodeSpec::File(content(&path, f.content)?),
            None => {
                return Err(Status::invalid_argument(format!(
                    "upserts[{path:?}].node: set one of file, directory or symlink"
                )))
            }
        };
        let mode = match PathWriteMode::try_from(u.mode) {
            Ok(PathWriteMode::Create) => WriteMode::Create,
            Ok(PathWriteMode::Replace) => WriteMode::Replace,
            Ok(_) => WriteMode::Upsert,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "upserts[{path:?}].mode {} is not a PathWriteMode",
                    u.mode
                )))
            }
        };
        out.upserts.push(vol::Upsert { path, node: spec, meta: meta.unwrap_or_default(), mode });
    }
    Ok(out)
}

fn content(path: &str, c: Option<ContentRef>) -> Result<FileContent, Status> {
    use content_ref::Content;
    let bad = |what: String| Status::invalid_argument(format!("upserts[{path:?}].node.file.content: {what}"));
    match c.and_then(|c| c.content) {
        None | Some(Content::Empty(_)) => Ok(FileContent::Empty),
        Some(Content::Inline(i)) => {
            if i.size != 0 && i.size != i.data.len() as u64 {
                return Err(bad(format!("inline size is {} but {} bytes were sent", i.size, i.data.len())));
            }
            if !i.hash.is_empty() && i.hash != blake3_hex(&i.data) {
                return Err(bad("inline hash is not the BLAKE3 of the data".into()));
            }
            Ok(FileContent::Inline { data: i.data })
        }
        Some(Content::Packed(p)) => {
            let pack = p.pack.ok_or_else(|| bad("packed.pack is required".into()))?;
            let key = ObjectKey::parse(&pack.object_key, "packed.pack.object_key").map_err(from_volume)?;
            if pack.size != p.size {
                return Err(bad(format!("packed size {} differs from the pack entry's size {}", p.size, pack.size)));
            }
            Ok(FileContent::Located {
                hash: p.hash,
                size: p.size,
                extents: vec![vol::Extent {
                    object: key.hash().into(),
                    offset: pack.offset,
                    size: pack.size,
                    hash: String::new(),
                }],
                chunked: false,
            })
        }
        Some(Content::Chunked(c)) => {
            let mut extents = Vec::with_capacity(c.chunks.len());
            let mut chunks = c.chunks;
            chunks.sort_by_key(|ch| ch.offset);
            let mut pos = 0u64;
            for ch in chunks {
                let key = ObjectKey::parse(&ch.object_key, "chunked.chunks[].object_key").map_err(from_volume)?;
                if ch.offset != pos {
                    return Err(bad(format!(
                        "chunk at offset {} leaves a gap or overlap (expected offset {pos})",
                        ch.offset
                    )));
                }
                pos += ch.size;
                extents.push(vol::Extent { object: key.hash().into(), offset: 0, size: ch.size, hash: ch.hash });
            }
            Ok(FileContent::Located { hash: c.hash, size: c.size, extents, chunked: true })
        }
    }
}

/// The stored object an uploaded-object reference names. Packs and chunks are keyed `xx/<hash>`; a commit intent
/// (a large commit's deltas) is keyed by the client's commit id and stored by its hash.
fn object_of(o: &UploadedObjectReference, field: &str) -> Result<ObjectKey, Status> {
    if o.kind == UploadedObjectKind::Intent as i32 {
        let ok_name = !o.object_key.is_empty()
            && o.object_key.len() <= 128
            && o.object_key.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b));
        if !ok_name {
            return Err(Status::invalid_argument(format!(
                "{field}.object_key {:?} of an intent object must be 1 to 128 letters, digits, '-' or '_'",
                o.object_key
            )));
        }
        return ObjectKey::from_hash(&o.hash, &format!("{field}.hash")).map_err(from_volume);
    }
    let key = ObjectKey::parse(&o.object_key, &format!("{field}.object_key")).map_err(from_volume)?;
    if !o.hash.is_empty() && o.hash != key.hash() {
        return Err(Status::invalid_argument(format!(
            "{field}.hash {:?} does not match its object key {:?}",
            o.hash, o.object_key
        )));
    }
    Ok(key)
}

fn blake3_hex(data: &[u8]) -> String {
    ObjectKey::of(data).hash().to_string()
}

#[tonic::async_trait]
impl VolumeService for VolumeApi {
    async fn create_volume(&self, req: Request<CreateVolumeRequest>) -> Result<Response<CreateVolumeResponse>, Status> {
        let env = env(&req)?;
        let r = req.into_inner();
        let v = self.volumes.create(&env, &r.name, kind_name(r.volume_type)?).map_err(from_volume)?;
        Ok(Response::new(CreateVolumeResponse { volume: Some(self.info(&v, vol::MAIN_REF)) }))
    }

    async fn get_volume(&self, req: Request<GetVolumeRequest>) -> Result<Response<GetVolumeResponse>, Status> {
        let env = env(&req)?;
        let r = req.into_inner();
        let view =
            self.volumes.view(&env, &sel(r.volume.as_ref())?, &selector(r.selector.as_ref())).map_err(from_volume)?;
        Ok(Response::new(GetVolumeResponse {
            volume: Some(self.info(&view.volume, &view.ref_name)),
            version: view.version.as_ref().map(version_info),
        }))
    }

    async fn list_volumes(&self, req: Request<ListVolumesRequest>) -> Result<Response<ListVolumesResponse>, Status> {
        let env = env(&req)?;
        let r = req.into_inner();
        let kind = r.volume_kind.map(kind_name).transpose()?;
        let limit = if r.limit <= 0 { 100 } else { r.limit as usize };
        let (vols, next) = self.volumes.list(&env, &r.name_prefix, &r.cursor, limit, kind).map_err(from_volume)?;
        Ok(Response::new(ListVolumesResponse {
            volumes: vols
                .iter()
                .map(|v| ListedVolume {
                    name: v.name.clone(),
                    created_at: Some(timestamp(v.created_at)),
                    volume_id: v.id.clone(),
                    state: "active".into(),
                    volume_kind: Some(kind_of(v) as i32),
                })
                .collect(),
            next_cursor: next,
        }))
    }

    async fn delete_volume(&self, req: Request<DeleteVolumeRequest>) -> Result<Response<DeleteVolumeResponse>, Status> {
        let env = env(&req)?;
        self.volumes.delete(&env, &sel(req.get_ref().volume.as_ref())?).await.map_err(from_volume)?;
        Ok(Response::new(DeleteVolumeResponse {}))
    }

    async fn list_volume_versions(
        &self,
        req: Request<ListVolumeVersionsRequest>,
    ) -> Result<Response<ListVolumeVersionsResponse>, Status> {
        let env = env(&req)?;
        let r = req.into_inner();
        let limit = if r.limit <= 0 { 100 } else { r.limit as usize };
        let ref_name = r.r#ref.as_deref().filter(|s| !s.is_empty());
        let (versions, next) =
            self.volumes.versions(&env, &sel(r.volume.as_ref())?, ref_name, &r.cursor, limit).map_err(from_volume)?;
        Ok(Response::new(ListVolumeVersionsResponse {
            versions: versions.iter().map(version_info).collect(),
            next_cursor: next,
        }))
    }

    async fn create_ref(&self, req: Request<CreateRefRequest>) -> Result<Response<CreateRefResponse>, Status> {
        let env = env(&req)?;
        let r = req.into_inner();
        let rec = self
            .volumes
            .create_ref(&env, &sel(r.volume.as_ref())?, &r.name, r.from_version_id)
            .await
            .map_err(from_volume)?;
        Ok(Response::new(CreateRefResponse { r#ref: Some(ref_info(&rec)) }))
    }

    async fn list_refs(&self, req: Request<ListRefsRequest>) -> Result<Response<ListRefsResponse>, Status> {
        let env = env(&req)?;
        let refs = self.volumes.refs(&env, &sel(req.get_ref().volume.as_ref())?).map_err(from_volume)?;
        Ok(Response::new(ListRefsResponse { refs: refs.iter().map(ref_info).collect() }))
    }

    async fn delete_ref(&self, req: Request<DeleteRefRequest>) -> Result<Response<DeleteRefResponse>, Status> {
        let env = env(&req)?;
        let r = req.into_inner();
        self.volumes.delete_ref(&env, &sel(r.volume.as_ref())?, &r.name).await.map_err(from_volume)?;
        Ok(Response::new(DeleteRefResponse {}))
    }

    async fn commit_version(
        &self,
        req: Request<CommitVersionRequest>,
    ) -> Result<Response<CommitVersionResponse>, Status> {
        let env = env(&req)?;
        let base = base_url(&req)?;
        let intent = req.into_inner().intent.ok_or_else(|| Status::invalid_argument("intent is required"))?;
        let volume = sel(intent.volume.as_ref())?;
        let deltas = match intent.deltas {
            Some(commit_intent::Deltas::PathDeltas(d)) => d,
            Some(commit_intent::Deltas::UploadedDeltas(obj)) => {
                self.uploaded_deltas(&env, &volume, &obj, &base).await?
            }
            Some(commit_intent::Deltas::InodeDeltas(_)) => {
                return Err(Status::unimplemented(
                    "intent.inode_deltas are not supported by this server: send path_deltas",
                ))
            }
            None => PathDeltaList::default(),
        };
        let mut uploaded = Vec::new();
        let mut primary_pack = None;
        for o in &intent.uploaded_object_references {
            let key = object_of(o, "intent.uploaded_object_references[]")?;
            if primary_pack.is_none() && o.kind == UploadedObjectKind::Pack as i32 {
                primary_pack = Some(key.clone());
            }
            uploaded.push(key);
        }
        let commit_id = intent.commit_id.clone();
        let out = self
            .volumes
            .commit(
                &env,
                CommitRequest {
                    volume,
                    commit_id: intent.commit_id,
                    ref_name: intent.r#ref,
                    author: intent.author,
                    uploaded,
                    primary_pack,
                    changes: changes(deltas)?,
                },
            )
            .await
            .map_err(from_volume)?;
        Ok(Response::new(CommitVersionResponse { status: Some(commit_status(&out.volume, &commit_id, Some(&out))) }))
    }

    async fn get_commit_status(
        &self,
        req: Request<GetCommitStatusRequest>,
    ) -> Result<Response<GetCommitStatusResponse>, Status> {
        let env = env(&req)?;
        let r = req.into_inner();
        let volume = sel(r.volume.as_ref())?;
        let out = self.volumes.commit_status(&env, &volume, &r.commit_id).map_err(from_volume)?;
        let Some(out) = out else {
            return Err(Status::not_found(format!("no commit {:?} in volume {:?}", r.commit_id, volume.name)));
        };
        let diff = if r.include_diff {
            let parent = match out.version.parent_id {
                Some(p) => self.volumes.view(&env, &volume, &Selector::Version(p)).ok().and_then(|v| v.version),
                None => None,
            };
            let d = self.volumes.diff(parent.as_ref(), &out.version).map_err(from_volume)?;
            Some(VersionDiff { added: d.added, modified: d.modified, removed: d.removed })
        } else {
            None
        };
        Ok(Response::new(GetCommitStatusResponse {
            status: Some(commit_status(&out.volume, &r.commit_id, Some(&out))),
            diff,
        }))
    }

    async fn request_upload_ur_ls(
        &self,
        req: Request<RequestUploadUrLsRequest>,
    ) -> Result<Response<RequestUploadUrLsResponse>, Status> {
        let env = env(&req)?;
        let base = base_url(&req)?;
        let r = req.into_inner();
        let mut keys = Vec::with_capacity(r.objects.len());
        for o in &r.objects {
            keys.push((o.object_key.clone(), object_of(o, "objects[]")?));
        }
        let slots =
            self.volumes.upload_slots(&env, &sel(r.volume.as_ref())?, keys, &base).await.map_err(from_volume)?;
        Ok(Response::new(RequestUploadUrLsResponse {
            urls: slots
                .into_iter()
                .map(|s| UploadUrlItem {
                    object_key: s.name,
                    already_exists: s.already_exists,
                    signed_upload_uri: s.url,
                    expires_at: Some(prost_types::Timestamp { seconds: s.expires as i64, nanos: 0 }),
                })
                .collect(),
        }))
    }

    async fn list_files(&self, req: Request<ListFilesRequest>) -> Result<Response<ListFilesResponse>, Status> {
        let env = env(&req)?;
        let r = req.into_inner();
        let limit = if r.limit <= 0 { 1000 } else { r.limit as usize };
        let (view, files, next) = self
            .volumes
            .list_files(
                &env,
                &sel(r.volume.as_ref())?,
                &selector(r.selector.as_ref()),
                &r.path,
                r.recursive,
                &r.cursor,
                limit,
            )
            .map_err(from_volume)?;
        Ok(Response::new(ListFilesResponse {
            files: files.iter().map(|f| file_info(&f.path, &f.entry)).collect(),
            next_cursor: next,
            version: view.version.as_ref().map(version_info),
        }))
    }

    async fn get_file(&self, req: Request<GetFileRequest>) -> Result<Response<GetFileResponse>, Status> {
        let env = env(&req)?;
        let base = base_url(&req)?;
        let r = req.into_inner();
        let f = self
            .volumes
            .get_file(&env, &sel(r.volume.as_ref())?, &selector(r.selector.as_ref()), &r.path, &base)
            .await
            .map_err(from_volume)?;
        let info = file_info(&f.path, &f.entry);
        if !r.if_none_match.is_empty() && r.if_none_match == info.hash {
            return Ok(Response::new(GetFileResponse {
                file: Some(info),
                version: f.view.version.as_ref().map(version_info),
                content: None,
                not_modified: true,
            }));
        }
        let ts = |s: u64| Some(prost_types::Timestamp { seconds: s as i64, nanos: 0 });
        let content = match f.data {
            FileData::Bytes(b) => get_file_response::Content::Data(b.to_vec()),
            FileData::Packed(p) => get_file_response::Content::Packed(PackedFileContent {
                pack: Some(SignedPackEntryRef {
                    signed_download_uri: p.url,
                    offset: p.offset,
                    size: p.size,
                    pack_id: p.object,
                    expires_at: ts(p.expires),
                }),
            }),
            FileData::Chunked(chunks) => {
                let mut pos = 0;
                get_file_response::Content::Chunked(ChunkedFileContent {
                    chunks: chunks
                        .into_iter()
                        .map(|c| {
                            let at = pos;
                            pos += c.size;
                            SignedChunkRef {
                                signed_download_uri: c.url,
                                offset: at,
                                size: c.size,
                                hash: if c.hash.is_empty() { c.object } else { c.hash },
                                expires_at: ts(c.expires),
                            }
                        })
                        .collect(),
                })
            }
        };
        Ok(Response::new(GetFileResponse {
            file: Some(info),
            version: f.view.version.as_ref().map(version_info),
            content: Some(content),
            not_modified: false,
        }))
    }
}

impl VolumeApi {
    /// Reads an uploaded `CommitDeltasObject` (the client's form for commits too large for one message).
    async fn uploaded_deltas(
        &self,
        env: &str,
        volume: &VolumeSel,
        obj: &UploadedObjectReference,
        _base: &str,
    ) -> Result<PathDeltaList, Status> {
        use prost::Message;
        self.volumes.resolve(env, volume).map_err(from_volume)?;
        let key = object_of(obj, "intent.uploaded_deltas")?;
        let size = self
            .volumes
            .objects()
            .size(env, &key)
            .await
            .map_err(from_volume)?
            .ok_or_else(|| Status::failed_precondition(format!("uploaded deltas object {key} was not uploaded")))?;
        let bytes = self.volumes.objects().read_bytes(env, &key, 0..size).await.map_err(from_volume)?;
        // The SDK writes a sequence of length-delimited CommitDeltasObject messages (a varint length before each),
        // each holding a slice of the commit's deltas; together they are the commit.
        let mut buf = bytes;
        let mut all = PathDeltaList::default();
        while !buf.is_empty() {
            let obj = CommitDeltasObject::decode_length_delimited(&mut buf).map_err(|e| {
                Status::invalid_argument(format!(
                    "uploaded deltas object {key} is not a sequence of length-delimited CommitDeltasObject: {e}"
                ))
            })?;
            match obj.deltas {
                Some(commit_deltas_object::Deltas::PathDeltas(d)) => {
                    all.upserts.extend(d.upserts);
                    all.removes.extend(d.removes);
                }
                Some(commit_deltas_object::Deltas::InodeDeltas(_)) => {
                    return Err(Status::unimplemented(
                        "inode deltas are not supported by this server: send path deltas",
                    ))
                }
                None => {}
            }
        }
        Ok(all)
    }
}
