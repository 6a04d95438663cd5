//! `husk metrics`, the node's Prometheus exporter, in one node VM boot:
//! containerd runs a pod under the husk runtime with the CRI's name
//! annotations (a pod name with a quote in it, to be escaped), a
//! container in it writes 8 MiB to its root filesystem and syncs, and
//! the exporter, scraped with curl before and after, serves what
//! `promtool check metrics` accepts, with a write-bytes counter for that
//! container's drive that grew by at least the 8 MiB, labelled with the
//! pod's namespace, name, id and the container's name; the node's pod
//! count and start-time histogram count the pod, and once it is deleted
//! the pod count is 0 again. On the host: a non-loopback address is
//! refused.

use husk_tests::containerd::{self, IMAGE};
use husk_tests::{host_tool, husk_on_host};

const BYTES: f64 = (8 << 20) as f64;

/// The sum of the samples of `metric` whose labels contain every one of
/// `labels` (`name="value"` as the exposition writes them).
fn sum(text: &str, metric: &str, labels: &[&str]) -> Option<f64> {
    let samples: Vec<f64> = text
        .lines()
        .filter_map(|l| l.strip_prefix(metric))
        .filter(|rest| rest.starts_with('{') || rest.starts_with(' '))
        .filter(|rest| labels.iter().all(|want| rest.contains(want)))
        .filter_map(|rest| rest.rsplit(' ').next()?.parse().ok())
        .collect();
    (!samples.is_empty()).then(|| samples.iter().sum())
}

/// The text between `--- NAME` and `--- end NAME`.
fn section<'a>(output: &'a str, name: &str) -> &'a str {
    let start = format!("--- {name}\n");
    let end = format!("--- end {name}\n");
    output
        .split_once(&start)
        .and_then(|(_, rest)| rest.split_once(&end))
        .map(|(s, _)| s)
        .unwrap_or_else(|| panic!("no {name} section in:\n{output}"))
}

