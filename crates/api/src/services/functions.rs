//! `chalk.externalfunctioncatalog.v1.ExternalFunctionCatalogService` (deploying functions, their versions, calls
//! through the API) and `chalk.runtime.v1.RemoteCallService` (`.remote()` calls, which the SDK sends to the
//! host of the function's `web_url`: this listener).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use compute_control::functions::{
    CallPolicy, ConcurrencyLimit, Deployment, FunctionCodec, QueuePolicy, RateLimit, RetryPolicy, Schedule,
};
use compute_control::{
    call_summary, ControlError, DeferredCall, EnsureRequest, Ensured, FunctionView, Functions, Polled, Principal,
    ScalingGroups,
};
use compute_proto::chalk::common::v1::{ChalkError, ChalkException, ErrorCode, ErrorCodeCategory};
use compute_proto::chalk::externalfunctioncatalog::v1 as pb;
use compute_proto::chalk::externalfunctioncatalog::v1::external_function_catalog_service_server::ExternalFunctionCatalogService;
use compute_proto::chalk::runtime::v1::async_remote_call_service_server::AsyncRemoteCallService;
use compute_proto::chalk::runtime::v1::function_queue_meta_service_server::FunctionQueueMetaService;
use compute_proto::chalk::runtime::v1::remote_call_service_server::RemoteCallService;
use compute_proto::chalk::runtime::v1::{
    CallFunctionRequest, CallFunctionResponse, CallResult, EnqueueRemoteCallRequest, EnqueueRemoteCallResponse,
    FunctionCallInfo, GetCallCountRequest, GetCallCountResponse, GetCallResultsRequest, GetCallResultsResponse,
    GetRecentCallsRequest, GetRecentCallsResponse, PollRemoteCallRequest, PollRemoteCallResponse, PurgeQueueRequest,
    PurgeQueueResponse, RemoteCallStatus,
};
use compute_proto::chalk::sandbox::v1::GetOrBuildCustomImageResponse;
use compute_proto::chalk::scalinggroup::v1::ScalingGroupSpec;
use futures_util::{Stream, StreamExt};
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

use super::scaling::ScalingApi;
use super::workload::{page, timestamp};
use super::{base_url, principal};
use crate::status::from_control;

/// Most request messages one call may stream in (the SDK sends one).
const MAX_CALL_MESSAGES: usize = 1024;

/// The function catalog handler.
pub struct FunctionsApi {
    functions: Arc<Functions>,
    groups: ScalingApi,
}

impl FunctionsApi {
    /// A handler over `functions`, whose groups' URLs are made as the scaling-group service makes them.
    pub fn new(functions: Arc<Functions>, scaling: Arc<ScalingGroups>, ingress_domain: Option<String>) -> Self {
        Self { functions, groups: ScalingApi::new(scaling, ingress_domain) }
    }

    /// The schedule the version runs on, if any.
    fn schedule(&self, view: &FunctionView) -> Option<pb::ActiveSchedule> {
        let cron = self.version(view).config?.schedule?.trim().to_string();
        (!cron.is_empty()).then_some(pb::ActiveSchedule { cron })
    }

    fn version(&self, view: &FunctionView) -> pb::ExternalFunctionVersion {
        let v = &view.version;
        let spec = pb::ExternalFunctionVersionSpec::decode(v.spec.as_slice()).unwrap_or_default();
        pb::ExternalFunctionVersion {
            id: v.id.clone(),
            function_id: view.function.id.clone(),
            function_name: view.function.name.clone(),
            version: v.number as i32,
            input_arrow_schema: spec.input_arrow_schema,
            output_arrow_schema: spec.output_arrow_schema,
            scaling_group_name: v.group_name.clone(),
            scaling_group_revision_id: v.group_revision_id.clone(),
            created_at: Some(timestamp(v.created_at)),
            config: spec.config,
            deleted_at: view.function.deleted_at.map(timestamp),
            created_by: Some(v.created_by.clone()),
        }
    }

    fn function(&self, view: &FunctionView) -> pb::ExternalFunction {
        let f = &view.function;
        pb::ExternalFunction {
            id: f.id.clone(),
            name: f.name.clone(),
            current_version: Some(self.version(view)),
            created_at: Some(timestamp(f.created_at)),
            updated_at: Some(timestamp(f.updated_at)),
            deleted_at: f.deleted_at.map(timestamp),
            created_by: Some(f.created_by.clone()),
        }
    }

    fn group(
        &self,
        view: &FunctionView,
        base: &str,
    ) -> Option<compute_proto::chalk::scalinggroup::v1::ScalingGroupResponse> {
        view.group.as_ref().map(|g| self.groups.response(g, base))
    }
}

fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg)
}

