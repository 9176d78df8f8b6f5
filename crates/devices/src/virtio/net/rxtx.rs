//! virtio-net queue processing, generic over guest memory and free of threads and epoll.
//!
//! Frames cross the tap with a 12-byte `virtio_net_hdr_v1` prefix, the same header the guest
//! uses, so TX sends the guest's chain as is (with the offload fields cleared, since no
//! offload is negotiated) and RX copies the tap's frame into the guest's buffers with
//! `num_buffers = 1`.

use std::io;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestMemory, Permissions};

use super::tap::{Tap, VNET_HDR_LEN};
use super::NetError;
use crate::virtio::pop_chain;

/// Largest frame (vnet header included) we move in either direction: a 64 KiB IP packet plus
/// Ethernet and VLAN headers.
pub const MAX_FRAME_LEN: usize = VNET_HDR_LEN + 65_562;

/// Offset of `num_buffers` in `virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: usize = 10;

/// Frame counters, for tests and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames moved.
    pub frames: u64,
    /// Frames or chains dropped because they were malformed or did not fit.
    pub dropped: u64,
}

/// RX state kept across calls: a frame read from the tap that no guest buffer took yet.
#[derive(Debug)]
pub struct RxState {
    buf: Vec<u8>,
    pending: Option<usize>,
    /// Counters.
    pub stats: NetStats,
}

impl Default for RxState {
    fn default() -> Self {
        RxState {
            buf: vec![0; MAX_FRAME_LEN],
            pending: None,
            stats: NetStats::default(),
        }
    }
}

impl RxState {
    /// Whether a frame is held waiting for guest buffers.
    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }
}

/// Check that every descriptor has the wanted direction and lies in guest memory.
fn check_descs<M: GuestMemory>(mem: &M, descs: &[Descriptor], write_only: bool) -> bool {
    let access = if write_only {
        Permissions::Write
    } else {
        Permissions::Read
    };
    descs.iter().all(|d| {
        d.is_write_only() == write_only && mem.check_range(d.addr(), d.len() as usize, access)
    })
}

