//! End-to-end tests: the mock guest driver on one side, real Unix streams on the other, and the
//! device's queue handlers, muxer and event loop in between (driven without the thread, except
//! in the device test).

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::connection::{BUF_ALLOC, CREDIT_UPDATE_THRESHOLD};
use super::muxer::{FIRST_HOST_PORT, MAX_CONNECT_LINE};
use super::packet::{op, shutdown, PacketHeader, HDR_SIZE, HOST_CID, TYPE_STREAM};
use super::test_utils::*;
use super::{Vsock, VsockError};
use crate::virtio::{device_type, ActivateContext, ActivateError, Interrupt, VirtioDevice};

/// The host stream was closed by the device: reads reach EOF (after any data still buffered).
fn assert_closed(s: &mut UnixStream) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return,
            Err(e) => panic!("stream not closed: {e}"),
        }
    }
}

#[test]
fn host_connect_handshake_and_data_both_ways() {
    let mem = test_mem();
    let mut rig = Rig::new(&mem);
    let (mut s, req) = rig.host_connect(52);
    assert_eq!(req.src_cid, HOST_CID);
    assert_eq!(req.dst_cid, GUEST_CID);
    assert_eq!(req.dst_port, 52);
    assert_eq!(req.src_port, FIRST_HOST_PORT);
    assert_eq!(req.type_, TYPE_STREAM);
    assert_eq!(req.buf_alloc, BUF_ALLOC);
    let host_port = req.src_port;

    let resp = guest_hdr(52, host_port, op::RESPONSE);
    rig.send(&resp, &[]);
    let mut ok = [0u8; 14];
    s.read_exact(&mut ok).unwrap();
    assert_eq!(&ok, format!("OK {host_port}\n").as_bytes());

    // Host -> guest.
    s.write_all(b"ping").unwrap();
    let (h, data, _) = rig.wait_for(|h| h.op == op::RW);
    assert_eq!(data, b"ping");
    assert_eq!((h.src_port, h.dst_port, h.len), (host_port, 52, 4));
    assert_eq!((h.src_cid, h.dst_cid), (HOST_CID, GUEST_CID));

    // Guest -> host.
    rig.send(&guest_hdr(52, host_port, op::RW), b"pong");
    let mut got = [0u8; 4];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"pong");

    // A second client gets a different host port.
    let (_s2, req2) = rig.host_connect(52);
    assert_eq!(req2.src_port, FIRST_HOST_PORT + 1);
}

#[test]
fn host_data_after_connect_line_is_not_lost() {
    let mem = test_mem();
    let mut rig = Rig::new(&mem);
    let mut s = UnixStream::connect(&rig.path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"CONNECT 7\nearly").unwrap();
    let (req, _, _) = rig.wait_for(|h| h.op == op::REQUEST);
    rig.send(&guest_hdr(7, req.src_port, op::RESPONSE), &[]);
    let (_, data, _) = rig.wait_for(|h| h.op == op::RW);
    assert_eq!(data, b"early");
}

#[test]
fn guest_rst_refuses_host_connect() {
    let mem = test_mem();
    let mut rig = Rig::new(&mem);
    let (mut s, req) = rig.host_connect(52);
    rig.send(&guest_hdr(52, req.src_port, op::RST), &[]);
    rig.pump(20);
    let mut buf = [0u8; 16];
    assert_eq!(s.read(&mut buf).unwrap(), 0, "closed without OK");
    assert_eq!(rig.worker.muxer.connection_count(), 0);
}

#[test]
fn host_connect_times_out() {
    let mem = test_mem();
    let mut rig = Rig::new(&mem);
    let (mut s, req) = rig.host_connect(52);
    rig.worker
        .muxer
        .process_timeouts(Instant::now() + Duration::from_secs(10));
    rig.worker.process_queues();
    rig.guest.collect_rx();
    let (rst, _, _) = rig.wait_for(|h| h.op == op::RST);
    assert_eq!((rst.src_port, rst.dst_port), (req.src_port, 52));
    let mut buf = [0u8; 16];
    assert_eq!(s.read(&mut buf).unwrap(), 0);
    assert_eq!(rig.worker.muxer.connection_count(), 0);
}

