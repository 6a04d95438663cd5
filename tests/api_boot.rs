//! The REST API driving real guests (inside the node VM): a VM configured
//! and booted only through the API with curl, state errors while it runs,
//! a drive swapped under the running guest, metrics from a running VM,
//! pause and resume that the guest observably feels, and a boot from
//! `--config-file` without a socket.

use husk_tests::{artifacts, host_tool, initrd_with_script, Payload, RunResult};

const CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off quiet";

/// Shell helpers for the node side: `api TAG METHOD PATH [BODY]` prints
/// `API-TAG <status> <body>`; `wait_for PATTERN` polls the guest console.
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
    if [ $i -gt 1200 ]; then echo "TIMEOUT waiting for $1"; cat serial.txt husk.log; exit 20; fi
    sleep 0.1
  done
}
start_husk() {
  ./husk --api-sock api.sock --log-level info > serial.txt 2> husk.log &
  husk_pid=$!
  i=0; until [ -S api.sock ]; do i=$((i + 1)); [ $i -gt 100 ] && exit 21; sleep 0.05; done
}
finish() {
  wait $husk_pid
  echo "HUSK-EXIT $?"
  echo "--- serial"; cat serial.txt; echo "--- husk log"; cat husk.log
}
"#;

fn payload(name: &str, initrd: &std::path::Path) -> Payload {
    let a = artifacts();
    Payload::new(name)
        .add(&a.husk, "husk")
        .add(&a.vmlinux, "vmlinux")
        .add(initrd, "initrd.cpio")
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
        "API-{tag}: {body:?} lacks {needle:?}"
    );
}

