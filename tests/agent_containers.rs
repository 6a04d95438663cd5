//! husk-agent's container runtime on this host: the agent (not PID 1) runs
//! on a unix socket inside a throw-away mount namespace (`unshare --mount`)
//! with cgroup2 mounted there; a busybox root filesystem is an ext4 image
//! on a loop device, handed to the agent as a drive id through the
//! test-only HUSK_AGENT_DRIVES. Every request and its errors are exercised
//! through the protocol, with real namespaces, mounts and pivot_root.
//! Needs root (as the project's machines are): those tests are
//! `#[ignore]`d and resources/test.sh runs them, as root, with
//! `--include-ignored`. Limits are enforced in the node VM, whose cgroup v2
//! has every controller (this host's are bound to v1), by this test binary
//! run there a second time (`husk_tests::Rerun`); on this host a pod whose
//! cgroup lacks a controller shows that such a limit is refused.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use husk_protocol::frame::{read_frame, write_frame};
use husk_protocol::{
    Accepted, AgentError, Channel, CreateContainer, ErrorCode, Event, ExitStatus, Hello,
    ProcessRef, ReplyFrame, Request, RequestFrame, Response, Rootfs, StdioStream, WritableLayer,
    PROTOCOL_VERSION,
};
use husk_tests::{cargo_binary, oci_spec as spec};
use serde_json::json;

