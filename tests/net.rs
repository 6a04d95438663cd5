//! virtio-net against the guest kernel's own virtio_net driver, over a tap
//! in the node VM: the MAC from the configuration, ping, and 32 MiB of
//! random data each way over TCP with busybox nc, checksummed on both ends
//! (thousands of trips around each queue; `husk-bench net` moves 100 MiB
//! for the throughput numbers).

use husk_tests::{artifacts, husk_bench_binary, husk_on_host, initrd_with_script, Payload};

const CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off quiet";
const MIB_32: u64 = 32 << 20;

#[test]
fn guest_reaches_the_node_over_a_tap_ping_and_32_mib_each_way() {
    let initrd = initrd_with_script(
        "net-transfer",
        &format!(
            "ip addr add 172.16.0.2/24 dev eth0 && ip link set eth0 up || exit 1
             echo \"GUEST-MAC $(cat /sys/class/net/eth0/address)\"
             ping -c 3 -W 10 172.16.0.1 > /tmp/ping.txt 2>&1 || {{ cat /tmp/ping.txt; exit 2; }}
             echo \"GUEST-PING $(grep -o '[0-9]* packets received' /tmp/ping.txt)\"
             # guest -> node: random bytes, checksummed on their way out
             mkfifo /tmp/sent
             sha256sum < /tmp/sent > /tmp/sent.sha &
             head -c {MIB_32} /dev/urandom | tee /tmp/sent | nc 172.16.0.1 5000 || exit 3
             wait
             echo \"GUEST-SENT-SHA $(cut -d' ' -f1 /tmp/sent.sha)\"
             # node -> guest: stdin held open so nc does not end the stream early
             mkfifo /tmp/hold
             sleep 900 > /tmp/hold &
             echo \"GUEST-RECV-SHA $(nc 172.16.0.1 5001 < /tmp/hold | sha256sum | cut -d' ' -f1)\""
        ),
    );
    let r = Payload::new("net-transfer")
        .add(&artifacts().husk, "husk")
        .add(&husk_bench_binary(), "husk-bench")
        .add(&artifacts().vmlinux, "vmlinux")
        .add(&initrd, "initrd.cpio")
        .run(&format!(
            "./husk-bench tap tap0 || exit 10
             ip addr add 172.16.0.1/24 dev tap0 && ip link set tap0 up || exit 11
             head -c {MIB_32} /dev/urandom > send.bin || exit 12
             echo \"NODE-SENT-SHA $(sha256sum send.bin | cut -d' ' -f1)\"
             mkfifo hold
             sleep 900 > hold &
             nc -l -p 5000 < hold > recv.bin &
             nc -l -p 5001 < send.bin > /dev/null &
             timeout 500 ./husk boot --kernel vmlinux --initrd initrd.cpio --mem-mib 256 \
               --cmdline '{CMDLINE}' --net id=eth0,tap=tap0,mac=02:00:00:00:00:01 || exit 13
             echo \"NODE-RECV-SHA $(sha256sum recv.bin | cut -d' ' -f1)\"
             echo \"NODE-RECV-SIZE $(wc -c < recv.bin)\""
        ));
    r.assert_status(0)
        .assert_contains("HUSK-GUEST-TEST-STATUS 0");
    assert_eq!(
        r.value("GUEST-MAC").as_deref(),
        Some("02:00:00:00:00:01"),
        "{}",
        r.output
    );
    assert_eq!(
        r.value("GUEST-PING").as_deref(),
        Some("3 packets received"),
        "{}",
        r.output
    );
    let sent = r.value("GUEST-SENT-SHA").expect("guest checksum");
    assert_eq!(sent.len(), 64, "{}", r.output);
    assert_eq!(r.value("NODE-RECV-SHA"), Some(sent), "{}", r.output);
    assert_eq!(
        r.value("NODE-RECV-SIZE"),
        Some(MIB_32.to_string()),
        "{}",
        r.output
    );
    let node = r.value("NODE-SENT-SHA").expect("node checksum");
    assert_eq!(r.value("GUEST-RECV-SHA"), Some(node), "{}", r.output);
}

#[test]
fn missing_tap_is_a_clean_error() {
    let r = husk_on_host(&[
        "boot",
        "--kernel",
        artifacts().vmlinux.to_str().unwrap(),
        "--net",
        "id=eth0,tap=husknosuch0",
    ]);
    r.assert_status(1)
        .assert_contains("network interface eth0: tap husknosuch0 does not exist");
    assert!(!r.output.contains("panicked"), "{}", r.output);
}
