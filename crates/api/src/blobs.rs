//! The blob endpoint behind volume signed URLs: `PUT /v2/blobs/<env>/<xx>/<hash>?op=put&exp=…&sig=…` stores an
//! object once its bytes hash to its key; `GET …?op=get…` serves it, honouring a single `Range`. The signature is
//! the credential (the SDK's native client sends no token here).

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use compute_control::volume::{VolumeError, VolumeStore};
use futures_util::TryStreamExt;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use tonic::body::Body;
use tonic::{Code, Status};

use crate::http_util::connect_error;
use crate::metrics::Metrics;
use crate::status::from_volume;

/// Path prefix of the endpoint.
pub const PREFIX: &str = "/v2/blobs/";

/// Largest object accepted (a 64 MiB pack plus its header, with room to spare).
const MAX_OBJECT_BYTES: usize = 256 * 1024 * 1024;

/// Serves one blob request; `rest` is the path after [`PREFIX`].
pub async fn serve(
    volumes: &Arc<VolumeStore>,
    rest: &str,
    req: Request<Incoming>,
    metrics: &Arc<Metrics>,
) -> Response<Body> {
    let op = if req.method() == Method::PUT { "blob PUT" } else { "blob GET" };
    let mut timer = metrics.start(op, "http");
    let result = handle(volumes, rest, req).await;
    match result {
        Ok(resp) => {
            timer.set_code(Code::Ok);
            resp
        }
        Err(status) => {
            timer.set_code(status.code());
            connect_error(&status)
        }
    }
}

async fn handle(volumes: &Arc<VolumeStore>, rest: &str, req: Request<Incoming>) -> Result<Response<Body>, Status> {
    let Some((env, key)) = rest.split_once('/') else {
        return Err(Status::not_found(format!("no such blob: {PREFIX}{rest}")));
    };
    let query = req.uri().query().unwrap_or("").to_string();
    match *req.method() {
        Method::PUT => {
            let body = Limited::new(req.into_body(), MAX_OBJECT_BYTES).collect().await.map_err(|e| {
                if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                    Status::resource_exhausted(format!("objects are limited to {MAX_OBJECT_BYTES} bytes"))
                } else {
                    Status::cancelled(format!("reading the upload: {e}"))
                }
            })?;
            volumes.put_blob(env, key, &query, body.to_bytes()).await.map_err(from_volume)?;
            Ok(empty(StatusCode::OK))
        }
        Method::GET => {
            let range = match req.headers().get(header::RANGE) {
                Some(v) => Some(parse_range(v.to_str().unwrap_or(""))?),
                None => None,
            };
            let read = volumes.get_blob(env, key, &query, range.clone()).await.map_err(|e| match e {
                VolumeError::Storage(m) if range.is_some() => {
                    Status::out_of_range(format!("range not satisfiable: {m}"))
                }
                other => from_volume(other),
            })?;
            let len = read.range.end - read.range.start;
            let (start, end, total) = (read.range.start, read.range.end, read.total);
            let stream = read.body.map_ok(Frame::data).map_err(|e| Status::internal(e.to_string()));
            let mut resp = Response::new(Body::new(StreamBody::new(stream)));
            let h = resp.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
            if range.is_some() {
                let cr = format!("bytes {start}-{}/{total}", end.saturating_sub(1));
                h.insert(header::CONTENT_RANGE, HeaderValue::from_str(&cr).expect("digits and ascii"));
                *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
            }
            Ok(resp)
        }
        _ => Err(Status::unimplemented(
            "blobs accept PUT (with a signed upload URL) and GET (with a signed download URL)",
        )),
    }
}

/// Parses `bytes=a-b` (inclusive) or `bytes=a-`; multiple ranges and suffix ranges are refused.
fn parse_range(v: &str) -> Result<Range<u64>, Status> {
    let bad = || Status::invalid_argument(format!("Range {v:?} is not supported: send one range, bytes=START-END"));
    let spec = v.trim().strip_prefix("bytes=").ok_or_else(bad)?;
    let (a, b) = spec.split_once('-').ok_or_else(bad)?;
    let start: u64 = a.trim().parse().map_err(|_| bad())?;
    if b.trim().is_empty() {
        return Ok(start..u64::MAX);
    }
    let end: u64 = b.trim().parse().map_err(|_| bad())?;
    if end < start {
        return Err(bad());
    }
    Ok(start..end + 1)
}

fn empty(status: StatusCode) -> Response<Body> {
    let mut r = Response::new(Body::new(http_body_util::Full::new(Bytes::new())));
    *r.status_mut() = status;
    r
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9").unwrap(), 0..10);
        assert_eq!(parse_range("bytes=90-95").unwrap(), 90..96);
        assert_eq!(parse_range("bytes=5-").unwrap(), 5..u64::MAX);
        assert!(parse_range("bytes=9-0").is_err());
        assert!(parse_range("bytes=0-1,4-5").is_err());
        assert!(parse_range("items=0-1").is_err());
    }
}
