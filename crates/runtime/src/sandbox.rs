//! One sandbox: assembled from its parts (cgroup, network namespace, root filesystem, agent) and torn down
//! from them, on every path.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::agent_conn::AgentConn;
use crate::backend::Launch;
use crate::cgroup::{Cgroup, Limits};
use crate::network::SandboxNet;
use crate::rootfs::{unmount_all, Rootfs};
use crate::session::ExecSpec;
use crate::userns::{give_to_root, IdMap, UserNs};
use crate::{Isolation, Runtime, RuntimeError};

/// Host CA bundle made available in every sandbox (registries here sit behind a TLS-intercepting proxy).
const HOST_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Resource limits of a sandbox.
#[derive(Debug, Clone, Copy)]
pub struct Resources {
    /// CPU in thousandths of a core.
    pub cpu_millis: Option<u64>,
    /// Memory in bytes.
    pub memory_bytes: Option<u64>,
    /// Most processes at once.
    pub pids: u64,
    /// Size cap of the writable layer, bytes.
    pub disk_bytes: u64,
}

impl Default for Resources {
    fn default() -> Self {
        Self { cpu_millis: None, memory_bytes: None, pids: 4096, disk_bytes: 8 << 30 }
    }
}

/// Everything needed to start a sandbox.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// Unique id (also names its cgroup, namespace and directory).
    pub id: String,
    /// Host name inside.
    pub hostname: String,
    /// Read-only image layers, top first.
    pub layers: Vec<PathBuf>,
    /// Environment of every process (image env, then spec env).
    pub env: Vec<(String, String)>,
    /// Default working directory.
    pub workdir: String,
    /// The entrypoint; `None` leaves the sandbox idle until exec.
    pub entrypoint: Option<ExecSpec>,
    /// The user its processes run as unless a spawn names one (the image's `USER`); root when absent.
    pub user: Option<String>,
    /// Limits.
    pub resources: Resources,
    /// Extra bind mounts: (host path, path inside, read-only).
    pub binds: Vec<(PathBuf, String, bool)>,
    /// Where the entrypoint's output is appended (kept after the sandbox is gone).
    pub log_path: PathBuf,
    /// For image builds: keep the writable layer in this directory (on disk) instead of a tmpfs, so that it
    /// becomes an image layer after the sandbox is gone.
    pub keep_upper: Option<PathBuf>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Meta {
    isolation: Isolation,
    net: Option<SandboxNet>,
}

/// A running sandbox.
pub struct Sandbox {
    id: String,
    conn: AgentConn,
    child: tokio::sync::Mutex<Option<tokio::process::Child>>,
    cgroup: Cgroup,
    net: Option<SandboxNet>,
    /// Its user namespace's id range, when it has one.
    ids: Option<IdMap>,
    /// An image build's writable layer, to shift back to the sandbox's own ids once it stopped.
    keep_upper: Option<PathBuf>,
    runtime: Arc<Runtime>,
}

impl Sandbox {
    /// Its id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The connection to its agent (exec, sessions, files, entrypoint).
    pub fn agent(&self) -> &AgentConn {
        &self.conn
    }

    /// Its address on the sandbox network.
    pub fn address(&self) -> Option<std::net::Ipv4Addr> {
        self.net.as_ref().and_then(|n| n.address)
    }

    /// How many of its processes the kernel OOM-killed so far.
    pub fn oom_kills(&self) -> u64 {
        self.cgroup.workload().oom_kills() + self.cgroup.oom_kills()
    }

    /// Memory in use now, bytes.
    pub fn memory_usage(&self) -> Option<u64> {
        self.cgroup.memory_usage()
    }

    /// CPU time its processes used so far (its own and the children they reaped), from `/proc`.
    pub fn cpu_time(&self) -> Duration {
        self.cgroup.cpu_time()
    }

    /// Stops it and removes every trace of it.
    pub async fn stop(&self, grace: Duration) -> Result<(), RuntimeError> {
        self.conn.shutdown(grace.as_millis() as u64).await;
        let mut child = self.child.lock().await;
        if let Some(c) = child.as_mut() {
            if tokio::time::timeout(grace + Duration::from_secs(2), c.wait()).await.is_err() {
                let _ = c.start_kill();
                let _ = c.wait().await;
            }
        }
        child.take();
        drop(child);
        self.runtime.forget(&self.id);
        let result = teardown(&self.runtime, &self.id).await;
        if let Some(map) = self.ids {
            let unshifted = match self.keep_upper.clone() {
                Some(upper) => tokio::task::spawn_blocking(move || crate::userns::unshift_tree(&upper, map))
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e)))
                    .map_err(|e| RuntimeError::io("shifting the built layer's ids back", e)),
                None => Ok(()),
            };
            // The range is free whatever became of the layer: no process of the sandbox is left to use it.
            if let Some(alloc) = self.runtime.id_ranges() {
                alloc.release(map);
            }
            unshifted?;
        }
        result
    }
}

