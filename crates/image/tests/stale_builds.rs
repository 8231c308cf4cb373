//! A base build a crash interrupted (mmdebstrap killed with /proc and friends mounted in its chroot) is unmounted
//! and removed when the store opens again; a build of a live process is left alone.

use std::path::Path;

use compute_image::{ImageStore, Mirror, StoreOptions};

fn mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines().any(|l| l.split(' ').nth(4) == Some(path.to_str().unwrap()))
}

#[test]
fn interrupted_base_builds_are_unmounted_and_removed() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let euid = status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|v| v.split_whitespace().nth(1));
    if euid != Some("0") {
        eprintln!("SKIPPED LOUDLY: this test mounts a tmpfs and needs root (CI runs as root)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    // A pid that is not running: the build is dead.
    let dead = base.join("python-3.13-trixie.building-999999999");
    let proc_dir = dead.join("rootfs/proc");
    std::fs::create_dir_all(&proc_dir).unwrap();
    nix::mount::mount(Some("tmpfs"), &proc_dir, Some("tmpfs"), nix::mount::MsFlags::empty(), None::<&str>).unwrap();
    std::fs::write(proc_dir.join("stat"), b"x").unwrap();
    // A build of a running process (pid 1 always runs) is someone's work in progress.
    let live = base.join("python-3.14-sid.building-1");
    std::fs::create_dir_all(live.join("rootfs")).unwrap();

    let options = StoreOptions {
        debian_mirror: Some(Mirror { uri: "http://unused.invalid/debian".into() }),
        ..StoreOptions::default()
    };
    let _store = ImageStore::new(dir.path(), options).unwrap();
    assert!(!mounted(&proc_dir), "the leftover mount is gone");
    assert!(!dead.exists(), "the interrupted build is removed");
    assert!(live.exists(), "a build whose process runs is left alone");
}
