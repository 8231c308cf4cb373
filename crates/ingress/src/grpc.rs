//! Calling a gRPC method on one of a route's replicas, whole messages in and out: what the function call path
//! uses, so that the control plane can retry a call, bound it and count it without knowing the method's types.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};

use crate::{GroupRoute, Ingress};

/// How a gRPC call through the ingress ended, when a replica answered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrpcReply {
    /// `grpc-status: 0`, with the response messages (encoded, unframed).
    Ok(Vec<Bytes>),
    /// The replica answered with an error status.
    Status(GrpcStatus),
}

/// A gRPC status a replica sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcStatus {
    /// The code (`tonic::Code` as a number).
    pub code: i32,
    /// `grpc-message`, percent-decoded.
    pub message: String,
    /// `grpc-status-details-bin`, decoded from base64, when sent.
    pub details: Option<Bytes>,
}

/// Why no replica answered a call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrpcCallError {
    /// No replica was ready, or the one chosen could not be reached or went away before answering.
    #[error("{0}")]
    Unavailable(String),
    /// The replica's answer was not gRPC (or was bigger than allowed).
    #[error("the replica's answer is not a valid gRPC response: {0}")]
    Protocol(String),
}

/// Request headers worth passing to a replica: the caller's tracing and call metadata, not its credentials.
fn forwarded(name: &HeaderName) -> bool {
    let n = name.as_str();
    n != "authorization"
        && n != "x-chalk-env-id"
        && !n.starts_with("grpc-")
        && !n.starts_with(':')
        && (n.starts_with("x-") || n == "traceparent" || n == "tracestate" || n == "baggage")
}

/// Frames messages as gRPC does (no compression): a flag byte, a 4-byte big-endian length, the message.
pub fn frame(messages: &[Bytes]) -> Bytes {
    let mut out = BytesMut::with_capacity(messages.iter().map(|m| m.len() + 5).sum());
    for m in messages {
        out.put_u8(0);
        out.put_u32(m.len() as u32);
        out.put_slice(m);
    }
    out.freeze()
}

/// Splits a gRPC body into its messages.
pub fn unframe(mut body: Bytes) -> Result<Vec<Bytes>, String> {
    let mut out = Vec::new();
    while body.has_remaining() {
        if body.len() < 5 {
            return Err(format!("a message frame is cut short ({} bytes of a 5-byte header)", body.len()));
        }
        let compressed = body.get_u8();
        let len = body.get_u32() as usize;
        if compressed != 0 {
            return Err("a message is compressed, though no compression was offered".into());
        }
        if body.len() < len {
            return Err(format!("a message of {len} bytes is cut short at {}", body.len()));
        }
        out.push(body.split_to(len));
    }
    Ok(out)
}

fn status_of(headers: &HeaderMap) -> Option<GrpcStatus> {
    let code = headers.get("grpc-status")?.to_str().ok()?.trim().parse::<i32>().ok()?;
    let message = headers
        .get("grpc-message")
        .map(|m| percent_encoding::percent_decode(m.as_bytes()).decode_utf8_lossy().into_owned())
        .unwrap_or_default();
    let details = headers.get("grpc-status-details-bin").and_then(|v| decode_base64(v.as_bytes())).map(Bytes::from);
    Some(GrpcStatus { code, message, details })
}

/// Standard base64 with or without padding (gRPC sends `-bin` headers unpadded).
fn decode_base64(s: &[u8]) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s: Vec<u8> = s.iter().copied().filter(|&c| c != b'=').collect();
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= val(c)? << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len().max(1)]);
    }
    Some(out)
}

