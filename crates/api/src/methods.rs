//! The table of RPC methods the front door serves, built from the compiled descriptors.

use std::collections::HashMap;

use prost_reflect::MessageDescriptor;

/// Methods with a real implementation. Every other method in `proto/` is registered and answers UNIMPLEMENTED
/// naming itself, so the SDK fails fast instead of hanging.
const IMPLEMENTED: &[&str] = &[
    "/chalk.server.v1.AuthService/GetToken",
    "/chalk.server.v1.TeamService/GetEnv",
    "/chalk.server.v1.EnvironmentSecretsService/ListSecrets",
    "/chalk.server.v1.EnvironmentSecretsService/GetSecretValue",
    "/chalk.server.v1.EnvironmentSecretsService/UpsertSecret",
    "/chalk.server.v1.EnvironmentSecretsService/DeleteSecret",
    "/chalk.sandbox.v1.CustomImageService/GetOrBuildCustomImage",
    "/chalk.sandbox.v1.CustomImageService/GetCustomImage",
    "/chalk.container.v1.ContainerService/RunContainer",
    "/chalk.container.v1.ContainerService/GetContainer",
    "/chalk.container.v1.ContainerService/StopContainer",
    "/chalk.container.v1.ContainerService/ListContainers",
    "/chalk.sandbox.v2.SandboxService/CreateSandbox",
    "/chalk.sandbox.v2.SandboxService/GetSandbox",
    "/chalk.sandbox.v2.SandboxService/ListSandboxes",
    "/chalk.sandbox.v2.SandboxService/TerminateSandbox",
    "/chalk.sandbox.v2.SandboxProcessService/ExecCommand",
    "/chalk.sandbox.v2.SandboxProcessService/OpenSession",
    "/chalk.sandbox.v2.SandboxProcessService/GetSession",
    "/chalk.sandbox.v2.SandboxProcessService/ListSessions",
    "/chalk.sandbox.v2.SandboxFilesystemService/UploadFile",
    "/chalk.sandbox.v2.SandboxFilesystemService/DownloadFile",
    "/chalk.volume.v2.VolumeService/CreateVolume",
    "/chalk.volume.v2.VolumeService/GetVolume",
    "/chalk.volume.v2.VolumeService/ListVolumes",
    "/chalk.volume.v2.VolumeService/DeleteVolume",
    "/chalk.volume.v2.VolumeService/ListVolumeVersions",
    "/chalk.volume.v2.VolumeService/CreateRef",
    "/chalk.volume.v2.VolumeService/ListRefs",
    "/chalk.volume.v2.VolumeService/DeleteRef",
    "/chalk.volume.v2.VolumeService/CommitVersion",
    "/chalk.volume.v2.VolumeService/GetCommitStatus",
    "/chalk.volume.v2.VolumeService/RequestUploadURLs",
    "/chalk.volume.v2.VolumeService/ListFiles",
    "/chalk.volume.v2.VolumeService/GetFile",
    "/chalk.volume.v1.VolumeService/CreateVolume",
    "/chalk.volume.v1.VolumeService/GetVolume",
    "/chalk.volume.v1.VolumeService/ListVolumes",
    "/chalk.volume.v1.VolumeService/DeleteVolume",
    "/chalk.volume.v1.VolumeService/ListFiles",
    "/chalk.volume.v1.VolumeService/GetFile",
    "/chalk.volume.v1.VolumeService/PutFile",
    "/chalk.volume.v1.VolumeService/RemoveFile",
    "/chalk.scalinggroup.v1.ScalingGroupManagerService/CreateScalingGroup",
    "/chalk.scalinggroup.v1.ScalingGroupManagerService/UpdateScalingGroup",
    "/chalk.scalinggroup.v1.ScalingGroupManagerService/GetScalingGroup",
    "/chalk.scalinggroup.v1.ScalingGroupManagerService/ListScalingGroups",
    "/chalk.scalinggroup.v1.ScalingGroupManagerService/DeleteScalingGroup",
    "/chalk.scalinggroup.v1.ScalingGroupManagerService/GetScalingGroupRevision",
    "/chalk.scalinggroup.v1.ScalingGroupManagerService/ListScalingGroupRevisions",
    "/chalk.externalfunctioncatalog.v1.ExternalFunctionCatalogService/EnsureExternalFunction",
    "/chalk.externalfunctioncatalog.v1.ExternalFunctionCatalogService/GetExternalFunction",
    "/chalk.externalfunctioncatalog.v1.ExternalFunctionCatalogService/ListExternalFunctions",
    "/chalk.externalfunctioncatalog.v1.ExternalFunctionCatalogService/DeleteExternalFunction",
    "/chalk.externalfunctioncatalog.v1.ExternalFunctionCatalogService/CallExternalFunction",
    "/chalk.externalfunctioncatalog.v1.ExternalFunctionCatalogService/GetExternalFunctionVersion",
    "/chalk.externalfunctioncatalog.v1.ExternalFunctionCatalogService/ListExternalFunctionVersions",
    "/chalk.runtime.v1.RemoteCallService/CallFunction",
    "/chalk.runtime.v1.AsyncRemoteCallService/EnqueueRemoteCall",
    "/chalk.runtime.v1.AsyncRemoteCallService/PollRemoteCall",
    "/chalk.runtime.v1.AsyncRemoteCallService/PurgeQueue",
    "/chalk.runtime.v1.FunctionQueueMetaService/GetRecentCalls",
    "/chalk.runtime.v1.FunctionQueueMetaService/GetCallResults",
    "/chalk.runtime.v1.FunctionQueueMetaService/GetCallCount",
];

