//! `compute-agent init`: turn a host process into the PID 1 of a new sandbox (native backend).

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use compute_agent_protocol::BootConfig;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult};

use crate::server::{self, Sandbox};

fn io_err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("{what}: {e}"))
}

/// Reads the boot config from the descriptor the runtime passed (`fd:N`), closing it.
fn read_config_fd(fd: &str) -> std::io::Result<BootConfig> {
    use std::io::Read;
    use std::os::fd::FromRawFd;
    let n: i32 = fd.parse().map_err(|e| io_err(format!("config descriptor {fd:?}"), e))?;
    if n < 3 {
        return Err(std::io::Error::other(format!("config descriptor {n} is one of stdin, stdout or stderr")));
    }
    // SAFETY: the runtime passes this descriptor, open for reading, to the agent alone; nothing else in this
    // process refers to it, and the File closes it once read.
    let mut file = unsafe { std::fs::File::from_raw_fd(n) };
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(|e| io_err("reading the boot config", e))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("boot config: {e}")))
}

/// Sets the sandbox up and serves; returns the exit code of the sandbox's PID 1.
pub fn init(config: &str) -> std::io::Result<u8> {
    let cfg: BootConfig = match config.strip_prefix("fd:") {
        Some(fd) => read_config_fd(fd)?,
        None => crate::read_config(config)?,
    };
    // Cgroups first, so that everything below (and every descendant) is accounted and limited. Files are
    // opened now, while the host paths are reachable: every started process writes itself into the workload
    // cgroup, and the agent returns to the sandbox cgroup after creating its cgroup namespace there.
    let open_all = |files: &[String]| -> std::io::Result<Vec<std::os::fd::OwnedFd>> {
        files
            .iter()
            .map(|p| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(p)
                    .map(std::os::fd::OwnedFd::from)
                    .map_err(|e| io_err(format!("opening cgroup {p}"), e))
            })
            .collect()
    };
    let outer = open_all(&cfg.cgroup_procs)?;
    let workload = open_all(&cfg.workload_cgroup_procs)?;
    join(&outer)?;
    // The cgroup namespace is rooted where the caller is: in the workload cgroup, so that programs see their
    // own limits at /sys/fs/cgroup.
    if !workload.is_empty() {
        join(&workload)?;
    }
    crate::process::set_workload_cgroups(workload);
    match &cfg.netns {
        Some(path) => {
            let ns = File::open(path).map_err(|e| io_err(format!("opening network namespace {path}"), e))?;
            setns(ns, CloneFlags::CLONE_NEWNET).map_err(|e| io_err("joining the network namespace", e))?;
        }
        None => unshare(CloneFlags::CLONE_NEWNET).map_err(|e| io_err("creating a network namespace", e))?,
    }
    // Enter the root filesystem while its host path is still searchable: the working directory follows into the
    // namespaces made below, where the sandbox's root may not be allowed to walk that path.
    std::env::set_current_dir(&cfg.rootfs).map_err(|e| io_err(format!("entering {}", cfg.rootfs), e))?;
    // SAFETY: the runtime passed these descriptors for this process alone to own (see `bind_fds`, `userns_fd`).
    let take = |fd: i32| unsafe { OwnedFd::from_raw_fd(fd) };
    let userns = cfg.userns_fd.map(take);
    let mut prepared = Prepared { sysfs: None, binds: cfg.bind_fds.iter().map(|fd| fd.map(take)).collect() };
    if let Some(ns) = &userns {
        // Everything that needs host root happens before the sandbox becomes its own user namespace's root.
        open_network_to_root();
        prepared.sysfs = Some(detached_sysfs()?);
        become_root_of(ns)?;
    }
    drop(userns);
    let flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWCGROUP;
    unshare(flags).map_err(|e| io_err("creating namespaces", e))?;

    // SAFETY: single-threaded so far (no thread has been spawned in this process), so fork is sound.
    match unsafe { fork() }.map_err(|e| io_err("fork", e))? {
        ForkResult::Parent { child } => {
            drop(prepared);
            let _ = join(&outer);
            // Stage 0 stays outside the PID namespace only to report PID 1's exit to the runtime.
            loop {
                match waitpid(child, None) {
                    Ok(WaitStatus::Exited(_, code)) => return Ok(code as u8),
                    Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as u8),
                    Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(io_err("waiting for the sandbox", e)),
                }
            }
        }
        ForkResult::Child => {
            if let Err(e) = join(&outer) {
                eprintln!("compute-agent: returning to the sandbox cgroup: {e}");
                std::process::exit(125);
            }
            drop(outer);
            if let Err(e) = enter_root(&cfg, prepared) {
                eprintln!("compute-agent: setting up the sandbox: {e}");
                std::process::exit(125);
            }
            if cfg.harden {
                if let Err(e) = crate::harden::apply() {
                    eprintln!("compute-agent: hardening the sandbox: {e}");
                    std::process::exit(125);
                }
            }
            let code = server::serve(Sandbox {
                env: cfg.env,
                workdir: cfg.workdir,
                entrypoint: cfg.entrypoint,
                user: cfg.user,
            })?;
            std::process::exit(code.into());
        }
    }
}

