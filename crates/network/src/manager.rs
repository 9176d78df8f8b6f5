//! [`NetworkManager`]: a pod's network from namespace creation to teardown.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use serde_json::{Map, Value};

use crate::cni::exec::{add_network_list, del_network_list, join_dirs, Invocation};
use crate::cni::{find_plugin, load_network, CniError, NetworkConfigList};
use crate::guest::PodNetwork;
use crate::link;
use crate::netns::{self, Netns};
use crate::request::{valid_pod_id, NetworkConfig, PodNetworkRequest};
use crate::state::{PodState, StateDir};
use crate::NetworkError;

/// The pod's interface inside its namespace (`CNI_IFNAME`), and the guest's.
pub const IFNAME: &str = "eth0";

/// The tap the VMM attaches to, inside the pod's namespace.
pub const TAP_NAME: &str = "tap0";

/// Sets up and tears down pod networks. Blocking: async callers use `spawn_blocking`.
/// Operations on different pods run in parallel; a second operation on a pod that has one
/// in flight fails with [`NetworkError::Busy`].
#[derive(Debug)]
pub struct NetworkManager {
    cfg: NetworkConfig,
    state: StateDir,
    busy: Mutex<HashSet<String>>,
    netns_dir_ready: Mutex<bool>,
}

/// Marks a pod busy until dropped.
struct Claim<'a> {
    busy: &'a Mutex<HashSet<String>>,
    pod_id: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        lock(self.busy).remove(&self.pod_id);
    }
}

