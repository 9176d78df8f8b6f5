//! `hyper-vmm`: one KVM microVM per process.
//!
//! [`config::VmConfig`] is plain data; [`vm::Vm::build`] turns it into guest memory (a memfd),
//! an in-kernel irqchip and PIT, legacy devices (COM1, i8042, boot timer), virtio-mmio devices
//! from the `devices` crate and vCPU threads; [`vm::Vm::run`] then serves the control socket
//! until the guest resets, panics, or a runtime stops it.

pub mod arch;
pub mod boot_timer;
pub mod bus;
pub mod config;
pub mod control;
pub mod memory;
pub mod metrics;
pub mod runloop;
pub mod vcpu;
pub mod vm;

/// Render an error and its sources as one line: "a: b: c".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        s.push_str(": ");
        s.push_str(&src.to_string());
        cur = src.source();
    }
    s
}
