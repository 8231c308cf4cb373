//! A small HTTP/1.1 client for talking to registries: TLS through rustls trusting the machine's CA bundle,
//! redirects (blob downloads are usually redirected to a CDN), and the `https_proxy`/`http_proxy`/`no_proxy`
//! environment that package managers honour too.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, AUTHORIZATION, HOST, LOCATION, USER_AGENT};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::TlsConnector;

/// The CA bundle Debian keeps (and the one a TLS-intercepting proxy's CA is added to).
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const HEADERS_TIMEOUT: Duration = Duration::from_secs(120);
const MAX_REDIRECTS: usize = 10;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An HTTP client (one connection per request: registry traffic is a few large transfers).
pub struct HttpClient {
    tls: TlsConnector,
    https_proxy: Option<Uri>,
    http_proxy: Option<Uri>,
    no_proxy: Vec<String>,
}

/// A response whose body has not been read yet.
pub struct Response {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// The URL that answered (after redirects).
    pub url: String,
    body: Incoming,
}

impl Response {
    /// The next piece of the body; `None` at its end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, String> {
        loop {
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(format!("reading the body from {}: {e}", self.url)),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        return Ok(Some(data));
                    }
                }
            }
        }
    }

    /// The whole body, refusing one longer than `limit` bytes.
    pub async fn bytes(mut self, limit: usize) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        while let Some(chunk) = self.chunk().await? {
            if out.len() + chunk.len() > limit {
                return Err(format!("the answer from {} is larger than {limit} bytes", self.url));
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }
}

fn proxy_from_env(names: &[&str]) -> Option<Uri> {
    names.iter().find_map(|n| std::env::var(n).ok()).filter(|v| !v.is_empty()).and_then(|v| {
        let v = if v.contains("://") { v } else { format!("http://{v}") };
        v.parse().ok()
    })
}

impl HttpClient {
    /// A client trusting the certificates in `ca_file` (default: [`SYSTEM_CA_BUNDLE`], or `SSL_CERT_FILE`).
    pub fn new(ca_file: Option<&Path>) -> Result<HttpClient, String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::CertificateDer;
        let from_env = std::env::var_os("SSL_CERT_FILE").map(std::path::PathBuf::from);
        let path = ca_file.map(Path::to_path_buf).or(from_env).unwrap_or_else(|| SYSTEM_CA_BUNDLE.into());
        let mut roots = rustls::RootCertStore::empty();
        // A machine without a CA bundle can still pull over plain HTTP (loopback, insecure registries).
        if let Ok(certs) = CertificateDer::pem_file_iter(&path) {
            for cert in certs.flatten() {
                let _ = roots.add(cert);
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let no_proxy = std::env::var("no_proxy")
            .or_else(|_| std::env::var("NO_PROXY"))
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().trim_start_matches('.').to_ascii_lowercase())
            .filter(|s| !s.is_empty())
            .collect();
        Ok(HttpClient {
            tls: TlsConnector::from(Arc::new(config)),
            https_proxy: proxy_from_env(&["https_proxy", "HTTPS_PROXY"]),
            http_proxy: proxy_from_env(&["http_proxy", "HTTP_PROXY"]),
            no_proxy,
        })
    }

    fn proxy_for(&self, https: bool, host: &str) -> Option<&Uri> {
        let host = host.to_ascii_lowercase();
        let bypass = super::name::is_loopback_host(&host)
            || self.no_proxy.iter().any(|d| d == "*" || host == *d || host.ends_with(&format!(".{d}")));
        if bypass {
            None
        } else if https {
            self.https_proxy.as_ref()
        } else {
            self.http_proxy.as_ref()
        }
    }

    /// GETs `url` with `headers`, following redirects. An `Authorization` header is not carried to another host.
    pub async fn get(&self, url: &str, headers: &[(HeaderName, String)]) -> Result<Response, String> {
        let mut url = url.to_string();
        let first_host = url.parse::<Uri>().ok().and_then(|u| u.authority().map(|a| a.to_string()));
        for _ in 0..=MAX_REDIRECTS {
            let uri: Uri = url.parse().map_err(|e| format!("bad URL {url:?}: {e}"))?;
            let same_host = uri.authority().map(|a| a.to_string()) == first_host;
            let kept: Vec<(HeaderName, String)> =
                headers.iter().filter(|(k, _)| same_host || *k != AUTHORIZATION).cloned().collect();
            let resp = tokio::time::timeout(HEADERS_TIMEOUT, self.send(&uri, &kept))
                .await
                .map_err(|_| format!("GET {url}: no answer within {}s", HEADERS_TIMEOUT.as_secs()))??;
            if resp.status().is_redirection() {
                let location = resp
                    .headers()
                    .get(LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| format!("GET {url}: redirect without a Location"))?;
                url = join(&uri, location);
                continue;
            }
            let (parts, body) = resp.into_parts();
            return Ok(Response { status: parts.status, headers: parts.headers, url, body });
        }
        Err(format!("GET {url}: more than {MAX_REDIRECTS} redirects"))
    }

