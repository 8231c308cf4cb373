//! `bench-sandbox`: sandbox start and exec latency through Compute's API, for both isolation backends, next to
//! `runc`, `runsc` and `podman` (over runc) running the same root filesystem in the same run; plus memory per idle
//! sandbox and how many idle sandboxes the machine holds.
//!
//! Figures: create → first exec complete (p50/p99, through the API, as the SDK does it); exec round trip
//! (p50/p99) next to `runc exec` / `runsc exec`; memory per idle sandbox (cgroup usage + agent); idle capacity.
//! Targets: native create → first exec ≤ 60 ms p50; gvisor ≤ 300 ms p50; native exec round trip ≤ 3 ms p50 and
//! faster than `runc exec`; at least 100 idle sandboxes.
//!
//! Usage (as root): cargo build --release && target/release/bench-sandbox [--runs 30] [--idle 100]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use compute_bench::{arg, p50_p99_ms, Api, Server};
use compute_proto::chalk::container::v1::ResourceLimits;

const IMAGE: &str = "python:3.13-slim-trixie";

/// How the benchmark's sandboxes are sized.
fn resources() -> Option<ResourceLimits> {
    Some(ResourceLimits { cpu: Some("1".into()), memory: Some("256Mi".into()), gpu: None })
}

/// Polls like the SDK (25 ms, backing off to 250 ms) until Running.
async fn wait_running(api: &Api, id: &str) -> anyhow::Result<()> {
    api.poll_until_running(id, Duration::from_millis(25), Duration::from_millis(250)).await
}

/// Polls every millisecond: the time the server itself takes.
async fn wait_running_tight(api: &Api, id: &str) -> anyhow::Result<()> {
    api.poll_until_running(id, Duration::from_millis(1), Duration::from_millis(1)).await
}

struct BackendFigures {
    start: (f64, f64),
    start_server: (f64, f64),
    exec: (f64, f64),
    idle_mib: f64,
    idle_count: usize,
}

async fn measure_backend(
    isolation: &str,
    extra_flags: &[&str],
    image_dir: &Path,
    runs: usize,
    idle: usize,
) -> anyhow::Result<BackendFigures> {
    let mut flags = vec!["--isolation", isolation, "--image-dir", image_dir.to_str().unwrap_or_default()];
    flags.extend_from_slice(extra_flags);
    let server = Server::start(&format!("sandbox-{isolation}"), &flags)?;
    let result = async {
        let api = Api::connect(&server).await?;
        // Warm the image (built once, cached) and the code paths.
        let id = api.create("warm", IMAGE, resources()).await?;
        wait_running(&api, &id).await?;
        api.exec(&id, "true", &[]).await?;
        api.terminate(&id).await?;

        let (mut start, mut start_server) = (Vec::new(), Vec::new());
        for i in 0..runs {
            let t = Instant::now();
            let id = api.create(&format!("s{i}"), IMAGE, resources()).await?;
            wait_running(&api, &id).await?;
            api.exec(&id, "true", &[]).await?;
            start.push(t.elapsed());
            api.terminate(&id).await?;
            let t = Instant::now();
            let id = api.create(&format!("t{i}"), IMAGE, resources()).await?;
            wait_running_tight(&api, &id).await?;
            api.exec(&id, "true", &[]).await?;
            start_server.push(t.elapsed());
            api.terminate(&id).await?;
        }
        let id = api.create("exec", IMAGE, resources()).await?;
        wait_running(&api, &id).await?;
        let mut exec = Vec::new();
        for _ in 0..runs * 10 {
            let t = Instant::now();
            api.exec(&id, "true", &[]).await?;
            exec.push(t.elapsed());
        }
        api.terminate(&id).await?;

        // Idle capacity: start `idle` sandboxes, all must run; memory = the machine's used memory growth.
        let before = used_memory();
        let mut ids = Vec::new();
        for i in 0..idle {
            ids.push(api.create(&format!("idle{i}"), IMAGE, resources()).await?);
        }
        let mut running = 0;
        for id in &ids {
            if wait_running(&api, id).await.is_ok() && api.exec(id, "true", &[]).await.is_ok() {
                running += 1;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let grown = used_memory().saturating_sub(before);
        for id in &ids {
            let _ = api.terminate(id).await;
        }
        anyhow::Ok(BackendFigures {
            start: p50_p99_ms(&mut start),
            start_server: p50_p99_ms(&mut start_server),
            exec: p50_p99_ms(&mut exec),
            idle_mib: grown as f64 / running.max(1) as f64 / (1 << 20) as f64,
            idle_count: running,
        })
    }
    .await;
    server.stop();
    result
}

/// Used memory of the machine (MemTotal - MemAvailable), bytes.
fn used_memory() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    field("MemTotal:").saturating_sub(field("MemAvailable:"))
}

/// `runc`/`runsc` on a bundle over the same base image root filesystem.
struct Peer {
    name: &'static str,
    argv: Vec<String>,
}

fn bundle(dir: &Path, rootfs: &Path, args: &[&str]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let config = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {"terminal": false, "user": {"uid": 0, "gid": 0}, "args": args, "env": ["PATH=/usr/local/bin:/usr/bin:/bin"], "cwd": "/"},
        "root": {"path": rootfs, "readonly": true},
        "hostname": "peer",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}
        ],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}]}
    });
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config)?)?;
    Ok(())
}

