//! virtio-blk over a raw file, with hot swap of the backing file.
//!
//! [`Block`] is the [`VirtioDevice`]; [`BlockHandle`] (from [`Block::handle`]) is a cloneable
//! control handle that other threads use to swap the backing file and to report drive status.
//! Request handling lives in [`request`] and is generic over guest memory.

pub mod request;

use std::fs::OpenOptions;
use std::io::{self, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX};
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

pub use self::request::BlockStats;
use self::request::{Backing, ID_LEN, SECTOR_SIZE};
use super::{
    device_type, single_queue_loop, ActivateContext, ActivateError, Interrupt, VirtioDevice,
    Worker, VIRTIO_F_VERSION_1,
};
use crate::GuestMemory;

/// Size of the single request queue.
pub const QUEUE_SIZE: u16 = 256;
/// `seg_max` advertised in config space: a chain also holds a header and a status descriptor.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;

/// Errors from creating a drive or swapping its backing file.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The backing file could not be opened.
    #[error("cannot open backing file {}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The backing file size could not be determined.
    #[error("cannot determine the size of {}", path.display())]
    Size {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The drive id is longer than the 20-byte virtio-blk serial.
    #[error("drive id {0:?} is longer than 20 bytes")]
    IdTooLong(String),
    /// The config-change interrupt could not be raised after a swap (the swap itself happened).
    #[error("cannot signal the config change to the guest")]
    Interrupt(#[source] io::Error),
}

/// What a drive is currently backed by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriveInfo {
    /// The drive id (also its virtio-blk serial).
    pub id: String,
    /// The backing file.
    pub path: PathBuf,
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Whether writes are refused.
    pub read_only: bool,
}

impl DriveInfo {
    /// Capacity in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_sectors.saturating_mul(SECTOR_SIZE)
    }
}

