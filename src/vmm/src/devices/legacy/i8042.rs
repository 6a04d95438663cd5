//! The i8042 keyboard controller, as much of it as a Linux guest needs: the
//! 0xfe "pulse reset line" command, which a kernel booted with `reboot=k`
//! uses to reboot and which ends the VM cleanly; the controller's self tests
//! and command byte, so the kernel's i8042 driver (when the guest has one)
//! finds a keyboard; and key presses from the host (Ctrl+Alt+Del, the API's
//! SendCtrlAltDel) queued in the output buffer with IRQ 1.

use std::collections::VecDeque;

use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;
use crate::error::Chain;
use crate::exit::ResetTrigger;

/// Base port (data register 0x60; command/status at 0x64).
pub const I8042_BASE: u64 = 0x60;
/// Ports 0x60..=0x64.
pub const I8042_PORTS: u64 = 5;
/// The keyboard's interrupt line.
pub const KBD_IRQ: u32 = 1;

const DATA: u64 = 0;
const COMMAND: u64 = 4;

// Status register bits.
const SB_OUT_FULL: u8 = 0x01;
const SB_SYSTEM: u8 = 0x04;
const SB_COMMAND: u8 = 0x08;
const SB_KBD_ENABLED: u8 = 0x10;

// Controller command byte bits.
const CB_KBD_INT: u8 = 0x01;
const CB_SYSTEM: u8 = 0x04;
const CB_TRANSLATE: u8 = 0x40;

// Controller commands.
const CMD_READ_CB: u8 = 0x20;
const CMD_WRITE_CB: u8 = 0x60;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTPORT: u8 = 0xd0;
const CMD_WRITE_OUTPORT: u8 = 0xd1;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_PULSE_RESET: u8 = 0xfe;

// Keyboard replies.
const KBD_ACK: u8 = 0xfa;
const KBD_SELF_TEST_OK: u8 = 0xaa;
const KBD_RESET: u8 = 0xff;

/// Bytes the output buffer holds at most; key presses beyond it are dropped
/// (a guest that never reads its keyboard cannot make the VMM grow).
const OUT_CAPACITY: usize = 64;

/// Ctrl+Alt+Del press and release in scan code set 1 (what the guest sees
/// with the controller's translation on).
const CTRL_ALT_DEL: [u8; 8] = [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];

/// The controller as a bus device.
pub struct I8042 {
    reset: ResetTrigger,
    irq: Option<EventFd>,
    pub(super) command_byte: u8,
    pub(super) status: u8,
    /// A controller command that takes a data byte next.
    pub(super) pending: Option<u8>,
    pub(super) out: VecDeque<u8>,
}

impl I8042 {
    /// A controller whose reset line reports through `reset` and whose
    /// keyboard interrupt (if any) is `irq`.
    pub fn new(reset: ResetTrigger, irq: Option<EventFd>) -> Self {
        I8042 {
            reset,
            irq,
            command_byte: CB_KBD_INT | CB_SYSTEM | CB_TRANSLATE,
            status: SB_SYSTEM | SB_KBD_ENABLED,
            pending: None,
            out: VecDeque::new(),
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.out.len() < OUT_CAPACITY {
                self.out.push_back(b);
            }
        }
        self.raise();
    }

    fn raise(&self) {
        if self.out.is_empty() || self.command_byte & CB_KBD_INT == 0 {
            return;
        }
        if let Some(irq) = &self.irq {
            if let Err(e) = irq.write(1) {
                tracing::warn!(error = %Chain(&e), "cannot raise the keyboard interrupt");
            }
        }
    }

    /// Presses and releases Ctrl+Alt+Del.
    pub fn ctrl_alt_del(&mut self) {
        self.push(&CTRL_ALT_DEL);
    }

