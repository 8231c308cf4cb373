//! Server settings: embedded defaults, overridden by `DATA_DIR/config.toml`, overridden by `COMPUTE_*`
//! environment variables, overridden by command-line flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;

/// The settings file's name inside the data directory.
pub const CONFIG_FILE: &str = "config.toml";

/// Settings as one layer gives them; unset fields defer to the layer below.
#[derive(Debug, Default, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Layer {
    /// Address to listen on.
    pub listen: Option<String>,
    /// TLS certificate chain (PEM).
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// `text` or `json`.
    pub log_format: Option<String>,
    /// Largest RPC message, e.g. `16MiB`.
    pub max_message_size: Option<String>,
    /// Lifetime of issued tokens, e.g. `365d`.
    pub token_ttl: Option<String>,
    /// `native` or `gvisor`.
    pub isolation: Option<String>,
    /// Run native sandboxes in their own user namespaces where the host can (default true).
    pub user_namespace: Option<bool>,
    /// Where base images and layers are kept (shared between data directories if you like).
    pub image_dir: Option<PathBuf>,
    /// The `compute-agent` binary.
    pub agent_bin: Option<PathBuf>,
    /// Default memory limit of a sandbox whose spec has none, e.g. `1Gi`.
    pub default_memory: Option<String>,
    /// Most processes (and threads) a sandbox's workload may have at once.
    pub pids_limit: Option<u64>,
    /// Operator aliases: image reference -> the reference to use instead (applied visibly, in logs and in the
    /// image's provenance). Only from the settings file.
    pub image_aliases: Option<std::collections::HashMap<String, String>>,
    /// Where volume objects live: `file:///path` (default `DATA_DIR/volumes/objects`) or an object store URL.
    pub volume_store: Option<String>,
    /// Options for the volume object store (credentials, region, endpoint). Only from the settings file.
    pub volume_store_options: Option<std::collections::HashMap<String, String>>,
    /// How long volume versions that no ref points at are kept, e.g. `30d` (default: forever).
    pub volume_retention: Option<String>,
    /// The URL clients reach this server at, for signed blob URLs (default: the request's own host).
    pub public_url: Option<String>,
    /// A DNS domain whose subdomains reach scaling groups by host name: `<group>.<environment>.<domain>` (and
    /// `<group>.<domain>` in the default environment). Unset: groups are reached by path (`/sg/<env>/<group>`).
    pub ingress_domain: Option<String>,
    /// How long a signed volume URL stays valid, e.g. `1h` (the default).
    pub volume_url_ttl: Option<String>,
    /// How long one image build step may run, e.g. `30m` (the default).
    pub build_step_timeout: Option<String>,
    /// Base image providers in the order they are tried (default `["debian", "registry"]`).
    pub image_providers: Option<Vec<String>>,
    /// Registry (`docker.io`, `ghcr.io`, `HOST:PORT`) → endpoint URLs tried before it. `docker.io`'s are where
    /// short names such as `python:3.13` are pulled from. Only from the settings file.
    pub registry_mirrors: Option<std::collections::HashMap<String, Vec<String>>>,
    /// Where Docker Hub names (`python:3.13`) are pulled from when no mirror is set for `docker.io` (default
    /// `https://registry-1.docker.io`, Docker Hub's registry endpoint); `""` refuses them.
    pub docker_hub_endpoint: Option<String>,
    /// Registry host → `{ username, password }`. Only from the settings file.
    pub registry_credentials: Option<std::collections::HashMap<String, compute_image::Credentials>>,
    /// Registries (`HOST:PORT`) spoken to over plain HTTP; loopback ones always are. Only from the settings file.
    pub insecure_registries: Option<Vec<String>>,
    /// The Debian archive base images are built from (default: the one this machine's apt uses).
    pub debian_mirror: Option<String>,
    /// Most client connections open at once (default 4096); one past it is closed at once.
    pub max_connections: Option<usize>,
    /// How far the memory limits of the live sandboxes may add up past the node's memory, as a factor (default
    /// 2.0); a workload past it is refused with RESOURCE_EXHAUSTED.
    pub memory_overcommit: Option<f64>,
    /// How long a client may take to send a request's headers, its first one included (default `10s`); a
    /// connection past it is closed.
    pub request_header_timeout: Option<String>,
}

