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

use compute_bench::{p50_p99_ms, Server};
use compute_proto::chalk::container::v1::ChalkContainerSpec;
use compute_proto::chalk::sandbox::v1::build_step::Step;
use compute_proto::chalk::sandbox::v1::custom_image_service_client::CustomImageServiceClient;
use compute_proto::chalk::sandbox::v1::{
    BuildStep, GetCustomImageRequest, GetOrBuildCustomImageRequest, ImageSpec, RunCommandsStep,
};
use compute_proto::chalk::sandbox::v2::create_sandbox_request::Source;
use compute_proto::chalk::sandbox::v2::sandbox_process_service_client::SandboxProcessServiceClient;
use compute_proto::chalk::sandbox::v2::sandbox_service_client::SandboxServiceClient;
use compute_proto::chalk::sandbox::v2::{
    CreateSandboxRequest, ExecCommandRequest, GetSandboxRequest, SandboxStatus, TerminateSandboxRequest,
};
use compute_proto::chalk::server::v1::auth_service_client::AuthServiceClient;
use compute_proto::chalk::server::v1::GetTokenRequest;
use tonic::transport::Channel;

const BASE: &str = "python:3.13-slim-trixie";

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Api {
    ch: Channel,
    bearer: String,
}

impl Api {
    fn req<T>(&self, m: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(m);
        r.metadata_mut().insert("authorization", self.bearer.parse().expect("ascii"));
        r
    }

    /// GetOrBuild, polling until done; returns the image reference.
    async fn build(&self, spec: &ImageSpec) -> anyhow::Result<String> {
        let mut c = CustomImageServiceClient::new(self.ch.clone());
        let mut r = c
            .get_or_build_custom_image(
                self.req(GetOrBuildCustomImageRequest { image_spec: Some(spec.clone()), ..Default::default() }),
            )
            .await?
            .into_inner();
        let mut status = r.status.clone();
        let mut image = r.image.clone();
        while status == "building" {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let g = c
                .get_custom_image(self.req(GetCustomImageRequest { build_id: r.build_id.clone() }))
                .await?
                .into_inner();
            status = g.status;
            image = g.image;
            r.error = g.error;
        }
        anyhow::ensure!(status == "exists" || status == "succeeded", "build {status}: {:?}", r.error);
        Ok(image)
    }

    /// Create → first exec of `command` on `image`; returns the elapsed time.
    async fn start_and_exec(&self, image: &str, name: &str, command: &str) -> anyhow::Result<Duration> {
        let t = Instant::now();
        let spec = ChalkContainerSpec {
            name: name.into(),
            image: image.into(),
            entrypoint: vec!["sleep".into(), "infinity".into()],
            ..Default::default()
        };
        let mut sb = SandboxServiceClient::new(self.ch.clone());
        let id = sb
            .create_sandbox(self.req(CreateSandboxRequest { source: Some(Source::Spec(spec)) }))
            .await?
            .into_inner()
            .sandbox
            .map(|s| s.id)
            .unwrap_or_default();
        loop {
            let info = sb
                .get_sandbox(self.req(GetSandboxRequest { id: id.clone() }))
                .await?
                .into_inner()
                .sandbox
                .unwrap_or_default();
            match SandboxStatus::try_from(info.status) {
                Ok(SandboxStatus::Running) => break,
                Ok(SandboxStatus::Pending) => tokio::time::sleep(Duration::from_millis(1)).await,
                other => anyhow::bail!("sandbox is {other:?}: {:?}", info.status_message),
            }
        }
        let r = SandboxProcessServiceClient::new(self.ch.clone())
            .exec_command(self.req(ExecCommandRequest {
                sandbox_id: id.clone(),
                command: "sh".into(),
                args: vec!["-c".into(), command.into()],
                ..Default::default()
            }))
            .await?
            .into_inner();
        let elapsed = t.elapsed();
        anyhow::ensure!(r.exit_code == 0, "exec failed: {}", String::from_utf8_lossy(&r.stderr));
        sb.terminate_sandbox(
            self.req(TerminateSandboxRequest { id, grace_period: Some(prost_types::Duration::default()) }),
        )
        .await?;
        Ok(elapsed)
    }
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
    let api = Api { ch, bearer: format!("Bearer {token}") };
    let marker = format!("{:x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos());

    // Warm the base and the code paths.
    api.start_and_exec(BASE, "warm", "true").await?;
    let t = Instant::now();
    let cold = spec(&marker, "echo last > /last");
    let ten = api.build(&cold).await?;
    let cold_build = t.elapsed();

    let mut hits = Vec::new();
    for _ in 0..runs * 3 {
        let t = Instant::now();
        api.build(&cold).await?;
        hits.push(t.elapsed());
    }

    let mut rebuilds = Vec::new();
    let mut own = Vec::new();
    for i in 0..runs.min(10) {
        let cmd = format!("echo changed-{i} > /last");
        let t = Instant::now();
        api.build(&spec(&marker, &cmd)).await?;
        rebuilds.push(t.elapsed());
        own.push(api.start_and_exec(BASE, &format!("own{i}"), &cmd).await?);
    }

    let (mut with_ten, mut with_one) = (Vec::new(), Vec::new());
    for i in 0..runs {
        with_ten.push(api.start_and_exec(&ten, &format!("ten{i}"), "true").await?);
        with_one.push(api.start_and_exec(BASE, &format!("one{i}"), "true").await?);
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
