/// Why a runtime operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A system call or file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A helper command (ip, nft, runsc) failed.
    #[error("{command} failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed.
        stderr: String,
    },
    /// The node cannot run sandboxes as configured.
    #[error("{0}")]
    Unsupported(String),
    /// The sandbox's agent did not start or broke the protocol.
    #[error("sandbox agent: {0}")]
    Agent(String),
    /// A sandbox with this id is already running.
    #[error("sandbox {0} already exists")]
    AlreadyExists(String),
    /// The sandbox is gone (stopped, or its agent exited).
    #[error("sandbox {0} is not running")]
    NotRunning(String),
    /// A request is larger than the agent protocol carries (it never reaches the agent).
    #[error("{0}")]
    TooLarge(String),
    /// A file transfer failed inside the sandbox.
    #[error("{message}")]
    File {
        /// What kind of failure.
        kind: compute_agent_protocol::FailureKind,
        /// What failed.
        message: String,
        /// The POSIX errno, if known.
        errno: Option<i32>,
    },
}

impl RuntimeError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        RuntimeError::Io { what: what.into(), source }
    }
}
