//! The legacy devices in a snapshot: the UART's registers and receive
//! FIFO, and the i8042's command byte, status and output buffer. Their
//! interrupt lines and outputs are the restoring VMM's own.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::io::Write;
use vm_superio::serial::{NoEvents, SerialState};
use vmm_sys_util::eventfd::EventFd;

use super::serial::EventFdTrigger;
use super::{Serial, I8042};

/// The 16550's registers (vm-superio's `SerialState`, which has no serde).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable.
    pub interrupt_enable: u8,
    /// Interrupt identification.
    pub interrupt_identification: u8,
    /// Line control.
    pub line_control: u8,
    /// Line status.
    pub line_status: u8,
    /// Modem control.
    pub modem_control: u8,
    /// Modem status.
    pub modem_status: u8,
    /// Scratch.
    pub scratch: u8,
    /// Bytes received and not read yet.
    pub in_buffer: Vec<u8>,
}

/// Why the UART cannot be restored.
#[derive(Debug, thiserror::Error)]
#[error("the snapshot's serial receive buffer does not fit the UART's FIFO")]
pub struct SerialRestoreError;

impl Serial {
    /// The UART's registers, for a snapshot.
    pub fn save_state(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// A UART with the snapshot's registers, raising `irq` and writing to `out`.
    pub fn from_state(
        state: &SerialSnapshot,
        irq: EventFd,
        out: Box<dyn Write + Send>,
    ) -> Result<Self, SerialRestoreError> {
        let s = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let uart = vm_superio::Serial::from_state(&s, EventFdTrigger(irq), NoEvents, out)
            .map_err(|_| SerialRestoreError)?;
        Ok(Serial { uart })
    }
}

/// The keyboard controller's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// The controller command byte.
    pub command_byte: u8,
    /// The status register.
    pub status: u8,
    /// A command waiting for its data byte.
    pub pending: Option<u8>,
    /// Bytes waiting in the output buffer.
    pub out: Vec<u8>,
}

impl I8042 {
    /// The controller's state, for a snapshot.
    pub fn save_state(&self) -> I8042State {
        I8042State {
            command_byte: self.command_byte,
            status: self.status,
            pending: self.pending,
            out: self.out.iter().copied().collect(),
        }
    }

    /// Puts a snapshot's state into this controller.
    pub fn restore_state(&mut self, state: &I8042State) {
        self.command_byte = state.command_byte;
        self.status = state.status;
        self.pending = state.pending;
        self.out = state.out.iter().copied().take(64).collect::<VecDeque<u8>>();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn the_uart_keeps_its_registers_and_fifo() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(irq.try_clone().unwrap(), Box::new(std::io::sink()));
        use crate::devices::bus::BusDevice;
        s.write(3, &[0x80]); // DLAB on
        s.write(0, &[0x0c]); // divisor low
        s.write(3, &[0x03]); // 8N1, DLAB off
        s.write(1, &[0x01]); // receive interrupts
        s.write(7, &[0x5a]); // scratch
        let state = s.save_state();
        let json = serde_json::to_string(&state).unwrap();
        let back: SerialSnapshot = serde_json::from_str(&json).unwrap();
        let r = Serial::from_state(&back, irq, Box::new(std::io::sink())).unwrap();
        assert_eq!(r.save_state(), state);
        assert_eq!((state.baud_divisor_low, state.scratch), (0x0c, 0x5a));
        let mut too_much = state;
        too_much.in_buffer = vec![0; 1000];
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        assert!(Serial::from_state(&too_much, irq, Box::new(std::io::sink())).is_err());
    }
}
