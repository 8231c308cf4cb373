//! Files `compute serve` keeps in the data directory so that other `compute` commands can find it: the
//! admin credentials made on first start (mode 0600), and `server.json` with the address it actually listens
//! on while it runs.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// Where a running server says where it is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerInfo {
    /// Process id.
    pub pid: u32,
    /// The address bound.
    pub listen: String,
    /// The URL clients use.
    pub url: String,
    /// Whether TLS is also served.
    pub tls: bool,
    /// Compute version.
    pub version: String,
    /// Start time, ms since the epoch.
    pub started_at: i64,
}

/// The admin client's credentials, kept so that `compute env` can print them again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdminCredentials {
    /// Client id.
    pub client_id: String,
    /// Client secret.
    pub client_secret: String,
    /// Primary environment id.
    pub environment_id: String,
}

pub fn server_info_path(data_dir: &Path) -> PathBuf {
    data_dir.join("server.json")
}

pub fn credentials_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin-credentials.json")
}

/// Writes `value` as JSON to `path` atomically (temp file + rename), readable only by the owner.
pub fn write_private_json<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    write_private(path, &serde_json::to_vec_pretty(value)?)
}

/// Writes `bytes` to `path` readable by the owner only, atomically (a temporary file renamed into place).
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Reads JSON from `path`; `None` if the file does not exist.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> anyhow::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The running server of this data directory, if its `server.json` names a live process.
pub fn running_server(data_dir: &Path) -> anyhow::Result<Option<ServerInfo>> {
    let Some(info) = read_json::<ServerInfo>(&server_info_path(data_dir))? else {
        return Ok(None);
    };
    let alive = Path::new(&format!("/proc/{}", info.pid)).exists();
    Ok(alive.then_some(info))
}

/// The URL clients use for a listen address (an unspecified host becomes loopback).
pub fn client_url(listen: std::net::SocketAddr) -> String {
    let host = match listen.ip() {
        std::net::IpAddr::V4(v4) if v4.is_unspecified() => "127.0.0.1".to_string(),
        std::net::IpAddr::V6(v6) if v6.is_unspecified() => "[::1]".to_string(),
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
        ip => ip.to_string(),
    };
    format!("http://{host}:{}", listen.port())
}