/// Starts a sandbox; on failure removes whatever was made.
pub async fn start(runtime: Arc<Runtime>, spec: SandboxSpec) -> Result<Arc<Sandbox>, RuntimeError> {
    // Only native runtimes have an allocator (see `Runtime::new`).
    let ids = runtime.id_ranges().map(crate::userns::IdAllocator::take).transpose()?;
    match build(runtime.clone(), &spec, ids).await {
        Ok(s) => Ok(s),
        Err(e) => {
            if let (Some(map), Some(alloc)) = (ids, runtime.id_ranges()) {
                alloc.release(map);
            }
            if let Err(te) = teardown(&runtime, &spec.id).await {
                tracing::warn!(sandbox = %spec.id, error = %te, "cleanup after a failed start was incomplete");
            }
            Err(e)
        }
    }
}

async fn build(runtime: Arc<Runtime>, spec: &SandboxSpec, ids: Option<IdMap>) -> Result<Arc<Sandbox>, RuntimeError> {
    let cfg = runtime.config();
    let mut phases = Phases::new();
    let dir = cfg.state_dir.join(&spec.id);
    std::fs::create_dir_all(&dir).map_err(|e| RuntimeError::io(format!("creating {}", dir.display()), e))?;
    // Record what we are about to create first, so that a crash at any point below can be cleaned up.
    let (netns, host_if) = SandboxNet::names(&spec.id);
    let placeholder = SandboxNet { netns, host_if, block: None, address: None };
    write_meta(&dir, &Meta { isolation: cfg.isolation, net: Some(placeholder) })?;

    let cgroup = Cgroup::of(runtime.cgroup_version(), &cfg.cgroup_parent, &spec.id);
    let limits = Limits {
        cpu_millis: spec.resources.cpu_millis,
        memory_bytes: spec.resources.memory_bytes,
        pids: spec.resources.pids,
    };
    runtime.backend().create_cgroup(&cgroup, &limits)?;
    phases.mark("cgroup");
    let net = SandboxNet::create(&spec.id, &cfg.network, runtime.net()).await?;
    write_meta(&dir, &Meta { isolation: cfg.isolation, net: Some(net.clone()) })?;
    phases.mark("network");

    let rootfs = Rootfs::under(&dir);
    // The writable layer is a tmpfs whose pages count against the sandbox's memory; capping it at half the
    // memory limit makes a full disk an ENOSPC for the writer rather than an OOM kill of whatever the kernel picks.
    let disk = match spec.resources.memory_bytes {
        Some(m) => spec.resources.disk_bytes.min(m / 2),
        None => spec.resources.disk_bytes,
    };
    let userns = ids.map(UserNs::create).transpose()?;
    phases.mark("user_namespace");
    rootfs.mount(&spec.layers, disk, spec.keep_upper.as_deref(), userns.as_ref())?;
    write_etc(&rootfs.merged, &spec.hostname, ids)?;
    phases.mark("rootfs");
    let mut binds: Vec<(String, String, bool)> =
        spec.binds.iter().map(|(h, s, ro)| (h.to_string_lossy().into_owned(), s.clone(), *ro)).collect();
    if Path::new(HOST_CA_BUNDLE).exists() {
        binds.push((HOST_CA_BUNDLE.into(), HOST_CA_BUNDLE.into(), true));
    }
    let entrypoint = spec.entrypoint.clone();

    let stderr = std::fs::File::create(dir.join("agent.log")).map_err(|e| RuntimeError::io("creating agent.log", e))?;
    let mut child = runtime.backend().launch(Launch {
        config: cfg,
        spec,
        dir: &dir,
        rootfs: &rootfs,
        net: &net,
        binds: &binds,
        entrypoint,
        limits,
        cgroup: &cgroup,
        userns: userns.as_ref(),
        stderr,
    })?;
    // The agent holds the namespace now.
    drop(userns);
    phases.mark("launch");
    let stdin = child.stdin.take().expect("piped stdin");
    let stdout = child.stdout.take().expect("piped stdout");
    let conn = match AgentConn::start(&spec.id, stdout, stdin, spec.log_path.clone()).await {
        Ok(c) => c,
        Err(e) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            let log = std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
            let last = log.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("; ");
            return Err(RuntimeError::Agent(if last.is_empty() { e.to_string() } else { format!("{e}: {last}") }));
        }
    };
    phases.mark("agent");
    tracing::debug!(sandbox = %spec.id, phases = %phases, "sandbox started");
    Ok(Arc::new(Sandbox {
        id: spec.id.clone(),
        conn,
        child: tokio::sync::Mutex::new(Some(child)),
        cgroup,
        net: Some(net),
        ids,
        keep_upper: spec.keep_upper.clone(),
        runtime,
    }))
}

