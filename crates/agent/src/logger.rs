//! A minimal `log` backend writing one line per record to stderr (the console under PID 1).
//! No dependencies: every byte counts in the initramfs.

use std::io::Write;

struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            // A console write error has nowhere to be reported.
            let _ = writeln!(
                std::io::stderr().lock(),
                "hyperstart: {} {}",
                record.level(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

/// Installs the logger (idempotent) with `level` as the maximum.
pub fn init(level: log::LevelFilter) {
    // Fails only when a logger is already installed, which is fine.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}
