//! `bench-api`: unary RPC latency and throughput of Compute's front door over h2c, next to a bare tonic server
//! serving the same method from the same generated code, measured in the same run with the same client.
//!
//! Method: `chalk.server.v1.TeamService/GetEnv` with a real token. On Compute that is the whole path a
//! resource call takes (protocol detection, routing, token verification against the store, metrics); on the
//! bare server it is tonic alone with a constant answer. Targets: ≥ 0.8× the bare server's throughput,
//! p50 ≤ 300 µs.
//!
//! Usage: cargo run --release -p compute-bench --bin bench-api [-- --seconds 5 --concurrency 64]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use compute_bench::{arg, wait_text};
use compute_proto::chalk::server::v1::auth_service_client::AuthServiceClient;
use compute_proto::chalk::server::v1::team_service_client::TeamServiceClient;
use compute_proto::chalk::server::v1::team_service_server::{TeamService, TeamServiceServer};
use compute_proto::chalk::server::v1::{Environment, GetEnvRequest, GetEnvResponse, GetTokenRequest};
use tonic::transport::{Channel, Endpoint};

struct Bare;

#[tonic::async_trait]
impl TeamService for Bare {
    async fn get_env(
        &self,
        _req: tonic::Request<GetEnvRequest>,
    ) -> Result<tonic::Response<GetEnvResponse>, tonic::Status> {
        Ok(tonic::Response::new(GetEnvResponse {
            environment: Some(Environment { id: "env-bare".into(), name: "default".into(), ..Default::default() }),
        }))
    }
}

struct Figures {
    p50_us: f64,
    p99_us: f64,
    rps: f64,
}

fn main() -> anyhow::Result<()> {
    compute_bench::usage(
        "bench-api",
        "unary RPC latency and throughput of Compute's front door next to a bare tonic server, same run",
        &[
            ("--seconds", "N", "seconds per measurement (default 5)"),
            ("--concurrency", "N", "requests in flight (default 64)"),
            ("--bare-server", "", "(internal) serve as the bare peer"),
        ],
    );
    if std::env::args().any(|a| a == "--bare-server") {
        return bare_server();
    }
    let seconds: u64 = arg("--seconds", 5);
    let concurrency: usize = arg("--concurrency", 64);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;

    // Compute, as a user runs it.
    let data_dir = std::env::temp_dir().join(format!("compute-bench-api-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data_dir);
    std::fs::create_dir_all(&data_dir)?;
    let server = compute_bench::Server::start("api", &[])?;
    let creds = server.creds.clone();
    let compute_addr: SocketAddr = server.info["listen"].as_str().unwrap_or_default().parse()?;

    // The peer, in its own process like Compute.
    let port_file = data_dir.join("bare.port");
    let mut bare =
        spawn(Command::new(std::env::current_exe()?).arg("--bare-server").env("BARE_PORT_FILE", &port_file))?;
    let bare_addr: SocketAddr = wait_text(&port_file)?.trim().parse()?;

    let result = rt.block_on(async {
        let compute_ch = channel(compute_addr).await?;
        let token = AuthServiceClient::new(compute_ch.clone())
            .get_token(GetTokenRequest {
                client_id: creds["client_id"].as_str().unwrap_or_default().into(),
                client_secret: creds["client_secret"].as_str().unwrap_or_default().into(),
                grant_type: "client_credentials".into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .access_token;
        let bare_ch = channel(bare_addr).await?;
        // Warm both up, then measure alternately so neither gets a quieter machine.
        measure(bare_ch.clone(), None, 1, Duration::from_millis(500)).await?;
        measure(compute_ch.clone(), Some(&token), 1, Duration::from_millis(500)).await?;
        let d = Duration::from_secs(seconds);
        let bare_lat = measure(bare_ch.clone(), None, 1, d).await?;
        let compute_lat = measure(compute_ch.clone(), Some(&token), 1, d).await?;
        let bare_tp = measure(bare_ch, None, concurrency, d).await?;
        let compute_tp = measure(compute_ch, Some(&token), concurrency, d).await?;
        anyhow::Ok((compute_lat, bare_lat, compute_tp, bare_tp))
    });
    server.stop();
    let _ = bare.kill();
    let _ = bare.wait();
    let _ = std::fs::remove_dir_all(&data_dir);
    let (compute_lat, bare_lat, compute_tp, bare_tp) = result?;

    println!("bench/api: unary TeamService/GetEnv over h2c, {seconds}s per phase, same client for both");
    println!("{:<28} {:>12} {:>12} {:>8}", "", "compute", "bare tonic", "ratio");
    println!(
        "{:<28} {:>12.0} {:>12.0} {:>7.2}x",
        "latency p50 (µs, 1 in flight)",
        compute_lat.p50_us,
        bare_lat.p50_us,
        compute_lat.p50_us / bare_lat.p50_us
    );
    println!(
        "{:<28} {:>12.0} {:>12.0} {:>7.2}x",
        "latency p99 (µs, 1 in flight)",
        compute_lat.p99_us,
        bare_lat.p99_us,
        compute_lat.p99_us / bare_lat.p99_us
    );
    println!(
        "{:<28} {:>12.0} {:>12.0} {:>7.2}x",
        format!("throughput (rps, {concurrency} in flight)"),
        compute_tp.rps,
        bare_tp.rps,
        compute_tp.rps / bare_tp.rps
    );
    println!(
        "targets: throughput ratio >= 0.80 ({}), p50 <= 300 µs ({})",
        verdict(compute_tp.rps / bare_tp.rps >= 0.8),
        verdict(compute_lat.p50_us <= 300.0)
    );
    Ok(())
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

async fn channel(addr: SocketAddr) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?.tcp_nodelay(true).connect().await?)
}

async fn measure(ch: Channel, token: Option<&str>, workers: usize, d: Duration) -> anyhow::Result<Figures> {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut tasks = Vec::new();
    let started = Instant::now();
    for _ in 0..workers {
        let mut client = TeamServiceClient::new(ch.clone());
        let (stop, count, auth) = (stop.clone(), count.clone(), auth.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(100_000);
            while !stop.load(Ordering::Relaxed) {
                let mut req = tonic::Request::new(GetEnvRequest {});
                if let Some(a) = &auth {
                    req.metadata_mut().insert("authorization", a.parse().expect("ascii token"));
                }
                let t = Instant::now();
                client.get_env(req).await?;
                lat.push(t.elapsed().as_nanos() as u64);
                count.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(lat)
        }));
    }
    tokio::time::sleep(d).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)] as f64 / 1000.0;
    Ok(Figures { p50_us: pct(0.50), p99_us: pct(0.99), rps: count.load(Ordering::Relaxed) as f64 / elapsed })
}

fn bare_server() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let port_file = std::env::var("BARE_PORT_FILE")?;
        std::fs::write(format!("{port_file}.tmp"), addr.to_string())?;
        std::fs::rename(format!("{port_file}.tmp"), &port_file)?;
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(TeamServiceServer::new(Bare))
            .serve_with_incoming(tokio_stream_from(listener))
            .await?;
        anyhow::Ok(())
    })
}

fn tokio_stream_from(
    listener: tokio::net::TcpListener,
) -> impl tonic::codegen::tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    tonic::codegen::tokio_stream::wrappers::TcpListenerStream::new(listener)
}

fn spawn(cmd: &mut Command) -> anyhow::Result<Child> {
    Ok(cmd.stdout(Stdio::null()).stderr(Stdio::inherit()).spawn()?)
}
