//! What the guest needs to configure its NIC: the result of a pod's network setup.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::cni::CniDns;

/// The guest's interface: the CNI veth's identity, copied so that the guest looks to the
/// network exactly like the veth did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestInterface {
    /// Interface name in the guest (`eth0`).
    pub name: String,
    /// The veth's MAC address.
    pub mac: [u8; 6],
    /// The veth's MTU (the tap has the same).
    pub mtu: u32,
    /// Global-scope addresses with their prefix lengths, as on the veth.
    pub addresses: Vec<(IpAddr, u8)>,
}

impl GuestInterface {
    /// The MAC as `aa:bb:cc:dd:ee:ff`.
    pub fn mac_string(&self) -> String {
        format_mac(&self.mac)
    }
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    let mut s = String::with_capacity(17);
    for (i, b) in mac.iter().enumerate() {
        if i > 0 {
            s.push(':');
        }
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// A route of the guest's interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRoute {
    /// Destination, `addr/prefix` (`0.0.0.0/0` and `::/0` for the defaults).
    pub destination: String,
    /// Next hop; `None` for a route straight onto the link.
    pub gateway: Option<IpAddr>,
}

/// A pod's network, ready for the VMM (netns and tap) and the guest (interface, routes, DNS).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodNetwork {
    /// The pod's network namespace file: start the VMM inside it (see [`crate::Netns`]).
    pub netns: PathBuf,
    /// The tap the VMM attaches to, inside the namespace (`tap0`).
    pub tap: String,
    /// The guest interface.
    pub interface: GuestInterface,
    /// Routes, link routes (no gateway) first so each gateway is reachable when the routes
    /// are added in order. Connected routes of the addresses are left to the guest kernel.
    pub routes: Vec<GuestRoute>,
    /// DNS settings from the CNI result (usually empty: kubelet supplies the pod's DNS).
    pub dns: CniDns,
    /// The pod IP (CRI `PodSandboxNetworkStatus.ip`): IPv4 first.
    pub pod_ip: Option<IpAddr>,
    /// Further pod IPs (dual stack: CRI `additional_ips`).
    pub additional_ips: Vec<IpAddr>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        let m = parse_mac("9a:41:28:2e:9b:36").unwrap();
        assert_eq!(m, [0x9a, 0x41, 0x28, 0x2e, 0x9b, 0x36]);
        assert_eq!(format_mac(&m), "9a:41:28:2e:9b:36");
        for bad in [
            "",
            "9a:41:28:2e:9b",
            "9a:41:28:2e:9b:36:00",
            "9a:41:28:2e:9b:3",
            "zz:41:28:2e:9b:36",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }
}
