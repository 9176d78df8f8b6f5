//! Legacy PC devices: 8250 serial and the i8042 controller (used for the guest's reset path).

use std::io::{self, Write};

use vm_superio::{I8042Device, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// An [`EventFd`] as a vm-superio [`Trigger`]: triggering writes 1.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Trigger through `evt`.
    pub fn new(evt: EventFd) -> Self {
        EventFdTrigger(evt)
    }

    /// The eventfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Number of I/O ports of a 8250 UART.
pub const SERIAL_PORT_LEN: u64 = 8;

/// The boxed output sink of a serial port.
pub type SerialOut = Box<dyn Write + Send>;

/// A 16550A-compatible UART on the port I/O bus (offsets 0..8 from its base, e.g. 0x3f8).
/// Guest output goes to any writer; interrupts go to an eventfd (the VMM's irqfd for IRQ 4).
pub struct Serial {
    inner: vm_superio::Serial<EventFdTrigger, vm_superio::serial::NoEvents, SerialOut>,
}

impl Serial {
    /// A UART writing guest output to `out` and signalling interrupts through `interrupt`.
    pub fn new(interrupt: EventFd, out: SerialOut) -> Self {
        Serial {
            inner: vm_superio::Serial::new(EventFdTrigger::new(interrupt), out),
        }
    }

    /// A UART writing to the VMM's stdout.
    pub fn stdout(interrupt: EventFd) -> Self {
        Serial::new(interrupt, Box::new(io::stdout()))
    }

    /// Queue host input for the guest (console input). Returns how many bytes fit in the FIFO.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        let room = self.inner.fifo_capacity();
        let Some(input) = input.get(..room.min(input.len())) else {
            return 0;
        };
        self.inner.enqueue_raw_bytes(input).unwrap_or(0)
    }

    /// The interrupt eventfd.
    pub fn interrupt_evt(&self) -> &EventFd {
        self.inner.interrupt_evt().eventfd()
    }
}

impl std::fmt::Debug for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serial").finish_non_exhaustive()
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let ([b], Ok(off)) = (&mut *data, u8::try_from(offset)) {
            if u64::from(off) < SERIAL_PORT_LEN {
                *b = self.inner.read(off);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let ([b], Ok(off)) = (data, u8::try_from(offset)) {
            if u64::from(off) < SERIAL_PORT_LEN {
                if let Err(e) = self.inner.write(off, *b) {
                    // The guest keeps running; a failing sink only loses console output.
                    log::debug!("serial: {e:?}");
                }
            }
        }
    }
}

/// Number of I/O ports of the i8042 window (0x60..=0x64, register at offset 4 = port 0x64).
pub const I8042_PORT_LEN: u64 = 5;

/// A minimal i8042 on ports 0x60..=0x64 (base 0x60): every read returns 0 and writing the
/// CPU-reset command 0xfe to port 0x64 (offset 4) writes the reset eventfd.
#[derive(Debug)]
pub struct I8042 {
    inner: I8042Device<EventFdTrigger>,
}

impl I8042 {
    /// An i8042 that signals `reset_evt` when the guest resets the CPU.
    pub fn new(reset_evt: EventFd) -> Self {
        I8042 {
            inner: I8042Device::new(EventFdTrigger::new(reset_evt)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.inner.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let ([b], Ok(off)) = (data, u8::try_from(offset)) {
            if let Err(e) = self.inner.write(off, *b) {
                log::error!("i8042: cannot signal reset: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn evt() -> EventFd {
        EventFd::new(libc::EFD_NONBLOCK).unwrap()
    }

    #[test]
    fn serial_output_reaches_sink() {
        let sink = Sink::default();
        let irq = evt();
        let mut s = Serial::new(irq.try_clone().unwrap(), Box::new(sink.clone()));
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        // Bad sizes and offsets are ignored.
        s.write(0, b"xy");
        s.write(0, &[]);
        s.write(8, b"z");
        s.write(u64::MAX, b"z");
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        let mut big = [0xffu8; 4];
        s.read(0, &mut big);
        assert_eq!(big, [0; 4]);
    }

    #[test]
    fn serial_raises_interrupts() {
        let irq = evt();
        let mut s = Serial::new(irq.try_clone().unwrap(), Box::new(io::sink()));
        // Enable the THR-empty interrupt: it fires immediately and on every byte.
        s.write(1, &[0x02]);
        assert!(irq.read().unwrap() >= 1);
        // The driver acknowledges by reading IIR (THR empty = 0x2), then sends a byte.
        let mut iir = [0u8];
        s.read(2, &mut iir);
        assert_eq!(iir[0] & 0x0f, 0x02);
        s.write(0, b"a");
        assert_eq!(irq.read().unwrap(), 1);
        // Line status says the transmitter is empty.
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }

    #[test]
    fn serial_input_is_readable() {
        let irq = evt();
        let mut s = Serial::new(irq.try_clone().unwrap(), Box::new(io::sink()));
        s.write(1, &[0x01]);
        assert_eq!(s.enqueue_input(b"ok"), 2);
        assert!(irq.read().unwrap() >= 1);
        let mut b = [0u8];
        s.read(0, &mut b);
        assert_eq!(b[0], b'o');
        s.read(0, &mut b);
        assert_eq!(b[0], b'k');
        assert_eq!(s.enqueue_input(&[0u8; 1000]), 64);
    }

    #[test]
    fn i8042_reset_fires() {
        let reset = evt();
        let mut k = I8042::new(reset.try_clone().unwrap());
        let mut b = [0xffu8];
        k.read(4, &mut b);
        assert_eq!(b, [0]);
        // Other commands and ports do nothing.
        k.write(4, &[0xfd]);
        k.write(0, &[0xfe]);
        k.write(4, &[0xfe, 0]);
        assert!(reset.read().is_err());
        k.write(4, &[0xfe]);
        assert_eq!(reset.read().unwrap(), 1);
    }
}
