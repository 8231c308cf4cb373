//! `chalk.scalinggroup.v1.ScalingGroupManagerService`: scaling groups, their revisions, and the spec's reading.

use std::sync::Arc;
use std::time::Duration;

use compute_control::scaling::{ProbeCheck, ProbeSpec};
use compute_control::{
    ControlError, CronWindows, GroupSpec, GroupView, QueueDepthTrigger, ScalingGroups, WorkloadKind,
};
use compute_proto::chalk::container::v1::{readiness_probe, startup_probe};
use compute_proto::chalk::scalinggroup::v1::scaling_group_manager_service_server::ScalingGroupManagerService;
use compute_proto::chalk::scalinggroup::v1::*;
use compute_store::RevisionRecord;
use prost::Message;
use tonic::{Request, Response, Status};

use super::workload::{authenticated, page, request, timestamp, upstream_protocol};
use super::{base_url, principal};
use crate::status::from_control;

/// The ScalingGroupManagerService handler.
pub struct ScalingApi {
    groups: Arc<ScalingGroups>,
    ingress_domain: Option<String>,
}

impl ScalingApi {
    /// A handler over `groups`; with `ingress_domain`, groups' URLs name them by host instead of by path.
    pub fn new(groups: Arc<ScalingGroups>, ingress_domain: Option<String>) -> Self {
        Self { groups, ingress_domain }
    }

    /// Where clients reach a group (see [`super::ingress_url`]).
    fn web_url(&self, base: &str, view: &GroupView) -> String {
        super::ingress_url(self.ingress_domain.as_deref(), base, &view.environment_name, &view.group.name)
    }

    pub(crate) fn response(&self, view: &GroupView, base: &str) -> ScalingGroupResponse {
        let mut r = response(view);
        if view.group.deleted_at.is_none() {
            r.web_url = Some(self.web_url(base, view));
        }
        r
    }
}

/// Reads a stored `ScalingGroupSpec` (the [`compute_control::SpecParser`] the control plane is given).
pub fn parse_spec(wire: &[u8]) -> Result<GroupSpec, ControlError> {
    let spec = ScalingGroupSpec::decode(wire)
        .map_err(|e| ControlError::InvalidArgument(format!("spec: not a ScalingGroupSpec: {e}")))?;
    group_spec(spec).map_err(|s| match s.code() {
        tonic::Code::Unimplemented => ControlError::Unimplemented(s.message().to_string()),
        tonic::Code::FailedPrecondition => ControlError::FailedPrecondition(s.message().to_string()),
        _ => ControlError::InvalidArgument(s.message().to_string()),
    })
}

fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg)
}

