//! What callers pass in: the manager's configuration and a pod's network request.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};

/// Where things are, and how long a plugin may run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// CNI configuration directory (`/etc/cni/net.d`).
    pub conf_dir: PathBuf,
    /// Plugin binary directories, searched in order (`/opt/cni/bin`, `/usr/lib/cni`).
    pub bin_dirs: Vec<PathBuf>,
    /// Where pod network namespace files are bound (`/run/hyperd/netns`). Set it to
    /// `/run/netns` to make them visible to `ip netns` (names are pod ids).
    pub netns_dir: PathBuf,
    /// Per-pod records (config, CNI result) for DEL. Must survive reboots like the IPAM
    /// stores do (`/var/lib/hyperd/network`), so leases taken before a reboot are released.
    pub state_dir: PathBuf,
    /// Deadline of one plugin execution; the plugin's process group is killed after it.
    pub plugin_timeout: Duration,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            conf_dir: "/etc/cni/net.d".into(),
            bin_dirs: vec!["/opt/cni/bin".into(), "/usr/lib/cni".into()],
            netns_dir: "/run/hyperd/netns".into(),
            state_dir: "/var/lib/hyperd/network".into(),
            plugin_timeout: Duration::from_secs(60),
        }
    }
}

/// A port protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Protocol {
    /// The name the `portmap` plugin expects.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

/// A host port forwarded to the pod (CRI `PortMapping`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PortMapping {
    /// The protocol.
    pub protocol: Protocol,
    /// The port in the pod.
    pub container_port: u16,
    /// The port on the host; 0 means none (the mapping is skipped, as containerd does).
    pub host_port: u16,
    /// The host address to bind; empty for all.
    pub host_ip: String,
}

/// A pod to attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetworkRequest {
    /// The sandbox id: `CNI_CONTAINERID`, the netns and state file names.
    /// `[A-Za-z0-9][A-Za-z0-9_.-]{0,127}`.
    pub pod_id: String,
    /// Pod name (`K8S_POD_NAME`).
    pub name: String,
    /// Pod namespace (`K8S_POD_NAMESPACE`).
    pub namespace: String,
    /// Pod UID (`K8S_POD_UID`).
    pub uid: String,
    /// Host ports, given to plugins declaring the `portMappings` capability.
    pub port_mappings: Vec<PortMapping>,
}

/// Whether `id` is usable as a pod id (and so as a file name).
pub fn valid_pod_id(id: &str) -> bool {
    let b = id.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b[0].is_ascii_alphanumeric()
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

impl PodNetworkRequest {
    /// `CNI_ARGS`, or the name of the field that cannot go into it (one holding `;`, `=` or
    /// a NUL byte would corrupt the list).
    pub(crate) fn cni_args(&self) -> Result<String, &'static str> {
        let fields = [
            ("K8S_POD_NAMESPACE", "namespace", &self.namespace),
            ("K8S_POD_NAME", "name", &self.name),
            ("K8S_POD_INFRA_CONTAINER_ID", "pod_id", &self.pod_id),
            ("K8S_POD_UID", "uid", &self.uid),
        ];
        let mut args = String::from("IgnoreUnknown=1");
        for (key, field, value) in fields {
            if value.contains([';', '=', '\0']) {
                return Err(field);
            }
            args.push_str(&format!(";{key}={value}"));
        }
        Ok(args)
    }

    /// `runtimeConfig.portMappings` entries, as containerd writes them.
    pub(crate) fn port_mappings_json(&self) -> Vec<Value> {
        self.port_mappings
            .iter()
            .filter(|p| p.host_port != 0)
            .map(|p| {
                let mut m = json!({
                    "hostPort": p.host_port,
                    "containerPort": p.container_port,
                    "protocol": p.protocol.as_str(),
                });
                if !p.host_ip.is_empty() {
                    m["hostIP"] = p.host_ip.clone().into();
                }
                m
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> PodNetworkRequest {
        PodNetworkRequest {
            pod_id: "abc123".into(),
            name: "web-0".into(),
            namespace: "default".into(),
            uid: "0f1e-22".into(),
            port_mappings: vec![
                PortMapping {
                    protocol: Protocol::Tcp,
                    container_port: 80,
                    host_port: 8080,
                    host_ip: String::new(),
                },
                PortMapping {
                    protocol: Protocol::Udp,
                    container_port: 53,
                    host_port: 5353,
                    host_ip: "127.0.0.1".into(),
                },
                PortMapping {
                    protocol: Protocol::Sctp,
                    container_port: 9,
                    host_port: 0,
                    host_ip: String::new(),
                },
            ],
        }
    }

    #[test]
    fn pod_ids() {
        for ok in ["a", "A0", "0abc", "pod_1.2-3", &"x".repeat(128)] {
            assert!(valid_pod_id(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "-a",
            "_a",
            ".hidden",
            "a/b",
            "a b",
            &"x".repeat(129),
            "é",
        ] {
            assert!(!valid_pod_id(bad), "{bad}");
        }
    }

    #[test]
    fn args() {
        assert_eq!(
            req().cni_args().unwrap(),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;\
             K8S_POD_INFRA_CONTAINER_ID=abc123;K8S_POD_UID=0f1e-22"
        );
        let mut r = req();
        r.name = "a;b=c".into();
        assert_eq!(r.cni_args(), Err("name"));
    }

    #[test]
    fn port_mappings() {
        assert_eq!(
            Value::Array(req().port_mappings_json()),
            json!([
                {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
                {"hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": "127.0.0.1"}
            ])
        );
    }
}
