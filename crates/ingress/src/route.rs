//! A scaling group's route: where its ready replicas listen, how busy each is, and what callers wait on.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::Notify;

/// How replicas speak HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 (`protocol: "http"`, the default). Requests arriving over HTTP/2 are translated.
    Http1,
    /// HTTP/2 with prior knowledge (`protocol: "grpc"` or `"h2c"`): trailers pass through, so gRPC works.
    H2c,
}

/// What a request does when no replica is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColdPolicy {
    /// Wait up to this long for a replica (scaling up from zero, or a replica being replaced).
    Hold(Duration),
    /// Answer 503 at once (the SDK retries a 503 that says "scaling up from zero").
    Error,
}

/// The settings of a route that come from the group's spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteSettings {
    /// How replicas speak.
    pub protocol: UpstreamProtocol,
    /// Whether callers must present a token of the group's environment.
    pub authenticated: bool,
    /// What a request does while no replica is ready.
    pub cold: ColdPolicy,
}

/// One ready replica.
#[derive(Debug)]
pub struct Upstream {
    /// The replica's sandbox id.
    pub id: String,
    /// Where it listens.
    pub addr: SocketAddr,
    in_flight: AtomicUsize,
}

impl Upstream {
    /// A replica listening at `addr`.
    pub fn new(id: impl Into<String>, addr: SocketAddr) -> Arc<Self> {
        Arc::new(Self { id: id.into(), addr, in_flight: AtomicUsize::new(0) })
    }

    /// Requests it is serving now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// The route of one scaling group.
#[derive(Debug)]
pub struct GroupRoute {
    environment_id: String,
    settings: RwLock<RouteSettings>,
    replicas: RwLock<Vec<Arc<Upstream>>>,
    /// Requests inside the ingress for this group (waiting or proxied), the autoscaler's concurrency signal.
    in_flight: AtomicUsize,
    /// Requests that found no ready replica since the supervisor last looked: demand while scaled to zero.
    starved: AtomicU64,
    served: AtomicU64,
    next: AtomicUsize,
    closed: AtomicBool,
    /// Wakes requests waiting for a replica (replicas changed, or the route closed).
    changed: Notify,
    /// Wakes the group's supervisor when a request finds no replica.
    demand: Notify,
}

impl GroupRoute {
    /// A route with no replicas yet.
    pub fn new(environment_id: impl Into<String>, settings: RouteSettings) -> Arc<Self> {
        Arc::new(Self {
            environment_id: environment_id.into(),
            settings: RwLock::new(settings),
            replicas: RwLock::default(),
            in_flight: AtomicUsize::new(0),
            starved: AtomicU64::new(0),
            served: AtomicU64::new(0),
            next: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            changed: Notify::new(),
            demand: Notify::new(),
        })
    }

    /// The environment whose tokens an authenticated route accepts.
    pub fn environment_id(&self) -> &str {
        &self.environment_id
    }