#[test]
fn a_scrape_counts_a_pod_s_writes_under_its_names() {
    let r = containerd::payload("metrics")
        .add(&host_tool("curl"), "curl")
        .add(&containerd::promtool(), "promtool")
        .run(&containerd::script(
            "",
            &format!(
                r#"ip link set lo up
# The container's root as a disk, whose drive's counters carry its name
# (a root through the pod's share is virtiofsd's I/O, not a drive's).
echo 'rootfs = "block"' >> /etc/husk/config.toml
R="--runtime io.containerd.husk.v2"
A=io.kubernetes.cri
ctr run -d $R --annotation $A.sandbox-namespace=shop --annotation "$A.sandbox-name=cart-\"0\"" \
  --annotation $A.container-name=writer {IMAGE} mpod sleep 600
echo "RUN-D $?"
./husk metrics --listen 127.0.0.1:9464 --state-dir /run/husk --log-level info > exporter.log 2>&1 &
exporter=$!
i=0; until ./curl -s -o /dev/null http://127.0.0.1:9464/; do i=$((i+1)); [ $i -gt 100 ] && break; sleep 0.1; done
scrape() {{ ./curl -s -o "$1" -w '%{{http_code}} %{{content_type}}\n' http://127.0.0.1:9464/metrics; }}
echo "SCRAPE-BEFORE $(scrape before.txt)"
ctr task exec --exec-id dd mpod dd if=/dev/zero of=/big bs=1M count=8 conv=fsync
echo "DD-EXIT $?"
echo "SCRAPE-AFTER $(scrape after.txt)"
echo "SCRAPE-SECONDS $(./curl -s -o /dev/null -w '%{{time_total}}' http://127.0.0.1:9464/metrics)"
./promtool check metrics < after.txt > promtool.txt 2>&1
echo "PROMTOOL-EXIT $?"
cat promtool.txt
echo "--- before"; cat before.txt; echo "--- end before"
echo "--- after"; cat after.txt; echo "--- end after"
ctr task kill -s SIGKILL mpod
wait_stopped mpod
remove mpod
scrape gone.txt > /dev/null
echo "PODS-AFTER-DELETE $(sed -n 's/^husk_pods //p' gone.txt)"
kill $exporter
echo "--- exporter log"; cat exporter.log
"#
            ),
        ));
    assert_eq!(r.value("RUN-D").as_deref(), Some("0"), "{}", r.output);
    assert_eq!(r.value("DD-EXIT").as_deref(), Some("0"), "{}", r.output);
    for key in ["SCRAPE-BEFORE", "SCRAPE-AFTER"] {
        assert_eq!(
            r.value(key).as_deref(),
            Some("200 text/plain; version=0.0.4; charset=utf-8"),
            "{key}:\n{}",
            r.output
        );
    }
    assert_eq!(
        r.value("PROMTOOL-EXIT").as_deref(),
        Some("0"),
        "promtool check metrics:\n{}",
        r.output
    );
    let before = section(&r.output, "before");
    let after = section(&r.output, "after");
    let pod = [
        r#"namespace="shop""#,
        r#"pod="cart-\"0\"""#,
        r#"pod_id="mpod""#,
    ];
    let mut writer = pod.to_vec();
    writer.push(r#"container="writer""#);
    let written = |text: &str| {
        sum(text, "husk_block_write_bytes_total", &writer)
            .unwrap_or_else(|| panic!("no write counter of the writer's drive in:\n{text}"))
    };
    let (w0, w1) = (written(before), written(after));
    assert!(
        w1 >= w0 + BYTES,
        "the writer's drive counted {w0} then {w1} bytes written, for {BYTES} written:\n{}",
        r.output
    );
    assert!(
        sum(after, "husk_block_write_ops_total", &writer).unwrap_or(0.0)
            > sum(before, "husk_block_write_ops_total", &writer).unwrap_or(0.0),
        "{after}"
    );
    // The pod's own series, the node's.
    for (metric, labels, least) in [
        ("husk_vmm_rss_bytes", &pod[..], (1 << 20) as f64),
        ("husk_vm_uptime_seconds", &pod[..], 1.0),
        ("husk_vcpu_exits_total", &pod[..], 1.0),
        ("husk_api_requests_total", &pod[..], 5.0),
        // The shim reached the agent: host-initiated vsock streams.
        ("husk_vsock_connections_total", &pod[..], 1.0),
        ("husk_vsock_rx_bytes_total", &pod[..], 1.0),
        (
            "husk_container_info",
            &[r#"container="writer""#, r#"container_id="mpod""#][..],
            1.0,
        ),
        ("husk_pods", &[][..], 1.0),
        ("husk_pod_start_seconds_count", &[][..], 1.0),
        ("husk_pod_start_seconds_bucket", &[r#"le="+Inf""#][..], 1.0),
    ] {
        let v = sum(after, metric, labels)
            .unwrap_or_else(|| panic!("no {metric} {labels:?} in:\n{after}"));
        assert!(
            v >= least,
            "{metric} {labels:?} is {v}, below {least}:\n{after}"
        );
    }
    assert_eq!(sum(after, "husk_pods", &[]), Some(1.0), "{after}");
    assert_eq!(
        sum(after, "husk_metrics_errors_total", &[]),
        Some(0.0),
        "{after}"
    );
    assert_eq!(
        r.value("PODS-AFTER-DELETE").as_deref(),
        Some("0"),
        "{}",
        r.output
    );
    eprintln!(
        "one scrape of one pod in the node VM: {} s",
        r.value("SCRAPE-SECONDS").unwrap_or_default()
    );
}

#[test]
fn the_exporter_refuses_a_non_loopback_address_unless_allowed() {
    let r = husk_on_host(&["metrics", "--listen", "0.0.0.0:9464"]);
    r.assert_status(1).assert_contains("not a loopback address");
    r.assert_contains("--allow-remote");
    let r = husk_on_host(&["metrics", "--listen", "localhost"]);
    r.assert_status(2);
}
