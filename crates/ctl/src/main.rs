//! hyperctl: the operator's CLI over CRI v1, for hyperd or any other CRI endpoint.

mod cmd;
mod table;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ctl::endpoint::DEFAULT_ENDPOINT;
use ctl::spec::DEFAULT_LOG_ROOT;

#[derive(Parser, Debug)]
#[command(
    name = "hyperctl",
    version,
    about = "Run and inspect pods and containers through CRI v1 (hyperd, containerd or any CRI runtime)",
    after_help = "Ids may be given as unique prefixes or as exact names."
)]
struct Cli {
    /// CRI endpoint: unix:///path.sock, a socket path, or tcp://host:port
    #[arg(long, env = "HYPERCTL_ENDPOINT", default_value = DEFAULT_ENDPOINT, global = true)]
    endpoint: String,
    /// Timeout for connecting and for each call (e.g. 2s, 500ms; pulls are not limited)
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
    /// Runtime handler (RuntimeClass) for the pods that `run` and `bench` create
    #[arg(long, value_name = "HANDLER", global = true)]
    runtime: Option<String>,
    /// Output format of listings
    #[arg(short, long, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a command in a new pod: pull the image if needed, start it, stream its output, exit with its
    /// exit code
    Run(RunArgs),
    /// List pods
    Pods(PodsArgs),
    /// List containers (running ones unless -a)
    Ps(PsArgs),
    /// Print a container's log
    Logs(LogsArgs),
    /// Run a command in a running container and wait for it (ExecSync)
    Exec(ExecArgs),
    /// Stop pods or containers
    Stop(StopArgs),
    /// Remove pods or containers
    Rm(RmArgs),
    /// Pull an image
    Pull(PullArgs),
    /// List images
    Images(ImagesArgs),
    /// Remove images
    Rmi(RmiArgs),
    /// Show the runtime's version and status
    Info(InfoArgs),
    /// Time N pod lifecycles (run, create, start, stop, remove), P at a time
    Bench(BenchArgs),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Stop and remove the pod when the container exits
    #[arg(long)]
    rm: bool,
    /// Set an environment variable (K=V; K alone takes hyperctl's own value)
    #[arg(short, long = "env", value_name = "K=V", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Pod and container name (default: hyperctl-<random>)
    #[arg(long)]
    name: Option<String>,
    /// Pull the image even if the runtime has it
    #[arg(long)]
    pull: bool,
    /// Override the image's entrypoint
    #[arg(long, value_name = "CMD")]
    entrypoint: Option<String>,
    /// Start the container, print its id and return
    #[arg(short, long, conflicts_with = "rm")]
    detach: bool,
    /// Root of the pod log directories
    #[arg(long, default_value = DEFAULT_LOG_ROOT)]
    log_root: PathBuf,
    /// Image to run
    image: String,
    /// Command and arguments (replace the image's CMD)
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    command: Vec<String>,
}

#[derive(Args, Debug)]
struct PodsArgs {
    /// Only print ids
    #[arg(short, long)]
    quiet: bool,
    /// Only pods with this name
    #[arg(long)]
    name: Option<String>,
    /// Only pods in this state
    #[arg(long, value_enum)]
    state: Option<PodState>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum PodState {
    Ready,
    Notready,
}

#[derive(Args, Debug)]
struct PsArgs {
    /// Show all containers, not only running ones
    #[arg(short, long)]
    all: bool,
    /// Only print ids
    #[arg(short, long)]
    quiet: bool,
    /// Only containers of this pod (id prefix or name)
    #[arg(short, long)]
    pod: Option<String>,
}

#[derive(Args, Debug)]
struct LogsArgs {
    /// Keep printing new output until the container exits
    #[arg(short, long)]
    follow: bool,
    /// Prefix each line with its timestamp
    #[arg(short, long)]
    timestamps: bool,
    /// Container (id prefix or name)
    container: String,
}

#[derive(Args, Debug)]
struct ExecArgs {
    /// Kill the command after this long (e.g. 30s; default: no limit)
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Container (id prefix or name)
    container: String,
    /// Command and arguments
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        required = true,
        value_name = "CMD"
    )]
    command: Vec<String>,
}

#[derive(Args, Debug)]
struct StopArgs {
    /// Seconds a container gets between the stop signal and SIGKILL
    #[arg(short = 't', long = "time", default_value_t = 10)]
    grace: u64,
    /// Pods or containers (id prefixes or names)
    #[arg(required = true)]
    ids: Vec<String>,
}

