//! `husk metrics`: the node's Prometheus exporter. One per node, beside
//! containerd: on every scrape of `/metrics` it asks each pod VM under
//! the shim's state directory for fresh counters ([`scrape`]) and serves
//! them, with the node's own numbers, in Prometheus' text format
//! ([`render`]). Its HTTP side ([`serve`]) listens on a loopback address
//! unless told otherwise: what it serves names the node's pods.

mod render;
mod scrape;
mod serve;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use render::{Exposition, Kind, Labels};
use scrape::{NodeMetrics, PodMetrics};

/// Flags of `husk metrics`.
#[derive(Args, Debug)]
pub struct MetricsArgs {
    /// Where to serve /metrics (an IP address and a port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9464")]
    listen: SocketAddr,
    /// Serve on an address other than a loopback one: anyone who reaches
    /// it reads the node's pod names and namespaces.
    #[arg(long)]
    allow_remote: bool,
    /// The shim's state directory (`state_dir` in /etc/husk/config.toml).
    #[arg(long, value_name = "DIR", default_value = "/run/husk")]
    state_dir: PathBuf,
    /// How long each pod's husk may take to write fresh counters before
    /// its last ones are served instead (milliseconds).
    #[arg(long, value_name = "MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    flush_timeout_ms: u64,
}

/// Runs the exporter until it is killed.
pub fn run(args: MetricsArgs) -> anyhow::Result<u8> {
    if !args.listen.ip().is_loopback() && !args.allow_remote {
        bail!(
            "{} is not a loopback address: the exporter serves the node's pod names to whoever \
             connects (--allow-remote to serve there anyway, behind a firewall or a proxy)",
            args.listen
        );
    }
    let exporter = Exporter {
        state_dir: args.state_dir,
        flush_timeout: Duration::from_millis(args.flush_timeout_ms),
        errors: Mutex::new(REASONS.iter().map(|r| (*r, 0)).collect()),
    };
    let listener = std::net::TcpListener::bind(args.listen)
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(listen = %args.listen, state_dir = %exporter.state_dir.display(), "serving /metrics");
    serve::serve(listener, &exporter).context("the exporter's listener failed")?;
    Ok(0)
}

/// Why a pod (or the node's histogram) was left out or served stale: the
/// `reason` label of `husk_metrics_errors_total`, every one shown from
/// the first scrape.
const REASONS: [&str; 6] = [
    "vanished",
    "flush",
    "labels",
    "metrics",
    "boot_times",
    "internal",
];

/// The exporter's state across scrapes.
pub struct Exporter {
    state_dir: PathBuf,
    flush_timeout: Duration,
    /// Errors so far, by reason.
    errors: Mutex<BTreeMap<&'static str, u64>>,
}

impl Exporter {
    /// One scrape, rendered.
    pub fn scrape(&self) -> String {
        let t0 = Instant::now();
        let node = scrape::scrape(&self.state_dir, self.flush_timeout);
        let errors = {
            let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
            for reason in &node.errors {
                *errors.entry(reason).or_default() += 1;
            }
            errors.clone()
        };
        let mut e = expose(&node, &errors);
        e.gauge(
            "husk_metrics_scrape_duration_seconds",
            "How long this scrape took (the pods' flushes and the files' reading).",
            vec![],
            t0.elapsed().as_secs_f64(),
        );
        e.render()
    }
}

/// The labels every series of a pod has.
fn pod_labels(p: &PodMetrics) -> Labels {
    vec![
        ("namespace", p.labels.namespace().to_string()),
        ("pod", p.labels.pod().to_string()),
        ("pod_id", p.labels.pod_id.clone()),
    ]
}

