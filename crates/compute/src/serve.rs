//! `compute serve`: opens the data directory, starts the front door, and runs until SIGTERM or SIGINT.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use compute_api::{ApiConfig, Server, TlsConfig};
use compute_control::{Control, ControlConfig};

use crate::runtime_file::{self, AdminCredentials, ServerInfo};
use crate::settings::Settings;

pub async fn run(data_dir: &Path, settings: Settings) -> anyhow::Result<()> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating data directory {}", data_dir.display()))?;
    restrict_permissions(data_dir);
    // One server per data directory: the store allows it, but two front doors on one state would each think
    // they own the workloads.
    let lock_path = data_dir.join("server.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        anyhow::bail!(
            "another compute server is already running on data directory {}",
            data_dir.display()
        );
    }

    let (control, first) = Control::open(
        data_dir,
        ControlConfig {
            token_ttl: settings.token_ttl,
        },
    )?;
    let control = Arc::new(control);
    let creds_path = runtime_file::credentials_path(data_dir);
    if let Some(admin) = &first.admin {
        runtime_file::write_private_json(
            &creds_path,
            &AdminCredentials {
                client_id: admin.client_id.clone(),
                client_secret: admin.client_secret.clone(),
                environment_id: admin.environment_id.clone(),
            },
        )?;
    }

    let config = ApiConfig {
        listen: settings.listen,
        tls: settings.tls.clone().map(|(cert_path, key_path)| TlsConfig {
            cert_path,
            key_path,
        }),
        max_message_bytes: settings.max_message_bytes,
        ..ApiConfig::default()
    };
    let server = Server::bind(config, control.clone()).await?;
    let addr = server.local_addr();
    let url = runtime_file::client_url(addr);
    let info = ServerInfo {
        pid: std::process::id(),
        listen: addr.to_string(),
        url: url.clone(),
        tls: server.tls_enabled(),
        version: env!("CARGO_PKG_VERSION").into(),
        started_at: compute_store::now_millis(),
    };
    let info_path = runtime_file::server_info_path(data_dir);
    runtime_file::write_private_json(&info_path, &info)?;
    tracing::info!(%addr, tls = info.tls, data_dir = %data_dir.display(), version = info.version, "compute is serving");

    if let Some(admin) = &first.admin {
        println!("# First start: created the admin client. Point the SDK at this server with:");
        println!("export CHALK_API_SERVER={url}");
        println!("export CHALK_CLIENT_ID={}", admin.client_id);
        println!("export CHALK_CLIENT_SECRET={}", admin.client_secret);
        println!(
            "# (`eval \"$(compute env)\"` prints these again; the secret is also in {})",
            creds_path.display()
        );
    }

    server.run(shutdown_signal()).await;
    let _ = std::fs::remove_file(&info_path);
    tracing::info!("compute stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

fn restrict_permissions(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    // The directory holds the store (client hashes, signing keys) and the admin secret.
    if let Err(e) = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)) {
        tracing::warn!(error = %e, dir = %dir.display(), "could not restrict the data directory to its owner");
    }
}
