//! Kernel command line options for the agent (`/proc/cmdline`).
//!
//! - `hyperstart.port=<n>`: vsock port to serve on (default [`protocol::DEFAULT_AGENT_PORT`]).
//! - `hyperstart.debug=1`: allow `DebugPanic` and log at debug level.
//! - `hyperstart.bench=exit`: reboot right after signalling readiness (boot benchmarks).
//!
//! Parameters with a dot are left to userspace by the kernel, so they only show up here.

/// Options the agent takes from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmdline {
    pub port: u32,
    pub debug: bool,
    pub bench_exit: bool,
}

impl Default for Cmdline {
    fn default() -> Self {
        Cmdline {
            port: protocol::DEFAULT_AGENT_PORT,
            debug: false,
            bench_exit: false,
        }
    }
}

/// A `hyperstart.*` parameter that could not be understood; the default is kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ignoring kernel parameter {param:?}: {reason}")]
pub struct CmdlineError {
    pub param: String,
    pub reason: &'static str,
}

impl Cmdline {
    /// Parses a command line. Bad `hyperstart.*` values are reported and skipped, never fatal:
    /// PID 1 must come up whatever the host passed.
    pub fn parse(text: &str) -> (Cmdline, Vec<CmdlineError>) {
        let mut cmdline = Cmdline::default();
        let mut errors = Vec::new();
        for param in text.split_whitespace() {
            let Some(option) = param.strip_prefix("hyperstart.") else {
                continue;
            };
            let (key, value) = option.split_once('=').unwrap_or((option, ""));
            let bad = |reason| CmdlineError {
                param: param.to_owned(),
                reason,
            };
            match key {
                "port" => match value.parse::<u32>() {
                    Ok(port) if port != 0 && port != u32::MAX => cmdline.port = port,
                    _ => errors.push(bad("expected a port number in 1..4294967294")),
                },
                "debug" => match value {
                    "1" | "true" | "" => cmdline.debug = true,
                    "0" | "false" => cmdline.debug = false,
                    _ => errors.push(bad("expected 0 or 1")),
                },
                "bench" => match value {
                    "exit" => cmdline.bench_exit = true,
                    _ => errors.push(bad("the only benchmark mode is \"exit\"")),
                },
                _ => errors.push(bad("unknown option")),
            }
        }
        (cmdline, errors)
    }

    /// Reads and parses `/proc/cmdline`.
    pub fn from_proc() -> std::io::Result<(Cmdline, Vec<CmdlineError>)> {
        let text = std::fs::read_to_string("/proc/cmdline")?;
        Ok(Cmdline::parse(&text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_without_options() {
        let (c, errors) = Cmdline::parse("console=ttyS0 reboot=k panic=1 pci=off\n");
        assert_eq!(c, Cmdline::default());
        assert_eq!(c.port, 1024);
        assert!(errors.is_empty());
    }

    #[test]
    fn all_options() {
        let (c, errors) = Cmdline::parse(
            "console=ttyS0 hyperstart.port=2048 hyperstart.debug=1 hyperstart.bench=exit quiet",
        );
        assert_eq!(
            c,
            Cmdline {
                port: 2048,
                debug: true,
                bench_exit: true
            }
        );
        assert!(errors.is_empty());
    }

    #[test]
    fn bad_values_keep_defaults_and_are_reported() {
        let (c, errors) = Cmdline::parse(
            "hyperstart.port=abc hyperstart.port=0 hyperstart.debug=maybe hyperstart.bench=loop hyperstart.colour=red",
        );
        assert_eq!(c, Cmdline::default());
        assert_eq!(errors.len(), 5);
        assert_eq!(errors[0].param, "hyperstart.port=abc");
    }

    #[test]
    fn later_values_win_and_debug_can_be_turned_off() {
        let (c, _) = Cmdline::parse(
            "hyperstart.debug=1 hyperstart.debug=0 hyperstart.port=1 hyperstart.port=9",
        );
        assert!(!c.debug);
        assert_eq!(c.port, 9);
    }

    #[test]
    fn similar_prefixes_are_not_ours() {
        let (c, errors) = Cmdline::parse("xhyperstart.port=5 hyperstartport=6");
        assert_eq!(c, Cmdline::default());
        assert!(errors.is_empty());
    }
}
