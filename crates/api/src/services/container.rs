//! `chalk.container.v1.ContainerService`: the container API, over the same workloads as sandboxes.

use std::sync::Arc;
use std::time::Duration;

use compute_control::{WorkloadKind, Workloads};
use compute_proto::chalk::container::v1::container_service_server::ContainerService;
use compute_proto::chalk::container::v1::*;
use compute_store::SandboxRecord;
use tonic::{Request, Response, Status};

use super::workload::{container_status, page, request, spec_of, timestamp};
use super::{base_url, principal};
use crate::status::from_control;

/// The ContainerService handler.
pub struct ContainerApi {
    workloads: Arc<Workloads>,
    ingress_domain: Option<String>,
}

impl ContainerApi {
    /// A handler over `workloads`; with `ingress_domain`, the URLs of containers with a port name them by host
    /// instead of by path.
    pub fn new(workloads: Arc<Workloads>, ingress_domain: Option<String>) -> Self {
        Self { workloads, ingress_domain }
    }

    /// The container as the SDK reads it; a live one with a port has the URL the ingress serves it at.
    fn response(&self, rec: &SandboxRecord, base: &str) -> ContainerResponse {
        let web_url = self
            .workloads
            .served_as(&rec.id)
            .map(|(env, name)| super::ingress_url(self.ingress_domain.as_deref(), base, &env, &name));
        ContainerResponse { web_url, ..response(rec) }
    }
}

fn response(rec: &SandboxRecord) -> ContainerResponse {
    ContainerResponse {
        id: rec.id.clone(),
        name: rec.name.clone(),
        status: container_status(rec.status).into(),
        status_message: rec.status_message.clone().filter(|m| !m.is_empty()),
        spec: Some(spec_of(rec)),
        created_at: Some(timestamp(rec.created_at)),
        stopped_at: rec.finished_at.map(timestamp),
        pod_name: rec.id.clone(),
        region: "local".into(),
        created_by: Some(rec.created_by.clone()),
        status_details: rec.status_details.clone(),
        cluster_id: "local".into(),
        ..Default::default()
    }
}

impl ContainerApi {
    fn find(
        &self,
        who: &compute_control::Principal,
        id: Option<&str>,
        name: Option<&str>,
    ) -> Result<SandboxRecord, Status> {
        match (id.filter(|s| !s.is_empty()), name.filter(|s| !s.is_empty())) {
            (Some(id), _) => self.workloads.get(who, id).map_err(from_control),
            (None, Some(name)) => self.workloads.get_by_name(who, name).map_err(from_control),
            (None, None) => Err(Status::invalid_argument("id or name is required")),
        }
    }
}

#[tonic::async_trait]
impl ContainerService for ContainerApi {
    async fn run_container(&self, req: Request<RunContainerRequest>) -> Result<Response<RunContainerResponse>, Status> {
        let who = principal(&req)?.clone();
        let base = base_url(&req)?;
        let spec = req
            .into_inner()
            .container
            .and_then(|c| c.spec)
            .ok_or_else(|| Status::invalid_argument("container.spec is required"))?;
        let rec = self.workloads.create(&who, request(WorkloadKind::Container, spec)?).map_err(from_control)?;
        Ok(Response::new(RunContainerResponse { container: Some(self.response(&rec, &base)) }))
    }

    async fn get_container(&self, req: Request<GetContainerRequest>) -> Result<Response<GetContainerResponse>, Status> {
        let who = principal(&req)?.clone();
        let base = base_url(&req)?;
        let r = req.into_inner();
        let rec = self.find(&who, r.id.as_deref(), r.name.as_deref())?;
        Ok(Response::new(GetContainerResponse { container: Some(self.response(&rec, &base)) }))
    }

    async fn stop_container(
        &self,
        req: Request<StopContainerRequest>,
    ) -> Result<Response<StopContainerResponse>, Status> {
        let who = principal(&req)?.clone();
        let r = req.into_inner();
        let rec = self.find(&who, r.id.as_deref(), r.name.as_deref())?;
        let grace = Duration::from_secs(r.grace_period_seconds.unwrap_or(10).clamp(0, 300) as u64);
        let rec = self.workloads.terminate(&who, &rec.id, grace).await.map_err(from_control)?;
        Ok(Response::new(StopContainerResponse { container: Some(response(&rec)) }))
    }

    async fn list_containers(
        &self,
        req: Request<ListContainersRequest>,
    ) -> Result<Response<ListContainersResponse>, Status> {
        let who = principal(&req)?.clone();
        let base = base_url(&req)?;
        let r = req.into_inner();
        let (limit, offset) = page(r.limit, r.cursor.as_deref())?;
        let live_only = !r.include_stopped.unwrap_or(false);
        let rows = self
            .workloads
            .list(&who, Some(WorkloadKind::Container), live_only, limit + 1, offset)
            .map_err(from_control)?;
        let more = rows.len() > limit as usize;
        let containers = rows
            .iter()
            .take(limit as usize)
            .filter(|rec| {
                r.statuses.is_empty() || r.statuses.iter().any(|s| s.eq_ignore_ascii_case(container_status(rec.status)))
            })
            .filter(|rec| r.images.is_empty() || r.images.contains(&rec.image))
            .filter(|rec| r.search.as_deref().is_none_or(|s| rec.name.contains(s) || rec.id.contains(s)))
            .map(|rec| self.response(rec, &base))
            .collect();
        Ok(Response::new(ListContainersResponse {
            containers,
            next_cursor: more.then(|| (offset + limit).to_string()),
        }))
    }
}
