//! One group's supervisor: a loop that reads the group's record and revision, follows its replicas' records,
//! checks their readiness, asks the autoscaler for a count, starts and stops replicas to match (rolling onto a new
//! revision once its replicas are ready), and publishes the ready ones to the ingress and the state to readers.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use compute_ingress::{ColdPolicy, GroupRoute, RouteSettings};
use compute_store::{SandboxStatus, ScalingGroupRecord};
use futures_util::future::join_all;
use tokio::sync::{watch, Notify};

use super::autoscale::{by_cpu, Autoscaler, Bounds};
use super::{probe, GroupSpec, GroupState, ScalingGroups};
use crate::{ids, Principal};

/// Failures of a revision's replicas in a row, none of them ever ready, after which the group reports Failed.
const FAILED_AFTER: u32 = 3;
/// Longest wait between restarts of a failing replica.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How often a replica that is not ready yet is checked (and the supervisor looks) during its first
/// `FAST_STARTUP`, so that a held request gets it as soon as it listens.
const STARTUP_PROBE_EVERY: Duration = Duration::from_millis(20);
const FAST_STARTUP: Duration = Duration::from_secs(10);
/// How often it is checked after that: a replica that never listens must not keep its supervisor busy.
const SLOW_STARTUP_PROBE_EVERY: Duration = Duration::from_millis(250);
/// Passes between reads of the group's record when nothing woke the supervisor.
const RECORD_EVERY: u64 = 10;
/// Passes between looks at the records of replicas that are running (starting and stopping ones: every pass).
const SETTLED_EVERY: u64 = 5;
/// How long a replica taken out of service may take to finish the requests it is serving.
const DRAIN_GRACE: Duration = Duration::from_secs(30);
/// The same when the whole group is deleted (the caller of Delete waits for it, so it is shorter).
const DELETE_DRAIN_GRACE: Duration = Duration::from_secs(15);
/// How often a queue-depth trigger reads the queue.
const QUEUE_SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Wait before replacing a replica that ended after it had served (a crash loop must not spin).
const RESTART_DELAY: Duration = Duration::from_secs(1);

struct Replica {
    id: String,
    revision_id: String,
    addr: Option<SocketAddr>,
    ready: bool,
    ever_ready: bool,
    failed_probes: u32,
    next_probe: Instant,
    last_probe_error: Option<String>,
    /// Asked to stop (the group shrank or rolled over); it leaves the route at once.
    stopping: bool,
    /// (when, CPU time used so far) samples over the autoscaling window, when the spec has a CPU target.
    cpu: VecDeque<(Instant, Duration)>,
    /// When it was asked for.
    started: Instant,
}

struct Supervisor {
    groups: Arc<ScalingGroups>,
    group: ScalingGroupRecord,
    principal: Principal,
    route: Arc<GroupRoute>,
    replicas: Vec<Replica>,
    specs: HashMap<String, Arc<GroupSpec>>,
    autoscaler: Autoscaler,
    /// Replicas taken out of service this pass, stopped once the route no longer lists them.
    retiring: Vec<String>,
    /// Replica failures of the current revision in a row (reset when one becomes ready).
    failures: u32,
    last_failure: Option<(String, Option<String>)>,
    next_start: Instant,
    /// The last queue-depth reading, for a `function_queue_depth_trigger`.
    queue_sample: Option<(Instant, u64)>,
}

