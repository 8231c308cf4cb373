//! Functions: a stable name served by one scaling group that runs the SDK's `chalk-remote-call` runtime, with
//! immutable versions (the same image and spec give the same version), and calls made through the ingress under
//! the policies the version declares.
//!
//! Like scaling groups, a version's spec arrives in the API's wire encoding; the API gives the manager a
//! [`FunctionCodec`] that reads it, so the control plane stores what the client sent without knowing the format.

mod policy;
mod queue;
mod schedule;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use compute_image::Recipe;
use compute_ingress::{GrpcCallError, GrpcReply};
use compute_store::{FunctionRecord, FunctionVersionRecord, Store};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

pub use policy::{CallPolicy, ConcurrencyLimit, Limiters, QueuePolicy, RateLimit, RetryPolicy, Window};
pub use queue::{call_summary, DeferredCall, Polled};
pub use schedule::Schedule;

use crate::{
    ids, lock, BuildAnswer, Builds, ControlError, GroupView, Principal, ScalingGroups, Scope, ScopeKind, Secrets,
};

/// The gRPC method a function's replicas serve calls on.
pub const CALL_PATH: &str = "/chalk.runtime.v1.RemoteCallService/CallFunction";

/// What a version spec (in the API's encoding) gives the control plane.
#[derive(Debug, Clone)]
pub struct Deployment {
    /// The scaling group that serves the function (the container spec's name).
    pub group_name: String,
    /// That group's spec, in the encoding the scaling-group [`crate::SpecParser`] reads, with the image filled in.
    pub group_spec: Vec<u8>,
    /// The version spec to store, with the image filled in.
    pub stored_spec: Vec<u8>,
}

/// Reads version specs in the API's wire encoding.
#[derive(Debug, Clone, Copy)]
pub struct FunctionCodec {
    /// A version spec and the image built for it → what to deploy (errors name the field).
    pub deployment: fn(version_spec: &[u8], image: &str) -> Result<Deployment, ControlError>,
    /// A stored version spec → its call policies.
    pub policy: fn(stored_spec: &[u8]) -> Result<CallPolicy, ControlError>,
    /// A call request (encoded as a `CallFunctionRequest` is) to function `name` with no input: a scheduled run.
    pub scheduled_request: fn(name: &str) -> Vec<u8>,
}

/// An EnsureExternalFunction request, as the control plane sees it.
#[derive(Debug, Clone)]
pub struct EnsureRequest {
    /// The function's name.
    pub name: String,
    /// The image to build (or find built).
    pub recipe: Recipe,
    /// The version spec (API encoding), image not yet filled in.
    pub version_spec: Vec<u8>,
    /// Secrets the SDK read from the caller's environment; kept as the function's own secrets.
    pub local_secrets: BTreeMap<String, String>,
    /// Make a new version even if one with the same spec exists.
    pub force_new_version: bool,
}

/// The answer to an ensure.
#[derive(Debug, Clone)]
pub enum Ensured {
    /// The image is being built: poll the build, then ask again.
    Building(BuildAnswer),
    /// The function serves the version (its group may not be ready yet).
    Complete(Box<FunctionView>),
}

/// A function with the version it serves and its group.
#[derive(Debug, Clone)]
pub struct FunctionView {
    /// The record.
    pub function: FunctionRecord,
    /// The version it serves.
    pub version: FunctionVersionRecord,
    /// Its scaling group (`None` once the function is deleted).
    pub group: Option<GroupView>,
    /// Whether an ensure found the version already there rather than making it.
    pub reused: bool,
}

/// The function manager.
pub struct Functions {
    store: Arc<Store>,
    scaling: Arc<ScalingGroups>,
    builds: Arc<Builds>,
    secrets: Arc<Secrets>,
    codec: FunctionCodec,
    /// One deploy at a time (per server): versions are numbered and selected in order.
    deploying: tokio::sync::Mutex<()>,
    limiters: Limiters,
    policies: Mutex<HashMap<String, Arc<CallPolicy>>>,
    max_response: usize,
    queue: queue::QueueState,
}

fn now() -> i64 {
    compute_store::now_millis()
}

