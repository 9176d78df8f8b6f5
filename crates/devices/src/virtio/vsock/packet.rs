//! The virtio-vsock packet header and reading/writing packets from/to descriptor chains.
//!
//! Everything here treats the guest as hostile: the header is read through a [`Reader`] that
//! only touches device-readable descriptors inside guest memory, and the payload length is
//! capped before anything is allocated.

use std::io::{Read, Write};

use virtio_queue::{DescriptorChain, Reader, Writer};

use crate::GuestMemory;

/// Size of `struct virtio_vsock_hdr`.
pub const HDR_SIZE: usize = 44;
/// The host's CID (`VMADDR_CID_HOST`).
pub const HOST_CID: u64 = 2;
/// Largest payload we accept from, or send to, the guest in one packet.
pub const MAX_PKT_LEN: u32 = 64 * 1024;

/// `VIRTIO_VSOCK_TYPE_STREAM`, the only socket type we support.
pub const TYPE_STREAM: u16 = 1;

/// Packet operations (`VIRTIO_VSOCK_OP_*`).
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection reset (refused or aborted).
    pub const RST: u16 = 3;
    /// The sender will not send and/or receive any more data (see [`super::shutdown`]).
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// The sender's `buf_alloc`/`fwd_cnt` changed.
    pub const CREDIT_UPDATE: u16 = 6;
    /// The sender asks for a `CREDIT_UPDATE`.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// `SHUTDOWN` flags.
pub mod shutdown {
    /// The sender will receive no more data.
    pub const RCV: u32 = 1;
    /// The sender will send no more data.
    pub const SEND: u32 = 2;
    /// Both directions.
    pub const BOTH: u32 = RCV | SEND;
}

/// `struct virtio_vsock_hdr`, decoded (the wire format is little endian and packed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketHeader {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length in bytes.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation (see [`op`]).
    pub op: u16,
    /// Operation flags (`SHUTDOWN` flags).
    pub flags: u32,
    /// The sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, ever (wrapping).
    pub fwd_cnt: u32,
}

/// Why a header from the guest is not acceptable for the host.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    /// The source CID is not the guest's CID.
    #[error("source cid {0} is not the guest's cid")]
    SrcCid(u64),
    /// The destination CID is not the host's CID.
    #[error("destination cid {0} is not the host")]
    DstCid(u64),
    /// The socket type is not stream.
    #[error("socket type {0} is not supported")]
    Type(u16),
    /// The operation is unknown.
    #[error("unknown operation {0}")]
    Op(u16),
}

/// Why a descriptor chain does not hold a usable packet or receive buffer.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    /// The chain is empty.
    #[error("descriptor chain is empty")]
    EmptyChain,
    /// The chain's first descriptor is device-writable, so it cannot hold a header for us.
    #[error("packet header is in a device-writable descriptor")]
    WriteOnlyHeader,
    /// The chain points outside guest memory or is otherwise malformed.
    #[error("descriptor chain is not valid guest memory")]
    BadChain(#[source] virtio_queue::Error),
    /// The chain has fewer device-readable bytes than a header.
    #[error("descriptor chain holds {0} readable bytes, less than a packet header")]
    ShortHeader(usize),
    /// The header's length field exceeds [`MAX_PKT_LEN`].
    #[error("packet length {} exceeds the maximum", hdr.len)]
    TooLong {
        /// The offending header.
        hdr: PacketHeader,
    },
    /// The header's length field exceeds the bytes the chain holds after the header.
    #[error("packet length {} exceeds the {avail} bytes after the header", hdr.len)]
    LenMismatch {
        /// The offending header.
        hdr: PacketHeader,
        /// Bytes available after the header.
        avail: usize,
    },
    /// A receive buffer has fewer device-writable bytes than a header.
    #[error("receive buffer holds {0} writable bytes, less than a packet header")]
    ShortRxBuffer(usize),
    /// Copying from or to guest memory failed.
    #[error("cannot access guest memory")]
    Memory(#[source] std::io::Error),
}

fn u16_at(b: &[u8; HDR_SIZE], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8; HDR_SIZE], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8; HDR_SIZE], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

