//! `chalk.server.v1.AuthService`: client credentials in, access token out.

use std::sync::Arc;

use compute_control::Control;
use compute_proto::chalk::server::v1::{auth_service_server::AuthService, GetTokenRequest, GetTokenResponse};
use tonic::{Request, Response, Status};

use crate::status::from_control;

/// The AuthService handler.
pub struct AuthApi {
    control: Arc<Control>,
}

impl AuthApi {
    /// A handler over `control`.
    pub fn new(control: Arc<Control>) -> Self {
        Self { control }
    }
}

#[tonic::async_trait]
impl AuthService for AuthApi {
    async fn get_token(&self, request: Request<GetTokenRequest>) -> Result<Response<GetTokenResponse>, Status> {
        let req = request.into_inner();
        if req.client_id.is_empty() {
            return Err(Status::invalid_argument("client_id is required (CHALK_CLIENT_ID)"));
        }
        let control = self.control.clone();
        // Argon2 verification takes tens of milliseconds of CPU: keep it off the async workers.
        let issued = tokio::task::spawn_blocking(move || {
            control.auth().get_token(&req.client_id, &req.client_secret, &req.grant_type, req.scope.as_deref())
        })
        .await
        .map_err(|e| Status::internal(format!("token task failed: {e}")))?
        .map_err(from_control)?;
        Ok(Response::new(GetTokenResponse {
            access_token: issued.access_token,
            token_type: "Bearer".into(),
            expires_in: i32::try_from(issued.expires_in).unwrap_or(i32::MAX),
            expires_at: Some(prost_types::Timestamp { seconds: issued.expires_at, nanos: 0 }),
            api_server: String::new(),
            primary_environment: Some(issued.primary_environment),
            environment_id_to_name: issued.environments.into_iter().collect(),
            ..Default::default()
        }))
    }
}
