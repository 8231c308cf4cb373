//! Image builds: turning a recipe into cached layers, one build sandbox per step that runs something.
//!
//! Identical recipes share one build (keyed by the image key) and one cache entry; a recipe whose steps are all
//! cached resolves without starting any sandbox; a failed build reports the failing step and the last lines of
//! its output.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use compute_image::{ImageConfig, ImageStore, Manifest, Recipe, Step};
use compute_runtime::{EntrypointEnd, ExecSpec, Resources, Runtime, SandboxSpec};

use crate::{ids, ControlError};

/// Where a build is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildStatus {
    /// Running.
    Building,
    /// Done: the image reference.
    Succeeded(String),
    /// Failed: why, naming the step, with its last lines of output.
    Failed(String),
}

/// The answer to "get or build".
#[derive(Debug, Clone)]
pub struct BuildAnswer {
    /// `exists`, `building`, `succeeded` or `failed` (what the SDK polls for).
    pub status: &'static str,
    /// The image reference, once there is one.
    pub image: String,
    /// The build to poll.
    pub build_id: String,
    /// Why it failed.
    pub error: Option<String>,
    /// The image key.
    pub content_hash: String,
}

/// The image builder.
pub struct Builds {
    images: Arc<ImageStore>,
    runtime: Result<Arc<Runtime>, String>,
    builds: Mutex<HashMap<String, BuildStatus>>,
    log_dir: PathBuf,
    step_timeout: Duration,
}

/// Makes `uv` available: the SDK expects it in the base image; where it is missing (debian_slim), it is installed
/// with pip first rather than failing. uv reads the proxy and CA bundle from the environment.
const ENSURE_UV: &str = "command -v uv >/dev/null 2>&1 || python -m pip install --no-cache-dir \
                         --disable-pip-version-check --root-user-action=ignore uv";

/// What one build step runs: a shell script, as root or as a user.
struct Command<'a> {
    script: &'a str,
    user: Option<&'a String>,
}

impl Builds {
    /// A builder over the image store, running steps with `runtime`.
    pub fn new(images: Arc<ImageStore>, runtime: Result<Arc<Runtime>, String>, log_dir: PathBuf) -> Arc<Self> {
        Self::with_step_timeout(images, runtime, log_dir, Duration::from_secs(1800))
    }

    /// A build manager whose steps may each run for at most `step_timeout`.
    pub fn with_step_timeout(
        images: Arc<ImageStore>,
        runtime: Result<Arc<Runtime>, String>,
        log_dir: PathBuf,
        step_timeout: Duration,
    ) -> Arc<Self> {
        let _ = std::fs::create_dir_all(&log_dir);
        Arc::new(Self { images, runtime, builds: Mutex::default(), log_dir, step_timeout })
    }

    /// Returns the image at once if every layer is cached, else starts (or joins) its build.
    pub fn get_or_build(self: &Arc<Self>, recipe: Recipe) -> Result<BuildAnswer, ControlError> {
        let base_key = self
            .images
            .base_key(&recipe.base)
            .map_err(|e| ControlError::InvalidArgument(format!("image_spec.base_image: {e}")))?;
        let key = recipe.image_key(&base_key);
        let build_id = format!("build-{}", &key[..24]);
        if self.images.manifest(&key).is_some() {
            let image = format!("{}{key}", compute_image::BUILT_PREFIX);
            return Ok(BuildAnswer { status: "exists", image, build_id, error: None, content_hash: key });
        }
        let mut builds = self.builds.lock().unwrap_or_else(|p| p.into_inner());
        match builds.get(&build_id) {
            Some(BuildStatus::Building) => {
                return Ok(BuildAnswer {
                    status: "building",
                    image: String::new(),
                    build_id,
                    error: None,
                    content_hash: key,
                })
            }
            Some(BuildStatus::Succeeded(image)) => {
                let image = image.clone();
                return Ok(BuildAnswer { status: "succeeded", image, build_id, error: None, content_hash: key });
            }
            // A failed build is retried when asked again (the failure may have been transient).
            Some(BuildStatus::Failed(_)) | None => {}
        }
        self.runtime
            .as_ref()
            .map_err(|why| ControlError::Unavailable(format!("this server cannot build images: {why}")))?;
        builds.insert(build_id.clone(), BuildStatus::Building);
        drop(builds);
        let this = self.clone();
        let (id, k) = (build_id.clone(), key.clone());
        tokio::spawn(async move {
            let failed = this.log_dir.join(format!("{id}.failed"));
            let status = match this.build(&id, &k, &base_key, recipe).await {
                Ok(image) => {
                    let _ = std::fs::remove_file(&failed);
                    BuildStatus::Succeeded(image)
                }
                Err(msg) => {
                    tracing::warn!(build = %id, error = %msg, "image build failed");
                    // Kept on disk, so a client polling across a server restart still learns why.
                    if let Err(e) = std::fs::write(&failed, &msg) {
                        tracing::warn!(build = %id, error = %e, "could not record the build failure");
                    }
                    BuildStatus::Failed(msg)
                }
            };
            this.builds.lock().unwrap_or_else(|p| p.into_inner()).insert(id, status);
        });
        Ok(BuildAnswer { status: "building", image: String::new(), build_id, error: None, content_hash: key })
    }