/// The codec the control plane reads version specs with.
pub const CODEC: FunctionCodec = FunctionCodec { deployment, policy, scheduled_request };

/// What the SDK sends for a call with no arguments (a scheduled function takes none): an Arrow IPC stream of one
/// row with one column, `__chalk_no_args__` = true, as `RemoteFunction._serialize_call_args()` writes it (pyarrow's
/// IPC stream format: a schema message, one record batch, the end-of-stream marker).
const NO_ARGS_FEATHER: &[u8] = &[
    0xff, 0xff, 0xff, 0xff, 0x80, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0a, 0x00, 0x0c, 0x00, 0x06,
    0x00, 0x05, 0x00, 0x08, 0x00, 0x0a, 0x00, 0x00, 0x00, 0x00, 0x01, 0x04, 0x00, 0x0c, 0x00, 0x00, 0x00, 0x08, 0x00,
    0x08, 0x00, 0x00, 0x00, 0x04, 0x00, 0x08, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x14,
    0x00, 0x00, 0x00, 0x10, 0x00, 0x14, 0x00, 0x08, 0x00, 0x06, 0x00, 0x07, 0x00, 0x0c, 0x00, 0x00, 0x00, 0x10, 0x00,
    0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x06, 0x10, 0x00, 0x00, 0x00, 0x28, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x11, 0x00, 0x00, 0x00, 0x5f, 0x5f, 0x63, 0x68, 0x61, 0x6c, 0x6b, 0x5f, 0x6e, 0x6f,
    0x5f, 0x61, 0x72, 0x67, 0x73, 0x5f, 0x5f, 0x00, 0x00, 0x00, 0x04, 0x00, 0x04, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0x88, 0x00, 0x00, 0x00, 0x14, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x0c, 0x00, 0x16, 0x00, 0x06, 0x00, 0x05, 0x00, 0x08, 0x00, 0x0c, 0x00, 0x0c, 0x00, 0x00, 0x00, 0x00, 0x03, 0x04,
    0x00, 0x18, 0x00, 0x00, 0x00, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0a, 0x00, 0x18, 0x00,
    0x0c, 0x00, 0x04, 0x00, 0x08, 0x00, 0x0a, 0x00, 0x00, 0x00, 0x3c, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x01,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00,
];

fn scheduled_request(name: &str) -> Vec<u8> {
    CallFunctionRequest { name: name.to_string(), feather_stream: Bytes::from_static(NO_ARGS_FEATHER).into() }
        .encode_to_vec()
}

fn deployment(version_spec: &[u8], image: &str) -> Result<Deployment, ControlError> {
    let bad = |m: String| ControlError::InvalidArgument(m);
    let mut v = pb::ExternalFunctionVersionSpec::decode(version_spec)
        .map_err(|e| bad(format!("spec.version_spec: not an ExternalFunctionVersionSpec: {e}")))?;
    if !v.volume_commits.is_empty() {
        return Err(ControlError::Unimplemented(
            "spec.version_spec.volume_commits are not supported by this server: commit the source volume with \
             VolumeService/CommitVersion and mount the version (the SDK does this)"
                .into(),
        ));
    }
    let mut group: ScalingGroupSpec =
        v.spec.clone().ok_or_else(|| bad("spec.version_spec.spec (the scaling group spec) is required".into()))?;
    let container =
        group.container_spec.as_mut().ok_or_else(|| bad("spec.version_spec.spec.container_spec is required".into()))?;
    container.image = image.to_string();
    batching_env(v.config.as_ref(), &mut container.env_vars)?;
    let group_name = container.name.clone();
    v.spec = Some(group.clone());
    let group_spec = group.encode_to_vec();
    super::scaling::parse_spec(&group_spec).map_err(|e| match e {
        ControlError::InvalidArgument(m) => bad(format!("spec.version_spec.{m}")),
        other => other,
    })?;
    Ok(Deployment { group_name, group_spec, stored_spec: v.encode_to_vec() })
}

/// `max_batching_size` and `max_buffer_duration` (ms): the replica's `chalk-remote-call` coalesces the calls that
/// arrive together into one handler invocation (the SDK's shim runs each item and answers each caller); the
/// runtime reads its settings from these variables. A value the spec's own `env` sets is left as it is.
fn batching_env(
    config: Option<&pb::FunctionConfig>,
    env: &mut std::collections::BTreeMap<String, String>,
) -> Result<(), ControlError> {
    let bad = |m: String| ControlError::InvalidArgument(format!("spec.version_spec.config.{m}"));
    let Some(size) = config.and_then(|c| c.max_batching_size) else { return Ok(()) };
    if size < 1 {
        return Err(bad(format!("max_batching_size {size} must be 1 or more")));
    }
    env.entry("CHALK_REMOTE_CALL_MAX_BATCHING_SIZE".into()).or_insert_with(|| size.to_string());
    if let Some(ms) = config.and_then(|c| c.max_buffer_duration) {
        if ms < 1 {
            return Err(bad(format!("max_buffer_duration {ms} (ms) must be 1 or more")));
        }
        env.entry("CHALK_REMOTE_CALL_MAX_BUFFER_DURATION_MS".into()).or_insert_with(|| ms.to_string());
    }
    Ok(())
}

