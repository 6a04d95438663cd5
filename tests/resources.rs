//! A pod's CPU and memory limits as Kubernetes promises them, through
//! containerd's CRI plugin (`husk-cri resources`, tests/cri/resources.rs),
//! with the husk handler and, as the honest twin, runc: a container
//! touches 900 MiB under a 1 GiB limit and is OOM-killed past it; a 2-CPU
//! container sees 2 CPUs; UpdateContainerResources raises a limit (and
//! the VM grows to it) and lowers it again (and the VM gives the memory
//! back); the pod's cgroup on the node is charged what the pod holds,
//! and under husk holds the husk process.

use husk_tests::containerd;

/// The number on `husk-cri resources`' line `CRI-R <name> <key> N`.
fn number(r: &husk_tests::RunResult, name: &str, key: &str) -> u64 {
    let prefix = format!("CRI-R {name} {key} ");
    r.output
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str())?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {prefix:?} line\n{}", r.output))
}

fn resources(handler: &str) -> husk_tests::RunResult {
    let r = containerd::cri_payload(&format!("resources-{handler}")).run(&containerd::script(
        "--cri",
        &format!(
            r#"husk-cri resources --handler {handler} --image husk.local/busybox:1 --log-dir /tmp/cri-logs
echo "CRI-RESOURCES-EXIT $?"
echo "HUSK-LEFT $(husk_count)"
"#
        ),
    ));
    let lines = |name: &str| -> Vec<String> {
        let prefix = format!("CRI-R {name} ");
        r.output
            .lines()
            .filter_map(|l| l.strip_prefix(prefix.as_str()))
            .map(str::to_string)
            .collect()
    };
    let has = |name: &str, line: &str| {
        assert!(
            lines(name).iter().any(|l| l == line),
            "{name}: no {line:?} in {:?}\n{}",
            lines(name),
            r.output
        );
    };
    assert_eq!(
        r.value("CRI-RESOURCES-EXIT").as_deref(),
        Some("0"),
        "{}",
        r.output
    );
    for name in ["sized", "fit", "over", "held", "grow", "vm"] {
        assert!(
            !lines(name).iter().any(|l| l.starts_with("failed")),
            "{name} failed:\n{}",
            r.output
        );
    }
    // 900 MiB under a 1 GiB limit: no OOM; 1200 MiB: the kernel's OOM
    // killer, reported as such.
    has("fit", "exit 0");
    has("over", "exit 137");
    has("over", "reason OOMKilled");
    // Two CPUs (the node VM has two), and at least the pod's memory.
    has("held", "stdout nproc 2");
    has("sized", "nproc 2");
    let memtotal = number(&r, "sized", "memtotal-mib");
    assert!(
        memtotal >= 1024,
        "the sized pod's container sees {memtotal} MiB:\n{}",
        r.output
    );
    let charged = number(&r, "held", "pod-cgroup-mib");
    assert!(
        charged >= 200,
        "the pod's cgroup is charged {charged} MiB while it holds 200:\n{}",
        r.output
    );
    // Raised, the limit holds 900 MiB; lowered again, it does not.
    has("grow", "raised-exec 0");
    has("grow", "lowered-exec 137");
    has("pod", "cgroup-left false");
    r
}

#[test]
fn a_husk_pod_gets_the_cpu_and_memory_its_limits_promise() {
    let r = resources("husk");
    let vm = |key: &str| number(&r, "vm", key);
    // The VM grew for the raised limit and gave the memory back once it
    // was lowered (a 256 MiB limit fits in what it booted with, or in a
    // little plugged memory).
    assert!(vm("plugged-raised") >= 768, "{}", r.output);
    assert!(vm("plugged-lowered") <= 256, "{}", r.output);
    r.assert_contains("CRI-R held husk-in-pod-cgroup true");
    // The kubelet's pod resources (1 GiB, 2 CPUs): the VM boots small
    // (the guest's own 128 MiB, the tests' default_memory_mib) and gets
    // the pod's size right after.
    r.assert_contains("CRI-R sized boot vcpus 1 mem 128")
        .assert_contains("CRI-R sized requested-mib 1024");
    assert_eq!(r.value("HUSK-LEFT").as_deref(), Some("0"), "{}", r.output);
}

#[test]
fn the_same_limits_hold_under_runc() {
    resources("runc");
}
