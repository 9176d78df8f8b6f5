//! Randomized hostile-guest tests: seeded (so failures reproduce), no extra dependencies.
//! Random descriptor tables and rings are thrown at each device's queue processing, and random
//! register traffic at the virtio-mmio transport. The assertions: nothing panics, every call
//! returns, and the used ring never claims more than the queue size.

use std::io::Write;
use std::sync::Mutex;

use devices::bus::BusDevice;
use devices::virtio::block::request::{process_queue as blk_process, Backing, BlockStats};
use devices::virtio::block::Block;
use devices::virtio::mmio::MmioTransport;
use devices::virtio::rng::process_queue as rng_process;
use devices::virtio::Interrupt;
use devices::GuestMemory;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 1 << 20;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x3000;
const USED: u64 = 0x4000;
const QSIZE: u16 = 16;

/// xorshift64*: small, deterministic.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// An address that is usually inside guest memory, sometimes near the end, sometimes far
    /// outside or about to overflow.
    fn addr(&mut self) -> u64 {
        match self.below(8) {
            0 => u64::MAX - self.below(4096),
            1 => MEM_SIZE as u64 - self.below(64),
            2 => self.next(),
            _ => 0x8000 + self.below(MEM_SIZE as u64 - 0x10000),
        }
    }
    fn len(&mut self) -> u32 {
        match self.below(6) {
            0 => u32::MAX - self.below(16) as u32,
            1 => 0,
            2 => self.next() as u32,
            _ => self.below(4096) as u32 + 1,
        }
    }
}

fn memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// Fill the descriptor table and the available ring with garbage and return a ready queue.
fn random_queue(mem: &GuestMemory, rng: &mut Rng) -> Queue {
    for i in 0..u64::from(QSIZE) {
        let base = DESC + i * 16;
        mem.write_obj(rng.addr(), GuestAddress(base)).unwrap();
        mem.write_obj(rng.len(), GuestAddress(base + 8)).unwrap();
        // Flags: NEXT, WRITE and INDIRECT in random combinations, sometimes junk bits.
        let flags = (rng.below(16) as u16) | if rng.below(10) == 0 { 0xfff0 } else { 0 };
        mem.write_obj(flags, GuestAddress(base + 12)).unwrap();
        let next = if rng.below(5) == 0 {
            rng.next() as u16
        } else {
            rng.below(u64::from(QSIZE)) as u16
        };
        mem.write_obj(next, GuestAddress(base + 14)).unwrap();
    }
    // avail: flags, idx, ring[QSIZE]. idx sometimes far beyond the queue size.
    mem.write_obj(0u16, GuestAddress(AVAIL)).unwrap();
    let idx = if rng.below(4) == 0 {
        rng.next() as u16
    } else {
        rng.below(u64::from(QSIZE) + 1) as u16
    };
    mem.write_obj(idx, GuestAddress(AVAIL + 2)).unwrap();
    for i in 0..u64::from(QSIZE) {
        let head = if rng.below(6) == 0 {
            rng.next() as u16
        } else {
            rng.below(u64::from(QSIZE)) as u16
        };
        mem.write_obj(head, GuestAddress(AVAIL + 4 + i * 2))
            .unwrap();
    }
    mem.write_obj(0u16, GuestAddress(USED + 2)).unwrap();
    let mut q = Queue::new(QSIZE).unwrap();
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    assert!(q.is_valid(mem));
    q
}

fn used_idx(mem: &GuestMemory) -> u16 {
    mem.read_obj(GuestAddress(USED + 2)).unwrap()
}

