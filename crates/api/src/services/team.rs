//! `chalk.server.v1.TeamService/GetEnv`: the environment the caller's token acts in.

use std::sync::Arc;

use compute_control::Control;
use compute_proto::chalk::server::v1::{team_service_server::TeamService, Environment, GetEnvRequest, GetEnvResponse};
use tonic::{Request, Response, Status};

use crate::services::principal;
use crate::status::from_control;

/// The TeamService handler.
pub struct TeamApi {
    control: Arc<Control>,
}

impl TeamApi {
    /// A handler over `control`.
    pub fn new(control: Arc<Control>) -> Self {
        Self { control }
    }
}

#[tonic::async_trait]
impl TeamService for TeamApi {
    async fn get_env(&self, request: Request<GetEnvRequest>) -> Result<Response<GetEnvResponse>, Status> {
        let who = principal(&request)?;
        let env = self.control.auth().resolve_environment(&who.environment_id).map_err(from_control)?;
        Ok(Response::new(GetEnvResponse {
            environment: Some(Environment {
                id: env.id,
                name: env.name,
                project_id: "default".into(),
                team_id: "default".into(),
                is_sandbox: true,
                ..Default::default()
            }),
        }))
    }
}
