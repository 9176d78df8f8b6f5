//! The frame path a guest uses: tap0 -> tc mirred -> eth0 (veth) -> bridge -> host, and back.
//! The test plays the guest: it attaches to tap0 (as the VMM would), speaks ARP and ICMP
//! with the MAC and address the setup returned, and expects the host bridge's replies.

mod common;

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{can_run, TestEnv};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde_json::json;

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IP: u16 = 0x0800;

/// `struct ifreq` for `TUNSETIFF`: a name and the flags, padded to 40 bytes.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Attaches to the persistent tap `name` inside the namespace at `netns`: a thread enters the
/// namespace (only that thread moves) and opens /dev/net/tun there.
fn open_tap(netns: &Path, name: &str) -> File {
    let netns = netns.to_path_buf();
    let name = name.to_string();
    std::thread::spawn(move || {
        let ns = File::open(&netns).unwrap();
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let tun = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .unwrap();
        let mut ifr = IfReq {
            name: [0; 16],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
            _pad: [0; 22],
        };
        ifr.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `IfReq` lays out (name,
        // flags, padding to its full size); `ifr` outlives the call.
        let rc = unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&tun),
                libc::TUNSETIFF,
                &mut ifr,
            )
        };
        assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
        tun
    })
    .join()
    .unwrap()
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(u16::try_from(sum).unwrap())
}

fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn arp(op: u16, sha: [u8; 6], spa: Ipv4Addr, tha: [u8; 6], tpa: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4];
    a.extend_from_slice(&op.to_be_bytes());
    a.extend_from_slice(&sha);
    a.extend_from_slice(&spa.octets());
    a.extend_from_slice(&tha);
    a.extend_from_slice(&tpa.octets());
    a
}

fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr, id: u16, seq: u16) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend_from_slice(b"hypernetes data path");
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = u16::try_from(20 + icmp.len()).unwrap();
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(&icmp);
    ip
}

/// The guest: reads frames from the tap until `want` accepts one, answering ARP requests for
/// its own address on the way (the host may ask before it replies).
struct Guest {
    tap: File,
    mac: [u8; 6],
    ip: Ipv4Addr,
}

impl Guest {
    fn send(&mut self, frame: &[u8]) {
        self.tap.write_all(frame).unwrap();
    }

    fn expect<T>(&mut self, what: &str, mut want: impl FnMut(&[u8]) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 2048];
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no {what} on the tap; saw {seen:02x?}");
            let mut fds = [PollFd::new(self.tap.as_fd(), PollFlags::POLLIN)];
            let n = poll(&mut fds, PollTimeout::try_from(left).unwrap()).unwrap();
            if n == 0 {
                continue;
            }
            let len = self.tap.read(&mut buf).unwrap();
            let frame = &buf[..len];
            if let Some(t) = want(frame) {
                return t;
            }
            if len >= 42
                && u16::from_be_bytes([frame[12], frame[13]]) == ETH_P_ARP
                && u16::from_be_bytes([frame[20], frame[21]]) == 1
                && frame[38..42] == self.ip.octets()
            {
                let asker: [u8; 6] = frame[22..28].try_into().unwrap();
                let asker_ip = Ipv4Addr::new(frame[28], frame[29], frame[30], frame[31]);
                let reply = ethernet(
                    asker,
                    self.mac,
                    ETH_P_ARP,
                    &arp(2, self.mac, self.ip, asker, asker_ip),
                );
                self.send(&reply);
            }
            seen.push(frame[..len.min(42)].to_vec());
        }
    }
}

#[test]
fn frames_flow_between_tap_and_bridge() {
    if !can_run() {
        return;
    }
    let env = TestEnv::new(21);
    // A single-plugin .conf of spec 0.4.0 this time.
    let mut conf = env.bridge_plugin();
    conf["cniVersion"] = json!("0.4.0");
    conf["name"] = json!(env.net_name);
    std::fs::write(
        env.conf_dir.join("10-bridge.conf"),
        serde_json::to_vec(&conf).unwrap(),
    )
    .unwrap();

    let req = env.request("a");
    let net = env.mgr.setup(&req).unwrap();
    let std::net::IpAddr::V4(ip) = net.pod_ip.unwrap() else {
        panic!("expected an IPv4 pod address");
    };
    let gw: Ipv4Addr = env.gateway().parse().unwrap();
    let mut guest = Guest {
        tap: open_tap(&net.netns, &net.tap),
        mac: net.interface.mac,
        ip,
    };

    // ARP for the gateway (the bridge's own address on the host).
    let request = ethernet(
        [0xff; 6],
        guest.mac,
        ETH_P_ARP,
        &arp(1, guest.mac, ip, [0; 6], gw),
    );
    guest.send(&request);
    let gw_mac = guest.expect("ARP reply from the gateway", |f| {
        (f.len() >= 42
            && u16::from_be_bytes([f[12], f[13]]) == ETH_P_ARP
            && u16::from_be_bytes([f[20], f[21]]) == 2
            && f[28..32] == gw.octets()
            && f[0..6] == net.interface.mac)
            .then(|| <[u8; 6]>::try_from(&f[22..28]).unwrap())
    });

    // Ping the gateway.
    let echo = ethernet(gw_mac, guest.mac, ETH_P_IP, &icmp_echo(ip, gw, 0x4e54, 1));
    guest.send(&echo);
    guest.expect("ICMP echo reply from the gateway", |f| {
        (f.len() >= 42
            && u16::from_be_bytes([f[12], f[13]]) == ETH_P_IP
            && f[23] == 1
            && f[26..30] == gw.octets()
            && f[30..34] == ip.octets()
            && f[34] == 0
            && f[38..40] == 0x4e54u16.to_be_bytes())
        .then_some(())
    });

    drop(guest);
    env.mgr.teardown(&req.pod_id).unwrap();
    assert!(env.reservations().is_empty());
    assert!(!net.netns.exists());
}
