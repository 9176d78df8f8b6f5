//! Pod networking for Hypernetes: the pod is a VM, its network is the CNI's.
//!
//! # Design
//!
//! ```text
//!  host                              | pod network namespace (<netns_dir>/<pod id>)
//!  bridge/routing (CNI) -- veth peer =|= eth0 (CNI: MAC, IPs, routes)
//!                                    |    ingress u32 match-all -> mirred redirect -> tap0
//!                                    |  tap0 (persistent) <- the VMM's virtio-net
//!                                    |    ingress u32 match-all -> mirred redirect -> eth0
//! ```
//!
//! [`NetworkManager::setup`], in order:
//! 1. **Namespace** ([`netns`]): a thread `unshare(CLONE_NEWNET)`s and bind-mounts
//!    `/proc/thread-self/ns/net` onto `<netns_dir>/<pod id>`; the directory is a shared mount
//!    point as `ip netns` makes `/run/netns`, so unmounts reach copied mount namespaces.
//! 2. **Record** ([`state`]): `<state_dir>/<pod id>.json` gets the network configuration,
//!    `CNI_ARGS` and runtime config *before* ADD runs, so DEL always finds them; the ADD result
//!    and the finished [`PodNetwork`] are added as they come.
//! 3. **CNI ADD** ([`cni`]): the first valid `*.conflist`/`*.conf`/`*.json` of `conf_dir` in
//!    file name order; the exec protocol implemented here (env `CNI_*`, config on stdin with
//!    `name`/`cniVersion` injected, `prevResult` chaining, `runtimeConfig.portMappings` for
//!    plugins declaring the capability, error objects, a deadline killing the plugin's process
//!    group), results of spec 0.3.0 to 1.1.0.
//! 4. **Guest view** ([`link`]): the veth's MAC, MTU, global addresses and non-kernel routes
//!    are read from inside the namespace with `ip -j` (the namespace is the truth: CNI results
//!    may omit gateways or MACs). Pod IPs and DNS come from the CNI result.
//! 5. **Tap and redirect** ([`link`]): `ip tuntap add tap0 mode tap` with the veth's MTU (and
//!    no IPv6 link-local address, so the namespace's stack stays silent towards the guest), then
//!    ingress qdiscs and `u32 match u8 0 0 action mirred egress redirect` filters both ways,
//!    as Kata Containers' tcfilter mode does. The veth keeps its addresses: its ingress never
//!    reaches the namespace's stack, and tools looking at the namespace see the pod IP.
//!
//! Any failure after step 1 runs CNI DEL and removes the namespace. [`NetworkManager::teardown`]
//! runs DEL from the record (tolerating a missing namespace or result), then unmounts and
//! deletes the namespace file (the tap and qdiscs die with the namespace) and the record.
//!
//! `ip`/`tc` run inside the namespace through [`Netns::command`] (`setns` between fork and
//! exec), so namespace files can live anywhere; set `netns_dir` to `/run/netns` to make them
//! visible to `ip netns`. Why iproute2 rather than netlink in-process: see [`link`].
//!
//! Everything is synchronous; async callers use `spawn_blocking`.

pub mod cni;
pub mod existing_netns;
pub mod guest;
pub mod link;
pub mod manager;
pub mod netns;
pub mod request;
pub mod state;

mod cidr;
mod process;

pub use cni::{CniDns, CniError, CniResult};
pub use guest::{format_mac, parse_mac, GuestInterface, GuestRoute, PodNetwork};
pub use link::LinkError;
pub use manager::{NetworkManager, IFNAME, TAP_NAME};
pub use netns::{Netns, NetnsError};
pub use request::{valid_pod_id, NetworkConfig, PodNetworkRequest, PortMapping, Protocol};
pub use state::StateError;

/// Errors of [`NetworkManager`].
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The pod id is not `[A-Za-z0-9][A-Za-z0-9_.-]{0,127}`.
    #[error("invalid pod id {0:?}")]
    InvalidPodId(String),
    /// A request field cannot be passed to CNI plugins.
    #[error("invalid pod network request: {0}")]
    InvalidRequest(String),
    /// The pod's network is set up already (or a failed setup left a record): tear it down
    /// first.
    #[error("network of pod {0} exists already")]
    AlreadyExists(String),
    /// Another setup or teardown of the pod is in flight.
    #[error("network of pod {0} is being set up or torn down")]
    Busy(String),
    /// CNI configuration or plugin failure.
    #[error(transparent)]
    Cni(#[from] CniError),
    /// Network namespace failure.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// Tap or tc failure inside the namespace.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// Pod record failure.
    #[error(transparent)]
    State(#[from] StateError),
}
