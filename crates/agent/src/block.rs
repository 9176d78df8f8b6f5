//! Reading virtio-blk disks for the host: `ReadBlock` and `BlockSize`.
//!
//! Only virtio-blk nodes are reachable: a request names either a serial (looked up in
//! `/sys/block/vd*/serial`) or a path of the form `/dev/vd[a-z]+[0-9]*`; nothing else is opened,
//! and never through a symlink. The size is read again on each call (BLKGETSIZE64) and cached
//! pages are dropped first, so a hot-swapped drive shows its new capacity and content.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;

use protocol::MAX_READ_BLOCK_LEN;

/// Longest serial accepted; virtio-blk IDs are 20 bytes, leave room for other transports.
const MAX_SERIAL_LEN: usize = 64;
/// `_IOR(0x12, 114, size_t)` from linux/fs.h.
const BLKGETSIZE64: u64 = 0x8008_1272;

/// Which device a request names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Serial(String),
    Path(String),
}

/// A block request that cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// No device selector was given.
    #[error("no device given: set serial or path")]
    MissingDevice,
    /// The path is not a virtio-blk node.
    #[error("{0:?} is not a /dev/vd* block device path")]
    InvalidPath(String),
    /// The serial is empty, too long or not printable.
    #[error("invalid serial {0:?}")]
    InvalidSerial(String),
    /// No disk has this serial.
    #[error("no virtio-blk disk with serial {0:?}")]
    SerialNotFound(String),
    /// The node does not exist.
    #[error("{0} does not exist")]
    DeviceNotFound(String),
    /// The node is something else than a block device.
    #[error("{0} is not a block device")]
    NotABlockDevice(String),
    /// The requested length exceeds the cap.
    #[error("length {length} exceeds the maximum of {max} bytes")]
    TooLong { length: u32, max: u32 },
    /// The offset lies past the end of the device.
    #[error("offset {offset} is past the end of the device ({size} bytes)")]
    OffsetPastEnd { offset: u64, size: u64 },
    /// Reading sysfs or the device failed.
    #[error("I/O on {path} failed")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// The result of a read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockRead {
    /// The guest path, e.g. `/dev/vdb`.
    pub path: String,
    pub data: Vec<u8>,
    pub size_bytes: u64,
}

/// Where disks are found. [`BlockDevices::guest`] in the VM; tests point it at temp dirs.
#[derive(Debug, Clone)]
pub struct BlockDevices {
    /// Directory holding the `vd*` nodes (`/dev`).
    pub dev_dir: PathBuf,
    /// Directory holding `vd*/serial` (`/sys/block`).
    pub sys_block_dir: PathBuf,
    /// Accept regular files as disks (host mode tests only).
    pub allow_regular_files: bool,
}

impl BlockDevices {
    /// The real guest layout.
    pub fn guest() -> Self {
        BlockDevices {
            dev_dir: PathBuf::from("/dev"),
            sys_block_dir: PathBuf::from("/sys/block"),
            allow_regular_files: false,
        }
    }

    /// Resolves a selector to the device's node name (`vdb`).
    pub fn resolve(&self, selector: &Selector) -> Result<String, BlockError> {
        match selector {
            Selector::Path(path) => {
                let name = path
                    .strip_prefix("/dev/")
                    .filter(|name| is_virtio_blk_name(name))
                    .ok_or_else(|| BlockError::InvalidPath(path.clone()))?;
                Ok(name.to_owned())
            }
            Selector::Serial(serial) => {
                validate_serial(serial)?;
                self.find_serial(serial)
            }
        }
    }

    fn find_serial(&self, serial: &str) -> Result<String, BlockError> {
        let io_err = |source| BlockError::Io {
            path: self.sys_block_dir.display().to_string(),
            source,
        };
        let mut names: Vec<String> = std::fs::read_dir(&self.sys_block_dir)
            .map_err(io_err)?
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .filter(|name| is_virtio_blk_name(name))
            .collect();
        names.sort();
        for name in names {
            // A disk without a serial attribute simply does not match.
            let Ok(found) = std::fs::read(self.sys_block_dir.join(&name).join("serial")) else {
                continue;
            };
            if trim_serial(&found) == serial.as_bytes() {
                return Ok(name);
            }
        }
        Err(BlockError::SerialNotFound(serial.to_owned()))
    }

    /// Opens the device, checks its type and returns it with its guest path and current size.
    fn open(&self, selector: &Selector) -> Result<(File, String, u64), BlockError> {
        let name = self.resolve(selector)?;
        let guest_path = format!("/dev/{name}");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(self.dev_dir.join(&name))
            .map_err(|source| match source.raw_os_error() {
                Some(libc::ENOENT) => BlockError::DeviceNotFound(guest_path.clone()),
                // O_NOFOLLOW on a symlink.
                Some(libc::ELOOP) => BlockError::NotABlockDevice(guest_path.clone()),
                _ => BlockError::Io {
                    path: guest_path.clone(),
                    source,
                },
            })?;
        let io_err = |source| BlockError::Io {
            path: guest_path.clone(),
            source,
        };
        let file_type = file.metadata().map_err(io_err)?.file_type();
        let size = if file_type.is_block_device() {
            block_device_size(&file).map_err(io_err)?
        } else if self.allow_regular_files && file_type.is_file() {
            file.metadata().map_err(io_err)?.len()
        } else {
            return Err(BlockError::NotABlockDevice(guest_path));
        };
        Ok((file, guest_path, size))
    }

