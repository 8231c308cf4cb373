//! Mounting a volume into a sandbox: the version is served read-only by [`VersionFs`] (FUSE); a writable mount
//! stacks an overlay on it whose upper directory collects the sandbox's writes copy-on-write, and at sync (the
//! sandbox's stop) the upper directory becomes a new version on the ref. A version-pinned mount is read-only.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use compute_store::{VersionRecord, VolumeRecord};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::edit::{Changes, FileContent, Metadata, NodeSpec, Remove, Upsert, WriteMode};
use crate::fuse::VersionFs;
use crate::key::ObjectKey;
use crate::tree::{empty_tree_hash, Extent};
use crate::{CommitRequest, Selector, VolumeError, VolumeSel, VolumeStore, MAIN_REF};

/// Files are stored in pieces of this size (the SDK's chunk size).
const CHUNK: usize = 8 << 20;

/// What to mount where.
#[derive(Debug, Clone)]
pub struct MountRequest {
    /// The volume's name.
    pub volume: String,
    /// Where it appears inside the sandbox.
    pub mount_path: String,
    /// A pinned version (the mount is then read-only).
    pub version: Option<u64>,
    /// The ref to follow and commit to (`main` when unset).
    pub ref_name: Option<String>,
}

/// A volume mounted on the host, ready to be bound into a sandbox.
pub struct AttachedVolume {
    /// Directory of this mount's parts (removed at detach).
    dir: PathBuf,
    session: Option<fuser::BackgroundSession>,
    /// The overlay's mount point, for writable mounts.
    merged: Option<PathBuf>,
    env: String,
    volume: VolumeRecord,
    ref_name: String,
    base: Option<VersionRecord>,
    commit_id: String,
    /// What to bind into the sandbox.
    pub host_path: PathBuf,
    /// Where.
    pub mount_path: String,
    /// Whether the sandbox may write.
    pub read_only: bool,
}

impl AttachedVolume {
    /// The version mounted (none for a volume without commits).
    pub fn base_version(&self) -> Option<u64> {
        self.base.as_ref().map(|v| v.version_id)
    }
}

