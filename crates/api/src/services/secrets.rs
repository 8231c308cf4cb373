//! `chalk.server.v1.EnvironmentSecretsService`: secrets of the caller's environment, environment-wide or scoped
//! to one named sandbox, scaling group or function. Values go in (Upsert) and out only through GetSecretValue.

use std::sync::Arc;

use compute_control::{Scope, ScopeKind, Secrets};
use compute_proto::chalk::server::v1::environment_secrets_service_server::EnvironmentSecretsService;
use compute_proto::chalk::server::v1::*;
use compute_store::SecretRecord;
use tonic::{Request, Response, Status};

use super::principal;
use super::workload::timestamp;
use crate::status::from_control;

/// The EnvironmentSecretsService handler.
pub struct SecretsApi {
    secrets: Arc<Secrets>,
}

impl SecretsApi {
    /// A handler over the server's secret store.
    pub fn new(secrets: Arc<Secrets>) -> Self {
        Self { secrets }
    }
}

/// The control plane's scope for a wire scope (none, or unspecified: the environment).
fn scope_of(scope: Option<&SecretScope>) -> Result<Scope, Status> {
    let Some(s) = scope else { return Ok(Scope::environment()) };
    let kind = match s.r#type() {
        SecretScopeType::Unspecified | SecretScopeType::Environment => return Ok(Scope::environment()),
        SecretScopeType::Sandbox => ScopeKind::Sandbox,
        SecretScopeType::ScalingGroup => ScopeKind::ScalingGroup,
        SecretScopeType::Function => ScopeKind::Function,
        SecretScopeType::Notebook => {
            return Err(Status::invalid_argument(
                "scope.type SECRET_SCOPE_TYPE_NOTEBOOK: this server runs no notebooks; scope a secret to the \
                 environment, a sandbox, a scaling group or a function",
            ))
        }
    };
    let name = s.r#ref.clone().unwrap_or_default();
    if name.is_empty() {
        return Err(Status::invalid_argument(
            "scope.ref is required for a sandbox, scaling-group or function scope: the workload's name",
        ));
    }
    Ok(Scope::of(kind, &name))
}

fn wire_scope(rec: &SecretRecord) -> SecretScope {
    let t = match rec.scope {
        ScopeKind::Environment => SecretScopeType::Environment,
        ScopeKind::Sandbox => SecretScopeType::Sandbox,
        ScopeKind::ScalingGroup => SecretScopeType::ScalingGroup,
        ScopeKind::Function => SecretScopeType::Function,
    };
    SecretScope { r#type: t as i32, r#ref: (!rec.scope_ref.is_empty()).then(|| rec.scope_ref.clone()) }
}

/// A secret as listed: name, scope and time, never its value.
fn secret(rec: &SecretRecord) -> Secret {
    Secret {
        id: rec.id.clone(),
        name: rec.name.clone(),
        updated_at: Some(timestamp(rec.updated_at)),
        integration_id: None,
        source: SecretSource::Managed as i32,
        scope: Some(wire_scope(rec)),
        granted_scopes: vec![],
    }
}

#[tonic::async_trait]
impl EnvironmentSecretsService for SecretsApi {
    async fn list_secrets(&self, req: Request<ListSecretsRequest>) -> Result<Response<ListSecretsResponse>, Status> {
        let who = principal(&req)?.clone();
        let recs = self.secrets.list(&who, req.get_ref().include_scoped).map_err(from_control)?;
        Ok(Response::new(ListSecretsResponse { secrets: recs.iter().map(secret).collect() }))
    }

    async fn get_secret_value(
        &self,
        req: Request<GetSecretValueRequest>,
    ) -> Result<Response<GetSecretValueResponse>, Status> {
        let who = principal(&req)?.clone();
        let id = &req.get_ref().id;
        if id.is_empty() {
            return Err(Status::invalid_argument("id is required (a secret's id, from ListSecrets or UpsertSecret)"));
        }
        let (rec, value) = self.secrets.value(&who, id).map_err(from_control)?;
        Ok(Response::new(GetSecretValueResponse {
            secret_value: Some(SecretValue { name: rec.name, value, source: SecretSource::Managed as i32 }),
        }))
    }

    async fn upsert_secret(&self, req: Request<UpsertSecretRequest>) -> Result<Response<UpsertSecretResponse>, Status> {
        let who = principal(&req)?.clone();
        let r = req.into_inner();
        if r.name.is_empty() {
            return Err(Status::invalid_argument("name is required"));
        }
        let scope = scope_of(r.scope.as_ref())?;
        #[allow(deprecated)]
        let value = match r.config.and_then(|c| c.value) {
            Some(secret_config_value::Value::Literal(v)) => v,
            Some(secret_config_value::Value::SecretId(_)) => {
                return Err(Status::unimplemented(
                    "config.secret_id: a secret that points at another secret is not implemented by this server; \
                     send config.literal",
                ))
            }
            None => r.value,
        };
        let rec = self.secrets.upsert(&who, &r.name, &scope, &value).map_err(from_control)?;
        Ok(Response::new(UpsertSecretResponse { secrets: vec![secret(&rec)] }))
    }

    async fn delete_secret(&self, req: Request<DeleteSecretRequest>) -> Result<Response<DeleteSecretResponse>, Status> {
        let who = principal(&req)?.clone();
        let r = req.into_inner();
        if r.name.is_empty() {
            return Err(Status::invalid_argument("name is required"));
        }
        let scope = scope_of(r.scope.as_ref())?;
        self.secrets.delete(&who, &r.name, &scope).map_err(from_control)?;
        let left = self.secrets.list(&who, true).map_err(from_control)?;
        Ok(Response::new(DeleteSecretResponse { secrets: left.iter().map(secret).collect() }))
    }
}
