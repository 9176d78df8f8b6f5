//! Loading the guest kernel (bzImage or ELF vmlinux), initramfs and command line, and writing the
//! Linux boot_params with the e820 map.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{load_cmdline, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::*;
use crate::memory::ram_ranges;

/// Boot loading errors.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A file could not be opened or read.
    #[error("cannot read {what}")]
    Io {
        /// Which file.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is neither a valid ELF vmlinux nor a bzImage.
    #[error("cannot load the kernel image")]
    Kernel(#[source] linux_loader::loader::Error),
    /// The command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// The initramfs does not fit in guest memory below the kernel's limit.
    #[error("initrd of {size} bytes does not fit in guest memory")]
    InitrdTooLarge {
        /// Initrd size.
        size: u64,
    },
    /// Writing boot structures failed.
    #[error("cannot write boot structures into guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> BootError {
    move |source| BootError::Io { what, source }
}

/// The kernel format, detected from its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// An ELF vmlinux.
    Elf,
    /// A bzImage.
    BzImage,
}

/// What loading produced.
#[derive(Debug)]
pub struct LoadedKernel {
    /// 64-bit entry point.
    pub entry: u64,
    /// Detected format.
    pub format: KernelFormat,
}

const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const E820_RAM: u32 = 1;
/// Offset of the 64-bit entry point (startup_64) in a bzImage's protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

fn detect(file: &mut File) -> Result<KernelFormat, BootError> {
    let mut magic = [0u8; 4];
    file.read_exact(&mut magic).map_err(io("kernel"))?;
    file.seek(SeekFrom::Start(0)).map_err(io("kernel"))?;
    Ok(if magic == ELF_MAGIC {
        KernelFormat::Elf
    } else {
        KernelFormat::BzImage
    })
}

/// The e820 RAM map for a guest of `mem_size` bytes.
pub fn e820_map(mem_size: u64) -> Vec<boot_e820_entry> {
    let mut map = vec![boot_e820_entry {
        addr: 0,
        size: EBDA_START,
        r#type: E820_RAM,
    }];
    for (addr, len, _) in ram_ranges(mem_size) {
        let (start, end) = if addr.raw_value() == 0 {
            (HIMEM_START, len)
        } else {
            (addr.raw_value(), addr.raw_value() + len)
        };
        if end > start {
            map.push(boot_e820_entry {
                addr: start,
                size: end - start,
                r#type: E820_RAM,
            });
        }
    }
    map
}

/// Load kernel, initrd and command line into `mem` and write boot_params. Returns the entry point.
pub fn load(
    mem: &GuestMemoryMmap<()>,
    mem_size: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<LoadedKernel, BootError> {
    let mut kfile = File::open(kernel).map_err(io("kernel"))?;
    let format = detect(&mut kfile)?;
    let himem = Some(GuestAddress(HIMEM_START));
    let result = match format {
        KernelFormat::Elf => linux_loader::loader::elf::Elf::load(mem, None, &mut kfile, himem),
        KernelFormat::BzImage => {
            linux_loader::loader::bzimage::BzImage::load(mem, None, &mut kfile, himem)
        }
    }
    .map_err(BootError::Kernel)?;
    let entry = match format {
        KernelFormat::Elf => result.kernel_load.raw_value(),
        KernelFormat::BzImage => result.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET,
    };

    let mut params = boot_params::default();
    if let Some(hdr) = result.setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;

    let mut cl = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cl.insert_str(cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cl)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;

    if let Some(path) = initrd {
        let (addr, size) = load_initrd(mem, mem_size, path, &params, result.kernel_end)?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let map = e820_map(mem_size);
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = *e;
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(BootError::GuestMemory)?;
    Ok(LoadedKernel { entry, format })
}

fn load_initrd(
    mem: &GuestMemoryMmap<()>,
    mem_size: u64,
    path: &Path,
    params: &boot_params,
    kernel_end: u64,
) -> Result<(u64, u64), BootError> {
    let mut file = File::open(path).map_err(io("initrd"))?;
    let size = file.metadata().map_err(io("initrd"))?.len();
    let lowmem_end = mem_size.min(MMIO_GAP_START);
    let addr_max = match params.hdr.initrd_addr_max {
        0 => 0x37ff_ffff,
        m => u64::from(m),
    };
    let top = lowmem_end.min(addr_max.saturating_add(1));
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end.max(HIMEM_START) && size <= u64::from(u32::MAX))
        .ok_or(BootError::InitrdTooLarge { size })?;
    let len = usize::try_from(size).map_err(|_| BootError::InitrdTooLarge { size })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(BootError::GuestMemory)?;
    Ok((addr, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_small_and_large() {
        let m = e820_map(128 << 20);
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].addr, m[0].size), (0, EBDA_START));
        assert_eq!(
            (m[1].addr, m[1].size),
            (HIMEM_START, (128 << 20) - HIMEM_START)
        );
        let m = e820_map(MMIO_GAP_START + (1 << 30));
        assert_eq!(m.len(), 3);
        assert_eq!((m[2].addr, m[2].size), (MMIO_GAP_END, 1 << 30));
    }

    #[test]
    fn garbage_kernel_is_an_error() {
        let dir = std::env::temp_dir().join(format!("vmm-boot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let k = dir.join("k");
        std::fs::write(&k, vec![0x11u8; 8192]).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let err = load(&mem, 64 << 20, &k, None, "console=ttyS0").unwrap_err();
        assert!(matches!(err, BootError::Kernel(_)), "{err}");
        let mut elf = vec![0u8; 8192];
        elf[..4].copy_from_slice(&ELF_MAGIC);
        std::fs::write(&k, elf).unwrap();
        let err = load(&mem, 64 << 20, &k, None, "console=ttyS0").unwrap_err();
        assert!(matches!(err, BootError::Kernel(_)), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
