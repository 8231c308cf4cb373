//! The one HTTP service behind the listener: routes each request by path and content type to the gRPC
//! handlers, the Connect translation, or the plain HTTP endpoints; authenticates; counts.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use compute_control::{AuthError, Control, Principal};
use http::{header, Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use tonic::body::Body;
use tonic::service::Routes;
use tonic::Status;
use tower::{Service, ServiceExt};

use crate::connect::{self, Codec};
use crate::http_util::{full, grpc_error, json};
use crate::methods::{MethodInfo, Methods};
use crate::metrics::{grpc_status, normalize_status, MeteredBody, Metrics};
use crate::status::from_control;
use crate::PublicBase;
use compute_control::volume::VolumeStore;

/// State shared by every connection.
pub struct Shared {
    pub control: Arc<Control>,
    pub routes: Routes,
    pub methods: Methods,
    pub metrics: Arc<Metrics>,
    pub max_message_bytes: usize,
    pub volumes: Arc<VolumeStore>,
    pub workloads: Arc<compute_control::Workloads>,
    pub public_url: Option<String>,
    pub ingress: Arc<compute_ingress::Ingress>,
    pub ingress_domain: Option<String>,
    pub scaling: Arc<compute_control::ScalingGroups>,
}

/// The front door service; cheap to clone (one per connection).
#[derive(Clone)]
pub struct FrontDoor {
    shared: Arc<Shared>,
    tls: bool,
}

impl FrontDoor {
    /// A front door over `shared` for one connection (`tls`: whether it is encrypted).
    pub fn new(shared: Arc<Shared>, tls: bool) -> Self {
        Self { shared, tls }
    }
}

impl Service<Request<Incoming>> for FrontDoor {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let shared = self.shared.clone();
        let tls = self.tls;
        Box::pin(async move { Ok(route(shared, tls, req).await) })
    }
}

/// The package of the `.remote()` call services, which the API serves whatever host the call names.
const FUNCTION_CALLS: &str = "/chalk.runtime.v1.";

async fn route(shared: Arc<Shared>, tls: bool, mut req: Request<Incoming>) -> Response<Body> {
    // Scaling groups first: the ingress is the hot path and needs nothing below. A function's `.remote()` call
    // may be addressed to its group's host name, but it goes through the API (which applies the function's
    // concurrency, rate limit and retries) rather than straight to a replica.
    let function_call = req.uri().path().starts_with(FUNCTION_CALLS);
    if let Some(domain) = shared.ingress_domain.as_ref().filter(|_| !function_call) {
        let host = req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| req.headers().get(header::HOST).and_then(|h| h.to_str().ok()));
        if let Some((environment, group)) = host.and_then(|h| compute_ingress::Ingress::split_host(h, domain)) {
            let key = format!("{environment}/{group}");
            return match shared.ingress.route(&key) {
                Some(route) => {
                    let path_and_query = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
                    serve_group(&shared, route, key, path_and_query, None, req).await
                }
                None => full(
                    StatusCode::NOT_FOUND,
                    "text/plain; charset=utf-8",
                    format!("no scaling group or container {group:?} in environment {environment:?} is served here\n"),
                ),
            };
        }
    }
    if req.uri().path().starts_with(compute_ingress::PREFIX) {
        return scaling_group(&shared, req).await;
    }
    let path = req.uri().path().to_string();
    let base = public_base(&shared, tls, &req);
    req.extensions_mut().insert(base);
    if let Some(rest) = path.strip_prefix(crate::blobs::PREFIX) {
        let rest = rest.to_string();
        return crate::blobs::serve(&shared.volumes, &rest, req, &shared.metrics).await;
    }
    if path == crate::oauth::PATH {
        return crate::oauth::serve(&shared, req).await;
    }
    if let Some(op) = path.strip_prefix("/v1/admin/") {
        let op = op.to_string();
        return crate::admin::serve(&shared, &op, req).await;
    }
    let content_type = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let is_grpc = content_type.starts_with("application/grpc");

    if req.method() == Method::GET && !is_grpc {
        match path.as_str() {
            "/healthz" => return full(StatusCode::OK, "text/plain; charset=utf-8", "ok\n"),
            "/metrics" => {
                return full(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    shared.metrics.render(),
                )
            }
            "/v1/who-am-i" => return who_am_i(&shared, &req),
            _ => {}
        }
    }

    let Some(method) = shared.methods.get(&path).cloned() else {
        let status = Status::unimplemented(format!("unknown method {path}: this Compute server does not serve it"));
        return if is_grpc {
            grpc_error(status)
        } else if path.starts_with("/chalk.") || req.method() == Method::POST {
            connect::error(&status)
        } else {
            json(
                StatusCode::NOT_FOUND,
                &serde_json::json!({"code": "not_found", "message": format!("no such endpoint: {path}")}),
            )
        };
    };

    if is_grpc {
        grpc(shared, method, req).await
    } else if let Some(codec) = Codec::from_content_type(&content_type) {
        connect_unary(shared, method, codec, req).await
    } else {
        let msg = format!(
            "unsupported content-type {content_type:?} for {path}: use gRPC (application/grpc over HTTP/2) or Connect \
             unary (POST with application/proto or application/json)"
        );
        let mut resp = connect::error(&Status::unimplemented(msg));
        *resp.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
        resp
    }
}

