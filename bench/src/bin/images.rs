//! `bench-images`: image build figures through Compute's API.
//!
//! - GetOrBuildCustomImage round trip for an unchanged 10-step spec (every layer cached); target ≤ 30 ms p50.
//! - Rebuild after changing only the last step, next to that step's own time (the same command run in a fresh
//!   sandbox through the API, measured in the same run); target: the step's own time plus ≤ 300 ms.
//! - Root filesystem assembly for a 10-layer image: sandbox create → first exec of the 10-layer image minus the
//!   same for its 1-layer base, measured in the same run; target ≤ 10 ms.
//! - Pull throughput next to `skopeo copy`: not measured until the registry provider exists.
//!
//! Usage (as root): cargo build --release && target/release/bench-images [--runs 30]

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
    println!("pull throughput next to skopeo copy: not measured (the registry provider does not exist yet)");
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "targets: cached round trip <= 30 ms ({}), rebuild <= step + 300 ms ({}), 10-layer assembly <= 10 ms ({})",
        verdict(hit.0 <= 30.0),
        verdict(overhead <= 300.0),
        verdict(assembly <= 10.0)
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let runs = arg("--runs", 20);
    let image_dir = std::env::var("COMPUTE_IMAGE_DIR")
        .unwrap_or_else(|_| std::env::temp_dir().join("compute-bench-images").to_string_lossy().into_owned());
    let server = Server::start("images", &["--isolation", "native", "--image-dir", &image_dir])?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = rt.block_on(run(&server, runs));
    server.stop();
    result
}
