//! Container RPC handlers: protobuf in, [`Containers`] calls, protobuf out.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use protocol::agent::{self as pb};
use protocol::{MAX_READ_STREAM_LEN, MAX_READ_STREAM_WAIT_MS, MAX_WRITE_STDIN_LEN};

use std::sync::Arc;

use crate::block::selector_from_proto;
use crate::reaper::ExitStatus;
use crate::runtime::container::{Process, RootfsLocation, RootfsSource, StreamKind};
use crate::runtime::events::EventKind;
use crate::runtime::files::Chunk as FileChunk;
use crate::runtime::sandbox::SandboxConfig;
use crate::runtime::{ContainerError, Containers};

type Result<T> = std::result::Result<T, ContainerError>;

/// A process of a container: "" is the init process.
fn process(containers: &Containers, container_id: &str, exec_id: &str) -> Result<Arc<Process>> {
    containers.get(container_id)?.process(exec_id)
}

fn rootfs_source(rootfs: Option<&pb::Rootfs>) -> Result<RootfsSource> {
    let rootfs =
        rootfs.ok_or_else(|| ContainerError::InvalidArgument("rootfs is missing".into()))?;
    let location = match &rootfs.source {
        Some(pb::rootfs::Source::HostPath(path)) => RootfsLocation::Dir(path.into()),
        Some(pb::rootfs::Source::Block(dev)) => RootfsLocation::Block {
            selector: selector_from_proto(Some(dev))
                .map_err(|e| ContainerError::InvalidArgument(e.to_string()))?,
            fs_type: match rootfs.fs_type.as_str() {
                "" => "ext4".to_owned(),
                t => t.to_owned(),
            },
        },
        _ => {
            return Err(ContainerError::InvalidArgument(
                "rootfs has no source".into(),
            ))
        }
    };
    Ok(RootfsSource {
        location,
        read_only: rootfs.read_only,
        overlay: rootfs.overlay,
    })
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
    resp.oom_killed = info.oom_killed;
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
    let chunk = if req.acknowledged {
        container.read_from(stream, req.offset, max as usize, wait)
    } else {
        container.read(stream, max as usize, wait)
    };
    let mut resp = pb::ReadStreamResponse::new();
    resp.data = chunk.data;
    resp.eof = chunk.eof;
    resp.dropped_bytes = chunk.dropped;
    resp.offset = chunk.offset;
    resp.acknowledged = req.acknowledged;
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

pub(super) fn create_sandbox(
    containers: &Containers,
    req: &pb::CreateSandboxRequest,
) -> Result<pb::CreateSandboxResponse> {
    let mut sysctls: Vec<(String, String)> = req
        .sysctls
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    sysctls.sort();
    let config = SandboxConfig {
        hostname: (!req.hostname.is_empty()).then(|| req.hostname.clone()),
        sysctls,
        share_pid_namespace: req.share_pid_namespace,
    };
    let resolv = match req.dns.as_ref() {
        Some(dns) => Some(resolv_conf(dns)?),
        None => None,
    };
    let (pid, shared) = containers.create_sandbox(&config)?;
    let mut resp = pb::CreateSandboxResponse::new();
    resp.pid = pid;
    resp.ipc_namespace_path = format!("/proc/{pid}/ns/ipc");
    resp.uts_namespace_path = format!("/proc/{pid}/ns/uts");
    if shared {
        resp.pid_namespace_path = format!("/proc/{pid}/ns/pid");
    }
    if let Some(text) = resolv {
        let chunk = FileChunk {
            path: "resolv.conf",
            file_size: text.len() as u64,
            offset: 0,
            data: text.as_bytes(),
            file_mode: 0o644,
            dir_mode: 0o755,
            uid: 0,
            gid: 0,
        };
        match containers.files().write(&chunk) {
            Ok((path, _)) => resp.resolv_conf_path = path.display().to_string(),
            Err(e) => {
                containers.destroy_sandbox();
                return Err(e);
            }
        }
    }
    log::info!("created sandbox (holder pid {pid}, shared pid namespace: {shared})");
    Ok(resp)
}

/// resolv.conf from the pod's DNS config (kubelet's format: nameserver, search, options).
fn resolv_conf(dns: &pb::DnsConfig) -> Result<String> {
    let bad =
        |what: &str, v: &str| ContainerError::InvalidArgument(format!("bad DNS {what} {v:?}"));
    let mut text = String::new();
    for s in &dns.servers {
        s.parse::<std::net::IpAddr>()
            .map_err(|_| bad("server", s))?;
        text.push_str(&format!("nameserver {s}\n"));
    }
    let token_ok = |v: &str| {
        !v.is_empty()
            && v.len() <= 253
            && !v.contains(|c: char| c.is_whitespace() || c.is_control())
    };
    if !dns.searches.is_empty() {
        for s in &dns.searches {
            if !token_ok(s) {
                return Err(bad("search domain", s));
            }
        }
        text.push_str(&format!("search {}\n", dns.searches.join(" ")));
    }
    if !dns.options.is_empty() {
        for o in &dns.options {
            if !token_ok(o) {
                return Err(bad("option", o));
            }
        }
        text.push_str(&format!("options {}\n", dns.options.join(" ")));
    }
    Ok(text)
}

pub(super) fn destroy_sandbox(containers: &Containers) -> Result<pb::DestroySandboxResponse> {
    containers.destroy_sandbox();
    Ok(pb::DestroySandboxResponse::new())
}

pub(super) fn exec(
    containers: &Containers,
    req: &pb::ExecProcessRequest,
) -> Result<pb::ExecProcessResponse> {
    let p = containers.exec(&req.container_id, &req.exec_id, &req.process_json)?;
    log::info!(
        "exec {} in container {} (pid {})",
        req.exec_id,
        req.container_id,
        p.pid()
    );
    let mut resp = pb::ExecProcessResponse::new();
    resp.pid = p.pid().as_raw().unsigned_abs();
    Ok(resp)
}

pub(super) fn resize_tty(
    containers: &Containers,
    req: &pb::ResizeTtyRequest,
) -> Result<pb::ResizeTtyResponse> {
    let rows = u16::try_from(req.rows)
        .map_err(|_| ContainerError::InvalidArgument("rows > 65535".into()))?;
    let cols = u16::try_from(req.cols)
        .map_err(|_| ContainerError::InvalidArgument("cols > 65535".into()))?;
    process(containers, &req.container_id, &req.exec_id)?.resize(rows, cols)?;
    Ok(pb::ResizeTtyResponse::new())
}

pub(super) fn stats(
    containers: &Containers,
    req: &pb::StatsContainerRequest,
) -> Result<pb::StatsContainerResponse> {
    let container = containers.get(&req.container_id)?;
    let mut resp = pb::StatsContainerResponse::new();
    resp.timestamp_unix_nanos = crate::runtime::now_unix_nanos();
    if let Some(cg) = container.cgroup() {
        let st = cg
            .stats()
            .map_err(|e| ContainerError::Setup(format!("cgroup stats: {e}")))?;
        let mut cpu = pb::CpuStats::new();
        cpu.usage_usec = st.cpu.usage_usec;
        cpu.user_usec = st.cpu.user_usec;
        cpu.system_usec = st.cpu.system_usec;
        cpu.nr_periods = st.cpu.nr_periods;
        cpu.nr_throttled = st.cpu.nr_throttled;
        cpu.throttled_usec = st.cpu.throttled_usec;
        resp.cpu = Some(cpu).into();
        let mut mem = pb::MemoryStats::new();
        mem.usage_bytes = st.memory.usage_bytes;
        mem.limit_bytes = st.memory.limit_bytes;
        mem.working_set_bytes = st.memory.working_set_bytes;
        mem.anon_bytes = st.memory.anon_bytes;
        mem.file_bytes = st.memory.file_bytes;
        mem.oom_events = st.memory.oom_events;
        mem.oom_kill_events = st.memory.oom_kill_events;
        mem.swap_usage_bytes = st.memory.swap_usage_bytes;
        mem.stat = st.memory.stat.into_iter().collect();
        resp.memory = Some(mem).into();
        let mut pids = pb::PidsStats::new();
        pids.current = st.pids.current;
        pids.limit = st.pids.limit;
        resp.pids = Some(pids).into();
    }
    for i in crate::runtime::cgroup::interface_stats(std::path::Path::new("/sys/class/net")) {
        let mut s = pb::InterfaceStats::new();
        s.name = i.name;
        s.rx_bytes = i.rx_bytes;
        s.rx_packets = i.rx_packets;
        s.rx_errors = i.rx_errors;
        s.rx_dropped = i.rx_dropped;
        s.tx_bytes = i.tx_bytes;
        s.tx_packets = i.tx_packets;
        s.tx_errors = i.tx_errors;
        s.tx_dropped = i.tx_dropped;
        resp.interfaces.push(s);
    }
    Ok(resp)
}

pub(super) fn update(
    containers: &Containers,
    req: &pb::UpdateContainerRequest,
) -> Result<pb::UpdateContainerResponse> {
    containers.update(&req.container_id, &req.resources_json)?;
    Ok(pb::UpdateContainerResponse::new())
}

pub(super) fn set_paused(containers: &Containers, container_id: &str, paused: bool) -> Result<()> {
    containers.set_paused(container_id, paused)
}

pub(super) fn copy_file(
    containers: &Containers,
    req: &pb::CopyFileRequest,
) -> Result<pb::CopyFileResponse> {
    if req.data.len() > protocol::MAX_COPY_FILE_CHUNK {
        return Err(ContainerError::InvalidArgument(format!(
            "chunk is larger than {} bytes",
            protocol::MAX_COPY_FILE_CHUNK
        )));
    }
    let (path, complete) = containers.files().write(&FileChunk {
        path: &req.path,
        file_size: req.file_size,
        offset: req.offset,
        data: &req.data,
        file_mode: req.file_mode,
        dir_mode: req.dir_mode,
        uid: req.uid,
        gid: req.gid,
    })?;
    let mut resp = pb::CopyFileResponse::new();
    resp.path = path.display().to_string();
    resp.complete = complete;
    Ok(resp)
}

pub(super) fn list_processes(
    containers: &Containers,
    req: &pb::ListProcessesRequest,
) -> Result<pb::ListProcessesResponse> {
    let container = containers.get(&req.container_id)?;
    let mut resp = pb::ListProcessesResponse::new();
    for (pid, exec_id) in container.pids() {
        let mut info = pb::ProcessInfo::new();
        info.pid = pid.unsigned_abs();
        info.exec_id = exec_id;
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            if let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) {
                info.ppid = rest
                    .split_whitespace()
                    .nth(1)
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(0);
            }
        }
        info.comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| c.trim_end().to_owned())
            .unwrap_or_default();
        info.cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| {
                String::from_utf8_lossy(&c)
                    .trim_end_matches('\0')
                    .replace('\0', " ")
            })
            .unwrap_or_default();
        resp.processes.push(info);
    }
    Ok(resp)
}

