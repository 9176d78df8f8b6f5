//! What the guest kernel reports about itself: online CPUs, memory, release, uptime.

use std::path::Path;

/// Reading the guest's system information failed.
#[derive(Debug, thiserror::Error)]
pub enum SysInfoError {
    /// A /proc or /sys file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file had an unexpected format.
    #[error("cannot parse {0}")]
    Parse(String),
}

/// The figures the GuestInfo RPC returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysInfo {
    /// CPUs online.
    pub online_cpus: u32,
    /// MemTotal in bytes.
    pub mem_total_bytes: u64,
    /// Kernel release.
    pub kernel_release: String,
    /// Uptime in milliseconds.
    pub uptime_ms: u64,
}

fn read_file(path: &str) -> Result<String, SysInfoError> {
    std::fs::read_to_string(Path::new(path)).map_err(|source| SysInfoError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Count CPUs in a cpulist such as `0-3,5,7-8`.
pub fn count_cpulist(list: &str) -> Option<u32> {
    let mut n = 0u32;
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                n = n.checked_add(b.checked_sub(a)?.checked_add(1)?)?;
            }
            None => {
                part.parse::<u32>().ok()?;
                n = n.checked_add(1)?;
            }
        }
    }
    Some(n)
}

/// MemTotal from /proc/meminfo text, in bytes.
pub fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Uptime from /proc/uptime text, in milliseconds.
pub fn parse_uptime_ms(uptime: &str) -> Option<u64> {
    let secs: f64 = uptime.split_whitespace().next()?.parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then_some((secs * 1000.0) as u64)
}

/// Read the figures from /proc and /sys.
pub fn read() -> Result<SysInfo, SysInfoError> {
    let cpus = read_file("/sys/devices/system/cpu/online")?;
    let meminfo = read_file("/proc/meminfo")?;
    let uptime = read_file("/proc/uptime")?;
    let release = read_file("/proc/sys/kernel/osrelease")?;
    Ok(SysInfo {
        online_cpus: count_cpulist(&cpus)
            .ok_or_else(|| SysInfoError::Parse("/sys/devices/system/cpu/online".into()))?,
        mem_total_bytes: parse_mem_total(&meminfo)
            .ok_or_else(|| SysInfoError::Parse("/proc/meminfo".into()))?,
        kernel_release: release.trim().to_owned(),
        uptime_ms: parse_uptime_ms(&uptime)
            .ok_or_else(|| SysInfoError::Parse("/proc/uptime".into()))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpulists() {
        assert_eq!(count_cpulist("0\n"), Some(1));
        assert_eq!(count_cpulist("0-3"), Some(4));
        assert_eq!(count_cpulist("0-3,5,7-8\n"), Some(7));
        assert_eq!(count_cpulist("3-1"), None);
        assert_eq!(count_cpulist("x"), None);
    }

    #[test]
    fn meminfo_and_uptime() {
        assert_eq!(
            parse_mem_total("MemTotal:  1024 kB\nMemFree: 1 kB\n"),
            Some(1 << 20)
        );
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_uptime_ms("12.34 1.00\n"), Some(12340));
        assert_eq!(parse_uptime_ms("nan 1"), None);
    }

    #[test]
    fn reads_this_machine() {
        let info = read().unwrap();
        assert!(info.online_cpus >= 1);
        assert!(info.mem_total_bytes > 0);
        assert!(!info.kernel_release.is_empty());
    }
}
