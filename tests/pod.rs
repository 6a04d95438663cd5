//! A pod in a real guest: husk boots a microVM with husk-agent as its
//! init, a busybox root filesystem on a virtio-blk drive and a vsock, and
//! this test (run a second time inside the node VM, as the pod's client,
//! by `husk_tests::Rerun`) drives the agent over the vsock's unix socket
//! the way a runtime shim does. In one VM: two containers of the pod talking over localhost TCP,
//! an exec into a running container, SIGKILL reported as a signal, an
//! exit code, a read-only root refusing writes, a pids limit, and a memory
//! limit ending in an OOM kill and its event. In another: the pod's
//! network, an address and a default route of each family set by
//! CreateSandbox, a container reaching the node over IPv4 and IPv6.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use husk_protocol::client::{AgentClient, Endpoint};
use husk_protocol::frame::read_frame;
use husk_protocol::oci_spec::runtime::{Process, Spec};
use husk_protocol::{
    Channel, CreateContainer, Event, ExitStatus, ProcessRef, Request, Response, Rootfs, Sandbox,
    StdioStream, DEFAULT_AGENT_PORT,
};
use husk_tests::{agent_initrd, artifacts, busybox_rootfs, husk_bench_binary, oci_spec, Payload};
use serde_json::json;

/// The running microVM's vsock socket, in the node VM (the payload is the
/// working directory of both the script and the test's second run).
const UDS: &str = "v.sock";

/// Boots the pod's microVM in the node VM (after `setup`, with `flags`
/// added to `husk boot`) and runs the calling test a second time there, as
/// its client; returns the node's output.
fn pod_vm(name: &str, setup: &str, flags: &str) -> husk_tests::RunResult {
    let a = artifacts();
    let p = Payload::new(name)
        .add(&a.husk, "husk")
        .add(&a.vmlinux, "vmlinux")
        .add(agent_initrd(), "agent.cpio")
        .add(&husk_bench_binary(), "husk-bench");
    let rootfs = busybox_rootfs(p.path());
    p.add(&rootfs, "rootfs.ext4")
        .rerun_this_test()
        .before(&format!(
            "{setup}
             ./husk boot --kernel vmlinux --initrd agent.cpio --vcpus 2 --mem-mib 256 \
               --cmdline 'console=ttyS0 reboot=k panic=1 pci=off quiet' \
               --drive id=rootfs,path=rootfs.ext4,ro --vsock cid=3,uds={UDS} {flags} > console.txt 2>&1 &
             vmm=$!"
        ))
        .time_limit(300)
        .after(
            "wait $vmm
             echo \"HUSK-EXIT $?\"
             echo '--- console'; tail -n 30 console.txt",
        )
        .run()
}

#[test]
fn a_pod_in_a_real_guest() {
    if husk_tests::in_rerun() {
        return client(Path::new(UDS));
    }
    let r = pod_vm("a_pod_in_a_real_guest", "", "");
    // The client's Shutdown ends the guest, and with it husk, cleanly.
    assert_eq!(r.value("HUSK-EXIT").as_deref(), Some("0"), "{}", r.output);
    for line in [
        "POD-LOCALHOST hello-over-localhost",
        "POD-EXEC hello-over-localhost",
        "POD-SIGKILL Signal(9)",
        "POD-EXIT Code(42)",
        "POD-READONLY refused",
        "POD-PIDS limited",
        "POD-OOM event",
    ] {
        r.assert_contains(line);
    }
}

#[test]
fn a_pod_on_the_network_over_ipv4_and_ipv6() {
    if husk_tests::in_rerun() {
        return network_client(Path::new(UDS));
    }
    // The node's end of the pod's tap: 10.0.0.1 and fd00::1 on the link,
    // and one address of each family beyond it (on lo) that the pod can
    // only reach through its default routes; a web server on all of them.
    let r = pod_vm(
        "a_pod_on_the_network_over_ipv4_and_ipv6",
        "./husk-bench tap tap0 || exit 10
         echo 0 > /proc/sys/net/ipv6/conf/tap0/accept_dad
         ip addr add 10.0.0.1/24 dev tap0 && ip -6 addr add fd00::1/64 dev tap0 || exit 11
         ip addr add 192.168.77.1/32 dev lo && ip -6 addr add fd77::1/128 dev lo || exit 12
         ip link set tap0 up || exit 13
         mkdir -p www && echo hello-from-the-node > www/index.html
         httpd -p 8080 -h www || exit 14",
        "--net id=eth0,tap=tap0,mac=02:00:00:00:00:01",
    );
    assert_eq!(r.value("HUSK-EXIT").as_deref(), Some("0"), "{}", r.output);
    for line in [
        "POD-NET 10.0.0.1 hello-from-the-node",
        "POD-NET [fd00::1] hello-from-the-node",
        "POD-NET 192.168.77.1 hello-from-the-node",
        "POD-NET [fd77::1] hello-from-the-node",
    ] {
        r.assert_contains(line);
    }
}

