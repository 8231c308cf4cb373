//! Compute's volumes: versioned, copy-on-write file trees over an object store.
//!
//! - **Objects** (packs and chunks that the SDK's native client builds and BLAKE3-addresses) live in an
//!   [`Objects`] store, one prefix per environment, uploaded through signed URLs ([`signing`]) and verified
//!   against their key before they become visible.
//! - **Versions** are immutable: a root directory tree ([`tree`]) whose entries point at byte ranges of objects.
//!   Trees are content-addressed and shared, so a commit rewrites only the directories it touches and a fork
//!   (a new ref, or a new volume, at an existing version) copies nothing.
//! - **Refs** name versions; a commit moves one ref, atomically with the version it creates, and is idempotent by
//!   its `commit_id`.
//! - **Garbage collection** deletes what no version references, after a grace period that protects uploads whose
//!   commit has not arrived yet.

#![warn(missing_docs)]

mod cache;
pub mod edit;
mod fuse;
mod gc;
pub mod key;
mod mount;
pub mod objects;
mod read;
mod rwfs;
pub mod signing;
pub mod tree;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use compute_store::{now_millis, RefRecord, Store, StoreError, VersionRecord, VolumeRecord};

pub use edit::{Changes, FileContent, Metadata, NodeSpec, Remove, Upsert, WriteMode};
pub use gc::{GcReport, TreeHold};
pub use key::ObjectKey;
pub use mount::{cleanup_mounts, AttachedVolume, MountRequest, MountSyncer};
pub use objects::Objects;
pub use read::{FileData, FileView, ListedFile, SignedRange, VersionDiff};
pub use signing::{BlobOp, UrlError, UrlSigner};
pub use tree::{Entry, Extent, Tree};

/// The ref every volume starts with.
pub const MAIN_REF: &str = "main";

/// Why a volume operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The volume, version, ref, path or object does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request is malformed; the message names the field.
    #[error("{0}")]
    InvalidArgument(String),
    /// The name, ref or path exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The operation does not fit the current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A signed URL was refused.
    #[error(transparent)]
    Url(#[from] UrlError),
    /// The object store failed.
    #[error("object store: {0}")]
    Storage(String),
    /// The state store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Anything else that is our fault.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Operator settings.
#[derive(Debug, Clone)]
pub struct VolumeConfig {
    /// How long a signed URL stays valid.
    pub url_ttl: Duration,
    /// Files up to this size are returned by GetFile in the response itself, saving the client a round trip.
    pub inline_read_max: u64,
    /// Inline content up to this size stays in the directory tree; larger content becomes an object.
    pub inline_store_max: usize,
    /// Versions older than this that no ref points at are deleted by garbage collection (`None`: keep all).
    pub retention: Option<Duration>,
    /// Objects and trees younger than this are never collected (uploads whose commit is still coming).
    pub gc_grace: Duration,
    /// Memory for decoded directory trees: half for stored trees, half for large directories joined from their
    /// pieces.
    pub tree_cache_bytes: usize,
}

impl Default for VolumeConfig {
    fn default() -> Self {
        Self {
            url_ttl: Duration::from_secs(3600),
            inline_read_max: 64 * 1024,
            inline_store_max: 4096,
            retention: None,
            gc_grace: Duration::from_secs(3600),
            tree_cache_bytes: 64 << 20,
        }
    }
}

/// Names a volume by id or name (either may be empty, not both).
#[derive(Debug, Clone, Default)]
pub struct VolumeSel {
    /// The volume id.
    pub id: String,
    /// The volume name.
    pub name: String,
}

/// Which version a read sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// The version a ref points at now.
    Ref(String),
    /// One immutable version.
    Version(u64),
}

impl Default for Selector {
    fn default() -> Self {
        Selector::Ref(MAIN_REF.into())
    }
}

