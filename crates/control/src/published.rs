//! Containers with a port: each is served through the ingress the way a one-replica scaling group is, at
//! `/sg/<environment>/<name>` (or `<name>.<environment>.<domain>` with an ingress domain), from its creation
//! (requests wait while it starts) until it ends. Its one upstream is added once its port accepts connections.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use compute_ingress::{ColdPolicy, GroupRoute, Ingress, RouteSettings, UpstreamProtocol};

use crate::lock;

/// How long a request waits for a container that is still starting (or whose port is not open yet).
const HOLD: Duration = Duration::from_secs(60);

/// How a container's port is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exposure {
    /// The port its server listens on, inside the container.
    pub port: u16,
    /// How it speaks.
    pub protocol: UpstreamProtocol,
    /// Whether callers must present a token of the container's environment.
    pub authenticated: bool,
}

struct Entry {
    environment_id: String,
    environment_name: String,
    name: String,
    port: u16,
    route: Arc<GroupRoute>,
}

/// The routes of the live containers with a port, by workload id.
pub(crate) struct Published {
    ingress: Arc<Ingress>,
    routes: Mutex<HashMap<String, Entry>>,
}

impl Published {
    pub(crate) fn new(ingress: Arc<Ingress>) -> Self {
        Self { ingress, routes: Mutex::default() }
    }

    /// Serves workload `id` (a container named `name`) under its name; requests wait until [`Self::ready`].
    pub(crate) fn publish(&self, id: &str, environment_id: &str, environment_name: &str, name: &str, x: Exposure) {
        let settings =
            RouteSettings { protocol: x.protocol, authenticated: x.authenticated, cold: ColdPolicy::Hold(HOLD) };
        let route = GroupRoute::new(environment_id, settings);
        self.ingress.insert(environment_name, name, route.clone());
        let entry = Entry {
            environment_id: environment_id.into(),
            environment_name: environment_name.into(),
            name: name.into(),
            port: x.port,
            route,
        };
        lock(&self.routes).insert(id.into(), entry);
    }

    /// Whether a live container with a port is named `name` in the environment (its path is taken).
    pub(crate) fn serves(&self, environment_id: &str, name: &str) -> bool {
        lock(&self.routes).values().any(|e| e.environment_id == environment_id && e.name == name)
    }

    /// The environment name and container name a published workload is served under.
    pub(crate) fn served_as(&self, id: &str) -> Option<(String, String)> {
        lock(&self.routes).get(id).map(|e| (e.environment_name.clone(), e.name.clone()))
    }

    /// The container is running at `ip`: its port becomes the route's upstream as soon as it accepts connections
    /// (checked in the background until then, or until the container ends).
    pub(crate) fn ready(self: &Arc<Self>, id: &str, ip: Option<Ipv4Addr>) {
        let Some((route, port)) = lock(&self.routes).get(id).map(|e| (e.route.clone(), e.port)) else { return };
        let Some(ip) = ip else {
            tracing::warn!(sandbox = %id, "a container with a port has no address; its web_url cannot reach it");
            return;
        };
        let addr = SocketAddr::from((ip, port));
        let id = id.to_string();
        tokio::spawn(async move {
            let mut pause = Duration::from_millis(50);
            while !route.is_closed() {
                let attempt = tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await;
                if matches!(attempt, Ok(Ok(_))) {
                    tracing::info!(sandbox = %id, %addr, "container port open: serving it");
                    route.set_replicas(vec![(id, addr)]);
                    return;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(500));
            }
        });
    }

    /// Stops serving workload `id` (it ended); requests waiting for it are answered.
    pub(crate) fn withdraw(&self, id: &str) {
        if let Some(e) = lock(&self.routes).remove(id) {
            self.ingress.remove(&e.environment_name, &e.name, &e.route);
        }
    }
}
