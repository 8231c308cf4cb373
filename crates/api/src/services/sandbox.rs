//! `chalk.sandbox.v2.SandboxService`.

use std::sync::Arc;
use std::time::Duration;

use compute_control::{WorkloadKind, Workloads};
use compute_proto::chalk::sandbox::v2::create_sandbox_request::Source;
use compute_proto::chalk::sandbox::v2::sandbox_service_server::SandboxService;
use compute_proto::chalk::sandbox::v2::*;
use compute_store::SandboxRecord;
use tonic::{Request, Response, Status};

use super::principal;
use super::workload::{page, request, sandbox_status, spec_of, timestamp};
use crate::status::from_control;

/// The SandboxService handler.
pub struct SandboxApi {
    workloads: Arc<Workloads>,
}

impl SandboxApi {
    /// A handler over `workloads`.
    pub fn new(workloads: Arc<Workloads>) -> Self {
        Self { workloads }
    }
}

/// The wire form of a record.
pub fn info(rec: &SandboxRecord) -> SandboxInfo {
    SandboxInfo {
        id: rec.id.clone(),
        name: rec.name.clone(),
        status: sandbox_status(rec.status) as i32,
        status_message: rec.status_message.clone().filter(|m| !m.is_empty()),
        spec: Some(spec_of(rec)),
        created_at: Some(timestamp(rec.created_at)),
        finished_at: rec.finished_at.map(timestamp),
        web_url: None,
        region: "local".into(),
        created_by: Some(rec.created_by.clone()),
        status_details: rec.status_details.clone(),
        cluster_id: "local".into(),
    }
}

fn need_id(id: &str) -> Result<(), Status> {
    if id.is_empty() {
        return Err(Status::invalid_argument("id is required"));
    }
    Ok(())
}

#[tonic::async_trait]
impl SandboxService for SandboxApi {
    async fn create_sandbox(
        &self,
        req: Request<CreateSandboxRequest>,
    ) -> Result<Response<CreateSandboxResponse>, Status> {
        let who = principal(&req)?.clone();
        let spec = match req.into_inner().source {
            Some(Source::Spec(spec)) => spec,
            Some(Source::SnapshotId(_)) => {
                return Err(Status::unimplemented(
                    "source.snapshot_id: snapshots are not implemented by this server yet",
                ))
            }
            None => return Err(Status::invalid_argument("source is required: send source.spec")),
        };
        let rec = self.workloads.create(&who, request(WorkloadKind::Sandbox, spec)?).map_err(from_control)?;
        Ok(Response::new(CreateSandboxResponse { sandbox: Some(info(&rec)) }))
    }

    async fn get_sandbox(&self, req: Request<GetSandboxRequest>) -> Result<Response<GetSandboxResponse>, Status> {
        let who = principal(&req)?.clone();
        let id = req.into_inner().id;
        need_id(&id)?;
        let rec = self.workloads.get(&who, &id).map_err(from_control)?;
        Ok(Response::new(GetSandboxResponse { sandbox: Some(info(&rec)) }))
    }

    async fn list_sandboxes(
        &self,
        req: Request<ListSandboxesRequest>,
    ) -> Result<Response<ListSandboxesResponse>, Status> {
        let who = principal(&req)?.clone();
        let r = req.into_inner();
        let (limit, offset) = page(r.limit, r.cursor.as_deref())?;
        let filters = r.filters.unwrap_or_default();
        // Fetch one extra to know whether there is a next page; filters apply after, so page by raw offset.
        let rows = self.workloads.list(&who, None, false, limit + 1, offset).map_err(from_control)?;
        let more = rows.len() > limit as usize;
        let sandboxes = rows
            .iter()
            .take(limit as usize)
            .filter(|rec| {
                filters.statuses.is_empty() || filters.statuses.contains(&(sandbox_status(rec.status) as i32))
            })
            .filter(|rec| {
                #[allow(deprecated)]
                let names = &filters.names;
                names.is_empty() || names.contains(&rec.name)
            })
            .filter(|rec| filters.images.is_empty() || filters.images.contains(&rec.image))
            .filter(|rec| r.search.is_empty() || rec.name.contains(&r.search) || rec.id.contains(&r.search))
            .map(info)
            .collect();
        Ok(Response::new(ListSandboxesResponse { sandboxes, next_cursor: more.then(|| (offset + limit).to_string()) }))
    }

    async fn terminate_sandbox(
        &self,
        req: Request<TerminateSandboxRequest>,
    ) -> Result<Response<TerminateSandboxResponse>, Status> {
        let who = principal(&req)?.clone();
        let r = req.into_inner();
        need_id(&r.id)?;
        let grace = r
            .grace_period
            .map(|d| Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32))
            .unwrap_or(Duration::from_secs(10));
        self.workloads.terminate(&who, &r.id, grace.min(Duration::from_secs(300))).await.map_err(from_control)?;
        Ok(Response::new(TerminateSandboxResponse {}))
    }
}
