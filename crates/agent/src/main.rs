//! `hyperstart`: guest PID 1, or `hyperstart --listen unix:///path` on the host for tests.

use std::path::PathBuf;
use std::process::ExitCode;

use agent::block::BlockDevices;
use agent::power::PowerMode;
use agent::runtime::container::RuntimeConfig;
use agent::server::ListenAddr;
use agent::service::ServiceConfig;

const USAGE: &str = "usage: hyperstart (as PID 1)
       hyperstart --listen unix:///path/agent.sock [--debug] [--dev-dir DIR --sys-block-dir DIR]
                  [--state-dir DIR] [--cgroup-root DIR]

Host mode serves the agent API without PID 1 duties. --dev-dir/--sys-block-dir point ReadBlock at
a fake /dev and /sys/block where regular files stand in for disks (tests). Reboot and DebugPanic
exit the process instead of rebooting. --state-dir holds the file store and rootfs disk mounts
(default: a per-process directory under /tmp). --cgroup-root is a cgroup v2 directory for the
containers' cgroups (created; without it, containers get no cgroup and resource limits are
refused).";

fn main() -> ExitCode {
    if std::process::id() == 1 {
        agent::logger::init(log::LevelFilter::Info);
        agent::init::run_as_init();
    }
    agent::logger::init(if std::env::var_os("HYPERSTART_DEBUG").is_some() {
        log::LevelFilter::Debug
    } else {
        log::LevelFilter::Info
    });
    match parse_host_args(std::env::args().skip(1)) {
        Ok((addr, config, runtime)) => agent::init::run_host(&addr, config, runtime),
        Err(msg) => {
            eprintln!("hyperstart: {msg}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn parse_host_args(
    mut args: impl Iterator<Item = String>,
) -> Result<(ListenAddr, ServiceConfig, RuntimeConfig), String> {
    let mut listen = None;
    let mut state_dir = std::env::temp_dir().join(format!("hyperstart-{}", std::process::id()));
    let mut cgroup_root = None;
    let mut config = ServiceConfig {
        debug: false,
        block: BlockDevices::guest(),
        power: PowerMode::HostProcess,
    };
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--listen" => {
                let text = value("--listen")?;
                listen =
                    Some(ListenAddr::parse(&text).ok_or_else(|| format!("bad address {text:?}"))?);
            }
            "--debug" => config.debug = true,
            "--dev-dir" => {
                config.block.dev_dir = PathBuf::from(value("--dev-dir")?);
                config.block.allow_regular_files = true;
            }
            "--sys-block-dir" => {
                config.block.sys_block_dir = PathBuf::from(value("--sys-block-dir")?)
            }
            "--state-dir" => state_dir = PathBuf::from(value("--state-dir")?),
            "--cgroup-root" => cgroup_root = Some(PathBuf::from(value("--cgroup-root")?)),
            "-h" | "--help" => return Err("help".to_owned()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let listen = listen.ok_or("not PID 1: --listen is required")?;
    let runtime = RuntimeConfig {
        state_dir,
        cgroup_root,
        guest: false,
        block: config.block.clone(),
    };
    Ok((listen, config, runtime))
}
