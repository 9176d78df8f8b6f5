//! The Container Network Interface, runtime side (spec 0.3.0 to 1.1.0): configuration
//! loading ([`config`]), plugin execution and chaining ([`exec`]), results ([`result`]).

pub mod config;
pub mod exec;
pub mod result;

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

pub use config::{load_network, NetworkConfigList, PluginConfig, SUPPORTED_VERSIONS};
pub use exec::{find_plugin, CniCommand};
pub use result::{CniDns, CniInterface, CniIp, CniResult, CniRoute};

/// Errors from CNI configurations and plugins.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    /// The configuration directory holds no configuration file.
    #[error("no CNI config in {}", dir.display())]
    NoConfig {
        /// The directory.
        dir: PathBuf,
    },
    /// Every configuration file of the directory was refused.
    #[error("no valid CNI config in {}: {reasons}", dir.display())]
    NoValidConfig {
        /// The directory.
        dir: PathBuf,
        /// Why each file was refused.
        reasons: String,
    },
    /// A configuration file or directory could not be read.
    #[error("cannot read {}", path.display())]
    ReadConfig {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A configuration file is not a usable network configuration.
    #[error("invalid CNI config {}: {reason}", path.display())]
    InvalidConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// No plugin binary of that name in the plugin directories.
    #[error("CNI plugin {plugin} not found in {dirs}")]
    PluginNotFound {
        /// The plugin type.
        plugin: String,
        /// The directories searched, `:`-separated.
        dirs: String,
    },
    /// The plugin could not be run.
    #[error("cannot run CNI plugin {plugin} for {command}")]
    Exec {
        /// The plugin type.
        plugin: String,
        /// The operation.
        command: CniCommand,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The plugin ran past its deadline and was killed.
    #[error("CNI plugin {plugin} {command} timed out after {timeout:?}")]
    Timeout {
        /// The plugin type.
        plugin: String,
        /// The operation.
        command: CniCommand,
        /// The deadline.
        timeout: Duration,
    },
    /// The plugin reported an error object.
    #[error("CNI plugin {plugin} {command} failed (code {code}): {msg}{}",
        if details.is_empty() { String::new() } else { format!(" ({details})") })]
    Plugin {
        /// The plugin type.
        plugin: String,
        /// The operation.
        command: CniCommand,
        /// The error code (1-99 are the spec's, 100+ the plugin's).
        code: u32,
        /// The plugin's message.
        msg: String,
        /// The plugin's details.
        details: String,
    },
    /// The plugin failed without an error object.
    #[error("CNI plugin {plugin} {command} exited with {status}: {output}")]
    PluginExit {
        /// The plugin type.
        plugin: String,
        /// The operation.
        command: CniCommand,
        /// Its exit status.
        status: ExitStatus,
        /// What it printed (stderr, or stdout when stderr was empty).
        output: String,
    },
    /// The plugin's ADD output is not a result.
    #[error("CNI plugin {plugin} returned an invalid result: {reason}")]
    InvalidResult {
        /// The plugin type.
        plugin: String,
        /// What is wrong.
        reason: String,
    },
}
