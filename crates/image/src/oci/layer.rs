//! Unpacking one layer tarball (plain, gzip or zstd) into a directory overlayfs can stack: OCI whiteouts become
//! overlayfs whiteouts (`.wh.NAME` → a 0/0 character device, `.wh..wh..opq` → the `trusted.overlay.opaque`
//! xattr), and the uncompressed stream's digest is checked against the image config's `diff_id`.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// What unpacking a layer found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Unpacked {
    /// Entries written.
    pub entries: u64,
    /// Bytes of the uncompressed tar stream.
    pub tar_bytes: u64,
}

/// Unpacks the layer blob at `blob` into `dest` (which exists and is empty). `diff_id` (`sha256:…`), when
/// given, must be the digest of the uncompressed tar stream.
pub fn unpack(blob: &Path, diff_id: Option<&str>, dest: &Path) -> Result<Unpacked, String> {
    let mut file = BufReader::with_capacity(1 << 20, File::open(blob).map_err(|e| format!("opening the layer: {e}"))?);
    let magic = {
        use std::io::BufRead;
        file.fill_buf().map_err(|e| format!("reading the layer: {e}"))?.get(..4).map(<[u8]>::to_vec).unwrap_or_default()
    };
    let decoded: Box<dyn Read> = if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(file))
    } else if magic == [0x28, 0xb5, 0x2f, 0xfd] {
        Box::new(
            ruzstd::decoding::StreamingDecoder::new(file)
                .map_err(|e| format!("reading the layer's zstd header: {e}"))?,
        )
    } else {
        Box::new(file)
    };
    let mut archive = tar::Archive::new(Hashing { inner: decoded, hasher: Sha256::new() });
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(true);
    archive.set_overwrite(true);
    let mut done = Unpacked::default();
    for entry in archive.entries().map_err(|e| format!("reading the layer's tar stream: {e}"))? {
        let mut entry = entry.map_err(|e| format!("reading the layer's tar stream: {e}"))?;
        let raw = entry.path().map_err(|e| format!("a tar entry's path: {e}"))?.into_owned();
        let Some(rel) = clean(&raw) else {
            return Err(format!("the layer has an entry outside its root: {}", raw.display()));
        };
        let name = rel.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            let parent = dest.join(rel.parent().unwrap_or(Path::new("")));
            std::fs::create_dir_all(&parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
            inside(dest, &parent)?;
            if name == OPAQUE_MARKER {
                xattr_set(&parent, "trusted.overlay.opaque", b"y")?;
            } else {
                let target = parent.join(hidden);
                let _ = std::fs::remove_dir_all(&target).or_else(|_| std::fs::remove_file(&target));
                mknod(&target, nix::sys::stat::SFlag::S_IFCHR, 0, 0, 0)?;
            }
            done.entries += 1;
            continue;
        }
        let kind = entry.header().entry_type();
        let special = match kind {
            tar::EntryType::Char => Some(nix::sys::stat::SFlag::S_IFCHR),
            tar::EntryType::Block => Some(nix::sys::stat::SFlag::S_IFBLK),
            tar::EntryType::Fifo => Some(nix::sys::stat::SFlag::S_IFIFO),
            _ => None,
        };
        if let Some(kind) = special {
            // tar-rs would write these as empty regular files.
            let target = dest.join(&rel);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
                inside(dest, parent)?;
            }
            let _ = std::fs::remove_file(&target);
            let h = entry.header();
            let major = h.device_major().ok().flatten().unwrap_or(0);
            let minor = h.device_minor().ok().flatten().unwrap_or(0);
            let mode = h.mode().unwrap_or(0o644) & 0o7777;
            mknod(&target, kind, mode, major, minor)?;
            let (uid, gid) = (h.uid().unwrap_or(0) as u32, h.gid().unwrap_or(0) as u32);
            std::os::unix::fs::lchown(&target, Some(uid), Some(gid))
                .map_err(|e| format!("chown {}: {e}", target.display()))?;
            done.entries += 1;
            continue;
        }
        entry.unpack_in(dest).map_err(|e| format!("unpacking {}: {}", raw.display(), chain(&e)))?;
        done.entries += 1;
    }
    let mut reader = archive.into_inner();
    // The digest covers the whole stream, including the end-of-archive padding after the last entry.
    std::io::copy(&mut reader, &mut std::io::sink()).map_err(|e| format!("reading the layer's end: {e}"))?;
    let digest = format!("sha256:{}", hex(&reader.hasher.finalize()));
    if let Some(want) = diff_id {
        if digest != want {
            return Err(format!(
                "the layer's uncompressed content has digest {digest}, but the image config says {want}"
            ));
        }
    }
    Ok(done)
}

