//! Scaling groups: a spec kept as immutable revisions, and a supervisor per group that keeps its replicas
//! (sandboxes of kind `replica`) at the autoscaler's count, checks their readiness, rolls them onto a new revision,
//! and tells the ingress which ones serve.
//!
//! The spec arrives in the API's wire encoding; the API gives the manager a [`SpecParser`] that reads it, so the
//! control plane stores exactly what the client sent (and echoes it back) without knowing the wire format.

mod autoscale;
mod probe;
mod supervisor;
mod triggers;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use compute_ingress::{Ingress, UpstreamProtocol};
use compute_store::{RevisionRecord, ScalingGroupRecord, Store};
use tokio::sync::{watch, Notify};

pub use probe::{ProbeCheck, ProbeSpec};
pub use triggers::{CronWindows, QueueDepthTrigger};

use crate::{ids, ControlError, Principal, WorkloadRequest, Workloads};

/// What a revision's spec asks for, as the control plane uses it.
#[derive(Debug, Clone)]
pub struct GroupSpec {
    /// The group's name (the container spec's).
    pub name: String,
    /// What each replica runs (kind [`crate::WorkloadKind::Replica`]; its name is made per replica).
    pub replica: WorkloadRequest,
    /// The port replicas serve on.
    pub port: u16,
    /// How they speak HTTP.
    pub protocol: UpstreamProtocol,
    /// Whether callers must present a token of the group's environment.
    pub authenticated: bool,
    /// Fewest replicas.
    pub min_replicas: u32,
    /// Most replicas.
    pub max_replicas: u32,
    /// Load is averaged over this long when scaling up (`scaling_spec.window_seconds`).
    pub window: Option<Duration>,
    /// How long load must stay lower before replicas stop (`scaling_spec.shutdown_delay_seconds`).
    pub shutdown_delay: Option<Duration>,
    /// Average CPU use, in percent of each replica's `resources.cpu` (one core when unset), that the group
    /// scales to keep (`scaling_spec.target_cpu_utilization_percentage`); `None`: requests in flight alone.
    pub target_cpu_percent: Option<u32>,
    /// Whether a request that finds no ready replica waits for one (else it gets 503 at once).
    pub hold_requests: bool,
    /// Readiness checks.
    pub probe: ProbeSpec,
    /// Scale on a function's queue of deferred calls too.
    pub queue_depth: Option<QueueDepthTrigger>,
    /// Replica floors over cron windows.
    pub windows: Option<CronWindows>,
}

/// Reads a revision's stored spec (the API's wire encoding) into a [`GroupSpec`]; the error says which field is
/// wrong and what is allowed.
pub type SpecParser = fn(&[u8]) -> Result<GroupSpec, ControlError>;

/// Settings of the scaling-group manager.
#[derive(Debug, Clone)]
pub struct ScalingConfig {
    /// How long a request waits for a ready replica before a 503 (unless the group asks for 503 at once).
    pub hold: Duration,
    /// Requests in flight one replica is meant to carry before the group scales up.
    pub target_concurrency: u32,
    /// Load-averaging window when the spec gives none.
    pub default_window: Duration,
    /// Scale-down delay when the spec gives none.
    pub default_shutdown_delay: Duration,
    /// Most replicas one group may ask for.
    pub max_replicas: u32,
    /// How often supervisors look at their replicas.
    pub tick: Duration,
}

impl Default for ScalingConfig {
    fn default() -> Self {
        Self {
            hold: Duration::from_secs(30),
            target_concurrency: 8,
            default_window: Duration::from_secs(6),
            default_shutdown_delay: Duration::from_secs(60),
            max_replicas: 64,
            tick: Duration::from_millis(100),
        }
    }
}

