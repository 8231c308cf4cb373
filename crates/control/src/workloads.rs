//! Sandboxes and containers: records, their state machine, and the reconciler that drives the runtime.
//!
//! Pending → Running → Succeeded | Failed | Terminated. `create` records the workload and returns at once; a
//! task resolves the image, starts the sandbox and records Running; another watches the entrypoint. A finished
//! workload never changes again (the store enforces it), so racing transitions resolve to the first.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use compute_image::ImageStore;
use compute_runtime::{EntrypointEnd, ExecSpec, Resources, Runtime, RuntimeError, SandboxSpec, Session};
use compute_store::{SandboxRecord, SandboxStatus, Store};
use compute_volume::{AttachedVolume, MountRequest, VolumeError, VolumeSel, VolumeStore};
use tokio::sync::mpsc;

use crate::published::Published;
use crate::quantity::{format_bytes, parse_cpu, parse_memory};
use crate::{ids, lock, ControlError, Principal, Scope, Secrets};
use compute_secrets::SecretRef;

/// Which API a workload was created through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadKind {
    /// `SandboxService`.
    Sandbox,
    /// `ContainerService`.
    Container,
    /// A replica of a scaling group (started by the group's supervisor, listed with the group).
    Replica,
}

impl WorkloadKind {
    fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::Sandbox => "sandbox",
            WorkloadKind::Container => "container",
            WorkloadKind::Replica => "replica",
        }
    }
}

/// What a client asks for.
#[derive(Debug, Clone)]
pub struct WorkloadRequest {
    /// Through which API.
    pub kind: WorkloadKind,
    /// Name; generated when empty.
    pub name: String,
    /// Image reference.
    pub image: String,
    /// Entrypoint; the image's when empty.
    pub entrypoint: Vec<String>,
    /// Environment over the image's.
    pub env: Vec<(String, String)>,
    /// `resources.cpu`.
    pub cpu: Option<String>,
    /// `resources.memory`.
    pub memory: Option<String>,
    /// Ends the workload this long after creation.
    pub lifetime: Option<Duration>,
    /// The encoded spec, echoed back in responses.
    pub spec: Vec<u8>,
    /// Volumes to mount.
    pub volumes: Vec<MountRequest>,
    /// Secrets and integrations that become environment variables at start (over `env`).
    pub secret_refs: Vec<SecretRef>,
    /// The scopes whose secrets this workload sees before the environment's, most specific first (its own
    /// sandbox scope; a replica's scaling group, or function).
    pub secret_scopes: Vec<Scope>,
    /// A container's port, served through the ingress under its name.
    pub expose: Option<crate::Exposure>,
    /// How strongly the workload must be isolated from the host's kernel (`security_policy.kernel_policy`).
    pub kernel_policy: KernelPolicy,
}

/// `security_policy.kernel_policy`: whether the workload may share the host's kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum KernelPolicy {
    /// Not asked: the server's isolation, whatever it is.
    #[default]
    Unspecified,
    /// Only behind gVisor's own kernel: never a silent downgrade to native isolation.
    Restricted,
    /// Either backend.
    Open,
}

/// Settings of the workload manager.
#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    /// Where entrypoint output is kept (`<dir>/<id>.log`), beyond the sandbox's own life.
    pub log_dir: PathBuf,
    /// Default memory limit when the spec gives none.
    pub default_memory: u64,
    /// Most processes per sandbox.
    pub pids_limit: u64,
    /// Size cap of a sandbox's writable layer.
    pub disk_bytes: u64,
    /// Where volume mounts of running sandboxes are assembled (`<dir>/<sandbox id>/<n>`).
    pub mounts_dir: PathBuf,
    /// Memory limits the live workloads may add up to (the node's memory × the operator's overcommit factor);
    /// `None`: no admission control.
    pub memory_capacity: Option<MemoryCapacity>,
}

/// What admission control admits: the node's memory times the operator's overcommit factor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryCapacity {
    /// The node's memory, bytes.
    pub node_bytes: u64,
    /// How much the limits may add up to, as a multiple of the node's memory (`memory_overcommit`).
    pub overcommit: f64,
}

impl MemoryCapacity {
    /// The limits the live workloads may add up to.
    pub fn bytes(&self) -> u64 {
        (self.node_bytes as f64 * self.overcommit) as u64
    }
}