fn policy(stored_spec: &[u8]) -> Result<CallPolicy, ControlError> {
    let bad = |m: String| ControlError::InvalidArgument(format!("spec.version_spec.config.{m}"));
    let v = pb::ExternalFunctionVersionSpec::decode(stored_spec)
        .map_err(|e| ControlError::Internal(format!("a stored function version does not decode: {e}")))?;
    let c = v.config.unwrap_or_default();
    let schedule = match c.schedule.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        Some(s) => Some(Schedule::parse(s).map_err(|e| bad(format!("schedule: {e}")))?),
        None => None,
    };
    let concurrency = match c.concurrency {
        Some(p) if p.max_concurrent < 1 => {
            return Err(bad(format!("concurrency.max_concurrent {} must be 1 or more", p.max_concurrent)))
        }
        Some(p) => Some(ConcurrencyLimit { max: p.max_concurrent as u32, key: p.key.filter(|k| !k.is_empty()) }),
        None => None,
    };
    let rate_limit = match c.rate_limit {
        Some(p) if !(1..=1_000_000).contains(&p.rate) => {
            return Err(bad(format!("rate_limit.rate {} must be between 1 and 1000000", p.rate)))
        }
        Some(p) => {
            let per = match pb::RateLimitPer::try_from(p.per).unwrap_or(pb::RateLimitPer::Unspecified) {
                pb::RateLimitPer::Unspecified | pb::RateLimitPer::Second => Duration::from_secs(1),
                pb::RateLimitPer::Minute => Duration::from_secs(60),
                pb::RateLimitPer::Hour => Duration::from_secs(3600),
            };
            Some(RateLimit { rate: p.rate as u32, per, key: p.key.filter(|k| !k.is_empty()) })
        }
        None => None,
    };
    let retry = match c.retry_policy {
        Some(p) if !(0..=100).contains(&p.max_retries) => {
            return Err(bad(format!("retry_policy.max_retries {} must be between 0 and 100", p.max_retries)))
        }
        Some(p) if p.max_retries == 0 => None,
        Some(p) => {
            let ms = |field: &str, v: Option<i32>, default: u64| match v {
                None => Ok(Duration::from_millis(default)),
                Some(n) if n >= 0 => Ok(Duration::from_millis(n as u64)),
                Some(n) => Err(bad(format!("retry_policy.{field} {n} must be 0 or more"))),
            };
            let multiplier = p.backoff_multiplier.unwrap_or(2.0);
            if !(1.0..=100.0).contains(&multiplier) {
                return Err(bad(format!("retry_policy.backoff_multiplier {multiplier} must be between 1 and 100")));
            }
            Some(RetryPolicy {
                max_retries: p.max_retries as u32,
                initial_backoff: ms("initial_backoff_ms", p.initial_backoff_ms, 100)?,
                multiplier,
                max_backoff: ms("max_backoff_ms", p.max_backoff_ms, 10_000)?,
            })
        }
        None => None,
    };
    let queue = queue_policy(c.queue)?;
    Ok(CallPolicy { concurrency, rate_limit, retry, queue, schedule })
}

fn queue_policy(q: Option<pb::QueuePolicy>) -> Result<QueuePolicy, ControlError> {
    let bad = |m: String| ControlError::InvalidArgument(format!("spec.version_spec.config.{m}"));
    let mut queue = QueuePolicy::default();
    let Some(q) = q else { return Ok(queue) };
    if q.max_items < 0 {
        return Err(bad(format!("queue.max_items {} must be 1 or more (0: the default)", q.max_items)));
    }
    if q.max_items > 0 {
        queue.max_items = q.max_items as u64;
    }
    match q.result_ttl_seconds {
        Some(t) if t < 1 => return Err(bad(format!("queue.result_ttl_seconds {t} must be 1 or more"))),
        Some(t) => queue.result_ttl = Duration::from_secs(t as u64),
        None => {}
    }
    queue.key = q.key.filter(|k| !k.is_empty());
    Ok(queue)
}

