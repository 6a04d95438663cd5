//! The pod's network. containerd (CRI, through CNI) or `ctr run --with-ns`
//! hands the pod a network namespace holding a veth (or any ethernet
//! device) with the pod's addresses and routes. The shim puts a tap beside
//! it in that namespace and joins the two with tc: everything arriving on
//! one is redirected out of the other (an ingress qdisc and a matchall
//! filter with a mirred action on each), so the guest's virtio-net device
//! is, frame for frame, the veth's other end. The guest's interface gets
//! the veth's MAC, addresses and routes (CreateSandbox), and husk runs in
//! the namespace so it can open the tap.
//!
//! iproute2's `ip` and `tc` do the work, run inside the namespace.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use husk_protocol::{Interface, Route};
use serde::Deserialize;

/// The tap's name in the pod's namespace.
pub const TAP: &str = "husktap0";
/// The guest's interface name.
const GUEST_IFACE: &str = "eth0";

/// Why the pod's network could not be wired.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The namespace could not be opened.
    #[error("cannot open the network namespace {}", path.display())]
    Netns {
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A command failed.
    #[error("{command}: {detail}")]
    Command {
        /// What ran.
        command: String,
        /// Its error output or why it could not run.
        detail: String,
    },
    /// `ip -j` printed something else than expected.
    #[error("cannot read `ip -j {what}`: {detail}")]
    Parse {
        /// Which listing.
        what: String,
        /// The parser's message.
        detail: String,
    },
}

/// The wired network of a pod.
#[derive(Debug, Clone)]
pub struct PodNetwork {
    /// The namespace.
    pub netns: PathBuf,
    /// The device the tap is joined with.
    pub device: String,
    /// The guest's interface: the device's MAC, MTU and addresses.
    pub interface: Interface,
    /// The device's routes with a gateway, for the guest.
    pub routes: Vec<Route>,
}

#[derive(Deserialize)]
struct Link {
    ifname: String,
    #[serde(default)]
    link_type: String,
    #[serde(default)]
    address: String,
    #[serde(default)]
    mtu: Option<u32>,
    #[serde(default)]
    addr_info: Vec<Addr>,
}

#[derive(Deserialize)]
struct Addr {
    family: String,
    local: String,
    prefixlen: u8,
    #[serde(default)]
    scope: String,
}

#[derive(Deserialize)]
struct RouteEntry {
    dst: String,
    #[serde(default)]
    gateway: Option<String>,
    #[serde(default)]
    dev: Option<String>,
}

