//! Rate limiting for log lines a guest (or a host client) can trigger at will.

use std::time::{Duration, Instant};

/// Messages allowed per window.
const BURST: u32 = 10;
/// Window length.
const WINDOW: Duration = Duration::from_secs(5);

/// Allows [`BURST`] messages per [`WINDOW`] and counts the rest.
#[derive(Debug)]
pub(crate) struct LogLimiter {
    window_start: Instant,
    count: u32,
    suppressed: u64,
}

impl Default for LogLimiter {
    fn default() -> Self {
        LogLimiter {
            window_start: Instant::now(),
            count: 0,
            suppressed: 0,
        }
    }
}

impl LogLimiter {
    /// Whether the caller may log now.
    pub(crate) fn allow(&mut self) -> bool {
        let now = Instant::now();
        if now.duration_since(self.window_start) >= WINDOW {
            if self.suppressed > 0 {
                log::warn!("vsock: {} log messages suppressed", self.suppressed);
            }
            self.window_start = now;
            self.count = 0;
            self.suppressed = 0;
        }
        if self.count < BURST {
            self.count += 1;
            true
        } else {
            self.suppressed = self.suppressed.saturating_add(1);
            false
        }
    }
}

/// `log::$level!` through a [`LogLimiter`].
macro_rules! rl_log {
    ($limiter:expr, $level:ident, $($arg:tt)+) => {
        if $limiter.allow() {
            log::$level!($($arg)+);
        }
    };
}
pub(crate) use rl_log;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_bursts() {
        let mut l = LogLimiter::default();
        let allowed = (0..100).filter(|_| l.allow()).count();
        assert_eq!(allowed, BURST as usize);
        assert_eq!(l.suppressed, 100 - u64::from(BURST));
    }
}