/// Moves the calling process into the cgroups whose `cgroup.procs` files are open as `fds` ("0": the caller).
fn join(fds: &[std::os::fd::OwnedFd]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    for fd in fds {
        // SAFETY: writing one byte from a static buffer to a descriptor we own.
        if unsafe { libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) } != 1 {
            return Err(io_err("joining a cgroup", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

fn m(
    src: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> std::io::Result<()> {
    mount(src, target, fstype, flags, data).map_err(|e| io_err(format!("mounting {}", target.display()), e))
}

fn mkdirs(p: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(p).map_err(|e| io_err(format!("creating {}", p.display()), e))
}

/// Gives the sandbox a read-only view of its own cgroups (the cgroup namespace makes them the root), so that
/// programs can see their limits. Mirrors the host's layout: the v2 hierarchy, or each v1 hierarchy.
fn mount_cgroups(target: &Path) {
    let ro = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY;
    let host_v2 = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").is_ok_and(|c| c.contains("memory"));
    if host_v2 {
        let _ = mount(Some("cgroup2"), target, Some("cgroup2"), ro, None::<&str>);
        return;
    }
    if mount(
        Some("tmpfs"),
        target,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=755"),
    )
    .is_err()
    {
        return;
    }
    let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let is_link = e.file_type().map(|t| t.is_symlink()).unwrap_or(true);
        if matches!(name.as_str(), "unified" | "systemd") {
            continue;
        }
        let dir = target.join(&name);
        if is_link {
            if let Ok(dest) = std::fs::read_link(e.path()) {
                let _ = std::os::unix::fs::symlink(dest, &dir);
            }
            continue;
        }
        if std::fs::create_dir_all(&dir).is_ok() {
            let _ = mount(Some("cgroup"), &dir, Some("cgroup"), ro, Some(name.as_str()));
        }
    }
    let _ = mount(None::<&str>, target, None::<&str>, MsFlags::MS_REMOUNT | MsFlags::MS_BIND | ro, None::<&str>);
}

/// Mounts made on the host side for a sandbox in a user namespace, whose root may not make them itself.
struct Prepared {
    /// A read-only sysfs of the sandbox's network namespace (owned by the host's user namespace).
    sysfs: Option<OwnedFd>,
    /// An id-mapped clone per bind, where the runtime could make one.
    binds: Vec<Option<OwnedFd>>,
}

/// Joins user namespace `ns` as its root (uid and gid 0, no supplementary groups): from here on this process
/// and its children are an unprivileged user on the host, with capabilities only over their own namespaces.
fn become_root_of(ns: &OwnedFd) -> std::io::Result<()> {
    setns(ns, CloneFlags::CLONE_NEWUSER).map_err(|e| io_err("joining the user namespace", e))?;
    nix::unistd::setgroups(&[]).map_err(|e| io_err("clearing supplementary groups", e))?;
    let root_gid = nix::unistd::Gid::from_raw(0);
    nix::unistd::setresgid(root_gid, root_gid, root_gid).map_err(|e| io_err("becoming gid 0", e))?;
    let root = nix::unistd::Uid::from_raw(0);
    nix::unistd::setresuid(root, root, root).map_err(|e| io_err("becoming uid 0", e))
}

/// Lets the sandbox's root bind ports below 1024 and open ICMP sockets. The network namespace belongs to the
/// host's user namespace, where the sandbox's root holds no capability: these per-namespace settings grant what
/// CAP_NET_BIND_SERVICE and CAP_NET_RAW would (container engines set the same).
fn open_network_to_root() {
    for (file, value) in [("ip_unprivileged_port_start", "0"), ("ping_group_range", "0 2147483647")] {
        let path = format!("/proc/sys/net/ipv4/{file}");
        if let Err(e) = std::fs::write(&path, value) {
            eprintln!("compute-agent: setting {path}: {e}");
        }
    }
}

/// A sysfs of the current network namespace, mounted read-only and not yet attached anywhere. Mounting sysfs
/// needs privilege over the network namespace's owner, which the sandbox's root lacks.
fn detached_sysfs() -> std::io::Result<OwnedFd> {
    use rustix::mount::{fsconfig_create, fsmount, fsopen, FsMountFlags, FsOpenFlags, MountAttrFlags};
    let fs = fsopen("sysfs", FsOpenFlags::FSOPEN_CLOEXEC).map_err(|e| io_err("opening sysfs", e))?;
    fsconfig_create(&fs).map_err(|e| io_err("creating sysfs", e))?;
    let attrs = MountAttrFlags::MOUNT_ATTR_RDONLY
        | MountAttrFlags::MOUNT_ATTR_NOSUID
        | MountAttrFlags::MOUNT_ATTR_NODEV
        | MountAttrFlags::MOUNT_ATTR_NOEXEC;
    fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, attrs).map_err(|e| io_err("mounting sysfs", e))
}

/// Attaches detached mount `tree` at `target`.
fn attach(tree: OwnedFd, target: &Path) -> std::io::Result<()> {
    use rustix::mount::{move_mount, MoveMountFlags};
    move_mount(&tree, "", rustix::fs::CWD, target, MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH)
        .map_err(|e| io_err(format!("attaching a mount at {}", target.display()), e))
}

/// Mounts the sandbox's pseudo filesystems and binds, then pivots into the root filesystem.
fn enter_root(cfg: &BootConfig, prepared: Prepared) -> std::io::Result<()> {
    // Nothing we mount from here on propagates back to the host.
    m(None, Path::new("/"), None, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None)?;
    // The working directory is the root filesystem (see `init`). Bind it on itself, because pivot_root refuses a
    // mount copied from a more privileged namespace, and step into the new mount through its descriptor.
    {
        use rustix::mount::{move_mount, open_tree, MoveMountFlags, OpenTreeFlags};
        let tree = open_tree(
            rustix::fs::CWD,
            ".",
            OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC | OpenTreeFlags::AT_RECURSIVE,
        )
        .map_err(|e| io_err("cloning the root filesystem's mount", e))?;
        move_mount(&tree, "", rustix::fs::CWD, ".", MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH)
            .map_err(|e| io_err("binding the root filesystem on itself", e))?;
        nix::unistd::fchdir(&tree).map_err(|e| io_err("entering the root filesystem", e))?;
    }
    let root = PathBuf::from(".");

    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mkdirs(&root.join("proc"))?;
    m(Some("proc"), &root.join("proc"), Some("proc"), nosuid_nodev_noexec, None)?;
    mkdirs(&root.join("sys"))?;
    match prepared.sysfs {
        Some(sysfs) => attach(sysfs, &root.join("sys"))?,
        None => m(Some("sysfs"), &root.join("sys"), Some("sysfs"), nosuid_nodev_noexec | MsFlags::MS_RDONLY, None)?,
    }
    mount_cgroups(&root.join("sys/fs/cgroup"));

    let dev = root.join("dev");
    mkdirs(&dev)?;
    m(Some("tmpfs"), &dev, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME, Some("mode=755,size=65536k"))?;
    for name in ["null", "zero", "full", "random", "urandom", "tty"] {
        let target = dev.join(name);
        File::create(&target).map_err(|e| io_err(format!("creating {}", target.display()), e))?;
        m(Some(&format!("/dev/{name}")), &target, None, MsFlags::MS_BIND, None)?;
    }
    mkdirs(&dev.join("pts"))?;
    m(
        Some("devpts"),
        &dev.join("pts"),
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )?;
    std::os::unix::fs::symlink("pts/ptmx", dev.join("ptmx"))?;
    mkdirs(&dev.join("shm"))?;
    m(Some("shm"), &dev.join("shm"), Some("tmpfs"), nosuid_nodev_noexec, Some("mode=1777,size=65536k"))?;
    mkdirs(&dev.join("mqueue"))?;
    let _ = mount(Some("mqueue"), &dev.join("mqueue"), Some("mqueue"), nosuid_nodev_noexec, None::<&str>);
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(link))?;
    }

    let mut ready = prepared.binds.into_iter();
    for (src, dst, read_only) in &cfg.binds {
        let target = root.join(dst.trim_start_matches('/'));
        let tree = ready.next().flatten();
        // A ready-made mount says what it is: in a user namespace the host path may not be reachable.
        let is_dir = match &tree {
            Some(t) => nix::sys::stat::fstat(t)
                .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR)
                .map_err(|e| io_err(format!("inspecting the mount for {dst}"), e))?,
            None => Path::new(src).is_dir(),
        };
        if is_dir {
            mkdirs(&target)?;
        } else {
            if let Some(p) = target.parent() {
                mkdirs(p)?;
            }
            if !target.exists() {
                File::create(&target).map_err(|e| io_err(format!("creating {}", target.display()), e))?;
            }
        }
        if let Some(tree) = tree {
            attach(tree, &target)?;
            continue;
        }
        m(Some(src), &target, None, MsFlags::MS_BIND | MsFlags::MS_REC, None)?;
        if *read_only {
            m(None, &target, None, MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY, None)?;
        }
    }

    nix::unistd::sethostname(&cfg.hostname).map_err(|e| io_err("setting the host name", e))?;

    // pivot_root(".", ".") stacks the old root under the new one; unmounting "." then drops the old root
    // without needing a directory for it inside the image (runc does the same).
    let old_root = File::open("/").map_err(|e| io_err("opening /", e))?;
    let new_root = File::open(&root).map_err(|e| io_err(format!("opening {}", root.display()), e))?;
    nix::unistd::fchdir(&new_root).map_err(|e| io_err("entering the root filesystem", e))?;
    nix::unistd::pivot_root(".", ".").map_err(|e| io_err("pivot_root", e))?;
    nix::unistd::fchdir(&old_root).map_err(|e| io_err("fchdir to the old root", e))?;
    m(None, Path::new("."), None, MsFlags::MS_SLAVE | MsFlags::MS_REC, None)?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| io_err("detaching the host's root", e))?;
    std::env::set_current_dir("/")?;
    drop((old_root, new_root));

    // Hide what a sandbox has no business reading or writing in /proc.
    for masked in ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug", "/proc/sysrq-trigger"] {
        let _ = mount(Some("/dev/null"), masked, None::<&str>, MsFlags::MS_BIND, None::<&str>);
    }
    for ro in ["/proc/sys", "/proc/irq", "/proc/bus", "/proc/fs"] {
        if mount(Some(ro), ro, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>).is_ok() {
            let _ = mount(
                None::<&str>,
                ro,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_REC,
                None::<&str>,
            );
        }
    }
    Ok(())
}
