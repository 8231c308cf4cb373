//! The gvisor backend: runsc (systrap platform) runs the agent as the container's process, over an OCI bundle
//! whose root is the same overlay the native backend uses, in the sandbox's network namespace.

use std::process::Stdio;

use compute_agent_protocol::{ServeConfig, VisibleLimits};

use super::{Backend, Launch};
use crate::cgroup::{Cgroup, Limits};
use crate::{Isolation, RuntimeConfig, RuntimeError};

/// gVisor's runsc.
pub struct Gvisor;

impl Backend for Gvisor {
    fn isolation(&self) -> Isolation {
        Isolation::Gvisor
    }

    fn check(&self, config: &RuntimeConfig) -> Result<(), RuntimeError> {
        check(config)
    }

    fn create_cgroup(&self, cgroup: &Cgroup, limits: &Limits) -> Result<(), RuntimeError> {
        // The host cgroup holds gVisor's Sentry, not the workload's processes (those are gVisor tasks, limited
        // inside by the spec): leave room for the Sentry's own threads. Memory still bounds the whole sandbox.
        cgroup.create_flat(&Limits { pids: limits.pids * 4 + 512, ..*limits })
    }

    fn launch(&self, l: Launch<'_>) -> Result<tokio::process::Child, RuntimeError> {
        spawn(l)
    }

    fn forget(&self, config: &RuntimeConfig, id: &str) {
        delete(config, id)
    }
}

/// The shared libraries the agent binary needs (and its dynamic loader, first), found with `ldd`. They are
/// bind-mounted into the sandbox under `/.compute/lib` and the agent is started through that loader, so it
/// runs whatever libc the image has (or none).
pub fn agent_libraries(agent: &std::path::Path) -> Result<Vec<std::path::PathBuf>, RuntimeError> {
    let out = std::process::Command::new("ldd")
        .arg(agent)
        .output()
        .map_err(|e| RuntimeError::io("running ldd on the agent", e))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("statically linked") || text.contains("not a dynamic executable") {
        return Ok(vec![]);
    }
    let mut loader = None;
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some((_, path)) = line.split_once("=> ") {
            let path = path.split(" (").next().unwrap_or("").trim();
            if path.starts_with('/') {
                libs.push(std::path::PathBuf::from(path));
            }
        } else if line.starts_with('/') {
            loader = line.split(" (").next().map(std::path::PathBuf::from);
        }
    }
    let loader = loader
        .ok_or_else(|| RuntimeError::Unsupported(format!("cannot find the dynamic loader of {}", agent.display())))?;
    Ok(std::iter::once(loader).chain(libs).collect())
}

/// Checks that runsc is there and new enough for systrap.
fn check(cfg: &RuntimeConfig) -> Result<(), RuntimeError> {
    let out = std::process::Command::new(&cfg.runsc_bin).arg("--version").output().map_err(|e| {
        RuntimeError::Unsupported(format!("gvisor isolation needs runsc ({}): {e}", cfg.runsc_bin.display()))
    })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let help = std::process::Command::new(&cfg.runsc_bin).args(["help", "flags"]).output().ok();
    let has_systrap = help
        .map(|h| {
            String::from_utf8_lossy(&h.stdout).contains("systrap")
                || String::from_utf8_lossy(&h.stderr).contains("systrap")
        })
        .unwrap_or(false)
        || !text.contains("20221219");
    if !has_systrap {
        return Err(RuntimeError::Unsupported(format!(
            "runsc at {} ({}) is too old for --platform=systrap: install the bookworm-backports build",
            cfg.runsc_bin.display(),
            text.lines().next().unwrap_or("")
        )));
    }
    Ok(())
}

fn runsc_root(cfg: &RuntimeConfig) -> String {
    cfg.state_dir.join(".runsc").to_string_lossy().into_owned()
}

