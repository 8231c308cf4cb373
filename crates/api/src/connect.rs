//! The Connect protocol's unary calls (HTTP/1.1 or HTTP/2, `application/proto` or `application/json`), served by
//! translating each call into a gRPC call to the same handler and the answer back. One implementation per
//! method, two protocols.

use base64::engine::general_purpose::STANDARD_NO_PAD;
use base64::Engine;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full, Limited};
use prost::Message;
use prost_reflect::DynamicMessage;
use serde::Serialize;
use tonic::body::Body;
use tonic::service::Routes;
use tonic::{Code, Status};
use tower::ServiceExt;

use crate::http_util::{connect_error, full};
use crate::methods::MethodInfo;
use crate::metrics::grpc_status;

/// Which Connect codec a request uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// `application/proto`
    Proto,
    /// `application/json`
    Json,
}

impl Codec {
    /// The codec named by a unary Connect content type, if any.
    pub fn from_content_type(ct: &str) -> Option<Self> {
        let base = ct.split(';').next().unwrap_or("").trim();
        match base {
            "application/proto" => Some(Codec::Proto),
            "application/json" => Some(Codec::Json),
            _ => None,
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Codec::Proto => "application/proto",
            Codec::Json => "application/json",
        }
    }
}

/// Connect unary carries only unary methods.
pub fn check_unary(method: &MethodInfo) -> Result<(), Status> {
    if method.is_unary() {
        Ok(())
    } else {
        Err(Status::unimplemented(format!(
            "{} is a streaming method: call it over gRPC (HTTP/2), not Connect unary",
            method.path
        )))
    }
}

/// Reads, decodes and checks a Connect unary request's body: the message in protobuf binary.
pub async fn read_request(
    method: &MethodInfo,
    codec: Codec,
    req: Request<hyper::body::Incoming>,
    max_message_bytes: usize,
) -> Result<(http::request::Parts, Bytes), Status> {
    if req.method() != Method::POST {
        return Err(Status::unimplemented("Connect unary calls must be POST"));
    }
    let (parts, body) = req.into_parts();
    let raw = Limited::new(body, max_message_bytes)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                Status::resource_exhausted(format!(
                    "request message larger than the limit of {max_message_bytes} bytes"
                ))
            } else {
                Status::invalid_argument(format!("reading the request body: {e}"))
            }
        })?
        .to_bytes();
    let raw = match parts.headers.get(header::CONTENT_ENCODING).map(|v| v.to_str().unwrap_or("")) {
        None | Some("identity") | Some("") => raw,
        Some("gzip") => gunzip(&raw, max_message_bytes)?,
        Some(other) => {
            return Err(Status::unimplemented(format!(
                "content-encoding {other:?} is not supported: use gzip or identity"
            )))
        }
    };
    let message = match codec {
        // Checked here, so that bytes that are not the method's message are the caller's error (tonic would
        // answer `internal` for a message its handler cannot decode).
        Codec::Proto => {
            DynamicMessage::decode(method.input.clone(), raw.clone()).map_err(|e| {
                Status::invalid_argument(format!(
                    "request is not a valid {} in protobuf: {e}",
                    method.input.full_name()
                ))
            })?;
            raw
        }
        Codec::Json => {
            let mut de = serde_json::Deserializer::from_slice(if raw.is_empty() { b"{}" } else { &raw });
            let msg = DynamicMessage::deserialize(method.input.clone(), &mut de)
                .and_then(|m| de.end().map(|()| m))
                .map_err(|e| {
                    Status::invalid_argument(format!(
                        "request is not a valid {} in JSON: {e}",
                        method.input.full_name()
                    ))
                })?;
            Bytes::from(msg.encode_to_vec())
        }
    };
    Ok((parts, message))
}