    fn command(&mut self, cmd: u8) {
        self.status |= SB_COMMAND;
        match cmd {
            CMD_READ_CB => self.push(&[self.command_byte]),
            CMD_WRITE_CB | CMD_WRITE_OUTPORT | CMD_WRITE_AUX => self.pending = Some(cmd),
            CMD_SELF_TEST => self.push(&[0x55]),
            CMD_KBD_TEST => self.push(&[0x00]),
            // No mouse: its port test fails, so the guest leaves it alone.
            CMD_AUX_TEST => self.push(&[0xff]),
            CMD_KBD_DISABLE => self.status &= !SB_KBD_ENABLED,
            CMD_KBD_ENABLE => self.status |= SB_KBD_ENABLED,
            CMD_READ_OUTPORT => self.push(&[0x01]),
            CMD_PULSE_RESET => {
                tracing::debug!("i8042 reset line pulsed");
                self.reset.0.notify(crate::exit::VmExit::Reset);
            }
            _ => {}
        }
    }

    fn data(&mut self, byte: u8) {
        self.status &= !SB_COMMAND;
        match self.pending.take() {
            Some(CMD_WRITE_CB) => {
                self.command_byte = byte;
                self.raise();
            }
            Some(_) => {}
            // A keyboard command: acknowledge it (reset also reports a
            // passed self test).
            None if byte == KBD_RESET => self.push(&[KBD_ACK, KBD_SELF_TEST_OK]),
            None => self.push(&[KBD_ACK]),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let [byte] = data else {
            data.fill(0xff);
            return;
        };
        *byte = match offset {
            DATA => {
                let b = self.out.pop_front().unwrap_or(0);
                self.raise();
                b
            }
            COMMAND => {
                let full = if self.out.is_empty() { 0 } else { SB_OUT_FULL };
                self.status | full
            }
            _ => 0xff,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [byte] = data else { return };
        match offset {
            DATA => self.data(*byte),
            COMMAND => self.command(*byte),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::{ExitNotifier, VmExit};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn read(k: &mut I8042, off: u64) -> u8 {
        let mut b = [0u8];
        k.read(off, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_ends_the_vm_and_other_writes_do_not() {
        let n = ExitNotifier::new().unwrap();
        let mut kbd = I8042::new(ResetTrigger(n.clone()), None);
        assert_eq!(read(&mut kbd, COMMAND) & 0x2, 0, "input buffer never busy");
        kbd.write(DATA, &[0xfe]);
        kbd.write(COMMAND, &[0xfe, 0]);
        assert_eq!(n.reason(), None);
        kbd.write(COMMAND, &[0xfe]);
        assert_eq!(n.reason(), Some(VmExit::Reset));
    }

    #[test]
    fn probe_sequence_of_a_linux_driver() {
        let n = ExitNotifier::new().unwrap();
        let mut kbd = I8042::new(ResetTrigger(n), None);
        kbd.write(COMMAND, &[CMD_SELF_TEST]);
        assert_eq!(read(&mut kbd, COMMAND) & SB_OUT_FULL, SB_OUT_FULL);
        assert_eq!(read(&mut kbd, DATA), 0x55);
        assert_eq!(read(&mut kbd, COMMAND) & SB_OUT_FULL, 0);
        kbd.write(COMMAND, &[CMD_READ_CB]);
        let cb = read(&mut kbd, DATA);
        assert_eq!(cb & CB_TRANSLATE, CB_TRANSLATE);
        kbd.write(COMMAND, &[CMD_WRITE_CB]);
        kbd.write(DATA, &[cb & !CB_KBD_INT]);
        kbd.write(COMMAND, &[CMD_READ_CB]);
        assert_eq!(read(&mut kbd, DATA), cb & !CB_KBD_INT);
        kbd.write(DATA, &[KBD_RESET]);
        assert_eq!(read(&mut kbd, DATA), KBD_ACK);
        assert_eq!(read(&mut kbd, DATA), KBD_SELF_TEST_OK);
    }

    #[test]
    fn ctrl_alt_del_is_queued_with_an_interrupt_and_bounded() {
        let n = ExitNotifier::new().unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut kbd = I8042::new(ResetTrigger(n), Some(irq.try_clone().unwrap()));
        kbd.ctrl_alt_del();
        assert!(irq.read().unwrap() >= 1);
        let got: Vec<u8> = (0..CTRL_ALT_DEL.len())
            .map(|_| read(&mut kbd, DATA))
            .collect();
        assert_eq!(got, CTRL_ALT_DEL);
        for _ in 0..100 {
            kbd.ctrl_alt_del();
        }
        assert_eq!(kbd.out.len(), OUT_CAPACITY);
    }
}