/// The caller's deadline, from `grpc-timeout` (`<digits><unit>`) or Connect's `connect-timeout-ms`.
fn deadline_of(headers: &http::HeaderMap) -> Option<Duration> {
    if let Some(v) = headers.get("grpc-timeout").and_then(|v| v.to_str().ok()) {
        let (n, unit) = v.split_at(v.len().saturating_sub(1));
        let n: u64 = n.parse().ok()?;
        return Some(match unit {
            "H" => Duration::from_secs(n * 3600),
            "M" => Duration::from_secs(n * 60),
            "S" => Duration::from_secs(n),
            "m" => Duration::from_millis(n),
            "u" => Duration::from_micros(n),
            "n" => Duration::from_nanos(n),
            _ => return None,
        });
    }
    headers.get("connect-timeout-ms").and_then(|v| v.to_str().ok()?.parse().ok()).map(Duration::from_millis)
}

fn ensured(api: &FunctionsApi, view: &FunctionView, base: &str) -> pb::EnsuredExternalFunction {
    pb::EnsuredExternalFunction {
        external_function: Some(api.function(view)),
        scaling_group: api.group(view, base),
        reused_version: view.reused,
    }
}

#[tonic::async_trait]
impl ExternalFunctionCatalogService for FunctionsApi {
    async fn ensure_external_function(
        &self,
        req: Request<pb::EnsureExternalFunctionRequest>,
    ) -> Result<Response<pb::EnsureExternalFunctionResponse>, Status> {
        let who = principal(&req)?.clone();
        let base = base_url(&req)?;
        let r = req.into_inner();
        if r.function_name.is_empty() {
            return Err(invalid("function_name is required"));
        }
        let spec = r.spec.ok_or_else(|| invalid("spec is required"))?;
        let image = spec.image.ok_or_else(|| invalid("spec.image is required"))?;
        if image.base_image.trim().is_empty() {
            return Err(invalid("spec.image.base_image is required"));
        }
        let recipe = super::images::recipe(image).map_err(|m| Status::invalid_argument(format!("spec.image: {m}")))?;
        let version = spec.version_spec.ok_or_else(|| invalid("spec.version_spec is required"))?;
        let ensure = EnsureRequest {
            name: r.function_name,
            recipe,
            version_spec: version.encode_to_vec(),
            local_secrets: spec.local_secrets,
            force_new_version: r.force_new_version,
        };
        use pb::ensure_external_function_response::Result as R;
        let result = match self.functions.ensure(&who, ensure).await.map_err(from_control)? {
            Ensured::Building(b) => R::PendingImageBuild(GetOrBuildCustomImageResponse {
                image: b.image,
                build_id: b.build_id,
                status: b.status.into(),
                error: b.error,
                content_hash: b.content_hash,
            }),
            Ensured::Complete(view) => R::Complete(ensured(self, &view, &base)),
        };
        Ok(Response::new(pb::EnsureExternalFunctionResponse { result: Some(result) }))
    }

    async fn get_external_function(
        &self,
        req: Request<pb::GetExternalFunctionRequest>,
    ) -> Result<Response<pb::GetExternalFunctionResponse>, Status> {
        let who = principal(&req)?.clone();
        let base = base_url(&req)?;
        let r = req.into_inner();
        let view = self
            .functions
            .get(&who, r.function_id.as_deref(), r.function_name.as_deref(), None, r.include_deleted.unwrap_or(false))
            .map_err(from_control)?;
        Ok(Response::new(pb::GetExternalFunctionResponse {
            external_function: Some(self.function(&view)),
            active_schedule: if r.include_active_schedule.unwrap_or(false) { self.schedule(&view) } else { None },
            scaling_group: if r.include_scaling_group.unwrap_or(false) { self.group(&view, &base) } else { None },
        }))
    }

    async fn list_external_functions(
        &self,
        req: Request<pb::ListExternalFunctionsRequest>,
    ) -> Result<Response<pb::ListExternalFunctionsResponse>, Status> {
        let who = principal(&req)?.clone();
        let base = base_url(&req)?;
        let r = req.into_inner();
        let (limit, offset) = page(r.limit, r.cursor.as_deref())?;
        let views = self
            .functions
            .list(&who, &r.search, r.include_deleted.unwrap_or(false), limit + 1, offset)
            .map_err(from_control)?;
        let more = views.len() > limit as usize;
        let with_group = r.include_scaling_group.unwrap_or(false);
        let with_schedule = r.include_active_schedule.unwrap_or(false);
        let functions = views
            .iter()
            .take(limit as usize)
            .map(|v| {
                let version = self.version(v);
                pb::ExternalFunctionSummary {
                    name: v.function.name.clone(),
                    latest_version: v.version.number as i32,
                    latest_scaling_group_name: v.version.group_name.clone(),
                    latest_updated_at: Some(timestamp(v.function.updated_at)),
                    config: version.config,
                    scaling_group: if with_group { self.group(v, &base) } else { None },
                    active_schedule: if with_schedule { self.schedule(v) } else { None },
                    created_at: Some(timestamp(v.function.created_at)),
                    current_version: v.version.number as i32,
                    function_id: v.function.id.clone(),
                    created_by: Some(v.function.created_by.clone()),
                    ..Default::default()
                }
            })
            .collect();
        Ok(Response::new(pb::ListExternalFunctionsResponse {
            functions,
            next_cursor: more.then(|| (offset + limit).to_string()),
        }))
    }

