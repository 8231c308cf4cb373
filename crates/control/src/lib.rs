//! Compute's control plane: the resources, their rules and state machines, and the only writer of the store.
//!
//! For now it owns identity: environments, API clients, and the access tokens the front door checks on every
//! call. Later issues add sandboxes, images, volumes and scaling groups here, behind the same [`Control`].

#![warn(missing_docs)]

pub mod auth;
pub mod builds;
mod error;
pub mod functions;
pub mod ids;
mod published;
pub mod quantity;
pub mod scaling;
pub mod secret_hash;
pub mod secrets;
pub mod token;
pub mod workloads;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use compute_store::{Environment, Store};

pub use auth::{Auth, IssuedToken, NewClientCredentials, Principal};
pub use builds::{BuildAnswer, BuildStatus, Builds};
pub use compute_runtime::FailureKind;
pub use compute_secrets::{RefSource, SecretRef};
pub use compute_store::ScopeKind;
pub use error::{AuthError, ControlError};
pub use functions::{
    call_summary, CallPolicy, DeferredCall, EnsureRequest, Ensured, FunctionCodec, FunctionView, Functions, Polled,
};
pub use published::Exposure;
pub use scaling::{
    CronWindows, GroupSpec, GroupState, GroupView, QueueDepthTrigger, ScalingConfig, ScalingGroups, SpecParser,
};
pub use secrets::{IntegrationView, Scope, Secrets};
pub use workloads::{KernelPolicy, MemoryCapacity, WorkloadConfig, WorkloadKind, WorkloadRequest, Workloads};

/// Volumes: versioned copy-on-write trees over an object store.
pub use compute_volume as volume;

/// Locks a mutex, recovering from poisoning: every mutex here guards plain data that a panicking holder leaves
/// consistent (maps and counters updated in one step), so the data is still good to use.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Name of the environment that exists on every server.
pub const DEFAULT_ENVIRONMENT: &str = "default";

/// Settings the control plane needs from the operator.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// How long an issued access token stays valid. The SDK never refreshes tokens, so this is long by default.
    pub token_ttl: Duration,
    /// The key that seals secrets (`COMPUTE_SECRETS_KEY`); `None`: `DATA_DIR/secrets.key`.
    pub secrets_key: Option<String>,
    /// The key a rotation of a given key moves to (`COMPUTE_SECRETS_KEY_NEXT`).
    pub secrets_key_next: Option<String>,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self { token_ttl: Duration::from_secs(365 * 24 * 3600), secrets_key: None, secrets_key_next: None }
    }
}

impl ControlConfig {
    /// The defaults, with the secrets key taken from `COMPUTE_SECRETS_KEY` (and `COMPUTE_SECRETS_KEY_NEXT`).
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        Self {
            secrets_key: var("COMPUTE_SECRETS_KEY"),
            secrets_key_next: var("COMPUTE_SECRETS_KEY_NEXT"),
            ..Self::default()
        }
    }
}

/// The control plane of one data directory.
pub struct Control {
    store: Arc<Store>,
    auth: Auth,
    secrets: Arc<Secrets>,
    data_dir: PathBuf,
}

/// What [`Control::open`] created because this was the data directory's first start.
#[derive(Debug, Default)]
pub struct FirstStart {
    /// The admin client made on first start, with its secret (shown once; only its hash is stored).
    pub admin: Option<NewClientCredentials>,
}

impl Control {
    /// Opens the store in `data_dir` and makes sure the default environment and a signing key exist. On the
    /// first start it also creates the admin client and returns its credentials.
    pub fn open(data_dir: &Path, config: ControlConfig) -> Result<(Self, FirstStart), ControlError> {
        std::fs::create_dir_all(data_dir).map_err(|source| ControlError::DataDir { path: data_dir.into(), source })?;
        let store = Arc::new(Store::open(data_dir.join("state.db"))?);
        let auth = Auth::new(store.clone(), config.token_ttl);
        let secrets = Arc::new(Secrets::open(
            store.clone(),
            data_dir,
            config.secrets_key.as_deref(),
            config.secrets_key_next.as_deref(),
        )?);
        let created_default = store.write(|r| {
            if r.environments().get_by_name(DEFAULT_ENVIRONMENT)?.is_some() {
                return Ok(false);
            }
            r.environments().insert(&Environment {
                id: ids::environment_id(),
                name: DEFAULT_ENVIRONMENT.into(),
                created_at: compute_store::now_millis(),
            })?;
            Ok(true)
        })?;
        auth.ensure_signing_key()?;
        let mut first = FirstStart::default();
        if created_default {
            let creds = auth.create_client("admin", DEFAULT_ENVIRONMENT, true)?;
            first.admin = Some(creds);
        }
        Ok((Self { store, auth, secrets, data_dir: data_dir.to_path_buf() }, first))
    }

    /// Identity: clients, tokens, environments.
    pub fn auth(&self) -> &Auth {
        &self.auth
    }

    /// Secrets and integrations.
    pub fn secrets(&self) -> &Arc<Secrets> {
        &self.secrets
    }

    /// The id of the environment named (or with the id) `name_or_id`.
    pub fn environment_id(&self, name_or_id: &str) -> Result<String, ControlError> {
        let envs = self.environments()?;
        envs.iter()
            .find(|e| e.name == name_or_id || e.id == name_or_id)
            .map(|e| e.id.clone())
            .ok_or_else(|| ControlError::NotFound(format!("no environment named {name_or_id:?}")))
    }

    /// The underlying store (read access for operator views).
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The data directory this control plane owns.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Creates an environment named `name`.
    pub fn create_environment(&self, name: &str) -> Result<Environment, ControlError> {
        ids::validate_name("environment name", name)?;
        let env = Environment { id: ids::environment_id(), name: name.into(), created_at: compute_store::now_millis() };
        self.store.write(|r| r.environments().insert(&env))?;
        Ok(env)
    }

    /// Every environment.
    pub fn environments(&self) -> Result<Vec<Environment>, ControlError> {
        Ok(self.store.read(|r| r.environments().list())?)
    }
}
