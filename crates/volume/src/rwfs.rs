//! The writable FUSE filesystem of a mounted volume: the version's tree below, copy-on-write above. A file is
//! copied up into the mount's local upper directory the first time it is opened for writing; new files live
//! there from the start; directories and metadata changes are kept in memory. `fsync`/`fsyncdir` (and the stop
//! of the workload) sync: the changes since the last sync become one new version on the ref.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig, OpenAccMode, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::fuse::{attr, configure_kernel, file_type, Blocks, TTL};
use crate::tree::{kind, Entry, DIR_MODE, SYMLINK_MODE};
use crate::{VolumeError, VolumeStore};

/// One inode: its entry (metadata, and the version's content while unchanged), its bytes in the upper directory
/// once written, and for directories the children once loaded.
struct Node {
    parent: u64,
    entry: Entry,
    upper: Option<PathBuf>,
    children: Option<BTreeMap<String, u64>>,
    /// Changed since the last sync (content or metadata; for directories also membership).
    dirty: bool,
}

/// The in-memory state of a writable mount, shared by the FUSE threads and the syncer.
pub(crate) struct RwState {
    nodes: Mutex<Vec<Node>>,
    upper_dir: PathBuf,
}

impl RwState {
    pub(crate) fn new(root: &str, upper_dir: &Path) -> Self {
        let entry = Entry { kind: kind::DIRECTORY, mode: DIR_MODE, hash: root.into(), ..Default::default() };
        Self {
            nodes: Mutex::new(vec![Node { parent: 1, entry, upper: None, children: None, dirty: false }]),
            upper_dir: upper_dir.to_path_buf(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Node>> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The writable filesystem.
pub(crate) struct RwFs {
    store: Arc<VolumeStore>,
    blocks: Blocks,
    state: Arc<RwState>,
    /// Called on fsync/fsyncdir: commits the changes; its error becomes EIO.
    syncer: Arc<dyn Fn() -> Result<(), VolumeError> + Send + Sync>,
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn ms_of(t: TimeOrNow) -> i64 {
    match t {
        TimeOrNow::Now => now_ms(),
        TimeOrNow::SpecificTime(t) => t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0),
    }
}

/// Truncates or extends a copied-up file to `size`.
fn set_upper_len(n: &mut Node, size: u64) -> Result<(), Errno> {
    let path = n.upper.as_ref().expect("copied up before its length changes");
    std::fs::OpenOptions::new().write(true).open(path).and_then(|f| f.set_len(size)).map_err(|e| io_errno(&e))?;
    n.entry.size = size;
    n.dirty = true;
    Ok(())
}

fn io_errno(e: &std::io::Error) -> Errno {
    e.raw_os_error().map(Errno::from_i32).unwrap_or(Errno::EIO)
}

impl RwFs {
    pub(crate) fn new(
        store: Arc<VolumeStore>,
        env: &str,
        runtime: tokio::runtime::Handle,
        state: Arc<RwState>,
        syncer: Arc<dyn Fn() -> Result<(), VolumeError> + Send + Sync>,
    ) -> Self {
        Self { blocks: Blocks::new(store.clone(), env, runtime), store, state, syncer }
    }

    /// Loads a directory's children from its tree the first time they are needed.
    fn load_children(&self, nodes: &mut Vec<Node>, ino: u64) -> Result<(), Errno> {
        let idx = (ino - 1) as usize;
        let node = nodes.get(idx).ok_or(Errno::ENOENT)?;
        if !node.entry.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        if node.children.is_some() {
            return Ok(());
        }
        let tree = self.store.load_tree(&node.entry.hash).map_err(|e| {
            tracing::warn!(error = %e, "volume mount: loading a directory failed");
            Errno::EIO
        })?;
        let mut children = BTreeMap::new();
        for e in &tree.entries {
            nodes.push(Node { parent: ino, entry: e.clone(), upper: None, children: None, dirty: false });
            children.insert(e.name.clone(), nodes.len() as u64);
        }
        nodes[idx].children = Some(children);
        Ok(())
    }

    fn child(&self, nodes: &mut Vec<Node>, parent: u64, name: &OsStr) -> Result<Option<u64>, Errno> {
        self.load_children(nodes, parent)?;
        let name = name.to_str().ok_or(Errno::EINVAL)?;
        Ok(nodes[(parent - 1) as usize].children.as_ref().and_then(|c| c.get(name).copied()))
    }

    /// Adds a new node named `name` under `parent` (which must not have that name yet).
    fn add(&self, nodes: &mut Vec<Node>, parent: u64, name: &OsStr, entry: Entry, upper: bool) -> Result<u64, Errno> {
        if self.child(nodes, parent, name)?.is_some() {
            return Err(Errno::EEXIST);
        }
        let name = name.to_str().ok_or(Errno::EINVAL)?.to_string();
        if name.len() > 255 {
            return Err(Errno::ENAMETOOLONG);
        }
        let ino = nodes.len() as u64 + 1;
        let upper = if upper {
            let path = self.state.upper_dir.join(ino.to_string());
            std::fs::File::create(&path).map_err(|e| io_errno(&e))?;
            Some(path)
        } else {
            None
        };
        let children = if entry.is_dir() { Some(BTreeMap::new()) } else { None };
        nodes.push(Node { parent, entry: Entry { name: name.clone(), ..entry }, upper, children, dirty: true });
        let p = &mut nodes[(parent - 1) as usize];
        p.children.as_mut().expect("loaded above").insert(name, ino);
        p.dirty = true;
        p.entry.mtime_ms = now_ms();
        Ok(ino)
    }

    /// Gives a file its own copy in the upper directory (once), so it can be written.
    fn copy_up(&self, nodes: &mut [Node], ino: u64) -> Result<(), Errno> {
        let node = &nodes[(ino - 1) as usize];
        if node.upper.is_some() {
            return Ok(());
        }
        let path = self.state.upper_dir.join(ino.to_string());
        let f = std::fs::File::create(&path).map_err(|e| io_errno(&e))?;
        let mut off = 0u64;
        while off < node.entry.size {
            let chunk = self.blocks.read_file(&node.entry, off, 4 << 20).map_err(|e| {
                tracing::warn!(error = %e, "volume mount: copy-up read failed");
                Errno::EIO
            })?;
            if chunk.is_empty() {
                break;
            }
            f.write_all_at(&chunk, off).map_err(|e| io_errno(&e))?;
            off += chunk.len() as u64;
        }
        let node = &mut nodes[(ino - 1) as usize];
        node.upper = Some(path);
        node.entry.extents.clear();
        node.entry.inline.clear();
        node.dirty = true;
        Ok(())
    }

    fn reply_entry(nodes: &[Node], ino: u64, reply: ReplyEntry) {
        reply.entry(&TTL, &attr(ino, &nodes[(ino - 1) as usize].entry), Generation(0))
    }

    fn remove(&self, parent: INodeNo, name: &OsStr, dir: bool) -> Result<(), Errno> {
        let mut nodes = self.state.lock();
        let ino = self.child(&mut nodes, parent.0, name)?.ok_or(Errno::ENOENT)?;
        let is_dir = nodes[(ino - 1) as usize].entry.is_dir();
        if dir && !is_dir {
            return Err(Errno::ENOTDIR);
        }
        if !dir && is_dir {
            return Err(Errno::EISDIR);
        }
        if is_dir {
            self.load_children(&mut nodes, ino)?;
            if !nodes[(ino - 1) as usize].children.as_ref().is_none_or(BTreeMap::is_empty) {
                return Err(Errno::ENOTEMPTY);
            }
        }
        let name = name.to_str().ok_or(Errno::EINVAL)?;
        let p = &mut nodes[(parent.0 - 1) as usize];
        p.children.as_mut().expect("loaded").remove(name);
        p.dirty = true;
        p.entry.mtime_ms = now_ms();
        let node = &mut nodes[(ino - 1) as usize];
        node.parent = 0;
        if let Some(upper) = node.upper.take() {
            let _ = std::fs::remove_file(upper);
        }
        Ok(())
    }

    fn new_entry(&self, req: &Request, kind: u32, mode: u32, umask: u32) -> Entry {
        Entry {
            kind,
            mode: mode & !umask & 0o7777,
            mtime_ms: now_ms(),
            uid: req.uid(),
            gid: req.gid(),
            ..Default::default()
        }
    }
}

impl Filesystem for RwFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        configure_kernel(config);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut nodes = self.state.lock();
        match self.child(&mut nodes, parent.0, name) {
            Ok(Some(ino)) => Self::reply_entry(&nodes, ino, reply),
            Ok(None) => reply.error(Errno::ENOENT),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let nodes = self.state.lock();
        match nodes.get((ino.0 - 1) as usize) {
            Some(n) => reply.attr(&TTL, &attr(ino.0, &n.entry)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut nodes = self.state.lock();
        let Some(n) = nodes.get((ino.0 - 1) as usize) else { return reply.error(Errno::ENOENT) };
        if let Some(size) = size {
            if n.entry.is_dir() {
                return reply.error(Errno::EISDIR);
            }
            if let Err(e) = self.copy_up(&mut nodes, ino.0) {
                return reply.error(e);
            }
            let n = &mut nodes[(ino.0 - 1) as usize];
            if let Err(e) = set_upper_len(n, size) {
                return reply.error(e);
            }
            n.entry.mtime_ms = now_ms();
        }
        let n = &mut nodes[(ino.0 - 1) as usize];
        if let Some(m) = mode {
            n.entry.mode = m & 0o7777;
        }
        if let Some(u) = uid {
            n.entry.uid = u;
        }
        if let Some(g) = gid {
            n.entry.gid = g;
        }
        if let Some(t) = mtime {
            n.entry.mtime_ms = ms_of(t);
        }
        n.dirty = true;
        reply.attr(&TTL, &attr(ino.0, &n.entry))
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let nodes = self.state.lock();
        match nodes.get((ino.0 - 1) as usize) {
            Some(n) if n.entry.is_symlink() => reply.data(&n.entry.inline),
            _ => reply.error(Errno::EINVAL),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            // Volumes hold files, directories and symlinks; devices, fifos and sockets have no content to version.
            return reply.error(Errno::EPERM);
        }
        let mut nodes = self.state.lock();
        let entry = self.new_entry(req, kind::FILE, mode, umask);
        match self.add(&mut nodes, parent.0, name, entry, true) {
            Ok(ino) => Self::reply_entry(&nodes, ino, reply),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let mut nodes = self.state.lock();
        let entry = Entry { hash: crate::tree::empty_tree_hash(), ..self.new_entry(req, kind::DIRECTORY, mode, umask) };
        match self.add(&mut nodes, parent.0, name, entry, false) {
            Ok(ino) => Self::reply_entry(&nodes, ino, reply),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.remove(parent, name, false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.remove(parent, name, true) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let mut nodes = self.state.lock();
        let t = target.as_os_str().as_bytes().to_vec();
        let entry = Entry { size: t.len() as u64, inline: t, ..self.new_entry(req, kind::SYMLINK, SYMLINK_MODE, 0) };
        match self.add(&mut nodes, parent.0, link_name, entry, false) {
            Ok(ino) => Self::reply_entry(&nodes, ino, reply),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            return reply.error(Errno::EINVAL);
        }
        let mut nodes = self.state.lock();
        let result = (|| -> Result<(), Errno> {
            let ino = self.child(&mut nodes, parent.0, name)?.ok_or(Errno::ENOENT)?;
            if let Some(existing) = self.child(&mut nodes, newparent.0, newname)? {
                if existing == ino {
                    return Ok(());
                }
                if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                    return Err(Errno::EEXIST);
                }
                let (src_dir, dst_dir) =
                    (nodes[(ino - 1) as usize].entry.is_dir(), nodes[(existing - 1) as usize].entry.is_dir());
                match (src_dir, dst_dir) {
                    (true, false) => return Err(Errno::ENOTDIR),
                    (false, true) => return Err(Errno::EISDIR),
                    _ => {}
                }
                if dst_dir {
                    self.load_children(&mut nodes, existing)?;
                    if !nodes[(existing - 1) as usize].children.as_ref().is_none_or(BTreeMap::is_empty) {
                        return Err(Errno::ENOTEMPTY);
                    }
                }
                nodes[(existing - 1) as usize].parent = 0;
            }
            // A directory may not move below itself.
            let mut up = newparent.0;
            while up != 1 {
                if up == ino {
                    return Err(Errno::EINVAL);
                }
                up = nodes[(up - 1) as usize].parent;
            }
            let (old, new) = (name.to_str().ok_or(Errno::EINVAL)?, newname.to_str().ok_or(Errno::EINVAL)?);
            let now = now_ms();
            let p = &mut nodes[(parent.0 - 1) as usize];
            p.children.as_mut().expect("loaded").remove(old);
            p.dirty = true;
            p.entry.mtime_ms = now;
            let np = &mut nodes[(newparent.0 - 1) as usize];
            np.children.as_mut().expect("loaded").insert(new.to_string(), ino);
            np.dirty = true;
            np.entry.mtime_ms = now;
            let n = &mut nodes[(ino - 1) as usize];
            n.parent = newparent.0;
            n.entry.name = new.to_string();
            n.dirty = true;
            Ok(())
        })();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mut nodes = self.state.lock();
        let Some(n) = nodes.get((ino.0 - 1) as usize) else { return reply.error(Errno::ENOENT) };
        if n.entry.is_dir() {
            return reply.error(Errno::EISDIR);
        }
        let writing = !matches!(flags.acc_mode(), OpenAccMode::O_RDONLY) || flags.0 & libc::O_TRUNC != 0;
        if writing {
            if let Err(e) = self.copy_up(&mut nodes, ino.0) {
                return reply.error(e);
            }
            if flags.0 & libc::O_TRUNC != 0 {
                if let Err(e) = set_upper_len(&mut nodes[(ino.0 - 1) as usize], 0) {
                    return reply.error(e);
                }
            }
        }
        reply.opened(FileHandle(0), FopenFlags::empty())
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let mut nodes = self.state.lock();
        let entry = self.new_entry(req, kind::FILE, mode, umask);
        match self.add(&mut nodes, parent.0, name, entry, true) {
            Ok(ino) => reply.created(
                &TTL,
                &attr(ino, &nodes[(ino - 1) as usize].entry),
                Generation(0),
                FileHandle(0),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(e),
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
        let (entry, upper) = {
            let nodes = self.state.lock();
            let Some(n) = nodes.get((ino.0 - 1) as usize) else { return reply.error(Errno::ENOENT) };
            (n.entry.clone(), n.upper.clone())
        };
        if let Some(path) = upper {
            let mut buf = vec![0u8; size as usize];
            let res = std::fs::File::open(path).and_then(|f| {
                let mut filled = 0;
                while filled < buf.len() {
                    let n = f.read_at(&mut buf[filled..], offset + filled as u64)?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                Ok(filled)
            });
            return match res {
                Ok(n) => reply.data(&buf[..n]),
                Err(e) => reply.error(io_errno(&e)),
            };
        }
        match self.blocks.read_file(&entry, offset, u64::from(size)) {
            Ok(bytes) => reply.data(&bytes),
            Err(err) => {
                tracing::warn!(error = %err, "volume mount: read failed");
                reply.error(Errno::EIO)
            }
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut nodes = self.state.lock();
        if nodes.get((ino.0 - 1) as usize).is_none() {
            return reply.error(Errno::ENOENT);
        }
        if let Err(e) = self.copy_up(&mut nodes, ino.0) {
            return reply.error(e);
        }
        let n = &mut nodes[(ino.0 - 1) as usize];
        let res = std::fs::OpenOptions::new()
            .write(true)
            .open(n.upper.as_ref().expect("copied up"))
            .and_then(|f| f.write_all_at(data, offset));
        match res {
            Ok(()) => {
                n.entry.size = n.entry.size.max(offset + data.len() as u64);
                n.entry.mtime_ms = now_ms();
                n.dirty = true;
                reply.written(data.len() as u32)
            }
            Err(e) => reply.error(io_errno(&e)),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _owner: fuser::LockOwner, reply: ReplyEmpty) {
        reply.ok()
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        match (self.syncer)() {
            Ok(()) => reply.ok(),
            Err(e) => {
                tracing::error!(error = %e, "volume sync on fsync failed");
                reply.error(Errno::EIO)
            }
        }
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        match (self.syncer)() {
            Ok(()) => reply.ok(),
            Err(e) => {
                tracing::error!(error = %e, "volume sync on fsync failed");
                reply.error(Errno::EIO)
            }
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let mut nodes = self.state.lock();
        if let Err(e) = self.load_children(&mut nodes, ino.0) {
            return reply.error(e);
        }
        let n = &nodes[(ino.0 - 1) as usize];
        let mut list: Vec<(u64, fuser::FileType, String)> =
            vec![(ino.0, fuser::FileType::Directory, ".".into()), (n.parent, fuser::FileType::Directory, "..".into())];
        for (name, child) in n.children.as_ref().expect("loaded") {
            list.push((*child, file_type(&nodes[(*child - 1) as usize].entry), name.clone()));
        }
        for (i, (child, t, name)) in list.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*child), (i + 1) as u64, *t, name) {
                break;
            }
        }
        reply.ok()
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let mut nodes = self.state.lock();
        if let Err(e) = self.load_children(&mut nodes, ino.0) {
            return reply.error(e);
        }
        let n = &nodes[(ino.0 - 1) as usize];
        let mut list: Vec<(u64, String)> = vec![(ino.0, ".".into()), (n.parent.max(1), "..".into())];
        for (name, child) in n.children.as_ref().expect("loaded") {
            list.push((*child, name.clone()));
        }
        for (i, (child, name)) in list.iter().enumerate().skip(offset as usize) {
            let e = &nodes[(*child - 1) as usize].entry;
            if reply.add(INodeNo(*child), (i + 1) as u64, name, &TTL, &attr(*child, e), Generation(0)) {
                break;
            }
        }
        reply.ok()
    }

    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: ReplyXattr) {
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
        let files = self.state.lock().len() as u64;
        reply.statfs(1 << 30, 1 << 30, 1 << 30, files, 1 << 20, 128 * 1024, 255, 128 * 1024)
    }
}

/// A snapshot of the mount's tree for a sync: every directory that was loaded, with its files; unloaded
/// directories stand for their unchanged version subtree.
pub(crate) enum Snap {
    /// An unchanged entry (a file as in the version, a symlink, or an unloaded directory).
    Same(Entry),
    /// A file whose bytes are in the upper directory.
    Upper(Entry, PathBuf),
    /// A loaded directory.
    Dir(Entry, Vec<Snap>),
}

impl RwState {
    /// Takes a consistent snapshot of the tree (under the lock) and clears the dirty marks.
    pub(crate) fn snapshot(&self) -> Snap {
        let mut nodes = self.lock();
        fn walk(nodes: &mut Vec<Node>, ino: u64) -> Snap {
            let idx = (ino - 1) as usize;
            nodes[idx].dirty = false;
            let n = &nodes[idx];
            if let Some(children) = n.children.clone() {
                let entry = n.entry.clone();
                let kids = children.values().map(|c| walk(nodes, *c)).collect();
                return Snap::Dir(entry, kids);
            }
            match &n.upper {
                Some(p) => Snap::Upper(n.entry.clone(), p.clone()),
                None => Snap::Same(n.entry.clone()),
            }
        }
        walk(&mut nodes, 1)
    }
}

impl VolumeStore {
    /// Turns a snapshot into trees (storing upper files as objects); returns the root hash and the new trees.
    pub(crate) async fn seal_snapshot(
        &self,
        env: &str,
        snap: Snap,
        trees: &mut Vec<(String, Vec<u8>)>,
    ) -> Result<Entry, VolumeError> {
        match snap {
            Snap::Same(e) => Ok(e),
            Snap::Upper(e, path) => {
                let content = self.store_file(env, &path).await?;
                let mut out = Entry { extents: vec![], inline: vec![], chunked: false, ..e };
                match content {
                    crate::FileContent::Empty => {
                        out.size = 0;
                        out.hash = blake3::hash(b"").to_hex().to_string();
                    }
                    crate::FileContent::Inline { data } => {
                        out.size = data.len() as u64;
                        out.hash = blake3::hash(&data).to_hex().to_string();
                        out.inline = data;
                    }
                    crate::FileContent::Located { hash, size, extents, chunked } => {
                        out.size = size;
                        out.hash = hash;
                        out.extents = extents;
                        out.chunked = chunked;
                    }
                }
                Ok(out)
            }
            Snap::Dir(e, kids) => {
                let mut entries = Vec::with_capacity(kids.len());
                for k in kids {
                    entries.push(Box::pin(self.seal_snapshot(env, k, trees)).await?);
                }
                entries.sort_by(|a, b| a.name.cmp(&b.name));
                let hash = crate::tree::seal_dir(entries, trees);
                Ok(Entry { hash, ..e })
            }
        }
    }
}
