//! What the front ends ask for: pods ([`PodSpec`]) and containers ([`ContainerSpec`]), with the
//! validation done before anything is created.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Result, SandboxError};

/// Longest pod or container id. With the default state root (`/run/hyperd/sandboxes`, 21
/// bytes) a 64-byte pod id still leaves the VMM's socket paths within their 96-byte limit.
pub const MAX_ID_LEN: usize = 64;

/// Checks a pod or container id: `[A-Za-z0-9][A-Za-z0-9_.-]{0,63}`. Ids name directories and
/// files under the state root and are sent to the agent, so nothing else is accepted.
pub fn validate_id(kind: &str, id: &str) -> Result<()> {
    let mut chars = id.chars();
    let ok = id.len() <= MAX_ID_LEN
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(SandboxError::InvalidArgument(format!(
            "{kind} id {id:?} must be 1 to {MAX_ID_LEN} of [A-Za-z0-9_.-], starting with a letter or digit"
        )))
    }
}

/// The guest's network, prepared on the host by the network layer (CNI in the pod's netns, a
/// tap with tc redirect): the VMM opens `tap` inside `netns`, and the agent gives the guest
/// interface the CNI interface's MAC, addresses and routes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNetwork {
    /// The pod's network namespace (e.g. `/var/run/netns/cni-...`); the VMM is started in it.
    pub netns: PathBuf,
    /// The tap device inside `netns` (at most 15 bytes).
    pub tap: String,
    /// The guest interface the VMM's NIC appears as (`eth0`).
    pub guest_ifname: String,
    /// The guest MAC address (the CNI veth's, so the CNI's ARP entries hold).
    pub mac: [u8; 6],
    /// MTU; 0 keeps the guest default.
    pub mtu: u32,
    /// Addresses with prefix lengths. The agent configures one IPv4 address (the first);
    /// others are reported as pod IPs only.
    pub addresses: Vec<(IpAddr, u8)>,
    /// Routes: destination CIDR ("" or "0.0.0.0/0" for the default route) and gateway. IPv6
    /// routes are skipped (the agent speaks IPv4 routes only).
    pub routes: Vec<(String, Option<IpAddr>)>,
}

/// The pod's DNS settings, written to a resolv.conf in the guest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    /// Name servers.
    pub servers: Vec<String>,
    /// Search domains.
    pub searches: Vec<String>,
    /// resolv.conf options.
    pub options: Vec<String>,
}

/// Pod-level resources (CRI `LinuxPodSandboxConfig.resources` / overhead, or the sum of the
/// containers' limits the front end knows at pod start). They size the VM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodResources {
    /// CFS quota in microseconds per period; `None` or <= 0: unlimited.
    pub cpu_quota_us: Option<i64>,
    /// CFS period in microseconds; `None`: 100000.
    pub cpu_period_us: Option<u64>,
    /// CPU shares (requests); informational, they do not size the VM.
    pub cpu_shares: Option<u64>,
    /// Memory limit in bytes; `None` or 0: the default.
    pub memory_limit_bytes: Option<u64>,
}

/// A pod to run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodSpec {
    /// The sandbox id (chosen by the front end), see [`validate_id`].
    pub id: String,
    /// Kubernetes metadata.
    pub name: String,
    /// Kubernetes metadata.
    pub namespace: String,
    /// Kubernetes metadata.
    pub uid: String,
    /// Kubernetes metadata.
    pub attempt: u32,
    /// The pod's hostname; empty keeps the guest's.
    pub hostname: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    pub annotations: BTreeMap<String, String>,
    /// DNS settings; `None` leaves containers with their image's resolv.conf.
    pub dns: Option<Dns>,
    /// One pid namespace for all containers.
    pub share_pid_namespace: bool,
    /// Sysctls (ipc ones apply to the pod's ipc namespace, others to the pod's own kernel).
    pub sysctls: BTreeMap<String, String>,
    /// Resources; they size the VM (see [`crate::sizing`]).
    pub resources: PodResources,
    /// The network; `None`: the VM has no NIC.
    pub network: Option<GuestNetwork>,
    /// The CRI runtime handler.
    pub runtime_handler: String,
    /// Kubelet's log directory for the pod's containers.
    pub log_directory: Option<PathBuf>,
}