/// Runs `program args` inside the namespace `netns`; returns its stdout.
fn run_in(netns: &Path, program: &str, args: &[&str]) -> Result<String, NetError> {
    let ns = std::fs::File::open(netns).map_err(|source| NetError::Netns {
        path: netns.to_path_buf(),
        source,
    })?;
    let fd = ns.as_raw_fd();
    let mut cmd = Command::new(program);
    cmd.args(args);
    // SAFETY: setns(2) is async-signal-safe; the closure touches only the
    // descriptor, which stays open until the child exec'd.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let command = format!("{program} {}", args.join(" "));
    let out = cmd.output().map_err(|e| NetError::Command {
        command: command.clone(),
        detail: e.to_string(),
    })?;
    drop(ns);
    if !out.status.success() {
        return Err(NetError::Command {
            command,
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What the guest needs from the listings of `ip -j addr` and `ip -j
/// route` (both families): the first ethernet device other than the tap,
/// its addresses of global scope, and its routes through a gateway.
fn plan(
    addrs_json: &str,
    routes_json: &[&str],
) -> Result<Option<(String, Interface, Vec<Route>)>, NetError> {
    let links: Vec<Link> = serde_json::from_str(addrs_json).map_err(|e| NetError::Parse {
        what: "addr".into(),
        detail: e.to_string(),
    })?;
    let Some(link) = links
        .into_iter()
        .find(|l| l.link_type == "ether" && l.ifname != TAP)
    else {
        return Ok(None);
    };
    let addresses = link
        .addr_info
        .iter()
        .filter(|a| (a.family == "inet" || a.family == "inet6") && a.scope == "global")
        .map(|a| format!("{}/{}", a.local, a.prefixlen))
        .collect();
    let mut routes = Vec::new();
    for json in routes_json {
        let entries: Vec<RouteEntry> = serde_json::from_str(json).map_err(|e| NetError::Parse {
            what: "route".into(),
            detail: e.to_string(),
        })?;
        for r in entries {
            if r.gateway.is_some() && r.dev.as_deref() == Some(link.ifname.as_str()) {
                routes.push(Route {
                    destination: r.dst,
                    gateway: r.gateway,
                    device: Some(GUEST_IFACE.into()),
                });
            }
        }
    }
    let interface = Interface {
        name: GUEST_IFACE.into(),
        mac: link.address,
        device_mac: None,
        mtu: link.mtu,
        addresses,
    };
    Ok(Some((link.ifname, interface, routes)))
}

/// Wires the pod's namespace: a tap joined with its ethernet device, the
/// tap owned by `owner` (uid, gid: a jailed husk's, which may then attach
/// to it without CAP_NET_ADMIN). `None` when the namespace has no such
/// device (loopback only).
pub fn setup(netns: &Path, owner: Option<(u32, u32)>) -> Result<Option<PodNetwork>, NetError> {
    let addrs = run_in(netns, "ip", &["-j", "addr", "show"])?;
    let v4 = run_in(netns, "ip", &["-j", "-4", "route", "show"])?;
    let v6 = run_in(netns, "ip", &["-j", "-6", "route", "show"])?;
    let Some((device, interface, routes)) = plan(&addrs, &[&v4, &v6])? else {
        return Ok(None);
    };
    let net = PodNetwork {
        netns: netns.to_path_buf(),
        device: device.clone(),
        interface,
        routes,
    };
    let mtu = net.interface.mtu.unwrap_or(1500).to_string();
    let (uid, gid) = owner.map_or((String::new(), String::new()), |(u, g)| {
        (u.to_string(), g.to_string())
    });
    let mut tap = vec!["tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr"];
    if owner.is_some() {
        tap.extend(["user", uid.as_str(), "group", gid.as_str()]);
    }
    let steps: Vec<(&str, Vec<&str>)> = vec![
        ("ip", tap),
        ("ip", vec!["link", "set", TAP, "mtu", &mtu, "up"]),
        ("tc", vec!["qdisc", "add", "dev", &device, "ingress"]),
        (
            "tc",
            vec![
                "filter", "add", "dev", &device, "parent", "ffff:", "matchall", "action", "mirred",
                "egress", "redirect", "dev", TAP,
            ],
        ),
        ("tc", vec!["qdisc", "add", "dev", TAP, "ingress"]),
        (
            "tc",
            vec![
                "filter", "add", "dev", TAP, "parent", "ffff:", "matchall", "action", "mirred",
                "egress", "redirect", "dev", &device,
            ],
        ),
    ];
    for (done, (program, args)) in steps.into_iter().enumerate() {
        if let Err(e) = run_in(netns, program, &args) {
            undo(&net, done);
            return Err(e);
        }
    }
    Ok(Some(net))
}

/// Undoes [`setup`]: the tap (with its qdisc and filter) and the device's
/// ingress qdisc (with its filter). Errors are only logged: the namespace
/// may be gone already.
pub fn teardown(net: &PodNetwork) {
    undo(net, usize::MAX);
}

/// Undoes the first `done` steps of [`setup`], and only those: a device
/// that had an ingress qdisc before (setup's third step failed on it)
/// keeps it.
fn undo(net: &PodNetwork, done: usize) {
    let mut steps = Vec::new();
    if done > 0 {
        steps.push(("ip", vec!["link", "del", TAP]));
    }
    if done > 2 {
        steps.push((
            "tc",
            vec!["qdisc", "del", "dev", net.device.as_str(), "ingress"],
        ));
    }
    for (program, args) in steps {
        if let Err(e) = run_in(&net.netns, program, &args) {
            tracing::warn!(error = %crate::error::Chain(&e), "cannot undo the pod's network wiring");
        }
    }
}

/// Whether `netns` is the network namespace the shim runs in: the node's
/// (a spec naming `/proc/1/ns/net`, say). Wiring it would redirect the
/// node's own NIC into the guest.
pub fn is_the_nodes(netns: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let id = |p: &Path| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
    match (id(netns), id(Path::new("/proc/self/ns/net"))) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// The network namespace path the spec names, if any.
pub fn netns_path(spec: &oci_spec::runtime::Spec) -> Option<PathBuf> {
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Network)?
        .path()
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shims_own_network_namespace_is_the_nodes() {
        assert!(is_the_nodes(Path::new("/proc/self/ns/net")));
        assert!(is_the_nodes(Path::new("/proc/thread-self/ns/net")));
        assert!(!is_the_nodes(Path::new("/proc/self/ns/uts")));
        assert!(!is_the_nodes(Path::new("/nonexistent/netns")));
    }

    #[test]
    fn the_guest_gets_the_devices_mac_addresses_and_gateway_routes() {
        let addrs = r#"[
          {"ifindex":1,"ifname":"lo","link_type":"loopback","address":"00:00:00:00:00:00","mtu":65536,
           "addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8,"scope":"host"}]},
          {"ifindex":3,"ifname":"eth0","link_type":"ether","address":"9a:1b:2c:3d:4e:5f","mtu":1450,
           "addr_info":[{"family":"inet","local":"10.88.0.2","prefixlen":16,"scope":"global"},
                        {"family":"inet6","local":"fd00::2","prefixlen":64,"scope":"global"},
                        {"family":"inet6","local":"fe80::1","prefixlen":64,"scope":"link"}]}
        ]"#;
        let v4 = r#"[{"dst":"default","gateway":"10.88.0.1","dev":"eth0"},
                     {"dst":"10.88.0.0/16","dev":"eth0","protocol":"kernel","scope":"link","prefsrc":"10.88.0.2"}]"#;
        let v6 = r#"[{"dst":"fd00::/64","dev":"eth0"},{"dst":"default","gateway":"fd00::1","dev":"eth0"}]"#;
        let (device, iface, routes) = plan(addrs, &[v4, v6]).unwrap().unwrap();
        assert_eq!(device, "eth0");
        assert_eq!(iface.mac, "9a:1b:2c:3d:4e:5f");
        assert_eq!(iface.mtu, Some(1450));
        assert_eq!(iface.addresses, vec!["10.88.0.2/16", "fd00::2/64"]);
        assert_eq!(
            routes,
            vec![
                Route {
                    destination: "default".into(),
                    gateway: Some("10.88.0.1".into()),
                    device: Some("eth0".into())
                },
                Route {
                    destination: "default".into(),
                    gateway: Some("fd00::1".into()),
                    device: Some("eth0".into())
                },
            ]
        );
    }

    #[test]
    fn loopback_only_means_no_network_and_garbage_is_an_error() {
        let lo = r#"[{"ifname":"lo","link_type":"loopback","addr_info":[]}]"#;
        assert!(plan(lo, &["[]"]).unwrap().is_none());
        assert!(matches!(plan("not json", &[]), Err(NetError::Parse { .. })));
    }
}