/// The workload manager.
pub struct Workloads {
    store: Arc<Store>,
    runtime: Result<Arc<Runtime>, String>,
    images: Arc<ImageStore>,
    volumes: Arc<VolumeStore>,
    secrets: Arc<Secrets>,
    config: WorkloadConfig,
    /// Volumes mounted for each live sandbox, detached (synced) once when it ends.
    attached: std::sync::Mutex<HashMap<String, Vec<AttachedVolume>>>,
    /// Memory limit of each live workload, for admission control.
    reserved: std::sync::Mutex<HashMap<String, u64>>,
    /// Containers with a port, served through the ingress.
    published: Arc<Published>,
}

fn now() -> i64 {
    compute_store::now_millis()
}

impl Workloads {
    /// A manager; `runtime` is the reason sandboxes cannot run here when it is an error. Containers with a port
    /// are served through `ingress`.
    pub fn new(
        store: Arc<Store>,
        runtime: Result<Arc<Runtime>, String>,
        images: Arc<ImageStore>,
        volumes: Arc<VolumeStore>,
        secrets: Arc<Secrets>,
        config: WorkloadConfig,
        ingress: Arc<compute_ingress::Ingress>,
    ) -> Arc<Self> {
        let _ = std::fs::create_dir_all(&config.log_dir);
        Arc::new(Self {
            store,
            runtime,
            images,
            volumes,
            secrets,
            config,
            attached: Default::default(),
            reserved: Default::default(),
            published: Arc::new(Published::new(ingress)),
        })
    }

    /// Whether a live container with a port is named `name` in the environment: it is served under that name, as
    /// a scaling group would be.
    pub fn serves_container(&self, environment_id: &str, name: &str) -> bool {
        self.published.serves(environment_id, name)
    }

    /// The environment name and name a container with a port is served under (while it is live).
    pub fn served_as(&self, id: &str) -> Option<(String, String)> {
        self.published.served_as(id)
    }

    /// The name of an environment (its id when it has none any more), as ingress routes are keyed.
    pub(crate) fn environment_name(&self, environment_id: &str) -> String {
        self.store
            .read(|r| r.environments().get(environment_id))
            .ok()
            .flatten()
            .map(|e| e.name)
            .unwrap_or_else(|| environment_id.to_string())
    }

    /// The image store.
    pub fn images(&self) -> &Arc<ImageStore> {
        &self.images
    }

    /// The layer directories live workloads use (so image garbage collection keeps them).
    pub fn live_image_layers(&self) -> Result<std::collections::HashSet<PathBuf>, ControlError> {
        let live = self.store.read(|r| r.sandboxes().live())?;
        Ok(live.iter().filter_map(|rec| self.images.layers_of(&rec.image)).flatten().collect())
    }

    /// Mounts a workload's volumes; on failure, what was mounted is detached again.
    fn attach_volumes(&self, rec: &SandboxRecord, req: &WorkloadRequest) -> Result<Vec<AttachedVolume>, String> {
        let mut out: Vec<AttachedVolume> = Vec::new();
        for (i, m) in req.volumes.iter().enumerate() {
            let dir = self.config.mounts_dir.join(&rec.id).join(i.to_string());
            match self.volumes.attach(&rec.environment_id, m, &dir, &format!("{}/{i}", rec.id)) {
                Ok(a) => out.push(a),
                Err(e) => {
                    let volumes = self.volumes.clone();
                    tokio::spawn(async move {
                        for a in out {
                            let _ = volumes.detach(a).await;
                        }
                    });
                    return Err(format!("mounting volume {:?} at {}: {e}", m.volume, m.mount_path));
                }
            }
        }
        Ok(out)
    }

    /// Syncs the writable volume mounts of a running workload (id or name): what it wrote since the last sync
    /// becomes a version on each mount's ref. Returns (volume, new version) per writable mount.
    pub async fn sync_volumes(
        &self,
        who: &Principal,
        id_or_name: &str,
    ) -> Result<Vec<(String, Option<u64>)>, ControlError> {
        let rec = self.get(who, id_or_name).or_else(|_| self.get_by_name(who, id_or_name))?;
        let syncers: Vec<compute_volume::MountSyncer> = {
            let attached = self.attached.lock().unwrap_or_else(|p| p.into_inner());
            match attached.get(&rec.id) {
                Some(list) => list.iter().filter_map(AttachedVolume::syncer).collect(),
                None if rec.status.is_live() => Vec::new(),
                None => {
                    return Err(ControlError::FailedPrecondition(format!(
                        "workload {id_or_name:?} is not running: its volumes were synced when it stopped"
                    )))
                }
            }
        };
        let mut out = Vec::new();
        for s in syncers {
            let v = self
                .volumes
                .sync_mount(&s)
                .await
                .map_err(|e| ControlError::Internal(format!("syncing volume {:?}: {e}", s.volume_name())))?;
            out.push((s.volume_name().to_string(), v.map(|v| v.version_id)));
        }
        Ok(out)
    }