pub(super) async fn run(
    groups: Arc<ScalingGroups>,
    group: ScalingGroupRecord,
    wake: Arc<Notify>,
    state: watch::Sender<GroupState>,
) {
    let principal = Principal {
        client_id: group.created_by.clone(),
        environment_id: group.environment_id.clone(),
        expires_at: i64::MAX,
    };
    let env_name = groups.workloads.environment_name(&group.environment_id);
    let route = GroupRoute::new(
        group.environment_id.clone(),
        RouteSettings {
            protocol: compute_ingress::UpstreamProtocol::Http1,
            authenticated: true,
            cold: ColdPolicy::Hold(groups.config.hold),
        },
    );
    let mut sup = Supervisor {
        groups: groups.clone(),
        group: group.clone(),
        principal,
        route: route.clone(),
        replicas: Vec::new(),
        specs: HashMap::new(),
        autoscaler: Autoscaler::default(),
        retiring: Vec::new(),
        failures: 0,
        last_failure: None,
        next_start: Instant::now(),
        queue_sample: None,
    };
    // Settings first, so the route never serves with defaults the spec does not have.
    if let Some(spec) = sup.spec(&group.revision_id) {
        route.set_settings(sup.route_settings(&spec));
    }
    groups.ingress.insert(&env_name, &group.name, route.clone());
    let mut stopping = groups.stopping.subscribe();
    let mut pass: u64 = 0;
    loop {
        let woken = tokio::select! {
            () = tokio::time::sleep(sup.pause()) => false,
            () = route.demanded() => false,
            () = wake.notified() => true,
            _ = stopping.wait_for(|s| *s) => {
                groups.ingress.remove(&env_name, &group.name, &route);
                return;
            }
        };
        // The record changes only through the manager, which wakes us; reading it every second as well keeps a
        // missed wake from mattering without a store query per tick.
        if woken || pass.is_multiple_of(RECORD_EVERY) {
            let record = match groups.store.read(|r| r.scaling_groups().get(&group.environment_id, &group.id)) {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(group = %group.id, error = %e, "reading a scaling group failed");
                    continue;
                }
            };
            if record.deleted_at.is_some() {
                break;
            }
            sup.group = record;
        }
        state.send_replace(sup.step(pass.is_multiple_of(SETTLED_EVERY)).await);
        pass += 1;
    }
    // New requests get 503 from here on; the ones in flight finish (within the drain grace) before replicas stop.
    let serving = route.replicas();
    groups.ingress.remove(&env_name, &group.name, &route);
    let deadline = tokio::time::Instant::now() + DELETE_DRAIN_GRACE;
    while serving.iter().any(|u| u.in_flight() > 0) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sup.stop_all("its scaling group was deleted").await;
    state.send_replace(GroupState {
        status: "Deleted".into(),
        message: Some("the group was deleted".into()),
        ..GroupState::default()
    });
}

impl Supervisor {
    fn spec(&mut self, revision_id: &str) -> Option<Arc<GroupSpec>> {
        if let Some(s) = self.specs.get(revision_id) {
            return Some(s.clone());
        }
        let rev = self.groups.store.read(|r| r.scaling_groups().revision(&self.group.id, revision_id)).ok()??;
        match self.groups.parse_for(&self.group.environment_id, &rev.spec) {
            Ok(spec) => {
                let spec = Arc::new(spec);
                self.specs.insert(revision_id.to_string(), spec.clone());
                Some(spec)
            }
            Err(e) => {
                tracing::error!(group = %self.group.id, revision = revision_id, error = %e, "a stored revision does not parse");
                None
            }
        }
    }

    /// The wait before replacing a failed replica: 1 s, doubling with each failure in a row, at most `MAX_BACKOFF`.
    fn backoff(&self) -> Duration {
        Duration::from_secs(1 << self.failures.saturating_sub(1).min(6)).min(MAX_BACKOFF)
    }

    /// How long to wait before the next pass: short while a replica is starting, so it serves as soon as it can.
    fn pause(&self) -> Duration {
        if self.replicas.iter().any(|r| !r.ready && !r.stopping && r.started.elapsed() < FAST_STARTUP) {
            STARTUP_PROBE_EVERY
        } else {
            self.groups.config.tick
        }
    }

    fn route_settings(&self, spec: &GroupSpec) -> RouteSettings {
        RouteSettings {
            protocol: spec.protocol,
            authenticated: spec.authenticated,
            cold: if spec.hold_requests { ColdPolicy::Hold(self.groups.config.hold) } else { ColdPolicy::Error },
        }
    }