impl Layer {
    /// `self` where set, else `below`.
    pub fn over(self, below: Layer) -> Layer {
        Layer {
            listen: self.listen.or(below.listen),
            tls_cert: self.tls_cert.or(below.tls_cert),
            tls_key: self.tls_key.or(below.tls_key),
            log_format: self.log_format.or(below.log_format),
            max_message_size: self.max_message_size.or(below.max_message_size),
            token_ttl: self.token_ttl.or(below.token_ttl),
            isolation: self.isolation.or(below.isolation),
            user_namespace: self.user_namespace.or(below.user_namespace),
            image_dir: self.image_dir.or(below.image_dir),
            agent_bin: self.agent_bin.or(below.agent_bin),
            default_memory: self.default_memory.or(below.default_memory),
            pids_limit: self.pids_limit.or(below.pids_limit),
            image_aliases: self.image_aliases.or(below.image_aliases),
            volume_store: self.volume_store.or(below.volume_store),
            volume_store_options: self.volume_store_options.or(below.volume_store_options),
            volume_retention: self.volume_retention.or(below.volume_retention),
            public_url: self.public_url.or(below.public_url),
            ingress_domain: self.ingress_domain.or(below.ingress_domain),
            volume_url_ttl: self.volume_url_ttl.or(below.volume_url_ttl),
            build_step_timeout: self.build_step_timeout.or(below.build_step_timeout),
            image_providers: self.image_providers.or(below.image_providers),
            registry_mirrors: self.registry_mirrors.or(below.registry_mirrors),
            docker_hub_endpoint: self.docker_hub_endpoint.or(below.docker_hub_endpoint),
            registry_credentials: self.registry_credentials.or(below.registry_credentials),
            insecure_registries: self.insecure_registries.or(below.insecure_registries),
            debian_mirror: self.debian_mirror.or(below.debian_mirror),
            max_connections: self.max_connections.or(below.max_connections),
            memory_overcommit: self.memory_overcommit.or(below.memory_overcommit),
            request_header_timeout: self.request_header_timeout.or(below.request_header_timeout),
        }
    }

