//! Boot tests: a real guest kernel with an initramfs whose /init reports what
//! the guest sees (`HUSK-GUEST-*` lines) from user space and reboots. They run
//! inside the node VM on hosts without hardware KVM (see support/lib.rs).
//!
//! The bad-input tests run `husk` on this host directly: they fail before any
//! guest instruction runs, which any /dev/kvm can show.

use husk_tests::{artifacts, husk_on_host, tiny_elf, Payload, RunResult};

const CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off quiet";

/// A guest boot takes seconds; a stuck one fails after this long, with the
/// VMM's debug log in the output to show how far it got.
const BOOT_TIMEOUT_S: u32 = 240;

fn boot(name: &str, flags: &str) -> RunResult {
    Payload::new(name).with_guest().run(&format!(
        "timeout {BOOT_TIMEOUT_S} ./husk boot --log-level debug --initrd initrd.cpio {flags}"
    ))
}

fn mem_total_kib(r: &RunResult) -> u64 {
    r.value("HUSK-GUEST-MEMTOTAL-KB")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal line:\n{}", r.output))
}

#[test]
fn vmlinux_one_vcpu_reaches_user_space_with_its_cmdline() {
    let r = boot(
        "one-vcpu",
        &format!("--kernel vmlinux --vcpus 1 --mem-mib 128 --cmdline '{CMDLINE} husk.test=hello-cmdline'"),
    );
    r.assert_status(0).assert_contains("HUSK-GUEST-READY");
    assert_eq!(
        r.value("HUSK-GUEST-CPUS").as_deref(),
        Some("1"),
        "{}",
        r.output
    );
    let cmdline = r.value("HUSK-GUEST-CMDLINE").unwrap_or_default();
    assert_eq!(cmdline, format!("{CMDLINE} husk.test=hello-cmdline"));
    let kib = mem_total_kib(&r);
    // MemTotal is RAM minus what the kernel reserves for itself.
    assert!((100 << 10..=128 << 10).contains(&kib), "MemTotal {kib} kB");
}

#[test]
fn two_vcpus_are_both_online() {
    let r = boot(
        "two-vcpus",
        &format!("--kernel vmlinux --vcpus 2 --cmdline '{CMDLINE}'"),
    );
    r.assert_status(0);
    assert_eq!(
        r.value("HUSK-GUEST-CPUS").as_deref(),
        Some("2"),
        "{}",
        r.output
    );
}

#[test]
fn three_gib_guest_uses_memory_above_the_mmio_gap() {
    let r = boot(
        "3gib",
        &format!("--kernel vmlinux --mem-mib 3072 --cmdline '{CMDLINE}'"),
    );
    r.assert_status(0);
    let kib = mem_total_kib(&r);
    // Below the gap there are only 2 GiB; more than that proves the region
    // at 4 GiB is in use.
    assert!(kib > (2 << 20) + (512 << 10), "MemTotal {kib} kB");
    assert!(kib <= 3 << 20, "MemTotal {kib} kB");
}

#[test]
fn bzimage_boots_too() {
    let r = boot(
        "bzimage",
        &format!("--kernel bzImage --mem-mib 256 --cmdline '{CMDLINE} husk.test=bz'"),
    );
    r.assert_status(0).assert_contains("HUSK-GUEST-READY");
    assert!(r
        .value("HUSK-GUEST-CMDLINE")
        .unwrap_or_default()
        .ends_with("husk.test=bz"));
}

#[test]
fn serial_to_file_captures_the_console() {
    let r = boot(
        "serial-file",
        &format!("--kernel vmlinux --serial file:console.log --cmdline '{CMDLINE}' && echo CONSOLE-BEGIN && cat console.log"),
    );
    r.assert_status(0);
    let after = r.output.split("CONSOLE-BEGIN").nth(1).unwrap_or_default();
    assert!(after.contains("HUSK-GUEST-READY"), "{}", r.output);
}

#[test]
fn triple_fault_ends_with_status_3_and_a_clear_message() {
    // ud2 with an empty IDT: #UD -> #GP -> #DF -> triple fault.
    let r = Payload::new("triple-fault")
        .add(&artifacts().husk, "husk")
        .write("crash.elf", &tiny_elf(&[0x0f, 0x0b]))
        .run("./husk boot --kernel crash.elf --serial none");
    r.assert_status(3).assert_contains("triple-faulted");
    assert!(!r.output.contains("panicked"), "{}", r.output);
}

// --- bad input: a clear error, status 1, no panic --------------------------

fn refused(args: &[&str], message: &str) {
    let r = husk_on_host(args);
    r.assert_status(1).assert_contains(message);
    assert!(!r.output.contains("panicked"), "{}", r.output);
}

