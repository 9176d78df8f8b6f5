//! virtio-blk request parsing and execution, generic over guest memory and free of threads and
//! epoll so it can be driven directly by unit tests.
//!
//! A request is a descriptor chain laid out as the Linux driver sends it: a 16-byte
//! device-readable header (`virtio_blk_outhdr`), zero or more data descriptors, and a
//! device-writable status descriptor whose last byte receives the status. Every chain is
//! returned to the guest: with a status when a status byte can be written, otherwise with a used
//! length of zero.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::virtio::pop_chain;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions, ReadVolatile,
    VolatileMemoryError, VolatileSlice, WriteVolatile,
};

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Size of `virtio_blk_outhdr`.
pub const HEADER_LEN: u32 = 16;
/// Length of the `GET_ID` answer.
pub const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;

/// Why a request failed. Each maps to a status byte (or to no answer at all).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The chain does not end with a device-writable status descriptor inside guest memory.
    #[error("request has no writable status descriptor")]
    NoStatus,
    /// The chain has no header descriptor.
    #[error("request has no header")]
    NoHeader,
    /// The header descriptor is device-writable.
    #[error("request header is device-writable")]
    HeaderWriteOnly,
    /// The header descriptor is not exactly 16 bytes.
    #[error("request header is {0} bytes, expected 16")]
    HeaderLength(u32),
    /// A data descriptor has the wrong direction for the request type.
    #[error("data descriptor has the wrong direction")]
    DataDirection,
    /// The data length is not a whole number of sectors.
    #[error("data length {0} is not a multiple of the sector size")]
    DataLength(u64),
    /// A data descriptor points outside guest memory.
    #[error("data descriptor {addr:#x}+{len:#x} is outside guest memory")]
    DataOutOfMemory {
        /// Guest address of the descriptor.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// `sector * 512 + length` overflows.
    #[error("sector {0} overflows")]
    SectorOverflow(u64),
    /// The request touches sectors past the end of the disk.
    #[error(
        "request for {len} bytes at sector {sector} is past the disk end ({capacity} sectors)"
    )]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Data length in bytes.
        len: u64,
        /// Disk capacity in sectors.
        capacity: u64,
    },
    /// A write on a read-only drive.
    #[error("write to a read-only drive")]
    ReadOnly,
    /// A `GET_ID` request without a writable buffer.
    #[error("GET_ID request without a data buffer")]
    NoIdBuffer,
    /// The request type is not supported.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// Reading or writing guest memory failed.
    #[error("guest memory access failed")]
    GuestMemory(#[source] GuestMemoryError),
    /// The backing file I/O failed.
    #[error("backing file I/O failed")]
    Io(#[source] io::Error),
}

impl RequestError {
    /// The status byte reported to the guest.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// Errors from processing a whole queue: the queue itself is unusable.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The available ring could not be read (bad index from the driver).
    #[error("cannot read the available ring")]
    AvailRing(#[source] virtio_queue::Error),
    /// The used ring could not be written.
    #[error("cannot add to the used ring")]
    UsedRing(#[source] virtio_queue::Error),
}

/// I/O counters of one drive, updated by the request path and read by the VMM's metrics.
#[derive(Debug, Default)]
pub struct BlockStats {
    /// Completed read requests.
    pub reads: AtomicU64,
    /// Completed write requests.
    pub writes: AtomicU64,
    /// Completed flushes.
    pub flushes: AtomicU64,
    /// Bytes read from the backing file into the guest.
    pub read_bytes: AtomicU64,
    /// Bytes written from the guest to the backing file.
    pub write_bytes: AtomicU64,
    /// Requests answered with an error status (or unanswerable).
    pub errors: AtomicU64,
}

impl BlockStats {
    /// The counters as (name, value) pairs, for reporting.
    pub fn snapshot(&self) -> [(&'static str, u64); 6] {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("reads", g(&self.reads)),
            ("writes", g(&self.writes)),
            ("flushes", g(&self.flushes)),
            ("read_bytes", g(&self.read_bytes)),
            ("write_bytes", g(&self.write_bytes)),
            ("errors", g(&self.errors)),
        ]
    }
}

fn bump(c: &AtomicU64, by: u64) {
    c.fetch_add(by, Ordering::Relaxed);
}

/// The file behind a drive, as the request path sees it.
#[derive(Debug)]
pub struct Backing {
    /// The open file (read-only if `read_only`).
    pub file: File,
    /// Writes are refused.
    pub read_only: bool,
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
}

/// A parsed request type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            t => RequestType::Unsupported(t),
        }
    }
}

