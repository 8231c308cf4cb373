//! `bench-ingress`: requests through a scaling group's ingress, next to nginx proxying to the same replica and to
//! the replica reached directly, measured in the same run with the same client.
//!
//! One group with one replica (a minimal keep-alive HTTP/1.1 server in Python, so the replica is cheap next to the
//! proxies). For each path, `--concurrency` clients send `GET /` over kept-alive HTTP/1.1 connections for
//! `--seconds`; the paths take turns over `--rounds` rounds and the medians are printed. What a proxy costs is its
//! latency over the direct path and its throughput next to nginx's (`proxy_pass` with an upstream keepalive pool,
//! one worker per core). nginx is optional: without it the bench says so and prints the other two.
//!
//! Then a cold request: a group scaled to zero gets one request, and the time to its answer (a replica started
//! from nothing, found ready, and the request held and proxied) is printed next to the same server started as a
//! plain host process until it answers, over `--cold-runs` runs.
//!
//! Usage: cargo run --release -p compute-bench --bin bench-ingress [-- --seconds 3 --rounds 3 --concurrency 32
//! --isolation native|gvisor --cold-runs 5]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use compute_bench::{arg, p50_p99_ms, Api};
use compute_proto::chalk::container::v1::ChalkContainerSpec;
use compute_proto::chalk::scalinggroup::v1::scaling_group_manager_service_client::ScalingGroupManagerServiceClient;
use compute_proto::chalk::scalinggroup::v1::{
    CreateScalingGroupRequest, GetScalingGroupRequest, ScalingGroupSpec, ScalingSpec,
};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Answers every request on a kept-alive connection with a fixed 2-byte body; `/ip` answers its own address.
const REPLICA: &str = r#"
import asyncio, os
async def serve(reader, writer):
    me = writer.get_extra_info("sockname")[0].encode()
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            body = me if head.startswith(b"GET /ip ") else b"ok"
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()
async def main():
    port = int(os.environ.get("PORT", "8080"))
    server = await asyncio.start_server(serve, "0.0.0.0", port, backlog=1024)
    await server.serve_forever()
asyncio.run(main())
"#;

