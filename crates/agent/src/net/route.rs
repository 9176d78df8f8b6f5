//! IPv4 routes through SIOCADDRT / SIOCDELRT.

use std::ffi::CString;
use std::net::Ipv4Addr;

use super::{ioctl_ptr, ioctl_socket, parse_ipv4, prefix_to_mask, sockaddr_v4, NetError};

const SIOCADDRT: u64 = 0x890b;
const SIOCDELRT: u64 = 0x890c;
const RTF_UP: u16 = 0x0001;
const RTF_GATEWAY: u16 = 0x0002;
const RTF_HOST: u16 = 0x0004;

/// `struct rtentry` from linux/route.h (libc only exports it for musl).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

/// One validated IPv4 route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub destination: Ipv4Addr,
    pub prefix: u32,
    pub gateway: Option<Ipv4Addr>,
    pub device: Option<String>,
}

impl Route {
    /// Parses the protobuf fields: destination CIDR (empty or "default" = 0.0.0.0/0), gateway,
    /// device.
    pub fn parse(destination: &str, gateway: &str, device: &str) -> Result<Route, NetError> {
        let (destination, prefix) = match destination {
            "" | "default" => (Ipv4Addr::UNSPECIFIED, 0),
            cidr => {
                let (addr, prefix) = cidr
                    .split_once('/')
                    .ok_or_else(|| NetError::InvalidPrefix(cidr.to_owned()))?;
                let prefix: u32 = prefix
                    .parse()
                    .map_err(|_| NetError::InvalidPrefix(cidr.to_owned()))?;
                (parse_ipv4(addr)?, prefix)
            }
        };
        let mask = prefix_to_mask(prefix)?;
        if u32::from(destination) & !u32::from(mask) != 0 {
            return Err(NetError::InvalidPrefix(format!(
                "{destination}/{prefix} has host bits set"
            )));
        }
        let gateway = match gateway {
            "" => None,
            gw => Some(parse_ipv4(gw)?),
        };
        let device = match device {
            "" => None,
            dev => {
                super::iface::validate_name(dev)?;
                Some(dev.to_owned())
            }
        };
        if gateway.is_none() && device.is_none() {
            return Err(NetError::InvalidArgument(
                "a route needs a gateway or a device".to_owned(),
            ));
        }
        Ok(Route {
            destination,
            prefix,
            gateway,
            device,
        })
    }
}

/// Adds `route`, replacing an existing route to the same destination.
pub fn replace(route: &Route) -> Result<(), NetError> {
    let sock = ioctl_socket()?;
    let dev = route
        .device
        .as_deref()
        .map(|d| CString::new(d).map_err(|_| NetError::InvalidName(d.to_owned())))
        .transpose()?;
    let mut flags = RTF_UP;
    if route.gateway.is_some() {
        flags |= RTF_GATEWAY;
    }
    if route.prefix == 32 {
        flags |= RTF_HOST;
    }
    let entry = || RtEntry {
        rt_pad1: 0,
        rt_dst: sockaddr_v4(route.destination),
        rt_gateway: sockaddr_v4(route.gateway.unwrap_or(Ipv4Addr::UNSPECIFIED)),
        // The prefix was validated by Route::parse.
        rt_genmask: sockaddr_v4(prefix_to_mask(route.prefix).unwrap_or(Ipv4Addr::BROADCAST)),
        rt_flags: flags,
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        rt_metric: 0,
        // The kernel only reads the name; `dev` outlives every ioctl below.
        rt_dev: dev
            .as_ref()
            .map_or(std::ptr::null_mut(), |d| d.as_ptr().cast_mut()),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    match ioctl_ptr(&sock, SIOCADDRT, &mut entry(), "SIOCADDRT") {
        Err(NetError::Sys { ref source, .. }) if source.raw_os_error() == Some(libc::EEXIST) => {
            // Replace: delete the route to this destination, add ours.
            let mut del = entry();
            del.rt_flags = RTF_UP;
            del.rt_gateway = sockaddr_v4(Ipv4Addr::UNSPECIFIED);
            del.rt_dev = std::ptr::null_mut();
            ioctl_ptr(&sock, SIOCDELRT, &mut del, "SIOCDELRT")?;
            ioctl_ptr(&sock, SIOCADDRT, &mut entry(), "SIOCADDRT")
        }
        Err(NetError::Sys { ref source, .. }) if source.raw_os_error() == Some(libc::ENODEV) => {
            Err(NetError::NoSuchInterface(
                route.device.clone().unwrap_or_default(),
            ))
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_kernel() {
        #[cfg(target_pointer_width = "64")]
        assert_eq!(std::mem::size_of::<RtEntry>(), 120);
    }

    #[test]
    fn parse_routes() {
        let default = Route::parse("", "10.0.0.1", "").unwrap();
        assert_eq!(
            (default.destination, default.prefix),
            (Ipv4Addr::UNSPECIFIED, 0)
        );
        assert_eq!(
            Route::parse("0.0.0.0/0", "10.0.0.1", "eth0")
                .unwrap()
                .device
                .as_deref(),
            Some("eth0")
        );
        let link = Route::parse("10.1.0.0/16", "", "eth0").unwrap();
        assert_eq!((link.prefix, link.gateway), (16, None));
        assert!(Route::parse("10.1.0.1/16", "", "eth0").is_err());
        assert!(Route::parse("10.1.0.0/33", "", "eth0").is_err());
        assert!(Route::parse("10.1.0.0", "", "eth0").is_err());
        assert!(Route::parse("", "", "").is_err());
        assert!(Route::parse("", "gw", "").is_err());
        assert!(Route::parse("", "10.0.0.1", "bad/name").is_err());
    }
}
