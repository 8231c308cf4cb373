//! The native backend: Linux namespaces, cgroups, seccomp and a reduced capability set, set up by the agent
//! itself (`compute-agent init`) on the host.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::process::Stdio;

use compute_agent_protocol::BootConfig;

use super::{Backend, Launch};
use crate::cgroup::{Cgroup, Limits};
use crate::userns::detached_clone;
use crate::{Isolation, RuntimeConfig, RuntimeError};

/// Linux namespaces.
pub struct Native;

/// The first descriptor number the agent inherits beyond stdio.
const FIRST_PASSED_FD: i32 = 3;
/// Descriptors are staged at or above this number before being moved into place, so that moving one never
/// overwrites another still to be moved.
const STAGING_FD: i32 = 256;

impl Backend for Native {
    fn isolation(&self) -> Isolation {
        Isolation::Native
    }

    fn check(&self, _config: &RuntimeConfig) -> Result<(), RuntimeError> {
        Ok(())
    }

    fn create_cgroup(&self, cgroup: &Cgroup, limits: &Limits) -> Result<(), RuntimeError> {
        cgroup.create(limits)
    }

    fn launch(&self, l: Launch<'_>) -> Result<tokio::process::Child, RuntimeError> {
        // Descriptors the agent inherits, in order from FIRST_PASSED_FD: the user namespace, then one id-mapped
        // mount per bind that could be made.
        let mut passed: Vec<OwnedFd> = Vec::new();
        let mut pass = |fd: &dyn AsFd| -> Result<i32, RuntimeError> {
            if FIRST_PASSED_FD + passed.len() as i32 >= STAGING_FD {
                return Err(RuntimeError::Unsupported(format!(
                    "a sandbox takes at most {} mounts",
                    STAGING_FD - FIRST_PASSED_FD - 1
                )));
            }
            let staged = nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(STAGING_FD))
                .map_err(|e| RuntimeError::io("passing a descriptor to the agent", e.into()))?;
            // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing else owns.
            passed.push(unsafe { std::os::fd::FromRawFd::from_raw_fd(staged) });
            Ok(FIRST_PASSED_FD + passed.len() as i32 - 1)
        };
        let mut userns_fd = None;
        let mut bind_fds = Vec::new();
        if let Some(ns) = l.userns {
            userns_fd = Some(pass(&ns.fd())?);
            // Binds are cloned here, by host root: the sandbox's root may not even be able to reach their paths.
            for (src, dst, read_only) in l.binds {
                let tree = ns.idmapped_clone(Path::new(src), *read_only).or_else(|e| {
                    // A filesystem that cannot be id-mapped is bound as it is: its files show as nobody's inside.
                    tracing::warn!(sandbox = %l.spec.id, source = %src, target = %dst, error = %e,
                        "this bind cannot be id-mapped: its files show as owned by nobody in the sandbox");
                    detached_clone(Path::new(src), *read_only, None)
                });
                let tree = tree.map_err(|e| RuntimeError::io(format!("cloning the mount at {src}"), e))?;
                bind_fds.push(Some(pass(&tree)?));
            }
        }
        let boot = BootConfig {
            rootfs: l.rootfs.merged.to_string_lossy().into_owned(),
            hostname: l.spec.hostname.clone(),
            netns: Some(l.net.netns_path().to_string_lossy().into_owned()),
            cgroup_procs: l.cgroup.procs_files(),
            workload_cgroup_procs: l.cgroup.workload().procs_files(),
            binds: l.binds.to_vec(),
            bind_fds,
            userns_fd,
            harden: true,
            env: l.spec.env.clone(),
            workdir: l.spec.workdir.clone(),
            entrypoint: l.entrypoint,
            user: l.spec.user.clone(),
        };
        let boot_path = l.dir.join("boot.json");
        std::fs::write(&boot_path, serde_json::to_vec(&boot).expect("boot config serializes"))
            .map_err(|e| RuntimeError::io("writing boot.json", e))?;
        // The config goes to the agent as a descriptor and the agent is named plainly, so that its command line,
        // which the sandbox can read (/proc/1/cmdline), holds no host path.
        let boot_file = std::fs::File::open(&boot_path).map_err(|e| RuntimeError::io("opening boot.json", e))?;
        let boot_fd = pass(&boot_file)?;
        let mut command = tokio::process::Command::new(&l.config.agent_bin);
        command.arg0("compute-agent").arg("init").arg(format!("fd:{boot_fd}"));
        command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(l.stderr);
        let raw: Vec<i32> = passed.iter().map(|fd| fd.as_raw_fd()).collect();
        if !raw.is_empty() {
            // SAFETY: runs in the forked child before exec and only calls dup2, which is async-signal-safe. Every
            // source is at or above STAGING_FD and every target below it, so no dup2 overwrites a source.
            unsafe {
                command.pre_exec(move || {
                    for (i, fd) in raw.iter().enumerate() {
                        if libc::dup2(*fd, FIRST_PASSED_FD + i as i32) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        let child = command
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| RuntimeError::io(format!("starting {}", l.config.agent_bin.display()), e));
        drop(passed);
        child
    }

    fn forget(&self, _config: &RuntimeConfig, _id: &str) {}
}
