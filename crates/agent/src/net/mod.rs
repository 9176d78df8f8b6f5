//! Guest network configuration through classic ioctls (enough for one address and IPv4 routes;
//! netlink can replace it when multiple addresses or IPv6 are needed) and ICMP echo.

pub mod iface;
pub mod ping;
pub mod route;

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// A network request that failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Interface names are 1..=15 bytes without '/', whitespace or NUL.
    #[error("invalid interface name {0:?}")]
    InvalidName(String),
    /// MACs are six colon-separated hex bytes, unicast.
    #[error("invalid MAC address {0:?}")]
    InvalidMac(String),
    /// Not a dotted-quad IPv4 address.
    #[error("invalid IPv4 address {0:?}")]
    InvalidAddress(String),
    /// Prefix lengths are 0..=32; a route destination has no host bits.
    #[error("invalid prefix {0:?}")]
    InvalidPrefix(String),
    /// A request field is out of range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The interface does not exist.
    #[error("no interface named {0:?}")]
    NoSuchInterface(String),
    /// A socket or ioctl call failed.
    #[error("{op} failed")]
    Sys {
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Parses a dotted-quad IPv4 address.
pub fn parse_ipv4(text: &str) -> Result<Ipv4Addr, NetError> {
    text.parse()
        .map_err(|_| NetError::InvalidAddress(text.to_owned()))
}

/// The netmask for a prefix length.
pub fn prefix_to_mask(prefix: u32) -> Result<Ipv4Addr, NetError> {
    if prefix > 32 {
        return Err(NetError::InvalidPrefix(prefix.to_string()));
    }
    let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
    Ok(Ipv4Addr::from(mask))
}

/// An AF_INET datagram socket, the handle for interface and route ioctls.
fn ioctl_socket() -> Result<OwnedFd, NetError> {
    // SAFETY: socket(2) takes only integers.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(NetError::Sys {
            op: "socket(AF_INET)",
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Issues an ioctl whose argument is a pointer to `arg`.
fn ioctl_ptr<T>(fd: &OwnedFd, request: u64, arg: &mut T, op: &'static str) -> Result<(), NetError> {
    // SAFETY: every caller passes a request whose argument type is exactly `T` (ifreq or
    // rtentry), and `arg` is a valid, exclusive reference for the duration of the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg as *mut T) };
    if rc < 0 {
        return Err(NetError::Sys {
            op,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// A `sockaddr` holding an AF_INET address (port 0).
fn sockaddr_v4(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes of plain integers; this is the
    // reinterpretation the socket API is designed around.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks() {
        assert_eq!(prefix_to_mask(0).unwrap(), Ipv4Addr::new(0, 0, 0, 0));
        assert_eq!(prefix_to_mask(8).unwrap(), Ipv4Addr::new(255, 0, 0, 0));
        assert_eq!(prefix_to_mask(24).unwrap(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(
            prefix_to_mask(31).unwrap(),
            Ipv4Addr::new(255, 255, 255, 254)
        );
        assert_eq!(
            prefix_to_mask(32).unwrap(),
            Ipv4Addr::new(255, 255, 255, 255)
        );
        assert!(prefix_to_mask(33).is_err());
    }

    #[test]
    fn addresses() {
        assert_eq!(parse_ipv4("10.0.0.1").unwrap(), Ipv4Addr::new(10, 0, 0, 1));
        for bad in [
            "",
            "10.0.0",
            "10.0.0.256",
            "::1",
            "10.0.0.1/24",
            " 10.0.0.1",
        ] {
            assert!(parse_ipv4(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sockaddr_layout() {
        let sa = sockaddr_v4(Ipv4Addr::new(192, 168, 1, 2));
        assert_eq!(i32::from(sa.sa_family), libc::AF_INET);
        // sa_data: 2 bytes of port, then the address in network order.
        let bytes: Vec<u8> = sa.sa_data[2..6].iter().map(|&b| b as u8).collect();
        assert_eq!(bytes, [192, 168, 1, 2]);
    }
}
