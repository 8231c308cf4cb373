//! Helpers shared by the benchmarks: starting a real `compute serve`, statistics, peers.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `compute` binary next to this benchmark (or `COMPUTE_BIN`).
pub fn compute_bin() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("COMPUTE_BIN") {
        return Ok(p.into());
    }
    let sibling = std::env::current_exe()?.with_file_name("compute");
    anyhow::ensure!(sibling.exists(), "build the server first: cargo build --release (or set COMPUTE_BIN)");
    Ok(sibling)
}

/// A running `compute serve` on a temporary data directory.
pub struct Server {
    /// The process.
    pub child: Child,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// `server.json`.
    pub info: serde_json::Value,
    /// `admin-credentials.json`.
    pub creds: serde_json::Value,
}

impl Server {
    /// Starts one with extra flags.
    pub fn start(name: &str, extra: &[&str]) -> anyhow::Result<Server> {
        let data_dir = std::env::temp_dir().join(format!("compute-bench-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data_dir);
        let child = Command::new(compute_bin()?)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data_dir)
            .args(extra)
            .env("COMPUTE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        let info = wait_json(&data_dir.join("server.json"))?;
        let creds = wait_json(&data_dir.join("admin-credentials.json"))?;
        Ok(Server { child, data_dir, info, creds })
    }

    /// Its URL.
    pub fn url(&self) -> String {
        self.info["url"].as_str().unwrap_or_default().to_string()
    }

    /// Stops it (SIGTERM, so it stops its sandboxes) and removes its data directory.
    pub fn stop(mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

/// Waits for a JSON file to appear and parse.
pub fn wait_json(path: &Path) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if let Ok(v) = serde_json::from_str(&text) {
                return Ok(v);
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Percentile of sorted samples.
pub fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// p50 and p99 in milliseconds.
pub fn p50_p99_ms(samples: &mut [Duration]) -> (f64, f64) {
    samples.sort_unstable();
    (pct(samples, 0.5).as_secs_f64() * 1e3, pct(samples, 0.99).as_secs_f64() * 1e3)
}
