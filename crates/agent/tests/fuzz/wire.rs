//! ttrpc framing written by hand, so that any byte can be sent: the 10-byte header (u32 BE
//! length, u32 BE stream id, u8 type, u8 flags) and the protobuf `ttrpc.Request` body
//! (service=1, method=2, payload=3, timeout_nano=4, metadata=5).

use std::fmt::Write as _;
use std::io::{ErrorKind, Read};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use protobuf::{Enum, Message};
use ttrpc::Code;

use super::ANSWER_TIMEOUT;

/// ttrpc's largest frame body.
pub const MAX_FRAME: usize = ttrpc::proto::MESSAGE_LENGTH_MAX;

pub const HEADER_LEN: usize = 10;
pub const TYPE_REQUEST: u8 = 1;
pub const TYPE_RESPONSE: u8 = 2;

pub fn header(len: u32, stream_id: u32, ty: u8, flags: u8) -> [u8; HEADER_LEN] {
    let mut h = [0; HEADER_LEN];
    h[..4].copy_from_slice(&len.to_be_bytes());
    h[4..8].copy_from_slice(&stream_id.to_be_bytes());
    h[8] = ty;
    h[9] = flags;
    h
}

pub fn request_frame(stream_id: u32, body: &[u8]) -> Vec<u8> {
    let mut f = header(body.len() as u32, stream_id, TYPE_REQUEST, 0).to_vec();
    f.extend_from_slice(body);
    f
}

pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub fn put_bytes_field(out: &mut Vec<u8>, field: u64, data: &[u8]) {
    put_varint(out, field << 3 | 2);
    put_varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

/// A `ttrpc.Request` (service=1, method=2, payload=3, timeout_nano=4, metadata=5).
pub fn request_body(
    service: &[u8],
    method: &[u8],
    payload: &[u8],
    timeout_nano: i64,
    metadata: &[(Vec<u8>, Vec<u8>)],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + service.len() + method.len() + 32);
    put_bytes_field(&mut out, 1, service);
    put_bytes_field(&mut out, 2, method);
    put_bytes_field(&mut out, 3, payload);
    if timeout_nano != 0 {
        put_varint(&mut out, 4 << 3);
        put_varint(&mut out, timeout_nano as u64);
    }
    for (key, value) in metadata {
        let mut kv = Vec::new();
        put_bytes_field(&mut kv, 1, key);
        put_bytes_field(&mut kv, 2, value);
        put_bytes_field(&mut out, 5, &kv);
    }
    out
}

/// What came back for one request.
#[derive(Debug)]
pub enum Reply {
    /// A response frame: its stream id and status.
    Answer {
        stream_id: u32,
        code: i32,
        message: String,
    },
    /// The agent closed the connection.
    Closed,
    /// Nothing within the patience.
    Silent,
}

pub fn code_name(code: i32) -> String {
    Code::from_i32(code).map_or_else(|| format!("code {code}"), |c| format!("{c:?}"))
}

/// Reads until `buf` is full, or fails with `Closed` (EOF) or `Silent` (nothing more by
/// `deadline`).
pub fn read_full(conn: &mut UnixStream, buf: &mut [u8], deadline: Instant) -> Result<(), Reply> {
    let mut got = 0;
    while got < buf.len() {
        // Past the deadline, still take what has already arrived.
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        conn.set_read_timeout(Some(left)).unwrap();
        match conn.read(&mut buf[got..]) {
            Ok(0) => return Err(Reply::Closed),
            Ok(n) => got += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(Reply::Silent)
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Err(Reply::Closed),
        }
    }
    Ok(())
}

/// Reads one reply. `Err` is a protocol violation by the agent (a malformed response).
pub fn read_reply(conn: &mut UnixStream, patience: Duration) -> Result<Reply, String> {
    let deadline = Instant::now() + patience;
    let mut head = [0u8; HEADER_LEN];
    if let Err(reply) = read_full(conn, &mut head, deadline) {
        return Ok(reply);
    }
    let len = u32::from_be_bytes(head[..4].try_into().unwrap()) as usize;
    let stream_id = u32::from_be_bytes(head[4..8].try_into().unwrap());
    if head[8] != TYPE_RESPONSE {
        return Err(format!("response frame of type {}", head[8]));
    }
    if len > MAX_FRAME {
        return Err(format!("response frame of {len} bytes"));
    }
    let mut body = vec![0; len];
    // A response that starts must finish promptly.
    if let Err(reply) = read_full(conn, &mut body, Instant::now() + ANSWER_TIMEOUT) {
        return Err(format!("response body cut short: {reply:?}"));
    }
    let resp = ttrpc::proto::Response::parse_from_bytes(&body)
        .map_err(|e| format!("undecodable ttrpc.Response: {e}"))?;
    Ok(Reply::Answer {
        stream_id,
        code: resp.status.code.value(),
        message: resp.status.message.clone(),
    })
}

pub fn hex_prefix(data: &[u8]) -> String {
    let mut s = String::new();
    for b in data.iter().take(48) {
        let _ = write!(s, "{b:02x}");
    }
    if data.len() > 48 {
        s.push_str("...");
    }
    format!("{} bytes {s}", data.len())
}
