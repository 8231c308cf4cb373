//! The FUSE filesystem that serves one immutable version: lookups walk the content-addressed trees (cached in
//! memory), reads fetch only the byte ranges asked for from the object store, and because nothing under it ever
//! changes, the kernel may cache attributes, entries and pages for as long as it likes.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig,
    OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyXattr, Request,
};

use crate::tree::{kind, Entry, DIR_MODE};
use crate::VolumeStore;

/// Versions never change, so the kernel may cache what it learns for long.
pub(crate) const TTL: Duration = Duration::from_secs(24 * 3600);

/// Objects are fetched in blocks of this size and kept in memory: the kernel asks for at most 1 MiB at a time,
/// and one fetch then serves several of its requests.
const BLOCK: u64 = 4 << 20;

/// How many blocks ahead of a reader are fetched in the background.
const PREFETCH_BLOCKS: u64 = 3;

/// Memory for cached blocks, per mount.
const CACHE_BYTES: usize = 64 << 20;

#[derive(Default)]
struct BlockCache {
    blocks: HashMap<(String, u64), bytes::Bytes>,
    order: VecDeque<(String, u64)>,
    bytes: usize,
    /// Blocks being prefetched.
    inflight: std::collections::HashSet<(String, u64)>,
}

/// Reads block `index` of `object` from the store (directly for a local directory, else through the runtime).
fn fetch(
    store: &VolumeStore,
    env: &str,
    runtime: &tokio::runtime::Handle,
    object: &str,
    index: u64,
) -> Result<bytes::Bytes, crate::VolumeError> {
    let obj = crate::ObjectKey::from_hash(object, "object")?;
    let objects = store.objects();
    let start = index * BLOCK;
    match objects.map_local(env, &obj, start, BLOCK as usize) {
        Some(read) => read.map_err(|e| crate::VolumeError::Storage(format!("reading object {object}: {e}"))),
        None => {
            let (objects, env) = (objects.clone(), env.to_string());
            runtime.block_on(async move { objects.read_bytes(&env, &obj, start..start + BLOCK).await })
        }
    }
}

impl BlockCache {
    fn get(&self, key: &(String, u64)) -> Option<bytes::Bytes> {
        self.blocks.get(key).cloned()
    }

    fn put(&mut self, key: (String, u64), block: bytes::Bytes) {
        self.bytes += block.len();
        match self.blocks.insert(key.clone(), block) {
            Some(old) => self.bytes -= old.len(),
            None => self.order.push_back(key),
        }
        while self.bytes > CACHE_BYTES {
            let Some(old) = self.order.pop_front() else { break };
            if let Some(b) = self.blocks.remove(&old) {
                self.bytes -= b.len();
            }
        }
    }
}

struct Inodes {
    /// Entry of inode `i + 1`.
    nodes: Vec<Entry>,
    /// (parent inode, name) → inode.
    children: HashMap<(u64, String), u64>,
}

/// Reads file content of one environment's objects in cached blocks (for the FUSE threads, which are not async).
pub(crate) struct Blocks {
    store: Arc<VolumeStore>,
    env: String,
    runtime: tokio::runtime::Handle,
    cache: Arc<Mutex<BlockCache>>,
}

/// A read-only filesystem over one version's tree.
pub struct VersionFs {
    store: Arc<VolumeStore>,
    blocks: Blocks,
    inodes: Mutex<Inodes>,
}

impl VersionFs {
    /// The filesystem of the tree `root`, reading objects of `env` on the runtime `runtime`.
    pub fn new(store: Arc<VolumeStore>, env: &str, root: &str, runtime: tokio::runtime::Handle) -> Self {
        let root = Entry { kind: kind::DIRECTORY, mode: DIR_MODE, hash: root.into(), ..Default::default() };
        Self {
            blocks: Blocks::new(store.clone(), env, runtime),
            store,
            inodes: Mutex::new(Inodes { nodes: vec![root], children: HashMap::new() }),
        }
    }
}

impl Blocks {
    pub(crate) fn new(store: Arc<VolumeStore>, env: &str, runtime: tokio::runtime::Handle) -> Self {
        Self { store, env: env.into(), runtime, cache: Arc::default() }
    }

    /// Block `index` of `object` (short at the object's end), from the cache or the object store.
    fn block(&self, object: &str, index: u64) -> Result<bytes::Bytes, crate::VolumeError> {
        let key = (object.to_string(), index);
        // A block being prefetched is waited for rather than read twice.
        for _ in 0..10_000 {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(b) = cache.get(&key) {
                return Ok(b);
            }
            if !cache.inflight.contains(&key) {
                break;
            }
            drop(cache);
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
        let block = fetch(&self.store, &self.env, &self.runtime, object, index)?;
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).put(key, block.clone());
        Ok(block)
    }

