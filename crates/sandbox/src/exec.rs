//! `exec_sync`: run a command in a container and collect its output (CRI ExecSync, probes).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use protocol::agent as pb;
use protocol::client::ReconnectingClient;

use crate::error::{is_deadline, is_not_found, Result, SandboxError};
use crate::lifecycle::{exit_from_wait, KILL_WAIT};
use crate::manager::Inner;
use crate::record::ContainerState;
use crate::{lock, now_nanos, oci};

/// Output kept per stream (more is read and dropped): CRI's limit for ExecSync.
pub const MAX_EXEC_OUTPUT: usize = 16 << 20;
/// After the process exited, how long output may still be read (a background child may keep
/// the pipe open forever).
const IO_GRACE: Duration = Duration::from_secs(1);
/// One ReadStream poll.
const READ_WAIT: Duration = Duration::from_millis(500);

/// What a command produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecResult {
    /// Exit status, or 128 + signal.
    pub exit_code: i32,
    /// Standard output (at most [`MAX_EXEC_OUTPUT`]).
    pub stdout: Vec<u8>,
    /// Standard error (at most [`MAX_EXEC_OUTPUT`]).
    pub stderr: Vec<u8>,
}

/// An exec id unique in the container, also across manager restarts.
fn next_exec_id() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "exec-{:x}-{}",
        now_nanos(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn read_all(
    agent: &ReconnectingClient,
    id: &str,
    exec_id: &str,
    stream: pb::Stream,
    exited: &Mutex<Option<Instant>>,
) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        if lock(exited).is_some_and(|t| t.elapsed() > IO_GRACE) {
            break;
        }
        match agent.call_once(|c| c.read_stream(id, exec_id, stream, 0, READ_WAIT)) {
            Ok(r) => {
                let room = MAX_EXEC_OUTPUT.saturating_sub(out.len());
                out.extend_from_slice(&r.data[..r.data.len().min(room)]);
                if r.eof {
                    break;
                }
            }
            Err(e) if is_not_found(&e) => break,
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    out
}

impl Inner {
    pub(crate) fn exec_sync(
        &self,
        id: &str,
        cmd: &[String],
        timeout: Option<Duration>,
    ) -> Result<ExecResult> {
        let (_, agent, record) = self.live_container(id, "exec")?;
        if record.state != ContainerState::Running {
            return Err(SandboxError::ContainerState {
                id: id.to_owned(),
                state: record.state,
                op: "exec",
            });
        }
        let process = oci::exec_process(&record.process, cmd)?;
        let exec_id = next_exec_id();
        agent
            .call_once(|c| c.exec_process(id, &exec_id, &process))
            .map_err(SandboxError::agent("ExecProcess"))?;
        let timeout = timeout.filter(|t| !t.is_zero());
        let deadline = timeout.map(|t| Instant::now() + t);
        let exited = Mutex::new(None);
        let (status, stdout, stderr) = std::thread::scope(|s| {
            let out =
                s.spawn(|| read_all(&agent, id, &exec_id, pb::Stream::STREAM_STDOUT, &exited));
            let err =
                s.spawn(|| read_all(&agent, id, &exec_id, pb::Stream::STREAM_STDERR, &exited));
            let status = wait_exec(&agent, id, &exec_id, deadline);
            if matches!(status, Ok(None)) {
                // Timed out: kill it, and give the kill a moment to land.
                let kill = libc::SIGKILL as u32;
                let _ = agent.call_once(|c| c.signal_process(id, &exec_id, kill));
                let _ = wait_exec(&agent, id, &exec_id, Some(Instant::now() + KILL_WAIT));
            }
            *lock(&exited) = Some(Instant::now());
            let stdout = out.join().unwrap_or_default();
            let stderr = err.join().unwrap_or_default();
            (status, stdout, stderr)
        });
        // The agent keeps an exec'd process until told to forget it: without this, every
        // probe would grow the agent's memory.
        if let Err(e) = agent.call_once(|c| c.remove_process(id, &exec_id)) {
            log::warn!("container {id}: forgetting exec {exec_id}: {e}");
        }
        match status? {
            Some(exit) => Ok(ExecResult {
                exit_code: exit.exit_code(),
                stdout,
                stderr,
            }),
            None => Err(SandboxError::ExecTimeout {
                id: id.to_owned(),
                timeout: timeout.unwrap_or_default(),
            }),
        }
    }
}

/// Waits for an exec process until `deadline` (`None`: for ever); `Ok(None)` on timeout.
fn wait_exec(
    agent: &ReconnectingClient,
    id: &str,
    exec_id: &str,
    deadline: Option<Instant>,
) -> Result<Option<crate::record::ExitInfo>> {
    loop {
        let slice = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left < Duration::from_millis(50) {
                    return Ok(None);
                }
                left.min(Duration::from_secs(60))
            }
            None => Duration::from_secs(60),
        };
        match agent.with_timeout(slice).wait_process(id, exec_id) {
            Ok(r) => return Ok(Some(exit_from_wait(&r))),
            Err(e) if is_deadline(&e) => {}
            Err(e) => return Err(SandboxError::agent("WaitProcess")(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_ids_are_unique_and_valid() {
        let a = next_exec_id();
        let b = next_exec_id();
        assert_ne!(a, b);
        for id in [a, b] {
            assert!(id.len() <= 128);
            assert!(id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
        }
    }
}
