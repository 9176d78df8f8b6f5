//! `containerd-shim-hyper-v1`: containerd's shim v2 for `runtime_type = "io.containerd.hyper.v1"`.
//!
//! One shim process and one microVM per pod: CRI containers find their sandbox's shim through
//! the `io.kubernetes.cri.sandbox-id` annotation (the socket address is derived from it, as
//! runc v2 groups a pod's containers); a container without CRI annotations gets a shim and a
//! VM of its own. Configuration: see [`config`].
//!
//! Works with containerd 1.6 (proven end to end by `e2e/tests/shim.rs`) and is written to work
//! with later versions: `start` answers with the bare socket address and the daemon serves the
//! Task service as both `containerd.task.v2.Task` and `containerd.task.v3.Task` (see
//! [`server`]). The rootfs: containerd's overlay snapshot becomes a cached read-only ext4 disk
//! ([`rootfs`]); the writable layer is the guest's. stdio: containerd's FIFOs are fed from the
//! agent's buffered streams ([`stdio`]). After a shim crash containerd runs `delete`, which
//! stops the pods the dead shim left.

mod bundle;
mod config;
mod error;
mod rootfs;
mod server;
mod service;
mod stdio;
mod task;

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::{run, spawn, ExitSignal, Shim};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, Error, Flags, StartOpts};
use containerd_shim_protos::api::DeleteResponse;

use crate::config::ShimConfig;
use crate::service::Service;
use crate::task::{Kind, SANDBOX_ID};

/// containerd's name for this runtime.
const RUNTIME_ID: &str = "io.containerd.hyper.v1";

struct HyperShim {
    namespace: String,
    id: String,
    exit: Arc<ExitSignal>,
}

/// The short per-shim directory name (the VMM limits socket path lengths).
fn shim_dir(namespace: &str, id: &str) -> String {
    let d = image::digest::Digest::sha256(format!("{namespace}/{id}").as_bytes());
    d.hex().chars().take(8).collect()
}

#[async_trait]
impl Shim for HyperShim {
    type T = Service;

    async fn new(_runtime_id: &str, args: &Flags, config: &mut Config) -> Self {
        // The sandbox manager supervises (and reaps) its VMMs itself.
        config.no_reaper = true;
        HyperShim {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        // containerd runs `start` in the bundle directory.
        let grouping = bundle::read_spec(std::path::Path::new("."))
            .ok()
            .map(|spec| bundle::annotations(&spec))
            .and_then(|a| match Kind::from_annotations(&a) {
                Kind::Container => a
                    .get(SANDBOX_ID)
                    .and_then(|v| v.as_str())
                    .map(str::to_owned),
                _ => None,
            })
            .unwrap_or_else(|| opts.id.clone());
        let legacy = opts.containerd_version.is_empty();
        let address = spawn(opts, &grouping, Vec::new()).await?;
        // containerd 1.6 finds a running shim again after its own restart through the
        // bundle's `address` file, which the shim writes.
        if let Err(err) = std::fs::write("address", &address) {
            return Err(Error::IoError {
                context: "writing the bundle's address file".into(),
                err,
            });
        }
        if legacy {
            // containerd before 2.3 reads `start`'s stdout as the bare socket address (1.6
            // dials whatever it reads; 1.7 and 2.x also take the JSON the library would write,
            // 1.6 does not), so answer in the form all of them accept, and exit before the
            // library writes its own answer.
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            if let Err(err) = out.write_all(address.as_bytes()).and_then(|()| out.flush()) {
                return Err(Error::IoError {
                    context: "writing the shim address".into(),
                    err,
                });
            }
            std::process::exit(0);
        }
        Ok(address)
    }

    async fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        // containerd runs `delete` after the shim's connection closed: normally the shim has
        // removed its pods already; after a crash their VMMs still run, owned by nobody.
        let dir = shim_dir(&self.namespace, &self.id);
        let cleaned = tokio::task::spawn_blocking(move || {
            remove_orphans(&dir);
            // containerd runs `delete` in the bundle, whose `address` names the socket.
            server::remove_dead_socket(std::path::Path::new("address"));
        })
        .await;
        if let Err(e) = cleaned {
            log::warn!("cleaning up after the shim: {e}");
        }
        // Report the task as killed.
        let mut r = DeleteResponse::new();
        r.exit_status = 137;
        let now = sandbox::now_nanos();
        r.exited_at = containerd_shim_protos::protobuf::MessageField::some(
            containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp {
                seconds: now / 1_000_000_000,
                nanos: i32::try_from(now % 1_000_000_000).unwrap_or(0),
                ..Default::default()
            },
        );
        Ok(r)
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
        let cfg = ShimConfig::load().unwrap_or_default();
        let dir = shim_dir(&self.namespace, &self.id);
        for root in [cfg.state_dir.join(&dir), cfg.log_dir.join(&dir)] {
            let _ = std::fs::remove_dir_all(root);
        }
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        let cfg = ShimConfig::load();
        let dir = shim_dir(&self.namespace, &self.id);
        let (state, logs) = match &cfg {
            Ok(c) => (c.state_dir.join(&dir), c.log_dir.join(&dir)),
            Err(_) => (
                PathBuf::from("/run/hypershim").join(&dir),
                PathBuf::from("/tmp"),
            ),
        };
        Service::new(
            cfg,
            state,
            logs,
            self.namespace.clone(),
            publisher,
            self.exit.clone(),
        )
    }
}

/// Stops and removes the pods a dead shim left under its directory `dir`, then the
/// directory and the shim's logs.
fn remove_orphans(dir: &str) {
    let Ok(cfg) = ShimConfig::load() else { return };
    let state = cfg.state_dir.join(dir);
    let logs = cfg.log_dir.join(dir);
    if state.is_dir() {
        let mut mc = sandbox::ManagerConfig::new(cfg.vmm, cfg.kernel, cfg.initrd);
        mc.state_root = state.clone();
        mc.log_dir = logs.clone();
        match sandbox::SandboxManager::new(mc) {
            Ok(mgr) => {
                if let Err(e) = mgr.recover() {
                    log::warn!("recovering the pods under {}: {e}", state.display());
                }
                for pod in mgr.list_pods() {
                    match mgr.remove_pod(pod.id()) {
                        Ok(_) => log::info!("removed pod {} of a dead shim", pod.id()),
                        Err(e) => log::warn!("removing pod {}: {e}", pod.id()),
                    }
                }
            }
            Err(e) => log::warn!("cannot clean up {}: {e}", state.display()),
        }
    }
    for d in [state, logs] {
        if let Err(e) = std::fs::remove_dir_all(&d) {
            if e.kind() != std::io::ErrorKind::NotFound {
                log::warn!("removing {}: {e}", d.display());
            }
        }
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let flags = match containerd_shim::parse(&args) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{RUNTIME_ID}: {e}");
            std::process::exit(1);
        }
    };
    if flags.version {
        println!(
            "{RUNTIME_ID} containerd-shim-hyper-v1 {}",
            env!("CARGO_PKG_VERSION")
        );
        return;
    }
    // `start`, `delete` and `-info` are the library's; the daemon is ours.
    if flags.info || matches!(flags.action.as_str(), "start" | "delete") {
        run::<HyperShim>(RUNTIME_ID, None).await;
        return;
    }
    if let Err(e) = server::serve(RUNTIME_ID, flags).await {
        log::error!("{RUNTIME_ID}: {e}");
        eprintln!("{RUNTIME_ID}: {e}");
        std::process::exit(1);
    }
}
