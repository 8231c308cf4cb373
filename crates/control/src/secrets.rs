//! Secrets and integrations: sealed on the way into the store and opened only to start a workload (or for
//! `GetSecretValue`). Values never reach a log line, an error message or a listing.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use compute_secrets::{IntegrationKind, Keyring, RefSource, SecretRef, Variable};
use compute_store::{IntegrationRecord, ScopeKind, SealedTable, SecretRecord, Store};

use crate::{ids, ControlError, Principal};

/// Where a secret belongs: the environment, or a named workload.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope {
    /// The scope's kind.
    pub kind: ScopeKind,
    /// The workload's name; empty for the environment.
    pub name: String,
}

impl Scope {
    /// The whole environment.
    pub fn environment() -> Self {
        Self { kind: ScopeKind::Environment, name: String::new() }
    }

    /// A workload scope (`kind` other than the environment) of the named workload.
    pub fn of(kind: ScopeKind, name: &str) -> Self {
        if kind == ScopeKind::Environment {
            return Self::environment();
        }
        Self { kind, name: name.to_string() }
    }

    /// `sandbox:NAME`, `scaling-group:NAME`, `function:NAME`, or `environment`.
    pub fn describe(&self) -> String {
        match self.kind {
            ScopeKind::Environment => "environment".into(),
            ScopeKind::Sandbox => format!("sandbox:{}", self.name),
            ScopeKind::ScalingGroup => format!("scaling-group:{}", self.name),
            ScopeKind::Function => format!("function:{}", self.name),
        }
    }
}

/// An integration as listed (no values).
#[derive(Debug, Clone)]
pub struct IntegrationView {
    /// Its name.
    pub name: String,
    /// Its kind.
    pub kind: String,
    /// The names of its keys.
    pub keys: Vec<String>,
    /// The variables it exposes.
    pub variables: Vec<String>,
    /// ms since the epoch.
    pub updated_at: i64,
}

/// The secret store of one server.
pub struct Secrets {
    store: Arc<Store>,
    keyring: Keyring,
}

fn secret_aad(env: &str, scope: &Scope, name: &str) -> Vec<u8> {
    format!("secret\0{env}\0{}\0{}\0{name}", scope.kind.as_str(), scope.name).into_bytes()
}

fn integration_aad(env: &str, name: &str) -> Vec<u8> {
    format!("integration\0{env}\0{name}").into_bytes()
}

fn now() -> i64 {
    compute_store::now_millis()
}

/// Checks a secret's name: it becomes a variable name unless renamed.
pub fn validate_secret_name(field: &str, name: &str) -> Result<(), ControlError> {
    let ok = !name.is_empty()
        && name.len() <= 256
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        && !name.as_bytes()[0].is_ascii_digit();
    if ok {
        Ok(())
    } else {
        Err(ControlError::InvalidArgument(format!(
            "{field} {name:?} is not a valid secret name: use letters, digits, '_', '-' or '.' (not starting with a \
             digit), at most 256 characters"
        )))
    }
}

impl Secrets {
    /// The secret store over `store`, with the data directory's key (or `key`, `COMPUTE_SECRETS_KEY`, when the
    /// operator gives one; `next_key` during a rotation of a given key).
    pub fn open(
        store: Arc<Store>,
        data_dir: &Path,
        key: Option<&str>,
        next_key: Option<&str>,
    ) -> Result<Self, ControlError> {
        let keyring = match key {
            Some(k) => Keyring::from_key(k, next_key)?,
            None => Keyring::open_dir(data_dir)?,
        };
        Ok(Self { store, keyring })
    }

    /// Sets a secret's value (creating it); returns its record.
    pub fn upsert(
        &self,
        who: &Principal,
        name: &str,
        scope: &Scope,
        value: &str,
    ) -> Result<SecretRecord, ControlError> {
        validate_secret_name("name", name)?;
        match scope.kind {
            ScopeKind::Environment => {}
            ScopeKind::Function => ids::validate_function_name("scope.ref", &scope.name)?,
            _ => ids::validate_name("scope.ref", &scope.name)?,
        }
        if value.contains('\0') {
            return Err(ControlError::InvalidArgument(format!(
                "secret {name:?}: the value holds a NUL byte, which no process environment can carry"
            )));
        }
        let env = &who.environment_id;
        let (key_id, sealed) = self.keyring.seal(&secret_aad(env, scope, name), value.as_bytes())?;
        let at = now();
        let rec = SecretRecord {
            id: format!("sec-{}", ids::random_token(16)),
            environment_id: env.clone(),
            name: name.to_string(),
            scope: scope.kind,
            scope_ref: scope.name.clone(),
            key_id,
            sealed,
            created_by: who.client_id.clone(),
            created_at: at,
            updated_at: at,
        };
        let stored = self.store.write(|r| r.secrets().upsert(&rec))?;
        tracing::info!(secret = %name, scope = %scope.describe(), "secret set");
        Ok(stored)
    }

