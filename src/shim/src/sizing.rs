//! How big a pod's microVM boots and how big it must be for the
//! containers it runs. Kubernetes gives each container CPU and memory
//! limits; under runc they are cgroup limits on the node, under husk they
//! are cgroup limits in the guest, so the guest must have at least what
//! its containers may use, or a container is OOM-killed below its limit.
//!
//! The VM boots small (the guest's own `default_memory_mib`, and
//! `default_vcpus`) and gets what the pod asks for as a whole right after
//! its boot: containerd's sandbox annotations (the sum of the pod's
//! limits, which the kubelet sends), or without them (`ctr run`) the first
//! container's own limits. Each container then asks for its limits, and
//! the VM grows when their sum outgrows it (memory through the virtio-mem
//! region, vCPUs brought online from the parked ones the VM was built
//! with), and shrinks back when they go. Booting small is measured: under
//! this project's nested emulation a second vCPU at boot cost a pod's
//! start 1.34x and 2 GiB of boot memory 1.2x, while plugging and onlining
//! after the boot overlap with the pod's first containers being made. The `io.husk.*` annotations are hints that can only raise the
//! boot size, within the configured maximums.

use std::collections::BTreeMap;

use oci_spec::runtime::{LinuxResources, Spec};

use crate::config::Config;

/// containerd 1.7's sandbox annotations: the pod's CPU period, quota and
/// shares and its memory limit (bytes), from the kubelet's pod resources.
pub const SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
/// See [`SANDBOX_CPU_PERIOD`].
pub const SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
/// See [`SANDBOX_CPU_PERIOD`].
pub const SANDBOX_CPU_SHARES: &str = "io.kubernetes.cri.sandbox-cpu-shares";
/// See [`SANDBOX_CPU_PERIOD`].
pub const SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";

/// A hint: boot with at least this many vCPUs (within `max_vcpus`).
pub const VCPUS_HINT: &str = "io.husk.vcpus";
/// A hint: boot with at least this much guest memory, in MiB (within
/// `max_memory_mib`).
pub const MEMORY_HINT: &str = "io.husk.memory-mib";

/// The unit the guest plugs memory in (husk's default block size).
pub const BLOCK_MIB: u64 = husk_api_types::DEFAULT_HOTPLUG_BLOCK_SIZE_MIB;

/// The unit the hot-pluggable region is sized in (husk's default slot).
pub const SLOT_MIB: u64 = husk_api_types::DEFAULT_HOTPLUG_SLOT_SIZE_MIB;

/// The CPU shares of one CPU (cgroup v1's unit, which the OCI spec and
/// containerd keep: the kubelet gives a request of N millicores N*1024/1000).
const SHARES_PER_CPU: u64 = 1024;

/// What a container (or the whole pod) asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ask {
    /// Its memory limit in MiB (0: none).
    pub memory_mib: u64,
    /// Its CPUs in thousandths: the limit (quota over period), else the
    /// request (shares), else 0.
    pub milli_cpus: u64,
}

impl Ask {
    /// What an OCI spec's resources ask for.
    pub fn of_resources(r: Option<&LinuxResources>) -> Ask {
        let Some(r) = r else {
            return Ask::default();
        };
        let memory = r
            .memory()
            .as_ref()
            .and_then(|m| m.limit())
            .filter(|l| *l > 0)
            .map_or(0, |l| l as u64);
        let cpu = r.cpu().as_ref();
        let quota = cpu.and_then(|c| c.quota()).unwrap_or(0);
        let period = cpu.and_then(|c| c.period()).unwrap_or(0);
        let shares = cpu.and_then(|c| c.shares()).unwrap_or(0);
        Ask {
            memory_mib: memory.div_ceil(1 << 20),
            milli_cpus: milli_cpus(quota, period, shares),
        }
    }

    /// What a container's spec asks for.
    pub fn of_spec(spec: &Spec) -> Ask {
        Ask::of_resources(spec.linux().as_ref().and_then(|l| l.resources().as_ref()))
    }