impl PodSpec {
    /// Checks everything that can be checked before a VM exists.
    pub fn validate(&self) -> Result<()> {
        validate_id("pod sandbox", &self.id)?;
        if let Some(net) = &self.network {
            if net.tap.is_empty() || net.tap.len() > 15 || net.tap.contains(['/', '\0']) {
                return Err(SandboxError::InvalidArgument(format!(
                    "tap name {:?} must be 1 to 15 bytes without '/'",
                    net.tap
                )));
            }
            if net.guest_ifname.is_empty() || net.guest_ifname.len() > 15 {
                return Err(SandboxError::InvalidArgument(format!(
                    "guest interface name {:?} must be 1 to 15 bytes",
                    net.guest_ifname
                )));
            }
            if net.mac[0] & 1 != 0 {
                return Err(SandboxError::InvalidArgument(format!(
                    "MAC address {} is multicast",
                    format_mac(&net.mac)
                )));
            }
            if net.mtu > 65535 {
                return Err(SandboxError::InvalidArgument(format!(
                    "MTU {} is too large",
                    net.mtu
                )));
            }
            for (addr, prefix) in &net.addresses {
                let max = if addr.is_ipv4() { 32 } else { 128 };
                if *prefix > max {
                    return Err(SandboxError::InvalidArgument(format!(
                        "prefix length {prefix} of {addr} is larger than {max}"
                    )));
                }
            }
            if !net.netns.is_absolute() {
                return Err(SandboxError::InvalidArgument(format!(
                    "network namespace path {} is not absolute",
                    net.netns.display()
                )));
            }
        }
        Ok(())
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A host file (or directory) copied into the guest's file store with `CopyFile` and
/// bind-mounted into the container: CRI mounts such as /etc/hosts, secrets and config maps.
/// The guest gets a copy; later host changes are not seen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileToCopy {
    /// Where it goes in the file store, relative ("etc-hosts", "volumes/token"), kept under
    /// a directory private to the container.
    pub guest_relative_path: String,
    /// The host file or directory. Directories are copied recursively (regular files, and
    /// symlinks to files as their content; entries named `..*`, kubelet's atomic-writer
    /// internals, are skipped).
    pub host_source: PathBuf,
    /// Permission bits for the copy; `None`: the host file's.
    pub mode: Option<u32>,
    /// Mount read-only in the container.
    pub read_only: bool,
    /// The mount point in the container.
    pub container_path: String,
}

/// A container to create in a pod.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerSpec {
    /// The container id (chosen by the front end), see [`validate_id`].
    pub id: String,
    /// Kubernetes metadata.
    pub name: String,
    /// Kubernetes metadata.
    pub attempt: u32,
    /// The image as the user named it.
    pub image_ref: String,
    /// The resolved image id.
    pub image_id: String,
    /// The image's ext4 rootfs disk (from the image store), attached read-only; the container
    /// gets a private writable overlay on top of it in the guest.
    pub rootfs_disk: PathBuf,
    /// The OCI runtime spec (process, linux.resources, capabilities, mounts, ...). The manager
    /// rewrites `linux.namespaces` (the pod's ipc/uts/pid, no network namespace: the pod's
    /// network is the VM's) and adds the mounts of `files`, resolv.conf and /etc/hostname.
    pub oci_spec_json: Vec<u8>,
    /// Files copied into the guest and bind-mounted.
    pub files: Vec<FileToCopy>,
    /// The container's log in the CRI format, an absolute path (CRI's pod `log_directory`
    /// joined with the container's `log_path`); `None`: output stays in the agent's bounded
    /// buffers, oldest bytes dropped.
    pub log_path: Option<PathBuf>,
    /// A terminal (output arrives on stdout only).
    pub tty: bool,
    /// Keep stdin open.
    pub stdin: bool,
    /// The signal `stop_container` sends first; `None`: SIGTERM.
    pub stop_signal: Option<i32>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    pub annotations: BTreeMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for ok in ["a", "pod-1_c.2", &"x".repeat(64), "0abc"] {
            validate_id("pod", ok).unwrap();
        }
        for bad in [
            "",
            "-a",
            ".",
            "..",
            "a/b",
            "a b",
            "ä",
            "a\0",
            &"x".repeat(65),
        ] {
            assert!(validate_id("pod", bad).is_err(), "{bad:?}");
        }
    }

    fn net() -> GuestNetwork {
        GuestNetwork {
            netns: "/var/run/netns/x".into(),
            tap: "tap0".into(),
            guest_ifname: "eth0".into(),
            mac: [2, 0, 0, 0, 0, 1],
            mtu: 1500,
            addresses: vec![("10.1.0.2".parse().unwrap(), 24)],
            routes: vec![("0.0.0.0/0".into(), Some("10.1.0.1".parse().unwrap()))],
        }
    }

    #[test]
    fn pod_spec_validation() {
        let mut spec = PodSpec {
            id: "p1".into(),
            network: Some(net()),
            ..PodSpec::default()
        };
        spec.validate().unwrap();
        let bad: [&dyn Fn(&mut GuestNetwork); 5] = [
            &|n| n.tap = "a-very-long-tap-name".into(),
            &|n| n.mac = [1, 0, 0, 0, 0, 1],
            &|n| n.addresses = vec![("10.1.0.2".parse().unwrap(), 33)],
            &|n| n.netns = "relative".into(),
            &|n| n.guest_ifname = String::new(),
        ];
        for f in bad {
            let mut n = net();
            f(&mut n);
            spec.network = Some(n);
            assert!(spec.validate().is_err(), "{:?}", spec.network);
        }
        spec.network = None;
        spec.id = "../x".into();
        assert!(spec.validate().is_err());
    }

    #[test]
    fn mac_format() {
        assert_eq!(
            format_mac(&[2, 0, 0xa, 0xb, 0xc, 0xff]),
            "02:00:0a:0b:0c:ff"
        );
    }
}
