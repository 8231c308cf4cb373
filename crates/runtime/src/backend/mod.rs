//! Isolation backends: what differs between running a sandbox on Linux namespaces and under gVisor. Everything
//! else (root filesystem, network namespace, agent protocol, teardown) is shared.

mod gvisor;
mod native;
mod statx_shim;

use std::path::Path;

use compute_agent_protocol::Spawn;

use crate::cgroup::{Cgroup, Limits};
use crate::network::SandboxNet;
use crate::rootfs::Rootfs;
use crate::sandbox::SandboxSpec;
use crate::userns::UserNs;
use crate::{Isolation, RuntimeConfig, RuntimeError};

pub use gvisor::Gvisor;
pub use native::Native;

/// Everything a backend needs to start a sandbox's PID 1.
pub struct Launch<'a> {
    /// Node settings.
    pub config: &'a RuntimeConfig,
    /// The sandbox.
    pub spec: &'a SandboxSpec,
    /// Its working directory.
    pub dir: &'a Path,
    /// Its mounted root filesystem.
    pub rootfs: &'a Rootfs,
    /// Its network namespace.
    pub net: &'a SandboxNet,
    /// Bind mounts: (host path, path inside, read-only).
    pub binds: &'a [(String, String, bool)],
    /// The entrypoint, if any.
    pub entrypoint: Option<Spawn>,
    /// Resource limits.
    pub limits: Limits,
    /// Its cgroup (already created by [`Backend::create_cgroup`]).
    pub cgroup: &'a Cgroup,
    /// Its user namespace (native sandboxes, where the host supports it).
    pub userns: Option<&'a UserNs>,
    /// Where the launcher's own diagnostics go.
    pub stderr: std::fs::File,
}

/// One way of isolating sandboxes.
pub trait Backend: Send + Sync {
    /// Which one it is.
    fn isolation(&self) -> Isolation;

    /// Checks the node can run it (binaries present, versions usable).
    fn check(&self, config: &RuntimeConfig) -> Result<(), RuntimeError>;

    /// Creates the sandbox's host cgroup layout with `limits`.
    fn create_cgroup(&self, cgroup: &Cgroup, limits: &Limits) -> Result<(), RuntimeError>;

    /// Starts the process whose stdin/stdout carry the agent protocol.
    fn launch(&self, launch: Launch<'_>) -> Result<tokio::process::Child, RuntimeError>;

    /// Removes what the backend itself keeps for sandbox `id` (beyond cgroups, mounts and network).
    fn forget(&self, config: &RuntimeConfig, id: &str);
}

/// The backend for `isolation`.
pub fn for_isolation(isolation: Isolation) -> Box<dyn Backend> {
    match isolation {
        Isolation::Native => Box::new(Native),
        Isolation::Gvisor => Box::new(Gvisor),
    }
}
