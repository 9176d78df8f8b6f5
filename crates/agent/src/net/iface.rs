//! Interface configuration: link state, MAC, IPv4 address, MTU.

use std::net::Ipv4Addr;

use super::{ioctl_ptr, ioctl_socket, sockaddr_v4, NetError};

const SIOCGIFFLAGS: u64 = 0x8913;
const SIOCSIFFLAGS: u64 = 0x8914;
const SIOCSIFADDR: u64 = 0x8916;
const SIOCSIFNETMASK: u64 = 0x891c;
const SIOCSIFMTU: u64 = 0x8922;
const SIOCSIFHWADDR: u64 = 0x8924;
const ARPHRD_ETHER: u16 = 1;

/// Smallest and largest MTU accepted (IPv4 minimum, jumbo frames).
const MIN_MTU: u32 = 68;
const MAX_MTU: u32 = 65_535;

/// The desired state of one interface; `None` leaves a property alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceConfig {
    pub name: String,
    pub mac: Option<[u8; 6]>,
    pub ipv4: Option<(Ipv4Addr, u32)>,
    pub mtu: Option<u32>,
    pub up: bool,
}

/// Validates an interface name.
pub fn validate_name(name: &str) -> Result<(), NetError> {
    let ok = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if ok {
        Ok(())
    } else {
        Err(NetError::InvalidName(name.to_owned()))
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`; multicast MACs are refused.
pub fn parse_mac(text: &str) -> Result<[u8; 6], NetError> {
    let bad = || NetError::InvalidMac(text.to_owned());
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().ok_or_else(bad)?;
        if part.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() || mac[0] & 1 == 1 {
        return Err(bad());
    }
    Ok(mac)
}

/// Validates an MTU.
pub fn validate_mtu(mtu: u32) -> Result<u32, NetError> {
    if (MIN_MTU..=MAX_MTU).contains(&mtu) {
        Ok(mtu)
    } else {
        Err(NetError::InvalidArgument(format!(
            "MTU {mtu} is outside {MIN_MTU}..={MAX_MTU}"
        )))
    }
}

fn ifreq(name: &str) -> Result<libc::ifreq, NetError> {
    validate_name(name)?;
    // SAFETY: ifreq is plain old data (integers, arrays, a union of those); all zeroes is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

/// Maps ENODEV to [`NetError::NoSuchInterface`].
fn no_such(name: &str) -> impl Fn(NetError) -> NetError + '_ {
    move |e| match e {
        NetError::Sys { ref source, .. } if source.raw_os_error() == Some(libc::ENODEV) => {
            NetError::NoSuchInterface(name.to_owned())
        }
        other => other,
    }
}

/// Sets or clears IFF_UP.
pub fn set_up(name: &str, up: bool) -> Result<(), NetError> {
    let sock = ioctl_socket()?;
    let mut req = ifreq(name)?;
    ioctl_ptr(&sock, SIOCGIFFLAGS, &mut req, "SIOCGIFFLAGS").map_err(no_such(name))?;
    // SAFETY: SIOCGIFFLAGS filled ifru_flags.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    let iff_up = libc::IFF_UP as libc::c_short;
    let wanted = if up { flags | iff_up } else { flags & !iff_up };
    if wanted == flags {
        return Ok(());
    }
    req.ifr_ifru.ifru_flags = wanted;
    ioctl_ptr(&sock, SIOCSIFFLAGS, &mut req, "SIOCSIFFLAGS").map_err(no_such(name))
}

/// Applies `config`: the link goes down while the MAC changes, then address, MTU and link state
/// are set.
pub fn configure(config: &InterfaceConfig) -> Result<(), NetError> {
    let name = config.name.as_str();
    let sock = ioctl_socket()?;
    if let Some(mac) = config.mac {
        set_up(name, false)?;
        let mut req = ifreq(name)?;
        // SAFETY: writing a plain sockaddr into the union.
        let hw = unsafe { &mut req.ifr_ifru.ifru_hwaddr };
        hw.sa_family = ARPHRD_ETHER;
        for (dst, src) in hw.sa_data.iter_mut().zip(mac) {
            *dst = src as libc::c_char;
        }
        ioctl_ptr(&sock, SIOCSIFHWADDR, &mut req, "SIOCSIFHWADDR").map_err(no_such(name))?;
    }
    if let Some((addr, prefix)) = config.ipv4 {
        let mask = super::prefix_to_mask(prefix)?;
        let mut req = ifreq(name)?;
        req.ifr_ifru.ifru_addr = sockaddr_v4(addr);
        ioctl_ptr(&sock, SIOCSIFADDR, &mut req, "SIOCSIFADDR").map_err(no_such(name))?;
        let mut req = ifreq(name)?;
        req.ifr_ifru.ifru_netmask = sockaddr_v4(mask);
        ioctl_ptr(&sock, SIOCSIFNETMASK, &mut req, "SIOCSIFNETMASK").map_err(no_such(name))?;
    }
    if let Some(mtu) = config.mtu {
        let mut req = ifreq(name)?;
        // validate_mtu bounds the value far below i32::MAX.
        req.ifr_ifru.ifru_mtu = validate_mtu(mtu)? as libc::c_int;
        ioctl_ptr(&sock, SIOCSIFMTU, &mut req, "SIOCSIFMTU").map_err(no_such(name))?;
    }
    set_up(name, config.up)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["lo", "eth0", "veth-a_b.1", "abcdefghijklmno"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "abcdefghijklmnop",
            "a/b",
            "eth 0",
            "..",
            "eth0:1",
            "e\0",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("02:42:ac:11:00:02").unwrap(),
            [2, 0x42, 0xac, 0x11, 0, 2]
        );
        assert_eq!(parse_mac("AA:BB:CC:DD:EE:FE").unwrap()[0], 0xaa);
        for bad in [
            "",
            "02:42:ac:11:00",
            "02:42:ac:11:00:02:03",
            "2:42:ac:11:00:02",
            "01:00:5e:00:00:01",
            "zz:42:ac:11:00:02",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mtus() {
        assert!(validate_mtu(1500).is_ok());
        assert!(validate_mtu(67).is_err());
        assert!(validate_mtu(65_536).is_err());
    }

    #[test]
    fn missing_interface_is_not_found() {
        match set_up("hsnoexist0", true) {
            Err(NetError::NoSuchInterface(name)) => assert_eq!(name, "hsnoexist0"),
            other => panic!("unexpected {other:?}"),
        }
    }
}
