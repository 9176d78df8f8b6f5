//! `address/prefix` strings as CNI results and iproute2 print them.

use std::net::IpAddr;

/// Parses `10.88.0.2/24` or `fd00::2/64` into the address and prefix length; a bare address
/// gets the full-length prefix (`/32`, `/128`).
pub(crate) fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a.parse::<IpAddr>().ok()?, Some(p.parse::<u8>().ok()?)),
        None => (s.parse::<IpAddr>().ok()?, None),
    };
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = prefix.unwrap_or(max);
    (prefix <= max).then_some((addr, prefix))
}

/// Formats an address and prefix as `addr/prefix`.
pub(crate) fn format_cidr(addr: IpAddr, prefix: u8) -> String {
    format!("{addr}/{prefix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        assert_eq!(
            parse_cidr("10.88.0.2/24"),
            Some(("10.88.0.2".parse().unwrap(), 24))
        );
        assert_eq!(
            parse_cidr("fd00::1/64"),
            Some(("fd00::1".parse().unwrap(), 64))
        );
        assert_eq!(
            parse_cidr("10.0.0.1"),
            Some(("10.0.0.1".parse().unwrap(), 32))
        );
        assert_eq!(parse_cidr("::/0"), Some(("::".parse().unwrap(), 0)));
        assert_eq!(parse_cidr("10.0.0.1/33"), None);
        assert_eq!(parse_cidr("10.0.0.1/"), None);
        assert_eq!(parse_cidr("bogus/24"), None);
        assert_eq!(format_cidr("10.0.0.0".parse().unwrap(), 8), "10.0.0.0/8");
    }
}
