//! User namespaces for native sandboxes: the sandbox's root is an unprivileged user on the host.
//!
//! Each sandbox gets its own range of 65,536 host ids, so that root inside one sandbox is neither host root nor
//! the same host user as root in another. Image layers stay owned by their real ids on disk: the sandbox sees them
//! through id-mapped mounts (`mount_setattr(MOUNT_ATTR_IDMAP)`), which shift ids on the fly. The writable layer
//! is not id-mapped (overlayfs works in it with the mounter's credentials, and the host root is not in the map),
//! so what the sandbox writes there is stored with shifted ids; a build's layer is shifted back with
//! [`unshift_tree`] before it becomes part of an image.

use std::collections::BTreeSet;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Mutex;

use rustix::mount::{open_tree, OpenTreeFlags};

use crate::RuntimeError;

/// Ids per sandbox: every id a Linux distribution allocates (0–65535).
pub const IDS_PER_SANDBOX: u32 = 65_536;
/// Host id of slot 0's root. Above the ids any distribution hands to users or services, and below 2^31 so
/// that every slot fits the kernel's signed ranges (such as `ping_group_range`).
const FIRST_HOST_ID: u32 = 0x4000_0000;
/// Slots between [`FIRST_HOST_ID`] and 2^31.
const SLOTS: u32 = 0x4000_0000 / IDS_PER_SANDBOX;

/// Ids 0..[`IDS_PER_SANDBOX`] inside a sandbox are host ids `host_base..` outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMap {
    /// The host id of the sandbox's root.
    pub host_base: u32,
}

impl IdMap {
    /// The id inside of host id `host`, if the map covers it.
    pub fn to_inner(self, host: u32) -> Option<u32> {
        host.checked_sub(self.host_base).filter(|i| *i < IDS_PER_SANDBOX)
    }

    /// The line written to `uid_map` and `gid_map`.
    fn line(self) -> String {
        format!("0 {} {IDS_PER_SANDBOX}\n", self.host_base)
    }
}

/// Hands out id ranges, one per running sandbox.
#[derive(Default)]
pub struct IdAllocator {
    used: Mutex<BTreeSet<u32>>,
}

impl IdAllocator {
    /// A free range.
    pub fn take(&self) -> Result<IdMap, RuntimeError> {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        // Slot 0 is the probe's (see `probe`), never a sandbox's.
        let slot = (1..SLOTS)
            .find(|s| !used.contains(s))
            .ok_or_else(|| RuntimeError::Unsupported("no free user id ranges for another sandbox".into()))?;
        used.insert(slot);
        Ok(IdMap { host_base: FIRST_HOST_ID + slot * IDS_PER_SANDBOX })
    }

    /// Returns a range.
    pub fn release(&self, map: IdMap) {
        let slot = (map.host_base - FIRST_HOST_ID) / IDS_PER_SANDBOX;
        self.used.lock().unwrap_or_else(|p| p.into_inner()).remove(&slot);
    }
}

/// A user namespace with one [`IdMap`], held open by a descriptor (no process lives in it until the sandbox
/// joins it).
#[derive(Debug)]
pub struct UserNs {
    fd: OwnedFd,
    map: IdMap,
}

/// Stack of the namespace holder, which makes two system calls and nothing else.
const HOLDER_STACK: usize = 64 * 1024;

/// The namespace holder: says it is ready on descriptor `fd` (its argument, a number, not a pointer), then blocks
/// until it is killed. Raw system calls only: it shares the server's memory and must not touch it.
extern "C" fn hold(fd: *mut libc::c_void) -> libc::c_int {
    // SAFETY: system calls on a descriptor number the child inherited and on a static message; ppoll with no
    // descriptors and no timeout waits for a signal, and every signal but SIGKILL is blocked.
    unsafe {
        libc::syscall(libc::SYS_write, fd as usize as libc::c_int, b"r".as_ptr(), 1usize);
        loop {
            libc::syscall(
                libc::SYS_ppoll,
                std::ptr::null_mut::<libc::pollfd>(),
                0usize,
                std::ptr::null::<libc::timespec>(),
                std::ptr::null::<libc::sigset_t>(),
                0usize,
            );
        }
    }
}

