//! A test guest: `virtio-queue`'s mock driver over real guest memory, plus helpers to send and
//! receive vsock packets through a [`VsockWorker`] driven without its thread.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempdir::TempDir;

use super::event_handler::VsockWorker;
use super::packet::{op, PacketHeader, HDR_SIZE, HOST_CID, TYPE_STREAM};
use crate::virtio::{ActivateContext, Interrupt};
use crate::GuestMemory;

pub const TEST_MEM_SIZE: usize = 16 << 20;
pub const GUEST_CID: u64 = 3;
const QSIZE: u16 = 256;
const BUF_START: u64 = 0x10_0000;
const F_NEXT: u16 = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
pub const F_WRITE: u16 = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE as u16;

pub fn test_mem() -> GuestMemory {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), TEST_MEM_SIZE)]).unwrap()
}

/// One side of a mock queue as the driver sees it.
pub struct DriverQueue<'a> {
    mock: MockSplitQueue<'a, GuestMemory>,
    next_desc: u16,
    used_seen: u16,
    bufs: HashMap<u16, Vec<(u64, u32)>>,
}

impl<'a> DriverQueue<'a> {
    fn new(mem: &'a GuestMemory, at: u64) -> Self {
        DriverQueue {
            mock: MockSplitQueue::create(mem, GuestAddress(at), QSIZE),
            next_desc: 0,
            used_seen: 0,
            bufs: HashMap::new(),
        }
    }

    pub fn queue(&self) -> Queue {
        self.mock.create_queue().unwrap()
    }

    /// Make a chain of `(addr, len, flags)` available; returns its head.
    pub fn add(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let n = descs.len() as u16;
        if self.next_desc + n > QSIZE {
            self.next_desc = 0;
        }
        let head = self.next_desc;
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let last = i + 1 == descs.len();
                let flags = if last { flags } else { flags | F_NEXT };
                let next = if last { 0 } else { head + i as u16 + 1 };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
            })
            .collect();
        self.mock.add_desc_chains(&raw, head).unwrap();
        self.next_desc += n;
        self.bufs
            .insert(head, descs.iter().map(|d| (d.0, d.1)).collect());
        head
    }

    /// Used entries not seen yet: (head, len).
    pub fn take_used(&mut self) -> Vec<(u16, u32)> {
        let idx = self.mock.used().idx().load();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let e = self
                .mock
                .used()
                .ring()
                .ref_at(usize::from(self.used_seen % QSIZE))
                .unwrap()
                .load();
            out.push((e.id() as u16, e.len()));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

/// The guest side of a vsock device.
pub struct TestGuest<'a> {
    pub mem: &'a GuestMemory,
    pub rx: DriverQueue<'a>,
    pub tx: DriverQueue<'a>,
    pub ev: DriverQueue<'a>,
    next_addr: u64,
    /// Packets received but not yet taken by a test.
    pub inbox: Vec<(PacketHeader, Vec<u8>)>,
}

impl<'a> TestGuest<'a> {
    pub fn new(mem: &'a GuestMemory) -> Self {
        TestGuest {
            mem,
            rx: DriverQueue::new(mem, 0),
            tx: DriverQueue::new(mem, 0x4000),
            ev: DriverQueue::new(mem, 0x8000),
            next_addr: BUF_START,
            inbox: Vec::new(),
        }
    }

    /// Guest memory for a buffer of `len` bytes (bump allocator that wraps).
    pub fn alloc(&mut self, len: u32) -> u64 {
        let len = u64::from(len).next_multiple_of(64);
        if self.next_addr + len > TEST_MEM_SIZE as u64 {
            self.next_addr = BUF_START;
        }
        let a = self.next_addr;
        self.next_addr += len;
        a
    }

    /// Queue `n` receive buffers of `size` bytes, one descriptor each (as Linux does).
    pub fn add_rx_buffers(&mut self, n: usize, size: u32) {
        for _ in 0..n {
            let a = self.alloc(size);
            self.rx.add(&[(a, size, F_WRITE)]);
        }
    }

    /// Queue a TX packet: header in its own descriptor, payload (if any) in a second one.
    pub fn queue_tx(&mut self, hdr: &PacketHeader, payload: &[u8]) {
        let h = self.alloc(HDR_SIZE as u32);
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(h))
            .unwrap();
        if payload.is_empty() {
            self.tx.add(&[(h, HDR_SIZE as u32, 0)]);
        } else {
            let d = self.alloc(payload.len() as u32);
            self.mem.write_slice(payload, GuestAddress(d)).unwrap();
            self.tx
                .add(&[(h, HDR_SIZE as u32, 0), (d, payload.len() as u32, 0)]);
        }
    }

    /// Collect what the device put in RX buffers into `inbox`, refilling as many buffers.
    pub fn collect_rx(&mut self) -> usize {
        let used = self.rx.take_used();
        for &(head, len) in &used {
            let bufs = self.rx.bufs.remove(&head).expect("known head");
            let mut data = Vec::new();
            for (addr, blen) in bufs {
                let mut b = vec![0u8; blen as usize];
                self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
                data.extend_from_slice(&b);
            }
            assert!(
                len as usize >= HDR_SIZE,
                "used length {len} shorter than a header"
            );
            data.truncate(len as usize);
            let mut raw = [0u8; HDR_SIZE];
            raw.copy_from_slice(&data[..HDR_SIZE]);
            let hdr = PacketHeader::from_bytes(&raw);
            assert_eq!(
                hdr.len as usize,
                len as usize - HDR_SIZE,
                "len field matches used len"
            );
            self.inbox.push((hdr, data[HDR_SIZE..].to_vec()));
        }
        self.add_rx_buffers(used.len(), 4096 + HDR_SIZE as u32);
        used.len()
    }
}

