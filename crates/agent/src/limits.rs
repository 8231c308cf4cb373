//! Limits inside an emulated cgroup filesystem (gVisor's). The host cgroup around the sandbox enforces memory and
//! cpu, but programs that size themselves from `/sys/fs/cgroup` (JVMs, Python's os.cpu_count-aware pools,
//! `nproc`-style tools) read these files, so they are written there too. The host's pids limit counts only the
//! Sentry's threads, not the sandbox's processes, so the pids limit is enforced here, by gVisor, on a `workload`
//! cgroup that every started process joins and the agent stays out of.

use std::os::fd::OwnedFd;
use std::path::Path;

use compute_agent_protocol::VisibleLimits;

const ROOT: &str = "/sys/fs/cgroup";

/// Writes the memory and cpu `limits` into the cgroup v1 files under `/sys/fs/cgroup` that exist; a failure is
/// reported, not fatal.
pub fn show(limits: &VisibleLimits) {
    // pids.max of the root is left alone: gVisor enforces it on everything in the cgroup, the agent included, so a
    // fork bomb could starve the agent of the threads it serves the sandbox with. See `workload_pids`.
    let mut writes: Vec<(&str, String)> = Vec::new();
    if let Some(m) = limits.memory_bytes {
        writes.push(("memory/memory.limit_in_bytes", m.to_string()));
    }
    if let Some(q) = limits.cpu_quota_us {
        writes.push(("cpu/cpu.cfs_period_us", limits.cpu_period_us.to_string()));
        writes.push(("cpu/cpu.cfs_quota_us", q.to_string()));
    }
    for (file, value) in writes {
        let path = Path::new(ROOT).join(file);
        if path.exists() {
            if let Err(e) = std::fs::write(&path, &value) {
                eprintln!("compute-agent: could not show the limit {value} in {}: {e}", path.display());
            }
        }
    }
}

/// Creates the `workload` pids cgroup with the sandbox's limit and opens its `cgroup.procs` for started processes
/// to join; `None` (reported) where the emulated filesystem has no pids hierarchy.
pub fn workload_pids(pids_max: u64) -> Option<OwnedFd> {
    let dir = Path::new(ROOT).join("pids/workload");
    let result = (|| {
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("pids.max"), pids_max.to_string())?;
        std::fs::OpenOptions::new().write(true).open(dir.join("cgroup.procs")).map(OwnedFd::from)
    })();
    match result {
        Ok(fd) => Some(fd),
        Err(e) => {
            eprintln!("compute-agent: no pids limit inside the sandbox ({}: {e})", dir.display());
            None
        }
    }
}