fn group_spec(spec: ScalingGroupSpec) -> Result<GroupSpec, Status> {
    let container = spec.container_spec.ok_or_else(|| invalid("spec.container_spec is required"))?;
    if container.name.is_empty() {
        return Err(invalid("spec.container_spec.name is required: it names the scaling group"));
    }
    let port = match container.port {
        Some(p) if (1..=65535).contains(&p) => p as u16,
        Some(p) => return Err(invalid(format!("spec.container_spec.port {p} is not a TCP port (1-65535)"))),
        None => return Err(invalid("spec.container_spec.port is required: the port replicas serve HTTP on")),
    };
    let protocol = upstream_protocol(container.protocol.as_deref(), "spec.container_spec")?;
    let authenticated = authenticated(container.authentication.as_deref(), "spec.container_spec")?;
    if container.lifetime.is_some() {
        return Err(invalid(
            "spec.container_spec.lifetime: replicas of a scaling group run until the group is deleted; a lifetime \
             is for containers and sandboxes",
        ));
    }
    let probe = probe_spec(&container)?;
    let scaling = spec.scaling_spec.unwrap_or(ScalingSpec { min_replicas: 1, max_replicas: 1, ..Default::default() });
    if scaling.min_replicas < 0 {
        return Err(invalid(format!("spec.scaling_spec.min_replicas {} must be 0 or more", scaling.min_replicas)));
    }
    if scaling.max_replicas < 1 || scaling.max_replicas < scaling.min_replicas {
        return Err(invalid(format!(
            "spec.scaling_spec.max_replicas {} must be at least 1 and at least min_replicas ({})",
            scaling.max_replicas, scaling.min_replicas
        )));
    }
    let unsupported = [
        (scaling.gpu_utilization_trigger.is_some(), "gpu_utilization_trigger"),
        (scaling.task_queue_trigger.is_some(), "task_queue_trigger"),
    ];
    if let Some((_, what)) = unsupported.iter().find(|(set, _)| *set) {
        return Err(Status::unimplemented(format!(
            "spec.scaling_spec.{what} is not implemented by this server yet: groups scale on the requests in flight \
             through the ingress, on CPU use (target_cpu_utilization_percentage), on a function's queue \
             (function_queue_depth_trigger) and over cron windows (cron_scaling_trigger)"
        )));
    }
    let (queue_depth, windows) = triggers(&scaling)?;
    let seconds = |field: &str, v: Option<i32>| -> Result<Option<Duration>, Status> {
        match v {
            None => Ok(None),
            Some(s) if s >= 0 => Ok(Some(Duration::from_secs(s as u64))),
            Some(s) => Err(invalid(format!("spec.scaling_spec.{field} {s} must be 0 or more"))),
        }
    };
    let window = seconds("window_seconds", scaling.window_seconds)?.map(|d| d.max(Duration::from_secs(1)));
    let shutdown_delay = seconds("shutdown_delay_seconds", scaling.shutdown_delay_seconds)?;
    let target_cpu_percent = match scaling.target_cpu_utilization_percentage {
        None => None,
        Some(p) if (1..=1000).contains(&p) => Some(p as u32),
        Some(p) => {
            return Err(invalid(format!(
                "spec.scaling_spec.target_cpu_utilization_percentage {p} must be between 1 and 1000 (percent of each \
                 replica's resources.cpu, one core when unset)"
            )))
        }
    };
    let hold_requests = scaling.scale_from_zero_request_policy() != ScaleFromZeroRequestPolicy::Error;
    let name = container.name.clone();
    let replica = request(WorkloadKind::Replica, container)?;
    Ok(GroupSpec {
        name,
        replica,
        port,
        protocol,
        authenticated,
        min_replicas: scaling.min_replicas as u32,
        max_replicas: scaling.max_replicas as u32,
        window,
        shutdown_delay,
        target_cpu_percent,
        hold_requests,
        probe,
        queue_depth,
        windows,
    })
}

/// The queue-depth and cron-window triggers of a scaling spec.
fn triggers(scaling: &ScalingSpec) -> Result<(Option<QueueDepthTrigger>, Option<CronWindows>), Status> {
    let queue_depth = match &scaling.function_queue_depth_trigger {
        None => None,
        Some(t) if t.function_name.is_empty() => {
            return Err(invalid("spec.scaling_spec.function_queue_depth_trigger.function_name is required"))
        }
        Some(t) if t.target_queue_depth < 1 => {
            return Err(invalid(format!(
                "spec.scaling_spec.function_queue_depth_trigger.target_queue_depth {} must be 1 or more (calls \
                 queued per replica)",
                t.target_queue_depth
            )))
        }
        Some(t) => Some(QueueDepthTrigger { function: t.function_name.clone(), target: t.target_queue_depth as u32 }),
    };
    let windows = match &scaling.cron_scaling_trigger {
        None => None,
        Some(c) => {
            let windows: Vec<(String, String, i32)> =
                c.windows.iter().map(|w| (w.start.clone(), w.end.clone(), w.desired_replicas)).collect();
            Some(
                CronWindows::parse(&c.timezone, &windows)
                    .map_err(|e| invalid(format!("spec.scaling_spec.cron_scaling_trigger.{e}")))?,
            )
        }
    };
    Ok((queue_depth, windows))
}