/// An error with its causes (tar-rs puts the OS error in the source).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(&format!(": {c}"));
        cause = c.source();
    }
    out
}

/// `path` relative to the layer root with `.` removed, or `None` if it climbs out with `..`.
fn clean(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
            Component::ParentDir => return None,
        }
    }
    Some(out)
}

/// Refuses a directory that a symlink in the layer led outside `root`.
fn inside(root: &Path, dir: &Path) -> Result<(), String> {
    let real = dir.canonicalize().map_err(|e| format!("resolving {}: {e}", dir.display()))?;
    let root = root.canonicalize().map_err(|e| format!("resolving {}: {e}", root.display()))?;
    if real.starts_with(&root) {
        Ok(())
    } else {
        Err(format!("the layer writes through a link that leaves its root: {}", dir.display()))
    }
}

fn mknod(path: &Path, kind: nix::sys::stat::SFlag, mode: u32, major: u32, minor: u32) -> Result<(), String> {
    let dev = nix::sys::stat::makedev(major.into(), minor.into());
    nix::sys::stat::mknod(path, kind, nix::sys::stat::Mode::from_bits_truncate(mode), dev)
        .map_err(|e| format!("creating {} (needs root): {e}", path.display()))
}

fn xattr_set(path: &Path, name: &str, value: &[u8]) -> Result<(), String> {
    xattr::set(path, name, value).map_err(|e| format!("setting {name} on {} (needs root): {e}", path.display()))
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            if path.ends_with('/') {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
            } else {
                h.set_mode(0o644);
                h.set_size(data.len() as u64);
            }
            if path.contains("..") {
                // Builder refuses such names; a hostile layer would not.
                h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
                h.set_cksum();
                b.append(&h, *data).unwrap();
            } else {
                b.append_data(&mut h, path, *data).unwrap();
            }
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn whiteouts_become_overlayfs_whiteouts_and_the_diff_id_is_checked() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: whiteouts need root (mknod, trusted.* xattrs)");
            return;
        }
        use std::io::Write;
        let tar = layer(&[("a/", b""), ("a/x", b"hello"), ("a/.wh.gone", b""), ("b/", b""), ("b/.wh..wh..opq", b"")]);
        let diff_id = format!("sha256:{}", hex(&Sha256::digest(&tar)));
        let dir = tempfile::tempdir().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        std::fs::write(dir.path().join("blob"), gz.finish().unwrap()).unwrap();
        let dest = dir.path().join("root");
        std::fs::create_dir(&dest).unwrap();
        let done = unpack(&dir.path().join("blob"), Some(&diff_id), &dest).unwrap();
        assert_eq!(done.entries, 5);
        assert_eq!(std::fs::read(dest.join("a/x")).unwrap(), b"hello");
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let gone = std::fs::symlink_metadata(dest.join("a/gone")).unwrap();
        assert!(gone.file_type().is_char_device() && gone.rdev() == 0, "a whiteout is a 0/0 character device");
        assert_eq!(xattr::get(dest.join("b"), "trusted.overlay.opaque").unwrap().as_deref(), Some(&b"y"[..]));

        let other = tempfile::tempdir().unwrap();
        let wrong = format!("sha256:{}", "0".repeat(64));
        let err = unpack(&dir.path().join("blob"), Some(&wrong), other.path()).unwrap_err();
        assert!(err.contains("uncompressed content has digest"), "{err}");

        let escape = layer(&[("../evil", b"x")]);
        std::fs::write(dir.path().join("evil"), escape).unwrap();
        let third = tempfile::tempdir().unwrap();
        assert!(unpack(&dir.path().join("evil"), None, third.path()).is_err());
    }

    #[test]
    fn paths_stay_inside() {
        assert_eq!(clean(Path::new("./usr/bin/x")).unwrap(), PathBuf::from("usr/bin/x"));
        assert_eq!(clean(Path::new("/etc/passwd")).unwrap(), PathBuf::from("etc/passwd"));
        assert!(clean(Path::new("a/../../etc")).is_none());
    }
}