/// Process every available request of `queue`. Returns true if the guest should be interrupted.
///
/// `backing` is called once per request to get the current backing (so a drive swap lands
/// between requests).
pub fn process_queue<M, F, G>(
    mem: &M,
    queue: &mut Queue,
    serial: &[u8; ID_LEN],
    stats: &BlockStats,
    mut backing: F,
) -> Result<bool, QueueError>
where
    M: GuestMemory,
    F: FnMut() -> G,
    G: std::ops::Deref<Target = Backing>,
{
    let mut used_any = false;
    loop {
        let chain = pop_chain(queue, mem, "virtio-blk").map_err(QueueError::AvailRing)?;
        let Some(chain) = chain else { break };
        let head = chain.head_index();
        let used_len = {
            let guard = backing();
            process_request(mem, chain, &guard, serial, stats)
        };
        queue
            .add_used(mem, head, used_len)
            .map_err(QueueError::UsedRing)?;
        used_any = true;
    }
    Ok(used_any && queue.needs_notification(mem).unwrap_or(true))
}

/// Execute one request chain and write its status. Returns the number of bytes written into
/// the chain's buffers (the used length).
pub fn process_request<M: GuestMemory>(
    mem: &M,
    chain: DescriptorChain<&M>,
    backing: &Backing,
    serial: &[u8; ID_LEN],
    stats: &BlockStats,
) -> u32 {
    let descs: Vec<Descriptor> = chain.collect();
    let Some((status_desc, rest)) = descs.split_last() else {
        log::debug!("virtio-blk: {}", RequestError::NoStatus);
        bump(&stats.errors, 1);
        return 0;
    };
    let Some(status_addr) = status_address(mem, status_desc) else {
        log::debug!("virtio-blk: {}", RequestError::NoStatus);
        bump(&stats.errors, 1);
        return 0;
    };
    let (status, written) = match execute(mem, rest, backing, serial, stats) {
        Ok(written) => (VIRTIO_BLK_S_OK as u8, written),
        Err(e) => {
            log::debug!("virtio-blk: request failed: {e}");
            bump(&stats.errors, 1);
            (e.status(), 0)
        }
    };
    if mem.write_obj(status, status_addr).is_err() {
        return 0;
    }
    written.saturating_add(1)
}

/// The guest address of the status byte: the last byte of a device-writable descriptor.
fn status_address<M: GuestMemory>(mem: &M, desc: &Descriptor) -> Option<GuestAddress> {
    if !desc.is_write_only() || desc.len() == 0 {
        return None;
    }
    let addr = desc.addr().checked_add(u64::from(desc.len()) - 1)?;
    mem.check_range(addr, 1, Permissions::Write).then_some(addr)
}