    /// Starts fetching the block holding file position `pos` of `e` in the background, unless it is cached or
    /// on its way: sequential readers then find the next block ready instead of waiting for the store.
    fn prefetch(&self, e: &Entry, pos: u64) {
        let Some((x, range)) = e.object_ranges(pos, pos + 1).next() else { return };
        let key = (x.object.clone(), range.start / BLOCK);
        {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if cache.blocks.contains_key(&key) || !cache.inflight.insert(key.clone()) {
                return;
            }
        }
        let (store, env, runtime, cache) =
            (self.store.clone(), self.env.clone(), self.runtime.clone(), self.cache.clone());
        self.runtime.spawn_blocking(move || {
            let got = fetch(&store, &env, &runtime, &key.0, key.1);
            let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
            cache.inflight.remove(&key);
            if let Ok(block) = got {
                cache.put(key, block);
            }
        });
    }

    /// `len` bytes at `offset` of a file (short at its end). A range inside one cached block is a view of it,
    /// not a copy: the kernel's reads (1 MiB) mostly are.
    pub(crate) fn read_file(&self, e: &Entry, offset: u64, len: u64) -> Result<bytes::Bytes, crate::VolumeError> {
        let end = offset.saturating_add(len).min(e.size);
        if offset >= end {
            return Ok(bytes::Bytes::new());
        }
        if e.extents.is_empty() {
            return Ok(bytes::Bytes::copy_from_slice(&e.inline[offset as usize..end as usize]));
        }
        let mut pieces = Vec::new();
        for (x, range) in e.object_ranges(offset, end) {
            let (mut from, to) = (range.start, range.end);
            while from < to {
                let index = from / BLOCK;
                let block = self.block(&x.object, index)?;
                let at = (from - index * BLOCK) as usize;
                let take = ((to - from) as usize).min(block.len().saturating_sub(at));
                if take == 0 {
                    return Err(crate::VolumeError::Storage(format!("object {} is shorter than its extent", x.object)));
                }
                pieces.push(block.slice(at..at + take));
                from += take as u64;
            }
        }
        // Keep the next blocks coming.
        for ahead in 0..PREFETCH_BLOCKS {
            let pos = end + ahead * BLOCK;
            if pos >= e.size {
                break;
            }
            self.prefetch(e, pos);
        }
        Ok(if pieces.len() == 1 { pieces.pop().expect("one piece") } else { bytes::Bytes::from(pieces.concat()) })
    }
}

impl VersionFs {
    fn entry(&self, ino: INodeNo) -> Option<Entry> {
        let inodes = self.inodes.lock().unwrap_or_else(|p| p.into_inner());
        inodes.nodes.get((ino.0 as usize).checked_sub(1)?).cloned()
    }

    fn child_ino(&self, parent: u64, e: &Entry) -> u64 {
        let mut inodes = self.inodes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ino) = inodes.children.get(&(parent, e.name.clone())) {
            return *ino;
        }
        inodes.nodes.push(e.clone());
        let ino = inodes.nodes.len() as u64;
        inodes.children.insert((parent, e.name.clone()), ino);
        ino
    }

    fn children(&self, dir: &Entry) -> Result<Arc<crate::Tree>, Errno> {
        self.store.load_tree(&dir.hash).map_err(|e| {
            tracing::warn!(error = %e, "volume mount: loading a directory failed");
            Errno::EIO
        })
    }
}

/// Large reads, directory listings that carry attributes (a walk then needs no lookup per entry), parallel
/// lookups; each only where the kernel offers it.
pub(crate) fn configure_kernel(config: &mut KernelConfig) {
    let _ = config.set_max_readahead(1 << 20);
    for cap in [
        InitFlags::FUSE_MAX_PAGES,
        InitFlags::FUSE_DO_READDIRPLUS,
        InitFlags::FUSE_READDIRPLUS_AUTO,
        InitFlags::FUSE_PARALLEL_DIROPS,
        InitFlags::FUSE_CACHE_SYMLINKS,
        // Lets a sandbox in a user namespace see the volume through an id-mapped bind (Linux 6.12+), so that
        // files keep the ids the sandbox gives them. The kernel checks permissions itself (default_permissions).
        InitFlags::FUSE_ALLOW_IDMAP,
    ] {
        let _ = config.add_capabilities(cap);
    }
}