/// Methods callable without a token.
const PUBLIC: &[&str] = &["/chalk.server.v1.AuthService/GetToken"];

/// One served RPC method.
#[derive(Debug, Clone)]
pub struct MethodInfo {
    /// `/package.Service/Method`.
    pub path: String,
    /// Request message type.
    pub input: MessageDescriptor,
    /// Response message type.
    pub output: MessageDescriptor,
    /// Whether the client streams.
    pub client_streaming: bool,
    /// Whether the server streams.
    pub server_streaming: bool,
    /// Whether the method does real work yet.
    pub implemented: bool,
    /// Whether the method may be called without a token.
    pub public: bool,
}

impl MethodInfo {
    /// Unary in both directions (the only kind Connect's unary protocol carries).
    pub fn is_unary(&self) -> bool {
        !self.client_streaming && !self.server_streaming
    }
}

/// Every served method, by path.
#[derive(Debug, Clone)]
pub struct Methods {
    by_path: HashMap<String, MethodInfo>,
}

impl Methods {
    /// The methods of every service in the compiled schema.
    pub fn from_schema() -> Self {
        let pool = compute_proto::descriptor_pool();
        let mut by_path = HashMap::new();
        for service in pool.services() {
            for m in service.methods() {
                let path = format!("/{}/{}", service.full_name(), m.name());
                let info = MethodInfo {
                    implemented: IMPLEMENTED.contains(&path.as_str()),
                    public: PUBLIC.contains(&path.as_str()),
                    input: m.input(),
                    output: m.output(),
                    client_streaming: m.is_client_streaming(),
                    server_streaming: m.is_server_streaming(),
                    path: path.clone(),
                };
                by_path.insert(path, info);
            }
        }
        Self { by_path }
    }

    /// The method served at `path`.
    pub fn get(&self, path: &str) -> Option<&MethodInfo> {
        self.by_path.get(path)
    }

    /// Every served method.
    pub fn iter(&self) -> impl Iterator<Item = &MethodInfo> {
        self.by_path.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_method_exists_in_the_schema() {
        let methods = Methods::from_schema();
        for path in IMPLEMENTED.iter().chain(PUBLIC) {
            assert!(methods.get(path).is_some(), "{path} is not in proto/");
        }
        assert!(methods.get("/chalk.sandbox.v2.SandboxProcessService/OpenSession").is_some_and(|m| !m.is_unary()));
        assert!(methods.iter().count() >= 50);
    }
}
