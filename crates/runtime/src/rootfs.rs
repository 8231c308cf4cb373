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
        mount(Some("overlay"), &self.merged, Some("overlay"), MsFlags::empty(), Some(opts.as_str()))
            .map_err(|e| RuntimeError::io(format!("mounting the overlay root filesystem ({opts})"), e.into()))?;
        Ok(())
    }
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
