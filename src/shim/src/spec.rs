//! The OCI spec containerd wrote for a container, made fit for the guest:
//! what names the host (its network namespace, namespace paths, hooks,
//! host-path bind mounts, the host's cgroup path) is replaced or dropped.
//! Bind mounts of host directories and regular files become volumes, the
//! mount's source naming volume N (husk_protocol::volume_source): with
//! volumes = "share" [`share_volumes`] points it at the volume's entry in
//! the pod's virtio-fs share; with "copy" it names the copy's entry on the
//! container's volumes disk. Bind mounts of
//! the node's sockets, FIFOs and device nodes cannot reach into a VM: they
//! are reported ([`Adjusted::special_mounts`]) and the container refused,
//! never silently left without them.

use std::path::PathBuf;

use oci_spec::runtime::{LinuxNamespace, LinuxNamespaceType, MountBuilder, Spec};

/// A bind mount of the node's directory or regular file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// The node's path.
    pub source: PathBuf,
    /// How the spec binds it (read-only, recursive, propagation).
    pub mode: crate::share::BindMode,
}

/// What changed: the volumes, and what was dropped (for the log).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Adjusted {
    /// The node's paths the container binds, volume N at index N.
    pub volumes: Vec<Volume>,
    /// Bind mounts whose source is a socket, a FIFO or a device node (or
    /// anything else neither a directory nor a regular file): what they
    /// are, by destination, in the spec's order.
    pub special_mounts: Vec<SpecialMount>,
    /// Whether hooks were dropped.
    pub dropped_hooks: bool,
}

/// A bind mount of a node's special file.
#[derive(Debug, PartialEq, Eq)]
pub struct SpecialMount {
    /// Where the container wanted it.
    pub destination: String,
    /// The node's path.
    pub source: PathBuf,
    /// What it is: "socket", "FIFO", "character device", ...
    pub kind: &'static str,
}

impl std::fmt::Display for SpecialMount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (the node's {} {})",
            self.destination,
            self.kind,
            self.source.display()
        )
    }
}

/// What kind of special file `md` describes.
fn special_kind(md: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = md.file_type();
    if t.is_socket() {
        "socket"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else {
        "special file"
    }
}

/// The guest's own /dev/shm for a container whose spec binds the host's
/// (CRI binds the sandbox's shm directory): a tmpfs of the size runc's
/// default gives, private to the container.
fn guest_shm() -> Option<oci_spec::runtime::Mount> {
    MountBuilder::default()
        .destination("/dev/shm")
        .typ("tmpfs")
        .source("shm")
        .options(
            ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]
                .map(String::from)
                .to_vec(),
        )
        .build()
        .ok()
}

/// The annotation naming the pod's sandbox (CRI).
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// Whether `id` can name a pod: its state directory under the shim's
/// state dir and husk's `--id`. The VMM API's rule: 1 to 64 of A-Z a-z
/// 0-9 _ -. containerd checks its own ids, but the sandbox-id annotation
/// is whatever string the client put there (`..`, `/etc`, ...).
pub fn valid_pod_id(id: &str) -> bool {
    husk_api_types::valid_id(id)
}

/// Whether `id` can name a container's files in the pod's directory:
/// containerd's identifier rule (alphanumeric runs joined by single
/// `.`, `_` or `-`, at most 76 bytes), so never `..` nor a `/`.
pub fn valid_container_id(id: &str) -> bool {
    let b = id.as_bytes();
    let joiner = |c: u8| matches!(c, b'.' | b'_' | b'-');
    !b.is_empty()
        && b.len() <= 76
        && b.iter().all(|&c| c.is_ascii_alphanumeric() || joiner(c))
        && !joiner(b[0])
        && !joiner(b[b.len() - 1])
        && !b.windows(2).any(|w| joiner(w[0]) && joiner(w[1]))
}

/// The node's namespaces a pod's spec asks to share (Kubernetes'
/// hostNetwork, hostIPC, hostPID leave the namespace out of the sandbox's
/// spec): a pod in a microVM has its own kernel, so it cannot have them.
pub fn host_namespaces(spec: &Spec) -> Vec<&'static str> {
    let own = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .map(|ns| ns.iter().map(|n| n.typ()).collect::<Vec<_>>())
        .unwrap_or_default();
    [
        (LinuxNamespaceType::Network, "network"),
        (LinuxNamespaceType::Ipc, "IPC"),
        (LinuxNamespaceType::Pid, "PID"),
    ]
    .into_iter()
    .filter(|(t, _)| !own.contains(t))
    .map(|(_, name)| name)
    .collect()
}

