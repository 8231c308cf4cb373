//! Forwarding one request to a replica.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::body::IngressBody;
use crate::route::{ColdPolicy, GroupRoute, InFlight, UpstreamProtocol};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ProxyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// Pooled clients to replicas, one per protocol.
pub(crate) struct Clients {
    http1: Client<HttpConnector, ProxyBody>,
    h2c: Client<HttpConnector, ProxyBody>,
}

impl Clients {
    pub(crate) fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let mut builder = Client::builder(TokioExecutor::new());
        builder.pool_timer(TokioTimer::new()).pool_idle_timeout(Duration::from_secs(60));
        let http1 = builder.build(connector.clone());
        builder.http2_only(true);
        let h2c = builder.build(connector);
        Self { http1, h2c }
    }
}

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1), and are not forwarded.
const HOP_BY_HOP: &[&str] =
    &["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "proxy-authorization"];

pub(crate) async fn forward<B>(
    clients: &Clients,
    route: &Arc<GroupRoute>,
    prefix: Option<&str>,
    rest: &str,
    mut req: Request<B>,
) -> Response<IngressBody>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    // An HTTP/1.1 upgrade (WebSocket and the like) to an HTTP/1.1 replica becomes a tunnel once the replica agrees.
    let upgrade = match upgrade_protocol(req.headers()) {
        Some(protocol) if route.settings().protocol == UpstreamProtocol::Http1 && req.version() == Version::HTTP_11 => {
            Some((protocol, hyper::upgrade::on(&mut req)))
        }
        _ => None,
    };
    let mut in_flight = route.enter();
    let Some(upstream) = route.acquire().await else {
        // The SDK retries a 503 whose body says "scaling up from zero" or "no healthy upstream".
        let msg = if route.is_closed() {
            "no healthy upstream: the scaling group was deleted\n".to_string()
        } else {
            match route.settings().cold {
                ColdPolicy::Error => "scaling up from zero: no replica is ready yet; retry shortly\n".to_string(),
                ColdPolicy::Hold(d) => format!(
                    "no healthy upstream: no replica became ready within {}s (scaling up from zero); retry shortly\n",
                    d.as_secs()
                ),
            }
        };
        return text(StatusCode::SERVICE_UNAVAILABLE, msg);
    };
    in_flight.assign(upstream.clone());

    let settings = route.settings();
    let (mut parts, body) = req.into_parts();
    let original_host = parts
        .headers
        .get(header::HOST)
        .cloned()
        .or_else(|| parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()));
    let scheme = parts.uri.scheme_str().unwrap_or("http").to_string();
    let uri: Uri = match format!("http://{}{rest}", upstream.addr).parse() {
        Ok(u) => u,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("the request path {rest:?} is not valid: {e}\n")),
    };
    parts.uri = uri;
    strip_hop_by_hop(&mut parts.headers);
    if let Some((protocol, _)) = &upgrade {
        parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, protocol.clone());
    }
    parts.version = match settings.protocol {
        UpstreamProtocol::Http1 => Version::HTTP_11,
        UpstreamProtocol::H2c => Version::HTTP_2,
    };
    if parts.version == Version::HTTP_11 {
        // HTTP/1.1 needs a Host; the replica sees the one the caller used.
        if let Some(host) = &original_host {
            parts.headers.insert(header::HOST, host.clone());
        }
    } else {
        parts.headers.remove(header::HOST);
    }
    if let Some(host) = original_host {
        parts.headers.insert(HeaderName::from_static("x-forwarded-host"), host);
    }
    if let Ok(v) = HeaderValue::from_str(&scheme) {
        parts.headers.insert(HeaderName::from_static("x-forwarded-proto"), v);
    }
    if let Some(v) = prefix.and_then(|p| HeaderValue::from_str(p).ok()) {
        parts.headers.insert(HeaderName::from_static("x-forwarded-prefix"), v);
    }
    let req = Request::from_parts(parts, ProxyBody::new(http_body_util::BodyExt::map_err(body, Into::into)));
    let client = match settings.protocol {
        UpstreamProtocol::Http1 => &clients.http1,
        UpstreamProtocol::H2c => &clients.h2c,
    };
    match client.request(req).await {
        Ok(mut resp) => {
            if let (StatusCode::SWITCHING_PROTOCOLS, Some((protocol, client))) = (resp.status(), upgrade) {
                let replica = hyper::upgrade::on(&mut resp);
                tokio::spawn(tunnel(client, replica, in_flight));
                let (mut parts, _) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                parts.headers.insert(header::UPGRADE, protocol);
                return Response::from_parts(parts, IngressBody::text(String::new()));
            }
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, IngressBody::new(body, Some(in_flight)))
        }
        Err(e) => {
            tracing::debug!(replica = %upstream.id, addr = %upstream.addr, error = %e, "proxying to a replica failed");
            let cause = std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_else(|| e.to_string());
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "upstream connect error or disconnect/reset before headers: replica {} at {}: {cause}\n",
                    upstream.id, upstream.addr
                ),
            )
        }
    }
}

/// The protocol an HTTP/1.1 request asks to upgrade to (`Connection: upgrade` with an `Upgrade` header).
fn upgrade_protocol(headers: &http::HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| headers.get(header::UPGRADE).cloned()).flatten()
}

/// Copies bytes both ways between the caller's and the replica's upgraded connections until either side closes.
/// The request counts as in flight (for balancing and autoscaling) for as long.
async fn tunnel(client: hyper::upgrade::OnUpgrade, replica: hyper::upgrade::OnUpgrade, in_flight: InFlight) {
    let (client, replica) = match tokio::try_join!(client, replica) {
        Ok(both) => both,
        Err(e) => {
            tracing::debug!(error = %e, "an upgraded connection did not come up");
            return;
        }
    };
    let (mut client, mut replica) = (TokioIo::new(client), TokioIo::new(replica));
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut replica).await {
        tracing::debug!(error = %e, "an upgraded connection ended with an error");
    }
    drop(in_flight);
}

fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
    // `te: trailers` is the one TE value HTTP/2 allows, and gRPC needs it end to end.
    if headers.get(header::TE).is_some_and(|v| v != "trailers") {
        headers.remove(header::TE);
    }
}

fn text(status: StatusCode, msg: String) -> Response<IngressBody> {
    let mut resp = Response::new(IngressBody::text(msg));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}
