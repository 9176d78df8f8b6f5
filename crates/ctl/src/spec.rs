//! Pod and container configs shaped like kubelet's, so that a runtime sees from hyperctl what it would see
//! from a node agent: metadata, kubelet's labels, a log directory under `/var/log/pods`, namespace options
//! and the default masked and read-only paths.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};

use crate::cri;

/// kubelet's root for pod log directories.
pub const DEFAULT_LOG_ROOT: &str = "/var/log/pods";

/// The label hyperctl puts on everything it creates (value: the command, `run` or `bench`).
pub const CREATED_BY_LABEL: &str = "io.hypernetes.hyperctl";

/// The pod annotation where hyperctl records the pod log directory it created, so that `rm` can remove it.
pub const LOG_DIRECTORY_ANNOTATION: &str = "io.hypernetes.hyperctl/log-directory";

/// kubelet's default masked paths for unprivileged containers.
pub const DEFAULT_MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// kubelet's default read-only paths for unprivileged containers.
pub const DEFAULT_READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// 64 random bits from the standard library's per-process random keys (no extra dependency; these ids
/// need uniqueness, not secrecy).
pub fn random_u64() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// A random version-4 UUID, as Kubernetes uses for pod uids.
pub fn random_uid() -> String {
    let (a, b) = (random_u64(), random_u64());
    let bytes: Vec<u8> = a.to_be_bytes().into_iter().chain(b.to_be_bytes()).collect();
    let mut x = [0u8; 16];
    x.copy_from_slice(&bytes);
    x[6] = (x[6] & 0x0f) | 0x40;
    x[8] = (x[8] & 0x3f) | 0x80;
    let hex: String = x.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// What a pod needs besides defaults.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    /// Where pod log directories live (`/var/log/pods`); None: no logs.
    pub log_root: Option<PathBuf>,
    pub labels: HashMap<String, String>,
}

impl PodSpec {
    /// A pod in namespace "default" with a fresh uid and logs under [`DEFAULT_LOG_ROOT`].
    pub fn new(name: &str) -> Self {
        PodSpec {
            name: name.to_string(),
            namespace: "default".to_string(),
            uid: random_uid(),
            log_root: Some(PathBuf::from(DEFAULT_LOG_ROOT)),
            labels: HashMap::new(),
        }
    }

    /// kubelet's pod log directory: `<root>/<namespace>_<name>_<uid>`.
    pub fn log_directory(&self) -> Option<PathBuf> {
        self.log_root
            .as_ref()
            .map(|root| root.join(format!("{}_{}_{}", self.namespace, self.name, self.uid)))
    }