    /// What containerd 1.7's sandbox annotations ask for the whole pod;
    /// `None` without them.
    pub fn of_sandbox(spec: &Spec) -> Option<Ask> {
        let get = |key: &str| annotation(spec, key);
        let memory = get(SANDBOX_MEMORY);
        let quota = get(SANDBOX_CPU_QUOTA);
        let shares = get(SANDBOX_CPU_SHARES);
        if memory.is_none() && quota.is_none() && shares.is_none() {
            return None;
        }
        let period = get(SANDBOX_CPU_PERIOD).unwrap_or(0);
        Some(Ask {
            memory_mib: (memory.unwrap_or(0).max(0) as u64).div_ceil(1 << 20),
            milli_cpus: milli_cpus(
                quota.unwrap_or(0),
                period.max(0) as u64,
                shares.unwrap_or(0).max(0) as u64,
            ),
        })
    }
}

fn annotation(spec: &Spec, key: &str) -> Option<i64> {
    spec.annotations()
        .as_ref()
        .and_then(|a| a.get(key))
        .and_then(|v| v.trim().parse().ok())
}

/// A limit if there is one (quota over period, rounded up), else the
/// request that shares stand for (2 is the kubelet's "no request").
fn milli_cpus(quota: i64, period: u64, shares: u64) -> u64 {
    if quota > 0 && period > 0 {
        (quota as u64).saturating_mul(1000).div_ceil(period)
    } else if shares > 2 {
        shares.saturating_mul(1000).div_ceil(SHARES_PER_CPU)
    } else {
        0
    }
}

/// The whole CPUs `milli` thousandths take.
fn cpus(milli: u64) -> u64 {
    milli.div_ceil(1000)
}

/// A VM's shape, decided at boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Guest memory for the guest itself, beyond its containers' limits.
    pub overhead_mib: u64,
    /// What the pod asked for at boot.
    pub pod: Ask,
    /// The fewest vCPUs online.
    pub boot_vcpus: u32,
    /// The vCPUs built (the rest of them parked until needed).
    pub max_vcpus: u32,
    /// The guest's boot memory.
    pub boot_mib: u64,
    /// The hot-pluggable region (0: the VM cannot grow its memory).
    pub hotplug_mib: u64,
}

/// What the VM should have now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Target {
    /// vCPUs online.
    pub vcpus: u32,
    /// Memory plugged from the region (MiB).
    pub plugged_mib: u64,
}

/// A container whose limits the VM cannot take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "container {container}'s memory limit of {limit_mib} MiB does not fit in the pod's microVM: \
     its containers' limits and the guest's own {overhead_mib} MiB come to {need_mib} MiB, \
     and the VM can have at most {max_mib} MiB (max_memory_mib in the shim's configuration, \
     within the node's memory)"
)]
pub struct SizeError {
    /// The container that asked last.
    pub container: String,
    /// Its memory limit.
    pub limit_mib: u64,
    /// What the pod's containers need together, with the overhead.
    pub need_mib: u64,
    /// The guest's own overhead.
    pub overhead_mib: u64,
    /// The most the VM can have.
    pub max_mib: u64,
}

impl Plan {
    /// The plan of the pod whose first container's spec is `spec` (the
    /// sandbox's, under CRI), for a node of `host_mib` MiB of memory.
    pub fn new(config: &Config, spec: &Spec, host_mib: u64) -> Plan {
        let pod = Ask::of_sandbox(spec).unwrap_or_else(|| Ask::of_spec(spec));
        let max_vcpus = config.max_vcpus.clamp(1, 254);
        let hint_vcpus = annotation(spec, VCPUS_HINT).unwrap_or(0).max(0) as u64;
        // The pod's own CPUs come online after the boot (see `target`):
        // every vCPU a guest boots with costs its boot time.
        let vcpus = u64::from(config.default_vcpus)
            .max(hint_vcpus)
            .clamp(1, u64::from(max_vcpus)) as u32;
        let overhead_mib = config.default_memory_mib;
        let need = overhead_mib.saturating_add(pod.memory_mib);
        // The most the VM may have: the configuration's bound, within the
        // node's memory (husk refuses a region beyond it).
        let max_mib = if config.max_memory_mib == 0 {
            need
        } else {
            config.max_memory_mib.min(host_mib).max(need)
        };
        let hint_mib = annotation(spec, MEMORY_HINT).unwrap_or(0).max(0) as u64;
        let hinted = hint_mib.min(max_mib);
        // The pod's own memory is plugged right after the boot, where the
        // region can hold it (whole slots only, as husk's API asks); a
        // guest boots the faster for less memory to set up.
        let small = overhead_mib.max(hinted);
        let growing = config.max_memory_mib != 0;
        let boot_mib =
            if growing && (max_mib - small) / SLOT_MIB * SLOT_MIB >= need.saturating_sub(small) {
                small
            } else {
                need.max(hinted)
            };
        let hotplug_mib = (max_mib - boot_mib) / SLOT_MIB * SLOT_MIB;
        Plan {
            overhead_mib,
            pod,
            boot_vcpus: vcpus,
            max_vcpus,
            boot_mib,
            hotplug_mib,
        }
    }

