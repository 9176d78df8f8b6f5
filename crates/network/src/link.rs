//! Inside the pod's namespace: read what the CNI plugins configured on the veth, create the
//! tap, and redirect every frame between the two with tc.
//!
//! iproute2's `ip` and `tc` do the work, started inside the namespace by [`Netns::command`]
//! (a `setns` before exec, so namespace files need not live in `/run/netns`). Why binaries and
//! not netlink in-process: the u32 classifier and mirred action messages are nested, versioned
//! structures that iproute2 already gets right; `ip -j` gives the veth's MAC, MTU, addresses
//! and routes as JSON (sysfs cannot be used: a thread that `setns`es still sees the sysfs of
//! the namespace that mounted it); iproute2 is a node dependency already (`hack/setup.sh`).
//! The cost is five short executions per pod start, a few milliseconds next to a VM boot.

use std::net::IpAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::cidr::{format_cidr, parse_cidr};
use crate::guest::{parse_mac, GuestInterface, GuestRoute};
use crate::netns::Netns;
use crate::process::{self, RunError};

/// Deadline for one `ip` or `tc` execution.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Errors from configuring links inside the pod's namespace.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// `ip` or `tc` could not be run.
    #[error("cannot run {program} (is iproute2 installed?)")]
    Spawn {
        /// The program.
        program: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `ip` or `tc` did not finish in time.
    #[error("`{program} {args}` timed out")]
    Timeout {
        /// The program.
        program: &'static str,
        /// Its arguments.
        args: String,
    },
    /// `ip` or `tc` failed.
    #[error("`{program} {args}` failed with {status}: {stderr}")]
    Failed {
        /// The program.
        program: &'static str,
        /// Its arguments (and batch input).
        args: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed.
        stderr: String,
    },
    /// `ip` printed something this module does not understand.
    #[error("unexpected output of `{program} {args}`: {reason}")]
    Output {
        /// The program.
        program: &'static str,
        /// Its arguments.
        args: String,
        /// What is wrong.
        reason: String,
    },
    /// The CNI plugins left no such interface in the namespace.
    #[error("no interface {0} in the pod's network namespace")]
    NoInterface(String),
}

/// Runs `program args` inside `netns` with `input` on stdin; its stdout.
fn run(
    netns: &Netns,
    program: &'static str,
    args: &[&str],
    input: &str,
) -> Result<Vec<u8>, LinkError> {
    let describe = || {
        let mut d = args.join(" ");
        if !input.is_empty() {
            d.push_str(" <<< ");
            d.push_str(&input.trim_end().replace('\n', "; "));
        }
        d
    };
    let mut cmd = netns.command(program);
    cmd.args(args);
    let out = process::run(&mut cmd, input.as_bytes(), TIMEOUT).map_err(|e| match e {
        RunError::Spawn(source) | RunError::Io(source) => LinkError::Spawn { program, source },
        RunError::Timeout => LinkError::Timeout {
            program,
            args: describe(),
        },
    })?;
    if !out.status.success() {
        return Err(LinkError::Failed {
            program,
            args: describe(),
            status: out.status,
            stderr: out.stderr_text(),
        });
    }
    Ok(out.stdout)
}

#[derive(Deserialize)]
struct IpLink {
    mtu: u32,
    address: Option<String>,
    #[serde(default)]
    addr_info: Vec<IpAddrInfo>,
}

#[derive(Deserialize)]
struct IpAddrInfo {
    local: String,
    prefixlen: u8,
    scope: Option<String>,
}

