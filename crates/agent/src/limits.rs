//! Showing the sandbox's limits in an emulated cgroup filesystem (gVisor's): the host cgroup around the sandbox
//! enforces them, but programs that size themselves from `/sys/fs/cgroup` (JVMs, Python's os.cpu_count-aware
//! pools, `nproc`-style tools) read these files.

use std::path::Path;

use compute_agent_protocol::VisibleLimits;

const ROOT: &str = "/sys/fs/cgroup";

/// Writes the memory and cpu `limits` into the cgroup v1 files under `/sys/fs/cgroup` that exist; a failure is
/// reported, not fatal.
pub fn show(limits: &VisibleLimits) {
    // pids.max is left alone: gVisor enforces it on everything in the cgroup, the agent included, which would let a
    // fork bomb starve the agent of the threads it serves the sandbox with (the host's pids limit does not count
    // the sandbox's processes, only the Sentry's threads; memory bounds a fork bomb there).
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