    /// Syncs and unmounts a finished sandbox's volumes (once, whoever gets here first), and gives back what it held
    /// (its memory reservation, its route).
    async fn detach_volumes(&self, id: &str) {
        self.release(id);
        self.published.withdraw(id);
        let attached = self.attached.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
        for a in attached.unwrap_or_default() {
            if let Err(e) = self.volumes.detach(a).await {
                tracing::error!(sandbox = %id, error = %e, "volume sync at stop failed");
            }
        }
        let _ = std::fs::remove_dir(self.config.mounts_dir.join(id));
    }

    /// Whether this server can run workloads at all (Unavailable, saying why, when it cannot).
    pub fn can_run(&self) -> Result<(), ControlError> {
        self.runtime().map(|_| ())
    }

    fn runtime(&self) -> Result<&Arc<Runtime>, ControlError> {
        self.runtime
            .as_ref()
            .map_err(|why| ControlError::Unavailable(format!("this server cannot run sandboxes: {why}")))
    }

    /// After a restart: whatever was live could not be kept (its agent's pipes died with the old server), so its
    /// leftovers are removed and it is marked Failed with the reason.
    pub async fn reconcile(&self) -> Result<usize, ControlError> {
        compute_volume::cleanup_mounts(&self.config.mounts_dir);
        let live = self.store.read(|r| r.sandboxes().live())?;
        for rec in &live {
            self.store.write(|r| {
                r.sandboxes().transition(
                    &rec.id,
                    SandboxStatus::Failed,
                    Some("the server restarted while this sandbox was live; its processes were stopped"),
                    None,
                    None,
                    now(),
                )
            })?;
        }
        if let Ok(rt) = &self.runtime {
            let removed = rt.reconcile(&[]).await;
            if !removed.is_empty() {
                tracing::info!(count = removed.len(), "removed sandboxes left over from a previous run");
            }
        }
        Ok(live.len())
    }

    /// Checks a request without starting anything: resources, image reference, environment, lifetime, and that
    /// its volumes exist. Returns the parsed cpu (millicores) and memory (bytes) limits.
    pub fn check(&self, who: &Principal, req: &WorkloadRequest) -> Result<(Option<u64>, Option<u64>), ControlError> {
        self.check_kernel_policy(req.kernel_policy)?;
        let cpu =
            req.cpu.as_deref().filter(|s| !s.trim().is_empty()).map(|c| parse_cpu("resources.cpu", c)).transpose()?;
        let memory = req
            .memory
            .as_deref()
            .filter(|s| !s.trim().is_empty())
            .map(|m| parse_memory("resources.memory", m))
            .transpose()?;
        if let Some(cap) = self.config.memory_capacity {
            let wanted = memory.unwrap_or(self.config.default_memory);
            if wanted > cap.bytes() {
                return Err(ControlError::ResourceExhausted(format!(
                    "resources.memory {} is more than this node can ever give its sandboxes: {} ({} of memory × \
                     memory_overcommit {})",
                    format_bytes(wanted),
                    format_bytes(cap.bytes()),
                    format_bytes(cap.node_bytes),
                    cap.overcommit
                )));
            }
        }
        if req.image.trim().is_empty() {
            return Err(ControlError::InvalidArgument(
                "spec.image is required (e.g. \"python:3.13-slim-trixie\")".into(),
            ));
        }
        self.images.check(&req.image).map_err(|e| ControlError::InvalidArgument(format!("spec.image: {e}")))?;
        check_env("spec.env_vars", &req.env)?;
        if let Some(l) = req.lifetime {
            if l.is_zero() {
                return Err(ControlError::InvalidArgument("spec.lifetime must be positive".into()));
            }
        }
        for m in &req.volumes {
            let sel = VolumeSel { id: String::new(), name: m.volume.clone() };
            self.volumes.resolve(&who.environment_id, &sel).map_err(|e| match e {
                VolumeError::NotFound(_) => ControlError::NotFound(format!(
                    "spec.volumes: volume {:?} not found (create it first, e.g. Volume({:?}).put_file(...))",
                    m.volume, m.volume
                )),
                other => ControlError::Internal(other.to_string()),
            })?;
        }
        // Every reference must resolve now, so a missing secret is refused at create rather than at start.
        self.secrets.resolve(&who.environment_id, &req.secret_scopes, &req.secret_refs)?;
        Ok((cpu, memory))
    }

