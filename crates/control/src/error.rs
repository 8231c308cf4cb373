use std::path::PathBuf;

use compute_store::StoreError;

use crate::token::TokenError;

/// Why a control-plane operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The data directory could not be created or read.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A request named something that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A request was malformed; the message names the field and what is allowed.
    #[error("{0}")]
    InvalidArgument(String),
    /// Authentication or authorization failed.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// A name or id is already taken.
    #[error("{0}")]
    AlreadyExists(String),
    /// The resource is not in a state that allows the operation.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The server cannot do this now (e.g. it has no runtime).
    #[error("{0}")]
    Unavailable(String),
    /// A file operation inside a sandbox failed.
    #[error("{message}")]
    File {
        /// What kind of failure.
        kind: compute_runtime::FailureKind,
        /// What failed.
        message: String,
        /// The POSIX errno, if known.
        errno: Option<i32>,
    },
    /// The request asks for something this server does not do yet; the message says what.
    #[error("{0}")]
    Unimplemented(String),
    /// A deadline passed before the operation finished (a function call's `grpc-timeout`).
    #[error("{0}")]
    DeadlineExceeded(String),
    /// A limit was reached (a function's queue is full).
    #[error("{0}")]
    ResourceExhausted(String),
    /// A function's replica answered a call with an error status (user code raised): passed to the caller as is.
    #[error("{}", .0.message)]
    FunctionFailed(compute_ingress::GrpcStatus),
    /// The store failed.
    #[error(transparent)]
    Store(StoreError),
    /// Sealing or opening a secret failed.
    #[error(transparent)]
    Secrets(#[from] compute_secrets::SecretsError),
    /// Anything else that is our fault.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StoreError> for ControlError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::AlreadyExists { what } => ControlError::AlreadyExists(format!("{what} already exists")),
            other => ControlError::Store(other),
        }
    }
}

/// Why a caller could not be authenticated or is not allowed to do what it asked.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Unknown client id or wrong secret (deliberately not saying which).
    #[error("invalid client credentials: check CHALK_CLIENT_ID and CHALK_CLIENT_SECRET (`compute env` prints them)")]
    InvalidCredentials,
    /// The request carried no bearer token.
    #[error("missing credentials: send `authorization: Bearer <token>` (obtain one with AuthService/GetToken)")]
    MissingToken,
    /// The token could not be verified.
    #[error("invalid access token: {0}")]
    InvalidToken(#[from] TokenError),
    /// The client that owns the token (or asked for one) was revoked.
    #[error("client {0} has been revoked")]
    Revoked(String),
    /// `GetToken.grant_type` was not `client_credentials`.
    #[error("unsupported grant_type {0:?}: only \"client_credentials\" is supported")]
    UnsupportedGrant(String),
    /// `GetToken.scope` was not of the form `env:<environment id or name>`.
    #[error("invalid scope {0:?}: expected \"env:<environment id or name>\"")]
    InvalidScope(String),
    /// The scope or header named an environment that does not exist.
    #[error("environment {0:?} does not exist")]
    UnknownEnvironment(String),
    /// The client may not act in that environment.
    #[error("client {client} has no access to environment {environment:?}")]
    EnvironmentDenied {
        /// The client.
        client: String,
        /// The environment it asked for.
        environment: String,
    },
    /// The request's `x-chalk-env-id` names another environment than the token's.
    #[error("the access token is for environment {token_env:?} but x-chalk-env-id names {header_env:?}; request a token with scope \"env:{header_env}\"")]
    EnvironmentMismatch {
        /// The token's environment id.
        token_env: String,
        /// What the header said.
        header_env: String,
    },
}