/// The secret scope of a function's own secrets.
pub fn function_scope(name: &str) -> Scope {
    Scope { kind: ScopeKind::Function, name: name.to_string() }
}

impl Functions {
    /// A manager over the scaling groups and builds; `max_response` bounds a call's answer.
    pub fn new(
        store: Arc<Store>,
        scaling: Arc<ScalingGroups>,
        builds: Arc<Builds>,
        secrets: Arc<Secrets>,
        codec: FunctionCodec,
        max_response: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            scaling,
            builds,
            secrets,
            codec,
            deploying: tokio::sync::Mutex::new(()),
            limiters: Limiters::default(),
            policies: Mutex::default(),
            max_response,
            queue: queue::QueueState::default(),
        })
    }

    /// Deploys a function: builds its image (answering [`Ensured::Building`] until it is built), then serves the
    /// version with this spec, a new one when no version has it (or `force_new_version`).
    pub async fn ensure(&self, who: &Principal, req: EnsureRequest) -> Result<Ensured, ControlError> {
        ids::validate_function_name("function_name", &req.name)?;
        let built = self.builds.get_or_build(req.recipe.clone())?;
        match built.status {
            "exists" | "succeeded" => {}
            "failed" => {
                return Err(ControlError::FailedPrecondition(format!(
                    "the function's image could not be built: {}",
                    built.error.as_deref().unwrap_or("the build failed")
                )))
            }
            _ => return Ok(Ensured::Building(built)),
        }
        let deployment = (self.codec.deployment)(&req.version_spec, &built.image)?;
        (self.codec.policy)(&deployment.stored_spec)?;
        let digest = digest(&built.content_hash, &req.version_spec, &req.local_secrets);
        let _one = self.deploying.lock().await;
        let env = &who.environment_id;
        let (function, new_function) = self.record(who, &req.name, &deployment.group_name)?;
        let result = self.deploy(who, &function, &req, deployment, digest).await;
        if result.is_err() && new_function {
            let _ = self.store.write(|r| r.functions().remove_unversioned(&function.id));
        }
        let (version, reused) = result?;
        let function = self
            .store
            .read(|r| r.functions().get(env, &function.id))?
            .ok_or_else(|| ControlError::Internal(format!("function {:?} vanished while deploying", req.name)))?;
        let group = self.scaling.get(who, None, Some(&version.group_name), false).ok();
        tracing::info!(function = %function.name, version = version.number, reused, "function deployed");
        Ok(Ensured::Complete(Box::new(FunctionView { function, version, group, reused })))
    }

    /// The live function of this name (created without a version when there is none yet); true when created.
    fn record(&self, who: &Principal, name: &str, group_name: &str) -> Result<(FunctionRecord, bool), ControlError> {
        let env = &who.environment_id;
        if let Some(f) = self.store.read(|r| r.functions().get_by_name(env, name, false))? {
            return Ok((f, false));
        }
        let at = now();
        let f = FunctionRecord {
            id: format!("fn-{}", ids::random_token(16)),
            environment_id: env.clone(),
            name: name.to_string(),
            group_name: group_name.to_string(),
            version_id: None,
            created_by: who.client_id.clone(),
            created_at: at,
            updated_at: at,
            deleted_at: None,
        };
        self.store.write(|r| r.functions().insert(&f))?;
        Ok((f, true))
    }

    async fn deploy(
        &self,
        who: &Principal,
        function: &FunctionRecord,
        req: &EnsureRequest,
        deployment: Deployment,
        digest: String,
    ) -> Result<(FunctionVersionRecord, bool), ControlError> {
        let env = &who.environment_id;
        // A group of that name that is not this function's is the user's: never take it over.
        if let Some(owner) = self.store.read(|r| r.functions().by_group(env, &deployment.group_name))? {
            if owner.id != function.id {
                return Err(ControlError::AlreadyExists(format!(
                    "function {:?} would be served by scaling group {:?}, which serves function {:?}: give one of \
                     them another name",
                    function.name, deployment.group_name, owner.name
                )));
            }
        } else if self.scaling.get(who, None, Some(&deployment.group_name), false).is_ok() {
            return Err(ControlError::AlreadyExists(format!(
                "function {:?} would be served by scaling group {:?}, but a scaling group of that name already \
                 exists: delete it or give the function another name",
                function.name, deployment.group_name
            )));
        }
        if function.group_name != deployment.group_name {
            return Err(ControlError::FailedPrecondition(format!(
                "function {:?} is served by scaling group {:?}; spec.container_spec.name {:?} would move it: delete \
                 the function first",
                function.name, function.group_name, deployment.group_name
            )));
        }
        let scope = function_scope(&function.name);
        let mut secrets_changed = false;
        for (name, value) in &req.local_secrets {
            secrets_changed |= self.secrets.set_if_changed(who, name, &scope, value)?;
        }
        let current = match &function.version_id {
            Some(id) => self.store.read(|r| r.functions().version(id))?,
            None => None,
        };
        let same = if req.force_new_version || secrets_changed {
            None
        } else {
            self.store.read(|r| r.functions().version_by_digest(&function.id, &digest))?
        };
        let reused = same.is_some();
        let unchanged = matches!((&same, &current), (Some(s), Some(c)) if s.id == c.id);
        let group = self.scaling.create(who, deployment.group_spec.clone())?;
        let version = match same {
            Some(v) => {
                if !unchanged {
                    self.store.write(|r| {
                        r.functions().set_group_revision(&v.id, &group.group.revision_id)?;
                        r.functions().select(&function.id, &v.id, &deployment.group_name, now())
                    })?;
                }
                v
            }
            None => self.store.write(|r| {
                let v = FunctionVersionRecord {
                    id: format!("fnv-{}", ids::random_token(16)),
                    function_id: function.id.clone(),
                    number: r.functions().last_version_number(&function.id)? + 1,
                    digest,
                    spec: deployment.stored_spec.clone(),
                    group_name: deployment.group_name.clone(),
                    group_revision_id: group.group.revision_id.clone(),
                    created_by: who.client_id.clone(),
                    created_at: now(),
                };
                r.functions().add_version(&v)?;
                r.functions().select(&function.id, &v.id, &deployment.group_name, now())?;
                Ok(v)
            })?,
        };
        Ok((version, reused))
    }

    /// A function by id or name, with the version it serves (or version `number` of it).
    pub fn get(
        &self,
        who: &Principal,
        id: Option<&str>,
        name: Option<&str>,
        number: Option<i64>,
        include_deleted: bool,
    ) -> Result<FunctionView, ControlError> {
        let function = self.find(who, id, name, include_deleted)?;
        let version = match number {
            Some(n) => self
                .store
                .read(|r| r.functions().version_by_number(&function.id, n))?
                .ok_or_else(|| ControlError::NotFound(format!("function {:?} has no version {n}", function.name)))?,
            None => self.current(&function)?,
        };
        let group = if function.deleted_at.is_none() {
            self.scaling.get(who, None, Some(&function.group_name), false).ok()
        } else {
            None
        };
        Ok(FunctionView { function, version, group, reused: false })
    }

    /// A version by id.
    pub fn version(&self, who: &Principal, id: &str) -> Result<FunctionView, ControlError> {
        let v = self
            .store
            .read(|r| r.functions().version(id))?
            .ok_or_else(|| ControlError::NotFound(format!("no function version {id:?}")))?;
        let f = self.find(who, Some(&v.function_id), None, true)?;
        self.get(who, Some(&f.id), None, Some(v.number), true)
    }

    fn find(
        &self,
        who: &Principal,
        id: Option<&str>,
        name: Option<&str>,
        include_deleted: bool,
    ) -> Result<FunctionRecord, ControlError> {
        let env = &who.environment_id;
        let found = match (id.filter(|s| !s.is_empty()), name.filter(|s| !s.is_empty())) {
            (Some(id), _) => {
                self.store.read(|r| r.functions().get(env, id))?.filter(|f| include_deleted || f.deleted_at.is_none())
            }
            (None, Some(name)) => self.store.read(|r| r.functions().get_by_name(env, name, include_deleted))?,
            (None, None) => {
                return Err(ControlError::InvalidArgument("function_id or function_name is required".into()))
            }
        };
        found.filter(|f| f.version_id.is_some()).ok_or_else(|| {
            ControlError::NotFound(format!(
                "no function {:?} in this environment (deploy it with @chalkcompute.function)",
                name.or(id).unwrap_or_default()
            ))
        })
    }

    fn current(&self, f: &FunctionRecord) -> Result<FunctionVersionRecord, ControlError> {
        let id = f.version_id.as_deref().unwrap_or_default();
        self.store.read(|r| r.functions().version(id))?.ok_or_else(|| {
            ControlError::Internal(format!("function {:?} serves a version that is not recorded", f.name))
        })
    }

    /// An environment's functions with their current versions, newest first.
    pub fn list(
        &self,
        who: &Principal,
        search: &str,
        include_deleted: bool,
        limit: u32,
        offset: u32,
    ) -> Result<Vec<FunctionView>, ControlError> {
        let fs =
            self.store.read(|r| r.functions().list(&who.environment_id, search, include_deleted, limit, offset))?;
        fs.into_iter().map(|f| self.get(who, Some(&f.id), None, None, true)).collect()
    }

    /// A function's versions, newest first.
    pub fn versions(
        &self,
        who: &Principal,
        id: Option<&str>,
        name: Option<&str>,
        include_deleted: bool,
        limit: u32,
        offset: u32,
    ) -> Result<(FunctionRecord, Vec<FunctionVersionRecord>), ControlError> {
        let f = self.find(who, id, name, include_deleted)?;
        let vs = self.store.read(|r| r.functions().versions(&f.id, limit, offset))?;
        Ok((f, vs))
    }

    /// Deletes a function: its group stops (calls in flight finish first) and its own secrets go.
    pub async fn delete(&self, who: &Principal, id: Option<&str>, name: Option<&str>) -> Result<(), ControlError> {
        let _one = self.deploying.lock().await;
        let f = self.find(who, id, name, false)?;
        let dropped = self.store.write(|r| {
            r.functions().delete(&f.id, now())?;
            r.function_calls().drop_pending(&f.id)
        })?;
        self.queue.changed.notify_waiters();
        match self.scaling.delete(who, None, Some(&f.group_name)).await {
            Ok(_) | Err(ControlError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        self.secrets.delete_scope(&who.environment_id, &function_scope(&f.name))?;
        tracing::info!(function = %f.name, dropped_calls = dropped, "function deleted");
        Ok(())
    }

    /// The function a scaling group serves, if any (its replicas see the function's own secrets).
    pub fn owner_of_group(&self, environment_id: &str, group_name: &str) -> Result<Option<String>, ControlError> {
        Ok(self.store.read(|r| r.functions().by_group(environment_id, group_name))?.map(|f| f.name))
    }

    /// The policies of the version a function serves now.
    fn current_policy(&self, f: &FunctionRecord) -> Result<Arc<CallPolicy>, ControlError> {
        self.policy(&self.current(f)?)
    }

    /// A function of an environment by id, deleted ones included (the queue's and the scheduler's lookups).
    fn record_by_id(&self, environment_id: &str, id: &str) -> Result<Option<FunctionRecord>, ControlError> {
        Ok(self.store.read(|r| r.functions().get(environment_id, id))?)
    }

    fn policy(&self, version: &FunctionVersionRecord) -> Result<Arc<CallPolicy>, ControlError> {
        if let Some(p) = lock(&self.policies).get(&version.id) {
            return Ok(p.clone());
        }
        let p = Arc::new((self.codec.policy)(&version.spec)?);
        lock(&self.policies).insert(version.id.clone(), p.clone());
        Ok(p)
    }

    /// Calls function `name` (version `number`, when given, must be the one it serves) with `messages` (encoded
    /// `CallFunctionRequest`s) under its policies, within `timeout`; returns the encoded responses. A call that
    /// raised in user code is [`ControlError::FunctionFailed`] with the replica's status (and traceback).
    pub async fn call(
        &self,
        who: &Principal,
        name: &str,
        number: Option<i64>,
        messages: Vec<Bytes>,
        metadata: &http::HeaderMap,
        timeout: Option<Duration>,
    ) -> Result<Vec<Bytes>, ControlError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let view = self.get(who, None, Some(name), None, false)?;
        if let Some(n) = number.filter(|n| *n != view.version.number && *n > 0) {
            return Err(ControlError::FailedPrecondition(format!(
                "function {name:?} serves version {}, not version {n}: call the version it serves",
                view.version.number
            )));
        }
        let policy = self.policy(&view.version)?;
        let env_name =
            view.group.as_ref().map(|g| g.environment_name.clone()).ok_or_else(|| {
                ControlError::Unavailable(format!("function {name:?} has no scaling group serving it"))
            })?;
        let key = |k: &Option<String>| format!("{}/{}", who.environment_id, k.as_deref().unwrap_or(name));
        let _permit = match &policy.concurrency {
            Some(c) => Some(
                policy::acquire(self.limiters.gate(&key(&c.key), c.max), deadline)
                    .await
                    .ok_or_else(|| timed_out(name, "while waiting for a free slot under its concurrency limit"))?,
            ),
            None => None,
        };
        if let Some(r) = &policy.rate_limit {
            if !self.limiters.window(&key(&r.key), r.rate, r.per).admit(deadline).await {
                return Err(timed_out(name, "while waiting for its rate limit"));
            }
        }
        let route_key = format!("{env_name}/{}", view.version.group_name);
        let mut retry = 0u32;
        loop {
            let attempt = self.attempt(&route_key, &messages, metadata, deadline);
            let outcome = match deadline {
                Some(d) => {
                    tokio::time::timeout_at(d, attempt).await.unwrap_or_else(|_| Err(timed_out(name, "running")))
                }
                None => attempt.await,
            };
            let retryable = match &outcome {
                Err(ControlError::Unavailable(_)) => true,
                Err(ControlError::FunctionFailed(s)) => matches!(s.code, 2 | 10 | 13 | 14),
                _ => false,
            };
            match &policy.retry {
                Some(p) if retryable && retry < p.max_retries => {
                    retry += 1;
                    let wait = p.backoff(retry);
                    if deadline.is_some_and(|d| Instant::now() + wait >= d) {
                        return outcome;
                    }
                    tracing::debug!(function = name, retry, ?wait, "call failed; retrying");
                    tokio::time::sleep(wait).await;
                }
                _ => return outcome,
            }
        }
    }

    async fn attempt(
        &self,
        route_key: &str,
        messages: &[Bytes],
        metadata: &http::HeaderMap,
        deadline: Option<Instant>,
    ) -> Result<Vec<Bytes>, ControlError> {
        let ingress = self.scaling.ingress();
        let route = ingress
            .route(route_key)
            .ok_or_else(|| ControlError::Unavailable(format!("no replica serves {route_key:?} yet")))?;
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        match ingress.call_grpc(&route, CALL_PATH, messages, metadata, left, self.max_response).await {
            Ok(GrpcReply::Ok(out)) => Ok(out),
            Ok(GrpcReply::Status(s)) => Err(ControlError::FunctionFailed(s)),
            Err(GrpcCallError::Unavailable(m)) => Err(ControlError::Unavailable(m)),
            Err(e @ GrpcCallError::Protocol(_)) => Err(ControlError::Internal(e.to_string())),
        }
    }
}

fn timed_out(name: &str, what: &str) -> ControlError {
    ControlError::DeadlineExceeded(format!("the call to function {name:?} ran out of time {what}"))
}

/// What identifies a version: the image, the spec, and which local secrets it has.
fn digest(image_key: &str, version_spec: &[u8], local_secrets: &BTreeMap<String, String>) -> String {
    let mut h = Sha256::new();
    h.update(image_key.as_bytes());
    h.update([0]);
    h.update((version_spec.len() as u64).to_be_bytes());
    h.update(version_spec);
    for name in local_secrets.keys() {
        h.update(name.as_bytes());
        h.update([0]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}