    /// A RESTRICTED workload runs under gVisor or not at all.
    fn check_kernel_policy(&self, policy: KernelPolicy) -> Result<(), ControlError> {
        let isolation = self.runtime.as_ref().map(|r| r.isolation()).ok();
        match (policy, isolation) {
            (KernelPolicy::Restricted, Some(compute_runtime::Isolation::Native)) => Err(ControlError::FailedPrecondition(
                "security_policy.kernel_policy KERNEL_POLICY_RESTRICTED needs gVisor, and this server runs sandboxes \
                 with native isolation (gVisor is unavailable or turned off: see `compute status` and the server's \
                 log); use KERNEL_POLICY_OPEN to accept native isolation, or run the server with --isolation gvisor"
                    .into(),
            )),
            _ => Ok(()),
        }
    }

    /// Records a new workload and starts it in the background; returns the Pending record.
    pub fn create(self: &Arc<Self>, who: &Principal, req: WorkloadRequest) -> Result<SandboxRecord, ControlError> {
        let runtime = self.runtime()?.clone();
        let (cpu, memory) = self.check(who, &req)?;
        let name = if req.name.trim().is_empty() {
            format!("{}-{}", req.kind.as_str(), ids::random_token(8))
        } else {
            req.name.clone()
        };
        ids::validate_name("spec.name", &name)?;
        if req.expose.is_some()
            && self.store.read(|r| r.scaling_groups().get_by_name(&who.environment_id, &name, false))?.is_some()
        {
            return Err(ControlError::AlreadyExists(format!(
                "spec.name {name:?}: a scaling group of that name is served at /sg/<environment>/{name}, where a \
                 container with a port would be served too; name the container differently"
            )));
        }
        let memory_bytes = memory.unwrap_or(self.config.default_memory);
        let id = format!("sbx-{}", ids::random_token(16));
        self.reserve(&id, memory_bytes)?;
        let rec = SandboxRecord {
            id,
            environment_id: who.environment_id.clone(),
            kind: req.kind.as_str().into(),
            name: name.clone(),
            image: req.image.clone(),
            spec: req.spec.clone(),
            status: SandboxStatus::Pending,
            status_message: Some("preparing the image".into()),
            status_details: None,
            exit_code: None,
            created_by: who.client_id.clone(),
            created_at: now(),
            started_at: None,
            finished_at: None,
        };
        self.store.write(|r| r.sandboxes().insert(&rec)).map_err(|e| {
            self.release(&rec.id);
            match ControlError::from(e) {
                ControlError::AlreadyExists(_) => ControlError::AlreadyExists(format!(
                    "a live workload named {name:?} already exists in this environment"
                )),
                other => other,
            }
        })?;
        if let Some(x) = req.expose {
            let env_name = self.environment_name(&rec.environment_id);
            self.published.publish(&rec.id, &rec.environment_id, &env_name, &rec.name, x);
        }
        let this = self.clone();
        let resources = Resources {
            cpu_millis: cpu,
            memory_bytes: Some(memory_bytes),
            pids: self.config.pids_limit,
            disk_bytes: self.config.disk_bytes,
        };
        let started = rec.clone();
        tokio::spawn(async move { this.start(started, req, resources, runtime).await });
        Ok(rec)
    }