/// A group's state as its supervisor last saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupState {
    /// `Pending`, `Running`, `Updating` (a roll-over to a new revision: older replicas serve, the new ones are
    /// not ready yet), `ScaledToZero`, `Failed` or `Deleted` (the statuses the SDK reads; it waits while a group
    /// is `Updating`, so a deploy's `wait_ready` returns once the new revision serves).
    pub status: String,
    /// Why, in a sentence.
    pub message: Option<String>,
    /// Details (e.g. the last lines of a failing replica's output).
    pub details: Option<String>,
    /// Replicas that pass their readiness check.
    pub ready: u32,
    /// Replicas running (ready or not).
    pub running: u32,
    /// Replicas the autoscaler wants.
    pub desired: u32,
    /// The replicas' sandbox ids.
    pub replicas: Vec<String>,
    /// The revision this state describes (the group's, once its supervisor has seen a new one).
    pub revision_id: String,
}

/// A group, its selected revision, and its live state.
#[derive(Debug, Clone)]
pub struct GroupView {
    /// The record.
    pub group: ScalingGroupRecord,
    /// The revision it serves.
    pub revision: RevisionRecord,
    /// The name of its environment (part of its URL).
    pub environment_name: String,
    /// Its state.
    pub state: GroupState,
}

struct Handle {
    wake: Arc<Notify>,
    state: watch::Receiver<GroupState>,
    done: watch::Receiver<bool>,
}

/// The scaling-group manager.
pub struct ScalingGroups {
    store: Arc<Store>,
    workloads: Arc<Workloads>,
    ingress: Arc<Ingress>,
    parse: SpecParser,
    config: ScalingConfig,
    supervisors: Mutex<HashMap<String, Handle>>,
    stopping: watch::Sender<bool>,
}

fn now() -> i64 {
    compute_store::now_millis()
}