    /// The device's current size.
    pub fn size(&self, selector: &Selector) -> Result<(String, u64), BlockError> {
        let (_, path, size) = self.open(selector)?;
        Ok((path, size))
    }

    /// Reads up to `length` bytes at `offset`; short at the end of the device.
    pub fn read(
        &self,
        selector: &Selector,
        offset: u64,
        length: u32,
    ) -> Result<BlockRead, BlockError> {
        if length > MAX_READ_BLOCK_LEN {
            return Err(BlockError::TooLong {
                length,
                max: MAX_READ_BLOCK_LEN,
            });
        }
        let (file, path, size) = self.open(selector)?;
        if offset > size {
            return Err(BlockError::OffsetPastEnd { offset, size });
        }
        let wanted = u64::from(length).min(size - offset);
        // Bounded by MAX_READ_BLOCK_LEN above.
        let mut data = vec![0u8; usize::try_from(wanted).unwrap_or(0)];
        drop_cached_pages(&file);
        let mut filled = 0;
        while filled < data.len() {
            match file.read_at(&mut data[filled..], offset + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => return Err(BlockError::Io { path, source }),
            }
        }
        data.truncate(filled);
        Ok(BlockRead {
            path,
            data,
            size_bytes: size,
        })
    }
}

/// `vd` followed by lowercase letters, then optional partition digits.
pub fn is_virtio_blk_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("vd") else {
        return false;
    };
    let letters = rest.bytes().take_while(u8::is_ascii_lowercase).count();
    letters > 0 && rest.bytes().skip(letters).all(|b| b.is_ascii_digit())
}

fn validate_serial(serial: &str) -> Result<(), BlockError> {
    let ok = !serial.is_empty()
        && serial.len() <= MAX_SERIAL_LEN
        && serial.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(BlockError::InvalidSerial(serial.to_owned()))
    }
}

/// The sysfs attribute ends with a newline; short IDs may be NUL-padded.
fn trim_serial(raw: &[u8]) -> &[u8] {
    let end = raw
        .iter()
        .rposition(|b| !matches!(b, b'\n' | b'\0' | b' '))
        .map_or(0, |i| i + 1);
    &raw[..end]
}

fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a live local.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// Drops clean cached pages so a swapped backing file is read afresh. Best effort.
fn drop_cached_pages(file: &File) {
    // SAFETY: posix_fadvise only takes an fd and integers.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        log::debug!(
            "posix_fadvise(DONTNEED) failed: {}",
            io::Error::from_raw_os_error(rc)
        );
    }
}

/// Selector from the protobuf message.
pub fn selector_from_proto(
    dev: Option<&protocol::agent::BlockDevice>,
) -> Result<Selector, BlockError> {
    use protocol::agent::block_device::Selector as Proto;
    match dev.and_then(|d| d.selector.as_ref()) {
        Some(Proto::Serial(s)) => Ok(Selector::Serial(s.clone())),
        Some(Proto::Path(p)) => Ok(Selector::Path(p.clone())),
        // Unset, or a selector kind this build does not know.
        _ => Err(BlockError::MissingDevice),
    }
}

/// Builds a fake `/dev` + `/sys/block` with regular files as disks.
#[cfg(test)]
pub(crate) mod fake {
    use super::*;

    pub struct FakeDisks {
        pub root: PathBuf,
    }

