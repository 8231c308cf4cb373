//! Under gVisor, processes of images with a recent glibc get `libcompute_statx.so` preloaded (crate
//! `compute-statx-shim`): runsc 2024-07's `statx` never reports a mount id, without which systemd 256+ (and with it
//! every `apt-get install` that pulls systemd in) fails. The library sits next to the agent binary; the sandbox
//! sees it at [`PATH_INSIDE`] and every process it starts has it in `LD_PRELOAD`.

use std::path::{Path, PathBuf};

/// Where the sandbox sees the library.
pub const PATH_INSIDE: &str = "/.compute/statx/libcompute_statx.so";

/// The file name of the library, next to the agent binary.
const FILE_NAME: &str = "libcompute_statx.so";

/// The oldest glibc the library loads into (the newest symbol version it links against is GLIBC_2.34); an image
/// with an older one, or with another libc (musl), does not get it.
const GLIBC_MIN: (u32, u32) = (2, 34);

/// Where glibc's `libc.so.6` is in the images that have one.
const LIBC_PATHS: &[&str] = &[
    "usr/lib/x86_64-linux-gnu/libc.so.6",
    "lib/x86_64-linux-gnu/libc.so.6",
    "usr/lib/aarch64-linux-gnu/libc.so.6",
    "lib/aarch64-linux-gnu/libc.so.6",
    "usr/lib64/libc.so.6",
    "lib64/libc.so.6",
];

/// The library to preload into a sandbox over `rootfs`, if it is installed and the image's glibc can load it.
pub fn for_rootfs(agent_bin: &Path, rootfs: &Path) -> Option<PathBuf> {
    let shim = agent_bin.with_file_name(FILE_NAME);
    if !shim.is_file() {
        tracing::debug!(path = %shim.display(), "no statx shim next to the agent: systemd 256+ fails under gVisor");
        return None;
    }
    let version = LIBC_PATHS.iter().find_map(|p| std::fs::read(rootfs.join(p)).ok().and_then(|b| glibc_version(&b)))?;
    (version >= GLIBC_MIN).then_some(shim)
}

/// glibc's version from its `libc.so.6` ("... release version 2.36."), if it is glibc.
pub fn glibc_version(libc: &[u8]) -> Option<(u32, u32)> {
    let marker = b"release version ";
    let at = libc.windows(marker.len()).position(|w| w == marker)? + marker.len();
    let text: String =
        libc[at..].iter().take(16).take_while(|b| b.is_ascii_digit() || **b == b'.').map(|b| *b as char).collect();
    let mut parts = text.split('.').filter(|p| !p.is_empty()).map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}

/// Adds the library to an environment's `LD_PRELOAD`, before whatever the image or spec put there.
pub fn preload(env: &mut Vec<(String, String)>) {
    match env.iter_mut().find(|(k, _)| k == "LD_PRELOAD") {
        Some((_, v)) if v.split([':', ' ']).any(|p| p == PATH_INSIDE) => {}
        Some((_, v)) if !v.is_empty() => *v = format!("{PATH_INSIDE}:{v}"),
        Some((_, v)) => *v = PATH_INSIDE.to_string(),
        None => env.push(("LD_PRELOAD".into(), PATH_INSIDE.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_glibc_version_is_read_from_the_library_and_other_libcs_have_none() {
        let bin = b"\x7fELF...GNU C Library (Debian GLIBC 2.43-7) stable release version 2.43.\n...";
        assert_eq!(glibc_version(bin), Some((2, 43)));
        assert_eq!(glibc_version(b"release version 2.17, by Roland"), Some((2, 17)));
        assert_eq!(glibc_version(b"musl libc (x86_64) Version 1.2.5"), None);
        assert!((2, 36) >= GLIBC_MIN && (2, 17) < GLIBC_MIN);
        // This machine's own glibc reads.
        let host = LIBC_PATHS.iter().find_map(|p| std::fs::read(Path::new("/").join(p)).ok());
        if let Some(host) = host {
            assert!(glibc_version(&host).is_some(), "the host's libc.so.6 names its version");
        }
    }

    #[test]
    fn the_library_goes_first_in_ld_preload_once() {
        let mut env = vec![("PATH".to_string(), "/bin".to_string())];
        preload(&mut env);
        assert_eq!(env[1], ("LD_PRELOAD".into(), PATH_INSIDE.into()));
        preload(&mut env);
        assert_eq!(env.len(), 2);
        let mut theirs = vec![("LD_PRELOAD".to_string(), "/usr/lib/libjemalloc.so".to_string())];
        preload(&mut theirs);
        assert_eq!(theirs[0].1, format!("{PATH_INSIDE}:/usr/lib/libjemalloc.so"));
    }
}
