//! `husk-cri behaviours`: the CRI behaviours that a conformance run checks
//! and that a VM could get wrong, one pod each, for one handler. Each pod
//! runs one container that prints what it sees and exits; its log lines
//! are printed as `CRI-B <behaviour> <stream> <text>` and its exit code as
//! `CRI-B <behaviour> exit <code>`, so the test (tests/cri.rs) compares
//! them with what it expects for the handler. A behaviour that cannot even
//! start prints `CRI-B <behaviour> failed <error>` and the next one runs.

use std::path::Path;
use std::time::Duration;

use k8s_cri::v1::security_profile::ProfileType;
use k8s_cri::v1::{
    Capability, ContainerConfig, LinuxContainerSecurityContext, LinuxPodSandboxConfig,
    LinuxSandboxSecurityContext, NamespaceMode, NamespaceOption, PodSandboxConfig, SecurityProfile,
};

use crate::{
    container_config, log_lines, namespaces, pod_config, wait_exited, Args, Client, Pod, Result,
};

/// A profile file that refuses mkdir(2) and mkdirat(2) with EACCES,
/// written by the test on the node (containerd reads Localhost profiles
/// from an absolute path).
pub const LOCALHOST_PROFILE: &str = "/tmp/husk-cri-deny-mkdir.json";

fn profile(t: ProfileType, localhost_ref: &str) -> Option<SecurityProfile> {
    Some(SecurityProfile {
        profile_type: t as i32,
        localhost_ref: localhost_ref.into(),
    })
}

/// One behaviour: how its pod and container differ from the defaults, and
/// what the container runs.
struct Behaviour {
    name: &'static str,
    /// The image (`--image`, or the dynamically linked one).
    dynamic_image: bool,
    pod: fn(&mut LinuxSandboxSecurityContext),
    container: fn(&mut LinuxContainerSecurityContext),
    script: &'static str,
}

fn nothing_pod(_: &mut LinuxSandboxSecurityContext) {}
fn nothing_container(_: &mut LinuxContainerSecurityContext) {}

/// The node's network, IPC or PID namespace for the pod and its
/// container, as the kubelet asks for hostNetwork, hostIPC, hostPID.
fn node_namespace(ns: &mut Option<NamespaceOption>, which: fn(&mut NamespaceOption) -> &mut i32) {
    if let Some(ns) = ns.as_mut() {
        *which(ns) = NamespaceMode::Node as i32;
    }
}

/// Prints the seccomp mode and whether a user namespace can be made
/// (RuntimeDefault refuses unshare(2) without CAP_SYS_ADMIN; nothing else
/// does for root in a container).
const SECCOMP_PROBE: &str = "awk '/^Seccomp:/ {print \"seccomp-mode\", $2}' /proc/self/status; \
     if unshare -U true; then echo unshare-allowed; else echo unshare-refused; fi";