    /// Reads `DATA_DIR/config.toml`; a missing file is an empty layer.
    pub fn from_file(data_dir: &Path) -> anyhow::Result<Layer> {
        let path = data_dir.join(CONFIG_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).with_context(|| format!("invalid settings in {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Layer::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
}

/// The resolved settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// TLS certificate and key, when both are set.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Emit JSON logs.
    pub json_logs: bool,
    /// Largest RPC message in bytes.
    pub max_message_bytes: usize,
    /// Lifetime of issued tokens.
    pub token_ttl: Duration,
    /// Isolation backend, when chosen explicitly.
    pub isolation: Option<compute_runtime::Isolation>,
    /// Native sandboxes get user namespaces where the host supports them.
    pub user_namespace: bool,
    /// Image store directory, when set (default: DATA_DIR/images).
    pub image_dir: Option<PathBuf>,
    /// Agent binary, when set (default: next to the `compute` binary).
    pub agent_bin: Option<PathBuf>,
    /// Default sandbox memory limit, bytes.
    pub default_memory: u64,
    /// Most processes per sandbox.
    pub pids_limit: u64,
    /// Operator image aliases.
    pub image_aliases: std::collections::HashMap<String, String>,
    /// Volume object store URL, when set (default: DATA_DIR/volumes/objects).
    pub volume_store: Option<String>,
    /// Its options.
    pub volume_store_options: Vec<(String, String)>,
    /// Retention of unreferenced volume versions (`None`: forever).
    pub volume_retention: Option<Duration>,
    /// Public URL for signed blob URLs.
    pub public_url: Option<String>,
    /// The domain scaling groups are reached under by host name, if any.
    pub ingress_domain: Option<String>,
    /// Lifetime of signed volume URLs.
    pub volume_url_ttl: Duration,
    /// Longest run of one image build step.
    pub build_step_timeout: Duration,
    /// Base image providers, in order.
    pub image_providers: Vec<compute_image::Provider>,
    /// Registry access.
    pub registry: compute_image::RegistryConfig,
    /// The Debian archive, when set.
    pub debian_mirror: Option<String>,
    /// Most client connections open at once.
    pub max_connections: usize,
    /// Memory overcommit factor for admission control.
    pub memory_overcommit: f64,
    /// Longest wait for a request's headers.
    pub request_header_timeout: Duration,
}

/// The listen address when nothing else says.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8420";

impl Settings {
    /// Resolves a merged layer against the embedded defaults, checking every value.
    pub fn resolve(layer: Layer) -> anyhow::Result<Settings> {
        let listen_text = layer.listen.unwrap_or_else(|| DEFAULT_LISTEN.into());
        let listen = listen_text.parse().with_context(|| {
            format!("listen address {listen_text:?} is not HOST:PORT with an IP host, e.g. 127.0.0.1:8420")
        })?;
        let tls = match (layer.tls_cert, layer.tls_key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => bail!("TLS needs both tls_cert and tls_key (flags --tls-cert/--tls-key)"),
        };
        let json_logs = match layer.log_format.as_deref().unwrap_or("text") {
            "text" => false,
            "json" => true,
            other => bail!("log format {other:?} is not one of: text, json"),
        };
        let max_message_bytes = parse_size(layer.max_message_size.as_deref().unwrap_or("16MiB"))?;
        let token_ttl = parse_duration(layer.token_ttl.as_deref().unwrap_or("365d"))?;
        let isolation = layer
            .isolation
            .as_deref()
            .map(|s| s.parse::<compute_runtime::Isolation>().map_err(|e| anyhow::anyhow!(e)))
            .transpose()?;
        let default_memory = compute_control::quantity::parse_memory(
            "default_memory",
            layer.default_memory.as_deref().unwrap_or("1Gi"),
        )?;
        let image_providers = match layer.image_providers {
            None => vec![compute_image::Provider::Debian, compute_image::Provider::Registry],
            Some(list) if list.is_empty() => bail!("image_providers is empty: name at least one of debian, registry"),
            Some(list) => {
                list.iter().map(|p| p.parse().map_err(|e: String| anyhow::anyhow!(e))).collect::<Result<_, _>>()?
            }
        };
        let mirrors = layer.registry_mirrors.unwrap_or_default();
        for (registry, urls) in &mirrors {
            for url in urls {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    bail!("registry_mirrors.{registry:?}: {url:?} must be an http:// or https:// URL");
                }
            }
        }
        let docker_hub = match layer.docker_hub_endpoint.as_deref() {
            None => Some(compute_image::DOCKER_HUB_ENDPOINT.to_string()),
            Some("") => None,
            Some(url) if url.starts_with("http://") || url.starts_with("https://") => Some(url.to_string()),
            Some(url) => bail!(
                "docker_hub_endpoint: {url:?} must be an http:// or https:// URL, or \"\" to refuse Docker Hub names"
            ),
        };
        let registry = compute_image::RegistryConfig {
            mirrors,
            docker_hub,
            credentials: layer.registry_credentials.unwrap_or_default(),
            insecure: layer.insecure_registries.unwrap_or_default(),
            ca_file: None,
        };
        Ok(Settings {
            listen,
            tls,
            json_logs,
            max_message_bytes,
            token_ttl,
            isolation,
            user_namespace: layer.user_namespace.unwrap_or(true),
            image_dir: layer.image_dir,
            agent_bin: layer.agent_bin,
            default_memory,
            pids_limit: layer.pids_limit.unwrap_or(4096).max(16),
            image_aliases: layer.image_aliases.unwrap_or_default(),
            volume_store: layer.volume_store,
            volume_store_options: layer.volume_store_options.unwrap_or_default().into_iter().collect(),
            volume_retention: layer.volume_retention.as_deref().map(parse_duration).transpose()?,
            public_url: layer.public_url,
            ingress_domain: layer.ingress_domain.as_deref().map(parse_ingress_domain).transpose()?,
            volume_url_ttl: parse_duration(layer.volume_url_ttl.as_deref().unwrap_or("1h"))?,
            build_step_timeout: parse_duration(layer.build_step_timeout.as_deref().unwrap_or("30m"))?,
            image_providers,
            registry,
            debian_mirror: layer.debian_mirror,
            max_connections: match layer.max_connections {
                Some(0) => bail!("max_connections is 0: allow at least one connection"),
                n => n.unwrap_or(4096),
            },
            request_header_timeout: parse_duration(layer.request_header_timeout.as_deref().unwrap_or("10s"))?,
            memory_overcommit: match layer.memory_overcommit.unwrap_or(2.0) {
                f if f.is_finite() && f > 0.0 => f,
                f => bail!("memory_overcommit {f} must be a positive factor, e.g. 1.5"),
            },
        })
    }
}

/// Parses `123`, `64KiB`, `16MiB`, `1GiB`, `10MB`.
pub fn parse_size(text: &str) -> anyhow::Result<usize> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num.parse().with_context(|| format!("size {text:?} must start with a number"))?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1000,
        "MB" => 1000 * 1000,
        "GB" => 1000 * 1000 * 1000,
        other => bail!("size unit {other:?} is not one of B, KiB, MiB, GiB, KB, MB, GB"),
    };
    let bytes = n.checked_mul(mult).with_context(|| format!("size {text:?} is too large"))?;
    if bytes == 0 {
        bail!("size {text:?} must be positive");
    }
    Ok(bytes)
}

