//! Resource limits through cgroups: v1 controllers (memory, cpu, pids) where the host mounts them separately,
//! the unified v2 hierarchy where it has the controllers.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::RuntimeError;

const ROOT: &str = "/sys/fs/cgroup";
const V1_CONTROLLERS: &[&str] = &["memory", "cpu", "pids"];

/// Which cgroup interface the host offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// Separate hierarchies per controller.
    V1,
    /// One unified hierarchy with the memory, cpu and pids controllers.
    V2,
}

/// Detects the interface: v2 when the unified hierarchy at the root has the memory controller, else v1.
pub fn detect() -> Result<CgroupVersion, RuntimeError> {
    let controllers = std::fs::read_to_string(format!("{ROOT}/cgroup.controllers")).unwrap_or_default();
    if controllers.split_whitespace().any(|c| c == "memory") {
        return Ok(CgroupVersion::V2);
    }
    if V1_CONTROLLERS.iter().all(|c| Path::new(ROOT).join(c).is_dir()) {
        return Ok(CgroupVersion::V1);
    }
    Err(RuntimeError::Unsupported(format!(
        "no usable cgroups: neither a v2 hierarchy with the memory controller at {ROOT} nor v1 memory, cpu and pids \
         hierarchies under it"
    )))
}

fn write(path: &Path, value: &str) -> Result<(), RuntimeError> {
    std::fs::write(path, value).map_err(|e| RuntimeError::io(format!("writing {value:?} to {}", path.display()), e))
}

/// Creates the parent cgroup(s) every sandbox goes under.
pub fn prepare_parent(version: CgroupVersion, parent: &str) -> Result<(), RuntimeError> {
    match version {
        CgroupVersion::V1 => {
            for c in V1_CONTROLLERS {
                let dir = Path::new(ROOT).join(c).join(parent);
                std::fs::create_dir_all(&dir)
                    .map_err(|e| RuntimeError::io(format!("creating {}", dir.display()), e))?;
            }
        }
        CgroupVersion::V2 => {
            let dir = Path::new(ROOT).join(parent);
            std::fs::create_dir_all(&dir).map_err(|e| RuntimeError::io(format!("creating {}", dir.display()), e))?;
            for d in [Path::new(ROOT), &dir] {
                let _ = std::fs::write(d.join("cgroup.subtree_control"), "+memory +cpu +pids");
            }
        }
    }
    Ok(())
}

/// Removes the parent cgroup(s) once no sandbox is left under them (a server's clean shutdown). A parent that
/// still holds a cgroup (a sandbox still stopping) stays; the next start reuses it.
pub fn remove_parent(version: CgroupVersion, parent: &str) {
    let dirs: Vec<PathBuf> = match version {
        CgroupVersion::V1 => V1_CONTROLLERS.iter().map(|c| Path::new(ROOT).join(c).join(parent)).collect(),
        CgroupVersion::V2 => vec![Path::new(ROOT).join(parent)],
    };
    for dir in dirs {
        if let Err(e) = std::fs::remove_dir(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::debug!(dir = %dir.display(), error = %e, "parent cgroup kept");
            }
        }
    }
}

/// Limits for one sandbox.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    /// CPU in thousandths of a core.
    pub cpu_millis: Option<u64>,
    /// Memory in bytes.
    pub memory_bytes: Option<u64>,
    /// Most processes at once.
    pub pids: u64,
}

/// Headroom the sandbox's own cgroup gives its agent over the workload's limits, so that the workload's
/// processes can never starve PID 1 of memory or process slots.
const AGENT_MEMORY: u64 = 32 << 20;
const AGENT_PIDS: u64 = 64;

/// One sandbox's cgroup(s): the sandbox's own (the agent lives there) and, inside it, `workload`, where every
/// process the agent starts goes and where the requested limits apply.
#[derive(Debug, Clone)]
pub struct Cgroup {
    version: CgroupVersion,
    dirs: Vec<PathBuf>,
}

impl Cgroup {
    /// The cgroup of sandbox `id` (whether it exists or not).
    pub fn of(version: CgroupVersion, parent: &str, id: &str) -> Self {
        let dirs = match version {
            CgroupVersion::V1 => V1_CONTROLLERS.iter().map(|c| Path::new(ROOT).join(c).join(parent).join(id)).collect(),
            CgroupVersion::V2 => vec![Path::new(ROOT).join(parent).join(id)],
        };
        Self { version, dirs }
    }

    fn dir(&self, controller: &str) -> &Path {
        match self.version {
            CgroupVersion::V2 => &self.dirs[0],
            CgroupVersion::V1 => {
                let i = V1_CONTROLLERS.iter().position(|c| *c == controller).expect("known controller");
                &self.dirs[i]
            }
        }
    }

    /// The workload cgroup inside this one.
    pub fn workload(&self) -> Cgroup {
        Cgroup { version: self.version, dirs: self.dirs.iter().map(|d| d.join("workload")).collect() }
    }

    /// Creates the sandbox cgroup (with headroom for the agent) and its workload cgroup (with `limits`).
    pub fn create(&self, limits: &Limits) -> Result<(), RuntimeError> {
        let outer = Limits {
            cpu_millis: limits.cpu_millis,
            memory_bytes: limits.memory_bytes.map(|m| m + AGENT_MEMORY),
            pids: limits.pids + AGENT_PIDS,
        };
        self.create_one(&outer)?;
        self.workload().create_one(limits)
    }

    /// Creates just this cgroup with `limits` (no workload cgroup inside).
    pub fn create_flat(&self, limits: &Limits) -> Result<(), RuntimeError> {
        self.create_one(limits)
    }

