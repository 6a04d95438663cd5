//! `husk check` where pods cannot run and where they can. On this host (a
//! kvm_pvm /dev/kvm) it must say that the host's KVM cannot run a Linux
//! guest and that the node VM is needed, and exit 1; on a host with
//! hardware KVM the KVM line passes instead. In the node VM, with
//! containerd started and configured as resources/containerd/start-in-node.sh
//! --cri does (a CRI handler for io.containerd.husk.v2, /etc/husk/config.toml
//! naming the payload's husk, kernel and agent), every check passes, it
//! exits 0, and a pod then does run; a kernel path that does not exist, a
//! containerd config without the runtime and a missing /dev/kvm each fail,
//! exit 1 and say what to do. One node VM boot for all of it.

use husk_tests::{containerd, hardware_kvm, husk_on_host};

fn json_of(output: &str) -> serde_json::Value {
    let start = output.find('{').expect("a JSON document");
    let end = output.rfind('}').expect("a JSON document");
    serde_json::from_str(&output[start..=end]).expect("husk check --json prints JSON")
}

fn status_of<'a>(report: &'a serde_json::Value, name: &str) -> &'a str {
    report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["name"] == name)
        .and_then(|c| c["status"].as_str())
        .unwrap_or_else(|| panic!("no {name} check in {report:#}"))
}

#[test]
fn on_this_host_the_kvm_check_tells_whether_linux_guests_run() {
    let r = husk_on_host(&["check"]);
    let kvm = r
        .output
        .lines()
        .find(|l| l.contains(" kvm: "))
        .unwrap_or_else(|| panic!("no kvm line:\n{}", r.output));
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert!(kvm.starts_with("FAIL"), "{kvm}");
        assert!(
            kvm.contains("kvm_pvm") && kvm.contains("cannot run a Linux guest's user space"),
            "{kvm}"
        );
        // The probe gets as far as kvm_pvm goes: user space, not its syscall.
        assert!(kvm.contains("its first syscall failed"), "{kvm}");
        assert!(
            kvm.contains("node VM") && kvm.contains("resources/node/run.sh"),
            "{kvm}"
        );
        r.assert_status(1)
            .assert_contains("a pod would not run on this host");
    } else if hardware_kvm() {
        assert!(kvm.starts_with("OK"), "{kvm}");
    }
    let j = husk_on_host(&["check", "--json"]);
    let report = json_of(&j.output);
    assert_eq!(
        report["pod_would_run"].as_bool(),
        Some(j.status == 0),
        "{}",
        j.output
    );
    let expected = if hardware_kvm() { "ok" } else { "fail" };
    assert_eq!(status_of(&report, "kvm"), expected, "{report:#}");
    assert!(
        report["checks"].as_array().unwrap().len() >= 10,
        "{report:#}"
    );
}

/// The FAIL lines of one run, each prefixed in the script with `tag `.
fn failures<'a>(output: &'a str, tag: &str) -> Vec<&'a str> {
    let prefix = format!("{tag} FAIL  ");
    output
        .lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .collect()
}

