//! Named network namespaces: nsfs bind mounts in a shared-propagation directory, as
//! `ip netns add` makes them, and commands run inside one.
//!
//! A namespace is created by a short-lived thread that `unshare(CLONE_NEWNET)`s (only that
//! thread moves) and bind-mounts its `/proc/thread-self/ns/net` onto an empty file; the mount
//! keeps the namespace alive after the thread exits. The directory is made a shared mount
//! point (bind-mounted onto itself first when it is not one) so that mount namespaces copied
//! later (a VMM in its own mount namespace, a systemd unit with private mounts) see the
//! unmount on removal instead of pinning the namespace forever.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::statfs::{fstatfs, NSFS_MAGIC};

/// Errors from network namespace operations.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// A system call on a namespace file or its directory failed.
    #[error("cannot {op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file exists but is not a network namespace.
    #[error("{} is not a network namespace", path.display())]
    NotNetns {
        /// The file.
        path: PathBuf,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> NetnsError + 'a {
    move |source| NetnsError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn errno_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(Errno) -> NetnsError + 'a {
    move |e| NetnsError::Io {
        op,
        path: path.to_path_buf(),
        source: e.into(),
    }
}

/// An open network namespace file.
#[derive(Debug, Clone)]
pub struct Netns {
    fd: Arc<OwnedFd>,
    path: PathBuf,
}

impl Netns {
    /// Opens `path` and checks that it is a network namespace (an nsfs file).
    pub fn open(path: &Path) -> Result<Netns, NetnsError> {
        let file = File::open(path).map_err(io_err("open", path))?;
        let st = fstatfs(file.as_fd()).map_err(errno_err("statfs", path))?;
        if st.filesystem_type() != NSFS_MAGIC {
            return Err(NetnsError::NotNetns {
                path: path.to_path_buf(),
            });
        }
        Ok(Netns {
            fd: Arc::new(OwnedFd::from(file)),
            path: path.to_path_buf(),
        })
    }

    /// The namespace file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A command that runs `program` inside this namespace: the child `setns`es between fork
    /// and exec (what `nsenter --net` does, without needing it). The command keeps the
    /// namespace fd open for as long as it lives; the fd is close-on-exec.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        let fd = Arc::clone(&self.fd);
        let enter = move || {
            // SAFETY: `fd` is an open nsfs fd, kept open by the Arc this closure owns; setns
            // only reads it.
            if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        };
        // SAFETY: the closure runs in the child between fork and exec, where only
        // async-signal-safe work is allowed: it makes one system call (setns) and reads errno;
        // it neither allocates nor takes locks.
        unsafe {
            cmd.pre_exec(enter);
        }
        cmd
    }
}

/// Makes `dir` a shared mount point (creating it), as `ip netns` does for `/run/netns`.
pub(crate) fn prepare_dir(dir: &Path) -> Result<(), NetnsError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(io_err("create", dir))?;
    let make_shared = || {
        mount(
            None::<&str>,
            dir,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match make_shared() {
        Ok(()) => Ok(()),
        // Not a mount point: make it one, then shared.
        Err(Errno::EINVAL) => {
            mount(
                Some(dir),
                dir,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(errno_err("bind-mount onto itself", dir))?;
            make_shared().map_err(errno_err("make a shared mount of", dir))
        }
        Err(e) => Err(errno_err("make a shared mount of", dir)(e)),
    }
}

/// Creates a new network namespace bound at `path` (which must not exist).
pub(crate) fn create(path: &Path) -> Result<(), NetnsError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(path)
        .map_err(io_err("create", path))?;
    let target = path.to_path_buf();
    let joined = std::thread::Builder::new()
        .name("netns-create".into())
        .spawn(move || -> Result<(), NetnsError> {
            // Only this thread moves to the new namespace; it exits right after.
            unshare(CloneFlags::CLONE_NEWNET)
                .map_err(errno_err("create a network namespace for", &target))?;
            mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(errno_err("bind-mount the new namespace onto", &target))
        })
        .map_err(io_err("start the thread creating", path))?
        .join();
    let res = match joined {
        Ok(r) => r,
        Err(_) => Err(NetnsError::Io {
            op: "create (the thread panicked)",
            path: path.to_path_buf(),
            source: io::Error::other("thread panicked"),
        }),
    };
    if res.is_err() {
        let _ = fs::remove_file(path);
    }
    res
}

/// Unmounts and deletes the namespace file at `path`; a missing or unmounted file is fine.
/// The namespace itself goes when its last user (a VMM still inside it) is gone.
pub(crate) fn remove(path: &Path) -> Result<(), NetnsError> {
    match umount2(path, MntFlags::MNT_DETACH) {
        // EINVAL: not a mount point (a file left by a crash between create and mount).
        Ok(()) | Err(Errno::ENOENT) | Err(Errno::EINVAL) => {}
        Err(e) => return Err(errno_err("unmount", path)(e)),
    }
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove", path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn not_a_netns() {
        let f = tempfile::NamedTempFile::new().unwrap();
        assert!(matches!(
            Netns::open(f.path()),
            Err(NetnsError::NotNetns { .. })
        ));
        assert!(matches!(
            Netns::open(Path::new("/nonexistent/ns")),
            Err(NetnsError::Io { .. })
        ));
    }

    #[test]
    fn remove_tolerates_missing_and_plain_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ns");
        remove(&p).unwrap();
        fs::write(&p, "").unwrap();
        if is_root() {
            remove(&p).unwrap();
            assert!(!p.exists());
        }
    }

    #[test]
    fn create_enter_remove() {
        if !is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ns");
        create(&p).unwrap();
        assert!(create(&p).is_err(), "exists already");
        let ns = Netns::open(&p).unwrap();
        // A fresh namespace has only lo.
        let out = ns.command("ip").args(["-o", "link"]).output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains(": lo:"), "{text}");
        drop(ns);
        remove(&p).unwrap();
        assert!(!p.exists());
        remove(&p).unwrap();
    }
}
