//! The shim's configuration: `/etc/hyperd/shim.toml` (or `$HYPER_SHIM_CONFIG`), then the
//! environment variables `HYPER_SHIM_VMM`, `HYPER_SHIM_KERNEL`, `HYPER_SHIM_INITRD` and
//! `HYPER_SHIM_STATE` override single values.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::ShimError;

/// Default location of the configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/hyperd/shim.toml";

/// The shim's configuration file.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ShimConfig {
    /// The `hyper-vmm` binary.
    pub vmm: PathBuf,
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The guest initramfs (hyperstart).
    pub initrd: PathBuf,
    /// Per-pod state directories go under this (short: the VMM limits socket paths).
    pub state_dir: PathBuf,
    /// VMM and console logs.
    pub log_dir: PathBuf,
    /// Cached read-only rootfs disks built from snapshot lower directories.
    pub disk_cache: PathBuf,
    /// Guest memory added to the pod's limit, MiB.
    pub overhead_memory_mib: u64,
    /// Guest memory of a pod without a limit, MiB.
    pub default_memory_mib: u64,
    /// vCPUs of a pod without a CPU limit.
    pub default_vcpus: u8,
}

impl Default for ShimConfig {
    fn default() -> Self {
        ShimConfig {
            vmm: PathBuf::from("/usr/local/lib/hypernetes/hyper-vmm"),
            kernel: PathBuf::from("/usr/local/lib/hypernetes/vmlinux"),
            initrd: PathBuf::from("/usr/local/lib/hypernetes/initrd.img"),
            state_dir: PathBuf::from("/run/hypershim"),
            log_dir: PathBuf::from("/var/log/hypershim"),
            disk_cache: PathBuf::from("/var/lib/hypershim/disks"),
            overhead_memory_mib: 64,
            default_memory_mib: 128,
            default_vcpus: 1,
        }
    }
}

impl ShimConfig {
    /// Reads the file (a missing file means the defaults) and applies the environment.
    pub fn load() -> Result<ShimConfig, ShimError> {
        let path = std::env::var_os("HYPER_SHIM_CONFIG")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
        let mut cfg = Self::from_file(&path)?;
        for (var, field) in [
            ("HYPER_SHIM_VMM", &mut cfg.vmm),
            ("HYPER_SHIM_KERNEL", &mut cfg.kernel),
            ("HYPER_SHIM_INITRD", &mut cfg.initrd),
            ("HYPER_SHIM_STATE", &mut cfg.state_dir),
        ] {
            if let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) {
                *field = PathBuf::from(v);
            }
        }
        Ok(cfg)
    }

    /// Parses `path`; a missing file gives the defaults.
    pub fn from_file(path: &Path) -> Result<ShimConfig, ShimError> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).map_err(|e| ShimError::Config {
                path: path.to_path_buf(),
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ShimConfig::default()),
            Err(e) => Err(ShimError::Io {
                what: "reading",
                path: path.to_path_buf(),
                source: e,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_partial_files_and_refuses_unknown_keys() {
        let cfg: ShimConfig =
            toml::from_str("vmm = \"/x/vmm\"\noverhead_memory_mib = 32\n").unwrap();
        assert_eq!(cfg.vmm, PathBuf::from("/x/vmm"));
        assert_eq!(cfg.overhead_memory_mib, 32);
        assert_eq!(cfg.kernel, ShimConfig::default().kernel);
        assert!(toml::from_str::<ShimConfig>("vmmm = \"/x\"").is_err());
    }

    #[test]
    fn missing_file_gives_defaults() {
        let cfg = ShimConfig::from_file(Path::new("/nonexistent/shim.toml")).unwrap();
        assert_eq!(cfg, ShimConfig::default());
    }
}
