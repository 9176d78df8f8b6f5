//! The pseudo filesystems PID 1 mounts before anything else.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};

/// One filesystem to mount.
#[derive(Debug, Clone, Copy)]
pub struct MountSpec {
    pub source: &'static str,
    pub target: &'static str,
    pub fstype: &'static str,
    pub flags: MsFlags,
    pub data: Option<&'static str>,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// What a guest needs, in mount order (parents first).
pub const GUEST_MOUNTS: &[MountSpec] = &[
    MountSpec {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    MountSpec {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    MountSpec {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    MountSpec {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    },
    MountSpec {
        source: "shm",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: Some("mode=1777"),
    },
    MountSpec {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    MountSpec {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
    },
    MountSpec {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
];

/// A mount that failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The mount point could not be created.
    #[error("creating mount point {path} failed")]
    Mkdir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// mount(2) failed.
    #[error("mounting {fstype} on {target} failed")]
    Mount {
        fstype: &'static str,
        target: &'static str,
        #[source]
        source: nix::Error,
    },
}

/// Whether `path` is already the root of a mount: it lives on another device than its parent.
pub fn is_mountpoint(path: &Path) -> bool {
    let (Ok(own), Ok(parent)) = (std::fs::metadata(path), std::fs::metadata(path.join("..")))
    else {
        return false;
    };
    own.dev() != parent.dev()
}

/// Mounts one filesystem, creating the mount point; an existing mount is left alone.
pub fn mount_one(spec: &MountSpec) -> Result<(), MountError> {
    let target = Path::new(spec.target);
    std::fs::create_dir_all(target).map_err(|source| MountError::Mkdir {
        path: target.to_owned(),
        source,
    })?;
    if is_mountpoint(target) {
        log::debug!("{} is already mounted", spec.target);
        return Ok(());
    }
    match mount(
        Some(spec.source),
        target,
        Some(spec.fstype),
        spec.flags,
        spec.data,
    ) {
        Ok(()) | Err(nix::Error::EBUSY) => Ok(()),
        Err(source) => Err(MountError::Mount {
            fstype: spec.fstype,
            target: spec.target,
            source,
        }),
    }
}

/// Mounts [`GUEST_MOUNTS`], carrying on past failures; returns every failure.
pub fn mount_all() -> Vec<MountError> {
    GUEST_MOUNTS
        .iter()
        .filter_map(|spec| mount_one(spec).err())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_plain_directories() {
        // "/.." is "/" itself: same device.
        assert!(!is_mountpoint(Path::new("/")));
        assert!(!is_mountpoint(Path::new("/definitely/not/here")));
    }

    #[test]
    fn parents_come_before_children() {
        for (i, spec) in GUEST_MOUNTS.iter().enumerate() {
            for later in &GUEST_MOUNTS[i + 1..] {
                assert!(
                    !spec.target.starts_with(&format!("{}/", later.target)),
                    "{} is mounted before its parent {}",
                    spec.target,
                    later.target
                );
            }
        }
    }
}