    async fn delete_external_function(
        &self,
        req: Request<pb::DeleteExternalFunctionRequest>,
    ) -> Result<Response<pb::DeleteExternalFunctionResponse>, Status> {
        let who = principal(&req)?.clone();
        let r = req.into_inner();
        self.functions
            .delete(&who, r.function_id.as_deref(), r.function_name.as_deref())
            .await
            .map_err(from_control)?;
        Ok(Response::new(pb::DeleteExternalFunctionResponse {}))
    }

    async fn call_external_function(
        &self,
        req: Request<pb::CallExternalFunctionRequest>,
    ) -> Result<Response<pb::CallExternalFunctionResponse>, Status> {
        let who = principal(&req)?.clone();
        let timeout = deadline_of(&req.metadata().clone().into_headers());
        let headers = req.metadata().clone().into_headers();
        let r = req.into_inner();
        let key = r.function.ok_or_else(|| invalid("function (function_name and version) is required"))?;
        let name =
            key.function_name.filter(|n| !n.is_empty()).ok_or_else(|| invalid("function.function_name is required"))?;
        use pb::call_external_function_request::Body;
        let call = match r.body {
            Some(Body::RemoteCallRequest(c)) => c,
            Some(Body::EnqueueRemoteCallRequest(e)) => {
                let call_id = enqueue(&self.functions, &who, &name, e, "body.enqueue_remote_call_request")?;
                use pb::call_external_function_response::Body as Out;
                return Ok(Response::new(pb::CallExternalFunctionResponse {
                    body: Some(Out::EnqueueRemoteCallResponse(EnqueueRemoteCallResponse { call_id })),
                }));
            }
            None => return Err(invalid("body.remote_call_request is required")),
        };
        let out = self
            .functions
            .call(&who, &name, key.version.map(i64::from), vec![Bytes::from(call.encode_to_vec())], &headers, timeout)
            .await
            .map_err(from_control)?;
        let response = match out.as_slice() {
            [one] => CallFunctionResponse::decode(one.clone())
                .map_err(|e| Status::internal(format!("the function's answer does not decode: {e}")))?,
            many => {
                return Err(Status::failed_precondition(format!(
                    "function {name:?} answered in {} parts, which CallExternalFunction cannot carry: call it with \
                     .remote() (RemoteCallService/CallFunction)",
                    many.len()
                )))
            }
        };
        use pb::call_external_function_response::Body as Out;
        Ok(Response::new(pb::CallExternalFunctionResponse { body: Some(Out::RemoteCallResponse(response)) }))
    }

    async fn get_external_function_version(
        &self,
        req: Request<pb::GetExternalFunctionVersionRequest>,
    ) -> Result<Response<pb::GetExternalFunctionVersionResponse>, Status> {
        let who = principal(&req)?.clone();
        let base = base_url(&req)?;
        let r = req.into_inner();
        use pb::get_external_function_version_request::Identifier;
        let include_deleted = r.include_deleted.unwrap_or(false);
        let view = match r.identifier {
            Some(Identifier::Id(id)) => self.functions.version(&who, &id),
            Some(Identifier::Key(k)) => self.functions.get(
                &who,
                k.function_id.as_deref(),
                k.function_name.as_deref(),
                k.version.map(i64::from),
                include_deleted,
            ),
            None => return Err(invalid("id or key is required")),
        }
        .map_err(from_control)?;
        Ok(Response::new(pb::GetExternalFunctionVersionResponse {
            external_function_version: Some(self.version(&view)),
            scaling_group: if r.include_scaling_group.unwrap_or(false) { self.group(&view, &base) } else { None },
            active_schedule: if r.include_active_schedule.unwrap_or(false) { self.schedule(&view) } else { None },
        }))
    }