#[test]
fn malformed_connect_lines_close_the_stream() {
    let mem = test_mem();
    let mut rig = Rig::new(&mem);
    let overlong = format!("CONNECT {}\n", "1".repeat(MAX_CONNECT_LINE));
    let no_newline = "C".repeat(MAX_CONNECT_LINE + 5);
    for line in [
        "CONNECT abc\n",
        "CONNECT 99999999999\n",
        "HELLO\n",
        "CONNECT \n",
        "\n",
        overlong.as_str(),
        no_newline.as_str(),
    ] {
        let mut s = UnixStream::connect(&rig.path).unwrap();
        s.write_all(line.as_bytes()).unwrap();
        rig.pump(20);
        // Closed: EOF, or a reset because the device closed with our bytes unread.
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 16];
        match s.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            r => panic!("{line:?} must close the stream, got {r:?}"),
        }
    }
    assert!(
        rig.take_inbox().iter().all(|(h, _)| h.op != op::REQUEST),
        "no request reached the guest"
    );
    // A client that never finishes its line is dropped at the handshake deadline.
    let mut s = UnixStream::connect(&rig.path).unwrap();
    s.write_all(b"CONN").unwrap();
    rig.pump(20);
    rig.worker
        .muxer
        .process_timeouts(Instant::now() + Duration::from_secs(60));
    let mut buf = [0u8; 16];
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    assert_eq!(s.read(&mut buf).unwrap(), 0);
}

#[test]
fn guest_connect_with_listener() {
    let mem = test_mem();
    let mut rig = Rig::new(&mem);
    let listener = UnixListener::bind(rig.sock_path("_1234")).unwrap();
    rig.send(&guest_hdr(5000, 1234, op::REQUEST), &[]);
    let (resp, _, _) = rig.wait_for(|_| true);
    assert_eq!(resp.op, op::RESPONSE);
    assert_eq!((resp.src_port, resp.dst_port), (1234, 5000));
    assert_eq!((resp.src_cid, resp.dst_cid), (HOST_CID, GUEST_CID));
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

    rig.send(&guest_hdr(5000, 1234, op::RW), b"hello host");
    let mut got = [0u8; 10];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello host");
    s.write_all(b"hello guest").unwrap();
    let (h, data, _) = rig.wait_for(|h| h.op == op::RW);
    assert_eq!(data, b"hello guest");
    assert_eq!((h.src_port, h.dst_port), (1234, 5000));
}

#[test]
fn guest_connect_without_listener_gets_rst() {
    let mem = test_mem();
    let mut rig = Rig::new(&mem);
    rig.send(&guest_hdr(5000, 4321, op::REQUEST), &[]);
    let (rst, _, _) = rig.wait_for(|_| true);
    assert_eq!(rst.op, op::RST);
    assert_eq!((rst.src_port, rst.dst_port), (4321, 5000));
    assert_eq!(rig.worker.muxer.connection_count(), 0);
}

#[test]
fn never_exceeds_guest_credit() {
    let mem = test_mem();
    let mut rig = Rig::new(&mem);
    let (mut s, hp) = rig.established(52, 1000);
    s.write_all(&[9u8; 5000]).unwrap();
    rig.pump(100);
    let got: usize = rig
        .take_inbox()
        .iter()
        .filter(|(h, _)| h.op == op::RW)
        .map(|(_, d)| d.len())
        .sum();
    assert_eq!(got, 1000, "exactly buf_alloc bytes, no more");
    // The guest consumed 600 of them.
    let mut upd = guest_hdr(52, hp, op::CREDIT_UPDATE);
    upd.buf_alloc = 1000;
    upd.fwd_cnt = 600;
    rig.send(&upd, &[]);
    rig.pump(100);
    let got: usize = rig
        .take_inbox()
        .iter()
        .filter(|(h, _)| h.op == op::RW)
        .map(|(_, d)| d.len())
        .sum();
    assert_eq!(got, 600);
}

