//! What KVM holds of a VM and its vCPUs, read out for a snapshot and
//! written back on restore: every vCPU's registers, special registers,
//! FPU, XSAVE area and XCRs, debug registers, MSRs (the ones KVM lists),
//! local APIC, pending events, multiprocessing state, CPUID and TSC
//! frequency; the VM's PIC pair, IOAPIC, PIT and kvmclock.
//!
//! The order of the writes on restore matters to KVM: CPUID first (it
//! decides which MSRs and XSAVE features exist), the FPU before the XSAVE
//! area that supersedes it, special registers (APIC base) before the local
//! APIC, MSRs with the TSC before the TSC deadline, events last.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state,
    kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// MSRs KVM lists but that must not be saved: IA32_MCG_CTL exists only
/// with MCG_CTL_P, and KVM lists it regardless.
const MSR_IA32_MCG_CTL: u32 = 0x17b;
/// The TSC, restored before anything that counts from it.
const MSR_IA32_TSC: u32 = 0x10;
/// The TSC deadline: meaningful only once the TSC is back.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// KVM_GET_MSRS takes at most this many entries per call.
const MSR_CHUNK: usize = 64;

/// A KVM ioctl that failed while saving or restoring state.
#[derive(Debug, thiserror::Error)]
#[error("cannot {what}")]
pub struct StateError {
    /// Which ioctl, as a verb phrase ("read the LAPIC").
    pub what: &'static str,
    /// What KVM said.
    #[source]
    pub source: kvm_ioctls::Error,
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError { what, source }
}

fn fam(what: &'static str) -> impl FnOnce(vmm_sys_util::fam::Error) -> StateError {
    // A FAM wrapper refuses only sizes over its maximum: report it as the
    // E2BIG the ioctl would have given.
    move |_| StateError {
        what,
        source: kvm_ioctls::Error::new(libc::E2BIG),
    }
}

/// The FPU as KVM_GET_FPU returns it (kvm-bindings has no serde for
/// `kvm_fpu`; the fields are copied one by one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    /// x87 registers (80 bits in 16 bytes each).
    pub fpr: Vec<[u8; 16]>,
    /// Control word.
    pub fcw: u16,
    /// Status word.
    pub fsw: u16,
    /// Abridged tag word.
    pub ftwx: u8,
    /// Last opcode.
    pub last_opcode: u16,
    /// Last instruction pointer.
    pub last_ip: u64,
    /// Last data pointer.
    pub last_dp: u64,
    /// SSE registers.
    pub xmm: Vec<[u8; 16]>,
    /// SSE control and status.
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr.to_vec(),
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm.to_vec(),
            mxcsr: f.mxcsr,
        }
    }
}

impl FpuState {
    fn to_kvm(&self) -> kvm_fpu {
        let mut f = kvm_fpu {
            fcw: self.fcw,
            fsw: self.fsw,
            ftwx: self.ftwx,
            last_opcode: self.last_opcode,
            last_ip: self.last_ip,
            last_dp: self.last_dp,
            mxcsr: self.mxcsr,
            ..Default::default()
        };
        for (d, s) in f.fpr.iter_mut().zip(&self.fpr) {
            *d = *s;
        }
        for (d, s) in f.xmm.iter_mut().zip(&self.xmm) {
            *d = *s;
        }
        f
    }
}

/// Everything KVM holds of one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU index (its APIC id).
    pub index: u8,
    /// The CPUID the vCPU was given.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Its TSC frequency in kHz, when KVM reports one.
    pub tsc_khz: Option<u32>,
    /// Multiprocessing state (runnable, halted, waiting for SIPI).
    pub mp_state: kvm_mp_state,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// The legacy FPU view.
    pub fpu: FpuState,
    /// The XSAVE area (supersedes the FPU view where both exist).
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Model-specific registers, in restore order.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts and NMIs.
    pub events: kvm_vcpu_events,
}

/// The MSRs of KVM's list worth saving, in the order they are restored.
pub fn msrs_to_save(index_list: &[u32]) -> Vec<u32> {
    let mut seen = std::collections::HashSet::new();
    let mut list: Vec<u32> = index_list
        .iter()
        .copied()
        .filter(|i| *i != MSR_IA32_MCG_CTL && seen.insert(*i))
        .collect();
    list.sort_by_key(|i| match *i {
        MSR_IA32_TSC => 0,
        MSR_IA32_TSC_DEADLINE => 2,
        _ => 1,
    });
    list
}

/// Reads every MSR in `indices` that KVM lets this vCPU read; the ones it
/// refuses (features this CPU model lacks) are left out.
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSR_CHUNK)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(fam("build the MSR list"))?;
        let read = vcpu.get_msrs(&mut msrs).map_err(ioctl("read the MSRs"))?;
        out.extend_from_slice(&msrs.as_slice()[..read]);
        // KVM stops at the first MSR it cannot read: skip that one.
        let consumed = if read < chunk.len() {
            tracing::trace!(msr = chunk[read], "MSR unreadable, not saved");
            read + 1
        } else {
            read
        };
        rest = &rest[consumed..];
    }
    Ok(out)
}

