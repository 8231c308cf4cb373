//! Small helpers for building responses.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use tonic::body::Body;
use tonic::Status;

use crate::status::{connect_code, connect_http_status};

/// A response with a complete body.
pub fn full(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Body::new(Full::new(body.into())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// A JSON response.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    full(status, "application/json", serde_json::to_vec(value).expect("JSON values serialize"))
}

/// A gRPC trailers-only response carrying `status`.
pub fn grpc_error(status: Status) -> Response<Body> {
    let (parts, ()) = status.into_http::<()>().into_parts();
    Response::from_parts(parts, Body::empty())
}

/// A Connect unary error: the HTTP status for the code and the Connect JSON error body.
pub fn connect_error(status: &Status) -> Response<Body> {
    let mut body = serde_json::json!({
        "code": connect_code(status.code()),
        "message": status.message(),
    });
    let details = crate::connect::details_json(status);
    if !details.is_empty() {
        body["details"] = serde_json::Value::Array(details);
    }
    json(connect_http_status(status.code()), &body)
}