fn with(mut labels: Labels, more: &[(&'static str, &str)]) -> Labels {
    labels.extend(more.iter().map(|(k, v)| (*k, v.to_string())));
    labels
}

/// Everything a scrape found as Prometheus families.
fn expose(node: &NodeMetrics, errors: &BTreeMap<&'static str, u64>) -> Exposition {
    let mut e = Exposition::default();
    e.gauge(
        "husk_pods",
        "Pod microVMs running on the node (booting ones too).",
        vec![],
        node.running as f64,
    );
    let boots = node.boots.clone().unwrap_or_default();
    e.histogram(
        "husk_pod_start_seconds",
        "How long pod microVMs took to start, from the shim's first create to the agent's pod set up.",
        vec![],
        &boots.cumulative(),
        boots.count(),
        boots.sum_seconds,
    );
    for (reason, n) in errors {
        e.counter(
            "husk_metrics_errors_total",
            "Pods left out of a scrape, or served with their last counters, by reason: vanished (gone during the scrape), flush (husk did not write fresh counters in time), labels or metrics (a file that cannot be read), boot_times (the node's histogram cannot be read).",
            vec![("reason", reason.to_string())],
            *n,
        );
    }
    // Declared up front so each family shows its HELP and TYPE even on
    // a node without pods (and in a stable order).
    for (name, help, kind) in FAMILIES {
        e.declare(name, help, *kind);
    }
    for pod in &node.pods {
        expose_pod(&mut e, pod);
    }
    e
}

/// Every per-pod family: name, help, kind.
const FAMILIES: &[(&str, &str, Kind)] = &[
    ("husk_vm_uptime_seconds", "How long the pod's husk has run.", Kind::Gauge),
    ("husk_vmm_rss_bytes", "Resident memory of the pod's husk process (guest memory it touched included).", Kind::Gauge),
    ("husk_vcpu_exits_total", "vCPU exits to husk, by reason (io_in, io_out, mmio_read, mmio_write: device accesses; interrupted: kicks; final: the VM's end).", Kind::Counter),
    ("husk_vcpu_failures_total", "KVM_RUN failures and exits husk does not handle.", Kind::Counter),
    ("husk_api_requests_total", "Requests husk's API answered.", Kind::Counter),
    ("husk_api_errors_total", "Requests husk's API answered with a 4xx or 5xx status.", Kind::Counter),
    ("husk_block_read_bytes_total", "Bytes the guest read from a drive.", Kind::Counter),
    ("husk_block_write_bytes_total", "Bytes the guest wrote to a drive.", Kind::Counter),
    ("husk_block_read_ops_total", "Read requests a drive completed.", Kind::Counter),
    ("husk_block_write_ops_total", "Write requests a drive completed.", Kind::Counter),
    ("husk_block_flush_ops_total", "Flush requests a drive completed.", Kind::Counter),
    ("husk_block_io_errors_total", "Drive requests that failed on the host.", Kind::Counter),
    ("husk_block_invalid_requests_total", "Malformed drive requests from the guest.", Kind::Counter),
    ("husk_net_rx_bytes_total", "Bytes delivered to the guest by a network interface.", Kind::Counter),
    ("husk_net_tx_bytes_total", "Bytes the guest sent on a network interface.", Kind::Counter),
    ("husk_net_rx_frames_total", "Frames delivered to the guest.", Kind::Counter),
    ("husk_net_tx_frames_total", "Frames the guest sent.", Kind::Counter),
    ("husk_net_rx_dropped_frames_total", "Frames from the host dropped before the guest got them.", Kind::Counter),
    ("husk_net_tx_errors_total", "Frames of the guest the host refused.", Kind::Counter),
    ("husk_vsock_rx_bytes_total", "Bytes delivered to the guest over vsock (headers included).", Kind::Counter),
    ("husk_vsock_tx_bytes_total", "Payload bytes the guest sent over vsock.", Kind::Counter),
    ("husk_vsock_rx_packets_total", "vsock packets delivered to the guest.", Kind::Counter),
    ("husk_vsock_tx_packets_total", "vsock packets the guest sent.", Kind::Counter),
    ("husk_vsock_connections_total", "vsock streams opened, by initiator (host: a host program's CONNECT; guest: to a host port).", Kind::Counter),
    ("husk_vsock_connections_closed_total", "vsock streams that ended.", Kind::Counter),
    ("husk_vsock_open_connections", "vsock streams open now.", Kind::Gauge),
    ("husk_memory_hotplug_plugged_bytes", "Hot-pluggable memory the guest has plugged.", Kind::Gauge),
    ("husk_fs_interrupts_total", "virtio-fs used-buffer notifications from the backend raised to the guest.", Kind::Counter),
    ("husk_fs_backend_failures_total", "virtio-fs backends that refused a request or went away.", Kind::Counter),
    ("husk_fs_requests_total", "virtio-fs requests husk relayed to the backend.", Kind::Counter),
    ("husk_fs_invalid_requests_total", "Malformed virtio-fs requests husk returned to the guest unrelayed.", Kind::Counter),
    ("husk_fs_request_bytes_total", "Request bytes husk copied from the guest for the virtio-fs backend.", Kind::Counter),
    ("husk_fs_reply_bytes_total", "Reply bytes husk copied from the virtio-fs backend into the guest.", Kind::Counter),
    ("husk_container_info", "A container of the pod (1): its name and id.", Kind::Gauge),
];

fn expose_pod(e: &mut Exposition, p: &PodMetrics) {
    let base = pod_labels(p);
    let help = |name: &str| {
        FAMILIES
            .iter()
            .find(|(n, _, _)| *n == name)
            .map_or("", |(_, h, _)| h)
    };
    let counter = |e: &mut Exposition, name: &'static str, labels: Labels, v: u64| {
        e.counter(name, help(name), labels, v)
    };
    let line = &p.line;
    e.gauge(
        "husk_vm_uptime_seconds",
        help("husk_vm_uptime_seconds"),
        base.clone(),
        line.uptime_ms as f64 / 1000.0,
    );
    if let Some(rss) = p.rss_bytes {
        e.gauge(
            "husk_vmm_rss_bytes",
            help("husk_vmm_rss_bytes"),
            base.clone(),
            rss as f64,
        );
    }
    let v = &line.vcpu;
    for (reason, n) in [
        ("io_in", v.exit_io_in),
        ("io_out", v.exit_io_out),
        ("mmio_read", v.exit_mmio_read),
        ("mmio_write", v.exit_mmio_write),
        ("interrupted", v.exit_interrupted),
        ("final", v.exit_final),
    ] {
        counter(
            e,
            "husk_vcpu_exits_total",
            with(base.clone(), &[("reason", reason)]),
            n,
        );
    }
    counter(e, "husk_vcpu_failures_total", base.clone(), v.failures);
    counter(
        e,
        "husk_api_requests_total",
        base.clone(),
        line.api.requests,
    );
    counter(e, "husk_api_errors_total", base.clone(), line.api.failures);
    for (drive, b) in &line.devices.block {
        let container = p.labels.drive_container(drive).unwrap_or("");
        let l = with(base.clone(), &[("drive", drive), ("container", container)]);
        for (name, n) in [
            ("husk_block_read_bytes_total", b.read_bytes),
            ("husk_block_write_bytes_total", b.write_bytes),
            ("husk_block_read_ops_total", b.read_count),
            ("husk_block_write_ops_total", b.write_count),
            ("husk_block_flush_ops_total", b.flush_count),
            ("husk_block_io_errors_total", b.io_errors),
            ("husk_block_invalid_requests_total", b.invalid_requests),
        ] {
            counter(e, name, l.clone(), n);
        }
    }
    for (iface, n) in &line.devices.net {
        let l = with(base.clone(), &[("interface", iface)]);
        for (name, v) in [
            ("husk_net_rx_bytes_total", n.rx_bytes),
            ("husk_net_tx_bytes_total", n.tx_bytes),
            ("husk_net_rx_frames_total", n.rx_frames),
            ("husk_net_tx_frames_total", n.tx_frames),
            ("husk_net_rx_dropped_frames_total", n.rx_dropped),
            ("husk_net_tx_errors_total", n.tx_errors),
        ] {
            counter(e, name, l.clone(), v);
        }
    }
    for vs in line.devices.vsock.values() {
        for (name, v) in [
            ("husk_vsock_rx_bytes_total", vs.rx_bytes),
            ("husk_vsock_tx_bytes_total", vs.tx_bytes),
            ("husk_vsock_rx_packets_total", vs.rx_packets),
            ("husk_vsock_tx_packets_total", vs.tx_packets),
            ("husk_vsock_connections_closed_total", vs.closed_connections),
        ] {
            counter(e, name, base.clone(), v);
        }
        for (initiator, v) in [
            ("host", vs.host_connections),
            ("guest", vs.guest_connections),
        ] {
            counter(
                e,
                "husk_vsock_connections_total",
                with(base.clone(), &[("initiator", initiator)]),
                v,
            );
        }
        let opened = vs.host_connections.saturating_add(vs.guest_connections);
        e.gauge(
            "husk_vsock_open_connections",
            help("husk_vsock_open_connections"),
            base.clone(),
            opened.saturating_sub(vs.closed_connections) as f64,
        );
    }
    for m in line.devices.mem.values() {
        e.gauge(
            "husk_memory_hotplug_plugged_bytes",
            help("husk_memory_hotplug_plugged_bytes"),
            base.clone(),
            m.plugged_bytes.saturating_sub(m.unplugged_bytes) as f64,
        );
    }
    for (fs, f) in &line.devices.fs {
        let l = with(base.clone(), &[("fs", fs)]);
        counter(e, "husk_fs_interrupts_total", l.clone(), f.interrupts);
        counter(
            e,
            "husk_fs_backend_failures_total",
            l.clone(),
            f.backend_failures,
        );
        counter(e, "husk_fs_requests_total", l.clone(), f.requests);
        counter(
            e,
            "husk_fs_invalid_requests_total",
            l.clone(),
            f.invalid_requests,
        );
        counter(
            e,
            "husk_fs_request_bytes_total",
            l.clone(),
            f.bytes_to_backend,
        );
        counter(e, "husk_fs_reply_bytes_total", l, f.bytes_from_backend);
    }
    for (id, name) in &p.labels.containers {
        e.gauge(
            "husk_container_info",
            help("husk_container_info"),
            with(base.clone(), &[("container", name), ("container_id", id)]),
            1.0,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use husk_api_types::metrics::{BlockCounters, BootHistogram, MetricsLine, PodLabels};

    fn pod() -> PodMetrics {
        let mut line = MetricsLine {
            uptime_ms: 1500,
            ..Default::default()
        };
        line.devices.block.insert(
            "slot0".into(),
            BlockCounters {
                write_bytes: 8 << 20,
                write_count: 64,
                ..Default::default()
            },
        );
        line.devices
            .block
            .insert("image0".into(), BlockCounters::default());
        line.devices.fs.insert(
            "share".into(),
            husk_api_types::metrics::FsCounters {
                interrupts: 12,
                backend_failures: 1,
                requests: 5,
                bytes_from_backend: 300,
                ..Default::default()
            },
        );
        let mut labels = PodLabels {
            containerd_namespace: "k8s.io".into(),
            pod_id: "0123abcd".into(),
            kubernetes_namespace: Some("shop".into()),
            kubernetes_pod: Some("cart \"blue\"".into()),
            ..Default::default()
        };
        labels.containers.insert("c1".into(), "cart".into());
        labels.drives.insert("slot0".into(), vec!["c1".into()]);
        labels
            .drives
            .insert("image0".into(), vec!["c1".into(), "c2".into()]);
        PodMetrics {
            labels,
            line,
            rss_bytes: Some(50 << 20),
        }
    }

    #[test]
    fn a_pod_s_series_carry_its_labels() {
        let mut h = BootHistogram::default();
        h.observe(1.5);
        h.observe(7.0);
        let node = NodeMetrics {
            pods: vec![pod()],
            running: 2,
            errors: vec![],
            boots: Some(h),
        };
        let errors = REASONS.iter().map(|r| (*r, 0)).collect();
        let text = expose(&node, &errors).render();
        let base = r#"namespace="shop",pod="cart \"blue\"",pod_id="0123abcd""#;
        for want in [
            "husk_pods 2\n".to_string(),
            format!("husk_block_write_bytes_total{{{base},drive=\"slot0\",container=\"cart\"}} 8388608\n"),
            format!("husk_block_write_ops_total{{{base},drive=\"slot0\",container=\"cart\"}} 64\n"),
            // The image's shared layers belong to no one container.
            format!("husk_block_read_bytes_total{{{base},drive=\"image0\",container=\"\"}} 0\n"),
            format!("husk_vmm_rss_bytes{{{base}}} 52428800\n"),
            format!("husk_fs_interrupts_total{{{base},fs=\"share\"}} 12\n"),
            format!("husk_fs_backend_failures_total{{{base},fs=\"share\"}} 1\n"),
            format!("husk_fs_requests_total{{{base},fs=\"share\"}} 5\n"),
            format!("husk_fs_reply_bytes_total{{{base},fs=\"share\"}} 300\n"),
            format!("husk_vm_uptime_seconds{{{base}}} 1.5\n"),
            format!("husk_vcpu_exits_total{{{base},reason=\"mmio_write\"}} 0\n"),
            format!("husk_container_info{{{base},container=\"cart\",container_id=\"c1\"}} 1\n"),
            "husk_pod_start_seconds_bucket{le=\"2\"} 1\n".to_string(),
            "husk_pod_start_seconds_bucket{le=\"10\"} 2\n".to_string(),
            "husk_pod_start_seconds_bucket{le=\"+Inf\"} 2\n".to_string(),
            "husk_pod_start_seconds_sum 8.5\n".to_string(),
            "husk_pod_start_seconds_count 2\n".to_string(),
            "husk_metrics_errors_total{reason=\"vanished\"} 0\n".to_string(),
            "# TYPE husk_net_rx_bytes_total counter\n".to_string(),
        ] {
            assert!(text.contains(&want), "no {want:?} in\n{text}");
        }
        // Each family's TYPE once.
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            assert_eq!(text.matches(&format!("{line}\n")).count(), 1, "{line}");
        }
    }

    #[test]
    fn an_empty_node_still_has_every_family_and_a_zero_histogram() {
        let errors = BTreeMap::from([("metrics", 3)]);
        let text = expose(&NodeMetrics::default(), &errors).render();
        assert!(text.contains("husk_pods 0\n"), "{text}");
        assert!(text.contains("husk_pod_start_seconds_count 0\n"), "{text}");
        assert!(text.contains("husk_metrics_errors_total{reason=\"metrics\"} 3\n"));
        for (name, _, _) in FAMILIES {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name}");
        }
    }
}
