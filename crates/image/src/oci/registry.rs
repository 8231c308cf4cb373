//! The registry side of pulling: endpoints (mirrors first), authentication (anonymous and credentialed bearer
//! tokens, basic auth) and the two reads a pull needs — manifests and blobs — per the OCI distribution spec.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use base64::Engine;
use http::header::{HeaderName, ACCEPT, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::StatusCode;

use super::http::{HttpClient, Response};
use super::name::{host_and_port, is_loopback_host, ImageName, DEFAULT_REGISTRY};
use crate::ImageError;

/// Manifest media types a pull accepts, most specific first.
pub const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// A username and password (or token) for a registry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password or access token.
    pub password: String,
}

/// Docker Hub's registry endpoint: where names without a registry (`python:3.13`) are pulled from by default, as
/// every container engine does.
pub const DOCKER_HUB_ENDPOINT: &str = "https://registry-1.docker.io";

/// How this node reaches registries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryConfig {
    /// Registry (as image names spell it, e.g. `docker.io`) → endpoint URLs tried before it, in order. Mirrors
    /// for `docker.io` replace [`RegistryConfig::docker_hub`].
    pub mirrors: HashMap<String, Vec<String>>,
    /// Where Docker Hub names are pulled from when no mirror is configured for `docker.io`
    /// ([`DOCKER_HUB_ENDPOINT`] by default); `None` refuses them.
    pub docker_hub: Option<String>,
    /// Registry host (or a mirror's host) → credentials.
    pub credentials: HashMap<String, Credentials>,
    /// Registries spoken to over plain HTTP (loopback ones always are).
    pub insecure: Vec<String>,
    /// CA bundle to trust (default: the system's).
    pub ca_file: Option<PathBuf>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            mirrors: HashMap::new(),
            docker_hub: Some(DOCKER_HUB_ENDPOINT.into()),
            credentials: HashMap::new(),
            insecure: Vec::new(),
            ca_file: None,
        }
    }
}

fn endpoint(url: &str, mirror: bool) -> Endpoint {
    let base = url.trim_end_matches('/').trim_end_matches("/v2").to_string();
    let host = base.split("://").nth(1).unwrap_or(&base).split('/').next().unwrap_or("").to_string();
    Endpoint { base, host, mirror }
}

/// What kind of internal address `host[:port]` is, when it is an IP literal or `localhost`.
fn internal_host(host_port: &str) -> Option<&'static str> {
    let (host, _) = host_and_port(host_port);
    if host.eq_ignore_ascii_case("localhost") || host.to_ascii_lowercase().ends_with(".localhost") {
        return Some("a loopback address");
    }
    host.parse::<std::net::IpAddr>().ok().and_then(internal_ip)
}

/// Whether `ip` is loopback, private, link-local, shared (CGNAT), unspecified or multicast: not a public registry.
fn internal_ip(ip: std::net::IpAddr) -> Option<&'static str> {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            if v4.is_loopback() {
                Some("a loopback address")
            } else if v4.is_private() || (o[0] == 100 && (64..128).contains(&o[1])) {
                Some("a private address")
            } else if v4.is_link_local() {
                Some("a link-local address")
            } else if v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast() {
                Some("not a unicast address")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return internal_ip(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            if v6.is_loopback() {
                Some("a loopback address")
            } else if first & 0xfe00 == 0xfc00 {
                Some("a private address")
            } else if first & 0xffc0 == 0xfe80 {
                Some("a link-local address")
            } else if v6.is_unspecified() || v6.is_multicast() {
                Some("not a unicast address")
            } else {
                None
            }
        }
    }
}

fn refused_internal(registry: &str, what: &str) -> ImageError {
    ImageError::Unsupported(format!(
        "registry {registry:?} is {what}: the server does not pull from its own network unless the operator lists \
         the registry in the settings (insecure_registries for plain HTTP, registry_credentials, or \
         registry_mirrors)"
    ))
}

/// One place an image can be read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `scheme://host[:port]` plus any path prefix, without a trailing slash.
    pub base: String,
    /// Its host, for credentials.
    pub host: String,
    /// Whether it is a configured mirror.
    pub mirror: bool,
}

/// A registry client.
pub struct Registry {
    http: HttpClient,
    config: RegistryConfig,
    /// `endpoint base + repository` → the Authorization header that worked last.
    auth: Mutex<HashMap<String, String>>,
}

impl Registry {
    /// A client with `config`.
    pub fn new(config: RegistryConfig) -> Result<Registry, ImageError> {
        let http = HttpClient::new(config.ca_file.as_deref()).map_err(ImageError::Io)?;
        Ok(Registry { http, config, auth: Mutex::default() })
    }