impl ScalingGroups {
    /// A manager; call [`ScalingGroups::resume`] to serve the groups recorded before a restart.
    pub fn new(
        store: Arc<Store>,
        workloads: Arc<Workloads>,
        ingress: Arc<Ingress>,
        parse: SpecParser,
        config: ScalingConfig,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            workloads,
            ingress,
            parse,
            config,
            supervisors: Mutex::default(),
            stopping: watch::channel(false).0,
        })
    }

    /// The ingress the groups are served through.
    pub fn ingress(&self) -> &Arc<Ingress> {
        &self.ingress
    }

    fn validate(&self, who: &Principal, wire: &[u8]) -> Result<GroupSpec, ControlError> {
        self.workloads.can_run()?;
        let spec = self.parse_for(&who.environment_id, wire)?;
        ids::validate_name("spec.container_spec.name", &spec.name)?;
        if spec.max_replicas > self.config.max_replicas {
            return Err(ControlError::InvalidArgument(format!(
                "spec.scaling_spec.max_replicas {} is more than this server allows ({})",
                spec.max_replicas, self.config.max_replicas
            )));
        }
        self.workloads.check(who, &spec.replica)?;
        Ok(spec)
    }

    /// Reads a revision's spec; the replicas of a group that serves a function also see the function's own
    /// secrets (after the group's, before the environment's).
    pub(crate) fn parse_for(&self, environment_id: &str, wire: &[u8]) -> Result<GroupSpec, ControlError> {
        let mut spec = (self.parse)(wire)?;
        if let Some(f) = self.store.read(|r| r.functions().by_group(environment_id, &spec.name))? {
            spec.replica.secret_scopes.push(crate::functions::function_scope(&f.name));
        }
        Ok(spec)
    }

    /// Deploys a group by name: a new group is recorded and served (Pending at first); a group of that name that
    /// is already there is updated as [`ScalingGroups::update`] does (a new revision rolled out, or nothing when
    /// the spec is unchanged), so running an unchanged deploy script again is not an error.
    pub fn create(self: &Arc<Self>, who: &Principal, wire: Vec<u8>) -> Result<GroupView, ControlError> {
        let spec = self.validate(who, &wire)?;
        if let Some(existing) =
            self.store.read(|r| r.scaling_groups().get_by_name(&who.environment_id, &spec.name, false))?
        {
            tracing::info!(group = %existing.id, name = %existing.name, "scaling group deployed again: updating it");
            return self.update(who, &existing.id, wire);
        }
        if self.workloads.serves_container(&who.environment_id, &spec.name) {
            return Err(ControlError::AlreadyExists(format!(
                "spec.container_spec.name {:?}: a container of that name with a port is served at \
                 /sg/<environment>/{}, where the scaling group would be served; stop it or name the group differently",
                spec.name, spec.name
            )));
        }
        let at = now();
        let group = ScalingGroupRecord {
            id: format!("sg-{}", ids::random_token(16)),
            environment_id: who.environment_id.clone(),
            name: spec.name.clone(),
            revision_id: format!("sgr-{}", ids::random_token(16)),
            created_by: who.client_id.clone(),
            created_at: at,
            updated_at: at,
            deleted_at: None,
        };
        let revision = RevisionRecord {
            id: group.revision_id.clone(),
            group_id: group.id.clone(),
            number: 1,
            spec: wire,
            created_by: who.client_id.clone(),
            created_at: at,
        };
        self.store.write(|r| r.scaling_groups().insert(&group, &revision)).map_err(|e| {
            match ControlError::from(e) {
                ControlError::AlreadyExists(_) => ControlError::AlreadyExists(format!(
                    "a scaling group named {:?} already exists in this environment (update it, or delete it first)",
                    group.name
                )),
                other => other,
            }
        })?;
        tracing::info!(group = %group.id, name = %group.name, "scaling group created");
        self.supervise(group.clone());
        self.view(group)
    }

    /// Gives a group a new revision with `wire` as its spec; its replicas roll over to it. The name cannot change.
    pub fn update(self: &Arc<Self>, who: &Principal, id: &str, wire: Vec<u8>) -> Result<GroupView, ControlError> {
        let group = self.find(who, Some(id), None, false)?;
        let spec = self.validate(who, &wire)?;
        if spec.name != group.name {
            return Err(ControlError::InvalidArgument(format!(
                "spec.container_spec.name {:?} differs from the group's name {:?}: a scaling group cannot be renamed",
                spec.name, group.name
            )));
        }
        let current = self.revision_record(&group, &group.revision_id)?;
        if current.spec == wire {
            return self.view(group);
        }
        let revision = self.store.write(|r| {
            let rev = RevisionRecord {
                id: format!("sgr-{}", ids::random_token(16)),
                group_id: group.id.clone(),
                number: r.scaling_groups().last_revision_number(&group.id)? + 1,
                spec: wire.clone(),
                created_by: who.client_id.clone(),
                created_at: now(),
            };
            r.scaling_groups().add_revision(&rev)?;
            Ok(rev)
        })?;
        tracing::info!(group = %group.id, revision = revision.number, "scaling group updated");
        self.wake(&group.id);
        let group = self.find(who, Some(id), None, false)?;
        self.view(group)
    }

    /// Makes a group serve one of its existing revisions (`None`: its newest), without creating a new one: a
    /// rollback, or a return to the latest after one. Replicas roll over as for an update.
    pub fn select_revision(
        &self,
        who: &Principal,
        id: &str,
        revision_id: Option<&str>,
    ) -> Result<GroupView, ControlError> {
        let group = self.find(who, Some(id), None, false)?;
        let target = match revision_id {
            Some(r) => self.revision_record(&group, r)?,
            None => self
                .store
                .read(|r| r.scaling_groups().revisions(&group.id, 1, 0))?
                .into_iter()
                .next()
                .ok_or_else(|| ControlError::Internal(format!("scaling group {:?} has no revisions", group.name)))?,
        };
        (self.parse)(&target.spec)?;
        if target.id != group.revision_id {
            self.store.write(|r| r.scaling_groups().select(&group.id, &target.id, now()))?;
            tracing::info!(group = %group.id, revision = target.number, "scaling group serves another revision");
            self.wake(&group.id);
        }
        let group = self.find(who, Some(id), None, false)?;
        self.view(group)
    }

    /// A group by id or name; deleted ones only with `include_deleted`.
    pub fn get(
        &self,
        who: &Principal,
        id: Option<&str>,
        name: Option<&str>,
        include_deleted: bool,
    ) -> Result<GroupView, ControlError> {
        let group = self.find(who, id, name, include_deleted)?;
        self.view(group)
    }

    /// An environment's groups, newest first.
    pub fn list(
        &self,
        who: &Principal,
        include_deleted: bool,
        limit: u32,
        offset: u32,
    ) -> Result<Vec<GroupView>, ControlError> {
        let groups =
            self.store.read(|r| r.scaling_groups().list(&who.environment_id, include_deleted, limit, offset))?;
        groups.into_iter().map(|g| self.view(g)).collect()
    }

    /// Deletes a group: it stops serving, its replicas stop (their volumes are synced), and its record stays for
    /// history. Returns once the replicas are gone.
    pub async fn delete(
        &self,
        who: &Principal,
        id: Option<&str>,
        name: Option<&str>,
    ) -> Result<GroupView, ControlError> {
        let group = self.find(who, id, name, false)?;
        self.store.write(|r| r.scaling_groups().delete(&group.id, now()))?;
        tracing::info!(group = %group.id, name = %group.name, "scaling group deleted");
        let handle = self.supervisors.lock().unwrap_or_else(|p| p.into_inner()).get(&group.id).map(|h| {
            h.wake.notify_one();
            h.done.clone()
        });
        if let Some(mut done) = handle {
            // Replicas get a grace period to finish; past that the caller gets its answer and teardown goes on.
            let _ = tokio::time::timeout(Duration::from_secs(30), done.wait_for(|d| *d)).await;
        }
        let group = self.find(who, Some(&group.id), None, true)?;
        self.view(group)
    }

    /// One revision of a group.
    pub fn revision(
        &self,
        who: &Principal,
        id: Option<&str>,
        name: Option<&str>,
        revision_id: &str,
        include_deleted: bool,
    ) -> Result<(ScalingGroupRecord, RevisionRecord), ControlError> {
        let group = self.find(who, id, name, include_deleted)?;
        let rev = self.revision_record(&group, revision_id)?;
        Ok((group, rev))
    }

    /// A group's revisions, newest first.
    pub fn revisions(
        &self,
        who: &Principal,
        id: Option<&str>,
        name: Option<&str>,
        include_deleted: bool,
        limit: u32,
        offset: u32,
    ) -> Result<(ScalingGroupRecord, Vec<RevisionRecord>), ControlError> {
        let group = self.find(who, id, name, include_deleted)?;
        let revs = self.store.read(|r| r.scaling_groups().revisions(&group.id, limit, offset))?;
        Ok((group, revs))
    }

    /// The image layers live groups need to start a replica (their selected revisions' images), so that image
    /// garbage collection keeps them even while a group is scaled to zero.
    pub fn image_layers_in_use(&self) -> Result<std::collections::HashSet<std::path::PathBuf>, ControlError> {
        let mut layers = std::collections::HashSet::new();
        for g in self.store.read(|r| r.scaling_groups().live())? {
            let Some(rev) = self.store.read(|r| r.scaling_groups().revision(&g.id, &g.revision_id))? else {
                continue;
            };
            if let Ok(spec) = (self.parse)(&rev.spec) {
                layers.extend(self.workloads.images().layers_of(&spec.replica.image).into_iter().flatten());
            }
        }
        Ok(layers)
    }

    /// Starts serving every group recorded as live (after a restart; their old replicas were reconciled away).
    pub fn resume(self: &Arc<Self>) -> Result<usize, ControlError> {
        let live = self.store.read(|r| r.scaling_groups().live())?;
        let n = live.len();
        for g in live {
            self.supervise(g);
        }
        Ok(n)
    }

    /// Stops every supervisor without deleting anything (server shutdown; the workload manager then stops the
    /// replicas, and the next start resumes the groups).
    pub async fn shutdown(&self) {
        self.stopping.send_replace(true);
        let done: Vec<watch::Receiver<bool>> =
            self.supervisors.lock().unwrap_or_else(|p| p.into_inner()).values().map(|h| h.done.clone()).collect();
        for mut d in done {
            let _ = tokio::time::timeout(Duration::from_secs(5), d.wait_for(|d| *d)).await;
        }
    }

    /// Tells a group's supervisor its record changed (a new or selected revision).
    fn wake(&self, group_id: &str) {
        if let Some(h) = self.supervisors.lock().unwrap_or_else(|p| p.into_inner()).get(group_id) {
            h.wake.notify_one();
        }
    }

    fn supervise(self: &Arc<Self>, group: ScalingGroupRecord) {
        let wake = Arc::new(Notify::new());
        let (state_tx, state_rx) = watch::channel(GroupState {
            status: "Pending".into(),
            message: Some("starting replicas".into()),
            ..GroupState::default()
        });
        let (done_tx, done_rx) = watch::channel(false);
        self.supervisors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(group.id.clone(), Handle { wake: wake.clone(), state: state_rx, done: done_rx });
        let this = self.clone();
        tokio::spawn(async move {
            let id = group.id.clone();
            supervisor::run(this.clone(), group, wake, state_tx).await;
            done_tx.send_replace(true);
            let mut sups = this.supervisors.lock().unwrap_or_else(|p| p.into_inner());
            // Only a deleted group's supervisor leaves; at shutdown the handles stay for `shutdown` to wait on.
            if !*this.stopping.borrow() {
                sups.remove(&id);
            }
        });
    }

    fn find(
        &self,
        who: &Principal,
        id: Option<&str>,
        name: Option<&str>,
        include_deleted: bool,
    ) -> Result<ScalingGroupRecord, ControlError> {
        let env = &who.environment_id;
        match (id.filter(|s| !s.is_empty()), name.filter(|s| !s.is_empty())) {
            (Some(id), _) => self
                .store
                .read(|r| r.scaling_groups().get(env, id))?
                .filter(|g| include_deleted || g.deleted_at.is_none())
                .ok_or_else(|| ControlError::NotFound(format!("scaling group {id:?} not found in this environment"))),
            (None, Some(name)) => self
                .store
                .read(|r| r.scaling_groups().get_by_name(env, name, include_deleted))?
                .ok_or_else(|| ControlError::NotFound(format!("no scaling group named {name:?} in this environment"))),
            (None, None) => Err(ControlError::InvalidArgument("the scaling group's id or name is required".into())),
        }
    }

    fn revision_record(&self, group: &ScalingGroupRecord, revision_id: &str) -> Result<RevisionRecord, ControlError> {
        self.store.read(|r| r.scaling_groups().revision(&group.id, revision_id))?.ok_or_else(|| {
            ControlError::NotFound(format!("revision {revision_id:?} of scaling group {:?} not found", group.name))
        })
    }

    fn view(&self, group: ScalingGroupRecord) -> Result<GroupView, ControlError> {
        let revision = self.revision_record(&group, &group.revision_id)?;
        let environment_name = self
            .store
            .read(|r| r.environments().get(&group.environment_id))?
            .map(|e| e.name)
            .unwrap_or_else(|| group.environment_id.clone());
        let state = if group.deleted_at.is_some() {
            GroupState { status: "Deleted".into(), message: Some("the group was deleted".into()), ..Default::default() }
        } else {
            self.supervisors
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&group.id)
                .map(|h| h.state.borrow().clone())
                .map(|st| {
                    if st.revision_id == group.revision_id || st.status != "Running" {
                        return st;
                    }
                    // Its supervisor has not looked since the group got another revision.
                    GroupState {
                        status: "Updating".into(),
                        message: Some(format!("rolling out revision {}", group.revision_id)),
                        ready: 0,
                        revision_id: group.revision_id.clone(),
                        ..st
                    }
                })
                .unwrap_or_else(|| GroupState {
                    status: "Pending".into(),
                    message: Some("starting replicas".into()),
                    ..Default::default()
                })
        };
        Ok(GroupView { group, revision, environment_name, state })
    }
}
