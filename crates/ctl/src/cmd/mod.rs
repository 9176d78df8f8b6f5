//! The commands. Each takes the parsed arguments and a connected client and returns the process exit code.

mod bench;
mod images;
mod inspect;
mod manage;
mod run;

use std::future::Future;
use std::io::{self, IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ctl::{cri, Cri, Endpoint};

use crate::{Cli, Command, Output};

/// What every command gets.
pub struct Ctx {
    pub cri: Cri,
    pub output: Output,
    /// RuntimeClass handler for new pods.
    pub runtime: String,
}

pub async fn dispatch(cli: Cli) -> anyhow::Result<u8> {
    let endpoint: Endpoint = cli.endpoint.parse()?;
    let cri = Cri::connect(&endpoint, cli.timeout).await?;
    let ctx = Ctx {
        cri,
        output: cli.output,
        runtime: cli.runtime.unwrap_or_default(),
    };
    match cli.command {
        Command::Run(a) => run::run(&ctx, a).await,
        Command::Pods(a) => inspect::pods(&ctx, a).await,
        Command::Ps(a) => inspect::ps(&ctx, a).await,
        Command::Logs(a) => inspect::logs(&ctx, a).await,
        Command::Exec(a) => inspect::exec(&ctx, a).await,
        Command::Info(a) => inspect::info(&ctx, a).await,
        Command::Stop(a) => manage::stop(&ctx, a).await,
        Command::Rm(a) => manage::rm(&ctx, a).await,
        Command::Pull(a) => images::pull(&ctx, a).await,
        Command::Images(a) => images::images(&ctx, a).await,
        Command::Rmi(a) => images::rmi(&ctx, a).await,
        Command::Bench(a) => bench::bench(&ctx, a).await,
    }
}

/// True when the error is stdout having gone away (`hyperctl ps | head -1`): not worth a message.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    })
}

/// Prints a value as indented JSON on stdout.
pub fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut text = serde_json::to_vec_pretty(value).context("cannot encode JSON")?;
    text.push(b'\n');
    let mut out = io::stdout().lock();
    out.write_all(&text)?;
    out.flush()?;
    Ok(())
}

/// A container exit code as a process exit code: 0..=255 as is, anything else 255.
pub fn exit_code(code: i32) -> u8 {
    u8::try_from(code).unwrap_or(u8::MAX)
}

pub fn pod_state(state: i32) -> &'static str {
    match cri::PodSandboxState::try_from(state) {
        Ok(cri::PodSandboxState::SandboxReady) => "Ready",
        Ok(cri::PodSandboxState::SandboxNotready) => "NotReady",
        Err(_) => "Unknown",
    }
}

pub fn container_state(state: i32) -> &'static str {
    match cri::ContainerState::try_from(state) {
        Ok(cri::ContainerState::ContainerCreated) => "Created",
        Ok(cri::ContainerState::ContainerRunning) => "Running",
        Ok(cri::ContainerState::ContainerExited) => "Exited",
        Ok(cri::ContainerState::ContainerUnknown) | Err(_) => "Unknown",
    }
}

/// Runs `fut` while showing an elapsed-time spinner on stderr (a terminal), or a start and an end line
/// (anything else). CRI's PullImage is unary: elapsed time is the only progress there is.
pub async fn with_spinner<T, E>(
    what: &str,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    const FRAMES: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
    let tty = io::stderr().is_terminal();
    let started = Instant::now();
    if !tty {
        eprintln!("{what} ...");
    }
    tokio::pin!(fut);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut frame = 0usize;
    let result = loop {
        tokio::select! {
            r = &mut fut => break r,
            _ = tick.tick() => {
                if tty {
                    let mut err = io::stderr().lock();
                    let _ = write!(
                        err,
                        "\r\x1b[K{} {what} {:.1}s",
                        FRAMES[frame % FRAMES.len()],
                        started.elapsed().as_secs_f64()
                    );
                    let _ = err.flush();
                    frame += 1;
                }
            }
        }
    };
    let secs = started.elapsed().as_secs_f64();
    let mut err = io::stderr().lock();
    if tty {
        let _ = write!(err, "\r\x1b[K");
    }
    let _ = match &result {
        Ok(_) => writeln!(err, "{what}: done in {secs:.1}s"),
        Err(_) => writeln!(err, "{what}: failed after {secs:.1}s"),
    };
    result
}

/// Polls ContainerStatus until the container has exited; returns its status.
pub async fn wait_exited(cri: &Cri, id: &str) -> anyhow::Result<cri::ContainerStatus> {
    loop {
        let s = cri.container_status(id).await?;
        if s.state == cri::ContainerState::ContainerExited as i32 {
            return Ok(s);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        assert_eq!(exit_code(0), 0);
        assert_eq!(exit_code(3), 3);
        assert_eq!(exit_code(137), 137);
        assert_eq!(exit_code(-1), 255);
        assert_eq!(exit_code(256), 255);
    }

    #[test]
    fn state_names() {
        assert_eq!(pod_state(0), "Ready");
        assert_eq!(pod_state(7), "Unknown");
        assert_eq!(container_state(2), "Exited");
        assert_eq!(container_state(-1), "Unknown");
    }
}
