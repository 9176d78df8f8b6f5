use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::*;
use crate::agent_ttrpc::{create_agent, Agent};

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "protocol-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Reads the `CONNECT <port>\n` line from a fresh connection.
fn read_connect_line(stream: &UnixStream) -> String {
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    line
}

/// A fake VMM socket that answers each accepted connection with the next reply in `replies`
/// (`None` closes the connection without answering) and returns what the clients sent.
fn fake_vmm(
    listener: UnixListener,
    replies: Vec<Option<&'static [u8]>>,
) -> JoinHandle<Vec<String>> {
    thread::spawn(move || {
        let mut seen = Vec::new();
        for reply in replies {
            let (mut stream, _) = listener.accept().unwrap();
            seen.push(read_connect_line(&stream));
            if let Some(reply) = reply {
                stream.write_all(reply).unwrap();
                // Keep the connection open until the client hangs up.
                let mut rest = Vec::new();
                let _ = stream.read_to_end(&mut rest);
            }
        }
        seen
    })
}

#[test]
fn handshake_ok_leaves_following_bytes_for_ttrpc() {
    let dir = TempDir::new();
    let path = dir.path("vsock.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let server = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let line = read_connect_line(&stream);
        stream.write_all(b"OK 1073741824\nTTRPC").unwrap();
        line
    });

    let mut stream = handshake(&path, 1024, Duration::from_secs(5)).unwrap();
    assert_eq!(server.join().unwrap(), "CONNECT 1024\n");
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"TTRPC");
}

#[test]
fn connect_succeeds_on_ok() {
    let dir = TempDir::new();
    let path = dir.path("vsock.sock");
    let server = fake_vmm(UnixListener::bind(&path).unwrap(), vec![Some(b"OK 42\n")]);
    let client = connect_vsock_uds(&path, 2048, Duration::from_secs(5)).unwrap();
    drop(client);
    assert_eq!(server.join().unwrap(), vec!["CONNECT 2048\n".to_owned()]);
}

#[test]
fn garbage_reply_fails_without_retry() {
    let dir = TempDir::new();
    let path = dir.path("vsock.sock");
    let server = fake_vmm(UnixListener::bind(&path).unwrap(), vec![Some(b"NOPE\n")]);
    let err = connect_vsock_uds(&path, 1024, Duration::from_secs(5))
        .err()
        .expect("connect must fail");
    assert!(
        matches!(&err, ConnectError::BadReply { reply } if reply == "NOPE"),
        "{err:?}"
    );
    assert_eq!(server.join().unwrap().len(), 1);
}

#[test]
fn reply_without_port_is_garbage() {
    assert_eq!(parse_ok_reply(b"OK 7"), Some(7));
    assert_eq!(parse_ok_reply(b"OK"), None);
    assert_eq!(parse_ok_reply(b"OK x"), None);
    assert_eq!(parse_ok_reply(b"ok 7"), None);
    assert_eq!(parse_ok_reply(b"OK 7 8"), None);
}

#[test]
fn overlong_reply_is_rejected() {
    let dir = TempDir::new();
    let path = dir.path("vsock.sock");
    let long: &'static [u8] = &[b'x'; 200];
    let server = fake_vmm(UnixListener::bind(&path).unwrap(), vec![Some(long)]);
    let err = connect_vsock_uds(&path, 1024, Duration::from_secs(5))
        .err()
        .expect("connect must fail");
    assert!(matches!(err, ConnectError::BadReply { .. }), "{err:?}");
    server.join().unwrap();
}

#[test]
fn eof_is_retried_until_ok() {
    let dir = TempDir::new();
    let path = dir.path("vsock.sock");
    let server = fake_vmm(
        UnixListener::bind(&path).unwrap(),
        vec![None, None, Some(b"OK 1\n")],
    );
    connect_vsock_uds(&path, 1024, Duration::from_secs(5)).unwrap();
    assert_eq!(server.join().unwrap().len(), 3);
}

