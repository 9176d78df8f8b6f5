//! The power button: the VMM's graceful stop connects to vsock port
//! [`protocol::POWEROFF_PORT`] and writes `poweroff\n`; the agent syncs and reboots, which the VMM
//! treats as the end of the VM. A microVM without ACPI has no other way to ask the guest.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use nix::sys::socket::{
    accept, bind as bind_addr, listen, socket, AddressFamily, Backlog, SockFlag, SockType,
    VsockAddr,
};

use crate::power::{self, PowerAction, PowerMode};

/// What a client must send.
pub const REQUEST: &[u8] = b"poweroff\n";

/// Whether `buf` (what a client sent) asks for a power-off.
pub fn is_poweroff_request(buf: &[u8]) -> bool {
    buf.starts_with(REQUEST)
}

/// Bind the power button now (so it is there before the agent reports ready), then serve it on
/// its own thread. Errors are logged: a missing power button must not take the agent down.
pub fn start(port: u32) {
    let listener = match bind(port) {
        Ok(fd) => fd,
        Err(e) => {
            log::error!("power button on vsock port {port}: {e}");
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("poweroff".into())
        .spawn(move || {
            if let Err(e) = serve(&listener) {
                log::error!("power button on vsock port {port}: {e}");
            }
        });
    if let Err(e) = spawned {
        log::error!("cannot start the power button thread: {e}");
    }
}

fn bind(port: u32) -> nix::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind_addr(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))?;
    listen(&fd, Backlog::new(4)?)?;
    Ok(fd)
}

fn serve(fd: &OwnedFd) -> nix::Result<()> {
    loop {
        let conn = match accept(fd.as_raw_fd()) {
            Ok(c) => c,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e),
        };
        // SAFETY: accept returned a new descriptor that nothing else owns.
        let conn = unsafe { OwnedFd::from_raw_fd(conn) };
        let mut stream = std::fs::File::from(conn);
        let mut buf = [0u8; 16];
        let mut got = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while got < REQUEST.len() && std::time::Instant::now() < deadline {
            match stream.read(&mut buf[got..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        if is_poweroff_request(&buf[..got]) {
            log::info!("power-off requested by the VMM");
            power::run(PowerMode::Guest, PowerAction::Reboot);
        } else {
            log::warn!("power button: ignoring {got} unexpected bytes");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_matching() {
        assert!(is_poweroff_request(b"poweroff\n"));
        assert!(!is_poweroff_request(b"poweroff"));
        assert!(!is_poweroff_request(b"reboot\n"));
        assert!(!is_poweroff_request(b""));
    }
}
