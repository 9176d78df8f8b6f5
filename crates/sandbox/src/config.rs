//! The manager's configuration (node-level settings from hyperd's flags or config file).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Result, SandboxError};
use crate::layout::SOCKET_NAME_LEN;
use crate::spec::MAX_ID_LEN;

/// Longest socket path `hyper-vmm` accepts (it appends `_<port>` for guest-initiated vsock
/// connections, and `sun_path` holds 108 bytes).
pub const MAX_SOCKET_PATH: usize = 96;

/// Node-level settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagerConfig {
    /// One directory per pod: records, VM config, VMM sockets (`/run/hyperd/sandboxes`).
    pub state_root: PathBuf,
    /// The `hyper-vmm` binary.
    pub vmm_binary: PathBuf,
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Guest initramfs (hyperstart as /init).
    pub initrd: PathBuf,
    /// Appended to the VMM's default kernel command line.
    pub kernel_cmdline_extra: String,
    /// vCPUs of a pod without a CPU limit.
    pub default_vcpus: u8,
    /// Guest memory (MiB) of a pod without a memory limit, before the overhead.
    pub default_memory_mib: u64,
    /// Added to every pod's memory: guest kernel, agent, page cache headroom, the containers'
    /// overlay upper layers (tmpfs).
    pub overhead_memory_mib: u64,
    /// Most vCPUs a pod gets.
    pub max_vcpus: u8,
    /// Spare drives per VM; container rootfs disks are attached to them (one per distinct
    /// image in the pod), so this is the most distinct images a pod can run.
    pub spare_drives: u8,
    /// How long a VM may take from spawn to a serving agent.
    pub boot_timeout: Duration,
    /// Deadline of an ordinary agent call (long polls get their wait on top).
    pub agent_call_timeout: Duration,
    /// VMM logs and guest consoles, `<pod id>.vmm.log` and `<pod id>.console`.
    pub log_dir: PathBuf,
}

impl ManagerConfig {
    /// A configuration with the defaults for everything but the artifacts.
    pub fn new(vmm_binary: PathBuf, kernel: PathBuf, initrd: PathBuf) -> Self {
        ManagerConfig {
            state_root: PathBuf::from("/run/hyperd/sandboxes"),
            vmm_binary,
            kernel,
            initrd,
            kernel_cmdline_extra: String::new(),
            default_vcpus: 1,
            default_memory_mib: 128,
            overhead_memory_mib: 64,
            max_vcpus: 8,
            spare_drives: 8,
            boot_timeout: Duration::from_secs(60),
            agent_call_timeout: crate::lifecycle::CALL_TIMEOUT,
            log_dir: PathBuf::from("/var/log/hyperd/pods"),
        }
    }

    /// Checks the values that do not depend on a pod.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(SandboxError::InvalidConfig(m));
        if !self.state_root.is_absolute() || !self.log_dir.is_absolute() {
            return bad("state_root and log_dir must be absolute paths".into());
        }
        // <state_root>/<id>/<socket>: the longest id must still fit the VMM's limit.
        let longest = self.state_root.as_os_str().len() + 1 + MAX_ID_LEN + 1 + SOCKET_NAME_LEN;
        if longest > MAX_SOCKET_PATH {
            log::warn!(
                "state root {} is long: pod ids longer than {} bytes will be refused",
                self.state_root.display(),
                MAX_ID_LEN.saturating_sub(longest - MAX_SOCKET_PATH)
            );
        }
        if self.state_root.as_os_str().len() + 3 + SOCKET_NAME_LEN > MAX_SOCKET_PATH {
            return bad(format!(
                "state_root {} leaves no room for socket paths ({MAX_SOCKET_PATH} bytes)",
                self.state_root.display()
            ));
        }
        if self.log_dir.as_os_str().len() + 2 + ".console".len() > MAX_SOCKET_PATH {
            return bad(format!(
                "log_dir {} leaves no room for console paths ({MAX_SOCKET_PATH} bytes)",
                self.log_dir.display()
            ));
        }
        if self.max_vcpus == 0 || self.max_vcpus > vmm::config::MAX_VCPUS {
            return bad(format!(
                "max_vcpus must be 1..={}, got {}",
                vmm::config::MAX_VCPUS,
                self.max_vcpus
            ));
        }
        if self.default_vcpus == 0 || self.default_vcpus > self.max_vcpus {
            return bad(format!(
                "default_vcpus must be 1..=max_vcpus ({}), got {}",
                self.max_vcpus, self.default_vcpus
            ));
        }
        // Devices: spares + one NIC + vsock + rng.
        if usize::from(self.spare_drives) + 3 > vmm::config::MAX_VIRTIO_DEVICES {
            return bad(format!(
                "spare_drives must be at most {}, got {}",
                vmm::config::MAX_VIRTIO_DEVICES - 3,
                self.spare_drives
            ));
        }
        if self.default_memory_mib + self.overhead_memory_mib < vmm::config::MIN_MEMORY_MIB {
            return bad(format!(
                "default_memory_mib + overhead_memory_mib must be at least {} MiB",
                vmm::config::MIN_MEMORY_MIB
            ));
        }
        if self.boot_timeout.is_zero() {
            return bad("boot_timeout must not be zero".into());
        }
        if self.kernel_cmdline_extra.contains(['\n', '\0']) {
            return bad("kernel_cmdline_extra must not contain newlines or NUL".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ManagerConfig {
        ManagerConfig::new("/vmm".into(), "/k".into(), "/i".into())
    }

    #[test]
    fn defaults_are_valid() {
        cfg().validate().unwrap();
    }

    #[test]
    fn bad_values_are_refused() {
        let cases: [&dyn Fn(&mut ManagerConfig); 7] = [
            &|c| c.max_vcpus = 0,
            &|c| c.max_vcpus = 200,
            &|c| c.default_vcpus = 9,
            &|c| c.spare_drives = 17,
            &|c| c.state_root = "relative".into(),
            &|c| c.state_root = PathBuf::from(format!("/{}", "x".repeat(90))),
            &|c| c.kernel_cmdline_extra = "a\nb".into(),
        ];
        for f in cases {
            let mut c = cfg();
            f(&mut c);
            assert!(c.validate().is_err(), "{c:?}");
        }
    }
}
