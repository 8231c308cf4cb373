//! `chalk.sandbox.v1.CustomImageService`: content-addressed image builds.

use std::sync::Arc;

use compute_control::{BuildStatus, Builds};
use compute_image::{Recipe, Step};
use compute_proto::chalk::sandbox::v1::build_step::Step as WireStep;
use compute_proto::chalk::sandbox::v1::custom_image_service_server::CustomImageService;
use compute_proto::chalk::sandbox::v1::*;
use tonic::{Request, Response, Status};

use super::principal;
use crate::status::from_control;

/// The CustomImageService handler.
pub struct ImageApi {
    builds: Arc<Builds>,
}

impl ImageApi {
    /// A handler over `builds`.
    pub fn new(builds: Arc<Builds>) -> Self {
        Self { builds }
    }
}

/// The recipe of an image spec, or the message saying which step this server cannot build yet.
fn recipe(spec: ImageSpec) -> Result<Recipe, String> {
    let mut steps = Vec::new();
    for (i, step) in spec.steps.into_iter().enumerate() {
        let n = i + 1;
        steps.push(match step.step {
            Some(WireStep::RunCommands(r)) => Step::RunCommands(r.commands),
            Some(WireStep::PipInstall(p)) => Step::PipInstall(p.packages),
            Some(WireStep::AddFile(f)) => {
                Step::AddFile { destination: f.destination, content: f.content, mode: f.mode }
            }
            Some(WireStep::DockerfileCommands(_)) => {
                return Err(format!("build step {n} (dockerfile_commands) is not supported by this server yet"))
            }
            Some(WireStep::UvPipInstall(_)) => {
                return Err(format!("build step {n} (uv_pip_install) is not supported by this server yet"))
            }
            Some(WireStep::UvSync(_)) => {
                return Err(format!("build step {n} (uv_sync) is not supported by this server yet"))
            }
            None => return Err(format!("build step {n} is empty")),
        });
    }
    let mut env: Vec<(String, String)> = spec.env.into_iter().collect();
    env.sort();
    Ok(Recipe { base: spec.base_image, steps, env, workdir: spec.workdir, entrypoint: spec.entrypoint, cmd: spec.cmd })
}

#[tonic::async_trait]
impl CustomImageService for ImageApi {
    async fn get_or_build_custom_image(
        &self,
        req: Request<GetOrBuildCustomImageRequest>,
    ) -> Result<Response<GetOrBuildCustomImageResponse>, Status> {
        principal(&req)?;
        let spec = req.into_inner().image_spec.ok_or_else(|| Status::invalid_argument("image_spec is required"))?;
        if spec.base_image.trim().is_empty() {
            return Err(Status::invalid_argument("image_spec.base_image is required"));
        }
        let recipe = match recipe(spec) {
            Ok(r) => r,
            Err(msg) => {
                return Ok(Response::new(GetOrBuildCustomImageResponse {
                    status: "failed".into(),
                    error: Some(msg),
                    ..Default::default()
                }))
            }
        };
        let a = self.builds.get_or_build(recipe).map_err(from_control)?;
        Ok(Response::new(GetOrBuildCustomImageResponse {
            image: a.image,
            build_id: a.build_id,
            status: a.status.into(),
            error: a.error,
            content_hash: a.content_hash,
        }))
    }

    async fn get_custom_image(
        &self,
        req: Request<GetCustomImageRequest>,
    ) -> Result<Response<GetCustomImageResponse>, Status> {
        principal(&req)?;
        let build_id = req.into_inner().build_id;
        let (status, image, error) = match self.builds.get(&build_id).map_err(from_control)? {
            BuildStatus::Building => ("building", String::new(), None),
            BuildStatus::Succeeded(image) => ("succeeded", image, None),
            BuildStatus::Failed(e) => ("failed", String::new(), Some(e)),
        };
        Ok(Response::new(GetCustomImageResponse { build_id, status: status.into(), image, error }))
    }
}