impl VolumeStore {
    /// Mounts `req` under `dir` on the host (a FUSE view of the version, with an overlay for writes).
    pub fn attach(
        self: &Arc<Self>,
        env: &str,
        req: &MountRequest,
        dir: &Path,
        commit_id: &str,
    ) -> Result<AttachedVolume, VolumeError> {
        let sel = VolumeSel { id: String::new(), name: req.volume.clone() };
        let selector = match (req.version, &req.ref_name) {
            (Some(v), _) => Selector::Version(v),
            (None, Some(r)) if !r.is_empty() => Selector::Ref(r.clone()),
            _ => Selector::Ref(MAIN_REF.into()),
        };
        let view = self.view(env, &sel, &selector)?;
        let root = view.version.as_ref().map(|v| v.root_tree.clone()).unwrap_or_else(empty_tree_hash);
        let io = |what: &str, e: std::io::Error| VolumeError::Internal(format!("volume mount: {what}: {e}"));
        let lower = dir.join("lower");
        std::fs::create_dir_all(&lower).map_err(|e| io("creating the mount directory", e))?;
        let fs = VersionFs::new(self.clone(), env, &root, tokio::runtime::Handle::current());
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName(format!("compute-volume:{}", view.volume.name)),
            fuser::MountOption::Subtype("compute".into()),
            fuser::MountOption::RO,
            fuser::MountOption::DefaultPermissions,
        ];
        config.acl = fuser::SessionACL::All;
        config.n_threads = Some(2);
        let session = fuser::spawn_mount(fs, &lower, &config).map_err(|e| io("mounting the FUSE filesystem", e))?;
        let read_only = req.version.is_some();
        let mut attached = AttachedVolume {
            dir: dir.to_path_buf(),
            session: Some(session),
            merged: None,
            env: env.into(),
            volume: view.volume,
            ref_name: view.ref_name,
            base: view.version,
            commit_id: commit_id.into(),
            host_path: lower.clone(),
            mount_path: req.mount_path.clone(),
            read_only,
        };
        if !read_only {
            let (upper, work, merged) = (dir.join("upper"), dir.join("work"), dir.join("merged"));
            for d in [&upper, &work, &merged] {
                std::fs::create_dir_all(d).map_err(|e| io("creating the overlay directories", e))?;
            }
            let opts = format!("lowerdir={},upperdir={},workdir={}", lower.display(), upper.display(), work.display());
            mount(Some("overlay"), &merged, Some("overlay"), MsFlags::empty(), Some(opts.as_str()))
                .map_err(|e| io("mounting the overlay", e.into()))?;
            attached.host_path = merged.clone();
            attached.merged = Some(merged);
        }
        Ok(attached)
    }

    /// Turns the writes of a writable mount into a new version on its ref (none when nothing changed).
    pub async fn sync(&self, a: &AttachedVolume) -> Result<Option<VersionRecord>, VolumeError> {
        if a.read_only {
            return Ok(None);
        }
        let base_root = a.base.as_ref().map(|v| v.root_tree.clone()).unwrap_or_else(empty_tree_hash);
        let changes = self.scan_upper(&a.env, &a.dir.join("upper"), &base_root).await?;
        if changes.upserts.is_empty() && changes.removes.is_empty() {
            return Ok(None);
        }
        let out = self
            .commit(
                &a.env,
                CommitRequest {
                    volume: VolumeSel { id: a.volume.id.clone(), name: a.volume.name.clone() },
                    commit_id: a.commit_id.clone(),
                    ref_name: Some(a.ref_name.clone()),
                    author: format!("compute:{}", a.commit_id),
                    changes,
                    ..Default::default()
                },
            )
            .await?;
        tracing::info!(volume = %a.volume.name, version = out.version.version_id, r#ref = %a.ref_name,
            "sandbox writes committed");
        Ok(Some(out.version))
    }

    /// Syncs, then unmounts and removes everything the mount made. When the sync fails, the writes stay in the
    /// mount's directory (and the error says where) rather than being lost.
    pub async fn detach(&self, mut a: AttachedVolume) -> Result<Option<VersionRecord>, VolumeError> {
        let synced = self.sync(&a).await;
        if let Some(merged) = a.merged.take() {
            let _ = umount2(&merged, MntFlags::MNT_DETACH);
        }
        if let Some(session) = a.session.take() {
            let _ = tokio::task::spawn_blocking(move || session.umount_and_join()).await;
        }
        match synced {
            Ok(v) => {
                let _ = std::fs::remove_dir_all(&a.dir);
                Ok(v)
            }
            Err(e) => Err(VolumeError::FailedPrecondition(format!(
                "the writes to volume {:?} could not be committed ({e}); they are kept in {}",
                a.volume.name,
                a.dir.join("upper").display()
            ))),
        }
    }

    /// Reads an overlay upper directory as changes to `base_root`: files and symlinks are upserted (their bytes
    /// stored as objects), whiteouts and opaque directories become removes.
    async fn scan_upper(&self, env: &str, upper: &Path, base_root: &str) -> Result<Changes, VolumeError> {
        let mut changes = Changes::default();
        let mut stack = vec![(upper.to_path_buf(), String::new())];
        let io = |p: &Path, e: std::io::Error| VolumeError::Internal(format!("reading {}: {e}", p.display()));
        while let Some((dir, prefix)) = stack.pop() {
            let mut entries: Vec<_> =
                std::fs::read_dir(&dir).map_err(|e| io(&dir, e))?.collect::<Result<_, _>>().map_err(|e| io(&dir, e))?;
            entries.sort_by_key(|e| e.file_name());
            for e in entries {
                let name = e.file_name();
                let Some(name) = name.to_str() else {
                    tracing::warn!(name = ?e.file_name(), "skipping a file whose name is not UTF-8");
                    continue;
                };
                let path = if prefix.is_empty() { name.to_string() } else { format!("{prefix}/{name}") };
                let host = e.path();
                let meta = std::fs::symlink_metadata(&host).map_err(|err| io(&host, err))?;
                let ft = meta.file_type();
                let metadata = Metadata {
                    mode: Some(meta.permissions().mode() & 0o7777),
                    mtime_ms: Some(meta.mtime() * 1000 + meta.mtime_nsec() / 1_000_000),
                    uid: Some(meta.uid()),
                    gid: Some(meta.gid()),
                };
                if ft.is_char_device() && meta.rdev() == 0 {
                    if self.lookup(base_root, &path)?.is_some() {
                        changes.removes.push(Remove { path, recursive: true });
                    }
                    continue;
                }
                let node = if ft.is_dir() {
                    if is_opaque(&host) && self.lookup(base_root, &path)?.is_some() {
                        changes.removes.push(Remove { path: path.clone(), recursive: true });
                    }
                    stack.push((host.clone(), path.clone()));
                    NodeSpec::Directory
                } else if ft.is_symlink() {
                    let target = std::fs::read_link(&host).map_err(|err| io(&host, err))?;
                    NodeSpec::Symlink(target.as_os_str().as_bytes().to_vec())
                } else if ft.is_file() {
                    NodeSpec::File(self.store_file(env, &host).await?)
                } else {
                    tracing::warn!(path, "skipping a special file (device, fifo or socket) written to a volume");
                    continue;
                };
                changes.upserts.push(Upsert { path, node, meta: metadata, mode: WriteMode::Upsert });
            }
        }
        Ok(changes)
    }

    async fn store_file(&self, env: &str, host: &Path) -> Result<FileContent, VolumeError> {
        use tokio::io::AsyncReadExt;
        let io = |e: std::io::Error| VolumeError::Internal(format!("reading {}: {e}", host.display()));
        let mut f = tokio::fs::File::open(host).await.map_err(io)?;
        let len = f.metadata().await.map_err(io)?.len();
        if len <= self.config.inline_store_max as u64 {
            let mut data = Vec::with_capacity(len as usize);
            f.read_to_end(&mut data).await.map_err(io)?;
            return Ok(if data.is_empty() { FileContent::Empty } else { FileContent::Inline { data } });
        }
        let mut hasher = blake3::Hasher::new();
        let mut extents = Vec::new();
        let mut size = 0u64;
        loop {
            let mut buf = Vec::with_capacity(CHUNK);
            (&mut f).take(CHUNK as u64).read_to_end(&mut buf).await.map_err(io)?;
            if buf.is_empty() {
                break;
            }
            hasher.update(&buf);
            size += buf.len() as u64;
            let key = ObjectKey::of(&buf);
            let n = buf.len() as u64;
            if self.objects.size(env, &key).await?.is_none() {
                self.objects.put_trusted(env, &key, Bytes::from(buf)).await?;
            }
            extents.push(Extent { object: key.hash().into(), offset: 0, size: n, hash: key.hash().into() });
        }
        let chunked = extents.len() > 1;
        Ok(FileContent::Located { hash: hasher.finalize().to_hex().to_string(), size, extents, chunked })
    }
}

