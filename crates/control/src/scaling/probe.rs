//! Readiness checks of a replica: an HTTP GET of the spec's path (any 2xx or 3xx passes, as in Kubernetes), a gRPC
//! health check, or a TCP connect to its port when the spec names neither.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What one check of a replica does.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ProbeCheck {
    /// A TCP connect to the replica's port.
    #[default]
    Tcp,
    /// `GET` this path over HTTP/1.1.
    Http(String),
    /// `grpc.health.v1.Health/Check` of this service ("" for the whole server) over HTTP/2.
    Grpc(String),
}

/// How a group's replicas are checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSpec {
    /// The check.
    pub check: ProbeCheck,
    /// How often a ready replica is checked again.
    pub period: Duration,
    /// How long one check may take.
    pub timeout: Duration,
    /// Consecutive failures that take a ready replica out of the route.
    pub failure_threshold: u32,
}

impl Default for ProbeSpec {
    fn default() -> Self {
        Self {
            check: ProbeCheck::Tcp,
            period: Duration::from_secs(10),
            timeout: Duration::from_secs(1),
            failure_threshold: 3,
        }
    }
}

/// Checks once; the error says what failed.
pub(crate) async fn check(addr: SocketAddr, spec: &ProbeSpec) -> Result<(), String> {
    let checked = async {
        match &spec.check {
            ProbeCheck::Tcp => check_inner(addr, None).await,
            ProbeCheck::Http(path) => check_inner(addr, Some(path)).await,
            ProbeCheck::Grpc(service) => compute_ingress::grpc_health(addr, service).await,
        }
    };
    match tokio::time::timeout(spec.timeout, checked).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} ms", spec.timeout.as_millis())),
    }
}

async fn check_inner(addr: SocketAddr, path: Option<&str>) -> Result<(), String> {
    let mut stream = TcpStream::connect(addr).await.map_err(|e| format!("connecting to {addr}: {e}"))?;
    let Some(path) = path else { return Ok(()) };
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: compute-probe\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(|e| format!("sending GET {path}: {e}"))?;
    // The status line is all a probe needs.
    let mut head = Vec::with_capacity(64);
    let mut buf = [0u8; 64];
    while !head.contains(&b'\n') && head.len() < 1024 {
        let n = stream.read(&mut buf).await.map_err(|e| format!("reading the answer to GET {path}: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let status = line.split_whitespace().nth(1).and_then(|s| s.parse::<u16>().ok());
    match status {
        Some(s) if (200..400).contains(&s) => Ok(()),
        Some(s) => Err(format!("GET {path} answered {s}")),
        None => Err(format!("GET {path} got no HTTP answer")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn server(answer: &'static str) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(answer.as_bytes()).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn http_and_tcp_checks() {
        let ok = server("HTTP/1.1 204 No Content\r\n\r\n").await;
        let bad = server("HTTP/1.1 503 Service Unavailable\r\n\r\n").await;
        let http = |p: &str| ProbeSpec { check: ProbeCheck::Http(p.into()), ..ProbeSpec::default() };
        check(ok, &http("/health")).await.unwrap();
        check(ok, &ProbeSpec::default()).await.unwrap();
        let err = check(bad, &http("/ready")).await.unwrap_err();
        assert_eq!(err, "GET /ready answered 503");
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let err = check(closed, &ProbeSpec::default()).await.unwrap_err();
        assert!(err.starts_with("connecting to"), "{err}");
    }
}
