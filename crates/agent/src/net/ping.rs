//! ICMP echo over a raw socket (the guest has no ping binary).

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use super::NetError;
use crate::icmp::{strip_ipv4_header, Echo, ECHO_REPLY, ECHO_REQUEST};

/// Outcome of a ping run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PingReport {
    pub transmitted: u32,
    pub received: u32,
    pub rtt_us: Vec<u32>,
}

/// Distinguishes concurrent ping runs on the shared raw ICMP stream.
static NEXT_ID: AtomicU16 = AtomicU16::new(1);

const PAYLOAD: &[u8] = b"hyperstart-ping-0123456789abcdef";

fn sys(op: &'static str) -> NetError {
    NetError::Sys {
        op,
        source: io::Error::last_os_error(),
    }
}

fn raw_icmp_socket() -> Result<OwnedFd, NetError> {
    // SAFETY: socket(2) takes only integers.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        )
    };
    if fd < 0 {
        return Err(sys("socket(SOCK_RAW, IPPROTO_ICMP)"));
    }
    // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends `count` echo requests to `dest`, waiting up to `timeout` for each reply.
pub fn ping(dest: Ipv4Addr, count: u32, timeout: Duration) -> Result<PingReport, NetError> {
    let sock = raw_icmp_socket()?;
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed) ^ (std::process::id() as u16);
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(dest).to_be(),
        },
        sin_zero: [0; 8],
    };
    let mut report = PingReport::default();
    for n in 0..count {
        // Sequence numbers wrap; count is capped far below 65536 anyway.
        let seq = n as u16;
        let packet = Echo {
            kind: ECHO_REQUEST,
            id,
            seq,
            payload: PAYLOAD.to_vec(),
        }
        .encode();
        let sent_at = Instant::now();
        // SAFETY: the buffer and the address are valid for the given lengths during the call.
        let rc = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            let err = io::Error::last_os_error();
            // No route or unreachable network: the echo is lost, not an agent failure.
            log::debug!("ping {dest} seq {seq}: sendto failed: {err}");
            report.transmitted += 1;
            std::thread::sleep(timeout.min(Duration::from_millis(100)));
            continue;
        }
        report.transmitted += 1;
        if wait_reply(&sock, dest, id, seq, sent_at + timeout)? {
            let rtt = sent_at.elapsed().as_micros();
            report.received += 1;
            report.rtt_us.push(u32::try_from(rtt).unwrap_or(u32::MAX));
        }
    }
    Ok(report)
}

/// Waits until `deadline` for the echo reply matching `id`/`seq` from `dest`.
fn wait_reply(
    sock: &OwnedFd,
    dest: Ipv4Addr,
    id: u16,
    seq: u16,
    deadline: Instant,
) -> Result<bool, NetError> {
    let mut buf = [0u8; 1500];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        let mut pfd = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
        if ready < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(sys("poll"));
        }
        if ready == 0 {
            return Ok(false);
        }
        // SAFETY: the buffer is valid for its length; no address is requested.
        let n = unsafe {
            libc::recv(
                sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            match io::Error::last_os_error().kind() {
                io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock => continue,
                _ => return Err(sys("recv")),
            }
        }
        let datagram = &buf[..usize::try_from(n).unwrap_or(0)];
        let Some((src, icmp)) = strip_ipv4_header(datagram) else {
            continue;
        };
        if let Some(echo) = Echo::decode(icmp) {
            if src == dest && echo.kind == ECHO_REPLY && echo.id == id && echo.seq == seq {
                return Ok(true);
            }
        }
    }
}
