//! Root filesystems: read-only image layers stacked with overlayfs under a per-sandbox writable layer that
//! lives on a size-capped tmpfs (so a disk-filling loop hits the cap, and the pages count against the
//! sandbox's memory limit), all removed with the sandbox.

use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::userns::UserNs;
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

    /// Mounts `layers` (top first) with a writable layer capped at `disk_bytes`. With `userns`, the layers are
    /// seen through its id map (see [`crate::userns`]) and the writable layer's root belongs to its root.
    pub fn mount(
        &self,
        layers: &[PathBuf],
        disk_bytes: u64,
        keep_upper: Option<&Path>,
        userns: Option<&UserNs>,
    ) -> Result<(), RuntimeError> {
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
        // The writable layer's ids are stored shifted (see `userns`): the root directory's owner is the layer's, so
        // the sandbox's root must own it to create in `/`, and what a build step put there beforehand (uv_sync's
        // project files) must be the sandbox's too. Shifted back when a build's layer is kept.
        let many = || format!("mounting the overlay root filesystem of {} layers", layers.len());
        if let Some(ns) = userns {
            crate::userns::shift_tree(&upper, ns.map())
                .map_err(|e| RuntimeError::io("giving the writable layer to the sandbox's root", e))?;
            let mapped = layers
                .iter()
                .map(|l| {
                    ns.idmapped_clone(l, true)
                        .map_err(|e| RuntimeError::io(format!("id-mapping image layer {}", l.display()), e))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let lowers: Vec<Lower<'_>> = mapped.iter().map(|fd| Lower::Mount(fd.as_fd())).collect();
            return mount_overlay(&lowers, &upper, &work, &self.merged).map_err(|e| RuntimeError::io(many(), e));
        }
        let lower = layers.iter().map(|l| l.to_string_lossy().into_owned()).collect::<Vec<_>>().join(":");
        let opts = format!("lowerdir={lower},upperdir={},workdir={}", upper.display(), work.display());
        if opts.len() < LEGACY_OPTIONS_MAX {
            mount(Some("overlay"), &self.merged, Some("overlay"), MsFlags::empty(), Some(opts.as_str()))
                .map_err(|e| RuntimeError::io(format!("mounting the overlay root filesystem ({opts})"), e.into()))?;
        } else {
            // Too many layers for mount(2)'s one page of options: the new mount API takes them one at a time.
            let lowers: Vec<Lower<'_>> = layers.iter().map(|l| Lower::Path(l)).collect();
            mount_overlay(&lowers, &upper, &work, &self.merged)
                .map_err(|e| RuntimeError::io(format!("{} (kernel 6.8 or newer needed)", many()), e))?;
        }
        Ok(())
    }
}

/// mount(2) copies its options into one page; longer layer lists go through `fsconfig`.
const LEGACY_OPTIONS_MAX: usize = 4000;

/// One read-only layer of an overlay.
pub(crate) enum Lower<'a> {
    /// A directory.
    Path(&'a Path),
    /// A detached mount (an id-mapped clone of a layer).
    Mount(BorrowedFd<'a>),
}

/// Mounts an overlay of `lowers` (top first) at `target` with the new mount API, one `lowerdir+` per layer (Linux
/// 6.8+), which has no limit on the length of the whole list and takes layers by descriptor (Linux 6.13+).
pub(crate) fn mount_overlay(lowers: &[Lower<'_>], upper: &Path, work: &Path, target: &Path) -> std::io::Result<()> {
    use rustix::mount::{
        fsconfig_create, fsconfig_set_fd, fsconfig_set_string, fsmount, fsopen, move_mount, FsMountFlags, FsOpenFlags,
        MountAttrFlags, MoveMountFlags,
    };
    let fs = fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)?;
    for lower in lowers {
        match lower {
            Lower::Path(p) => fsconfig_set_string(&fs, "lowerdir+", *p)?,
            Lower::Mount(fd) => fsconfig_set_fd(&fs, "lowerdir+", fd)?,
        }
    }
    fsconfig_set_string(&fs, "upperdir", upper)?;
    fsconfig_set_string(&fs, "workdir", work)?;
    fsconfig_create(&fs)?;
    let mnt = fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, MountAttrFlags::empty())?;
    move_mount(&mnt, "", rustix::fs::CWD, target, MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH)?;
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
        rootfs.mount(&layers, 16 << 20, None, None).unwrap();
        let seen = (0..80).filter(|i| rootfs.merged.join(format!("f{i}")).exists()).count();
        let top = std::fs::read_to_string(rootfs.merged.join("shared")).unwrap();
        unmount_all(&dir.join("sandbox")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(seen, 80, "every layer is visible");
        assert_eq!(top, "0", "the first layer is the top one");
    }
}
