//! `husk-cri propagation`: mount propagation and read-only binds as the
//! kubelet asks for them, one pod, for one handler. Each check prints
//! `CRI-P <check> <value>`; tests/cri.rs expects runc's values from husk
//! too, except where the VM boundary makes a mode impossible (a mount a
//! container makes never reaches the node: docs/getting-started.md).
//!
//! On the node, under a shared bind mount (containerd refuses
//! HostToContainer and Bidirectional volumes whose source is not on a
//! shared mount): `private/`, `slave/` and `shared/`, bound with each
//! propagation mode; `ro/`, bound read-only, with a tmpfs the node mounted
//! in it (`ro/tmpfs`) and a writable volume bound under it (`ro/sub`).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1::{Mount, MountPropagation};

use crate::volumes::exec;
use crate::{
    container_config, pod_config, privileged_container, privileged_pod, Args, Client, Pod, Result,
};

/// mount(2) on the node, with a readable error.
fn node_mount(source: &str, target: &Path, fstype: &str, flags: libc::c_ulong) -> Result<()> {
    let c = |s: &[u8]| CString::new(s).map_err(|e| e.to_string());
    let (s, t, f) = (
        c(source.as_bytes())?,
        c(target.as_os_str().as_bytes())?,
        c(fstype.as_bytes())?,
    );
    // SAFETY: NUL-terminated strings that outlive the call; no data.
    let rc = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, std::ptr::null()) };
    if rc < 0 {
        return Err(format!(
            "mount {source} on {}: {}",
            target.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// The node's side: the directories, the shared bind over them and the
/// node's own mounts, all detached when dropped (deepest first; under
/// runc a Bidirectional container's mount is the node's too).
struct NodeTree {
    base: PathBuf,
}

impl NodeTree {
    fn make(base: &Path) -> Result<NodeTree> {
        let tree = NodeTree {
            base: base.to_path_buf(),
        };
        tree.detach_all();
        let _ = std::fs::remove_dir_all(base);
        for d in [
            "private/late",
            "slave/late",
            "slave/from-container",
            "shared/late",
            "shared/from-container",
            "ro/tmpfs",
            "ro/sub",
            "under",
        ] {
            std::fs::create_dir_all(base.join(d)).map_err(|e| format!("{d}: {e}"))?;
        }
        std::fs::write(base.join("ro/keep"), "unchanged\n").map_err(|e| e.to_string())?;
        node_mount(&base.display().to_string(), base, "", libc::MS_BIND)?;
        node_mount("", base, "", libc::MS_SHARED)?;
        node_mount("tmpfs", &base.join("ro/tmpfs"), "tmpfs", 0)?;
        Ok(tree)
    }

    /// Mounts a tmpfs at `dir` under the tree and writes `marker` in it.
    fn mount_marked(&self, dir: &str) -> Result<()> {
        let target = self.base.join(dir);
        node_mount("tmpfs", &target, "tmpfs", 0)?;
        std::fs::write(target.join("marker"), "from-node\n").map_err(|e| e.to_string())
    }

    fn detach_all(&self) {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<PathBuf> = info
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(PathBuf::from)
            .filter(|p| p.starts_with(&self.base))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for p in points {
            if let Ok(c) = CString::new(p.as_os_str().as_bytes()) {
                // SAFETY: umount2(2) of a NUL-terminated path.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
}

impl Drop for NodeTree {
    fn drop(&mut self) {
        self.detach_all();
    }
}

fn mount(host: &Path, container: &str, readonly: bool, propagation: MountPropagation) -> Mount {
    Mount {
        host_path: host.display().to_string(),
        container_path: container.into(),
        readonly,
        propagation: propagation as i32,
        ..Default::default()
    }
}

/// Whether `file` in container `id` reads `want` within `limit` (the
/// guest's virtio-fs entries are cached for a second).
async fn reads(
    c: &mut Client,
    id: &str,
    file: &str,
    want: &str,
    limit: Duration,
) -> Result<&'static str> {
    let t0 = Instant::now();
    loop {
        let (_, out, _) = exec(c, id, &format!("cat {file} 2>/dev/null")).await?;
        if out == want {
            return Ok("seen");
        }
        if t0.elapsed() > limit {
            return Ok("absent");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub async fn propagation(c: &mut Client, args: &Args) -> Result<()> {
    let name = format!("p-{}", args.handler);
    let mut config = pod_config(&name, &args.log_dir);
    privileged_pod(&mut config);
    std::fs::create_dir_all(&config.log_directory).map_err(|e| e.to_string())?;
    let tree = NodeTree::make(&Path::new("/tmp/husk-cri-propagation").join(&args.handler))?;
    let pod = Pod::run(c, config, &args.handler).await?;
    let result = checks(c, args, &pod, &tree).await;
    let removed = pod.remove(c).await;
    drop(tree);
    result.and(removed)
}

async fn checks(c: &mut Client, args: &Args, pod: &Pod, tree: &NodeTree) -> Result<()> {
    use MountPropagation::*;
    let base = &tree.base;
    let mut main = container_config("main", &args.image, &["sleep", "3600"]);
    main.mounts = vec![
        mount(&base.join("private"), "/private", false, PropagationPrivate),
        mount(
            &base.join("slave"),
            "/slave",
            false,
            PropagationHostToContainer,
        ),
        mount(
            &base.join("shared"),
            "/shared",
            false,
            PropagationBidirectional,
        ),
        mount(&base.join("ro"), "/ro", true, PropagationPrivate),
        mount(&base.join("under"), "/ro/sub", false, PropagationPrivate),
    ];
    privileged_container(&mut main);
    let main = pod.create(c, main).await?;
    let mut peer = container_config("peer", &args.image, &["sleep", "3600"]);
    peer.mounts = vec![mount(
        &base.join("shared"),
        "/shared",
        false,
        PropagationHostToContainer,
    )];
    let peer = pod.create(c, peer).await?;

    // The node mounts under each volume after the containers started.
    for d in ["private/late", "slave/late", "shared/late"] {
        tree.mount_marked(d)?;
    }
    let wait = Duration::from_secs(10);
    let slave = reads(c, &main, "/slave/late/marker", "from-node", wait).await?;
    println!("CRI-P node-to-rslave {slave}");
    let shared = reads(c, &main, "/shared/late/marker", "from-node", wait).await?;
    println!("CRI-P node-to-rshared {shared}");
    let peer_sees = reads(c, &peer, "/shared/late/marker", "from-node", wait).await?;
    println!("CRI-P node-to-peer {peer_sees}");
    // By now the others are in: a private volume's would be too.
    let private = reads(
        c,
        &main,
        "/private/late/marker",
        "from-node",
        Duration::ZERO,
    )
    .await?;
    println!("CRI-P node-to-rprivate {private}");

    // The container mounts under its Bidirectional and HostToContainer
    // volumes: the pod's other container binding the first sees it, the
    // node only under runc; nobody sees the second.
    let (code, _, err) = exec(
        c,
        &main,
        "mount -t tmpfs tmpfs /shared/from-container && echo from-main > /shared/from-container/marker && \
         mount -t tmpfs tmpfs /slave/from-container && echo from-main > /slave/from-container/marker",
    )
    .await?;
    println!("CRI-P container-mounts exit-{code} {err}");
    let peer_sees = reads(c, &peer, "/shared/from-container/marker", "from-main", wait).await?;
    println!("CRI-P rshared-to-peer {peer_sees}");
    // For the reader of a failure: how each container's /shared and root
    // propagate (mountinfo's optional fields).
    for (who, id) in [("main", &main), ("peer", &peer)] {
        let (_, out, _) = exec(
            c,
            id,
            "awk '$5 == \"/\" || $5 ~ /^\\/shared/' /proc/self/mountinfo",
        )
        .await?;
        for line in out.lines() {
            println!("CRI-P-MOUNTINFO {who} {line}");
        }
    }
    let on_node = |d: &str| {
        if base.join(d).join("marker").exists() {
            "seen"
        } else {
            "absent"
        }
    };
    println!("CRI-P rshared-to-node {}", on_node("shared/from-container"));
    println!("CRI-P rslave-to-node {}", on_node("slave/from-container"));

    // Read-only, not recursively: the bind refuses writes, what is
    // mounted under it (by the node, or by the spec) does not.
    let (code, _, err) = exec(c, &main, "touch /ro/new; echo more >> /ro/keep").await?;
    println!(
        "CRI-P ro-top exit-{code} refused-{}",
        err.matches("Read-only file system").count()
    );
    for (check, dir) in [
        ("ro-node-tmpfs", "/ro/tmpfs"),
        ("ro-spec-volume", "/ro/sub"),
    ] {
        let (code, _, err) = exec(c, &main, &format!("echo written > {dir}/new")).await?;
        println!(
            "CRI-P {check} {}",
            if code == 0 {
                "writable".to_string()
            } else {
                format!("exit-{code} {err}")
            }
        );
    }
    let node_file = |p: &str| std::fs::read_to_string(base.join(p)).unwrap_or_default();
    println!(
        "CRI-P ro-node-sees tmpfs-{} sub-{} keep-{} new-{}",
        node_file("ro/tmpfs/new").trim(),
        node_file("under/new").trim(),
        node_file("ro/keep").trim(),
        if base.join("ro/new").exists() {
            "present"
        } else {
            "absent"
        }
    );
    Ok(())
}