fn probe_spec(container: &compute_proto::chalk::container::v1::ChalkContainerSpec) -> Result<ProbeSpec, Status> {
    let mut probe = ProbeSpec::default();
    let http_path = |p: &Option<String>| p.clone().filter(|p| !p.is_empty()).unwrap_or_else(|| "/".into());
    if let Some(startup) = &container.startup_probe {
        probe.check = match &startup.check {
            Some(startup_probe::Check::Http(h)) => ProbeCheck::Http(http_path(&h.path)),
            Some(startup_probe::Check::Grpc(_)) => ProbeCheck::Grpc(String::new()),
            None => ProbeCheck::Tcp,
        };
    }
    if let Some(ready) = &container.readiness_probe {
        match &ready.check {
            Some(readiness_probe::Check::Http(h)) => probe.check = ProbeCheck::Http(http_path(&h.path)),
            Some(readiness_probe::Check::Grpc(g)) => {
                probe.check = ProbeCheck::Grpc(g.service.clone().unwrap_or_default())
            }
            None => {}
        }
        if let Some(p) = ready.period_seconds {
            if p < 1 {
                return Err(invalid(format!(
                    "spec.container_spec.readiness_probe.period_seconds {p} must be 1 or more"
                )));
            }
            probe.period = Duration::from_secs(p as u64);
        }
        if let Some(t) = ready.timeout_seconds {
            if t < 1 {
                return Err(invalid(format!(
                    "spec.container_spec.readiness_probe.timeout_seconds {t} must be 1 or more"
                )));
            }
            probe.timeout = Duration::from_secs(t as u64);
        }
        if let Some(f) = ready.failure_threshold {
            if f < 1 {
                return Err(invalid(format!(
                    "spec.container_spec.readiness_probe.failure_threshold {f} must be 1 or more"
                )));
            }
            probe.failure_threshold = f as u32;
        }
    }
    if let ProbeCheck::Http(path) = &probe.check {
        if !path.starts_with('/') || path.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
            return Err(invalid(format!(
                "spec.container_spec readiness/startup probe path {path:?} must start with '/' and hold no spaces"
            )));
        }
    }
    Ok(probe)
}

fn spec_of(rev: &RevisionRecord) -> Option<ScalingGroupSpec> {
    ScalingGroupSpec::decode(rev.spec.as_slice()).ok()
}

/// A group as the wire shows it, without its URL (which depends on how the ingress is reached).
fn response(view: &GroupView) -> ScalingGroupResponse {
    let state = &view.state;
    ScalingGroupResponse {
        id: view.group.id.clone(),
        name: view.group.name.clone(),
        revision_id: view.revision.id.clone(),
        status: state.status.clone(),
        status_message: state.message.clone(),
        spec: spec_of(&view.revision),
        created_at: Some(timestamp(view.group.created_at)),
        updated_at: Some(timestamp(view.group.updated_at)),
        deleted_at: view.group.deleted_at.map(timestamp),
        web_url: None,
        ready_replicas: state.ready as i32,
        available_replicas: state.ready as i32,
        metadata: [("desired_replicas", state.desired as f64), ("running_replicas", state.running as f64)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), prost_types::Value { kind: Some(prost_types::value::Kind::NumberValue(v)) }))
            .chain(std::iter::once((
                "replicas".to_string(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::ListValue(prost_types::ListValue {
                        values: state
                            .replicas
                            .iter()
                            .map(|id| prost_types::Value {
                                kind: Some(prost_types::value::Kind::StringValue(id.clone())),
                            })
                            .collect(),
                    })),
                },
            )))
            .collect(),
        status_details: state.details.clone(),
        created_by: Some(view.group.created_by.clone()),
        cluster_id: "local".into(),
    }
}

fn revision_response(group: &compute_store::ScalingGroupRecord, rev: &RevisionRecord) -> ScalingGroupRevisionResponse {
    let latest = group.revision_id == rev.id;
    let status = match (group.deleted_at.is_some(), latest) {
        (true, _) => "Deleted",
        (false, true) => "Active",
        (false, false) => "Superseded",
    };
    ScalingGroupRevisionResponse {
        id: rev.id.clone(),
        scaling_group_id: group.id.clone(),
        scaling_group_name: group.name.clone(),
        status: status.into(),
        status_message: None,
        spec: spec_of(rev),
        created_at: Some(timestamp(rev.created_at)),
        metadata: [(
            "revision_number".to_string(),
            prost_types::Value { kind: Some(prost_types::value::Kind::NumberValue(rev.number as f64)) },
        )]
        .into_iter()
        .collect(),
        latest,
        deleted_at: group.deleted_at.map(timestamp),
        status_details: None,
        created_by: Some(rev.created_by.clone()),
    }
}