    /// One pass: follow, check, scale, publish. Returns the state to show. `thorough`: look at the records of
    /// running replicas too (they change only when one ends, which the readiness checks also notice).
    async fn step(&mut self, thorough: bool) -> GroupState {
        let revision_id = self.group.revision_id.clone();
        let Some(spec) = self.spec(&revision_id) else {
            return GroupState {
                status: "Failed".into(),
                message: Some(format!("revision {revision_id} of this group cannot be read; update the group")),
                ..GroupState::default()
            };
        };
        self.route.set_settings(self.route_settings(&spec));
        self.follow(&revision_id, thorough);
        self.check_readiness(&spec).await;

        let config = &self.groups.config;
        let bounds = Bounds {
            min: spec.min_replicas,
            max: spec.max_replicas,
            target_concurrency: config.target_concurrency,
            window: spec.window.unwrap_or(config.default_window),
            shutdown_delay: spec.shutdown_delay.unwrap_or(config.default_shutdown_delay),
        };
        let mut bounds = bounds;
        if let Some(w) = &spec.windows {
            // A window's floor raises the minimum (never past the maximum).
            bounds.min = bounds.min.max(w.floor_at(chrono::Utc::now()).min(bounds.max));
        }
        let cpu_wants = spec.target_cpu_percent.map(|pct| self.cpu_wants(&spec, &revision_id, bounds.window, pct));
        let queue_wants = spec.queue_depth.as_ref().map(|t| t.wants(self.queue_depth(t)));
        let extra_wants = match (cpu_wants, queue_wants) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0).max(b.unwrap_or(0))),
        };
        let desired = self.autoscaler.desired(
            Instant::now(),
            self.route.in_flight(),
            self.route.served(),
            self.route.take_starved(),
            extra_wants,
            bounds,
        );
        self.converge(desired, &revision_id, &spec);

        let ready: Vec<(String, SocketAddr)> = self
            .replicas
            .iter()
            .filter(|r| r.ready && !r.stopping)
            .filter_map(|r| r.addr.map(|a| (r.id.clone(), a)))
            .collect();
        let ready_count =
            self.replicas.iter().filter(|r| r.ready && !r.stopping && r.revision_id == revision_id).count() as u32;
        let serving = ready.len() as u32;
        let routed = self.route.replicas();
        if ready.len() != routed.len() || ready.iter().zip(&routed).any(|((id, _), u)| *id != u.id) {
            // The replicas that are about to stop still hold their in-flight requests.
            let draining: Vec<Arc<compute_ingress::Upstream>> =
                routed.into_iter().filter(|u| self.retiring.contains(&u.id)).collect();
            self.route.set_replicas(ready);
            self.retire(draining);
        } else {
            self.retire(Vec::new());
        }
        self.state(desired, ready_count, serving)
    }

    /// Calls queued or running of the trigger's function, read from the store at most once a second.
    fn queue_depth(&mut self, trigger: &super::QueueDepthTrigger) -> u64 {
        let now = Instant::now();
        if let Some((at, depth)) = self.queue_sample {
            if now.duration_since(at) < QUEUE_SAMPLE_EVERY {
                return depth;
            }
        }
        let env = &self.group.environment_id;
        let depth = match self.groups.store.read(|r| r.function_calls().unfinished_of_named(env, &trigger.function)) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(group = %self.group.name, error = %e, "could not read the queue depth");
                self.queue_sample.map(|(_, d)| d).unwrap_or(0)
            }
        };
        self.queue_sample = Some((now, depth));
        depth
    }

    /// Samples the CPU time of the current revision's ready replicas and returns what the CPU target wants: their
    /// count scaled by their average use over `window` against the target.
    fn cpu_wants(&mut self, spec: &GroupSpec, revision_id: &str, window: Duration, target_percent: u32) -> u32 {
        let cores = spec
            .replica
            .cpu
            .as_deref()
            .and_then(|c| crate::quantity::parse_cpu("resources.cpu", c).ok())
            .map(|millis| millis as f64 / 1000.0)
            .unwrap_or(1.0);
        let now = Instant::now();
        let mut ready = 0u32;
        let mut used = Vec::new();
        for r in self.replicas.iter_mut().filter(|r| r.ready && !r.stopping && r.revision_id == revision_id) {
            ready += 1;
            let Some(cpu) = self.groups.workloads.cpu_time(&r.id) else { continue };
            r.cpu.push_back((now, cpu));
            while r.cpu.len() > 2 && r.cpu.front().is_some_and(|(t, _)| now.duration_since(*t) > window) {
                r.cpu.pop_front();
            }
            if let (Some((t0, c0)), Some((t1, c1))) = (r.cpu.front(), r.cpu.back()) {
                let span = t1.duration_since(*t0).as_secs_f64();
                // Clock ticks are 10 ms: a shorter span says little.
                if span >= 0.5 {
                    used.push(c1.saturating_sub(*c0).as_secs_f64() / span / cores);
                }
            }
        }
        if used.is_empty() {
            return ready;
        }
        let utilisation = used.iter().sum::<f64>() / used.len() as f64;
        by_cpu(ready, utilisation, target_percent as f64 / 100.0)
    }

    /// Updates each replica from its record; a finished one leaves (and counts as a failure of its revision if it
    /// never became ready).
    fn follow(&mut self, revision_id: &str, thorough: bool) {
        let mut ended = Vec::new();
        for r in &mut self.replicas {
            if !thorough && r.addr.is_some() && !r.stopping {
                continue;
            }
            let rec = match self.groups.workloads.record(&self.group.environment_id, &r.id) {
                Ok(Some(rec)) => rec,
                Ok(None) => {
                    ended.push((r.id.clone(), None));
                    continue;
                }
                Err(_) => continue,
            };
            match rec.status {
                SandboxStatus::Running if r.addr.is_none() => {
                    // Its port, on its address in the sandbox network.
                    if let Some(ip) = self.groups.workloads.address(&r.id) {
                        r.addr = self.specs.get(&r.revision_id).map(|s| SocketAddr::from((ip, s.port)));
                    }
                }
                SandboxStatus::Running | SandboxStatus::Pending => {}
                _ => ended.push((r.id.clone(), Some(rec))),
            }
        }
        for (id, rec) in ended {
            let Some(pos) = self.replicas.iter().position(|r| r.id == id) else { continue };
            let r = self.replicas.remove(pos);
            if r.stopping || r.revision_id != revision_id {
                continue;
            }
            let message =
                rec.as_ref().and_then(|rec| rec.status_message.clone()).unwrap_or_else(|| "its record is gone".into());
            tracing::warn!(group = %self.group.name, replica = %id, message, "replica ended");
            if !r.ever_ready {
                self.failures += 1;
            }
            let details = rec.and_then(|rec| rec.status_details);
            self.last_failure = Some((format!("replica {id} ended: {message}"), details));
            self.next_start = Instant::now() + if self.failures == 0 { RESTART_DELAY } else { self.backoff() };
        }
    }

    /// Checks the replicas that are due, all at once.
    async fn check_readiness(&mut self, spec: &GroupSpec) {
        let now = Instant::now();
        let due: Vec<(usize, SocketAddr, probe::ProbeSpec)> = self
            .replicas
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.stopping && r.next_probe <= now)
            .filter_map(|(i, r)| {
                let probe = self.specs.get(&r.revision_id).map(|s| s.probe.clone()).unwrap_or(spec.probe.clone());
                r.addr.map(|a| (i, a, probe))
            })
            .collect();
        if due.is_empty() {
            return;
        }
        let results = join_all(due.iter().map(|(_, addr, p)| probe::check(*addr, p))).await;
        let current = self.group.revision_id.clone();
        for ((i, _, p), result) in due.into_iter().zip(results) {
            let r = &mut self.replicas[i];
            match result {
                Ok(()) => {
                    if !r.ready {
                        tracing::info!(group = %self.group.name, replica = %r.id, "replica ready");
                        if r.revision_id == current {
                            self.failures = 0;
                        }
                    }
                    r.ready = true;
                    r.ever_ready = true;
                    r.failed_probes = 0;
                    r.last_probe_error = None;
                }
                Err(e) => {
                    r.failed_probes += 1;
                    if r.ready && r.failed_probes >= p.failure_threshold {
                        tracing::warn!(group = %self.group.name, replica = %r.id, error = %e, "replica not ready");
                        r.ready = false;
                    }
                    r.last_probe_error = Some(e);
                }
            }
            r.next_probe = Instant::now()
                + match (r.ready, r.started.elapsed() < FAST_STARTUP) {
                    (true, _) => p.period,
                    (false, true) => STARTUP_PROBE_EVERY,
                    (false, false) => SLOW_STARTUP_PROBE_EVERY,
                };
        }
    }

    /// Starts and stops replicas so the current revision has `desired`, and retires the old revision's once the
    /// current one serves.
    fn converge(&mut self, desired: u32, revision_id: &str, spec: &Arc<GroupSpec>) {
        let current: Vec<usize> = (0..self.replicas.len())
            .filter(|&i| self.replicas[i].revision_id == revision_id && !self.replicas[i].stopping)
            .collect();
        let have = current.len() as u32;
        if have < desired && Instant::now() >= self.next_start {
            for _ in have..desired {
                if !self.start(revision_id, spec) {
                    break;
                }
            }
        }
        let mut to_stop: Vec<String> = Vec::new();
        if have > desired {
            // Not-ready ones first, then the newest.
            let mut extra: Vec<&Replica> = current.iter().rev().map(|&i| &self.replicas[i]).collect();
            extra.sort_by_key(|r| r.ready);
            to_stop.extend(extra.iter().take((have - desired) as usize).map(|r| r.id.clone()));
        }
        let ready_current = self.replicas.iter().filter(|r| r.revision_id == revision_id && r.ready).count() as u32;
        let rolled_over = ready_current >= desired.min(have.max(1)) || desired == 0;
        for r in &self.replicas {
            if r.revision_id != revision_id && !r.stopping && (rolled_over || !r.ready) {
                to_stop.push(r.id.clone());
            }
        }
        if !to_stop.is_empty() {
            self.stop(&to_stop, "the group shrank or rolled over to another revision");
        }
    }

    /// Starts one replica of the current revision; false when it could not be created.
    fn start(&mut self, revision_id: &str, spec: &Arc<GroupSpec>) -> bool {
        let mut req = spec.replica.clone();
        let number = self
            .groups
            .store
            .read(|r| r.scaling_groups().revision(&self.group.id, revision_id))
            .ok()
            .flatten()
            .map(|r| r.number)
            .unwrap_or(0);
        let suffix = format!("-r{number}-{}", ids::random_token(6));
        let base: String = self.group.name.chars().take(63 - suffix.len()).collect();
        req.name = format!("{}{suffix}", base.trim_end_matches('-'));
        match self.groups.workloads.create(&self.principal, req) {
            Ok(rec) => {
                tracing::info!(group = %self.group.name, replica = %rec.id, name = %rec.name, "replica starting");
                self.replicas.push(Replica {
                    id: rec.id,
                    revision_id: revision_id.to_string(),
                    addr: None,
                    ready: false,
                    ever_ready: false,
                    failed_probes: 0,
                    next_probe: Instant::now(),
                    last_probe_error: None,
                    stopping: false,
                    cpu: VecDeque::new(),
                    started: Instant::now(),
                });
                true
            }
            Err(e) => {
                self.failures += 1;
                self.last_failure = Some((format!("starting a replica failed: {e}"), None));
                self.next_start = Instant::now() + self.backoff();
                false
            }
        }
    }

    /// Takes replicas out of service; they stop once the route no longer lists them (see [`Supervisor::retire`]).
    fn stop(&mut self, ids: &[String], why: &'static str) {
        for r in self.replicas.iter_mut().filter(|r| ids.contains(&r.id) && !r.stopping) {
            r.stopping = true;
            r.ready = false;
            tracing::info!(group = %self.group.name, replica = %r.id, why, "replica stopping");
            self.retiring.push(r.id.clone());
        }
    }

    /// Stops the replicas taken out of service, in the background: each first finishes the requests it is serving
    /// (up to the grace period), then gets SIGTERM (its volumes are synced as it stops).
    fn retire(&mut self, draining: Vec<Arc<compute_ingress::Upstream>>) {
        for id in self.retiring.drain(..) {
            let upstream = draining.iter().find(|u| u.id == id).cloned();
            let workloads = self.groups.workloads.clone();
            let env = self.group.environment_id.clone();
            tokio::spawn(async move {
                let deadline = tokio::time::Instant::now() + DRAIN_GRACE;
                while upstream.as_ref().is_some_and(|u| u.in_flight() > 0) && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let why = "its scaling group no longer needs it";
                if let Err(e) = workloads.terminate_with(&env, &id, Duration::from_secs(10), why).await {
                    tracing::warn!(replica = %id, error = %e, "stopping a replica failed");
                }
            });
        }
    }

    /// Stops every replica and waits for them (the group was deleted).
    async fn stop_all(&mut self, why: &'static str) {
        let workloads = self.groups.workloads.clone();
        let env = self.group.environment_id.clone();
        let stops = self.replicas.drain(..).map(|r| {
            let workloads = workloads.clone();
            let env = env.clone();
            async move {
                if let Err(e) = workloads.terminate_with(&env, &r.id, Duration::from_secs(10), why).await {
                    tracing::warn!(replica = %r.id, error = %e, "stopping a replica failed");
                }
            }
        });
        join_all(stops).await;
    }

    /// The group's state: `ready` replicas of the revision it serves pass their checks, `serving` replicas of
    /// any revision are in the route (older ones serve while a roll-over is under way).
    fn state(&self, desired: u32, ready: u32, serving: u32) -> GroupState {
        let live: Vec<&Replica> = self.replicas.iter().filter(|r| !r.stopping).collect();
        let running = live.iter().filter(|r| r.addr.is_some()).count() as u32;
        let replicas = live.iter().map(|r| r.id.clone()).collect();
        let revision_id = self.group.revision_id.clone();
        let (status, message, details) = if ready > 0 {
            let msg = if ready < desired {
                format!("{ready} of {desired} replicas ready")
            } else {
                format!("{ready} replica{} ready", if ready == 1 { "" } else { "s" })
            };
            ("Running", Some(msg), None)
        } else if self.failures >= FAILED_AFTER {
            let (msg, details) = self.last_failure.clone().unwrap_or_default();
            (
                "Failed",
                Some(format!(
                    "replicas keep failing before they become ready ({} in a row); last: {msg}",
                    self.failures
                )),
                details,
            )
        } else if serving > 0 {
            (
                "Updating",
                Some(format!(
                    "rolling out revision {revision_id}: {serving} replica{} of the previous revision serve{} until \
                     the new ones are ready",
                    if serving == 1 { "" } else { "s" },
                    if serving == 1 { "s" } else { "" }
                )),
                None,
            )
        } else if desired == 0 && live.is_empty() {
            ("ScaledToZero", Some("no replicas: a request starts one".to_string()), None)
        } else {
            let waiting = live.iter().find_map(|r| {
                r.last_probe_error.clone().map(|e| format!("waiting for replica {} to be ready: {e}", r.id))
            });
            let msg = waiting
                .or_else(|| self.last_failure.as_ref().map(|(m, _)| format!("retrying: {m}")))
                .unwrap_or_else(|| format!("starting {desired} replica{}", if desired == 1 { "" } else { "s" }));
            ("Pending", Some(msg), None)
        };
        GroupState { status: status.into(), message, details, ready, running, desired, replicas, revision_id }
    }
}
