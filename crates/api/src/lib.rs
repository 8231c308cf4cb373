//! Compute's front door: one listener that serves every protocol the SDK speaks on the same port.
//!
//! - gRPC over HTTP/2 cleartext (prior knowledge) or TLS (ALPN `h2`), gzip-compressed requests accepted;
//! - Connect unary over HTTP/1.1 or HTTP/2 (`application/proto` and `application/json`), with the Connect JSON
//!   error body, by translating each call into the same gRPC handler;
//! - `GET /healthz`, `GET /v1/who-am-i`, `GET /metrics` (Prometheus);
//! - `PUT`/`GET /v2/blobs/…`: volume objects through signed URLs (GET with `Range`);
//! - `/sg/<environment>/<group>/…`: scaling groups, through the ingress (any method, HTTP/1.1 or HTTP/2).
//!
//! The front door authenticates, validates and translates; it holds no state and no business rules, which
//! live in `compute-control`.

#![warn(missing_docs)]

mod admin;
mod blobs;
mod connect;
mod front_door;
mod http_util;
mod methods;
mod metrics;
mod oauth;
mod server;
mod services;
mod status;

pub use methods::{MethodInfo, Methods};
pub use server::{ApiConfig, ServeError, Server, TlsConfig};
pub use services::parse_spec as parse_scaling_group_spec;
pub use services::FUNCTION_CODEC;

/// The scheme and authority clients reach this server at (e.g. `http://127.0.0.1:8420`), recorded on every
/// request so handlers can hand out absolute URLs (signed blob URLs).
#[derive(Debug, Clone)]
pub struct PublicBase(pub String);