const BEHAVIOURS: &[Behaviour] = &[
    Behaviour {
        name: "seccomp-runtime-default",
        dynamic_image: false,
        pod: |s| s.seccomp = profile(ProfileType::RuntimeDefault, ""),
        container: |s| s.seccomp = profile(ProfileType::RuntimeDefault, ""),
        script: SECCOMP_PROBE,
    },
    Behaviour {
        name: "seccomp-unconfined",
        dynamic_image: false,
        pod: |s| s.seccomp = profile(ProfileType::Unconfined, ""),
        container: |s| s.seccomp = profile(ProfileType::Unconfined, ""),
        script: SECCOMP_PROBE,
    },
    Behaviour {
        name: "seccomp-localhost",
        dynamic_image: false,
        pod: nothing_pod,
        container: |s| s.seccomp = profile(ProfileType::Localhost, LOCALHOST_PROFILE),
        script: "awk '/^Seccomp:/ {print \"seccomp-mode\", $2}' /proc/self/status; \
                 if mkdir /tmp/probe; then echo mkdir-allowed; else echo mkdir-refused; fi",
    },
    Behaviour {
        name: "privileged",
        dynamic_image: false,
        pod: |s| s.privileged = true,
        container: |s| s.privileged = true,
        script: "[ -c /dev/net/tun ] && echo tun-present; [ -c /dev/fuse ] && echo fuse-present; \
                 for d in /dev/vd?; do [ -b \"$d\" ] && echo \"block-device $d\"; done; \
                 grep -q '^CapEff:.*ffffffff' /proc/self/status && echo all-capabilities; \
                 awk '$2 == \"/sys\" {split($4, o, \",\"); print \"sys-mount\", o[1]}' /proc/self/mounts; \
                 grep ' /sys ' /proc/self/mountinfo | sed 's/^/sys-mountinfo /'",
    },
    Behaviour {
        name: "net-admin",
        dynamic_image: false,
        pod: nothing_pod,
        container: |s| {
            s.capabilities = Some(Capability {
                add_capabilities: vec!["NET_ADMIN".into()],
                ..Default::default()
            })
        },
        script: "brctl addbr br-probe && ip link set br-probe up && echo bridge-created; \
                 ip link add dummy-probe type dummy && echo dummy-created; \
                 awk '$2 == \"/sys\" {split($4, o, \",\"); print \"sys-mount\", o[1]}' /proc/self/mounts",
    },
    Behaviour {
        name: "dynamic-image",
        dynamic_image: true,
        pod: nothing_pod,
        container: nothing_container,
        // The background child is `sh` until it has exec'd `sleep`: wait
        // for its comm before asking pidof (under runc, asking at once
        // lost the race once in CI).
        script: "[ -e /lib64/ld-linux-x86-64.so.2 ] && echo dynamic-loader; \
                 sleep 30 & p=$!; i=0; \
                 until read c < /proc/$p/comm && [ \"$c\" = sleep ] || [ $i -ge 5000 ]; do i=$((i+1)); done; \
                 pidof sleep | grep -qw $p && echo pidof-works; \
                 ipcs -m >/dev/null && echo ipcs-works; kill $!",
    },
    // The node's namespaces: runc shares them; husk refuses the pod at
    // RunPodSandbox, naming the namespace (tests/cri.rs expects each).
    Behaviour {
        name: "host-network",
        dynamic_image: false,
        pod: |s| node_namespace(&mut s.namespace_options, |n| &mut n.network),
        container: |s| node_namespace(&mut s.namespace_options, |n| &mut n.network),
        script: "echo \"hostname $(hostname)\"",
    },
    Behaviour {
        name: "host-ipc",
        dynamic_image: true,
        pod: |s| node_namespace(&mut s.namespace_options, |n| &mut n.ipc),
        container: |s| node_namespace(&mut s.namespace_options, |n| &mut n.ipc),
        script: "ipcs -m | awk '$2 ~ /^[0-9]+$/ {print \"shm-id\", $2}'",
    },
    Behaviour {
        name: "host-pid",
        dynamic_image: false,
        pod: |s| node_namespace(&mut s.namespace_options, |n| &mut n.pid),
        container: |s| node_namespace(&mut s.namespace_options, |n| &mut n.pid),
        script: "pidof containerd >/dev/null && echo node-processes-visible",
    },
];