    /// Where `name` can be read from, in the order to try: its registry's mirrors, then the registry itself.
    pub fn endpoints(&self, name: &ImageName) -> Result<Vec<Endpoint>, ImageError> {
        let mut out: Vec<Endpoint> =
            self.config.mirrors.get(&name.registry).into_iter().flatten().map(|u| endpoint(u, true)).collect();
        if name.registry == DEFAULT_REGISTRY {
            // Short names go to Docker Hub's registry endpoint, unless the operator names mirrors for it (or turns
            // it off, e.g. on a machine that must not reach it).
            if out.is_empty() {
                match &self.config.docker_hub {
                    Some(hub) => out.push(endpoint(hub, false)),
                    None => {
                        return Err(ImageError::Unsupported(format!(
                            "image {:?} is a Docker Hub name and Docker Hub is turned off here \
                             (docker_hub_endpoint = \"\"): set registry_mirrors = {{ \"docker.io\" = \
                             [\"https://HOST\"] }} in the settings, or use a full reference such as \
                             HOST/REPOSITORY:TAG",
                            name.canonical()
                        )))
                    }
                }
            }
            return Ok(out);
        }
        let insecure = is_loopback_host(&name.registry) || self.config.insecure.contains(&name.registry);
        let scheme = if insecure { "http" } else { "https" };
        if !self.operator_listed(&name.registry) {
            if let Some(what) = internal_host(&name.registry) {
                return Err(refused_internal(&name.registry, what));
            }
        }
        out.push(Endpoint {
            base: format!("{scheme}://{}", name.registry),
            host: name.registry.clone(),
            mirror: false,
        });
        Ok(out)
    }

    /// Whether the operator named this registry in the settings (insecure, credentials or mirrors), which is
    /// what lets a reference reach a registry on a loopback, private or link-local address.
    fn operator_listed(&self, registry: &str) -> bool {
        self.config.insecure.iter().any(|r| r == registry)
            || self.config.credentials.contains_key(registry)
            || self.config.mirrors.contains_key(registry)
    }

    /// Refuses a registry whose name resolves to a loopback, private or link-local address that the operator has
    /// not listed (a reference must not make the server probe its own network); names that do not resolve here
    /// (behind a proxy) are left to the connection.
    pub async fn check_destination(&self, name: &ImageName) -> Result<(), ImageError> {
        if name.registry == DEFAULT_REGISTRY || self.operator_listed(&name.registry) {
            return Ok(());
        }
        let host_port = match host_and_port(&name.registry) {
            (_, Some(_)) => name.registry.clone(),
            (_, None) => format!("{}:443", name.registry),
        };
        let Ok(Ok(addrs)) =
            tokio::time::timeout(std::time::Duration::from_secs(5), tokio::net::lookup_host(host_port)).await
        else {
            return Ok(());
        };
        for addr in addrs {
            if let Some(what) = internal_ip(addr.ip()) {
                return Err(refused_internal(&name.registry, &format!("{what} ({})", addr.ip())));
            }
        }
        Ok(())
    }

