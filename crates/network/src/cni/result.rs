//! Plugin results (spec 0.3.0 to 1.1.0) and error objects.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cidr::parse_cidr;

/// A plugin's ADD result, the parts a runtime uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniResult {
    /// The result's `cniVersion`.
    pub cni_version: String,
    /// Interfaces the plugins created or touched.
    pub interfaces: Vec<CniInterface>,
    /// Assigned addresses.
    pub ips: Vec<CniIp>,
    /// Routes the plugins report.
    pub routes: Vec<CniRoute>,
    /// DNS settings for the pod.
    pub dns: CniDns,
}

/// An interface of a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniInterface {
    /// Its name.
    pub name: String,
    /// Its MAC address, as printed by the plugin.
    pub mac: Option<String>,
    /// The network namespace it is in; `None` for host interfaces.
    pub sandbox: Option<String>,
}

/// An address of a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniIp {
    /// The address.
    pub address: IpAddr,
    /// Its prefix length.
    pub prefix: u8,
    /// The gateway of its subnet.
    pub gateway: Option<IpAddr>,
    /// Index into [`CniResult::interfaces`] of the interface holding it.
    pub interface: Option<usize>,
}

/// A route of a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniRoute {
    /// The destination, `addr/prefix`.
    pub dst: String,
    /// The next hop; absent means the plugin's default gateway.
    pub gw: Option<IpAddr>,
}

/// DNS settings of a result (all optional in the spec).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CniDns {
    /// Name servers, in priority order.
    pub nameservers: Vec<String>,
    /// The local domain.
    pub domain: Option<String>,
    /// Search domains.
    pub search: Vec<String>,
    /// Resolver options.
    pub options: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawResult {
    cni_version: Option<String>,
    #[serde(default)]
    interfaces: Vec<RawInterface>,
    #[serde(default)]
    ips: Vec<RawIp>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    #[serde(default)]
    dns: Option<CniDns>,
    // Spec 0.1.0/0.2.0 results.
    ip4: Option<Value>,
    ip6: Option<Value>,
}

#[derive(Deserialize)]
struct RawInterface {
    name: String,
    mac: Option<String>,
    sandbox: Option<String>,
}

#[derive(Deserialize)]
struct RawIp {
    address: String,
    gateway: Option<String>,
    interface: Option<usize>,
}

#[derive(Deserialize)]
struct RawRoute {
    dst: String,
    gw: Option<String>,
}

fn parse_gateway(gw: Option<&str>) -> Result<Option<IpAddr>, String> {
    match gw {
        None | Some("") => Ok(None),
        Some(g) => g
            .parse()
            .map(Some)
            .map_err(|_| format!("invalid gateway {g:?}")),
    }
}

impl CniResult {
    /// Reads a result object; the reason on failure.
    pub fn parse(value: &Value) -> Result<CniResult, String> {
        let raw = RawResult::deserialize(value).map_err(|e| e.to_string())?;
        if raw.ip4.is_some() || raw.ip6.is_some() {
            return Err("spec 0.1.0/0.2.0 results are not supported".into());
        }
        let cni_version = raw.cni_version.ok_or("no \"cniVersion\"")?;
        let interfaces = raw
            .interfaces
            .into_iter()
            .map(|i| CniInterface {
                name: i.name,
                mac: i.mac.filter(|m| !m.is_empty()),
                sandbox: i.sandbox.filter(|s| !s.is_empty()),
            })
            .collect::<Vec<_>>();
        let mut ips = Vec::with_capacity(raw.ips.len());
        for ip in raw.ips {
            let (address, prefix) = parse_cidr(&ip.address)
                .ok_or_else(|| format!("invalid address {:?}", ip.address))?;
            if let Some(i) = ip.interface {
                if i >= interfaces.len() {
                    return Err(format!("address {} names interface {i}", ip.address));
                }
            }
            ips.push(CniIp {
                address,
                prefix,
                gateway: parse_gateway(ip.gateway.as_deref())?,
                interface: ip.interface,
            });
        }
        let mut routes = Vec::with_capacity(raw.routes.len());
        for r in raw.routes {
            if parse_cidr(&r.dst).is_none() {
                return Err(format!("invalid route destination {:?}", r.dst));
            }
            routes.push(CniRoute {
                gw: parse_gateway(r.gw.as_deref())?,
                dst: r.dst,
            });
        }
        Ok(CniResult {
            cni_version,
            interfaces,
            ips,
            routes,
            dns: raw.dns.unwrap_or_default(),
        })
    }