/// The pod a container belongs to: its sandbox id, or its own id.
pub fn sandbox_id(spec: &Spec, id: &str) -> String {
    spec.annotations()
        .as_ref()
        .and_then(|a| a.get(SANDBOX_ID))
        .filter(|s| !s.is_empty())
        .cloned()
        .unwrap_or_else(|| id.to_string())
}

/// Rewrites `spec` for the guest. `sandbox_pid` is the guest pid of the
/// pod's sandbox container, whose namespaces later containers join where
/// containerd names a path.
pub fn for_guest(spec: &mut Spec, sandbox_pid: Option<u32>) -> Adjusted {
    let mut adjusted = Adjusted::default();
    if spec.hooks().is_some() {
        spec.set_hooks(None);
        adjusted.dropped_hooks = true;
    }
    if let Some(linux) = spec.linux_mut() {
        // The guest's cgroup tree is the agent's; containerd's path names
        // the host's (and may be in the systemd driver's slice:prefix:name
        // form). The agent picks the container's cgroup.
        linux.set_cgroups_path(None);
        if let Some(namespaces) = linux.namespaces_mut() {
            // The VM is the pod: its network namespace is the guest's own.
            namespaces.retain(|n| n.typ() != LinuxNamespaceType::Network);
            let rewritten: Vec<LinuxNamespace> = namespaces
                .iter()
                .map(|n| {
                    let mut n = n.clone();
                    if n.path().is_some() {
                        // A host path (/proc/<host pid>/ns/ipc of the pause
                        // container): the sandbox's namespace in the guest.
                        let path = sandbox_pid
                            .map(|pid| format!("/proc/{pid}/ns/{}", ns_file(n.typ())).into());
                        n.set_path(path);
                    }
                    n
                })
                .collect();
            *namespaces = rewritten;
        }
    }
    if let Some(mounts) = spec.mounts_mut() {
        let mut kept = Vec::with_capacity(mounts.len());
        for mut m in mounts.drain(..) {
            let bind = m.typ().as_deref() == Some("bind")
                || m.options()
                    .iter()
                    .flatten()
                    .any(|o| o == "bind" || o == "rbind");
            if !bind {
                kept.push(m);
                continue;
            }
            if m.destination() == std::path::Path::new("/dev/shm") {
                kept.extend(guest_shm());
                continue;
            }
            let source = m.source().clone().unwrap_or_default();
            // A missing source stays a volume: copying it fails with its name.
            if let Ok(md) = std::fs::metadata(&source) {
                if !md.is_dir() && !md.is_file() {
                    adjusted.special_mounts.push(SpecialMount {
                        destination: m.destination().display().to_string(),
                        kind: special_kind(&md),
                        source,
                    });
                    continue;
                }
            }
            m.set_source(Some(
                husk_protocol::volume_source(adjusted.volumes.len()).into(),
            ));
            let mode = crate::share::BindMode::from_options(
                m.options().iter().flatten().map(String::as_str),
            );
            adjusted.volumes.push(Volume { source, mode });
            kept.push(m);
        }
        *mounts = kept;
    }
    adjusted
}

/// Points each mount of volume N (as [`for_guest`] left it) at `entries[N]`
/// in the pod's share, and binds after it each of `submounts[N]` (the
/// node's mounts under a read-only recursive volume, which in the guest
/// would otherwise inherit the read-only bind's flag: see
/// [`crate::share::submounts`]) with its own flags.
pub fn share_volumes(
    spec: &mut Spec,
    entries: &[String],
    submounts: &[Vec<crate::share::Submount>],
) {
    let Some(mounts) = spec.mounts_mut() else {
        return;
    };
    let mut rewritten = Vec::with_capacity(mounts.len());
    for mut m in mounts.drain(..) {
        let n = m
            .source()
            .as_ref()
            .and_then(|s| s.to_str())
            .and_then(husk_protocol::volume_entry)
            .and_then(Result::ok);
        let Some((n, entry)) = n.and_then(|n| Some((n, entries.get(n)?))) else {
            rewritten.push(m);
            continue;
        };
        m.set_source(Some(
            husk_protocol::share_source(crate::share::TAG, entry).into(),
        ));
        let options: Vec<String> = m
            .options()
            .iter()
            .flatten()
            .filter(|o| *o != "ro" && *o != "rw")
            .cloned()
            .collect();
        let destination = m.destination().clone();
        rewritten.push(m);
        for sub in submounts.get(n).into_iter().flatten() {
            let mut options = options.clone();
            options.push(if sub.read_only { "ro" } else { "rw" }.into());
            let source = format!("{entry}/{}", sub.path.display());
            let built = MountBuilder::default()
                .destination(destination.join(&sub.path))
                .typ("bind")
                .source(husk_protocol::share_source(crate::share::TAG, &source))
                .options(options)
                .build();
            if let Ok(b) = built {
                rewritten.push(b);
            }
        }
    }
    *mounts = rewritten;
}

