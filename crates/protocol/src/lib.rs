//! The hyperstart agent protocol, shared by the host (VMM, sandbox manager) and the guest agent.
//!
//! - [`agent`]: protobuf messages generated from `protos/agent.proto` (package `hyperstart.v1`).
//! - [`agent_ttrpc`]: the generated ttrpc service (`Agent` trait, `create_agent`) and raw client.
//! - [`client`]: host-side connection helpers (hybrid vsock handshake) and [`AgentClient`], a typed
//!   wrapper with per-call timeouts.
//! - Constants both sides must agree on: protocol version, default vsock port, boot timer port.

#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::undocumented_unsafe_blocks,
    missing_docs,
    unused_qualifications
)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/generated.rs"));
}

pub use generated::{agent, agent_ttrpc};

pub mod client;

pub use client::{AgentClient, ConnectError, RpcError};

/// Version of the `hyperstart.v1` protocol this build speaks. Bumped on every compatible addition
/// (new RPC or field); an incompatible change gets a new protobuf package instead.
pub const PROTOCOL_VERSION: u32 = 5;

/// Largest file `CopyFile` writes (16 MiB): config maps and secrets are at most 1 MiB.
pub const MAX_COPY_FILE_SIZE: u64 = 16 << 20;

/// Largest `CopyFileRequest.data` per call (1 MiB).
pub const MAX_COPY_FILE_CHUNK: usize = 1 << 20;

/// Most events one `GetEvents` call returns.
pub const MAX_EVENTS_PER_CALL: u32 = 256;

/// Longest `GetEventsRequest.wait_ms` honoured.
pub const MAX_EVENTS_WAIT_MS: u32 = 10_000;

/// Events the agent keeps for `GetEvents`; older ones are counted as dropped.
pub const EVENT_LOG_CAPACITY: usize = 4096;

/// Output kept per stream of a container process (stdout, stderr) until read: 1 MiB.
pub const MAX_STREAM_BUFFER: usize = 1 << 20;

/// Largest `ReadStreamResponse.data` (256 KiB).
pub const MAX_READ_STREAM_LEN: u32 = 256 << 10;

/// Longest `ReadStreamRequest.wait_ms` honoured.
pub const MAX_READ_STREAM_WAIT_MS: u32 = 10_000;

/// Largest `WriteStdinRequest.data` accepted (1 MiB).
pub const MAX_WRITE_STDIN_LEN: usize = 1 << 20;

/// vsock port the agent listens on unless the kernel command line sets `hyperstart.port=<n>`.
pub const DEFAULT_AGENT_PORT: u32 = 1024;

/// Vsock port on which the agent accepts a power-off request (a line `poweroff`): the VMM's
/// graceful stop, a virtual power button for a machine without ACPI.
pub const POWEROFF_PORT: u32 = 1025;

/// Largest `ReadBlockRequest.length` the agent accepts (1 MiB).
pub const MAX_READ_BLOCK_LEN: u32 = 1 << 20;

/// Largest `PingHostRequest.count` the agent accepts.
pub const MAX_PING_COUNT: u32 = 100;

/// Largest `PingHostRequest.timeout_ms` the agent accepts (per echo request).
pub const MAX_PING_TIMEOUT_MS: u32 = 10_000;

/// I/O port the guest writes [`BOOT_TIMER_MAGIC`] to once the agent is ready to serve; the VMM
/// traps the write and logs the boot time (the same scheme as Firecracker's boot timer device).
pub const BOOT_TIMER_PORT: u16 = 0x440;

/// Byte written to [`BOOT_TIMER_PORT`] to signal readiness.
pub const BOOT_TIMER_MAGIC: u8 = 123;

#[cfg(test)]
mod tests {
    use protobuf::Message;

    use super::agent::{block_device, BlockDevice, ReadBlockRequest, ReadBlockResponse};

    #[test]
    fn read_block_request_round_trips() {
        let mut req = ReadBlockRequest::new();
        let mut dev = BlockDevice::new();
        dev.set_serial("rootfs-0".to_owned());
        req.device = Some(dev).into();
        req.offset = 4096;
        req.length = 512;

        let bytes = req.write_to_bytes().unwrap();
        let back = ReadBlockRequest::parse_from_bytes(&bytes).unwrap();
        assert_eq!(back, req);
        assert_eq!(
            back.device.selector,
            Some(block_device::Selector::Serial("rootfs-0".to_owned()))
        );
    }

    #[test]
    fn read_block_response_round_trips_binary_data() {
        let mut resp = ReadBlockResponse::new();
        resp.data = (0..=255u8).collect();
        resp.size_bytes = 1 << 30;
        resp.path = "/dev/vdb".to_owned();
        let back = ReadBlockResponse::parse_from_bytes(&resp.write_to_bytes().unwrap()).unwrap();
        assert_eq!(back, resp);
    }

    #[test]
    fn container_messages_round_trip() {
        use super::agent::{
            rootfs, CreateContainerRequest, ReadStreamRequest, Rootfs, Stream, WaitProcessResponse,
        };

        let mut req = CreateContainerRequest::new();
        req.container_id = "c1".to_owned();
        req.oci_spec_json = br#"{"ociVersion":"1.0.2"}"#.to_vec();
        req.rootfs = Some(Rootfs::from_host_dir("/rootfs", true)).into();
        let back =
            CreateContainerRequest::parse_from_bytes(&req.write_to_bytes().unwrap()).unwrap();
        assert_eq!(back, req);
        assert_eq!(
            back.rootfs.source,
            Some(rootfs::Source::HostPath("/rootfs".to_owned()))
        );
        assert!(back.rootfs.read_only);

        // The rootfs can name a disk by serial instead.
        let mut disk = Rootfs::new();
        let mut dev = BlockDevice::new();
        dev.set_serial("rootfs-0".to_owned());
        disk.set_block(dev);
        let back = Rootfs::parse_from_bytes(&disk.write_to_bytes().unwrap()).unwrap();
        assert_eq!(back.block().serial(), "rootfs-0");

        let mut read = ReadStreamRequest::new();
        read.stream = Stream::STREAM_STDERR.into();
        let back = ReadStreamRequest::parse_from_bytes(&read.write_to_bytes().unwrap()).unwrap();
        assert_eq!(back.stream.enum_value(), Ok(Stream::STREAM_STDERR));

        let mut wait = WaitProcessResponse::new();
        wait.signal = 9;
        wait.finished_at_unix_nanos = i64::MAX;
        let back = WaitProcessResponse::parse_from_bytes(&wait.write_to_bytes().unwrap()).unwrap();
        assert_eq!(back, wait);
    }

    #[test]
    fn unknown_fields_are_tolerated() {
        // A newer peer may send fields this build does not know: field 15, varint 7.
        let bytes = [0x78, 0x07];
        let req = ReadBlockRequest::parse_from_bytes(&bytes).unwrap();
        assert_eq!(req.offset, 0);
    }
}