    async fn start(
        self: Arc<Self>,
        rec: SandboxRecord,
        req: WorkloadRequest,
        resources: Resources,
        runtime: Arc<Runtime>,
    ) {
        let begun = std::time::Instant::now();
        let image = match self.images.resolve(&rec.image).await {
            Ok(i) => i,
            Err(e) => {
                return self.finish(&rec.id, SandboxStatus::Failed, &format!("image {}: {e}", rec.image), None, None)
            }
        };
        let secret_env = match self.secrets.resolve(&rec.environment_id, &req.secret_scopes, &req.secret_refs) {
            Ok(v) => v,
            Err(e) => {
                return self.finish(&rec.id, SandboxStatus::Failed, &format!("resolving secrets: {e}"), None, None)
            }
        };
        let mut env = image.config.env.clone();
        for (k, v) in ca_env().into_iter().chain(req.env.iter().cloned()).chain(secret_env) {
            match env.iter_mut().find(|(ek, _)| *ek == k) {
                Some(slot) => slot.1 = v,
                None => env.push((k, v)),
            }
        }
        let command: Vec<String> = if req.entrypoint.is_empty() {
            image.config.entrypoint.iter().chain(image.config.cmd.iter()).cloned().collect()
        } else {
            req.entrypoint.clone()
        };
        let entrypoint = command.split_first().map(|(c, args)| ExecSpec {
            command: c.clone(),
            args: args.to_vec(),
            ..Default::default()
        });
        let spec = SandboxSpec {
            id: rec.id.clone(),
            hostname: rec.name.clone(),
            layers: image.layers.clone(),
            env,
            workdir: image.config.workdir.clone(),
            entrypoint,
            resources,
            binds: vec![],
            log_path: self.log_path(&rec.id),
            keep_upper: None,
            user: image.config.user.clone(),
        };
        let mut spec = spec;
        match self.attach_volumes(&rec, &req) {
            Ok(attached) => {
                for a in &attached {
                    spec.binds.push((a.host_path.clone(), a.mount_path.clone(), a.read_only));
                }
                self.attached.lock().unwrap_or_else(|p| p.into_inner()).insert(rec.id.clone(), attached);
            }
            Err(msg) => return self.finish(&rec.id, SandboxStatus::Failed, &msg, None, None),
        }
        let sandbox = match runtime.start(spec).await {
            Ok(s) => s,
            Err(e) => {
                self.detach_volumes(&rec.id).await;
                return self.finish(&rec.id, SandboxStatus::Failed, &format!("starting the sandbox: {e}"), None, None);
            }
        };
        let running = self
            .store
            .write(|r| r.sandboxes().transition(&rec.id, SandboxStatus::Running, Some(""), None, None, now()));
        if !matches!(running, Ok(true)) {
            // Terminated while it was starting.
            let _ = runtime.stop(&rec.id, Duration::ZERO).await;
            self.detach_volumes(&rec.id).await;
            return;
        }
        tracing::info!(sandbox = %rec.id, name = %rec.name, ms = begun.elapsed().as_millis() as u64, provenance = %image.provenance, "sandbox running");
        self.published.ready(&rec.id, self.address(&rec.id));

        if let Some(lifetime) = req.lifetime {
            let this = self.clone();
            let id = rec.id.clone();
            let env = rec.environment_id.clone();
            let deadline = Duration::from_millis((rec.created_at + lifetime.as_millis() as i64 - now()).max(0) as u64);
            tokio::spawn(async move {
                tokio::time::sleep(deadline).await;
                let msg = format!("its lifetime of {}s ended", lifetime.as_secs());
                let _ = this.terminate_with(&env, &id, Duration::from_secs(5), &msg).await;
            });
        }

        let this = self.clone();
        let id = rec.id.clone();
        tokio::spawn(async move {
            let end = sandbox.agent().entrypoint_end().await;
            let oom = sandbox.oom_kills() > 0;
            let (status, message, code) = match end {
                EntrypointEnd::Exited { code: Some(0), .. } => {
                    (SandboxStatus::Succeeded, "entrypoint exited with code 0".to_string(), Some(0))
                }
                EntrypointEnd::Exited { signal: Some(9), .. } if oom => (
                    SandboxStatus::Failed,
                    "entrypoint was OOM-killed: the sandbox exceeded its memory limit".to_string(),
                    Some(137),
                ),
                EntrypointEnd::Exited { code: Some(c), .. } => {
                    (SandboxStatus::Failed, format!("entrypoint exited with code {c}"), Some(c))
                }
                EntrypointEnd::Exited { signal, .. } => {
                    let s = signal.unwrap_or(0);
                    (SandboxStatus::Failed, format!("entrypoint was killed by signal {s}"), Some(128 + s))
                }
                EntrypointEnd::Failed(msg) => {
                    (SandboxStatus::Failed, format!("entrypoint could not start: {msg}"), Some(127))
                }
                EntrypointEnd::AgentGone if oom => (
                    SandboxStatus::Failed,
                    "the sandbox was OOM-killed: it exceeded its memory limit".to_string(),
                    Some(137),
                ),
                EntrypointEnd::AgentGone => {
                    (SandboxStatus::Failed, "the sandbox's init process exited unexpectedly".to_string(), None)
                }
            };
            let details = tail(&this.log_path(&id), 20);
            this.finish(&id, status, &message, details.as_deref(), code);
            let rt = this.runtime.as_ref().ok().cloned();
            // Unless a terminate already took it down (and is tearing it down now).
            if let Some(rt) = rt.filter(|rt| rt.get(&id).is_some()) {
                if let Err(e) = rt.stop(&id, Duration::from_secs(1)).await {
                    tracing::warn!(sandbox = %id, error = %e, "cleanup after the entrypoint ended was incomplete");
                }
            }
            this.detach_volumes(&id).await;
        });
    }