#[derive(Deserialize)]
struct IpRoute {
    dst: String,
    gateway: Option<String>,
    protocol: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

/// `ip -j` prints nothing rather than `[]` in some versions when there is nothing to list.
fn parse_json_list<T: for<'de> Deserialize<'de>>(
    out: &[u8],
    args: &[&str],
) -> Result<Vec<T>, LinkError> {
    if out.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    serde_json::from_slice(out).map_err(|e| LinkError::Output {
        program: "ip",
        args: args.join(" "),
        reason: e.to_string(),
    })
}

/// The MAC, MTU and global addresses of `ifname`, named `ifname` for the guest too.
pub(crate) fn read_interface(netns: &Netns, ifname: &str) -> Result<GuestInterface, LinkError> {
    let args = ["-j", "addr", "show", "dev", ifname];
    let out = run(netns, "ip", &args, "").map_err(|e| match e {
        LinkError::Failed { ref stderr, .. } if stderr.contains("does not exist") => {
            LinkError::NoInterface(ifname.to_string())
        }
        e => e,
    })?;
    let links: Vec<IpLink> = parse_json_list(&out, &args)?;
    let link = links
        .into_iter()
        .next()
        .ok_or_else(|| LinkError::NoInterface(ifname.to_string()))?;
    let bad = |reason: String| LinkError::Output {
        program: "ip",
        args: args.join(" "),
        reason,
    };
    let mac = link
        .address
        .as_deref()
        .and_then(parse_mac)
        .ok_or_else(|| bad(format!("no Ethernet address: {:?}", link.address)))?;
    let mut addresses = Vec::new();
    for a in link.addr_info {
        if a.scope.as_deref() != Some("global") {
            continue;
        }
        let addr: IpAddr = a
            .local
            .parse()
            .map_err(|_| bad(format!("invalid address {:?}", a.local)))?;
        addresses.push((addr, a.prefixlen));
    }
    Ok(GuestInterface {
        name: ifname.to_string(),
        mac,
        mtu: link.mtu,
        addresses,
    })
}

/// The routes of `ifname` in the main table (IPv4 and IPv6), without the kernel's connected
/// routes, link routes first.
pub(crate) fn read_routes(netns: &Netns, ifname: &str) -> Result<Vec<GuestRoute>, LinkError> {
    let mut routes = Vec::new();
    for (family, default) in [("-4", "0.0.0.0/0"), ("-6", "::/0")] {
        let args = [
            "-j", family, "route", "show", "table", "main", "dev", ifname,
        ];
        let out = run(netns, "ip", &args, "")?;
        let list: Vec<IpRoute> = parse_json_list(&out, &args)?;
        for r in list {
            if r.protocol.as_deref() == Some("kernel") {
                continue;
            }
            if r.kind.as_deref().is_some_and(|k| k != "unicast") {
                continue;
            }
            let destination = if r.dst == "default" {
                default.to_string()
            } else {
                let (addr, prefix) = parse_cidr(&r.dst).ok_or_else(|| LinkError::Output {
                    program: "ip",
                    args: args.join(" "),
                    reason: format!("invalid route destination {:?}", r.dst),
                })?;
                format_cidr(addr, prefix)
            };
            let gateway = match r.gateway.as_deref() {
                None => None,
                Some(g) => Some(g.parse::<IpAddr>().map_err(|_| LinkError::Output {
                    program: "ip",
                    args: args.join(" "),
                    reason: format!("invalid gateway {g:?}"),
                })?),
            };
            routes.push(GuestRoute {
                destination,
                gateway,
            });
        }
    }
    routes.sort_by_key(|r| r.gateway.is_some());
    Ok(routes)
}

/// Creates the persistent tap `tap` (`IFF_TAP | IFF_NO_PI`, single queue: what the VMM
/// attaches to, adding `IFF_VNET_HDR`), with `mtu`, up. Without an IPv6 link-local address
/// (`addrgenmode none`), so the namespace's own stack sends the guest no DAD, MLD or router
/// solicitations from the tap.
pub(crate) fn create_tap(netns: &Netns, tap: &str, mtu: u32) -> Result<(), LinkError> {
    let script = format!(
        "tuntap add dev {tap} mode tap\n\
         link set dev {tap} addrgenmode none\n\
         link set dev {tap} mtu {mtu} up\n"
    );
    run(netns, "ip", &["-batch", "-"], &script).map(drop)
}

/// Redirects every frame arriving on `a` out of `b` and back: an ingress qdisc on each and a
/// match-all u32 filter with a mirred egress redirect (what Kata Containers' tcfilter does).
pub(crate) fn redirect(netns: &Netns, a: &str, b: &str) -> Result<(), LinkError> {
    let mut script = String::new();
    for (from, to) in [(a, b), (b, a)] {
        script.push_str(&format!(
            "qdisc add dev {from} handle ffff: ingress\n\
             filter add dev {from} parent ffff: protocol all u32 match u8 0 0 \
             action mirred egress redirect dev {to}\n"
        ));
    }
    run(netns, "tc", &["-batch", "-"], &script).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ip_json() {
        let links: Vec<IpLink> = parse_json_list(
            br#"[{"ifindex":2,"ifname":"eth0","mtu":1450,"address":"9a:41:28:2e:9b:36",
                "addr_info":[{"family":"inet","local":"10.77.1.2","prefixlen":24,"scope":"global"},
                {"family":"inet6","local":"fe80::1","prefixlen":64,"scope":"link"}]}]"#,
            &[],
        )
        .unwrap();
        assert_eq!(links[0].mtu, 1450);
        assert_eq!(links[0].addr_info.len(), 2);
        let routes: Vec<IpRoute> = parse_json_list(
            br#"[{"dst":"default","gateway":"10.77.1.1","flags":[]},
                {"dst":"10.77.1.0/24","protocol":"kernel","scope":"link","prefsrc":"10.77.1.2","flags":[]}]"#,
            &[],
        )
        .unwrap();
        assert_eq!(routes[0].gateway.as_deref(), Some("10.77.1.1"));
        assert_eq!(routes[1].protocol.as_deref(), Some("kernel"));
        assert!(parse_json_list::<IpRoute>(b"\n", &[]).unwrap().is_empty());
        assert!(parse_json_list::<IpRoute>(b"garbage", &[]).is_err());
    }
}