    /// What the VM should have for the containers' `asks`; `last` is the
    /// container that asked last, named if it does not fit.
    pub fn target(&self, asks: &BTreeMap<String, Ask>, last: &str) -> Result<Target, SizeError> {
        let memory: u64 = asks.values().map(|a| a.memory_mib).sum();
        let milli: u64 = asks.values().map(|a| a.milli_cpus).sum();
        let need_mib = self
            .overhead_mib
            .saturating_add(memory.max(self.pod.memory_mib));
        let plugged = need_mib
            .saturating_sub(self.boot_mib)
            .div_ceil(BLOCK_MIB)
            .saturating_mul(BLOCK_MIB);
        if plugged > self.hotplug_mib {
            return Err(SizeError {
                container: last.to_string(),
                limit_mib: asks.get(last).map_or(0, |a| a.memory_mib),
                need_mib,
                overhead_mib: self.overhead_mib,
                max_mib: self.boot_mib + self.hotplug_mib,
            });
        }
        // A CPU limit above the VM's vCPUs is capped, as a limit above the
        // node's CPUs is under runc: the container runs, on fewer CPUs.
        let vcpus = cpus(milli.max(self.pod.milli_cpus))
            .max(u64::from(self.boot_vcpus))
            .min(u64::from(self.max_vcpus)) as u32;
        Ok(Target {
            vcpus,
            plugged_mib: plugged,
        })
    }
}

