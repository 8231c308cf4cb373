//! Client credentials, token issue and verification, and the environment a caller acts in.

use std::sync::Arc;
use std::time::Duration;

use compute_store::{Client, Environment, SigningKey, Store};
use rand::TryRng;

use crate::token::{self, Claims};
use crate::{ids, secret_hash, AuthError, ControlError};

/// The authenticated caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The client the token was issued to.
    pub client_id: String,
    /// The environment every resource the request touches must belong to.
    pub environment_id: String,
    /// The token's expiry, seconds since the epoch.
    pub expires_at: i64,
}

/// A freshly created client's credentials. The secret exists only here; the store keeps its hash.
#[derive(Debug, Clone)]
pub struct NewClientCredentials {
    /// Client id.
    pub client_id: String,
    /// Client secret, shown once.
    pub client_secret: String,
    /// Primary environment id.
    pub environment_id: String,
}

/// What `GetToken` hands back.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    /// The signed token.
    pub access_token: String,
    /// Expiry, seconds since the epoch.
    pub expires_at: i64,
    /// Lifetime in seconds.
    pub expires_in: i64,
    /// The environment the token acts in.
    pub environment_id: String,
    /// The client's primary environment id.
    pub primary_environment: String,
    /// Every environment the client may request a token for, id → name.
    pub environments: Vec<(String, String)>,
}

/// Identity service over the store.
pub struct Auth {
    store: Arc<Store>,
    token_ttl: Duration,
}

impl Auth {
    pub(crate) fn new(store: Arc<Store>, token_ttl: Duration) -> Self {
        Self { store, token_ttl }
    }

    /// Creates a signing key if none is active.
    pub(crate) fn ensure_signing_key(&self) -> Result<(), ControlError> {
        self.store.write(|r| {
            if r.signing_keys().active()?.is_empty() {
                r.signing_keys().insert(&new_signing_key())?;
            }
            Ok(())
        })?;
        Ok(())
    }

    /// Makes a new signing key current. With `retire_previous`, every older key stops verifying at once, which
    /// invalidates every token issued before; without it, old tokens keep working until they expire.
    pub fn rotate_signing_key(&self, retire_previous: bool) -> Result<String, ControlError> {
        let key = new_signing_key();
        self.store.write(|r| {
            r.signing_keys().insert(&key)?;
            if retire_previous {
                r.signing_keys().retire_all_but(&key.kid, compute_store::now_millis())?;
            }
            Ok(())
        })?;
        Ok(key.kid)
    }

    /// Creates a client whose primary environment is `environment` (id or name). An `all_environments` client
    /// may request tokens for any environment.
    pub fn create_client(
        &self,
        name: &str,
        environment: &str,
        all_environments: bool,
    ) -> Result<NewClientCredentials, ControlError> {
        if name.trim().is_empty() || name.len() > 200 {
            return Err(ControlError::InvalidArgument("client name must be 1-200 characters".into()));
        }
        let secret = ids::client_secret();
        let secret_hash = secret_hash::hash(&secret)?;
        let env = self.resolve_environment(environment)?;
        let client = Client {
            id: ids::client_id(),
            name: name.into(),
            secret_hash,
            environment_id: env.id.clone(),
            all_environments,
            created_at: compute_store::now_millis(),
            revoked_at: None,
        };
        self.store.write(|r| r.clients().insert(&client))?;
        Ok(NewClientCredentials { client_id: client.id, client_secret: secret, environment_id: env.id })
    }

    /// Every client.
    pub fn clients(&self) -> Result<Vec<Client>, ControlError> {
        Ok(self.store.read(|r| r.clients().list())?)
    }

    /// Revokes a client: its secret stops working and so do the tokens it already holds.
    pub fn revoke_client(&self, client_id: &str) -> Result<(), ControlError> {
        if self.store.write(|r| r.clients().revoke(client_id, compute_store::now_millis()))? {
            Ok(())
        } else {
            Err(ControlError::NotFound(format!("client {client_id:?} does not exist")))
        }
    }

