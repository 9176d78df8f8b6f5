//! Persistent pod and container records and their state machines.
//!
//! ```text
//! pod:        CREATING --boot ok--> READY --stop / VMM exit--> NOTREADY --remove--> (gone)
//!             CREATING --boot failed--> (gone)
//! container:  CREATING --agent ok--> CREATED --start--> RUNNING --exit--> EXITED --remove--> (gone)
//!             CREATING --failed--> (gone)     CREATED --start failed / VM gone--> EXITED
//! ```
//! `CREATING` records exist so that a crash in the middle leaves a trace that recovery cleans
//! up; they are never shown to the front ends as containers.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::spec::PodSpec;

/// Version of the record format.
pub const RECORD_VERSION: u32 = 1;

/// Reason of a container that exited 0.
pub const REASON_COMPLETED: &str = "Completed";
/// Reason of a container that exited non-zero or by a signal.
pub const REASON_ERROR: &str = "Error";
/// Reason of a container killed by the OOM killer.
pub const REASON_OOM_KILLED: &str = "OOMKilled";
/// Reason of a container whose VM went away.
pub const REASON_VMM_EXITED: &str = "VMM exited";
/// Reason of a container that could not be started.
pub const REASON_START_ERROR: &str = "StartError";
/// Reason of a created container whose pod was stopped before it ran.
pub const REASON_POD_STOPPED: &str = "PodStopped";
/// Exit code reported when the real one is unknown (the VM is gone).
pub const UNKNOWN_EXIT_CODE: i32 = 255;
/// Exit code of a container that could not be started (as containerd reports it).
pub const START_ERROR_EXIT_CODE: i32 = 128;

/// A pod's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PodState {
    /// The VM is being started (shown as NOTREADY to the front ends).
    Creating,
    /// The VM runs and its agent serves.
    Ready,
    /// The VM is stopped or gone.
    NotReady,
}

impl PodState {
    /// Whether the state machine allows going to `to`.
    pub fn can_become(self, to: PodState) -> bool {
        matches!(
            (self, to),
            (PodState::Creating, PodState::Ready)
                | (PodState::Creating, PodState::NotReady)
                | (PodState::Ready, PodState::NotReady)
        )
    }
}

impl fmt::Display for PodState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PodState::Creating => "CREATING",
            PodState::Ready => "READY",
            PodState::NotReady => "NOTREADY",
        })
    }
}

/// A container's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ContainerState {
    /// Being created (internal; hidden from listings).
    Creating,
    /// Created in the agent, not started.
    Created,
    /// Started.
    Running,
    /// Exited (or can never run).
    Exited,
}

impl ContainerState {
    /// Whether the state machine allows going to `to`.
    pub fn can_become(self, to: ContainerState) -> bool {
        use ContainerState as S;
        matches!(
            (self, to),
            (S::Creating, S::Created)
                | (S::Created, S::Running)
                | (S::Created, S::Exited)
                | (S::Running, S::Exited)
        )
    }
}

impl fmt::Display for ContainerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ContainerState::Creating => "CREATING",
            ContainerState::Created => "CREATED",
            ContainerState::Running => "RUNNING",
            ContainerState::Exited => "EXITED",
        })
    }
}

/// The VMM process of a pod: pid plus the start time from `/proc/<pid>/stat` (clock ticks
/// since boot), which together identify the process across pid reuse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmIdentity {
    /// Pid.
    pub pid: u32,
    /// Field 22 of `/proc/<pid>/stat`.
    pub start_time: u64,
}

/// What the agent's `CreateSandbox` set up, for container specs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodNamespaces {
    /// `/proc/<holder>/ns/ipc` in the guest.
    pub ipc: String,
    /// `/proc/<holder>/ns/uts` in the guest.
    pub uts: String,
    /// `/proc/<holder>/ns/pid`, when the pod shares one pid namespace.
    pub pid: Option<String>,
    /// The guest path of the pod's resolv.conf.
    pub resolv_conf: Option<String>,
    /// The guest path of the pod's /etc/hostname (when the pod has a hostname).
    pub hostname_file: Option<String>,
    /// The agent's file store directory (where `CopyFile` writes).
    pub store_root: Option<String>,
}

/// A pod's record (also what status and list calls return).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRecord {
    /// [`RECORD_VERSION`].
    pub version: u32,
    /// What the front end asked for.
    pub spec: PodSpec,
    /// State.
    pub state: PodState,
    /// Unix time of `run_pod`, nanoseconds.
    pub created_at_nanos: i64,
    /// The VM's vCPUs.
    pub vcpus: u8,
    /// The VM's memory.
    pub memory_mib: u64,
    /// The VMM process, once spawned.
    pub vmm: Option<VmmIdentity>,
    /// Set up by the agent once the pod is ready.
    pub namespaces: Option<PodNamespaces>,
    /// Why the pod is NOTREADY ("Stopped", "VMM exited").
    pub reason: String,
    /// Details (the VMM's exit status).
    pub message: String,
}

