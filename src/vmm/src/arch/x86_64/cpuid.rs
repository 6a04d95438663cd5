//! CPUID for each vCPU, derived from what KVM supports on this host: every
//! vCPU gets its own APIC id, the hypervisor bit is set, and the topology
//! leaves agree with each other (one thread per core, all vCPUs as cores of
//! one socket), on Intel and AMD hosts alike.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// Errors while building a vCPU's CPUID.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// The entry list could not be grown.
    #[error("cannot add a CPUID entry")]
    Push(#[source] vmm_sys_util::fam::Error),
}

/// The CPU vendor, as far as topology leaves are concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    /// GenuineIntel.
    Intel,
    /// AuthenticAMD (and HygonGenuine, which follows AMD's leaves).
    Amd,
    /// Anything else: only vendor-neutral leaves are touched.
    Other,
}

const LEAF_VENDOR: u32 = 0x0;
const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_ADDRESS_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;

const ECX_HYPERVISOR: u32 = 1 << 31;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const EDX_HTT: u32 = 1 << 28;
const ECX_AMD_CMP_LEGACY: u32 = 1 << 1;

/// Reads the vendor from leaf 0.
pub fn vendor(cpuid: &CpuId) -> Vendor {
    let Some(leaf0) = cpuid.as_slice().iter().find(|e| e.function == LEAF_VENDOR) else {
        return Vendor::Other;
    };
    let mut id = [0u8; 12];
    id[0..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
    id[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
    id[8..12].copy_from_slice(&leaf0.ecx.to_le_bytes());
    match &id {
        b"GenuineIntel" => Vendor::Intel,
        b"AuthenticAMD" | b"HygonGenuine" => Vendor::Amd,
        _ => Vendor::Other,
    }
}

/// The guest's physical address width, from leaf 0x8000_0008 (36 if absent).
pub fn phys_address_bits(cpuid: &CpuId) -> u8 {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == LEAF_ADDRESS_SIZES)
        .map(|e| (e.eax & 0xff) as u8)
        .filter(|b| *b != 0)
        .unwrap_or(36)
}

/// Bits needed to hold `n` distinct ids (ceil(log2(n))).
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

fn topology_entries(function: u32, apic_id: u32, vcpu_count: u32) -> [kvm_cpuid_entry2; 3] {
    let entry = |index: u32, eax: u32, ebx: u32, level_type: u32| kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: (level_type << 8) | index,
        edx: apic_id,
        ..Default::default()
    };
    [
        // SMT level: one thread per core, so no bits to shift.
        entry(0, 0, 1, 1),
        // Core level: all vCPUs in one package.
        entry(1, id_bits(vcpu_count), vcpu_count, 2),
        // Terminator.
        entry(2, 0, 0, 0),
    ]
}

/// Announces the LAPIC's TSC-deadline mode (leaf 1, ECX bit 24), which
/// KVM emulates whenever it has `KVM_CAP_TSC_DEADLINE_TIMER` but never
/// reports in its supported CPUID: the VMM must set it, as QEMU,
/// Firecracker and Cloud Hypervisor do. Without it a Linux guest runs its
/// timer in the LAPIC's one-shot mode, which it first calibrates against
/// the PIT for 100 ms of every boot.
pub fn enable_tsc_deadline(cpuid: &mut CpuId) {
    for e in cpuid.as_mut_slice() {
        if e.function == LEAF_FEATURES {
            e.ecx |= ECX_TSC_DEADLINE;
        }
    }
}

