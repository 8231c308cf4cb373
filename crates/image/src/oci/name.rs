//! Image names as registries know them: `[REGISTRY/]REPOSITORY[:TAG][@DIGEST]`, normalised the way Docker does
//! (`python:3.13` is `docker.io/library/python:3.13`).

use crate::ImageError;

/// Where short names (no registry component) live.
pub const DEFAULT_REGISTRY: &str = "docker.io";

/// A parsed, normalised image name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageName {
    /// Registry host (and port): `docker.io`, `127.0.0.1:5000`, `ghcr.io`.
    pub registry: String,
    /// Repository path within it: `library/python`.
    pub repository: String,
    /// Tag, when the name has one (`latest` when it has neither tag nor digest).
    pub tag: Option<String>,
    /// `sha256:<hex>` when the name pins a digest.
    pub digest: Option<String>,
}

impl ImageName {
    /// Parses and normalises `text`.
    pub fn parse(text: &str) -> Result<ImageName, ImageError> {
        let bad = |why: &str| {
            ImageError::Unsupported(format!(
                "image {text:?} is not a valid image reference: {why} (expected [REGISTRY/]REPOSITORY[:TAG][@sha256:DIGEST])"
            ))
        };
        let t = text.trim();
        if t.is_empty() {
            return Err(bad("it is empty"));
        }
        let (rest, digest) = match t.split_once('@') {
            Some((r, d)) => {
                let hex = d.strip_prefix("sha256:").ok_or_else(|| bad("only sha256 digests are supported"))?;
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
                    return Err(bad("a sha256 digest is 64 lowercase hex digits"));
                }
                (r, Some(d.to_string()))
            }
            None => (t, None),
        };
        // A tag is after the last ':' that follows the last '/' (a ':' before it is a registry port).
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (path, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(rest[last_slash + i + 1..].to_string())),
            None => (rest, None),
        };
        if let Some(tag) = &tag {
            let ok = !tag.is_empty()
                && tag.len() <= 128
                && !tag.starts_with(['.', '-'])
                && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
            if !ok {
                return Err(bad(&format!("tag {tag:?} may hold only letters, digits, '_', '.' and '-'")));
            }
        }
        let (registry, repository) = match path.split_once('/') {
            Some((first, more)) if first.contains(['.', ':']) || first == "localhost" => {
                (first.to_string(), more.to_string())
            }
            _ => (DEFAULT_REGISTRY.to_string(), path.to_string()),
        };
        let (host, port) = registry.rsplit_once(':').map_or((registry.as_str(), None), |(h, p)| (h, Some(p)));
        let host_ok = !host.is_empty() && host.bytes().all(|b| b.is_ascii_alphanumeric() || b".-".contains(&b));
        if !host_ok || port.is_some_and(|p| p.parse::<u16>().is_err()) {
            return Err(bad(&format!("registry {registry:?} is not HOST or HOST:PORT")));
        }
        let repository = if registry == DEFAULT_REGISTRY && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        let component_ok = |c: &str| {
            !c.is_empty()
                && c.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && c.starts_with(|ch: char| ch.is_ascii_lowercase() || ch.is_ascii_digit())
        };
        if !repository.split('/').all(component_ok) {
            return Err(bad(&format!(
                "repository {repository:?} may hold only lowercase letters, digits, '.', '_', '-' and '/'"
            )));
        }
        let tag = if tag.is_none() && digest.is_none() { Some("latest".to_string()) } else { tag };
        Ok(ImageName { registry, repository, tag, digest })
    }

    /// What to ask the registry's manifest endpoint for: the digest when pinned, else the tag.
    pub fn manifest_reference(&self) -> &str {
        self.digest.as_deref().or(self.tag.as_deref()).unwrap_or("latest")
    }

    /// The full normalised name: `docker.io/library/python:3.13`, `host:5000/app@sha256:…`.
    pub fn canonical(&self) -> String {
        let mut s = format!("{}/{}", self.registry, self.repository);
        if let Some(tag) = &self.tag {
            s.push(':');
            s.push_str(tag);
        }
        if let Some(d) = &self.digest {
            s.push('@');
            s.push_str(d);
        }
        s
    }

    /// Whether the registry is on this machine's loopback (spoken to over plain HTTP, as Docker does).
    pub fn is_loopback(&self) -> bool {
        is_loopback_host(&self.registry)
    }
}

/// The host of `host[:port]` (an IPv6 literal without its brackets) and the port, when one is given.
pub fn host_and_port(host_port: &str) -> (&str, Option<u16>) {
    match host_port.strip_prefix('[') {
        Some(v6) => {
            let (host, rest) = v6.split_once(']').unwrap_or((v6, ""));
            (host, rest.strip_prefix(':').and_then(|p| p.parse().ok()))
        }
        None => match host_port.rsplit_once(':') {
            Some((host, port)) => (host, port.parse().ok()),
            None => (host_port, None),
        },
    }
}

/// Whether `host[:port]` names this machine's loopback.
pub fn is_loopback_host(host_port: &str) -> bool {
    let (host, _) = host_and_port(host_port);
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_and_its_port_are_split_brackets_and_all() {
        assert_eq!(host_and_port("registry.lan:5000"), ("registry.lan", Some(5000)));
        assert_eq!(host_and_port("ghcr.io"), ("ghcr.io", None));
        assert_eq!(host_and_port("[::1]:5000"), ("::1", Some(5000)));
        assert_eq!(host_and_port("[fe80::1]"), ("fe80::1", None));
    }

    fn n(s: &str) -> ImageName {
        ImageName::parse(s).unwrap()
    }

    #[test]
    fn short_names_are_docker_hub_library_images() {
        let p = n("python:3.13-slim-trixie");
        assert_eq!((p.registry.as_str(), p.repository.as_str()), ("docker.io", "library/python"));
        assert_eq!(p.tag.as_deref(), Some("3.13-slim-trixie"));
        assert_eq!(p.canonical(), "docker.io/library/python:3.13-slim-trixie");
        assert_eq!(n("busybox").canonical(), "docker.io/library/busybox:latest");
        assert_eq!(n("bitnami/redis:7").canonical(), "docker.io/bitnami/redis:7");
    }

    #[test]
    fn registries_ports_and_digests() {
        let d = "sha256:".to_string() + &"ab".repeat(32);
        let p = n(&format!("127.0.0.1:5000/team/app@{d}"));
        assert_eq!((p.registry.as_str(), p.repository.as_str(), p.tag.clone()), ("127.0.0.1:5000", "team/app", None));
        assert_eq!(p.manifest_reference(), d);
        assert!(p.is_loopback());
        let p = n(&format!("ghcr.io/o/app:v1@{d}"));
        assert_eq!(p.tag.as_deref(), Some("v1"));
        assert_eq!(p.manifest_reference(), d);
        assert!(!p.is_loopback());
        assert_eq!(n("localhost/app").registry, "localhost");
        assert!(n("localhost:5000/app:1").is_loopback());
        assert!(is_loopback_host("[::1]:5000"));
    }

    #[test]
    fn bad_names_say_what_is_wrong() {
        for bad in ["", "Python:3", "app@sha256:xyz", "app@md5:00", "app:bad/tag", "host:5000/App", "a:", "a:-x"] {
            let e = ImageName::parse(bad).unwrap_err().to_string();
            assert!(e.contains("not a valid image reference"), "{bad}: {e}");
        }
    }
}
