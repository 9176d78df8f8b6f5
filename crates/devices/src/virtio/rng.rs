//! virtio-rng (entropy device): fills device-writable buffers from `getrandom(2)`.

use std::io;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestMemory, Permissions};
use vmm_sys_util::eventfd::EventFd;

use super::{
    device_type, single_queue_loop, ActivateContext, ActivateError, Interrupt, VirtioDevice,
    Worker, VIRTIO_F_VERSION_1,
};
use crate::virtio::pop_chain;
use crate::GuestMemory as Memory;

/// Size of the single request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes handed out per request.
pub const MAX_REQUEST_BYTES: u32 = 64 * 1024;

/// Errors of the entropy device.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    /// The available ring could not be read (bad index from the driver).
    #[error("cannot read the available ring")]
    AvailRing(#[source] virtio_queue::Error),
    /// The used ring could not be written.
    #[error("cannot add to the used ring")]
    UsedRing(#[source] virtio_queue::Error),
    /// `getrandom(2)` failed.
    #[error("getrandom failed")]
    GetRandom(#[source] io::Error),
}

/// Fill `buf` from `getrandom(2)`.
fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while let Some(rest) = buf.get_mut(done..).filter(|r| !r.is_empty()) {
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // 0 <= n <= rest.len()
        done += n as usize;
    }
    Ok(())
}

/// Process every available request. Returns true if the guest should be interrupted.
pub fn process_queue<M: GuestMemory>(mem: &M, queue: &mut Queue) -> Result<bool, RngError> {
    let mut used_any = false;
    loop {
        let chain = pop_chain(queue, mem, "virtio-rng").map_err(RngError::AvailRing)?;
        let Some(chain) = chain else { break };
        let head = chain.head_index();
        let len = fill_chain(mem, chain)?;
        queue.add_used(mem, head, len).map_err(RngError::UsedRing)?;
        used_any = true;
    }
    Ok(used_any && queue.needs_notification(mem).unwrap_or(true))
}

/// Fill the writable descriptors of one chain, up to [`MAX_REQUEST_BYTES`]. A chain with a
/// device-readable descriptor or a buffer outside guest memory is malformed and gets nothing.
/// Returns the number of bytes written.
pub fn fill_chain<M: GuestMemory>(mem: &M, chain: DescriptorChain<&M>) -> Result<u32, RngError> {
    let descs: Vec<Descriptor> = chain.collect();
    let malformed = descs.iter().any(|d| {
        !d.is_write_only() || !mem.check_range(d.addr(), d.len() as usize, Permissions::Write)
    });
    if malformed {
        log::debug!("virtio-rng: malformed request");
        return Ok(0);
    }
    let mut written = 0u32;
    let mut buf = [0u8; 4096];
    for d in &descs {
        let want = d.len().min(MAX_REQUEST_BYTES - written);
        let mut off = 0u32;
        while off < want {
            let n = (want - off).min(buf.len() as u32);
            let chunk = buf.get_mut(..n as usize).unwrap_or_default();
            getrandom(chunk).map_err(RngError::GetRandom)?;
            let Some(addr) = d.addr().checked_add(u64::from(off)) else {
                return Ok(written);
            };
            if mem.write_slice(chunk, addr).is_err() {
                return Ok(written);
            }
            off += n;
            written += n;
        }
        if written >= MAX_REQUEST_BYTES {
            break;
        }
    }
    Ok(written)
}

/// The virtio entropy device.
#[derive(Debug, Default)]
pub struct Rng {
    acked_features: u64,
    worker: Option<Worker>,
}

impl Rng {
    /// A new entropy device.
    pub fn new() -> Self {
        Rng::default()
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & VIRTIO_F_VERSION_1;
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let ActivateContext {
            mem,
            mut queues,
            mut queue_evts,
            interrupt,
        } = ctx;
        let got = queues.len();
        let (Some(queue), Some(evt), 1) = (queues.pop(), queue_evts.pop(), got) else {
            return Err(ActivateError::QueueCount { expected: 1, got });
        };
        Worker::stop_slot(&mut self.worker);
        let worker = RngWorker {
            mem,
            queue,
            evt,
            interrupt,
        };
        self.worker = Some(
            Worker::spawn("rng".to_string(), move |kill| worker.run(kill))
                .map_err(ActivateError::Worker)?,
        );
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.acked_features = 0;
        Worker::stop_slot(&mut self.worker)
    }
}

struct RngWorker {
    mem: Memory,
    queue: Queue,
    evt: EventFd,
    interrupt: Interrupt,
}

impl RngWorker {
    fn run(mut self, kill: EventFd) {
        if let Err(e) = self.event_loop(&kill) {
            log::error!("virtio-rng: worker stopped: {e}");
        }
    }

    fn event_loop(&mut self, kill: &EventFd) -> io::Result<()> {
        let evt = self.evt.try_clone()?;
        single_queue_loop(&evt, kill, || self.process())
    }

    fn process(&mut self) {
        match process_queue(&self.mem, &mut self.queue) {
            Ok(true) => {
                if let Err(e) = self.interrupt.signal_used_queue() {
                    log::error!("virtio-rng: cannot raise interrupt: {e}");
                }
            }
            Ok(false) => {}
            Err(e) => log::debug!("virtio-rng: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::bus::BusDevice;
    use crate::virtio::mmio::{bring_up, MmioTransport};
    use crate::virtio::test_utils::{
        add_chain, memory, used, used_idx, wait_used, DATA_ADDR, R, W,
    };

    fn run(mem: &GuestMemoryMmap, descs: &[(u64, u32, u16)]) -> u32 {
        let vq = MockSplitQueue::new(mem, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        add_chain(&vq, 0, descs);
        assert!(process_queue(mem, &mut q).unwrap());
        assert_eq!(used_idx(&vq), 1);
        used(&vq, 0).1
    }

    fn nonzero(mem: &GuestMemoryMmap, addr: u64, len: usize) -> usize {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf.iter().filter(|&&b| b != 0).count()
    }

    #[test]
    fn fills_writable_buffers() {
        let mem = memory();
        let len = run(&mem, &[(DATA_ADDR, 256, W), (DATA_ADDR + 0x1000, 5000, W)]);
        assert_eq!(len, 5256);
        // Random bytes are zero 1/256 of the time.
        assert!(nonzero(&mem, DATA_ADDR, 256) > 200);
        assert!(nonzero(&mem, DATA_ADDR + 0x1000, 5000) > 4800);
        assert_eq!(
            nonzero(&mem, DATA_ADDR + 0x1000 + 5000, 64),
            0,
            "nothing past the buffer"
        );
    }

    #[test]
    fn caps_each_request() {
        let mem = memory();
        let len = run(&mem, &[(DATA_ADDR, 0x2_0000, W)]);
        assert_eq!(len, MAX_REQUEST_BYTES);
        let cap = u64::from(MAX_REQUEST_BYTES);
        assert!(nonzero(&mem, DATA_ADDR + cap - 256, 256) > 200);
        assert_eq!(nonzero(&mem, DATA_ADDR + cap, 0x1_0000), 0);
        // The cap spans descriptors too.
        let mem = memory();
        let len = run(
            &mem,
            &[(DATA_ADDR, 0xc000, W), (DATA_ADDR + 0x2_0000, 0xc000, W)],
        );
        assert_eq!(len, MAX_REQUEST_BYTES);
        assert_eq!(nonzero(&mem, DATA_ADDR + 0x2_0000 + 0x4000, 0x8000), 0);
    }

    #[test]
    fn malformed_requests_get_nothing() {
        let mem = memory();
        for descs in [
            &[(DATA_ADDR, 64, R)][..],
            &[(DATA_ADDR, 64, W), (DATA_ADDR + 0x100, 64, R)],
            &[(0x1_0000_0000, 64, W)],
            &[(crate::virtio::test_utils::MEM_SIZE as u64 - 32, 64, W)],
        ] {
            assert_eq!(run(&mem, descs), 0, "{descs:?}");
            assert_eq!(nonzero(&mem, DATA_ADDR, 64), 0);
        }
    }

    #[test]
    fn worker_serves_requests() {
        let mem = memory();
        let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut t = MmioTransport::new(mem.clone(), Box::new(Rng::new()), irq).unwrap();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        bring_up(&mut t, &[&vq]);
        add_chain(&vq, 0, &[(DATA_ADDR, 128, W)]);
        t.write(0x50, &0u32.to_le_bytes());
        wait_used(&vq, 1);
        assert_eq!(used(&vq, 0), (0, 128));
        assert_eq!(t.interrupt().status(), 1);
        t.write(0x70, &0u32.to_le_bytes());
        assert!(!t.is_activated());
    }
}
