//! Case 4's requests: valid messages carrying hostile values, and what each must get back.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use protobuf::{Message, MessageDyn};
use protocol::agent::{self as pb};
use ttrpc::Code;

use super::messages::nested_json;
use super::wire::{code_name, hex_prefix, read_reply, request_body, request_frame, Reply};
use super::{ANSWER_TIMEOUT, ESCAPE_MARKER, SERVICE};

/// What a hostile request must get.
#[derive(Debug, Clone, Copy)]
pub enum Expect {
    /// A client-error status: INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, or
    /// UNIMPLEMENTED while the RPC is not implemented. Never OK, INTERNAL or UNKNOWN.
    Refused,
    /// A valid request whose sizes and waits the agent clamps: OK (or not implemented yet),
    /// within `within`.
    Clamped { within: Duration },
}

pub struct Hostile {
    pub what: String,
    pub method: &'static str,
    pub payload: Vec<u8>,
    pub expect: Expect,
}

pub fn refused(what: impl Into<String>, method: &'static str, msg: &dyn MessageDyn) -> Hostile {
    Hostile {
        what: what.into(),
        method,
        payload: msg.write_to_bytes_dyn().unwrap(),
        expect: Expect::Refused,
    }
}

/// Codes a refusal may carry. The generated default for an unimplemented RPC is NOT_FOUND
/// ("... is not supported").
pub fn is_refusal(code: i32) -> bool {
    [
        Code::INVALID_ARGUMENT,
        Code::NOT_FOUND,
        Code::UNIMPLEMENTED,
        Code::FAILED_PRECONDITION,
    ]
    .iter()
    .any(|c| *c as i32 == code)
}

pub fn is_clamped_ok(code: i32) -> bool {
    [Code::OK, Code::NOT_FOUND, Code::UNIMPLEMENTED]
        .iter()
        .any(|c| *c as i32 == code)
}

pub const BUSYBOX: &str = "/bin/busybox";
pub const VICTIM: &str = "victim";

/// Container ids no RPC may accept (nor resolve to [`VICTIM`]).
pub fn hostile_ids() -> Vec<String> {
    vec![
        "".to_owned(),
        "a/b".to_owned(),
        "..".to_owned(),
        ".".to_owned(),
        "../victim".to_owned(),
        "victim/..".to_owned(),
        "/victim".to_owned(),
        "victim\0".to_owned(),
        "\0".to_owned(),
        "victim\n".to_owned(),
        " victim".to_owned(),
        "-victim".to_owned(),
        "x".repeat(129),
        "x".repeat(10_240),
    ]
}

pub fn spec_json(args: &[&str]) -> Vec<u8> {
    let args: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
    format!(
        r#"{{"ociVersion":"1.0.2","root":{{"path":"rootfs"}},"process":{{"args":[{}],"cwd":"/","env":["PATH=/bin"],"user":{{"uid":0,"gid":0}}}}}}"#,
        args.join(",")
    )
    .into_bytes()
}