/// State shared between the device, its worker and its handles.
#[derive(Debug)]
struct Shared {
    id: String,
    serial: [u8; ID_LEN],
    /// Taken by the worker for each request and by a swap to replace the file.
    backing: Mutex<Backing>,
    /// Mirrors `backing.capacity` so config reads never wait for in-flight I/O.
    capacity: AtomicU64,
    generation: AtomicU32,
    info: Mutex<DriveInfo>,
    /// Set while the device is activated, to raise config-change interrupts.
    interrupt: Mutex<Option<Interrupt>>,
    /// I/O counters.
    stats: BlockStats,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn open_backing(path: &Path, read_only: bool) -> Result<Backing, BlockError> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(|source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    // Seeking works for block devices too, whose metadata length is zero.
    let size = file
        .seek(SeekFrom::End(0))
        .map_err(|source| BlockError::Size {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(Backing {
        file,
        read_only,
        capacity: size / SECTOR_SIZE,
    })
}

/// A virtio-blk device backed by a raw file.
#[derive(Debug)]
pub struct Block {
    shared: Arc<Shared>,
    avail_features: u64,
    acked_features: u64,
    worker: Option<Worker>,
}

impl Block {
    /// A drive called `id` (at most 20 bytes; it is the serial `GET_ID` returns) backed by
    /// `path`. A read-only drive opens the file read-only and offers `VIRTIO_BLK_F_RO`.
    pub fn new(id: &str, path: &Path, read_only: bool) -> Result<Block, BlockError> {
        if id.len() > ID_LEN {
            return Err(BlockError::IdTooLong(id.to_string()));
        }
        let mut serial = [0u8; ID_LEN];
        for (dst, src) in serial.iter_mut().zip(id.as_bytes()) {
            *dst = *src;
        }
        let backing = open_backing(path, read_only)?;
        let mut avail_features =
            VIRTIO_F_VERSION_1 | (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_SEG_MAX);
        if read_only {
            avail_features |= 1 << VIRTIO_BLK_F_RO;
        }
        let info = DriveInfo {
            id: id.to_string(),
            path: path.to_path_buf(),
            capacity_sectors: backing.capacity,
            read_only,
        };
        Ok(Block {
            shared: Arc::new(Shared {
                id: id.to_string(),
                serial,
                capacity: AtomicU64::new(backing.capacity),
                backing: Mutex::new(backing),
                generation: AtomicU32::new(0),
                info: Mutex::new(info),
                interrupt: Mutex::new(None),
                stats: BlockStats::default(),
            }),
            avail_features,
            acked_features: 0,
            worker: None,
        })
    }

    /// A handle to swap the drive and read its status from other threads.
    pub fn handle(&self) -> BlockHandle {
        BlockHandle {
            shared: self.shared.clone(),
        }
    }

    /// Features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// The config space: capacity (le64), size_max (le32, unused), seg_max (le32).
    fn config(&self) -> [u8; 16] {
        let mut c = [0u8; 16];
        let capacity = self.shared.capacity.load(Ordering::SeqCst).to_le_bytes();
        for (dst, src) in c.iter_mut().zip(capacity.iter()) {
            *dst = *src;
        }
        for (dst, src) in c.iter_mut().skip(12).zip(SEG_MAX.to_le_bytes().iter()) {
            *dst = *src;
        }
        c
    }
}

/// Copy config bytes at `offset` into `data`; out-of-range bytes read as zero.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Nothing in our config space is writable (no VIRTIO_BLK_F_CONFIG_WCE).
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let ActivateContext {
            mem,
            mut queues,
            mut queue_evts,
            interrupt,
        } = ctx;
        if queues.len() != 1 || queue_evts.len() != 1 {
            return Err(ActivateError::QueueCount {
                expected: 1,
                got: queues.len(),
            });
        }
        let (Some(queue), Some(evt)) = (queues.pop(), queue_evts.pop()) else {
            return Err(ActivateError::QueueCount {
                expected: 1,
                got: 0,
            });
        };
        Worker::stop_slot(&mut self.worker);
        let worker = BlockWorker {
            mem,
            queue,
            evt,
            interrupt: interrupt.clone(),
            shared: self.shared.clone(),
        };
        let name = format!("blk-{}", self.shared.id);
        self.worker =
            Some(Worker::spawn(name, move |kill| worker.run(kill)).map_err(ActivateError::Worker)?);
        *lock(&self.shared.interrupt) = Some(interrupt);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        *lock(&self.shared.interrupt) = None;
        self.acked_features = 0;
        Worker::stop_slot(&mut self.worker)
    }

    fn config_generation(&self) -> u32 {
        self.shared.generation.load(Ordering::SeqCst)
    }
}

/// A cloneable control handle of a [`Block`] device, usable from any thread.
#[derive(Clone, Debug)]
pub struct BlockHandle {
    shared: Arc<Shared>,
}

impl BlockHandle {
    /// The drive's I/O counters.
    pub fn stats(&self) -> &BlockStats {
        &self.shared.stats
    }

    /// Replace the backing file with `path` (opened read-only if `read_only`). Waits for the
    /// in-flight request, if any; later requests go to the new file. Updates the capacity in
    /// config space, bumps the config generation and, if the device is active, raises a
    /// config-change interrupt. Returns the new capacity in 512-byte sectors.
    ///
    /// The `VIRTIO_BLK_F_RO` feature was negotiated at boot and cannot change: swapping a
    /// writable drive to read-only makes guest writes fail with an I/O error.
    pub fn swap(&self, path: &Path, read_only: bool) -> Result<u64, BlockError> {
        let new = open_backing(path, read_only)?;
        let capacity = new.capacity;
        {
            let mut backing = lock(&self.shared.backing);
            *backing = new;
            self.shared.capacity.store(capacity, Ordering::SeqCst);
            self.shared.generation.fetch_add(1, Ordering::SeqCst);
        }
        {
            let mut info = lock(&self.shared.info);
            info.path = path.to_path_buf();
            info.capacity_sectors = capacity;
            info.read_only = read_only;
        }
        if let Some(interrupt) = lock(&self.shared.interrupt).as_ref() {
            interrupt
                .signal_config_change()
                .map_err(BlockError::Interrupt)?;
        }
        Ok(capacity)
    }

