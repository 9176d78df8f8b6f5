//! Container RPC handlers: protobuf in, [`Containers`] calls, protobuf out.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use protocol::agent::{self as pb};
use protocol::{MAX_READ_STREAM_LEN, MAX_READ_STREAM_WAIT_MS, MAX_WRITE_STDIN_LEN};

use crate::reaper::ExitStatus;
use crate::runtime::container::{Container, RootfsSource, StreamKind};
use crate::runtime::{ContainerError, Containers};

type Result<T> = std::result::Result<T, ContainerError>;

/// The container and, for now, only its init process (exec_id "").
fn process(
    containers: &Containers,
    container_id: &str,
    exec_id: &str,
) -> Result<std::sync::Arc<Container>> {
    let container = containers.get(container_id)?;
    if !exec_id.is_empty() {
        return Err(ContainerError::ExecNotFound {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
        });
    }
    Ok(container)
}

fn rootfs_source(rootfs: Option<&pb::Rootfs>) -> Result<RootfsSource> {
    let rootfs =
        rootfs.ok_or_else(|| ContainerError::InvalidArgument("rootfs is missing".into()))?;
    match &rootfs.source {
        Some(pb::rootfs::Source::HostPath(path)) => Ok(RootfsSource {
            dir: path.into(),
            read_only: rootfs.read_only,
            overlay: rootfs.overlay,
        }),
        Some(pb::rootfs::Source::Block(_)) => {
            Err(ContainerError::Unimplemented("rootfs on a block device"))
        }
        _ => Err(ContainerError::InvalidArgument(
            "rootfs has no source".into(),
        )),
    }
}

pub(super) fn create(
    containers: &Containers,
    req: &pb::CreateContainerRequest,
) -> Result<pb::CreateContainerResponse> {
    let rootfs = rootfs_source(req.rootfs.as_ref())?;
    let container = containers.create(&req.container_id, &req.oci_spec_json, &rootfs)?;
    log::info!(
        "created container {} (pid {})",
        container.id(),
        container.pid()
    );
    let mut resp = pb::CreateContainerResponse::new();
    resp.pid = container.pid().as_raw().unsigned_abs();
    Ok(resp)
}

pub(super) fn start(
    containers: &Containers,
    req: &pb::StartContainerRequest,
) -> Result<pb::StartContainerResponse> {
    let container = containers.start(&req.container_id)?;
    let mut resp = pb::StartContainerResponse::new();
    resp.pid = container.pid().as_raw().unsigned_abs();
    Ok(resp)
}

pub(super) fn wait(
    containers: &Containers,
    timeout_nano: i64,
    req: &pb::WaitProcessRequest,
) -> Result<pb::WaitProcessResponse> {
    let container = process(containers, &req.container_id, &req.exec_id)?;
    // The caller's deadline, so a handler thread is not held past the point anyone listens;
    // a little earlier, so the caller gets DEADLINE_EXCEEDED rather than its own timeout.
    let deadline = u64::try_from(timeout_nano)
        .ok()
        .filter(|&n| n > 0)
        .map(|n| {
            let timeout = Duration::from_nanos(n);
            Instant::now() + timeout - (timeout / 10).min(Duration::from_millis(100))
        });
    let info = container.wait(deadline)?;
    let mut resp = pb::WaitProcessResponse::new();
    match info.status {
        ExitStatus::Exited(code) => resp.exit_code = code,
        ExitStatus::Signaled(signal) => resp.signal = signal,
    }
    resp.oom_killed = false;
    resp.started_at_unix_nanos = info.started_at_unix_nanos;
    resp.finished_at_unix_nanos = info.finished_at_unix_nanos;
    Ok(resp)
}

pub(super) fn signal(
    containers: &Containers,
    req: &pb::SignalProcessRequest,
) -> Result<pb::SignalProcessResponse> {
    let signal = i32::try_from(req.signal)
        .ok()
        .and_then(|n| Signal::try_from(n).ok())
        .ok_or_else(|| ContainerError::InvalidArgument(format!("bad signal {}", req.signal)))?;
    process(containers, &req.container_id, &req.exec_id)?.signal(signal)?;
    Ok(pb::SignalProcessResponse::new())
}

pub(super) fn remove(
    containers: &Containers,
    req: &pb::RemoveContainerRequest,
) -> Result<pb::RemoveContainerResponse> {
    containers.remove(&req.container_id)?;
    log::info!("removed container {}", req.container_id);
    Ok(pb::RemoveContainerResponse::new())
}

pub(super) fn read_stream(
    containers: &Containers,
    req: &pb::ReadStreamRequest,
) -> Result<pb::ReadStreamResponse> {
    let stream = match req.stream.enum_value() {
        Ok(pb::Stream::STREAM_STDOUT) => StreamKind::Stdout,
        Ok(pb::Stream::STREAM_STDERR) => StreamKind::Stderr,
        _ => {
            return Err(ContainerError::InvalidArgument(
                "stream must be STREAM_STDOUT or STREAM_STDERR".into(),
            ))
        }
    };
    let container = process(containers, &req.container_id, &req.exec_id)?;
    let max = match req.max_bytes {
        0 => MAX_READ_STREAM_LEN,
        n => n.min(MAX_READ_STREAM_LEN),
    };
    let wait = Duration::from_millis(u64::from(req.wait_ms.min(MAX_READ_STREAM_WAIT_MS)));
    let chunk = container.read(stream, max as usize, wait);
    let mut resp = pb::ReadStreamResponse::new();
    resp.data = chunk.data;
    resp.eof = chunk.eof;
    resp.dropped_bytes = chunk.dropped;
    Ok(resp)
}

pub(super) fn write_stdin(
    containers: &Containers,
    req: &pb::WriteStdinRequest,
) -> Result<pb::WriteStdinResponse> {
    if req.data.len() > MAX_WRITE_STDIN_LEN {
        return Err(ContainerError::InvalidArgument(format!(
            "data is longer than {MAX_WRITE_STDIN_LEN} bytes"
        )));
    }
    let container = process(containers, &req.container_id, &req.exec_id)?;
    let written = container.write_stdin(&req.data)?;
    let mut resp = pb::WriteStdinResponse::new();
    resp.written = u32::try_from(written).unwrap_or(u32::MAX);
    Ok(resp)
}

pub(super) fn close_stdin(
    containers: &Containers,
    req: &pb::CloseStdinRequest,
) -> Result<pb::CloseStdinResponse> {
    process(containers, &req.container_id, &req.exec_id)?.close_stdin();
    Ok(pb::CloseStdinResponse::new())
}