fn vmlinux() -> &'static str {
    artifacts().vmlinux.to_str().expect("utf-8 path")
}

#[test]
fn missing_kernel_is_refused() {
    refused(
        &["boot", "--kernel", "/nonexistent/vmlinux"],
        "cannot read kernel /nonexistent/vmlinux: No such file",
    );
}

#[test]
fn garbage_kernel_is_refused() {
    let dir = std::env::temp_dir().join(format!("husk-garbage-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("garbage");
    let bytes: Vec<u8> = (0..1_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&path, bytes).unwrap();
    refused(
        &["boot", "--kernel", path.to_str().unwrap()],
        "is neither an ELF vmlinux nor a bzImage",
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn initrd_that_does_not_fit_is_refused() {
    let dir = std::env::temp_dir().join(format!("husk-big-initrd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("big.cpio");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(200 << 20).unwrap(); // sparse: costs no disk
    refused(
        &[
            "boot",
            "--kernel",
            vmlinux(),
            "--initrd",
            path.to_str().unwrap(),
            "--mem-mib",
            "128",
        ],
        "does not fit in guest memory",
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn zero_vcpus_are_refused() {
    refused(
        &["boot", "--kernel", vmlinux(), "--vcpus", "0"],
        "at least 1 vCPU",
    );
}

#[test]
fn more_vcpus_than_kvm_allows_are_refused() {
    refused(
        &["boot", "--kernel", vmlinux(), "--vcpus", "100000"],
        "100000 vCPUs requested, but at most",
    );
}

#[test]
fn too_little_memory_is_refused() {
    refused(
        &["boot", "--kernel", vmlinux(), "--mem-mib", "8"],
        "is too small",
    );
}

#[test]
fn too_much_memory_is_refused() {
    refused(
        &["boot", "--kernel", vmlinux(), "--mem-mib", "1073741824"],
        "is too large",
    );
}

#[test]
fn global_flags_go_either_side_of_the_subcommand_api_flags_nowhere_near_it() {
    // Accepted before and after `boot` (the run then fails on the memory
    // size, before any VM exists).
    for args in [
        &[
            "--no-seccomp",
            "--log-level",
            "error",
            "boot",
            "--kernel",
            vmlinux(),
            "--mem-mib",
            "1073741824",
        ][..],
        &[
            "boot",
            "--no-seccomp",
            "--log-level",
            "error",
            "--kernel",
            vmlinux(),
            "--mem-mib",
            "1073741824",
        ][..],
    ] {
        husk_on_host(args)
            .assert_status(1)
            .assert_contains("is too large");
    }
    husk_on_host(&[
        "--api-sock",
        "/tmp/husk-never.sock",
        "boot",
        "--kernel",
        vmlinux(),
    ])
    .assert_status(2)
    .assert_contains("they take no subcommand");
}

#[test]
fn unknown_serial_target_is_a_usage_error() {
    let r = husk_on_host(&["boot", "--kernel", vmlinux(), "--serial", "tcp:1"]);
    r.assert_status(2)
        .assert_contains("is not stdout, none or file:PATH");
}

#[test]
fn bad_net_specs_are_refused() {
    refused(
        &[
            "boot",
            "--kernel",
            vmlinux(),
            "--net",
            "id=a,tap=t0",
            "--net",
            "id=a,tap=t1",
        ],
        "network interface id \"a\" is used twice",
    );
    for (spec, message) in [
        ("id=eth0", "a network interface needs id=ID and tap=TAP"),
        ("id=eth0,tap=t0,mac=02:00:00:00:00", "invalid MAC address"),
        ("id=eth0,tap=t0,mtu=9000", "unknown net option 'mtu=9000'"),
    ] {
        let r = husk_on_host(&["boot", "--kernel", vmlinux(), "--net", spec]);
        r.assert_status(2).assert_contains(message);
    }
}

#[test]
fn sigterm_stops_a_running_guest_cleanly() {
    let script = format!(
        "./husk boot --log-level info --kernel vmlinux --initrd initrd.cpio \
           --cmdline '{CMDLINE} husk.hold=120' > out.txt 2>&1 &
         pid=$!
         i=0
         until grep -q HUSK-GUEST-CMDLINE out.txt; do
           sleep 0.2; i=$((i + 1)); [ $i -lt 600 ] || break
         done
         kill -TERM $pid
         wait $pid
         echo \"husk-status=$?\"
         cat out.txt"
    );
    let r = Payload::new("sigterm").with_guest().run(&script);
    r.assert_status(0)
        .assert_contains("HUSK-GUEST-READY")
        .assert_contains("husk-status=143")
        .assert_contains("husk: stopped by SIGTERM")
        .assert_contains("vCPU stopped");
}
