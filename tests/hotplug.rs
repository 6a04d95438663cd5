//! Hot-pluggable memory and parked vCPUs in a real guest (inside the node
//! VM), in one boot: a 256 MiB, 1-vCPU guest with a 512 MiB virtio-mem
//! region and a second vCPU parked is booted through the API. Requests the
//! region cannot take (past its size, not a multiple of its block size)
//! get their 400 with a fault_message and change nothing; then 256 MiB are
//! plugged through `PATCH /hotplug/memory` and the guest's MemTotal grows
//! by that much while `GET /hotplug/memory` reports it plugged, and a
//! snapshot of the paused VM is refused (plugged memory is not saved)
//! without a file written; asked for 0 again, the guest unplugs it all.
//! The guest onlines its parked vCPU through sysfs.

use husk_tests::{artifacts, host_tool, initrd_with_script, Payload, RunResult};

const CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off quiet husk.hold=600";

/// The guest: reports its MemTotal and present CPUs, waits (without a
/// deadline of its own: the node's wait_for has one) until MemTotal has
/// grown by at least 200 MiB, reports it, brings cpu1 online, then waits
/// until MemTotal is back where it began. Each wait reports the value it
/// saw, not a second read: while virtio-mem offlines a memory block whose
/// sub-blocks it has already unplugged, the kernel adds the block back to
/// MemTotal for a moment so offlining can subtract it again (a CI run read
/// 128 MiB more than the value that ended the wait).
const GUEST: &str = r#"
kb() { awk '/^MemTotal:/ { print $2 }' /proc/meminfo; }
base=$(kb)
echo "HOTPLUG-PRESENT $(cat /sys/devices/system/cpu/present)"
echo "HOTPLUG-BASE-KB $base"
until k=$(kb); [ "$k" -ge $((base + 200 * 1024)) ]; do sleep 0.2; done
echo "HOTPLUG-GREW-KB $k"
echo 1 > /sys/devices/system/cpu/cpu1/online
echo "HOTPLUG-CPUS $(grep -c '^processor' /proc/cpuinfo)"
until k=$(kb); [ "$k" -le $((base + 1024)) ]; do sleep 0.2; done
echo "HOTPLUG-SHRANK-KB $k"
"#;

/// Node-side: `api TAG METHOD PATH [BODY]` prints `API-TAG <status>
/// <body>`; `wait_for PATTERN` polls the guest's console.
const PRELUDE: &str = r#"
api() {
  tag=$1; method=$2; path=$3
  if [ $# -ge 4 ]; then
    code=$(./curl -s -o resp.txt -w '%{http_code}' --unix-socket api.sock -X "$method" \
      -H 'Content-Type: application/json' -d "$4" "http://localhost$path")
  else
    code=$(./curl -s -o resp.txt -w '%{http_code}' --unix-socket api.sock -X "$method" "http://localhost$path")
  fi
  echo "API-$tag $code $(cat resp.txt)"
}
wait_for() {
  i=0
  until grep -q "$1" serial.txt 2>/dev/null; do
    i=$((i + 1))
    if [ $i -gt 2400 ]; then echo "TIMEOUT waiting for $1"; tail -n 20 serial.txt; return 1; fi
    sleep 0.1
  done
}
"#;

/// The first `API-<tag>` line: (status, body).
fn api(r: &RunResult, tag: &str) -> (u16, String) {
    let v = r
        .value(&format!("API-{tag}"))
        .unwrap_or_else(|| panic!("no API-{tag} line:\n{}", r.output));
    let (code, body) = v.split_once(' ').unwrap_or((&v, ""));
    (code.parse().expect("status"), body.to_string())
}

fn assert_api(r: &RunResult, tag: &str, status: u16, needle: &str) {
    let (code, body) = api(r, tag);
    assert_eq!(code, status, "API-{tag}: {body}\n{}", r.output);
    assert!(
        body.contains(needle),
        "API-{tag}: {body:?} lacks {needle:?}\n{}",
        r.output
    );
}

fn kib(r: &RunResult, key: &str) -> u64 {
    r.value(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} line:\n{}", r.output))
}

fn status_json(r: &RunResult, tag: &str) -> serde_json::Value {
    let (code, body) = api(r, tag);
    assert_eq!(code, 200, "API-{tag}: {body}\n{}", r.output);
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("API-{tag}: {e}: {body}"))
}