/// How long each step of a start took, for the debug log (`COMPUTE_LOG=compute_runtime=debug`).
struct Phases {
    last: std::time::Instant,
    done: Vec<(&'static str, Duration)>,
}

impl Phases {
    fn new() -> Self {
        Self { last: std::time::Instant::now(), done: Vec::new() }
    }

    fn mark(&mut self, phase: &'static str) {
        let now = std::time::Instant::now();
        self.done.push((phase, now - self.last));
        self.last = now;
    }
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (phase, took)) in self.done.iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}{phase}={:.1}ms", took.as_secs_f64() * 1e3)?;
        }
        Ok(())
    }
}

fn write_meta(dir: &Path, meta: &Meta) -> Result<(), RuntimeError> {
    let tmp = dir.join("meta.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(meta).expect("meta serializes"))
        .map_err(|e| RuntimeError::io("writing meta.json", e))?;
    std::fs::rename(&tmp, dir.join("meta.json")).map_err(|e| RuntimeError::io("writing meta.json", e))
}

fn write_etc(root: &Path, hostname: &str, ids: Option<IdMap>) -> Result<(), RuntimeError> {
    let etc = root.join("etc");
    if !etc.exists() {
        std::fs::create_dir_all(&etc).map_err(|e| RuntimeError::io("creating /etc", e))?;
        give_to_root(&etc, ids)?;
    }
    let w = |name: &str, text: String| {
        let p = etc.join(name);
        // A symlink (e.g. resolv.conf -> ../run/...) must not lead the write outside the sandbox.
        let _ = std::fs::remove_file(&p);
        std::fs::write(&p, text).map_err(|e| RuntimeError::io(format!("writing /etc/{name}"), e))?;
        give_to_root(&p, ids)
    };
    w("hostname", format!("{hostname}\n"))?;
    w("hosts", format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"))?;
    let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let resolv: String = resolv
        .lines()
        .filter(|l| !(l.starts_with("nameserver 127.") || l.starts_with("nameserver ::1")))
        .map(|l| format!("{l}\n"))
        .collect();
    w("resolv.conf", resolv)
}

/// Removes every trace of sandbox `id`, from what its directory records and from the names derived from its
/// id: processes (via its cgroup), runsc state, mounts, network namespace and veth, cgroups, directory.
pub async fn teardown(runtime: &Runtime, id: &str) -> Result<(), RuntimeError> {
    let cfg = runtime.config();
    let dir = cfg.state_dir.join(id);
    let meta: Option<Meta> = std::fs::read(dir.join("meta.json")).ok().and_then(|b| serde_json::from_slice(&b).ok());
    let mut errors = Vec::new();
    let recorded = meta.as_ref().map(|m| m.isolation).unwrap_or(cfg.isolation);
    {
        let (config, id) = (cfg.clone(), id.to_string());
        let _ = tokio::task::spawn_blocking(move || crate::backend::for_isolation(recorded).forget(&config, &id)).await;
    }
    let cgroup = Cgroup::of(runtime.cgroup_version(), &cfg.cgroup_parent, id);
    if cgroup.exists() {
        if let Err(e) = tokio::task::spawn_blocking(move || cgroup.destroy()).await.unwrap_or(Ok(())) {
            errors.push(e.to_string());
        }
    }
    if let Err(e) = unmount_all(&dir) {
        errors.push(e.to_string());
    }
    let net = meta.and_then(|m| m.net).unwrap_or_else(|| {
        let (netns, host_if) = SandboxNet::names(id);
        SandboxNet { netns, host_if, block: None, address: None }
    });
    if let Err(e) = net.destroy(runtime.net()).await {
        errors.push(e.to_string());
    }
    if dir.exists() {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            errors.push(format!("removing {}: {e}", dir.display()));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(RuntimeError::Unsupported(format!("tearing down sandbox {id}: {}", errors.join("; "))))
    }
}
