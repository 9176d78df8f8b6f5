//! A tap device (or any datagram fd standing in for one) carrying frames prefixed with a
//! 12-byte `virtio_net_hdr_v1`.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Length of the per-frame header the tap exchanges (`virtio_net_hdr_v1`).
pub const VNET_HDR_LEN: usize = 12;

/// Linux `IFNAMSIZ`.
const IFNAMSIZ: usize = 16;

/// Errors from opening a tap device.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name is empty, too long or contains a NUL byte.
    #[error("invalid tap name {0:?}")]
    InvalidName(String),
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] io::Error),
    /// `TUNSETIFF` failed (no such tap, or no permission).
    #[error("cannot attach to tap {name}")]
    SetIff {
        /// The tap.
        name: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `TUNSETVNETHDRSZ` failed.
    #[error("cannot set the vnet header size")]
    SetVnetHdrSize(#[source] io::Error),
    /// The fd could not be made non-blocking.
    #[error("cannot make the tap fd non-blocking")]
    NonBlocking(#[source] io::Error),
}

/// `struct ifreq` as `TUNSETIFF` uses it: a name and the flags, padded to 40 bytes.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// A non-blocking tap fd.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

impl Tap {
    /// Attach to the existing tap interface `name` with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and
    /// a 12-byte vnet header.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        let cname = CString::new(name).map_err(|_| TapError::InvalidName(name.to_string()))?;
        let bytes = cname.as_bytes();
        if bytes.is_empty() || bytes.len() >= IFNAMSIZ {
            return Err(TapError::InvalidName(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut ifr = IfReq {
            name: [0; IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        for (dst, src) in ifr.name.iter_mut().zip(bytes) {
            *dst = *src;
        }
        // SAFETY: `file` is an open tun fd and `ifr` is a properly laid out `struct ifreq` that
        // outlives the call.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
        if ret < 0 {
            return Err(TapError::SetIff {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        let hdr_len: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: `file` is an open tap fd; the kernel reads one int through the pointer.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) };
        if ret < 0 {
            return Err(TapError::SetVnetHdrSize(io::Error::last_os_error()));
        }
        Ok(Tap {
            fd: OwnedFd::from(file),
            name: name.to_string(),
        })
    }

    /// Wrap an fd that already carries vnet-header-prefixed frames (a tap configured by the
    /// runtime, or a datagram socket in tests). The fd is made non-blocking.
    pub fn from_fd(fd: OwnedFd, name: &str) -> Result<Tap, TapError> {
        set_nonblocking(fd.as_raw_fd()).map_err(TapError::NonBlocking)?;
        Ok(Tap {
            fd,
            name: name.to_string(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Read one frame (with its vnet header). `WouldBlock` when none is queued.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes and the fd is open.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// Write one frame (with its vnet header).
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes and the fd is open.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL on an open fd has no memory effects.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL on an open fd has no memory effects.
    let ret = unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
