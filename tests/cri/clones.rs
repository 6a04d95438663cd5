//! `husk-cri clones`: two pods started one after the other, each of which
//! must be its own machine. Under husk with `template = true` both are
//! restored from one template (the first pod of the shape makes it), so
//! this is where a clone that is still a copy shows: the same random
//! bytes, a clock stopped at the snapshot, the template's MAC (which the
//! pod network would not deliver to). Each check prints `CRI-C <check>
//! <value>`, the same for runc and husk.

use std::time::SystemTime;

use crate::volumes::exec;
use crate::{container_config, pod_config, Args, Client, Pod, Result};

/// What each pod reports about itself, right after its container starts.
const PROBE: &str = "echo \"RAND $(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n')\"; \
    echo \"MAC $(cat /sys/class/net/eth0/address)\"; echo \"CLOCK $(date +%s)\"; \
    echo \"HOST $(hostname)\"";

fn node_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The value after `key ` in the probe's output.
fn field(out: &str, key: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or("")
        .to_string()
}

pub async fn clones(c: &mut Client, args: &Args) -> Result<()> {
    let mut pods = Vec::new();
    let result = run(c, args, &mut pods).await;
    for pod in &pods {
        let removed = pod.remove(c).await;
        if result.is_ok() {
            removed?;
        }
    }
    result
}

async fn run(c: &mut Client, args: &Args, pods: &mut Vec<Pod>) -> Result<()> {
    let before = node_secs();
    let mut probes = Vec::new();
    let mut ips = Vec::new();
    for name in ["clone-a", "clone-b"] {
        let pod = Pod::run(c, pod_config(name, &args.log_dir), &args.handler).await?;
        pods.push(pod);
        let pod = pods.last().ok_or("no pod")?;
        let id = pod
            .create(c, container_config(name, &args.image, &["sleep", "300"]))
            .await?;
        let (code, out, err) = exec(c, &id, PROBE).await?;
        if code != 0 {
            return Err(format!("{name}: the probe failed ({code}): {err}"));
        }
        probes.push(out);
        ips.push((id, pod.ip(c).await?));
    }
    let after = node_secs();
    let (a, b) = (&probes[0], &probes[1]);
    let yes = |ok: bool| if ok { "yes" } else { "no" };
    let (ra, rb) = (field(a, "RAND"), field(b, "RAND"));
    println!("CRI-C rand-differs {}", yes(ra.len() == 64 && ra != rb));
    let (ma, mb) = (field(a, "MAC"), field(b, "MAC"));
    println!("CRI-C macs-differ {}", yes(!ma.is_empty() && ma != mb));
    let clock_ok = [a, b].iter().all(|p| {
        field(p, "CLOCK")
            .parse::<u64>()
            .is_ok_and(|t| (before..=after).contains(&t))
    });
    println!("CRI-C clocks-are-the-nodes {}", yes(clock_ok));
    println!("CRI-C hostnames {},{}", field(a, "HOST"), field(b, "HOST"));
    // The pod network delivers to each pod's own MAC only: a clone whose
    // NIC kept the template's would not answer.
    let (a_id, _) = &ips[0];
    let (_, b_ip) = &ips[1];
    let (code, _, _) = exec(c, a_id, &format!("ping -c 1 -W 5 {b_ip} > /dev/null")).await?;
    println!("CRI-C ping-peer exit-{code}");
    if ra == rb || !clock_ok {
        println!("CRI-C probes {a:?} {b:?} node {before}..{after}");
    }
    Ok(())
}
