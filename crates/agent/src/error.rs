//! The one place where agent errors become ttrpc status codes.

use ttrpc::Code;

use crate::block::BlockError;
use crate::net::NetError;
use crate::runtime::ContainerError;

/// Any failure of an RPC handler.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Container(#[from] ContainerError),
    #[error(transparent)]
    SysInfo(#[from] crate::sysinfo::SysInfoError),
    /// The request is malformed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The request is well-formed but not allowed in this configuration.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
}

impl AgentError {
    /// The status code this error is reported with.
    pub fn code(&self) -> Code {
        match self {
            AgentError::Block(e) => match e {
                BlockError::MissingDevice
                | BlockError::InvalidPath(_)
                | BlockError::InvalidSerial(_)
                | BlockError::NotABlockDevice(_)
                | BlockError::TooLong { .. }
                | BlockError::OffsetPastEnd { .. } => Code::INVALID_ARGUMENT,
                BlockError::SerialNotFound(_) | BlockError::DeviceNotFound(_) => Code::NOT_FOUND,
                BlockError::Io { source, .. } => io_code(source),
            },
            AgentError::Net(e) => match e {
                NetError::InvalidName(_)
                | NetError::InvalidMac(_)
                | NetError::InvalidAddress(_)
                | NetError::InvalidPrefix(_)
                | NetError::InvalidArgument(_) => Code::INVALID_ARGUMENT,
                NetError::NoSuchInterface(_) => Code::NOT_FOUND,
                NetError::Sys { source, .. } => io_code(source),
            },
            AgentError::Container(e) => match e {
                ContainerError::InvalidId(_)
                | ContainerError::InvalidArgument(_)
                | ContainerError::InvalidSpec(_)
                | ContainerError::Exec(_) => Code::INVALID_ARGUMENT,
                ContainerError::NotFound(_) | ContainerError::ExecNotFound { .. } => {
                    Code::NOT_FOUND
                }
                ContainerError::AlreadyExists(_) => Code::ALREADY_EXISTS,
                ContainerError::Unimplemented(_) => Code::UNIMPLEMENTED,
                ContainerError::InvalidState { .. }
                | ContainerError::StdinClosed
                | ContainerError::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
                ContainerError::Timeout => Code::DEADLINE_EXCEEDED,
                ContainerError::Setup(_) | ContainerError::Sys { .. } => Code::INTERNAL,
            },
            AgentError::SysInfo(_) => Code::INTERNAL,
            AgentError::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            AgentError::PermissionDenied(_) => Code::PERMISSION_DENIED,
        }
    }

    /// The message: this error and its sources, joined.
    pub fn message(&self) -> String {
        let mut message = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            let text = cause.to_string();
            if !message.ends_with(&text) {
                message.push_str(": ");
                message.push_str(&text);
            }
            source = cause.source();
        }
        message
    }
}

fn io_code(e: &std::io::Error) -> Code {
    match e.raw_os_error() {
        Some(libc::ENOENT | libc::ENODEV | libc::ENXIO) => Code::NOT_FOUND,
        Some(libc::EPERM | libc::EACCES) => Code::PERMISSION_DENIED,
        Some(libc::EINVAL) => Code::INVALID_ARGUMENT,
        _ => Code::INTERNAL,
    }
}

impl From<AgentError> for ttrpc::Error {
    fn from(e: AgentError) -> Self {
        let code = e.code();
        let message = e.message();
        if code == Code::INTERNAL {
            log::warn!("internal error: {message}");
        }
        ttrpc::error::get_rpc_status(code, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_messages() {
        let e = AgentError::from(BlockError::TooLong { length: 5, max: 4 });
        assert_eq!(e.code(), Code::INVALID_ARGUMENT);
        let e = AgentError::from(BlockError::Io {
            path: "/dev/vda".into(),
            source: std::io::Error::from_raw_os_error(libc::EIO),
        });
        assert_eq!(e.code(), Code::INTERNAL);
        assert!(
            e.message().starts_with("I/O on /dev/vda failed: "),
            "{}",
            e.message()
        );
        let e = AgentError::from(ContainerError::AlreadyExists("c".into()));
        assert_eq!(e.code(), Code::ALREADY_EXISTS);
        let e = AgentError::from(ContainerError::NotFound("c".into()));
        assert_eq!(e.code(), Code::NOT_FOUND);
        let e = AgentError::PermissionDenied("no".into());
        assert_eq!(e.code(), Code::PERMISSION_DENIED);
        match ttrpc::Error::from(e) {
            ttrpc::Error::RpcStatus(s) => assert_eq!(s.code(), Code::PERMISSION_DENIED),
            other => panic!("unexpected {other:?}"),
        }
    }
}