    /// Sets a secret unless it already holds `value`; true when it changed (or was created).
    pub fn set_if_changed(
        &self,
        who: &Principal,
        name: &str,
        scope: &Scope,
        value: &str,
    ) -> Result<bool, ControlError> {
        let env = &who.environment_id;
        if let Some(rec) = self.store.read(|r| r.secrets().get(env, scope.kind, &scope.name, name))? {
            if self.open_secret(&rec)? == value {
                return Ok(false);
            }
        }
        self.upsert(who, name, scope, value)?;
        Ok(true)
    }

    /// Deletes every secret of one workload scope (a deleted function's own secrets); returns how many.
    pub fn delete_scope(&self, env: &str, scope: &Scope) -> Result<usize, ControlError> {
        let recs = self.store.read(|r| r.secrets().list(env, true))?;
        let mut n = 0;
        for rec in recs.iter().filter(|r| r.scope == scope.kind && r.scope_ref == scope.name) {
            if self.store.write(|r| r.secrets().delete(env, scope.kind, &scope.name, &rec.name))? {
                n += 1;
            }
        }
        Ok(n)
    }

    /// An environment's secrets (names and scopes; no values).
    pub fn list(&self, who: &Principal, include_scoped: bool) -> Result<Vec<SecretRecord>, ControlError> {
        Ok(self.store.read(|r| r.secrets().list(&who.environment_id, include_scoped))?)
    }

    /// A secret's record and value, by id.
    pub fn value(&self, who: &Principal, id: &str) -> Result<(SecretRecord, String), ControlError> {
        let rec = self
            .store
            .read(|r| r.secrets().get_by_id(&who.environment_id, id))?
            .ok_or_else(|| ControlError::NotFound(format!("secret {id:?} not found in this environment")))?;
        let value = self.open_secret(&rec)?;
        Ok((rec, value))
    }

    /// Deletes a secret; NotFound when there is none of that name and scope.
    pub fn delete(&self, who: &Principal, name: &str, scope: &Scope) -> Result<(), ControlError> {
        let env = &who.environment_id;
        if !self.store.write(|r| r.secrets().delete(env, scope.kind, &scope.name, name))? {
            return Err(ControlError::NotFound(format!(
                "no secret named {name:?} in scope {} of this environment",
                scope.describe()
            )));
        }
        tracing::info!(secret = %name, scope = %scope.describe(), "secret deleted");
        Ok(())
    }

    fn open_secret(&self, rec: &SecretRecord) -> Result<String, ControlError> {
        let scope = Scope { kind: rec.scope, name: rec.scope_ref.clone() };
        let plain = self.keyring.open(&rec.key_id, &secret_aad(&rec.environment_id, &scope, &rec.name), &rec.sealed)?;
        String::from_utf8(plain).map_err(|_| ControlError::Internal(format!("secret {:?} is not UTF-8", rec.name)))
    }

    /// Creates or replaces an integration of `kind` with `keys` in environment `env` (id).
    pub fn set_integration(
        &self,
        env: &str,
        name: &str,
        kind: &str,
        keys: BTreeMap<String, String>,
    ) -> Result<IntegrationView, ControlError> {
        validate_secret_name("integration name", name)?;
        let kind = IntegrationKind::parse(kind).map_err(ControlError::InvalidArgument)?;
        kind.check(&keys).map_err(|e| ControlError::InvalidArgument(format!("integration {name:?}: {e}")))?;
        let plain = serde_json::to_vec(&keys).map_err(|e| ControlError::Internal(e.to_string()))?;
        let (key_id, sealed) = self.keyring.seal(&integration_aad(env, name), &plain)?;
        let at = now();
        let rec = IntegrationRecord {
            id: format!("int-{}", ids::random_token(16)),
            environment_id: env.to_string(),
            name: name.to_string(),
            kind: kind.as_str().into(),
            key_names: keys.keys().cloned().collect::<Vec<_>>().join(","),
            key_id,
            sealed,
            created_at: at,
            updated_at: at,
        };
        self.store.write(|r| r.secrets().upsert_integration(&rec))?;
        tracing::info!(integration = %name, kind = kind.as_str(), "integration set");
        Ok(view(&rec, kind, &keys))
    }

    /// An environment's integrations (no values).
    pub fn integrations(&self, env: &str) -> Result<Vec<IntegrationView>, ControlError> {
        let recs = self.store.read(|r| r.secrets().integrations(Some(env)))?;
        recs.iter()
            .map(|rec| {
                let (kind, keys) = self.open_integration(rec)?;
                Ok(view(rec, kind, &keys))
            })
            .collect()
    }

    /// Deletes an integration.
    pub fn delete_integration(&self, env: &str, name: &str) -> Result<(), ControlError> {
        if !self.store.write(|r| r.secrets().delete_integration(env, name))? {
            return Err(ControlError::NotFound(format!("no integration named {name:?} in this environment")));
        }
        Ok(())
    }