    /// The RunPodSandbox config.
    pub fn config(&self) -> cri::PodSandboxConfig {
        let mut labels = self.labels.clone();
        labels.insert("io.kubernetes.pod.name".into(), self.name.clone());
        labels.insert("io.kubernetes.pod.namespace".into(), self.namespace.clone());
        labels.insert("io.kubernetes.pod.uid".into(), self.uid.clone());
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: self.name.clone(),
                uid: self.uid.clone(),
                namespace: self.namespace.clone(),
                attempt: 0,
            }),
            hostname: hostname(&self.name),
            log_directory: self
                .log_directory()
                .map(|d| d.to_string_lossy().into_owned())
                .unwrap_or_default(),
            labels,
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(namespace_options()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// A hostname from a pod name: DNS-label characters only, at most 63.
fn hostname(name: &str) -> String {
    let mut h: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    while h.ends_with('-') {
        h.pop();
    }
    while h.starts_with('-') {
        h.remove(0);
    }
    if h.is_empty() {
        "pod".to_string()
    } else {
        h
    }
}

/// kubelet's defaults: the pod's network and IPC namespaces, a PID namespace per container.
fn namespace_options() -> cri::NamespaceOption {
    cri::NamespaceOption {
        network: cri::NamespaceMode::Pod as i32,
        pid: cri::NamespaceMode::Container as i32,
        ipc: cri::NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

/// What a container needs besides defaults.
#[derive(Clone, Debug, Default)]
pub struct ContainerSpec {
    pub name: String,
    /// What the runtime should run: an image id or reference (kubelet passes the id from ImageStatus).
    pub image: String,
    /// What the user asked for (`busybox`), passed as `user_specified_image` when different.
    pub user_image: String,
    /// Replaces the image's entrypoint when not empty.
    pub command: Vec<String>,
    /// Replaces the image's cmd when not empty.
    pub args: Vec<String>,
    pub envs: Vec<(String, String)>,
    pub labels: HashMap<String, String>,
}

impl ContainerSpec {
    /// kubelet's container log path, relative to the pod's log directory: `<name>/0.log`.
    pub fn log_path(&self) -> PathBuf {
        Path::new(&self.name).join("0.log")
    }

    /// The CreateContainer config; `with_log` sets [`Self::log_path`].
    pub fn config(&self, with_log: bool) -> cri::ContainerConfig {
        cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: self.name.clone(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: self.image.clone(),
                user_specified_image: self.user_image.clone(),
                ..Default::default()
            }),
            command: self.command.clone(),
            args: self.args.clone(),
            envs: self
                .envs
                .iter()
                .map(|(key, value)| cri::KeyValue {
                    key: key.clone(),
                    value: value.clone(),
                })
                .collect(),
            labels: self.labels.clone(),
            log_path: if with_log {
                self.log_path().to_string_lossy().into_owned()
            } else {
                String::new()
            },
            linux: Some(cri::LinuxContainerConfig {
                security_context: Some(cri::LinuxContainerSecurityContext {
                    namespace_options: Some(namespace_options()),
                    masked_paths: DEFAULT_MASKED_PATHS.iter().map(|s| s.to_string()).collect(),
                    readonly_paths: DEFAULT_READONLY_PATHS
                        .iter()
                        .map(|s| s.to_string())
                        .collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// Creates the pod's log directory and the container's subdirectory, as kubelet does before
/// CreateContainer (runtimes open the log file but do not create its directories).
pub fn prepare_log_dirs(pod: &PodSpec, container: &ContainerSpec) -> Result<(), crate::CtlError> {
    let Some(dir) = pod.log_directory() else {
        return Ok(());
    };
    let path = dir.join(container.log_path());
    let parent = path.parent().unwrap_or(&dir).to_path_buf();
    std::fs::create_dir_all(&parent).map_err(|source| crate::CtlError::Io {
        what: "cannot create the pod log directory",
        path: parent,
        source,
    })
}

/// Removes the pod's log directory (after RemovePodSandbox, as kubelet's garbage collector does).
pub fn remove_log_dir(pod: &PodSpec) {
    if let Some(dir) = pod.log_directory() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_v4_and_distinct() {
        let a = random_uid();
        let b = random_uid();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert!(matches!(&a[19..20], "8" | "9" | "a" | "b"));
        assert_eq!(a.matches('-').count(), 4);
    }

    #[test]
    fn pod_config_like_kubelet() {
        let mut p = PodSpec::new("Web_1");
        p.uid = "u".into();
        let c = p.config();
        assert_eq!(c.log_directory, "/var/log/pods/default_Web_1_u");
        assert_eq!(c.hostname, "web-1");
        assert_eq!(c.metadata.as_ref().unwrap().namespace, "default");
        assert_eq!(c.labels["io.kubernetes.pod.uid"], "u");
        let ns = c
            .linux
            .unwrap()
            .security_context
            .unwrap()
            .namespace_options
            .unwrap();
        assert_eq!(ns.pid, cri::NamespaceMode::Container as i32);
        p.log_root = None;
        assert_eq!(p.config().log_directory, "");
    }

    #[test]
    fn container_config() {
        let c = ContainerSpec {
            name: "app".into(),
            image: "busybox".into(),
            args: vec!["echo".into(), "hi".into()],
            envs: vec![("A".into(), "1".into())],
            ..Default::default()
        };
        let cfg = c.config(true);
        assert_eq!(cfg.log_path, "app/0.log");
        assert!(cfg.command.is_empty());
        assert_eq!(cfg.args, ["echo", "hi"]);
        assert_eq!(cfg.envs[0].key, "A");
        assert_eq!(c.config(false).log_path, "");
    }

    #[test]
    fn hostnames() {
        assert_eq!(hostname("--a.b--"), "a-b");
        assert_eq!(hostname("___"), "pod");
        assert_eq!(hostname(&"x".repeat(100)).len(), 63);
    }
}
