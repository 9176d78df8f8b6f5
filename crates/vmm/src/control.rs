//! The control socket: one Unix socket per VM, JSON requests and responses one per line.
//!
//! Requests: `{"op":"status"}`, `{"op":"metrics"}`, `{"op":"pause"}`, `{"op":"resume"}`,
//! `{"op":"stop","graceful":true,"timeout_ms":5000}`,
//! `{"op":"update_drive","id":"spare0","path":"/img","read_only":true}`.
//! Responses: `{"ok":true,...}` or `{"ok":false,"error":"..."}`. Several clients may be connected
//! at once, and a client may reconnect at any time (a restarted runtime reattaches).

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use serde::Deserialize;
use serde_json::{json, Value};

/// Longest request line accepted.
pub const MAX_REQUEST: usize = 64 * 1024;

/// A control request.
#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// VM state, boot time, drives.
    Status {},
    /// Counters and memory use.
    Metrics {},
    /// Pause all vCPUs.
    Pause {},
    /// Resume all vCPUs.
    Resume {},
    /// Stop the VM. Graceful asks the guest agent to power off and waits up to `timeout_ms`
    /// before forcing.
    Stop {
        /// Ask the guest first.
        #[serde(default)]
        graceful: bool,
        /// How long to wait for a graceful stop.
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    /// Give a drive (usually a spare) a new backing file; the guest sees the new capacity.
    UpdateDrive {
        /// Drive id.
        id: String,
        /// New backing file.
        path: PathBuf,
        /// Attach read-only.
        #[serde(default)]
        read_only: bool,
    },
}

/// Parse one request line into a request or an error response.
pub fn parse(line: &[u8]) -> Result<Request, Value> {
    serde_json::from_slice(line).map_err(|e| error(format!("bad request: {e}")))
}

/// An error response.
pub fn error(msg: impl Into<String>) -> Value {
    json!({"ok": false, "error": msg.into()})
}

/// One connected client with its partial input.
pub struct Conn {
    /// The stream (non-blocking).
    pub stream: UnixStream,
    buf: Vec<u8>,
}

/// What reading from a connection produced.
pub enum ReadOutcome {
    /// Complete request lines.
    Lines(Vec<Vec<u8>>),
    /// The peer closed or misbehaved; drop the connection.
    Closed,
}

impl Conn {
    /// Wrap a freshly accepted stream.
    pub fn new(stream: UnixStream) -> std::io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(Conn {
            stream,
            buf: Vec::new(),
        })
    }

    /// Read what is available and split complete lines.
    pub fn read_lines(&mut self) -> ReadOutcome {
        let mut chunk = [0u8; 4096];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return ReadOutcome::Closed,
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    if self.buf.len() > MAX_REQUEST {
                        let _ = self.reply(&error("request too long"));
                        return ReadOutcome::Closed;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return ReadOutcome::Closed,
            }
        }
        let mut lines = Vec::new();
        while let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=pos).take(pos).collect();
            if !line.iter().all(u8::is_ascii_whitespace) {
                lines.push(line);
            }
        }
        ReadOutcome::Lines(lines)
    }

    /// Send one response line. Responses are small; a client that does not read gets dropped.
    pub fn reply(&mut self, v: &Value) -> std::io::Result<()> {
        let mut out = serde_json::to_vec(v).map_err(std::io::Error::other)?;
        out.push(b'\n');
        self.stream.set_nonblocking(false)?;
        self.stream
            .set_write_timeout(Some(std::time::Duration::from_secs(1)))?;
        let r = self.stream.write_all(&out);
        self.stream.set_nonblocking(true)?;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests() {
        assert_eq!(parse(br#"{"op":"status"}"#).unwrap(), Request::Status {});
        assert_eq!(
            parse(br#"{"op":"stop","graceful":true,"timeout_ms":10}"#).unwrap(),
            Request::Stop {
                graceful: true,
                timeout_ms: Some(10)
            }
        );
        assert_eq!(
            parse(br#"{"op":"update_drive","id":"spare0","path":"/x"}"#).unwrap(),
            Request::UpdateDrive {
                id: "spare0".into(),
                path: "/x".into(),
                read_only: false
            }
        );
        for bad in [
            &b"{"[..],
            br#"{"op":"reboot"}"#,
            br#"{"op":"status","x":1}"#,
            b"\xff",
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e["ok"], false);
        }
    }

    #[test]
    fn splits_lines_and_caps_length() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut c = Conn::new(a).unwrap();
        b.write_all(b"{\"op\":\"status\"}\n\n{\"op\":").unwrap();
        match c.read_lines() {
            ReadOutcome::Lines(l) => assert_eq!(l, vec![b"{\"op\":\"status\"}".to_vec()]),
            ReadOutcome::Closed => panic!("closed"),
        }
        b.write_all(b"\"pause\"}\n").unwrap();
        match c.read_lines() {
            ReadOutcome::Lines(l) => assert_eq!(l, vec![b"{\"op\":\"pause\"}".to_vec()]),
            ReadOutcome::Closed => panic!("closed"),
        }
        b.write_all(&vec![b'x'; MAX_REQUEST + 10]).unwrap();
        assert!(matches!(c.read_lines(), ReadOutcome::Closed));
        drop(b);
    }
}