    async fn send(&self, uri: &Uri, headers: &[(HeaderName, String)]) -> Result<hyper::Response<Incoming>, String> {
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            other => return Err(format!("unsupported URL scheme {other:?} in {uri}")),
        };
        let host = uri.host().ok_or_else(|| format!("no host in {uri}"))?;
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let authority = uri.authority().map(|a| a.to_string()).unwrap_or_else(|| host.to_string());
        let proxy = self.proxy_for(https, host);
        let target = match proxy {
            Some(p) => (p.host().unwrap_or_default().to_string(), p.port_u16().unwrap_or(80)),
            None => (host.trim_matches(['[', ']']).to_string(), port),
        };
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((target.0.as_str(), target.1)))
            .await
            .map_err(|_| format!("connecting to {}:{}: timed out", target.0, target.1))?
            .map_err(|e| format!("connecting to {}:{}: {e}", target.0, target.1))?;
        let _ = tcp.set_nodelay(true);
        let mut tcp: Box<dyn Io> = Box::new(tcp);
        if https && proxy.is_some() {
            tunnel(&mut tcp, &format!("{host}:{port}")).await?;
        }
        let io: Box<dyn Io> = if https {
            let name = rustls::pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_string())
                .map_err(|e| format!("{host}: {e}"))?;
            Box::new(self.tls.connect(name, tcp).await.map_err(|e| format!("TLS with {host}: {e}"))?)
        } else {
            tcp
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| format!("HTTP with {authority}: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        // Through a plain-HTTP proxy the request line carries the absolute URL.
        let target = if !https && proxy.is_some() {
            uri.to_string()
        } else {
            uri.path_and_query().map(|p| p.to_string()).unwrap_or_else(|| "/".into())
        };
        let mut req = Request::get(target)
            .header(HOST, authority.as_str())
            .header(USER_AGENT, concat!("compute/", env!("CARGO_PKG_VERSION")));
        for (k, v) in headers {
            req = req.header(k, v.as_str());
        }
        let req = req.body(Empty::<Bytes>::new()).map_err(|e| format!("building a request for {uri}: {e}"))?;
        sender.send_request(req).await.map_err(|e| format!("GET {uri}: {e}"))
    }
}

/// Opens a CONNECT tunnel to `authority` through the proxy `io` is connected to.
async fn tunnel(io: &mut Box<dyn Io>, authority: &str) -> Result<(), String> {
    let req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    io.write_all(req.as_bytes()).await.map_err(|e| format!("proxy CONNECT {authority}: {e}"))?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    // Byte by byte so nothing of the tunnelled stream is consumed.
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 * 1024 || io.read(&mut byte).await.map_err(|e| format!("proxy CONNECT: {e}"))? == 0 {
            return Err(format!("proxy CONNECT {authority}: the proxy closed the connection"));
        }
        head.push(byte[0]);
    }
    let line = String::from_utf8_lossy(&head);
    let status = line.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        return Err(format!("proxy CONNECT {authority}: {}", line.lines().next().unwrap_or("")));
    }
    Ok(())
}

/// Resolves a `Location` against the URL that sent it.
fn join(base: &Uri, location: &str) -> String {
    if location.contains("://") {
        return location.to_string();
    }
    let scheme = base.scheme_str().unwrap_or("https");
    let authority = base.authority().map(|a| a.as_str()).unwrap_or("");
    if location.starts_with("//") {
        return format!("{scheme}:{location}");
    }
    if location.starts_with('/') {
        return format!("{scheme}://{authority}{location}");
    }
    let dir = base.path().rsplit_once('/').map_or("", |(d, _)| d);
    format!("{scheme}://{authority}{dir}/{location}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_resolve_against_the_request() {
        let base: Uri = "https://r.example:5000/v2/a/blobs/sha256:1".parse().unwrap();
        assert_eq!(join(&base, "https://cdn.example/x?y"), "https://cdn.example/x?y");
        assert_eq!(join(&base, "/other"), "https://r.example:5000/other");
        assert_eq!(join(&base, "//cdn.example/z"), "https://cdn.example/z");
        assert_eq!(join(&base, "rel"), "https://r.example:5000/v2/a/blobs/rel");
    }
}
