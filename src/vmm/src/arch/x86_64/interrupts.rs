//! Local APIC setup: LINT0 delivers ExtINT (the legacy PIC path) and LINT1
//! delivers NMI, as firmware leaves them for a Linux kernel.

use kvm_bindings::kvm_lapic_state;
use kvm_ioctls::VcpuFd;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Errors while programming the local APIC.
#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    /// KVM_GET_LAPIC or KVM_SET_LAPIC failed.
    #[error("cannot {what} the local APIC")]
    Lapic {
        /// get or set.
        what: &'static str,
        /// The KVM error.
        source: kvm_ioctls::Error,
    },
}

fn get_reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    let b = &state.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        state.regs[offset + i] = *byte as _;
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Programs LINT0 as ExtINT and LINT1 as NMI.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), InterruptError> {
    let mut state = vcpu.get_lapic().map_err(|source| InterruptError::Lapic {
        what: "read",
        source,
    })?;
    let lvt0 = get_reg(&state, APIC_LVT0);
    set_reg(
        &mut state,
        APIC_LVT0,
        with_delivery_mode(lvt0, APIC_MODE_EXTINT),
    );
    let lvt1 = get_reg(&state, APIC_LVT1);
    set_reg(
        &mut state,
        APIC_LVT1,
        with_delivery_mode(lvt1, APIC_MODE_NMI),
    );
    vcpu.set_lapic(&state)
        .map_err(|source| InterruptError::Lapic {
            what: "write",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_round_trip_and_modes_apply() {
        let mut s = kvm_lapic_state::default();
        set_reg(&mut s, APIC_LVT0, 0x0001_0000);
        assert_eq!(get_reg(&s, APIC_LVT0), 0x0001_0000);
        let v = with_delivery_mode(get_reg(&s, APIC_LVT0), APIC_MODE_EXTINT);
        assert_eq!(v, 0x0001_0700);
        assert_eq!(with_delivery_mode(0x700, APIC_MODE_NMI), 0x400);
    }
}
