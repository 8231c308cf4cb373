//! The gvisor backend: runsc (systrap platform) runs the agent as the container's process, over an OCI bundle
//! whose root is the same overlay the native backend uses, in the sandbox's network namespace.

use std::path::Path;
use std::process::Stdio;

use compute_agent_protocol::{ServeConfig, Spawn};

use crate::cgroup::Limits;
use crate::network::SandboxNet;
use crate::rootfs::Rootfs;
use crate::sandbox::SandboxSpec;
use crate::{RuntimeConfig, RuntimeError};

/// Checks that runsc is there and new enough for systrap, and that the agent is a static binary.
pub fn check(cfg: &RuntimeConfig) -> Result<(), RuntimeError> {
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
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    cfg: &RuntimeConfig,
    spec: &SandboxSpec,
    dir: &Path,
    rootfs: &Rootfs,
    net: &SandboxNet,
    binds: &[(String, String, bool)],
    entrypoint: Option<Spawn>,
    limits: Limits,
    stderr: std::fs::File,
) -> Result<tokio::process::Child, RuntimeError> {
    let serve = ServeConfig { env: spec.env.clone(), workdir: spec.workdir.clone(), entrypoint };
    let serve_path = dir.join("serve.json");
    std::fs::write(&serve_path, serde_json::to_vec(&serve).expect("serve config serializes"))
        .map_err(|e| RuntimeError::io("writing serve.json", e))?;
    let mut mounts = vec![
        serde_json::json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        serde_json::json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        serde_json::json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}),
        serde_json::json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        serde_json::json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
        serde_json::json!({"destination": "/.compute/agent", "type": "bind", "source": cfg.agent_bin, "options": ["rbind", "ro"]}),
        serde_json::json!({"destination": "/.compute/serve.json", "type": "bind", "source": serve_path, "options": ["rbind", "ro"]}),
    ];
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
            "args": ["/.compute/agent", "serve", "/.compute/serve.json"],
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
            "cgroupsPath": format!("/{}/{}", cfg.cgroup_parent, spec.id),
            "resources": resources
        }
    });
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config).expect("OCI config serializes"))
        .map_err(|e| RuntimeError::io("writing config.json", e))?;
    tokio::process::Command::new(&cfg.runsc_bin)
        .args(["--root", &runsc_root(cfg), "--platform=systrap", "--network=sandbox", "--host-uds=none"])
        .arg("run")
        .arg("--bundle")
        .arg(dir)
        .arg(&spec.id)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(false)
        .spawn()
        .map_err(|e| RuntimeError::io(format!("starting {}", cfg.runsc_bin.display()), e))
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
pub async fn delete(cfg: &RuntimeConfig, id: &str) {
    let _ = tokio::process::Command::new(&cfg.runsc_bin)
        .args(["--root", &runsc_root(cfg), "delete", "-force", id])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
}
