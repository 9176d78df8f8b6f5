//! The service in host mode: a real ttrpc server on a Unix socket and the real host client.

use std::time::Duration;

use protocol::agent as pb;
use protocol::client::{connect_unix, BlockTarget};
use protocol::AgentClient;
use ttrpc::Code;

use super::*;
use crate::block::fake::FakeDisks;
use crate::server::{serve, ListenAddr};

struct Harness {
    disks: FakeDisks,
    server: Option<ttrpc::Server>,
    client: AgentClient,
}

impl Harness {
    fn start(tag: &str, debug: bool) -> Harness {
        let disks = FakeDisks::new(tag);
        let content: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        disks.add("vda", Some(b"rootfs-abc\n"), &content);
        let socket = disks.path("agent.sock");
        let service = AgentService::new(ServiceConfig {
            debug,
            block: disks.devices(),
            power: PowerMode::HostProcess,
        });
        let server = serve(&ListenAddr::Unix(socket.clone()), service).unwrap();
        let client =
            AgentClient::new(connect_unix(&socket).unwrap()).with_timeout(Duration::from_secs(10));
        Harness {
            disks,
            server: Some(server),
            client,
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown();
        }
    }
}

fn serial(s: &str) -> BlockTarget {
    BlockTarget::Serial(s.to_owned())
}

#[test]
fn version_and_ping() {
    let h = Harness::start("svc-version", false);
    let v = h.client.version().unwrap();
    assert_eq!(v.agent_version, crate::AGENT_VERSION);
    assert_eq!(v.protocol_version, PROTOCOL_VERSION);
    assert_eq!(h.client.ping(0xdead_beef).unwrap(), 0xdead_beef);
}

#[test]
fn read_block_by_serial_and_path() {
    let h = Harness::start("svc-read", false);
    let r = h.client.read_block(serial("rootfs-abc"), 100, 10).unwrap();
    let expected: Vec<u8> = (100..110u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(r.data, expected);
    assert_eq!(r.size_bytes, 8192);
    assert_eq!(r.path, "/dev/vda");

    let r = h
        .client
        .read_block(
            BlockTarget::Path("/dev/vda".into()),
            8000,
            protocol::MAX_READ_BLOCK_LEN,
        )
        .unwrap();
    assert_eq!(r.data.len(), 192);
    assert_eq!(h.client.block_size(serial("rootfs-abc")).unwrap(), 8192);

    // The device grows (hot swap): the next call sees it.
    std::fs::write(h.disks.path("dev/vda"), vec![7u8; 16384]).unwrap();
    let r = h
        .client
        .read_block(serial("rootfs-abc"), 16380, 100)
        .unwrap();
    assert_eq!((r.size_bytes, r.data), (16384, vec![7; 4]));
}

#[test]
fn read_block_errors_have_the_right_codes() {
    let h = Harness::start("svc-read-errors", false);
    let code = |r: Result<pb::ReadBlockResponse, protocol::RpcError>| r.unwrap_err().code();
    assert_eq!(
        code(h.client.read_block(serial("nope"), 0, 1)),
        Some(Code::NOT_FOUND)
    );
    assert_eq!(
        code(
            h.client
                .read_block(BlockTarget::Path("/etc/passwd".into()), 0, 1)
        ),
        Some(Code::INVALID_ARGUMENT)
    );
    assert_eq!(
        code(
            h.client
                .read_block(serial("rootfs-abc"), 0, protocol::MAX_READ_BLOCK_LEN + 1)
        ),
        Some(Code::INVALID_ARGUMENT)
    );
    assert_eq!(
        code(h.client.read_block(serial("rootfs-abc"), 9000, 1)),
        Some(Code::INVALID_ARGUMENT)
    );
    // No selector at all.
    let err = h
        .client
        .raw()
        .read_block(
            ttrpc::context::with_timeout(0),
            &pb::ReadBlockRequest::new(),
        )
        .unwrap_err();
    assert_eq!(
        protocol::RpcError::from(err).code(),
        Some(Code::INVALID_ARGUMENT)
    );
}

#[test]
fn debug_panic_needs_debug() {
    let h = Harness::start("svc-debug", false);
    assert_eq!(
        h.client.debug_panic().unwrap_err().code(),
        Some(Code::PERMISSION_DENIED)
    );
}

#[test]
fn network_requests_are_validated_before_acting() {
    let h = Harness::start("svc-net", false);
    let mut req = pb::UpdateInterfaceRequest::new();
    req.name = "eth0/../x".into();
    assert_eq!(
        h.client.update_interface(&req).unwrap_err().code(),
        Some(Code::INVALID_ARGUMENT)
    );
    req.name = "eth0".into();
    req.mac = "01:00:5e:00:00:01".into();
    assert_eq!(
        h.client.update_interface(&req).unwrap_err().code(),
        Some(Code::INVALID_ARGUMENT)
    );

    let mut route = pb::Route::new();
    route.destination = "10.0.0.1/8".into();
    route.gateway = "10.0.0.254".into();
    assert_eq!(
        h.client.update_routes(vec![route]).unwrap_err().code(),
        Some(Code::INVALID_ARGUMENT)
    );

    for (addr, count, timeout) in [
        ("host", 1, 100),
        ("10.0.0.1", 0, 100),
        ("10.0.0.1", 1, 0),
        ("10.0.0.1", 101, 10),
    ] {
        let err = h.client.ping_host(addr, count, timeout).unwrap_err();
        assert_eq!(
            err.code(),
            Some(Code::INVALID_ARGUMENT),
            "{addr} {count} {timeout}"
        );
    }
}