impl UserNs {
    /// Creates a user namespace mapping ids 0..65536 to `map`'s host range (uids and gids alike).
    pub fn create(map: IdMap) -> Result<Self, RuntimeError> {
        let io = |what: &str, e: std::io::Error| RuntimeError::io(format!("creating a user namespace: {what}"), e);
        let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| io("pipe", e.into()))?;
        // The holder shares the server's memory (CLONE_VM) instead of copying its page tables as a fork would, and
        // runs on a stack of its own that outlives it (it is reaped below, before the stack is freed).
        let mut stack = vec![0u8; HOLDER_STACK];
        // With every signal blocked the holder never stops waiting and never runs one of the server's signal
        // handlers; SIGKILL, which ends it, cannot be blocked. The mask is the calling thread's and is restored.
        let all = nix::sys::signal::SigSet::all();
        let mut old = nix::sys::signal::SigSet::empty();
        nix::sys::signal::pthread_sigmask(nix::sys::signal::SigmaskHow::SIG_SETMASK, Some(&all), Some(&mut old))
            .map_err(|e| io("blocking signals", e.into()))?;
        // SAFETY: glibc's clone runs `hold` on `stack` (its top, 16-byte aligned) in a child that shares this
        // process's memory. `hold` touches no memory: it gets the descriptor number as its argument and only
        // makes the write and ppoll system calls. The stack stays allocated until the child has been reaped.
        let pid = unsafe {
            let top = stack.as_mut_ptr().add(HOLDER_STACK);
            let top = top.sub(top as usize % 16);
            libc::clone(
                hold,
                top.cast(),
                libc::CLONE_VM | libc::CLONE_NEWUSER | libc::SIGCHLD,
                ready_w.as_raw_fd() as usize as *mut libc::c_void,
            )
        };
        let clone_error = std::io::Error::last_os_error();
        let _ = nix::sys::signal::pthread_sigmask(nix::sys::signal::SigmaskHow::SIG_SETMASK, Some(&old), None);
        if pid < 0 {
            return Err(io("clone", clone_error));
        }
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        drop(ready_w);
        let result = (|| {
            let mut b = [0u8; 1];
            // Another thread's concurrent fork may hold a copy of the write end: wait for the byte, not for EOF.
            nix::unistd::read(&ready_r, &mut b).map_err(|e| io("waiting for the holder", e.into()))?;
            for file in ["uid_map", "gid_map"] {
                std::fs::write(format!("/proc/{pid}/{file}"), map.line()).map_err(|e| io(file, e))?;
            }
            std::fs::File::open(format!("/proc/{pid}/ns/user")).map(OwnedFd::from).map_err(|e| io("opening it", e))
        })();
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(pid, None);
        drop(stack);
        Ok(Self { fd: result?, map })
    }

    /// Its id map.
    pub fn map(&self) -> IdMap {
        self.map
    }

    /// The namespace's descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// A detached copy of the mount tree at `path`, shown through this namespace's id map (and read-only when
    /// asked), ready to be attached anywhere with `move_mount`.
    pub fn idmapped_clone(&self, path: &Path, read_only: bool) -> std::io::Result<OwnedFd> {
        detached_clone(path, read_only, Some(self.fd.as_fd()))
    }
}