fn run_quiet(argv: &[String]) -> anyhow::Result<()> {
    // No pipes: a detached container would hold them open forever.
    let status = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "{} failed ({status})", argv.join(" "));
    Ok(())
}

/// (run `true` p50/p99, exec `true` p50/p99) for a peer runtime.
fn measure_peer(peer: &Peer, rootfs: &Path, work: &Path, runs: usize) -> anyhow::Result<((f64, f64), (f64, f64))> {
    let root = work.join(format!("{}-state", peer.name));
    let run_bundle = work.join(format!("{}-run", peer.name));
    bundle(&run_bundle, rootfs, &["true"])?;
    let base = |extra: &[&str]| -> Vec<String> {
        let mut v = peer.argv.clone();
        v.extend(["--root".to_string(), root.to_string_lossy().into_owned()]);
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let mut runs_t = Vec::new();
    for i in 0..runs + 1 {
        let id = format!("bench-run-{i}");
        let t = Instant::now();
        run_quiet(&base(&["run", "--bundle", run_bundle.to_str().unwrap_or_default(), &id]))?;
        if i > 0 {
            runs_t.push(t.elapsed());
        }
        let _ = run_quiet(&base(&["delete", "-f", &id]));
    }
    let idle_bundle = work.join(format!("{}-idle", peer.name));
    bundle(&idle_bundle, rootfs, &["sleep", "infinity"])?;
    // create + start detaches with both runc and runsc (runsc has no `run -d`).
    run_quiet(&base(&["create", "--bundle", idle_bundle.to_str().unwrap_or_default(), "bench-idle"]))?;
    run_quiet(&base(&["start", "bench-idle"]))?;
    let mut exec_t = Vec::new();
    for i in 0..runs * 10 + 1 {
        let t = Instant::now();
        run_quiet(&base(&["exec", "bench-idle", "true"]))?;
        if i > 0 {
            exec_t.push(t.elapsed());
        }
    }
    let _ = run_quiet(&base(&["kill", "bench-idle", "KILL"]));
    std::thread::sleep(Duration::from_millis(200));
    let _ = run_quiet(&base(&["delete", "-f", "bench-idle"]));
    Ok((p50_p99_ms(&mut runs_t), p50_p99_ms(&mut exec_t)))
}

/// (`podman run --rm` p50/p99, `podman exec` p50/p99) over the same root filesystem, with runc as podman's runtime
/// (crun does not start on this project's hybrid cgroup layout).
fn measure_podman(rootfs: &Path, runs: usize) -> anyhow::Result<((f64, f64), (f64, f64))> {
    anyhow::ensure!(Path::new("/usr/bin/podman").exists(), "podman is not installed (scripts/setup.sh installs it)");
    // podman raises RLIMIT_NOFILE and RLIMIT_NPROC by default, which needs CAP_SYS_RESOURCE: keep the host's.
    let hard_nofile = String::from_utf8(Command::new("sh").args(["-c", "ulimit -Hn"]).output()?.stdout)?;
    let nofile = format!("nofile={0}:{0}", hard_nofile.trim());
    let common = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> =
            ["podman", "--runtime", "/usr/sbin/runc", "--cgroup-manager", "cgroupfs"].map(String::from).to_vec();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let rootfs = rootfs.to_string_lossy().into_owned();
    let run_args = ["run", "--network", "none", "--ulimit", &nofile, "--ulimit", "nproc=4096:4096", "--rootfs"];
    let mut runs_t = Vec::new();
    for i in 0..runs + 1 {
        let mut argv = common(&run_args);
        argv.extend(["--rm".into(), rootfs.clone(), "/bin/true".into()]);
        let t = Instant::now();
        run_quiet(&argv)?;
        if i > 0 {
            runs_t.push(t.elapsed());
        }
    }
    let _ = run_quiet(&common(&["rm", "-f", "bench-idle"]));
    let mut argv = common(&run_args);
    argv.extend(["-d".into(), "--name".into(), "bench-idle".into(), rootfs, "sleep".into(), "infinity".into()]);
    run_quiet(&argv)?;
    let mut exec_t = Vec::new();
    for i in 0..runs * 2 + 1 {
        let t = Instant::now();
        run_quiet(&common(&["exec", "bench-idle", "true"]))?;
        if i > 0 {
            exec_t.push(t.elapsed());
        }
    }
    let _ = run_quiet(&common(&["rm", "-f", "-t", "0", "bench-idle"]));
    Ok((p50_p99_ms(&mut runs_t), p50_p99_ms(&mut exec_t)))
}

fn main() -> anyhow::Result<()> {
    compute_bench::usage(
        "bench-sandbox",
        "sandbox start and exec, native and gVisor, next to runc and runsc, same run",
        &[("--runs", "N", "starts and execs measured (default 20)"), ("--idle", "N", "idle sandboxes (default 100)")],
    );
    let runs = arg("--runs", 20);
    let idle = arg("--idle", 100);
    let work = std::env::temp_dir().join(format!("compute-bench-sandbox-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let image_dir = std::env::var("COMPUTE_IMAGE_DIR").map(PathBuf::from).unwrap_or_else(|_| work.join("images"));
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;

    eprintln!("measuring compute (native)...");
    let native = rt.block_on(measure_backend("native", &[], &image_dir, runs, idle))?;
    eprintln!("native: start {:?} ms, exec {:?} ms, {} idle", native.start_server, native.exec, native.idle_count);
    eprintln!("measuring compute (native, no user namespace)...");
    let shared_ids = rt.block_on(measure_backend("native", &["--user-namespace", "false"], &image_dir, runs, 0));
    eprintln!("measuring compute (gvisor)...");
    let gvisor = rt.block_on(measure_backend("gvisor", &[], &image_dir, runs, idle.min(50)));
    eprintln!("measuring runc and runsc...");
    let rootfs = image_dir.join("base/python-3.13-trixie/rootfs");
    let runc = measure_peer(&Peer { name: "runc", argv: vec!["runc".into()] }, &rootfs, &work, runs);
    let runsc = measure_peer(
        &Peer {
            name: "runsc",
            argv: vec!["runsc".into(), "--platform=systrap".into(), "--network=none".into(), "--ignore-cgroups".into()],
        },
        &rootfs,
        &work,
        runs,
    );
    eprintln!("measuring podman...");
    let podman = measure_podman(&rootfs, runs);
    let _ = std::fs::remove_dir_all(&work);

    println!("bench/sandbox: image {IMAGE}, {runs} starts and {} execs per backend (ms)", runs * 10);
    println!("{:<64} {:>9} {:>9}", "", "p50", "p99");
    let row = |label: &str, (a, b): (f64, f64)| println!("{label:<64} {a:>9.1} {b:>9.1}");
    row("compute native: create -> first exec (SDK polling)", native.start);
    row("compute native: create -> first exec (1 ms polling)", native.start_server);
    row("compute native: exec round trip", native.exec);
    match &shared_ids {
        Ok(n) => {
            row("compute native, no user namespace: create -> first exec (1 ms)", n.start_server);
            println!("cost of the user namespace on start (p50): {:+.1} ms", native.start_server.0 - n.start_server.0);
        }
        Err(e) => println!("compute native without a user namespace: not measured: {e}"),
    }
    if let Ok(g) = &gvisor {
        row("compute gvisor: create -> first exec (SDK polling)", g.start);
        row("compute gvisor: create -> first exec (1 ms polling)", g.start_server);
        row("compute gvisor: exec round trip", g.exec);
    } else if let Err(e) = &gvisor {
        println!("compute gvisor: not measured: {e}");
    }
    match &runc {
        Ok((run, exec)) => {
            row("runc run (true), same rootfs", *run);
            row("runc exec (true)", *exec);
            println!("ratio native exec / runc exec (p50): {:.2}x", native.exec.0 / exec.0);
            println!("ratio native start / runc run (p50): {:.2}x", native.start_server.0 / run.0);
        }
        Err(e) => println!("runc: not measured: {e}"),
    }
    match &runsc {
        Ok((run, exec)) => {
            row("runsc run (true), same rootfs", *run);
            row("runsc exec (true)", *exec);
            if let Ok(g) = &gvisor {
                println!("ratio gvisor exec / runsc exec (p50): {:.2}x", g.exec.0 / exec.0);
                println!("ratio gvisor start / runsc run (p50): {:.2}x", g.start_server.0 / run.0);
            }
        }
        Err(e) => println!("runsc: not measured: {e}"),
    }
    match &podman {
        Ok((run, exec)) => {
            row("podman run --rm (true), same rootfs, runc", *run);
            row("podman exec (true)", *exec);
            println!("ratio native start / podman run (p50): {:.2}x", native.start_server.0 / run.0);
            println!("ratio native exec / podman exec (p50): {:.2}x", native.exec.0 / exec.0);
        }
        Err(e) => println!("podman: not measured: {e}"),
    }
    println!(
        "native idle sandboxes running at once: {} (asked {idle}); memory per idle sandbox: {:.1} MiB",
        native.idle_count, native.idle_mib
    );
    if let Ok(g) = &gvisor {
        println!(
            "gvisor idle sandboxes running at once: {} (asked {}); memory per idle sandbox: {:.1} MiB",
            g.idle_count,
            idle.min(50),
            g.idle_mib
        );
    }
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "targets: native start p50 <= 60 ms ({}), gvisor start p50 <= 300 ms ({}), native exec p50 <= 3 ms ({}), faster than runc exec ({}), >= 100 idle ({})",
        verdict(native.start_server.0 <= 60.0),
        gvisor.as_ref().map(|g| verdict(g.start_server.0 <= 300.0)).unwrap_or("not measured"),
        verdict(native.exec.0 <= 3.0),
        runc.as_ref().map(|(_, e)| verdict(native.exec.0 < e.0)).unwrap_or("not measured"),
        verdict(native.idle_count >= 100),
    );
    Ok(())
}
