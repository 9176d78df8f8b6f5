//! virtio-net over a tap device: one RX and one TX queue, MAC and link status in config space,
//! no offloads.

pub mod rxtx;
pub mod tap;

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP};
use virtio_queue::Queue;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use self::rxtx::{NetStats, RxState};
pub use self::tap::{Tap, TapError};
use super::block::read_config_bytes;
use super::{
    device_type, epoll_wait, ActivateContext, ActivateError, Interrupt, VirtioDevice, Worker,
    KILL_TOKEN, VIRTIO_F_VERSION_1,
};
use crate::GuestMemory;

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;

const RX_TOKEN: u64 = RX_QUEUE as u64;
const TX_TOKEN: u64 = TX_QUEUE as u64;
const TAP_TOKEN: u64 = 2;

/// Errors of the network device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The tap could not be opened.
    #[error("cannot open tap")]
    Tap(#[from] TapError),
    /// Reading a frame from the tap failed.
    #[error("cannot read from the tap")]
    TapRead(#[source] io::Error),
    /// The available ring could not be read (bad index from the driver).
    #[error("cannot read the available ring")]
    AvailRing(#[source] virtio_queue::Error),
    /// The used ring could not be written.
    #[error("cannot add to the used ring")]
    UsedRing(#[source] virtio_queue::Error),
}

/// A virtio-net device.
#[derive(Debug)]
pub struct Net {
    tap: Arc<Tap>,
    mac: [u8; 6],
    acked_features: u64,
    worker: Option<Worker>,
    counters: Arc<NetCounters>,
}

/// Frame counters of one NIC, published by its worker after each batch, read by the VMM.
#[derive(Debug, Default)]
pub struct NetCounters {
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Frames from the tap dropped (runt, or no usable guest buffer).
    pub rx_dropped: AtomicU64,
    /// Frames sent from the guest to the tap.
    pub tx_frames: AtomicU64,
    /// Guest frames dropped (malformed chain, or the tap refused them).
    pub tx_dropped: AtomicU64,
}

impl NetCounters {
    /// The counters as (name, value) pairs, for reporting.
    pub fn snapshot(&self) -> [(&'static str, u64); 4] {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("rx_frames", g(&self.rx_frames)),
            ("rx_dropped", g(&self.rx_dropped)),
            ("tx_frames", g(&self.tx_frames)),
            ("tx_dropped", g(&self.tx_dropped)),
        ]
    }

    fn publish(&self, rx: &NetStats, tx: &NetStats) {
        self.rx_frames.store(rx.frames, Ordering::Relaxed);
        self.rx_dropped.store(rx.dropped, Ordering::Relaxed);
        self.tx_frames.store(tx.frames, Ordering::Relaxed);
        self.tx_dropped.store(tx.dropped, Ordering::Relaxed);
    }
}

impl Net {
    /// A device attached to the existing tap interface `tap_name`, with MAC address `mac`.
    pub fn new(tap_name: &str, mac: [u8; 6]) -> Result<Net, NetError> {
        Ok(Net::with_tap(Tap::open(tap_name)?, mac))
    }

    /// A device around an already-open tap (see [`Tap::from_fd`]).
    pub fn with_tap(tap: Tap, mac: [u8; 6]) -> Net {
        Net {
            tap: Arc::new(tap),
            mac,
            acked_features: 0,
            worker: None,
            counters: Arc::default(),
        }
    }

    /// The NIC's frame counters (live: shared with the worker).
    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    /// The tap interface name.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    /// The guest MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Config space: mac[6], status (le16, link up).
    fn config(&self) -> [u8; 8] {
        let mut c = [0u8; 8];
        for (dst, src) in c.iter_mut().zip(self.mac.iter()) {
            *dst = *src;
        }
        let status = (VIRTIO_NET_S_LINK_UP as u16).to_le_bytes();
        for (dst, src) in c.iter_mut().skip(6).zip(status.iter()) {
            *dst = *src;
        }
        c
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS)
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The MAC is read-only without VIRTIO_NET_F_CTRL_MAC_ADDR.
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let ActivateContext {
            mem,
            queues,
            queue_evts,
            interrupt,
        } = ctx;
        let got = queues.len();
        let mut queues = queues.into_iter();
        let mut evts = queue_evts.into_iter();
        let (Some(rx_queue), Some(tx_queue), Some(rx_evt), Some(tx_evt), 2) =
            (queues.next(), queues.next(), evts.next(), evts.next(), got)
        else {
            return Err(ActivateError::QueueCount { expected: 2, got });
        };
        Worker::stop_slot(&mut self.worker);
        let worker = NetWorker {
            mem,
            rx_queue,
            tx_queue,
            rx_evt,
            tx_evt,
            interrupt,
            tap: self.tap.clone(),
            rx: RxState::default(),
            tx_frame: Vec::new(),
            tx_stats: NetStats::default(),
            counters: self.counters.clone(),
        };
        let name = format!("net-{}", self.tap.name());
        self.worker =
            Some(Worker::spawn(name, move |kill| worker.run(kill)).map_err(ActivateError::Worker)?);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.acked_features = 0;
        Worker::stop_slot(&mut self.worker)
    }
}

struct NetWorker {
    mem: GuestMemory,
    rx_queue: Queue,
    tx_queue: Queue,
    rx_evt: EventFd,
    tx_evt: EventFd,
    interrupt: Interrupt,
    tap: Arc<Tap>,
    rx: RxState,
    tx_frame: Vec<u8>,
    tx_stats: NetStats,
    counters: Arc<NetCounters>,
}

impl NetWorker {
    fn run(mut self, kill: EventFd) {
        if let Err(e) = self.event_loop(&kill) {
            log::error!("virtio-net {}: worker stopped: {e}", self.tap.name());
        }
    }

    fn event_loop(&mut self, kill: &EventFd) -> io::Result<()> {
        let epoll = Epoll::new()?;
        let fds = [
            (self.rx_evt.as_raw_fd(), EventSet::IN, RX_TOKEN),
            (self.tx_evt.as_raw_fd(), EventSet::IN, TX_TOKEN),
            // Edge-triggered: RX drains the tap until it would block or the guest runs out of
            // buffers; in the latter case the guest's RX notification resumes it.
            (
                self.tap.as_raw_fd(),
                EventSet::IN | EventSet::EDGE_TRIGGERED,
                TAP_TOKEN,
            ),
            (kill.as_raw_fd(), EventSet::IN, KILL_TOKEN),
        ];
        for (fd, set, token) in fds {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(set, token))?;
        }
        let mut events = [EpollEvent::default(); 8];
        self.process_tx();
        self.process_rx();
        loop {
            let n = epoll_wait(&epoll, &mut events)?;
            for ev in events.iter().take(n) {
                match ev.data() {
                    KILL_TOKEN => return Ok(()),
                    RX_TOKEN => {
                        let _ = self.rx_evt.read();
                        self.process_rx();
                    }
                    TX_TOKEN => {
                        let _ = self.tx_evt.read();
                        self.process_tx();
                    }
                    TAP_TOKEN => self.process_rx(),
                    _ => {}
                }
            }
        }
    }

    fn signal(&self) {
        if let Err(e) = self.interrupt.signal_used_queue() {
            log::error!(
                "virtio-net {}: cannot raise interrupt: {e}",
                self.tap.name()
            );
        }
    }

    fn process_rx(&mut self) {
        match rxtx::process_rx(&self.mem, &mut self.rx_queue, &self.tap, &mut self.rx) {
            Ok(true) => self.signal(),
            Ok(false) => {}
            Err(e) => log::debug!("virtio-net {}: rx: {e}", self.tap.name()),
        }
        self.counters.publish(&self.rx.stats, &self.tx_stats);
    }

    fn process_tx(&mut self) {
        match rxtx::process_tx(
            &self.mem,
            &mut self.tx_queue,
            &self.tap,
            &mut self.tx_frame,
            &mut self.tx_stats,
        ) {
            Ok(true) => self.signal(),
            Ok(false) => {}
            Err(e) => log::debug!("virtio-net {}: tx: {e}", self.tap.name()),
        }
        self.counters.publish(&self.rx.stats, &self.tx_stats);
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixDatagram;

    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::bus::BusDevice;
    use crate::virtio::mmio::{bring_up, MmioTransport};
    use crate::virtio::test_utils::{add_chain, memory, used, wait_used, DATA_ADDR, R, W};

    const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x42];

    #[test]
    fn config_and_features() {
        let (ours, _peer) = UnixDatagram::pair().unwrap();
        let net = Net::with_tap(Tap::from_fd(OwnedFd::from(ours), "fake0").unwrap(), MAC);
        let mut c = [0u8; 8];
        net.read_config(0, &mut c);
        assert_eq!(&c[..6], &MAC);
        assert_eq!(
            u16::from_le_bytes([c[6], c[7]]),
            VIRTIO_NET_S_LINK_UP as u16
        );
        let f = net.avail_features();
        assert_ne!(f & (1 << VIRTIO_NET_F_MAC), 0);
        assert_ne!(f & VIRTIO_F_VERSION_1, 0);
        assert_eq!(net.tap_name(), "fake0");
    }

    #[test]
    fn tap_open_rejects_bad_names() {
        assert!(matches!(Tap::open(""), Err(TapError::InvalidName(_))));
        assert!(matches!(
            Tap::open("a-name-that-is-too-long"),
            Err(TapError::InvalidName(_))
        ));
        assert!(matches!(Tap::open("a\0b"), Err(TapError::InvalidName(_))));
    }

    /// Opens a real (transient) tap when the test runs with CAP_NET_ADMIN; skipped otherwise.
    #[test]
    fn tap_open_real_device() {
        let name = format!("hnt{}", std::process::id() % 100_000);
        match Tap::open(&name) {
            Ok(tap) => {
                assert_eq!(tap.name(), name);
                // Non-blocking, and nothing queued on a down interface.
                let err = tap.read(&mut [0u8; 64]).unwrap_err();
                assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
            }
            Err(TapError::SetIff { source, .. }) if source.raw_os_error() == Some(libc::EPERM) => {
                eprintln!("skipping: no CAP_NET_ADMIN");
            }
            Err(TapError::OpenTun(e)) => eprintln!("skipping: no /dev/net/tun: {e}"),
            Err(e) => panic!("cannot open tap: {e:?}"),
        }
    }

    /// Frames flow both ways through the worker thread and its epoll loop.
    #[test]
    fn worker_moves_frames_both_ways() {
        let mem = memory();
        let (ours, peer) = UnixDatagram::pair().unwrap();
        peer.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let net = Net::with_tap(Tap::from_fd(OwnedFd::from(ours), "fake0").unwrap(), MAC);
        let counters = net.counters();
        let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut t = MmioTransport::new(mem.clone(), Box::new(net), irq).unwrap();
        let rxq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x8000), QUEUE_SIZE);
        bring_up(&mut t, &[&rxq, &txq]);
        assert!(t.is_activated());

        // TX.
        let mut out = vec![0u8; 12];
        out.extend_from_slice(b"hello from the guest");
        mem.write_slice(&out, GuestAddress(DATA_ADDR)).unwrap();
        add_chain(&txq, 0, &[(DATA_ADDR, out.len() as u32, R)]);
        t.write(0x50, &1u32.to_le_bytes());
        let mut got = [0u8; 128];
        let n = peer.recv(&mut got).unwrap();
        assert_eq!(&got[..n], &out[..]);
        wait_used(&txq, 1);

        // RX: the frame arrives before the guest has buffers, and is delivered once it adds one.
        let mut inbound = vec![0u8; 12];
        inbound.extend_from_slice(b"hello from the host");
        peer.send(&inbound).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        add_chain(&rxq, 0, &[(DATA_ADDR + 0x1000, 1526, W)]);
        t.write(0x50, &0u32.to_le_bytes());
        wait_used(&rxq, 1);
        assert_eq!(used(&rxq, 0), (0, inbound.len() as u32));
        let mut buf = vec![0u8; inbound.len()];
        mem.read_slice(&mut buf, GuestAddress(DATA_ADDR + 0x1000))
            .unwrap();
        assert_eq!(&buf[12..], b"hello from the host");
        assert_ne!(
            t.interrupt().status() & crate::virtio::INTERRUPT_STATUS_USED_RING,
            0
        );
        // The worker published both frames (publication follows the used-ring update).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while counters.rx_frames.load(Ordering::Relaxed) < 1 && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(
            counters.snapshot(),
            [
                ("rx_frames", 1),
                ("rx_dropped", 0),
                ("tx_frames", 1),
                ("tx_dropped", 0)
            ]
        );

        // Reset joins the worker.
        t.write(0x70, &0u32.to_le_bytes());
        assert!(!t.is_activated());
    }
}
