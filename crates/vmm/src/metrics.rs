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