/// A detached copy of the mount tree at `path`, read-only when asked and shown through the id map of user
/// namespace `idmap` when given.
pub fn detached_clone(path: &Path, read_only: bool, idmap: Option<BorrowedFd<'_>>) -> std::io::Result<OwnedFd> {
    let tree = open_tree(
        rustix::fs::CWD,
        path,
        OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC | OpenTreeFlags::AT_RECURSIVE,
    )?;
    let mut attr = MountAttr {
        attr_set: if idmap.is_some() { MOUNT_ATTR_IDMAP } else { 0 } | if read_only { MOUNT_ATTR_RDONLY } else { 0 },
        attr_clr: 0,
        propagation: 0,
        userns_fd: idmap.map(|fd| fd.as_raw_fd() as u64).unwrap_or(0),
    };
    if attr.attr_set == 0 {
        return Ok(tree);
    }
    // SAFETY: mount_setattr reads `size_of::<MountAttr>()` bytes from a live struct with the kernel's
    // `struct mount_attr` layout, and an empty path (AT_EMPTY_PATH) on a descriptor we own.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            (libc::AT_EMPTY_PATH | libc::AT_RECURSIVE) as libc::c_uint,
            &mut attr as *mut MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(tree)
}

/// `struct mount_attr` (linux/mount.h); rustix has no `mount_setattr`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

/// Gives `path` (not following a symlink) to the sandbox's root: what the host makes inside a sandbox's root
/// filesystem must be owned by root as the sandbox sees it.
pub fn give_to_root(path: &Path, map: Option<IdMap>) -> Result<(), RuntimeError> {
    let Some(map) = map else { return Ok(()) };
    let id = map.host_base;
    std::os::unix::fs::lchown(path, Some(id), Some(id))
        .map_err(|e| RuntimeError::io(format!("giving {} to the sandbox's root", path.display()), e))
}

/// Shifts the ids of everything under `dir` (itself included) from the sandbox's host range back to the ids
/// the sandbox saw, so that a layer written by a sandbox in a user namespace is like one written without.
/// Ids outside the range (entries the host itself made) are left alone.
pub fn unshift_tree(dir: &Path, map: IdMap) -> std::io::Result<()> {
    remap_tree(dir, &|id| map.to_inner(id))
}

/// Shifts the ids of everything under `dir` (itself included) into the sandbox's host range: what the host wrote
/// into a writable layer before the sandbox starts must be the sandbox's to use.
pub fn shift_tree(dir: &Path, map: IdMap) -> std::io::Result<()> {
    remap_tree(dir, &|id| (id < IDS_PER_SANDBOX).then(|| map.host_base + id))
}

/// Changes each uid and gid under `dir` for which `to` gives a new one, keeping set-id bits.
fn remap_tree(dir: &Path, to: &dyn Fn(u32) -> Option<u32>) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(dir)?;
    let (uid, gid) = (to(meta.uid()), to(meta.gid()));
    if uid.is_some() || gid.is_some() {
        std::os::unix::fs::lchown(dir, uid, gid)?;
        // chown clears set-id bits on files; they were the sandbox's to set.
        let mode = meta.mode() & 0o7777;
        if mode & 0o6000 != 0 && meta.is_file() {
            std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        }
    }
    if meta.is_dir() {
        for entry in std::fs::read_dir(dir)? {
            remap_tree(&entry?.path(), to)?;
        }
    }
    Ok(())
}