#[derive(Args, Debug)]
struct RmArgs {
    /// Stop running pods and containers first
    #[arg(short, long)]
    force: bool,
    /// Remove every pod
    #[arg(short, long, conflicts_with = "ids")]
    all: bool,
    /// Pods or containers (id prefixes or names)
    #[arg(required_unless_present = "all")]
    ids: Vec<String>,
}

#[derive(Args, Debug)]
struct PullArgs {
    /// Registry credentials
    #[arg(long, value_name = "USER:PASSWORD")]
    creds: Option<String>,
    image: String,
}

#[derive(Args, Debug)]
struct ImagesArgs {
    /// Only print ids
    #[arg(short, long)]
    quiet: bool,
}

#[derive(Args, Debug)]
struct RmiArgs {
    /// Images (references, tags or id prefixes)
    #[arg(required = true)]
    images: Vec<String>,
}

#[derive(Args, Debug)]
struct InfoArgs {
    /// Include the runtime's verbose status information
    #[arg(short, long)]
    verbose: bool,
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// Number of pod lifecycles
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pods: u32,
    /// Lifecycles in flight at once
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    parallel: u32,
    /// Image of the container
    #[arg(long, default_value = "busybox")]
    image: String,
    /// Name for the summary line `pod_start_ms <LABEL>=<p50>` (default: from the endpoint)
    #[arg(long)]
    label: Option<String>,
    /// Root of the pod log directories
    #[arg(long, default_value = DEFAULT_LOG_ROOT)]
    log_root: PathBuf,
    /// Do not give containers a log file
    #[arg(long)]
    no_logs: bool,
    /// The container's command (default: sleep 3600)
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    command: Vec<String>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    ctl::error::parse_duration(s).map_err(|e| e.to_string())
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    let (k, v) = match s.split_once('=') {
        Some((k, v)) => (k.to_string(), v.to_string()),
        None => (
            s.to_string(),
            std::env::var(s).map_err(|_| format!("{s} has no value here; use {s}=VALUE"))?,
        ),
    };
    if k.is_empty() {
        return Err("the variable name is empty".into());
    }
    Ok((k, v))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hyperctl: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(cmd::dispatch(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            if cmd::is_broken_pipe(&e) {
                return ExitCode::SUCCESS;
            }
            eprintln!("hyperctl: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_takes_the_command_verbatim() {
        let cli = Cli::try_parse_from([
            "hyperctl", "run", "--rm", "-e", "A=1", "busybox", "sh", "-c", "exit 3",
        ])
        .unwrap();
        let Command::Run(r) = cli.command else {
            panic!("not run")
        };
        assert!(r.rm);
        assert_eq!(r.env, vec![("A".to_string(), "1".to_string())]);
        assert_eq!(r.image, "busybox");
        assert_eq!(r.command, ["sh", "-c", "exit 3"]);
    }

    #[test]
    fn global_options_after_the_subcommand() {
        let cli = Cli::try_parse_from([
            "hyperctl",
            "bench",
            "--pods",
            "4",
            "--parallel",
            "2",
            "--runtime",
            "hyper",
            "-o",
            "json",
            "--endpoint",
            "unix:///x.sock",
        ])
        .unwrap();
        assert_eq!(cli.runtime.as_deref(), Some("hyper"));
        assert_eq!(cli.output, Output::Json);
        assert_eq!(cli.endpoint, "unix:///x.sock");
        assert!(Cli::try_parse_from(["hyperctl", "bench", "--pods", "0"]).is_err());
    }

    #[test]
    fn exec_timeout_is_its_own() {
        let cli = Cli::try_parse_from([
            "hyperctl",
            "--timeout",
            "3s",
            "exec",
            "--timeout",
            "1m",
            "c1",
            "ls",
            "-l",
        ])
        .unwrap();
        assert_eq!(cli.timeout, Duration::from_secs(3));
        let Command::Exec(e) = cli.command else {
            panic!("not exec")
        };
        assert_eq!(e.timeout, Some(Duration::from_secs(60)));
        assert_eq!(e.command, ["ls", "-l"]);
        assert!(Cli::try_parse_from(["hyperctl", "exec", "c1"]).is_err());
    }

    #[test]
    fn env_values() {
        assert_eq!(parse_env("A=b=c").unwrap(), ("A".into(), "b=c".into()));
        assert_eq!(parse_env("A=").unwrap(), ("A".into(), "".into()));
        assert!(parse_env("=x").is_err());
        assert!(parse_env("HYPERCTL_SURELY_UNSET_VARIABLE").is_err());
    }
}
