//! The shim's daemon: the ttrpc server containerd talks to.
//!
//! The library's bootstrap serves only `containerd.task.v3.Task` (containerd 2.x); containerd
//! 1.6 and 1.7 call the same messages under `containerd.task.v2.Task`. This daemon serves the
//! one Task service under both names; the `start` and `delete` actions stay the library's.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use containerd_shim::asynchronous::Shim;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, Error, Flags};
use containerd_shim_protos::shim_async::create_task;
use containerd_shim_protos::ttrpc::r#async::transport::Listener;
use containerd_shim_protos::ttrpc::r#async::Server;

use crate::HyperShim;

/// The Task service names containerd versions call.
const TASK_V2: &str = "containerd.task.v2.Task";
const TASK_V3: &str = "containerd.task.v3.Task";

/// containerd's environment variable with its ttrpc address (for events).
const TTRPC_ADDRESS: &str = "TTRPC_ADDRESS";

fn io_error(context: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |err| Error::IoError {
        context: context.to_owned(),
        err,
    }
}

/// Runs the daemon until the shim is shut down.
pub async fn serve(runtime_id: &str, flags: Flags) -> Result<(), Error> {
    if flags.socket.is_empty() {
        return Err(Error::InvalidArgument("-socket is missing".into()));
    }
    // Logs go to the `log` FIFO containerd opened in the bundle directory.
    containerd_shim::logger::init(flags.debug, "info", &flags.namespace, &flags.id)?;
    let Some(listener) = listen(&flags.socket)? else {
        // A shim for this group already serves the socket (a pod's second container).
        tokio::fs::write("address", &flags.socket)
            .await
            .map_err(io_error("writing the address file"))?;
        server_started();
        return Ok(());
    };
    let ttrpc_address = std::env::var(TTRPC_ADDRESS)?;
    let publisher = RemotePublisher::new(&ttrpc_address).await?;
    let mut config = Config::default();
    let mut shim = HyperShim::new(runtime_id, &flags, &mut config).await;
    let service: Arc<dyn containerd_shim_protos::shim_async::Task + Send + Sync> =
        Arc::new(shim.create_task_service(publisher).await);
    let mut services = create_task(service.clone());
    let mut v2 = create_task(service);
    if let Some(s) = v2.remove(TASK_V3) {
        services.insert(TASK_V2.to_owned(), s);
    }
    let mut server = Server::new()
        .add_listener(listener)
        .register_service(services);
    server.start().await?;
    server_started();
    log::info!("shim serving {} for {}", flags.socket, flags.id);
    shim.wait().await;
    log::info!("shim shutting down");
    server.shutdown().await.unwrap_or_default();
    if let Some(path) = flags.socket.strip_prefix("unix://") {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// Binds `address` (`unix:///path`), or `None` when a live shim already serves it.
fn listen(address: &str) -> Result<Option<Listener>, Error> {
    let path = address
        .strip_prefix("unix://")
        .filter(|p| p.starts_with('/'))
        .ok_or_else(|| Error::InvalidArgument(format!("unsupported socket {address}")))?;
    if let Some(dir) = Path::new(path).parent() {
        std::fs::create_dir_all(dir).map_err(io_error("creating the socket directory"))?;
    }
    match Listener::bind(address) {
        Ok(l) => return Ok(Some(l)),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {}
        Err(err) => {
            return Err(Error::IoError {
                context: format!("binding {address}"),
                err,
            })
        }
    }
    if UnixStream::connect(path).is_ok() {
        return Ok(None);
    }
    // A dead shim's socket.
    std::fs::remove_file(path).map_err(io_error("removing a stale socket"))?;
    Listener::bind(address)
        .map(Some)
        .map_err(|err| Error::IoError {
            context: format!("binding {address}"),
            err,
        })
}

/// Removes the socket named in the file `address_file` unless a shim still serves it.
pub fn remove_dead_socket(address_file: &Path) {
    let Ok(address) = std::fs::read_to_string(address_file) else {
        return;
    };
    let Some(path) = address.trim().strip_prefix("unix://") else {
        return;
    };
    if UnixStream::connect(path).is_err() {
        let _ = std::fs::remove_file(path);
    }
}

/// Tells the `start` action the server is up: it reads our stdout until EOF.
fn server_started() {
    // SAFETY: dup2 on the process's own standard descriptors; no Rust object owns fd 1.
    if unsafe { libc::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO) } < 0 {
        log::warn!("closing stdout: {}", std::io::Error::last_os_error());
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    #[tokio::test]
    async fn binds_joins_a_live_shim_and_replaces_a_dead_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s/shim.sock");
        let address = format!("unix://{}", path.display());
        let first = listen(&address).unwrap();
        assert!(first.is_some(), "a fresh socket is bound");
        // The socket answers: a second shim of the same group defers to it.
        assert!(listen(&address).unwrap().is_none());
        drop(first);
        // Only the file is left: it is replaced.
        assert!(path.exists());
        assert!(listen(&address).unwrap().is_some());
        assert!(listen("tcp://127.0.0.1:1").is_err());
        assert!(listen("unix://relative").is_err());
    }

    #[test]
    fn removes_only_dead_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("shim.sock");
        let file = dir.path().join("address");
        std::fs::write(&file, format!("unix://{}", sock.display())).unwrap();
        let live = UnixListener::bind(&sock).unwrap();
        remove_dead_socket(&file);
        assert!(sock.exists(), "a served socket stays");
        drop(live);
        remove_dead_socket(&file);
        assert!(!sock.exists(), "a dead socket goes");
        remove_dead_socket(&dir.path().join("missing"));
    }

    #[test]
    fn the_library_names_the_task_service_v3() {
        // serve() relies on it to add the v2 name containerd 1.6 calls.
        struct Nothing;
        impl containerd_shim_protos::shim_async::Task for Nothing {}
        let services = create_task(Arc::new(Nothing));
        assert!(services.contains_key(TASK_V3), "{:?}", services.keys());
    }
}