/// Checks this host can run sandboxes in user namespaces: creates one and stacks an overlay of an id-mapped
/// layer under `scratch` (a directory on the filesystem that holds image layers). The error says what failed.
pub fn probe(scratch: &Path) -> Result<(), String> {
    let ns = UserNs::create(IdMap { host_base: FIRST_HOST_ID }).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(scratch);
    let result = (|| {
        let (layer, upper, work, merged) =
            (scratch.join("layer"), scratch.join("upper"), scratch.join("work"), scratch.join("merged"));
        for d in [&layer, &upper, &work, &merged] {
            std::fs::create_dir_all(d).map_err(|e| format!("creating {}: {e}", d.display()))?;
        }
        std::fs::write(layer.join("probe"), b"").map_err(|e| format!("writing the probe layer: {e}"))?;
        let lower = ns.idmapped_clone(&layer, true).map_err(|e| format!("id-mapping a layer: {e}"))?;
        crate::rootfs::mount_overlay(&[crate::rootfs::Lower::Mount(lower.as_fd())], &upper, &work, &merged)
            .map_err(|e| format!("stacking an overlay on an id-mapped layer: {e}"))?;
        let seen = std::fs::symlink_metadata(merged.join("probe"));
        let _ = nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH);
        use std::os::unix::fs::MetadataExt;
        match seen {
            Ok(m) if m.uid() == FIRST_HOST_ID => Ok(()),
            Ok(m) => Err(format!("an id-mapped layer shows uid {} instead of {FIRST_HOST_ID}", m.uid())),
            Err(e) => Err(format!("reading through the overlay: {e}")),
        }
    })();
    let _ = std::fs::remove_dir_all(scratch);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_cover_exactly_one_range() {
        let m = IdMap { host_base: FIRST_HOST_ID + IDS_PER_SANDBOX };
        assert_eq!(m.to_inner(FIRST_HOST_ID + IDS_PER_SANDBOX), Some(0));
        assert_eq!(m.to_inner(FIRST_HOST_ID + 2 * IDS_PER_SANDBOX - 1), Some(65_535));
        assert_eq!(m.to_inner(FIRST_HOST_ID + IDS_PER_SANDBOX + 1000), Some(1000));
        assert_eq!(m.to_inner(0), None);
        assert_eq!(m.to_inner(FIRST_HOST_ID + 2 * IDS_PER_SANDBOX), None);
    }

    #[test]
    fn ranges_are_distinct_and_reused() {
        let a = IdAllocator::default();
        let (x, y) = (a.take().unwrap(), a.take().unwrap());
        assert_ne!(x, y);
        assert!(x.host_base >= FIRST_HOST_ID + IDS_PER_SANDBOX, "slot 0 is the probe's");
        assert!(y.host_base + (IDS_PER_SANDBOX - 1) < 1 << 31);
        a.release(x);
        assert_eq!(a.take().unwrap(), x);
    }

    #[test]
    fn an_idmapped_layer_shows_shifted_ids_and_layers_shift_both_ways() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: user namespaces with id maps need root");
            return;
        }
        let dir = std::env::temp_dir().join(format!("compute-userns-test-{}", std::process::id()));
        probe(&dir.join("probe")).expect("this host supports id-mapped overlays");

        let map = IdMap { host_base: FIRST_HOST_ID + 7 * IDS_PER_SANDBOX };
        let tree = dir.join("tree");
        std::fs::create_dir_all(tree.join("sub")).unwrap();
        std::fs::write(tree.join("sub/file"), b"x").unwrap();
        std::os::unix::fs::symlink("file", tree.join("sub/link")).unwrap();
        for p in ["", "sub", "sub/file", "sub/link"] {
            std::os::unix::fs::lchown(tree.join(p), Some(map.host_base + 1000), Some(map.host_base + 1000)).unwrap();
        }
        std::os::unix::fs::lchown(tree.join("sub/file"), Some(0), Some(map.host_base)).unwrap();
        unshift_tree(&tree, map).unwrap();
        shift_tree(&tree, map).unwrap();
        let shifted = std::fs::symlink_metadata(tree.join("sub/file")).map(|m| (m.uid(), m.gid())).unwrap();
        unshift_tree(&tree, map).unwrap();
        use std::os::unix::fs::MetadataExt;
        let ids = |p: &str| {
            let m = std::fs::symlink_metadata(tree.join(p)).unwrap();
            (m.uid(), m.gid())
        };
        let got = (ids(""), ids("sub"), ids("sub/file"), ids("sub/link"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(got, ((1000, 1000), (1000, 1000), (0, 0), (1000, 1000)));
        assert_eq!(shifted, (map.host_base, map.host_base), "ids the host wrote are shifted in whole");
    }
}
