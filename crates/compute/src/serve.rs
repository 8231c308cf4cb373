//! `compute serve`: opens the data directory, starts the front door, and runs until SIGTERM or SIGINT.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use compute_api::{ApiConfig, Server, TlsConfig};
use compute_control::volume::{Objects, VolumeConfig, VolumeStore};
use compute_control::{
    Builds, Control, ControlConfig, Functions, MemoryCapacity, ScalingConfig, ScalingGroups, WorkloadConfig, Workloads,
};
use compute_image::ImageStore;
use compute_runtime::{Isolation, NetworkConfig, Runtime, RuntimeConfig};

use crate::runtime_file::{self, AdminCredentials, ServerInfo};
use crate::settings::Settings;

pub async fn run(data_dir: &Path, settings: Settings) -> anyhow::Result<()> {
    std::fs::create_dir_all(data_dir).with_context(|| format!("creating data directory {}", data_dir.display()))?;
    restrict_permissions(data_dir);
    // One server per data directory: the store allows it, but two front doors on one state would each think
    // they own the workloads.
    let lock_path = data_dir.join("server.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        anyhow::bail!("another compute server is already running on data directory {}", data_dir.display());
    }

    let (control, first) =
        Control::open(data_dir, ControlConfig { token_ttl: settings.token_ttl, ..ControlConfig::from_env() })?;
    let control = Arc::new(control);
    let creds_path = runtime_file::credentials_path(data_dir);
    if let Some(admin) = &first.admin {
        runtime_file::write_private_json(
            &creds_path,
            &AdminCredentials {
                client_id: admin.client_id.clone(),
                client_secret: admin.client_secret.clone(),
                environment_id: admin.environment_id.clone(),
            },
        )?;
    }

    let volumes = open_volumes(data_dir, &settings, &control)?;
    // One ingress: scaling groups, and containers with a port, are served through it.
    let ingress = Arc::new(compute_ingress::Ingress::new());
    let (workloads, builds) = start_workloads(data_dir, &settings, &control, volumes.clone(), ingress.clone()).await;
    // Garbage collection of volume objects and trees no version references, hourly.
    let gc_volumes = volumes.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(3600));
        every.tick().await;
        loop {
            every.tick().await;
            if let Err(e) = gc_volumes.gc(None).await {
                tracing::error!(error = %e, "volume garbage collection failed");
            }
        }
    });
    // Scaling groups recorded before a restart are served again; their old replicas were reconciled away above.
    let scaling = ScalingGroups::new(
        control.store().clone(),
        workloads.clone(),
        ingress,
        compute_api::parse_scaling_group_spec,
        ScalingConfig::default(),
    );
    match scaling.resume() {
        Ok(0) => {}
        Ok(n) => tracing::info!(count = n, "serving the scaling groups of the previous run again"),
        Err(e) => tracing::error!(error = %e, "resuming scaling groups failed"),
    }
    let config = ApiConfig {
        listen: settings.listen,
        tls: settings.tls.clone().map(|(cert_path, key_path)| TlsConfig { cert_path, key_path }),
        max_message_bytes: settings.max_message_bytes,
        public_url: settings.public_url.clone(),
        ingress_domain: settings.ingress_domain.clone(),
        max_connections: settings.max_connections,
        request_header_timeout: settings.request_header_timeout,
        ..ApiConfig::default()
    };
    let functions = Functions::new(
        control.store().clone(),
        scaling.clone(),
        builds.clone(),
        control.secrets().clone(),
        compute_api::FUNCTION_CODEC,
        settings.max_message_bytes,
    );
    // Deferred calls left running by a server that stopped run again; the worker runs what is enqueued.
    let queue = functions.start_queue()?;
    let server =
        Server::bind(config, control.clone(), workloads.clone(), builds, volumes, scaling.clone(), functions).await?;
    let addr = server.local_addr();
    let url = runtime_file::client_url(addr);
    let info = ServerInfo {
        pid: std::process::id(),
        listen: addr.to_string(),
        url: url.clone(),
        tls: server.tls_enabled(),
        version: env!("CARGO_PKG_VERSION").into(),
        started_at: compute_store::now_millis(),
    };
    let info_path = runtime_file::server_info_path(data_dir);
    runtime_file::write_private_json(&info_path, &info)?;
    tracing::info!(%addr, tls = info.tls, data_dir = %data_dir.display(), version = info.version, "compute is serving");

    if let Some(admin) = &first.admin {
        println!("# First start: created the admin client. Point the SDK at this server with:");
        println!("export CHALK_API_SERVER={url}");
        println!("export CHALK_CLIENT_ID={}", admin.client_id);
        println!("export CHALK_CLIENT_SECRET={}", admin.client_secret);
        println!("# (`eval \"$(compute env)\"` prints these again; the secret is also in {})", creds_path.display());
    }

    server.run(shutdown_signal()).await;
    // Calls the queue was running are recorded as running: the next start runs them again.
    queue.abort();
    // Supervisors first, so none starts a replica while the workloads stop.
    scaling.shutdown().await;
    workloads.stop_all("the server shut down").await;
    let _ = std::fs::remove_file(&info_path);
    tracing::info!("compute stopped");
    Ok(())
}

