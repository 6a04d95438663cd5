//! virtio-vsock against the guest kernel's own virtio_vsock driver, in the
//! node VM. Both ends are husk-bench (`vsock-serve`, `vsock-client`): in the
//! guest over AF_VSOCK, on the node over husk's unix sockets. Every stream
//! carries a pseudo-random byte stream whose checksum both ends compare.

use husk_tests::{artifacts, husk_bench_binary, initrd_with_files, Payload, RunResult};

const CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off quiet";
const UDS: &str = "/tmp/husk-v.sock";

/// Boots a guest running `guest_script` with a vsock device (cid 3) at
/// [`UDS`]; `node_script` runs on the node with `$husk` set to the VMM's
/// pid while it boots in the background, then the VMM is waited for.
fn run(name: &str, guest_script: &str, node_before: &str, node_script: &str) -> RunResult {
    let bench = husk_bench_binary();
    let initrd = initrd_with_files(name, guest_script, &[(&bench, "/bin/husk-bench")]);
    let a = artifacts();
    Payload::new(name)
        .add(&a.husk, "husk")
        .add(&a.vmlinux, "vmlinux")
        .add(&initrd, "initrd.cpio")
        .add(&bench, "husk-bench")
        .run(&format!(
            "{node_before}
             timeout 400 ./husk boot --log-level debug --kernel vmlinux --initrd initrd.cpio \
               --mem-mib 256 --cmdline '{CMDLINE}' --vsock cid=3,uds={UDS} > console.txt 2>&1 &
             husk=$!
             {node_script}
             wait $husk; echo \"HUSK-STATUS $?\"
             cat console.txt
             if [ -e {UDS} ]; then echo 'SOCKET left'; else echo 'SOCKET removed'; fi"
        ))
}

fn json(r: &RunResult, key: &str) -> serde_json::Value {
    let line = r
        .value(key)
        .unwrap_or_else(|| panic!("no {key} line:\n{}", r.output));
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{key}: {e}: {line}\n{}", r.output))
}

fn assert_clean_exit(r: &RunResult) {
    r.assert_status(0);
    assert_eq!(r.value("HUSK-STATUS").as_deref(), Some("0"), "{}", r.output);
    assert_eq!(
        r.value("SOCKET").as_deref(),
        Some("removed"),
        "{}",
        r.output
    );
}

#[test]
fn host_to_guest_echo_and_closed_guest_port() {
    let client = format!("timeout 150 ./husk-bench vsock-client --connect uds:{UDS}");
    let r = run(
        "vsock-h2g",
        "/bin/husk-bench vsock-serve --listen vsock:5000",
        "",
        &format!(
            "echo \"ECHO $({client}:5000 --mode echo --bytes 4194304 --retry-s 120)\"
             echo \"PROBE $({client}:7777 --mode probe)\"
             {client}:5000 --mode quit"
        ),
    );
    assert_clean_exit(&r);
    let echo = json(&r, "ECHO");
    assert_eq!(echo["checksums_equal"], true, "{}", r.output);
    assert_eq!(echo["bytes"], 4194304);
    let probe = json(&r, "PROBE");
    eprintln!("{} {probe}", json(&r, "ECHO"));
    assert_eq!(probe["connected"], false, "{}", r.output);
    assert!(probe["ms"].as_f64().unwrap() < 2000.0, "{probe}");
}

#[test]
fn guest_to_host_echo_and_closed_host_port() {
    let client = "timeout 150 /bin/husk-bench vsock-client --connect vsock:2";
    let r = run(
        "vsock-g2h",
        &format!(
            "echo \"ECHO $({client}:6000 --mode echo --streams 8 --bytes 8388608 --retry-s 60)\"
             echo \"PROBE $({client}:6001 --mode probe)\""
        ),
        &format!("./husk-bench vsock-serve --listen unix:{UDS}_6000 & server=$!"),
        "",
    );
    assert_clean_exit(&r);
    let echo = json(&r, "ECHO");
    assert_eq!(echo["checksums_equal"], true, "{}", r.output);
    assert_eq!(
        (echo["streams"].as_u64(), echo["bytes"].as_u64()),
        (Some(8), Some(8 << 20))
    );
    let probe = json(&r, "PROBE");
    eprintln!("{} {probe}", json(&r, "ECHO"));
    assert_eq!(probe["connected"], false, "{}", r.output);
    let err = probe["error"].as_str().unwrap_or_default();
    assert!(err.contains("reset") || err.contains("refused"), "{probe}");
    assert!(probe["ms"].as_f64().unwrap() < 2000.0, "{probe}");
}

#[test]
fn thirty_two_streams_carry_100_mib_intact_and_leak_no_fds() {
    let client = format!("timeout 500 ./husk-bench vsock-client --connect uds:{UDS}");
    let r = run(
        "vsock-32",
        "/bin/husk-bench vsock-serve --listen vsock:5000",
        "",
        &format!(
            "{client}:5000 --mode echo --bytes 4096 --retry-s 120 >/dev/null
             sleep 1; echo \"FDS-BEFORE $(ls /proc/$husk/fd | wc -l)\"
             echo \"STREAMS $({client}:5000 --mode echo --streams 32 --bytes 104857600)\"
             sleep 2; echo \"FDS-AFTER $(ls /proc/$husk/fd | wc -l)\"
             {client}:5000 --mode quit"
        ),
    );
    assert_clean_exit(&r);
    let streams = json(&r, "STREAMS");
    eprintln!(
        "{streams} fds {:?} -> {:?}",
        r.value("FDS-BEFORE"),
        r.value("FDS-AFTER")
    );
    assert_eq!(streams["checksums_equal"], true, "{}", r.output);
    assert_eq!(streams["streams"], 32);
    assert_eq!(streams["bytes"], 104857600);
    assert_eq!(r.value("FDS-BEFORE"), r.value("FDS-AFTER"), "{}", r.output);
}

#[test]
fn bad_vsock_specs_are_refused() {
    let k = artifacts().vmlinux.to_str().unwrap();
    let run = |spec: &str| husk_tests::husk_on_host(&["boot", "--kernel", k, "--vsock", spec]);
    run("cid=3")
        .assert_status(2)
        .assert_contains("vsock needs cid=CID and uds=PATH");
    run("cid=x,uds=/tmp/a")
        .assert_status(2)
        .assert_contains("vsock cid 'x' is not a number");
    run("cid=2,uds=/tmp/husk-bad-cid.sock")
        .assert_status(1)
        .assert_contains("invalid vsock guest cid 2");
    run(&format!("cid=3,uds=/tmp/{}", "x".repeat(100)))
        .assert_status(1)
        .assert_contains("invalid vsock socket path");
    run("cid=3,uds=/etc/passwd")
        .assert_status(1)
        .assert_contains("vsock socket path /etc/passwd exists and is not a socket");
}
