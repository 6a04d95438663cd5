//! `kubectl port-forward` to a pod, through containerd's CRI PortForward
//! and its streaming server (`husk-cri port-forward`,
//! tests/cri/portforward.rs), with the husk handler and, as the honest
//! twin, runc: a page served on a port of the pod comes back through the
//! forward once and to 8 clients at once, a page served on `[::1]` only
//! comes back too (containerd falls back to IPv6), and a port nothing
//! listens on gets an error and an ended stream, not a hang; the pod's
//! `hostPort` (the CNI portmap plugin's DNAT on the node) serves the page
//! too. Under husk the connection containerd dials in the pod's namespace
//! on the node is steered to the shim (BPF sk_lookup) and carried into
//! the guest over vsock.

use husk_tests::containerd;

fn port_forward(handler: &str) -> husk_tests::RunResult {
    let r = containerd::cri_payload(&format!("pf-{handler}")).run(&containerd::script(
        "--cri",
        &format!(
            r#"husk-cri port-forward --handler {handler} --image husk.local/busybox:1 --log-dir /tmp/cri-logs
echo "CRI-PF-EXIT $?"
echo "HUSK-LEFT $(husk_count)"
"#
        ),
    ));
    let expect = [
        ("CRI-PF-EXIT", "0"),
        ("CRI-PF one", "true"),
        ("CRI-PF many", "8"),
        ("CRI-PF ipv6-loopback", "true"),
        ("CRI-PF host-port", "true"),
        ("CRI-PF closed-data", "0"),
        ("CRI-PF closed-error", "true"),
        ("HUSK-LEFT", "0"),
    ];
    for (key, want) in expect {
        assert_eq!(r.value(key).as_deref(), Some(want), "{key}:\n{}", r.output);
    }
    r
}

#[test]
fn kubectl_port_forward_reaches_a_port_in_the_microvm() {
    port_forward("husk");
}

#[test]
fn the_same_port_forward_works_with_runc() {
    port_forward("runc");
}
