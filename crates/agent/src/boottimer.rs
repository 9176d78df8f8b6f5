//! Readiness signal for the VMM's boot timer: one byte written to an I/O port.
//!
//! The VMM traps the write to [`protocol::BOOT_TIMER_PORT`] and logs the time since it started
//! the vCPUs, the same idea as Firecracker's boot timer device.

use protocol::{BOOT_TIMER_MAGIC, BOOT_TIMER_PORT};

/// The readiness write could not be made.
#[derive(Debug, thiserror::Error)]
pub enum BootTimerError {
    /// ioperm(2) refused access to the port (not root, or not x86).
    #[error("ioperm on port {port:#x} failed")]
    Ioperm {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    /// The architecture has no port I/O.
    #[error("the boot timer needs x86_64 port I/O")]
    Unsupported,
}

/// Writes [`BOOT_TIMER_MAGIC`] to [`BOOT_TIMER_PORT`].
#[cfg(target_arch = "x86_64")]
pub fn signal_ready() -> Result<(), BootTimerError> {
    // SAFETY: ioperm only changes this thread's I/O permission bitmap; the arguments are plain
    // integers and no memory is passed to the kernel.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_ioperm,
            libc::c_ulong::from(BOOT_TIMER_PORT),
            1 as libc::c_ulong,
            1 as libc::c_int,
        )
    };
    if rc != 0 {
        return Err(BootTimerError::Ioperm {
            port: BOOT_TIMER_PORT,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: ioperm above granted this thread access to exactly this port; the write goes to
    // the VMM, which treats it as a boot timestamp. It touches no memory, stack or flags.
    unsafe {
        core::arch::asm!(
            "out dx, al",
            in("dx") BOOT_TIMER_PORT,
            in("al") BOOT_TIMER_MAGIC,
            options(nomem, nostack, preserves_flags)
        );
    }
    Ok(())
}

/// Writes [`BOOT_TIMER_MAGIC`] to [`BOOT_TIMER_PORT`] (unavailable off x86_64).
#[cfg(not(target_arch = "x86_64"))]
pub fn signal_ready() -> Result<(), BootTimerError> {
    let _ = (BOOT_TIMER_PORT, BOOT_TIMER_MAGIC);
    Err(BootTimerError::Unsupported)
}