    fn open_integration(
        &self,
        rec: &IntegrationRecord,
    ) -> Result<(IntegrationKind, BTreeMap<String, String>), ControlError> {
        let kind = IntegrationKind::parse(&rec.kind).map_err(ControlError::Internal)?;
        let plain = self.keyring.open(&rec.key_id, &integration_aad(&rec.environment_id, &rec.name), &rec.sealed)?;
        let keys = serde_json::from_slice(&plain)
            .map_err(|e| ControlError::Internal(format!("integration {:?} does not hold keys: {e}", rec.name)))?;
        Ok((kind, keys))
    }

    /// The variables `refs` give a workload of environment `env` whose own scopes are `scopes` (most specific
    /// first; the environment is looked at last). The error names the reference (by its index in
    /// `spec.secret_refs`) that cannot be resolved, as FAILED_PRECONDITION.
    pub fn resolve(
        &self,
        env: &str,
        scopes: &[Scope],
        refs: &[SecretRef],
    ) -> Result<Vec<(String, String)>, ControlError> {
        let mut out = Vec::new();
        for (i, r) in refs.iter().enumerate() {
            let vars = self.variables(env, scopes, r).map_err(|e| match e {
                ControlError::FailedPrecondition(m) => {
                    ControlError::FailedPrecondition(format!("spec.secret_refs[{i}]: {m}"))
                }
                other => other,
            })?;
            let exposed =
                r.expose(vars).map_err(|m| ControlError::FailedPrecondition(format!("spec.secret_refs[{i}]: {m}")))?;
            out.extend(exposed);
        }
        Ok(out)
    }

    fn variables(&self, env: &str, scopes: &[Scope], r: &SecretRef) -> Result<Vec<Variable>, ControlError> {
        match &r.source {
            RefSource::Secret(name) => {
                let mut searched: Vec<String> = Vec::new();
                for scope in scopes.iter().cloned().chain(std::iter::once(Scope::environment())) {
                    if let Some(rec) = self.store.read(|s| s.secrets().get(env, scope.kind, &scope.name, name))? {
                        let value = self.open_secret(&rec)?;
                        return Ok(vec![Variable { name: name.clone(), key: None, value }]);
                    }
                    searched.push(scope.describe());
                }
                Err(ControlError::FailedPrecondition(format!(
                    "secret {name:?} does not exist in this environment (looked in scopes {}): create it first \
                     (`compute secret set {name}`, or Secret.from_local_env)",
                    searched.join(", ")
                )))
            }
            RefSource::Integration(name) => {
                let rec = self.store.read(|s| s.secrets().integration(env, name))?.ok_or_else(|| {
                    ControlError::FailedPrecondition(format!(
                        "integration {name:?} does not exist in this environment: create it first (`compute \
                         integration set {name} --kind KIND --set KEY=VALUE ...`)"
                    ))
                })?;
                let (kind, keys) = self.open_integration(&rec)?;
                Ok(kind.variables(&keys))
            }
        }
    }

    /// Seals every secret and integration under a new key, then makes it the only key: the old ciphertext is
    /// overwritten in the database file (secure delete) and its write-ahead log truncated. Returns the new
    /// key's id and how many values were resealed.
    pub fn rotate_key(&self) -> Result<(String, usize), ControlError> {
        let new_id = self.keyring.begin_rotation()?;
        let count = self.store.write(|r| {
            let repo = r.secrets();
            let mut n = 0;
            for rec in repo.all()? {
                let scope = Scope { kind: rec.scope, name: rec.scope_ref.clone() };
                let aad = secret_aad(&rec.environment_id, &scope, &rec.name);
                let (kid, sealed) = self.reseal(&rec.key_id, &aad, &rec.sealed).map_err(store_err)?;
                repo.reseal(SealedTable::Secrets, &rec.id, &kid, &sealed)?;
                n += 1;
            }
            for rec in repo.integrations(None)? {
                let aad = integration_aad(&rec.environment_id, &rec.name);
                let (kid, sealed) = self.reseal(&rec.key_id, &aad, &rec.sealed).map_err(store_err)?;
                repo.reseal(SealedTable::Integrations, &rec.id, &kid, &sealed)?;
                n += 1;
            }
            Ok(n)
        })?;
        self.store.checkpoint()?;
        self.keyring.finish_rotation()?;
        tracing::info!(key = %new_id, resealed = count, "secrets key rotated");
        Ok((new_id, count))
    }

    fn reseal(
        &self,
        key_id: &str,
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<(String, Vec<u8>), compute_secrets::SecretsError> {
        let plain = self.keyring.open(key_id, aad, sealed)?;
        self.keyring.seal(aad, &plain)
    }
}

/// A sealing failure inside a store transaction aborts it (nothing is half-rotated).
fn store_err(e: compute_secrets::SecretsError) -> compute_store::StoreError {
    compute_store::StoreError::Aborted(e.to_string())
}

fn view(rec: &IntegrationRecord, kind: IntegrationKind, keys: &BTreeMap<String, String>) -> IntegrationView {
    IntegrationView {
        name: rec.name.clone(),
        kind: kind.as_str().into(),
        keys: keys.keys().cloned().collect(),
        variables: kind.variables(keys).into_iter().map(|v| v.name).collect(),
        updated_at: rec.updated_at,
    }
}
