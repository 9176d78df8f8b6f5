//! Where a pod's files live.
//!
//! ```text
//! <state_root>/<pod id>/pod.json                  the pod record
//! <state_root>/<pod id>/vm.json                   the hyper-vmm configuration
//! <state_root>/<pod id>/v.sock, c.sock            vsock (hybrid) and control sockets
//! <state_root>/<pod id>/containers/<id>.json      container records
//! <log_dir>/<pod id>.vmm.log, <pod id>.console     VMM output and the guest console
//! ```

use std::path::{Path, PathBuf};

/// Length of the socket file names below (`v.sock`, `c.sock`).
pub const SOCKET_NAME_LEN: usize = 6;

/// Paths of the state root and the log directory.
#[derive(Clone, Debug)]
pub struct Layout {
    root: PathBuf,
    log_dir: PathBuf,
}

impl Layout {
    /// A layout over these directories.
    pub fn new(root: &Path, log_dir: &Path) -> Self {
        Layout {
            root: root.to_path_buf(),
            log_dir: log_dir.to_path_buf(),
        }
    }

    /// The state root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The log directory.
    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    /// The pod's directory.
    pub fn pod_dir(&self, pod: &str) -> PathBuf {
        self.root.join(pod)
    }

    /// The pod record.
    pub fn pod_record(&self, pod: &str) -> PathBuf {
        self.pod_dir(pod).join("pod.json")
    }

    /// The VMM configuration.
    pub fn vm_config(&self, pod: &str) -> PathBuf {
        self.pod_dir(pod).join("vm.json")
    }

    /// The hybrid vsock socket.
    pub fn vsock(&self, pod: &str) -> PathBuf {
        self.pod_dir(pod).join("v.sock")
    }

    /// The VMM control socket.
    pub fn control(&self, pod: &str) -> PathBuf {
        self.pod_dir(pod).join("c.sock")
    }

    /// The container records' directory.
    pub fn containers_dir(&self, pod: &str) -> PathBuf {
        self.pod_dir(pod).join("containers")
    }

    /// A container record.
    pub fn container_record(&self, pod: &str, container: &str) -> PathBuf {
        self.containers_dir(pod).join(format!("{container}.json"))
    }

    /// Where a container's log forwarding stands (see `logs::LogWriter`).
    pub fn log_cursor(&self, pod: &str, container: &str) -> PathBuf {
        self.containers_dir(pod).join(format!("{container}.logpos"))
    }

    /// The VMM's stdout and stderr.
    pub fn vmm_log(&self, pod: &str) -> PathBuf {
        self.log_dir.join(format!("{pod}.vmm.log"))
    }

    /// The guest's serial console (the VMM limits this path like its sockets' paths).
    pub fn console_log(&self, pod: &str) -> PathBuf {
        self.log_dir.join(format!("{pod}.console"))
    }

    /// Whether the pod's socket and console paths fit the VMM's limit.
    pub fn paths_fit(&self, pod: &str) -> bool {
        [self.vsock(pod), self.control(pod), self.console_log(pod)]
            .iter()
            .all(|p| p.as_os_str().len() <= crate::config::MAX_SOCKET_PATH)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let l = Layout::new(Path::new("/run/s"), Path::new("/var/log/p"));
        assert_eq!(l.pod_record("p1"), Path::new("/run/s/p1/pod.json"));
        assert_eq!(
            l.container_record("p1", "c1"),
            Path::new("/run/s/p1/containers/c1.json")
        );
        assert_eq!(l.vmm_log("p1"), Path::new("/var/log/p/p1.vmm.log"));
        assert_eq!(
            l.vsock("p1").file_name().map(|n| n.len()),
            Some(SOCKET_NAME_LEN)
        );
        let default = Layout::new(
            Path::new("/run/hyperd/sandboxes"),
            Path::new("/var/log/hyperd/pods"),
        );
        assert!(default.paths_fit(&"a".repeat(64)));
        let long = Layout::new(
            Path::new("/tmp/a-rather-long-state-root-dir"),
            Path::new("/l"),
        );
        assert!(!long.paths_fit(&"a".repeat(64)));
        assert!(long.paths_fit("short"));
    }
}
