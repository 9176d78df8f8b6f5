//! The shim's errors, and their one conversion to ttrpc status codes.

use std::path::PathBuf;

use containerd_shim_protos::ttrpc::{self, Code};
use sandbox::{ErrorKind, SandboxError};

/// An error of a shim request.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// The configuration file is invalid.
    #[error("invalid configuration {path}: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// File system failure.
    #[error("{what} {path}")]
    Io {
        /// The operation.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The request cannot be served as given.
    #[error("{0}")]
    InvalidArgument(String),
    /// No such task or exec.
    #[error("{0} not found")]
    NotFound(String),
    /// The id is taken.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// Not in a state that allows the request.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Not implemented by this runtime.
    #[error("{0} is not supported by the hyper runtime")]
    Unimplemented(&'static str),
    /// The sandbox manager failed.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// The guest agent failed.
    #[error("agent {op}")]
    Agent {
        /// The call.
        op: &'static str,
        /// The cause.
        #[source]
        source: protocol::client::RpcError,
    },
    /// Network set-up in containerd's namespace failed.
    #[error(transparent)]
    Network(#[from] network::NetworkError),
    /// Building the rootfs disk failed.
    #[error("building the rootfs disk: {0}")]
    Rootfs(String),
    /// The shim could not start (bad configuration).
    #[error("shim not initialised: {0}")]
    NotReady(String),
}

impl ShimError {
    /// The ttrpc status code.
    pub fn code(&self) -> Code {
        match self {
            ShimError::InvalidArgument(_) | ShimError::Config { .. } => Code::INVALID_ARGUMENT,
            ShimError::NotFound(_) => Code::NOT_FOUND,
            ShimError::AlreadyExists(_) => Code::ALREADY_EXISTS,
            ShimError::FailedPrecondition(_) | ShimError::NotReady(_) => Code::FAILED_PRECONDITION,
            ShimError::Unimplemented(_) => Code::UNIMPLEMENTED,
            ShimError::Sandbox(e) => match e.kind() {
                ErrorKind::InvalidArgument => Code::INVALID_ARGUMENT,
                ErrorKind::NotFound => Code::NOT_FOUND,
                ErrorKind::AlreadyExists => Code::ALREADY_EXISTS,
                ErrorKind::FailedPrecondition => Code::FAILED_PRECONDITION,
                ErrorKind::ResourceExhausted => Code::RESOURCE_EXHAUSTED,
                ErrorKind::DeadlineExceeded => Code::DEADLINE_EXCEEDED,
                ErrorKind::Unavailable => Code::UNAVAILABLE,
                ErrorKind::Internal => Code::INTERNAL,
            },
            ShimError::Agent { source, .. } => match source.code() {
                Some(Code::NOT_FOUND) => Code::NOT_FOUND,
                Some(Code::INVALID_ARGUMENT) => Code::INVALID_ARGUMENT,
                Some(Code::FAILED_PRECONDITION) => Code::FAILED_PRECONDITION,
                _ => Code::UNAVAILABLE,
            },
            ShimError::Io { .. } | ShimError::Network(_) | ShimError::Rootfs(_) => Code::INTERNAL,
        }
    }
}

impl From<ShimError> for ttrpc::Error {
    fn from(e: ShimError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), sandbox::error_chain(&e)))
    }
}

/// Maps an agent error of `op`.
pub fn agent(op: &'static str) -> impl FnOnce(protocol::client::RpcError) -> ShimError {
    move |source| ShimError::Agent { op, source }
}