    /// Reads the manifest `reference` (tag or digest) of `repository`: its bytes and media type.
    pub async fn manifest(
        &self,
        ep: &Endpoint,
        repository: &str,
        reference: &str,
    ) -> Result<(Vec<u8>, String), String> {
        let accept = MANIFEST_TYPES.join(", ");
        let resp = self.read(ep, repository, &format!("manifests/{reference}"), Some(&accept)).await?;
        let media_type = resp
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or(v).trim().to_string())
            .unwrap_or_default();
        let bytes = resp.bytes(4 << 20).await?;
        Ok((bytes, media_type))
    }

    /// Starts reading the blob `digest` of `repository`.
    pub async fn blob(&self, ep: &Endpoint, repository: &str, digest: &str) -> Result<Response, String> {
        self.read(ep, repository, &format!("blobs/{digest}"), None).await
    }

    async fn read(
        &self,
        ep: &Endpoint,
        repository: &str,
        path: &str,
        accept: Option<&str>,
    ) -> Result<Response, String> {
        let url = format!("{}/v2/{repository}/{path}", ep.base);
        let cache_key = format!("{}/{repository}", ep.base);
        let mut tried_auth = false;
        loop {
            let mut headers: Vec<(HeaderName, String)> = Vec::new();
            if let Some(a) = accept {
                headers.push((ACCEPT, a.to_string()));
            }
            let cached = self.auth.lock().unwrap_or_else(|p| p.into_inner()).get(&cache_key).cloned();
            if let Some(auth) = cached {
                headers.push((AUTHORIZATION, auth));
            }
            let resp = self.http.get(&url, &headers).await?;
            if resp.status == StatusCode::UNAUTHORIZED && !tried_auth {
                tried_auth = true;
                let challenge = resp
                    .headers
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
                    .ok_or_else(|| format!("GET {url}: 401 without a WWW-Authenticate challenge"))?;
                let auth = self.authorize(ep, repository, &challenge).await?;
                self.auth.lock().unwrap_or_else(|p| p.into_inner()).insert(cache_key.clone(), auth);
                continue;
            }
            if resp.status.is_success() {
                return Ok(resp);
            }
            let status = resp.status;
            let body = resp.bytes(64 << 10).await.unwrap_or_default();
            let detail = registry_error(&body).unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_string());
            let who = if ep.mirror { format!("mirror {}", ep.base) } else { format!("registry {}", ep.host) };
            let message = match status {
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => format!(
                    "{who} refused access to {repository} ({status}: {detail}); set registry_credentials for {} \
                     in the settings if it needs a login",
                    ep.host
                ),
                _ => format!("{who}: GET /v2/{repository}/{path}: {status}: {detail}"),
            };
            return Err(message);
        }
    }

    /// Answers an authentication challenge with an Authorization header value.
    async fn authorize(&self, ep: &Endpoint, repository: &str, challenge: &str) -> Result<String, String> {
        let (scheme, params) = parse_challenge(challenge);
        let creds = self.config.credentials.get(&ep.host);
        let basic = creds.map(|c| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", c.username, c.password))
            )
        });
        match scheme.to_ascii_lowercase().as_str() {
            "basic" => basic.ok_or_else(|| {
                format!(
                    "registry {} needs a login: set registry_credentials.\"{}\" = {{ username = \"…\", password = \"…\" }} \
                     in the settings",
                    ep.host, ep.host
                )
            }),
            "bearer" => {
                let realm = params.get("realm").ok_or("a bearer challenge without a realm")?;
                let mut query = Vec::new();
                if let Some(service) = params.get("service") {
                    query.push(format!("service={}", percent_encode(service)));
                }
                let scope = params.get("scope").cloned().unwrap_or_else(|| format!("repository:{repository}:pull"));
                query.push(format!("scope={}", percent_encode(&scope)));
                let sep = if realm.contains('?') { '&' } else { '?' };
                let url = format!("{realm}{sep}{}", query.join("&"));
                let headers: Vec<(HeaderName, String)> = basic.into_iter().map(|b| (AUTHORIZATION, b)).collect();
                let resp = self.http.get(&url, &headers).await?;
                let status = resp.status;
                let body = resp.bytes(1 << 20).await?;
                if !status.is_success() {
                    return Err(format!(
                        "the token service {realm} refused ({status}): {}",
                        String::from_utf8_lossy(&body).trim()
                    ));
                }
                #[derive(serde::Deserialize)]
                struct Token {
                    token: Option<String>,
                    access_token: Option<String>,
                }
                let t: Token =
                    serde_json::from_slice(&body).map_err(|e| format!("the token service {realm} answered: {e}"))?;
                let token = t.token.or(t.access_token).ok_or_else(|| format!("the token service {realm} sent no token"))?;
                Ok(format!("Bearer {token}"))
            }
            other => Err(format!("registry {} asks for unsupported authentication {other:?}", ep.host)),
        }
    }
}

