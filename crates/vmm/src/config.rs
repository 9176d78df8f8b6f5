//! VM configuration: plain serde data, validated before any VM object exists.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Most vCPUs a VM may have (the MP table and IRQ routing are sized for this).
pub const MAX_VCPUS: u8 = 32;
/// Smallest guest memory that can hold our kernel, initramfs and agent.
pub const MIN_MEMORY_MIB: u64 = 32;
/// Largest guest memory accepted (1 TiB).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// virtio-mmio devices get GSIs 5..=23 on the IOAPIC: at most 19 devices.
pub const MAX_VIRTIO_DEVICES: usize = 19;

/// A configuration error, found before anything is created.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The JSON is malformed or has unknown fields.
    #[error("invalid config JSON")]
    Parse(#[source] serde_json::Error),
    /// A value is out of range or inconsistent.
    #[error("invalid config: {0}")]
    Invalid(String),
}

fn invalid<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError::Invalid(msg.into()))
}

/// Where the guest's serial console goes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Console {
    /// Discard console output.
    #[default]
    Off,
    /// The VMM's standard output.
    Stdout,
    /// Append to a file.
    File(PathBuf),
}

/// A virtio-blk disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    /// Drive id: the device serial the guest sees (at most 20 bytes, `[A-Za-z0-9._-]`).
    pub id: String,
    /// Raw image file.
    pub path: PathBuf,
    /// Attach read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// A virtio-net interface backed by a tap device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Net {
    /// Name of an existing tap device (created by the runtime), at most 15 bytes.
    pub tap: String,
    /// Guest MAC address, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
}

/// The virtio-vsock device and its host-side Unix socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    /// Guest context id (>= 3).
    pub cid: u64,
    /// Host Unix socket path; guest-initiated connections reach `<socket>_<port>`.
    pub socket: PathBuf,
}

/// Everything needed to build and boot one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Guest kernel: bzImage or ELF vmlinux.
    pub kernel: PathBuf,
    /// Optional initramfs.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line, before the VMM appends its device entries.
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    /// Number of vCPUs.
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Guest memory in MiB.
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    /// Disks, in the order they are attached.
    #[serde(default)]
    pub disks: Vec<Disk>,
    /// Spare ("stub") block devices attached empty (zero capacity) and read-only, to be given a
    /// backing file later through the control socket. Their ids are `spare0`, `spare1`, ...
    #[serde(default)]
    pub spare_disks: u8,
    /// Network interfaces.
    #[serde(default)]
    pub nets: Vec<Net>,
    /// The vsock device.
    #[serde(default)]
    pub vsock: Option<Vsock>,
    /// Attach a virtio-rng device.
    #[serde(default = "default_true")]
    pub rng: bool,
    /// Serial console destination.
    #[serde(default)]
    pub console: Console,
    /// Control socket path.
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
}

/// Command line used when the configuration names none: quiet, fast, panics reported to the VMM.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 quiet reboot=t,panic_warm panic=-1 \
    tsc=reliable no_timer_check noreplace-smp cryptomgr.notests rcupdate.rcu_expedited=1 \
    i8042.noaux i8042.nomux i8042.dumbkbd";

fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_string()
}
fn default_vcpus() -> u8 {
    1
}
fn default_memory() -> u64 {
    128
}
fn default_true() -> bool {
    true
}

impl VmConfig {
    /// A configuration with defaults for everything but the kernel.
    pub fn new(kernel: PathBuf) -> Self {
        VmConfig {
            kernel,
            initrd: None,
            cmdline: default_cmdline(),
            vcpus: default_vcpus(),
            memory_mib: default_memory(),
            disks: Vec::new(),
            spare_disks: 0,
            nets: Vec::new(),
            vsock: None,
            rng: true,
            console: Console::Off,
            control_socket: None,
        }
    }