impl Ingress {
    /// Calls `path` (`/package.Service/Method`) on one of the route's replicas with `messages`, waiting for a
    /// ready replica as the route's settings allow, and returns the whole answer (at most `max_response` bytes).
    /// The call counts as in flight for the route (the autoscaler's signal) until it ends.
    pub async fn call_grpc(
        &self,
        route: &std::sync::Arc<GroupRoute>,
        path: &str,
        messages: &[Bytes],
        metadata: &HeaderMap,
        timeout: Option<Duration>,
        max_response: usize,
    ) -> Result<GrpcReply, GrpcCallError> {
        let mut req = Request::builder().method(Method::POST).uri(path);
        let headers = req.headers_mut().expect("a fresh builder has headers");
        for (name, value) in metadata {
            if forwarded(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert(HeaderName::from_static("te"), HeaderValue::from_static("trailers"));
        if let Some(t) = timeout {
            // grpc-timeout: at most 8 digits and a unit.
            let ms = t.as_millis().clamp(1, 99_999_999);
            if let Ok(v) = HeaderValue::from_str(&format!("{ms}m")) {
                headers.insert(HeaderName::from_static("grpc-timeout"), v);
            }
        }
        let req = req.body(Full::new(frame(messages))).map_err(|e| GrpcCallError::Protocol(e.to_string()))?;
        let resp = self.proxy(route, None, path, req).await;
        let (parts, body) = resp.into_parts();
        if parts.status == StatusCode::SERVICE_UNAVAILABLE || parts.status == StatusCode::BAD_GATEWAY {
            let text = Limited::new(body, 64 * 1024).collect().await.map(|c| c.to_bytes()).unwrap_or_default();
            return Err(GrpcCallError::Unavailable(String::from_utf8_lossy(&text).trim().to_string()));
        }
        if parts.status != StatusCode::OK {
            return Err(GrpcCallError::Protocol(format!("HTTP status {}", parts.status)));
        }
        if let Some(status) = status_of(&parts.headers) {
            // Trailers-only: the status came with the headers.
            if status.code != 0 {
                return Ok(GrpcReply::Status(status));
            }
        }
        let collected = match Limited::new(body, max_response).collect().await {
            Ok(c) => c,
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(GrpcCallError::Protocol(format!("the answer is larger than {max_response} bytes")))
            }
            // The stream broke mid-answer: the replica went away.
            Err(e) => return Err(GrpcCallError::Unavailable(format!("the replica's answer broke off: {e}"))),
        };
        let trailers = collected.trailers().cloned().unwrap_or_default();
        let status = status_of(&trailers).or_else(|| status_of(&parts.headers));
        let messages = unframe(collected.to_bytes()).map_err(GrpcCallError::Protocol)?;
        match status {
            Some(s) if s.code == 0 => Ok(GrpcReply::Ok(messages)),
            Some(s) => Ok(GrpcReply::Status(s)),
            None => Err(GrpcCallError::Unavailable("the replica's answer ended without a grpc-status".into())),
        }
    }
}

/// Asks `addr` over HTTP/2 (prior knowledge) for `grpc.health.v1.Health/Check` of `service` ("" is the server as a
/// whole). Ready when it answers SERVING, or when it answers gRPC's UNIMPLEMENTED: the port speaks gRPC but keeps
/// no health service (the SDK's function runtime is such a server), which is what a gRPC startup probe asks.
pub async fn grpc_health(addr: std::net::SocketAddr, service: &str) -> Result<(), String> {
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connecting to {addr}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .map_err(|e| format!("HTTP/2 handshake with {addr}: {e}"))?;
    let driver = tokio::spawn(conn);
    let result = async {
        // HealthCheckRequest { service = 1 }.
        let mut msg = BytesMut::new();
        if !service.is_empty() {
            msg.put_u8(0x0a);
            put_varint(&mut msg, service.len() as u64);
            msg.put_slice(service.as_bytes());
        }
        let req = Request::builder()
            .method(Method::POST)
            .uri(format!("http://{addr}/grpc.health.v1.Health/Check"))
            .header(CONTENT_TYPE, "application/grpc")
            .header("te", "trailers")
            .body(Full::new(frame(&[msg.freeze()])))
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| format!("gRPC health check of {addr}: {e}"))?;
        let (parts, body) = resp.into_parts();
        if parts.status != StatusCode::OK {
            return Err(format!("gRPC health check of {addr} answered HTTP {}", parts.status));
        }
        let collected =
            Limited::new(body, 64 * 1024).collect().await.map_err(|e| format!("reading the health answer: {e}"))?;
        let trailers = collected.trailers().cloned().unwrap_or_default();
        let status = status_of(&trailers).or_else(|| status_of(&parts.headers));
        match status {
            Some(s) if s.code == 12 => Ok(()),
            Some(s) if s.code != 0 => Err(format!("gRPC health check answered code {}: {}", s.code, s.message)),
            None => Err("the health answer ended without a grpc-status".into()),
            Some(_) => {
                let messages = unframe(collected.to_bytes())?;
                // HealthCheckResponse { status = 1 }: SERVING is 1.
                match messages.first().map(|m| m.as_ref()) {
                    Some([0x08, 0x01]) => Ok(()),
                    Some(other) => Err(format!("gRPC health check: not serving (answer {other:02x?})")),
                    None => Err("gRPC health check: an empty answer".into()),
                }
            }
        }
    }
    .await;
    driver.abort();
    result
}