/// The revision a traffic update sends every request to (`None`: the latest). Splits are not served.
fn one_target(traffic: &ScalingGroupTraffic) -> Result<Option<String>, Status> {
    use scaling_group_traffic_target::RevisionTarget;
    let [target] = traffic.targets.as_slice() else {
        return Err(Status::unimplemented(
            "traffic: splitting traffic between revisions is not implemented by this server yet; give one target \
             with percent 100",
        ));
    };
    if target.percent != 100 {
        return Err(Status::unimplemented(format!(
            "traffic.targets[0].percent {}: splitting traffic between revisions is not implemented by this server \
             yet; give one target with percent 100",
            target.percent
        )));
    }
    match &target.revision_target {
        Some(RevisionTarget::ScalingGroupRevisionId(id)) if !id.is_empty() => Ok(Some(id.clone())),
        Some(RevisionTarget::LatestRevision(_)) => Ok(None),
        _ => Err(invalid("traffic.targets[0] needs scaling_group_revision_id or latest_revision")),
    }
}

/// Checks a spec on the way in, so a bad one is refused with the field's name before anything is recorded.
fn checked_wire(spec: Option<ScalingGroupSpec>) -> Result<Vec<u8>, Status> {
    let spec = spec.ok_or_else(|| invalid("spec is required"))?;
    let wire = spec.encode_to_vec();
    group_spec(spec)?;
    Ok(wire)
}

fn group_key(key: Option<&get_scaling_group_revision_request::ScalingGroupKey>) -> (Option<String>, Option<String>) {
    use get_scaling_group_revision_request::ScalingGroupKey as K;
    match key {
        Some(K::ScalingGroupId(id)) => (Some(id.clone()), None),
        Some(K::ScalingGroupName(n)) => (None, Some(n.clone())),
        None => (None, None),
    }
}

#[tonic::async_trait]
impl ScalingGroupManagerService for ScalingApi {
    async fn create_scaling_group(
        &self,
        req: Request<CreateScalingGroupRequest>,
    ) -> Result<Response<CreateScalingGroupResponse>, Status> {
        let who = principal(&req)?.clone();
        let base = base_url(&req)?;
        let wire = checked_wire(req.into_inner().spec)?;
        let view = self.groups.create(&who, wire).map_err(from_control)?;
        Ok(Response::new(CreateScalingGroupResponse { scaling_group: Some(self.response(&view, &base)) }))
    }

    async fn update_scaling_group(
        &self,
        req: Request<UpdateScalingGroupRequest>,
    ) -> Result<Response<UpdateScalingGroupResponse>, Status> {
        let who = principal(&req)?.clone();
        let base = base_url(&req)?;
        let r = req.into_inner();
        if r.scaling_group_id.is_empty() {
            return Err(invalid("scaling_group_id is required"));
        }
        let paths: Vec<&str> =
            r.update_mask.as_ref().map(|m| m.paths.iter().map(String::as_str).collect()).unwrap_or_default();
        if let Some(p) = paths.iter().find(|p| !matches!(**p, "spec" | "traffic")) {
            return Err(invalid(format!(
                "update_mask path {p:?} is not supported: update the whole \"spec\", or select a revision with \"traffic\""
            )));
        }
        let traffic = r.traffic.filter(|t| !t.targets.is_empty());
        let wants_traffic = paths.contains(&"traffic") || (paths.is_empty() && traffic.is_some());
        let wants_spec = paths.contains(&"spec") || (paths.is_empty() && r.spec.is_some());
        if wants_traffic && wants_spec {
            return Err(invalid("update either the spec or the traffic in one call, not both"));
        }
        if wants_traffic {
            let traffic = traffic.ok_or_else(|| invalid("traffic.targets is required with update_mask \"traffic\""))?;
            let revision = one_target(&traffic)?;
            let view =
                self.groups.select_revision(&who, &r.scaling_group_id, revision.as_deref()).map_err(from_control)?;
            return Ok(Response::new(UpdateScalingGroupResponse { scaling_group: Some(self.response(&view, &base)) }));
        }
        let wire = checked_wire(r.spec)?;
        let view = self.groups.update(&who, &r.scaling_group_id, wire).map_err(from_control)?;
        Ok(Response::new(UpdateScalingGroupResponse { scaling_group: Some(self.response(&view, &base)) }))
    }