/// Run the request made of `descs` (header and data, status excluded). Returns the number of
/// data bytes written to the guest.
fn execute<M: GuestMemory>(
    mem: &M,
    descs: &[Descriptor],
    backing: &Backing,
    serial: &[u8; ID_LEN],
    stats: &BlockStats,
) -> Result<u32, RequestError> {
    let (header, data) = descs.split_first().ok_or(RequestError::NoHeader)?;
    if header.is_write_only() {
        return Err(RequestError::HeaderWriteOnly);
    }
    if header.len() != HEADER_LEN {
        return Err(RequestError::HeaderLength(header.len()));
    }
    let mut raw = [0u8; HEADER_LEN as usize];
    mem.read_slice(&mut raw, header.addr())
        .map_err(RequestError::GuestMemory)?;
    let (type_bytes, rest) = raw.split_at(4);
    let sector_bytes = rest.get(4..12).ok_or(RequestError::NoHeader)?;
    let request_type = RequestType::from(u32::from_le_bytes(
        type_bytes.try_into().map_err(|_| RequestError::NoHeader)?,
    ));
    let sector = u64::from_le_bytes(
        sector_bytes
            .try_into()
            .map_err(|_| RequestError::NoHeader)?,
    );

    match request_type {
        RequestType::In => {
            let (offset, len) = check_data(mem, data, true, sector, backing)?;
            let mut file = FileAt::new(&backing.file, offset);
            for d in data {
                mem.read_exact_volatile_from(d.addr(), &mut file, d.len() as usize)
                    .map_err(|e| io_or_memory(e, &mut file))?;
            }
            bump(&stats.reads, 1);
            bump(&stats.read_bytes, len);
            // `check_data` bounds the total by the disk size and chains by 2^32 bytes.
            u32::try_from(len).map_err(|_| RequestError::DataLength(len))
        }
        RequestType::Out => {
            if backing.read_only {
                return Err(RequestError::ReadOnly);
            }
            let (offset, len) = check_data(mem, data, false, sector, backing)?;
            let mut file = FileAt::new(&backing.file, offset);
            for d in data {
                mem.write_all_volatile_to(d.addr(), &mut file, d.len() as usize)
                    .map_err(|e| io_or_memory(e, &mut file))?;
            }
            bump(&stats.writes, 1);
            bump(&stats.write_bytes, len);
            Ok(0)
        }
        RequestType::Flush => {
            backing.file.sync_data().map_err(RequestError::Io)?;
            bump(&stats.flushes, 1);
            Ok(0)
        }
        RequestType::GetId => {
            let mut remaining: &[u8] = serial;
            let mut written = 0u32;
            if data.is_empty() {
                return Err(RequestError::NoIdBuffer);
            }
            for d in data {
                if !d.is_write_only() {
                    return Err(RequestError::DataDirection);
                }
                let n = remaining.len().min(d.len() as usize);
                let (now, later) = remaining.split_at(n);
                mem.write_slice(now, d.addr())
                    .map_err(RequestError::GuestMemory)?;
                remaining = later;
                // n <= 20.
                written += n as u32;
            }
            Ok(written)
        }
        RequestType::Unsupported(t) => Err(RequestError::Unsupported(t)),
    }
}

/// Validate the data descriptors of a read (`to_guest`) or write: direction, guest memory
/// bounds, whole sectors, disk bounds. Returns the byte offset in the file and the length.
fn check_data<M: GuestMemory>(
    mem: &M,
    data: &[Descriptor],
    to_guest: bool,
    sector: u64,
    backing: &Backing,
) -> Result<(u64, u64), RequestError> {
    let mut len = 0u64;
    for d in data {
        if d.is_write_only() != to_guest {
            return Err(RequestError::DataDirection);
        }
        let access = if to_guest {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if !mem.check_range(d.addr(), d.len() as usize, access) {
            return Err(RequestError::DataOutOfMemory {
                addr: d.addr().raw_value(),
                len: d.len(),
            });
        }
        len += u64::from(d.len());
    }
    // SECTOR_SIZE is a power of two (a mask keeps the MSRV below 1.87's is_multiple_of).
    if len & (SECTOR_SIZE - 1) != 0 {
        return Err(RequestError::DataLength(len));
    }
    let offset = sector
        .checked_mul(SECTOR_SIZE)
        .ok_or(RequestError::SectorOverflow(sector))?;
    let end = offset
        .checked_add(len)
        .ok_or(RequestError::SectorOverflow(sector))?;
    if end > backing.capacity.saturating_mul(SECTOR_SIZE) {
        return Err(RequestError::OutOfRange {
            sector,
            len,
            capacity: backing.capacity,
        });
    }
    Ok((offset, len))
}

fn io_or_memory(e: GuestMemoryError, file: &mut FileAt<'_>) -> RequestError {
    match file.error.take() {
        Some(io) => RequestError::Io(io),
        None => RequestError::GuestMemory(e),
    }
}

/// Positioned I/O on a file (`pread`/`pwrite`) straight to and from guest memory.
struct FileAt<'a> {
    file: &'a File,
    offset: u64,
    /// The last I/O error, kept so the caller can report it rather than a memory error.
    error: Option<io::Error>,
}

impl<'a> FileAt<'a> {
    fn new(file: &'a File, offset: u64) -> Self {
        FileAt {
            file,
            offset,
            error: None,
        }
    }

    fn fail(&mut self, e: io::Error) -> VolatileMemoryError {
        let copy = io::Error::new(e.kind(), e.to_string());
        self.error = Some(e);
        VolatileMemoryError::IOError(copy)
    }

    fn off(&mut self) -> Result<libc::off_t, VolatileMemoryError> {
        libc::off_t::try_from(self.offset)
            .map_err(|_| self.fail(io::Error::from_raw_os_error(libc::EOVERFLOW)))
    }
}