#[test]
fn in_the_node_vm_a_configured_node_passes_and_each_missing_piece_fails() {
    let r = containerd::cri_payload("check")
        // Moving /dev/kvm away is for a throwaway node only, never a host.
        .in_the_node_vm()
        .run(&containerd::script(
            "--cri",
            r#"husk check; echo "CHECK-EXIT $?"
echo "CHECK-JSON $(husk check --json | tr -d '\n')"
# What husk check promised: a pod runs.
ctr run --rm --runtime io.containerd.husk.v2 busybox:latest checked sh -c 'echo pod-ran-in-$(uname -r)'
echo "POD-EXIT $?"
# The same configuration with a kernel that is not there.
sed 's|^kernel = .*|kernel = "/nonexistent/vmlinux"|' /etc/husk/config.toml > bad-kernel.toml
husk check --config bad-kernel.toml | sed 's/^/KERNEL /'; echo "KERNEL-EXIT $(husk check --config bad-kernel.toml > /dev/null; echo $?)"
# A virtiofsd that is not there.
sed 's|^virtiofsd = .*|virtiofsd = "/nonexistent/virtiofsd"|' /etc/husk/config.toml > bad-fs.toml
husk check --config bad-fs.toml | sed 's/^/FS /'; echo "FS-EXIT $(husk check --config bad-fs.toml > /dev/null; echo $?)"
# Shared memory without huge pages, the share not relayed: a warning, a
# pod would still run. Relayed (the default), guest memory is private.
thp=/sys/kernel/mm/transparent_hugepage/shmem_enabled
echo never > $thp
cp /etc/husk/config.toml no-relay.toml && echo 'share_relay = false' >> no-relay.toml
husk check --config no-relay.toml | sed 's/^/THP /'; echo "THP-EXIT $(husk check --config no-relay.toml > /dev/null; echo $?)"
husk check | grep shared-memory | sed 's/^/RELAY /'
echo advise > $thp
# containerd's own defaults: no CRI handler runs husk.
printf 'version = 2\n' > plain.toml
husk check --containerd-config plain.toml | sed 's/^/RUNTIME /'; echo "RUNTIME-EXIT $(husk check --containerd-config plain.toml > /dev/null; echo $?)"
# No /dev/kvm at all.
mv /dev/kvm /dev/kvm.away
husk check | sed 's/^/NOKVM /'; echo "NOKVM-EXIT $(husk check > /dev/null; echo $?)"
mv /dev/kvm.away /dev/kvm
"#,
        ));
    r.assert_status(0);
    assert_eq!(r.value("CHECK-EXIT").as_deref(), Some("0"), "{}", r.output);
    r.assert_contains("husk check: a pod would run on this host");
    let report = json_of(&r.value("CHECK-JSON").expect("CHECK-JSON"));
    assert_eq!(report["pod_would_run"], true, "{report:#}");
    for check in report["checks"].as_array().expect("checks") {
        assert_ne!(check["status"], "fail", "{report:#}");
    }
    for name in [
        "kvm",
        "capabilities",
        "tun",
        "config",
        "husk",
        "kernel",
        "initrd",
        "virtiofsd",
        "shared-memory",
        "tools",
        "shim",
        "containerd",
        "containerd-runtime",
    ] {
        assert_eq!(status_of(&report, name), "ok", "{name}: {report:#}");
    }
    let kvm = r
        .output
        .lines()
        .find(|l| l.starts_with("OK    kvm:"))
        .unwrap_or_else(|| panic!("no passing kvm line:\n{}", r.output));
    assert!(kvm.contains("user space and a syscall"), "{kvm}");
    let runtime = r
        .output
        .lines()
        .find(|l| l.starts_with("OK    containerd-runtime:"))
        .unwrap_or_else(|| panic!("no passing containerd-runtime line:\n{}", r.output));
    assert!(runtime.contains("handler husk "), "{runtime}");
    assert_eq!(r.value("POD-EXIT").as_deref(), Some("0"), "{}", r.output);
    r.assert_contains("pod-ran-in-");

    // Shared memory without huge pages is a warning, not a failure.
    assert_eq!(r.value("THP-EXIT").as_deref(), Some("0"), "{}", r.output);
    r.assert_contains("THP WARN  shared-memory: shared memory gets no huge pages");
    r.assert_contains("RELAY OK    shared-memory: pods' guest memory is private");
    assert!(failures(&r.output, "THP").is_empty(), "{}", r.output);

    // Each broken piece fails alone, exits 1, names what it found and what
    // to do (after " -- ").
    for (tag, name, found) in [
        ("KERNEL", "kernel", "/nonexistent/vmlinux"),
        ("FS", "virtiofsd", "/nonexistent/virtiofsd"),
        ("RUNTIME", "containerd-runtime", "no CRI runtime handler"),
        ("NOKVM", "kvm", "/dev/kvm does not exist"),
    ] {
        assert_eq!(
            r.value(&format!("{tag}-EXIT")).as_deref(),
            Some("1"),
            "{tag}:\n{}",
            r.output
        );
        let failed = failures(&r.output, tag);
        assert_eq!(failed.len(), 1, "{tag}: {failed:#?}\n{}", r.output);
        let line = failed[0];
        assert!(line.starts_with(&format!("{name}: ")), "{tag}: {line}");
        assert!(line.contains(found), "{tag}: {line}");
        assert!(line.contains(" -- "), "{tag}: no fix in {line}");
        r.assert_contains(&format!(
            "{tag} husk check: a pod would not run on this host"
        ));
    }
}