impl PodRecord {
    /// The pod id.
    pub fn id(&self) -> &str {
        &self.spec.id
    }

    /// The pod's IP addresses (the CNI's), first IPv4 first.
    pub fn ips(&self) -> Vec<IpAddr> {
        let mut ips: Vec<IpAddr> = self
            .spec
            .network
            .iter()
            .flat_map(|n| n.addresses.iter().map(|(a, _)| *a))
            .collect();
        ips.sort_by_key(|a| !a.is_ipv4());
        ips
    }

    /// The VMM's pid, while it is known.
    pub fn vmm_pid(&self) -> Option<u32> {
        self.vmm.map(|v| v.pid)
    }
}

/// A file copied into the guest and bind-mounted into a container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestMount {
    /// The mount point in the container.
    pub container_path: String,
    /// The file (or directory) in the agent's file store; empty: an empty directory, mounted
    /// as a tmpfs.
    pub guest_path: String,
    /// Mounted read-only.
    pub read_only: bool,
    /// The host file or directory copied (CRI mounts); empty for the pod's own files.
    #[serde(default)]
    pub host_path: String,
}

/// A container's record (also what status and list calls return).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    /// [`RECORD_VERSION`].
    pub version: u32,
    /// Id.
    pub id: String,
    /// The pod.
    pub pod_id: String,
    /// Kubernetes metadata.
    pub name: String,
    /// Kubernetes metadata.
    pub attempt: u32,
    /// The image as named.
    pub image_ref: String,
    /// The resolved image id.
    pub image_id: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    pub annotations: BTreeMap<String, String>,
    /// The CRI log file.
    pub log_path: Option<PathBuf>,
    /// A terminal.
    pub tty: bool,
    /// Stdin kept open.
    pub stdin: bool,
    /// State.
    pub state: ContainerState,
    /// Unix nanoseconds; 0 when not yet.
    pub created_at_nanos: i64,
    /// Unix nanoseconds; 0 when not yet.
    pub started_at_nanos: i64,
    /// Unix nanoseconds; 0 when not yet.
    pub finished_at_nanos: i64,
    /// The exit code once exited: the process's status, or 128 + signal.
    pub exit_code: Option<i32>,
    /// The signal that killed it, 0 if it exited.
    pub signal: i32,
    /// Killed by the OOM killer.
    pub oom_killed: bool,
    /// CRI reason: "Completed", "Error", "OOMKilled", "VMM exited", "StartError".
    pub reason: String,
    /// Details.
    pub message: String,
    /// The rootfs disk on the host.
    pub rootfs_disk: PathBuf,
    /// The spare drive (`spare<N>`) the disk is attached to.
    pub drive: u8,
    /// The init process's pid in the agent's pid namespace.
    pub guest_pid: u32,
    /// Copied files and their mounts.
    pub mounts: Vec<GuestMount>,
    /// The spec's `process` object: the template of `exec_sync` processes.
    pub process: serde_json::Value,
    /// The first signal of `stop_container`.
    pub stop_signal: i32,
}

impl ContainerRecord {
    /// Records an exit: exit code (128 + signal when signalled), reason, times.
    pub fn set_exited(&mut self, exit: &ExitInfo) {
        self.state = ContainerState::Exited;
        self.exit_code = Some(exit.exit_code());
        self.signal = exit.signal;
        self.oom_killed = exit.oom_killed;
        self.finished_at_nanos = exit.finished_at_nanos;
        if self.started_at_nanos == 0 {
            self.started_at_nanos = exit.finished_at_nanos;
        }
        self.reason = match &exit.reason {
            Some(r) => r.clone(),
            None if exit.oom_killed => REASON_OOM_KILLED.into(),
            None if exit.exit_code() == 0 => REASON_COMPLETED.into(),
            None => REASON_ERROR.into(),
        };
        self.message = exit.message.clone();
    }
}

/// How a container's init process ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExitInfo {
    /// exit(2) status (0 when signalled).
    pub status: i32,
    /// The killing signal, 0 if it exited.
    pub signal: i32,
    /// OOM kill.
    pub oom_killed: bool,
    /// Unix nanoseconds.
    pub finished_at_nanos: i64,
    /// A reason overriding the derived one ("VMM exited").
    pub reason: Option<String>,
    /// Details.
    pub message: String,
}

impl ExitInfo {
    /// The CRI exit code: the status, or 128 + signal.
    pub fn exit_code(&self) -> i32 {
        if self.signal != 0 {
            128 + self.signal
        } else {
            self.status
        }
    }