/// A volume and the version a selector resolved to (none for a volume without commits).
#[derive(Debug, Clone)]
pub struct VolumeView {
    /// The volume.
    pub volume: VolumeRecord,
    /// The selected version.
    pub version: Option<VersionRecord>,
    /// The ref the selector named (the version's ref for a pinned version).
    pub ref_name: String,
}

/// One commit, as the client sent it.
#[derive(Debug, Clone, Default)]
pub struct CommitRequest {
    /// The volume.
    pub volume: VolumeSel,
    /// The client's id for the commit; repeating it returns the first outcome.
    pub commit_id: String,
    /// The ref to advance (`main` when unset).
    pub ref_name: Option<String>,
    /// Who commits.
    pub author: String,
    /// Objects the client uploaded for this commit (each must exist).
    pub uploaded: Vec<ObjectKey>,
    /// The first pack among them, reported as the version's primary pack.
    pub primary_pack: Option<ObjectKey>,
    /// What changes.
    pub changes: Changes,
}

/// A committed version and the ref's head after the commit.
#[derive(Debug, Clone)]
pub struct CommitOutcome {
    /// The volume.
    pub volume: VolumeRecord,
    /// The version this commit made.
    pub version: VersionRecord,
    /// The newest version of the ref (the same unless the commit was a repeat).
    pub latest: VersionRecord,
}

/// A URL the client may PUT one object to.
#[derive(Debug, Clone)]
pub struct UploadSlot {
    /// The client's name for the object (its key, or a commit id for an intent).
    pub name: String,
    /// The object.
    pub key: ObjectKey,
    /// The server holds it already: nothing to upload.
    pub already_exists: bool,
    /// Absolute URL, empty when `already_exists`.
    pub url: String,
    /// Expiry, unix seconds.
    pub expires: u64,
}

/// The volume store of one server.
pub struct VolumeStore {
    store: Arc<Store>,
    objects: Objects,
    signer: UrlSigner,
    config: VolumeConfig,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Commits hold it shared; garbage collection exclusively, so it never sweeps what a commit is adding.
    gc_lock: tokio::sync::RwLock<()>,
    /// Stored trees (leaves and index nodes) by hash.
    nodes: cache::TreeCache,
    /// Large directories joined from their pieces, by hash.
    dirs: cache::TreeCache,
    /// Version trees live mounts read from (see [`TreeHold`]).
    held: gc::Held,
}

const SIGNING_SECRET: &str = "volume-url-signing";

impl VolumeStore {
    /// A volume store keeping metadata in `store` and objects in `objects`.
    pub fn open(store: Arc<Store>, objects: Objects, config: VolumeConfig) -> Result<Self, VolumeError> {
        let secret = store.write(|r| {
            r.volumes().server_secret(
                SIGNING_SECRET,
                || {
                    use rand::TryRng;
                    let mut s = vec![0u8; 32];
                    rand::rngs::SysRng.try_fill_bytes(&mut s).expect("the OS random number generator works");
                    s
                },
                now_millis(),
            )
        })?;
        let (body, hash) = Tree::default().encode_with_hash();
        store.write(|r| r.volumes().put_tree(&hash, &body, 0))?;
        let cache_half = config.tree_cache_bytes / 2;
        Ok(Self {
            store,
            objects,
            signer: UrlSigner::new(secret),
            config,
            locks: Mutex::default(),
            gc_lock: tokio::sync::RwLock::new(()),
            nodes: cache::TreeCache::new(cache_half),
            dirs: cache::TreeCache::new(cache_half),
            held: gc::Held::default(),
        })
    }

    /// The object store.
    pub fn objects(&self) -> &Objects {
        &self.objects
    }

