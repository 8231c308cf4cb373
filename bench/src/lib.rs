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
        Self::start_with_config(name, extra, None)
    }

    /// The same with `config` as the data directory's `config.toml` (settings only the file holds).
    pub fn start_with_config(name: &str, extra: &[&str], config: Option<&str>) -> anyhow::Result<Server> {
        let data_dir = std::env::temp_dir().join(format!("compute-bench-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data_dir);
        if let Some(config) = config {
            std::fs::create_dir_all(&data_dir)?;
            std::fs::write(data_dir.join("config.toml"), config)?;
        }
        let child = Command::new(compute_bin()?)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data_dir)
            .args(extra)
            // Quiet unless asked otherwise (e.g. COMPUTE_LOG=warn,compute_runtime=debug for start phases).
            .env("COMPUTE_LOG", std::env::var("COMPUTE_LOG").unwrap_or_else(|_| "warn".into()))
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
        if let Ok(v) = serde_json::from_str(&wait_text(path)?) {
            return Ok(v);
        }
        anyhow::ensure!(Instant::now() < deadline, "timed out reading {}", path.display());
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

/// One option of a benchmark: its flag, the value it takes (empty for none) and what it does.
pub type Opt = (&'static str, &'static str, &'static str);

/// What is wrong with a benchmark's command line: `Ok(true)` when it asks for help, an error naming an option
/// that is not one of `opts` (or lacks its value).
pub fn check_args(args: &[String], opts: &[Opt]) -> Result<bool, String> {
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        if a == "--help" || a == "-h" {
            return Ok(true);
        }
        match opts.iter().find(|(flag, _, _)| *flag == a) {
            Some((_, value, _)) if !value.is_empty() => {
                if args.get(i + 1).is_none() {
                    return Err(format!("{a} needs a value ({value})"));
                }
                i += 2;
            }
            Some(_) => i += 1,
            None => return Err(format!("unknown option {a:?} (--help lists the options)")),
        }
    }
    Ok(false)
}

/// Reads the command line before a benchmark runs: prints `about` and the options and exits on `--help`/`-h`,
/// and exits with status 2 naming a wrong option, so that no asking for help starts a measurement.
pub fn usage(name: &str, about: &str, opts: &[Opt]) {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let text = || {
        let mut t = format!("{name}: {about}\n\nUsage: {name} [OPTIONS]\n\nOptions:\n");
        for (flag, value, help) in opts {
            let left = if value.is_empty() { flag.to_string() } else { format!("{flag} {value}") };
            t.push_str(&format!("  {left:<24} {help}\n"));
        }
        t.push_str(&format!("  {:<24} print this help\n", "-h, --help"));
        t
    };
    match check_args(&args, opts) {
        Ok(true) => {
            print!("{}", text());
            std::process::exit(0);
        }
        Ok(false) => {}
        Err(e) => {
            eprintln!("{name}: {e}\n\n{}", text());
            std::process::exit(2);
        }
    }
}

/// The value of `--name VALUE` on the command line, or `default`.
pub fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Waits for a non-empty text file to appear.
pub fn wait_text(path: &Path) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if !text.is_empty() {
                return Ok(text);
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A signed-in client of a benchmarked server's sandbox API, making the calls the SDK makes.
pub struct Api {
    /// The connection.
    pub ch: tonic::transport::Channel,
    bearer: String,
}

impl Api {
    /// Connects to `server` and gets a token with its admin credentials.
    pub async fn connect(server: &Server) -> anyhow::Result<Api> {
        use compute_proto::chalk::server::v1::auth_service_client::AuthServiceClient;
        use compute_proto::chalk::server::v1::GetTokenRequest;
        let ch = tonic::transport::Endpoint::from_shared(server.url())?.tcp_nodelay(true).connect().await?;
        let token = AuthServiceClient::new(ch.clone())
            .get_token(GetTokenRequest {
                client_id: server.creds["client_id"].as_str().unwrap_or_default().into(),
                client_secret: server.creds["client_secret"].as_str().unwrap_or_default().into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .access_token;
        Ok(Api { ch, bearer: format!("Bearer {token}") })
    }

    /// `m` with the bearer token attached.
    pub fn req<T>(&self, m: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(m);
        r.metadata_mut().insert("authorization", self.bearer.parse().expect("tokens are ASCII"));
        r
    }

    /// CreateSandbox of `image` idling on `sleep infinity`; returns its id.
    pub async fn create(
        &self,
        name: &str,
        image: &str,
        resources: Option<compute_proto::chalk::container::v1::ResourceLimits>,
    ) -> anyhow::Result<String> {
        use compute_proto::chalk::container::v1::ChalkContainerSpec;
        use compute_proto::chalk::sandbox::v2::create_sandbox_request::Source;
        use compute_proto::chalk::sandbox::v2::sandbox_service_client::SandboxServiceClient;
        use compute_proto::chalk::sandbox::v2::CreateSandboxRequest;
        let spec = ChalkContainerSpec {
            name: name.into(),
            image: image.into(),
            entrypoint: vec!["sleep".into(), "infinity".into()],
            resources,
            ..Default::default()
        };
        let resp = SandboxServiceClient::new(self.ch.clone())
            .create_sandbox(self.req(CreateSandboxRequest { source: Some(Source::Spec(spec)) }))
            .await?;
        Ok(resp.into_inner().sandbox.map(|s| s.id).unwrap_or_default())
    }

    /// Polls GetSandbox until Running, sleeping `first` then doubling up to `most` between polls.
    pub async fn poll_until_running(&self, id: &str, first: Duration, most: Duration) -> anyhow::Result<()> {
        use compute_proto::chalk::sandbox::v2::sandbox_service_client::SandboxServiceClient;
        use compute_proto::chalk::sandbox::v2::{GetSandboxRequest, SandboxStatus};
        let mut sb = SandboxServiceClient::new(self.ch.clone());
        let mut delay = first;
        loop {
            let req = self.req(GetSandboxRequest { id: id.into() });
            let info = sb.get_sandbox(req).await?.into_inner().sandbox.unwrap_or_default();
            match SandboxStatus::try_from(info.status) {
                Ok(SandboxStatus::Running) => return Ok(()),
                Ok(SandboxStatus::Pending) => {}
                other => anyhow::bail!("sandbox {id} is {other:?}: {:?}", info.status_message),
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(most);
        }
    }

    /// ExecCommand; fails unless the command exits 0.
    pub async fn exec(&self, id: &str, command: &str, args: &[&str]) -> anyhow::Result<()> {
        use compute_proto::chalk::sandbox::v2::sandbox_process_service_client::SandboxProcessServiceClient;
        use compute_proto::chalk::sandbox::v2::ExecCommandRequest;
        let r = SandboxProcessServiceClient::new(self.ch.clone())
            .exec_command(self.req(ExecCommandRequest {
                sandbox_id: id.into(),
                command: command.into(),
                args: args.iter().map(|a| a.to_string()).collect(),
                ..Default::default()
            }))
            .await?
            .into_inner();
        anyhow::ensure!(r.exit_code == 0, "exec failed: {}", String::from_utf8_lossy(&r.stderr));
        Ok(())
    }

    /// TerminateSandbox without a grace period.
    pub async fn terminate(&self, id: &str) -> anyhow::Result<()> {
        use compute_proto::chalk::sandbox::v2::sandbox_service_client::SandboxServiceClient;
        use compute_proto::chalk::sandbox::v2::TerminateSandboxRequest;
        SandboxServiceClient::new(self.ch.clone())
            .terminate_sandbox(
                self.req(TerminateSandboxRequest {
                    id: id.into(),
                    grace_period: Some(prost_types::Duration::default()),
                }),
            )
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn help_is_asked_for_and_wrong_options_are_named() {
        let opts: &[Opt] = &[("--runs", "N", "rounds"), ("--bare-server", "", "internal")];
        assert_eq!(check_args(&args(&["--runs", "3", "--help"]), opts), Ok(true));
        assert_eq!(check_args(&args(&["-h"]), opts), Ok(true));
        assert_eq!(check_args(&args(&["--runs", "3", "--bare-server"]), opts), Ok(false));
        assert!(check_args(&args(&["--runz", "3"]), opts).unwrap_err().contains("\"--runz\""));
        assert!(check_args(&args(&["--runs"]), opts).unwrap_err().contains("needs a value"));
    }
}