    async fn get_scaling_group(
        &self,
        req: Request<GetScalingGroupRequest>,
    ) -> Result<Response<GetScalingGroupResponse>, Status> {
        let who = principal(&req)?.clone();
        let base = base_url(&req)?;
        let r = req.into_inner();
        let view = self
            .groups
            .get(&who, r.id.as_deref(), r.name.as_deref(), r.include_deleted.unwrap_or(false))
            .map_err(from_control)?;
        Ok(Response::new(GetScalingGroupResponse { scaling_group: Some(self.response(&view, &base)) }))
    }

    async fn list_scaling_groups(
        &self,
        req: Request<ListScalingGroupsRequest>,
    ) -> Result<Response<ListScalingGroupsResponse>, Status> {
        let who = principal(&req)?.clone();
        let base = base_url(&req)?;
        let r = req.into_inner();
        let (limit, offset) = page(r.limit, r.cursor.as_deref())?;
        let views =
            self.groups.list(&who, r.include_deleted.unwrap_or(false), limit + 1, offset).map_err(from_control)?;
        let more = views.len() > limit as usize;
        let filters = r.filters.unwrap_or_default();
        let scaling_groups = views
            .iter()
            .take(limit as usize)
            .filter(|v| {
                filters.statuses.is_empty() || filters.statuses.iter().any(|s| s.eq_ignore_ascii_case(&v.state.status))
            })
            .filter(|v| filters.created_by.is_empty() || filters.created_by.contains(&v.group.created_by))
            .filter(|v| {
                filters.images.is_empty()
                    || spec_of(&v.revision)
                        .and_then(|s| s.container_spec)
                        .is_some_and(|c| filters.images.contains(&c.image))
            })
            .filter(|v| r.search.is_empty() || v.group.name.contains(&r.search) || v.group.id.contains(&r.search))
            .map(|v| self.response(v, &base))
            .collect();
        Ok(Response::new(ListScalingGroupsResponse {
            scaling_groups,
            next_cursor: more.then(|| (offset + limit).to_string()),
        }))
    }

    async fn delete_scaling_group(
        &self,
        req: Request<DeleteScalingGroupRequest>,
    ) -> Result<Response<DeleteScalingGroupResponse>, Status> {
        let who = principal(&req)?.clone();
        let base = base_url(&req)?;
        let r = req.into_inner();
        let view = self.groups.delete(&who, r.id.as_deref(), r.name.as_deref()).await.map_err(from_control)?;
        Ok(Response::new(DeleteScalingGroupResponse { scaling_group: Some(self.response(&view, &base)) }))
    }

    async fn get_scaling_group_revision(
        &self,
        req: Request<GetScalingGroupRevisionRequest>,
    ) -> Result<Response<GetScalingGroupRevisionResponse>, Status> {
        let who = principal(&req)?.clone();
        let r = req.into_inner();
        if r.revision_id.is_empty() {
            return Err(invalid("revision_id is required"));
        }
        let (id, name) = group_key(r.scaling_group_key.as_ref());
        let (group, rev) = self
            .groups
            .revision(&who, id.as_deref(), name.as_deref(), &r.revision_id, r.include_deleted.unwrap_or(false))
            .map_err(from_control)?;
        Ok(Response::new(GetScalingGroupRevisionResponse { revision: Some(revision_response(&group, &rev)) }))
    }

    async fn list_scaling_group_revisions(
        &self,
        req: Request<ListScalingGroupRevisionsRequest>,
    ) -> Result<Response<ListScalingGroupRevisionsResponse>, Status> {
        use list_scaling_group_revisions_request::ScalingGroupKey as K;
        let who = principal(&req)?.clone();
        let r = req.into_inner();
        let (id, name) = match r.scaling_group_key {
            Some(K::ScalingGroupId(id)) => (Some(id), None),
            Some(K::ScalingGroupName(n)) => (None, Some(n)),
            None => (None, None),
        };
        let (limit, offset) = page(r.limit, r.cursor.as_deref())?;
        let (group, revs) = self
            .groups
            .revisions(&who, id.as_deref(), name.as_deref(), r.include_deleted.unwrap_or(false), limit + 1, offset)
            .map_err(from_control)?;
        let more = revs.len() > limit as usize;
        Ok(Response::new(ListScalingGroupRevisionsResponse {
            revisions: revs.iter().take(limit as usize).map(|rev| revision_response(&group, rev)).collect(),
            next_cursor: more.then(|| (offset + limit).to_string()),
        }))
    }
}