    /// Parse a JSON configuration.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        serde_json::from_str(text).map_err(ConfigError::Parse)
    }

    /// Read and parse a JSON configuration file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text)
    }

    /// Ids of the spare drives.
    pub fn spare_ids(&self) -> impl Iterator<Item = String> {
        (0..self.spare_disks).map(|i| format!("spare{i}"))
    }

    /// Number of virtio-mmio devices this configuration creates.
    pub fn virtio_device_count(&self) -> usize {
        self.disks.len()
            + usize::from(self.spare_disks)
            + self.nets.len()
            + usize::from(self.vsock.is_some())
            + usize::from(self.rng)
    }

    /// Check every value; the error names the offending field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        require_file(&self.kernel, "kernel")?;
        if let Some(initrd) = &self.initrd {
            require_file(initrd, "initrd")?;
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return invalid(format!("vcpus must be 1..={MAX_VCPUS}, got {}", self.vcpus));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return invalid(format!(
                "memory_mib must be {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB}, got {}",
                self.memory_mib
            ));
        }
        if self.cmdline.len() > 2048 || self.cmdline.bytes().any(|b| b == 0 || b == b'\n') {
            return invalid("cmdline must be at most 2048 bytes without NUL or newline");
        }
        let mut ids = HashSet::new();
        for disk in &self.disks {
            validate_drive_id(&disk.id)?;
            if disk.id.starts_with("spare") {
                return invalid(format!(
                    "disk id {:?}: the prefix \"spare\" is reserved",
                    disk.id
                ));
            }
            if !ids.insert(disk.id.as_str()) {
                return invalid(format!("duplicate disk id {:?}", disk.id));
            }
            require_file(&disk.path, &format!("disk {}", disk.id))?;
        }
        let mut taps = HashSet::new();
        for net in &self.nets {
            if net.tap.is_empty() || net.tap.len() > 15 || net.tap.contains('/') {
                return invalid(format!(
                    "tap name {:?} must be 1..=15 bytes without '/'",
                    net.tap
                ));
            }
            if !taps.insert(net.tap.as_str()) {
                return invalid(format!("tap {:?} used twice", net.tap));
            }
            parse_mac(&net.mac)?;
        }
        if let Some(vsock) = &self.vsock {
            if vsock.cid < 3 || vsock.cid > u64::from(u32::MAX - 1) {
                return invalid(format!(
                    "vsock cid must be 3..=4294967294, got {}",
                    vsock.cid
                ));
            }
            require_socket_dir(&vsock.socket, "vsock socket")?;
        }
        if let Some(control) = &self.control_socket {
            require_socket_dir(control, "control socket")?;
        }
        if let Console::File(path) = &self.console {
            require_socket_dir(path, "console file")?;
        }
        if self.virtio_device_count() > MAX_VIRTIO_DEVICES {
            return invalid(format!(
                "{} virtio devices requested, at most {MAX_VIRTIO_DEVICES} fit",
                self.virtio_device_count()
            ));
        }
        Ok(())
    }
}

fn require_file(path: &Path, what: &str) -> Result<(), ConfigError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() || m.file_type().is_block_device_like() => Ok(()),
        Ok(_) => invalid(format!("{what} {} is not a regular file", path.display())),
        Err(e) => invalid(format!("{what} {}: {e}", path.display())),
    }
}

trait BlockLike {
    fn is_block_device_like(&self) -> bool;
}
impl BlockLike for std::fs::FileType {
    fn is_block_device_like(&self) -> bool {
        use std::os::unix::fs::FileTypeExt;
        self.is_block_device()
    }
}

fn require_socket_dir(path: &Path, what: &str) -> Result<(), ConfigError> {
    let as_bytes = path.as_os_str().len();
    // sun_path is 108 bytes including the NUL; vsock adds "_<port>" for guest-initiated sockets.
    if as_bytes == 0 || as_bytes > 96 {
        return invalid(format!("{what} path must be 1..=96 bytes, got {as_bytes}"));
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return invalid(format!(
            "{what} {}: directory {} does not exist",
            path.display(),
            parent.display()
        ));
    }
    Ok(())
}

/// A drive id must fit the 20-byte virtio-blk serial and be safe in paths and logs.
pub fn validate_drive_id(id: &str) -> Result<(), ConfigError> {
    if id.is_empty() || id.len() > 20 {
        return invalid(format!("drive id {id:?} must be 1..=20 bytes"));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return invalid(format!("drive id {id:?} may only contain [A-Za-z0-9._-]"));
    }
    Ok(())
}