fn ns_file(t: LinuxNamespaceType) -> &'static str {
    match t {
        LinuxNamespaceType::Mount => "mnt",
        LinuxNamespaceType::Cgroup => "cgroup",
        LinuxNamespaceType::Uts => "uts",
        LinuxNamespaceType::Ipc => "ipc",
        LinuxNamespaceType::User => "user",
        LinuxNamespaceType::Pid => "pid",
        LinuxNamespaceType::Network => "net",
        LinuxNamespaceType::Time => "time",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> Spec {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn host_references_are_removed() {
        let mut s = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "hooks": {"prestart": [{"path": "/usr/bin/true"}]},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/x/hosts", "options": ["rbind", "ro"]},
                {"destination": "/data", "source": "/srv/data", "options": ["bind"]}
            ],
            "linux": {
                "cgroupsPath": "kubepods-besteffort.slice:cri-containerd:abc",
                "namespaces": [
                    {"type": "pid"},
                    {"type": "network", "path": "/var/run/netns/cni-1"},
                    {"type": "ipc", "path": "/proc/4242/ns/ipc"},
                    {"type": "uts", "path": "/proc/4242/ns/uts"},
                    {"type": "mount"}
                ]
            }
        }));
        let a = for_guest(&mut s, Some(7));
        assert!(a.dropped_hooks && s.hooks().is_none());
        // Host paths become volume entries, in order; the mounts stay.
        assert_eq!(
            a.volumes,
            vec![
                Volume {
                    source: PathBuf::from("/var/lib/x/hosts"),
                    mode: crate::share::BindMode::from_options(["rbind", "ro"])
                },
                Volume {
                    source: PathBuf::from("/srv/data"),
                    mode: crate::share::BindMode::from_options(["bind"])
                },
            ]
        );
        let mounts = s.mounts().as_ref().unwrap();
        let sources: Vec<String> = mounts
            .iter()
            .map(|m| m.source().as_ref().unwrap().display().to_string())
            .collect();
        assert_eq!(sources, ["proc", "/.husk-volumes/0", "/.husk-volumes/1"]);
        assert_eq!(mounts[1].destination(), std::path::Path::new("/etc/hosts"));
        // Shared, each volume names its entry in the pod's share.
        let mut shared = s.clone();
        // /etc/hosts (volume 0) is read-only and recursive: what the node
        // mounted under it is bound after it with its own flags.
        let sub = |p: &str, read_only| crate::share::Submount {
            path: p.into(),
            read_only,
        };
        share_volumes(
            &mut shared,
            &["v4".into(), "v0".into()],
            &[vec![sub("tmp", false), sub("tmp/ro", true)], vec![]],
        );
        let sources: Vec<String> = shared
            .mounts()
            .iter()
            .flatten()
            .map(|m| m.source().as_ref().unwrap().display().to_string())
            .collect();
        assert_eq!(
            sources,
            [
                "proc",
                "/.husk-shares/husk-pod/v4",
                "/.husk-shares/husk-pod/v4/tmp",
                "/.husk-shares/husk-pod/v4/tmp/ro",
                "/.husk-shares/husk-pod/v0"
            ]
        );
        let added: Vec<(String, String)> = shared.mounts().as_ref().unwrap()[2..4]
            .iter()
            .map(|m| {
                let o = m.options().as_ref().unwrap().join(",");
                (m.destination().display().to_string(), o)
            })
            .collect();
        assert_eq!(
            added,
            [
                ("/etc/hosts/tmp".to_string(), "rbind,rw".to_string()),
                ("/etc/hosts/tmp/ro".to_string(), "rbind,ro".to_string())
            ]
        );
        assert!(a.special_mounts.is_empty());
        let linux = s.linux().as_ref().unwrap();
        assert!(linux.cgroups_path().is_none());
        let ns: Vec<(LinuxNamespaceType, Option<String>)> = linux
            .namespaces()
            .iter()
            .flatten()
            .map(|n| (n.typ(), n.path().as_ref().map(|p| p.display().to_string())))
            .collect();
        assert_eq!(
            ns,
            vec![
                (LinuxNamespaceType::Pid, None),
                (LinuxNamespaceType::Ipc, Some("/proc/7/ns/ipc".into())),
                (LinuxNamespaceType::Uts, Some("/proc/7/ns/uts".into())),
                (LinuxNamespaceType::Mount, None),
            ]
        );
        // Without a sandbox in the VM a namespace path becomes a new one.
        let mut s2 = spec(
            serde_json::json!({"ociVersion": "1.0.2", "linux": {"namespaces": [{"type": "ipc", "path": "/proc/1/ns/ipc"}]}}),
        );
        for_guest(&mut s2, None);
        let n = &s2.linux().as_ref().unwrap().namespaces().as_ref().unwrap()[0];
        assert!(n.path().is_none());
    }

    #[test]
    fn the_hosts_shm_becomes_the_guests_and_special_files_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("app.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let mut s = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "mounts": [
                {"destination": "/dev/shm", "type": "bind", "source": "/run/containerd/x/shm", "options": ["rbind", "rw"]},
                {"destination": "/dev/null-too", "type": "bind", "source": "/dev/null", "options": ["bind"]},
                {"destination": "/run/app.sock", "type": "bind", "source": sock, "options": ["rbind"]}
            ]
        }));
        let a = for_guest(&mut s, None);
        assert!(a.volumes.is_empty());
        assert_eq!(
            a.special_mounts,
            [
                SpecialMount {
                    destination: "/dev/null-too".into(),
                    source: "/dev/null".into(),
                    kind: "character device",
                },
                SpecialMount {
                    destination: "/run/app.sock".into(),
                    source: sock.clone(),
                    kind: "socket",
                },
            ]
        );
        assert_eq!(
            a.special_mounts[1].to_string(),
            format!("/run/app.sock (the node's socket {})", sock.display())
        );
        let mounts = s.mounts().as_ref().unwrap();
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].typ().as_deref(), Some("tmpfs"));
        assert_eq!(mounts[0].destination(), std::path::Path::new("/dev/shm"));
    }

    #[test]
    fn the_sandbox_id_is_the_annotation_or_the_container_s_own() {
        let annotated = spec(serde_json::json!({"ociVersion": "1.0.2", "annotations": {
            "io.husk.vcpus": "2"
        }}));
        assert_eq!(sandbox_id(&annotated, "c1"), "c1");
        let member = spec(serde_json::json!({"ociVersion": "1.0.2", "annotations": {
            "io.kubernetes.cri.sandbox-id": "pod1"
        }}));
        assert_eq!(sandbox_id(&member, "c1"), "pod1");
    }

    #[test]
    fn a_spec_without_a_namespace_shares_the_nodes() {
        let own = spec(
            serde_json::json!({"ociVersion": "1.0.2", "linux": {"namespaces": [
            {"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"},
            {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]}}),
        );
        assert!(host_namespaces(&own).is_empty());
        let host_net = spec(
            serde_json::json!({"ociVersion": "1.0.2", "linux": {"namespaces": [
            {"type": "pid"}, {"type": "ipc"}, {"type": "mount"}]}}),
        );
        assert_eq!(host_namespaces(&host_net), ["network"]);
        let host_all = spec(
            serde_json::json!({"ociVersion": "1.0.2", "linux": {"namespaces": [
            {"type": "mount"}]}}),
        );
        assert_eq!(host_namespaces(&host_all), ["network", "IPC", "PID"]);
        let none = spec(serde_json::json!({"ociVersion": "1.0.2"}));
        assert_eq!(host_namespaces(&none), ["network", "IPC", "PID"]);
    }

    #[test]
    fn ids_that_could_leave_the_state_directory_are_invalid() {
        let cri = "8f1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";
        for ok in [cri, "pod", "my_pod-1"] {
            assert!(valid_pod_id(ok), "{ok}");
            assert!(valid_container_id(ok), "{ok}");
        }
        assert!(valid_container_id("web.1"));
        assert!(!valid_pod_id("web.1"), "husk's --id has no dots");
        let long = "x".repeat(77);
        for bad in [
            "",
            ".",
            "..",
            "../../../var/lib/kubelet",
            "/etc",
            "a/b",
            "a..b",
            ".hidden",
            "nul\0",
            "space d",
            "\u{e9}t\u{e9}",
            long.as_str(),
        ] {
            assert!(!valid_pod_id(bad), "{bad:?}");
            assert!(!valid_container_id(bad), "{bad:?}");
        }
        assert!(valid_pod_id("trailing-") && !valid_container_id("trailing-"));
        assert!(!valid_pod_id(&"x".repeat(65)));
        assert!(valid_container_id(&"x".repeat(76)));
    }
}