struct Figures {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn main() -> anyhow::Result<()> {
    compute_bench::usage(
        "bench-ingress",
        "requests through a scaling group's ingress next to nginx proxy_pass and the direct path, same run",
        &[
            ("--seconds", "N", "seconds per round (default 3)"),
            ("--rounds", "N", "alternating rounds (default 3)"),
            ("--concurrency", "N", "keep-alive clients (default 32)"),
            ("--image", "REF", "the replica's image (default python:3.13-slim-trixie)"),
            ("--isolation", "native|gvisor", "the server's isolation (default: the server's own)"),
        ],
    );
    let seconds: u64 = arg("--seconds", 3);
    let rounds: usize = arg("--rounds", 3);
    let concurrency: usize = arg("--concurrency", 32);
    let image: String = arg("--image", "python:3.13-slim-trixie".to_string());
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    // The server's default isolation unless `--isolation native|gvisor` says otherwise.
    let isolation: String = arg("--isolation", String::new());
    let flags: Vec<&str> = if isolation.is_empty() { vec![] } else { vec!["--isolation", &isolation] };
    let server = compute_bench::Server::start("ingress", &flags)?;
    let result = rt.block_on(run(&server, &image, seconds, rounds, concurrency));
    server.stop();
    result
}

async fn run(
    server: &compute_bench::Server,
    image: &str,
    seconds: u64,
    rounds: usize,
    concurrency: usize,
) -> anyhow::Result<()> {
    let api = Api::connect(server).await?;
    let mut groups = ScalingGroupManagerServiceClient::new(api.ch.clone());
    let spec = ScalingGroupSpec {
        container_spec: Some(ChalkContainerSpec {
            name: "bench-ingress".into(),
            image: image.into(),
            entrypoint: vec!["python".into(), "-c".into(), REPLICA.into()],
            port: Some(8080),
            ..Default::default()
        }),
        scaling_spec: Some(ScalingSpec { min_replicas: 1, max_replicas: 1, ..Default::default() }),
    };
    let created = groups.create_scaling_group(api.req(CreateScalingGroupRequest { spec: Some(spec) })).await?;
    let id = created.into_inner().scaling_group.map(|g| g.id).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(300);
    let web_url = loop {
        let g = groups
            .get_scaling_group(api.req(GetScalingGroupRequest { id: Some(id.clone()), ..Default::default() }))
            .await?
            .into_inner()
            .scaling_group
            .unwrap_or_default();
        if g.ready_replicas > 0 {
            break g.web_url.unwrap_or_default();
        }
        anyhow::ensure!(g.status != "Failed", "the group failed: {:?} {:?}", g.status_message, g.status_details);
        anyhow::ensure!(Instant::now() < deadline, "the group was not ready within 300 s: {:?}", g.status_message);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let client: Client<_, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).pool_max_idle_per_host(concurrency * 2).build_http();
    let ip = get(&client, &format!("{web_url}/ip")).await?;
    let direct = format!("http://{ip}:8080/");
    let nginx = start_nginx(&ip)?;
    let mut paths: Vec<(&str, String)> = vec![("direct", direct), ("compute ingress", format!("{web_url}/"))];
    if let Some((_, url)) = &nginx {
        paths.push(("nginx proxy_pass", url.clone()));
    }
    for (_, url) in &paths {
        load(&client, url, concurrency, Duration::from_millis(500)).await?;
    }
    let mut figures: Vec<Vec<Figures>> = paths.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        for (i, (_, url)) in paths.iter().enumerate() {
            figures[i].push(load(&client, url, concurrency, Duration::from_secs(seconds)).await?);
        }
    }
    let median = |v: &[Figures], f: fn(&Figures) -> f64| {
        let mut xs: Vec<f64> = v.iter().map(f).collect();
        xs.sort_by(|a, b| a.total_cmp(b));
        xs[xs.len() / 2]
    };
    println!(
        "bench-ingress: GET / through one replica, {concurrency} concurrent keep-alive HTTP/1.1 clients, median of \
         {rounds} rounds of {seconds} s"
    );
    println!("{:<18} {:>10} {:>10} {:>10}", "path", "req/s", "p50 ms", "p99 ms");
    let mut medians = Vec::new();
    for ((name, _), f) in paths.iter().zip(&figures) {
        let m = (median(f, |x| x.rps), median(f, |x| x.p50_ms), median(f, |x| x.p99_ms));
        println!("{name:<18} {:>10.0} {:>10.2} {:>10.2}", m.0, m.1, m.2);
        medians.push(m);
    }
    let (direct, ingress) = (medians[0], medians[1]);
    println!(
        "compute ingress adds {:.2} ms at p50 over the direct path and carries {:.2}x its throughput",
        ingress.1 - direct.1,
        ingress.0 / direct.0
    );
    let cold_runs: usize = arg("--cold-runs", 5);
    if cold_runs > 0 {
        cold(&api, &client, &web_url, image, cold_runs).await?;
    }
    match (medians.get(2), nginx) {
        (Some(ng), Some((mut child, _))) => {
            println!(
                "compute ingress / nginx: {:.2}x the throughput; nginx adds {:.2} ms at p50 over the direct path",
                ingress.0 / ng.0,
                ng.1 - direct.1
            );
            let _ = child.kill();
            let _ = child.wait();
        }
        _ => println!("nginx: not installed, so not measured (apt-get install nginx-light)"),
    }
    Ok(())
}