    /// An exit whose details are unknown because the VM went away.
    pub fn vm_gone(reason: &str, message: &str) -> ExitInfo {
        ExitInfo {
            status: UNKNOWN_EXIT_CODE,
            finished_at_nanos: crate::now_nanos(),
            reason: Some(reason.into()),
            message: message.into(),
            ..ExitInfo::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_transitions() {
        use PodState::*;
        assert!(Creating.can_become(Ready));
        assert!(Creating.can_become(NotReady));
        assert!(Ready.can_become(NotReady));
        for (a, b) in [
            (Ready, Creating),
            (NotReady, Ready),
            (NotReady, Creating),
            (Ready, Ready),
        ] {
            assert!(!a.can_become(b), "{a} -> {b}");
        }
    }

    #[test]
    fn container_transitions() {
        use ContainerState::*;
        for (a, b) in [
            (Creating, Created),
            (Created, Running),
            (Created, Exited),
            (Running, Exited),
        ] {
            assert!(a.can_become(b), "{a} -> {b}");
        }
        for (a, b) in [
            (Exited, Running),
            (Running, Created),
            (Exited, Exited),
            (Creating, Running),
        ] {
            assert!(!a.can_become(b), "{a} -> {b}");
        }
    }

    fn container() -> ContainerRecord {
        ContainerRecord {
            version: RECORD_VERSION,
            id: "c".into(),
            pod_id: "p".into(),
            name: "n".into(),
            attempt: 0,
            image_ref: "busybox".into(),
            image_id: "sha256:x".into(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            log_path: None,
            tty: false,
            stdin: false,
            state: ContainerState::Running,
            created_at_nanos: 1,
            started_at_nanos: 2,
            finished_at_nanos: 0,
            exit_code: None,
            signal: 0,
            oom_killed: false,
            reason: String::new(),
            message: String::new(),
            rootfs_disk: "/d.ext4".into(),
            drive: 0,
            guest_pid: 5,
            mounts: vec![],
            process: serde_json::json!({"args": ["sh"]}),
            stop_signal: 15,
        }
    }

    #[test]
    fn exit_reasons() {
        let mut c = container();
        let exit = |status, signal, oom| ExitInfo {
            status,
            signal,
            oom_killed: oom,
            finished_at_nanos: 9,
            ..ExitInfo::default()
        };
        c.set_exited(&exit(0, 0, false));
        assert_eq!((c.exit_code, c.reason.as_str()), (Some(0), "Completed"));
        c.set_exited(&exit(3, 0, false));
        assert_eq!((c.exit_code, c.reason.as_str()), (Some(3), "Error"));
        c.set_exited(&exit(0, 9, true));
        assert_eq!((c.exit_code, c.reason.as_str()), (Some(137), "OOMKilled"));
        c.set_exited(&exit(0, 15, false));
        assert_eq!((c.exit_code, c.reason.as_str()), (Some(143), "Error"));
        c.set_exited(&ExitInfo::vm_gone(REASON_VMM_EXITED, "killed"));
        assert_eq!(
            (c.exit_code, c.reason.as_str(), c.state),
            (Some(255), "VMM exited", ContainerState::Exited)
        );
    }

    #[test]
    fn records_round_trip() {
        let c = container();
        let text = serde_json::to_string(&c).unwrap();
        assert!(text.contains("\"RUNNING\""));
        let back: ContainerRecord = serde_json::from_str(&text).unwrap();
        assert_eq!(back, c);

        let p = PodRecord {
            version: RECORD_VERSION,
            spec: PodSpec {
                id: "p".into(),
                network: Some(crate::spec::GuestNetwork {
                    netns: "/n".into(),
                    tap: "tap0".into(),
                    guest_ifname: "eth0".into(),
                    mac: [2, 0, 0, 0, 0, 1],
                    mtu: 1500,
                    addresses: vec![
                        ("fd00::2".parse().unwrap(), 64),
                        ("10.0.0.2".parse().unwrap(), 24),
                    ],
                    routes: vec![("0.0.0.0/0".into(), Some("10.0.0.1".parse().unwrap()))],
                }),
                ..PodSpec::default()
            },
            state: PodState::Ready,
            created_at_nanos: 5,
            vcpus: 2,
            memory_mib: 320,
            vmm: Some(VmmIdentity {
                pid: 42,
                start_time: 1234,
            }),
            namespaces: Some(PodNamespaces::default()),
            reason: String::new(),
            message: String::new(),
        };
        let back: PodRecord = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
        assert_eq!(back.ips()[0], "10.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(back.vmm_pid(), Some(42));
    }
}
