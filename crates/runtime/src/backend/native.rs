//! The native backend: Linux namespaces, cgroups, seccomp and a reduced capability set, set up by the agent
//! itself (`compute-agent init`) on the host.

use std::process::Stdio;

use compute_agent_protocol::BootConfig;

use super::{Backend, Launch};
use crate::cgroup::{Cgroup, Limits};
use crate::{Isolation, RuntimeConfig, RuntimeError};

/// Linux namespaces.
pub struct Native;

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
        let boot = BootConfig {
            rootfs: l.rootfs.merged.to_string_lossy().into_owned(),
            hostname: l.spec.hostname.clone(),
            netns: Some(l.net.netns_path().to_string_lossy().into_owned()),
            cgroup_procs: l.cgroup.procs_files(),
            workload_cgroup_procs: l.cgroup.workload().procs_files(),
            binds: l.binds.to_vec(),
            harden: true,
            env: l.spec.env.clone(),
            workdir: l.spec.workdir.clone(),
            entrypoint: l.entrypoint,
            user: l.spec.user.clone(),
        };
        let boot_path = l.dir.join("boot.json");
        std::fs::write(&boot_path, serde_json::to_vec(&boot).expect("boot config serializes"))
            .map_err(|e| RuntimeError::io("writing boot.json", e))?;
        tokio::process::Command::new(&l.config.agent_bin)
            .arg("init")
            .arg(&boot_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(l.stderr)
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| RuntimeError::io(format!("starting {}", l.config.agent_bin.display()), e))
    }

    fn forget(&self, _config: &RuntimeConfig, _id: &str) {}
}
