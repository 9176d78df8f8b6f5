//! Guest physical memory layout (the same shape Firecracker uses).

/// GDT location.
pub const BOOT_GDT_START: u64 = 0x500;
/// IDT location (empty IDT for boot).
pub const BOOT_IDT_START: u64 = 0x520;
/// The Linux boot_params ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Boot page tables: PML4, PDPT, PD.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (identity-maps the first GiB with 2 MiB pages).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line we pass.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// End of conventional memory reported as RAM; the MP table sits right above it.
pub const EBDA_START: u64 = 0x9fc00;
/// Where the kernel is loaded (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;
/// The 32-bit MMIO hole: virtio-mmio devices, IOAPIC, LAPIC.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End of the MMIO hole (4 GiB).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device.
pub const VIRTIO_MMIO_BASE: u64 = MMIO_GAP_START;
/// Size of each virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First GSI for virtio-mmio devices (0-4 are legacy: PIT, keyboard, cascade, COM2, COM1).
pub const VIRTIO_FIRST_GSI: u32 = 5;
/// Last usable IOAPIC pin.
pub const IOAPIC_LAST_GSI: u32 = 23;
/// IOAPIC base address.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC base address.
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's TSS (3 pages) just below the identity map page, inside the hole.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// KVM's identity map page.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// COM1.
pub const SERIAL_PORT: u16 = 0x3f8;
/// COM1's IRQ.
pub const SERIAL_IRQ: u32 = 4;
/// i8042 data port; the command port is at +4 (0x64).
pub const I8042_PORT: u16 = 0x60;
/// BIOS data area word the kernel writes its reboot mode to (0x1234 = warm).
pub const REBOOT_MODE_ADDR: u64 = 0x472;
/// Value of [`REBOOT_MODE_ADDR`] after a warm reboot, which `reboot=panic_warm` selects for panics.
pub const REBOOT_MODE_WARM: u16 = 0x1234;