struct Pod {
    child: Child,
    dir: PathBuf,
    sock: PathBuf,
    loops: Vec<String>,
    cgroup: PathBuf,
    host_cgroup: PathBuf,
    ctl: UnixStream,
    next_id: u64,
}

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A busybox root filesystem image (ext4) with a user and a group.
fn make_image(dir: &Path, name: &str) -> PathBuf {
    let root = dir.join(format!("{name}-tree"));
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "root"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for applet in [
        "sh", "echo", "cat", "sleep", "true", "false", "id", "ls", "touch", "kill", "mkdir",
        "hostname", "head", "dd", "grep", "tty", "wc",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nweb:x:1000:1000::/tmp:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(
        root.join("etc/group"),
        "root:x:0:\nweb:x:1000:\nextra:x:2000:web\n",
    )
    .unwrap();
    let img = dir.join(format!("{name}.ext4"));
    // e2fsprogs' mke2fs (busybox's, in the node VM, lacks -d).
    let mke2fs = std::env::var("HUSK_TEST_MKE2FS").unwrap_or_else(|_| "mke2fs".into());
    sh(&format!(
        "{mke2fs} -q -t ext4 -d {} {} 16M",
        root.display(),
        img.display()
    ));
    img
}

impl Pod {
    /// A scratch directory with one image on a loop device per drive id.
    /// Panics without root (the tests that get here are `#[ignore]`d for
    /// it, or run in the node VM).
    fn prepare(name: &str, drives: &[&str]) -> (PathBuf, Vec<String>, String) {
        husk_tests::require_root();
        let dir = std::env::temp_dir().join(format!("husk-ctr-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("cg")).unwrap();
        let mut loops = Vec::new();
        let mut map = Vec::new();
        for d in drives {
            let img = make_image(&dir, d);
            // util-linux has --show; busybox (in the node VM) does not.
            let dev = sh(&format!(
                "losetup -f --show {img} 2>/dev/null || {{ d=$(losetup -f) && losetup $d {img} && echo $d; }}",
                img = img.display()
            ));
            map.push(format!("{d}={dev}"));
            loops.push(dev);
        }
        (dir, loops, map.join(","))
    }

    fn agent_binary() -> PathBuf {
        std::env::var_os("HUSK_TEST_AGENT")
            .map(PathBuf::from)
            .unwrap_or_else(|| cargo_binary("husk-agent"))
    }

    /// The agent as PID 1 of a new pid and mount namespace, so it does
    /// what it does in a guest (leaves the initramfs, mounts /proc, /sys,
    /// /dev, /run, cgroup2 at /sys/fs/cgroup), serving on a unix socket in
    /// its own root. Only where that root may be changed: the node VM.
    fn start_pid1(name: &str, drives: &[&str]) -> Pod {
        let (dir, loops, map) = Pod::prepare(name, drives);
        let log = File::create(dir.join("agent.log")).unwrap();
        let child = Command::new("unshare")
            .args([
                "--pid",
                "--fork",
                "--mount",
                "--propagation",
                "private",
                "--",
            ])
            .arg(Pod::agent_binary())
            .args(["--unix", "/tmp/agent.sock"])
            .env("HUSK_AGENT_DRIVES", map)
            .stderr(log)
            .spawn()
            .expect("start husk-agent");
        let deadline = Instant::now() + Duration::from_secs(20);
        let (agent_pid, sock) = loop {
            assert!(Instant::now() < deadline, "the agent does not listen");
            std::thread::sleep(Duration::from_millis(20));
            let Some(pid) = child_of(child.id()) else {
                continue;
            };
            let sock = PathBuf::from(format!("/proc/{pid}/root/tmp/agent.sock"));
            if UnixStream::connect(&sock).is_ok() {
                break (pid, sock);
            }
        };
        let ctl = connect(&sock, Channel::Control).0;
        Pod {
            child,
            dir,
            sock,
            loops,
            cgroup: PathBuf::from(format!("/proc/{agent_pid}/root/sys/fs/cgroup")),
            host_cgroup: PathBuf::from("/sys/fs/cgroup/husk"),
            ctl,
            next_id: 1,
        }
    }

    fn start(name: &str, drives: &[&str]) -> Pod {
        Pod::start_withholding(name, drives, &[])
    }

    /// Like [`Pod::start`], but the pod's cgroup lacks the `withheld`
    /// controllers whatever the host offers, as a cgroup v2 does whose
    /// controllers are bound elsewhere.
    fn start_withholding(name: &str, drives: &[&str], withheld: &[&str]) -> Pod {
        let (dir, loops, map) = Pod::prepare(name, drives);
        let sock = dir.join("agent.sock");
        // Each pod's cgroups under a cgroup of its own in the host's v2
        // hierarchy, removed (with anything left in it) when the test ends:
        // <cg_name>/pod is the agent's root, and <cg_name> hands it every
        // controller the host has but the withheld ones.
        let cg_name = format!("husk-test-{name}-{}", std::process::id());
        let offered: Vec<&str> = ["cpu", "cpuset", "memory", "pids", "io"]
            .into_iter()
            .filter(|c| !withheld.contains(c))
            .collect();
        let agent = Pod::agent_binary();
        let script = format!(
            "mount -t cgroup2 none {cg} && mkdir -p {cg}/{cg_name}/pod && \
             for c in cpu cpuset memory pids io; do echo +$c > {cg}/cgroup.subtree_control; done 2>/dev/null; \
             for c in {offered}; do echo +$c > {cg}/{cg_name}/cgroup.subtree_control; done 2>/dev/null; \
             exec {agent} --unix {sock}",
            cg = dir.join("cg").display(),
            offered = offered.join(" "),
            agent = agent.display(),
            sock = sock.display()
        );
        let child = Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                &script,
            ])
            .env("HUSK_AGENT_DRIVES", map)
            .env("HUSK_AGENT_STATE", dir.join("state"))
            .env(
                "HUSK_AGENT_CGROUP_ROOT",
                dir.join("cg").join(&cg_name).join("pod"),
            )
            .stderr(Stdio::null())
            .spawn()
            .expect("start husk-agent");
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&sock).is_err() {
            assert!(Instant::now() < deadline, "the agent does not listen");
            std::thread::sleep(Duration::from_millis(10));
        }
        let ctl = connect(&sock, Channel::Control).0;
        // The cgroup2 mount lives in the agent's namespace: reach it there.
        let cgroup = PathBuf::from(format!(
            "/proc/{}/root{}",
            child.id(),
            dir.join("cg").join(&cg_name).join("pod").display()
        ));
        // The same cgroup, seen through the host's own v2 mount (the
        // agent's namespace is gone by the time of cleanup).
        let host_cgroup = PathBuf::from(
            std::env::var("HUSK_TEST_CGROUP2").unwrap_or_else(|_| "/sys/fs/cgroup/unified".into()),
        )
        .join(&cg_name);
        Pod {
            child,
            dir,
            sock,
            loops,
            cgroup,
            host_cgroup,
            ctl,
            next_id: 1,
        }
    }

    fn call(&mut self, request: Request) -> Result<Response, AgentError> {
        self.next_id += 1;
        write_frame(
            &mut self.ctl,
            &RequestFrame {
                id: self.next_id,
                request,
            },
        )
        .unwrap();
        let r: ReplyFrame = read_frame(&mut self.ctl).unwrap();
        assert_eq!(r.id, self.next_id);
        r.reply
    }

    fn create(
        &mut self,
        id: &str,
        drive: &str,
        spec: serde_json::Value,
    ) -> Result<u32, AgentError> {
        self.create_rootfs(id, spec, rootfs(drive))
    }

    fn create_rootfs(
        &mut self,
        id: &str,
        spec: serde_json::Value,
        rootfs: Rootfs,
    ) -> Result<u32, AgentError> {
        let spec = serde_json::from_value(spec).expect("a valid OCI spec");
        match self.call(Request::CreateContainer(CreateContainer {
            container_id: id.into(),
            spec: Box::new(spec),
            rootfs,
            volumes: None,
        }))? {
            Response::Started { pid } => Ok(pid),
            other => panic!("create answered {other:?}"),
        }
    }

    fn start_container(&mut self, id: &str) {
        assert_eq!(
            self.call(Request::StartContainer {
                container_id: id.into()
            }),
            Ok(Response::Ok)
        );
    }

    fn wait(&mut self, id: &str, exec: Option<&str>) -> ExitStatus {
        match self.call(Request::WaitProcess(pref(id, exec))) {
            Ok(Response::Exited(st)) => st,
            other => panic!("wait answered {other:?}"),
        }
    }

    fn stream(&self, id: &str, exec: Option<&str>, stream: StdioStream) -> UnixStream {
        let (s, acc) = connect(
            &self.sock,
            Channel::Stdio {
                container_id: id.into(),
                exec_id: exec.map(Into::into),
                stream,
            },
        );
        assert_eq!(acc.error, None);
        s
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Ok(log) = std::fs::read_to_string(self.dir.join("agent.log")) {
                eprintln!("agent log:\n{log}");
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        remove_cgroup_tree(&self.host_cgroup);
        for l in &self.loops {
            let _ = Command::new("losetup").args(["-d", l]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A child process of `pid`.
fn child_of(pid: u32) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        // pid (comm) state ppid ...
        let ppid = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?;
        (ppid == pid.to_string())
            .then(|| e.file_name().to_str()?.parse().ok())
            .flatten()
    })
}

/// Kills what is left in `dir` and its children and removes them.
fn remove_cgroup_tree(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.path().is_dir() {
            remove_cgroup_tree(&e.path());
        }
    }
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    for _ in 0..100 {
        if std::fs::remove_dir(dir).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn connect(sock: &Path, channel: Channel) -> (UnixStream, Accepted) {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write_frame(
        &mut s,
        &Hello {
            version: PROTOCOL_VERSION,
            channel,
        },
    )
    .unwrap();
    let acc: Accepted = read_frame(&mut s).unwrap();
    (s, acc)
}

fn pref(id: &str, exec: Option<&str>) -> ProcessRef {
    ProcessRef {
        container_id: id.into(),
        exec_id: exec.map(Into::into),
    }
}

fn rootfs(drive: &str) -> Rootfs {
    Rootfs {
        drive_id: drive.into(),
        fstype: "ext4".into(),
        read_only: false,
        writable_overlay: false,
        writable_layer: None,
        size_bytes: None,
        share: None,
    }
}

fn read_all(mut s: UnixStream) -> String {
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
#[ignore = "needs root: mounts, namespaces, loop devices"]
fn run_echo_exit_codes_signals_and_events() {
    let mut pod = Pod::start("run", &["root1"]);
    let (mut events, acc) = connect(&pod.sock, Channel::Events);
    assert_eq!(acc.error, None);
    let t0 = Instant::now();
    let pid = pod
        .create(
            "echo",
            "root1",
            spec(&["sh", "-c", "echo hello from $(hostname); exit 42"]),
        )
        .unwrap();
    let created = t0.elapsed();
    assert!(pid > 1);
    // Output before the host attaches waits in the pipe.
    let t1 = Instant::now();
    pod.start_container("echo");
    let started = t1.elapsed();
    eprintln!("create: {created:?}, start (to execve): {started:?}");
    let out = pod.stream("echo", None, StdioStream::Stdout);
    assert_eq!(read_all(out), "hello from box\n");
    assert_eq!(pod.wait("echo", None), ExitStatus::Code(42));
    let ev: Event = read_frame(&mut events).unwrap();
    assert_eq!(
        ev,
        Event::ProcessExited {
            process: pref("echo", None),
            status: ExitStatus::Code(42)
        }
    );
    // Starting twice, and waiting again, are answered.
    assert_eq!(
        pod.call(Request::StartContainer {
            container_id: "echo".into()
        })
        .unwrap_err()
        .code,
        ErrorCode::FailedPrecondition
    );
    assert_eq!(pod.wait("echo", None), ExitStatus::Code(42));
    assert_eq!(
        pod.call(Request::RemoveContainer {
            container_id: "echo".into()
        }),
        Ok(Response::Ok)
    );
    // SIGKILL is reported as signal 9.
    pod.create("sleeper", "root1", spec(&["sleep", "1000"]))
        .unwrap();
    pod.start_container("sleeper");
    assert_eq!(
        pod.call(Request::SignalProcess {
            process: pref("sleeper", None),
            signal: 9,
            all: false
        }),
        Ok(Response::Ok)
    );
    assert_eq!(pod.wait("sleeper", None), ExitStatus::Signal(9));
    assert_eq!(
        pod.call(Request::SignalProcess {
            process: pref("sleeper", None),
            signal: 99,
            all: false
        })
        .unwrap_err()
        .code,
        ErrorCode::InvalidArgument
    );
    assert!(pod.alive());
}

#[test]
#[ignore = "needs root: mounts, namespaces, loop devices"]
fn stdin_round_trip_and_close_stdin() {
    let mut pod = Pod::start("stdin", &["root2"]);
    pod.create("cat", "root2", spec(&["cat"])).unwrap();
    pod.start_container("cat");
    let out = pod.stream("cat", None, StdioStream::Stdout);
    let mut input = pod.stream("cat", None, StdioStream::Stdin);
    input.write_all(b"ping\npong\n").unwrap();
    input.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_all(out), "ping\npong\n");
    assert_eq!(pod.wait("cat", None), ExitStatus::Code(0));
    // A stream can be attached once.
    let (_, acc) = connect(
        &pod.sock,
        Channel::Stdio {
            container_id: "cat".into(),
            exec_id: None,
            stream: StdioStream::Stdout,
        },
    );
    assert_eq!(acc.error.unwrap().code, ErrorCode::FailedPrecondition);
    pod.call(Request::RemoveContainer {
        container_id: "cat".into(),
    })
    .unwrap();
    // CloseStdin without ever attaching: `wc -c` sees EOF and exits.
    pod.create("wc", "root2", spec(&["wc", "-c"])).unwrap();
    pod.start_container("wc");
    assert_eq!(
        pod.call(Request::CloseStdin(pref("wc", None))),
        Ok(Response::Ok)
    );
    assert_eq!(pod.wait("wc", None), ExitStatus::Code(0));
    assert_eq!(
        read_all(pod.stream("wc", None, StdioStream::Stdout)).trim(),
        "0"
    );
    // ResizeTty on a process without a terminal.
    assert_eq!(
        pod.call(Request::ResizeTty {
            process: pref("wc", None),
            rows: 24,
            cols: 80
        })
        .unwrap_err()
        .code,
        ErrorCode::FailedPrecondition
    );
}

#[test]
#[ignore = "needs root: mounts, namespaces, loop devices"]
fn exec_stats_list_update_and_remove() {
    let mut pod = Pod::start("exec", &["root3"]);
    let pid = pod
        .create("web", "root3", spec(&["sleep", "1000"]))
        .unwrap();
    // Exec needs a running container.
    let p = oci_like::process(&["true"]);
    assert_eq!(
        pod.call(Request::ExecProcess {
            container_id: "web".into(),
            exec_id: "e0".into(),
            process: Box::new(p.clone())
        })
        .unwrap_err()
        .code,
        ErrorCode::FailedPrecondition
    );
    pod.start_container("web");
    let r = pod.call(Request::ExecProcess {
        container_id: "web".into(),
        exec_id: "e1".into(),
        process: Box::new(oci_like::process(&[
            "sh",
            "-c",
            "echo pid=$$ host=$(hostname); set -- /proc/[0-9]*; echo $#",
        ])),
    });
    assert!(matches!(r, Ok(Response::Started { .. })), "{r:?}");
    let out = read_all(pod.stream("web", Some("e1"), StdioStream::Stdout));
    // In the container's pid namespace (sleep is 1), with its hostname;
    // /proc shows only the container's processes: sleep and this shell
    // (the shell expands the glob itself: no helper process races it).
    let mut lines = out.lines();
    let first = lines.next().unwrap_or_default();
    assert!(
        first.starts_with("pid=") && first.ends_with(" host=box"),
        "{out}"
    );
    assert_ne!(first, "pid=1 host=box");
    assert_eq!(lines.next(), Some("2"), "{out}");
    assert_eq!(pod.wait("web", Some("e1")), ExitStatus::Code(0));
    // A missing binary in an exec, and a duplicate exec id.
    let e = pod
        .call(Request::ExecProcess {
            container_id: "web".into(),
            exec_id: "e2".into(),
            process: Box::new(oci_like::process(&["/no/such/thing"])),
        })
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument, "{e}");
    assert_eq!(
        pod.call(Request::ExecProcess {
            container_id: "web".into(),
            exec_id: "e1".into(),
            process: Box::new(p)
        })
        .unwrap_err()
        .code,
        ErrorCode::AlreadyExists
    );
    match pod.call(Request::ListProcesses {
        container_id: "web".into(),
    }) {
        Ok(Response::Processes { pids }) => assert_eq!(pids, vec![pid]),
        other => panic!("{other:?}"),
    }
    match pod.call(Request::StatsContainer {
        container_id: "web".into(),
    }) {
        Ok(Response::Stats(s)) => {
            assert!(s.cpu_usage_usec > 0, "{s:?}");
            assert!(s.cpu_usage_usec >= s.cpu_user_usec, "{s:?}");
        }
        other => panic!("{other:?}"),
    }
    // Impossible values are refused before any write.
    let bad = serde_json::from_value(json!({"memory": {"limit": -7}})).unwrap();
    assert_eq!(
        pod.call(Request::UpdateContainer {
            container_id: "web".into(),
            resources: Box::new(bad)
        })
        .unwrap_err()
        .code,
        ErrorCode::InvalidArgument
    );
    // Running: removal is refused; stopped: everything goes.
    assert_eq!(
        pod.call(Request::RemoveContainer {
            container_id: "web".into()
        })
        .unwrap_err()
        .code,
        ErrorCode::FailedPrecondition
    );
    pod.call(Request::SignalProcess {
        process: pref("web", None),
        signal: 9,
        all: true,
    })
    .unwrap();
    assert_eq!(pod.wait("web", None), ExitStatus::Signal(9));
    let cg = pod.cgroup.join("husk/web");
    assert!(cg.exists());
    pod.call(Request::RemoveContainer {
        container_id: "web".into(),
    })
    .unwrap();
    assert!(!cg.exists(), "the cgroup is removed");
    let mounts = std::fs::read_to_string(format!("/proc/{}/mounts", pod.child.id())).unwrap();
    assert!(!mounts.contains("/c/web/"), "{mounts}");
    assert_eq!(
        pod.call(Request::StatsContainer {
            container_id: "web".into()
        })
        .unwrap_err()
        .code,
        ErrorCode::NotFound
    );
}

#[test]
#[ignore = "needs root: mounts, namespaces, loop devices"]
fn bad_containers_get_clear_errors() {
    let mut pod = Pod::start("errors", &["root4"]);
    // A missing binary: an error at create, nothing left behind.
    let e = pod
        .create("nobin", "root4", spec(&["no-such-program"]))
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    assert!(e.message.contains("not found"), "{e}");
    // An unknown user.
    let mut s = spec(&["true"]);
    s["process"]["user"]["username"] = json!("nobody-here");
    let e = pod.create("nouser", "root4", s).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    assert!(e.message.contains("nobody-here"), "{e}");
    // An absent rootfs drive.
    let e = pod
        .create("nodrive", "no-such-drive", spec(&["true"]))
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    assert!(e.message.contains("no-such-drive"), "{e}");
    // Impossible cgroup values.
    for res in [
        json!({"memory": {"limit": -5}}),
        json!({"cpu": {"cpus": "zzz"}}),
        json!({"cpu": {"quota": 5, "period": 100000}}),
    ] {
        let mut s = spec(&["true"]);
        s["linux"]["resources"] = res.clone();
        let e = pod.create("badcg", "root4", s).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument, "{res}: {e}");
    }
    // A bad id, an escaping mount, an unknown capability, a bad sysctl.
    assert_eq!(
        pod.create("../x", "root4", spec(&["true"]))
            .unwrap_err()
            .code,
        ErrorCode::InvalidArgument
    );
    let mut s = spec(&["true"]);
    s["mounts"][0]["destination"] = json!("/../../etc");
    assert_eq!(
        pod.create("esc", "root4", s).unwrap_err().code,
        ErrorCode::InvalidArgument
    );
    let mut s = spec(&["true"]);
    s["linux"]["sysctl"] = json!({"kernel/../../x": "1"});
    assert_eq!(
        pod.create("sys", "root4", s).unwrap_err().code,
        ErrorCode::InvalidArgument
    );
    // No process, no args, a relative or missing cwd, an unknown mount
    // type, an rlimit with soft above hard, a time namespace.
    let mut s = spec(&["true"]);
    s.as_object_mut().unwrap().remove("process");
    assert_eq!(
        pod.create("np", "root4", s).unwrap_err().code,
        ErrorCode::InvalidArgument
    );
    let s = spec(&[]);
    assert_eq!(
        pod.create("na", "root4", s).unwrap_err().code,
        ErrorCode::InvalidArgument
    );
    let mut s = spec(&["true"]);
    s["process"]["cwd"] = json!("relative");
    assert_eq!(
        pod.create("rc", "root4", s).unwrap_err().code,
        ErrorCode::InvalidArgument
    );
    let mut s = spec(&["true"]);
    s["process"]["cwd"] = json!("/no/such/dir");
    let e = pod.create("mc", "root4", s).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    assert!(e.message.contains("/no/such/dir"), "{e}");
    let mut s = spec(&["true"]);
    s["mounts"][0]["type"] = json!("nosuchfs");
    let e = pod.create("mt", "root4", s).unwrap_err();
    assert!(e.message.contains("mount /proc"), "{e}");
    let mut s = spec(&["true"]);
    s["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "hard": 10, "soft": 20}]);
    assert_eq!(
        pod.create("rl", "root4", s).unwrap_err().code,
        ErrorCode::InvalidArgument
    );
    let mut s = spec(&["true"]);
    s["linux"]["namespaces"] = json!([{"type": "mount"}, {"type": "time"}]);
    let e = pod.create("tn", "root4", s).unwrap_err();
    assert_eq!(e.code, ErrorCode::Unsupported, "{e}");
    // After all that the same id and drive still work.
    pod.create("ok", "root4", spec(&["true"])).unwrap();
    assert_eq!(
        pod.create("ok", "root4", spec(&["true"])).unwrap_err().code,
        ErrorCode::AlreadyExists
    );
    pod.start_container("ok");
    assert_eq!(pod.wait("ok", None), ExitStatus::Code(0));
    // Nothing of the failed containers is left.
    for gone in [
        "nobin", "nouser", "nodrive", "badcg", "esc", "sys", "np", "na", "rc", "mc", "mt", "rl",
        "tn",
    ] {
        assert!(!pod.cgroup.join("husk").join(gone).exists(), "{gone}");
        assert!(!pod.dir.join("state/c").join(gone).exists(), "{gone}");
    }
    assert!(pod.cgroup.join("husk/ok").exists());
    // Removing a created container that never ran.
    pod.call(Request::RemoveContainer {
        container_id: "ok".into(),
    })
    .unwrap();
    pod.create("never", "root4", spec(&["sleep", "5"])).unwrap();
    assert_eq!(
        pod.call(Request::RemoveContainer {
            container_id: "never".into()
        }),
        Ok(Response::Ok)
    );
    assert!(pod.alive());
}

#[test]
#[ignore = "needs root: mounts, namespaces, loop devices"]
fn identity_readonly_root_seccomp_and_overlay() {
    let mut pod = Pod::start("ident", &["root5", "root6", "layer6"]);
    let mut s = spec(&[
        "sh",
        "-c",
        "id; umask; cat /proc/sys/kernel/msgmax; ulimit -n; \
         mkdir /tmp/d 2>&1; touch /x 2>&1; cat /proc/keys 2>&1 | wc -c; \
         grep CapEff /proc/self/status; cat /proc/self/oom_score_adj",
    ]);
    s["process"]["oomScoreAdj"] = json!(500);
    s["process"]["user"] = json!({"uid": 0, "gid": 0, "username": "web", "umask": 23});
    s["process"]["capabilities"]["ambient"] = json!(["CAP_KILL"]);
    s["process"]["capabilities"]["inheritable"] = json!(["CAP_KILL"]);
    s["root"]["readonly"] = json!(true);
    s["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
    pod.create("who", "root5", s).unwrap();
    pod.start_container("who");
    let out = read_all(pod.stream("who", None, StdioStream::Stdout));
    assert_eq!(pod.wait("who", None), ExitStatus::Code(0), "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("uid=1000(web) gid=1000(web) groups=")
            && lines[0].contains("2000(extra)"),
        "{out}"
    );
    assert_eq!(lines[1], "0027", "{out}");
    assert_eq!(lines[2], "4096", "{out}");
    assert_eq!(lines[3], "512", "{out}");
    assert!(
        lines[4].contains("Operation not permitted"),
        "seccomp: {out}"
    );
    assert!(
        lines[5].contains("Read-only file system"),
        "read-only root: {out}"
    );
    assert_eq!(lines[6].trim(), "0", "masked /proc/keys: {out}");
    // Only the ambient CAP_KILL survives the change to uid 1000.
    assert_eq!(lines[7], "CapEff:\t0000000000000020", "{out}");
    assert_eq!(lines[8], "500", "{out}");

    // A read-only disk with a writable overlay: writes work and stay in
    // memory; the disk itself is read-only.
    let mut overlay = rootfs("root6");
    overlay.read_only = true;
    overlay.writable_overlay = true;
    pod.create_rootfs(
        "ovl",
        spec(&["sh", "-c", "echo data > /new && cat /new"]),
        overlay,
    )
    .unwrap();
    pod.start_container("ovl");
    assert_eq!(
        read_all(pod.stream("ovl", None, StdioStream::Stdout)),
        "data\n"
    );
    assert_eq!(pod.wait("ovl", None), ExitStatus::Code(0));
    let mut ro = rootfs("root6");
    ro.read_only = true;
    pod.call(Request::RemoveContainer {
        container_id: "ovl".into(),
    })
    .unwrap();
    pod.create_rootfs("ro", spec(&["sh", "-c", "test ! -e /new && touch /y"]), ro)
        .unwrap();
    pod.start_container("ro");
    assert_eq!(pod.wait("ro", None), ExitStatus::Code(1));
    pod.call(Request::RemoveContainer {
        container_id: "ro".into(),
    })
    .unwrap();

    // The read-only disk again, the overlay's upper layer on a disk of its
    // own (how the shim shares an image's layers between containers): the
    // container's writes land on that disk, under `upper`.
    let mut layered = rootfs("root6");
    layered.read_only = true;
    layered.writable_overlay = true;
    layered.writable_layer = Some(WritableLayer {
        drive_id: "layer6".into(),
        fstype: "ext4".into(),
        size_bytes: None,
    });
    let mut no_overlay = layered.clone();
    no_overlay.writable_overlay = false;
    let refused = pod
        .create_rootfs("bad", spec(&["true"]), no_overlay)
        .unwrap_err();
    assert_eq!(refused.code, ErrorCode::InvalidArgument, "{refused:?}");
    pod.create_rootfs(
        "layered",
        spec(&["sh", "-c", "test ! -e /new && echo kept > /new && cat /new"]),
        layered,
    )
    .unwrap();
    pod.start_container("layered");
    assert_eq!(
        read_all(pod.stream("layered", None, StdioStream::Stdout)),
        "kept\n"
    );
    assert_eq!(pod.wait("layered", None), ExitStatus::Code(0));
    pod.call(Request::RemoveContainer {
        container_id: "layered".into(),
    })
    .unwrap();
    let debugfs = |image: &str, cmd: &str| {
        sh(&format!(
            "debugfs -R '{cmd}' {} 2>&1 | grep -v '^debugfs [0-9]'",
            pod.dir.join(format!("{image}.ext4")).display()
        ))
    };
    assert_eq!(debugfs("layer6", "cat /upper/new"), "kept");
    assert!(
        debugfs("root6", "stat /new").contains("File not found"),
        "the read-only disk was written"
    );
}

#[test]
#[ignore = "needs root: mounts, namespaces, loop devices"]
fn terminal_process() {
    let mut pod = Pod::start("tty", &["root7"]);
    let mut s = spec(&["sh", "-c", "tty; stty size 2>/dev/null || true; echo done"]);
    s["process"]["terminal"] = json!(true);
    pod.create("t", "root7", s).unwrap();
    pod.call(Request::ResizeTty {
        process: pref("t", None),
        rows: 33,
        cols: 99,
    })
    .unwrap();
    let tty = pod.stream("t", None, StdioStream::Tty);
    pod.start_container("t");
    assert_eq!(pod.wait("t", None), ExitStatus::Code(0));
    let mut out = Vec::new();
    let mut tty = tty;
    tty.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let _ = tty.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out);
    // The terminal is the container's /dev/console, sized as asked.
    assert!(out.contains("/dev/console"), "{out}");
    assert!(out.contains("33 99"), "{out}");
    assert!(out.contains("done"), "{out}");
}

/// A limit the pod's cgroup has no controller for is refused, not ignored:
/// the pod's cgroup is given every controller but pids, as on this host,
/// whose cgroup v2 has its controllers bound to v1.
#[test]
#[ignore = "needs root: mounts, namespaces, loop devices"]
fn a_limit_the_cgroup_cannot_enforce_is_refused() {
    let mut pod = Pod::start_withholding("limits-refused", &["root8"], &["pids"]);
    let mut s = spec(&["true"]);
    s["linux"]["resources"] = json!({"pids": {"limit": 8}});
    // Asked-for limits that cannot be enforced are an error, not ignored.
    assert_eq!(
        pod.create("pids", "root8", s).unwrap_err().code,
        ErrorCode::Unsupported
    );
}

/// Limits enforced where cgroup v2 has every controller: in the node VM
/// (Debian's kernel, cgroup2 at /sys/fs/cgroup), this test binary and the
/// agent in the payload, the loop driver loaded by the node's init. A fork
/// bomb stopped by pids.max; a memory limit ending in an OOM kill, its
/// event and the kill in the stats.
#[test]
fn limits_are_enforced_in_the_node_vm() {
    if husk_tests::in_rerun() {
        return enforce_limits();
    }
    husk_tests::Payload::new("agent-limits")
        .add(&cargo_binary("husk-agent"), "husk-agent")
        .add(&husk_tests::host_tool("mke2fs"), "mke2fs")
        .rerun_this_test()
        .env("HUSK_TEST_MKE2FS", "$PWD/mke2fs")
        .env("HUSK_TEST_AGENT", "$PWD/husk-agent")
        .env("HUSK_TEST_CGROUP2", "/sys/fs/cgroup")
        .run()
        .assert_contains("LIMITS-ENFORCED");
}

/// The node VM's half of [`limits_are_enforced_in_the_node_vm`].
fn enforce_limits() {
    let mut pod = Pod::start("limits", &["root8"]);
    let controllers =
        std::fs::read_to_string(pod.cgroup.join("cgroup.controllers")).unwrap_or_default();
    for c in ["pids", "memory"] {
        assert!(
            controllers.split_whitespace().any(|x| x == c),
            "the node VM's cgroup v2 lacks the {c} controller (it has {controllers:?})"
        );
    }
    let mut s = spec(&[
        "sh",
        "-c",
        "for i in 1 2 3 4 5 6 7 8 9 10; do sleep 5 & done; wait",
    ]);
    s["linux"]["resources"] = json!({"pids": {"limit": 4}});
    pod.create("pids", "root8", s).unwrap();
    pod.start_container("pids");
    let err = read_all(pod.stream("pids", None, StdioStream::Stderr));
    assert!(err.contains("fork") || err.contains("resource"), "{err}");
    pod.wait("pids", None);
    pod.call(Request::RemoveContainer {
        container_id: "pids".into(),
    })
    .unwrap();
    let (mut events, _) = connect(&pod.sock, Channel::Events);
    let mut s = spec(&["sh", "-c", "dd if=/dev/zero of=/dev/shm/f bs=1M count=64"]);
    s["linux"]["resources"] = json!({"memory": {"limit": 16777216, "swap": 16777216}});
    pod.create("oom", "root8", s).unwrap();
    pod.start_container("oom");
    pod.wait("oom", None);
    let mut saw_oom = false;
    for _ in 0..3 {
        if let Ok(Event::Oom { container_id }) = read_frame::<_, Event>(&mut events) {
            assert_eq!(container_id, "oom");
            saw_oom = true;
            break;
        }
    }
    assert!(saw_oom);
    match pod.call(Request::StatsContainer {
        container_id: "oom".into(),
    }) {
        Ok(Response::Stats(s)) => {
            assert!(s.oom_kills >= 1, "{s:?}");
            assert_eq!(s.memory_limit_bytes, Some(16 << 20), "{s:?}");
        }
        other => panic!("{other:?}"),
    }
    eprintln!("LIMITS-ENFORCED pids memory oom");
}

/// OCI process values for ExecProcess.
mod oci_like {
    pub use husk_protocol::oci_spec::runtime::Process;

    pub fn process(args: &[&str]) -> Process {
        serde_json::from_value(serde_json::json!({
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin"],
            "cwd": "/",
            "noNewPrivileges": true
        }))
        .unwrap()
    }
}

/// Time from CreateContainer to the program running (create, then start to
/// execve), and the agent's resident memory after 20 containers. Prints
/// the numbers; the bounds asserted are loose (debug builds, shared CPUs).
/// `HUSK_TEST_AGENT=target/x86_64-unknown-linux-gnu/release/husk-agent`
/// measures the static release agent.
#[test]
#[ignore = "needs root: mounts, namespaces, loop devices"]
fn start_latency_and_agent_memory() {
    let mut pod = Pod::start("latency", &["root9"]);
    let mut times = Vec::new();
    for i in 0..20 {
        let id = format!("l{i}");
        let t = Instant::now();
        pod.create(&id, "root9", spec(&["true"])).unwrap();
        pod.start_container(&id);
        times.push(t.elapsed());
        assert_eq!(pod.wait(&id, None), ExitStatus::Code(0));
        pod.call(Request::RemoveContainer { container_id: id })
            .unwrap();
    }
    times.sort();
    let status = std::fs::read_to_string(format!("/proc/{}/status", pod.child.id())).unwrap();
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    eprintln!(
        "AGENT-START-LATENCY median {:?} min {:?} max {:?}; AGENT-RSS {rss_kib} KiB",
        times[times.len() / 2],
        times[0],
        times[times.len() - 1]
    );
    // The numbers themselves are measured in a guest by `husk-bench run`;
    // here only a blow-up (a leak per container) fails.
    assert!(
        rss_kib < 64 * 1024,
        "agent RSS {rss_kib} KiB after 20 containers"
    );
}

#[test]
#[ignore = "needs root: mounts, namespaces, loop devices"]
fn user_namespace_when_asked() {
    let mut pod = Pod::start("userns", &["root10"]);
    let mut s = spec(&["sh", "-c", "cat /proc/self/uid_map; id -u; sleep 1000"]);
    s["linux"]["namespaces"] = json!([
        {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
        {"type": "user"}, {"type": "cgroup"}
    ]);
    s["linux"]["uidMappings"] = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
    s["linux"]["gidMappings"] = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
    s["linux"]["sysctl"] = json!({});
    pod.create("u", "root10", s).unwrap();
    pod.start_container("u");
    let mut out = pod.stream("u", None, StdioStream::Stdout);
    let mut buf = [0u8; 256];
    let mut got = String::new();
    while !got.ends_with("0\n") || got.lines().count() < 2 {
        let n = out.read(&mut buf).unwrap();
        assert!(n > 0, "{got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let fields: Vec<&str> = got.split_whitespace().collect();
    assert_eq!(fields, ["0", "100000", "65536", "0"], "{got}");
    // An exec joins the user namespace too.
    let r = pod.call(Request::ExecProcess {
        container_id: "u".into(),
        exec_id: "e".into(),
        process: Box::new(oci_like::process(&["sh", "-c", "cat /proc/self/uid_map"])),
    });
    assert!(matches!(r, Ok(Response::Started { .. })), "{r:?}");
    let out = read_all(pod.stream("u", Some("e"), StdioStream::Stdout));
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["0", "100000", "65536"]
    );
    pod.call(Request::SignalProcess {
        process: pref("u", None),
        signal: 9,
        all: false,
    })
    .unwrap();
    assert_eq!(pod.wait("u", None), ExitStatus::Signal(9));
}

/// The agent as PID 1 (of a pid namespace in the node VM, whose root is an
/// initramfs like the guest's): it must leave the initramfs so containers
/// get a real pivot_root, and still run them.
#[test]
fn pid1_leaves_the_initramfs_and_runs_containers() {
    if husk_tests::in_rerun() {
        return pid1_in_the_node_vm();
    }
    // The guest's agent: static, so it still runs after it has re-executed
    // itself in a root that holds nothing else.
    let cpio = std::env::temp_dir().join(format!("husk-agent-pid1-{}.cpio", std::process::id()));
    let status = Command::new("bash")
        .arg(husk_tests::repo_root().join("resources/agent/build.sh"))
        .arg(&cpio)
        .status()
        .unwrap();
    assert!(status.success(), "resources/agent/build.sh failed");
    let _ = std::fs::remove_file(&cpio);
    let agent = husk_tests::repo_root().join("target/x86_64-unknown-linux-gnu/release/husk-agent");
    husk_tests::Payload::new("agent-pid1")
        .add(&agent, "husk-agent")
        .add(&husk_tests::host_tool("mke2fs"), "mke2fs")
        .rerun_this_test()
        .env("HUSK_TEST_MKE2FS", "$PWD/mke2fs")
        .env("HUSK_TEST_AGENT", "$PWD/husk-agent")
        .run()
        .assert_contains("PID1-OK");
}

/// The node VM's half of [`pid1_leaves_the_initramfs_and_runs_containers`].
fn pid1_in_the_node_vm() {
    let mut pod = Pod::start_pid1("pid1", &["rootp"]);
    let mut s = spec(&["sh", "-c", "echo in $(hostname); cat /proc/self/mountinfo"]);
    s["linux"]["resources"] = json!({"pids": {"limit": 16}});
    pod.create("c", "rootp", s).unwrap();
    pod.start_container("c");
    eprintln!("started");
    let out = read_all(pod.stream("c", None, StdioStream::Stdout));
    assert_eq!(pod.wait("c", None), ExitStatus::Code(0), "{out}");
    assert!(out.starts_with("in box\n"), "{out}");
    // pivot_root detached the agent's root: only the container's mounts.
    assert!(!out.contains("/run/husk"), "{out}");
    let log = std::fs::read_to_string(pod.dir.join("agent.log")).unwrap();
    assert!(!log.contains("cannot leave the initramfs"), "{log}");
    let agent_pid = child_of(pod.child.id()).unwrap();
    let mounts = std::fs::read_to_string(format!("/proc/{agent_pid}/mounts")).unwrap();
    let root = mounts
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("/"));
    assert!(
        root.is_some_and(|l| l.starts_with("tmpfs / tmpfs")),
        "{mounts}"
    );
    assert!(pod.cgroup.join("husk/c/pids.max").exists());
    pod.call(Request::RemoveContainer {
        container_id: "c".into(),
    })
    .unwrap();
    assert_eq!(pod.call(Request::Shutdown), Ok(Response::Ok));
    eprintln!("PID1-OK");
}
