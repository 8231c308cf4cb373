//! Mounting a volume into a sandbox. A version-pinned mount is the read-only [`VersionFs`]; any other mount is
//! the writable [`RwFs`] over the ref's version at start: copy-on-write into a local upper directory, and on sync
//! (`fsync`/`fsyncdir` inside the sandbox, and when the workload stops) the changes since the last sync become a
//! new version on the ref.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use compute_store::{VersionRecord, VolumeRecord};
use nix::mount::{umount2, MntFlags};

use crate::edit::{Changes, FileContent, Metadata, NodeSpec, Remove, Upsert, WriteMode};
use crate::fuse::VersionFs;
use crate::rwfs::{RwFs, RwState};
use crate::tree::{empty_tree_hash, Entry, Extent};
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

/// The sync state of a writable mount.
struct Writable {
    state: Arc<RwState>,
    env: String,
    volume: VolumeRecord,
    ref_name: String,
    commit_prefix: String,
    /// The tree as of the last sync (the mounted version's at first); changes are taken against it.
    synced_root: tokio::sync::Mutex<String>,
    syncs: AtomicU64,
}

/// A volume mounted on the host, ready to be bound into a sandbox.
pub struct AttachedVolume {
    /// Directory of this mount's parts (removed at detach).
    dir: PathBuf,
    session: Option<fuser::BackgroundSession>,
    writable: Option<Arc<Writable>>,
    volume: VolumeRecord,
    /// What to bind into the sandbox.
    pub host_path: PathBuf,
    /// Where.
    pub mount_path: String,
    /// Whether the sandbox may write.
    pub read_only: bool,
    /// Keeps the version the mount reads from out of garbage collection and retention until it is detached.
    _hold: crate::TreeHold,
}

impl AttachedVolume {
    /// A handle that syncs this mount while it stays attached (none for a read-only mount).
    pub fn syncer(&self) -> Option<MountSyncer> {
        self.writable.clone().map(MountSyncer)
    }
}

/// Syncs one writable mount on request (see [`VolumeStore::sync_mount`]).
#[derive(Clone)]
pub struct MountSyncer(Arc<Writable>);

impl MountSyncer {
    /// The volume's name.
    pub fn volume_name(&self) -> &str {
        &self.0.volume.name
    }
}