    /// Admits a workload's memory limit against the node's capacity (all live workloads' limits together).
    fn reserve(&self, id: &str, bytes: u64) -> Result<(), ControlError> {
        let mut reserved = lock(&self.reserved);
        if let Some(cap) = self.config.memory_capacity {
            let used: u64 = reserved.values().sum();
            if used.saturating_add(bytes) > cap.bytes() {
                return Err(ControlError::ResourceExhausted(format!(
                    "resources.memory {}: this node has {} of {} left for sandboxes ({} live workloads hold {}); \
                     stop some, ask for less, or raise memory_overcommit",
                    format_bytes(bytes),
                    format_bytes(cap.bytes().saturating_sub(used)),
                    format_bytes(cap.bytes()),
                    reserved.len(),
                    format_bytes(used)
                )));
            }
        }
        reserved.insert(id.to_string(), bytes);
        Ok(())
    }

    /// Gives a workload's memory back (it ended, or never started).
    fn release(&self, id: &str) {
        lock(&self.reserved).remove(id);
    }

    fn finish(&self, id: &str, status: SandboxStatus, message: &str, details: Option<&str>, code: Option<i32>) {
        self.release(id);
        self.published.withdraw(id);
        match self.store.write(|r| r.sandboxes().transition(id, status, Some(message), details, code, now())) {
            Ok(true) => {
                tracing::info!(sandbox = %id, status = status.as_str(), message, "sandbox finished")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::error!(sandbox = %id, error = %e, "recording a sandbox's end failed")
            }
        }
    }

    /// Where a workload's entrypoint output goes.
    pub fn log_path(&self, id: &str) -> PathBuf {
        self.config.log_dir.join(format!("{id}.log"))
    }

    /// A workload by id.
    pub fn get(&self, who: &Principal, id: &str) -> Result<SandboxRecord, ControlError> {
        self.store
            .read(|r| r.sandboxes().get(&who.environment_id, id))?
            .ok_or_else(|| ControlError::NotFound(format!("sandbox {id:?} not found in this environment")))
    }

    /// A workload by name (the live one, else the latest).
    pub fn get_by_name(&self, who: &Principal, name: &str) -> Result<SandboxRecord, ControlError> {
        self.store
            .read(|r| r.sandboxes().get_by_name(&who.environment_id, name))?
            .ok_or_else(|| ControlError::NotFound(format!("no workload named {name:?} in this environment")))
    }

    /// An environment's workloads, newest first.
    pub fn list(
        &self,
        who: &Principal,
        kind: Option<WorkloadKind>,
        live_only: bool,
        limit: u32,
        offset: u32,
    ) -> Result<Vec<SandboxRecord>, ControlError> {
        Ok(self.store.read(|r| {
            r.sandboxes().list(&who.environment_id, kind.map(WorkloadKind::as_str), live_only, limit, offset)
        })?)
    }

    /// Stops a workload (SIGTERM, SIGKILL after `grace`) and records it Terminated. Finished workloads are left
    /// as they are.
    pub async fn terminate(&self, who: &Principal, id: &str, grace: Duration) -> Result<SandboxRecord, ControlError> {
        self.terminate_with(&who.environment_id, id, grace, &format!("terminated by {}", who.client_id)).await
    }

    /// Stops a workload of environment `env` with `why` as its reason (for the control plane's own reasons:
    /// a lifetime, a scaling group shrinking).
    pub(crate) async fn terminate_with(
        &self,
        env: &str,
        id: &str,
        grace: Duration,
        why: &str,
    ) -> Result<SandboxRecord, ControlError> {
        let rec = self
            .store
            .read(|r| r.sandboxes().get(env, id))?
            .ok_or_else(|| ControlError::NotFound(format!("sandbox {id:?} not found in this environment")))?;
        if rec.status.is_live() {
            self.store
                .write(|r| r.sandboxes().transition(id, SandboxStatus::Terminated, Some(why), None, None, now()))?;
            if let Ok(rt) = &self.runtime {
                rt.stop(id, grace).await.map_err(|e| ControlError::Internal(format!("stopping sandbox {id}: {e}")))?;
            }
            // Writes to mounted volumes become versions before the caller hears the workload stopped.
            self.detach_volumes(id).await;
        }
        self.store
            .read(|r| r.sandboxes().get(env, id))?
            .ok_or_else(|| ControlError::NotFound(format!("sandbox {id:?} not found")))
    }