/// Sets up the runtime (if this machine can run sandboxes) and the workload manager, and cleans up after a
/// previous run that did not shut down cleanly.
/// The node's memory (`MemTotal` in /proc/meminfo), bytes; `None` if it cannot be read (no admission control).
fn node_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 =
        text.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// The volume store: objects where the settings say (a local directory by default), metadata in the state store.
fn open_volumes(data_dir: &Path, settings: &Settings, control: &Control) -> anyhow::Result<Arc<VolumeStore>> {
    let objects = match &settings.volume_store {
        Some(url) => Objects::from_url(url, &settings.volume_store_options)?,
        None => Objects::local(&data_dir.join("volumes").join("objects"))?,
    };
    tracing::info!(objects = objects.location(), "volume store");
    let config = VolumeConfig {
        retention: settings.volume_retention,
        url_ttl: settings.volume_url_ttl,
        ..VolumeConfig::default()
    };
    Ok(Arc::new(VolumeStore::open(control.store().clone(), objects, config)?))
}

async fn start_workloads(
    data_dir: &Path,
    settings: &Settings,
    control: &Control,
    volumes: Arc<VolumeStore>,
    ingress: Arc<compute_ingress::Ingress>,
) -> (Arc<Workloads>, Arc<Builds>) {
    let agent_bin = settings.agent_bin.clone().unwrap_or_else(|| {
        std::env::current_exe().map(|p| p.with_file_name("compute-agent")).unwrap_or_else(|_| "compute-agent".into())
    });
    let runsc_bin = which("runsc").unwrap_or_else(|| "runsc".into());
    let (isolation, reason) = match settings.isolation {
        Some(i) => (i, "chosen by configuration".to_string()),
        None => match probe_runsc(&runsc_bin, data_dir) {
            Ok(()) => (
                Isolation::Gvisor,
                format!("the default: runsc ({}) runs sandboxes on this machine", runsc_bin.display()),
            ),
            Err(why) => (Isolation::Native, format!("runsc is not usable here ({why}); set --isolation to choose")),
        },
    };
    let runtime = if !agent_bin.exists() {
        Err(format!(
            "the sandbox agent {} does not exist: build it (cargo build) or set --agent-bin",
            agent_bin.display()
        ))
    } else if !nix_is_root() {
        Err("sandboxes need root (namespaces, cgroups, mounts); run compute serve as root".to_string())
    } else {
        Runtime::new(RuntimeConfig {
            state_dir: data_dir.join("sandboxes"),
            agent_bin,
            isolation,
            runsc_bin,
            cgroup_parent: format!("compute-{}", short_hash(data_dir)),
            network: NetworkConfig::default(),
            user_namespace: settings.user_namespace,
        })
        .map_err(|e| e.to_string())
    };
    match &runtime {
        Ok(rt) => {
            tracing::info!(isolation = %rt.isolation(), reason, cgroups = ?rt.cgroup_version(), "sandbox runtime ready");
            match rt.user_namespace() {
                Ok(()) => tracing::info!(
                    "native sandboxes run in user namespaces: root inside is an unprivileged host user, each sandbox \
                     its own id range"
                ),
                Err(why) => tracing::info!(reason = why, "sandboxes run without a user namespace of ours"),
            }
        }
        Err(why) => tracing::warn!("sandboxes are unavailable on this server: {why}"),
    }
    let image_dir = settings.image_dir.clone().unwrap_or_else(|| data_dir.join("images"));
    let debian_mirror = match &settings.debian_mirror {
        Some(uri) => Some(compute_image::Mirror { uri: uri.clone() }),
        None => compute_image::Mirror::from_host(),
    };
    for (from, to) in &settings.image_aliases {
        tracing::info!(image = %from, alias = %to, "operator image alias configured");
    }
    let providers: Vec<String> = settings.image_providers.iter().map(ToString::to_string).collect();
    tracing::info!(
        providers = %providers.join(","),
        debian_mirror = debian_mirror.as_ref().map(|m| m.uri.as_str()).unwrap_or("none"),
        registry_mirrors = ?settings.registry.mirrors,
        "image providers"
    );
    let options = compute_image::StoreOptions {
        debian_mirror,
        aliases: settings.image_aliases.clone(),
        providers: settings.image_providers.clone(),
        registry: settings.registry.clone(),
    };
    let images = Arc::new(ImageStore::new(&image_dir, options).expect("creating the image store"));
    let builds = Builds::with_step_timeout(
        images.clone(),
        runtime.clone(),
        data_dir.join("logs").join("builds"),
        settings.build_step_timeout,
    );
    let workloads = Workloads::new(
        control.store().clone(),
        runtime,
        images,
        volumes,
        control.secrets().clone(),
        WorkloadConfig {
            log_dir: data_dir.join("logs"),
            default_memory: settings.default_memory,
            pids_limit: settings.pids_limit,
            disk_bytes: 8 << 30,
            mounts_dir: data_dir.join("volumes").join("mounts"),
            memory_capacity: node_memory()
                .map(|node_bytes| MemoryCapacity { node_bytes, overcommit: settings.memory_overcommit }),
        },
        ingress,
    );
    match workloads.reconcile().await {
        Ok(0) => {}
        Ok(n) => tracing::warn!(count = n, "marked workloads left live by a previous run as failed"),
        Err(e) => tracing::error!(error = %e, "reconciling workloads failed"),
    }
    (workloads, builds)
}

/// gVisor is the default wherever it works: runs `true` in a throwaway runsc sandbox (systrap platform).
fn probe_runsc(runsc: &Path, data_dir: &Path) -> Result<(), String> {
    let root = data_dir.join("sandboxes").join(".runsc-probe");
    let out = std::process::Command::new(runsc)
        .arg("--root")
        .arg(&root)
        .args(["--platform=systrap", "--network=none", "--ignore-cgroups", "do", "true"])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", runsc.display()))?;
    let _ = std::fs::remove_dir_all(&root);
    if out.status.success() {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        Err(err.lines().last().unwrap_or("runsc failed").to_string())
    }
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// A short stable tag for a data directory, so two servers on one host keep separate cgroups.
fn short_hash(p: &Path) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    p.hash(&mut h);
    format!("{:08x}", h.finish() as u32)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

fn restrict_permissions(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    // The directory holds the store (client hashes, signing keys) and the admin secret.
    if let Err(e) = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)) {
        tracing::warn!(error = %e, dir = %dir.display(), "could not restrict the data directory to its owner");
    }
}