    /// The pod's addresses, as containerd picks them: those of interface `ifname` inside the
    /// sandbox (all addresses when the plugins name no interface), IPv4 first.
    pub fn pod_ips(&self, ifname: &str) -> Vec<IpAddr> {
        let on_pod_if = |ip: &&CniIp| {
            ip.interface
                .and_then(|i| self.interfaces.get(i))
                .is_some_and(|i| i.name == ifname && i.sandbox.is_some())
        };
        let mut ips: Vec<IpAddr> = if self.ips.iter().any(|ip| on_pod_if(&ip)) {
            self.ips
                .iter()
                .filter(on_pod_if)
                .map(|ip| ip.address)
                .collect()
        } else {
            self.ips.iter().map(|ip| ip.address).collect()
        };
        ips.sort_by_key(|ip| ip.is_ipv6());
        ips
    }
}

/// A plugin's error object (`{"code", "msg", "details"}`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub(crate) struct ErrorObject {
    pub code: u32,
    #[serde(default)]
    pub msg: String,
    #[serde(default)]
    pub details: String,
}

impl ErrorObject {
    /// Reads an error object from a plugin's output, if it is one.
    pub fn parse(output: &[u8]) -> Option<ErrorObject> {
        serde_json::from_slice(output).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn v1_result() {
        let r = CniResult::parse(&json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "cni0", "mac": "ce:e9:a4:34:2e:7c"},
                {"name": "veth1", "mac": "d6:53:73:10:a8:5f"},
                {"name": "eth0", "mac": "9a:41:28:2e:9b:36", "sandbox": "/run/netns/x"}
            ],
            "ips": [
                {"interface": 2, "address": "10.77.1.2/24", "gateway": "10.77.1.1"},
                {"interface": 2, "address": "fd00::2/64", "gateway": "fd00::1"},
                {"interface": 0, "address": "10.77.1.1/24"}
            ],
            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "10.0.0.0/8", "gw": "10.77.1.254"}],
            "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]}
        }))
        .unwrap();
        assert_eq!(r.interfaces[2].sandbox.as_deref(), Some("/run/netns/x"));
        assert_eq!(r.ips[0].prefix, 24);
        assert_eq!(r.ips[0].gateway, Some("10.77.1.1".parse().unwrap()));
        assert_eq!(r.routes[0].gw, None);
        assert_eq!(r.routes[1].gw, Some("10.77.1.254".parse().unwrap()));
        assert_eq!(r.dns.nameservers, ["10.96.0.10"]);
        assert_eq!(r.dns.domain, None);
        let ips: Vec<String> = r.pod_ips("eth0").iter().map(|i| i.to_string()).collect();
        assert_eq!(ips, ["10.77.1.2", "fd00::2"]);
    }

    #[test]
    fn v040_result() {
        let r = CniResult::parse(&json!({
            "cniVersion": "0.4.0",
            "interfaces": [{"name": "eth0", "sandbox": "/proc/1/ns/net"}],
            "ips": [
                {"version": "6", "interface": 0, "address": "fd00::5/64"},
                {"version": "4", "interface": 0, "address": "10.1.0.5/16", "gateway": "10.1.0.1"}
            ],
            "dns": {}
        }))
        .unwrap();
        let ips: Vec<String> = r.pod_ips("eth0").iter().map(|i| i.to_string()).collect();
        assert_eq!(ips, ["10.1.0.5", "fd00::5"]);
        assert_eq!(r.dns, CniDns::default());
    }

    #[test]
    fn ips_without_interfaces() {
        let r = CniResult::parse(&json!({
            "cniVersion": "1.0.0",
            "ips": [{"address": "10.2.0.9/24"}]
        }))
        .unwrap();
        assert_eq!(r.pod_ips("eth0"), ["10.2.0.9".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn bad_results() {
        for bad in [
            json!({"ips": []}),
            json!({"cniVersion": "0.2.0", "ip4": {"ip": "10.0.0.2/24"}}),
            json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.300/24"}]}),
            json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.3/24", "interface": 1}]}),
            json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.3/24", "gateway": "x"}]}),
            json!({"cniVersion": "1.0.0", "routes": [{"dst": "nowhere"}]}),
            json!("a string"),
        ] {
            assert!(CniResult::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn error_object() {
        let e = ErrorObject::parse(
            br#"{"cniVersion":"1.0.0","code":7,"msg":"invalid config","details":"no bridge"}"#,
        )
        .unwrap();
        assert_eq!(e.code, 7);
        assert_eq!(e.msg, "invalid config");
        assert_eq!(e.details, "no bridge");
        assert!(ErrorObject::parse(b"panic: oops").is_none());
    }
}