    /// A build's status.
    pub fn get(&self, build_id: &str) -> Result<BuildStatus, ControlError> {
        if let Some(s) = self.builds.lock().unwrap_or_else(|p| p.into_inner()).get(build_id) {
            return Ok(s.clone());
        }
        // Not in memory (the server restarted since): what the disk says.
        let valid =
            build_id.strip_prefix("build-").is_some_and(|k| k.len() == 24 && k.bytes().all(|b| b.is_ascii_hexdigit()));
        if valid {
            if let Ok(msg) = std::fs::read_to_string(self.log_dir.join(format!("{build_id}.failed"))) {
                return Ok(BuildStatus::Failed(msg));
            }
            if let Some(image) = self.images.built_with_prefix(&build_id["build-".len()..]) {
                return Ok(BuildStatus::Succeeded(image));
            }
        }
        Err(ControlError::NotFound(format!(
            "build {build_id:?} is unknown: it was never requested, or a server restart interrupted it; call \
             GetOrBuildCustomImage again"
        )))
    }

    async fn build(&self, build_id: &str, key: &str, base_key: &str, recipe: Recipe) -> Result<String, String> {
        let started = std::time::Instant::now();
        let base = self.images.resolve(&recipe.base).await.map_err(|e| format!("base image {}: {e}", recipe.base))?;
        let mut layers = base.layers.clone();
        let mut env = base.config.env.clone();
        let set_env = |env: &mut Vec<(String, String)>, k: &str, v: &str| match env.iter_mut().find(|(ek, _)| ek == k) {
            Some(slot) => slot.1 = v.to_string(),
            None => env.push((k.to_string(), v.to_string())),
        };
        for (k, v) in &recipe.env {
            set_env(&mut env, k, v);
        }
        let keys = recipe.layer_keys(base_key);
        for (i, (step, layer_key)) in recipe.steps.iter().zip(&keys).enumerate() {
            if self.images.has_layer(layer_key) {
                layers.insert(0, self.images.layer_dir(layer_key).join("diff"));
                continue;
            }
            let scratch = self.images.scratch(layer_key).map_err(|e| e.to_string())?;
            let what = format!("step {} ({})", i + 1, step.kind());
            match step {
                Step::AddFile { destination, content, mode } => {
                    write_file(&scratch, destination, content, *mode).map_err(|e| format!("{what}: {e}"))?
                }
                Step::CopyFrom { image, sources, dest, chown, chmod } => {
                    let from = self.images.resolve(image).await.map_err(|e| format!("{what}: image {image}: {e}"))?;
                    let opts = compute_image::copy::CopyOptions { chown: *chown, chmod: *chmod };
                    let (layers, sources, dest, into) = (from.layers, sources.clone(), dest.clone(), scratch.clone());
                    tokio::task::spawn_blocking(move || {
                        compute_image::copy::copy_from_layers(&layers, &sources, &dest, &into, opts)
                    })
                    .await
                    .map_err(|e| format!("{what}: {e}"))?
                    .map_err(|e| format!("{what}: from {image}: {e}"))?
                }
                Step::RunCommands(commands) => {
                    let script = format!("set -e\n{}", commands.join("\n"));
                    self.run_step(build_id, i, &layers, &env, &scratch, Command { script: &script, user: None })
                        .await
                        .map_err(|e| format!("{what}: {e}"))?
                }
                Step::RunCommandsAs { user, commands } => {
                    let script = format!("set -e\n{}", commands.join("\n"));
                    self.run_step(build_id, i, &layers, &env, &scratch, Command { script: &script, user: Some(user) })
                        .await
                        .map_err(|e| format!("{what}: {e}"))?
                }
                Step::PipInstall(packages) | Step::UvPipInstall(packages) => {
                    let quoted: Vec<String> = packages.iter().map(|p| shell_quote(p)).collect();
                    let script = if matches!(step, Step::UvPipInstall(_)) {
                        format!("{ENSURE_UV}\nuv pip install --system --no-cache {}", quoted.join(" "))
                    } else {
                        format!(
                            "python -m pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore {}",
                            quoted.join(" ")
                        )
                    };
                    self.run_step(build_id, i, &layers, &env, &scratch, Command { script: &script, user: None })
                        .await
                        .map_err(|e| format!("{what}: {e}"))?
                }
                Step::UvSync { pyproject, lock, extras, workdir } => {
                    let dir = workdir.trim_end_matches('/');
                    write_file(&scratch, &format!("{dir}/pyproject.toml"), pyproject, None)
                        .map_err(|e| format!("{what}: {e}"))?;
                    let mut export = vec!["uv export --no-hashes --no-emit-project".to_string()];
                    if let Some(lock) = lock {
                        write_file(&scratch, &format!("{dir}/uv.lock"), lock, None)
                            .map_err(|e| format!("{what}: {e}"))?;
                        // Exactly what the lock says, as `uv sync --frozen` would install.
                        export.push("--frozen".into());
                    }
                    export.extend(extras.iter().map(|e| format!("--extra {}", shell_quote(e))));
                    // The project's source is not sent, so only its dependencies are installed, into the image's
                    // Python (as pip_install does).
                    let script = format!(
                        "set -e\n{ENSURE_UV}\ncd {}\n{} -o /tmp/uv-sync-requirements.txt\n\
                         uv pip install --system --no-cache -r /tmp/uv-sync-requirements.txt\n\
                         rm -f /tmp/uv-sync-requirements.txt",
                        shell_quote(if dir.is_empty() { "/" } else { dir }),
                        export.join(" ")
                    );
                    self.run_step(build_id, i, &layers, &env, &scratch, Command { script: &script, user: None })
                        .await
                        .map_err(|e| format!("{what}: {e}"))?
                }
            }
            let dir = self.images.commit_layer(layer_key, &scratch).map_err(|e| e.to_string())?;
            layers.insert(0, dir);
        }
        let config = ImageConfig {
            env,
            workdir: recipe.workdir.clone().unwrap_or(base.config.workdir.clone()),
            entrypoint: if recipe.entrypoint.is_empty() {
                base.config.entrypoint.clone()
            } else {
                recipe.entrypoint.clone()
            },
            cmd: if recipe.cmd.is_empty() && recipe.entrypoint.is_empty() {
                base.config.cmd.clone()
            } else {
                recipe.cmd.clone()
            },
            user: recipe.user.clone().or(base.config.user.clone()),
        };
        let image = self
            .images
            .save_manifest(key, &Manifest { layers, config, provenance: base.provenance.clone() })
            .map_err(|e| e.to_string())?;
        tracing::info!(build = build_id, %image, seconds = started.elapsed().as_secs_f64(), "image built");
        Ok(image)
    }

