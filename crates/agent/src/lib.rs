//! hyperstart, the guest agent: PID 1 of every pod VM.
//!
//! One module per concern. PID 1 start-up (`init`) mounts the pseudo filesystems ([`mounts`]),
//! starts the zombie [`reaper`], brings up `lo` ([`net`]), reads the kernel command line
//! ([`cmdline`]), serves the ttrpc [`service`] over vsock ([`server`]) and then signals readiness
//! through the VMM's [`boottimer`]. In host mode (`--listen unix://...`) only the server (and the
//! reaper) run. The container [`runtime`] runs OCI containers as namespaced children of the agent.
//! Agent errors become ttrpc status codes in one place, [`error`].

pub mod block;
pub mod boottimer;
pub mod cmdline;
pub mod error;
pub mod icmp;
pub mod init;
pub mod logger;
pub mod mounts;
pub mod net;
pub mod power;
pub mod poweroff;
pub mod reaper;
pub mod runtime;
pub mod server;
pub mod service;
pub mod sysinfo;

/// This agent's version, reported by the `Version` RPC.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
