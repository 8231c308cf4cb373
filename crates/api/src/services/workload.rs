//! Shared translation between the container spec on the wire and the control plane's workload request.

use compute_control::volume::MountRequest;
use compute_control::{Exposure, KernelPolicy, RefSource, Scope, ScopeKind, SecretRef, WorkloadKind, WorkloadRequest};
use compute_ingress::UpstreamProtocol;
use compute_proto::chalk::container::v1::{secret_ref, ChalkContainerSpec};
use compute_store::{SandboxRecord, SandboxStatus};
use prost::Message;
use tonic::Status;

/// Checks the parts of a spec this server does not serve yet, so a user learns at once rather than getting a
/// workload without them.
pub fn request(kind: WorkloadKind, spec: ChalkContainerSpec) -> Result<WorkloadRequest, Status> {
    let mut volumes = Vec::with_capacity(spec.volumes.len());
    for (i, v) in spec.volumes.iter().enumerate() {
        if !matches!(v.r#type.as_str(), "versioned_chalkfs" | "") {
            return Err(Status::invalid_argument(format!(
                "spec.volumes[{i}].type {:?} is not supported: use \"versioned_chalkfs\"",
                v.r#type
            )));
        }
        if v.name.is_empty() {
            return Err(Status::invalid_argument(format!("spec.volumes[{i}].name is required")));
        }
        let path = v.mount_path.trim_end_matches('/');
        if !v.mount_path.starts_with('/') || path.is_empty() || path.split('/').any(|c| c == "..") {
            return Err(Status::invalid_argument(format!(
                "spec.volumes[{i}].mount_path {:?} must be an absolute path other than / without '..'",
                v.mount_path
            )));
        }
        if volumes.iter().any(|m: &MountRequest| m.mount_path == path) {
            return Err(Status::invalid_argument(format!("spec.volumes[{i}].mount_path {path:?} is used twice")));
        }
        volumes.push(MountRequest {
            volume: v.name.clone(),
            mount_path: path.to_string(),
            version: v.version_id,
            ref_name: v.ref_name.clone().filter(|r| !r.is_empty()),
        });
    }
    let secret_refs = secret_refs(&spec.secret_refs)?;
    if spec.restore_from_snapshot_id.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(Status::unimplemented(
            "spec.restore_from_snapshot_id: snapshots are not implemented by this server yet",
        ));
    }
    refuse_unenforced(&spec)?;
    let kernel_policy = kernel_policy(&spec)?;
    let resources = spec.resources.clone().unwrap_or_default();
    if resources.gpu.as_deref().is_some_and(|g| !g.trim().is_empty()) {
        return Err(Status::failed_precondition("resources.gpu: this node has no GPUs to pass through"));
    }
    let lifetime = match &spec.lifetime {
        Some(d) if d.seconds < 0 || d.nanos < 0 => {
            return Err(Status::invalid_argument("spec.lifetime must be positive"))
        }
        Some(d) => Some(std::time::Duration::new(d.seconds as u64, d.nanos as u32)),
        None => None,
    };
    let mut env: Vec<(String, String)> = spec.env_vars.clone().into_iter().collect();
    env.sort();
    let own_scope = match kind {
        WorkloadKind::Sandbox | WorkloadKind::Container => ScopeKind::Sandbox,
        WorkloadKind::Replica => ScopeKind::ScalingGroup,
    };
    let secret_scopes = if spec.name.is_empty() { vec![] } else { vec![Scope::of(own_scope, &spec.name)] };
    // A replica's port is its group's business (the group's route); a container's own port is served under its name.
    let expose = match kind {
        WorkloadKind::Container => exposure(&spec)?,
        WorkloadKind::Sandbox | WorkloadKind::Replica => None,
    };
    Ok(WorkloadRequest {
        kind,
        name: spec.name.clone(),
        image: spec.image.clone(),
        entrypoint: spec.entrypoint.clone(),
        env,
        cpu: resources.cpu,
        memory: resources.memory,
        lifetime,
        spec: spec.encode_to_vec(),
        volumes,
        secret_refs,
        secret_scopes,
        expose,
        kernel_policy,
    })
}

/// Security fields this server does not enforce yet are refused, naming the field: a workload never runs with
/// a policy silently ignored (open egress where it asked for none, say).
fn refuse_unenforced(spec: &ChalkContainerSpec) -> Result<(), Status> {
    let not_enforced = |field: &str, what: &str| {
        Err(Status::unimplemented(format!(
            "spec.{field}: {what} are not enforced by this server yet, so a workload that asks for them is refused \
             rather than run without them; remove the field to run without it"
        )))
    };
    if spec.network_policy.is_some() {
        return not_enforced("network_policy", "egress network policies (NetworkPolicy)");
    }
    if spec.resource_detection.as_ref().is_some_and(|r| !r.detectors.is_empty()) {
        return not_enforced("resource_detection", "resource detectors (they inspect egress through a gateway)");
    }
    if spec.chalk_workload_identity.is_some() {
        return not_enforced("chalk_workload_identity", "workload identities (chalk_identity, OIDCTokenFile)");
    }
    Ok(())
}

