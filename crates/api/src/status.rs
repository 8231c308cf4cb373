//! Mapping control-plane errors to gRPC statuses, and gRPC codes to Connect's names and HTTP statuses.

use compute_control::{AuthError, ControlError, FailureKind};
use tonic::{Code, Status};

/// The gRPC status a control-plane error is reported as.
pub fn from_control(err: ControlError) -> Status {
    match err {
        ControlError::NotFound(m) => Status::not_found(m),
        ControlError::InvalidArgument(m) => Status::invalid_argument(m),
        ControlError::AlreadyExists(m) => Status::already_exists(m),
        ControlError::Auth(a) => from_auth(a),
        ControlError::FailedPrecondition(m) => Status::failed_precondition(m),
        ControlError::Unavailable(m) => Status::unavailable(m),
        ControlError::Unimplemented(m) => Status::unimplemented(m),
        ControlError::DeadlineExceeded(m) => Status::deadline_exceeded(m),
        ControlError::ResourceExhausted(m) => Status::resource_exhausted(m),
        ControlError::FunctionFailed(s) => match s.details {
            Some(d) => Status::with_details(tonic::Code::from_i32(s.code), s.message, d),
            None => Status::new(tonic::Code::from_i32(s.code), s.message),
        },
        ControlError::File { kind, message, errno } => filesystem_status(kind, message, errno),
        e @ (ControlError::Store(_)
        | ControlError::Internal(_)
        | ControlError::Secrets(_)
        | ControlError::DataDir { .. }) => {
            tracing::error!(error = %e, "internal error");
            Status::internal(e.to_string())
        }
    }
}

/// The gRPC status a volume error is reported as.
pub fn from_volume(err: compute_control::volume::VolumeError) -> Status {
    use compute_control::volume::VolumeError as E;
    match err {
        E::NotFound(m) => Status::not_found(m),
        E::InvalidArgument(m) => Status::invalid_argument(m),
        E::AlreadyExists(m) => Status::already_exists(m),
        E::FailedPrecondition(m) => Status::failed_precondition(m),
        E::Url(u) => Status::permission_denied(u.to_string()),
        e @ (E::Storage(_) | E::Store(_) | E::Internal(_)) => {
            tracing::error!(error = %e, "volume store error");
            Status::internal(e.to_string())
        }
    }
}

/// A filesystem failure inside a sandbox, with `chalk.sandbox.v2.FilesystemErrorDetail` attached as the SDK
/// expects (it raises `SandboxFileSystemError` with the error kind and errno).
pub fn filesystem_status(kind: FailureKind, message: String, errno: Option<i32>) -> Status {
    use compute_proto::chalk::sandbox::v2::{FilesystemError, FilesystemErrorDetail};
    use prost::Message;
    let (code, fs) = match kind {
        FailureKind::NotFound => (Code::NotFound, FilesystemError::NotFound),
        FailureKind::PermissionDenied => (Code::PermissionDenied, FilesystemError::PermissionDenied),
        FailureKind::IsADirectory | FailureKind::NotADirectory | FailureKind::NotARegularFile => {
            (Code::FailedPrecondition, FilesystemError::FailedPrecondition)
        }
        FailureKind::Invalid => (Code::InvalidArgument, FilesystemError::InvalidArgument),
        FailureKind::NoSpace | FailureKind::TooLarge => (Code::ResourceExhausted, FilesystemError::ResourceExhausted),
        FailureKind::Io => (Code::Internal, FilesystemError::Internal),
    };
    let detail = FilesystemErrorDetail { error: fs as i32, posix_errno: errno };
    let any = prost_types::Any {
        type_url: "type.googleapis.com/chalk.sandbox.v2.FilesystemErrorDetail".into(),
        value: detail.encode_to_vec(),
    };
    let rpc = crate::connect::RpcStatus { code: code as i32, message: message.clone(), details: vec![any] };
    Status::with_details(code, message, rpc.encode_to_vec().into())
}

/// The gRPC status an authentication failure is reported as.
pub fn from_auth(err: AuthError) -> Status {
    let msg = err.to_string();
    match err {
        AuthError::InvalidCredentials
        | AuthError::MissingToken
        | AuthError::InvalidToken(_)
        | AuthError::Revoked(_) => Status::unauthenticated(msg),
        AuthError::UnsupportedGrant(_) | AuthError::InvalidScope(_) => Status::invalid_argument(msg),
        AuthError::UnknownEnvironment(_) => Status::not_found(msg),
        AuthError::EnvironmentDenied { .. } | AuthError::EnvironmentMismatch { .. } => Status::permission_denied(msg),
    }
}

/// Connect's string name for a gRPC code.
pub fn connect_code(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "canceled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// The HTTP status Connect's unary protocol uses for a gRPC code.
pub fn connect_http_status(code: Code) -> http::StatusCode {
    use http::StatusCode as S;
    match code {
        Code::Ok => S::OK,
        Code::Cancelled => S::from_u16(499).expect("499 is a valid status"),
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => S::BAD_REQUEST,
        Code::DeadlineExceeded => S::GATEWAY_TIMEOUT,
        Code::NotFound => S::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => S::CONFLICT,
        Code::PermissionDenied => S::FORBIDDEN,
        Code::ResourceExhausted => S::TOO_MANY_REQUESTS,
        Code::Unimplemented => S::NOT_IMPLEMENTED,
        Code::Unavailable => S::SERVICE_UNAVAILABLE,
        Code::Unauthenticated => S::UNAUTHORIZED,
        Code::Unknown | Code::Internal | Code::DataLoss => S::INTERNAL_SERVER_ERROR,
    }
}

/// Metric label for a code, e.g. `NotFound`.
pub fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
