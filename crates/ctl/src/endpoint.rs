//! CRI endpoints as kubelet and crictl spell them.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::CtlError;

/// hyperd's socket, the default endpoint.
pub const DEFAULT_ENDPOINT: &str = "unix:///run/hyperd/hyperd.sock";

/// Where a CRI server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `unix:///path/to.sock`, `unix:relative.sock` or a bare path (`/run/x.sock`, `./x.sock`).
    Unix(PathBuf),
    /// `tcp://host:port` (plain HTTP/2; CRI has no TLS convention).
    Tcp { host: String, port: u16 },
}

impl FromStr for Endpoint {
    type Err = CtlError;

    fn from_str(text: &str) -> Result<Self, CtlError> {
        let bad = |reason| CtlError::Endpoint {
            endpoint: text.to_string(),
            reason,
        };
        let s = text.trim();
        if s.is_empty() {
            return Err(bad("it is empty"));
        }
        if let Some(rest) = s.strip_prefix("unix:") {
            // unix:///abs, unix://rel (no authority in practice: kubelet means a path), unix:/abs, unix:rel
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() {
                return Err(bad("the socket path is empty"));
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = s.strip_prefix("tcp://") {
            let rest = rest.trim_end_matches('/');
            let (host, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| bad("a tcp endpoint needs host:port"))?;
            let port: u16 = port
                .parse()
                .map_err(|_| bad("the port is not a number from 1 to 65535"))?;
            if host.is_empty() || port == 0 {
                return Err(bad("a tcp endpoint needs host:port"));
            }
            return Ok(Endpoint::Tcp {
                host: host.to_string(),
                port,
            });
        }
        if let Some((scheme, _)) = s.split_once("://") {
            if !scheme.contains('/') {
                return Err(bad("only unix:// and tcp:// endpoints are supported"));
            }
        }
        Ok(Endpoint::Unix(PathBuf::from(s)))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(path) if path.is_absolute() => write!(f, "unix://{}", path.display()),
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
            Endpoint::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
        }
    }
}

impl Endpoint {
    /// A short name for reports: the socket's file name without `.sock` (`hyperd`, `containerd`), or
    /// `host:port`.
    pub fn label(&self) -> String {
        match self {
            Endpoint::Unix(path) => socket_label(path),
            Endpoint::Tcp { host, port } => format!("{host}:{port}"),
        }
    }
}

fn socket_label(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name.strip_suffix(".sock").unwrap_or(&name);
    if stem.is_empty() {
        "cri".to_string()
    } else {
        stem.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix(p: &str) -> Endpoint {
        Endpoint::Unix(PathBuf::from(p))
    }

    #[test]
    fn unix_forms() {
        assert_eq!(
            DEFAULT_ENDPOINT.parse::<Endpoint>().unwrap(),
            unix("/run/hyperd/hyperd.sock")
        );
        assert_eq!(
            "unix:///tmp/c/containerd.sock".parse::<Endpoint>().unwrap(),
            unix("/tmp/c/containerd.sock")
        );
        assert_eq!("unix:/x.sock".parse::<Endpoint>().unwrap(), unix("/x.sock"));
        assert_eq!("unix:x.sock".parse::<Endpoint>().unwrap(), unix("x.sock"));
        assert_eq!("unix://x.sock".parse::<Endpoint>().unwrap(), unix("x.sock"));
        assert_eq!(
            "/run/x.sock".parse::<Endpoint>().unwrap(),
            unix("/run/x.sock")
        );
        assert_eq!("./x.sock".parse::<Endpoint>().unwrap(), unix("./x.sock"));
        assert_eq!(
            " unix:///a b/c.sock ".parse::<Endpoint>().unwrap(),
            unix("/a b/c.sock")
        );
    }

    #[test]
    fn tcp_forms() {
        assert_eq!(
            "tcp://127.0.0.1:5000".parse::<Endpoint>().unwrap(),
            Endpoint::Tcp {
                host: "127.0.0.1".into(),
                port: 5000
            }
        );
        assert_eq!(
            "tcp://[::1]:5000/".parse::<Endpoint>().unwrap(),
            Endpoint::Tcp {
                host: "[::1]".into(),
                port: 5000
            }
        );
    }

    #[test]
    fn rejects() {
        for bad in [
            "",
            "  ",
            "unix://",
            "unix:",
            "tcp://host",
            "tcp://host:0",
            "tcp://host:99999",
            "tcp://:80",
            "http://localhost:80",
            "npipe:////./pipe/x",
        ] {
            assert!(bad.parse::<Endpoint>().is_err(), "'{bad}' parsed");
        }
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "unix:///run/hyperd/hyperd.sock",
            "unix:rel.sock",
            "tcp://h:1",
        ] {
            let e: Endpoint = s.parse().unwrap();
            assert_eq!(e.to_string(), s);
            assert_eq!(e.to_string().parse::<Endpoint>().unwrap(), e);
        }
    }

    #[test]
    fn labels() {
        assert_eq!(
            DEFAULT_ENDPOINT.parse::<Endpoint>().unwrap().label(),
            "hyperd"
        );
        assert_eq!(
            "unix:///tmp/x/containerd.sock"
                .parse::<Endpoint>()
                .unwrap()
                .label(),
            "containerd"
        );
        assert_eq!(unix("/run/crio/crio").label(), "crio");
        assert_eq!(unix("/").label(), "cri");
        assert_eq!("tcp://h:1".parse::<Endpoint>().unwrap().label(), "h:1");
    }
}
