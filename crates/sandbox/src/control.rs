//! Client of the VMM's control socket: one JSON request and one JSON response per line.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use crate::error::{Result, SandboxError};

/// How long one control request may take.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends `req` on a fresh connection and returns the response; `{"ok":false}` is an error.
pub fn request(path: &Path, req: &Value) -> Result<Value> {
    let io = |source| SandboxError::ControlIo {
        path: path.to_path_buf(),
        source,
    };
    let mut s = UnixStream::connect(path).map_err(io)?;
    s.set_read_timeout(Some(CONTROL_TIMEOUT)).map_err(io)?;
    s.set_write_timeout(Some(CONTROL_TIMEOUT)).map_err(io)?;
    s.write_all(format!("{req}\n").as_bytes()).map_err(io)?;
    let mut line = String::new();
    // Responses are small: a misbehaving VMM cannot make us read forever.
    BufReader::new(std::io::Read::take(s, 1 << 20))
        .read_line(&mut line)
        .map_err(io)?;
    let resp: Value = serde_json::from_str(&line).map_err(|e| SandboxError::Control {
        op: op_name(req),
        message: format!("unreadable response {line:?}: {e}"),
    })?;
    if resp["ok"] == true {
        Ok(resp)
    } else {
        Err(SandboxError::Control {
            op: op_name(req),
            message: resp["error"]
                .as_str()
                .unwrap_or("no error message")
                .to_owned(),
        })
    }
}

fn op_name(req: &Value) -> String {
    req["op"].as_str().unwrap_or("?").to_owned()
}

/// Gives spare drive `drive` a new backing file; returns the capacity the VMM reports.
pub fn update_drive(path: &Path, drive: &str, backing: &Path, read_only: bool) -> Result<u64> {
    let resp = request(
        path,
        &json!({"op": "update_drive", "id": drive, "path": backing, "read_only": read_only}),
    )?;
    Ok(resp["capacity_bytes"].as_u64().unwrap_or(0))
}

/// Asks the VMM to stop: gracefully (the guest powers off) within `timeout`, then forced.
pub fn stop(path: &Path, graceful: bool, timeout: Duration) -> Result<()> {
    let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    request(
        path,
        &json!({"op": "stop", "graceful": graceful, "timeout_ms": ms}),
    )
    .map(drop)
}

/// The VMM's counters and memory figures.
pub fn metrics(path: &Path) -> Result<Value> {
    request(path, &json!({"op": "metrics"}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn serve_once(listener: UnixListener, reply: &'static str) -> std::thread::JoinHandle<String> {
        std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(s.try_clone().unwrap())
                .read_line(&mut line)
                .unwrap();
            (&s).write_all(reply.as_bytes()).unwrap();
            line
        })
    }

    #[test]
    fn requests_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let l = UnixListener::bind(&path).unwrap();
        let t = serve_once(
            l.try_clone().unwrap(),
            "{\"ok\":true,\"capacity_bytes\":4096}\n",
        );
        assert_eq!(
            update_drive(&path, "spare0", Path::new("/img"), true).unwrap(),
            4096
        );
        let sent: Value = serde_json::from_str(&t.join().unwrap()).unwrap();
        assert_eq!(sent["op"], "update_drive");
        assert_eq!(sent["read_only"], true);

        let t = serve_once(l, "{\"ok\":false,\"error\":\"no drive\"}\n");
        let e = stop(&path, true, Duration::from_secs(1)).unwrap_err();
        assert!(e.to_string().contains("no drive"), "{e}");
        t.join().unwrap();

        assert!(matches!(
            metrics(&dir.path().join("missing.sock")),
            Err(SandboxError::ControlIo { .. })
        ));
    }
}
