//! The seccomp filters on real VMs (inside the node VM): every thread of a
//! running husk is confined while its guest boots and the API answers, a
//! forbidden call on any kind of thread kills the whole process by SIGSYS
//! with a line naming the thread, and `--no-seccomp` leaves them bare and
//! says so. (The jailed boots in tests/jailer.rs run confined too.)

use husk_tests::{artifacts, host_tool, Payload, RunResult};

const CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off quiet";

/// 128 + SIGSYS: how a shell reports a process killed by SIGSYS.
const KILLED_BY_SIGSYS: &str = "159";

fn payload(name: &str) -> Payload {
    let a = artifacts();
    Payload::new(name)
        .add(&a.husk, "husk")
        .add(&a.vmlinux, "vmlinux")
        .add(&a.test_initrd, "initrd.cpio")
        .add(&host_tool("curl"), "curl")
        .write(
            "vm.json",
            format!(
                r#"{{"boot-source": {{"kernel_image_path": "vmlinux", "initrd_path": "initrd.cpio", "boot_args": "{CMDLINE} husk.hold=4"}},
                    "machine-config": {{"vcpu_count": 2, "mem_size_mib": 128}},
                    "vsock": {{"guest_cid": 3, "uds_path": "v.sock"}}}}"#
            )
            .as_bytes(),
        )
}

/// Starts husk with `flags` and the API, waits for the guest's user space,
/// prints `THREAD <name> <seccomp mode>` for each of its threads and the
/// answer to `GET /`, then waits for the guest to end.
fn threads_of_a_running_vm(name: &str, flags: &str) -> RunResult {
    payload(name).run(&format!(
        r#"./husk --api-sock api.sock --config-file vm.json {flags} > serial.txt 2> husk.log &
        pid=$!
        i=0
        until grep -q HUSK-GUEST-READY serial.txt 2>/dev/null; do
          i=$((i + 1)); [ $i -gt 2400 ] && {{ echo TIMEOUT; cat serial.txt husk.log; exit 20; }}
          sleep 0.1
        done
        for t in /proc/$pid/task/*; do
          echo "THREAD $(cat $t/comm) $(sed -n 's/^Seccomp:[[:space:]]*//p' $t/status)"
        done
        echo "API-INFO $(./curl -s --unix-socket api.sock http://localhost/)"
        wait $pid
        echo "HUSK-EXIT $?"
        echo "--- husk log"; cat husk.log"#
    ))
}

fn threads(r: &RunResult) -> Vec<(String, String)> {
    r.output
        .lines()
        .filter_map(|l| l.strip_prefix("THREAD "))
        .filter_map(|l| l.split_once(' '))
        .map(|(n, m)| (n.to_string(), m.trim().to_string()))
        .collect()
}

#[test]
fn every_thread_of_a_running_vm_is_confined() {
    let r = threads_of_a_running_vm("seccomp-on", "");
    assert_eq!(r.value("HUSK-EXIT").as_deref(), Some("0"), "{}", r.output);
    let threads = threads(&r);
    let names: Vec<&str> = threads.iter().map(|(n, _)| n.as_str()).collect();
    for want in ["husk", "husk-api", "husk-vcpu0", "husk-vcpu1"] {
        assert!(
            names.contains(&want),
            "no {want} thread: {names:?}\n{}",
            r.output
        );
    }
    for (name, mode) in &threads {
        // 2: SECCOMP_MODE_FILTER.
        assert_eq!(mode, "2", "thread {name} is not filtered\n{}", r.output);
    }
    // The confined API thread still answers, and the guest ran to its end.
    let info = r.value("API-INFO").unwrap_or_default();
    assert!(
        info.contains("\"id\":\"anonymous-instance\"") && info.contains("\"state\":\"Running\""),
        "GET / from the confined API thread: {info:?}\n{}",
        r.output
    );
    assert!(!r.output.contains("seccomp violation"), "{}", r.output);
}

#[test]
fn no_seccomp_leaves_every_thread_bare_and_warns() {
    let r = threads_of_a_running_vm("seccomp-off", "--no-seccomp");
    assert_eq!(r.value("HUSK-EXIT").as_deref(), Some("0"), "{}", r.output);
    let threads = threads(&r);
    assert!(threads.len() >= 3, "{}", r.output);
    for (name, mode) in &threads {
        assert_eq!(mode, "0", "thread {name} is filtered\n{}", r.output);
    }
    r.assert_contains("seccomp filters are off (--no-seccomp)");
}

#[test]
fn a_forbidden_call_on_any_thread_kills_husk_by_sigsys() {
    let r = payload("seccomp-probe").run(&format!(
        r#"for kind in vcpu vmm; do
          ./husk boot --kernel vmlinux --initrd initrd.cpio --vcpus 1 --mem-mib 128 \
            --cmdline '{CMDLINE}' --seccomp-selftest $kind > out-$kind.txt 2> err-$kind.txt
          echo "PROBE-$kind $? $(grep -c HUSK-GUEST-READY out-$kind.txt) $(grep 'seccomp violation' err-$kind.txt)"
        done
        ./husk --api-sock api.sock --seccomp-selftest api > out-api.txt 2> err-api.txt
        echo "PROBE-api $? $(grep -c HUSK-GUEST-READY out-api.txt) $(grep 'seccomp violation' err-api.txt)""#
    ));
    for (kind, thread) in [("vcpu", "husk-vcpu0"), ("vmm", "main"), ("api", "husk-api")] {
        let line = r
            .value(&format!("PROBE-{kind}"))
            .unwrap_or_else(|| panic!("no PROBE-{kind} line:\n{}", r.output));
        let mut fields = line.splitn(3, ' ');
        assert_eq!(
            fields.next(),
            Some(KILLED_BY_SIGSYS),
            "{kind}: {line}\n{}",
            r.output
        );
        // The guest never ran (vCPUs wait for every filter; the API thread
        // dies before serving); so nothing reached user space.
        assert_eq!(fields.next(), Some("0"), "{kind}: {line}");
        let said = fields.next().unwrap_or_default();
        assert!(
            said.contains(&format!("thread={thread} policy={kind} syscall=110;")),
            "{kind}: {said:?}\n{}",
            r.output
        );
    }
}
