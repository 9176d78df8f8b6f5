//! hyperd's configuration: a TOML file (`/etc/hyperd/config.toml`), every key optional.
//! `deploy/hyperd/config.toml` lists every key with its default.

use std::path::PathBuf;

use serde::Deserialize;

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The CRI socket (mode 0660, group `socket_group` when set).
    pub socket: PathBuf,
    /// A group allowed to use the socket besides root.
    pub socket_group: Option<String>,
    /// Pod state (records, VMM sockets): tmpfs, so a reboot forgets pods as kubelet expects.
    pub state_dir: PathBuf,
    /// Images and their ext4 disks.
    pub image_dir: PathBuf,
    /// VMM logs and guest consoles (`<pod id>.vmm.log`, `<pod id>.console`), removed with the
    /// pod.
    pub vm_log_dir: PathBuf,
    /// The VMM binary, guest kernel and initramfs.
    pub vmm: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Extra guest kernel command line.
    pub kernel_cmdline: String,
    /// VM size for pods without limits, and what is added to every pod's memory.
    pub default_vcpus: u8,
    pub default_memory_mib: u64,
    pub overhead_memory_mib: u64,
    pub max_vcpus: u8,
    /// Container rootfs disks a pod can hold at once.
    pub spare_drives: u8,
    /// How long a VM may take to boot.
    pub boot_timeout_secs: u64,
    /// Deadline of an ordinary call to a pod's agent.
    pub agent_call_timeout_secs: u64,
    /// CNI configuration and plugins.
    pub cni_conf_dir: PathBuf,
    pub cni_bin_dirs: Vec<PathBuf>,
    pub netns_dir: PathBuf,
    pub network_state_dir: PathBuf,
    /// Registries spoken to over plain HTTP (`host:port`).
    pub insecure_registries: Vec<String>,
    /// Mirrors per registry.
    pub registry_mirrors: std::collections::BTreeMap<String, Vec<String>>,
    /// The cgroup driver reported to kubelet.
    pub cgroup_driver: String,
    /// Images imported from local archives at start-up when the store lacks them: the
    /// built-in default image, so a node runs `busybox` pods without a registry.
    pub preload_images: Vec<PreloadImage>,
}

/// An image imported at start-up from a `docker save` or OCI archive.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PreloadImage {
    /// The name it gets (also how it is chosen inside a multi-image archive).
    pub name: String,
    pub archive: PathBuf,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            socket: "/run/hyperd/hyperd.sock".into(),
            socket_group: None,
            state_dir: "/run/hyperd/sandboxes".into(),
            image_dir: "/var/lib/hyperd/images".into(),
            vm_log_dir: "/var/log/hyperd/pods".into(),
            vmm: "/usr/local/lib/hypernetes/hyper-vmm".into(),
            kernel: "/usr/local/lib/hypernetes/vmlinux".into(),
            initrd: "/usr/local/lib/hypernetes/initrd.img".into(),
            kernel_cmdline: String::new(),
            default_vcpus: 1,
            default_memory_mib: 128,
            overhead_memory_mib: 64,
            max_vcpus: 16,
            spare_drives: 8,
            boot_timeout_secs: 30,
            agent_call_timeout_secs: 30,
            cni_conf_dir: "/etc/cni/net.d".into(),
            cni_bin_dirs: vec!["/opt/cni/bin".into(), "/usr/lib/cni".into()],
            netns_dir: "/run/hyperd/netns".into(),
            network_state_dir: "/var/lib/hyperd/network".into(),
            insecure_registries: Vec::new(),
            registry_mirrors: Default::default(),
            cgroup_driver: "cgroupfs".into(),
            preload_images: vec![PreloadImage {
                name: "docker.io/library/busybox:latest".into(),
                archive: "/usr/local/lib/hypernetes/images/busybox.tar".into(),
            }],
        }
    }
}

/// The configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads `path`; a missing file at the default path means all defaults.
    pub fn load(path: &std::path::Path, must_exist: bool) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => {
                return Ok(Config::default())
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        let config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.default_vcpus == 0 || self.default_vcpus > self.max_vcpus {
            return Err(ConfigError::Invalid(
                "default_vcpus must be 1..=max_vcpus".into(),
            ));
        }
        if self.default_memory_mib < 32 {
            return Err(ConfigError::Invalid(
                "default_memory_mib must be at least 32".into(),
            ));
        }
        if self.boot_timeout_secs == 0 || self.agent_call_timeout_secs == 0 {
            return Err(ConfigError::Invalid(
                "boot_timeout_secs and agent_call_timeout_secs must be at least 1".into(),
            ));
        }
        for p in &self.preload_images {
            if image::reference::Reference::parse(&p.name).is_err() {
                return Err(ConfigError::Invalid(format!(
                    "preload_images: {:?} is not an image reference",
                    p.name
                )));
            }
        }
        if !matches!(self.cgroup_driver.as_str(), "cgroupfs" | "systemd") {
            return Err(ConfigError::Invalid(
                "cgroup_driver is cgroupfs or systemd".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let c: Config =
            toml::from_str("default_vcpus = 2\ninsecure_registries = [\"127.0.0.1:5000\"]")
                .unwrap();
        assert_eq!(c.default_vcpus, 2);
        assert_eq!(c.default_memory_mib, 128);
        assert_eq!(c.insecure_registries, ["127.0.0.1:5000"]);
        assert!(toml::from_str::<Config>("bogus = 1").is_err());
        let bad = Config {
            default_vcpus: 0,
            ..Config::default()
        };
        assert!(bad.validate().is_err());
        let bad = Config {
            preload_images: vec![PreloadImage {
                name: "Not A Ref".into(),
                archive: "/x.tar".into(),
            }],
            ..Config::default()
        };
        assert!(bad.validate().is_err());
        // The documented example in deploy/ parses and equals the defaults.
        let doc = include_str!("../../../deploy/hyperd/config.toml");
        let parsed: Config = toml::from_str(doc).unwrap();
        assert_eq!(parsed, Config::default());
    }
}
