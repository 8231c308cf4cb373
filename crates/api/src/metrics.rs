//! Prometheus metrics of the front door: requests and latency per method, in-flight requests, errors by code.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tonic::Code;

use crate::status::code_label;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodCode {
    method: String,
    protocol: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabel {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupCode {
    group: String,
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabel {
    group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Why the server closed a connection itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionEnd {
    /// It arrived with `max_connections` already open.
    OverLimit,
    /// It did not send a whole request (or TLS handshake) within the header timeout.
    SlowRequest,
}

impl ConnectionEnd {
    fn label(self) -> &'static str {
        match self {
            ConnectionEnd::OverLimit => "over_limit",
            ConnectionEnd::SlowRequest => "slow_request",
        }
    }
}

/// Counts a connection as open until dropped.
pub struct OpenConnection(Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The metric families, shared by every connection.
pub struct Metrics {
    registry: Registry,
    connections_open: Gauge,
    connections_closed: Family<ReasonLabel, Counter>,
    requests: Family<MethodCode, Counter>,
    latency: Family<MethodLabel, Histogram>,
    in_flight: Gauge,
    ingress_requests: Family<GroupCode, Counter>,
    ingress_latency: Family<GroupLabel, Histogram>,
}

impl Metrics {
    /// Registers the families.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("compute_api");
        let requests = Family::<MethodCode, Counter>::default();
        let latency = Family::<MethodLabel, Histogram>::new_with_constructor(|| {
            // 50 µs .. ~100 s
            Histogram::new(exponential_buckets(0.00005, 2.0, 21))
        });
        let in_flight = Gauge::default();
        let connections_open = Gauge::default();
        let connections_closed = Family::<ReasonLabel, Counter>::default();
        registry.register("connections_open", "Client connections open now", connections_open.clone());
        registry.register(
            "connections_closed_by_server",
            "Connections the server closed itself, by reason: over_limit (max_connections open already) or \
             slow_request (no whole request within request_header_timeout)",
            connections_closed.clone(),
        );
        registry.register(
            "requests",
            "RPCs handled, by method, protocol (grpc, connect) and status code; non-OK codes are the errors",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request to the end of the response (streams: the whole stream), by method",
            latency.clone(),
        );
        registry.register("in_flight_requests", "RPCs currently being handled", in_flight.clone());
        let ingress_requests = Family::<GroupCode, Counter>::default();
        let ingress_latency = Family::<GroupLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.00005, 2.0, 21))
        });
        registry.register(
            "ingress_requests",
            "Requests to scaling groups through the ingress, by group (environment/name) and HTTP status",
            ingress_requests.clone(),
        );
        registry.register(
            "ingress_response_seconds",
            "Time from a request to a scaling group until its response headers, by group",
            ingress_latency.clone(),
        );
        Arc::new(Self {
            registry,
            connections_open,
            connections_closed,
            requests,
            latency,
            in_flight,
            ingress_requests,
            ingress_latency,
        })
    }

    /// Counts a connection open until the guard is dropped.
    pub fn connection_opened(&self) -> OpenConnection {
        self.connections_open.inc();
        OpenConnection(self.connections_open.clone())
    }

    /// Counts a connection the server closed itself.
    pub fn connection_closed(&self, why: ConnectionEnd) {
        self.connections_closed.get_or_create(&ReasonLabel { reason: why.label() }).inc();
    }

    /// Records one request to a scaling group.
    pub fn record_ingress(&self, group: &str, status: u16, elapsed: std::time::Duration) {
        self.ingress_requests.get_or_create(&GroupCode { group: group.to_string(), code: status }).inc();
        self.ingress_latency.get_or_create(&GroupLabel { group: group.to_string() }).observe(elapsed.as_secs_f64());
    }

    /// Starts timing one request; the returned guard records it when finished or dropped.
    pub fn start(self: &Arc<Self>, method: &str, protocol: &'static str) -> RequestTimer {
        self.in_flight.inc();
        RequestTimer { metrics: self.clone(), method: method.to_string(), protocol, start: Instant::now(), code: None }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// One request being timed. Records on drop, with the code set by [`RequestTimer::set_code`] (or `UNKNOWN` if
/// the response never said, e.g. the client went away mid-stream: then `CANCELLED`).
pub struct RequestTimer {
    metrics: Arc<Metrics>,
    method: String,
    protocol: &'static str,
    start: Instant,
    code: Option<Code>,
}

impl RequestTimer {
    /// Sets the status the request ended with.
    pub fn set_code(&mut self, code: Code) {
        self.code = Some(code);
    }

    /// Whether the code is already known.
    pub fn has_code(&self) -> bool {
        self.code.is_some()
    }
}

impl Drop for RequestTimer {
    fn drop(&mut self) {
        let m = &self.metrics;
        m.in_flight.dec();
        let code = code_label(self.code.unwrap_or(Code::Cancelled));
        m.requests.get_or_create(&MethodCode { method: self.method.clone(), protocol: self.protocol, code }).inc();
        m.latency
            .get_or_create(&MethodLabel { method: self.method.clone() })
            .observe(self.start.elapsed().as_secs_f64());
    }
}

/// A gRPC response body that reports the call's end (its `grpc-status` trailer) to a [`RequestTimer`].
pub struct MeteredBody {
    inner: tonic::body::Body,
    timer: Option<RequestTimer>,
}

impl MeteredBody {
    /// Wraps `inner`; if the status is already known (a trailers-only response), `timer` carries it.
    pub fn new(inner: tonic::body::Body, timer: RequestTimer) -> Self {
        Self { inner, timer: Some(timer) }
    }
}

impl HttpBody for MeteredBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if frame.is_trailers() {
                    let mut frame = match polled {
                        Poll::Ready(Some(Ok(frame))) => frame,
                        _ => unreachable!("matched above"),
                    };
                    let trailers = frame.trailers_mut().expect("checked is_trailers");
                    normalize_status(trailers);
                    if let (Some(t), Some(code)) = (self.timer.as_mut(), grpc_status(trailers)) {
                        t.set_code(code);
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
            }
            Poll::Ready(Some(Err(status))) => {
                let code = status.code();
                if let Some(t) = self.timer.as_mut() {
                    t.set_code(code);
                }
            }
            Poll::Ready(None) => {
                if let Some(mut t) = self.timer.take() {
                    if !t.has_code() {
                        t.set_code(Code::Ok);
                    }
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// tonic reports a request message over the size limit as OUT_OF_RANGE; the gRPC spec (and our Connect path)
/// says RESOURCE_EXHAUSTED, which is also what clients retry or report sensibly. Rewrites that one case.
pub fn normalize_status(headers: &mut http::HeaderMap) {
    let too_large = headers.get("grpc-status").is_some_and(|v| v == "11")
        && headers
            .get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|m| m.contains("message%20length%20too%20large") || m.contains("message length too large"));
    if too_large {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
    }
}

/// The `grpc-status` in a header map, if present and well-formed.
pub fn grpc_status(headers: &http::HeaderMap) -> Option<Code> {
    let v = headers.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
    Some(Code::from_i32(v))
}