    async fn list_external_function_versions(
        &self,
        req: Request<pb::ListExternalFunctionVersionsRequest>,
    ) -> Result<Response<pb::ListExternalFunctionVersionsResponse>, Status> {
        let who = principal(&req)?.clone();
        let base = base_url(&req)?;
        let r = req.into_inner();
        let (limit, offset) = page(r.limit, r.cursor.as_deref())?;
        let include_deleted = r.include_deleted.unwrap_or(false);
        let (f, versions) = self
            .functions
            .versions(&who, r.function_id.as_deref(), r.function_name.as_deref(), include_deleted, limit + 1, offset)
            .map_err(from_control)?;
        let more = versions.len() > limit as usize;
        let current = self.functions.get(&who, Some(&f.id), None, None, true).map_err(from_control)?;
        let entries = versions
            .into_iter()
            .take(limit as usize)
            .filter(|v| r.ids.is_empty() || r.ids.contains(&v.id))
            .map(|v| {
                let serving = current.version.id == v.id;
                let view = FunctionView { version: v, ..current.clone() };
                pb::ListExternalFunctionVersionsEntry {
                    external_function_version: Some(self.version(&view)),
                    scaling_group: if serving && r.include_scaling_group.unwrap_or(false) {
                        self.group(&view, &base)
                    } else {
                        None
                    },
                }
            })
            .collect();
        Ok(Response::new(pb::ListExternalFunctionVersionsResponse {
            entries,
            next_cursor: more.then(|| (offset + limit).to_string()),
        }))
    }
}

/// The handler of the `chalk.runtime.v1` services over functions: `.remote()` (RemoteCallService), `.defer()` /
/// `.poll()` / `.purge()` (AsyncRemoteCallService) and a function's recent calls (FunctionQueueMetaService).
pub struct RemoteCallApi {
    functions: Arc<Functions>,
}

