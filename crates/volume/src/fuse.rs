//! The FUSE filesystem that serves one immutable version: lookups walk the content-addressed trees (cached in
//! memory), reads fetch only the byte ranges asked for from the object store, and because nothing under it ever
//! changes, the kernel may cache attributes, entries and pages for as long as it likes.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, OpenFlags, ReplyAttr,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};

use crate::tree::{kind, Entry, DIR_MODE};
use crate::VolumeStore;

/// Versions never change, so the kernel may cache what it learns for long.
const TTL: Duration = Duration::from_secs(24 * 3600);

struct Inodes {
    /// Entry of inode `i + 1`.
    nodes: Vec<Entry>,
    /// (parent inode, name) → inode.
    children: HashMap<(u64, String), u64>,
}

/// A read-only filesystem over one version's tree.
pub struct VersionFs {
    store: Arc<VolumeStore>,
    env: String,
    runtime: tokio::runtime::Handle,
    inodes: Mutex<Inodes>,
}

impl VersionFs {
    /// The filesystem of the tree `root`, reading objects of `env` on the runtime `runtime`.
    pub fn new(store: Arc<VolumeStore>, env: &str, root: &str, runtime: tokio::runtime::Handle) -> Self {
        let root = Entry { kind: kind::DIRECTORY, mode: DIR_MODE, hash: root.into(), ..Default::default() };
        Self {
            store,
            env: env.into(),
            runtime,
            inodes: Mutex::new(Inodes { nodes: vec![root], children: HashMap::new() }),
        }
    }

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

fn file_type(e: &Entry) -> FileType {
    match e.kind {
        kind::DIRECTORY => FileType::Directory,
        kind::SYMLINK => FileType::Symlink,
        _ => FileType::RegularFile,
    }
}

fn attr(ino: u64, e: &Entry) -> FileAttr {
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
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(dir) = self.entry(parent).filter(Entry::is_dir) else { return reply.error(Errno::ENOTDIR) };
        let tree = match self.children(&dir) {
            Ok(t) => t,
            Err(e) => return reply.error(e),
        };
        match name.to_str().and_then(|n| tree.get(n)) {
            Some(e) => {
                let ino = self.child_ino(parent.0, e);
                reply.entry(&TTL, &attr(ino, e), Generation(0))
            }
            None => reply.error(Errno::ENOENT),
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
        let store = self.store.clone();
        let env = self.env.clone();
        match self.runtime.block_on(async move { store.read_range(&env, &e, offset, u64::from(size)).await }) {
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
        // Volumes keep no extended attributes (overlayfs asks for its own on every lower directory).
        reply.error(Errno::NO_XATTR)
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0)
        } else {
            reply.data(&[])
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let files = self.inodes.lock().unwrap_or_else(|p| p.into_inner()).nodes.len() as u64;
        reply.statfs(0, 0, 0, files, 0, 128 * 1024, 255, 128 * 1024)
    }
}
