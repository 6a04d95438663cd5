//! Snapshots of real guests (inside the node VM): a guest counting, with a
//! file on its drive, a vsock stream open and its network up, is
//! snapshotted and restored twice from the same files, as two VMs at once
//! (one with `husk restore`, one through the API with a drive swapped in
//! before it resumes); both keep counting, read their drive's data, see
//! their old stream reset and serve new ones, and one reaches the node
//! through a new tap. Then every kind of bad snapshot input gets its 400
//! and starts nothing.

use std::path::Path;

use husk_tests::{
    artifacts, host_tool, husk_bench_binary, initrd_with_files, virtiofsd, Payload, RunResult,
};

const CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off quiet";

/// Set inside the node VM: the directory with a good snapshot to make bad
/// copies of.
const EDIT_ENV: &str = "HUSK_SNAPSHOT_EDIT_DIR";

/// The guest: writes a marker on its drive, serves vsock streams on port
/// 5000, holds one stream to the host's port 6000 open, and counts, once
/// a second printing the count, whether the node answers a ping, what the
/// drive holds (read past the page cache) and how the held stream ended.
const GUEST: &str = r#"
ip addr add 172.16.0.2/24 dev eth0 && ip link set eth0 up || exit 1
printf 'SNAPDISK-7f3a9c' | dd of=/dev/vda conv=fsync 2>/dev/null || exit 2
/bin/husk-bench vsock-serve --listen vsock:5000 2>/dev/null &
(/bin/husk-bench vsock-client --connect vsock:2:6000 --mode hold --retry-s 120 > /tmp/hold.json) &
n=0
while :; do
  n=$((n + 1))
  if ping -c 1 -W 1 172.16.0.1 > /dev/null 2>&1; then net=ok; else net=down; fi
  blockdev --flushbufs /dev/vda
  disk=$(head -c 15 /dev/vda)
  old=$(cat /tmp/hold.json 2>/dev/null)
  echo "TICK $n net=$net disk=$disk old=${old:-none}"
  sleep 1
done
"#;