/// Writes the bundle and starts `runsc run` with the agent's protocol on its stdio.
fn spawn(l: Launch<'_>) -> Result<tokio::process::Child, RuntimeError> {
    let Launch { config: cfg, spec, dir, rootfs, net, binds, entrypoint, limits, cgroup, stderr, userns: _ } = l;
    let shim = super::statx_shim::for_rootfs(&cfg.agent_bin, &rootfs.merged);
    let mut env = spec.env.clone();
    if shim.is_some() {
        super::statx_shim::preload(&mut env);
    }
    let serve = ServeConfig {
        env,
        workdir: spec.workdir.clone(),
        entrypoint,
        user: spec.user.clone(),
        visible_limits: Some(VisibleLimits {
            memory_bytes: limits.memory_bytes,
            cpu_quota_us: limits.cpu_millis.map(|c| (c * 100).max(1000)),
            cpu_period_us: 100_000,
            pids_max: limits.pids,
        }),
    };
    let serve_path = dir.join("serve.json");
    std::fs::write(&serve_path, serde_json::to_vec(&serve).expect("serve config serializes"))
        .map_err(|e| RuntimeError::io("writing serve.json", e))?;
    let mut mounts = vec![
        serde_json::json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        // /dev (with pts and ptmx) is runsc's own.
        serde_json::json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        serde_json::json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
        // gVisor's own cgroup filesystem, where the agent shows the limits the host cgroup enforces.
        serde_json::json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup"}),
        serde_json::json!({"destination": "/.compute/agent", "type": "bind", "source": cfg.agent_bin, "options": ["rbind", "ro"]}),
        serde_json::json!({"destination": "/.compute/serve.json", "type": "bind", "source": serve_path, "options": ["rbind", "ro"]}),
    ];
    if let Some(shim) = &shim {
        let inside = super::statx_shim::PATH_INSIDE;
        mounts.push(
            serde_json::json!({"destination": inside, "type": "bind", "source": shim, "options": ["rbind", "ro"]}),
        );
    }
    let libs = agent_libraries(&cfg.agent_bin)?;
    for lib in &libs {
        let name = lib.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        mounts.push(serde_json::json!({"destination": format!("/.compute/lib/{name}"), "type": "bind", "source": lib, "options": ["rbind", "ro"]}));
    }
    let args: Vec<String> = match libs.first() {
        Some(loader) => {
            let name = loader.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            vec![
                format!("/.compute/lib/{name}"),
                "--library-path".into(),
                "/.compute/lib".into(),
                "/.compute/agent".into(),
                "serve".into(),
                "/.compute/serve.json".into(),
            ]
        }
        None => vec!["/.compute/agent".into(), "serve".into(), "/.compute/serve.json".into()],
    };
    for (src, dst, ro) in binds {
        let mut opts = vec!["rbind"];
        if *ro {
            opts.push("ro");
        }
        mounts.push(serde_json::json!({"destination": dst, "type": "bind", "source": src, "options": opts}));
    }
    let mut resources = serde_json::json!({ "pids": { "limit": limits.pids } });
    if let Some(m) = limits.memory_bytes {
        resources["memory"] = serde_json::json!({ "limit": m });
    }
    if let Some(c) = limits.cpu_millis {
        resources["cpu"] = serde_json::json!({ "quota": (c * 100).max(1000), "period": 100000 });
    }
    let config = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "cwd": "/",
            "capabilities": caps(),
            "noNewPrivileges": true
        },
        "root": {"path": rootfs.merged, "readonly": false},
        "hostname": spec.hostname,
        "mounts": mounts,
        "linux": {
            "namespaces": [
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                {"type": "network", "path": net.netns_path()}
            ],
            "resources": resources
        }
    });
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config).expect("OCI config serializes"))
        .map_err(|e| RuntimeError::io("writing config.json", e))?;
    // The network: gVisor's own netstack would be the stronger choice, but runsc of 2024 refuses it on
    // kernels where `net.core.rmem_default` is per namespace (it takes that as "this is the root namespace").
    // The sandbox therefore uses the host stack of its own private namespace (veth, NAT and the nftables rules
    // apply exactly as for the native backend); every other syscall still goes to gVisor's kernel.
    let cgroup_procs = cgroup
        .procs_files()
        .iter()
        .map(|p| {
            std::fs::OpenOptions::new().write(true).open(p).map_err(|e| RuntimeError::io(format!("opening {p}"), e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut cmd = tokio::process::Command::new(&cfg.runsc_bin);
    cmd.args(["--root", &runsc_root(cfg), "--platform=systrap", "--network=host", "--host-uds=none"])
        // Compute owns the sandbox's host cgroup (as for native sandboxes, so limits, OOM accounting and cleanup
        // work the same way); gVisor shows the limits inside through its own cgroupfs.
        .args(["--ignore-cgroups", "--cgroupfs"])
        // Writes go to the root filesystem Compute mounted (its capped writable layer, or an image layer being
        // built), not to an overlay of runsc's own.
        .arg("--overlay2=none")
        .arg("run")
        .arg("--bundle")
        .arg(dir)
        .arg(&spec.id)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(false);
    let fds: Vec<i32> = cgroup_procs.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
    // SAFETY: the closure only calls write(2), which is async-signal-safe, on descriptors that stay open in the
    // parent until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            for fd in &fds {
                if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| RuntimeError::io(format!("starting {}", cfg.runsc_bin.display()), e));
    drop(cgroup_procs);
    child
}

fn caps() -> serde_json::Value {
    let keep = [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FOWNER",
        "CAP_FSETID",
        "CAP_KILL",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_MKNOD",
        "CAP_AUDIT_WRITE",
        "CAP_SETFCAP",
    ];
    serde_json::json!({ "bounding": keep, "effective": keep, "permitted": keep })
}

/// Forcibly removes runsc's container and sandbox `id`, if any.
fn delete(cfg: &RuntimeConfig, id: &str) {
    let _ = std::process::Command::new(&cfg.runsc_bin)
        .args(["--root", &runsc_root(cfg), "delete", "-force", id])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}