pub fn make_rootfs(root: &Path) {
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy(BUSYBOX, root.join("bin/busybox")).unwrap();
    for applet in ["sh", "sleep", "true"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
}

pub fn sandbox_requests() -> Vec<Hostile> {
    let mut out = Vec::new();
    let base = pb::CreateSandboxRequest::new;
    for hostname in ["x".repeat(65), "x".repeat(10_240), "a\nb".to_owned()] {
        let mut req = base();
        req.hostname = hostname.clone();
        out.push(refused(
            format!("hostname {}", hex_prefix(hostname.as_bytes())),
            "CreateSandbox",
            &req,
        ));
    }
    for (name, value) in [
        ("kernel.hostname", "pwned"),
        ("../../../proc/sys/kernel/hostname", "pwned"),
        ("kernel/../kernel/hostname", "pwned"),
        ("", "1"),
        (".", "1"),
        ("kernel.msgmax", "not-a-number"),
        ("kernel.shm_rmid_forced", "1\nkernel.hostname=pwned"),
        ("x/../../../../etc/passwd", "pwned"),
    ] {
        let mut req = base();
        req.sysctls.insert(name.to_owned(), value.to_owned());
        out.push(refused(
            format!("sysctl {name:?}={value:?}"),
            "CreateSandbox",
            &req,
        ));
    }
    for (servers, searches, options) in [
        (vec!["1.1.1.1\nnameserver 6.6.6.6"], vec![], vec![]),
        (vec!["not-an-ip"], vec![], vec![]),
        (vec!["1.1.1.1"], vec!["a b\nnameserver 6.6.6.6"], vec![]),
        (vec!["1.1.1.1"], vec![], vec!["ndots:5\nnameserver 6.6.6.6"]),
    ] {
        let mut req = base();
        let mut dns = pb::DnsConfig::new();
        dns.servers = servers.iter().map(|s| s.to_string()).collect();
        dns.searches = searches.iter().map(|s| s.to_string()).collect();
        dns.options = options.iter().map(|s| s.to_string()).collect();
        req.dns = Some(dns).into();
        out.push(refused(
            format!("dns {servers:?} {searches:?} {options:?}"),
            "CreateSandbox",
            &req,
        ));
    }
    out
}

/// Every container RPC with every hostile container id (and every hostile exec id on the
/// victim), CreateContainer included.
pub fn id_requests(rootfs: &str) -> Vec<Hostile> {
    let mut out = Vec::new();
    let process = br#"{"args":["/bin/true"],"cwd":"/","user":{"uid":0,"gid":0}}"#.to_vec();
    for id in hostile_ids() {
        let what = |m: &str| format!("{m} container_id {}", hex_prefix(id.as_bytes()));
        let mut create = pb::CreateContainerRequest::new();
        create.container_id = id.clone();
        create.oci_spec_json = spec_json(&["sleep", "60"]);
        create.rootfs = Some(pb::Rootfs::from_host_dir(rootfs, false)).into();
        out.push(refused(what("CreateContainer"), "CreateContainer", &create));

        macro_rules! by_id {
            ($method:literal, $ty:ty) => {{
                let mut req = <$ty>::new();
                req.container_id = id.clone();
                out.push(refused(what($method), $method, &req));
            }};
        }
        by_id!("StartContainer", pb::StartContainerRequest);
        by_id!("RemoveContainer", pb::RemoveContainerRequest);
        by_id!("StatsContainer", pb::StatsContainerRequest);
        by_id!("PauseContainer", pb::PauseContainerRequest);
        by_id!("ResumeContainer", pb::ResumeContainerRequest);
        by_id!("ListProcesses", pb::ListProcessesRequest);
        by_id!("CloseStdin", pb::CloseStdinRequest);

        let mut update = pb::UpdateContainerRequest::new();
        update.container_id = id.clone();
        update.resources_json = b"{}".to_vec();
        out.push(refused(what("UpdateContainer"), "UpdateContainer", &update));
        let mut signal = pb::SignalProcessRequest::new();
        signal.container_id = id.clone();
        signal.signal = 9;
        out.push(refused(what("SignalProcess"), "SignalProcess", &signal));
        let mut wait = pb::WaitProcessRequest::new();
        wait.container_id = id.clone();
        out.push(refused(what("WaitProcess"), "WaitProcess", &wait));
        let mut read = pb::ReadStreamRequest::new();
        read.container_id = id.clone();
        read.stream = pb::Stream::STREAM_STDOUT.into();
        out.push(refused(what("ReadStream"), "ReadStream", &read));
        let mut write = pb::WriteStdinRequest::new();
        write.container_id = id.clone();
        write.data = b"x".to_vec();
        out.push(refused(what("WriteStdin"), "WriteStdin", &write));
        let mut resize = pb::ResizeTtyRequest::new();
        resize.container_id = id.clone();
        resize.rows = 24;
        resize.cols = 80;
        out.push(refused(what("ResizeTty"), "ResizeTty", &resize));
        let mut exec = pb::ExecProcessRequest::new();
        exec.container_id = id.clone();
        exec.exec_id = "e1".to_owned();
        exec.process_json = process.clone();
        out.push(refused(what("ExecProcess"), "ExecProcess", &exec));
    }
    // Hostile exec ids on the real container ("" is its init process, so not hostile).
    for exec_id in hostile_ids().into_iter().filter(|e| !e.is_empty()) {
        let what = |m: &str| format!("{m} victim exec_id {}", hex_prefix(exec_id.as_bytes()));
        let mut exec = pb::ExecProcessRequest::new();
        exec.container_id = VICTIM.to_owned();
        exec.exec_id = exec_id.clone();
        exec.process_json = process.clone();
        out.push(refused(what("ExecProcess"), "ExecProcess", &exec));
        let mut signal = pb::SignalProcessRequest::new();
        signal.container_id = VICTIM.to_owned();
        signal.exec_id = exec_id.clone();
        signal.signal = 9;
        out.push(refused(what("SignalProcess"), "SignalProcess", &signal));
        let mut wait = pb::WaitProcessRequest::new();
        wait.container_id = VICTIM.to_owned();
        wait.exec_id = exec_id.clone();
        out.push(refused(what("WaitProcess"), "WaitProcess", &wait));
        let mut resize = pb::ResizeTtyRequest::new();
        resize.container_id = VICTIM.to_owned();
        resize.exec_id = exec_id.clone();
        resize.rows = 24;
        resize.cols = 80;
        out.push(refused(what("ResizeTty"), "ResizeTty", &resize));
        let mut write = pb::WriteStdinRequest::new();
        write.container_id = VICTIM.to_owned();
        write.exec_id = exec_id.clone();
        write.data = b"x".to_vec();
        out.push(refused(what("WriteStdin"), "WriteStdin", &write));
    }
    out
}

/// Bad numbers, bad JSON, bad rootfs, all aimed at the running victim.
pub fn value_requests(rootfs: &str) -> Vec<Hostile> {
    let mut out = Vec::new();
    for signal in [0, 65, 1000, u32::MAX] {
        let mut req = pb::SignalProcessRequest::new();
        req.container_id = VICTIM.to_owned();
        req.signal = signal;
        out.push(refused(format!("signal {signal}"), "SignalProcess", &req));
    }
    for stream in [0, 3, -1] {
        let mut req = pb::ReadStreamRequest::new();
        req.container_id = VICTIM.to_owned();
        req.stream = protobuf::EnumOrUnknown::from_i32(stream);
        out.push(refused(format!("stream {stream}"), "ReadStream", &req));
    }
    let mut req = pb::WriteStdinRequest::new();
    req.container_id = VICTIM.to_owned();
    req.data = vec![b'x'; protocol::MAX_WRITE_STDIN_LEN + 1];
    out.push(refused("stdin write over the limit", "WriteStdin", &req));
    for (rows, cols) in [(0, 0), (u32::MAX, u32::MAX), (70_000, 80)] {
        let mut req = pb::ResizeTtyRequest::new();
        req.container_id = VICTIM.to_owned();
        req.rows = rows;
        req.cols = cols;
        out.push(refused(
            format!("resize {rows}x{cols} without a terminal"),
            "ResizeTty",
            &req,
        ));
    }
    let garbage: Vec<(String, Vec<u8>)> = [
        &b""[..],
        b"{",
        b"null",
        b"[]",
        b"\"args\"",
        b"{\"args\":[]}",
        b"{\"args\":\"sh\"}",
        b"{\"args\":[\"/bin/true\"],\"user\":{\"uid\":-1}}",
        b"\xff\xfe{}",
    ]
    .iter()
    .map(|j| (hex_prefix(j), j.to_vec()))
    .chain([("nested 10000".to_owned(), nested_json(10_000))])
    .collect();
    for (i, (what, json)) in garbage.iter().enumerate() {
        let mut req = pb::ExecProcessRequest::new();
        req.container_id = VICTIM.to_owned();
        req.exec_id = format!("garbage-{i}");
        req.process_json = json.clone();
        out.push(refused(format!("process_json {what}"), "ExecProcess", &req));
        let mut req = pb::CreateContainerRequest::new();
        req.container_id = format!("garbage-{i}");
        req.oci_spec_json = json.clone();
        req.rootfs = Some(pb::Rootfs::from_host_dir(rootfs, false)).into();
        out.push(refused(
            format!("oci_spec_json {what}"),
            "CreateContainer",
            &req,
        ));
    }
    for json in [
        &b""[..],
        b"{",
        b"[]",
        b"{\"memory\":{\"limit\":\"x\"}}",
        b"{\"pids\":{\"limit\":\"many\"}}",
    ] {
        let mut req = pb::UpdateContainerRequest::new();
        req.container_id = VICTIM.to_owned();
        req.resources_json = json.to_vec();
        out.push(refused(
            format!("resources_json {}", hex_prefix(json)),
            "UpdateContainer",
            &req,
        ));
    }
    let rootfses: Vec<(&str, Option<pb::Rootfs>)> = vec![
        ("no rootfs", None),
        (
            "empty host path",
            Some(pb::Rootfs::from_host_dir("", false)),
        ),
        (
            "relative host path",
            Some(pb::Rootfs::from_host_dir("rootfs", false)),
        ),
        (
            "disk serial ../../x",
            Some(pb::Rootfs::from_block_serial("../../x", false, false)),
        ),
        ("disk path /etc/passwd", {
            let mut r = pb::Rootfs::new();
            r.set_block(protocol::client::BlockTarget::Path("/etc/passwd".into()).into());
            Some(r)
        }),
        (
            "fs_type ../x",
            Some(pb::Rootfs::from_block_serial("scratch", true, false).with_fs_type("../x")),
        ),
        (
            "fs_type with options",
            Some(
                pb::Rootfs::from_block_serial("scratch", true, false)
                    .with_fs_type("ext4,exec,suid"),
            ),
        ),
        (
            "fs_type 300 bytes",
            Some(
                pb::Rootfs::from_block_serial("scratch", true, false).with_fs_type("x".repeat(300)),
            ),
        ),
    ];
    for (i, (what, rootfs)) in rootfses.into_iter().enumerate() {
        let mut req = pb::CreateContainerRequest::new();
        req.container_id = format!("rootfs-{i}");
        req.oci_spec_json = spec_json(&["true"]);
        req.rootfs = rootfs.into();
        out.push(refused(format!("rootfs: {what}"), "CreateContainer", &req));
    }
    for path in [
        "/dev/../etc/passwd",
        "/etc/passwd",
        "/dev/vdb/../../etc/passwd",
    ] {
        let mut req = pb::ReadBlockRequest::new();
        req.device = Some(protocol::client::BlockTarget::Path(path.into()).into()).into();
        req.length = 16;
        out.push(refused(format!("ReadBlock {path}"), "ReadBlock", &req));
    }
    let mut req = pb::ReadBlockRequest::new();
    req.device =
        Some(protocol::client::BlockTarget::Serial("../../etc/passwd".into()).into()).into();
    req.length = 16;
    out.push(refused(
        "ReadBlock serial ../../etc/passwd",
        "ReadBlock",
        &req,
    ));
    let mut req = pb::ReadBlockRequest::new();
    req.device = Some(protocol::client::BlockTarget::Serial("scratch".into()).into()).into();
    req.length = u32::MAX;
    out.push(refused("ReadBlock length u32::MAX", "ReadBlock", &req));
    out
}

/// CopyFile requests that try to leave the file store or break its size rules.
pub fn copy_file_requests() -> Vec<Hostile> {
    let mut out = Vec::new();
    let copy = |path: &str, file_size: u64, offset: u64, data: Vec<u8>| {
        let mut req = pb::CopyFileRequest::new();
        req.path = path.to_owned();
        req.file_size = file_size;
        req.offset = offset;
        req.data = data;
        req.file_mode = 0o644;
        req.dir_mode = 0o755;
        req
    };
    let marker = ESCAPE_MARKER.to_vec();
    let len = marker.len() as u64;
    for path in [
        "../../etc/passwd".to_owned(),
        "../passwd".to_owned(),
        "/abs".to_owned(),
        "/etc/passwd".to_owned(),
        "a/../../b".to_owned(),
        "a/../b/../../b".to_owned(),
        "".to_owned(),
        ".".to_owned(),
        "..".to_owned(),
        "a/..".to_owned(),
        "a\0b".to_owned(),
        "x".repeat(10_240),
    ] {
        out.push(refused(
            format!("CopyFile path {}", hex_prefix(path.as_bytes())),
            "CopyFile",
            &copy(&path, len, 0, marker.clone()),
        ));
    }
    let limit = protocol::MAX_COPY_FILE_SIZE;
    for (what, req) in [
        (
            "file_size over MAX_COPY_FILE_SIZE",
            copy("big", limit + 1, 0, marker.clone()),
        ),
        (
            "file_size u64::MAX",
            copy("big2", u64::MAX, 0, marker.clone()),
        ),
        (
            "offset + len overflowing u64",
            copy("wrap", u64::MAX, u64::MAX - 4, marker.clone()),
        ),
        (
            "first chunk not at offset 0",
            copy("late", len + 5, 5, marker.clone()),
        ),
        ("data beyond file_size", copy("over", 4, 0, marker.clone())),
        (
            "chunk over MAX_COPY_FILE_CHUNK",
            copy(
                "chunk",
                protocol::MAX_COPY_FILE_CHUNK as u64 + 1,
                0,
                [
                    marker.clone(),
                    vec![b'x'; protocol::MAX_COPY_FILE_CHUNK + 1 - marker.len()],
                ]
                .concat(),
            ),
        ),
    ] {
        out.push(refused(what, "CopyFile", &req));
    }
    out
}

/// Requests that are valid only because the agent clamps them; they may wait up to the clamp.
pub fn clamped_requests() -> Vec<Hostile> {
    let slack = Duration::from_secs(5);
    let clamp = |ms: u32| Expect::Clamped {
        within: Duration::from_millis(u64::from(ms)) + slack,
    };
    let mut out = Vec::new();
    let mut req = pb::GetEventsRequest::new();
    req.max_events = u32::MAX;
    out.push(Hostile {
        what: "GetEvents max_events u32::MAX".into(),
        method: "GetEvents",
        payload: req.write_to_bytes().unwrap(),
        expect: clamp(0),
    });
    let mut req = pb::GetEventsRequest::new();
    req.after_seq = u64::MAX;
    req.wait_ms = u32::MAX;
    req.max_events = u32::MAX;
    out.push(Hostile {
        what: "GetEvents wait_ms u32::MAX".into(),
        method: "GetEvents",
        payload: req.write_to_bytes().unwrap(),
        expect: clamp(protocol::MAX_EVENTS_WAIT_MS),
    });
    let mut req = pb::ReadStreamRequest::new();
    req.container_id = VICTIM.to_owned();
    req.stream = pb::Stream::STREAM_STDOUT.into();
    req.max_bytes = u32::MAX;
    out.push(Hostile {
        what: "ReadStream max_bytes u32::MAX".into(),
        method: "ReadStream",
        payload: req.write_to_bytes().unwrap(),
        expect: clamp(0),
    });
    let mut req = pb::ReadStreamRequest::new();
    req.container_id = VICTIM.to_owned();
    req.stream = pb::Stream::STREAM_STDERR.into();
    req.max_bytes = u32::MAX;
    req.wait_ms = u32::MAX;
    out.push(Hostile {
        what: "ReadStream wait_ms u32::MAX".into(),
        method: "ReadStream",
        payload: req.write_to_bytes().unwrap(),
        expect: clamp(protocol::MAX_READ_STREAM_WAIT_MS),
    });
    out
}

/// One hostile request on its own connection, checked against its expectation. `Err` carries
/// the failure description.
pub fn check_hostile(sock: &Path, h: &Hostile) -> Result<(), String> {
    let mut conn = UnixStream::connect(sock).map_err(|e| format!("connect: {e}"))?;
    conn.set_write_timeout(Some(ANSWER_TIMEOUT)).unwrap();
    let body = request_body(SERVICE.as_bytes(), h.method.as_bytes(), &h.payload, 0, &[]);
    let started = Instant::now();
    conn.write_all(&request_frame(1, &body))
        .map_err(|e| format!("{}: writing: {e}", h.what))?;
    let patience = match h.expect {
        Expect::Refused => ANSWER_TIMEOUT,
        Expect::Clamped { within } => within,
    };
    let reply = read_reply(&mut conn, patience).map_err(|v| format!("{}: {v}", h.what))?;
    let elapsed = started.elapsed();
    match (h.expect, reply) {
        (Expect::Refused, Reply::Answer { code, .. }) if is_refusal(code) => Ok(()),
        (Expect::Clamped { .. }, Reply::Answer { code, .. }) if is_clamped_ok(code) => Ok(()),
        (_, Reply::Answer { code, message, .. }) => Err(format!(
            "{} ({}): answered {} {message:?}",
            h.what,
            h.method,
            code_name(code)
        )),
        (_, other) => Err(format!(
            "{} ({}): {other:?} after {elapsed:?}",
            h.what, h.method
        )),
    }
}