impl VolumeStore {
    /// Mounts `req` under `dir` on the host through FUSE. `commit_id` prefixes the ids of the commits its syncs
    /// make (so a repeated sync after a crash is recognised).
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
        let (mnt, upper) = (dir.join("mnt"), dir.join("upper"));
        std::fs::create_dir_all(&mnt).map_err(|e| io("creating the mount directory", e))?;
        let read_only = req.version.is_some();
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName(format!("compute-volume:{}", view.volume.name)),
            fuser::MountOption::Subtype("compute".into()),
            fuser::MountOption::DefaultPermissions,
            if read_only { fuser::MountOption::RO } else { fuser::MountOption::RW },
        ];
        config.acl = fuser::SessionACL::All;
        config.n_threads = Some(2);
        let runtime = tokio::runtime::Handle::current();
        let (session, writable) = if read_only {
            let fs = VersionFs::new(self.clone(), env, &root, runtime);
            (fuser::spawn_mount(fs, &mnt, &config), None)
        } else {
            std::fs::create_dir_all(&upper).map_err(|e| io("creating the upper directory", e))?;
            let state = Arc::new(RwState::new(&root, &upper));
            let w = Arc::new(Writable {
                state: state.clone(),
                env: env.into(),
                volume: view.volume.clone(),
                ref_name: view.ref_name.clone(),
                commit_prefix: commit_id.into(),
                synced_root: tokio::sync::Mutex::new(root.clone()),
                syncs: AtomicU64::new(0),
            });
            let (store, sync_w, handle) = (self.clone(), w.clone(), runtime.clone());
            let syncer = Arc::new(move || handle.block_on(store.sync_writable(&sync_w)).map(|_| ()));
            let fs = RwFs::new(self.clone(), env, runtime, state, syncer);
            (fuser::spawn_mount(fs, &mnt, &config), Some(w))
        };
        let session = session.map_err(|e| io("mounting the FUSE filesystem", e))?;
        raise_readahead(&mnt);
        let hold = self.hold_tree(env, &root);
        Ok(AttachedVolume {
            dir: dir.to_path_buf(),
            session: Some(session),
            writable,
            volume: view.volume,
            host_path: mnt,
            mount_path: req.mount_path.clone(),
            read_only,
            _hold: hold,
        })
    }

    /// Turns the writes since the last sync into a new version on the mount's ref (none when nothing changed).
    pub async fn sync(&self, a: &AttachedVolume) -> Result<Option<VersionRecord>, VolumeError> {
        match &a.writable {
            Some(w) => self.sync_writable(w).await,
            None => Ok(None),
        }
    }

    /// Syncs a mount through its handle: the writes since the last sync become a version on its ref.
    pub async fn sync_mount(&self, s: &MountSyncer) -> Result<Option<VersionRecord>, VolumeError> {
        self.sync_writable(&s.0).await
    }

    async fn sync_writable(&self, w: &Writable) -> Result<Option<VersionRecord>, VolumeError> {
        let mut synced = w.synced_root.lock().await;
        let snap = w.state.snapshot();
        let mut trees = Vec::new();
        let root = self.seal_snapshot(&w.env, snap, &mut trees).await?;
        if root.hash == *synced {
            return Ok(None);
        }
        if !trees.is_empty() {
            let now = compute_store::now_millis();
            self.store.write(|r| {
                for (h, body) in &trees {
                    r.volumes().put_tree(h, body, now)?;
                }
                Ok(())
            })?;
        }
        let mut changes = Changes::default();
        self.changes_between(&synced, &root.hash, "", &mut changes)?;
        let n = w.syncs.fetch_add(1, Ordering::SeqCst);
        let out = self
            .commit(
                &w.env,
                CommitRequest {
                    volume: VolumeSel { id: w.volume.id.clone(), name: w.volume.name.clone() },
                    commit_id: format!("{}/{n}", w.commit_prefix),
                    ref_name: Some(w.ref_name.clone()),
                    author: format!("compute:{}", w.commit_prefix),
                    changes,
                    ..Default::default()
                },
            )
            .await?;
        *synced = root.hash;
        tracing::info!(volume = %w.volume.name, version = out.version.version_id, r#ref = %w.ref_name,
            "sandbox writes committed");
        Ok(Some(out.version))
    }

    /// Syncs, then unmounts and removes everything the mount made. When the sync fails, the written files stay
    /// in the mount's upper directory (and the error says where) rather than being lost.
    pub async fn detach(&self, mut a: AttachedVolume) -> Result<Option<VersionRecord>, VolumeError> {
        let synced = self.sync(&a).await;
        if let Some(session) = a.session.take() {
            let _ = tokio::task::spawn_blocking(move || session.umount_and_join()).await;
        }
        match synced {
            Ok(v) => {
                let _ = std::fs::remove_dir_all(&a.dir);
                Ok(v)
            }
            Err(e) => Err(VolumeError::FailedPrecondition(format!(
                "the writes to volume {:?} could not be committed ({e}); the written files are kept in {}",
                a.volume.name,
                a.dir.join("upper").display()
            ))),
        }
    }

    /// The path deltas that turn tree `old` into tree `new` (files and symlinks upserted with their content
    /// location, directories with their metadata, removed paths recursively), so a sync applies on the ref's
    /// current head without undoing what others committed meanwhile.
    fn changes_between(&self, old: &str, new: &str, prefix: &str, out: &mut Changes) -> Result<(), VolumeError> {
        if old == new {
            return Ok(());
        }
        let (a, b) = (self.load_tree(old)?, self.load_tree(new)?);
        let join = |n: &str| if prefix.is_empty() { n.to_string() } else { format!("{prefix}/{n}") };
        for e in &a.entries {
            if b.get(&e.name).is_none_or(|n| n.is_dir() != e.is_dir()) {
                out.removes.push(Remove { path: join(&e.name), recursive: true });
            }
        }
        for e in &b.entries {
            let path = join(&e.name);
            let before = a.get(&e.name).filter(|o| o.is_dir() == e.is_dir());
            if e.is_dir() {
                let old_sub = before.map(|o| o.hash.clone()).unwrap_or_else(empty_tree_hash);
                if before.is_none_or(|o| (o.mode, o.uid, o.gid) != (e.mode, e.uid, e.gid)) {
                    out.upserts.push(upsert_of(&path, e));
                }
                self.changes_between(&old_sub, &e.hash, &path, out)?;
            } else if before != Some(e) {
                out.upserts.push(upsert_of(&path, e));
            }
        }
        Ok(())
    }

    pub(crate) async fn store_file(&self, env: &str, host: &Path) -> Result<FileContent, VolumeError> {
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
            let n = buf.len() as u64;
            let key = self.objects.put_if_absent(env, Bytes::from(buf)).await?;
            extents.push(Extent { object: key.hash().into(), offset: 0, size: n, hash: key.hash().into() });
        }
        let chunked = extents.len() > 1;
        Ok(FileContent::Located { hash: hasher.finalize().to_hex().to_string(), size, extents, chunked })
    }
}

/// Lets the kernel read ahead up to 4 MiB on the mount (its default for FUSE is 128 KiB, which caps each read
/// request at that size and makes sequential reads latency-bound). Best effort: needs root and sysfs.
fn raise_readahead(mnt: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(mnt) else { return };
    let dev = meta.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let path = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    if let Err(e) = std::fs::write(&path, "4096") {
        tracing::debug!(path, error = %e, "could not raise the FUSE mount's read-ahead");
    }
}

/// The upsert that makes `path` what `e` is.
fn upsert_of(path: &str, e: &Entry) -> Upsert {
    let node = if e.is_dir() {
        NodeSpec::Directory
    } else if e.is_symlink() {
        NodeSpec::Symlink(e.inline.clone())
    } else if !e.extents.is_empty() {
        NodeSpec::File(FileContent::Located {
            hash: e.hash.clone(),
            size: e.size,
            extents: e.extents.clone(),
            chunked: e.chunked,
        })
    } else if e.inline.is_empty() {
        NodeSpec::File(FileContent::Empty)
    } else {
        NodeSpec::File(FileContent::Inline { data: e.inline.clone() })
    };
    let meta = Metadata { mode: Some(e.mode), mtime_ms: Some(e.mtime_ms), uid: Some(e.uid), gid: Some(e.gid) };
    Upsert { path: path.into(), node, meta, mode: WriteMode::Upsert }
}

/// Removes what a crashed server left under `dir`: unmounts its FUSE mounts (lazily), then deletes the
/// directories. Writes that were never synced are kept in their upper directories, named in the log.
pub fn cleanup_mounts(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for sandbox in entries.flatten() {
        let Ok(mounts) = std::fs::read_dir(sandbox.path()) else { continue };
        let mut keep = false;
        for m in mounts.flatten() {
            let p = m.path();
            let _ = umount2(&p.join("mnt"), MntFlags::MNT_DETACH);
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
