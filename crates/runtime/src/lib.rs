//! Compute's node runtime: turns a [`SandboxSpec`] into an isolated process tree — root filesystem, namespaces,
//! cgroups, network — and talks to the agent that is its PID 1. It knows nothing of gRPC or SQL.
//!
//! Backends: `native` (Linux namespaces set up by the agent itself, see `compute-agent init`) and `gvisor`
//! (runsc with the systrap platform, the agent as the container's process).

#![warn(missing_docs)]

mod agent_conn;
mod backend;
mod cgroup;
mod error;
mod network;
mod rootfs;
mod sandbox;
mod session;
mod userns;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use agent_conn::{AgentConn, DownloadChunk, EntrypointEnd};
pub use cgroup::CgroupVersion;
pub use compute_agent_protocol::FailureKind;
pub use error::RuntimeError;
pub use network::NetworkConfig;
pub use sandbox::{Resources, Sandbox, SandboxSpec};
pub use session::{ExecSpec, ProcessState, ReadItem, Session, SessionEvent, SessionReader, StreamKind};

/// Which isolation a sandbox gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// Linux namespaces, cgroups, seccomp and a reduced capability set, set up by the agent.
    Native,
    /// gVisor's runsc (systrap platform): a user-space kernel between the workload and the host.
    Gvisor,
}

impl std::fmt::Display for Isolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Isolation::Native => "native",
            Isolation::Gvisor => "gvisor",
        })
    }
}

impl std::str::FromStr for Isolation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "native" => Ok(Isolation::Native),
            "gvisor" => Ok(Isolation::Gvisor),
            other => Err(format!("isolation {other:?} is not one of: native, gvisor")),
        }
    }
}

/// How the runtime is set up on this node.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Per-sandbox working directories live here (`<state_dir>/<id>`).
    pub state_dir: PathBuf,
    /// The `compute-agent` binary.
    pub agent_bin: PathBuf,
    /// The isolation backend.
    pub isolation: Isolation,
    /// The `runsc` binary for the gvisor backend.
    pub runsc_bin: PathBuf,
    /// Name of the cgroup (under each hierarchy) that holds every sandbox's cgroup.
    pub cgroup_parent: String,
    /// Sandbox networking.
    pub network: NetworkConfig,
    /// Run native sandboxes in user namespaces (their root an unprivileged host user) where the host can.
    pub user_namespace: bool,
}

/// The node runtime.
pub struct Runtime {
    config: RuntimeConfig,
    backend: Box<dyn backend::Backend>,
    cgroups: CgroupVersion,
    sandboxes: Mutex<HashMap<String, Arc<Sandbox>>>,
    net: network::Allocator,
    /// Id ranges for native sandboxes' user namespaces; `Err` says why they run without one.
    ids: Result<userns::IdAllocator, String>,
}

impl Runtime {
    /// Prepares the node: state directory, cgroup parents, the network's host-side rules.
    pub fn new(config: RuntimeConfig) -> Result<Arc<Self>, RuntimeError> {
        std::fs::create_dir_all(&config.state_dir)
            .map_err(|e| RuntimeError::io("creating the runtime state directory", e))?;
        let cgroups = cgroup::detect()?;
        cgroup::prepare_parent(cgroups, &config.cgroup_parent)?;
        network::prepare_host(&config.network)?;
        let backend = backend::for_isolation(config.isolation);
        backend.check(&config)?;
        let net = network::Allocator::new(&config.network);
        let ids = match config.isolation {
            Isolation::Gvisor => Err("gVisor sandboxes get their own user namespace from runsc".to_string()),
            Isolation::Native if !config.user_namespace => Err("turned off by configuration".to_string()),
            Isolation::Native => userns::probe(&config.state_dir.join(".userns-probe"))
                .map(|()| userns::IdAllocator::default())
                .map_err(|why| format!("this host cannot give sandboxes one: {why}")),
        };
        Ok(Arc::new(Self { config, backend, cgroups, sandboxes: Mutex::new(HashMap::new()), net, ids }))
    }

    /// The isolation backend in use.
    pub fn isolation(&self) -> Isolation {
        self.backend.isolation()
    }

    pub(crate) fn backend(&self) -> &dyn backend::Backend {
        self.backend.as_ref()
    }

    /// Whether native sandboxes run in user namespaces, or why not.
    pub fn user_namespace(&self) -> Result<(), &str> {
        self.ids.as_ref().map(|_| ()).map_err(String::as_str)
    }

    pub(crate) fn id_ranges(&self) -> Option<&userns::IdAllocator> {
        self.ids.as_ref().ok()
    }

    /// The cgroup flavour the node uses.
    pub fn cgroup_version(&self) -> CgroupVersion {
        self.cgroups
    }

    /// Starts a sandbox and waits for its agent to report ready.
    pub async fn start(self: &Arc<Self>, spec: SandboxSpec) -> Result<Arc<Sandbox>, RuntimeError> {
        if self.sandboxes.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&spec.id) {
            return Err(RuntimeError::AlreadyExists(spec.id));
        }
        let sandbox = sandbox::start(self.clone(), spec).await?;
        self.sandboxes.lock().unwrap_or_else(|p| p.into_inner()).insert(sandbox.id().to_string(), sandbox.clone());
        Ok(sandbox)
    }

    /// A running sandbox.
    pub fn get(&self, id: &str) -> Option<Arc<Sandbox>> {
        self.sandboxes.lock().unwrap_or_else(|p| p.into_inner()).get(id).cloned()
    }

    /// Stops a sandbox (SIGTERM to everything, SIGKILL after `grace`) and removes every trace of it: processes,
    /// cgroups, mounts, network namespace and veth, working directory. Idempotent.
    pub async fn stop(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        let sandbox = self.sandboxes.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
        match sandbox {
            Some(s) => s.stop(grace).await,
            None => self.teardown_leftover(id).await,
        }
    }

    /// Removes every sandbox this runtime's state directory knows but `keep` does not name: what a crashed
    /// server left behind. Returns the ids removed.
    pub async fn reconcile(&self, keep: &[String]) -> Vec<String> {
        let mut removed = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.config.state_dir) else {
            return removed;
        };
        for entry in entries.flatten() {
            let id = entry.file_name().to_string_lossy().to_string();
            // Dot-directories are the runtime's own scratch (the user namespace probe), not sandboxes.
            if id.starts_with('.') || !entry.path().is_dir() || keep.contains(&id) || self.get(&id).is_some() {
                continue;
            }
            if let Err(e) = self.teardown_leftover(&id).await {
                tracing::warn!(sandbox = %id, error = %e, "could not fully remove a leftover sandbox");
            }
            removed.push(id);
        }
        removed
    }

    async fn teardown_leftover(&self, id: &str) -> Result<(), RuntimeError> {
        sandbox::teardown(self, id).await
    }

    /// Releases what the node holds for all sandboxes (the parent cgroups) once none is running: the last step of
    /// a clean shutdown, so that servers that come and go leave no empty cgroups behind.
    pub fn release(&self) {
        if self.sandboxes.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
            cgroup::remove_parent(self.cgroups, &self.config.cgroup_parent);
        }
    }

    /// Every running sandbox's id.
    pub fn ids(&self) -> Vec<String> {
        self.sandboxes.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect()
    }

    pub(crate) fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    pub(crate) fn net(&self) -> &network::Allocator {
        &self.net
    }

    pub(crate) fn forget(&self, id: &str) {
        self.sandboxes.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    }
}

/// Bytes of already-delivered output each session keeps for re-attachment.
pub fn session_replay_bytes() -> usize {
    session::REPLAY_BYTES
}
