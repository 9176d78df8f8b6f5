//! The CNI exec protocol: find a plugin binary, run it with the `CNI_*` environment and its
//! configuration on stdin under a deadline, and turn its output into a result or an error.

use std::ffi::OsString;
use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Map, Value};

use super::config::NetworkConfigList;
use super::result::{CniResult, ErrorObject};
use super::CniError;
use crate::process::{self, RunError};

/// A CNI operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CniCommand {
    /// Attach the container to the network.
    Add,
    /// Detach it, releasing what ADD took.
    Del,
}

impl fmt::Display for CniCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CniCommand::Add => "ADD",
            CniCommand::Del => "DEL",
        })
    }
}

/// Everything but the network configuration that an invocation passes to plugins.
#[derive(Debug, Clone)]
pub(crate) struct Invocation<'a> {
    /// Directories searched for plugin binaries, in order (also `CNI_PATH`).
    pub bin_dirs: &'a [PathBuf],
    /// `CNI_CONTAINERID`.
    pub container_id: &'a str,
    /// `CNI_NETNS`; `None` on a DEL whose namespace is gone.
    pub netns: Option<&'a Path>,
    /// `CNI_IFNAME`.
    pub ifname: &'a str,
    /// `CNI_ARGS`.
    pub args: &'a str,
    /// Runtime arguments for `runtimeConfig` (by capability name).
    pub runtime_config: &'a Map<String, Value>,
    /// Deadline for each plugin execution.
    pub timeout: Duration,
}

/// The first executable `plugin` in `bin_dirs`.
pub fn find_plugin(plugin: &str, bin_dirs: &[PathBuf]) -> Option<PathBuf> {
    bin_dirs.iter().map(|d| d.join(plugin)).find(|p| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// `bin_dirs` joined with `:` (for `CNI_PATH` and messages).
pub(crate) fn join_dirs(bin_dirs: &[PathBuf]) -> String {
    let dirs: Vec<String> = bin_dirs.iter().map(|d| d.display().to_string()).collect();
    dirs.join(":")
}

/// Runs one plugin; its stdout on success.
fn exec_plugin(
    plugin: &str,
    command: CniCommand,
    stdin: &[u8],
    inv: &Invocation<'_>,
) -> Result<Vec<u8>, CniError> {
    let binary = find_plugin(plugin, inv.bin_dirs).ok_or_else(|| CniError::PluginNotFound {
        plugin: plugin.to_string(),
        dirs: join_dirs(inv.bin_dirs),
    })?;
    let mut cmd = Command::new(&binary);
    // Stale CNI_* variables of the runtime's own environment must not reach the plugin.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("CNI_") {
            cmd.env_remove(&key);
        }
    }
    cmd.env("CNI_COMMAND", command.to_string())
        .env("CNI_CONTAINERID", inv.container_id)
        .env("CNI_IFNAME", inv.ifname)
        .env("CNI_ARGS", inv.args)
        .env("CNI_PATH", OsString::from(join_dirs(inv.bin_dirs)))
        .current_dir("/");
    if let Some(netns) = inv.netns {
        cmd.env("CNI_NETNS", netns);
    }
    log::debug!(
        "CNI {command} {plugin} for {} ({})",
        inv.container_id,
        binary.display()
    );
    let output = process::run(&mut cmd, stdin, inv.timeout).map_err(|e| match e {
        RunError::Spawn(source) | RunError::Io(source) => CniError::Exec {
            plugin: plugin.to_string(),
            command,
            source,
        },
        RunError::Timeout => CniError::Timeout {
            plugin: plugin.to_string(),
            command,
            timeout: inv.timeout,
        },
    })?;
    if output.status.success() {
        return Ok(output.stdout);
    }
    if let Some(err) = ErrorObject::parse(&output.stdout) {
        return Err(CniError::Plugin {
            plugin: plugin.to_string(),
            command,
            code: err.code,
            msg: err.msg,
            details: err.details,
        });
    }
    let mut text = output.stderr_text();
    if text.is_empty() {
        text = String::from_utf8_lossy(&output.stdout).trim().to_string();
    }
    Err(CniError::PluginExit {
        plugin: plugin.to_string(),
        command,
        status: output.status,
        output: text,
    })
}

/// ADD through the whole list, each plugin getting the previous one's result as `prevResult`.
/// Returns the final result, raw (for DEL and the state) and parsed.
pub(crate) fn add_network_list(
    list: &NetworkConfigList,
    inv: &Invocation<'_>,
) -> Result<(Value, CniResult), CniError> {
    let mut prev: Option<(Value, CniResult)> = None;
    for (i, plugin) in list.plugins.iter().enumerate() {
        let name = &plugin.plugin_type;
        let stdin = list
            .plugin_stdin(i, prev.as_ref().map(|(v, _)| v), inv.runtime_config)
            .ok_or_else(|| CniError::InvalidConfig {
                path: list.source.clone(),
                reason: format!("cannot build the configuration of plugin {i}"),
            })?;
        let out = exec_plugin(name, CniCommand::Add, &stdin, inv)?;
        let invalid = |reason: String| CniError::InvalidResult {
            plugin: name.clone(),
            reason,
        };
        let value: Value = serde_json::from_slice(&out).map_err(|e| invalid(e.to_string()))?;
        let parsed = CniResult::parse(&value).map_err(invalid)?;
        prev = Some((value, parsed));
    }
    prev.ok_or_else(|| CniError::InvalidConfig {
        path: list.source.clone(),
        reason: "no plugins in the list".into(),
    })
}

/// DEL through the list in reverse order, with `prev_result` (the cached ADD result) as
/// `prevResult` from spec 0.4.0 on. Every plugin gets its DEL even when one before it failed,
/// so as much as possible is released; the first failure is returned.
pub(crate) fn del_network_list(
    list: &NetworkConfigList,
    prev_result: Option<&Value>,
    inv: &Invocation<'_>,
) -> Result<(), CniError> {
    let prev_result = prev_result.filter(|_| list.del_takes_prev_result());
    let mut first_err = None;
    for (i, plugin) in list.plugins.iter().enumerate().rev() {
        let res = list
            .plugin_stdin(i, prev_result, inv.runtime_config)
            .ok_or_else(|| CniError::InvalidConfig {
                path: list.source.clone(),
                reason: format!("cannot build the configuration of plugin {i}"),
            })
            .and_then(|stdin| exec_plugin(&plugin.plugin_type, CniCommand::Del, &stdin, inv));
        if let Err(e) = res {
            log::warn!("CNI DEL for {}: {e}", inv.container_id);
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}