/// Move frames from the tap into the RX queue until the tap is empty or the guest runs out of
/// buffers (the frame is then held in `rx`). Returns true if the guest should be interrupted.
pub fn process_rx<M: GuestMemory>(
    mem: &M,
    queue: &mut Queue,
    tap: &Tap,
    rx: &mut RxState,
) -> Result<bool, NetError> {
    let mut used_any = false;
    loop {
        let len = match rx.pending {
            Some(len) => len,
            None => match tap.read(&mut rx.buf) {
                Ok(0) => break,
                Ok(n) if n < VNET_HDR_LEN => {
                    rx.stats.dropped += 1;
                    continue;
                }
                Ok(n) => {
                    rx.pending = Some(n);
                    n
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(NetError::TapRead(e)),
            },
        };
        let chain = pop_chain(queue, mem, "virtio-net").map_err(NetError::AvailRing)?;
        // No guest buffer: hold the frame until the driver adds some.
        let Some(chain) = chain else { break };
        let head = chain.head_index();
        let frame = rx.buf.get_mut(..len).unwrap_or_default();
        let used = match write_frame(mem, chain, frame) {
            Some(used) => {
                rx.stats.frames += 1;
                used
            }
            None => {
                rx.stats.dropped += 1;
                0
            }
        };
        // The frame is consumed either way: a malformed buffer must not wedge RX.
        rx.pending = None;
        queue
            .add_used(mem, head, used)
            .map_err(NetError::UsedRing)?;
        used_any = true;
    }
    Ok(used_any && queue.needs_notification(mem).unwrap_or(true))
}

/// Copy `frame` into the chain's writable buffers. None if the chain is malformed or too small.
fn write_frame<M: GuestMemory>(
    mem: &M,
    chain: DescriptorChain<&M>,
    frame: &mut [u8],
) -> Option<u32> {
    let descs: Vec<Descriptor> = chain.collect();
    if descs.is_empty() || !check_descs(mem, &descs, true) {
        log::debug!("virtio-net: malformed rx chain");
        return None;
    }
    let capacity: u64 = descs.iter().map(|d| u64::from(d.len())).sum();
    if capacity < frame.len() as u64 {
        log::debug!(
            "virtio-net: rx buffer of {capacity} bytes too small for {}",
            frame.len()
        );
        return None;
    }
    if let Some(num_buffers) = frame.get_mut(NUM_BUFFERS_OFFSET..VNET_HDR_LEN) {
        num_buffers.copy_from_slice(&1u16.to_le_bytes());
    }
    let mut rest: &[u8] = frame;
    for d in &descs {
        if rest.is_empty() {
            break;
        }
        let n = rest.len().min(d.len() as usize);
        let (now, later) = rest.split_at(n);
        mem.write_slice(now, d.addr()).ok()?;
        rest = later;
    }
    u32::try_from(frame.len()).ok()
}

/// Send every available TX chain to the tap. Malformed chains are returned unsent. Returns true
/// if the guest should be interrupted.
pub fn process_tx<M: GuestMemory>(
    mem: &M,
    queue: &mut Queue,
    tap: &Tap,
    frame: &mut Vec<u8>,
    stats: &mut NetStats,
) -> Result<bool, NetError> {
    let mut used_any = false;
    loop {
        let chain = pop_chain(queue, mem, "virtio-net").map_err(NetError::AvailRing)?;
        let Some(chain) = chain else { break };
        let head = chain.head_index();
        if read_frame(mem, chain, frame) {
            match tap.write(frame) {
                Ok(_) => stats.frames += 1,
                Err(e) => {
                    // A full tap queue drops the frame, as a real NIC would.
                    log::debug!("virtio-net: tap write failed: {e}");
                    stats.dropped += 1;
                }
            }
        } else {
            stats.dropped += 1;
        }
        queue.add_used(mem, head, 0).map_err(NetError::UsedRing)?;
        used_any = true;
    }
    Ok(used_any && queue.needs_notification(mem).unwrap_or(true))
}

/// Gather a TX chain into `frame`. False if it is malformed (writable or out-of-memory
/// descriptor, shorter than the header, longer than [`MAX_FRAME_LEN`]).
fn read_frame<M: GuestMemory>(mem: &M, chain: DescriptorChain<&M>, frame: &mut Vec<u8>) -> bool {
    let descs: Vec<Descriptor> = chain.collect();
    if !check_descs(mem, &descs, false) {
        log::debug!("virtio-net: malformed tx chain");
        return false;
    }
    let len: u64 = descs.iter().map(|d| u64::from(d.len())).sum();
    if len < VNET_HDR_LEN as u64 || len > MAX_FRAME_LEN as u64 {
        log::debug!("virtio-net: tx frame of {len} bytes");
        return false;
    }
    // len <= MAX_FRAME_LEN.
    frame.resize(len as usize, 0);
    let mut off = 0usize;
    for d in &descs {
        let n = d.len() as usize;
        let Some(dst) = off.checked_add(n).and_then(|end| frame.get_mut(off..end)) else {
            return false;
        };
        if mem.read_slice(dst, d.addr()).is_err() {
            return false;
        }
        off += n;
    }
    // No offloads were negotiated: never let the guest ask the host kernel for checksum or GSO
    // work. Keep only the `num_buffers` field.
    if let Some(hdr) = frame.get_mut(..NUM_BUFFERS_OFFSET) {
        hdr.fill(0);
    }
    true
}

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixDatagram;

    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::virtio::test_utils::{add_chain, memory, used, used_idx, DATA_ADDR, R, W};

    /// A tap stand-in: one end of a datagram socketpair (frames keep their boundaries).
    fn fake_tap() -> (Tap, UnixDatagram) {
        let (ours, peer) = UnixDatagram::pair().unwrap();
        peer.set_nonblocking(true).unwrap();
        (Tap::from_fd(OwnedFd::from(ours), "fake0").unwrap(), peer)
    }

    fn frame(payload_len: usize) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend((0..payload_len).map(|i| (i % 199) as u8));
        f
    }

    fn tx(mem: &GuestMemoryMmap, tap: &Tap, descs: &[(u64, u32, u16)]) -> (bool, NetStats, u16) {
        let vq = MockSplitQueue::new(mem, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        add_chain(&vq, 0, descs);
        let mut stats = NetStats::default();
        let notify = process_tx(mem, &mut q, tap, &mut Vec::new(), &mut stats).unwrap();
        let n = used_idx(&vq);
        if n > 0 {
            assert_eq!(used(&vq, 0), (0, 0));
        }
        (notify, stats, n)
    }

    #[test]
    fn tx_sends_frame_with_cleared_offloads() {
        let mem = memory();
        let (tap, peer) = fake_tap();
        let f = frame(100);
        // Header with bogus offload requests, split across two descriptors with the payload.
        let mut hdr = [0xffu8; VNET_HDR_LEN];
        hdr[10] = 1;
        hdr[11] = 0;
        mem.write_slice(&hdr, GuestAddress(DATA_ADDR)).unwrap();
        mem.write_slice(&f[VNET_HDR_LEN..], GuestAddress(DATA_ADDR + 0x100))
            .unwrap();
        let descs = [
            (DATA_ADDR, 12, R),
            (DATA_ADDR + 0x100, 40, R),
            (DATA_ADDR + 0x128, 60, R),
        ];
        let (notify, stats, n) = tx(&mem, &tap, &descs);
        assert!(notify);
        assert_eq!(n, 1);
        assert_eq!(
            stats,
            NetStats {
                frames: 1,
                dropped: 0
            }
        );
        let mut got = [0u8; 256];
        let len = peer.recv(&mut got).unwrap();
        assert_eq!(len, 112);
        assert_eq!(&got[..10], &[0u8; 10]);
        assert_eq!(&got[10..12], &[1, 0]);
        assert_eq!(&got[12..len], &f[12..]);
    }

    #[test]
    fn tx_malformed_chains_are_consumed_unsent() {
        let mem = memory();
        let (tap, peer) = fake_tap();
        let cases: [&[(u64, u32, u16)]; 4] = [
            // A device-writable descriptor in a TX chain.
            &[(DATA_ADDR, 12, R), (DATA_ADDR + 0x100, 60, W)],
            // Shorter than the vnet header.
            &[(DATA_ADDR, 8, R)],
            // Outside guest memory.
            &[(DATA_ADDR, 12, R), (0x1_0000_0000, 60, R)],
            // Larger than any frame.
            &[(DATA_ADDR, 12, R), (DATA_ADDR, 0x8_0000, R)],
        ];
        for descs in cases {
            let (notify, stats, n) = tx(&mem, &tap, descs);
            assert!(notify);
            assert_eq!(n, 1, "{descs:?}");
            assert_eq!(
                stats,
                NetStats {
                    frames: 0,
                    dropped: 1
                },
                "{descs:?}"
            );
            assert!(
                peer.recv(&mut [0u8; 64]).is_err(),
                "nothing sent for {descs:?}"
            );
        }
    }

    fn rx_queue(mem: &GuestMemoryMmap) -> (MockSplitQueue<'_, GuestMemoryMmap>, Queue) {
        let vq = MockSplitQueue::new(mem, 16);
        let q = vq.create_queue().unwrap();
        (vq, q)
    }

    #[test]
    fn rx_delivers_frame_with_num_buffers() {
        let mem = memory();
        let (tap, peer) = fake_tap();
        let (vq, mut q) = rx_queue(&mem);
        let mut f = frame(200);
        f[10] = 0xaa;
        f[11] = 0xbb;
        peer.send(&f).unwrap();
        // Two buffers: the frame spans both.
        add_chain(
            &vq,
            0,
            &[(DATA_ADDR, 100, W), (DATA_ADDR + 0x1000, 1500, W)],
        );
        let mut rx = RxState::default();
        assert!(process_rx(&mem, &mut q, &tap, &mut rx).unwrap());
        assert_eq!(used(&vq, 0), (0, 212));
        assert!(!rx.has_pending());
        let mut got = vec![0u8; 212];
        mem.read_slice(&mut got[..100], GuestAddress(DATA_ADDR))
            .unwrap();
        mem.read_slice(&mut got[100..], GuestAddress(DATA_ADDR + 0x1000))
            .unwrap();
        assert_eq!(&got[10..12], &[1, 0], "num_buffers = 1");
        assert_eq!(&got[12..], &f[12..]);
        assert_eq!(
            rx.stats,
            NetStats {
                frames: 1,
                dropped: 0
            }
        );
    }

    #[test]
    fn rx_holds_frame_until_guest_adds_buffers() {
        let mem = memory();
        let (tap, peer) = fake_tap();
        let (vq, mut q) = rx_queue(&mem);
        let f1 = frame(60);
        let f2 = frame(70);
        peer.send(&f1).unwrap();
        peer.send(&f2).unwrap();
        let mut rx = RxState::default();
        assert!(!process_rx(&mem, &mut q, &tap, &mut rx).unwrap());
        assert!(rx.has_pending());
        assert_eq!(used_idx(&vq), 0);
        // One buffer: the first frame goes, the second is held.
        add_chain(&vq, 0, &[(DATA_ADDR, 2048, W)]);
        assert!(process_rx(&mem, &mut q, &tap, &mut rx).unwrap());
        assert_eq!(used(&vq, 0), (0, 72));
        assert!(rx.has_pending());
        add_chain(&vq, 1, &[(DATA_ADDR + 0x1000, 2048, W)]);
        assert!(process_rx(&mem, &mut q, &tap, &mut rx).unwrap());
        assert_eq!(used(&vq, 1), (1, 82));
        assert!(!rx.has_pending());
        let mut got = vec![0u8; 82];
        mem.read_slice(&mut got, GuestAddress(DATA_ADDR + 0x1000))
            .unwrap();
        assert_eq!(&got[12..], &f2[12..]);
    }

    #[test]
    fn rx_malformed_buffers_drop_the_frame() {
        let mem = memory();
        let (tap, peer) = fake_tap();
        let cases: [&[(u64, u32, u16)]; 3] = [
            // Too small for the frame.
            &[(DATA_ADDR, 64, W)],
            // A device-readable descriptor.
            &[(DATA_ADDR, 2048, R)],
            // Outside guest memory.
            &[(0x1_0000_0000, 2048, W)],
        ];
        for descs in cases {
            let (vq, mut q) = rx_queue(&mem);
            mem.write_slice(&[0xee; 64], GuestAddress(DATA_ADDR))
                .unwrap();
            peer.send(&frame(100)).unwrap();
            add_chain(&vq, 0, descs);
            let mut rx = RxState::default();
            assert!(process_rx(&mem, &mut q, &tap, &mut rx).unwrap());
            assert_eq!(used(&vq, 0), (0, 0), "{descs:?}");
            assert_eq!(rx.stats.dropped, 1);
            assert!(!rx.has_pending());
            let mut got = [0u8; 64];
            mem.read_slice(&mut got, GuestAddress(DATA_ADDR)).unwrap();
            assert_eq!(got, [0xee; 64], "guest memory untouched for {descs:?}");
        }
    }

    #[test]
    fn rx_drops_runt_frames() {
        let mem = memory();
        let (tap, peer) = fake_tap();
        let (vq, mut q) = rx_queue(&mem);
        peer.send(&[1, 2, 3]).unwrap();
        peer.send(&frame(10)).unwrap();
        add_chain(&vq, 0, &[(DATA_ADDR, 2048, W)]);
        let mut rx = RxState::default();
        assert!(process_rx(&mem, &mut q, &tap, &mut rx).unwrap());
        assert_eq!(used_idx(&vq), 1);
        assert_eq!(used(&vq, 0), (0, 22));
        assert_eq!(
            rx.stats,
            NetStats {
                frames: 1,
                dropped: 1
            }
        );
    }
}
