//! `husk-cri volumes`: Kubernetes volumes as the kubelet hands them to
//! the CRI (host paths it made: an emptyDir, a hostPath read-write and
//! read-only, a configMap-shaped directory it updates by swapping
//! `..data`, a termination-message file), one pod, for one handler. Each
//! check prints `CRI-V <check> <value>`; tests/cri.rs expects the same
//! values from runc and husk. `--kill-virtiofsd` (husk only) instead
//! kills the pod's virtiofsd under a running container and prints how
//! the container ended.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1::{ExecSyncRequest, Mount};

use crate::{container_config, pod_config, wait_exited, Args, Client, Pod, Result};

/// A mount of the node's `host` at `container` in the container.
fn mount(host: &Path, container: &str, readonly: bool) -> Mount {
    Mount {
        host_path: host.display().to_string(),
        container_path: container.into(),
        readonly,
        ..Default::default()
    }
}

/// Runs `script` in container `id`: (exit code, stdout, stderr).
pub(crate) async fn exec(c: &mut Client, id: &str, script: &str) -> Result<(i32, String, String)> {
    let r = c
        .exec_sync(ExecSyncRequest {
            container_id: id.into(),
            cmd: vec!["sh".into(), "-c".into(), script.into()],
            timeout: 60,
        })
        .await
        .map_err(|s| format!("ExecSync {script:?}: {}", s.message()))?
        .into_inner();
    Ok((
        r.exit_code,
        String::from_utf8_lossy(&r.stdout).trim().to_string(),
        String::from_utf8_lossy(&r.stderr).trim().to_string(),
    ))
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// The node's sha256 of `path` (busybox's sha256sum, as in the guest).
fn node_sha256(path: &Path) -> Result<String> {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .map_err(io("sha256sum"))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string())
}

/// A configMap volume as the kubelet writes it: the keys in a timestamped
/// directory, `..data` pointing at it, each key a link through `..data`.
fn config_map(dir: &Path, version: &str, value: &str) -> Result<()> {
    let data = dir.join(format!("..{version}"));
    std::fs::create_dir_all(&data).map_err(io("configMap data"))?;
    std::fs::write(data.join("key"), value).map_err(io("configMap key"))?;
    // The kubelet's atomic update: a new link renamed over `..data`.
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    symlink(format!("..{version}"), &tmp).map_err(io("..data_tmp"))?;
    std::fs::rename(&tmp, dir.join("..data")).map_err(io("..data"))?;
    if std::fs::symlink_metadata(dir.join("key")).is_err() {
        symlink("..data/key", dir.join("key")).map_err(io("key link"))?;
    }
    Ok(())
}

/// The node's directories for the pod's volumes, made afresh.
struct Volumes {
    empty_dir: PathBuf,
    host_path: PathBuf,
    read_only: PathBuf,
    config: PathBuf,
    termination: PathBuf,
}

impl Volumes {
    fn make(base: &Path) -> Result<Volumes> {
        let _ = std::fs::remove_dir_all(base);
        let v = Volumes {
            empty_dir: base.join("empty-dir"),
            host_path: base.join("host-path"),
            read_only: base.join("read-only"),
            config: base.join("config"),
            termination: base.join("termination-log"),
        };
        for d in [&v.empty_dir, &v.host_path, &v.read_only, &v.config] {
            std::fs::create_dir_all(d).map_err(io("volume directory"))?;
        }
        std::fs::write(v.read_only.join("keep"), "unchanged\n").map_err(io("keep"))?;
        std::fs::write(v.host_path.join("log"), "line-1\n").map_err(io("log"))?;
        std::fs::write(&v.termination, "").map_err(io("termination-log"))?;
        config_map(&v.config, "2026_12_04_v1", "value-1")?;
        Ok(v)
    }
}

pub async fn volumes(c: &mut Client, args: &Args) -> Result<()> {
    let name = format!("v-{}", args.handler);
    let config = pod_config(&name, &args.log_dir);
    std::fs::create_dir_all(&config.log_directory).map_err(io("log directory"))?;
    let v = Volumes::make(&Path::new("/tmp/husk-cri-volumes").join(&args.handler))?;
    let pod = Pod::run(c, config, &args.handler).await?;
    let result = checks(c, args, &pod, &v).await;
    let removed = pod.remove(c).await;
    result.and(removed)
}

