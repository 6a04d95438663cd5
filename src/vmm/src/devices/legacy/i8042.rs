//! The i8042 keyboard controller, reduced to what a kernel booted with
//! `reboot=k` needs: a status register that never reports busy and the
//! 0xfe "pulse reset line" command, which ends the VM cleanly.

use vm_superio::I8042Device;

use crate::devices::bus::BusDevice;
use crate::exit::ResetTrigger;

/// Base port (data register 0x60; command/status at 0x64).
pub const I8042_BASE: u64 = 0x60;
/// Ports 0x60..=0x64.
pub const I8042_PORTS: u64 = 5;

/// The controller as a bus device.
pub struct I8042 {
    dev: I8042Device<ResetTrigger>,
}

impl I8042 {
    /// A controller whose reset line reports through `reset`.
    pub fn new(reset: ResetTrigger) -> Self {
        I8042 {
            dev: I8042Device::new(reset),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(off), [byte]) => *byte = self.dev.read(off),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [byte]) = (u8::try_from(offset), data) {
            if let Err(e) = self.dev.write(off, *byte) {
                tracing::error!(error = %e, "i8042 reset failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::{ExitNotifier, VmExit};

    #[test]
    fn reset_command_ends_the_vm_and_other_writes_do_not() {
        let n = ExitNotifier::new().unwrap();
        let mut kbd = I8042::new(ResetTrigger(n.clone()));
        let mut status = [0xaau8];
        kbd.read(4, &mut status);
        assert_eq!(status[0] & 0x2, 0, "input buffer never busy");
        kbd.write(0, &[0xfe]);
        kbd.write(4, &[0xfe, 0]);
        assert_eq!(n.reason(), None);
        kbd.write(4, &[0xfe]);
        assert_eq!(n.reason(), Some(VmExit::Reset));
    }
}
