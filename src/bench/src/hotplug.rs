//! `husk-bench hotplug`: how long a running guest takes to get memory
//! from its virtio-mem region and to give it back, from the API request
//! (`PATCH /hotplug/memory`) to `GET /hotplug/memory` reporting it plugged
//! (or unplugged) by the guest's driver, which onlines each block as it
//! adds it (husk boots guests with `memhp_default_state=online_movable`),
//! so plugged memory is usable memory. One guest (1 vCPU, 128 MiB, a
//! region of the largest size asked for) plugs and unplugs each size
//! `--runs` times.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::api::Vmm;
use crate::stats;

/// Flags of `husk-bench hotplug`.
#[derive(clap::Args)]
pub struct HotplugBench {
    /// The husk binary.
    #[arg(long, default_value = "husk")]
    husk: PathBuf,
    /// Guest kernel.
    #[arg(long)]
    kernel: PathBuf,
    /// Guest initramfs (the test init: it prints HUSK-GUEST-READY and
    /// holds with husk.hold on the command line).
    #[arg(long)]
    initrd: PathBuf,
    /// Sizes to plug, in MiB (multiples of 128).
    #[arg(long, value_delimiter = ',', default_value = "256,1024")]
    sizes_mib: Vec<u64>,
    /// Plug and unplug rounds per size.
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

/// How long the guest may take for one resize.
const LIMIT: Duration = Duration::from_secs(60);

fn plugged(vmm: &mut Vmm) -> anyhow::Result<u64> {
    let (status, body) = vmm.call("GET", "/hotplug/memory", None)?;
    if status != 200 {
        bail!(
            "GET /hotplug/memory: {status} {}",
            String::from_utf8_lossy(&body)
        );
    }
    let v: Value = serde_json::from_slice(&body)?;
    v["plugged_size_mib"]
        .as_u64()
        .context("GET /hotplug/memory without plugged_size_mib")
}

/// Asks for `mib` and waits until the guest has it; milliseconds.
fn resize(vmm: &mut Vmm, mib: u64) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    vmm.expect(
        "PATCH",
        "/hotplug/memory",
        json!({ "requested_size_mib": mib }),
        204,
    )?;
    loop {
        if plugged(vmm)? == mib {
            return Ok(t0.elapsed().as_secs_f64() * 1000.0);
        }
        if t0.elapsed() > LIMIT {
            bail!("the guest did not reach {mib} MiB plugged within {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

pub fn run(b: HotplugBench) -> anyhow::Result<Value> {
    let region = b.sizes_mib.iter().copied().max().unwrap_or(1024);
    let mut vmm = Vmm::spawn_with_console(&b.husk, &[], "hotplug", true)?;
    vmm.test_guest(&b.kernel, &b.initrd, 600)?;
    vmm.expect(
        "PUT",
        "/hotplug/memory",
        json!({ "total_size_mib": region }),
        204,
    )?;
    vmm.start()?;
    let console = vmm.dir.join("console.txt");
    let t0 = Instant::now();
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("HUSK-GUEST-READY")
    {
        if t0.elapsed() > LIMIT {
            bail!("the guest did not boot within {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut results = Vec::new();
    for &mib in &b.sizes_mib {
        let (mut plug, mut unplug) = (Vec::new(), Vec::new());
        for _ in 0..b.runs {
            plug.push(resize(&mut vmm, mib)?);
            unplug.push(resize(&mut vmm, 0)?);
        }
        results.push(json!({
            "size_mib": mib,
            "plug_ms": stats::summary(&plug),
            "unplug_ms": stats::summary(&unplug),
        }));
    }
    Ok(json!({
        "benchmark": "memory-hotplug",
        "guest": {"vcpus": 1, "mem_mib": 128, "region_mib": region, "block_mib": 2},
        "runs": b.runs,
        "results": results,
    }))
}