/// Node-side helpers: `api TAG SOCKET METHOD PATH [BODY]` prints
/// `API-TAG <status> <body>`; `wait_for FILE PATTERN` polls a file;
/// `wait_sock PATH` waits for a socket.
const PRELUDE: &str = r#"
api() {
  tag=$1; sock=$2; method=$3; path=$4
  if [ $# -ge 5 ]; then
    code=$(./curl -s -o resp.txt -w '%{http_code}' --unix-socket "$sock" -X "$method" \
      -H 'Content-Type: application/json' -d "$5" "http://localhost$path")
  else
    code=$(./curl -s -o resp.txt -w '%{http_code}' --unix-socket "$sock" -X "$method" "http://localhost$path")
  fi
  echo "API-$tag $code $(cat resp.txt)"
}
wait_for() {
  i=0
  until grep -q "$2" "$1" 2>/dev/null; do
    i=$((i + 1))
    if [ $i -gt 1500 ]; then echo "TIMEOUT waiting for $2 in $1"; tail -n 20 "$1"; return 1; fi
    sleep 0.1
  done
}
wait_sock() {
  i=0; until [ -S "$1" ]; do i=$((i + 1)); [ $i -gt 200 ] && { echo "NO SOCKET $1"; return 1; }; sleep 0.05; done
}
"#;

fn payload(name: &str, initrd: &Path) -> Payload {
    let a = artifacts();
    Payload::new(name)
        .add(&a.husk, "husk")
        .add(&a.vmlinux, "vmlinux")
        .add(initrd, "initrd.cpio")
        .add(&husk_bench_binary(), "husk-bench")
        .add(&host_tool("curl"), "curl")
}

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

/// The whole TICK lines of one VM's console (printed by the node between
/// `--- NAME` and `--- end NAME`): (count, rest of the line). The last
/// line of a VM stopped while it printed is cut short, and left out.
fn ticks(r: &RunResult, name: &str) -> Vec<(u64, String)> {
    let start = format!("--- {name}");
    let end = format!("--- end {name}");
    r.output
        .lines()
        .skip_while(|l| l.trim() != start)
        .take_while(|l| l.trim() != end)
        .filter_map(|l| l.trim().strip_prefix("TICK "))
        .filter(|l| l.ends_with("old=none") || l.ends_with('}'))
        .filter_map(|l| {
            let (n, rest) = l.split_once(' ')?;
            Some((n.parse().ok()?, rest.to_string()))
        })
        .collect()
}

/// Boots the counting guest through the API on tap0 and snapshots it
/// (node script; leaves snap.state, snap.mem, disk.img and tap0's MAC in
/// $MAC, the source VMM stopped).
fn boot_and_snapshot() -> String {
    format!(
        r#"./husk-bench tap tap0 || exit 10
ip addr add 172.16.0.1/24 dev tap0 && ip link set tap0 up || exit 11
MAC=$(cat /sys/class/net/tap0/address)
head -c 1048576 /dev/zero > disk.img
./husk-bench vsock-serve --listen unix:$PWD/src.sock_6000 2> hold-server.log &
./husk --api-sock src.api --log-level info > src-serial.txt 2> src.log &
src=$!
wait_sock src.api || exit 12
api src-machine src.api PUT /machine-config '{{"vcpu_count": 2, "mem_size_mib": 256}}'
api src-boot src.api PUT /boot-source '{{"kernel_image_path": "vmlinux", "initrd_path": "initrd.cpio", "boot_args": "{CMDLINE}"}}'
api src-drive src.api PUT /drives/data '{{"drive_id": "data", "path_on_host": "disk.img", "is_root_device": false}}'
api src-net src.api PUT /network-interfaces/eth0 '{{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"}}'
api src-vsock src.api PUT /vsock '{{"guest_cid": 3, "uds_path": "'$PWD'/src.sock"}}'
api src-early-snap src.api PUT /snapshot/create '{{"snapshot_path": "early.state", "mem_file_path": "early.mem"}}'
api src-start src.api PUT /actions '{{"action_type": "InstanceStart"}}'
wait_for src-serial.txt 'holding a stream' || {{ cat src.log; exit 13; }}
wait_for src-serial.txt 'TICK .* net=ok disk=SNAPDISK-7f3a9c old=none' || {{ cat src.log; exit 14; }}
api src-running-snap src.api PUT /snapshot/create '{{"snapshot_path": "snap.state", "mem_file_path": "snap.mem"}}'
api src-late-load src.api PUT /snapshot/load '{{"snapshot_path": "snap.state", "mem_backend": {{"backend_type": "File", "backend_path": "snap.mem"}}}}'
./husk snapshot --api-sock src.api --snapshot snap.state --mem-file snap.mem --keep-paused
echo "SNAPSHOT-STATUS $?"
api src-after src.api GET /
echo "SNAP-LAST $(grep TICK src-serial.txt | tail -n 1)"
echo "SNAP-SIZES $(wc -c < snap.state) $(wc -c < snap.mem) $(du -k snap.mem | cut -f1)"
kill $src; wait $src
"#
    )
}

#[test]
fn two_clones_of_one_snapshot_keep_counting_with_their_drive_vsock_and_network() {
    let bench = husk_bench_binary();
    let initrd = initrd_with_files("snapshot-clones", GUEST, &[(&bench, "/bin/husk-bench")]);
    let r = payload("snapshot-clones", &initrd).timeout(900).run(&format!(
        r#"{PRELUDE}
{boot}
ip link del tap0
./husk-bench tap tap1 && ip link set tap1 address $MAC && ip addr add 172.16.0.1/24 dev tap1 && ip link set tap1 up || exit 20
./husk-bench tap tap2 && ip link set tap2 up || exit 21
cp disk.img disk-b.img
# Clone A: husk restore, on a new tap and socket.
./husk restore --snapshot snap.state --mem-file snap.mem --net id=eth0,tap=tap1 \
  --vsock-uds $PWD/a.sock --api-sock a.api --log-level info > a-serial.txt 2> a.log &
a=$!
# Clone B: through the API, paused, its own copy of the drive swapped in.
./husk --api-sock b.api --log-level info > b-serial.txt 2> b.log &
b=$!
wait_sock b.api || exit 22
api b-load b.api PUT /snapshot/load '{{"snapshot_path": "snap.state", "mem_backend": {{"backend_type": "File", "backend_path": "snap.mem"}}, "network_overrides": [{{"iface_id": "eth0", "host_dev_name": "tap2"}}], "vsock_override": {{"uds_path": "'$PWD'/b.sock"}}}}'
api b-info b.api GET /
api b-start b.api PUT /actions '{{"action_type": "InstanceStart"}}'
api b-drive b.api PATCH /drives/data '{{"drive_id": "data", "path_on_host": "disk-b.img"}}'
api b-resume b.api PATCH /vm '{{"state": "Resumed"}}'
api b-config b.api GET /vm/config
wait_for a-serial.txt 'TICK .* net=ok .*old={{' || echo "A-WAIT failed"
wait_for b-serial.txt 'TICK .*old={{' || echo "B-WAIT failed"
echo "A-ECHO $(./husk-bench vsock-client --connect uds:$PWD/a.sock:5000 --mode echo --bytes 1048576 --retry-s 60)"
echo "B-ECHO $(./husk-bench vsock-client --connect uds:$PWD/b.sock:5000 --mode echo --bytes 1048576 --retry-s 60)"
# Each clone keeps counting: three whole ticks each (a loaded node may
# take a while; a fixed sleep once saw clone B print two, and a tick still
# being written, cut by the kill, is not one).
for i in $(seq 300); do
  [ "$(grep -cE 'TICK .*(}}|none)' a-serial.txt)" -ge 3 ] && [ "$(grep -cE 'TICK .*(}}|none)' b-serial.txt)" -ge 3 ] && break
  sleep 0.1
done
kill -0 $a && kill -0 $b && echo BOTH-RUNNING
kill $a $b; wait $a; echo "A-EXIT $?"; wait $b; echo "B-EXIT $?"
echo "--- src"; cat src-serial.txt; echo; echo "--- end src"
echo "--- a"; cat a-serial.txt; echo; echo "--- end a"
echo "--- b"; cat b-serial.txt; echo; echo "--- end b"
echo "--- logs"; cat src.log a.log b.log
"#,
        boot = boot_and_snapshot()
    ));
    r.assert_status(0);
    for tag in [
        "src-machine",
        "src-boot",
        "src-drive",
        "src-net",
        "src-vsock",
        "src-start",
    ] {
        assert_api(&r, tag, 204, "");
    }
    assert_api(&r, "src-early-snap", 400, "InstanceStart first");
    assert_api(&r, "src-running-snap", 400, "must be paused");
    assert_api(&r, "src-late-load", 400, "already running");
    assert_eq!(
        r.value("SNAPSHOT-STATUS").as_deref(),
        Some("0"),
        "{}",
        r.output
    );
    assert_api(&r, "src-after", 200, "\"state\":\"Paused\"");
    assert_api(&r, "b-load", 204, "");
    assert_api(&r, "b-info", 200, "\"state\":\"Paused\"");
    assert_api(&r, "b-start", 400, "already started");
    assert_api(&r, "b-drive", 204, "");
    assert_api(&r, "b-resume", 204, "");
    assert_api(&r, "b-config", 200, "\"host_dev_name\":\"tap2\"");
    assert_api(&r, "b-config", 200, "disk-b.img");
    r.assert_contains("BOTH-RUNNING");

    let last = r
        .value("SNAP-LAST")
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no count at the snapshot:\n{}", r.output));
    for clone in ["a", "b"] {
        let t = ticks(&r, clone);
        assert!(t.len() >= 3, "clone {clone} printed {t:?}\n{}", r.output);
        // It carries on from the snapshot's count, and keeps counting.
        assert!(
            t[0].0 > last && t[0].0 <= last + 3,
            "clone {clone}: {t:?} after {last}"
        );
        assert!(t.windows(2).all(|w| w[1].0 == w[0].0 + 1), "{t:?}");
        assert!(
            t.iter().all(|(_, l)| l.contains("disk=SNAPDISK-7f3a9c")),
            "clone {clone}'s drive: {t:?}"
        );
        // The stream it held through the snapshot was reset.
        let ended = t
            .iter()
            .rev()
            .find_map(|(_, l)| l.split_once("old=").map(|(_, j)| j.to_string()))
            .unwrap_or_default();
        let ended: serde_json::Value = serde_json::from_str(&ended)
            .unwrap_or_else(|e| panic!("clone {clone}: {e}: {ended}\n{}", r.output));
        assert_eq!(ended["ended"], "reset", "clone {clone}: {ended}");
        let echo: serde_json::Value = serde_json::from_str(
            &r.value(&format!("{}-ECHO", clone.to_uppercase()))
                .unwrap_or_default(),
        )
        .unwrap_or_else(|e| panic!("clone {clone} echo: {e}\n{}", r.output));
        assert_eq!(echo["checksums_equal"], true, "clone {clone}: {echo}");
    }
    // Clone A's network works on its new tap (same MAC on the node side).
    assert!(
        ticks(&r, "a").iter().any(|(_, l)| l.contains("net=ok")),
        "{}",
        r.output
    );
    // Both were stopped by SIGTERM.
    assert_eq!(r.value("A-EXIT").as_deref(), Some("143"), "{}", r.output);
    assert_eq!(r.value("B-EXIT").as_deref(), Some("143"), "{}", r.output);
}

/// In the node: bad copies of the snapshot in `dir`, one per refusal.
fn make_bad_snapshots(dir: &Path) {
    use vmm::persist::{format, read_state, write_state};
    let good = dir.join("snap.state");
    let bytes = std::fs::read(&good).unwrap();
    let mut version = bytes.clone();
    version[8..12].copy_from_slice(&(format::FORMAT_VERSION + 1).to_le_bytes());
    std::fs::write(dir.join("version.state"), version).unwrap();
    std::fs::write(dir.join("truncated.state"), &bytes[..bytes.len() / 2]).unwrap();
    let mut corrupt = bytes.clone();
    corrupt[format::HEADER_LEN + 100] ^= 0x20;
    std::fs::write(dir.join("corrupt.state"), corrupt).unwrap();
    std::fs::write(
        dir.join("garbage.state"),
        b"not a snapshot at all, just text\n",
    )
    .unwrap();

    let mut s = read_state(&good).unwrap();
    s.vcpus.pop();
    write_state(&dir.join("vcpus.state"), &s).unwrap();
    let mut s = read_state(&good).unwrap();
    s.cpu.vendor = "AuthenticIntl".into();
    s.cpu.model += 1;
    write_state(&dir.join("cpu.state"), &s).unwrap();

    let mem = std::fs::File::open(dir.join("snap.mem")).unwrap();
    let short = std::fs::File::create(dir.join("short.mem")).unwrap();
    short.set_len(mem.metadata().unwrap().len() - 4096).unwrap();
}

#[test]
fn bad_snapshots_get_a_400_and_nothing_runs() {
    if let Some(dir) = std::env::var_os(EDIT_ENV) {
        make_bad_snapshots(Path::new(&dir));
        return;
    }
    let bench = husk_bench_binary();
    let initrd = initrd_with_files("snapshot-bad", GUEST, &[(&bench, "/bin/husk-bench")]);
    let load = |tag: &str, state: &str, mem: &str| {
        format!(
            r#"./husk --api-sock {tag}.api > {tag}-serial.txt 2> {tag}.log &
pid=$!
wait_sock {tag}.api
api {tag} {tag}.api PUT /snapshot/load '{{"snapshot_path": "{state}", "mem_backend": {{"backend_type": "File", "backend_path": "{mem}"}}, "resume_vm": true, "vsock_override": {{"uds_path": "'$PWD'/{tag}.sock"}}}}'
api {tag}-info {tag}.api GET /
sleep 1
echo "{tag}-SERIAL $(wc -c < {tag}-serial.txt)"
kill $pid; wait $pid
"#
        )
    };
    let cases = [
        ("version", "version.state", "snap.mem"),
        ("truncated", "truncated.state", "snap.mem"),
        ("corrupt", "corrupt.state", "snap.mem"),
        ("garbage", "garbage.state", "snap.mem"),
        ("vcpus", "vcpus.state", "snap.mem"),
        ("cpu", "cpu.state", "snap.mem"),
        ("short", "snap.state", "short.mem"),
        ("missing", "snap.state", "nothing.mem"),
    ];
    let loads: String = cases.iter().map(|(t, s, m)| load(t, s, m)).collect();
    let r = payload("snapshot-bad", &initrd)
        .add(&std::env::current_exe().unwrap(), "snapshot-test")
        .timeout(900)
        .run(&format!(
            r#"{PRELUDE}
{boot}
{EDIT_ENV}=$PWD ./snapshot-test --exact bad_snapshots_get_a_400_and_nothing_runs --nocapture --test-threads 1 > edit.log 2>&1 || {{ cat edit.log; exit 30; }}
{loads}
# Configured for a boot first: a load is refused, as Firecracker does.
./husk --api-sock late.api > late-serial.txt 2> late.log &
pid=$!
wait_sock late.api
api late-machine late.api PUT /machine-config '{{"vcpu_count": 1, "mem_size_mib": 128}}'
api late late.api PUT /snapshot/load '{{"snapshot_path": "snap.state", "mem_backend": {{"backend_type": "File", "backend_path": "snap.mem"}}}}'
kill $pid; wait $pid
# Options husk does not have are refused, not ignored.
./husk --api-sock opts.api > opts-serial.txt 2> opts.log &
pid=$!
wait_sock opts.api
api uffd opts.api PUT /snapshot/load '{{"snapshot_path": "snap.state", "mem_backend": {{"backend_type": "Uffd", "backend_path": "uffd.sock"}}}}'
api both opts.api PUT /snapshot/load '{{"snapshot_path": "snap.state", "mem_file_path": "snap.mem", "mem_backend": {{"backend_type": "File", "backend_path": "snap.mem"}}}}'
api no-such-iface opts.api PUT /snapshot/load '{{"snapshot_path": "snap.state", "mem_backend": {{"backend_type": "File", "backend_path": "snap.mem"}}, "network_overrides": [{{"iface_id": "eth7", "host_dev_name": "tap0"}}]}}'
api opts-info opts.api GET /
kill $pid; wait $pid
echo NODE-DONE
"#,
            boot = boot_and_snapshot()
        ));
    r.assert_status(0);
    let expect = [
        (
            "version",
            "snapshot format version 3; this husk reads version 2",
        ),
        ("truncated", "truncated"),
        ("corrupt", "checksum does not match"),
        ("garbage", "not a husk snapshot"),
        ("vcpus", "2-vCPU microVM but holds the state of 1 vCPUs"),
        ("cpu", "taken on a AuthenticIntl"),
        (
            "short",
            "the memory file is 268431360 bytes; the snapshot's guest memory is 268435456 bytes",
        ),
        ("missing", "cannot open the memory file"),
        ("late", "only be loaded into a fresh microVM"),
        ("uffd", "Uffd memory backend is not supported"),
        ("both", "not both or neither"),
        ("no-such-iface", "no network interface \\\"eth7\\\""),
    ];
    for (tag, needle) in expect {
        assert_api(&r, tag, 400, needle);
    }
    // Nothing ran: each husk stayed configurable, its guest printed nothing.
    for (tag, _, _) in cases {
        assert_api(&r, &format!("{tag}-info"), 200, "\"state\":\"Not started\"");
        assert_eq!(
            r.value(&format!("{tag}-SERIAL")).as_deref(),
            Some("0"),
            "{tag}: {}",
            r.output
        );
    }
    assert_api(&r, "opts-info", 200, "\"state\":\"Not started\"");
}

/// The template guest: says it is ready (the node snapshots it then,
/// before it mounts anything), waits until its control drive says GO,
/// mounts the share and reads its marker, waits for plugged memory, and
/// onlines its parked vCPU.
const TEMPLATE_GUEST: &str = r#"
kb() { awk '/^MemTotal:/ { print $2 }' /proc/meminfo; }
base=$(kb)
echo "TPL-PRESENT $(cat /sys/devices/system/cpu/present)"
echo "TPL-ONLINE $(cat /sys/devices/system/cpu/online)"
echo TPL-READY
until [ "$(blockdev --flushbufs /dev/vda; head -c 2 /dev/vda)" = GO ]; do sleep 0.2; done
mkdir -p /mnt && mount -t virtiofs share /mnt || { echo TPL-MOUNT-FAILED; exit 1; }
echo "TPL-MARKER $(cat /mnt/marker)"
echo TPL-MOUNTED
until [ "$(kb)" -ge $((base + 200 * 1024)) ]; do sleep 0.2; done
echo "TPL-GREW-KB $(($(kb) - base))"
echo 1 > /sys/devices/system/cpu/cpu1/online || echo TPL-ONLINE-FAILED
echo "TPL-CPUS $(grep -c '^processor' /proc/cpuinfo) $(cat /sys/devices/system/cpu/online)"
"#;

/// `start_virtiofsd NAME DIR`: a virtiofsd serving DIR on NAME.sock (run
/// chrooted into a bind mount of the node's root, as tests/fs.rs explains).
const VIRTIOFSD: &str = r#"
mkdir -p /tmp/virtiofsd-root
start_virtiofsd() {
  mkdir -p "$2"
  unshare -m sh -c 'mount --rbind / /tmp/virtiofsd-root &&
    exec chroot /tmp/virtiofsd-root "$0/virtiofsd" --socket-path="$0/$1.sock" \
      --shared-dir="$0/$2" --sandbox=namespace --log-level=warn' "$PWD" "$1" "$2" \
    > "$1-virtiofsd.log" 2>&1 &
  wait_sock "$1.sock" || { cat "$1-virtiofsd.log"; exit 40; }
}
plugged() {
  ./curl -s --unix-socket "$1" http://localhost/hotplug/memory | grep -q "\"plugged_size_mib\":$2[,}]"
}
wait_plugged() {
  i=0; until plugged "$1" "$2"; do i=$((i + 1)); [ $i -gt 1200 ] && { echo "TIMEOUT plugged $2 on $1"; return 1; }; sleep 0.1; done
}
"#;

#[test]
fn a_template_with_virtio_fs_memory_and_a_parked_vcpu_clones_into_two_pods() {
    // A pod template: a guest with a virtio-fs share (virtiofsd), a
    // virtio-mem region with nothing plugged and a second vCPU parked is
    // snapshotted before it mounts the share. Snapshots with memory
    // plugged or after the mount are refused and write nothing. Two
    // clones restored at once, each with its own control drive and its
    // own virtiofsd on another directory, mount the share and read their
    // own marker, get memory plugged and online their second vCPU.
    let initrd = initrd_with_files("snapshot-template", TEMPLATE_GUEST, &[]);
    let cmdline = format!("{CMDLINE} husk.hold=600");
    let r = payload("snapshot-template", &initrd)
        .add(&virtiofsd(), "virtiofsd")
        .timeout(900)
        .run(&format!(
            r#"{PRELUDE}
{VIRTIOFSD}
# As on a containerd node (start-in-node.sh): shared guest memory in huge
# pages where husk asks, which the clones' copy of the memory file uses.
thp=/sys/kernel/mm/transparent_hugepage/shmem_enabled
[ -w $thp ] && echo advise > $thp
head -c 1048576 /dev/zero > ctl.img
mkdir -p tpl a b && echo template > tpl/marker && echo clone-a > a/marker && echo clone-b > b/marker
start_virtiofsd src-fs tpl
./husk --api-sock src.api --log-level info > src-serial.txt 2> src.log &
src=$!
wait_sock src.api || exit 10
api src-machine src.api PUT /machine-config '{{"vcpu_count": 1, "max_vcpu_count": 2, "mem_size_mib": 256}}'
api src-boot src.api PUT /boot-source '{{"kernel_image_path": "vmlinux", "initrd_path": "initrd.cpio", "boot_args": "{cmdline}"}}'
api src-drive src.api PUT /drives/ctl '{{"drive_id": "ctl", "path_on_host": "ctl.img", "is_root_device": false}}'
api src-fs src.api PUT /fs/share '{{"id": "share", "tag": "share", "socket": "'$PWD'/src-fs.sock"}}'
api src-hotplug src.api PUT /hotplug/memory '{{"total_size_mib": 512}}'
api src-start src.api PUT /actions '{{"action_type": "InstanceStart"}}'
wait_for src-serial.txt TPL-READY || {{ cat src.log; exit 11; }}
api src-pause src.api PATCH /vm '{{"state": "Paused"}}'
api src-snap src.api PUT /snapshot/create '{{"snapshot_path": "tpl.state", "mem_file_path": "tpl.mem"}}'
echo "TPL-SIZES $(wc -c < tpl.mem) $(du -k tpl.mem | cut -f1)"
api src-resume src.api PATCH /vm '{{"state": "Resumed"}}'
# Memory plugged: refused, nothing written.
api src-plug src.api PATCH /hotplug/memory '{{"requested_size_mib": 256}}'
wait_plugged src.api 256
api src-pause-plugged src.api PATCH /vm '{{"state": "Paused"}}'
api src-snap-plugged src.api PUT /snapshot/create '{{"snapshot_path": "plugged.state", "mem_file_path": "plugged.mem"}}'
[ -e plugged.state ] || [ -e plugged.mem ] && echo PLUGGED-FILES-WRITTEN
api src-resume-plugged src.api PATCH /vm '{{"state": "Resumed"}}'
api src-unplug src.api PATCH /hotplug/memory '{{"requested_size_mib": 0}}'
wait_plugged src.api 0
# The guest mounts the share: refused, nothing written.
printf GO | dd of=ctl.img conv=notrunc 2>/dev/null
wait_for src-serial.txt TPL-MOUNTED || {{ cat src.log; exit 12; }}
api src-pause-mounted src.api PATCH /vm '{{"state": "Paused"}}'
api src-snap-mounted src.api PUT /snapshot/create '{{"snapshot_path": "mounted.state", "mem_file_path": "mounted.mem"}}'
[ -e mounted.state ] || [ -e mounted.mem ] && echo MOUNTED-FILES-WRITTEN
for k in TPL-PRESENT TPL-ONLINE TPL-MARKER; do echo "SRC-$(grep "^$k " src-serial.txt | head -n 1)"; done
kill $src; wait $src
# The template's drive is gone: each clone opens its own.
mv ctl.img ctl-src.img
head -c 1048576 /dev/zero > ctl-a.img
head -c 1048576 /dev/zero > ctl-b.img
start_virtiofsd a-fs a
start_virtiofsd b-fs b
# Clone A: husk restore; clone B: the API. At the same time.
./husk restore --snapshot tpl.state --mem-file tpl.mem --drive id=ctl,path=ctl-a.img \
  --fs id=share,socket=$PWD/a-fs.sock --api-sock a.api --log-level info > a-serial.txt 2> a.log &
ca=$!
./husk --api-sock b.api --log-level info > b-serial.txt 2> b.log &
cb=$!
wait_sock b.api || exit 20
api b-load b.api PUT /snapshot/load '{{"snapshot_path": "tpl.state", "mem_backend": {{"backend_type": "File", "backend_path": "tpl.mem"}}, "resume_vm": true, "drive_overrides": [{{"drive_id": "ctl", "path_on_host": "ctl-b.img"}}], "fs_overrides": [{{"id": "share", "socket": "'$PWD'/b-fs.sock"}}]}}'
wait_sock a.api || {{ cat a.log; exit 21; }}
api b-config b.api GET /vm/config
printf GO | dd of=ctl-a.img conv=notrunc 2>/dev/null
printf GO | dd of=ctl-b.img conv=notrunc 2>/dev/null
wait_for a-serial.txt TPL-MOUNTED || {{ cat a.log; exit 22; }}
wait_for b-serial.txt TPL-MOUNTED || {{ cat b.log; exit 23; }}
api a-plug a.api PATCH /hotplug/memory '{{"requested_size_mib": 256}}'
api b-plug b.api PATCH /hotplug/memory '{{"requested_size_mib": 256}}'
wait_for a-serial.txt TPL-CPUS || {{ cat a.log; exit 24; }}
wait_for b-serial.txt TPL-CPUS || {{ cat b.log; exit 25; }}
wait_plugged a.api 256; wait_plugged b.api 256
api a-hotplug a.api GET /hotplug/memory
api b-hotplug b.api GET /hotplug/memory
for c in a b; do
  for k in TPL-MARKER TPL-GREW-KB TPL-CPUS; do echo "$(echo $c | tr a-z A-Z)-$(grep "^$k " $c-serial.txt | head -n 1)"; done
done
kill -0 $ca && kill -0 $cb && echo BOTH-RUNNING
echo "A-RESTORE $(grep 'microVM restored' a.log | tail -n 1)"
echo "A-COPY $(grep 'filled from the memory file' a.log | tail -n 1)"
echo "B-RESTORE $(grep 'microVM restored' b.log | tail -n 1)"
echo "B-COPY $(grep 'filled from the memory file' b.log | tail -n 1)"
kill $ca $cb; wait $ca; echo "A-EXIT $?"; wait $cb; echo "B-EXIT $?"
# Overrides of devices the snapshot lacks: a 400, nothing runs.
./husk --api-sock c.api > c-serial.txt 2> c.log &
cc=$!
wait_sock c.api
api c-no-drive c.api PUT /snapshot/load '{{"snapshot_path": "tpl.state", "mem_file_path": "tpl.mem", "drive_overrides": [{{"drive_id": "nope", "path_on_host": "ctl-a.img"}}]}}'
api c-no-fs c.api PUT /snapshot/load '{{"snapshot_path": "tpl.state", "mem_file_path": "tpl.mem", "fs_overrides": [{{"id": "nope", "socket": "/x.sock"}}]}}'
api c-info c.api GET /
kill $cc; wait $cc
echo "--- logs"; cat src.log a.log b.log; cat *-virtiofsd.log
echo "--- a"; cat a-serial.txt; echo "--- b"; cat b-serial.txt
"#
        ));
    r.assert_status(0);
    for tag in [
        "src-machine",
        "src-boot",
        "src-drive",
        "src-fs",
        "src-hotplug",
        "src-start",
        "src-pause",
        "src-snap",
        "src-resume",
        "src-plug",
        "src-pause-plugged",
        "src-resume-plugged",
        "src-unplug",
        "src-pause-mounted",
        "b-load",
        "a-plug",
        "b-plug",
    ] {
        assert_api(&r, tag, 204, "");
    }
    // What a template must not have is refused, and nothing written.
    assert_api(
        &r,
        "src-snap-plugged",
        400,
        "unplug its hot-plugged memory first",
    );
    assert!(!r.output.contains("PLUGGED-FILES-WRITTEN"), "{}", r.output);
    assert_api(
        &r,
        "src-snap-mounted",
        400,
        "the guest has used virtio-fs device share: its FUSE session lives in the backend and is not saved",
    );
    assert!(!r.output.contains("MOUNTED-FILES-WRITTEN"), "{}", r.output);
    // Snapshotted with one of its two vCPUs online.
    for (key, value) in [
        ("SRC-TPL-PRESENT", "0-1"),
        ("SRC-TPL-ONLINE", "0"),
        ("SRC-TPL-MARKER", "template"),
    ] {
        assert_eq!(r.value(key).as_deref(), Some(value), "{key}\n{}", r.output);
    }

    // B reports what it was restored with.
    for needle in [
        "b-fs.sock",
        "ctl-b.img",
        "\"max_vcpu_count\":2",
        "\"vcpu_count\":1",
        "\"total_size_mib\":512",
    ] {
        assert_api(&r, "b-config", 200, needle);
    }
    r.assert_contains("BOTH-RUNNING");
    for (clone, marker) in [("A", "clone-a"), ("B", "clone-b")] {
        let v = |k: &str| r.value(&format!("{clone}-{k}")).unwrap_or_default();
        // Its own share; the memory and the second vCPU arrive.
        assert_eq!(v("TPL-MARKER"), marker, "{clone}\n{}", r.output);
        let grew: u64 = v("TPL-GREW-KB").parse().unwrap_or(0);
        assert!(
            (250 << 10..=256 << 10).contains(&grew),
            "{clone} grew {grew} kB\n{}",
            r.output
        );
        assert_eq!(v("TPL-CPUS"), "2 0-1", "{clone}\n{}", r.output);
        assert_api(
            &r,
            &format!("{}-hotplug", clone.to_lowercase()),
            200,
            "\"plugged_size_mib\":256",
        );
        // Shared memory was filled on demand (the node has
        // /dev/userfaultfd), to the end.
        assert!(
            v("COPY").contains("stopped=false"),
            "{clone}: no fill line\n{}",
            r.output
        );
        eprintln!("{clone}: {}\n{clone}: {}", v("RESTORE"), v("COPY"));
    }
    eprintln!("template memory file: {:?}", r.value("TPL-SIZES"));
    assert_eq!(r.value("A-EXIT").as_deref(), Some("143"), "{}", r.output);
    assert_eq!(r.value("B-EXIT").as_deref(), Some("143"), "{}", r.output);
    assert_api(&r, "c-no-drive", 400, "no drive \\\"nope\\\"");
    assert_api(&r, "c-no-fs", 400, "no virtio-fs device \\\"nope\\\"");
    assert_api(&r, "c-info", 200, "\"state\":\"Not started\"");
}

/// The traffic guest: vsock streams served on port 5000; once the node
/// listens, 32 MiB over the network each way.
const TRAFFIC_GUEST: &str = r#"
ip addr add 172.16.0.2/24 dev eth0 && ip link set eth0 up || exit 1
/bin/husk-bench vsock-serve --listen vsock:5000 2>/dev/null &
mkfifo /tmp/hold
sleep 900 > /tmp/hold &
echo GUEST-READY
until head -c 33554432 /dev/urandom | nc 172.16.0.1 5000; do sleep 0.2; done
echo "GUEST-RECV $(nc 172.16.0.1 5001 < /tmp/hold | wc -c)"
echo GUEST-NET-DONE
sleep 900
"#;

/// Issue 22's corruption test: a VMM that writes guest memory it does not
/// own is not stopped by the guest's page protections. The guest kernel's
/// code and read-only data are compared (`husk-bench kernel-text`) between a
/// snapshot taken once the guest is up and one taken after 64 MiB of vsock
/// streams and 64 MiB of network traffic at once, on two vCPUs. A byte
/// changed by hand in a copy of the first memory file shows the comparison
/// finds one, named by its symbol.
#[test]
fn the_guest_kernels_code_is_unchanged_by_heavy_vsock_and_network_traffic() {
    let bench = husk_bench_binary();
    let initrd = initrd_with_files(
        "snapshot-kernel-text",
        TRAFFIC_GUEST,
        &[(&bench, "/bin/husk-bench")],
    );
    let r = payload("snapshot-kernel-text", &initrd)
        .timeout(600)
        .run(&format!(
            r#"{PRELUDE}
./husk-bench tap tap0 || exit 10
ip addr add 172.16.0.1/24 dev tap0 && ip link set tap0 up || exit 11
./husk --api-sock t.api --log-level info > serial.txt 2> husk.log &
vm=$!
wait_sock t.api || exit 12
api machine t.api PUT /machine-config '{{"vcpu_count": 2, "mem_size_mib": 256}}'
api boot t.api PUT /boot-source '{{"kernel_image_path": "vmlinux", "initrd_path": "initrd.cpio", "boot_args": "{CMDLINE}"}}'
api net t.api PUT /network-interfaces/eth0 '{{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"}}'
api vsock t.api PUT /vsock '{{"guest_cid": 3, "uds_path": "'$PWD'/v.sock"}}'
api start t.api PUT /actions '{{"action_type": "InstanceStart"}}'
wait_for serial.txt GUEST-READY || {{ cat husk.log; exit 13; }}
api pause-1 t.api PATCH /vm '{{"state": "Paused"}}'
api snap-1 t.api PUT /snapshot/create '{{"snapshot_path": "a.state", "mem_file_path": "a.mem"}}'
api resume-1 t.api PATCH /vm '{{"state": "Resumed"}}'
head -c 33554432 /dev/urandom > send.bin
mkfifo hold
sleep 900 > hold &
nc -l -p 5000 < hold > /dev/null &
nc -l -p 5001 < send.bin > /dev/null &
echo "VSOCK $(./husk-bench vsock-client --connect uds:$PWD/v.sock:5000 --mode echo --streams 32 --bytes 67108864 --retry-s 60 | tr -d '\n')"
wait_for serial.txt GUEST-NET-DONE || {{ cat husk.log; exit 14; }}
api pause-2 t.api PATCH /vm '{{"state": "Paused"}}'
api snap-2 t.api PUT /snapshot/create '{{"snapshot_path": "b.state", "mem_file_path": "b.mem"}}'
echo "KERNEL-TEXT $(./husk-bench kernel-text --vmlinux vmlinux a.mem b.mem | tr -d '\n')"
# The control: the first 32 MiB (the kernel's image) with one byte flipped.
dd if=a.mem of=c.mem bs=1M count=32 2>/dev/null
old=$(od -An -tu1 -j $((0x1100000)) -N1 a.mem | tr -d ' ')
printf "\\$(printf %o $((255 - old)))" | dd of=c.mem bs=1 seek=$((0x1100000)) conv=notrunc 2>/dev/null
echo "KERNEL-TEXT-CONTROL $(./husk-bench kernel-text --vmlinux vmlinux a.mem c.mem | tr -d '\n')"
kill $vm; wait $vm
grep GUEST- serial.txt
"#
        ));
    r.assert_status(0);
    for tag in [
        "machine", "boot", "net", "vsock", "start", "pause-1", "snap-1", "resume-1", "pause-2",
        "snap-2",
    ] {
        assert_api(&r, tag, 204, "");
    }
    assert_eq!(
        r.value("GUEST-RECV").as_deref(),
        Some("33554432"),
        "{}",
        r.output
    );
    let vsock: serde_json::Value = serde_json::from_str(&r.value("VSOCK").unwrap_or_default())
        .unwrap_or_else(|e| panic!("VSOCK: {e}\n{}", r.output));
    assert_eq!(vsock["checksums_equal"], true, "{vsock}");
    assert_eq!(vsock["bytes"], 64 << 20, "{vsock}");

    let text = |key: &str| -> serde_json::Value {
        let line = r
            .value(key)
            .unwrap_or_else(|| panic!("no {key} line:\n{}", r.output));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{key}: {e}: {line}"))
    };
    let t = text("KERNEL-TEXT");
    // .text and .rodata of the guest kernel: several MiB.
    assert!(t["compared_bytes"].as_u64().unwrap_or(0) > 8 << 20, "{t}");
    assert_eq!(
        t["unexpected_bytes"], 0,
        "the guest kernel's code or read-only data changed under traffic: {t}"
    );
    let c = text("KERNEL-TEXT-CONTROL");
    assert_eq!(c["unexpected_bytes"], 1, "{c}");
    assert_eq!(c["changes"][0]["addr"], "0xffffffff81100000", "{c}");
}