pub(super) fn get_events(
    containers: &Containers,
    req: &pb::GetEventsRequest,
) -> Result<pb::GetEventsResponse> {
    let max = match req.max_events {
        0 => protocol::MAX_EVENTS_PER_CALL,
        n => n.min(protocol::MAX_EVENTS_PER_CALL),
    };
    let wait = Duration::from_millis(u64::from(req.wait_ms.min(protocol::MAX_EVENTS_WAIT_MS)));
    let batch = containers.events().after(req.after_seq, max as usize, wait);
    let mut resp = pb::GetEventsResponse::new();
    resp.dropped = batch.dropped;
    resp.last_seq = batch.last_seq;
    for e in batch.events {
        let mut ev = pb::Event::new();
        ev.seq = e.seq;
        ev.container_id = e.container_id;
        ev.exec_id = e.exec_id;
        ev.pid = e.pid;
        ev.timestamp_unix_nanos = e.timestamp_unix_nanos;
        ev.type_ = match e.kind {
            EventKind::Created => pb::EventType::EVENT_CREATED,
            EventKind::Started => pb::EventType::EVENT_STARTED,
            EventKind::Exited {
                exit_code,
                signal,
                oom_killed,
            } => {
                ev.exit_code = exit_code;
                ev.signal = signal;
                ev.oom_killed = oom_killed;
                pb::EventType::EVENT_EXITED
            }
            EventKind::Oom => pb::EventType::EVENT_OOM,
            EventKind::Removed => pb::EventType::EVENT_REMOVED,
            EventKind::Paused => pb::EventType::EVENT_PAUSED,
            EventKind::Resumed => pb::EventType::EVENT_RESUMED,
        }
        .into();
        resp.events.push(ev);
    }
    Ok(resp)
}