    impl FakeDisks {
        pub fn new(tag: &str) -> Self {
            let root =
                std::env::temp_dir().join(format!("agent-test-{}-{tag}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(root.join("dev")).unwrap();
            std::fs::create_dir_all(root.join("sys/block")).unwrap();
            FakeDisks { root }
        }

        pub fn add(&self, name: &str, serial: Option<&[u8]>, content: &[u8]) {
            std::fs::write(self.root.join("dev").join(name), content).unwrap();
            let sys = self.root.join("sys/block").join(name);
            std::fs::create_dir_all(&sys).unwrap();
            if let Some(serial) = serial {
                std::fs::write(sys.join("serial"), serial).unwrap();
            }
        }

        pub fn devices(&self) -> BlockDevices {
            BlockDevices {
                dev_dir: self.root.join("dev"),
                sys_block_dir: self.root.join("sys/block"),
                allow_regular_files: true,
            }
        }

        pub fn path(&self, rel: &str) -> PathBuf {
            self.root.join(rel)
        }
    }

    impl Drop for FakeDisks {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeDisks;
    use super::*;

    fn serial(s: &str) -> Selector {
        Selector::Serial(s.to_owned())
    }

    fn path(s: &str) -> Selector {
        Selector::Path(s.to_owned())
    }

    #[test]
    fn virtio_names() {
        for ok in ["vda", "vdb", "vdaa", "vda1", "vdz15"] {
            assert!(is_virtio_blk_name(ok), "{ok}");
        }
        for bad in [
            "", "vd", "vd1", "sda", "vda/", "vda1a", "vdA", "../vda", "vda\0",
        ] {
            assert!(!is_virtio_blk_name(bad), "{bad}");
        }
    }

    #[test]
    fn paths_outside_dev_vd_are_rejected() {
        let disks = FakeDisks::new("paths");
        let devs = disks.devices();
        for bad in [
            "/dev/sda",
            "/etc/shadow",
            "/dev/../etc/shadow",
            "/dev/vda/../../etc/passwd",
            "dev/vda",
            "/dev//vda",
            "/dev/vda ",
            "",
        ] {
            assert!(
                matches!(devs.resolve(&path(bad)), Err(BlockError::InvalidPath(_))),
                "{bad}"
            );
        }
        assert_eq!(devs.resolve(&path("/dev/vdc")).unwrap(), "vdc");
    }

    #[test]
    fn serial_lookup_on_fake_sysfs() {
        let disks = FakeDisks::new("serial");
        disks.add("vda", Some(b"rootfs\n"), b"a");
        disks.add("vdb", Some(b"data-1\0\0\0\0\n"), b"b");
        disks.add("vdc", None, b"c");
        disks.add("sda", Some(b"scsi\n"), b"s");
        let devs = disks.devices();
        assert_eq!(devs.resolve(&serial("rootfs")).unwrap(), "vda");
        assert_eq!(devs.resolve(&serial("data-1")).unwrap(), "vdb");
        assert!(matches!(
            devs.resolve(&serial("scsi")),
            Err(BlockError::SerialNotFound(_))
        ));
        assert!(matches!(
            devs.resolve(&serial("data")),
            Err(BlockError::SerialNotFound(_))
        ));
        assert!(matches!(
            devs.resolve(&serial("")),
            Err(BlockError::InvalidSerial(_))
        ));
        assert!(matches!(
            devs.resolve(&serial("a b")),
            Err(BlockError::InvalidSerial(_))
        ));
        let long = "x".repeat(65);
        assert!(matches!(
            devs.resolve(&serial(&long)),
            Err(BlockError::InvalidSerial(_))
        ));
    }

    #[test]
    fn read_bounds() {
        let disks = FakeDisks::new("bounds");
        let content: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        disks.add("vda", Some(b"disk\n"), &content);
        let devs = disks.devices();

        let r = devs.read(&serial("disk"), 10, 6).unwrap();
        assert_eq!(r.data, &content[10..16]);
        assert_eq!(r.size_bytes, 4096);
        assert_eq!(r.path, "/dev/vda");

        // Short read at the end, empty read exactly at the end.
        assert_eq!(
            devs.read(&serial("disk"), 4090, 100).unwrap().data,
            &content[4090..]
        );
        assert!(devs
            .read(&serial("disk"), 4096, 100)
            .unwrap()
            .data
            .is_empty());
        assert!(matches!(
            devs.read(&serial("disk"), 4097, 1),
            Err(BlockError::OffsetPastEnd {
                offset: 4097,
                size: 4096
            })
        ));
        assert!(matches!(
            devs.read(&serial("disk"), u64::MAX, MAX_READ_BLOCK_LEN),
            Err(BlockError::OffsetPastEnd { .. })
        ));
        assert!(matches!(
            devs.read(&serial("disk"), 0, MAX_READ_BLOCK_LEN + 1),
            Err(BlockError::TooLong { .. })
        ));
        assert_eq!(
            devs.read(&path("/dev/vda"), 0, MAX_READ_BLOCK_LEN)
                .unwrap()
                .data,
            content
        );
        assert!(matches!(
            devs.read(&path("/dev/vdz"), 0, 1),
            Err(BlockError::DeviceNotFound(_))
        ));
    }

    #[test]
    fn size_follows_the_file() {
        let disks = FakeDisks::new("resize");
        disks.add("vda", Some(b"disk\n"), &[0; 512]);
        let devs = disks.devices();
        assert_eq!(devs.size(&serial("disk")).unwrap().1, 512);
        std::fs::write(disks.path("dev/vda"), [1u8; 2048]).unwrap();
        let r = devs.read(&serial("disk"), 1024, 4).unwrap();
        assert_eq!((r.size_bytes, r.data), (2048, vec![1; 4]));
    }

    #[test]
    fn regular_files_need_host_mode_and_symlinks_are_refused() {
        let disks = FakeDisks::new("types");
        disks.add("vda", Some(b"disk\n"), b"data");
        let mut devs = disks.devices();
        devs.allow_regular_files = false;
        assert!(matches!(
            devs.read(&path("/dev/vda"), 0, 1),
            Err(BlockError::NotABlockDevice(_))
        ));

        std::os::unix::fs::symlink(disks.path("dev/vda"), disks.path("dev/vdb")).unwrap();
        let devs = disks.devices();
        assert!(matches!(
            devs.read(&path("/dev/vdb"), 0, 1),
            Err(BlockError::NotABlockDevice(_))
        ));
    }
}
