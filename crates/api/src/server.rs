//! The listener: accepts TCP connections, tells TLS from cleartext by the first byte, and serves HTTP/1.1 and
//! HTTP/2 on each through hyper-util's protocol-detecting builder.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use compute_control::Control;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

use crate::front_door::{FrontDoor, Shared};
use crate::methods::Methods;
use crate::metrics::Metrics;

/// Certificate and key for serving TLS.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// PEM file with the certificate chain, leaf first.
    pub cert_path: PathBuf,
    /// PEM file with the private key.
    pub key_path: PathBuf,
}

/// How the front door listens.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Address to bind.
    pub listen: SocketAddr,
    /// Serve TLS too (on the same port; cleartext keeps working).
    pub tls: Option<TlsConfig>,
    /// Largest request or response message accepted, in bytes.
    pub max_message_bytes: usize,
    /// How long to wait for in-flight requests at shutdown.
    pub shutdown_grace: Duration,
    /// The URL clients reach this server at, for the blob URLs it signs (`None`: the request's own scheme and
    /// host, which is right unless a proxy rewrites them).
    pub public_url: Option<String>,
    /// A DNS domain whose subdomains reach scaling groups by host name (`<group>.<environment>.<domain>`); `None`:
    /// groups are reached by path only.
    pub ingress_domain: Option<String>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8420)),
            tls: None,
            max_message_bytes: 16 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(10),
            public_url: None,
            ingress_domain: None,
        }
    }
}

/// A bound, not yet serving, front door.
pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Option<TlsAcceptor>,
    grace: Duration,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TLS certificate or key could not be loaded.
    #[error("TLS: {0}")]
    Tls(String),
}

impl Server {
    /// Binds the listener and prepares the handlers.
    pub async fn bind(
        config: ApiConfig,
        control: Arc<Control>,
        workloads: Arc<compute_control::Workloads>,
        builds: Arc<compute_control::Builds>,
        volumes: Arc<compute_control::volume::VolumeStore>,
        scaling: Arc<compute_control::ScalingGroups>,
        functions: Arc<compute_control::Functions>,
    ) -> Result<Self, ServeError> {
        let tls = config.tls.as_ref().map(load_tls).transpose()?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| ServeError::Bind { addr: config.listen, source })?;
        let shared = Arc::new(Shared {
            routes: crate::services::routes(
                crate::services::Backends {
                    control: control.clone(),
                    workloads: workloads.clone(),
                    builds,
                    volumes: volumes.clone(),
                    scaling: scaling.clone(),
                    functions,
                },
                config.ingress_domain.clone(),
                config.max_message_bytes,
            ),
            ingress_domain: config.ingress_domain.clone(),
            ingress: scaling.ingress().clone(),
            scaling: scaling.clone(),
            volumes,
            workloads,
            public_url: config.public_url.clone(),
            control,
            methods: Methods::from_schema(),
            metrics: Metrics::new(),
            max_message_bytes: config.max_message_bytes,
        });
        Ok(Self { listener, shared, tls, grace: config.shutdown_grace })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    /// Whether TLS is served.
    pub fn tls_enabled(&self) -> bool {
        self.tls.is_some()
    }

    /// Serves until `shutdown` completes, then stops accepting and waits up to the grace period for open
    /// connections to finish their requests.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder.http1().timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(30)).keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .adaptive_window(true)
            .max_concurrent_streams(1024)
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20));
        let builder = Arc::new(builder);
        let graceful = GracefulShutdown::new();
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning; the listener itself stays valid.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            let _ = stream.set_nodelay(true);
            let shared = self.shared.clone();
            let builder = builder.clone();
            let tls = self.tls.clone();
            let watcher = graceful.watcher();
            tokio::spawn(async move {
                let result = match sniff_tls(&stream, tls.is_some()).await {
                    Some(true) => match tls.expect("sniffed TLS only when configured").accept(stream).await {
                        Ok(tls_stream) => {
                            let service = TowerToHyperService::new(FrontDoor::new(shared, true));
                            let conn =
                                builder.serve_connection_with_upgrades(TokioIo::new(tls_stream), service).into_owned();
                            watcher.watch(conn).await
                        }
                        Err(e) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                    },
                    Some(false) => {
                        let service = TowerToHyperService::new(FrontDoor::new(shared, false));
                        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
                        watcher.watch(conn).await
                    }
                    None => return,
                };
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
            });
        }
        drop(self.listener);
        tokio::select! {
            () = graceful.shutdown() => tracing::info!("all connections closed"),
            () = tokio::time::sleep(self.grace) => tracing::warn!(grace = ?self.grace, "shutdown grace period over; closing remaining connections"),
        }
    }
}

/// Whether the connection starts a TLS handshake (record type 0x16). `None` if the peer closed before sending.
async fn sniff_tls(stream: &TcpStream, tls_configured: bool) -> Option<bool> {
    if !tls_configured {
        return Some(false);
    }
    let mut first = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(30), stream.peek(&mut first)).await {
        Ok(Ok(1)) => Some(first[0] == 0x16),
        _ => None,
    }
}

fn load_tls(cfg: &TlsConfig) -> Result<TlsAcceptor, ServeError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(&cfg.cert_path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| ServeError::Tls(format!("reading certificates from {}: {e}", cfg.cert_path.display())))?;
    if certs.is_empty() {
        return Err(ServeError::Tls(format!("no certificate in {}", cfg.cert_path.display())));
    }
    let key = PrivateKeyDer::from_pem_file(&cfg.key_path)
        .map_err(|e| ServeError::Tls(format!("reading the private key from {}: {e}", cfg.key_path.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServeError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| ServeError::Tls(format!("certificate and key do not form a usable pair: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
