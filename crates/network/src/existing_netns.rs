//! A tap and redirect in a network namespace somebody else made (containerd's CRI plugin).
//!
//! [`crate::NetworkManager`] owns its namespaces and runs CNI itself. The containerd shim
//! gets a namespace in which containerd already ran CNI; only steps 4 and 5 of the crate's
//! design apply: read the guest's view of `eth0`, add `tap0` and the tc redirect between
//! them. [`detach_tap`] undoes it and leaves the namespace (containerd's) in place.

use std::path::Path;

use crate::cni::CniDns;
use crate::guest::PodNetwork;
use crate::link;
use crate::manager::{IFNAME, TAP_NAME};
use crate::netns::Netns;
use crate::NetworkError;

/// Adds `tap0` to the namespace at `netns_path`, redirects `eth0` to it and back, and returns
/// the pod's network as the guest must see it. `eth0` must exist (CNI ran).
pub fn attach_tap(netns_path: &Path) -> Result<PodNetwork, NetworkError> {
    let ns = Netns::open(netns_path)?;
    let interface = link::read_interface(&ns, IFNAME)?;
    let routes = link::read_routes(&ns, IFNAME)?;
    link::create_tap(&ns, TAP_NAME, interface.mtu)?;
    if let Err(e) = link::redirect(&ns, IFNAME, TAP_NAME) {
        detach_tap(netns_path);
        return Err(e.into());
    }
    let mut ips: Vec<std::net::IpAddr> = interface.addresses.iter().map(|(ip, _)| *ip).collect();
    ips.sort_by_key(|ip| !ip.is_ipv4());
    let mut ips = ips.into_iter();
    Ok(PodNetwork {
        pod_ip: ips.next(),
        additional_ips: ips.collect(),
        netns: netns_path.to_path_buf(),
        tap: TAP_NAME.to_owned(),
        interface,
        routes,
        dns: CniDns::default(),
    })
}

/// Removes `tap0` and the ingress qdisc of `eth0` from the namespace, best effort (the
/// namespace may be gone already). Returns whether the tap was removed.
pub fn detach_tap(netns_path: &Path) -> bool {
    let Ok(ns) = Netns::open(netns_path) else {
        return false;
    };
    let quiet = |mut c: std::process::Command| {
        c.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let mut qdisc = ns.command("tc");
    qdisc.args(["qdisc", "del", "dev", IFNAME, "ingress"]);
    let _ = quiet(qdisc);
    let mut tap = ns.command("ip");
    tap.args(["link", "del", "dev", TAP_NAME]);
    quiet(tap)
}
