//! Reading a container's log file, once or following it until the container exits.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

use crate::cri;
use crate::logfmt::{LogDecoder, Record};
use crate::{Cri, CtlError};

/// How often a follower looks for new bytes when the file has none.
const READ_INTERVAL: Duration = Duration::from_millis(50);
/// How often a follower asks whether the container has exited.
const STATUS_INTERVAL: Duration = Duration::from_millis(200);
/// After the container exited, how long new bytes may still arrive (the runtime copies the last output
/// from the container's pipes to the file after, or while, it reports the exit).
const DRAIN_GRACE: Duration = Duration::from_millis(300);

/// How [`stream`] ended.
#[derive(Debug)]
pub enum LogEnd {
    /// Not following: the file was read to its end.
    Read,
    /// The container exited; its final status.
    Exited(Box<cri::ContainerStatus>),
    /// The container disappeared (removed) while being followed.
    Gone,
    /// The sink refused more output (e.g. stdout is a closed pipe).
    SinkClosed,
}

/// Where a container's log is: the status's `log_path` (absolute, per CRI), or None if it logs nowhere.
pub fn log_path(status: &cri::ContainerStatus) -> Option<PathBuf> {
    if status.log_path.is_empty() {
        None
    } else {
        Some(PathBuf::from(&status.log_path))
    }
}

fn exited(status: &cri::ContainerStatus) -> bool {
    status.state == cri::ContainerState::ContainerExited as i32
}

/// Decodes the log at `path` into `sink`. Without `follow`, reads what is there and returns. With
/// `follow`, keeps reading until container `id` has exited and its last output has been drained (polling
/// ContainerStatus), waiting for the file to appear if needed. The sink returns false to stop early.
pub async fn stream(
    cri: &Cri,
    id: &str,
    path: &Path,
    follow: bool,
    mut sink: impl FnMut(&Record) -> bool,
) -> Result<LogEnd, CtlError> {
    let io_err = |what| {
        move |source| CtlError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    };
    let mut decoder = LogDecoder::new();
    let mut emit = |records: Vec<Record>| records.iter().all(&mut sink);

    // Open the file; a follower waits for the runtime to create it.
    let mut file = loop {
        match tokio::fs::File::open(path).await {
            Ok(f) => break Some(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && follow => {
                match cri.container_status(id).await {
                    Ok(s) if exited(&s) => break None,
                    Ok(_) => tokio::time::sleep(STATUS_INTERVAL).await,
                    Err(e) if e.is_not_found() => return Ok(LogEnd::Gone),
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(io_err("cannot open the container log")(e)),
        }
    };

    let mut buf = vec![0u8; 64 * 1024];
    let mut last_status: Option<Instant> = None;
    let mut exit: Option<(cri::ContainerStatus, Instant)> = None;
    loop {
        // read everything available
        let mut got = false;
        if let Some(f) = file.as_mut() {
            loop {
                let n = f
                    .read(&mut buf)
                    .await
                    .map_err(io_err("cannot read the container log"))?;
                if n == 0 {
                    break;
                }
                got = true;
                if !emit(decoder.feed(&buf[..n])) {
                    return Ok(LogEnd::SinkClosed);
                }
            }
        } else if let Ok(f) = tokio::fs::File::open(path).await {
            file = Some(f);
            continue;
        }
        if !follow {
            return Ok(if emit(decoder.finish()) {
                LogEnd::Read
            } else {
                LogEnd::SinkClosed
            });
        }
        if let Some((status, at)) = &exit {
            if !got && at.elapsed() >= DRAIN_GRACE {
                let status = status.clone();
                return Ok(if emit(decoder.finish()) {
                    LogEnd::Exited(Box::new(status))
                } else {
                    LogEnd::SinkClosed
                });
            }
        } else if last_status.is_none_or(|t| t.elapsed() >= STATUS_INTERVAL) {
            last_status = Some(Instant::now());
            match cri.container_status(id).await {
                Ok(s) if exited(&s) => exit = Some((s, Instant::now())),
                Ok(_) => {}
                Err(e) if e.is_not_found() => {
                    let _ = emit(decoder.finish());
                    return Ok(LogEnd::Gone);
                }
                Err(e) => return Err(e),
            }
        }
        if !got {
            tokio::time::sleep(READ_INTERVAL).await;
        }
    }
}
