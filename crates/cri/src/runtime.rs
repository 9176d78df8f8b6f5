//! CRI RuntimeService: pods and containers, translated to the sandbox manager (VMs) and the
//! network manager (CNI in the pod's network namespace).
//!
//! Every blocking call (VM boot, CNI, agent RPCs) runs on tokio's blocking pool, so one pod's
//! slow boot never holds up another pod's request.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use image::ImageStore;
use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_server::RuntimeService;
use network::{NetworkManager, PodNetworkRequest, PortMapping, Protocol};
use sandbox::record::{ContainerRecord, ContainerState, PodRecord, PodState};
use sandbox::{ErrorKind, SandboxError, SandboxManager};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// CRI API version served.
pub const RUNTIME_API_VERSION: &str = "v1";
/// The runtime's name in Version.
pub const RUNTIME_NAME: &str = "hyperd";

/// The runtime service.
pub struct Runtime {
    sandboxes: Arc<SandboxManager>,
    network: Arc<NetworkManager>,
    images: Arc<ImageStore>,
    cgroup_driver: String,
    /// Pod names (namespace, name, uid, attempt) whose RunPodSandbox is in flight: a second
    /// request for the same name is refused even before the first pod is listed.
    starting: Arc<Mutex<HashSet<PodName>>>,
}

type PodName = (String, String, String, u32);

/// Holds a name in [`Runtime::starting`] until dropped.
struct NameReservation {
    names: Arc<Mutex<HashSet<PodName>>>,
    name: PodName,
}

impl Drop for NameReservation {
    fn drop(&mut self) {
        self.names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.name);
    }
}

/// Maps sandbox errors to gRPC statuses.
pub fn status(e: SandboxError) -> Status {
    let text = crate::error_chain(&e);
    match e.kind() {
        ErrorKind::InvalidArgument => Status::invalid_argument(text),
        ErrorKind::NotFound => Status::not_found(text),
        ErrorKind::AlreadyExists => Status::already_exists(text),
        ErrorKind::FailedPrecondition => Status::failed_precondition(text),
        ErrorKind::ResourceExhausted => Status::resource_exhausted(text),
        ErrorKind::DeadlineExceeded => Status::deadline_exceeded(text),
        ErrorKind::Unavailable => Status::unavailable(text),
        ErrorKind::Internal => Status::internal(text),
    }
}

fn net_status(e: network::NetworkError) -> Status {
    let text = crate::error_chain(&e);
    match e {
        network::NetworkError::InvalidPodId(_) | network::NetworkError::InvalidRequest(_) => {
            Status::invalid_argument(text)
        }
        network::NetworkError::AlreadyExists(_) => Status::already_exists(text),
        network::NetworkError::Busy(_) => Status::unavailable(text),
        _ => Status::internal(text),
    }
}

/// Runs blocking work off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("worker failed: {e}")))?
}

/// A new 64-hex-digit id, like containerd's.
/// Length of the pod and container ids [`new_id`] makes (64 hex digits, as containerd's).
pub const ID_LEN: usize = 64;

