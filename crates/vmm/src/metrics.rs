//! Process memory figures from /proc/self/status.

/// Memory figures of this process, in bytes.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcStatus {
    /// Resident set size.
    pub rss: u64,
    /// Peak resident set size.
    pub hwm: u64,
    /// Anonymous resident memory (heap, stacks).
    pub rss_anon: u64,
    /// File-backed resident memory (the binary, libraries).
    pub rss_file: u64,
    /// Shared memory resident: the memfd guest RAM.
    pub rss_shmem: u64,
    /// Thread count.
    pub threads: u64,
}

impl ProcStatus {
    /// Parse the text of a /proc/<pid>/status file.
    pub fn parse(text: &str) -> Self {
        let mut s = ProcStatus::default();
        for line in text.lines() {
            let mut it = line.split_whitespace();
            let (Some(key), Some(val)) = (it.next(), it.next()) else {
                continue;
            };
            let Ok(v) = val.parse::<u64>() else { continue };
            let kib = v.saturating_mul(1024);
            match key {
                "VmRSS:" => s.rss = kib,
                "VmHWM:" => s.hwm = kib,
                "RssAnon:" => s.rss_anon = kib,
                "RssFile:" => s.rss_file = kib,
                "RssShmem:" => s.rss_shmem = kib,
                "Threads:" => s.threads = v,
                _ => {}
            }
        }
        s
    }

    /// Read this process's figures (zeros if /proc is unavailable).
    pub fn read() -> Self {
        std::fs::read_to_string("/proc/self/status")
            .map(|t| Self::parse(&t))
            .unwrap_or_default()
    }

    /// What the VMM itself costs: resident memory that is not guest RAM.
    pub fn overhead(&self) -> u64 {
        self.rss_anon + self.rss_file
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status() {
        let s = ProcStatus::parse(
            "Name:\thyper-vmm\nVmHWM:\t  9000 kB\nVmRSS:\t  8000 kB\nRssAnon:\t 1000 kB\n\
             RssFile:\t 2000 kB\nRssShmem:\t 5000 kB\nThreads:\t4\n",
        );
        assert_eq!(s.rss, 8000 * 1024);
        assert_eq!(s.hwm, 9000 * 1024);
        assert_eq!(s.overhead(), 3000 * 1024);
        assert_eq!(s.threads, 4);
        assert!(ProcStatus::read().rss > 0);
    }
}

/// How long ago this process was started (exec), from /proc/self/stat's start time in clock
/// ticks since boot against CLOCK_BOOTTIME. Resolution is one clock tick (10 ms); `None` if
/// /proc is unavailable.
pub fn process_age() -> Option<std::time::Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    // `rest` starts at field 3 (state); starttime is field 22.
    let start_ticks: u64 = rest.split_whitespace().nth(22 - 3)?.parse().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|h| *h > 0)?;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the valid timespec we pass.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return None;
    }
    let now_ms =
        u64::try_from(ts.tv_sec).ok()? * 1000 + u64::try_from(ts.tv_nsec).ok()? / 1_000_000;
    let start_ms = start_ticks * 1000 / hz;
    Some(std::time::Duration::from_millis(
        now_ms.saturating_sub(start_ms),
    ))
}

#[cfg(test)]
mod age_tests {
    #[test]
    fn process_age_is_small_and_positive() {
        let age = super::process_age().expect("age");
        // The test process started at most a few minutes ago (cargo test runs it fresh).
        assert!(age < std::time::Duration::from_secs(600), "{age:?}");
    }
}
