//! The 16550 UART at 0x3f8 (IRQ 4), backed by vm-superio. Its interrupt line
//! is an eventfd registered as a KVM irqfd; output goes to any writer (stdout,
//! a file, or nowhere).

use std::io::Write;

use vm_superio::{serial::NoEvents, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;

/// Legacy COM1 port base.
pub const COM1_BASE: u64 = 0x3f8;
/// Its IRQ (IOAPIC pin / GSI).
pub const COM1_IRQ: u32 = 4;
/// Number of registers.
pub const UART_REGS: u64 = 8;

/// An eventfd as a vm-superio interrupt trigger.
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The UART as a bus device.
pub struct Serial {
    pub(super) uart: vm_superio::Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl Serial {
    /// A UART that raises `irq` and writes the guest's output to `out`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Serial {
            uart: vm_superio::Serial::new(EventFdTrigger(irq), out),
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(off), [byte]) if offset < UART_REGS => *byte = self.uart.read(off),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [byte]) = (u8::try_from(offset), data) {
            if offset < UART_REGS {
                if let Err(e) = self.uart.write(off, *byte) {
                    // A full or closed output must not stop the guest.
                    tracing::debug!(error = ?e, "serial write failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn guest_bytes_reach_the_writer_and_bad_accesses_are_ignored() {
        let out = Shared::default();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(irq.try_clone().unwrap(), Box::new(out.clone()));
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
        // Two-byte accesses and offsets beyond the UART do nothing harmful.
        s.write(0, b"xy");
        s.write(99, b"z");
        let mut two = [0u8; 2];
        s.read(0, &mut two);
        assert_eq!(two, [0xff, 0xff]);
        let mut lsr = [0u8; 1];
        s.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "transmitter holding register empty");
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
    }
}
