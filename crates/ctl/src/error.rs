//! The library's error type.

use std::path::PathBuf;
use std::time::Duration;

use crate::resolve::ResolveError;

/// Everything that can go wrong talking to a CRI endpoint.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The endpoint string cannot be understood.
    #[error("invalid endpoint '{endpoint}': {reason}")]
    Endpoint {
        endpoint: String,
        reason: &'static str,
    },
    /// The transport could not be set up; `reason` is the innermost cause (tonic's own chain repeats it).
    #[error("cannot connect to {endpoint}: {reason}")]
    Connect { endpoint: String, reason: String },
    /// Connecting took longer than the configured timeout.
    #[error("connecting to {endpoint} timed out after {timeout:?}")]
    ConnectTimeout { endpoint: String, timeout: Duration },
    /// A CRI call returned an error status.
    #[error("{call}: {}: {}", code_name(.status.code()), .status.message())]
    Rpc {
        call: &'static str,
        status: Box<tonic::Status>,
    },
    /// A CRI call succeeded but its answer lacks something it must carry.
    #[error("{call}: the runtime's answer has no {what}")]
    Incomplete {
        call: &'static str,
        what: &'static str,
    },
    /// An id or name given by the user matches nothing, or more than one thing.
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    /// A local file (a container log, a pod log directory) cannot be used.
    #[error("{what} {}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A duration string cannot be parsed.
    #[error("invalid duration '{0}': expected a number with an optional unit (ms, s, m, h), e.g. 500ms or 10s")]
    Duration(String),
}

impl CtlError {
    /// The gRPC status code when this is an RPC error.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            CtlError::Rpc { status, .. } => Some(status.code()),
            _ => None,
        }
    }

    /// True when the runtime answered NotFound.
    pub fn is_not_found(&self) -> bool {
        self.code() == Some(tonic::Code::NotFound)
    }
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "ok",
        Cancelled => "cancelled",
        Unknown => "unknown error",
        InvalidArgument => "invalid argument",
        DeadlineExceeded => "deadline exceeded",
        NotFound => "not found",
        AlreadyExists => "already exists",
        PermissionDenied => "permission denied",
        ResourceExhausted => "resource exhausted",
        FailedPrecondition => "failed precondition",
        Aborted => "aborted",
        OutOfRange => "out of range",
        Unimplemented => "unimplemented",
        Internal => "internal error",
        Unavailable => "unavailable",
        DataLoss => "data loss",
        Unauthenticated => "unauthenticated",
    }
}

/// Parses `500ms`, `10s`, `2m`, `1h` or a bare number of seconds (`1.5`).
pub fn parse_duration(text: &str) -> Result<Duration, CtlError> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| CtlError::Duration(text.to_string()))?;
    let scale = match unit.trim() {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(CtlError::Duration(text.to_string())),
    };
    Duration::try_from_secs_f64(value * scale).map_err(|_| CtlError::Duration(text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration(" 1h ").unwrap(), Duration::from_secs(3600));
        for bad in ["", "s", "ten", "10x", "-1s", "1e400", "1.2.3"] {
            assert!(parse_duration(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn rpc_errors_read_as_sentences() {
        let e = CtlError::Rpc {
            call: "RunPodSandbox",
            status: Box::new(tonic::Status::not_found("no such image")),
        };
        assert_eq!(e.to_string(), "RunPodSandbox: not found: no such image");
        assert!(e.is_not_found());
    }
}