#[test]
fn credit_request_is_answered() {
    let mem = test_mem();
    let mut rig = Rig::new(&mem);
    let (mut s, hp) = rig.established(52, 4096);
    rig.send(&guest_hdr(52, hp, op::RW), &[1u8; 10]);
    let mut got = [0u8; 10];
    s.read_exact(&mut got).unwrap();
    rig.take_inbox();
    rig.send(&guest_hdr(52, hp, op::CREDIT_REQUEST), &[]);
    let (upd, _, _) = rig.wait_for(|_| true);
    assert_eq!(upd.op, op::CREDIT_UPDATE);
    assert_eq!((upd.src_port, upd.dst_port), (hp, 52));
    assert_eq!(upd.buf_alloc, BUF_ALLOC);
    assert_eq!(upd.fwd_cnt, 10);
}

#[test]
fn credit_update_sent_when_guest_view_is_stale() {
    let mem = test_mem();
    let mut rig = Rig::new(&mem);
    let (mut s, hp) = rig.established(52, 4096);
    rig.take_inbox();
    let chunk = vec![5u8; CREDIT_UPDATE_THRESHOLD as usize];
    // Within credit: BUF_ALLOC bytes in total.
    for _ in 0..(BUF_ALLOC / CREDIT_UPDATE_THRESHOLD) {
        rig.send(&guest_hdr(52, hp, op::RW), &chunk);
        let mut sink = vec![0u8; chunk.len()];
        s.read_exact(&mut sink).unwrap();
        rig.pump(5);
    }
    let updates: Vec<PacketHeader> = rig
        .take_inbox()
        .into_iter()
        .map(|(h, _)| h)
        .filter(|h| h.op == op::CREDIT_UPDATE)
        .collect();
    assert!(
        !updates.is_empty(),
        "guest must learn about freed buffer space"
    );
    assert_eq!(updates.last().unwrap().fwd_cnt, BUF_ALLOC);
}

#[test]
fn guest_credit_overrun_resets() {
    let mem = test_mem();
    let mut rig = Rig::new(&mem);
    let (mut s, hp) = rig.established(52, 4096);
    rig.take_inbox();
    // The host never reads: the socket buffer fills, then ours, then the guest overruns.
    let chunk = vec![5u8; 64 * 1024];
    let mut sent = 0usize;
    while rig.take_inbox().iter().all(|(h, _)| h.op != op::RST) {
        rig.send(&guest_hdr(52, hp, op::RW), &chunk);
        sent += chunk.len();
        assert!(sent < 64 << 20, "no reset after {sent} bytes");
    }
    assert_eq!(rig.worker.muxer.connection_count(), 0);
    assert_closed(&mut s);
}

#[test]
fn guest_rst_closes_the_stream() {
    let mem = test_mem();
    let mut rig = Rig::new(&mem);
    let (mut s, hp) = rig.established(52, 4096);
    rig.send(&guest_hdr(52, hp, op::RST), &[]);
    assert_eq!(rig.worker.muxer.connection_count(), 0);
    let mut buf = [0u8; 4];
    assert_eq!(s.read(&mut buf).unwrap(), 0);
    // Later packets for the connection are answered with RST.
    rig.take_inbox();
    rig.send(&guest_hdr(52, hp, op::RW), b"late");
    let (rst, _, _) = rig.wait_for(|_| true);
    assert_eq!(rst.op, op::RST);
}

#[test]
fn host_close_sends_shutdown_then_guest_rst_cleans_up() {
    let mem = test_mem();
    let mut rig = Rig::new(&mem);
    let (s, hp) = rig.established(52, 4096);
    drop(s);
    let (sd, _, _) = rig.wait_for(|h| h.op == op::SHUTDOWN);
    assert_eq!(sd.flags, shutdown::BOTH);
    assert_eq!((sd.src_port, sd.dst_port), (hp, 52));
    assert_eq!(rig.worker.muxer.connection_count(), 1);
    rig.send(&guest_hdr(52, hp, op::RST), &[]);
    assert_eq!(rig.worker.muxer.connection_count(), 0);
}