async fn run_one(c: &mut Client, args: &Args, b: &Behaviour) -> Result<()> {
    let name = format!("b-{}-{}", b.name, args.handler);
    let mut config: PodSandboxConfig = pod_config(&name, &args.log_dir);
    let mut pod_security = LinuxSandboxSecurityContext {
        namespace_options: Some(namespaces()),
        ..Default::default()
    };
    (b.pod)(&mut pod_security);
    // The kubelet sets no hostname for a pod on the node's network.
    if pod_security
        .namespace_options
        .as_ref()
        .is_some_and(|n| n.network == NamespaceMode::Node as i32)
    {
        config.hostname.clear();
    }
    config.linux = Some(LinuxPodSandboxConfig {
        security_context: Some(pod_security),
        ..Default::default()
    });
    let log_dir = Path::new(&config.log_directory).to_path_buf();
    std::fs::create_dir_all(&log_dir).map_err(|e| e.to_string())?;
    let pod = Pod::run(c, config, &args.handler).await?;
    let result = async {
        let image = if b.dynamic_image {
            args.dynamic_image.as_str()
        } else {
            args.image.as_str()
        };
        let mut container: ContainerConfig =
            container_config("probe", image, &["sh", "-c", b.script]);
        if let Some(sc) = container
            .linux
            .as_mut()
            .and_then(|l| l.security_context.as_mut())
        {
            (b.container)(sc);
        }
        let id = pod.create(c, container).await?;
        let code = wait_exited(c, &id, Duration::from_secs(60)).await?;
        // What containerd asked of the runtime, for the reader of a
        // failure: the /sys mount's options.
        if let Some(options) = spec_mount_options(c, &id, "/sys").await {
            println!("CRI-B {} spec-sys {options}", b.name);
        }
        for (stream, text) in log_lines(&log_dir.join("probe.log"), 1).await {
            println!("CRI-B {} {stream} {text}", b.name);
        }
        println!("CRI-B {} exit {code}", b.name);
        Ok::<_, String>(())
    }
    .await;
    let removed = pod.remove(c).await;
    result.and(removed)
}

/// The options of the mount on `destination` in the runtime spec
/// containerd wrote for container `id` (ContainerStatus, verbose).
async fn spec_mount_options(c: &mut Client, id: &str, destination: &str) -> Option<String> {
    let info = c
        .container_status(k8s_cri::v1::ContainerStatusRequest {
            container_id: id.into(),
            verbose: true,
        })
        .await
        .ok()?
        .into_inner()
        .info;
    let v: serde_json::Value = serde_json::from_str(info.get("info")?).ok()?;
    let m = v["runtimeSpec"]["mounts"]
        .as_array()?
        .iter()
        .find(|m| m["destination"] == destination)?;
    Some(
        m["options"]
            .as_array()?
            .iter()
            .filter_map(|o| o.as_str())
            .collect::<Vec<_>>()
            .join(","),
    )
}

/// A System V shared-memory segment of the node's, removed when dropped:
/// what a host-IPC pod must see (the node has no ipcmk).
struct NodeSegment(libc::c_int);

impl NodeSegment {
    fn new() -> Option<NodeSegment> {
        // SAFETY: shmget takes plain values and creates a new private
        // segment; no memory is attached or touched.
        let id = unsafe { libc::shmget(libc::IPC_PRIVATE, 4096, libc::IPC_CREAT | 0o600) };
        (id >= 0).then_some(NodeSegment(id))
    }
}

impl Drop for NodeSegment {
    fn drop(&mut self) {
        // SAFETY: IPC_RMID on the segment this value created; the buffer
        // argument is unused for IPC_RMID.
        unsafe { libc::shmctl(self.0, libc::IPC_RMID, std::ptr::null_mut()) };
    }
}

/// Runs every behaviour (or those `--only` names); returns an error only if the runtime is gone.
/// First prints `NODE-SHMID <id>`: a segment of the node's that lives
/// while the behaviours run.
pub async fn behaviours(c: &mut Client, args: &Args) -> Result<()> {
    let segment = NodeSegment::new();
    match &segment {
        Some(s) => println!("NODE-SHMID {}", s.0),
        None => println!("NODE-SHMID none: {}", std::io::Error::last_os_error()),
    }
    let chosen = BEHAVIOURS
        .iter()
        .filter(|b| args.only.is_empty() || args.only.iter().any(|o| o == b.name));
    for b in chosen {
        if let Err(e) = run_one(c, args, b).await {
            println!("CRI-B {} failed {e}", b.name);
        }
    }
    Ok(())
}