/// Calls the gRPC handler for `path` with `message` and answers in Connect's unary form.
pub async fn call(
    routes: Routes,
    method: &MethodInfo,
    codec: Codec,
    parts: http::request::Parts,
    message: Bytes,
) -> Result<Response<Body>, Status> {
    let mut framed = BytesMut::with_capacity(5 + message.len());
    framed.put_u8(0);
    framed.put_u32(message.len() as u32);
    framed.put_slice(&message);

    let mut grpc_req = Request::builder()
        .method(Method::POST)
        .uri(parts.uri.clone())
        .version(Version::HTTP_2)
        .body(Body::new(Full::new(framed.freeze())))
        .map_err(|e| Status::internal(format!("building the inner request: {e}")))?;
    let headers = grpc_req.headers_mut();
    for (name, value) in parts.headers.iter() {
        // Carry the caller's metadata (authorization, x-chalk-*, traceparent, ...) but not the HTTP framing.
        if !is_hop_or_framing(name.as_str()) {
            headers.append(name.clone(), value.clone());
        }
    }
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert("te", HeaderValue::from_static("trailers"));
    if let Some(ms) = parts.headers.get("connect-timeout-ms").and_then(|v| v.to_str().ok()) {
        if let Ok(ms) = ms.parse::<u64>() {
            headers.insert("grpc-timeout", HeaderValue::from_str(&format!("{}m", ms.min(99_999_999))).expect("digits"));
        }
    }
    *grpc_req.extensions_mut() = parts.extensions;

    let resp = routes.oneshot(grpc_req).await.unwrap_or_else(|e| match e {});
    let (head, body) = resp.into_parts();
    let collected = body.collect().await.map_err(|s| Status::internal(format!("handler failed: {s}")))?;
    let trailers = collected.trailers().cloned();
    let code = grpc_status(&head.headers).or_else(|| trailers.as_ref().and_then(grpc_status)).unwrap_or(Code::Unknown);
    if code != Code::Ok {
        let source = trailers.as_ref().filter(|t| t.contains_key("grpc-status")).unwrap_or(&head.headers);
        return Err(Status::from_header_map(source).unwrap_or_else(|| Status::new(code, "")));
    }
    let mut data = collected.to_bytes();
    if data.len() < 5 || data[0] != 0 {
        return Err(Status::internal("handler returned a malformed or compressed gRPC frame"));
    }
    data.advance(5);
    let body = match codec {
        Codec::Proto => data,
        Codec::Json => {
            let msg = DynamicMessage::decode(method.output.clone(), data)
                .map_err(|e| Status::internal(format!("re-decoding the response: {e}")))?;
            let mut out = Vec::new();
            let mut ser = serde_json::Serializer::new(&mut out);
            msg.serialize(&mut ser).map_err(|e| Status::internal(format!("encoding JSON: {e}")))?;
            Bytes::from(out)
        }
    };
    Ok(full(StatusCode::OK, codec.content_type(), body))
}

/// A Connect error response for `status`.
pub fn error(status: &Status) -> Response<Body> {
    connect_error(status)
}

fn is_hop_or_framing(name: &str) -> bool {
    matches!(
        name,
        "content-type"
            | "content-length"
            | "content-encoding"
            | "accept-encoding"
            | "connection"
            | "keep-alive"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "te"
            | "connect-protocol-version"
            | "connect-timeout-ms"
    )
}

fn gunzip(data: &[u8], limit: usize) -> Result<Bytes, Status> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| Status::invalid_argument(format!("request body is not valid gzip: {e}")))?;
    if out.len() > limit {
        return Err(Status::resource_exhausted(format!("decompressed request larger than the limit of {limit} bytes")));
    }
    Ok(out.into())
}

/// `google.rpc.Status`, as carried in `grpc-status-details-bin`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpcStatus {
    /// The code.
    #[prost(int32, tag = "1")]
    pub code: i32,
    /// The message.
    #[prost(string, tag = "2")]
    pub message: String,
    /// Typed details.
    #[prost(message, repeated, tag = "3")]
    pub details: Vec<prost_types::Any>,
}

/// The status's details in Connect's JSON form: `[{"type": "pkg.Msg", "value": "<base64>"}]`.
pub fn details_json(status: &Status) -> Vec<serde_json::Value> {
    let Ok(rpc) = RpcStatus::decode(status.details()) else {
        return Vec::new();
    };
    rpc.details
        .into_iter()
        .map(|any| {
            let ty = any.type_url.rsplit('/').next().unwrap_or("").to_string();
            serde_json::json!({ "type": ty, "value": STANDARD_NO_PAD.encode(&any.value) })
        })
        .collect()
}
