//! `compute-agent`: PID 1 of every Compute sandbox.
//!
//! - `compute-agent init CONFIG.json` (or `fd:N`, the config on an inherited descriptor) — started on the host by the native backend: joins the sandbox's
//!   cgroups and network namespace, creates its mount, PID, UTS, IPC and cgroup namespaces, mounts `/proc`,
//!   `/dev`, `/sys`, pivots into the root filesystem, hardens itself (capability bounding set, no-new-privs,
//!   seccomp) and becomes the sandbox's PID 1 without exec'ing anything from the image — so it runs in any
//!   image, whatever its libc, even one without a shell.
//! - `compute-agent serve CONFIG.json` — already PID 1 inside a sandbox another runtime made (gVisor).
//!
//! Either way it then serves the runtime's protocol (`compute-agent-protocol`) on stdin/stdout: process
//! sessions with pipes or a PTY, stdin, signals, resizes, timeouts, file transfer; and it reaps every zombie.

mod boot;
mod files;
mod harden;
mod limits;
mod process;
mod reaper;
mod server;

use std::process::ExitCode;

const USAGE: &str = "compute-agent: PID 1 of every Compute sandbox (started by `compute serve`, not by hand)\n\n\
Usage: compute-agent init CONFIG.json|fd:N   set the sandbox up on the host (native isolation), then serve\n       \
compute-agent serve CONFIG.json        serve as PID 1 of a sandbox another runtime made (gVisor)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let result = match (args.get(1).map(String::as_str), args.get(2)) {
        (Some("init"), Some(config)) => boot::init(config),
        (Some("serve"), Some(config)) => read_config(config).and_then(|c: compute_agent_protocol::ServeConfig| {
            if let Some(limits) = &c.visible_limits {
                limits::show(limits);
                if let Some(procs) = limits::workload_pids(limits.pids_max) {
                    process::set_workload_cgroups(vec![procs]);
                }
            }
            server::serve(server::Sandbox { env: c.env, workdir: c.workdir, entrypoint: c.entrypoint, user: c.user })
        }),
        (Some("-h" | "--help" | "help"), _) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("compute-agent: {e}");
            ExitCode::from(125)
        }
    }
}

/// Reads a JSON config file.
pub fn read_config<T: for<'de> serde::Deserialize<'de>>(path: &str) -> std::io::Result<T> {
    let bytes = std::fs::read(path)?;
    serde_json::from_slice(&bytes)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("config {path}: {e}")))
}