#[test]
fn a_vm_booted_through_the_api_with_a_drive_swapped_under_it() {
    let initrd = initrd_with_script(
        "api-swap",
        "echo \"VSOCK-BOUND $(ls /sys/bus/virtio/drivers/vmw_vsock_virtio_transport 2>/dev/null | grep -c virtio)\"
         echo \"VDA-SERIAL $(cat /sys/block/vda/serial) $(cat /sys/block/vda/size)\"
         echo SWAP-WAIT
         i=0
         while [ \"$(cat /sys/block/vda/size)\" = 8 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
         blockdev --flushbufs /dev/vda
         echo \"VDA-AFTER $(cat /sys/block/vda/size) $(head -c 8 /dev/vda)\"",
    );
    let r = payload("api-boot", &initrd).run(&format!(
        "{PRELUDE}
        head -c 4096 /dev/zero | tr '\\0' A > a.img
        head -c 8192 /dev/zero | tr '\\0' B > b.img
        start_husk
        api info0 GET /
        api machine PUT /machine-config '{{\"vcpu_count\": 2, \"mem_size_mib\": 256}}'
        api boot PUT /boot-source '{{\"kernel_image_path\": \"vmlinux\", \"initrd_path\": \"initrd.cpio\", \"boot_args\": \"{CMDLINE} husk.hold=5\"}}'
        api drive PUT /drives/data '{{\"drive_id\": \"data\", \"path_on_host\": \"a.img\", \"is_root_device\": false}}'
        api metrics PUT /metrics '{{\"metrics_path\": \"metrics.json\"}}'
        api vsock PUT /vsock '{{\"guest_cid\": 3, \"uds_path\": \"v.sock\"}}'
        api start PUT /actions '{{\"action_type\": \"InstanceStart\"}}'
        wait_for SWAP-WAIT
        api info1 GET /
        api start2 PUT /actions '{{\"action_type\": \"InstanceStart\"}}'
        api late-machine PUT /machine-config '{{\"vcpu_count\": 1, \"mem_size_mib\": 128}}'
        api late-drive PUT /drives/more '{{\"drive_id\": \"more\", \"path_on_host\": \"a.img\", \"is_root_device\": false}}'
        api late-logger PUT /logger '{{\"level\": \"Debug\", \"log_path\": \"late.log\"}}'
        api resume-running PATCH /vm '{{\"state\": \"Resumed\"}}'
        api cad PUT /actions '{{\"action_type\": \"SendCtrlAltDel\"}}'
        api swap-missing PATCH /drives/data '{{\"drive_id\": \"data\", \"path_on_host\": \"nothing.img\"}}'
        api swap-unknown PATCH /drives/other '{{\"drive_id\": \"other\", \"path_on_host\": \"b.img\"}}'
        api swap PATCH /drives/data '{{\"drive_id\": \"data\", \"path_on_host\": \"b.img\"}}'
        wait_for VDA-AFTER
        api flush PUT /actions '{{\"action_type\": \"FlushMetrics\"}}'
        api config GET /vm/config
        echo \"METRICS $(tail -n 1 metrics.json)\"
        finish"
    ));
    assert_api(&r, "info0", 200, "\"state\":\"Not started\"");
    for tag in [
        "machine", "boot", "drive", "metrics", "start", "cad", "swap", "flush",
    ] {
        assert_api(&r, tag, 204, "");
    }
    assert_api(&r, "info1", 200, "\"state\":\"Running\"");
    assert_api(&r, "start2", 400, "already started");
    assert_api(&r, "late-machine", 400, "before InstanceStart");
    assert_api(&r, "late-drive", 400, "before InstanceStart");
    // The logger opens files; after start the API (whose seccomp filter
    // allows no open) refuses it.
    assert_api(&r, "late-logger", 400, "before InstanceStart");
    assert_api(&r, "resume-running", 400, "already running");
    assert_api(&r, "swap-missing", 400, "nothing.img");
    assert_api(&r, "swap-unknown", 400, "other");
    assert_api(&r, "config", 200, "b.img");
    r.assert_contains("HUSK-GUEST-CPUS 2");
    assert_eq!(r.value("VDA-SERIAL").as_deref(), Some("data 8"));
    // The vsock device put through the API is bound by the guest's driver.
    assert_eq!(r.value("VSOCK-BOUND").as_deref(), Some("1"), "{}", r.output);
    // The guest saw the new size (a config-change interrupt) and the new
    // file's bytes.
    assert_eq!(r.value("VDA-AFTER").as_deref(), Some("16 BBBBBBBB"));
    assert_eq!(r.value("HUSK-EXIT").as_deref(), Some("0"), "{}", r.output);
    let metrics: serde_json::Value =
        serde_json::from_str(&r.value("METRICS").expect("a metrics line")).expect("JSON metrics");
    assert!(
        metrics["vcpu"]["exit_io_out"].as_u64().unwrap() > 0,
        "{metrics}"
    );
    assert!(
        metrics["vcpu"]["exit_mmio_write"].as_u64().unwrap() > 0,
        "{metrics}"
    );
    let blk = &metrics["devices"]["block"]["data"];
    assert!(blk["read_bytes"].as_u64().unwrap() >= 4096, "{metrics}");
    assert_eq!(blk["swaps"], 1, "{metrics}");
    assert!(
        metrics["api"]["requests"].as_u64().unwrap() >= 15,
        "{metrics}"
    );
}

#[test]
fn pause_stops_the_guest_and_resume_continues_it() {
    let initrd = initrd_with_script(
        "api-pause",
        "i=0; while [ $i -lt 40 ]; do echo \"TICK $i\"; i=$((i + 1)); sleep 0.1; done",
    );
    let r = payload("api-pause", &initrd).run(&format!(
        "{PRELUDE}
        start_husk
        api boot PUT /boot-source '{{\"kernel_image_path\": \"vmlinux\", \"initrd_path\": \"initrd.cpio\", \"boot_args\": \"{CMDLINE}\"}}'
        api start PUT /actions '{{\"action_type\": \"InstanceStart\"}}'
        wait_for 'TICK 5'
        api pause PATCH /vm '{{\"state\": \"Paused\"}}'
        api info GET /
        api pause2 PATCH /vm '{{\"state\": \"Paused\"}}'
        before=$(grep -c TICK serial.txt)
        sleep 2
        after=$(grep -c TICK serial.txt)
        echo \"PAUSED-TICKS $before $after\"
        api resume PATCH /vm '{{\"state\": \"Resumed\"}}'
        api info2 GET /
        wait_for 'TICK 39'
        finish"
    ));
    assert_api(&r, "pause", 204, "");
    assert_api(&r, "info", 200, "\"state\":\"Paused\"");
    assert_api(&r, "pause2", 400, "already paused");
    assert_api(&r, "resume", 204, "");
    assert_api(&r, "info2", 200, "\"state\":\"Running\"");
    let ticks = r.value("PAUSED-TICKS").expect("tick counts");
    let (before, after) = ticks.split_once(' ').unwrap();
    assert_eq!(before, after, "the guest ran while paused:\n{}", r.output);
    r.assert_contains("TICK 39");
    assert_eq!(r.value("HUSK-EXIT").as_deref(), Some("0"), "{}", r.output);
}

#[test]
fn config_file_boots_without_a_socket() {
    let a = artifacts();
    let r = Payload::new("api-config-file")
        .add(&a.husk, "husk")
        .add(&a.vmlinux, "vmlinux")
        .add(&a.test_initrd, "initrd.cpio")
        .write(
            "vm.json",
            format!(
                r#"{{"boot-source": {{"kernel_image_path": "vmlinux", "initrd_path": "initrd.cpio", "boot_args": "{CMDLINE}"}},
                    "machine-config": {{"vcpu_count": 2, "mem_size_mib": 192}},
                    "logger": {{"level": "Info"}}}}"#
            )
            .as_bytes(),
        )
        .run("timeout 240 ./husk --no-api --config-file vm.json; echo \"HUSK-EXIT $?\"");
    r.assert_contains("HUSK-GUEST-READY")
        .assert_contains("HUSK-GUEST-CPUS 2");
    let mem: u64 = r.value("HUSK-GUEST-MEMTOTAL-KB").unwrap().parse().unwrap();
    assert!(mem > 150 * 1024 && mem < 192 * 1024, "{mem}");
    assert_eq!(r.value("HUSK-EXIT").as_deref(), Some("0"), "{}", r.output);
}
