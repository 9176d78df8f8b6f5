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

/// Where PID 1 copies the initramfs before moving onto it.
const NEW_ROOT: &str = "/.root";

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        if from == Path::new("/") && name == NEW_ROOT.trim_start_matches('/') {
            continue;
        }
        let (src, dst) = (entry.path(), to.join(&name));
        let meta = std::fs::symlink_metadata(&src)?;
        if meta.is_dir() {
            std::fs::create_dir_all(&dst)?;
            std::fs::set_permissions(&dst, meta.permissions())?;
            copy_tree(&src, &dst)?;
        } else if meta.file_type().is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
        } else if meta.is_file() {
            std::fs::copy(&src, &dst)?;
        }
    }
    Ok(())
}

/// Moves PID 1 off the initramfs onto a tmpfs, like `switch_root` does.
///
/// `pivot_root(2)` refuses to pivot away from the initramfs ("rootfs", which has no parent
/// mount), and every container needs it: `chroot` instead would leave the agent's root
/// reachable by a container process that escapes the chroot. Copying the initramfs (the agent
/// binary, about 1 MiB, and empty directories) onto a tmpfs mounted over it, then deleting the
/// originals, costs no memory in the end. Must run first thing in PID 1, before any mount.
pub fn leave_initramfs() -> Result<(), MountError> {
    let new_root = Path::new(NEW_ROOT);
    let io = |what: &'static str| {
        move |source: std::io::Error| MountError::Mkdir {
            path: PathBuf::from(format!("{NEW_ROOT} ({what})")),
            source,
        }
    };
    std::fs::create_dir_all(new_root).map_err(io("mkdir"))?;
    mount(
        Some("tmpfs"),
        new_root,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )
    .map_err(|source| MountError::Mount {
        fstype: "tmpfs",
        target: NEW_ROOT,
        source,
    })?;
    copy_tree(Path::new("/"), new_root).map_err(io("copy"))?;
    let old_root = std::fs::File::open("/").map_err(io("open /"))?;
    std::env::set_current_dir(new_root).map_err(io("chdir"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(|source| {
        MountError::Mount {
            fstype: "move",
            target: "/",
            source,
        }
    })?;
    nix::unistd::chroot(".").map_err(|source| MountError::Mount {
        fstype: "chroot",
        target: "/",
        source,
    })?;
    std::env::set_current_dir("/").map_err(io("chdir /"))?;
    // Free the initramfs copy, reached through the descriptor of the old root (the running
    // binary stays mapped until exit). The initramfs holds files and empty directories only.
    if let Ok(mut dir) = nix::dir::Dir::from_fd(std::os::fd::IntoRawFd::into_raw_fd(old_root)) {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&dir);
        let names: Vec<(std::ffi::CString, bool)> = dir
            .iter()
            .flatten()
            .filter(|e| !matches!(e.file_name().to_bytes(), b"." | b".." | b".root"))
            .map(|e| {
                let is_dir = e.file_type() == Some(nix::dir::Type::Directory);
                (e.file_name().to_owned(), is_dir)
            })
            .collect();
        for (name, is_dir) in names {
            let flag = if is_dir {
                nix::unistd::UnlinkatFlags::RemoveDir
            } else {
                nix::unistd::UnlinkatFlags::NoRemoveDir
            };
            let _ = nix::unistd::unlinkat(Some(fd), name.as_c_str(), flag);
        }
    }
    Ok(())
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