/// CreateSandbox with an address and a default route of each family, then
/// a container fetching a page from the node over each.
fn network_client(uds: &Path) {
    let endpoint = Endpoint::Vsock {
        uds: uds.to_path_buf(),
        port: DEFAULT_AGENT_PORT,
    };
    let agent =
        AgentClient::connect(endpoint, Duration::from_secs(180)).expect("the agent answers");
    let mut pod = Pod { agent };
    let sandbox: Sandbox = serde_json::from_value(json!({
        "hostname": "netpod",
        "interfaces": [{
            "name": "eth0",
            "mac": "02:00:00:00:00:01",
            "addresses": ["10.0.0.2/24", "fd00::2/64"]
        }],
        "routes": [
            {"destination": "default", "gateway": "10.0.0.1"},
            {"destination": "default", "gateway": "fd00::1"}
        ]
    }))
    .expect("a sandbox");
    pod.call(Request::CreateSandbox(sandbox));
    for (i, host) in ["10.0.0.1", "[fd00::1]", "192.168.77.1", "[fd77::1]"]
        .into_iter()
        .enumerate()
    {
        let id = format!("net{i}");
        pod.create(
            &id,
            json!(["sh", "-c", format!("for i in $(seq 50); do wget -q -O - http://{host}:8080/index.html && exit 0; sleep 0.2; done; ip addr; ip route; ip -6 route; exit 1")]),
            None,
            false,
        );
        let out = pod.stream(&id, None, StdioStream::Stdout);
        pod.start(&id);
        let page = read_all(out);
        let status = pod.wait(&id, None);
        assert_eq!(status, ExitStatus::Code(0), "{host}: {page}");
        println!("POD-NET {host} {}", page.trim());
        pod.call(Request::RemoveContainer { container_id: id });
    }
    let _ = pod.agent.call(Request::Shutdown);
}