impl RemoteCallApi {
    /// A handler over `functions`.
    pub fn new(functions: Arc<Functions>) -> Self {
        Self { functions }
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<CallFunctionResponse, Status>> + Send>>;

#[tonic::async_trait]
impl RemoteCallService for RemoteCallApi {
    async fn call_function(
        &self,
        req: Request<Streaming<CallFunctionRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let who = principal(&req)?.clone();
        let headers = req.metadata().clone().into_headers();
        let timeout = deadline_of(&headers);
        let mut inbound = req.into_inner();
        let mut messages = Vec::new();
        let mut name = None;
        while let Some(m) = inbound.next().await {
            let m = m?;
            if messages.len() == MAX_CALL_MESSAGES {
                return Err(invalid(format!("a call carries at most {MAX_CALL_MESSAGES} request messages")));
            }
            if name.is_none() {
                if m.name.is_empty() {
                    return Err(invalid("name (the function to call) is required in the first request"));
                }
                name = Some(m.name.clone());
            }
            messages.push(Bytes::from(m.encode_to_vec()));
        }
        let name =
            name.ok_or_else(|| invalid("the call sent no request: send a CallFunctionRequest naming the function"))?;
        let out = self.functions.call(&who, &name, None, messages, &headers, timeout).await.map_err(from_control)?;
        let responses: Vec<Result<CallFunctionResponse, Status>> = out
            .into_iter()
            .map(|b| {
                CallFunctionResponse::decode(b)
                    .map_err(|e| Status::internal(format!("the function's answer does not decode: {e}")))
            })
            .collect();
        Ok(Response::new(Box::pin(futures_util::stream::iter(responses))))
    }
}

/// Enqueues a deferred call of function `name` from an `EnqueueRemoteCallRequest` (`field` names it in errors).
fn enqueue(
    functions: &Functions,
    who: &Principal,
    name: &str,
    r: EnqueueRemoteCallRequest,
    field: &str,
) -> Result<String, Status> {
    if !r.name.is_empty() && r.name != name {
        return Err(invalid(format!("{field}.name {:?} is not the function called, {name:?}", r.name)));
    }
    use compute_proto::chalk::runtime::v1::remote_call_args::Args;
    let feather_stream = match r.args.and_then(|a| a.args) {
        Some(Args::FeatherBytes(b)) => b,
        Some(Args::StorageObjectId(_)) => {
            return Err(Status::unimplemented(format!(
                "{field}.args.storage_object_id: arguments kept in object storage are not served; send them inline \
                 as args.feather_bytes"
            )))
        }
        None => {
            return Err(invalid(format!("{field}.args.feather_bytes (the call's Arrow IPC arguments) is required")))
        }
    };
    let request = CallFunctionRequest { name: name.to_string(), feather_stream }.encode_to_vec();
    functions.enqueue(who, name, request).map_err(from_control)
}

/// How long a poll of an unfinished call waits for it to finish before answering.
const POLL_WAIT: Duration = Duration::from_secs(2);

#[tonic::async_trait]
impl AsyncRemoteCallService for RemoteCallApi {
    async fn enqueue_remote_call(
        &self,
        req: Request<EnqueueRemoteCallRequest>,
    ) -> Result<Response<EnqueueRemoteCallResponse>, Status> {
        let who = principal(&req)?.clone();
        let r = req.into_inner();
        if r.name.is_empty() {
            return Err(invalid("name (the function to call) is required"));
        }
        let name = r.name.clone();
        let call_id = enqueue(&self.functions, &who, &name, r, "request")?;
        Ok(Response::new(EnqueueRemoteCallResponse { call_id }))
    }

    async fn poll_remote_call(
        &self,
        req: Request<PollRemoteCallRequest>,
    ) -> Result<Response<PollRemoteCallResponse>, Status> {
        let who = principal(&req)?.clone();
        let wait = deadline_of(&req.metadata().clone().into_headers())
            .map(|d| d.saturating_sub(Duration::from_millis(500)).min(POLL_WAIT))
            .unwrap_or(POLL_WAIT);
        let r = req.into_inner();
        if r.call_id.is_empty() {
            return Err(invalid("call_id (what EnqueueRemoteCall answered) is required"));
        }
        let cursor = match r.cursor.as_str() {
            "" => 0,
            c => c.parse::<u64>().map_err(|_| {
                invalid(format!("cursor {c:?} is not a cursor this server handed out: poll with the last one returned"))
            })?,
        };
        let polled = self.functions.poll(&who, &r.call_id, cursor, wait).await.map_err(from_control)?;
        Ok(Response::new(poll_response(polled)?))
    }

    async fn purge_queue(&self, req: Request<PurgeQueueRequest>) -> Result<Response<PurgeQueueResponse>, Status> {
        let who = principal(&req)?.clone();
        let r = req.into_inner();
        use compute_proto::chalk::runtime::v1::purge_queue_request::Request as Which;
        let name = match &r.request {
            Some(Which::FunctionName(n)) if !n.is_empty() => Some(n.as_str()),
            Some(Which::All(true)) => None,
            _ => return Err(invalid("function_name (or all: true, for every function) is required")),
        };
        let dropped = self.functions.purge(&who, name).map_err(from_control)?;
        Ok(Response::new(PurgeQueueResponse { items_removed_by_function: dropped.into_iter().collect() }))
    }
}

/// Call ids one GetCallResults may name.
const MAX_RESULT_IDS: usize = 1000;

#[tonic::async_trait]
impl FunctionQueueMetaService for RemoteCallApi {
    async fn get_recent_calls(
        &self,
        req: Request<GetRecentCallsRequest>,
    ) -> Result<Response<GetRecentCallsResponse>, Status> {
        let who = principal(&req)?.clone();
        let r = req.into_inner();
        if r.function_name.is_empty() {
            return Err(invalid("function_name is required"));
        }
        let limit = if r.limit == 0 { 50 } else { r.limit.min(1000) };
        let offset = match r.page_token.as_str() {
            "" => 0,
            t => {
                t.parse::<u32>().map_err(|_| invalid(format!("page_token {t:?} is not one this server handed out")))?
            }
        };
        let calls = self.functions.runs(&who, &r.function_name, limit + 1, offset).map_err(from_control)?;
        let more = calls.len() > limit as usize;
        let calls = calls
            .iter()
            .take(limit as usize)
            .map(|c| FunctionCallInfo {
                call_id: c.id.clone(),
                function_name: r.function_name.clone(),
                enqueued_at: Some(timestamp(c.created_at)),
                status: remote_status(Polled::of(c)) as i32,
                result_summary: call_summary(c),
                trace_id: String::new(),
            })
            .collect();
        let next_page_token = if more { (offset + limit).to_string() } else { String::new() };
        Ok(Response::new(GetRecentCallsResponse { calls, next_page_token }))
    }

    async fn get_call_results(
        &self,
        req: Request<GetCallResultsRequest>,
    ) -> Result<Response<GetCallResultsResponse>, Status> {
        let who = principal(&req)?.clone();
        let r = req.into_inner();
        if r.call_ids.len() > MAX_RESULT_IDS {
            return Err(invalid(format!("call_ids names {} calls; at most {MAX_RESULT_IDS}", r.call_ids.len())));
        }
        let mut results = Vec::with_capacity(r.call_ids.len());
        for id in r.call_ids {
            let result = match self.functions.poll(&who, &id, 0, Duration::ZERO).await {
                Ok(p) => CallResult { call_id: id, response: Some(poll_response(p)?), error_message: String::new() },
                Err(ControlError::NotFound(m)) => CallResult { call_id: id, response: None, error_message: m },
                Err(e) => return Err(from_control(e)),
            };
            results.push(result);
        }
        Ok(Response::new(GetCallResultsResponse { results }))
    }

    async fn get_call_count(
        &self,
        req: Request<GetCallCountRequest>,
    ) -> Result<Response<GetCallCountResponse>, Status> {
        let who = principal(&req)?.clone();
        let r = req.into_inner();
        if r.function_name.is_empty() {
            return Err(invalid("function_name is required"));
        }
        let count = self.functions.queued(&who, &r.function_name).map_err(from_control)?;
        Ok(Response::new(GetCallCountResponse { count }))
    }
}

fn remote_status(p: Polled) -> RemoteCallStatus {
    match p {
        Polled::Pending => RemoteCallStatus::Pending,
        Polled::Running => RemoteCallStatus::Running,
        Polled::Completed => RemoteCallStatus::Completed,
        Polled::Failed => RemoteCallStatus::Failed,
        Polled::Expired => RemoteCallStatus::Expired,
    }
}

fn poll_response(p: DeferredCall) -> Result<PollRemoteCallResponse, Status> {
    let status = remote_status(p.state);
    let results = p
        .results
        .into_iter()
        .map(|b| {
            CallFunctionResponse::decode(b)
                .map_err(|e| Status::internal(format!("the call's stored answer does not decode: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let errors = p
        .error
        .map(|message| {
            let kind = serde_json::from_str::<serde_json::Value>(&message)
                .ok()
                .and_then(|v| v["exc_type"].as_str().map(str::to_string))
                .unwrap_or_default();
            vec![ChalkError {
                code: ErrorCode::ResolverFailed as i32,
                category: ErrorCodeCategory::Request as i32,
                message,
                exception: Some(ChalkException { kind, ..Default::default() }),
                ..Default::default()
            }]
        })
        .unwrap_or_default();
    Ok(PollRemoteCallResponse { status: status as i32, results, cursor: p.cursor.to_string(), errors })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scheduled_run_sends_the_sdks_no_argument_stream() {
        let req = CallFunctionRequest::decode(scheduled_request("tick").as_slice()).unwrap();
        assert_eq!(req.name, "tick");
        let ipc: &[u8] = req.feather_stream.as_ref();
        assert_eq!(ipc.len(), 296, "pyarrow's stream of one row of __chalk_no_args__ = true");
        assert_eq!(&ipc[..4], &[0xff; 4], "an IPC stream message starts with the continuation marker");
        assert_eq!(&ipc[ipc.len() - 8..], &[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0], "and ends with end-of-stream");
        assert!(ipc.windows(17).any(|w| w == b"__chalk_no_args__"));
    }

    fn spec_with(config: pb::FunctionConfig) -> Vec<u8> {
        pb::ExternalFunctionVersionSpec { config: Some(config), ..Default::default() }.encode_to_vec()
    }

    #[test]
    fn policies_are_read_with_their_defaults_and_bad_ones_name_the_field() {
        let p = policy(&spec_with(pb::FunctionConfig {
            concurrency: Some(pb::ConcurrencyPolicy { max_concurrent: 2, key: None }),
            rate_limit: Some(pb::RateLimitPolicy {
                rate: 5,
                per: pb::RateLimitPer::Minute as i32,
                key: Some("k".into()),
            }),
            retry_policy: Some(pb::RetryPolicy { max_retries: 3, ..Default::default() }),
            ..Default::default()
        }))
        .unwrap();
        assert_eq!(p.concurrency, Some(ConcurrencyLimit { max: 2, key: None }));
        assert_eq!(p.rate_limit, Some(RateLimit { rate: 5, per: Duration::from_secs(60), key: Some("k".into()) }));
        let r = p.retry.unwrap();
        assert_eq!((r.max_retries, r.initial_backoff, r.multiplier), (3, Duration::from_millis(100), 2.0));
        for (config, field) in [
            (
                pb::FunctionConfig {
                    concurrency: Some(pb::ConcurrencyPolicy { max_concurrent: 0, key: None }),
                    ..Default::default()
                },
                "concurrency.max_concurrent",
            ),
            (
                pb::FunctionConfig {
                    rate_limit: Some(pb::RateLimitPolicy { rate: 0, per: 1, key: None }),
                    ..Default::default()
                },
                "rate_limit.rate",
            ),
            (
                pb::FunctionConfig {
                    retry_policy: Some(pb::RetryPolicy { max_retries: -1, ..Default::default() }),
                    ..Default::default()
                },
                "retry_policy.max_retries",
            ),
        ] {
            let err = policy(&spec_with(config)).unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
    }

    #[test]
    fn grpc_timeouts_are_read_in_every_unit() {
        let mut h = http::HeaderMap::new();
        for (v, d) in
            [("5S", Duration::from_secs(5)), ("250m", Duration::from_millis(250)), ("2M", Duration::from_secs(120))]
        {
            h.insert("grpc-timeout", http::HeaderValue::from_static(v));
            assert_eq!(deadline_of(&h), Some(d));
        }
        h.insert("grpc-timeout", http::HeaderValue::from_static("5x"));
        assert_eq!(deadline_of(&h), None);
    }
}
