//! `hyperd`: the CRI server. `hyperd [--config /etc/hyperd/config.toml] [--socket PATH]`.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cri::config::Config;
use k8s_cri::v1::image_service_server::ImageServiceServer;
use k8s_cri::v1::runtime_service_server::RuntimeServiceServer;

const DEFAULT_CONFIG: &str = "/etc/hyperd/config.toml";

fn parse_args() -> anyhow::Result<(PathBuf, bool, Option<PathBuf>)> {
    let mut config = PathBuf::from(DEFAULT_CONFIG);
    let mut explicit = false;
    let mut socket = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--config" => {
                config = args.next().context("--config needs a path")?.into();
                explicit = true;
            }
            "--socket" => socket = Some(args.next().context("--socket needs a path")?.into()),
            "-h" | "--help" => {
                println!("usage: hyperd [--config {DEFAULT_CONFIG}] [--socket PATH]");
                std::process::exit(0);
            }
            other => anyhow::bail!("unknown argument {other:?}"),
        }
    }
    Ok((config, explicit, socket))
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let (config_path, explicit, socket) = parse_args()?;
    let mut config = Config::load(&config_path, explicit)?;
    if let Some(s) = socket {
        config.socket = s;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(256)
        .build()
        .context("starting the async runtime")?;
    rt.block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let images = Arc::new(
        image::ImageStore::open(
            &config.image_dir,
            &image::PullConfig {
                insecure_registries: config.insecure_registries.clone(),
                mirrors: config.registry_mirrors.clone(),
            },
        )
        .with_context(|| format!("opening the image store {}", config.image_dir.display()))?,
    );
    preload_images(&images, &config.preload_images).await;
    let network = Arc::new(network::NetworkManager::new(network::NetworkConfig {
        conf_dir: config.cni_conf_dir.clone(),
        bin_dirs: config.cni_bin_dirs.clone(),
        netns_dir: config.netns_dir.clone(),
        state_dir: config.network_state_dir.clone(),
        plugin_timeout: Duration::from_secs(60),
    }));
    let mut mc = sandbox::ManagerConfig::new(
        config.vmm.clone(),
        config.kernel.clone(),
        config.initrd.clone(),
    );
    mc.state_root = config.state_dir.clone();
    mc.log_dir = config.vm_log_dir.clone();
    mc.kernel_cmdline_extra = config.kernel_cmdline.clone();
    mc.default_vcpus = config.default_vcpus;
    mc.default_memory_mib = config.default_memory_mib;
    mc.overhead_memory_mib = config.overhead_memory_mib;
    mc.max_vcpus = config.max_vcpus;
    mc.spare_drives = config.spare_drives;
    mc.boot_timeout = Duration::from_secs(config.boot_timeout_secs);
    mc.agent_call_timeout = Duration::from_secs(config.agent_call_timeout_secs);
    let sandboxes = sandbox::SandboxManager::new(mc).context("starting the sandbox manager")?;
    if !sandboxes.id_len_fits(cri::runtime::ID_LEN) {
        anyhow::bail!(
            "state_dir {} or vm_log_dir {} is too long: a pod's VMM socket paths under them \
             would not fit in a Unix socket address; choose shorter directories",
            config.state_dir.display(),
            config.vm_log_dir.display()
        );
    }
    let report = sandboxes.recover().context("recovering pods")?;
    log::info!("recovered: {report:?}");
    release_orphan_networks(&sandboxes, &network);

    let in_use = {
        let sandboxes = sandboxes.clone();
        Arc::new(move |d: &image::Digest| {
            let id = d.to_string();
            sandboxes
                .list_containers(None)
                .iter()
                .any(|c| c.image_id == id)
        }) as Arc<dyn Fn(&image::Digest) -> bool + Send + Sync>
    };
    let image_service = cri::images::Images::new(images.clone(), config.image_dir.clone(), in_use);
    let runtime =
        cri::runtime::Runtime::new(sandboxes, network, images, config.cgroup_driver.clone());

    if let Some(dir) = config.socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(&config.socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).context("removing the stale socket"),
    }
    let listener = tokio::net::UnixListener::bind(&config.socket)
        .with_context(|| format!("binding {}", config.socket.display()))?;
    std::fs::set_permissions(&config.socket, std::fs::Permissions::from_mode(0o660))
        .context("socket mode")?;
    if let Some(group) = &config.socket_group {
        cri::chown_group(&config.socket, group)?;
    }
    log::info!("serving CRI on {}", config.socket.display());
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
        // Pods keep running: a restarted hyperd re-attaches to them.
        log::info!("shutting down; pods keep running");
    };
    tonic::transport::Server::builder()
        .add_service(RuntimeServiceServer::new(runtime).max_decoding_message_size(16 << 20))
        .add_service(ImageServiceServer::new(image_service))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await
        .context("serving")?;
    Ok(())
}

/// Tears down pod networks that belong to no pod: left by a RunPodSandbox whose rollback could
/// not run CNI DEL, or by a hyperd that died between network setup and the pod's first record
/// (recovery then removes the half-created pod). Their IP leases would otherwise leak.
fn release_orphan_networks(sandboxes: &sandbox::SandboxManager, network: &network::NetworkManager) {
    let pods: std::collections::HashSet<String> = sandboxes
        .list_pods()
        .iter()
        .map(|p| p.id().to_owned())
        .collect();
    let ids = match network.pods() {
        Ok(ids) => ids,
        Err(e) => {
            log::warn!("listing pod networks: {}", cri::error_chain(&e));
            return;
        }
    };
    for id in ids.into_iter().filter(|id| !pods.contains(id)) {
        match network.teardown(&id) {
            Ok(()) => log::info!("released the network of {id}, which belongs to no pod"),
            Err(e) => log::warn!(
                "network of {id} (no pod): teardown failed: {}",
                cri::error_chain(&e)
            ),
        }
    }
}

/// Imports the configured built-in images the store does not have yet. A missing or broken
/// archive is logged, not fatal: hyperd serves pulled images without it.
async fn preload_images(images: &image::ImageStore, preload: &[cri::config::PreloadImage]) {
    for p in preload {
        if images.status(&p.name).is_some() {
            continue;
        }
        if !p.archive.exists() {
            log::info!(
                "built-in image {}: {} does not exist, not preloaded",
                p.name,
                p.archive.display()
            );
            continue;
        }
        match images.import_archive(&p.archive, &p.name).await {
            Ok(r) => log::info!(
                "built-in image {} imported from {} as {}",
                p.name,
                p.archive.display(),
                r.id
            ),
            Err(e) => log::warn!(
                "built-in image {} from {}: {}",
                p.name,
                p.archive.display(),
                cri::error_chain(&e)
            ),
        }
    }
}
