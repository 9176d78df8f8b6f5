//! Block devices holding container root filesystems, mounted once per disk and shared.
//!
//! A disk is found by its virtio-blk serial (or node path) and mounted under
//! `<state dir>/disks/<n>`; every container naming it holds a reference, and the last one to go
//! unmounts it. A disk is mounted read-only unless a single container asks for it writable
//! without an overlay (a writable disk cannot be shared).

use std::collections::HashMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::ContainerError;
use crate::block::{BlockDevices, Selector};

struct Mounted {
    dir: PathBuf,
    writable: bool,
    users: usize,
}

/// The mounted disks, by device node.
pub struct Disks {
    devices: BlockDevices,
    root: PathBuf,
    table: Mutex<HashMap<String, Mounted>>,
    next: Mutex<u64>,
}

/// A container's hold on a mounted disk; give it back with [`Disks::release`].
#[derive(Debug)]
pub struct DiskRef {
    node: String,
    pub dir: PathBuf,
}

impl Disks {
    pub fn new(devices: BlockDevices, root: PathBuf) -> Arc<Disks> {
        Arc::new(Disks {
            devices,
            root,
            table: Mutex::new(HashMap::new()),
            next: Mutex::new(0),
        })
    }

    /// Mounts (or shares) the disk `selector` names with filesystem `fs_type`.
    pub fn acquire(
        &self,
        selector: &Selector,
        fs_type: &str,
        writable: bool,
    ) -> Result<DiskRef, ContainerError> {
        if !matches!(
            fs_type,
            "ext4" | "ext3" | "ext2" | "xfs" | "erofs" | "squashfs"
        ) {
            return Err(ContainerError::InvalidArgument(format!(
                "rootfs filesystem {fs_type:?} is not supported"
            )));
        }
        let name = self
            .devices
            .resolve(selector)
            .map_err(|e| ContainerError::NotFound(format!("rootfs disk: {e}")))?;
        let node = self.devices.dev_dir.join(&name).display().to_string();
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(m) = table.get_mut(&node) {
            if writable || m.writable {
                return Err(ContainerError::InvalidArgument(format!(
                    "disk {node} is in use; a writable rootfs disk cannot be shared"
                )));
            }
            m.users += 1;
            return Ok(DiskRef {
                node,
                dir: m.dir.clone(),
            });
        }
        let n = {
            let mut next = self.next.lock().unwrap_or_else(PoisonError::into_inner);
            *next += 1;
            *next
        };
        let dir = self.root.join(n.to_string());
        std::fs::create_dir_all(&dir)
            .map_err(|e| ContainerError::Setup(format!("creating {}: {e}", dir.display())))?;
        let mut flags = MsFlags::MS_NODEV | MsFlags::MS_NOSUID;
        if !writable {
            flags |= MsFlags::MS_RDONLY;
        }
        let fstype = CString::new(fs_type).unwrap_or_default();
        let data: Option<&str> = (fs_type.starts_with("ext") && !writable).then_some("noload");
        let src = Path::new(&node);
        if let Err(e) = mount(Some(src), &dir, Some(fstype.as_c_str()), flags, data) {
            let _ = std::fs::remove_dir(&dir);
            return Err(ContainerError::Setup(format!(
                "mounting {node} ({fs_type}) on {}: {e}",
                dir.display()
            )));
        }
        log::info!("mounted rootfs disk {node} on {}", dir.display());
        table.insert(
            node.clone(),
            Mounted {
                dir: dir.clone(),
                writable,
                users: 1,
            },
        );
        Ok(DiskRef { node, dir })
    }

    /// Drops a reference; the last one unmounts the disk.
    pub fn release(&self, r: &DiskRef) {
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(m) = table.get_mut(&r.node) else {
            return;
        };
        m.users -= 1;
        if m.users > 0 {
            return;
        }
        let dir = m.dir.clone();
        table.remove(&r.node);
        drop(table);
        match umount2(&dir, MntFlags::empty()) {
            Ok(()) => {}
            // Still busy (a process we could not kill?): detach it so it goes when free.
            Err(e) => {
                log::warn!("unmounting {} failed ({e}); detaching", dir.display());
                let _ = umount2(&dir, MntFlags::MNT_DETACH);
            }
        }
        let _ = std::fs::remove_dir(&dir);
    }

    /// Paths usable in overlay options (no ',', ':' or '\\').
    pub fn overlay_safe(dir: &Path) -> bool {
        !dir.as_os_str()
            .as_bytes()
            .iter()
            .any(|b| b",:\\".contains(b))
    }
}