/// `security_policy.kernel_policy`.
fn kernel_policy(spec: &ChalkContainerSpec) -> Result<KernelPolicy, Status> {
    use compute_proto::chalk::container::v1::KernelPolicy as Wire;
    let Some(raw) = spec.security_policy.as_ref().and_then(|p| p.kernel_policy) else {
        return Ok(KernelPolicy::Unspecified);
    };
    match Wire::try_from(raw) {
        Ok(Wire::Unspecified) => Ok(KernelPolicy::Unspecified),
        Ok(Wire::Restricted) => Ok(KernelPolicy::Restricted),
        Ok(Wire::Open) => Ok(KernelPolicy::Open),
        Err(_) => Err(Status::invalid_argument(format!(
            "spec.security_policy.kernel_policy {raw} is not a KernelPolicy: use KERNEL_POLICY_RESTRICTED or \
             KERNEL_POLICY_OPEN"
        ))),
    }
}

/// How a container's `port` is served, if it has one.
fn exposure(spec: &ChalkContainerSpec) -> Result<Option<Exposure>, Status> {
    let port = match spec.port {
        None => return Ok(None),
        Some(p) if (1..=65535).contains(&p) => p as u16,
        Some(p) => return Err(Status::invalid_argument(format!("spec.port {p} is not a TCP port (1-65535)"))),
    };
    let protocol = upstream_protocol(spec.protocol.as_deref(), "spec")?;
    let authenticated = authenticated(spec.authentication.as_deref(), "spec")?;
    Ok(Some(Exposure { port, protocol, authenticated }))
}

/// A spec's `protocol` (`field` is where the spec sits in the request, for errors).
pub(crate) fn upstream_protocol(value: Option<&str>, field: &str) -> Result<UpstreamProtocol, Status> {
    match value.unwrap_or("").to_ascii_lowercase().as_str() {
        "" | "http" | "http1" | "https" => Ok(UpstreamProtocol::Http1),
        "grpc" | "h2c" | "http2" => Ok(UpstreamProtocol::H2c),
        other => Err(Status::invalid_argument(format!(
            "{field}.protocol {other:?} is not supported: use \"http\" (HTTP/1.1) or \"grpc\"/\"h2c\" (HTTP/2 with \
             prior knowledge)"
        ))),
    }
}

/// Whether a spec's `authentication` asks callers for a token of the environment.
pub(crate) fn authenticated(value: Option<&str>, field: &str) -> Result<bool, Status> {
    match value.unwrap_or("").to_ascii_uppercase().as_str() {
        "" | "PUBLIC" | "UNAUTHENTICATED" | "NONE" => Ok(false),
        "AUTHENTICATED" => Ok(true),
        other => Err(Status::invalid_argument(format!(
            "{field}.authentication {other:?} is not supported: use \"AUTHENTICATED\" or leave it unset (public)"
        ))),
    }
}

/// The spec's secret references, each naming a secret or an integration.
fn secret_refs(refs: &[compute_proto::chalk::container::v1::SecretRef]) -> Result<Vec<SecretRef>, Status> {
    refs.iter()
        .enumerate()
        .map(|(i, r)| {
            let source = match &r.source {
                Some(secret_ref::Source::SecretName(n)) if !n.is_empty() => RefSource::Secret(n.clone()),
                Some(secret_ref::Source::IntegrationName(n)) if !n.is_empty() => RefSource::Integration(n.clone()),
                _ => {
                    return Err(Status::invalid_argument(format!(
                        "spec.secret_refs[{i}] needs secret_name or integration_name"
                    )))
                }
            };
            Ok(SecretRef {
                source,
                keys: r.keys.clone(),
                aliases: r.aliases.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                prefix: r.prefix.clone().filter(|p| !p.is_empty()),
            })
        })
        .collect()
}

/// The spec a record was created with.
pub fn spec_of(rec: &SandboxRecord) -> ChalkContainerSpec {
    let mut spec = ChalkContainerSpec::decode(rec.spec.as_slice()).unwrap_or_default();
    // The generated name is the record's; show it.
    spec.name = rec.name.clone();
    spec
}

/// Milliseconds since the epoch as a protobuf timestamp.
pub fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: ms.div_euclid(1000), nanos: (ms.rem_euclid(1000) * 1_000_000) as i32 }
}

/// The v2 sandbox status.
pub fn sandbox_status(s: SandboxStatus) -> compute_proto::chalk::sandbox::v2::SandboxStatus {
    use compute_proto::chalk::sandbox::v2::SandboxStatus as P;
    match s {
        SandboxStatus::Pending => P::Pending,
        SandboxStatus::Running => P::Running,
        SandboxStatus::Succeeded => P::Succeeded,
        SandboxStatus::Failed => P::Failed,
        SandboxStatus::Terminated => P::Terminated,
    }
}

/// The container API's status string.
pub fn container_status(s: SandboxStatus) -> &'static str {
    match s {
        SandboxStatus::Pending => "Pending",
        SandboxStatus::Running => "Running",
        SandboxStatus::Succeeded => "Succeeded",
        SandboxStatus::Failed => "Failed",
        SandboxStatus::Terminated => "Terminated",
    }
}

/// A page of a listing: (limit, offset) from the request's limit (default 100, at most 1000) and cursor (an
/// offset this server issued as `next_cursor`).
pub fn page(limit: Option<i32>, cursor: Option<&str>) -> Result<(u32, u32), Status> {
    let limit = limit.unwrap_or(100).clamp(1, 1000) as u32;
    let offset = match cursor.filter(|c| !c.is_empty()) {
        Some(c) => {
            c.parse().map_err(|_| Status::invalid_argument(format!("cursor {c:?} is not one this server issued")))?
        }
        None => 0,
    };
    Ok((limit, offset))
}