/// Parse `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(mac: &str) -> Result<[u8; 6], ConfigError> {
    let mut out = [0u8; 6];
    let mut parts = mac.split(':');
    for byte in out.iter_mut() {
        let part = parts.next().unwrap_or("");
        if part.len() != 2 {
            return invalid(format!("bad MAC address {mac:?}"));
        }
        *byte = u8::from_str_radix(part, 16)
            .or_else(|_| invalid(format!("bad MAC address {mac:?}")))?;
    }
    if parts.next().is_some() {
        return invalid(format!("bad MAC address {mac:?}"));
    }
    if out[0] & 1 != 0 {
        return invalid(format!("MAC address {mac:?} is multicast"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel_file() -> (tempdir::TempDir, PathBuf) {
        let dir = tempdir::TempDir::new();
        let k = dir.path().join("vmlinux");
        std::fs::write(&k, b"not really a kernel").unwrap();
        (dir, k)
    }

    /// Minimal temp dir helper (no extra dependency).
    mod tempdir {
        use std::path::{Path, PathBuf};
        pub struct TempDir(PathBuf);
        impl TempDir {
            pub fn new() -> Self {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "vmm-cfg-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::SeqCst)
                ));
                std::fs::create_dir_all(&p).unwrap();
                TempDir(p)
            }
            pub fn path(&self) -> &Path {
                &self.0
            }
        }
        impl Drop for TempDir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn defaults_validate() {
        let (_d, k) = kernel_file();
        let cfg = VmConfig::new(k);
        cfg.validate().unwrap();
        assert_eq!(cfg.vcpus, 1);
        assert!(cfg.cmdline.contains("panic_warm"));
    }

    #[test]
    fn json_rejects_unknown_fields() {
        let err = VmConfig::from_json(r#"{"kernel":"/k","vcpu":2}"#).unwrap_err();
        assert!(matches!(err, ConfigError::Parse(_)), "{err}");
        let cfg = VmConfig::from_json(r#"{"kernel":"/k","vcpus":2,"console":{"file":"/tmp/x"}}"#)
            .unwrap();
        assert_eq!(cfg.vcpus, 2);
        assert_eq!(cfg.console, Console::File("/tmp/x".into()));
    }

    #[test]
    fn invalid_values_are_named() {
        let (d, k) = kernel_file();
        let check = |f: &dyn Fn(&mut VmConfig), needle: &str| {
            let mut cfg = VmConfig::new(k.clone());
            f(&mut cfg);
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} lacks {needle:?}");
        };
        check(&|c| c.kernel = "/nonexistent/k".into(), "kernel");
        check(&|c| c.vcpus = 0, "vcpus");
        check(&|c| c.vcpus = 33, "vcpus");
        check(&|c| c.memory_mib = 1, "memory_mib");
        check(&|c| c.cmdline = "a\0b".into(), "cmdline");
        let disk = d.path().join("disk.img");
        std::fs::write(&disk, [0u8; 512]).unwrap();
        check(
            &|c| {
                c.disks = vec![
                    Disk {
                        id: "a".into(),
                        path: disk.clone(),
                        read_only: false,
                    },
                    Disk {
                        id: "a".into(),
                        path: disk.clone(),
                        read_only: true,
                    },
                ]
            },
            "duplicate",
        );
        check(
            &|c| {
                c.disks = vec![Disk {
                    id: "x/y".into(),
                    path: disk.clone(),
                    read_only: false,
                }]
            },
            "drive id",
        );
        check(
            &|c| {
                c.disks = vec![Disk {
                    id: "spare0".into(),
                    path: disk.clone(),
                    read_only: false,
                }]
            },
            "reserved",
        );
        check(
            &|c| {
                c.nets = vec![Net {
                    tap: "tap0".into(),
                    mac: "01:00:00:00:00:01".into(),
                }]
            },
            "multicast",
        );
        check(
            &|c| {
                c.nets = vec![Net {
                    tap: "tap0".into(),
                    mac: "zz".into(),
                }]
            },
            "MAC",
        );
        check(
            &|c| {
                c.vsock = Some(Vsock {
                    cid: 2,
                    socket: d.path().join("v.sock"),
                })
            },
            "cid",
        );
        check(
            &|c| {
                c.vsock = Some(Vsock {
                    cid: 3,
                    socket: "/nonexistent/dir/v.sock".into(),
                })
            },
            "does not exist",
        );
        check(&|c| c.spare_disks = 19, "virtio devices");
    }

    #[test]
    fn mac_parse() {
        assert_eq!(
            parse_mac("02:00:0a:0b:0c:ff").unwrap(),
            [2, 0, 10, 11, 12, 255]
        );
        assert!(parse_mac("02:00:0a:0b:0c").is_err());
        assert!(parse_mac("02:00:0a:0b:0c:ff:00").is_err());
        assert!(parse_mac("02:00:0a:0b:0c:fff").is_err());
    }
}