    /// The drive's current backing.
    pub fn info(&self) -> DriveInfo {
        lock(&self.shared.info).clone()
    }
}

/// Worker thread state: owns the queue while the device is active.
struct BlockWorker {
    mem: GuestMemory,
    queue: Queue,
    evt: EventFd,
    interrupt: Interrupt,
    shared: Arc<Shared>,
}

impl BlockWorker {
    fn run(mut self, kill: EventFd) {
        if let Err(e) = self.event_loop(&kill) {
            log::error!("virtio-blk {}: worker stopped: {e}", self.shared.id);
        }
    }

    fn event_loop(&mut self, kill: &EventFd) -> io::Result<()> {
        let evt = self.evt.try_clone()?;
        single_queue_loop(&evt, kill, || self.process())
    }

    fn process(&mut self) {
        let shared = &self.shared;
        match request::process_queue(
            &self.mem,
            &mut self.queue,
            &shared.serial,
            &shared.stats,
            || lock(&shared.backing),
        ) {
            Ok(true) => {
                if let Err(e) = self.interrupt.signal_used_queue() {
                    log::error!("virtio-blk {}: cannot raise interrupt: {e}", shared.id);
                }
            }
            Ok(false) => {}
            Err(e) => log::debug!("virtio-blk {}: {e}", shared.id),
        }
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::bus::BusDevice;
    use crate::virtio::mmio::{bring_up, MmioTransport};
    use crate::virtio::test_utils::{
        add_chain, memory, temp_path, used, wait_used, TempPath, DATA_ADDR, R, W,
    };
    use crate::virtio::INTERRUPT_STATUS_CONFIG_CHANGED;

    fn file_of(len: usize, byte: u8) -> TempPath {
        let p = temp_path("blk");
        std::fs::write(&p, vec![byte; len]).unwrap();
        p
    }

    fn r32(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn capacity(t: &mut MmioTransport) -> u64 {
        let mut b = [0u8; 8];
        t.read(0x100, &mut b);
        u64::from_le_bytes(b)
    }

    #[test]
    fn new_validates_inputs() {
        let a = file_of(4096, 0);
        assert!(matches!(
            Block::new("a-very-long-drive-id-123", &a, false),
            Err(BlockError::IdTooLong(_))
        ));
        assert!(matches!(
            Block::new("d", Path::new("/nonexistent/disk.img"), false),
            Err(BlockError::Open { .. })
        ));
        let ro = Block::new("d", &a, true).unwrap();
        assert_ne!(ro.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
        let rw = Block::new("d", &a, false).unwrap();
        assert_eq!(rw.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(rw.avail_features() & (1 << VIRTIO_BLK_F_FLUSH), 0);
        assert_ne!(rw.avail_features() & VIRTIO_F_VERSION_1, 0);
        let mut c = [0u8; 16];
        rw.read_config(0, &mut c);
        assert_eq!(u64::from_le_bytes(c[..8].try_into().unwrap()), 8);
        assert_eq!(u32::from_le_bytes(c[12..].try_into().unwrap()), SEG_MAX);
    }

    #[test]
    fn swap_before_activation() {
        let a = file_of(4096, 0);
        let b = file_of(3 * 512 + 100, 0);
        let blk = Block::new("d0", &a, false).unwrap();
        let h = blk.handle();
        assert_eq!(h.swap(&b, true).unwrap(), 3);
        assert_eq!(blk.config_generation(), 1);
        let info = h.info();
        assert_eq!(info.path, b.to_path_buf());
        assert_eq!(info.capacity_sectors, 3);
        assert_eq!(info.capacity_bytes(), 1536);
        assert!(info.read_only);
        assert!(matches!(
            h.swap(Path::new("/nonexistent"), false),
            Err(BlockError::Open { .. })
        ));
        // A failed swap changes nothing.
        assert_eq!(h.info(), info);
        assert_eq!(blk.config_generation(), 1);
    }

    /// The worker serves requests; a swap from another thread changes capacity and content,
    /// bumps the generation and raises a config interrupt; reset stops the worker.
    #[test]
    fn swap_while_running() {
        let a = file_of(4096, 0x11);
        let b = file_of(8192, 0x22);
        let mem = memory();
        let blk = Block::new("disk0", &a, false).unwrap();
        let handle = blk.handle();
        let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut t = MmioTransport::new(mem.clone(), Box::new(blk), irq).unwrap();
        let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
        bring_up(&mut t, &[&vq]);
        assert!(t.is_activated());
        assert_eq!(capacity(&mut t), 8);
        assert_eq!(r32(&mut t, 0xfc), 0);

        let hdr = DATA_ADDR;
        let status = DATA_ADDR + 0x100;
        let buf = DATA_ADDR + 0x1000;
        let request = |t: &mut MmioTransport, first: u16, kind: u32, sector: u64| {
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&kind.to_le_bytes());
            h[8..].copy_from_slice(&sector.to_le_bytes());
            mem.write_slice(&h, GuestAddress(hdr)).unwrap();
            let dir = if kind == VIRTIO_BLK_T_IN { W } else { R };
            add_chain(&vq, first, &[(hdr, 16, R), (buf, 512, dir), (status, 1, W)]);
            t.write(0x50, &0u32.to_le_bytes());
        };

        request(&mut t, 0, VIRTIO_BLK_T_IN, 0);
        wait_used(&vq, 1);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(status)).unwrap(),
            VIRTIO_BLK_S_OK as u8
        );
        assert_eq!(mem.read_obj::<u8>(GuestAddress(buf + 511)).unwrap(), 0x11);
        assert_eq!(t.interrupt().status(), 1);
        t.write(0x64, &1u32.to_le_bytes());
        let _ = t.interrupt().eventfd().read();

        // Sector 10 is past the end of the first file.
        request(&mut t, 3, VIRTIO_BLK_T_IN, 10);
        wait_used(&vq, 2);
        assert_ne!(
            mem.read_obj::<u8>(GuestAddress(status)).unwrap(),
            VIRTIO_BLK_S_OK as u8
        );

        let b_path = b.to_path_buf();
        let swapper = std::thread::spawn(move || handle.swap(&b_path, false).map(|c| (c, handle)));
        let (cap, handle) = swapper.join().unwrap().unwrap();
        assert_eq!(cap, 16);
        assert_eq!(capacity(&mut t), 16);
        assert_eq!(r32(&mut t, 0xfc), 1);
        assert_ne!(t.interrupt().status() & INTERRUPT_STATUS_CONFIG_CHANGED, 0);
        assert!(t.interrupt().eventfd().read().unwrap() >= 1);

        request(&mut t, 6, VIRTIO_BLK_T_IN, 10);
        wait_used(&vq, 3);
        assert_eq!(used(&vq, 2), (6, 513));
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(status)).unwrap(),
            VIRTIO_BLK_S_OK as u8
        );
        assert_eq!(mem.read_obj::<u8>(GuestAddress(buf)).unwrap(), 0x22);

        // Writes land in the new file.
        mem.write_slice(&[0x33; 512], GuestAddress(buf)).unwrap();
        request(&mut t, 9, VIRTIO_BLK_T_OUT, 15);
        wait_used(&vq, 4);
        assert_eq!(std::fs::read(handle.info().path).unwrap()[15 * 512], 0x33);
        assert_eq!(std::fs::read(&a).unwrap()[0], 0x11);

        // Reset stops the worker; later swaps raise no interrupt.
        t.write(0x70, &0u32.to_le_bytes());
        assert!(!t.is_activated());
        assert_eq!(t.interrupt().status(), 0);
        let _ = t.interrupt().eventfd().read();
        assert_eq!(handle.swap(&a, false).unwrap(), 8);
        assert_eq!(t.interrupt().status(), 0);
        assert!(t.interrupt().eventfd().read().is_err());
        assert_eq!(r32(&mut t, 0xfc), 2);
    }
}
