//! Binding the ttrpc server on vsock (guest) or a Unix socket (host mode).

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use crate::service::AgentService;

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// AF_VSOCK, any CID, this port.
    Vsock(u32),
    /// A Unix socket path; a stale socket file there is replaced.
    Unix(PathBuf),
}

impl ListenAddr {
    /// Parses `unix:///path` or `vsock://<port>`.
    pub fn parse(text: &str) -> Option<ListenAddr> {
        if let Some(path) = text.strip_prefix("unix://") {
            return (!path.is_empty()).then(|| ListenAddr::Unix(PathBuf::from(path)));
        }
        let port = text.strip_prefix("vsock://")?;
        let port = port.strip_prefix("-1:").unwrap_or(port);
        port.parse().ok().map(ListenAddr::Vsock)
    }

    fn ttrpc_addr(&self) -> String {
        match self {
            ListenAddr::Vsock(port) => format!("vsock://-1:{port}"),
            ListenAddr::Unix(path) => format!("unix://{}", path.display()),
        }
    }
}

/// The server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A non-socket file is in the way.
    #[error("{0} exists and is not a socket")]
    PathInUse(PathBuf),
    /// Removing a stale socket failed.
    #[error("removing stale socket {path} failed")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Binding or starting the ttrpc server failed.
    #[error("ttrpc server on {addr} failed")]
    Ttrpc {
        addr: String,
        #[source]
        source: ttrpc::Error,
    },
}

fn remove_stale_socket(path: &Path) -> Result<(), ServerError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|source| ServerError::RemoveStale {
                path: path.to_owned(),
                source,
            })
        }
        Ok(_) => Err(ServerError::PathInUse(path.to_owned())),
        Err(_) => Ok(()),
    }
}

/// Binds, listens and starts serving in background threads. When this returns, connections
/// are already queued by the kernel, so readiness may be signalled.
pub fn serve(addr: &ListenAddr, service: AgentService) -> Result<ttrpc::Server, ServerError> {
    if let ListenAddr::Unix(path) = addr {
        remove_stale_socket(path)?;
    }
    let text = addr.ttrpc_addr();
    let ttrpc_err = |source| ServerError::Ttrpc {
        addr: text.clone(),
        source,
    };
    // Per connection, ttrpc keeps between `min` and `max` idle handler threads and starts more
    // when fewer than `min` are idle. Long polls (ReadStream, GetEvents, WaitProcess) hold a
    // thread each, so keep a few idle ones ready: a burst of long polls must not delay a quick
    // call behind the thread start-up.
    let mut server = ttrpc::Server::new()
        .set_thread_count_min(4)
        .set_thread_count_default(8)
        .set_thread_count_max(16)
        .bind(&text)
        .map_err(ttrpc_err)?
        .register_service(service.into_methods());
    server.start().map_err(ttrpc_err)?;
    Ok(server)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(
            ListenAddr::parse("unix:///run/a.sock"),
            Some(ListenAddr::Unix("/run/a.sock".into()))
        );
        assert_eq!(
            ListenAddr::parse("vsock://1024"),
            Some(ListenAddr::Vsock(1024))
        );
        assert_eq!(
            ListenAddr::parse("vsock://-1:2048"),
            Some(ListenAddr::Vsock(2048))
        );
        assert_eq!(ListenAddr::parse("unix://"), None);
        assert_eq!(ListenAddr::parse("tcp://1.2.3.4:5"), None);
        assert_eq!(ListenAddr::parse("/run/a.sock"), None);
    }
}