impl PacketHeader {
    /// Decode the wire format.
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Self {
        PacketHeader {
            src_cid: u64_at(b, 0),
            dst_cid: u64_at(b, 8),
            src_port: u32_at(b, 16),
            dst_port: u32_at(b, 20),
            len: u32_at(b, 24),
            type_: u16_at(b, 28),
            op: u16_at(b, 30),
            flags: u32_at(b, 32),
            buf_alloc: u32_at(b, 36),
            fwd_cnt: u32_at(b, 40),
        }
    }

    /// Encode the wire format.
    pub fn to_bytes(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Check the addressing fields of a packet the guest sent to the host.
    pub fn validate_from_guest(&self, guest_cid: u64) -> Result<(), HeaderError> {
        if self.src_cid != guest_cid {
            return Err(HeaderError::SrcCid(self.src_cid));
        }
        if self.dst_cid != HOST_CID {
            return Err(HeaderError::DstCid(self.dst_cid));
        }
        if self.type_ != TYPE_STREAM {
            return Err(HeaderError::Type(self.type_));
        }
        if !(op::REQUEST..=op::CREDIT_REQUEST).contains(&self.op) {
            return Err(HeaderError::Op(self.op));
        }
        Ok(())
    }
}

/// Read one packet the guest placed on the TX queue.
///
/// Returns the header; for `OP_RW` packets, `payload` holds exactly `len` bytes afterwards (it is
/// emptied otherwise). The header may be split over several device-readable descriptors and be
/// followed by the payload in the same or later descriptors; the first descriptor must be
/// device-readable. `payload` never grows beyond [`MAX_PKT_LEN`].
pub fn read_tx_packet(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
    payload: &mut Vec<u8>,
) -> Result<PacketHeader, PacketError> {
    payload.clear();
    match chain.clone().next() {
        None => return Err(PacketError::EmptyChain),
        Some(d) if d.is_write_only() => return Err(PacketError::WriteOnlyHeader),
        Some(_) => {}
    }
    let mut reader = Reader::new(mem, chain).map_err(PacketError::BadChain)?;
    let avail = reader.available_bytes();
    if avail < HDR_SIZE {
        return Err(PacketError::ShortHeader(avail));
    }
    let mut raw = [0u8; HDR_SIZE];
    reader.read_exact(&mut raw).map_err(PacketError::Memory)?;
    let hdr = PacketHeader::from_bytes(&raw);
    if hdr.len > MAX_PKT_LEN {
        return Err(PacketError::TooLong { hdr });
    }
    let after = avail - HDR_SIZE;
    // `len` is capped at MAX_PKT_LEN above, so it fits a usize.
    let len = hdr.len as usize;
    if len > after {
        return Err(PacketError::LenMismatch { hdr, avail: after });
    }
    if hdr.op == op::RW {
        payload.resize(len, 0);
        reader
            .read_exact(payload.as_mut_slice())
            .map_err(PacketError::Memory)?;
    }
    Ok(hdr)
}

/// A device-writable receive buffer from the RX queue, checked to hold at least a header.
pub struct RxBuffer<'a> {
    writer: Writer<'a>,
}

impl<'a> RxBuffer<'a> {
    /// Map the device-writable descriptors of `chain`.
    pub fn new(
        mem: &'a GuestMemory,
        chain: DescriptorChain<&'a GuestMemory>,
    ) -> Result<Self, PacketError> {
        let writer = Writer::new(mem, chain).map_err(PacketError::BadChain)?;
        let avail = writer.available_bytes();
        if avail < HDR_SIZE {
            return Err(PacketError::ShortRxBuffer(avail));
        }
        Ok(RxBuffer { writer })
    }

    /// How many payload bytes fit after the header (at most [`MAX_PKT_LEN`]).
    pub fn payload_capacity(&self) -> usize {
        // MAX_PKT_LEN is 64 KiB, which fits any usize we build for.
        (self.writer.available_bytes() - HDR_SIZE).min(MAX_PKT_LEN as usize)
    }