/// Adjusts the host-supported CPUID for vCPU `index` of `vcpu_count`.
pub fn normalize(cpuid: &mut CpuId, index: u8, vcpu_count: u8) -> Result<(), CpuidError> {
    let vendor = vendor(cpuid);
    let apic_id = u32::from(index);
    let count = u32::from(vcpu_count);
    let mut has_topology_v2 = false;
    let mut max_basic = 0;

    for e in cpuid.as_mut_slice().iter_mut() {
        match e.function {
            LEAF_VENDOR => max_basic = e.eax,
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | ((count & 0xff) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS if vendor == Vendor::Intel => {
                let cache_level = (e.eax >> 5) & 0x7;
                // Cores per package - 1 in [31:26]; logical processors sharing
                // this cache - 1 in [25:14]: only L3 is shared between vCPUs.
                let sharing = if cache_level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((count - 1) << 26) | ((sharing & 0xfff) << 14);
            }
            LEAF_TOPOLOGY_V2 => has_topology_v2 = true,
            LEAF_EXT_FEATURES if vendor == Vendor::Amd => {
                if count > 1 {
                    e.ecx |= ECX_AMD_CMP_LEGACY;
                } else {
                    e.ecx &= !ECX_AMD_CMP_LEGACY;
                }
            }
            LEAF_ADDRESS_SIZES if vendor == Vendor::Amd => {
                // NC: cores per package - 1; ApicIdCoreIdSize in [15:12].
                e.ecx = (e.ecx & !0xf0ff) | (id_bits(count) << 12) | (count - 1);
            }
            LEAF_AMD_TOPOLOGY if vendor == Vendor::Amd => {
                e.eax = apic_id;
                e.ebx = apic_id & 0xff; // core id; threads per core - 1 = 0
                e.ecx = 0; // node 0, one node per package
                e.edx = 0;
            }
            _ => {}
        }
    }

    // Rebuild the extended topology leaves from scratch: KVM reports the
    // host's, which would contradict the APIC ids handed out here.
    let mut entries: Vec<kvm_cpuid_entry2> = cpuid
        .as_slice()
        .iter()
        .filter(|e| e.function != LEAF_TOPOLOGY && e.function != LEAF_TOPOLOGY_V2)
        .copied()
        .collect();
    if max_basic >= LEAF_TOPOLOGY {
        entries.extend(topology_entries(LEAF_TOPOLOGY, apic_id, count));
    }
    if has_topology_v2 && max_basic >= LEAF_TOPOLOGY_V2 {
        entries.extend(topology_entries(LEAF_TOPOLOGY_V2, apic_id, count));
    }
    *cpuid = CpuId::from_entries(&entries).map_err(CpuidError::Push)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vendor_leaf(id: &[u8; 12], max: u32) -> kvm_cpuid_entry2 {
        let w = |i: usize| u32::from_le_bytes([id[i], id[i + 1], id[i + 2], id[i + 3]]);
        kvm_cpuid_entry2 {
            function: 0,
            eax: max,
            ebx: w(0),
            edx: w(4),
            ecx: w(8),
            ..Default::default()
        }
    }

    fn host(id: &[u8; 12]) -> CpuId {
        let leaves = [
            vendor_leaf(id, 0x1f),
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0x0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 4,
                index: 3,
                eax: 3 << 5,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 0,
                edx: 77,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x1f,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x8000_0008,
                eax: 0x3028,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x8000_001e,
                ..Default::default()
            },
        ];
        CpuId::from_entries(&leaves).unwrap()
    }

    fn leaf(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn vendor_and_address_bits() {
        assert_eq!(vendor(&host(b"GenuineIntel")), Vendor::Intel);
        assert_eq!(vendor(&host(b"AuthenticAMD")), Vendor::Amd);
        assert_eq!(vendor(&host(b"SomethingEls")), Vendor::Other);
        assert_eq!(phys_address_bits(&host(b"GenuineIntel")), 0x28);
        assert_eq!(phys_address_bits(&CpuId::new(0).unwrap()), 36);
    }

    #[test]
    fn id_bits_is_ceil_log2() {
        assert_eq!(
            [1, 2, 3, 4, 5, 8, 9, 254].map(id_bits),
            [0, 1, 2, 2, 3, 3, 4, 8]
        );
    }

    #[test]
    fn each_vcpu_gets_its_apic_id_and_a_consistent_topology() {
        for vendor_id in [b"GenuineIntel", b"AuthenticAMD"] {
            let mut c = host(vendor_id);
            normalize(&mut c, 3, 4).unwrap();
            let l1 = leaf(&c, 1, 0);
            assert_eq!(l1.ebx >> 24, 3);
            assert_eq!((l1.ebx >> 16) & 0xff, 4);
            assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
            assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
            assert_ne!(l1.edx & EDX_HTT, 0);
            for f in [0xb, 0x1f] {
                let smt = leaf(&c, f, 0);
                let core = leaf(&c, f, 1);
                let end = leaf(&c, f, 2);
                assert_eq!((smt.eax, smt.ebx, smt.edx), (0, 1, 3));
                assert_eq!((core.eax, core.ebx, core.ecx >> 8), (2, 4, 2));
                assert_eq!((end.ebx, end.ecx >> 8), (0, 0));
                assert_eq!(smt.flags, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
            }
            assert!(!c
                .as_slice()
                .iter()
                .any(|e| e.function == 0xb && e.edx == 77));
        }
    }

    #[test]
    fn tsc_deadline_is_announced_in_leaf_1_and_kept_by_normalize() {
        let mut c = host(b"AuthenticAMD");
        assert_eq!(leaf(&c, 1, 0).ecx & ECX_TSC_DEADLINE, 0);
        enable_tsc_deadline(&mut c);
        normalize(&mut c, 0, 2).unwrap();
        let l1 = leaf(&c, 1, 0);
        assert_ne!(l1.ecx & ECX_TSC_DEADLINE, 0);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
    }

    #[test]
    fn vendor_specific_leaves() {
        let mut intel = host(b"GenuineIntel");
        normalize(&mut intel, 0, 2).unwrap();
        assert_eq!(leaf(&intel, 4, 3).eax >> 26, 1);
        assert_eq!((leaf(&intel, 4, 3).eax >> 14) & 0xfff, 1);
        assert_eq!(
            leaf(&intel, 0x8000_0008, 0).ecx,
            0,
            "AMD-only field untouched"
        );

        let mut amd = host(b"AuthenticAMD");
        normalize(&mut amd, 1, 2).unwrap();
        assert_eq!(leaf(&amd, 0x8000_0008, 0).ecx, (1 << 12) | 1);
        assert_eq!(leaf(&amd, 0x8000_001e, 0).eax, 1);
        assert_eq!(leaf(&amd, 4, 3).eax, 3 << 5, "Intel-only leaf untouched");
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let mut c = host(b"GenuineIntel");
        normalize(&mut c, 0, 1).unwrap();
        assert_eq!(leaf(&c, 1, 0).edx & EDX_HTT, 0);
        assert_eq!(leaf(&c, 0xb, 1).eax, 0);
    }
}
