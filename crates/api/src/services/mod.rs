//! gRPC service implementations: thin translations from wire messages to control-plane calls.

mod auth;
mod container;
mod filesystem;
mod functions;
mod images;
mod process;
mod sandbox;
mod scaling;
mod secrets;
mod team;
mod volume;
mod volume_v1;
mod workload;

use std::sync::Arc;

use compute_control::volume::VolumeStore;
use compute_control::{Builds, Control, Functions, Principal, ScalingGroups, Workloads};
use compute_proto::chalk;
use tonic::codec::CompressionEncoding;
use tonic::service::Routes;

pub use auth::AuthApi;
pub use container::ContainerApi;
pub use filesystem::FilesystemApi;
pub use functions::{FunctionsApi, RemoteCallApi, CODEC as FUNCTION_CODEC};
pub use images::ImageApi;
pub use process::ProcessApi;
pub use sandbox::SandboxApi;
pub use scaling::{parse_spec, ScalingApi};
pub use secrets::SecretsApi;
pub use team::TeamApi;
pub use volume::VolumeApi;
pub use volume_v1::VolumeV1Api;

/// Registered but not implemented yet: every method answers UNIMPLEMENTED. The front door intercepts such calls
/// first with a message naming the method; these impls make sure nothing reaches a handler that does not exist.
#[derive(Clone, Copy, Debug, Default)]
pub struct NotYet;

#[tonic::async_trait]
impl chalk::sandbox::v1::sandbox_runtime_service_server::SandboxRuntimeService for NotYet {}

/// The control-plane parts the handlers call.
pub struct Backends {
    /// Environments, credentials, secrets.
    pub control: Arc<Control>,
    /// Sandboxes and containers.
    pub workloads: Arc<Workloads>,
    /// Image builds.
    pub builds: Arc<Builds>,
    /// Volumes.
    pub volumes: Arc<VolumeStore>,
    /// Scaling groups.
    pub scaling: Arc<ScalingGroups>,
    /// Functions.
    pub functions: Arc<Functions>,
}

/// Every service in `proto/`, with gzip-compressed requests accepted and the message size limit applied.
pub fn routes(backends: Backends, ingress_domain: Option<String>, max_message_bytes: usize) -> Routes {
    let Backends { control, workloads, builds, volumes, scaling, functions } = backends;
    macro_rules! svc {
        ($server:ty, $imp:expr) => {
            <$server>::new($imp)
                .accept_compressed(CompressionEncoding::Gzip)
                .max_decoding_message_size(max_message_bytes)
                .max_encoding_message_size(max_message_bytes)
        };
    }
    use chalk::*;
    Routes::new(svc!(server::v1::auth_service_server::AuthServiceServer<AuthApi>, AuthApi::new(control.clone())))
        .add_service(svc!(server::v1::team_service_server::TeamServiceServer<TeamApi>, TeamApi::new(control.clone())))
        .add_service(svc!(
            server::v1::environment_secrets_service_server::EnvironmentSecretsServiceServer<SecretsApi>,
            SecretsApi::new(control.secrets().clone())
        ))
        .add_service(svc!(
            sandbox::v1::custom_image_service_server::CustomImageServiceServer<ImageApi>,
            ImageApi::new(builds)
        ))
        .add_service(svc!(sandbox::v1::sandbox_runtime_service_server::SandboxRuntimeServiceServer<NotYet>, NotYet))
        .add_service(svc!(
            container::v1::container_service_server::ContainerServiceServer<ContainerApi>,
            ContainerApi::new(workloads.clone(), ingress_domain.clone())
        ))
        .add_service(svc!(
            sandbox::v2::sandbox_service_server::SandboxServiceServer<SandboxApi>,
            SandboxApi::new(workloads.clone())
        ))
        .add_service(svc!(
            sandbox::v2::sandbox_process_service_server::SandboxProcessServiceServer<ProcessApi>,
            ProcessApi::new(workloads.clone(), max_message_bytes.saturating_sub(64 * 1024))
        ))
        .add_service(svc!(
            sandbox::v2::sandbox_filesystem_service_server::SandboxFilesystemServiceServer<FilesystemApi>,
            FilesystemApi::new(workloads.clone())
        ))
        .add_service(svc!(
            scalinggroup::v1::scaling_group_manager_service_server::ScalingGroupManagerServiceServer<ScalingApi>,
            ScalingApi::new(scaling.clone(), ingress_domain.clone())
        ))
        .add_service(svc!(
            volume::v2::volume_service_server::VolumeServiceServer<VolumeApi>,
            VolumeApi::new(volumes.clone())
        ))
        .add_service(svc!(
            volume::v1::volume_service_server::VolumeServiceServer<VolumeV1Api>,
            VolumeV1Api::new(volumes)
        ))
        .add_service(svc!(
            externalfunctioncatalog::v1::external_function_catalog_service_server::ExternalFunctionCatalogServiceServer<
                FunctionsApi,
            >,
            FunctionsApi::new(functions.clone(), scaling, ingress_domain)
        ))
        .add_service(svc!(
            runtime::v1::remote_call_service_server::RemoteCallServiceServer<RemoteCallApi>,
            RemoteCallApi::new(functions.clone())
        ))
        .add_service(svc!(
            runtime::v1::async_remote_call_service_server::AsyncRemoteCallServiceServer<RemoteCallApi>,
            RemoteCallApi::new(functions.clone())
        ))
        .add_service(svc!(
            runtime::v1::function_queue_meta_service_server::FunctionQueueMetaServiceServer<RemoteCallApi>,
            RemoteCallApi::new(functions)
        ))
        .prepare()
}

/// The caller the front door authenticated. Every authenticated method can rely on it being present.
pub fn principal<T>(req: &tonic::Request<T>) -> Result<&Principal, tonic::Status> {
    req.extensions()
        .get::<Principal>()
        .ok_or_else(|| tonic::Status::unauthenticated("this method requires an access token"))
}

/// Where clients reach what the ingress serves under `name` in an environment (a scaling group, or a container with
/// a port): `<scheme>://<name>.<environment>.<domain>[:port]` with an ingress domain, else
/// `<base>/sg/<environment>/<name>`.
pub(crate) fn ingress_url(domain: Option<&str>, base: &str, environment: &str, name: &str) -> String {
    match domain {
        Some(domain) => {
            let (scheme, authority) = base.split_once("://").unwrap_or(("http", base));
            let port = authority.rsplit_once(':').map(|(_, p)| p).filter(|p| p.bytes().all(|b| b.is_ascii_digit()));
            let host = format!("{name}.{environment}.{domain}");
            match port {
                Some(p) => format!("{scheme}://{host}:{p}"),
                None => format!("{scheme}://{host}"),
            }
        }
        None => format!("{base}{}", compute_ingress::Ingress::path_of(environment, name)),
    }
}

/// Where the caller reached this server (`http://host:port`), as the front door recorded it, for the absolute
/// URLs handlers hand out (signed blob URLs, scaling groups' `web_url`).
pub(crate) fn base_url<T>(req: &tonic::Request<T>) -> Result<String, tonic::Status> {
    req.extensions()
        .get::<crate::PublicBase>()
        .map(|b| b.0.clone())
        .ok_or_else(|| tonic::Status::internal("the front door did not record the request's address"))
}