/// Whether overlayfs marked the directory opaque (it replaced a lower directory of the same name).
fn is_opaque(dir: &Path) -> bool {
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return false };
    let mut value = [0u8; 4];
    // SAFETY: `path` is a NUL-terminated string and `value` a writable buffer of the length passed; lgetxattr
    // writes at most that many bytes and does not keep either pointer.
    let n = unsafe {
        libc::lgetxattr(path.as_ptr(), c"trusted.overlay.opaque".as_ptr(), value.as_mut_ptr().cast(), value.len())
    };
    n == 1 && value[0] == b'y'
}

/// Removes what a crashed server left under `dir`: unmounts overlays and FUSE mounts (lazily), then deletes the
/// directories. Writes that were never synced are kept in their upper directories, named in the log.
pub fn cleanup_mounts(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for sandbox in entries.flatten() {
        let Ok(mounts) = std::fs::read_dir(sandbox.path()) else { continue };
        let mut keep = false;
        for m in mounts.flatten() {
            let p = m.path();
            let _ = umount2(&p.join("merged"), MntFlags::MNT_DETACH);
            let _ = umount2(&p.join("lower"), MntFlags::MNT_DETACH);
            let upper = p.join("upper");
            if std::fs::read_dir(&upper).is_ok_and(|mut d| d.next().is_some()) {
                tracing::warn!(dir = %upper.display(), "unsynced volume writes from before a restart are kept here");
                keep = true;
            }
        }
        if !keep {
            let _ = std::fs::remove_dir_all(sandbox.path());
        }
    }
}