/// Parses `90s`, `30m`, `12h`, `365d`.
pub fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().with_context(|| format!("duration {text:?} must start with a number"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => bail!("duration {text:?} needs a unit: s, m, h or d (e.g. 365d)"),
    };
    if secs == 0 {
        bail!("duration {text:?} must be positive");
    }
    Ok(Duration::from_secs(secs))
}

/// The data directory when neither `--data-dir` nor `COMPUTE_DATA_DIR` says: a per-user location.
pub fn default_data_dir() -> PathBuf {
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join("compute");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".local/share/compute")
}

/// A DNS domain for host-based routing: lowercase labels of letters, digits and '-', no scheme, port or dots at
/// either end.
fn parse_ingress_domain(text: &str) -> anyhow::Result<String> {
    let d = text.trim().trim_end_matches('.').to_ascii_lowercase();
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    anyhow::ensure!(
        !d.is_empty() && d.len() <= 200 && d.split('.').all(label_ok),
        "ingress_domain {text:?} is not a DNS domain: give labels of letters, digits and '-' separated by dots, \
         without a scheme or port (e.g. \"apps.example.com\")"
    );
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_env_override_file_override_defaults() {
        let file = Layer {
            listen: Some("127.0.0.1:1111".into()),
            log_format: Some("json".into()),
            token_ttl: Some("2d".into()),
            ..Default::default()
        };
        let env = Layer {
            listen: Some("127.0.0.1:2222".into()),
            max_message_size: Some("1MiB".into()),
            ..Default::default()
        };
        let flags = Layer { listen: Some("127.0.0.1:3333".into()), ..Default::default() };

        let s = Settings::resolve(flags.clone().over(env.clone().over(file.clone()))).unwrap();
        assert_eq!(s.listen.port(), 3333, "flag wins");
        assert_eq!(s.max_message_bytes, 1 << 20, "env wins over file and default");
        assert!(s.json_logs, "file wins over default");
        assert_eq!(s.token_ttl, Duration::from_secs(2 * 86400));

        let s = Settings::resolve(Layer::default().over(env.over(file.clone()))).unwrap();
        assert_eq!(s.listen.port(), 2222, "env wins over file");
        let s = Settings::resolve(file).unwrap();
        assert_eq!(s.listen.port(), 1111, "file wins over default");
        let s = Settings::resolve(Layer::default()).unwrap();
        assert_eq!(s.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(s.max_message_bytes, 16 << 20);
    }

    #[test]
    fn bad_values_name_the_setting() {
        let err = Settings::resolve(Layer { listen: Some("localhost".into()), ..Default::default() }).unwrap_err();
        assert!(format!("{err:#}").contains("listen address"), "{err:#}");
        let err = Settings::resolve(Layer { tls_cert: Some("c".into()), ..Default::default() }).unwrap_err();
        assert!(err.to_string().contains("tls_key"));
        let err = Settings::resolve(Layer { log_format: Some("xml".into()), ..Default::default() }).unwrap_err();
        assert!(err.to_string().contains("text, json"));
        assert!(parse_size("12XB").is_err());
        assert!(parse_duration("12").is_err());
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
    }

    #[test]
    fn settings_file_is_parsed_and_checked() {
        let dir = std::env::temp_dir().join(format!("compute-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(Layer::from_file(&dir).unwrap(), Layer::default());
        std::fs::write(dir.join(CONFIG_FILE), "listen = \"0.0.0.0:9000\"\n").unwrap();
        assert_eq!(Layer::from_file(&dir).unwrap().listen.as_deref(), Some("0.0.0.0:9000"));
        std::fs::write(dir.join(CONFIG_FILE), "lisen = 1\n").unwrap();
        let err = Layer::from_file(&dir).unwrap_err();
        assert!(format!("{err:#}").contains("lisen"), "{err:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn docker_hub_names_go_to_docker_hub_unless_the_operator_says_otherwise() {
        let s = Settings::resolve(Layer::default()).unwrap();
        assert_eq!(s.registry.docker_hub.as_deref(), Some(compute_image::DOCKER_HUB_ENDPOINT));
        let off = Layer { docker_hub_endpoint: Some(String::new()), ..Default::default() };
        assert_eq!(Settings::resolve(off).unwrap().registry.docker_hub, None);
        let local = Layer { docker_hub_endpoint: Some("http://127.0.0.1:5000".into()), ..Default::default() };
        assert_eq!(Settings::resolve(local).unwrap().registry.docker_hub.as_deref(), Some("http://127.0.0.1:5000"));
        let bad = Layer { docker_hub_endpoint: Some("registry.local".into()), ..Default::default() };
        let err = Settings::resolve(bad).unwrap_err().to_string();
        assert!(err.contains("docker_hub_endpoint") && err.contains("http://"), "{err}");
    }
}