#[test]
fn eof_until_deadline_times_out() {
    let dir = TempDir::new();
    let path = dir.path("vsock.sock");
    let listener = UnixListener::bind(&path).unwrap();
    listener.set_nonblocking(true).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let server = {
        let stop = stop.clone();
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(false).unwrap();
                        read_connect_line(&stream);
                    }
                    Err(_) => thread::sleep(Duration::from_millis(1)),
                }
            }
        })
    };
    let err = connect_vsock_uds(&path, 1024, Duration::from_millis(300))
        .err()
        .expect("connect must fail");
    stop.store(true, Ordering::Relaxed);
    server.join().unwrap();
    match err {
        ConnectError::Timeout { attempts, last, .. } => {
            assert!(attempts > 1);
            assert!(
                matches!(*last, ConnectError::Refused { port: 1024 }),
                "{last:?}"
            );
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn missing_socket_times_out() {
    let dir = TempDir::new();
    let err = connect_vsock_uds(dir.path("absent.sock"), 1024, Duration::from_millis(50))
        .err()
        .expect("connect must fail");
    match err {
        ConnectError::Timeout { last, .. } => {
            assert!(matches!(*last, ConnectError::Connect { .. }), "{last:?}")
        }
        other => panic!("unexpected {other:?}"),
    }
}

/// A minimal in-process agent for round trips through generated code and the wrapper.
struct EchoAgent;

impl Agent for EchoAgent {
    fn version(
        &self,
        _ctx: &::ttrpc::TtrpcContext,
        _req: agent::VersionRequest,
    ) -> ::ttrpc::Result<agent::VersionResponse> {
        let mut resp = agent::VersionResponse::new();
        resp.agent_version = "test".to_owned();
        resp.protocol_version = crate::PROTOCOL_VERSION;
        Ok(resp)
    }

    fn ping(
        &self,
        _ctx: &::ttrpc::TtrpcContext,
        req: agent::PingRequest,
    ) -> ::ttrpc::Result<agent::PingResponse> {
        let mut resp = agent::PingResponse::new();
        resp.nonce = req.nonce;
        Ok(resp)
    }

    fn read_block(
        &self,
        _ctx: &::ttrpc::TtrpcContext,
        req: agent::ReadBlockRequest,
    ) -> ::ttrpc::Result<agent::ReadBlockResponse> {
        if req.device.serial() != "disk0" {
            return Err(ttrpc::error::get_rpc_status(
                ttrpc::Code::NOT_FOUND,
                "no such disk",
            ));
        }
        let mut resp = agent::ReadBlockResponse::new();
        resp.data = vec![0xab; req.length as usize];
        resp.size_bytes = req.offset + u64::from(req.length);
        Ok(resp)
    }
}

/// Serves [`EchoAgent`] on `path`.
fn serve_echo(path: &std::path::Path) -> ttrpc::Server {
    let service = create_agent(Arc::new(EchoAgent));
    let mut server = ttrpc::Server::new()
        .bind(&format!("unix://{}", path.display()))
        .unwrap()
        .register_service(service);
    server.start().unwrap();
    server
}

/// Accepts one hybrid-vsock connection, answers OK and splices it to the agent at `agent_path`.
fn splicing_vmm(listener: UnixListener, agent_path: PathBuf) -> JoinHandle<()> {
    thread::spawn(move || {
        let (guest_side, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(guest_side.try_clone().unwrap());
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert_eq!(line, "CONNECT 1024\n");
        (&guest_side).write_all(b"OK 99\n").unwrap();
        let agent = UnixStream::connect(agent_path).unwrap();
        let (mut a_read, mut a_write) = (agent.try_clone().unwrap(), agent);
        let mut g_write = guest_side;
        let up = thread::spawn(move || {
            let _ = std::io::copy(&mut reader, &mut a_write);
            let _ = a_write.shutdown(std::net::Shutdown::Write);
        });
        let _ = std::io::copy(&mut a_read, &mut g_write);
        let _ = g_write.shutdown(std::net::Shutdown::Both);
        up.join().unwrap();
    })
}

#[test]
fn typed_calls_round_trip_through_hybrid_vsock() {
    let dir = TempDir::new();
    let agent_path = dir.path("agent.sock");
    let vmm_path = dir.path("vsock.sock");
    let server = serve_echo(&agent_path);
    let vmm = splicing_vmm(UnixListener::bind(&vmm_path).unwrap(), agent_path);

    let client =
        AgentClient::new(connect_vsock_uds(&vmm_path, 1024, Duration::from_secs(5)).unwrap())
            .with_timeout(Duration::from_secs(5));
    let version = client.version().unwrap();
    assert_eq!(version.agent_version, "test");
    assert_eq!(version.protocol_version, crate::PROTOCOL_VERSION);
    assert_eq!(client.ping(77).unwrap(), 77);

    let data = client
        .read_block(BlockTarget::Serial("disk0".to_owned()), 512, 16)
        .unwrap();
    assert_eq!(data.data, vec![0xab; 16]);
    assert_eq!(data.size_bytes, 528);

    let err = client
        .read_block(BlockTarget::Serial("other".to_owned()), 0, 1)
        .unwrap_err();
    assert_eq!(err.code(), Some(ttrpc::Code::NOT_FOUND));

    // Not implemented by EchoAgent: the generated default answers NOT_FOUND / UNIMPLEMENTED.
    assert!(client
        .block_size(BlockTarget::Path("/dev/vda".to_owned()))
        .is_err());

    drop(client);
    server.shutdown();
    vmm.join().unwrap();
}

#[test]
fn connect_unix_reaches_a_host_mode_agent() {
    let dir = TempDir::new();
    let agent_path = dir.path("agent.sock");
    let server = serve_echo(&agent_path);
    let client = AgentClient::new(connect_unix(&agent_path).unwrap());
    assert_eq!(client.ping(5).unwrap(), 5);
    drop(client);
    server.shutdown();
}

#[test]
// One range in a Vec is exactly what is meant: one CopyFile call.
#[allow(clippy::single_range_in_vec_init)]
fn copy_file_chunks_cover_the_file_in_order() {
    const MIB: usize = 1 << 20;
    assert_eq!(
        copy_file_chunks(5 * MIB / 2, crate::MAX_COPY_FILE_CHUNK),
        vec![0..MIB, MIB..2 * MIB, 2 * MIB..5 * MIB / 2]
    );
    assert_eq!(copy_file_chunks(2 * MIB, MIB), vec![0..MIB, MIB..2 * MIB]);
    assert_eq!(copy_file_chunks(1, MIB), vec![0..1]);
    // An empty file is still one call, so that the agent creates it.
    assert_eq!(copy_file_chunks(0, MIB), vec![0..0]);
    assert_eq!(copy_file_chunks(3, 0), vec![0..1, 1..2, 2..3]);
    for len in [1, 7, 4096, 4097, 65_535] {
        let chunks = copy_file_chunks(len, 4096);
        assert_eq!(chunks.first().unwrap().start, 0);
        assert_eq!(chunks.last().unwrap().end, len);
        assert!(chunks.windows(2).all(|w| w[0].end == w[1].start));
        assert!(chunks.iter().all(|c| !c.is_empty() && c.len() <= 4096));
    }
}

#[test]
fn block_rootfs_round_trips() {
    use protobuf::Message;

    let rootfs = agent::Rootfs::from_block_serial("rootfs-0", false, true).with_fs_type("xfs");
    let back = agent::Rootfs::parse_from_bytes(&rootfs.write_to_bytes().unwrap()).unwrap();
    assert_eq!(back.block().serial(), "rootfs-0");
    assert_eq!(back.fs_type, "xfs");
    assert!(back.overlay);
    assert!(!back.read_only);
}

/// One `CopyFile` call as the agent saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CopyCall {
    path: String,
    file_size: u64,
    offset: u64,
    data: Vec<u8>,
    modes: (u32, u32, u32, u32),
}

/// An in-process agent that records what the new protocol-3 calls carry.
#[derive(Default)]
struct RecordingAgent {
    copies: std::sync::Mutex<Vec<CopyCall>>,
    destroys: AtomicU32,
}

impl Agent for RecordingAgent {
    fn ping(
        &self,
        _ctx: &::ttrpc::TtrpcContext,
        req: agent::PingRequest,
    ) -> ::ttrpc::Result<agent::PingResponse> {
        let mut resp = agent::PingResponse::new();
        resp.nonce = req.nonce;
        Ok(resp)
    }

    fn copy_file(
        &self,
        _ctx: &::ttrpc::TtrpcContext,
        req: agent::CopyFileRequest,
    ) -> ::ttrpc::Result<agent::CopyFileResponse> {
        let complete = req.offset + req.data.len() as u64 == req.file_size;
        let mut resp = agent::CopyFileResponse::new();
        resp.path = format!("/run/hyperstart/files/{}", req.path);
        resp.complete = complete;
        self.copies.lock().unwrap().push(CopyCall {
            path: req.path,
            file_size: req.file_size,
            offset: req.offset,
            data: req.data,
            modes: (req.file_mode, req.dir_mode, req.uid, req.gid),
        });
        Ok(resp)
    }

    /// Echoes the call's ttrpc deadline (in `last_seq`) so tests can check the long-poll timeout.
    fn get_events(
        &self,
        ctx: &::ttrpc::TtrpcContext,
        req: agent::GetEventsRequest,
    ) -> ::ttrpc::Result<agent::GetEventsResponse> {
        let mut resp = agent::GetEventsResponse::new();
        resp.last_seq = ctx.timeout_nano as u64;
        resp.dropped = u64::from(req.wait_ms);
        Ok(resp)
    }

    /// Echoes the call's ttrpc deadline in `dropped_bytes`.
    fn read_stream(
        &self,
        ctx: &::ttrpc::TtrpcContext,
        _req: agent::ReadStreamRequest,
    ) -> ::ttrpc::Result<agent::ReadStreamResponse> {
        let mut resp = agent::ReadStreamResponse::new();
        resp.dropped_bytes = ctx.timeout_nano as u64;
        Ok(resp)
    }

    fn destroy_sandbox(
        &self,
        _ctx: &::ttrpc::TtrpcContext,
        _req: agent::DestroySandboxRequest,
    ) -> ::ttrpc::Result<agent::DestroySandboxResponse> {
        self.destroys.fetch_add(1, Ordering::SeqCst);
        Ok(agent::DestroySandboxResponse::new())
    }
}

fn serve_recording(path: &std::path::Path) -> (ttrpc::Server, Arc<RecordingAgent>) {
    let agent = Arc::new(RecordingAgent::default());
    let mut server = ttrpc::Server::new()
        .bind(&format!("unix://{}", path.display()))
        .unwrap()
        .register_service(create_agent(agent.clone()));
    server.start().unwrap();
    (server, agent)
}

#[test]
fn copy_file_sends_ordered_chunks_with_the_file_size() {
    let dir = TempDir::new();
    let path = dir.path("agent.sock");
    let (server, agent) = serve_recording(&path);
    let client = AgentClient::new(connect_unix(&path).unwrap());

    let data: Vec<u8> = (0..(5usize << 20) / 2).map(|i| (i % 251) as u8).collect();
    let written = client
        .copy_file("etc/hosts", &data, 0o644, 0o755, 1000, 1001)
        .unwrap();
    assert_eq!(written, "/run/hyperstart/files/etc/hosts");

    let copies = agent.copies.lock().unwrap().clone();
    assert_eq!(copies.len(), 3);
    let offsets: Vec<u64> = copies.iter().map(|c| c.offset).collect();
    assert_eq!(offsets, vec![0, 1 << 20, 2 << 20]);
    assert!(copies.iter().all(|c| c.file_size == data.len() as u64
        && c.path == "etc/hosts"
        && c.modes == (0o644, 0o755, 1000, 1001)
        && c.data.len() <= crate::MAX_COPY_FILE_CHUNK));
    let joined: Vec<u8> = copies.iter().flat_map(|c| c.data.clone()).collect();
    assert_eq!(joined, data);

    // An empty file is one call with file_size 0.
    agent.copies.lock().unwrap().clear();
    client.copy_file("empty", &[], 0o600, 0o700, 0, 0).unwrap();
    let copies = agent.copies.lock().unwrap().clone();
    assert_eq!(copies.len(), 1);
    assert_eq!((copies[0].file_size, copies[0].offset), (0, 0));

    drop(client);
    server.shutdown();
}

#[test]
fn long_polls_extend_the_call_deadline_by_the_wait() {
    let dir = TempDir::new();
    let path = dir.path("agent.sock");
    let (server, _agent) = serve_recording(&path);
    let client =
        AgentClient::new(connect_unix(&path).unwrap()).with_timeout(Duration::from_secs(2));
    let nanos = |d: Duration| d.as_nanos() as u64;

    let resp = client
        .get_events(0, 0, Duration::from_millis(7_500))
        .unwrap();
    assert_eq!(resp.dropped, 7_500, "wait_ms");
    assert!(
        resp.last_seq >= nanos(Duration::from_millis(9_500)),
        "{}",
        resp.last_seq
    );

    let resp = client
        .read_stream(
            "c",
            "",
            agent::Stream::STREAM_STDOUT,
            0,
            Duration::from_secs(3),
        )
        .unwrap();
    assert!(resp.dropped_bytes >= nanos(Duration::from_secs(5)));

    // A wait beyond u32::MAX milliseconds saturates instead of overflowing the deadline.
    let resp = client.get_events(0, 0, Duration::MAX).unwrap();
    assert_eq!(resp.dropped, u64::from(u32::MAX));

    drop(client);
    server.shutdown();
}

/// A Unix-socket proxy in front of `backend` whose client connections can be cut, as a VMM
/// restart or a lost vsock connection would.
struct CutProxy {
    accepted: Arc<std::sync::Mutex<Vec<UnixStream>>>,
}

impl CutProxy {
    fn start(listener: UnixListener, backend: PathBuf) -> CutProxy {
        let accepted = Arc::new(std::sync::Mutex::new(Vec::new()));
        let list = accepted.clone();
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = UnixStream::connect(&backend) else {
                    continue;
                };
                list.lock().unwrap().push(client.try_clone().unwrap());
                let (mut c_read, mut c_write) = (client.try_clone().unwrap(), client);
                let (mut s_read, mut s_write) = (server.try_clone().unwrap(), server);
                thread::spawn(move || {
                    let _ = std::io::copy(&mut c_read, &mut s_write);
                    let _ = s_write.shutdown(std::net::Shutdown::Both);
                });
                thread::spawn(move || {
                    let _ = std::io::copy(&mut s_read, &mut c_write);
                    let _ = c_write.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        CutProxy { accepted }
    }

    /// Breaks every connection accepted so far.
    fn cut(&self) {
        for stream in self.accepted.lock().unwrap().drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[test]
fn reconnecting_client_redials_and_retries_only_idempotent_calls() {
    let dir = TempDir::new();
    let agent_path = dir.path("agent.sock");
    let proxy_path = dir.path("proxy.sock");
    let (server, agent) = serve_recording(&agent_path);
    let proxy = CutProxy::start(UnixListener::bind(&proxy_path).unwrap(), agent_path);

    let client = ReconnectingClient::unix(&proxy_path).with_timeout(Duration::from_secs(5));
    assert_eq!(client.dials(), 0, "dialing is lazy");
    assert_eq!(client.ping(1).unwrap(), 1);
    assert_eq!(client.ping(2).unwrap(), 2);
    assert_eq!(client.dials(), 1);

    // Idempotent: the lost connection is replaced within the same call.
    proxy.cut();
    assert_eq!(client.ping(3).unwrap(), 3);
    assert_eq!(client.dials(), 2);

    // Not idempotent: the error comes back, the agent did not see a second attempt, and the
    // next call dials again.
    proxy.cut();
    let err = client.call_once(|c| c.destroy_sandbox()).unwrap_err();
    assert!(err.is_connection_lost(), "{err:?}");
    assert_eq!(agent.destroys.load(Ordering::SeqCst), 0);
    assert_eq!(client.dials(), 2);
    client.call_once(|c| c.destroy_sandbox()).unwrap();
    assert_eq!(agent.destroys.load(Ordering::SeqCst), 1);
    assert_eq!(client.dials(), 3);

    // A status error is an answer, not a lost connection: no reconnection.
    let err = client.call_once(|c| c.health()).unwrap_err();
    assert!(err.code().is_some() && !err.is_connection_lost(), "{err:?}");
    assert_eq!(client.dials(), 3);

    // Nothing to dial: the connect error is reported.
    server.shutdown();
    proxy.cut();
    std::fs::remove_file(&proxy_path).unwrap();
    let err = client.ping(4).unwrap_err();
    assert!(matches!(err, RpcError::Connect(_)), "{err:?}");
    client.disconnect();
    assert_eq!(client.dials(), 3);
}

#[test]
fn connection_loss_classification() {
    let lost = |e: ttrpc::Error| RpcError::from(e).is_connection_lost();
    assert!(lost(ttrpc::Error::Socket("socket disconnected".into())));
    assert!(lost(ttrpc::Error::RemoteClosed));
    assert!(lost(ttrpc::Error::LocalClosed));
    assert!(lost(ttrpc::Error::Eof));
    assert!(lost(ttrpc::Error::Others(
        "Receive packet from Receiver error: receiving on a closed channel".into()
    )));
    // A timeout says nothing about the connection.
    assert!(!lost(ttrpc::Error::Others(
        "Receive packet from Receiver timeout: timed out waiting on channel".into()
    )));
    assert!(!lost(ttrpc::error::get_rpc_status(
        ttrpc::Code::NOT_FOUND,
        "no such container"
    )));
}