    /// Creates a volume; a taken name fails with `AlreadyExists`.
    pub fn create(&self, env: &str, name: &str, kind: &str) -> Result<VolumeRecord, VolumeError> {
        validate_volume_name(name)?;
        let rec = VolumeRecord {
            id: new_id(),
            environment_id: env.into(),
            name: name.into(),
            kind: kind.into(),
            created_at: now_millis(),
        };
        self.store.write(|r| r.volumes().insert(&rec)).map_err(|e| match e {
            StoreError::AlreadyExists { .. } => VolumeError::AlreadyExists(format!("volume {name:?} already exists")),
            other => other.into(),
        })?;
        tracing::info!(volume = %name, id = %rec.id, kind, "volume created");
        Ok(rec)
    }

    /// The volume `sel` names.
    pub fn resolve(&self, env: &str, sel: &VolumeSel) -> Result<VolumeRecord, VolumeError> {
        let found = self.store.read(|r| {
            if !sel.id.is_empty() {
                r.volumes().get(env, &sel.id)
            } else {
                r.volumes().get_by_name(env, &sel.name)
            }
        })?;
        match found {
            Some(v) if sel.name.is_empty() || v.name == sel.name => Ok(v),
            _ if sel.id.is_empty() && sel.name.is_empty() => {
                Err(VolumeError::InvalidArgument("volume: set volume.name (or volume.volume_id)".into()))
            }
            _ => Err(VolumeError::NotFound(format!(
                "volume {:?} not found",
                if sel.name.is_empty() { &sel.id } else { &sel.name }
            ))),
        }
    }

    /// The volume and the version `selector` names.
    pub fn view(&self, env: &str, sel: &VolumeSel, selector: &Selector) -> Result<VolumeView, VolumeError> {
        let volume = self.resolve(env, sel)?;
        let (version, ref_name) = match selector {
            Selector::Ref(name) => {
                let head = self.store.read(|r| r.volumes().get_ref(&volume.id, name))?;
                match head {
                    Some(h) => (self.version_record(&volume, h.version_id)?, name.clone()),
                    None if name == MAIN_REF => {
                        return Ok(VolumeView { volume, version: None, ref_name: name.clone() })
                    }
                    None => {
                        return Err(VolumeError::NotFound(format!(
                            "volume {:?} has no ref {name:?} (forks: ListRefs)",
                            volume.name
                        )))
                    }
                }
            }
            Selector::Version(v) => {
                let rec = self.version_record(&volume, *v)?;
                let name = rec.ref_name.clone();
                (rec, name)
            }
        };
        Ok(VolumeView { volume, version: Some(version), ref_name })
    }

    fn version_record(&self, volume: &VolumeRecord, version: u64) -> Result<VersionRecord, VolumeError> {
        self.store
            .read(|r| r.volumes().version(&volume.id, version))?
            .ok_or_else(|| VolumeError::NotFound(format!("volume {:?} has no version {version}", volume.name)))
    }

    /// Volumes of an environment by name, after `cursor`.
    pub fn list(
        &self,
        env: &str,
        prefix: &str,
        cursor: &str,
        limit: usize,
        kind: Option<&str>,
    ) -> Result<(Vec<VolumeRecord>, String), VolumeError> {
        let limit = limit.clamp(1, 1000);
        let mut out = Vec::new();
        let mut after = cursor.to_string();
        loop {
            let page = self.store.read(|r| r.volumes().list(env, prefix, &after, limit))?;
            let full = page.len() == limit;
            if let Some(last) = page.last() {
                after = last.name.clone();
            }
            out.extend(page.into_iter().filter(|v| kind.is_none_or(|k| v.kind == k)));
            if out.len() >= limit || !full {
                break;
            }
        }
        out.truncate(limit);
        let next =
            if out.len() == limit { out.last().map(|v| v.name.clone()).unwrap_or_default() } else { String::new() };
        Ok((out, next))
    }

