//! `bench-images`: image build figures through Compute's API.
//!
//! - GetOrBuildCustomImage round trip for an unchanged 10-step spec (every layer cached); target ≤ 30 ms p50.
//! - Rebuild after changing only the last step, next to that step's own time (the same command run in a fresh
//!   sandbox through the API, measured in the same run); target: the step's own time plus ≤ 300 ms.
//! - Root filesystem assembly for a 10-layer image: sandbox create → first exec of the 10-layer image minus the
//!   same for its 1-layer base, measured in the same run; target ≤ 10 ms.
//! - Pull throughput from a local registry (Debian's docker-registry on loopback, seeded with the Debian base's
//!   root filesystem as a two-layer OCI image) next to `skopeo copy` of the same image to an OCI layout, in the
//!   same run. Compute's pull also verifies and unpacks every layer; skopeo's only stores the blobs.
//!
//! Usage (as root): cargo build --release && target/release/bench-images [--runs 30] [--pulls 5] [--only pull]
//! (`--only pull` needs the base already in the image store: COMPUTE_IMAGE_DIR, default a temporary directory.)

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use compute_bench::{arg, p50_p99_ms, Api, Server};
use compute_proto::chalk::sandbox::v1::build_step::Step;
use compute_proto::chalk::sandbox::v1::custom_image_service_client::CustomImageServiceClient;
use compute_proto::chalk::sandbox::v1::{
    BuildStep, GetCustomImageRequest, GetOrBuildCustomImageRequest, ImageSpec, RunCommandsStep,
};

const BASE: &str = "python:3.13-slim-trixie";

/// GetOrBuild, polling until done; returns the image reference.
async fn build(api: &Api, spec: &ImageSpec) -> anyhow::Result<String> {
    let mut c = CustomImageServiceClient::new(api.ch.clone());
    let req = GetOrBuildCustomImageRequest { image_spec: Some(spec.clone()), ..Default::default() };
    let r = c.get_or_build_custom_image(api.req(req)).await?.into_inner();
    let (mut status, mut image, mut error) = (r.status, r.image, r.error);
    while status == "building" {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let g = c.get_custom_image(api.req(GetCustomImageRequest { build_id: r.build_id.clone() })).await?.into_inner();
        (status, image, error) = (g.status, g.image, g.error);
    }
    anyhow::ensure!(status == "exists" || status == "succeeded", "build {status}: {error:?}");
    Ok(image)
}

/// Create → first exec of `command` on `image` (polling every millisecond); returns the elapsed time.
async fn start_and_exec(api: &Api, image: &str, name: &str, command: &str) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let id = api.create(name, image, None).await?;
    api.poll_until_running(&id, Duration::from_millis(1), Duration::from_millis(1)).await?;
    api.exec(&id, "sh", &["-c", command]).await?;
    let elapsed = t.elapsed();
    api.terminate(&id).await?;
    Ok(elapsed)
}

fn spec(marker: &str, last: &str) -> ImageSpec {
    let mut steps: Vec<BuildStep> = (0..9)
        .map(|i| BuildStep {
            step: Some(Step::RunCommands(RunCommandsStep { commands: vec![format!("echo {marker}-{i} > /f{i}")] })),
        })
        .collect();
    steps.push(BuildStep { step: Some(Step::RunCommands(RunCommandsStep { commands: vec![last.into()] })) });
    ImageSpec { base_image: BASE.into(), steps, ..Default::default() }
}

