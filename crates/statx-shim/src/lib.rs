//! `libcompute_statx.so`: preloaded into the processes of gVisor sandboxes whose image uses glibc.
//!
//! gVisor's `statx` (runsc 2024-07, the newest build Debian ships) never reports `STATX_MNT_ID` or
//! `STATX_MNT_ID_UNIQUE`. systemd 256 and later (Debian sid's, and so `python:3.14-slim-trixie` here) needs the
//! mount id to tell mount points apart and fails with EUNATCH, "Protocol driver not attached", when it is missing:
//! `systemd-machine-id-setup`, `systemctl enable` and with them the systemd package's postinst fail, and so does
//! every `apt-get install` that pulls systemd in (`openssh-client` does), the SDK's `Image.sandbox()` included.
//!
//! This library wraps glibc's `statx`: when the caller asked for a mount id and the kernel gave none, it fills a
//! stand-in, the same for every file of one filesystem (from its device number) and different between
//! filesystems, and says it did. That is what the callers compare mount ids for (is this the root, is this a mount
//! point). Everything else is the kernel's answer, unchanged.

use std::os::raw::{c_char, c_int, c_uint};

/// `STATX_MNT_ID` (Linux 5.8).
const STATX_MNT_ID: u32 = 0x1000;
/// `STATX_MNT_ID_UNIQUE` (Linux 6.8).
const STATX_MNT_ID_UNIQUE: u32 = 0x4000;

/// glibc's `statx(2)` wrapper, with a mount id filled in where the kernel left it out.
///
/// # Safety
/// The contract of `statx(2)`: `path` is a NUL-terminated string and `buf` points to writable memory for one
/// `struct statx`; both are passed to the kernel unchanged, which checks them.
#[no_mangle]
pub unsafe extern "C" fn statx(
    dirfd: c_int,
    path: *const c_char,
    flags: c_int,
    mask: c_uint,
    buf: *mut libc::statx,
) -> c_int {
    // SAFETY: the caller's arguments go to the kernel as they are (see the contract above); it validates them and
    // reports a bad pointer as EFAULT, through errno as glibc's wrapper would.
    let r = unsafe { libc::syscall(libc::SYS_statx, dirfd, path, flags, mask, buf) } as c_int;
    if r == 0 && !buf.is_null() {
        // SAFETY: the call succeeded, so the kernel filled `*buf`, which the caller owns for the duration.
        fill_mount_id(mask, unsafe { &mut *buf });
    }
    r
}

/// Fills the mount id the caller asked for when the kernel did not report one.
pub fn fill_mount_id(mask: u32, st: &mut libc::statx) {
    let wanted = mask & (STATX_MNT_ID | STATX_MNT_ID_UNIQUE);
    if wanted == 0 || st.stx_mask & wanted == wanted {
        return;
    }
    st.stx_mnt_id = ((u64::from(st.stx_dev_major) << 32) | u64::from(st.stx_dev_minor)) + 1;
    st.stx_mask |= wanted;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(path: &str, mask: u32) -> libc::statx {
        let c = std::ffi::CString::new(path).unwrap();
        // SAFETY: an all-zero statx is a valid value of the plain C struct.
        let mut st: libc::statx = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is NUL-terminated and outlives the call; `st` is a writable statx.
        let r = unsafe { statx(libc::AT_FDCWD, c.as_ptr(), 0, mask, &mut st) };
        assert_eq!(r, 0, "statx {path}: {}", std::io::Error::last_os_error());
        st
    }

    #[test]
    fn a_requested_mount_id_is_always_reported_and_the_rest_is_the_kernels() {
        let st = stat("/", STATX_MNT_ID | libc::STATX_INO);
        assert_ne!(st.stx_mask & STATX_MNT_ID, 0);
        assert_ne!(st.stx_mnt_id, 0);
        assert_ne!(st.stx_mask & libc::STATX_INO, 0);
        let again = stat("/", STATX_MNT_ID);
        assert_eq!(again.stx_mnt_id, st.stx_mnt_id, "stable for one file");
    }

    #[test]
    fn a_stand_in_is_one_per_filesystem_and_only_where_the_kernel_gave_none() {
        // SAFETY: all-zero is a valid statx.
        let mut a: libc::statx = unsafe { std::mem::zeroed() };
        a.stx_dev_major = 0;
        a.stx_dev_minor = 42;
        let mut b = a;
        fill_mount_id(STATX_MNT_ID, &mut a);
        fill_mount_id(STATX_MNT_ID, &mut b);
        assert_eq!(a.stx_mnt_id, b.stx_mnt_id);
        let mut other = b;
        other.stx_dev_minor = 43;
        other.stx_mask = 0;
        fill_mount_id(STATX_MNT_ID_UNIQUE, &mut other);
        assert_ne!(other.stx_mnt_id, a.stx_mnt_id);
        assert_eq!(other.stx_mask, STATX_MNT_ID_UNIQUE);
        let mut kernel = b;
        kernel.stx_mask = STATX_MNT_ID;
        kernel.stx_mnt_id = 7;
        fill_mount_id(STATX_MNT_ID, &mut kernel);
        assert_eq!(kernel.stx_mnt_id, 7, "the kernel's own answer stays");
        let mut unasked = b;
        unasked.stx_mask = 0;
        fill_mount_id(libc::STATX_SIZE, &mut unasked);
        assert_eq!(unasked.stx_mask, 0, "nothing added that was not asked for");
    }
}