/// Locks `m`, ignoring poisoning (the guarded data stays consistent across a panic).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether `program` is an executable file in `$PATH`.
fn in_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|d| {
            d.join(program)
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

impl NetworkManager {
    /// A manager for `cfg`. Nothing is touched until the first call.
    pub fn new(cfg: NetworkConfig) -> Self {
        NetworkManager {
            state: StateDir::new(cfg.state_dir.clone()),
            cfg,
            busy: Mutex::new(HashSet::new()),
            netns_dir_ready: Mutex::new(false),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &NetworkConfig {
        &self.cfg
    }

    /// CRI `NetworkReady`: `Ok`, or the reason the network is not ready (no usable CNI config,
    /// a plugin binary missing, iproute2 or `/dev/net/tun` missing).
    pub fn status(&self) -> Result<(), String> {
        let list = load_network(&self.cfg.conf_dir).map_err(|e| e.to_string())?;
        for p in &list.plugins {
            if find_plugin(&p.plugin_type, &self.cfg.bin_dirs).is_none() {
                return Err(format!(
                    "CNI plugin {} (network {} in {}) not found in {}",
                    p.plugin_type,
                    list.name,
                    list.source.display(),
                    join_dirs(&self.cfg.bin_dirs)
                ));
            }
        }
        for program in ["ip", "tc"] {
            if !in_path(program) {
                return Err(format!("{program} not found in PATH (install iproute2)"));
            }
        }
        if !Path::new("/dev/net/tun").exists() {
            return Err("/dev/net/tun is missing (no tun driver)".into());
        }
        Ok(())
    }

    /// The path of a pod's network namespace file: spawn the VMM inside it
    /// ([`Netns::command`], or `setns` in `pre_exec`).
    pub fn netns_path(&self, pod_id: &str) -> PathBuf {
        self.cfg.netns_dir.join(pod_id)
    }

    /// The network of a pod that was set up, from its record (for recovery after a restart).
    pub fn pod_network(&self, pod_id: &str) -> Result<Option<PodNetwork>, NetworkError> {
        check_pod_id(pod_id)?;
        Ok(self.state.load(pod_id)?.and_then(|s| s.network))
    }

    /// Pods with a record or a namespace file: set up, or left by a setup whose cleanup failed
    /// or that a crash interrupted. Tear down those that belong to no sandbox (after a restart)
    /// to release their addresses.
    pub fn pods(&self) -> Result<Vec<String>, NetworkError> {
        let mut ids = self.state.list()?;
        match std::fs::read_dir(&self.cfg.netns_dir) {
            Ok(entries) => {
                for entry in entries.flatten() {
                    if let Some(name) = entry.file_name().to_str() {
                        if valid_pod_id(name) {
                            ids.push(name.to_string());
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(crate::NetnsError::Io {
                    op: "read",
                    path: self.cfg.netns_dir.clone(),
                    source,
                }
                .into())
            }
        }
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    fn claim(&self, pod_id: &str) -> Result<Claim<'_>, NetworkError> {
        if !lock(&self.busy).insert(pod_id.to_string()) {
            return Err(NetworkError::Busy(pod_id.to_string()));
        }
        Ok(Claim {
            busy: &self.busy,
            pod_id: pod_id.to_string(),
        })
    }

    fn prepare_netns_dir(&self) -> Result<(), NetworkError> {
        let mut ready = lock(&self.netns_dir_ready);
        if !*ready {
            netns::prepare_dir(&self.cfg.netns_dir)?;
            *ready = true;
        }
        Ok(())
    }

    fn invocation<'a>(&'a self, st: &'a PodState, netns: Option<&'a Path>) -> Invocation<'a> {
        Invocation {
            bin_dirs: &self.cfg.bin_dirs,
            container_id: &st.pod_id,
            netns,
            ifname: &st.ifname,
            args: &st.cni_args,
            runtime_config: &st.runtime_config,
            timeout: self.cfg.plugin_timeout,
        }
    }

    /// Creates the pod's network namespace, runs CNI ADD in it, creates the tap and the tc
    /// redirect, and returns what the VMM and the guest need. On any failure after the
    /// namespace exists, CNI DEL runs and the namespace is removed.
    pub fn setup(&self, req: &PodNetworkRequest) -> Result<PodNetwork, NetworkError> {
        check_pod_id(&req.pod_id)?;
        let cni_args = req.cni_args().map_err(|field| {
            NetworkError::InvalidRequest(format!("{field} contains ';', '=' or a NUL byte"))
        })?;
        let _claim = self.claim(&req.pod_id)?;
        let netns_path = self.netns_path(&req.pod_id);
        if self.state.load(&req.pod_id)?.is_some() || netns_path.symlink_metadata().is_ok() {
            return Err(NetworkError::AlreadyExists(req.pod_id.clone()));
        }

        // Everything that can be checked before creating anything.
        let list = load_network(&self.cfg.conf_dir)?;
        for p in &list.plugins {
            if find_plugin(&p.plugin_type, &self.cfg.bin_dirs).is_none() {
                return Err(CniError::PluginNotFound {
                    plugin: p.plugin_type.clone(),
                    dirs: join_dirs(&self.cfg.bin_dirs),
                }
                .into());
            }
        }
        let mut runtime_config = Map::new();
        let port_mappings = req.port_mappings_json();
        if !port_mappings.is_empty() {
            runtime_config.insert("portMappings".into(), Value::Array(port_mappings));
        }

        self.prepare_netns_dir()?;
        netns::create(&netns_path)?;
        let mut st = PodState::new(
            &req.pod_id,
            &netns_path,
            IFNAME,
            list.to_json(),
            cni_args,
            runtime_config,
        );
        if let Err(e) = self.state.store(&st) {
            if let Err(e) = netns::remove(&netns_path) {
                log::warn!("pod {}: {e}", req.pod_id);
            }
            return Err(e.into());
        }
        match self.attach(&list, &mut st) {
            Ok(net) => Ok(net),
            Err(e) => {
                log::warn!(
                    "pod {}: network setup failed, rolling back: {e}",
                    req.pod_id
                );
                self.rollback(&list, &st);
                Err(e)
            }
        }
    }

    /// ADD, then the namespace side; records the result and the finished network.
    fn attach(
        &self,
        list: &NetworkConfigList,
        st: &mut PodState,
    ) -> Result<PodNetwork, NetworkError> {
        let (raw, result) = add_network_list(list, &self.invocation(st, Some(&st.netns)))?;
        st.result = Some(raw);
        self.state.store(st)?;

        let ns = Netns::open(&st.netns)?;
        let interface = link::read_interface(&ns, IFNAME)?;
        let routes = link::read_routes(&ns, IFNAME)?;
        link::create_tap(&ns, TAP_NAME, interface.mtu)?;
        link::redirect(&ns, IFNAME, TAP_NAME)?;

        let mut ips = result.pod_ips(IFNAME);
        if ips.is_empty() {
            ips = interface.addresses.iter().map(|(a, _)| *a).collect();
            ips.sort_by_key(|ip| ip.is_ipv6());
        }
        let mut ips = ips.into_iter();
        let net = PodNetwork {
            netns: st.netns.clone(),
            tap: TAP_NAME.to_string(),
            interface,
            routes,
            dns: result.dns,
            pod_ip: ips.next(),
            additional_ips: ips.collect(),
        };
        st.network = Some(net.clone());
        self.state.store(st)?;
        Ok(net)
    }

    /// Undoes a failed setup: DEL (with the result when ADD got that far), then the namespace.
    /// The record goes only when DEL succeeded; otherwise it stays for [`Self::teardown`] to
    /// retry DEL (the namespace is removed either way: the pod never started).
    fn rollback(&self, list: &NetworkConfigList, st: &PodState) {
        let del = del_network_list(
            list,
            st.result.as_ref(),
            &self.invocation(st, Some(&st.netns)),
        );
        if let Err(e) = netns::remove(&st.netns) {
            log::warn!("pod {}: {e}", st.pod_id);
        }
        match del {
            Ok(()) => {
                if let Err(e) = self.state.remove(&st.pod_id) {
                    log::warn!("pod {}: {e}", st.pod_id);
                }
            }
            Err(e) => log::warn!(
                "pod {}: CNI DEL after a failed setup failed, record kept for teardown: {e}",
                st.pod_id
            ),
        }
    }

    /// CNI DEL with the configuration and result recorded at setup (plugins are told there is
    /// no namespace when it is gone), then removes the namespace and the record. Nothing
    /// recorded means nothing to DEL: a second call is `Ok`. When DEL fails, the namespace and
    /// the record stay so that a retry can release what the plugins hold.
    pub fn teardown(&self, pod_id: &str) -> Result<(), NetworkError> {
        check_pod_id(pod_id)?;
        let _claim = self.claim(pod_id)?;
        let mut netns_files = vec![self.netns_path(pod_id)];
        let record = self.state.path(pod_id);
        let (st, list) = match self.state.load(pod_id) {
            Ok(None) => (None, None),
            Ok(Some(st)) => match NetworkConfigList::from_conflist(st.config.clone(), &record) {
                Ok(list) => (Some(st), Some(list)),
                Err(e) => {
                    log::warn!("pod {pod_id}: {e}; CNI DEL with the current configuration");
                    let list = self.current_network();
                    (Some(st), list)
                }
            },
            Err(e) => {
                // Without the record, DEL with what there is now, as runtimes without a
                // result cache do.
                log::warn!("pod {pod_id}: {e}; CNI DEL with the current configuration");
                let st = PodState::new(
                    pod_id,
                    &netns_files[0],
                    IFNAME,
                    Value::Null,
                    format!("IgnoreUnknown=1;K8S_POD_INFRA_CONTAINER_ID={pod_id}"),
                    Map::new(),
                );
                (Some(st), self.current_network())
            }
        };
        if let Some(st) = &st {
            if st.netns != netns_files[0] {
                netns_files.push(st.netns.clone());
            }
            match &list {
                Some(list) => self.del(list, st)?,
                // Nothing to run DEL with: removing the rest is all that can be done.
                None => log::warn!("pod {pod_id}: no CNI config to run DEL with, skipped"),
            }
        }
        for f in &netns_files {
            netns::remove(f)?;
        }
        self.state.remove(pod_id)?;
        Ok(())
    }

    /// The configuration directory's network, or `None` (logged) when there is none.
    fn current_network(&self) -> Option<NetworkConfigList> {
        load_network(&self.cfg.conf_dir)
            .map_err(|e| log::warn!("{e}"))
            .ok()
    }

    fn del(&self, list: &NetworkConfigList, st: &PodState) -> Result<(), NetworkError> {
        let netns = Netns::open(&st.netns).ok();
        let inv = self.invocation(st, netns.as_ref().map(Netns::path));
        del_network_list(list, st.result.as_ref(), &inv)?;
        Ok(())
    }
}

fn check_pod_id(pod_id: &str) -> Result<(), NetworkError> {
    if valid_pod_id(pod_id) {
        Ok(())
    } else {
        Err(NetworkError::InvalidPodId(pod_id.to_string()))
    }
}
