//! virtio-vsock implemented in the VMM with a Firecracker-style Unix socket backend.
//!
//! * Host -> guest: a host process connects to the Unix socket at `uds_path` and writes
//!   `CONNECT <port>\n`; once the guest accepts, it reads `OK <host port>\n` and the stream
//!   carries the connection's bytes.
//! * Guest -> host: a guest connection to CID 2 port `P` is connected to the Unix socket
//!   `<uds_path>_<P>`.
//!
//! Only stream sockets. Layout: `packet` (wire header, reading/writing descriptor chains),
//! `connection` (one connection's state and credit), `muxer` (the state machine and the
//! connection table, plain code), `queues` (virtqueues <-> muxer, plain code), `event_handler`
//! (the epoll worker thread), `device` (the [`crate::virtio::VirtioDevice`]).

mod connection;
mod device;
mod event_handler;
mod muxer;
pub mod packet;
mod queues;
mod ratelimit;
#[cfg(test)]
mod test_utils;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use device::{Vsock, DEFAULT_GUEST_CID};

/// Errors creating a vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The CID is reserved or does not fit 32 bits.
    #[error("guest cid {0} is reserved or out of range")]
    InvalidCid(u64),
    /// The host-side listener could not be created.
    #[error("cannot listen on {}", path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The listener could not be configured.
    #[error("cannot configure the vsock listener")]
    Listener(#[source] std::io::Error),
}