    /// Runs `script` in a build sandbox over `layers`; its writable layer (kept in `scratch`) is the step's layer.
    async fn run_step(
        &self,
        build_id: &str,
        index: usize,
        layers: &[PathBuf],
        env: &[(String, String)],
        scratch: &std::path::Path,
        command: Command<'_>,
    ) -> Result<(), String> {
        let Command { script, user } = command;
        let runtime = self.runtime.as_ref().map_err(|e| e.clone())?;
        let id = format!("{build_id}-{index}-{}", ids::random_token(4));
        let log_path = self.log_dir.join(format!("{id}.log"));
        let mut env = env.to_vec();
        env.extend(crate::workloads::ca_env());
        let spec = SandboxSpec {
            id: id.clone(),
            hostname: "build".into(),
            layers: layers.to_vec(),
            env,
            workdir: "/".into(),
            entrypoint: Some(ExecSpec {
                command: "/bin/sh".into(),
                args: vec!["-c".into(), script.into()],
                user: user.cloned(),
                ..Default::default()
            }),
            user: None,
            resources: Resources { memory_bytes: Some(4 << 30), ..Default::default() },
            binds: vec![],
            log_path: log_path.clone(),
            keep_upper: Some(scratch.to_path_buf()),
        };
        let sandbox = runtime.start(spec).await.map_err(|e| format!("starting the build sandbox: {e}"))?;
        let end = tokio::time::timeout(self.step_timeout, sandbox.agent().entrypoint_end()).await;
        let _ = runtime.stop(&id, Duration::from_secs(1)).await;
        let tail = crate::workloads::tail(&log_path, 20).unwrap_or_default();
        match end {
            Ok(EntrypointEnd::Exited { code: Some(0), .. }) => Ok(()),
            Ok(EntrypointEnd::Exited { code: Some(c), .. }) => Err(format!("exited with code {c}:\n{tail}")),
            Ok(EntrypointEnd::Exited { signal, .. }) => {
                Err(format!("killed by signal {}:\n{tail}", signal.unwrap_or(0)))
            }
            Ok(EntrypointEnd::Failed(m)) => Err(format!("could not start: {m}")),
            Ok(EntrypointEnd::AgentGone) => Err(format!("the build sandbox died:\n{tail}")),
            Err(_) => Err(format!("timed out after {}s:\n{tail}", self.step_timeout.as_secs())),
        }
    }
}

fn write_file(layer: &std::path::Path, destination: &str, content: &[u8], mode: Option<u32>) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let rel =
        destination.strip_prefix('/').ok_or_else(|| format!("destination {destination:?} must be an absolute path"))?;
    if rel.split('/').any(|c| c == "..") {
        return Err(format!("destination {destination:?} must not contain '..'"));
    }
    let path = layer.join(rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
    }
    std::fs::write(&path, content).map_err(|e| format!("writing {destination}: {e}"))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode.unwrap_or(0o644) & 0o7777))
        .map_err(|e| format!("setting the mode of {destination}: {e}"))
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}