    /// Stops every live workload and releases the node's shared cgroups (server shutdown).
    pub async fn stop_all(&self, why: &str) {
        let live = self.store.read(|r| r.sandboxes().live()).unwrap_or_default();
        for rec in live {
            let _ = self.terminate_with(&rec.environment_id, &rec.id, Duration::from_secs(2), why).await;
        }
        if let Ok(rt) = &self.runtime {
            rt.release();
        }
    }

    /// The address a running workload listens on inside its network namespace.
    pub fn address(&self, id: &str) -> Option<std::net::Ipv4Addr> {
        self.runtime.as_ref().ok()?.get(id)?.address()
    }

    /// CPU time a running workload used so far.
    pub fn cpu_time(&self, id: &str) -> Option<Duration> {
        Some(self.runtime.as_ref().ok()?.get(id)?.cpu_time())
    }

    /// A workload of environment `env` by id.
    pub(crate) fn record(&self, env: &str, id: &str) -> Result<Option<SandboxRecord>, ControlError> {
        Ok(self.store.read(|r| r.sandboxes().get(env, id))?)
    }

    fn running(&self, who: &Principal, id: &str) -> Result<Arc<compute_runtime::Sandbox>, ControlError> {
        let rec = self.get(who, id)?;
        let not_running = |state: &str| {
            ControlError::FailedPrecondition(format!("sandbox {id} is {state}: it accepts commands only while running"))
        };
        match rec.status {
            SandboxStatus::Running => {}
            SandboxStatus::Pending => return Err(not_running("still starting")),
            s => return Err(not_running(&format!("{} ({})", s.as_str(), rec.status_message.unwrap_or_default()))),
        }
        self.runtime()?.get(id).ok_or_else(|| not_running("stopping"))
    }

    /// Starts a process session in a running workload.
    pub async fn exec(&self, who: &Principal, id: &str, spec: ExecSpec) -> Result<Arc<Session>, ControlError> {
        check_exec(&spec)?;
        let sandbox = self.running(who, id)?;
        let session_id = format!("ses-{}", ids::random_token(16));
        sandbox.agent().exec(spec, session_id).await.map_err(runtime_error)
    }

    /// A session of a workload.
    pub fn session(&self, who: &Principal, id: &str, session_id: &str) -> Result<Arc<Session>, ControlError> {
        let sandbox = self.running(who, id)?;
        sandbox
            .agent()
            .session(session_id)
            .ok_or_else(|| ControlError::NotFound(format!("session {session_id:?} not found in sandbox {id}")))
    }

    /// Every session of a workload.
    pub fn sessions(&self, who: &Principal, id: &str) -> Result<Vec<Arc<Session>>, ControlError> {
        Ok(self.running(who, id)?.agent().sessions())
    }

    /// Writes a file into a running workload.
    pub async fn upload(
        &self,
        who: &Principal,
        id: &str,
        path: &str,
        mode: Option<u32>,
        chunks: mpsc::Receiver<Bytes>,
    ) -> Result<u64, ControlError> {
        let sandbox = self.running(who, id)?;
        sandbox.agent().upload(path, mode, chunks).await.map_err(runtime_error)
    }

    /// Reads a file from a running workload.
    pub async fn download(
        &self,
        who: &Principal,
        id: &str,
        path: &str,
    ) -> Result<mpsc::Receiver<compute_runtime::DownloadChunk>, ControlError> {
        let sandbox = self.running(who, id)?;
        sandbox.agent().download(path).await.map_err(runtime_error)
    }
}

/// Maps a runtime failure to what the client is told.
pub fn runtime_error(e: RuntimeError) -> ControlError {
    match e {
        RuntimeError::File { kind, message, errno } => ControlError::File { kind, message, errno },
        RuntimeError::NotRunning(id) => ControlError::FailedPrecondition(format!("sandbox {id} is not running")),
        RuntimeError::TooLarge(m) => ControlError::InvalidArgument(m),
        other => ControlError::Internal(other.to_string()),
    }
}

/// Every process trusts the host's CA bundle (used by image builds too) (bind-mounted over the image's), whatever library it uses.
pub(crate) fn ca_env() -> Vec<(String, String)> {
    const BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
    if !std::path::Path::new(BUNDLE).exists() {
        return vec![];
    }
    ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"]
        .iter()
        .map(|k| (k.to_string(), BUNDLE.to_string()))
        .collect()
}

