//! hyperd: a CRI v1 server (RuntimeService and ImageService) where every pod is a microVM.
//!
//! - [`images`]: ImageService over the image store.
//! - [`config`]: the daemon's configuration file.
//!
//! The runtime service translates CRI requests into calls on the sandbox manager (`crates/
//! sandbox`), which owns the VMs, and the network manager (`crates/network`), which owns the
//! pods' network namespaces.

// tonic::Status (176 bytes) is the error type the generated CRI traits return; the helpers
// return it too, so boxing it would only be unboxed again at every handler.
#![allow(clippy::result_large_err)]

pub mod config;
pub mod images;
pub mod runtime;
pub mod spec;

/// Unix time now, in nanoseconds.
pub fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// An error and its sources, `: `-separated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Gives `path` to group `group` (the CRI socket's group).
pub fn chown_group(path: &std::path::Path, group: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string("/etc/group")?;
    let gid = text
        .lines()
        .find_map(|l| {
            let mut f = l.split(':');
            (f.next() == Some(group)).then(|| f.nth(1).and_then(|g| g.parse::<u32>().ok()))?
        })
        .ok_or_else(|| anyhow::anyhow!("group {group} not found in /etc/group"))?;
    std::os::unix::fs::chown(path, None, Some(gid))?;
    Ok(())
}
