//! `containerd-shim-hyper-v1`: containerd's shim v2 for `runtime_type = "io.containerd.hyper.v1"`.
//!
//! One shim process and one microVM per pod: CRI containers find their sandbox's shim through
//! the `io.kubernetes.cri.sandbox-id` annotation (the socket address is derived from it, as
//! runc v2 groups a pod's containers); a container without CRI annotations gets a shim and a
//! VM of its own. Configuration: see [`config`].

mod bundle;
mod config;
mod error;
mod rootfs;
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
        let address = spawn(opts, &grouping, Vec::new()).await?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        // The shim died: its VMM dies with the pod's state removal by the next shim or by
        // hand; report the task as killed.
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

#[tokio::main]
async fn main() {
    run::<HyperShim>(RUNTIME_ID, None).await;
}