async fn grpc(shared: Arc<Shared>, method: MethodInfo, mut req: Request<Incoming>) -> Response<Body> {
    let mut timer = shared.metrics.start(&method.path, "grpc");
    if req.version() != Version::HTTP_2 {
        timer.set_code(tonic::Code::Internal);
        return full(
            StatusCode::HTTP_VERSION_NOT_SUPPORTED,
            "text/plain; charset=utf-8",
            format!(
                "{} is gRPC, which needs HTTP/2 (h2c with prior knowledge, or TLS with ALPN h2); over HTTP/1.1 use \
                 the Connect protocol (POST with content-type application/proto or application/json)\n",
                method.path
            ),
        );
    }
    if let Err(status) = admit(&shared, &method, &mut req) {
        timer.set_code(status.code());
        return grpc_error(status);
    }
    let mut resp = shared.routes.clone().oneshot(req).await.unwrap_or_else(|e| match e {});
    normalize_status(resp.headers_mut());
    if let Some(code) = grpc_status(resp.headers()) {
        timer.set_code(code);
    }
    resp.map(|body| Body::new(MeteredBody::new(body, timer)))
}

async fn connect_unary(
    shared: Arc<Shared>,
    method: MethodInfo,
    codec: Codec,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let mut timer = shared.metrics.start(&method.path, "connect");
    let result = async {
        connect::check_unary(&method)?;
        admit(&shared, &method, &mut req)?;
        let (parts, message) = connect::read_request(&method, codec, req, shared.max_message_bytes).await?;
        connect::call(shared.routes.clone(), &method, codec, parts, message).await
    }
    .await;
    match result {
        Ok(resp) => {
            timer.set_code(tonic::Code::Ok);
            resp
        }
        Err(status) => {
            timer.set_code(status.code());
            connect::error(&status)
        }
    }
}

/// Lets a call through to its handler: the method exists and works, and the caller is authenticated (the
/// [`Principal`] is attached to the request for the handler).
fn admit<B>(shared: &Shared, method: &MethodInfo, req: &mut Request<B>) -> Result<(), Status> {
    if !method.public {
        let principal = authenticate(shared, req)?;
        req.extensions_mut().insert(principal);
    }
    if !method.implemented {
        return Err(Status::unimplemented(format!(
            "{} is not implemented by this Compute server yet",
            method.path.trim_start_matches('/')
        )));
    }
    Ok(())
}

pub(crate) fn authenticate<B>(shared: &Shared, req: &Request<B>) -> Result<Principal, Status> {
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| crate::status::from_auth(AuthError::MissingToken))?;
    let env = req.headers().get("x-chalk-env-id").and_then(|v| v.to_str().ok());
    shared.control.auth().authenticate(bearer, env).map_err(from_control)
}

/// Where clients reach this server: the configured public URL, else this request's scheme and host.
fn public_base<B>(shared: &Shared, tls: bool, req: &Request<B>) -> PublicBase {
    if let Some(url) = &shared.public_url {
        return PublicBase(url.trim_end_matches('/').to_string());
    }
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string))
        .unwrap_or_else(|| "localhost".into());
    PublicBase(format!("{}://{host}", if tls { "https" } else { "http" }))
}

/// A request to a scaling group: authenticated when the group asks for it, then proxied by the ingress. Counted
/// per group once the group is known (unknown paths are not, so they cannot grow the metrics without bound).
async fn scaling_group(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path();
    let after = &path[compute_ingress::PREFIX.len()..];
    let Some((route, group, rest)) = shared.ingress.lookup(after) else {
        let group = after.splitn(3, '/').take(2).collect::<Vec<_>>().join("/");
        return full(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            format!(
                "nothing is served at {}{group}: check the scaling group's (or the container's) web_url\n",
                compute_ingress::PREFIX
            ),
        );
    };
    let group = group.to_string();
    let rest = if rest.is_empty() { "/" } else { rest };
    let path_and_query = match req.uri().query() {
        Some(q) => format!("{rest}?{q}"),
        None => rest.to_string(),
    };
    let prefix = format!("{}{group}", compute_ingress::PREFIX);
    serve_group(shared, route, group, path_and_query, Some(prefix), req).await
}

/// Serves one request to a group (`key`: `<environment>/<group>`) as `path_and_query` on a replica; `prefix` is the
/// path the group was reached under, if it was reached by path.
async fn serve_group(
    shared: &Shared,
    route: Arc<compute_ingress::GroupRoute>,
    key: String,
    path_and_query: String,
    prefix: Option<String>,
    req: Request<Incoming>,
) -> Response<Body> {
    let started = std::time::Instant::now();
    let resp = match refusal(shared, &route, &req) {
        Some(refused) => refused,
        None => shared.ingress.proxy(&route, prefix.as_deref(), &path_and_query, req).await.map(Body::new),
    };
    shared.metrics.record_ingress(&key, resp.status().as_u16(), started.elapsed());
    resp
}

/// The answer to a request an authenticated group refuses: one without a token of the group's environment.
fn refusal(shared: &Shared, route: &compute_ingress::GroupRoute, req: &Request<Incoming>) -> Option<Response<Body>> {
    if !route.settings().authenticated {
        return None;
    }
    match authenticate(shared, req) {
        Ok(p) if p.environment_id == route.environment_id() => None,
        Ok(_) => Some(full(
            StatusCode::FORBIDDEN,
            "text/plain; charset=utf-8",
            "this scaling group belongs to another environment than the token's\n",
        )),
        Err(status) => {
            let mut resp = full(
                StatusCode::UNAUTHORIZED,
                "text/plain; charset=utf-8",
                format!("this scaling group is authenticated: {}\n", status.message()),
            );
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer"));
            Some(resp)
        }
    }
}

fn who_am_i(shared: &Shared, req: &Request<Incoming>) -> Response<Body> {
    match authenticate(shared, req) {
        Ok(p) => json(
            StatusCode::OK,
            &serde_json::json!({
                "user": p.client_id,
                "client_id": p.client_id,
                "environment_id": p.environment_id,
                "expires_at": p.expires_at,
            }),
        ),
        Err(status) => connect::error(&status),
    }
}