#[test]
fn host_close_without_guest_rst_times_out_with_rst() {
    let mem = test_mem();
    let mut rig = Rig::new(&mem);
    let (s, hp) = rig.established(52, 4096);
    drop(s);
    rig.wait_for(|h| h.op == op::SHUTDOWN);
    rig.worker
        .muxer
        .process_timeouts(Instant::now() + Duration::from_secs(10));
    rig.worker.process_queues();
    let (rst, _, _) = rig.wait_for(|h| h.op == op::RST);
    assert_eq!((rst.src_port, rst.dst_port), (hp, 52));
    assert_eq!(rig.worker.muxer.connection_count(), 0);
}

#[test]
fn host_half_close_sends_shutdown_send_and_keeps_guest_to_host() {
    let mem = test_mem();
    let mut rig = Rig::new(&mem);
    let (mut s, hp) = rig.established(52, 4096);
    s.shutdown(Shutdown::Write).unwrap();
    let (sd, _, _) = rig.wait_for(|h| h.op == op::SHUTDOWN);
    assert_eq!(sd.flags, shutdown::SEND);
    rig.send(&guest_hdr(52, hp, op::RW), b"reply");
    let mut got = [0u8; 5];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"reply");
    // Guest closes too: SHUTDOWN both -> RST and the stream closes.
    let mut sd = guest_hdr(52, hp, op::SHUTDOWN);
    sd.flags = shutdown::BOTH;
    rig.send(&sd, &[]);
    let (rst, _, _) = rig.wait_for(|h| h.op == op::RST);
    assert_eq!(rst.dst_port, 52);
    assert_closed(&mut s);
    assert_eq!(rig.worker.muxer.connection_count(), 0);
}

#[test]
fn guest_shutdown_send_gives_host_eof() {
    let mem = test_mem();
    let mut rig = Rig::new(&mem);
    let (mut s, hp) = rig.established(52, 4096);
    rig.send(&guest_hdr(52, hp, op::RW), b"last");
    let mut sd = guest_hdr(52, hp, op::SHUTDOWN);
    sd.flags = shutdown::SEND;
    rig.send(&sd, &[]);
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    assert_eq!(all, b"last");
    // The other direction still works.
    s.write_all(b"still").unwrap();
    let (_, data, _) = rig.wait_for(|h| h.op == op::RW);
    assert_eq!(data, b"still");
}

#[test]
fn bad_headers_from_guest() {
    let mem = test_mem();
    let mut rig = Rig::new(&mem);
    // Unknown connection.
    rig.send(&guest_hdr(5000, 77, op::RW), b"x");
    assert_eq!(rig.wait_for(|_| true).0.op, op::RST);
    // Wrong destination CID: reset, from that CID.
    let mut h = guest_hdr(5000, 77, op::REQUEST);
    h.dst_cid = 9;
    rig.send(&h, &[]);
    let (rst, _, _) = rig.wait_for(|_| true);
    assert_eq!((rst.op, rst.src_cid), (op::RST, 9));
    // Wrong type.
    let mut h = guest_hdr(5000, 77, op::REQUEST);
    h.type_ = 2;
    rig.send(&h, &[]);
    assert_eq!(rig.wait_for(|_| true).0.op, op::RST);
    // Unknown op.
    rig.send(&guest_hdr(5000, 77, 42), &[]);
    assert_eq!(rig.wait_for(|_| true).0.op, op::RST);
    // RST to an unknown connection: silence.
    rig.send(&guest_hdr(5000, 77, op::RST), &[]);
    // Wrong source CID: dropped without reply.
    let mut h = guest_hdr(5000, 77, op::REQUEST);
    h.src_cid = 4;
    rig.send(&h, &[]);
    rig.pump(20);
    assert!(rig.take_inbox().is_empty());
}

#[test]
fn unknown_op_resets_live_connection() {
    let mem = test_mem();
    let mut rig = Rig::new(&mem);
    let (mut s, hp) = rig.established(52, 4096);
    rig.send(&guest_hdr(52, hp, 99), &[]);
    assert_eq!(rig.wait_for(|_| true).0.op, op::RST);
    assert_eq!(rig.worker.muxer.connection_count(), 0);
    assert_closed(&mut s);
}