    /// `GetToken`: checks the client's secret and issues a token for `scope` (`env:<id or name>`) or, without a
    /// scope, for the client's primary environment.
    pub fn get_token(
        &self,
        client_id: &str,
        client_secret: &str,
        grant_type: &str,
        scope: Option<&str>,
    ) -> Result<IssuedToken, ControlError> {
        if !grant_type.is_empty() && grant_type != "client_credentials" {
            return Err(AuthError::UnsupportedGrant(grant_type.into()).into());
        }
        let client = self.store.read(|r| r.clients().get(client_id))?;
        // Hash even for an unknown client so that timing does not reveal which ids exist.
        let Some(client) = client else {
            let _ = secret_hash::verify(client_secret, dummy_hash());
            return Err(AuthError::InvalidCredentials.into());
        };
        if !secret_hash::verify(client_secret, &client.secret_hash) {
            return Err(AuthError::InvalidCredentials.into());
        }
        if client.revoked_at.is_some() {
            return Err(AuthError::Revoked(client.id).into());
        }
        let environments = self.accessible_environments(&client)?;
        let environment_id = match scope.map(str::trim).filter(|s| !s.is_empty()) {
            None => client.environment_id.clone(),
            Some(scope) => {
                let wanted = scope.strip_prefix("env:").ok_or_else(|| AuthError::InvalidScope(scope.into()))?;
                let env = self.resolve_environment(wanted)?;
                if !environments.iter().any(|e| e.id == env.id) {
                    return Err(AuthError::EnvironmentDenied { client: client.id, environment: wanted.into() }.into());
                }
                env.id
            }
        };
        let key = self.signing_key()?;
        let now = now_secs();
        let ttl = self.token_ttl.as_secs() as i64;
        let claims = Claims {
            iss: token::ISSUER.into(),
            sub: client.id.clone(),
            environment_id: environment_id.clone(),
            iat: now,
            exp: now + ttl,
            jti: ids::random_token(16),
        };
        Ok(IssuedToken {
            access_token: token::sign(&claims, &key),
            expires_at: claims.exp,
            expires_in: ttl,
            environment_id,
            primary_environment: client.environment_id,
            environments: environments.into_iter().map(|e| (e.id, e.name)).collect(),
        })
    }

    /// Verifies a bearer token and the environment the request asks for (`x-chalk-env-id`, by id or name;
    /// empty means the token's own). The token's client must still exist and not be revoked.
    pub fn authenticate(&self, bearer: &str, requested_env: Option<&str>) -> Result<Principal, ControlError> {
        let kid = token::key_id(bearer).map_err(AuthError::from)?;
        let key = self.store.read(|r| Ok(r.signing_keys().active()?.into_iter().find(|k| k.kid == kid)))?;
        let key = key.ok_or(AuthError::InvalidToken(token::TokenError::UnknownKey))?;
        let claims = token::verify(bearer, &key, now_secs()).map_err(AuthError::from)?;
        // A client that no longer exists is as good as revoked.
        let client =
            self.store.read(|r| r.clients().get(&claims.sub))?.ok_or_else(|| AuthError::Revoked(claims.sub.clone()))?;
        if client.revoked_at.is_some() {
            return Err(AuthError::Revoked(client.id).into());
        }
        if let Some(wanted) = requested_env.map(str::trim).filter(|s| !s.is_empty()) {
            if wanted != claims.environment_id {
                let matches_by_name = self
                    .store
                    .read(|r| r.environments().get_by_name(wanted))?
                    .is_some_and(|e| e.id == claims.environment_id);
                if !matches_by_name {
                    return Err(AuthError::EnvironmentMismatch {
                        token_env: claims.environment_id,
                        header_env: wanted.into(),
                    }
                    .into());
                }
            }
        }
        Ok(Principal { client_id: claims.sub, environment_id: claims.environment_id, expires_at: claims.exp })
    }

    /// The environment with this id or, failing that, this name.
    pub fn resolve_environment(&self, id_or_name: &str) -> Result<Environment, ControlError> {
        self.store
            .read(|r| match r.environments().get(id_or_name)? {
                Some(e) => Ok(Some(e)),
                None => r.environments().get_by_name(id_or_name),
            })?
            .ok_or_else(|| AuthError::UnknownEnvironment(id_or_name.into()).into())
    }

    /// Whether the client is an operator (may act in every environment, like the admin client made on first
    /// start): only operators may run server-wide maintenance such as volume garbage collection.
    pub fn is_operator(&self, client_id: &str) -> Result<bool, ControlError> {
        Ok(self
            .store
            .read(|r| r.clients().get(client_id))?
            .is_some_and(|c| c.all_environments && c.revoked_at.is_none()))
    }

    fn accessible_environments(&self, client: &Client) -> Result<Vec<Environment>, ControlError> {
        let all = self.store.read(|r| r.environments().list())?;
        Ok(all.into_iter().filter(|e| client.all_environments || e.id == client.environment_id).collect())
    }

    fn signing_key(&self) -> Result<SigningKey, ControlError> {
        self.store
            .read(|r| r.signing_keys().active())?
            .into_iter()
            .next()
            .ok_or_else(|| ControlError::Internal("no active signing key".into()))
    }
}

/// A real Argon2id hash of a random string, verified against when the client id is unknown so that the
/// answer takes as long as for a known id.
fn dummy_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| secret_hash::hash(&ids::client_secret()).unwrap_or_default())
}

fn new_signing_key() -> SigningKey {
    let mut secret = vec![0u8; 32];
    rand::rngs::SysRng.try_fill_bytes(&mut secret).expect("the OS random number generator works");
    SigningKey {
        kid: format!("k-{}", ids::random_token(10)),
        secret,
        created_at: compute_store::now_millis(),
        retired_at: None,
    }
}

fn now_secs() -> i64 {
    compute_store::now_millis() / 1000
}