pub(crate) fn file_type(e: &Entry) -> FileType {
    match e.kind {
        kind::DIRECTORY => FileType::Directory,
        kind::SYMLINK => FileType::Symlink,
        _ => FileType::RegularFile,
    }
}

pub(crate) fn attr(ino: u64, e: &Entry) -> FileAttr {
    let mtime = UNIX_EPOCH + Duration::from_millis(e.mtime_ms.max(0) as u64);
    FileAttr {
        ino: INodeNo(ino),
        size: e.size,
        blocks: e.size.div_ceil(512),
        atime: mtime,
        mtime,
        ctime: mtime,
        crtime: mtime,
        kind: file_type(e),
        perm: (e.mode & 0o7777) as u16,
        nlink: if e.is_dir() { 2 } else { 1 },
        uid: e.uid,
        gid: e.gid,
        rdev: 0,
        blksize: 128 * 1024,
        flags: 0,
    }
}

impl Filesystem for VersionFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        configure_kernel(config);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(dir) = self.entry(parent).filter(Entry::is_dir) else { return reply.error(Errno::ENOTDIR) };
        let Some(name) = name.to_str() else { return reply.error(Errno::ENOENT) };
        match self.store.dir_entry(&dir.hash, name) {
            Ok(Some(e)) => {
                let ino = self.child_ino(parent.0, &e);
                reply.entry(&TTL, &attr(ino, &e), Generation(0))
            }
            Ok(None) => reply.error(Errno::ENOENT),
            Err(e) => {
                tracing::warn!(error = %e, "volume mount: loading a directory failed");
                reply.error(Errno::EIO)
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.entry(ino) {
            Some(e) => reply.attr(&TTL, &attr(ino.0, &e)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.entry(ino) {
            Some(e) if e.is_symlink() => reply.data(&e.inline),
            _ => reply.error(Errno::EINVAL),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.entry(ino) {
            Some(e) if e.is_file() => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            Some(_) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let Some(e) = self.entry(ino) else { return reply.error(Errno::ENOENT) };
        match self.blocks.read_file(&e, offset, u64::from(size)) {
            Ok(bytes) => reply.data(&bytes),
            Err(err) => {
                tracing::warn!(error = %err, "volume mount: read failed");
                reply.error(Errno::EIO)
            }
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.entry(ino) {
            Some(e) if e.is_dir() => {
                reply.opened(FileHandle(0), FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE)
            }
            Some(_) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let Some(dir) = self.entry(ino).filter(Entry::is_dir) else { return reply.error(Errno::ENOTDIR) };
        let tree = match self.children(&dir) {
            Ok(t) => t,
            Err(e) => return reply.error(e),
        };
        let dots = [(ino.0, FileType::Directory, "."), (ino.0, FileType::Directory, "..")];
        let total = dots.len() + tree.entries.len();
        for i in offset as usize..total {
            let full = if i < dots.len() {
                let (n, t, name) = dots[i];
                reply.add(INodeNo(n), (i + 1) as u64, t, name)
            } else {
                let e = &tree.entries[i - dots.len()];
                let child = self.child_ino(ino.0, e);
                reply.add(INodeNo(child), (i + 1) as u64, file_type(e), &e.name)
            };
            if full {
                break;
            }
        }
        reply.ok()
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _owner: fuser::LockOwner, reply: ReplyEmpty) {
        reply.ok()
    }

    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: ReplyXattr) {
        // Volumes keep no extended attributes.
        reply.error(Errno::NO_XATTR)
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0)
        } else {
            reply.data(&[])
        }
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let Some(dir) = self.entry(ino).filter(Entry::is_dir) else { return reply.error(Errno::ENOTDIR) };
        let tree = match self.children(&dir) {
            Ok(t) => t,
            Err(e) => return reply.error(e),
        };
        let total = 2 + tree.entries.len();
        for i in offset as usize..total {
            let full = if i < 2 {
                let name = if i == 0 { "." } else { ".." };
                reply.add(ino, (i + 1) as u64, name, &TTL, &attr(ino.0, &dir), Generation(0))
            } else {
                let e = &tree.entries[i - 2];
                let child = self.child_ino(ino.0, e);
                reply.add(INodeNo(child), (i + 1) as u64, &e.name, &TTL, &attr(child, e), Generation(0))
            };
            if full {
                break;
            }
        }
        reply.ok()
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let files = self.inodes.lock().unwrap_or_else(|p| p.into_inner()).nodes.len() as u64;
        reply.statfs(0, 0, 0, files, 0, 128 * 1024, 255, 128 * 1024)
    }
}
