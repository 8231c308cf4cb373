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
use crate::metrics::{ConnectionEnd, Metrics};

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
    /// Most client connections open at once; one accepted past it is closed at once.
    pub max_connections: usize,
    /// How long a client may take to send a request's headers: the TLS handshake and first request of a
    /// connection, and each HTTP/1.1 request's headers. A connection past it is closed.
    pub request_header_timeout: Duration,
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
            max_connections: 4096,
            request_header_timeout: Duration::from_secs(10),
        }
    }
}

/// A bound, not yet serving, front door.
pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Option<TlsAcceptor>,
    grace: Duration,
    connections: Arc<tokio::sync::Semaphore>,
    header_timeout: Duration,
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
        Ok(Self {
            listener,
            shared,
            tls,
            grace: config.shutdown_grace,
            connections: Arc::new(tokio::sync::Semaphore::new(config.max_connections.max(1))),
            header_timeout: config.request_header_timeout,
        })
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
        builder.http1().timer(TokioTimer::new()).header_read_timeout(self.header_timeout).keep_alive(true);
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
            let Ok(permit) = self.connections.clone().try_acquire_owned() else {
                self.shared.metrics.connection_closed(ConnectionEnd::OverLimit);
                tracing::debug!(%peer, "connection refused: at max_connections");
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let conn = Connection {
                shared: self.shared.clone(),
                builder: builder.clone(),
                tls: self.tls.clone(),
                header_timeout: self.header_timeout,
            };
            let watcher = graceful.watcher();
            tokio::spawn(async move {
                let _open = conn.shared.metrics.connection_opened();
                conn.serve(stream, peer, watcher).await;
                drop(permit);
            });
        }
        drop(self.listener);
        tokio::select! {
            () = graceful.shutdown() => tracing::info!("all connections closed"),
            () = tokio::time::sleep(self.grace) => tracing::warn!(grace = ?self.grace, "shutdown grace period over; closing remaining connections"),
        }
    }
}

/// One accepted connection, about to be served.
struct Connection {
    shared: Arc<Shared>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    tls: Option<TlsAcceptor>,
    header_timeout: Duration,
}

impl Connection {
    /// Serves it: a TLS handshake first when it starts one, then HTTP. A connection that has not sent a whole
    /// first request within the header timeout (a slow or idle client holding a socket) is closed.
    async fn serve(self, stream: TcpStream, peer: SocketAddr, watcher: hyper_util::server::graceful::Watcher) {
        let started = tokio::time::Instant::now();
        let seen = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let metrics = self.shared.metrics.clone();
        let result = match sniff_tls(&stream, self.tls.is_some(), self.header_timeout).await {
            Some(true) => {
                let acceptor = self.tls.expect("sniffed TLS only when configured");
                let tls_stream =
                    match tokio::time::timeout_at(started + self.header_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            metrics.connection_closed(ConnectionEnd::SlowRequest);
                            return;
                        }
                    };
                let service = TowerToHyperService::new(FirstRequest::new(FrontDoor::new(self.shared, true), &seen));
                let conn = self.builder.serve_connection_with_upgrades(TokioIo::new(tls_stream), service).into_owned();
                first_request_within(watcher.watch(conn), started + self.header_timeout, &seen, &metrics).await
            }
            Some(false) => {
                let service = TowerToHyperService::new(FirstRequest::new(FrontDoor::new(self.shared, false), &seen));
                let conn = self.builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
                first_request_within(watcher.watch(conn), started + self.header_timeout, &seen, &metrics).await
            }
            None => {
                metrics.connection_closed(ConnectionEnd::SlowRequest);
                return;
            }
        };
        if let Err(e) = result {
            // hyper's own header timeout (HTTP/1.1) may close a slow first request before our deadline does.
            let timed_out = e.downcast_ref::<hyper::Error>().is_some_and(|h| h.is_timeout());
            if timed_out && !seen.load(std::sync::atomic::Ordering::Acquire) {
                metrics.connection_closed(ConnectionEnd::SlowRequest);
            }
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
    }
}

/// Runs a connection, closing it (dropping it) if no request has arrived by `deadline`.
async fn first_request_within<F, E>(
    conn: F,
    deadline: tokio::time::Instant,
    seen: &std::sync::atomic::AtomicBool,
    metrics: &Metrics,
) -> Result<(), E>
where
    F: Future<Output = Result<(), E>>,
{
    tokio::pin!(conn);
    tokio::select! {
        r = &mut conn => r,
        () = tokio::time::sleep_until(deadline) => {
            if seen.load(std::sync::atomic::Ordering::Acquire) {
                conn.await
            } else {
                metrics.connection_closed(ConnectionEnd::SlowRequest);
                Ok(())
            }
        }
    }
}

/// Marks that a connection's first request arrived (its headers complete), for [`first_request_within`].
#[derive(Clone)]
struct FirstRequest<S> {
    inner: S,
    seen: Arc<std::sync::atomic::AtomicBool>,
}

impl<S> FirstRequest<S> {
    fn new(inner: S, seen: &Arc<std::sync::atomic::AtomicBool>) -> Self {
        Self { inner, seen: seen.clone() }
    }
}

impl<S, R> tower::Service<R> for FirstRequest<S>
where
    S: tower::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        self.seen.store(true, std::sync::atomic::Ordering::Release);
        self.inner.call(req)
    }
}

/// Whether the connection starts a TLS handshake (record type 0x16). `None` if the peer closed before sending.
async fn sniff_tls(stream: &TcpStream, tls_configured: bool, timeout: Duration) -> Option<bool> {
    if !tls_configured {
        return Some(false);
    }
    let mut first = [0u8; 1];
    match tokio::time::timeout(timeout, stream.peek(&mut first)).await {
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
