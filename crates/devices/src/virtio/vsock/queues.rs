//! Moving packets between the virtqueues and the muxer. Generic over the poller and free of
//! epoll, so tests drive it with `virtio-queue`'s mock driver.

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};

use super::muxer::{Muxer, Poller};
use super::packet::{read_tx_packet, PacketError, RxBuffer};
use super::ratelimit::{rl_log, LogLimiter};
use crate::GuestMemory;

/// Index of the RX queue (device -> driver).
pub const RXQ: usize = 0;
/// Index of the TX queue (driver -> device).
pub const TXQ: usize = 1;
/// Index of the event queue (unused: we never reset the transport under the guest).
pub const EVQ: usize = 2;

fn pop<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemory,
    log: &mut LogLimiter,
) -> Option<DescriptorChain<&'a GuestMemory>> {
    match queue.iter(mem) {
        Ok(mut it) => it.next(),
        Err(e) => {
            rl_log!(log, warn, "vsock: bad queue state: {e}");
            None
        }
    }
}

fn add_used(queue: &mut Queue, mem: &GuestMemory, head: u16, len: u32, log: &mut LogLimiter) {
    if let Err(e) = queue.add_used(mem, head, len) {
        rl_log!(log, warn, "vsock: cannot return descriptor {head}: {e}");
    }
}

/// Hand every packet the guest queued on TX to the muxer, until the queue is empty or the muxer
/// needs the guest to drain RX first. Returns how many chains were used.
pub fn process_tx<P: Poller>(
    mem: &GuestMemory,
    queue: &mut Queue,
    muxer: &mut Muxer<P>,
    payload: &mut Vec<u8>,
    log: &mut LogLimiter,
) -> usize {
    let mut used = 0;
    while !muxer.rx_full() {
        let Some(chain) = pop(queue, mem, log) else {
            break;
        };
        let head = chain.head_index();
        match read_tx_packet(mem, chain, payload) {
            Ok(hdr) => muxer.send_pkt(&hdr, payload),
            Err(e) => {
                rl_log!(log, warn, "vsock: dropping malformed tx packet: {e}");
                if let PacketError::TooLong { hdr } | PacketError::LenMismatch { hdr, .. } = e {
                    muxer.reject_pkt(&hdr);
                }
            }
        }
        add_used(queue, mem, head, 0, log);
        used += 1;
    }
    used
}

/// Fill RX buffers with packets from the muxer until either runs out. `scratch` must hold at
/// least [`super::packet::MAX_PKT_LEN`] bytes. Returns how many chains were used.
pub fn process_rx<P: Poller>(
    mem: &GuestMemory,
    queue: &mut Queue,
    muxer: &mut Muxer<P>,
    scratch: &mut [u8],
    log: &mut LogLimiter,
) -> usize {
    let mut used = 0;
    while muxer.has_rx() {
        let Some(chain) = pop(queue, mem, log) else {
            break;
        };
        let head = chain.head_index();
        let buf = match RxBuffer::new(mem, chain) {
            Ok(b) => b,
            Err(e) => {
                rl_log!(log, warn, "vsock: dropping bad rx buffer: {e}");
                add_used(queue, mem, head, 0, log);
                used += 1;
                continue;
            }
        };
        let cap = buf.payload_capacity().min(scratch.len());
        let Some(hdr) = muxer.recv_pkt(&mut scratch[..cap]) else {
            // Nothing after all: give the buffer back for next time.
            queue.go_to_previous_position();
            break;
        };
        // recv_pkt never returns more than `cap` bytes.
        let len = match buf.write_packet(&hdr, &scratch[..hdr.len as usize]) {
            Ok(n) => n,
            Err(e) => {
                rl_log!(log, warn, "vsock: cannot write rx packet: {e}");
                0
            }
        };
        add_used(queue, mem, head, len, log);
        used += 1;
    }
    used
}