/// A guest-originated packet header from `src_port` to host port `dst_port`.
pub fn guest_hdr(src_port: u32, dst_port: u32, op: u16) -> PacketHeader {
    PacketHeader {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
}

/// A packet the guest received: header and payload.
pub type Received = (PacketHeader, Vec<u8>);

/// A device worker, a test guest and the host side, in a temp dir.
pub struct Rig<'a> {
    pub guest: TestGuest<'a>,
    pub worker: VsockWorker,
    _dir: TempDir,
    pub path: PathBuf,
}

impl<'a> Rig<'a> {
    pub fn new(mem: &'a GuestMemory) -> Self {
        let dir = TempDir::new_with_prefix("/tmp/vsock-test").unwrap();
        let path = dir.as_path().join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let mut guest = TestGuest::new(mem);
        let interrupt = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let ctx = ActivateContext {
            mem: mem.clone(),
            queues: vec![guest.rx.queue(), guest.tx.queue(), guest.ev.queue()],
            queue_evts: (0..3)
                .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
                .collect(),
            interrupt,
        };
        let worker = VsockWorker::new(ctx, GUEST_CID, path.clone(), listener).unwrap();
        guest.add_rx_buffers(16, 4096 + HDR_SIZE as u32);
        Rig {
            guest,
            worker,
            _dir: dir,
            path,
        }
    }

    /// Guest sends a packet; the device processes it immediately.
    pub fn send(&mut self, hdr: &PacketHeader, payload: &[u8]) {
        let mut hdr = *hdr;
        hdr.len = payload.len() as u32;
        self.guest.queue_tx(&hdr, payload);
        self.worker.process_queues();
        self.guest.collect_rx();
    }

    /// Run the event loop for about `ms` milliseconds, collecting RX.
    pub fn pump(&mut self, ms: u64) {
        let end = Instant::now() + Duration::from_millis(ms);
        loop {
            assert!(self.worker.run_once(5).unwrap());
            self.guest.collect_rx();
            if Instant::now() >= end {
                break;
            }
        }
    }

    /// Pump until the guest has received a packet matching `f` (panics after 5 s); removes and
    /// returns it and everything before it.
    pub fn wait_for(
        &mut self,
        f: impl Fn(&PacketHeader) -> bool,
    ) -> (PacketHeader, Vec<u8>, Vec<Received>) {
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(i) = self.guest.inbox.iter().position(|(h, _)| f(h)) {
                let mut before: Vec<_> = self.guest.inbox.drain(..=i).collect();
                let (h, d) = before.pop().unwrap();
                return (h, d, before);
            }
            assert!(
                Instant::now() < end,
                "timed out; inbox: {:?}",
                self.guest.inbox
            );
            assert!(self.worker.run_once(5).unwrap());
            self.guest.collect_rx();
        }
    }

    /// Take everything received so far.
    pub fn take_inbox(&mut self) -> Vec<(PacketHeader, Vec<u8>)> {
        std::mem::take(&mut self.guest.inbox)
    }

    /// Host client connects and asks for guest port `port`; returns the stream and the guest's
    /// view of the REQUEST.
    pub fn host_connect(&mut self, port: u32) -> (UnixStream, PacketHeader) {
        let mut s = UnixStream::connect(&self.path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        let (req, _, _) = self.wait_for(|h| h.op == op::REQUEST);
        (s, req)
    }

    /// A fully established host-initiated connection to guest port `port`. Returns the host
    /// stream and the host port.
    pub fn established(&mut self, port: u32, guest_buf_alloc: u32) -> (UnixStream, u32) {
        let (mut s, req) = self.host_connect(port);
        let mut resp = guest_hdr(port, req.src_port, op::RESPONSE);
        resp.buf_alloc = guest_buf_alloc;
        self.send(&resp, &[]);
        let expect = format!("OK {}\n", req.src_port);
        let mut got = vec![0u8; expect.len()];
        s.read_exact(&mut got).unwrap();
        assert_eq!(String::from_utf8(got).unwrap(), expect);
        (s, req.src_port)
    }

    pub fn sock_path(&self, suffix: &str) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(suffix);
        Path::new(&p).to_path_buf()
    }
}
