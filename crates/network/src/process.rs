//! Running a helper program (a CNI plugin, `ip`, `tc`) with input on stdin, its output
//! collected, and a deadline after which its whole process group is killed.
//!
//! One thread, one `poll(2)` loop over the three pipes: no reader threads that could hang on a
//! pipe a grandchild keeps open, and the deadline covers writing, reading and waiting.

use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// Output kept per stream; more is read and dropped so the child never blocks on a full pipe.
const MAX_OUTPUT: usize = 4 << 20;

/// How often the exit of a child that closed its pipes is polled.
const WAIT_STEP: Duration = Duration::from_millis(2);

/// What a finished child left.
#[derive(Debug)]
pub(crate) struct Output {
    /// Its exit status.
    pub status: ExitStatus,
    /// Its standard output (at most [`MAX_OUTPUT`] bytes).
    pub stdout: Vec<u8>,
    /// Its standard error (at most [`MAX_OUTPUT`] bytes).
    pub stderr: Vec<u8>,
}

impl Output {
    /// Standard error as trimmed text, for error messages.
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).trim().to_string()
    }
}

/// Why a child could not be run to completion.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RunError {
    /// The program could not be started.
    #[error("cannot start")]
    Spawn(#[source] io::Error),
    /// Talking to the child through its pipes failed.
    #[error("cannot talk to the process")]
    Io(#[source] io::Error),
    /// The deadline passed; the process group was killed.
    #[error("timed out")]
    Timeout,
}

/// Runs `cmd` in its own process group with `input` on stdin and waits at most `timeout`.
pub(crate) fn run(cmd: &mut Command, input: &[u8], timeout: Duration) -> Result<Output, RunError> {
    let deadline = Instant::now() + timeout;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(RunError::Spawn)?;
    match communicate(&mut child, input, deadline) {
        Ok(output) => Ok(output),
        Err(e) => {
            kill_group(&child);
            // SIGKILL cannot be ignored: this wait is short.
            let _ = child.wait();
            Err(e)
        }
    }
}

fn kill_group(child: &Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // The child leads its own process group (`process_group(0)`).
        if let Err(e) = killpg(Pid::from_raw(pid), Signal::SIGKILL) {
            log::debug!("cannot kill process group {pid}: {e}");
        }
    }
}

fn set_nonblocking(fd: &impl AsRawFd) -> io::Result<()> {
    let flags = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).map_err(io::Error::from)?;
    let flags = OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK;
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
    Ok(())
}

fn remaining(deadline: Instant) -> Result<Duration, RunError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(RunError::Timeout)
    } else {
        Ok(left)
    }
}

/// Reads what is available from `r` into `buf`; returns false at end of file.
fn drain(r: &mut impl Read, buf: &mut Vec<u8>) -> io::Result<bool> {
    let mut chunk = [0u8; 8192];
    loop {
        match r.read(&mut chunk) {
            Ok(0) => return Ok(false),
            Ok(n) => {
                let keep = n.min(MAX_OUTPUT.saturating_sub(buf.len()));
                buf.extend_from_slice(&chunk[..keep]);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(true),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn communicate(child: &mut Child, input: &[u8], deadline: Instant) -> Result<Output, RunError> {
    let missing = || RunError::Io(io::Error::other("child pipe missing"));
    let mut stdin = Some(child.stdin.take().ok_or_else(missing)?);
    let mut stdout = Some(child.stdout.take().ok_or_else(missing)?);
    let mut stderr = Some(child.stderr.take().ok_or_else(missing)?);
    for fd in [
        stdin.as_ref().map(|f| f.as_raw_fd()),
        stdout.as_ref().map(|f| f.as_raw_fd()),
        stderr.as_ref().map(|f| f.as_raw_fd()),
    ]
    .into_iter()
    .flatten()
    {
        set_nonblocking(&fd).map_err(RunError::Io)?;
    }
    if input.is_empty() {
        stdin = None;
    }
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut written = 0;

    while stdin.is_some() || stdout.is_some() || stderr.is_some() {
        let left = remaining(deadline)?;
        let (mut in_ready, mut out_ready, mut err_ready) = (false, false, false);
        {
            let mut fds = Vec::with_capacity(3);
            if let Some(f) = &stdin {
                fds.push((0, PollFd::new(f.as_fd(), PollFlags::POLLOUT)));
            }
            if let Some(f) = &stdout {
                fds.push((1, PollFd::new(f.as_fd(), PollFlags::POLLIN)));
            }
            if let Some(f) = &stderr {
                fds.push((2, PollFd::new(f.as_fd(), PollFlags::POLLIN)));
            }
            let mut pollfds: Vec<PollFd> = fds.iter().map(|(_, p)| *p).collect();
            let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
            match poll(&mut pollfds, timeout) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(RunError::Io(e.into())),
            }
            for ((which, _), p) in fds.iter().zip(&pollfds) {
                let ready = p.revents().is_some_and(|r| !r.is_empty());
                match which {
                    0 => in_ready = ready,
                    1 => out_ready = ready,
                    _ => err_ready = ready,
                }
            }
        }
        if in_ready {
            if let Some(f) = &mut stdin {
                match f.write(&input[written..]) {
                    Ok(n) => written += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    // The child closed its stdin: it does not want the rest.
                    Err(e) if e.kind() == ErrorKind::BrokenPipe => written = input.len(),
                    Err(e) => return Err(RunError::Io(e)),
                }
                if written >= input.len() {
                    stdin = None;
                }
            }
        }
        if out_ready {
            if let Some(f) = &mut stdout {
                if !drain(f, &mut out).map_err(RunError::Io)? {
                    stdout = None;
                }
            }
        }
        if err_ready {
            if let Some(f) = &mut stderr {
                if !drain(f, &mut err).map_err(RunError::Io)? {
                    stderr = None;
                }
            }
        }
    }

    loop {
        if let Some(status) = child.try_wait().map_err(RunError::Io)? {
            return Ok(Output {
                status,
                stdout: out,
                stderr: err,
            });
        }
        std::thread::sleep(remaining(deadline)?.min(WAIT_STEP));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collects_output_and_status() {
        let out = run(
            Command::new("sh").args(["-c", "cat; echo err >&2; exit 3"]),
            b"hello",
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(out.stdout, b"hello");
        assert_eq!(out.stderr_text(), "err");
        assert_eq!(out.status.code(), Some(3));
    }

    #[test]
    fn large_input_to_a_child_that_does_not_read() {
        let input = vec![b'x'; 1 << 20];
        let out = run(
            Command::new("sh").args(["-c", "echo done"]),
            &input,
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(out.stdout, b"done\n");
    }

    #[test]
    fn large_output() {
        let out = run(
            Command::new("sh").args(["-c", "head -c 3000000 /dev/zero"]),
            b"",
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(out.stdout.len(), 3_000_000);
    }

    #[test]
    fn timeout_kills_the_group() {
        let start = Instant::now();
        // The grandchild keeps stdout open: only killing the group ends it.
        let err = run(
            Command::new("sh").args(["-c", "sleep 30 & sleep 30"]),
            b"",
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(matches!(err, RunError::Timeout), "{err:?}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn missing_program() {
        let err = run(
            &mut Command::new("/nonexistent/program"),
            b"",
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(matches!(err, RunError::Spawn(_)), "{err:?}");
    }
}
