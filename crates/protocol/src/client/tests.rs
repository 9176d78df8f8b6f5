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