async fn run(server: &Server, runs: usize) -> anyhow::Result<()> {
    let api = Api::connect(server).await?;
    let marker = format!("{:x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos());

    // Warm the base and the code paths.
    start_and_exec(&api, BASE, "warm", "true").await?;
    let t = Instant::now();
    let cold = spec(&marker, "echo last > /last");
    let ten = build(&api, &cold).await?;
    let cold_build = t.elapsed();

    let mut hits = Vec::new();
    for _ in 0..runs * 3 {
        let t = Instant::now();
        build(&api, &cold).await?;
        hits.push(t.elapsed());
    }

    let mut rebuilds = Vec::new();
    let mut own = Vec::new();
    for i in 0..runs.min(10) {
        let cmd = format!("echo changed-{i} > /last");
        let t = Instant::now();
        build(&api, &spec(&marker, &cmd)).await?;
        rebuilds.push(t.elapsed());
        own.push(start_and_exec(&api, BASE, &format!("own{i}"), &cmd).await?);
    }

    let (mut with_ten, mut with_one) = (Vec::new(), Vec::new());
    for i in 0..runs {
        with_ten.push(start_and_exec(&api, &ten, &format!("ten{i}"), "true").await?);
        with_one.push(start_and_exec(&api, BASE, &format!("one{i}"), "true").await?);
    }

    let hit = p50_p99_ms(&mut hits);
    let rebuild = p50_p99_ms(&mut rebuilds);
    let step = p50_p99_ms(&mut own);
    let ten_l = p50_p99_ms(&mut with_ten);
    let one_l = p50_p99_ms(&mut with_one);
    println!("bench/images: base {BASE}; 10-step image built cold in {:.1} s", cold_build.as_secs_f64());
    println!("{:<58} {:>9} {:>9}", "", "p50 ms", "p99 ms");
    let row = |label: &str, (a, b): (f64, f64)| println!("{label:<58} {a:>9.1} {b:>9.1}");
    row("GetOrBuildCustomImage, unchanged 10-step spec (cached)", hit);
    row("rebuild after changing the last step", rebuild);
    row("  that step's own time (fresh sandbox + command, same run)", step);
    row("create -> first exec, 10-layer image", ten_l);
    row("create -> first exec, its 1-layer base", one_l);
    let overhead = rebuild.0 - step.0;
    let assembly = ten_l.0 - one_l.0;
    println!("rebuild overhead over the step's own time (p50): {overhead:.1} ms; 10-layer assembly cost (p50): {assembly:.1} ms");
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "targets: cached round trip <= 30 ms ({}), rebuild <= step + 300 ms ({}), 10-layer assembly <= 10 ms ({})",
        verdict(hit.0 <= 30.0),
        verdict(overhead <= 300.0),
        verdict(assembly <= 10.0)
    );
    Ok(())
}

fn sh(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.stderr(Stdio::piped()).output()?;
    anyhow::ensure!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let out = sh(Command::new("sha256sum").arg(path))?;
    Ok(format!("sha256:{}", out.split_whitespace().next().unwrap_or_default()))
}

/// An OCI layout at `dir` holding `rootfs` as two gzipped layers (`usr`, then the rest); returns their total size
/// and digests.
fn write_layout(rootfs: &Path, dir: &Path) -> anyhow::Result<(u64, Vec<String>)> {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for (i, args) in [vec!["./usr"], vec!["--exclude=./usr", "."]].iter().enumerate() {
        let tar = dir.join(format!("layer{i}.tar"));
        sh(Command::new("tar")
            .args(["--numeric-owner", "--xattrs", "-C"])
            .arg(rootfs)
            .arg("-cf")
            .arg(&tar)
            .args(args))?;
        diff_ids.push(sha256_file(&tar)?);
        sh(Command::new("gzip").arg("-1").arg(&tar))?;
        let gz = dir.join(format!("layer{i}.tar.gz"));
        let digest = sha256_file(&gz)?;
        let size = std::fs::metadata(&gz)?.len();
        std::fs::rename(&gz, blobs.join(&digest[7..]))?;
        layers.push(serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": size}));
    }
    let total: u64 = layers.iter().map(|l| l["size"].as_u64().unwrap_or(0)).sum();
    let digests: Vec<String> = layers.iter().map(|l| l["digest"].as_str().unwrap_or_default().to_string()).collect();
    let put = |value: serde_json::Value| -> anyhow::Result<(String, u64)> {
        let bytes = serde_json::to_vec(&value)?;
        let path = dir.join("tmp.json");
        std::fs::write(&path, &bytes)?;
        let digest = sha256_file(&path)?;
        std::fs::rename(&path, blobs.join(&digest[7..]))?;
        Ok((digest, bytes.len() as u64))
    };
    let (config, config_size) = put(serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"], "Cmd": ["python3"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))?;
    let (manifest, manifest_size) = put(serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": config_size},
        "layers": layers,
    }))?;
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest, "size": manifest_size,
        "annotations": {"org.opencontainers.image.ref.name": "bench"}}]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    Ok((total, digests))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Pull throughput from a loopback registry: Compute's `compute image pull` next to `skopeo copy`.