    fn create_one(&self, limits: &Limits) -> Result<(), RuntimeError> {
        for d in &self.dirs {
            std::fs::create_dir_all(d).map_err(|e| RuntimeError::io(format!("creating cgroup {}", d.display()), e))?;
        }
        match self.version {
            CgroupVersion::V1 => {
                if let Some(m) = limits.memory_bytes {
                    write(&self.dir("memory").join("memory.limit_in_bytes"), &m.to_string())?;
                    // No swapping around the limit: a sandbox over its memory is OOM-killed, visibly.
                    let _ = std::fs::write(self.dir("memory").join("memory.swappiness"), "0");
                }
                if let Some(c) = limits.cpu_millis {
                    write(&self.dir("cpu").join("cpu.cfs_period_us"), "100000")?;
                    write(&self.dir("cpu").join("cpu.cfs_quota_us"), &(c * 100).max(1000).to_string())?;
                }
                write(&self.dir("pids").join("pids.max"), &limits.pids.to_string())?;
            }
            CgroupVersion::V2 => {
                let d = &self.dirs[0];
                if let Some(m) = limits.memory_bytes {
                    write(&d.join("memory.max"), &m.to_string())?;
                    let _ = std::fs::write(d.join("memory.swap.max"), "0");
                }
                if let Some(c) = limits.cpu_millis {
                    write(&d.join("cpu.max"), &format!("{} 100000", (c * 100).max(1000)))?;
                }
                write(&d.join("pids.max"), &limits.pids.to_string())?;
            }
        }
        Ok(())
    }

    /// The `cgroup.procs` files a process writes its pid to, to join.
    pub fn procs_files(&self) -> Vec<String> {
        self.dirs.iter().map(|d| d.join("cgroup.procs").to_string_lossy().into_owned()).collect()
    }

    /// How many times the kernel OOM-killed a process in this cgroup.
    pub fn oom_kills(&self) -> u64 {
        let (file, key) = match self.version {
            CgroupVersion::V1 => (self.dir("memory").join("memory.oom_control"), "oom_kill"),
            CgroupVersion::V2 => (self.dirs[0].join("memory.events"), "oom_kill"),
        };
        std::fs::read_to_string(file)
            .ok()
            .and_then(|s| s.lines().find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().parse::<u64>().ok())))
            .unwrap_or(0)
    }

    /// Memory in use, bytes.
    pub fn memory_usage(&self) -> Option<u64> {
        let file = match self.version {
            CgroupVersion::V1 => self.dir("memory").join("memory.usage_in_bytes"),
            CgroupVersion::V2 => self.dirs[0].join("memory.current"),
        };
        std::fs::read_to_string(file).ok()?.trim().parse().ok()
    }

    /// CPU time used by the processes in this cgroup and its workload cgroup, and by the children they reaped.
    ///
    /// Read from `/proc/PID/stat` rather than `cpuacct`, which v1 hosts often mount apart from `cpu` (this one
    /// does) and which gVisor's host processes would report the same way: the sandbox's own processes are what
    /// run its workload under both backends. Processes that exited unreaped by a member are not counted.
    pub fn cpu_time(&self) -> Duration {
        // SAFETY: sysconf only reads a configuration value.
        let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        let mut pids = self.pids();
        pids.extend(self.workload().pids());
        pids.sort_unstable();
        pids.dedup();
        let ticks: u64 = pids
            .iter()
            .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
            .map(|stat| process_ticks(&stat))
            .sum();
        Duration::from_nanos(ticks.saturating_mul(1_000_000_000 / ticks_per_second))
    }

    fn pids(&self) -> Vec<i32> {
        let mut out = Vec::new();
        for d in &self.dirs {
            if let Ok(s) = std::fs::read_to_string(d.join("cgroup.procs")) {
                out.extend(s.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// SIGKILLs every process in the cgroup and its workload cgroup until none is left, then removes both.
    pub fn destroy(&self) -> Result<(), RuntimeError> {
        let workload = self.workload();
        if workload.exists() {
            workload.destroy_one()?;
        }
        self.destroy_one()
    }

    fn destroy_one(&self) -> Result<(), RuntimeError> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                // SAFETY: kill has no memory effects; the pid may already be gone.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            if Instant::now() > deadline {
                return Err(RuntimeError::Unsupported(format!(
                    "processes in {} survived SIGKILL for 5 s",
                    self.dirs[0].display()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        for d in &self.dirs {
            // A just-killed process may linger briefly as the cgroup empties: retry rmdir for a moment.
            let mut tries = 0;
            while d.exists() {
                match std::fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(_) if tries < 200 => {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => return Err(RuntimeError::io(format!("removing cgroup {}", d.display()), e)),
                }
            }
        }
        Ok(())
    }

    /// Whether any of this cgroup's directories exist.
    pub fn exists(&self) -> bool {
        self.dirs.iter().any(|d| d.exists())
    }
}

/// utime + stime + cutime + cstime of one `/proc/PID/stat` line, in clock ticks. The command name (field 2) may
/// hold spaces and parentheses, so fields are counted after its last ')'.
fn process_ticks(stat: &str) -> u64 {
    let Some((_, rest)) = stat.rsplit_once(')') else { return 0 };
    rest.split_whitespace().skip(11).take(4).filter_map(|f| f.parse::<i64>().ok()).map(|t| t.max(0) as u64).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_ticks_counts_own_and_reaped_time_past_a_tricky_name() {
        let stat = "42 (a) b) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 11 5 20 0 1 0 100 1000 10";
        assert_eq!(process_ticks(stat), 7 + 3 + 11 + 5);
        assert_eq!(process_ticks("garbage"), 0);
        let own = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(own.rsplit_once(')').unwrap().1.split_whitespace().count() > 15);
    }
}