/// The last `lines` lines of a log file (from its last 64 KiB), if it has any.
pub(crate) fn tail(path: &std::path::Path, lines: usize) -> Option<String> {
    let text = std::fs::read(path).ok()?;
    let start = text.len().saturating_sub(64 * 1024);
    let text = String::from_utf8_lossy(&text[start..]);
    let last: Vec<&str> = text.lines().rev().take(lines).collect::<Vec<_>>().into_iter().rev().collect();
    (!last.is_empty()).then(|| last.join("\n"))
}

/// Linux's limit on one argument or environment string (`MAX_ARG_STRLEN`, 32 pages).
const MAX_ARG_STRLEN: usize = 128 * 1024;
/// The most the arguments and extra environment of one exec may add up to (Linux's `ARG_MAX` is a quarter of the
/// stack limit, 2 MiB by default; this leaves room for the sandbox's own environment).
const MAX_ARGS_TOTAL: usize = 1024 * 1024;

/// What no process can be started with, refused before it reaches the sandbox: no command, or a NUL byte in the
/// command, an argument, the working directory, the user or the environment (C strings end at NUL).
fn check_exec(spec: &ExecSpec) -> Result<(), ControlError> {
    if spec.command.is_empty() {
        return Err(ControlError::InvalidArgument("command is required".into()));
    }
    // Linux's own limits (MAX_ARG_STRLEN per string; a total well under ARG_MAX), checked here so that an
    // oversized request is refused by name instead of failing inside the sandbox.
    let strings = std::iter::once(("command[0]".to_string(), spec.command.len()))
        .chain(spec.args.iter().enumerate().map(|(i, a)| (format!("command[{}]", i + 1), a.len())))
        .chain(spec.env.iter().map(|(k, v)| (format!("env[{k:?}]"), k.len() + v.len() + 1)));
    let mut total = 0usize;
    for (field, len) in strings {
        if len > MAX_ARG_STRLEN {
            return Err(ControlError::InvalidArgument(format!(
                "{field} is {len} bytes; a process argument or variable can be at most {MAX_ARG_STRLEN} bytes \
                 (pass large data as a file or on stdin)"
            )));
        }
        total += len + 1;
    }
    if total > MAX_ARGS_TOTAL {
        return Err(ControlError::InvalidArgument(format!(
            "the command and env total {total} bytes; at most {MAX_ARGS_TOTAL} (pass large data as a file or on \
             stdin)"
        )));
    }
    let nul = |field: String| {
        ControlError::InvalidArgument(format!("{field} holds a NUL byte, which no process argument can carry"))
    };
    if spec.command.contains('\0') {
        return Err(nul("command[0]".into()));
    }
    if let Some(i) = spec.args.iter().position(|a| a.contains('\0')) {
        return Err(nul(format!("command[{}]", i + 1)));
    }
    if spec.workdir.as_deref().is_some_and(|w| w.contains('\0')) {
        return Err(nul("cwd".into()));
    }
    if spec.user.as_deref().is_some_and(|u| u.contains('\0')) {
        return Err(nul("user".into()));
    }
    check_env("env", &spec.env)
}

/// Variables a process environment can carry: a name without `=` or NUL, a value without NUL. `field` names the
/// request's field in the error.
fn check_env(field: &str, env: &[(String, String)]) -> Result<(), ControlError> {
    for (k, v) in env {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(ControlError::InvalidArgument(format!("{field}: {k:?} is not a valid variable name")));
        }
        if v.contains('\0') {
            return Err(ControlError::InvalidArgument(format!(
                "{field}[{k:?}]: the value holds a NUL byte, which no process environment can carry"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_that_cannot_start_is_refused_naming_the_field() {
        let spec = |command: &str, args: &[&str]| ExecSpec {
            command: command.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        };
        assert!(check_exec(&spec("echo", &["hi"])).is_ok());
        for (s, field) in [
            (spec("", &[]), "command is required"),
            (spec("ec\0ho", &[]), "command[0]"),
            (spec("echo", &["a", "b\0c"]), "command[2]"),
            (ExecSpec { env: vec![("K".into(), "v\0".into())], ..spec("echo", &[]) }, "env[\"K\"]"),
            (ExecSpec { workdir: Some("/tmp\0x".into()), ..spec("echo", &[]) }, "cwd"),
            (spec("echo", &["a", &"x".repeat(10 << 20)]), "command[2] is 10485760 bytes"),
            (spec("echo", &["y".repeat(100_000).as_str(); 11]), "at most 1048576"),
        ] {
            let e = check_exec(&s).unwrap_err().to_string();
            assert!(e.contains(field), "{field}: {e}");
        }
    }
}
