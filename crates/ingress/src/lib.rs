//! Compute's ingress: the HTTP router in front of scaling groups.
//!
//! A group is reached at `/sg/<environment>/<group>/…` on the API listener, over HTTP/1.1 or HTTP/2 (the SDK's
//! `ScalingGroup.call` speaks only HTTP/2). Each request goes to the ready replica with the fewest requests in
//! flight; while none is ready it is held (scaling up from zero) or answered 503, as the group's spec says. The
//! per-group in-flight count is the autoscaler's concurrency signal. Which replicas are ready is decided by the
//! control plane, which keeps each group's [`GroupRoute`] up to date.

#![warn(missing_docs)]

mod body;
mod grpc;
mod proxy;
mod route;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

pub use body::IngressBody;
pub use grpc::{frame, grpc_health, unframe, GrpcCallError, GrpcReply, GrpcStatus};
pub use route::{ColdPolicy, GroupRoute, RouteSettings, Upstream, UpstreamProtocol};

/// The path prefix groups are served under.
pub const PREFIX: &str = "/sg/";

/// The routes of every live scaling group, and the HTTP clients that reach their replicas.
pub struct Ingress {
    routes: RwLock<HashMap<String, Arc<GroupRoute>>>,
    clients: proxy::Clients,
}

impl Default for Ingress {
    fn default() -> Self {
        Self::new()
    }
}

impl Ingress {
    /// An ingress with no routes.
    pub fn new() -> Self {
        Self { routes: RwLock::default(), clients: proxy::Clients::new() }
    }

    /// The path under which a group is served (`/sg/<environment>/<group>`), without a trailing slash.
    pub fn path_of(environment: &str, group: &str) -> String {
        format!("{PREFIX}{environment}/{group}")
    }

    /// Serves a group at `/sg/<environment>/<group>`, replacing any route there.
    pub fn insert(&self, environment: &str, group: &str, route: Arc<GroupRoute>) {
        self.routes.write().unwrap_or_else(|p| p.into_inner()).insert(format!("{environment}/{group}"), route);
    }

    /// Stops serving a group (only if `route` is still the one there) and closes its route.
    pub fn remove(&self, environment: &str, group: &str, route: &Arc<GroupRoute>) {
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        let key = format!("{environment}/{group}");
        if routes.get(&key).is_some_and(|r| Arc::ptr_eq(r, route)) {
            routes.remove(&key);
        }
        route.close();
    }

    /// The route of a group, by its key `<environment>/<group>`.
    pub fn route(&self, key: &str) -> Option<Arc<GroupRoute>> {
        self.routes.read().unwrap_or_else(|p| p.into_inner()).get(key).cloned()
    }

    /// The route a path under [`PREFIX`] names (`<environment>/<group>/<rest>`), with its key
    /// (`<environment>/<group>`) and the path to send to the replica (`/<rest>`, empty for `/`). `None` when no
    /// group is served there.
    pub fn lookup<'p>(&self, path_after_prefix: &'p str) -> Option<(Arc<GroupRoute>, &'p str, &'p str)> {
        let first = path_after_prefix.find('/')?;
        let (key, rest) = match path_after_prefix[first + 1..].find('/') {
            Some(second) => path_after_prefix.split_at(first + 1 + second),
            None => (path_after_prefix, ""),
        };
        Some((self.route(key)?, key, rest))
    }

    /// The (environment, group) a request's host names under `domain`: `<group>.<environment>.<domain>`, or
    /// `<group>.<domain>` for the default environment. The host may carry a port. `None` for any other host.
    pub fn split_host<'h>(host: &'h str, domain: &str) -> Option<(&'h str, &'h str)> {
        let host = match host.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        };
        let host = host.trim_end_matches('.');
        let labels = host.strip_suffix(domain)?.strip_suffix('.')?;
        match labels.split_once('.') {
            None if !labels.is_empty() => Some(("default", labels)),
            Some((group, environment))
                if !group.is_empty() && !environment.is_empty() && !environment.contains('.') =>
            {
                Some((environment, group))
            }
            _ => None,
        }
    }

    /// Proxies `req` to one of the route's replicas, as `rest` (path and query) on the replica. `prefix` is the
    /// path the group was reached under, if it was reached by path (sent as `x-forwarded-prefix`).
    pub async fn proxy<B>(
        &self,
        route: &Arc<GroupRoute>,
        prefix: Option<&str>,
        rest: &str,
        req: http::Request<B>,
    ) -> http::Response<IngressBody>
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        proxy::forward(&self.clients, route, prefix, rest, req).await
    }
}

#[cfg(test)]
mod tests {
    use super::Ingress;

    #[test]
    fn hosts_name_a_group_and_its_environment_under_the_domain() {
        let d = "apps.example.com";
        assert_eq!(Ingress::split_host("api.staging.apps.example.com", d), Some(("staging", "api")));
        assert_eq!(Ingress::split_host("api.staging.apps.example.com:8420", d), Some(("staging", "api")));
        assert_eq!(Ingress::split_host("api.apps.example.com", d), Some(("default", "api")));
        assert_eq!(Ingress::split_host("api.apps.example.com.", d), Some(("default", "api")));
        for other in [
            "apps.example.com",
            "x.y.z.apps.example.com",
            "api.otherapps.example.com",
            "example.com",
            ".apps.example.com",
            "127.0.0.1:8420",
        ] {
            assert_eq!(Ingress::split_host(other, d), None, "{other}");
        }
    }
}