pub fn new_id() -> String {
    let mut bytes = [0u8; 32];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .is_ok();
    if !ok {
        // Unique enough without a random source: time and a counter.
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let t = crate::now_nanos() as u64;
        bytes[..8].copy_from_slice(&t.to_le_bytes());
        bytes[8..16].copy_from_slice(&n.to_le_bytes());
        bytes[16..20].copy_from_slice(&std::process::id().to_le_bytes());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn to_btree(m: &HashMap<String, String>) -> BTreeMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn to_hash(m: &BTreeMap<String, String>) -> HashMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn pod_state(s: PodState) -> i32 {
    match s {
        PodState::Ready => cri::PodSandboxState::SandboxReady as i32,
        PodState::Creating | PodState::NotReady => cri::PodSandboxState::SandboxNotready as i32,
    }
}

fn container_state(s: ContainerState) -> i32 {
    match s {
        ContainerState::Created => cri::ContainerState::ContainerCreated as i32,
        ContainerState::Running => cri::ContainerState::ContainerRunning as i32,
        ContainerState::Exited => cri::ContainerState::ContainerExited as i32,
        ContainerState::Creating => cri::ContainerState::ContainerUnknown as i32,
    }
}

fn pod_metadata(r: &PodRecord) -> cri::PodSandboxMetadata {
    cri::PodSandboxMetadata {
        name: r.spec.name.clone(),
        uid: r.spec.uid.clone(),
        namespace: r.spec.namespace.clone(),
        attempt: r.spec.attempt,
    }
}

fn pod_status_of(r: &PodRecord) -> cri::PodSandboxStatus {
    let ips = r.ips();
    let network = ips.first().map(|ip| cri::PodSandboxNetworkStatus {
        ip: ip.to_string(),
        additional_ips: ips[1..]
            .iter()
            .map(|ip| cri::PodIp { ip: ip.to_string() })
            .collect(),
    });
    let pid_mode = if r.spec.share_pid_namespace {
        cri::NamespaceMode::Pod
    } else {
        cri::NamespaceMode::Container
    };
    cri::PodSandboxStatus {
        id: r.id().to_owned(),
        metadata: Some(pod_metadata(r)),
        state: pod_state(r.state),
        created_at: r.created_at_nanos,
        network,
        linux: Some(cri::LinuxPodSandboxStatus {
            namespaces: Some(cri::Namespace {
                options: Some(cri::NamespaceOption {
                    network: if r.spec.network.is_some() {
                        cri::NamespaceMode::Pod as i32
                    } else {
                        cri::NamespaceMode::Node as i32
                    },
                    pid: pid_mode as i32,
                    ipc: cri::NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
            }),
        }),
        labels: to_hash(&r.spec.labels),
        annotations: to_hash(&r.spec.annotations),
        runtime_handler: r.spec.runtime_handler.clone(),
    }
}

fn container_metadata(r: &ContainerRecord) -> cri::ContainerMetadata {
    cri::ContainerMetadata {
        name: r.name.clone(),
        attempt: r.attempt,
    }
}

fn container_of(r: &ContainerRecord) -> cri::Container {
    cri::Container {
        id: r.id.clone(),
        pod_sandbox_id: r.pod_id.clone(),
        metadata: Some(container_metadata(r)),
        image: Some(cri::ImageSpec {
            image: r.image_ref.clone(),
            ..Default::default()
        }),
        image_ref: r.image_id.clone(),
        state: container_state(r.state),
        created_at: r.created_at_nanos,
        labels: to_hash(&r.labels),
        annotations: to_hash(&r.annotations),
        image_id: r.image_id.clone(),
    }
}

fn container_status_of(r: &ContainerRecord) -> cri::ContainerStatus {
    cri::ContainerStatus {
        id: r.id.clone(),
        metadata: Some(container_metadata(r)),
        state: container_state(r.state),
        created_at: r.created_at_nanos,
        started_at: r.started_at_nanos,
        finished_at: r.finished_at_nanos,
        exit_code: r.exit_code.unwrap_or(0),
        image: Some(cri::ImageSpec {
            image: r.image_ref.clone(),
            ..Default::default()
        }),
        image_ref: r.image_id.clone(),
        reason: r.reason.clone(),
        message: r.message.clone(),
        labels: to_hash(&r.labels),
        annotations: to_hash(&r.annotations),
        // The CRI mounts as requested (their copies' guest paths are an implementation
        // detail; the pod's own resolv.conf and hostname are not CRI mounts).
        mounts: r
            .mounts
            .iter()
            .filter(|m| !m.host_path.is_empty())
            .map(|m| cri::Mount {
                container_path: m.container_path.clone(),
                host_path: m.host_path.clone(),
                readonly: m.read_only,
                ..Default::default()
            })
            .collect(),
        log_path: r
            .log_path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        image_id: r.image_id.clone(),
        ..Default::default()
    }
}

fn labels_match(selector: &HashMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn port_mappings(ports: &[cri::PortMapping]) -> Result<Vec<PortMapping>, Status> {
    ports
        .iter()
        .filter(|p| p.host_port > 0)
        .map(|p| {
            let protocol = match cri::Protocol::try_from(p.protocol) {
                Ok(cri::Protocol::Tcp) => Protocol::Tcp,
                Ok(cri::Protocol::Udp) => Protocol::Udp,
                Ok(cri::Protocol::Sctp) => Protocol::Sctp,
                Err(_) => return Err(Status::invalid_argument("unknown port protocol")),
            };
            let port = |v: i32, what: &str| {
                u16::try_from(v)
                    .ok()
                    .filter(|&p| p > 0)
                    .ok_or_else(|| Status::invalid_argument(format!("bad {what} {v}")))
            };
            Ok(PortMapping {
                protocol,
                container_port: port(p.container_port, "container port")?,
                host_port: port(p.host_port, "host port")?,
                host_ip: p.host_ip.clone(),
            })
        })
        .collect()
}

impl Runtime {
    pub fn new(
        sandboxes: Arc<SandboxManager>,
        network: Arc<NetworkManager>,
        images: Arc<ImageStore>,
        cgroup_driver: String,
    ) -> Runtime {
        Runtime {
            sandboxes,
            network,
            images,
            cgroup_driver,
            starting: Arc::default(),
        }
    }

    /// Reserves a pod name for a RunPodSandbox; `AlreadyExists` when a pod has it or another
    /// RunPodSandbox is starting one with it (kubelet retries, and must not get two VMs).
    fn reserve_name(&self, spec: &sandbox::PodSpec) -> Result<NameReservation, Status> {
        let name: PodName = (
            spec.namespace.clone(),
            spec.name.clone(),
            spec.uid.clone(),
            spec.attempt,
        );
        let exists = || {
            Status::already_exists(format!(
                "a pod sandbox {}/{} (uid {}, attempt {}) exists",
                spec.namespace, spec.name, spec.uid, spec.attempt
            ))
        };
        let mut starting = self
            .starting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let taken = self.sandboxes.list_pods().into_iter().any(|p| {
            p.spec.name == spec.name
                && p.spec.namespace == spec.namespace
                && p.spec.uid == spec.uid
                && p.spec.attempt == spec.attempt
        });
        if taken || !starting.insert(name.clone()) {
            return Err(exists());
        }
        Ok(NameReservation {
            names: self.starting.clone(),
            name,
        })
    }

    fn pod_spec(
        id: &str,
        config: &cri::PodSandboxConfig,
        handler: &str,
    ) -> Result<sandbox::PodSpec, Status> {
        let md = config
            .metadata
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("pod metadata is missing"))?;
        if md.name.is_empty() || md.namespace.is_empty() || md.uid.is_empty() {
            return Err(Status::invalid_argument(
                "pod metadata needs a name, a namespace and a uid",
            ));
        }
        let linux = config.linux.as_ref();
        let ns = linux
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.as_ref());
        let share_pid = ns.is_some_and(|n| n.pid == cri::NamespaceMode::Pod as i32);
        // Pod resources size the VM: the pod-level limits, else its overhead.
        let res = linux.and_then(|l| l.resources.as_ref().or(l.overhead.as_ref()));
        let resources = sandbox::PodResources {
            cpu_quota_us: res.map(|r| r.cpu_quota).filter(|&q| q > 0),
            cpu_period_us: res
                .map(|r| r.cpu_period)
                .filter(|&p| p > 0)
                .map(|p| p as u64),
            cpu_shares: res
                .map(|r| r.cpu_shares)
                .filter(|&s| s > 0)
                .map(|s| s as u64),
            memory_limit_bytes: res
                .map(|r| r.memory_limit_in_bytes)
                .filter(|&m| m > 0)
                .map(|m| m as u64),
        };
        Ok(sandbox::PodSpec {
            id: id.to_owned(),
            name: md.name.clone(),
            namespace: md.namespace.clone(),
            uid: md.uid.clone(),
            attempt: md.attempt,
            hostname: config.hostname.clone(),
            labels: to_btree(&config.labels),
            annotations: to_btree(&config.annotations),
            dns: config.dns_config.as_ref().map(|d| sandbox::Dns {
                servers: d.servers.clone(),
                searches: d.searches.clone(),
                options: d.options.clone(),
            }),
            share_pid_namespace: share_pid,
            sysctls: linux.map(|l| to_btree(&l.sysctls)).unwrap_or_default(),
            resources,
            network: None,
            runtime_handler: handler.to_owned(),
            log_directory: (!config.log_directory.is_empty())
                .then(|| config.log_directory.clone().into()),
        })
    }

    /// A pod by exact id or unique prefix.
    fn resolve_pod(&self, id: &str) -> Result<String, Status> {
        if id.is_empty() {
            return Err(Status::invalid_argument("pod sandbox id is empty"));
        }
        let pods = self.sandboxes.list_pods();
        if pods.iter().any(|p| p.id() == id) {
            return Ok(id.to_owned());
        }
        let matches: Vec<&PodRecord> = pods.iter().filter(|p| p.id().starts_with(id)).collect();
        match matches.as_slice() {
            [one] => Ok(one.id().to_owned()),
            [] => Err(Status::not_found(format!("pod sandbox {id} not found"))),
            _ => Err(Status::invalid_argument(format!(
                "pod sandbox id {id} is ambiguous"
            ))),
        }
    }

    /// A container by exact id or unique prefix.
    fn resolve_container(&self, id: &str) -> Result<String, Status> {
        if id.is_empty() {
            return Err(Status::invalid_argument("container id is empty"));
        }
        let all = self.sandboxes.list_containers(None);
        if all.iter().any(|c| c.id == id) {
            return Ok(id.to_owned());
        }
        let matches: Vec<&ContainerRecord> = all.iter().filter(|c| c.id.starts_with(id)).collect();
        match matches.as_slice() {
            [one] => Ok(one.id.clone()),
            [] => Err(Status::not_found(format!("container {id} not found"))),
            _ => Err(Status::invalid_argument(format!(
                "container id {id} is ambiguous"
            ))),
        }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<cri::ContainerEventResponse, Status>> + Send>>;

#[tonic::async_trait]
impl RuntimeService for Runtime {
    async fn version(
        &self,
        _request: Request<cri::VersionRequest>,
    ) -> Result<Response<cri::VersionResponse>, Status> {
        Ok(Response::new(cri::VersionResponse {
            version: "0.1.0".into(),
            runtime_name: RUNTIME_NAME.into(),
            runtime_version: env!("CARGO_PKG_VERSION").into(),
            runtime_api_version: RUNTIME_API_VERSION.into(),
        }))
    }

    async fn run_pod_sandbox(
        &self,
        request: Request<cri::RunPodSandboxRequest>,
    ) -> Result<Response<cri::RunPodSandboxResponse>, Status> {
        let req = request.into_inner();
        let config = req
            .config
            .ok_or_else(|| Status::invalid_argument("pod sandbox config is missing"))?;
        let id = new_id();
        let mut spec = Runtime::pod_spec(&id, &config, &req.runtime_handler)?;
        // One pod per name, namespace, uid and attempt, as containerd reserves names; held
        // until the pod is listed (or its start failed).
        let reservation = self.reserve_name(&spec)?;
        let host_network = config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.as_ref())
            .is_some_and(|n| n.network == cri::NamespaceMode::Node as i32);
        if host_network {
            return Err(Status::invalid_argument(
                "host-network pods cannot run in a VM: use a runc RuntimeClass for them",
            ));
        }
        let ports = port_mappings(&config.port_mappings)?;
        let net_req = PodNetworkRequest {
            pod_id: id.clone(),
            name: spec.name.clone(),
            namespace: spec.namespace.clone(),
            uid: spec.uid.clone(),
            port_mappings: ports,
        };
        let network = self.network.clone();
        let sandboxes = self.sandboxes.clone();
        blocking(move || {
            let pod_net = network.setup(&net_req).map_err(net_status)?;
            spec.network = Some(sandbox::GuestNetwork {
                netns: pod_net.netns.clone(),
                tap: pod_net.tap.clone(),
                guest_ifname: "eth0".into(),
                mac: pod_net.interface.mac,
                mtu: pod_net.interface.mtu,
                addresses: pod_net.interface.addresses.clone(),
                routes: pod_net
                    .routes
                    .iter()
                    .map(|r| (r.destination.clone(), r.gateway))
                    .collect(),
            });
            if let Err(e) = sandboxes.run_pod(spec) {
                if let Err(te) = network.teardown(&net_req.pod_id) {
                    log::warn!(
                        "pod {}: network teardown after a failed start: {}",
                        net_req.pod_id,
                        crate::error_chain(&te)
                    );
                }
                return Err(status(e));
            }
            Ok(())
        })
        .await?;
        drop(reservation);
        log::info!("pod sandbox {id} is ready");
        Ok(Response::new(cri::RunPodSandboxResponse {
            pod_sandbox_id: id,
        }))
    }

    async fn stop_pod_sandbox(
        &self,
        request: Request<cri::StopPodSandboxRequest>,
    ) -> Result<Response<cri::StopPodSandboxResponse>, Status> {
        let id = self.resolve_pod(&request.into_inner().pod_sandbox_id)?;
        let sandboxes = self.sandboxes.clone();
        let network = self.network.clone();
        blocking(move || {
            // kubelet has stopped every container with its grace period (StopContainer)
            // before it stops the sandbox; what still runs is killed at once, as containerd
            // does. A grace period here would cost its full length for every container whose
            // init ignores SIGTERM (a shell as PID 1 does).
            sandboxes.stop_pod(&id, Duration::ZERO).map_err(status)?;
            // CRI: stopping releases the network.
            network.teardown(&id).map_err(net_status)
        })
        .await?;
        Ok(Response::new(cri::StopPodSandboxResponse {}))
    }

    async fn remove_pod_sandbox(
        &self,
        request: Request<cri::RemovePodSandboxRequest>,
    ) -> Result<Response<cri::RemovePodSandboxResponse>, Status> {
        let id = request.into_inner().pod_sandbox_id;
        if id.is_empty() {
            return Err(Status::invalid_argument("pod sandbox id is empty"));
        }
        // Idempotent: an unknown id is already removed.
        let Ok(id) = self.resolve_pod(&id) else {
            return Ok(Response::new(cri::RemovePodSandboxResponse {}));
        };
        let sandboxes = self.sandboxes.clone();
        let network = self.network.clone();
        blocking(move || {
            sandboxes.remove_pod(&id).map_err(status)?;
            network.teardown(&id).map_err(net_status)
        })
        .await?;
        Ok(Response::new(cri::RemovePodSandboxResponse {}))
    }

    async fn pod_sandbox_status(
        &self,
        request: Request<cri::PodSandboxStatusRequest>,
    ) -> Result<Response<cri::PodSandboxStatusResponse>, Status> {
        let req = request.into_inner();
        let id = self.resolve_pod(&req.pod_sandbox_id)?;
        let record = self.sandboxes.pod_status(&id).map_err(status)?;
        let mut info = HashMap::new();
        if req.verbose {
            info.insert(
                "info".into(),
                serde_json::to_string(&record).unwrap_or_default(),
            );
        }
        let containers_statuses = self
            .sandboxes
            .list_containers(Some(&id))
            .iter()
            .map(container_status_of)
            .collect();
        Ok(Response::new(cri::PodSandboxStatusResponse {
            status: Some(pod_status_of(&record)),
            info,
            containers_statuses,
            timestamp: crate::now_nanos(),
        }))
    }

    async fn list_pod_sandbox(
        &self,
        request: Request<cri::ListPodSandboxRequest>,
    ) -> Result<Response<cri::ListPodSandboxResponse>, Status> {
        let filter = request.into_inner().filter;
        let items = self
            .sandboxes
            .list_pods()
            .iter()
            .filter(|p| {
                let Some(f) = &filter else { return true };
                (f.id.is_empty() || p.id().starts_with(&f.id))
                    && f.state
                        .as_ref()
                        .is_none_or(|s| s.state == pod_state(p.state))
                    && labels_match(&f.label_selector, &p.spec.labels)
            })
            .map(|p| cri::PodSandbox {
                id: p.id().to_owned(),
                metadata: Some(pod_metadata(p)),
                state: pod_state(p.state),
                created_at: p.created_at_nanos,
                labels: to_hash(&p.spec.labels),
                annotations: to_hash(&p.spec.annotations),
                runtime_handler: p.spec.runtime_handler.clone(),
            })
            .collect();
        Ok(Response::new(cri::ListPodSandboxResponse { items }))
    }

    async fn create_container(
        &self,
        request: Request<cri::CreateContainerRequest>,
    ) -> Result<Response<cri::CreateContainerResponse>, Status> {
        let req = request.into_inner();
        let pod_id = self.resolve_pod(&req.pod_sandbox_id)?;
        let config = req
            .config
            .ok_or_else(|| Status::invalid_argument("container config is missing"))?;
        let md = config
            .metadata
            .clone()
            .ok_or_else(|| Status::invalid_argument("container metadata is missing"))?;
        if md.name.is_empty() {
            return Err(Status::invalid_argument("container name is empty"));
        }
        let taken = self
            .sandboxes
            .list_containers(Some(&pod_id))
            .iter()
            .any(|c| c.name == md.name && c.attempt == md.attempt);
        if taken {
            return Err(Status::already_exists(format!(
                "container {} (attempt {}) exists in pod {pod_id}",
                md.name, md.attempt
            )));
        }
        let image_name = config
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .filter(|i| !i.is_empty())
            .ok_or_else(|| Status::invalid_argument("container image is empty"))?;
        let record = self.images.status(&image_name).ok_or_else(|| {
            Status::not_found(format!("image {image_name} is not present: pull it first"))
        })?;
        let pod = self.sandboxes.pod_status(&pod_id).map_err(status)?;
        let oci = crate::spec::build(&config, &record.config, &pod.spec.hostname)?;
        let files = config
            .mounts
            .iter()
            .enumerate()
            .map(|(i, m)| {
                if m.container_path.is_empty() || m.host_path.is_empty() {
                    return Err(Status::invalid_argument(
                        "a mount needs a container path and a host path",
                    ));
                }
                Ok(sandbox::FileToCopy {
                    // Each mount's copy in its own place of the container's file store.
                    guest_relative_path: format!("mount{i}"),
                    host_source: m.host_path.clone().into(),
                    mode: None,
                    read_only: m.readonly,
                    container_path: m.container_path.clone(),
                })
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let id = new_id();
        let images = self.images.clone();
        let sandboxes = self.sandboxes.clone();
        let log_path = (!config.log_path.is_empty()).then(|| {
            let dir = pod.spec.log_directory.clone().unwrap_or_default();
            dir.join(&config.log_path)
        });
        let spec = sandbox::ContainerSpec {
            id: id.clone(),
            name: md.name.clone(),
            attempt: md.attempt,
            image_ref: image_name,
            image_id: record.id.to_string(),
            rootfs_disk: Default::default(),
            oci_spec_json: oci,
            files,
            log_path,
            tty: config.tty,
            stdin: config.stdin,
            stop_signal: None,
            labels: to_btree(&config.labels),
            annotations: to_btree(&config.annotations),
        };
        let image_id = record.id.clone();
        blocking(move || {
            let disk = images.rootfs(&image_id).map_err(crate::images::status)?;
            let spec = sandbox::ContainerSpec {
                rootfs_disk: disk.path,
                ..spec
            };
            sandboxes.create_container(&pod_id, spec).map_err(status)
        })
        .await?;
        Ok(Response::new(cri::CreateContainerResponse {
            container_id: id,
        }))
    }

    async fn start_container(
        &self,
        request: Request<cri::StartContainerRequest>,
    ) -> Result<Response<cri::StartContainerResponse>, Status> {
        let id = self.resolve_container(&request.into_inner().container_id)?;
        let sandboxes = self.sandboxes.clone();
        blocking(move || sandboxes.start_container(&id).map(drop).map_err(status)).await?;
        Ok(Response::new(cri::StartContainerResponse {}))
    }

    async fn stop_container(
        &self,
        request: Request<cri::StopContainerRequest>,
    ) -> Result<Response<cri::StopContainerResponse>, Status> {
        let req = request.into_inner();
        let id = self.resolve_container(&req.container_id)?;
        let timeout = Duration::from_secs(req.timeout.max(0) as u64);
        let sandboxes = self.sandboxes.clone();
        blocking(move || sandboxes.stop_container(&id, timeout).map_err(status)).await?;
        Ok(Response::new(cri::StopContainerResponse {}))
    }

    async fn remove_container(
        &self,
        request: Request<cri::RemoveContainerRequest>,
    ) -> Result<Response<cri::RemoveContainerResponse>, Status> {
        let id = request.into_inner().container_id;
        if id.is_empty() {
            return Err(Status::invalid_argument("container id is empty"));
        }
        let Ok(id) = self.resolve_container(&id) else {
            return Ok(Response::new(cri::RemoveContainerResponse {}));
        };
        let sandboxes = self.sandboxes.clone();
        blocking(move || sandboxes.remove_container(&id).map(drop).map_err(status)).await?;
        Ok(Response::new(cri::RemoveContainerResponse {}))
    }

    async fn list_containers(
        &self,
        request: Request<cri::ListContainersRequest>,
    ) -> Result<Response<cri::ListContainersResponse>, Status> {
        let filter = request.into_inner().filter;
        let containers = self
            .sandboxes
            .list_containers(None)
            .iter()
            .filter(|c| c.state != ContainerState::Creating)
            .filter(|c| {
                let Some(f) = &filter else { return true };
                (f.id.is_empty() || c.id.starts_with(&f.id))
                    && (f.pod_sandbox_id.is_empty() || c.pod_id.starts_with(&f.pod_sandbox_id))
                    && f.state
                        .as_ref()
                        .is_none_or(|s| s.state == container_state(c.state))
                    && labels_match(&f.label_selector, &c.labels)
            })
            .map(container_of)
            .collect();
        Ok(Response::new(cri::ListContainersResponse { containers }))
    }

    async fn container_status(
        &self,
        request: Request<cri::ContainerStatusRequest>,
    ) -> Result<Response<cri::ContainerStatusResponse>, Status> {
        let req = request.into_inner();
        let id = self.resolve_container(&req.container_id)?;
        let r = self.sandboxes.container_status(&id).map_err(status)?;
        let mut info = HashMap::new();
        if req.verbose {
            info.insert("info".into(), serde_json::to_string(&r).unwrap_or_default());
        }
        Ok(Response::new(cri::ContainerStatusResponse {
            status: Some(container_status_of(&r)),
            info,
        }))
    }

    async fn update_container_resources(
        &self,
        request: Request<cri::UpdateContainerResourcesRequest>,
    ) -> Result<Response<cri::UpdateContainerResourcesResponse>, Status> {
        let req = request.into_inner();
        let id = self.resolve_container(&req.container_id)?;
        let json = crate::spec::resources(req.linux.as_ref());
        let bytes = serde_json::to_vec(&json).map_err(|e| Status::internal(e.to_string()))?;
        let sandboxes = self.sandboxes.clone();
        blocking(move || {
            sandboxes
                .update_container_resources(&id, &bytes)
                .map_err(status)
        })
        .await?;
        Ok(Response::new(cri::UpdateContainerResourcesResponse {}))
    }

    async fn reopen_container_log(
        &self,
        request: Request<cri::ReopenContainerLogRequest>,
    ) -> Result<Response<cri::ReopenContainerLogResponse>, Status> {
        let id = self.resolve_container(&request.into_inner().container_id)?;
        let sandboxes = self.sandboxes.clone();
        blocking(move || sandboxes.reopen_log(&id).map_err(status)).await?;
        Ok(Response::new(cri::ReopenContainerLogResponse {}))
    }

    async fn exec_sync(
        &self,
        request: Request<cri::ExecSyncRequest>,
    ) -> Result<Response<cri::ExecSyncResponse>, Status> {
        let req = request.into_inner();
        let id = self.resolve_container(&req.container_id)?;
        if req.cmd.is_empty() || req.cmd[0].is_empty() {
            return Err(Status::invalid_argument("exec command is empty"));
        }
        let timeout = (req.timeout > 0).then(|| Duration::from_secs(req.timeout as u64));
        let sandboxes = self.sandboxes.clone();
        let r =
            blocking(move || sandboxes.exec_sync(&id, &req.cmd, timeout).map_err(status)).await?;
        Ok(Response::new(cri::ExecSyncResponse {
            stdout: r.stdout,
            stderr: r.stderr,
            exit_code: r.exit_code,
        }))
    }

    async fn exec(
        &self,
        _request: Request<cri::ExecRequest>,
    ) -> Result<Response<cri::ExecResponse>, Status> {
        Err(Status::unimplemented(
            "interactive exec needs the CRI streaming server, which hyperd does not have yet; \
             ExecSync works",
        ))
    }

    async fn attach(
        &self,
        _request: Request<cri::AttachRequest>,
    ) -> Result<Response<cri::AttachResponse>, Status> {
        Err(Status::unimplemented(
            "attach needs the CRI streaming server, which hyperd does not have yet",
        ))
    }

    async fn port_forward(
        &self,
        _request: Request<cri::PortForwardRequest>,
    ) -> Result<Response<cri::PortForwardResponse>, Status> {
        Err(Status::unimplemented(
            "port forwarding needs the CRI streaming server, which hyperd does not have yet",
        ))
    }

    async fn container_stats(
        &self,
        request: Request<cri::ContainerStatsRequest>,
    ) -> Result<Response<cri::ContainerStatsResponse>, Status> {
        let id = self.resolve_container(&request.into_inner().container_id)?;
        let record = self.sandboxes.container_status(&id).map_err(status)?;
        let sandboxes = self.sandboxes.clone();
        let stats = blocking(move || sandboxes.container_stats(&id).map_err(status)).await?;
        Ok(Response::new(cri::ContainerStatsResponse {
            stats: Some(container_stats_of(&record, &stats)),
        }))
    }

    async fn list_container_stats(
        &self,
        request: Request<cri::ListContainerStatsRequest>,
    ) -> Result<Response<cri::ListContainerStatsResponse>, Status> {
        let filter = request.into_inner().filter;
        let records: Vec<ContainerRecord> = self
            .sandboxes
            .list_containers(None)
            .into_iter()
            .filter(|c| c.state == ContainerState::Running)
            .filter(|c| {
                let Some(f) = &filter else { return true };
                (f.id.is_empty() || c.id.starts_with(&f.id))
                    && (f.pod_sandbox_id.is_empty() || c.pod_id.starts_with(&f.pod_sandbox_id))
                    && labels_match(&f.label_selector, &c.labels)
            })
            .collect();
        let sandboxes = self.sandboxes.clone();
        let stats = blocking(move || {
            Ok(records
                .iter()
                .filter_map(|r| {
                    sandboxes
                        .container_stats(&r.id)
                        .ok()
                        .map(|s| container_stats_of(r, &s))
                })
                .collect::<Vec<_>>())
        })
        .await?;
        Ok(Response::new(cri::ListContainerStatsResponse { stats }))
    }

    async fn pod_sandbox_stats(
        &self,
        request: Request<cri::PodSandboxStatsRequest>,
    ) -> Result<Response<cri::PodSandboxStatsResponse>, Status> {
        let id = self.resolve_pod(&request.into_inner().pod_sandbox_id)?;
        let record = self.sandboxes.pod_status(&id).map_err(status)?;
        let containers = self.sandboxes.list_containers(Some(&id));
        let sandboxes = self.sandboxes.clone();
        let stats = blocking(move || sandboxes.pod_stats(&id).map_err(status)).await?;
        Ok(Response::new(cri::PodSandboxStatsResponse {
            stats: Some(pod_stats_of(&record, &containers, &stats)),
        }))
    }

    async fn list_pod_sandbox_stats(
        &self,
        request: Request<cri::ListPodSandboxStatsRequest>,
    ) -> Result<Response<cri::ListPodSandboxStatsResponse>, Status> {
        let filter = request.into_inner().filter;
        let pods: Vec<PodRecord> = self
            .sandboxes
            .list_pods()
            .into_iter()
            .filter(|p| p.state == PodState::Ready)
            .filter(|p| {
                let Some(f) = &filter else { return true };
                (f.id.is_empty() || p.id().starts_with(&f.id))
                    && labels_match(&f.label_selector, &p.spec.labels)
            })
            .collect();
        let sandboxes = self.sandboxes.clone();
        let stats = blocking(move || {
            Ok(pods
                .iter()
                .filter_map(|p| {
                    let containers = sandboxes.list_containers(Some(p.id()));
                    sandboxes
                        .pod_stats(p.id())
                        .ok()
                        .map(|s| pod_stats_of(p, &containers, &s))
                })
                .collect::<Vec<_>>())
        })
        .await?;
        Ok(Response::new(cri::ListPodSandboxStatsResponse { stats }))
    }

    async fn update_runtime_config(
        &self,
        _request: Request<cri::UpdateRuntimeConfigRequest>,
    ) -> Result<Response<cri::UpdateRuntimeConfigResponse>, Status> {
        // The pod CIDR belongs to the CNI configuration, which hyperd reads from disk.
        Ok(Response::new(cri::UpdateRuntimeConfigResponse {}))
    }

    async fn status(
        &self,
        request: Request<cri::StatusRequest>,
    ) -> Result<Response<cri::StatusResponse>, Status> {
        let verbose = request.into_inner().verbose;
        let runtime_ready = cri::RuntimeCondition {
            r#type: "RuntimeReady".into(),
            status: true,
            reason: String::new(),
            message: String::new(),
        };
        let network = self.network.clone();
        let net = blocking(move || Ok(network.status())).await?;
        let network_ready = cri::RuntimeCondition {
            r#type: "NetworkReady".into(),
            status: net.is_ok(),
            reason: if net.is_ok() {
                String::new()
            } else {
                "NetworkPluginNotReady".into()
            },
            message: net.err().unwrap_or_default(),
        };
        let mut info = HashMap::new();
        if verbose {
            info.insert("config".into(), format!("{:?}", self.sandboxes.config()));
        }
        Ok(Response::new(cri::StatusResponse {
            status: Some(cri::RuntimeStatus {
                conditions: vec![runtime_ready, network_ready],
            }),
            info,
            ..Default::default()
        }))
    }

    async fn checkpoint_container(
        &self,
        _request: Request<cri::CheckpointContainerRequest>,
    ) -> Result<Response<cri::CheckpointContainerResponse>, Status> {
        Err(Status::unimplemented("checkpointing is not supported"))
    }

    type GetContainerEventsStream = EventStream;

    async fn get_container_events(
        &self,
        _request: Request<cri::GetEventsRequest>,
    ) -> Result<Response<Self::GetContainerEventsStream>, Status> {
        let rx = self.sandboxes.subscribe();
        // Weak: a subscriber must not keep the manager alive past hyperd's shutdown (its drop
        // drains the log forwarders); the channel closes with it and the thread ends.
        let weak = Arc::downgrade(&self.sandboxes);
        let (tx, out) = tokio::sync::mpsc::channel(256);
        std::thread::Builder::new()
            .name("cri-events".into())
            .spawn(move || {
                while let Ok(ev) = rx.recv() {
                    let Some(sandboxes) = weak.upgrade() else {
                        break;
                    };
                    let pod = sandboxes.pod_status(&ev.pod_id).ok();
                    let (container_id, statuses) = match &ev.container_id {
                        Some(cid) => (
                            cid.clone(),
                            sandboxes
                                .container_status(cid)
                                .ok()
                                .map(|r| vec![container_status_of(&r)])
                                .unwrap_or_default(),
                        ),
                        None => (ev.pod_id.clone(), Vec::new()),
                    };
                    let kind = match ev.kind {
                        sandbox::EventKind::Created => {
                            cri::ContainerEventType::ContainerCreatedEvent
                        }
                        sandbox::EventKind::Started => {
                            cri::ContainerEventType::ContainerStartedEvent
                        }
                        sandbox::EventKind::Stopped => {
                            cri::ContainerEventType::ContainerStoppedEvent
                        }
                        sandbox::EventKind::Deleted => {
                            cri::ContainerEventType::ContainerDeletedEvent
                        }
                    };
                    let resp = cri::ContainerEventResponse {
                        container_id,
                        container_event_type: kind as i32,
                        created_at: ev.timestamp_nanos,
                        pod_sandbox_status: pod.as_ref().map(pod_status_of),
                        containers_statuses: statuses,
                    };
                    drop(sandboxes);
                    if tx.blocking_send(Ok(resp)).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| Status::internal(format!("event thread: {e}")))?;
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }

    async fn list_metric_descriptors(
        &self,
        _request: Request<cri::ListMetricDescriptorsRequest>,
    ) -> Result<Response<cri::ListMetricDescriptorsResponse>, Status> {
        Ok(Response::new(cri::ListMetricDescriptorsResponse::default()))
    }

    async fn list_pod_sandbox_metrics(
        &self,
        _request: Request<cri::ListPodSandboxMetricsRequest>,
    ) -> Result<Response<cri::ListPodSandboxMetricsResponse>, Status> {
        Ok(Response::new(cri::ListPodSandboxMetricsResponse::default()))
    }

    async fn runtime_config(
        &self,
        _request: Request<cri::RuntimeConfigRequest>,
    ) -> Result<Response<cri::RuntimeConfigResponse>, Status> {
        let driver = if self.cgroup_driver == "systemd" {
            cri::CgroupDriver::Systemd
        } else {
            cri::CgroupDriver::Cgroupfs
        };
        Ok(Response::new(cri::RuntimeConfigResponse {
            linux: Some(cri::LinuxRuntimeConfiguration {
                cgroup_driver: driver as i32,
            }),
        }))
    }
}

fn u64v(value: u64) -> Option<cri::UInt64Value> {
    Some(cri::UInt64Value { value })
}

fn container_stats_of(
    r: &ContainerRecord,
    s: &sandbox::stats::ContainerStats,
) -> cri::ContainerStats {
    cri::ContainerStats {
        attributes: Some(cri::ContainerAttributes {
            id: r.id.clone(),
            metadata: Some(container_metadata(r)),
            labels: to_hash(&r.labels),
            annotations: to_hash(&r.annotations),
        }),
        cpu: Some(cri::CpuUsage {
            timestamp: s.timestamp_nanos,
            usage_core_nano_seconds: u64v(s.cpu_usage_nanos),
            usage_nano_cores: None,
        }),
        memory: Some(cri::MemoryUsage {
            timestamp: s.timestamp_nanos,
            working_set_bytes: u64v(s.memory_working_set_bytes),
            available_bytes: (s.memory_limit_bytes > 0)
                .then(|| {
                    s.memory_limit_bytes
                        .saturating_sub(s.memory_working_set_bytes)
                })
                .and_then(u64v),
            usage_bytes: u64v(s.memory_usage_bytes),
            rss_bytes: u64v(s.memory_rss_bytes),
            page_faults: None,
            major_page_faults: None,
        }),
        writable_layer: None,
        swap: None,
    }
}

fn pod_stats_of(
    p: &PodRecord,
    containers: &[ContainerRecord],
    s: &sandbox::stats::PodStats,
) -> cri::PodSandboxStats {
    let ts = s.timestamp_nanos;
    let interfaces: Vec<cri::NetworkInterfaceUsage> = s
        .interfaces
        .iter()
        .map(|i| cri::NetworkInterfaceUsage {
            name: i.name.clone(),
            rx_bytes: u64v(i.rx_bytes),
            rx_errors: u64v(i.rx_errors),
            tx_bytes: u64v(i.tx_bytes),
            tx_errors: u64v(i.tx_errors),
        })
        .collect();
    let stats: Vec<cri::ContainerStats> = s
        .containers
        .iter()
        .filter_map(|cs| {
            containers
                .iter()
                .find(|c| c.id == cs.container_id)
                .map(|c| container_stats_of(c, cs))
        })
        .collect();
    cri::PodSandboxStats {
        attributes: Some(cri::PodSandboxAttributes {
            id: p.id().to_owned(),
            metadata: Some(pod_metadata(p)),
            labels: to_hash(&p.spec.labels),
            annotations: to_hash(&p.spec.annotations),
        }),
        linux: Some(cri::LinuxPodSandboxStats {
            // The pod's cost on the node: its containers plus the VMM process.
            cpu: Some(cri::CpuUsage {
                timestamp: ts,
                usage_core_nano_seconds: u64v(s.vmm_cpu_usage_nanos),
                usage_nano_cores: None,
            }),
            memory: Some(cri::MemoryUsage {
                timestamp: ts,
                working_set_bytes: u64v(s.vmm_rss_bytes),
                usage_bytes: u64v(s.vmm_rss_bytes),
                rss_bytes: u64v(s.vmm_rss_bytes),
                ..Default::default()
            }),
            network: Some(cri::NetworkUsage {
                timestamp: ts,
                default_interface: interfaces.first().cloned(),
                interfaces,
            }),
            process: Some(cri::ProcessUsage {
                timestamp: ts,
                process_count: u64v(s.containers.iter().map(|c| c.pids).sum()),
            }),
            containers: stats,
        }),
        windows: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_64_hex() {
        let a = new_id();
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, new_id());
    }

    #[test]
    fn port_mapping_conversion() {
        let ok = port_mappings(&[cri::PortMapping {
            protocol: cri::Protocol::Tcp as i32,
            container_port: 80,
            host_port: 8080,
            host_ip: String::new(),
        }])
        .unwrap();
        assert_eq!(ok[0].host_port, 8080);
        // A container port without a host port is not a mapping.
        assert!(port_mappings(&[cri::PortMapping {
            container_port: 80,
            ..Default::default()
        }])
        .unwrap()
        .is_empty());
        assert!(port_mappings(&[cri::PortMapping {
            container_port: 70000,
            host_port: 1,
            ..Default::default()
        }])
        .is_err());
    }

    #[test]
    fn pod_spec_needs_metadata() {
        let c = cri::PodSandboxConfig::default();
        assert_eq!(
            Runtime::pod_spec("x", &c, "").unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        let c = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: "p".into(),
                uid: "u".into(),
                namespace: "default".into(),
                attempt: 0,
            }),
            linux: Some(cri::LinuxPodSandboxConfig {
                resources: Some(cri::LinuxContainerResources {
                    cpu_quota: 150000,
                    cpu_period: 100000,
                    memory_limit_in_bytes: 256 << 20,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let s = Runtime::pod_spec("x", &c, "hyper").unwrap();
        assert_eq!(s.resources.cpu_quota_us, Some(150000));
        assert_eq!(s.resources.memory_limit_bytes, Some(256 << 20));
        assert_eq!(s.runtime_handler, "hyper");
    }
}