#[test]
fn malformed_tx_chains_are_consumed_without_effect() {
    let mem = test_mem();
    let mut rig = Rig::new(&mem);
    let (mut s, hp) = rig.established(52, 4096);
    rig.take_inbox();
    rig.guest.tx.take_used();
    let a = rig.guest.alloc(256);
    // Write-only header.
    let mut h = guest_hdr(52, hp, op::RW);
    h.len = 4;
    mem.write_slice(&h.to_bytes(), GuestAddress(a)).unwrap();
    rig.guest.tx.add(&[(a, 48, F_WRITE)]);
    // Short header.
    rig.guest.tx.add(&[(a, 43, 0)]);
    // Outside guest memory.
    rig.guest.tx.add(&[(TEST_MEM_SIZE as u64 - 8, 64, 0)]);
    // Length larger than the chain: resets the connection it names.
    h.len = 100;
    mem.write_slice(&h.to_bytes(), GuestAddress(a)).unwrap();
    rig.guest.tx.add(&[(a, 48, 0)]);
    rig.worker.process_queues();
    let used = rig.guest.tx.take_used();
    assert_eq!(used.len(), 4, "all chains returned");
    assert!(used.iter().all(|&(_, len)| len == 0));
    rig.guest.collect_rx();
    let inbox = rig.take_inbox();
    assert_eq!(inbox.len(), 1, "{inbox:?}");
    assert_eq!(inbox[0].0.op, op::RST);
    assert_closed(&mut s);
}

#[test]
fn bad_rx_buffers_are_returned_unused() {
    // RX buffers that are read-only, too small or outside memory are returned with length 0;
    // the request lands in the first good one.
    let memb = test_mem();
    let mut guest = TestGuest::new(&memb);
    let x = guest.alloc(4096);
    guest.rx.add(&[(x, 4096, 0)]);
    guest.rx.add(&[(x, 43, F_WRITE)]);
    guest.rx.add(&[(TEST_MEM_SIZE as u64 - 8, 64, F_WRITE)]);
    guest.rx.add(&[(x, 4096, F_WRITE)]);
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/vsock-test").unwrap();
    let path = dir.as_path().join("v.sock");
    let listener = UnixListener::bind(&path).unwrap();
    listener.set_nonblocking(true).unwrap();
    let ctx = ActivateContext {
        mem: memb.clone(),
        queues: vec![guest.rx.queue(), guest.tx.queue(), guest.ev.queue()],
        queue_evts: (0..3)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect(),
        interrupt: Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
    };
    let mut w =
        super::event_handler::VsockWorker::new(ctx, GUEST_CID, path.clone(), listener).unwrap();
    let mut s = UnixStream::connect(&path).unwrap();
    s.write_all(b"CONNECT 52\n").unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    let mut used = Vec::new();
    while used.len() < 4 {
        assert!(Instant::now() < end, "used so far: {used:?}");
        w.run_once(5).unwrap();
        used.extend(guest.rx.take_used());
    }
    assert_eq!(used[0].1, 0);
    assert_eq!(used[1].1, 0);
    assert_eq!(used[2].1, 0);
    assert_eq!(
        used[3].1, HDR_SIZE as u32,
        "the request lands in the first good buffer"
    );
    let mut raw = [0u8; HDR_SIZE];
    memb.read_slice(&mut raw, GuestAddress(x)).unwrap();
    assert_eq!(PacketHeader::from_bytes(&raw).op, op::REQUEST);
}