/// The node's memory in MiB (/proc/meminfo's MemTotal), or `u64::MAX` if
/// it cannot be read (husk then checks it itself).
pub fn host_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(u64::MAX, |kib| kib >> 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> Spec {
        let mut base = serde_json::json!({"ociVersion": "1.0.2", "root": {"path": "rootfs"}});
        if let (Some(b), Some(extra)) = (base.as_object_mut(), json.as_object()) {
            b.extend(extra.clone());
        }
        serde_json::from_value(base).unwrap()
    }

    fn limited(mem_bytes: i64, quota: i64) -> Spec {
        spec(serde_json::json!({"linux": {"resources": {
            "memory": {"limit": mem_bytes},
            "cpu": {"quota": quota, "period": 100000, "shares": 2}
        }}}))
    }

    fn config() -> Config {
        Config {
            default_vcpus: 1,
            default_memory_mib: 128,
            max_vcpus: 4,
            max_memory_mib: 4096,
            ..Config::default()
        }
    }

    #[test]
    fn a_pod_without_limits_boots_with_the_defaults_and_can_grow() {
        let p = Plan::new(&config(), &spec(serde_json::json!({})), 64 << 10);
        assert_eq!((p.boot_vcpus, p.max_vcpus, p.boot_mib), (1, 4, 128));
        assert_eq!(p.hotplug_mib, 3968 / 128 * 128);
        let t = p.target(&BTreeMap::new(), "x").unwrap();
        assert_eq!(
            t,
            Target {
                vcpus: 1,
                plugged_mib: 0
            }
        );
    }

    #[test]
    fn containerd_1_7_sandbox_annotations_size_the_boot() {
        let s = spec(serde_json::json!({"annotations": {
            SANDBOX_CPU_PERIOD: "100000", SANDBOX_CPU_QUOTA: "150000",
            SANDBOX_CPU_SHARES: "1536", SANDBOX_MEMORY: "1073741824"
        }}));
        let p = Plan::new(&config(), &s, 64 << 10);
        // It boots small, and its own size comes right after.
        assert_eq!((p.boot_vcpus, p.boot_mib), (1, 128));
        assert_eq!(
            p.target(&BTreeMap::new(), "").unwrap(),
            Target {
                vcpus: 2,
                plugged_mib: 1024
            }
        );
        // Containers within the pod's limits need no more.
        let asks = BTreeMap::from([
            ("a".to_string(), Ask::of_spec(&limited(512 << 20, 100000))),
            ("b".to_string(), Ask::of_spec(&limited(512 << 20, 50000))),
        ]);
        assert_eq!(
            p.target(&asks, "b").unwrap(),
            Target {
                vcpus: 2,
                plugged_mib: 1024
            }
        );
        // No limits (0, -1) and only requests: shares stand for the CPUs.
        let s = spec(serde_json::json!({"annotations": {
            SANDBOX_CPU_PERIOD: "100000", SANDBOX_CPU_QUOTA: "-1",
            SANDBOX_CPU_SHARES: "3072", SANDBOX_MEMORY: "0"
        }}));
        let p = Plan::new(&config(), &s, 64 << 10);
        assert_eq!(p.target(&BTreeMap::new(), "").unwrap().vcpus, 3);
    }

    #[test]
    fn containers_past_the_boot_size_grow_the_vm_and_shrink_it_when_gone() {
        let p = Plan::new(&config(), &spec(serde_json::json!({})), 64 << 10);
        let mut asks = BTreeMap::from([("pause".to_string(), Ask::default())]);
        asks.insert("app".into(), Ask::of_spec(&limited(1 << 30, 200000)));
        assert_eq!(
            p.target(&asks, "app").unwrap(),
            Target {
                vcpus: 2,
                plugged_mib: 1024
            }
        );
        // An odd limit is plugged in whole blocks.
        asks.insert("side".into(), Ask::of_spec(&limited((3 << 20) + 1, 0)));
        assert_eq!(p.target(&asks, "side").unwrap().plugged_mib, 1024 + 4);
        asks.remove("app");
        asks.remove("side");
        assert_eq!(
            p.target(&asks, "app").unwrap(),
            Target {
                vcpus: 1,
                plugged_mib: 0
            }
        );
    }

    #[test]
    fn what_does_not_fit_is_refused_naming_the_limit_and_cpus_are_capped() {
        let p = Plan::new(&config(), &spec(serde_json::json!({})), 64 << 10);
        let asks = BTreeMap::from([("big".to_string(), Ask::of_spec(&limited(8 << 30, 1600000)))]);
        let e = p.target(&asks, "big").unwrap_err();
        assert_eq!((e.limit_mib, e.need_mib, e.max_mib), (8192, 8320, 4096));
        assert!(
            e.to_string()
                .starts_with("container big's memory limit of 8192 MiB"),
            "{e}"
        );
        let asks = BTreeMap::from([("cpu".to_string(), Ask::of_spec(&limited(0, 1600000)))]);
        assert_eq!(p.target(&asks, "cpu").unwrap().vcpus, 4);
    }

    #[test]
    fn the_node_bounds_the_region_and_hints_only_raise_the_boot() {
        // A node of 2 GiB: the region ends at the node's memory.
        let p = Plan::new(&config(), &spec(serde_json::json!({})), 2048);
        assert_eq!(p.hotplug_mib, (2048 - 128) / 128 * 128);
        // Hints raise, within the maximums, and never lower the pod's ask.
        let s = spec(
            serde_json::json!({"annotations": {VCPUS_HINT: "16", MEMORY_HINT: "64"},
            "linux": {"resources": {"memory": {"limit": 512 << 20}}}}),
        );
        let p = Plan::new(&config(), &s, 64 << 10);
        assert_eq!((p.boot_vcpus, p.boot_mib), (4, 128));
        assert_eq!(p.target(&BTreeMap::new(), "").unwrap().plugged_mib, 512);
        let s = spec(serde_json::json!({"annotations": {MEMORY_HINT: "100000"}}));
        assert_eq!(Plan::new(&config(), &s, 64 << 10).boot_mib, 4096);
        // Growing turned off: the region is empty, the boot size stays.
        let off = Config {
            max_memory_mib: 0,
            ..config()
        };
        let p = Plan::new(&off, &spec(serde_json::json!({})), 64 << 10);
        assert_eq!((p.boot_mib, p.hotplug_mib), (128, 0));
        // Then the pod's memory is all in its boot.
        let s = spec(serde_json::json!({"linux": {"resources": {"memory": {"limit": 512 << 20}}}}));
        let p = Plan::new(&off, &s, 64 << 10);
        assert_eq!((p.boot_mib, p.hotplug_mib), (640, 0));
        assert_eq!(p.target(&BTreeMap::new(), "").unwrap().plugged_mib, 0);
    }

    #[test]
    fn the_node_memory_is_read() {
        let mib = host_memory_mib();
        assert!(mib > 64 && mib < u64::MAX, "{mib}");
    }
}