fn pulls(image_dir: &str, runs: usize) -> anyhow::Result<()> {
    for tool in ["/usr/bin/docker-registry", "/usr/bin/skopeo"] {
        if !Path::new(tool).exists() {
            println!(
                "pull throughput: SKIPPED, {tool} is missing (scripts/setup.sh installs docker-registry and skopeo)"
            );
            return Ok(());
        }
    }
    let work: PathBuf = std::env::temp_dir().join(format!("compute-bench-registry-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let rootfs = Path::new(image_dir).join("base/python-3.13-trixie/rootfs");
    let (bytes, digests) = write_layout(&rootfs, &work.join("layout"))?;
    let port = free_port()?;
    let config = work.join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            work.join("registry").display()
        ),
    )?;
    let mut registry = Command::new("/usr/bin/docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let result = (|| -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "docker-registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let reference = format!("127.0.0.1:{port}/bench/base:1");
        sh(Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:bench", work.join("layout").display()))
            .arg(format!("docker://{reference}")))?;
        let pull_dir = work.join("store");
        // The loopback registry is listed, as an operator lists a registry on the server's own network.
        let listed = format!("insecure_registries = [\"127.0.0.1:{port}\"]\n");
        let server = Server::start_with_config(
            "pull",
            &["--isolation", "native", "--image-dir", &pull_dir.to_string_lossy()],
            Some(&listed),
        )?;
        let compute = compute_bench::compute_bin()?;
        let cli = |args: &[&str]| -> anyhow::Result<String> {
            sh(Command::new(&compute).args(args).arg("--data-dir").arg(&server.data_dir))
        };
        let (mut ours, mut peer, mut peer_unpacked) = (Vec::new(), Vec::new(), Vec::new());
        let measured = (|| -> anyhow::Result<()> {
            for i in 0..runs {
                let t = Instant::now();
                cli(&["image", "pull", &reference])?;
                ours.push(t.elapsed());
                cli(&["image", "rm", &reference])?;
                cli(&["image", "gc", "--grace", "0"])?;
                let dest = work.join(format!("skopeo-{i}"));
                let t = Instant::now();
                sh(Command::new("skopeo")
                    .args(["copy", "--quiet", "--src-tls-verify=false"])
                    .arg(format!("docker://{reference}"))
                    .arg(format!("oci:{}:bench", dest.display())))?;
                peer.push(t.elapsed());
                // The same pull done with standard tools: skopeo's blobs unpacked by GNU tar, layer by layer.
                let root = work.join(format!("unpacked-{i}"));
                std::fs::create_dir_all(&root)?;
                for d in &digests {
                    sh(Command::new("tar")
                        .args(["--numeric-owner", "--xattrs", "-xzf"])
                        .arg(dest.join("blobs/sha256").join(&d[7..]))
                        .arg("-C")
                        .arg(&root))?;
                }
                peer_unpacked.push(t.elapsed());
                std::fs::remove_dir_all(&dest)?;
                std::fs::remove_dir_all(&root)?;
            }
            Ok(())
        })();
        server.stop();
        measured?;
        let (o, p, pu) = (p50_p99_ms(&mut ours), p50_p99_ms(&mut peer), p50_p99_ms(&mut peer_unpacked));
        let mib = bytes as f64 / (1 << 20) as f64;
        println!("pull of a 2-layer image ({mib:.1} MiB compressed) from docker-registry on loopback, {runs} runs:");
        println!("{:<58} {:>9} {:>9} {:>9}", "", "p50 ms", "p99 ms", "MiB/s");
        let row =
            |label: &str, (a, b): (f64, f64)| println!("{label:<58} {a:>9.1} {b:>9.1} {:>9.1}", mib / (a / 1000.0));
        row("compute image pull (fetch, verify, unpack)", o);
        row("skopeo copy to an OCI layout (fetch, verify; no unpack)", p);
        row("skopeo copy, then GNU tar -xzf of each layer", pu);
        println!(
            "compute pull throughput / skopeo copy (p50): {:.2}; / skopeo copy + tar unpack (p50): {:.2}",
            p.0 / o.0,
            pu.0 / o.0
        );
        Ok(())
    })();
    let _ = registry.kill();
    let _ = registry.wait();
    if std::env::var_os("BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&work);
    }
    result
}

fn main() -> anyhow::Result<()> {
    compute_bench::usage(
        "bench-images",
        "cached GetOrBuild round trip, partial rebuild, layer assembly and pulls next to skopeo, same run",
        &[
            ("--runs", "N", "rounds of each build measurement (default 20)"),
            ("--pulls", "N", "pulls measured (default 5)"),
            ("--only", "pull", "measure pulls alone"),
        ],
    );
    let runs = arg("--runs", 20);
    let pull_runs = arg("--pulls", 5);
    let image_dir = std::env::var("COMPUTE_IMAGE_DIR")
        .unwrap_or_else(|_| std::env::temp_dir().join("compute-bench-images").to_string_lossy().into_owned());
    if arg("--only", String::new()) != "pull" {
        let server = Server::start("images", &["--isolation", "native", "--image-dir", &image_dir])?;
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        let result = rt.block_on(run(&server, runs));
        server.stop();
        result?;
    }
    pulls(&image_dir, pull_runs)
}