/// The pod's client, inside the node VM.
fn client(uds: &Path) {
    let endpoint = Endpoint::Vsock {
        uds: uds.to_path_buf(),
        port: DEFAULT_AGENT_PORT,
    };
    let mut agent = AgentClient::connect(endpoint.clone(), Duration::from_secs(180))
        .expect("the agent answers");
    let mut events = endpoint.open(Channel::Events).expect("the event stream");
    agent
        .call(Request::CreateSandbox(Sandbox {
            hostname: Some("pod".into()),
            ..Default::default()
        }))
        .expect("CreateSandbox");
    let mut pod = Pod { agent };

    // Two containers sharing the pod's network namespace: a web server on
    // 127.0.0.1 and a client of it.
    pod.create(
        "web",
        json!(["sh", "-c", "mkdir -p /tmp/www && echo hello-over-localhost > /tmp/www/index.html && exec httpd -f -p 127.0.0.1:8080 -h /tmp/www"]),
        None,
        true,
    );
    pod.start("web");
    pod.create(
        "fetch",
        json!(["sh", "-c", "for i in $(seq 100); do wget -q -O - http://127.0.0.1:8080/index.html && exit 0; sleep 0.1; done; exit 1"]),
        None,
        true,
    );
    let out = pod.stream("fetch", None, StdioStream::Stdout);
    pod.start("fetch");
    let fetched = read_all(out);
    assert_eq!(pod.wait("fetch", None), ExitStatus::Code(0), "{fetched}");
    println!("POD-LOCALHOST {}", fetched.trim());

    // An exec into the running server sees its files.
    let process: Process = serde_json::from_value(json!({
        "user": {"uid": 0, "gid": 0},
        "args": ["cat", "/tmp/www/index.html"],
        "env": ["PATH=/bin"],
        "cwd": "/"
    }))
    .unwrap();
    pod.call(Request::ExecProcess {
        container_id: "web".into(),
        exec_id: "peek".into(),
        process: Box::new(process),
    });
    let out = pod.stream("web", Some("peek"), StdioStream::Stdout);
    let peeked = read_all(out);
    assert_eq!(pod.wait("web", Some("peek")), ExitStatus::Code(0));
    println!("POD-EXEC {}", peeked.trim());

    // SIGKILL from outside ends the server; the status says so.
    pod.call(Request::SignalProcess {
        process: pref("web", None),
        signal: libc::SIGKILL,
        all: false,
    });
    println!("POD-SIGKILL {:?}", pod.wait("web", None));

    pod.create("code", json!(["sh", "-c", "exit 42"]), None, true);
    pod.start("code");
    println!("POD-EXIT {:?}", pod.wait("code", None));

    // The drive read-only and no overlay: the root refuses writes.
    pod.create(
        "ro",
        json!(["sh", "-c", "touch /written 2>&1; echo status=$?"]),
        None,
        false,
    );
    let out = pod.stream("ro", None, StdioStream::Stdout);
    pod.start("ro");
    let said = read_all(out);
    pod.wait("ro", None);
    assert!(
        said.contains("Read-only file system") && said.contains("status=1"),
        "{said}"
    );
    println!("POD-READONLY refused");

    // pids.max = 4: the fifth process cannot be forked.
    pod.create(
        "pids",
        json!([
            "sh",
            "-c",
            "for i in 1 2 3 4 5 6 7 8 9 10; do sleep 5 & done; wait"
        ]),
        Some(json!({"pids": {"limit": 4}})),
        true,
    );
    let err = pod.stream("pids", None, StdioStream::Stderr);
    pod.start("pids");
    let said = read_all(err);
    pod.wait("pids", None);
    assert!(said.contains("fork") || said.contains("resource"), "{said}");
    println!("POD-PIDS limited");

    // 16 MiB of memory, 64 MiB written to tmpfs: the OOM killer ends it
    // and the event stream says so.
    pod.create(
        "oom",
        json!(["sh", "-c", "dd if=/dev/zero of=/dev/shm/f bs=1M count=64"]),
        Some(json!({"memory": {"limit": 16777216, "swap": 16777216}})),
        true,
    );
    pod.start("oom");
    let status = pod.wait("oom", None);
    assert_eq!(status, ExitStatus::Signal(libc::SIGKILL), "{status:?}");
    events
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut saw_oom = false;
    while !saw_oom && Instant::now() < deadline {
        match read_frame::<_, Event>(&mut events) {
            Ok(Event::Oom { container_id }) => saw_oom = container_id == "oom",
            Ok(_) => {}
            Err(e) => panic!("event stream: {e}"),
        }
    }
    assert!(saw_oom, "no OOM event for the container");
    println!("POD-OOM event");

    for id in ["web", "fetch", "code", "ro", "pids", "oom"] {
        pod.call(Request::RemoveContainer {
            container_id: id.into(),
        });
    }
    // Ends the guest; the VMM exits 0.
    let _ = pod.agent.call(Request::Shutdown);
}

struct Pod {
    agent: AgentClient,
}

impl Pod {
    fn call(&mut self, request: Request) -> Response {
        let what = format!("{request:?}");
        self.agent
            .call(request)
            .unwrap_or_else(|e| panic!("{}: {e}", &what[..what.len().min(120)]))
    }

    /// A container from the busybox drive running `args`; `overlay` gives
    /// it a writable tmpfs over the read-only drive.
    fn create(
        &mut self,
        id: &str,
        args: serde_json::Value,
        resources: Option<serde_json::Value>,
        overlay: bool,
    ) {
        let mut spec = oci_spec(&[]);
        spec["process"]["args"] = args;
        spec["hostname"] = json!(id);
        if let Some(r) = resources {
            spec["linux"]["resources"] = r;
        }
        let spec: Spec = serde_json::from_value(spec).expect("a valid spec");
        self.call(Request::CreateContainer(CreateContainer {
            container_id: id.into(),
            spec: Box::new(spec),
            rootfs: Rootfs {
                drive_id: "rootfs".into(),
                fstype: "ext4".into(),
                read_only: true,
                writable_overlay: overlay,
                writable_layer: None,
                size_bytes: None,
                share: None,
            },
            volumes: None,
        }));
    }

    fn start(&mut self, id: &str) {
        self.call(Request::StartContainer {
            container_id: id.into(),
        });
    }

    fn wait(&mut self, id: &str, exec: Option<&str>) -> ExitStatus {
        match self.call(Request::WaitProcess(pref(id, exec))) {
            Response::Exited(status) => status,
            other => panic!("WaitProcess answered {other:?}"),
        }
    }

    fn stream(&mut self, id: &str, exec: Option<&str>, stream: StdioStream) -> UnixStream {
        self.agent
            .open_stdio(id, exec, stream)
            .unwrap_or_else(|e| panic!("stdio of {id}: {e}"))
    }
}

fn pref(id: &str, exec: Option<&str>) -> ProcessRef {
    ProcessRef {
        container_id: id.into(),
        exec_id: exec.map(Into::into),
    }
}

fn read_all(mut s: UnixStream) -> String {
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read a stdio stream");
    out
}
