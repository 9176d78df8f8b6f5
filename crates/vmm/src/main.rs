//! `hyper-vmm`: run one microVM. Configuration from a JSON file (`--config`) or flags.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use vmm::config::{Console, Disk, Net, VmConfig, Vsock, DEFAULT_CMDLINE};
use vmm::vm::Vm;

/// Exit status for an invalid configuration or command line.
const EXIT_BAD_CONFIG: u8 = 2;

#[derive(Parser, Debug)]
#[command(name = "hyper-vmm", version, about = "Run one KVM microVM")]
struct Args {
    /// JSON configuration file (flags below are then not allowed, except --control).
    #[arg(long, conflicts_with_all = ["kernel", "initrd", "cmdline", "vcpus", "memory", "disk", "spare_disks", "net", "vsock", "no_rng", "console"])]
    config: Option<PathBuf>,
    /// Guest kernel (bzImage or ELF vmlinux).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line (device entries are appended by the VMM).
    #[arg(long)]
    cmdline: Option<String>,
    /// vCPUs.
    #[arg(long)]
    vcpus: Option<u8>,
    /// Guest memory in MiB.
    #[arg(long)]
    memory: Option<u64>,
    /// A disk: `id=ID,path=FILE[,ro]`. Repeatable.
    #[arg(long, value_parser = parse_disk)]
    disk: Vec<Disk>,
    /// Number of empty spare drives for later attachment.
    #[arg(long)]
    spare_disks: Option<u8>,
    /// A NIC: `tap=NAME,mac=MAC`. Repeatable.
    #[arg(long, value_parser = parse_net)]
    net: Vec<Net>,
    /// vsock: `cid=N,socket=PATH`.
    #[arg(long, value_parser = parse_vsock)]
    vsock: Option<Vsock>,
    /// Do not attach a virtio-rng device.
    #[arg(long)]
    no_rng: bool,
    /// Console: `off`, `stdout` or `file:PATH`.
    #[arg(long, value_parser = parse_console)]
    console: Option<Console>,
    /// Control socket path.
    #[arg(long)]
    control: Option<PathBuf>,
    /// Print the effective configuration as JSON and exit.
    #[arg(long)]
    print_config: bool,
}

fn kv(s: &str) -> Result<Vec<(&str, Option<&str>)>, String> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => Ok((k, Some(v))),
            None => Ok((p, None)),
        })
        .collect()
}

fn parse_disk(s: &str) -> Result<Disk, String> {
    let mut d = Disk {
        id: String::new(),
        path: PathBuf::new(),
        read_only: false,
    };
    for (k, v) in kv(s)? {
        match (k, v) {
            ("id", Some(v)) => d.id = v.to_string(),
            ("path", Some(v)) => d.path = v.into(),
            ("ro", None) | ("read_only", None) => d.read_only = true,
            _ => return Err(format!("unknown disk option {k:?} (want id=,path=,ro)")),
        }
    }
    if d.id.is_empty() || d.path.as_os_str().is_empty() {
        return Err("disk needs id= and path=".into());
    }
    Ok(d)
}

fn parse_net(s: &str) -> Result<Net, String> {
    let mut n = Net {
        tap: String::new(),
        mac: String::new(),
    };
    for (k, v) in kv(s)? {
        match (k, v) {
            ("tap", Some(v)) => n.tap = v.to_string(),
            ("mac", Some(v)) => n.mac = v.to_string(),
            _ => return Err(format!("unknown net option {k:?} (want tap=,mac=)")),
        }
    }
    if n.tap.is_empty() || n.mac.is_empty() {
        return Err("net needs tap= and mac=".into());
    }
    Ok(n)
}

fn parse_vsock(s: &str) -> Result<Vsock, String> {
    let mut cid = None;
    let mut socket = None;
    for (k, v) in kv(s)? {
        match (k, v) {
            ("cid", Some(v)) => cid = Some(v.parse::<u64>().map_err(|e| format!("cid: {e}"))?),
            ("socket", Some(v)) => socket = Some(PathBuf::from(v)),
            _ => return Err(format!("unknown vsock option {k:?} (want cid=,socket=)")),
        }
    }
    match (cid, socket) {
        (Some(cid), Some(socket)) => Ok(Vsock { cid, socket }),
        _ => Err("vsock needs cid= and socket=".into()),
    }
}

fn parse_console(s: &str) -> Result<Console, String> {
    match s {
        "off" => Ok(Console::Off),
        "stdout" => Ok(Console::Stdout),
        _ => match s.strip_prefix("file:") {
            Some(p) if !p.is_empty() => Ok(Console::File(p.into())),
            _ => Err(format!(
                "console must be off, stdout or file:PATH, got {s:?}"
            )),
        },
    }
}

fn config_from(args: &Args) -> anyhow::Result<VmConfig> {
    if let Some(path) = &args.config {
        return Ok(VmConfig::from_file(path)?);
    }
    let Some(kernel) = args.kernel.clone() else {
        anyhow::bail!("either --config or --kernel is required");
    };
    let mut c = VmConfig::new(kernel);
    c.initrd = args.initrd.clone();
    c.cmdline = args
        .cmdline
        .clone()
        .unwrap_or_else(|| DEFAULT_CMDLINE.to_string());
    if let Some(v) = args.vcpus {
        c.vcpus = v;
    }
    if let Some(m) = args.memory {
        c.memory_mib = m;
    }
    c.disks = args.disk.clone();
    c.spare_disks = args.spare_disks.unwrap_or(0);
    c.nets = args.net.clone();
    c.vsock = args.vsock.clone();
    c.rng = !args.no_rng;
    c.console = args.console.clone().unwrap_or(Console::Stdout);
    Ok(c)
}

fn main() -> ExitCode {
    // boot_ms counts from the process start (exec), not from main().
    let start = match vmm::metrics::process_age() {
        Some(age) => Instant::now().checked_sub(age).unwrap_or_else(Instant::now),
        None => Instant::now(),
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let args = Args::parse();
    let mut config = match config_from(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hyper-vmm: {e:#}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    if let Some(c) = &args.control {
        config.control_socket = Some(c.clone());
    }
    if let Err(e) = config.validate() {
        eprintln!("hyper-vmm: {}", vmm::error_chain(&e));
        return ExitCode::from(EXIT_BAD_CONFIG);
    }
    if args.print_config {
        match serde_json::to_string_pretty(&config) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("hyper-vmm: {e}"),
        }
        return ExitCode::SUCCESS;
    }
    // Block SIGTERM/SIGINT/SIGHUP before any thread exists so only the control loop sees them.
    let signals = match vmm::runloop::block_termination_signals() {
        Ok(fd) => Some(fd),
        Err(e) => {
            log::warn!("cannot set up signal handling: {e}");
            None
        }
    };
    let control = config.control_socket.clone();
    let vm = match Vm::build(config, start) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("hyper-vmm: {}", vmm::error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let exit = vm.run(control.as_deref(), signals.as_ref());
    match &exit {
        vmm::vm::VmExit::Error(e) => log::error!("VM failed: {e}"),
        other => log::info!("VM ended: {other:?}"),
    }
    ExitCode::from(exit.code() as u8)
}