/// Writes `entries`; returns the indices KVM refused (each skipped so the
/// rest still get written).
fn write_msrs(vcpu: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<Vec<u32>, StateError> {
    let mut refused = Vec::new();
    let mut rest = entries;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSR_CHUNK)];
        let msrs = Msrs::from_entries(chunk).map_err(fam("build the MSR list"))?;
        let written = vcpu.set_msrs(&msrs).map_err(ioctl("write the MSRs"))?;
        let consumed = if written < chunk.len() {
            refused.push(chunk[written].index);
            written + 1
        } else {
            written
        };
        rest = &rest[consumed..];
    }
    Ok(refused)
}

impl VcpuState {
    /// Reads the state of a vCPU that is outside KVM_RUN (parked, with any
    /// I/O it exited for completed).
    pub fn save(vcpu: &VcpuFd, index: u8, msr_indices: &[u32]) -> Result<Self, StateError> {
        let cpuid = vcpu
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("read the CPUID"))?;
        Ok(VcpuState {
            index,
            cpuid: cpuid.as_slice().to_vec(),
            tsc_khz: vcpu.get_tsc_khz().ok(),
            mp_state: vcpu.get_mp_state().map_err(ioctl("read the MP state"))?,
            regs: vcpu.get_regs().map_err(ioctl("read the registers"))?,
            sregs: vcpu
                .get_sregs()
                .map_err(ioctl("read the special registers"))?,
            fpu: FpuState::from(&vcpu.get_fpu().map_err(ioctl("read the FPU"))?),
            xsave: vcpu.get_xsave().map_err(ioctl("read the XSAVE area"))?,
            xcrs: vcpu.get_xcrs().map_err(ioctl("read the XCRs"))?,
            debug_regs: vcpu
                .get_debug_regs()
                .map_err(ioctl("read the debug registers"))?,
            lapic: vcpu.get_lapic().map_err(ioctl("read the local APIC"))?,
            msrs: read_msrs(vcpu, msr_indices)?,
            events: vcpu
                .get_vcpu_events()
                .map_err(ioctl("read the vCPU events"))?,
        })
    }

    /// Writes the state back into a freshly created vCPU.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), StateError> {
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(fam("build the CPUID"))?;
        vcpu.set_cpuid2(&cpuid).map_err(ioctl("set the CPUID"))?;
        if let Some(khz) = self.tsc_khz {
            if vcpu.get_tsc_khz().ok() != Some(khz) {
                vcpu.set_tsc_khz(khz)
                    .map_err(ioctl("set the TSC frequency of the snapshot"))?;
            }
        }
        vcpu.set_mp_state(self.mp_state)
            .map_err(ioctl("set the MP state"))?;
        vcpu.set_regs(&self.regs)
            .map_err(ioctl("set the registers"))?;
        vcpu.set_sregs(&self.sregs)
            .map_err(ioctl("set the special registers"))?;
        vcpu.set_fpu(&self.fpu.to_kvm())
            .map_err(ioctl("set the FPU"))?;
        // SAFETY: the area was read from KVM by KVM_GET_XSAVE and is
        // exactly the 4 KiB `kvm_xsave` that KVM_SET_XSAVE reads.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(ioctl("set the XSAVE area"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(ioctl("set the XCRs"))?;
        vcpu.set_debug_regs(&self.debug_regs)
            .map_err(ioctl("set the debug registers"))?;
        vcpu.set_lapic(&self.lapic)
            .map_err(ioctl("set the local APIC"))?;
        let refused = write_msrs(vcpu, &self.msrs)?;
        if !refused.is_empty() {
            tracing::warn!(
                vcpu = self.index,
                refused = ?refused.iter().map(|i| format!("{i:#x}")).collect::<Vec<_>>(),
                "KVM refused some of the snapshot's MSRs"
            );
        }
        vcpu.set_vcpu_events(&self.events)
            .map_err(ioctl("set the vCPU events"))?;
        Ok(())
    }
}

/// What KVM holds of the VM itself: the interrupt controllers, the PIT
/// and the kvmclock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    /// The master 8259.
    pub pic_master: kvm_irqchip,
    /// The slave 8259.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The 8254 PIT.
    pub pit: kvm_pit_state2,
    /// The kvmclock.
    pub clock: kvm_clock_data,
}

fn get_chip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, StateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(ioctl("read the interrupt controllers"))?;
    Ok(chip)
}