    /// Current settings.
    pub fn settings(&self) -> RouteSettings {
        *self.settings.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the settings (a new revision).
    pub fn set_settings(&self, settings: RouteSettings) {
        *self.settings.write().unwrap_or_else(|p| p.into_inner()) = settings;
    }

    /// Replaces the set of ready replicas, keeping the in-flight counts of those that stay.
    pub fn set_replicas(&self, ready: Vec<(String, SocketAddr)>) {
        {
            let mut replicas = self.replicas.write().unwrap_or_else(|p| p.into_inner());
            let kept: Vec<Arc<Upstream>> = ready
                .into_iter()
                .map(|(id, addr)| {
                    replicas
                        .iter()
                        .find(|u| u.id == id && u.addr == addr)
                        .cloned()
                        .unwrap_or_else(|| Upstream::new(id, addr))
                })
                .collect();
            *replicas = kept;
        }
        self.changed.notify_waiters();
    }

    /// The ready replicas.
    pub fn replicas(&self) -> Vec<Arc<Upstream>> {
        self.replicas.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The ready replica with the fewest requests in flight (ties taken in turn).
    pub fn pick(&self) -> Option<Arc<Upstream>> {
        let replicas = self.replicas.read().unwrap_or_else(|p| p.into_inner());
        if replicas.is_empty() {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = replicas.len();
        (0..n).map(|i| &replicas[(start + i) % n]).min_by_key(|u| u.in_flight()).cloned()
    }

    /// Requests inside the ingress for this group now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Requests answered since the route was made.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// How many requests found no ready replica since the last call (and resets the count).
    pub fn take_starved(&self) -> u64 {
        self.starved.swap(0, Ordering::Relaxed)
    }

    /// Resolves when a request finds no ready replica (the supervisor scales up from zero at once).
    pub async fn demanded(&self) {
        self.demand.notified().await
    }

    /// Ends the route: waiting requests get 503, new ones find no group.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.replicas.write().unwrap_or_else(|p| p.into_inner()).clear();
        self.changed.notify_waiters();
    }

    /// Whether [`GroupRoute::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    /// A ready replica, waiting for one as the settings allow. `None` when none became ready in time.
    pub(crate) async fn acquire(&self) -> Option<Arc<Upstream>> {
        if let Some(u) = self.pick() {
            return Some(u);
        }
        self.starved.fetch_add(1, Ordering::Relaxed);
        self.demand.notify_one();
        let wait = match self.settings().cold {
            ColdPolicy::Error => return None,
            ColdPolicy::Hold(d) => d,
        };
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.is_closed() {
                return None;
            }
            if let Some(u) = self.pick() {
                return Some(u);
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return None;
            }
        }
    }

    pub(crate) fn enter(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight { route: self.clone(), upstream: None }
    }
}

/// Counts one request for its route (and its replica once chosen) until dropped: when the response body ends.
#[derive(Debug)]
pub(crate) struct InFlight {
    route: Arc<GroupRoute>,
    upstream: Option<Arc<Upstream>>,
}

impl InFlight {
    pub(crate) fn assign(&mut self, upstream: Arc<Upstream>) {
        upstream.in_flight.fetch_add(1, Ordering::Relaxed);
        self.upstream = Some(upstream);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.route.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.route.served.fetch_add(1, Ordering::Relaxed);
        if let Some(u) = &self.upstream {
            u.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(cold: ColdPolicy) -> Arc<GroupRoute> {
        GroupRoute::new("env", RouteSettings { protocol: UpstreamProtocol::Http1, authenticated: false, cold })
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    #[test]
    fn picks_the_least_busy_replica_and_keeps_counts_across_updates() {
        let r = route(ColdPolicy::Error);
        r.set_replicas(vec![("a".into(), addr(1)), ("b".into(), addr(2))]);
        let mut first = r.enter();
        let a = r.pick().unwrap();
        first.assign(a.clone());
        // The other one is idle, so it is chosen until it is as busy.
        for _ in 0..4 {
            assert_ne!(r.pick().unwrap().id, a.id);
        }
        r.set_replicas(vec![(a.id.clone(), a.addr), ("c".into(), addr(3))]);
        let kept = r.replicas().into_iter().find(|u| u.id == a.id).unwrap();
        assert_eq!(kept.in_flight(), 1, "an update keeps a staying replica's count");
        assert_eq!(r.in_flight(), 1);
        drop(first);
        assert_eq!(kept.in_flight(), 0);
        assert_eq!(r.in_flight(), 0);
        assert_eq!(r.served(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_request_gets_the_replica_that_becomes_ready() {
        let r = route(ColdPolicy::Hold(Duration::from_secs(30)));
        let waiter = {
            let r = r.clone();
            tokio::spawn(async move { r.acquire().await.map(|u| u.id.clone()) })
        };
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(r.take_starved(), 1);
        r.set_replicas(vec![("a".into(), addr(1))]);
        assert_eq!(waiter.await.unwrap().as_deref(), Some("a"));
    }

    #[tokio::test(start_paused = true)]
    async fn holding_ends_at_the_deadline_or_when_the_route_closes() {
        let r = route(ColdPolicy::Hold(Duration::from_secs(30)));
        assert!(r.acquire().await.is_none(), "nothing became ready within the hold");
        let waiter = {
            let r = r.clone();
            tokio::spawn(async move { r.acquire().await.is_none() })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        r.close();
        assert!(waiter.await.unwrap());
        assert!(route(ColdPolicy::Error).acquire().await.is_none());
    }
}