/// The message of a registry's JSON error body (`{"errors":[{"code","message"}]}`).
fn registry_error(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<Error>,
    }
    #[derive(serde::Deserialize)]
    struct Error {
        code: Option<String>,
        message: Option<String>,
    }
    let e: Errors = serde_json::from_slice(body).ok()?;
    let parts: Vec<String> = e
        .errors
        .into_iter()
        .map(|e| match (e.code, e.message) {
            (Some(c), Some(m)) => format!("{c}: {m}"),
            (c, m) => c.or(m).unwrap_or_default(),
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// Splits `Bearer realm="…",service="…"` into its scheme and parameters.
fn parse_challenge(header: &str) -> (String, HashMap<String, String>) {
    let (scheme, rest) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
    let mut params = HashMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else { break };
        let key = key.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (value, remaining) = match after.strip_prefix('"') {
            Some(quoted) => {
                let end = quoted.find('"').unwrap_or(quoted.len());
                (quoted[..end].to_string(), quoted.get(end + 1..).unwrap_or(""))
            }
            None => {
                let end = after.find(',').unwrap_or(after.len());
                (after[..end].trim().to_string(), &after[end..])
            }
        };
        params.insert(key, value);
        rest = remaining.trim_start().trim_start_matches(',').trim_start();
    }
    (scheme.to_string(), params)
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#,
        );
        assert_eq!(s, "Bearer");
        assert_eq!(p["realm"], "https://auth.example/token");
        assert_eq!(p["service"], "registry.example");
        assert_eq!(p["scope"], "repository:a/b:pull");
        let (s, p) = parse_challenge(r#"Basic realm="Registry Realm""#);
        assert_eq!((s.as_str(), p["realm"].as_str()), ("Basic", "Registry Realm"));
        assert_eq!(percent_encode("repository:a/b:pull"), "repository%3Aa%2Fb%3Apull");
    }

    #[test]
    fn registry_errors_are_read() {
        let body = br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{}}]}"#;
        assert_eq!(registry_error(body).unwrap(), "MANIFEST_UNKNOWN: manifest unknown");
        assert_eq!(registry_error(b"nope"), None);
    }

    #[test]
    fn endpoints_put_mirrors_first_and_docker_hub_names_go_to_docker_hub_by_default() {
        let name = ImageName::parse("python:3.13").unwrap();
        let default = Registry::new(RegistryConfig::default()).unwrap();
        let eps = default.endpoints(&name).unwrap();
        assert_eq!(eps.len(), 1);
        assert_eq!((eps[0].base.as_str(), eps[0].host.as_str()), (DOCKER_HUB_ENDPOINT, "registry-1.docker.io"));
        let off = Registry::new(RegistryConfig { docker_hub: None, ..RegistryConfig::default() }).unwrap();
        let err = off.endpoints(&name).unwrap_err().to_string();
        assert!(err.contains("registry_mirrors") && err.contains("turned off"), "{err}");
        let mut config = RegistryConfig::default();
        config.mirrors.insert("docker.io".into(), vec!["http://127.0.0.1:5000/".into()]);
        config.mirrors.insert("ghcr.io".into(), vec!["https://mirror.example/ghcr".into()]);
        config.insecure.push("registry.lan:5000".into());
        config.insecure.push("localhost:5000".into());
        let r = Registry::new(config).unwrap();
        let eps = r.endpoints(&name).unwrap();
        assert_eq!(
            eps,
            vec![Endpoint { base: "http://127.0.0.1:5000".into(), host: "127.0.0.1:5000".into(), mirror: true }]
        );
        let eps = r.endpoints(&ImageName::parse("ghcr.io/o/a:1").unwrap()).unwrap();
        assert_eq!(eps[0].base, "https://mirror.example/ghcr");
        assert_eq!(eps[1].base, "https://ghcr.io");
        assert_eq!(
            r.endpoints(&ImageName::parse("registry.lan:5000/a").unwrap()).unwrap()[0].base,
            "http://registry.lan:5000"
        );
        assert_eq!(
            r.endpoints(&ImageName::parse("localhost:5000/a").unwrap()).unwrap()[0].base,
            "http://localhost:5000"
        );
    }

    #[test]
    fn a_reference_to_an_internal_address_is_refused_unless_the_operator_listed_it() {
        let r = Registry::new(RegistryConfig::default()).unwrap();
        for reference in [
            "127.0.0.1:1/x:y",
            "localhost:5000/a",
            "10.1.2.3/a",
            "192.168.0.9:5000/a",
            "169.254.169.254/latest:x",
            "100.64.0.1/a",
        ] {
            let err = r.endpoints(&ImageName::parse(reference).unwrap()).unwrap_err().to_string();
            assert!(err.contains("insecure_registries") && err.contains("address"), "{reference}: {err}");
        }
        assert!(r.endpoints(&ImageName::parse("ghcr.io/o/a:1").unwrap()).is_ok());
        assert!(r.endpoints(&ImageName::parse("8.8.8.8:5000/a").unwrap()).is_ok());
        for (ip, internal) in [("::1", true), ("fe80::1", true), ("fd00::5", true), ("::ffff:10.0.0.1", true)] {
            assert_eq!(internal_ip(ip.parse().unwrap()).is_some(), internal, "{ip}");
        }
        assert!(internal_ip("2001:4860:4860::8888".parse().unwrap()).is_none());
        let mut listed = RegistryConfig::default();
        listed.insecure.push("127.0.0.1:5000".into());
        listed.credentials.insert("10.1.2.3".into(), Credentials { username: "u".into(), password: "p".into() });
        let r = Registry::new(listed).unwrap();
        assert!(r.endpoints(&ImageName::parse("127.0.0.1:5000/a").unwrap()).is_ok());
        assert!(r.endpoints(&ImageName::parse("10.1.2.3/a").unwrap()).is_ok());
        assert!(r.endpoints(&ImageName::parse("127.0.0.1:5001/a").unwrap()).is_err(), "another port is not listed");
    }

    #[tokio::test]
    async fn a_name_that_resolves_to_loopback_is_refused_before_any_connection() {
        let r = Registry::new(RegistryConfig::default()).unwrap();
        let err = r.check_destination(&ImageName::parse("ip6-localhost:5000/a").unwrap()).await;
        // Debian's /etc/hosts names ::1 ip6-localhost; a machine without it has nothing to check here.
        if std::fs::read_to_string("/etc/hosts").unwrap_or_default().contains("ip6-localhost") {
            let err = err.unwrap_err().to_string();
            assert!(err.contains("loopback") && err.contains("::1"), "{err}");
        }
    }
}