fn put_varint(out: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        out.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    out.put_u8(v as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_short_frames_are_refused() {
        let msgs = vec![Bytes::from_static(b"abc"), Bytes::new(), Bytes::from(vec![7u8; 300])];
        assert_eq!(unframe(frame(&msgs)).unwrap(), msgs);
        let mut cut = frame(&msgs).to_vec();
        cut.truncate(cut.len() - 1);
        assert!(unframe(Bytes::from(cut)).unwrap_err().contains("cut short"));
        assert!(unframe(Bytes::from_static(&[1, 0, 0, 0, 0])).unwrap_err().contains("compressed"));
    }

    #[test]
    fn a_status_is_read_with_its_message_and_details() {
        let mut h = HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_static("2"));
        h.insert("grpc-message", HeaderValue::from_static("boom%20was%20asked%20for"));
        h.insert("grpc-status-details-bin", HeaderValue::from_static("aGVsbG8"));
        let s = status_of(&h).unwrap();
        assert_eq!((s.code, s.message.as_str()), (2, "boom was asked for"));
        assert_eq!(s.details.as_deref(), Some(&b"hello"[..]));
        assert_eq!(decode_base64(b"aGVsbG8=").unwrap(), b"hello");
        assert!(status_of(&HeaderMap::new()).is_none());
    }

    #[test]
    fn credentials_are_not_forwarded_to_replicas() {
        for (name, fwd) in [
            ("authorization", false),
            ("x-chalk-env-id", false),
            ("grpc-timeout", false),
            ("traceparent", true),
            ("x-chalk-request-timestamp", true),
            ("cookie", false),
        ] {
            assert_eq!(forwarded(&HeaderName::from_static(name)), fwd, "{name}");
        }
    }

    /// An HTTP/2 server answering every request with `message` and `grpc-status: code` in the trailers.
    async fn health_server(message: &'static [u8], code: &'static str) -> std::net::SocketAddr {
        use http_body_util::StreamBody;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let svc = hyper::service::service_fn(move |_req| async move {
                    let mut trailers = HeaderMap::new();
                    trailers.insert("grpc-status", HeaderValue::from_static(code));
                    let frames: Vec<Result<http_body::Frame<Bytes>, std::convert::Infallible>> = vec![
                        Ok(http_body::Frame::data(frame(&[Bytes::from_static(message)]))),
                        Ok(http_body::Frame::trailers(trailers)),
                    ];
                    let body = StreamBody::new(futures_util::stream::iter(frames));
                    Ok::<_, std::convert::Infallible>(
                        http::Response::builder().header(CONTENT_TYPE, "application/grpc").body(body).unwrap(),
                    )
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc),
                );
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_grpc_health_check_passes_when_serving_or_without_a_health_service() {
        grpc_health(health_server(&[0x08, 0x01], "0").await, "").await.unwrap();
        grpc_health(health_server(b"", "12").await, "").await.unwrap();
        let err = grpc_health(health_server(&[0x08, 0x02], "0").await, "svc").await.unwrap_err();
        assert!(err.contains("not serving"), "{err}");
        let err = grpc_health(health_server(b"", "14").await, "").await.unwrap_err();
        assert!(err.contains("code 14"), "{err}");
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        assert!(grpc_health(closed, "").await.unwrap_err().starts_with("connecting to"));
    }
}