/// Cold requests through a group with `min_replicas = 0`, next to the same server started on the host.
async fn cold<C>(
    api: &Api,
    client: &Client<C, Empty<Bytes>>,
    warm_url: &str,
    image: &str,
    runs: usize,
) -> anyhow::Result<()>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let mut groups = ScalingGroupManagerServiceClient::new(api.ch.clone());
    let spec = ScalingGroupSpec {
        container_spec: Some(ChalkContainerSpec {
            name: "bench-cold".into(),
            image: image.into(),
            entrypoint: vec!["python".into(), "-c".into(), REPLICA.into()],
            port: Some(8080),
            ..Default::default()
        }),
        scaling_spec: Some(ScalingSpec {
            min_replicas: 0,
            max_replicas: 1,
            shutdown_delay_seconds: Some(1),
            ..Default::default()
        }),
    };
    groups.create_scaling_group(api.req(CreateScalingGroupRequest { spec: Some(spec) })).await?;
    let url = warm_url.replace("bench-ingress", "bench-cold");
    let mut compute = Vec::new();
    let mut host = Vec::new();
    for _ in 0..runs {
        // Wait until the group is at zero again (the shutdown delay, then the replica's teardown).
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let g = groups
                .get_scaling_group(
                    api.req(GetScalingGroupRequest { name: Some("bench-cold".into()), ..Default::default() }),
                )
                .await?
                .into_inner()
                .scaling_group
                .unwrap_or_default();
            let running = match g.metadata.get("running_replicas").and_then(|v| v.kind.clone()) {
                Some(prost_types::value::Kind::NumberValue(n)) => n,
                _ => 0.0,
            };
            if g.status == "ScaledToZero" && running == 0.0 {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "bench-cold did not scale to zero: {:?}", g.status_message);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let t = Instant::now();
        get(client, &format!("{url}/")).await?;
        compute.push(t.elapsed());

        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let t = Instant::now();
        let mut child = Command::new(host_python())
            .args(["-c", REPLICA])
            .env("PORT", port.to_string())
            .stdout(Stdio::null())
            .spawn()?;
        let direct = format!("http://127.0.0.1:{port}/");
        while get(client, &direct).await.is_err() {
            anyhow::ensure!(t.elapsed() < Duration::from_secs(30), "the host server did not answer");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        host.push(t.elapsed());
        let _ = child.kill();
        let _ = child.wait();
    }
    let (c50, c99) = p50_p99_ms(&mut compute);
    let (h50, h99) = p50_p99_ms(&mut host);
    println!(
        "cold request (group at zero -> first answer), {runs} runs: compute p50 {c50:.0} ms (max {c99:.0}); the same \
         server as a host process, start -> first answer: p50 {h50:.0} ms (max {h99:.0}); {:.2}x",
        c50 / h50
    );
    Ok(())
}

/// The host's own Python (not a version manager's shim, whose start-up would count against the peer).
fn host_python() -> &'static str {
    ["/usr/bin/python3", "/usr/local/bin/python3"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("python3")
}

async fn get<C>(client: &Client<C, Empty<Bytes>>, url: &str) -> anyhow::Result<String>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let resp = client.get(url.parse()?).await?;
    anyhow::ensure!(resp.status().is_success(), "GET {url}: {}", resp.status());
    Ok(String::from_utf8_lossy(&resp.into_body().collect().await?.to_bytes()).into_owned())
}

async fn load<C>(
    client: &Client<C, Empty<Bytes>>,
    url: &str,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<Figures>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let uri: http::Uri = url.parse()?;
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let client = client.clone();
            let uri = uri.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut samples = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let resp = client.get(uri.clone()).await?;
                    anyhow::ensure!(resp.status().is_success(), "GET {uri}: {}", resp.status());
                    resp.into_body().collect().await?;
                    samples.push(t.elapsed());
                }
                Ok::<_, anyhow::Error>(samples)
            })
        })
        .collect();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let rps = all.len() as f64 / elapsed;
    let (p50_ms, p99_ms) = p50_p99_ms(&mut all);
    Ok(Figures { rps, p50_ms, p99_ms })
}

/// nginx in front of the replica, if it is installed: (its process, its URL).
fn start_nginx(replica_ip: &str) -> anyhow::Result<Option<(Child, String)>> {
    let Some(bin) = ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
    else {
        return Ok(None);
    };
    let dir = std::env::temp_dir().join(format!("compute-bench-nginx-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let conf = format!(
        "daemon off;\nworker_processes auto;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {dir};\n  proxy_temp_path {dir};\n\
         fastcgi_temp_path {dir};\n  uwsgi_temp_path {dir};\n  scgi_temp_path {dir};\n\
         upstream replica {{ server {replica_ip}:8080; keepalive 64; }}\n\
         server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://replica;\n\
         proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n",
        dir = dir.display()
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let child = Command::new(bin).arg("-c").arg(&conf_path).stdout(Stdio::null()).stderr(Stdio::inherit()).spawn()?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "nginx did not start listening on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Some((child, format!("http://{addr}/"))))
}