#[test]
fn no_rx_buffers_means_no_loss() {
    let mem = test_mem();
    let mut rig = Rig::new(&mem);
    let (mut s, hp) = rig.established(52, 64 * 1024);
    rig.take_inbox();
    // Use up every RX buffer with data, then write more: it waits in the socket.
    let total = 200 * 1024;
    let data: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
    s.write_all(&data[..60 * 1024]).unwrap();
    let mut received = Vec::new();
    let end = Instant::now() + Duration::from_secs(10);
    let mut written = 60 * 1024;
    let mut fwd = 0u32;
    while received.len() < total {
        assert!(Instant::now() < end, "got {} of {total}", received.len());
        rig.pump(2);
        for (h, d) in rig.take_inbox() {
            assert_eq!(h.op, op::RW);
            received.extend_from_slice(&d);
        }
        // The guest app consumes everything and tells the device.
        if received.len() as u32 != fwd {
            fwd = received.len() as u32;
            let mut upd = guest_hdr(52, hp, op::CREDIT_UPDATE);
            upd.buf_alloc = 64 * 1024;
            upd.fwd_cnt = fwd;
            rig.send(&upd, &[]);
        }
        if written < total {
            let n = (total - written).min(16 * 1024);
            s.write_all(&data[written..written + n]).unwrap();
            written += n;
        }
    }
    assert_eq!(received, data);
}

#[test]
fn device_config_and_errors() {
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/vsock-test").unwrap();
    assert!(matches!(
        Vsock::new(2, dir.as_path().join("a")),
        Err(VsockError::InvalidCid(2))
    ));
    assert!(matches!(
        Vsock::new(u64::from(u32::MAX), dir.as_path().join("a")),
        Err(VsockError::InvalidCid(_))
    ));
    assert!(matches!(
        Vsock::new(3, dir.as_path().join("missing/dir/sock")),
        Err(VsockError::Bind { .. })
    ));
    let path = dir.as_path().join("v.sock");
    let mut dev = Vsock::new(0x1234_5678, &path).unwrap();
    assert!(matches!(Vsock::new(5, &path), Err(VsockError::Bind { .. })));
    assert_eq!(dev.device_type(), device_type::VSOCK);
    assert_eq!(dev.queue_max_sizes().len(), 3);
    assert_eq!(dev.avail_features(), crate::virtio::VIRTIO_F_VERSION_1);
    let mut cfg = [0xffu8; 12];
    dev.read_config(0, &mut cfg);
    assert_eq!(&cfg[..8], &0x1234_5678u64.to_le_bytes());
    assert_eq!(&cfg[8..], &[0; 4]);
    let mut b = [0xffu8; 2];
    dev.read_config(2, &mut b);
    assert_eq!(b, [0x34, 0x12]);
    dev.read_config(u64::MAX, &mut b);
    assert_eq!(b, [0, 0]);
    dev.write_config(0, &[9; 8]);
    dev.read_config(0, &mut cfg[..8]);
    assert_eq!(&cfg[..8], &0x1234_5678u64.to_le_bytes());

    let mem = test_mem();
    let ctx = ActivateContext {
        mem,
        queues: vec![],
        queue_evts: vec![],
        interrupt: Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
    };
    assert!(matches!(
        dev.activate(ctx),
        Err(ActivateError::QueueCount {
            expected: 3,
            got: 0
        })
    ));
    drop(dev);
    assert!(!path.exists(), "socket file removed on drop");
}

#[test]
fn device_worker_thread_serves_host_connect_and_resets() {
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/vsock-test").unwrap();
    let path = dir.as_path().join("v.sock");
    let mut dev = Vsock::new(GUEST_CID, &path).unwrap();
    let mem = test_mem();
    let mut guest = TestGuest::new(&mem);
    guest.add_rx_buffers(4, 4096);
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let interrupt = Interrupt::new(irq.try_clone().unwrap());
    let ctx = ActivateContext {
        mem: mem.clone(),
        queues: vec![guest.rx.queue(), guest.tx.queue(), guest.ev.queue()],
        queue_evts: (0..3)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect(),
        interrupt: interrupt.clone(),
    };
    dev.activate(ctx).unwrap();
    let mut s = UnixStream::connect(&path).unwrap();
    s.write_all(b"CONNECT 52\n").unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    while guest.collect_rx() == 0 {
        assert!(Instant::now() < end, "no request from the worker thread");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(guest.inbox[0].0.op, op::REQUEST);
    assert_eq!(irq.read().unwrap(), 1, "guest interrupted");
    assert_ne!(
        interrupt.status() & crate::virtio::INTERRUPT_STATUS_USED_RING,
        0
    );
    assert!(dev.reset());
    // The worker's connections die with it.
    assert_closed(&mut s);
}