#[test]
fn plugged_memory_grows_the_guest_and_bad_requests_change_nothing() {
    let a = artifacts();
    let initrd = initrd_with_script("hotplug", GUEST);
    let script = format!(
        r#"{PRELUDE}
./husk --api-sock api.sock --log-level info > serial.txt 2> husk.log &
vmm=$!
i=0; until [ -S api.sock ]; do i=$((i + 1)); [ $i -gt 200 ] && {{ echo NO-SOCKET; exit 10; }}; sleep 0.05; done
api machine PUT /machine-config '{{"vcpu_count": 1, "max_vcpu_count": 2, "mem_size_mib": 256}}'
api boot PUT /boot-source '{{"kernel_image_path": "vmlinux", "initrd_path": "initrd.cpio", "boot_args": "{CMDLINE}"}}'
api region PUT /hotplug/memory '{{"total_size_mib": 512}}'
api start PUT /actions '{{"action_type": "InstanceStart"}}'
wait_for HOTPLUG-BASE-KB || {{ cat husk.log; exit 11; }}
api too-large PATCH /hotplug/memory '{{"requested_size_mib": 1024}}'
api unaligned PATCH /hotplug/memory '{{"requested_size_mib": 3}}'
api after-bad GET /hotplug/memory
api plug PATCH /hotplug/memory '{{"requested_size_mib": 256}}'
wait_for HOTPLUG-GREW-KB || {{ cat husk.log; exit 12; }}
api after-plug GET /hotplug/memory
api pause PATCH /vm '{{"state": "Paused"}}'
api snapshot PUT /snapshot/create '{{"snapshot_path": "vm.state", "mem_file_path": "vm.mem"}}'
[ -e vm.state ] || [ -e vm.mem ] && echo SNAPSHOT-FILES-WRITTEN
api resume PATCH /vm '{{"state": "Resumed"}}'
wait_for HOTPLUG-CPUS || {{ cat husk.log; exit 13; }}
api unplug PATCH /hotplug/memory '{{"requested_size_mib": 0}}'
wait_for HOTPLUG-SHRANK-KB || {{ cat husk.log; exit 14; }}
# The driver offlines a block before it asks the device to unplug it.
i=0
until ./curl -s --unix-socket api.sock http://localhost/hotplug/memory | grep -q '"plugged_size_mib":0[,}}]'; do
  i=$((i + 1)); [ $i -gt 600 ] && break; sleep 0.1
done
api after-unplug GET /hotplug/memory
kill -TERM $vmm
wait $vmm
echo "VMM-EXIT $?"
echo --- serial; cat serial.txt; echo --- end serial
"#
    );
    let r = Payload::new("hotplug")
        .add(&a.husk, "husk")
        .add(&a.vmlinux, "vmlinux")
        .add(&initrd, "initrd.cpio")
        .add(&host_tool("curl"), "curl")
        .run(&script);
    r.assert_status(0);
    for tag in [
        "machine", "boot", "region", "start", "plug", "pause", "resume", "unplug",
    ] {
        assert_api(&r, tag, 204, "");
    }

    // What the region cannot give is refused, naming the limit.
    assert_api(&r, "too-large", 400, "fault_message");
    assert_api(&r, "too-large", 400, "total_size_mib is 512");
    assert_api(&r, "unaligned", 400, "fault_message");
    assert_api(&r, "unaligned", 400, "block_size_mib");
    // ... and changed nothing.
    let before = status_json(&r, "after-bad");
    assert_eq!(before["total_size_mib"], 512, "{before}");
    assert_eq!(before["requested_size_mib"], 0, "{before}");
    assert_eq!(before["plugged_size_mib"], 0, "{before}");

    // The guest sees what was plugged, and the device says so.
    let base = kib(&r, "HOTPLUG-BASE-KB");
    let grown = kib(&r, "HOTPLUG-GREW-KB");
    assert!(
        (250 << 10..=256 << 10).contains(&(grown - base)),
        "MemTotal {base} kB -> {grown} kB\n{}",
        r.output
    );
    let after = status_json(&r, "after-plug");
    assert_eq!(after["requested_size_mib"], 256, "{after}");
    assert_eq!(after["plugged_size_mib"], 256, "{after}");
    // Plugged memory is not saved: a snapshot is refused, nothing written.
    assert_api(&r, "snapshot", 400, "unplug its hot-plugged memory first");
    assert!(!r.output.contains("SNAPSHOT-FILES-WRITTEN"), "{}", r.output);

    // Asked for nothing, the guest gives it all back.
    let shrank = kib(&r, "HOTPLUG-SHRANK-KB");
    assert_eq!(
        shrank, base,
        "MemTotal {grown} kB -> {shrank} kB\n{}",
        r.output
    );
    let after = status_json(&r, "after-unplug");
    assert_eq!(after["requested_size_mib"], 0, "{after}");
    assert_eq!(after["plugged_size_mib"], 0, "{after}");

    // Booted with one vCPU online of two, the guest onlines the other.
    assert_eq!(
        r.value("HUSK-GUEST-CPUS").as_deref(),
        Some("1"),
        "{}",
        r.output
    );
    assert_eq!(
        r.value("HOTPLUG-PRESENT").as_deref(),
        Some("0-1"),
        "{}",
        r.output
    );
    assert_eq!(
        r.value("HOTPLUG-CPUS").as_deref(),
        Some("2"),
        "{}",
        r.output
    );
    // Stopped by SIGTERM (128 + 15), as any running guest is.
    assert_eq!(r.value("VMM-EXIT").as_deref(), Some("143"), "{}", r.output);
}