    /// Deletes a volume with its versions and refs; its objects go at the next garbage collection.
    pub async fn delete(&self, env: &str, sel: &VolumeSel) -> Result<VolumeRecord, VolumeError> {
        let volume = self.resolve(env, sel)?;
        let lock = self.lock(&volume.id);
        let _held = lock.lock().await;
        self.store.write(|r| r.volumes().delete(&volume.id))?;
        tracing::info!(volume = %volume.name, id = %volume.id, "volume deleted");
        Ok(volume)
    }

    /// Versions newest first (optionally of one ref), after `cursor`.
    pub fn versions(
        &self,
        env: &str,
        sel: &VolumeSel,
        ref_name: Option<&str>,
        cursor: &str,
        limit: usize,
    ) -> Result<(Vec<VersionRecord>, String), VolumeError> {
        let volume = self.resolve(env, sel)?;
        let before = if cursor.is_empty() {
            None
        } else {
            Some(cursor.parse::<u64>().map_err(|_| {
                VolumeError::InvalidArgument(format!("cursor {cursor:?} is not one this server returned"))
            })?)
        };
        let limit = limit.clamp(1, 1000);
        let page = self.store.read(|r| r.volumes().versions(&volume.id, ref_name, before, limit))?;
        let next = if page.len() == limit {
            page.last().map(|v| v.version_id.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok((page, next))
    }

    /// Creates ref `name` at `from_version` (a fork: nothing is copied).
    pub async fn create_ref(
        &self,
        env: &str,
        sel: &VolumeSel,
        name: &str,
        from_version: u64,
    ) -> Result<RefRecord, VolumeError> {
        validate_ref_name(name)?;
        let volume = self.resolve(env, sel)?;
        let lock = self.lock(&volume.id);
        let _held = lock.lock().await;
        let version = self.version_record(&volume, from_version)?;
        let rec = RefRecord {
            volume_id: volume.id.clone(),
            name: name.into(),
            version_id: version.version_id,
            sequence_number: 1,
            commit_id: version.commit_id.clone(),
            parent_version_id: Some(version.version_id),
            updated_at: now_millis(),
        };
        self.store.write(|r| r.volumes().insert_ref(&rec)).map_err(|e| match e {
            StoreError::AlreadyExists { .. } => {
                VolumeError::AlreadyExists(format!("volume {:?} already has a ref {name:?}", volume.name))
            }
            other => other.into(),
        })?;
        Ok(rec)
    }

    /// Every ref of a volume.
    pub fn refs(&self, env: &str, sel: &VolumeSel) -> Result<Vec<RefRecord>, VolumeError> {
        let volume = self.resolve(env, sel)?;
        Ok(self.store.read(|r| r.volumes().refs(&volume.id))?)
    }

    /// Deletes a ref (not `main`); its versions stay until retention removes them.
    pub async fn delete_ref(&self, env: &str, sel: &VolumeSel, name: &str) -> Result<(), VolumeError> {
        if name == MAIN_REF {
            return Err(VolumeError::FailedPrecondition(
                "the main ref cannot be deleted (delete the volume instead)".into(),
            ));
        }
        let volume = self.resolve(env, sel)?;
        let lock = self.lock(&volume.id);
        let _held = lock.lock().await;
        if !self.store.write(|r| r.volumes().delete_ref(&volume.id, name))? {
            return Err(VolumeError::NotFound(format!("volume {:?} has no ref {name:?}", volume.name)));
        }
        Ok(())
    }

    /// Makes a new volume `dst` whose `main` starts at `src`'s selected version. Costs the same whatever the
    /// size: the new version shares the source's root tree and objects.
    pub async fn fork_volume(
        &self,
        env: &str,
        src: &VolumeSel,
        selector: &Selector,
        dst: &str,
    ) -> Result<(VolumeRecord, VersionRecord), VolumeError> {
        let view = self.view(env, src, selector)?;
        let Some(from) = view.version else {
            return Err(VolumeError::FailedPrecondition(format!(
                "volume {:?} has no version to fork yet",
                view.volume.name
            )));
        };
        validate_volume_name(dst)?;
        let now = now_millis();
        let volume = VolumeRecord {
            id: new_id(),
            environment_id: env.into(),
            name: dst.into(),
            kind: view.volume.kind.clone(),
            created_at: now,
        };
        let commit_id = format!("fork:{}@{}", view.volume.id, from.version_id);
        let version = self.store.write(|r| {
            let v = r.volumes();
            v.insert(&volume)?;
            let version_id = v.allocate_version(&volume.id)?;
            let version = VersionRecord {
                volume_id: volume.id.clone(),
                version_id,
                parent_id: None,
                ref_name: MAIN_REF.into(),
                root_tree: from.root_tree.clone(),
                commit_id: commit_id.clone(),
                author: format!("fork of {}@{}", view.volume.name, from.version_id),
                primary_pack_id: from.primary_pack_id.clone(),
                created_at: now,
            };
            v.insert_version(&version)?;
            v.put_ref(&RefRecord {
                volume_id: volume.id.clone(),
                name: MAIN_REF.into(),
                version_id,
                sequence_number: 1,
                commit_id: commit_id.clone(),
                parent_version_id: None,
                updated_at: now,
            })?;
            Ok(version)
        });
        let version = version.map_err(|e| match e {
            StoreError::AlreadyExists { .. } => VolumeError::AlreadyExists(format!("volume {dst:?} already exists")),
            other => other.into(),
        })?;
        Ok((volume, version))
    }

    /// Moves `ref_name` back to an earlier `version` as a new version (history is kept, nothing is rewritten).
    pub async fn rollback(
        &self,
        env: &str,
        sel: &VolumeSel,
        ref_name: &str,
        version: u64,
    ) -> Result<VersionRecord, VolumeError> {
        let volume = self.resolve(env, sel)?;
        let target = self.version_record(&volume, version)?;
        let lock = self.lock(&volume.id);
        let _held = lock.lock().await;
        let head = self.store.read(|r| r.volumes().get_ref(&volume.id, ref_name))?;
        let Some(head) = head else {
            return Err(VolumeError::NotFound(format!("volume {:?} has no ref {ref_name:?}", volume.name)));
        };
        let commit_id = format!("rollback:{ref_name}@{}:to:{version}", head.version_id);
        self.record_version(&volume, Some(&head), ref_name, &target.root_tree, &commit_id, "rollback", "", &[])
    }

    /// Signed URLs for the objects the client is about to upload; objects held already need none.
    pub async fn upload_slots(
        &self,
        env: &str,
        sel: &VolumeSel,
        keys: Vec<(String, ObjectKey)>,
        base_url: &str,
    ) -> Result<Vec<UploadSlot>, VolumeError> {
        self.resolve(env, sel)?;
        let expires = unix_now() + self.config.url_ttl.as_secs();
        let mut out = Vec::with_capacity(keys.len());
        for (name, key) in keys {
            let already_exists = self.objects.size(env, &key).await?.is_some();
            let url = if already_exists {
                String::new()
            } else {
                format!("{base_url}{}", self.signer.sign(BlobOp::Put, env, &key, expires))
            };
            out.push(UploadSlot { name, key, already_exists, url, expires });
        }
        Ok(out)
    }

    /// Accepts an upload through a signed URL: checks the signature, then that the bytes hash to the key.
    pub async fn put_blob(&self, env: &str, key: &str, query: &str, body: Bytes) -> Result<(), VolumeError> {
        let key = ObjectKey::parse(key, "blob path")?;
        self.signer.verify(BlobOp::Put, env, &key, query, unix_now())?;
        self.objects.put_verified(env, &key, body).await
    }

    /// Serves a download through a signed URL.
    pub async fn get_blob(
        &self,
        env: &str,
        key: &str,
        query: &str,
        range: Option<std::ops::Range<u64>>,
    ) -> Result<objects::ObjectRead, VolumeError> {
        let key = ObjectKey::parse(key, "blob path")?;
        self.signer.verify(BlobOp::Get, env, &key, query, unix_now())?;
        self.objects.read(env, &key, range).await
    }

    /// Applies a commit: idempotent by `commit_id`, atomic (the version and the ref move together or not at all),
    /// and serialized per volume, so two writers racing on one ref both land, one after the other.
    pub async fn commit(&self, env: &str, req: CommitRequest) -> Result<CommitOutcome, VolumeError> {
        if req.commit_id.is_empty() || req.commit_id.len() > 256 {
            return Err(VolumeError::InvalidArgument("intent.commit_id must be 1 to 256 characters".into()));
        }
        let ref_name = req.ref_name.clone().filter(|r| !r.is_empty()).unwrap_or_else(|| MAIN_REF.into());
        let volume = self.resolve(env, &req.volume)?;
        let _gc = self.gc_lock.read().await;
        let lock = self.lock(&volume.id);
        let _held = lock.lock().await;

        if let Some(done) = self.store.read(|r| r.volumes().version_by_commit(&volume.id, &req.commit_id))? {
            let latest = self.head_version(&volume, &done.ref_name)?.unwrap_or_else(|| done.clone());
            return Ok(CommitOutcome { volume, version: done, latest });
        }
        let head = self.store.read(|r| r.volumes().get_ref(&volume.id, &ref_name))?;
        if head.is_none() && ref_name != MAIN_REF {
            return Err(VolumeError::NotFound(format!(
                "volume {:?} has no ref {ref_name:?}: create it first (Volume.fork / CreateRef)",
                volume.name
            )));
        }
        let base_root = match &head {
            Some(h) => self.version_record(&volume, h.version_id)?.root_tree,
            None => tree::empty_tree_hash(),
        };

        // Object sizes, looked up once per object for this commit.
        let mut sizes: HashMap<String, u64> = HashMap::new();
        for key in &req.uploaded {
            let Some(size) = self.objects.size(env, key).await? else {
                return Err(VolumeError::FailedPrecondition(format!(
                    "uploaded object {key} is not on the server: PUT it to its signed URL before committing"
                )));
            };
            sizes.insert(key.hash().to_string(), size);
        }
        let changes = self.settle_content(env, req.changes, sizes).await?;
        let now = now_millis();
        let mut editor = edit::Editor::new(|h: &str| self.load_node(h), &base_root, now)?;
        editor.apply(&changes)?;
        let edited = editor.finish()?;
        let pack = req.primary_pack.as_ref().map(|k| k.hash().to_string()).unwrap_or_default();
        let version = self.record_version(
            &volume,
            head.as_ref(),
            &ref_name,
            &edited.root,
            &req.commit_id,
            &req.author,
            &pack,
            &edited.trees,
        )?;
        tracing::debug!(volume = %volume.name, version = version.version_id, upserts = changes.upserts.len(),
            removes = changes.removes.len(), "committed");
        Ok(CommitOutcome { volume, latest: version.clone(), version })
    }

    #[allow(clippy::too_many_arguments)]
    fn record_version(
        &self,
        volume: &VolumeRecord,
        head: Option<&RefRecord>,
        ref_name: &str,
        root: &str,
        commit_id: &str,
        author: &str,
        primary_pack: &str,
        trees: &[(String, Vec<u8>)],
    ) -> Result<VersionRecord, VolumeError> {
        let now = now_millis();
        Ok(self.store.write(|r| {
            let v = r.volumes();
            for (hash, body) in trees {
                v.put_tree(hash, body, now)?;
            }
            let version_id = v.allocate_version(&volume.id)?;
            let version = VersionRecord {
                volume_id: volume.id.clone(),
                version_id,
                parent_id: head.map(|h| h.version_id),
                ref_name: ref_name.into(),
                root_tree: root.into(),
                commit_id: commit_id.into(),
                author: author.into(),
                primary_pack_id: primary_pack.into(),
                created_at: now,
            };
            v.insert_version(&version)?;
            v.put_ref(&RefRecord {
                volume_id: volume.id.clone(),
                name: ref_name.into(),
                version_id,
                sequence_number: head.map(|h| h.sequence_number + 1).unwrap_or(1),
                commit_id: commit_id.into(),
                parent_version_id: head.and_then(|h| h.parent_version_id),
                updated_at: now,
            })?;
            Ok(version)
        })?)
    }

    /// Checks that every located content's objects exist and hold its ranges (`sizes`: those already looked up),
    /// and moves large inline content into objects so trees stay small.
    async fn settle_content(
        &self,
        env: &str,
        mut changes: Changes,
        mut sizes: HashMap<String, u64>,
    ) -> Result<Changes, VolumeError> {
        for u in &mut changes.upserts {
            let NodeSpec::File(content) = &mut u.node else { continue };
            match content {
                FileContent::Empty => {}
                FileContent::Inline { data } if data.len() <= self.config.inline_store_max => {}
                FileContent::Inline { data } => {
                    let size = data.len() as u64;
                    let key = self.objects.put_if_absent(env, Bytes::from(std::mem::take(data))).await?;
                    let hash = key.hash().to_string();
                    *content = FileContent::Located {
                        hash: hash.clone(),
                        size,
                        extents: vec![Extent { object: hash, offset: 0, size, hash: String::new() }],
                        chunked: false,
                    };
                }
                FileContent::Located { size, extents, .. } => {
                    let total: u64 = extents.iter().map(|e| e.size).sum();
                    if total != *size {
                        return Err(VolumeError::InvalidArgument(format!(
                            "upserts[{:?}]: the content's ranges add up to {total} bytes but its size is {size}",
                            u.path
                        )));
                    }
                    for e in extents.iter() {
                        let object_size = match sizes.get(&e.object) {
                            Some(s) => *s,
                            None => {
                                let key = ObjectKey::from_hash(&e.object, "object_key")?;
                                let s = self.objects.size(env, &key).await?.ok_or_else(|| {
                                    VolumeError::FailedPrecondition(format!(
                                        "{:?} refers to object {key}, which is not on the server: upload it first \
                                         (RequestUploadURLs, then PUT)",
                                        u.path
                                    ))
                                })?;
                                sizes.insert(e.object.clone(), s);
                                s
                            }
                        };
                        if e.offset.checked_add(e.size).is_none_or(|end| end > object_size) {
                            return Err(VolumeError::InvalidArgument(format!(
                                "{:?}: range {}+{} lies outside object {} ({object_size} bytes)",
                                u.path, e.offset, e.size, e.object
                            )));
                        }
                    }
                }
            }
        }
        Ok(changes)
    }

    /// The version a ref points at.
    fn head_version(&self, volume: &VolumeRecord, ref_name: &str) -> Result<Option<VersionRecord>, VolumeError> {
        let head = self.store.read(|r| r.volumes().get_ref(&volume.id, ref_name))?;
        head.map(|h| self.version_record(volume, h.version_id)).transpose()
    }

    /// The status of a commit by id: its version and the ref's head, if it landed.
    pub fn commit_status(
        &self,
        env: &str,
        sel: &VolumeSel,
        commit_id: &str,
    ) -> Result<Option<CommitOutcome>, VolumeError> {
        let volume = self.resolve(env, sel)?;
        let Some(version) = self.store.read(|r| r.volumes().version_by_commit(&volume.id, commit_id))? else {
            return Ok(None);
        };
        let latest = self.head_version(&volume, &version.ref_name)?.unwrap_or_else(|| version.clone());
        Ok(Some(CommitOutcome { volume, version, latest }))
    }

    /// A directory by hash, whole: a large one's pieces joined (and cached), so readers see one list of entries.
    pub fn load_tree(&self, hash: &str) -> Result<Arc<Tree>, VolumeError> {
        let node = self.load_node(hash)?;
        if !node.is_index() {
            return Ok(node);
        }
        if let Some(t) = self.dirs.get(hash) {
            return Ok(t);
        }
        let mut leaves = Vec::new();
        edit::collect_leaves(&node, &mut |h: &str| self.load_node(h), &mut leaves)?;
        // Each leaf's stored form is decoded straight into the joined list (prost appends repeated fields), read in
        // one transaction: no copy of entries decoded once already, and no leaf pushed through the node cache.
        let bodies = self
            .store
            .read(|r| leaves.iter().map(|leaf| r.volumes().tree(&leaf.hash)).collect::<Result<Vec<_>, _>>())?;
        let capacity = leaves.iter().map(|p| p.count as usize).sum();
        let mut joined = Tree { entries: Vec::with_capacity(capacity), ..Default::default() };
        for (leaf, body) in leaves.iter().zip(bodies) {
            let body =
                body.ok_or_else(|| VolumeError::Internal(format!("directory piece {} is missing", leaf.hash)))?;
            prost::Message::merge(&mut joined, body.as_slice())
                .map_err(|e| VolumeError::Internal(format!("directory piece {} does not decode: {e}", leaf.hash)))?;
        }
        let tree = Arc::new(joined);
        self.dirs.insert(hash, tree.clone());
        Ok(tree)
    }

    /// The entry `name` of the directory at `hash`: in a large directory, found through its index, one leaf loaded.
    pub fn dir_entry(&self, hash: &str, name: &str) -> Result<Option<Entry>, VolumeError> {
        let mut node = self.load_node(hash)?;
        while node.is_index() {
            let child = node.parts[node.part_for(name)].hash.clone();
            node = self.load_node(&child)?;
        }
        Ok(node.get(name).cloned())
    }

    /// One stored tree (a directory, or a piece of a large one) by hash, from the cache or the store.
    pub(crate) fn load_node(&self, hash: &str) -> Result<Arc<Tree>, VolumeError> {
        if let Some(t) = self.nodes.get(hash) {
            return Ok(t);
        }
        let body = self
            .store
            .read(|r| r.volumes().tree(hash))?
            .ok_or_else(|| VolumeError::Internal(format!("directory tree {hash} is missing from the store")))?;
        let tree = Arc::new(
            <Tree as prost::Message>::decode(body.as_slice())
                .map_err(|e| VolumeError::Internal(format!("directory tree {hash} does not decode: {e}")))?,
        );
        self.nodes.insert(hash, tree.clone());
        Ok(tree)
    }

    fn lock(&self, volume_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.lock().unwrap_or_else(|p| p.into_inner()).entry(volume_id.to_string()).or_default().clone()
    }

    fn sign_get(&self, env: &str, key: &ObjectKey, base_url: &str) -> (String, u64) {
        let expires = unix_now() + self.config.url_ttl.as_secs();
        (format!("{base_url}{}", self.signer.sign(BlobOp::Get, env, key, expires)), expires)
    }
}

fn validate_volume_name(name: &str) -> Result<(), VolumeError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !name.starts_with('.');
    if !ok {
        return Err(VolumeError::InvalidArgument(format!(
            "volume name {name:?} is not valid: use 1 to 128 letters, digits, '-', '_' or '.', not starting with '.'"
        )));
    }
    Ok(())
}

fn validate_ref_name(name: &str) -> Result<(), VolumeError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
        && !name.starts_with(['.', '/'])
        && !name.contains("..");
    if !ok {
        return Err(VolumeError::InvalidArgument(format!(
            "ref name {name:?} is not valid: use 1 to 128 letters, digits, '-', '_', '.' or '/'"
        )));
    }
    Ok(())
}

fn new_id() -> String {
    let n: u64 = rand::random();
    format!("vol-{n:016x}")
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