impl ReadVolatile for FileAt<'_> {
    /// Fill the whole slice; bytes past the end of the file read as zero.
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let guard = buf.ptr_guard_mut();
        let base = guard.as_ptr();
        let len = buf.len();
        let mut done = 0usize;
        while done < len {
            let dst = base.wrapping_add(done).cast::<libc::c_void>();
            let off = self.off()?;
            // SAFETY: `dst..dst + (len - done)` lies inside the volatile slice, which is valid
            // for writes of `len` bytes; the fd is owned by `self.file` and open.
            let n = unsafe { libc::pread(self.file.as_raw_fd(), dst, len - done, off) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                buf.bitmap().mark_dirty(0, len);
                return Err(self.fail(e));
            }
            if n == 0 {
                // Past the end of the file (a file shrunk under us): zero-fill.
                let dst = base.wrapping_add(done);
                // SAFETY: `dst..dst + (len - done)` lies inside the volatile slice.
                unsafe { std::ptr::write_bytes(dst, 0, len - done) };
                done = len;
                break;
            }
            // n > 0 and at most len - done.
            done += n as usize;
            self.offset += n as u64;
        }
        buf.bitmap().mark_dirty(0, done);
        Ok(done)
    }
}

impl WriteVolatile for FileAt<'_> {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let guard = buf.ptr_guard();
        let src = guard.as_ptr().cast::<libc::c_void>();
        let off = self.off()?;
        // SAFETY: `src..src + buf.len()` is valid for reads (volatile slice invariant); the fd
        // is owned by `self.file` and open.
        let n = unsafe { libc::pwrite(self.file.as_raw_fd(), src, buf.len(), off) };
        if n < 0 {
            return Err(self.fail(io::Error::last_os_error()));
        }
        self.offset += n as u64;
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek, SeekFrom, Write};

    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    use super::*;
    use crate::virtio::test_utils::{
        add_chain, memory, temp_path, used, used_idx, TempPath, DATA_ADDR, R, W,
    };

    const HDR: u64 = DATA_ADDR;
    const BUF: u64 = DATA_ADDR + 0x1000;
    const STATUS: u64 = DATA_ADDR + 0x100;
    const SERIAL: &[u8; ID_LEN] = b"drive-0\0\0\0\0\0\0\0\0\0\0\0\0\0";

    /// A 4 KiB temporary disk where byte i holds i % 251.
    fn disk(read_only: bool) -> (TempPath, Backing) {
        let path = temp_path("blkreq");
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(&path)
            .unwrap();
        let backing = Backing {
            file,
            read_only,
            capacity: 8,
        };
        (path, backing)
    }

    use std::fs::OpenOptions;

    fn header(mem: &GuestMemoryMmap, request_type: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&request_type.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    }

    /// Run one chain through `process_queue`; returns (status byte, used len).
    fn run(mem: &GuestMemoryMmap, backing: &Backing, descs: &[(u64, u32, u16)]) -> (u8, u32) {
        run_counted(mem, backing, descs, &BlockStats::default())
    }

    fn run_counted(
        mem: &GuestMemoryMmap,
        backing: &Backing,
        descs: &[(u64, u32, u16)],
        stats: &BlockStats,
    ) -> (u8, u32) {
        let vq = MockSplitQueue::new(mem, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        add_chain(&vq, 0, descs);
        let notify = process_queue(mem, &mut q, SERIAL, stats, || backing).unwrap();
        assert!(notify);
        assert_eq!(used_idx(&vq), 1, "every chain is returned");
        let (id, len) = used(&vq, 0);
        assert_eq!(id, 0);
        (mem.read_obj(GuestAddress(STATUS)).unwrap(), len)
    }

    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
    const UNTOUCHED: u8 = 0xee;

    #[test]
    fn read_sectors() {
        let mem = memory();
        let (_p, b) = disk(false);
        header(&mem, VIRTIO_BLK_T_IN, 1);
        // Two data descriptors to check the file offset advances across them.
        let descs = [
            (HDR, 16, R),
            (BUF, 512, W),
            (BUF + 512, 512, W),
            (STATUS, 1, W),
        ];
        assert_eq!(run(&mem, &b, &descs), (OK, 1025));
        let mut got = vec![0u8; 1024];
        mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
        let want: Vec<u8> = (512..1536u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn write_sectors() {
        let mem = memory();
        let (p, b) = disk(false);
        header(&mem, VIRTIO_BLK_T_OUT, 2);
        mem.write_slice(&[0xab; 512], GuestAddress(BUF)).unwrap();
        let descs = [(HDR, 16, R), (BUF, 512, R), (STATUS, 1, W)];
        assert_eq!(run(&mem, &b, &descs), (OK, 1));
        let content = std::fs::read(&*p).unwrap();
        assert!(content[1024..1536].iter().all(|&x| x == 0xab));
        assert_eq!(content[1023], (1023 % 251) as u8);
        assert_eq!(content[1536], (1536 % 251) as u8);
    }

    #[test]
    fn stats_count_requests_bytes_and_errors() {
        let mem = memory();
        let (_p, b) = disk(false);
        let stats = BlockStats::default();
        header(&mem, VIRTIO_BLK_T_IN, 0);
        let read = [(HDR, 16, R), (BUF, 1024, W), (STATUS, 1, W)];
        assert_eq!(run_counted(&mem, &b, &read, &stats).0, OK);
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        let write = [(HDR, 16, R), (BUF, 512, R), (STATUS, 1, W)];
        assert_eq!(run_counted(&mem, &b, &write, &stats).0, OK);
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(
            run_counted(&mem, &b, &[(HDR, 16, R), (STATUS, 1, W)], &stats).0,
            OK
        );
        // Out of range: an error, not a read.
        header(&mem, VIRTIO_BLK_T_IN, 100);
        assert_eq!(run_counted(&mem, &b, &read, &stats).0, IOERR);
        assert_eq!(
            stats.snapshot(),
            [
                ("reads", 1),
                ("writes", 1),
                ("flushes", 1),
                ("read_bytes", 1024),
                ("write_bytes", 512),
                ("errors", 1),
            ]
        );
    }

    #[test]
    fn flush() {
        let mem = memory();
        let (_p, b) = disk(false);
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(run(&mem, &b, &[(HDR, 16, R), (STATUS, 1, W)]), (OK, 1));
    }

    #[test]
    fn get_id() {
        let mem = memory();
        let (_p, b) = disk(false);
        header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        mem.write_slice(&[0xff; 20], GuestAddress(BUF)).unwrap();
        let descs = [(HDR, 16, R), (BUF, 20, W), (STATUS, 1, W)];
        assert_eq!(run(&mem, &b, &descs), (OK, 21));
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(BUF)).unwrap();
        assert_eq!(&id, SERIAL);
    }

    #[test]
    fn get_id_without_buffer_fails() {
        let mem = memory();
        let (_p, b) = disk(false);
        header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        assert_eq!(run(&mem, &b, &[(HDR, 16, R), (STATUS, 1, W)]), (IOERR, 1));
    }

    #[test]
    fn read_only_refuses_writes() {
        let mem = memory();
        let (p, b) = disk(true);
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        mem.write_slice(&[0xab; 512], GuestAddress(BUF)).unwrap();
        let descs = [(HDR, 16, R), (BUF, 512, R), (STATUS, 1, W)];
        assert_eq!(run(&mem, &b, &descs), (IOERR, 1));
        assert_eq!(std::fs::read(&*p).unwrap()[0], 0);
        assert_eq!(std::fs::read(&*p).unwrap()[1], 1);
    }

    #[test]
    fn out_of_range_sector() {
        let mem = memory();
        let (_p, b) = disk(false);
        // Sector 7 is the last one: one sector reads fine, two do not.
        header(&mem, VIRTIO_BLK_T_IN, 7);
        assert_eq!(
            run(&mem, &b, &[(HDR, 16, R), (BUF, 512, W), (STATUS, 1, W)]),
            (OK, 513)
        );
        assert_eq!(
            run(&mem, &b, &[(HDR, 16, R), (BUF, 1024, W), (STATUS, 1, W)]),
            (IOERR, 1)
        );
        header(&mem, VIRTIO_BLK_T_IN, 8);
        assert_eq!(
            run(&mem, &b, &[(HDR, 16, R), (BUF, 512, W), (STATUS, 1, W)]),
            (IOERR, 1)
        );
    }

    #[test]
    fn overflowing_sector() {
        let mem = memory();
        let (_p, b) = disk(false);
        for sector in [u64::MAX, u64::MAX / 512, u64::MAX / 512 - 1] {
            header(&mem, VIRTIO_BLK_T_IN, sector);
            let descs = [(HDR, 16, R), (BUF, 1024, W), (STATUS, 1, W)];
            assert_eq!(run(&mem, &b, &descs), (IOERR, 1), "sector {sector}");
        }
    }

    #[test]
    fn bad_headers() {
        let mem = memory();
        let (_p, b) = disk(false);
        header(&mem, VIRTIO_BLK_T_IN, 0);
        // Short header.
        assert_eq!(
            run(&mem, &b, &[(HDR, 8, R), (BUF, 512, W), (STATUS, 1, W)]),
            (IOERR, 1)
        );
        // Header with data glued to it.
        assert_eq!(run(&mem, &b, &[(HDR, 528, R), (STATUS, 1, W)]), (IOERR, 1));
        // Header in a device-writable descriptor.
        assert_eq!(
            run(&mem, &b, &[(HDR, 16, W), (BUF, 512, W), (STATUS, 1, W)]),
            (IOERR, 1)
        );
        // No header at all.
        assert_eq!(run(&mem, &b, &[(STATUS, 1, W)]), (IOERR, 1));
        // Header outside guest memory.
        let far = 0x1_0000_0000;
        assert_eq!(
            run(&mem, &b, &[(far, 16, R), (BUF, 512, W), (STATUS, 1, W)]),
            (IOERR, 1)
        );
    }

    #[test]
    fn bad_status_descriptor_consumed_without_answer() {
        let mem = memory();
        let (p, b) = disk(false);
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        // Read-only status descriptor: no status can be written and the write is not done.
        let descs = [(HDR, 16, R), (BUF, 512, R), (STATUS, 1, R)];
        assert_eq!(run(&mem, &b, &descs), (UNTOUCHED, 0));
        // Missing status: the last descriptor is data.
        assert_eq!(
            run(&mem, &b, &[(HDR, 16, R), (BUF, 512, R)]),
            (UNTOUCHED, 0)
        );
        // Zero-length status.
        let descs = [(HDR, 16, R), (BUF, 512, R), (STATUS, 0, W)];
        assert_eq!(run(&mem, &b, &descs), (UNTOUCHED, 0));
        // Status outside guest memory.
        let descs = [(HDR, 16, R), (BUF, 512, R), (0x1_0000_0000, 1, W)];
        assert_eq!(run(&mem, &b, &descs), (UNTOUCHED, 0));
        assert_eq!(std::fs::read(&*p).unwrap()[1], 1, "disk untouched");
    }

    #[test]
    fn status_is_last_byte_of_status_descriptor() {
        let mem = memory();
        let (_p, b) = disk(false);
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        mem.write_obj(0xeeu8, GuestAddress(STATUS + 3)).unwrap();
        run(&mem, &b, &[(HDR, 16, R), (STATUS, 4, W)]);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS + 3)).unwrap(), OK);
    }

    #[test]
    fn wrong_data_direction() {
        let mem = memory();
        let (p, b) = disk(false);
        header(&mem, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            run(&mem, &b, &[(HDR, 16, R), (BUF, 512, R), (STATUS, 1, W)]),
            (IOERR, 1)
        );
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        mem.write_slice(&[0xab; 512], GuestAddress(BUF)).unwrap();
        assert_eq!(
            run(&mem, &b, &[(HDR, 16, R), (BUF, 512, W), (STATUS, 1, W)]),
            (IOERR, 1)
        );
        assert_eq!(std::fs::read(&*p).unwrap()[1], 1);
    }

    #[test]
    fn data_outside_guest_memory() {
        let mem = memory();
        let (_p, b) = disk(false);
        header(&mem, VIRTIO_BLK_T_IN, 0);
        // Entirely outside, and straddling the end of memory.
        let end = crate::virtio::test_utils::MEM_SIZE as u64;
        for addr in [0x1_0000_0000, end - 256, u64::MAX - 255] {
            let descs = [(HDR, 16, R), (addr, 512, W), (STATUS, 1, W)];
            assert_eq!(run(&mem, &b, &descs), (IOERR, 1), "addr {addr:#x}");
        }
    }

    #[test]
    fn oversized_and_unaligned_lengths() {
        let mem = memory();
        let (_p, b) = disk(false);
        header(&mem, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            run(
                &mem,
                &b,
                &[(HDR, 16, R), (BUF, 0xffff_fe00, W), (STATUS, 1, W)]
            ),
            (IOERR, 1)
        );
        assert_eq!(
            run(&mem, &b, &[(HDR, 16, R), (BUF, 100, W), (STATUS, 1, W)]),
            (IOERR, 1)
        );
        // Two huge descriptors whose sum passes 2^32: the chain is cut by the queue crate, and
        // what is left still fails cleanly.
        let descs = [
            (HDR, 16, R),
            (BUF, 0xffff_fe00, W),
            (BUF, 0xffff_fe00, W),
            (STATUS, 1, W),
        ];
        let (_, len) = run(&mem, &b, &descs);
        assert!(len <= 1);
    }

    #[test]
    fn unsupported_type() {
        let mem = memory();
        let (_p, b) = disk(false);
        for t in [2, 11, 13, 0x8000_0000] {
            header(&mem, t, 0);
            assert_eq!(
                run(&mem, &b, &[(HDR, 16, R), (STATUS, 1, W)]),
                (UNSUPP, 1),
                "type {t}"
            );
        }
    }

    #[test]
    fn io_error_is_reported() {
        let mem = memory();
        let (p, mut b) = disk(false);
        // Capacity larger than the file: reads past EOF are zeros, not garbage.
        b.capacity = 16;
        header(&mem, VIRTIO_BLK_T_IN, 8);
        mem.write_slice(&[0xff; 512], GuestAddress(BUF)).unwrap();
        assert_eq!(
            run(&mem, &b, &[(HDR, 16, R), (BUF, 512, W), (STATUS, 1, W)]),
            (OK, 513)
        );
        let mut got = [0xffu8; 512];
        mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
        assert!(got.iter().all(|&x| x == 0));
        // A backing opened read-only at the OS level but flagged writable: pwrite fails (EBADF)
        // and the guest sees IOERR.
        let b = Backing {
            file: std::fs::File::open(&*p).unwrap(),
            read_only: false,
            capacity: 8,
        };
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            run(&mem, &b, &[(HDR, 16, R), (BUF, 512, R), (STATUS, 1, W)]),
            (IOERR, 1)
        );
        let mut f = std::fs::File::open(&*p).unwrap();
        let mut first = [0u8; 2];
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_exact(&mut first).unwrap();
        assert_eq!(first, [0, 1]);
        let _ = std::io::sink().write(&first);
    }

    #[test]
    fn several_chains_in_one_pass() {
        let mem = memory();
        let (_p, b) = disk(false);
        let vq = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        add_chain(&vq, 0, &[(HDR, 16, R), (STATUS, 1, W)]);
        add_chain(&vq, 2, &[(HDR, 16, R), (STATUS + 1, 1, W)]);
        assert!(process_queue(&mem, &mut q, SERIAL, &BlockStats::default(), || &b).unwrap());
        assert_eq!(used_idx(&vq), 2);
        assert_eq!(used(&vq, 0), (0, 1));
        assert_eq!(used(&vq, 1), (2, 1));
        // Nothing new: no interrupt needed.
        assert!(!process_queue(&mem, &mut q, SERIAL, &BlockStats::default(), || &b).unwrap());
    }

    #[test]
    fn bogus_avail_index_is_an_error_not_a_panic() {
        let mem = memory();
        let (_p, b) = disk(false);
        let vq = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        vq.avail().idx().store(100);
        assert!(matches!(
            process_queue(&mem, &mut q, SERIAL, &BlockStats::default(), || &b),
            Err(QueueError::AvailRing(_))
        ));
    }

    #[test]
    fn head_index_out_of_range_is_skipped() {
        let mem = memory();
        let (_p, b) = disk(false);
        let vq = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = vq.create_queue().unwrap();
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        // A valid chain at descriptors 0..2, then the avail entry 0 is replaced with head 40 (in
        // a 16-entry queue) and entry 1 names the valid chain.
        add_chain(&vq, 0, &[(HDR, 16, R), (STATUS, 1, W)]);
        vq.avail().ring().ref_at(0).unwrap().store(40);
        vq.avail().ring().ref_at(1).unwrap().store(0);
        vq.avail().idx().store(2);
        assert!(process_queue(&mem, &mut q, SERIAL, &BlockStats::default(), || &b).unwrap());
        assert_eq!(used_idx(&vq), 1);
        assert_eq!(used(&vq, 0), (0, 1));
    }
}