impl VmState {
    /// Reads the VM's state (its vCPUs paused).
    pub fn save(vm: &VmFd) -> Result<Self, StateError> {
        Ok(VmState {
            pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC)?,
            pit: vm.get_pit2().map_err(ioctl("read the PIT"))?,
            clock: vm.get_clock().map_err(ioctl("read the kvmclock"))?,
        })
    }

    /// Writes it into a VM with a fresh irqchip and PIT, before any vCPU
    /// runs. The kvmclock carries on from where it stood at the snapshot
    /// (the guest sees no time pass while it was saved); the guest's wall
    /// clock is the guest's business (its agent sets it from the host).
    pub fn restore(&self, vm: &VmFd) -> Result<(), StateError> {
        vm.set_pit2(&self.pit).map_err(ioctl("set the PIT"))?;
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            // Neither "advance by the real time elapsed" nor a host TSC
            // reference from another boot of the host.
            flags: 0,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(ioctl("set the kvmclock"))?;
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            vm.set_irqchip(chip)
                .map_err(ioctl("set the interrupt controllers"))?;
        }
        Ok(())
    }
}

/// The processor a snapshot was taken on, as far as restoring it elsewhere
/// is concerned: vendor, family, model and stepping from CPUID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuModel {
    /// The vendor string (GenuineIntel, AuthenticAMD, ...).
    pub vendor: String,
    /// The display family (base plus extended).
    pub family: u32,
    /// The display model (with the extended model where it applies).
    pub model: u32,
    /// The stepping.
    pub stepping: u32,
}

impl std::fmt::Display for CpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} family {:#x} model {:#x} stepping {}",
            self.vendor, self.family, self.model, self.stepping
        )
    }
}

impl CpuModel {
    /// Reads the model from a CPUID (leaf 0 and leaf 1).
    pub fn from_cpuid(cpuid: &[kvm_cpuid_entry2]) -> Self {
        let leaf = |f: u32| cpuid.iter().find(|e| e.function == f && e.index == 0);
        let vendor = leaf(0).map_or_else(String::new, |l| {
            let mut id = Vec::with_capacity(12);
            for r in [l.ebx, l.edx, l.ecx] {
                id.extend_from_slice(&r.to_le_bytes());
            }
            String::from_utf8_lossy(&id).into_owned()
        });
        let eax = leaf(1).map_or(0, |l| l.eax);
        let base_family = (eax >> 8) & 0xf;
        let base_model = (eax >> 4) & 0xf;
        let family = if base_family == 0xf {
            base_family + ((eax >> 20) & 0xff)
        } else {
            base_family
        };
        let model = if base_family == 0x6 || base_family == 0xf {
            base_model | (((eax >> 16) & 0xf) << 4)
        } else {
            base_model
        };
        CpuModel {
            vendor,
            family,
            model,
            stepping: eax & 0xf,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    #[test]
    fn cpu_models_decode_extended_family_and_model() {
        // "GenuineIntel", family 6 model 0x55 stepping 4 (Skylake-SP).
        let intel = [
            leaf(0, 0x16, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
            leaf(1, 0x0005_0654, 0, 0, 0),
        ];
        let m = CpuModel::from_cpuid(&intel);
        assert_eq!(
            (m.vendor.as_str(), m.family, m.model, m.stepping),
            ("GenuineIntel", 6, 0x55, 4)
        );
        // "AuthenticAMD", family 0x17 (0xf + 8) model 0x31 stepping 0 (Rome).
        let amd = [
            leaf(0, 0x10, 0x6874_7541, 0x444d_4163, 0x6974_6e65),
            leaf(1, 0x0083_0f10, 0, 0, 0),
        ];
        let m = CpuModel::from_cpuid(&amd);
        assert_eq!(
            (m.vendor.as_str(), m.family, m.model, m.stepping),
            ("AuthenticAMD", 0x17, 0x31, 0)
        );
        assert_eq!(
            m.to_string(),
            "AuthenticAMD family 0x17 model 0x31 stepping 0"
        );
    }

    #[test]
    fn msr_restore_order_puts_the_tsc_first_and_its_deadline_last() {
        let order = msrs_to_save(&[0x6e0, 0xc000_0080, 0x10, 0x17b, 0x174, 0x10]);
        assert_eq!(order, vec![0x10, 0xc000_0080, 0x174, 0x6e0]);
    }

    #[test]
    fn fpu_state_round_trips() {
        let mut f = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            last_ip: 0xdead,
            ..Default::default()
        };
        f.fpr[7][9] = 0x42;
        f.xmm[15][0] = 0x99;
        let s = FpuState::from(&f);
        let json = serde_json::to_string(&s).unwrap();
        let back: FpuState = serde_json::from_str(&json).unwrap();
        let k = back.to_kvm();
        assert_eq!((k.fcw, k.mxcsr, k.last_ip), (0x37f, 0x1f80, 0xdead));
        assert_eq!(k.fpr[7][9], 0x42);
        assert_eq!(k.xmm[15][0], 0x99);
    }
}