async fn checks(c: &mut Client, args: &Args, pod: &Pod, v: &Volumes) -> Result<()> {
    // An init container's output in an emptyDir, read by the main one.
    let mut init = container_config(
        "init",
        &args.image,
        &["sh", "-c", "echo written-by-init > /scratch/note"],
    );
    init.mounts = vec![mount(&v.empty_dir, "/scratch", false)];
    let id = pod.create(c, init).await?;
    println!(
        "CRI-V init-exit {}",
        wait_exited(c, &id, Duration::from_secs(60)).await?
    );
    let mut main = container_config("main", &args.image, &["sleep", "3600"]);
    main.mounts = vec![
        mount(&v.empty_dir, "/scratch", false),
        mount(&v.host_path, "/data", false),
        mount(&v.read_only, "/ro", true),
        mount(&v.config, "/config", true),
    ];
    let main = pod.create(c, main).await?;
    let (_, note, _) = exec(c, &main, "cat /scratch/note").await?;
    println!("CRI-V init-note {note}");
    // A hostPath written by the container: the node reads the same bytes.
    let (code, out, err) = exec(
        c,
        &main,
        "dd if=/dev/urandom of=/data/blob bs=1M count=10 2>/dev/null && sync && sha256sum /data/blob",
    )
    .await?;
    let guest = out.split_whitespace().next().unwrap_or("").to_string();
    let node = node_sha256(&v.host_path.join("blob"))?;
    println!(
        "CRI-V blob {}",
        if code == 0 && !guest.is_empty() && guest == node {
            "same-sha256".to_string()
        } else {
            format!("differs: exit {code} guest {guest:?} node {node:?} {err}")
        }
    );
    // The node appends; the container reads it.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(v.host_path.join("log"))
            .map_err(io("log"))?;
        f.write_all(b"line-2-from-the-node\n")
            .map_err(io("append"))?;
    }
    let (_, last, _) = exec(c, &main, "tail -n 1 /data/log").await?;
    println!("CRI-V node-append {last}");
    // A read-only hostPath refuses writes; the node's files are unchanged.
    let (code, _, err) = exec(c, &main, "touch /ro/new; echo more >> /ro/keep").await?;
    let refused = err.matches("Read-only file system").count();
    println!("CRI-V ro-write exit-{code} refused-{refused}");
    let keep = std::fs::read_to_string(v.read_only.join("keep")).map_err(io("keep"))?;
    println!(
        "CRI-V ro-node new-{} keep-{}",
        if v.read_only.join("new").exists() {
            "present"
        } else {
            "absent"
        },
        keep.trim()
    );
    // A configMap update: the kubelet's swap of `..data`, seen within 5 s.
    let (_, before, _) = exec(c, &main, "cat /config/key").await?;
    println!("CRI-V config-before {before}");
    config_map(&v.config, "2026_12_04_v2", "value-2")?;
    let t0 = Instant::now();
    let seen = loop {
        let (_, now, _) = exec(c, &main, "cat /config/key").await?;
        if now == "value-2" || t0.elapsed() > Duration::from_secs(5) {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!("CRI-V config-after-5s {seen}");
    // A termination message: written by the container, read on the node
    // once it exited (the kubelet binds the file at the container's
    // terminationMessagePath).
    let mut term = container_config(
        "term",
        &args.image,
        &[
            "sh",
            "-c",
            "echo terminated-as-planned > /dev/termination-log",
        ],
    );
    term.mounts = vec![mount(&v.termination, "/dev/termination-log", false)];
    let id = pod.create(c, term).await?;
    println!(
        "CRI-V term-exit {}",
        wait_exited(c, &id, Duration::from_secs(60)).await?
    );
    let message = std::fs::read_to_string(&v.termination).map_err(io("termination-log"))?;
    println!("CRI-V termination-message {}", message.trim());
    Ok(())
}

/// The pids of the node's virtiofsd processes.
fn virtiofsds() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter(|pid| {
                    std::fs::read_to_string(format!("/proc/{pid}/comm"))
                        .is_ok_and(|c| c.trim() == "virtiofsd")
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Kills the pod's virtiofsd under a running container: the container
/// must end (the pod's volumes are gone), never hang.
pub async fn kill_virtiofsd(c: &mut Client, args: &Args) -> Result<()> {
    let name = format!("vk-{}", args.handler);
    let config = pod_config(&name, &args.log_dir);
    std::fs::create_dir_all(&config.log_directory).map_err(io("log directory"))?;
    let data = Path::new("/tmp/husk-cri-volumes/kill");
    std::fs::create_dir_all(data).map_err(io("volume"))?;
    let pod = Pod::run(c, config, &args.handler).await?;
    let result = async {
        let mut app = container_config("app", &args.image, &["sleep", "3600"]);
        app.mounts = vec![mount(data, "/data", false)];
        let id = pod.create(c, app).await?;
        // virtiofsd's namespace sandbox is two processes: its parent
        // waits for the child that serves.
        let pids = virtiofsds();
        println!(
            "CRI-V virtiofsd-running {}",
            if pids.is_empty() { "no" } else { "yes" }
        );
        for pid in pids {
            // SAFETY: kill(2) of a virtiofsd of this node (the test's pod's
            // only one).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let code = wait_exited(c, &id, Duration::from_secs(60)).await?;
        println!("CRI-V killed-virtiofsd-exit {code}");
        Ok::<_, String>(())
    }
    .await;
    let removed = pod.remove(c).await;
    result.and(removed)
}

/// A pod of two init containers and ten sidecars, as a service mesh and
/// its agents make one: all of them run (under husk with `rootfs =
/// "share"` none takes a drive slot), each sees what the others wrote in
/// the pod's emptyDir.
pub async fn many(c: &mut Client, args: &Args) -> Result<()> {
    let name = format!("m-{}", args.handler);
    let config = pod_config(&name, &args.log_dir);
    std::fs::create_dir_all(&config.log_directory).map_err(io("log directory"))?;
    let scratch = Path::new("/tmp/husk-cri-volumes").join(&name);
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).map_err(io("emptyDir"))?;
    let pod = Pod::run(c, config, &args.handler).await?;
    let result = async {
        let mut codes = Vec::new();
        for i in 0..2 {
            let script = format!("echo init-{i} > /scratch/init-{i}");
            let mut init = container_config(&format!("init-{i}"), &args.image, &["sh", "-c", &script]);
            init.mounts = vec![mount(&scratch, "/scratch", false)];
            let id = pod.create(c, init).await?;
            codes.push(wait_exited(c, &id, Duration::from_secs(60)).await?.to_string());
        }
        println!("CRI-M init-exits {}", codes.join(" "));
        let mut sidecars = Vec::new();
        for i in 0..10 {
            let script = format!("echo sidecar-{i} > /scratch/sidecar-{i}; exec sleep 3600");
            let mut s = container_config(&format!("sidecar-{i}"), &args.image, &["sh", "-c", &script]);
            s.mounts = vec![mount(&scratch, "/scratch", false)];
            sidecars.push(pod.create(c, s).await?);
        }
        let mut running = 0;
        for id in &sidecars {
            if crate::container_state(c, id).await?.0 == k8s_cri::v1::ContainerState::ContainerRunning {
                running += 1;
            }
        }
        println!("CRI-M sidecars-running {running}");
        // The last sidecar sees every container's file (its own written
        // just before: wait for it).
        let last = sidecars.last().ok_or("no sidecar")?;
        let (_, seen, _) = exec(
            c,
            last,
            "i=0; until [ -e /scratch/sidecar-9 ] || [ $i -gt 50 ]; do sleep 0.1; i=$((i+1)); done; ls /scratch | wc -l",
        )
        .await?;
        println!("CRI-M files-seen {seen}");
        Ok::<_, String>(())
    }
    .await;
    let removed = pod.remove(c).await;
    result.and(removed)
}

/// A privileged container that mounts the pod's share itself and tries
/// to leave it (husk only: under runc there is no share). What it can
/// reach is a volume of its own pod (Linux 6.1 hands a second mount of
/// the tag one of the superblocks it has: with `--announce-submounts`,
/// each volume is one) or else the share's root, which it cannot write
/// (`m-confined` either way). A hard link across
/// volumes is refused, `..` from a volume is the container's own root,
/// and a symbolic link it plants is only a link on the node. On the node,
/// virtiofsd's root (the share's `root/`) is read-only and holds nothing
/// but the shim's entries.
pub async fn escape(c: &mut Client, args: &Args) -> Result<()> {
    let name = format!("ve-{}", args.handler);
    let mut config = pod_config(&name, &args.log_dir);
    crate::privileged_pod(&mut config);
    std::fs::create_dir_all(&config.log_directory).map_err(io("log directory"))?;
    let base = Path::new("/tmp/husk-cri-volumes").join(&name);
    let _ = std::fs::remove_dir_all(&base);
    let (a, b) = (base.join("a"), base.join("b"));
    for d in [&a, &b] {
        std::fs::create_dir_all(d).map_err(io("volume"))?;
    }
    std::fs::write(a.join("f"), "in-a\n").map_err(io("f"))?;
    let pod = Pod::run(c, config, &args.handler).await?;
    let result = async {
        let mut app = container_config("app", &args.image, &["sleep", "3600"]);
        app.mounts = vec![mount(&a, "/a", false), mount(&b, "/b", false)];
        crate::privileged_container(&mut app);
        let id = pod.create(c, app).await?;
        let script = "mkdir -p /m && mount -t virtiofs husk-pod /m && echo mounted; \
            m=$(stat -c %d /m); \
            if [ \"$m\" = \"$(stat -c %d /a)\" ] || [ \"$m\" = \"$(stat -c %d /b)\" ]; then echo m-confined; \
            elif touch /m/planted 2>/dev/null; then echo m-writable-share-root; else echo m-confined; fi; \
            [ \"$(stat -c %d:%i /a/..)\" = \"$(stat -c %d:%i /)\" ] && echo dotdot-is-container-root; \
            ln /a/f /b/hard 2>/dev/null && echo hard-link-made || echo hard-link-refused; \
            ln -s / /a/escape && echo symlink-made";
        let (_, out, _) = exec(c, &id, script).await?;
        for line in out.lines() {
            println!("CRI-E {line}");
        }
        let link = std::fs::symlink_metadata(a.join("escape"))
            .map(|m| m.file_type().is_symlink())
            .unwrap_or(false);
        println!("CRI-E node-sees-link {}", if link { "yes" } else { "no" });
        println!(
            "CRI-E node-b-hard-link {}",
            if b.join("hard").exists() { "present" } else { "absent" }
        );
        // virtiofsd's own root: read-only, whatever its guest asks.
        let ro_root = virtiofsds().iter().any(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
                .unwrap_or_default()
                .lines()
                .map(|l| l.split(' ').collect::<Vec<_>>())
                .any(|f| f.len() > 5 && f[4] == "/" && f[5].split(',').any(|o| o == "ro"))
        });
        println!(
            "CRI-E virtiofsd-root {}",
            if ro_root { "read-only" } else { "writable" }
        );
        // Nothing but the shim's entries in any share's root.
        let foreign = std::fs::read_dir("/run/husk/k8s.io")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".share"))
            .flat_map(|e| {
                std::fs::read_dir(e.path().join("entries"))
                    .into_iter()
                    .flatten()
                    .flatten()
            })
            .filter(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                !(n.starts_with('v') && n.len() > 1 && n[1..].chars().all(|c| c.is_ascii_digit()))
            })
            .count();
        println!("CRI-E share-root-foreign {foreign}");
        Ok::<_, String>(())
    }
    .await;
    let removed = pod.remove(c).await;
    result.and(removed)
}