    /// Write `hdr` followed by `payload`; returns the bytes written (the used length).
    ///
    /// `hdr.len` must equal `payload.len()` and `payload` must fit [`Self::payload_capacity`].
    pub fn write_packet(mut self, hdr: &PacketHeader, payload: &[u8]) -> Result<u32, PacketError> {
        debug_assert_eq!(hdr.len as usize, payload.len());
        if payload.len() > self.payload_capacity() {
            return Err(PacketError::ShortRxBuffer(self.writer.available_bytes()));
        }
        self.writer
            .write_all(&hdr.to_bytes())
            .map_err(PacketError::Memory)?;
        self.writer
            .write_all(payload)
            .map_err(PacketError::Memory)?;
        // Bounded by HDR_SIZE + MAX_PKT_LEN.
        Ok((HDR_SIZE + payload.len()) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::vsock::test_utils::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const F_WRITE: u16 = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE as u16;

    fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    fn sample() -> PacketHeader {
        PacketHeader {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1234,
            dst_port: 52,
            len: 5,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn header_roundtrip_and_layout() {
        let h = sample();
        let b = h.to_bytes();
        assert_eq!(PacketHeader::from_bytes(&b), h);
        // Spot-check the wire layout against `struct virtio_vsock_hdr`.
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[20..24], &52u32.to_le_bytes());
        assert_eq!(&b[30..32], &op::RW.to_le_bytes());
        assert_eq!(&b[40..44], &7u32.to_le_bytes());
    }

    #[test]
    fn header_validation() {
        assert_eq!(sample().validate_from_guest(3), Ok(()));
        assert_eq!(sample().validate_from_guest(4), Err(HeaderError::SrcCid(3)));
        let mut h = sample();
        h.dst_cid = 5;
        assert_eq!(h.validate_from_guest(3), Err(HeaderError::DstCid(5)));
        let mut h = sample();
        h.type_ = 2;
        assert_eq!(h.validate_from_guest(3), Err(HeaderError::Type(2)));
        for bad in [0, 8, 0xffff] {
            let mut h = sample();
            h.op = bad;
            assert_eq!(h.validate_from_guest(3), Err(HeaderError::Op(bad)));
        }
    }

    fn read_chain(
        mem: &GuestMemory,
        descs: &[RawDescriptor],
    ) -> (Result<PacketHeader, PacketError>, Vec<u8>) {
        let q = MockSplitQueue::create(mem, GuestAddress(0), 16);
        let chain = q.build_desc_chain(descs).unwrap();
        let mut payload = Vec::new();
        let r = read_tx_packet(mem, chain, &mut payload);
        (r, payload)
    }

    #[test]
    fn tx_header_and_payload_in_one_descriptor() {
        let mem = test_mem();
        mem.write_slice(&sample().to_bytes(), GuestAddress(0x1_0000))
            .unwrap();
        mem.write_slice(b"hello", GuestAddress(0x1_0000 + HDR_SIZE as u64))
            .unwrap();
        let (r, payload) = read_chain(&mem, &[desc(0x1_0000, 49, 0)]);
        assert_eq!(r.unwrap(), sample());
        assert_eq!(payload, b"hello");
    }

    #[test]
    fn tx_header_split_across_descriptors() {
        let mem = test_mem();
        let b = sample().to_bytes();
        mem.write_slice(&b[..10], GuestAddress(0x1_0000)).unwrap();
        mem.write_slice(&b[10..], GuestAddress(0x2_0000)).unwrap();
        mem.write_slice(b"hel", GuestAddress(0x2_0000 + 34))
            .unwrap();
        mem.write_slice(b"lo", GuestAddress(0x3_0000)).unwrap();
        let (r, payload) = read_chain(
            &mem,
            &[
                desc(0x1_0000, 10, 0),
                desc(0x2_0000, 37, 0),
                desc(0x3_0000, 2, 0),
            ],
        );
        assert_eq!(r.unwrap(), sample());
        assert_eq!(payload, b"hello");
    }

    #[test]
    fn tx_short_header_rejected() {
        let mem = test_mem();
        let (r, _) = read_chain(&mem, &[desc(0x1_0000, 43, 0)]);
        assert!(matches!(r, Err(PacketError::ShortHeader(43))), "{r:?}");
        // A readable header followed by a writable descriptor does not count the writable part.
        let (r, _) = read_chain(&mem, &[desc(0x1_0000, 20, 0), desc(0x2_0000, 100, F_WRITE)]);
        assert!(matches!(r, Err(PacketError::ShortHeader(20))), "{r:?}");
    }

    #[test]
    fn tx_write_only_header_rejected() {
        let mem = test_mem();
        mem.write_slice(&sample().to_bytes(), GuestAddress(0x2_0000))
            .unwrap();
        // Without the check, the reader would skip the writable descriptor and parse the second.
        let (r, _) = read_chain(&mem, &[desc(0x1_0000, 64, F_WRITE), desc(0x2_0000, 49, 0)]);
        assert!(matches!(r, Err(PacketError::WriteOnlyHeader)), "{r:?}");
    }

    #[test]
    fn tx_out_of_guest_memory_rejected() {
        let mem = test_mem();
        let end = TEST_MEM_SIZE as u64;
        let (r, _) = read_chain(&mem, &[desc(end - 20, 64, 0)]);
        assert!(matches!(r, Err(PacketError::BadChain(_))), "{r:?}");
        let (r, _) = read_chain(&mem, &[desc(u64::MAX - 10, 64, 0)]);
        assert!(matches!(r, Err(PacketError::BadChain(_))), "{r:?}");
        // Header fine, payload descriptor outside memory.
        mem.write_slice(&sample().to_bytes(), GuestAddress(0x1_0000))
            .unwrap();
        let (r, _) = read_chain(&mem, &[desc(0x1_0000, 44, 0), desc(end, 5, 0)]);
        assert!(matches!(r, Err(PacketError::BadChain(_))), "{r:?}");
    }

    #[test]
    fn tx_oversized_or_mismatched_len_rejected() {
        let mem = test_mem();
        let mut h = sample();
        h.len = MAX_PKT_LEN + 1;
        mem.write_slice(&h.to_bytes(), GuestAddress(0x1_0000))
            .unwrap();
        let (r, payload) = read_chain(&mem, &[desc(0x1_0000, 0x2_0000, 0)]);
        assert!(matches!(r, Err(PacketError::TooLong { .. })), "{r:?}");
        assert!(payload.capacity() <= MAX_PKT_LEN as usize);

        h.len = 100;
        mem.write_slice(&h.to_bytes(), GuestAddress(0x1_0000))
            .unwrap();
        let (r, _) = read_chain(&mem, &[desc(0x1_0000, 44 + 99, 0)]);
        assert!(
            matches!(r, Err(PacketError::LenMismatch { hdr, avail: 99 }) if hdr.len == 100),
            "{r:?}"
        );
    }

    #[test]
    fn rx_buffer_checks() {
        let mem = test_mem();
        let q = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        // Read-only buffer: no writable bytes.
        let chain = q.build_desc_chain(&[desc(0x1_0000, 4096, 0)]).unwrap();
        assert!(matches!(
            RxBuffer::new(&mem, chain),
            Err(PacketError::ShortRxBuffer(0))
        ));
        let chain = q.build_desc_chain(&[desc(0x1_0000, 43, F_WRITE)]).unwrap();
        assert!(matches!(
            RxBuffer::new(&mem, chain),
            Err(PacketError::ShortRxBuffer(43))
        ));
        let chain = q
            .build_desc_chain(&[desc(TEST_MEM_SIZE as u64 - 10, 64, F_WRITE)])
            .unwrap();
        assert!(matches!(
            RxBuffer::new(&mem, chain),
            Err(PacketError::BadChain(_))
        ));
        // Header split over two writable descriptors, payload in the second.
        let chain = q
            .build_desc_chain(&[desc(0x1_0000, 20, F_WRITE), desc(0x2_0000, 40, F_WRITE)])
            .unwrap();
        let buf = RxBuffer::new(&mem, chain).unwrap();
        assert_eq!(buf.payload_capacity(), 16);
        let mut h = sample();
        h.len = 3;
        assert_eq!(buf.write_packet(&h, b"abc").unwrap(), 47);
        let mut raw = [0u8; HDR_SIZE];
        mem.read_slice(&mut raw[..20], GuestAddress(0x1_0000))
            .unwrap();
        mem.read_slice(&mut raw[20..], GuestAddress(0x2_0000))
            .unwrap();
        assert_eq!(PacketHeader::from_bytes(&raw), h);
        let mut data = [0u8; 3];
        mem.read_slice(&mut data, GuestAddress(0x2_0000 + 24))
            .unwrap();
        assert_eq!(&data, b"abc");
    }
}