#[test]
fn random_chains_never_crash_block() {
    let dir = std::env::temp_dir().join(format!("hostile-blk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("disk.img");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(&vec![0x5a; 64 * 1024])
        .unwrap();
    for read_only in [false, true] {
        let backing = Mutex::new(Backing {
            file: std::fs::OpenOptions::new()
                .read(true)
                .write(!read_only)
                .open(&path)
                .unwrap(),
            read_only,
            capacity: 128,
        });
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ u64::from(read_only));
        let mut used = 0u32;
        let stats = BlockStats::default();
        for _ in 0..3000 {
            let mem = memory();
            let mut q = random_queue(&mem, &mut rng);
            let _ = blk_process(&mem, &mut q, b"hostile-test-serial!", &stats, || {
                backing.lock().unwrap()
            });
            assert!(
                used_idx(&mem) <= QSIZE,
                "used ring claims more than the queue holds"
            );
            used += u32::from(used_idx(&mem));
        }
        // The generator must also produce chains the device gets through (and answers).
        assert!(
            used > 1000,
            "only {used} chains completed: the test exercises nothing"
        );
    }
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        64 * 1024,
        "disk grew past its capacity"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn random_chains_never_crash_rng() {
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    let mut used = 0u32;
    for _ in 0..3000 {
        let mem = memory();
        let mut q = random_queue(&mem, &mut rng);
        let _ = rng_process(&mem, &mut q);
        assert!(used_idx(&mem) <= QSIZE);
        used += u32::from(used_idx(&mem));
    }
    assert!(
        used > 1000,
        "only {used} chains completed: the test exercises nothing"
    );
}

#[test]
fn random_register_traffic_never_crashes_the_transport() {
    let dir = std::env::temp_dir().join(format!("hostile-mmio-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("disk.img");
    std::fs::write(&path, vec![0u8; 4096]).unwrap();
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    let mut activated = 0;
    let mut refused = 0;
    for round in 0..50 {
        let mem = memory();
        let blk = Block::new("hostile", &path, round % 2 == 0).unwrap();
        let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut t = MmioTransport::new(mem.clone(), Box::new(blk), irq).unwrap();
        // The Linux driver's init sequence with a hostile queue layout.
        let w = |t: &mut MmioTransport, off: u64, v: u32| t.write(off, &v.to_le_bytes());
        w(&mut t, 0x70, 1);
        w(&mut t, 0x70, 3);
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1); // VIRTIO_F_VERSION_1 (bit 32)
        w(&mut t, 0x24, 0);
        w(&mut t, 0x20, 0);
        w(&mut t, 0x70, 11);
        w(&mut t, 0x30, 0);
        w(
            &mut t,
            0x38,
            [16u32, 256, 3, 0, 1 << 16][rng.below(5) as usize],
        );
        let valid = rng.below(2) == 0;
        for (reg, good) in [(0x80u64, 0x1000u64), (0x90, 0x3000), (0xa0, 0x4000)] {
            let a = if valid { good } else { rng.addr() };
            w(&mut t, reg, a as u32);
            w(&mut t, reg + 4, (a >> 32) as u32);
        }
        w(&mut t, 0x44, 1);
        w(&mut t, 0x70, 15);
        if t.is_activated() {
            activated += 1;
        } else {
            let mut st = [0u8; 4];
            t.read(0x70, &mut st);
            assert_ne!(
                u32::from_le_bytes(st) & 0x40,
                0,
                "bad layout neither activated nor refused"
            );
            refused += 1;
        }
        for _ in 0..2000 {
            let size = [1usize, 2, 4, 8, 3][rng.below(5) as usize];
            // Mostly real registers (4-byte aligned below 0x100), sometimes anywhere.
            let offset = if rng.below(4) == 0 {
                rng.below(0x2000)
            } else {
                rng.below(0x40) * 4
            };
            if rng.below(2) == 0 {
                let mut data = vec![0u8; size];
                t.read(offset, &mut data);
            } else {
                let v = rng.next().to_le_bytes();
                // The status register gets plausible values more often, to reach activation.
                let v = if offset == 0x70 && rng.below(2) == 0 {
                    [0x0f_u8, 0, 0, 0, 0, 0, 0, 0]
                } else {
                    v
                };
                t.write(offset, &v[..size]);
            }
        }
        // A reset always brings the transport back to a clean state.
        t.write(0x70, &0u32.to_le_bytes());
        let mut status = [0u8; 4];
        t.read(0x70, &mut status);
        assert_eq!(u32::from_le_bytes(status), 0, "status not cleared by reset");
    }
    // Both outcomes of activation were exercised.
    assert!(
        activated > 0 && refused > 0,
        "activated {activated}, refused {refused}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
