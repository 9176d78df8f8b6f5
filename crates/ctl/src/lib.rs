//! hyperctl's library: a small CRI v1 client that works against any CRI endpoint (hyperd, containerd, CRI-O).
//!
//! The binary (`src/main.rs`) is a thin command-line layer over these modules; end-to-end tests use them
//! directly:
//! - [`endpoint`]: `unix:///run/hyperd/hyperd.sock`-style endpoint parsing;
//! - [`client`]: [`Cri`], a connected RuntimeService + ImageService client with per-call timeouts and id
//!   resolution;
//! - [`resolve`]: unique-prefix / name resolution of pod, container and image ids, free of any RPC;
//! - [`logfmt`]: the CRI container log format (`<RFC3339Nano> <stdout|stderr> <P|F> <msg>`) decoder;
//! - [`logs`]: reading and following a container's log file until the container exits;
//! - [`spec`]: kubelet-like pod and container configs;
//! - [`stats`]: percentiles for benchmarks;
//! - [`bench`]: the pod lifecycle benchmark.

pub mod bench;
pub mod client;
pub mod endpoint;
pub mod error;
pub mod logfmt;
pub mod logs;
pub mod resolve;
pub mod spec;
pub mod stats;

/// The generated CRI v1 types and clients.
pub use k8s_cri::v1 as cri;

pub use client::Cri;
pub use endpoint::Endpoint;
pub use error::CtlError;
