//! Root filesystems: read-only image layers stacked with overlayfs under a per-sandbox writable layer that
//! lives on a size-capped tmpfs (so a disk-filling loop hits the cap, and the pages count against the
//! sandbox's memory limit), all removed with the sandbox.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::RuntimeError;

/// Paths of one sandbox's root filesystem.
#[derive(Debug, Clone)]
pub struct Rootfs {
    /// The tmpfs that holds the writable layer.
    pub rw: PathBuf,
    /// The merged root.
    pub merged: PathBuf,
}

impl Rootfs {
    /// The layout under a sandbox's directory.
    pub fn under(dir: &Path) -> Self {
        Self { rw: dir.join("rw"), merged: dir.join("rootfs") }
    }

    /// Mounts `layers` (top first) with a writable layer capped at `disk_bytes`.
    pub fn mount(&self, layers: &[PathBuf], disk_bytes: u64, keep_upper: Option<&Path>) -> Result<(), RuntimeError> {
        if layers.is_empty() {
            return Err(RuntimeError::Unsupported("an image needs at least one layer".into()));
        }
        for d in [&self.rw, &self.merged] {
            std::fs::create_dir_all(d).map_err(|e| RuntimeError::io(format!("creating {}", d.display()), e))?;
        }
        let (upper, work) = match keep_upper {
            // An image build: the writable layer is the new image layer, on disk, kept after the sandbox.
            Some(dir) => (dir.to_path_buf(), dir.with_extension("work")),
            None => {
                mount(
                    Some("tmpfs"),
                    &self.rw,
                    Some("tmpfs"),
                    MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                    Some(format!("size={disk_bytes},mode=755").as_str()),
                )
                .map_err(|e| RuntimeError::io("mounting the writable layer's tmpfs", e.into()))?;
                (self.rw.join("upper"), self.rw.join("work"))
            }
        };
        for d in [&upper, &work] {
            std::fs::create_dir_all(d).map_err(|e| RuntimeError::io(format!("creating {}", d.display()), e))?;
        }
        let lower = layers.iter().map(|l| l.to_string_lossy().into_owned()).collect::<Vec<_>>().join(":");
        let opts = format!("lowerdir={lower},upperdir={},workdir={}", upper.display(), work.display());
        if opts.len() < LEGACY_OPTIONS_MAX {
            mount(Some("overlay"), &self.merged, Some("overlay"), MsFlags::empty(), Some(opts.as_str()))
                .map_err(|e| RuntimeError::io(format!("mounting the overlay root filesystem ({opts})"), e.into()))?;
        } else {
            // Too many layers for mount(2)'s one page of options: the new mount API takes them one at a time.
            mount_many_layers(layers, &upper, &work, &self.merged).map_err(|e| {
                RuntimeError::io(
                    format!(
                        "mounting the overlay root filesystem of {} layers (kernel 6.8 or newer needed)",
                        layers.len()
                    ),
                    e,
                )
            })?;
        }
        Ok(())
    }
}

/// mount(2) copies its options into one page; longer layer lists go through `fsconfig`.
const LEGACY_OPTIONS_MAX: usize = 4000;

/// Mounts an overlay of `layers` (top first) at `target` with the new mount API, one `lowerdir+` per layer (Linux
/// 6.8+), which has no limit on the length of the whole list.
fn mount_many_layers(layers: &[PathBuf], upper: &Path, work: &Path, target: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    // From linux/mount.h.
    const FSOPEN_CLOEXEC: libc::c_uint = 0x1;
    const FSCONFIG_SET_STRING: libc::c_uint = 1;
    const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
    const FSMOUNT_CLOEXEC: libc::c_uint = 0x1;
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(|_| std::io::Error::other("a path holds NUL"));
    let check = |r: libc::c_long| if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(r) };
    // SAFETY: fsopen reads a NUL-terminated string that outlives the call; the fd it returns is owned here.
    let fs = unsafe {
        OwnedFd::from_raw_fd(check(libc::syscall(libc::SYS_fsopen, c"overlay".as_ptr(), FSOPEN_CLOEXEC))? as i32)
    };
    let set = |key: &std::ffi::CStr, value: &CString| {
        // SAFETY: fsconfig reads two NUL-terminated strings that outlive the call, on an fd we own.
        check(unsafe {
            libc::syscall(libc::SYS_fsconfig, fs.as_raw_fd(), FSCONFIG_SET_STRING, key.as_ptr(), value.as_ptr(), 0)
        })
    };
    for layer in layers {
        set(c"lowerdir+", &c(layer)?)?;
    }
    set(c"upperdir", &c(upper)?)?;
    set(c"workdir", &c(work)?)?;
    // SAFETY: FSCONFIG_CMD_CREATE takes no pointers.
    check(unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        )
    })?;
    // SAFETY: fsmount takes our fs context fd and returns a mount fd, owned here.
    let mnt = unsafe {
        OwnedFd::from_raw_fd(check(libc::syscall(libc::SYS_fsmount, fs.as_raw_fd(), FSMOUNT_CLOEXEC, 0))? as i32)
    };
    let target = c(target)?;
    // SAFETY: move_mount reads two NUL-terminated strings that outlive the call; the fds are ours.
    check(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mnt.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    })?;
    Ok(())
}

/// Unmounts every mount at or below `path` (deepest first).
pub fn unmount_all(path: &Path) -> Result<(), RuntimeError> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let prefix = path.to_string_lossy().into_owned();
    let mut targets: Vec<String> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape)
        .filter(|t| t == &prefix || t.starts_with(&format!("{prefix}/")))
        .collect();
    targets.sort_by_key(|t| std::cmp::Reverse(t.len()));
    for t in targets {
        if let Err(e) = umount2(t.as_str(), MntFlags::empty()) {
            match umount2(t.as_str(), MntFlags::MNT_DETACH) {
                // EINVAL: no longer a mount point (gone with its parent, or unmounted meanwhile).
                Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
                Err(e2) => return Err(RuntimeError::io(format!("unmounting {t} ({e})"), e2.into())),
            }
        }
    }
    Ok(())
}

fn unescape(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v as char);
            i += 4;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_layers_than_one_page_of_mount_options_still_mount() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: mounting an overlay needs root");
            return;
        }
        let dir = std::env::temp_dir().join(format!("compute-rootfs-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // 80 layers with store-like names: far more than 4096 bytes of lowerdir.
        let layers: Vec<PathBuf> = (0..80)
            .map(|i| {
                let d = dir.join("layers").join(format!("oci-{i:064x}")).join("diff");
                std::fs::create_dir_all(&d).unwrap();
                std::fs::write(d.join(format!("f{i}")), b"x").unwrap();
                std::fs::write(d.join("shared"), format!("{i}")).unwrap();
                d
            })
            .collect();
        let rootfs = Rootfs::under(&dir.join("sandbox"));
        rootfs.mount(&layers, 16 << 20, None).unwrap();
        let seen = (0..80).filter(|i| rootfs.merged.join(format!("f{i}")).exists()).count();
        let top = std::fs::read_to_string(rootfs.merged.join("shared")).unwrap();
        unmount_all(&dir.join("sandbox")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(seen, 80, "every layer is visible");
        assert_eq!(top, "0", "the first layer is the top one");
    }
}
