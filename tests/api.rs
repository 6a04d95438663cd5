//! The REST API against a real `husk --api-sock` process on this host:
//! every endpoint's configuration-time behaviour and every error class, and
//! the server's resistance to slow, half-open and numerous clients. Nothing
//! here starts a guest (that is api_boot.rs, in the node VM), so these run
//! on any host.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use husk_tests::husk_binary;
use serde_json::{json, Value};

/// A husk process serving the API on a socket in its own directory.
struct Api {
    child: Child,
    dir: PathBuf,
    sock: PathBuf,
}

impl Api {
    fn start(name: &str) -> Api {
        Self::start_with(name, &[])
    }

    fn start_with(name: &str, extra: &[&str]) -> Api {
        let dir = std::env::temp_dir().join(format!("husk-api-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("api.sock");
        let child = Command::new(husk_binary())
            .arg("--api-sock")
            .arg(&sock)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start husk");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(
                Instant::now() < deadline,
                "husk did not create {}",
                sock.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Api { child, dir, sock }
    }

    fn connect(&self) -> UnixStream {
        let s = UnixStream::connect(&self.sock).expect("connect to the API");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    /// One request on a fresh connection: (status, JSON body or Null).
    fn req(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let mut s = self.connect();
        send(&mut s, method, path, body, true);
        read_response(&mut s)
    }

    fn file(&self, name: &str, contents: &[u8]) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, contents).unwrap();
        p
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn send(s: &mut UnixStream, method: &str, path: &str, body: Option<&str>, close: bool) {
    let body = body.unwrap_or("");
    let conn = if close { "close" } else { "keep-alive" };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: {conn}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("send request");
}

/// Reads one response (headers, then Content-Length bytes of body).
fn read_response(s: &mut UnixStream) -> (u16, Value) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).expect("read response head");
        assert_eq!(
            n,
            1,
            "connection closed mid-response: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).unwrap();
    let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).expect("read body");
    let value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body).expect("JSON body")
    };
    (status, value)
}

fn assert_fault(r: (u16, Value), status: u16, needle: &str) {
    assert_eq!(r.0, status, "{:?}", r.1);
    let msg = r.1["fault_message"]
        .as_str()
        .unwrap_or_else(|| panic!("no fault_message: {:?}", r.1));
    assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
}

#[test]
fn instance_info_and_machine_config() {
    let api = Api::start_with("info", &["--id", "pod-1"]);
    let (status, info) = api.req("GET", "/", None);
    assert_eq!(status, 200);
    assert_eq!(info["id"], "pod-1");
    assert_eq!(info["state"], "Not started");
    assert_eq!(info["app_name"], "husk");
    assert!(info["vmm_version"].is_string());

    assert_eq!(api.req("GET", "/machine-config", None).1["vcpu_count"], 1);
    let put = api.req(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 2, "mem_size_mib": 512, "smt": false}"#),
    );
    assert_eq!(put.0, 204);
    assert_eq!(
        api.req("PATCH", "/machine-config", Some(r#"{"mem_size_mib": 256}"#))
            .0,
        204
    );
    let (_, m) = api.req("GET", "/machine-config", None);
    assert_eq!(
        (m["vcpu_count"].as_u64(), m["mem_size_mib"].as_u64()),
        (Some(2), Some(256))
    );
}

#[test]
fn configuration_shows_in_vm_config() {
    let api = Api::start("config");
    let kernel = api.file("vmlinux", b"not really a kernel");
    let disk = api.file("disk.img", &[0u8; 4096]);
    let put = |path: &str, body: Value| {
        let r = api.req("PUT", path, Some(&body.to_string()));
        assert_eq!(r.0, 204, "PUT {path}: {:?}", r.1);
    };
    put(
        "/boot-source",
        json!({"kernel_image_path": kernel, "boot_args": "console=ttyS0"}),
    );
    put(
        "/drives/rootfs",
        json!({"drive_id": "rootfs", "path_on_host": disk, "is_root_device": true, "is_read_only": true}),
    );
    put(
        "/drives/data",
        json!({"drive_id": "data", "path_on_host": disk, "is_root_device": false}),
    );
    put(
        "/network-interfaces/eth0",
        json!({"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"}),
    );
    put(
        "/vsock",
        json!({"guest_cid": 3, "uds_path": api.dir.join("v.sock")}),
    );
    put(
        "/metrics",
        json!({"metrics_path": api.dir.join("metrics.json")}),
    );
    put("/logger", json!({"level": "Warning"}));
    assert_eq!(
        api.req(
            "PATCH",
            "/drives/data",
            Some(&json!({"drive_id": "data", "path_on_host": kernel}).to_string())
        )
        .0,
        204
    );
    let (status, cfg) = api.req("GET", "/vm/config", None);
    assert_eq!(status, 200);
    assert_eq!(cfg["boot-source"]["boot_args"], "console=ttyS0");
    assert_eq!(cfg["drives"][0]["drive_id"], "rootfs");
    assert_eq!(cfg["drives"][0]["is_read_only"], true);
    assert_eq!(cfg["drives"][1]["path_on_host"], kernel.to_str().unwrap());
    assert_eq!(cfg["network-interfaces"][0]["host_dev_name"], "tap0");
    assert_eq!(cfg["vsock"]["guest_cid"], 3);
    assert_eq!(cfg["logger"]["level"], "Warning");
    // The same document is a valid --config-file (checked by husk itself
    // in api_boot.rs); here: it parses back to the same thing.
    assert!(cfg["machine-config"].is_object());
}

#[test]
fn every_error_class_is_a_4xx_with_a_fault_message() {
    let api = Api::start("errors");
    let kernel = api.file("vmlinux", b"x");
    // Malformed JSON, unknown fields, missing fields, out-of-range values.
    assert_fault(
        api.req("PUT", "/machine-config", Some("{\"vcpu_count\": 1,")),
        400,
        "invalid request body",
    );
    assert_fault(
        api.req(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count":1,"mem_size_mib":64,"cpus":2}"#),
        ),
        400,
        "unknown field",
    );
    assert_fault(
        api.req("PUT", "/machine-config", Some(r#"{"mem_size_mib":64}"#)),
        400,
        "missing field",
    );
    assert_fault(
        api.req(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count":0,"mem_size_mib":64}"#),
        ),
        400,
        "vcpu_count",
    );
    assert_fault(
        api.req(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count":1,"mem_size_mib":1}"#),
        ),
        400,
        "mem_size_mib",
    );
    assert_fault(
        api.req(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count":1000,"mem_size_mib":64}"#),
        ),
        400,
        "invalid request body",
    );
    assert_fault(api.req("PUT", "/machine-config", None), 400, "JSON body");
    assert_fault(
        api.req(
            "PUT",
            "/boot-source",
            Some(r#"{"kernel_image_path":"/nonexistent"}"#),
        ),
        400,
        "No such file",
    );
    assert_fault(
        api.req(
            "PUT",
            "/drives/a",
            Some(
                &json!({"drive_id": "b", "path_on_host": kernel, "is_root_device": false})
                    .to_string(),
            ),
        ),
        400,
        "differ",
    );
    assert_fault(
        api.req(
            "PUT",
            "/drives/..",
            Some(
                &json!({"drive_id": "..", "path_on_host": kernel, "is_root_device": false})
                    .to_string(),
            ),
        ),
        400,
        "invalid drive id",
    );
    assert_fault(
        api.req(
            "PUT",
            "/network-interfaces/eth0",
            Some(r#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"zz"}"#),
        ),
        400,
        "MAC",
    );
    assert_fault(
        api.req(
            "PUT",
            "/vsock",
            Some(r#"{"guest_cid":2,"uds_path":"/tmp/v.sock"}"#),
        ),
        400,
        "guest_cid",
    );
    assert_fault(
        api.req("PUT", "/logger", Some(r#"{"level":"Loud"}"#)),
        400,
        "log level",
    );
    assert_fault(
        api.req(
            "PUT",
            "/metrics",
            Some(r#"{"metrics_path":"/nonexistent/m.json"}"#),
        ),
        400,
        "metrics",
    );
    // Requests in the wrong state.
    assert_fault(
        api.req("PATCH", "/vm", Some(r#"{"state":"Resumed"}"#)),
        400,
        "not started",
    );
    assert_fault(
        api.req(
            "PUT",
            "/actions",
            Some(r#"{"action_type":"SendCtrlAltDel"}"#),
        ),
        400,
        "not started",
    );
    assert_fault(
        api.req(
            "PUT",
            "/actions",
            Some(r#"{"action_type":"InstanceStart"}"#),
        ),
        400,
        "boot source",
    );
    assert_fault(
        api.req("PUT", "/actions", Some(r#"{"action_type":"FlushMetrics"}"#)),
        400,
        "metrics",
    );
    assert_fault(
        api.req("PATCH", "/drives/nope", Some(r#"{"drive_id":"nope"}"#)),
        400,
        "no drive",
    );
    // A kernel that is not one fails at InstanceStart with a 400, and the
    // VMM is still there to be configured again.
    assert_eq!(
        api.req(
            "PUT",
            "/boot-source",
            Some(&json!({"kernel_image_path": kernel}).to_string())
        )
        .0,
        204
    );
    assert_fault(
        api.req(
            "PUT",
            "/actions",
            Some(r#"{"action_type":"InstanceStart"}"#),
        ),
        400,
        "cannot start",
    );
    assert_eq!(api.req("GET", "/", None).1["state"], "Not started");
    // Unknown paths and wrong methods.
    assert_fault(api.req("GET", "/balloon", None), 404, "no such resource");
    assert_fault(api.req("GET", "/snapshot/create", None), 405, "use PUT");
    assert_fault(
        api.req("DELETE", "/drives/rootfs", None),
        405,
        "not allowed",
    );
    assert_fault(api.req("POST", "/actions", Some("{}")), 405, "PUT");
    // Capped bodies.
    let big = format!("{{\"x\":\"{}\"}}", "a".repeat(60_000));
    let r = api.req("PUT", "/machine-config", Some(&big));
    assert_eq!(r.0, 413);
}

#[test]
fn slow_half_open_and_many_clients_do_not_block_others() {
    let api = Api::start("clients");
    // A client that stops mid-headers, one that stops mid-body, one that
    // connects and says nothing, and one that writes garbage.
    let mut slow_head = api.connect();
    slow_head.write_all(b"GET / HTTP/1.1\r\nHost: loc").unwrap();
    let mut slow_body = api.connect();
    slow_body
        .write_all(b"PUT /machine-config HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"vcpu")
        .unwrap();
    let _silent = api.connect();
    let mut garbage = api.connect();
    garbage
        .write_all(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut garbage).0, 400);
    // A client that sends requests and never reads the answers.
    let mut deaf = api.connect();
    for _ in 0..50 {
        send(&mut deaf, "GET", "/vm/config", None, false);
    }
    // Twice as many connections as the server keeps.
    let crowd: Vec<UnixStream> = (0..128).map(|_| api.connect()).collect();
    let t0 = Instant::now();
    assert_eq!(api.req("GET", "/", None).0, 200);
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "answered only after {:?}",
        t0.elapsed()
    );
    drop(crowd);
    // The slow client can still finish its request.
    // (It may have been closed to make room for the crowd; if it was not,
    // it gets its answer.)
    let mut b = [0u8; 12];
    if slow_head.write_all(b"alhost\r\n\r\n").is_ok() && slow_head.read(&mut b).unwrap_or(0) == 12 {
        assert_eq!(&b, b"HTTP/1.1 200");
    }
}

#[test]
fn keep_alive_and_pipelining() {
    let api = Api::start("keepalive");
    let mut s = api.connect();
    for _ in 0..3 {
        send(&mut s, "GET", "/", None, false);
        assert_eq!(read_response(&mut s).0, 200);
    }
    // Three requests in one write are answered in order.
    let mut batch = Vec::new();
    for body in [
        r#"{"mem_size_mib":64}"#,
        "garbage",
        r#"{"mem_size_mib":96}"#,
    ] {
        batch.extend_from_slice(
            format!(
                "PATCH /machine-config HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
    }
    s.write_all(&batch).unwrap();
    assert_eq!(read_response(&mut s).0, 204);
    assert_eq!(read_response(&mut s).0, 400);
    assert_eq!(read_response(&mut s).0, 204);
    assert_eq!(
        api.req("GET", "/machine-config", None).1["mem_size_mib"],
        96
    );
    // Expect: 100-continue gets its interim answer, then the real one.
    s.write_all(
        b"PATCH /machine-config HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 19\r\n\r\n",
    )
    .unwrap();
    let mut cont = [0u8; 25];
    s.read_exact(&mut cont).unwrap();
    assert_eq!(&cont, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(br#"{"mem_size_mib":80}"#).unwrap();
    assert_eq!(read_response(&mut s).0, 204);
}

#[test]
fn metrics_and_logger_files() {
    let api = Api::start("metrics");
    let metrics = api.dir.join("metrics.json");
    let log = api.dir.join("husk.log");
    assert_eq!(
        api.req(
            "PUT",
            "/metrics",
            Some(&json!({"metrics_path": metrics}).to_string())
        )
        .0,
        204
    );
    assert_eq!(
        api.req(
            "PUT",
            "/logger",
            Some(&json!({"log_path": log, "level": "Debug", "show_level": true}).to_string())
        )
        .0,
        204
    );
    assert_eq!(api.req("GET", "/nothing-here", None).0, 404);
    assert_eq!(
        api.req("PUT", "/actions", Some(r#"{"action_type":"FlushMetrics"}"#))
            .0,
        204
    );
    let text = std::fs::read_to_string(&metrics).unwrap();
    let line: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    // PUT /metrics, PUT /logger, GET (404) answered before the flush.
    assert!(line["api"]["requests"].as_u64().unwrap() >= 3, "{line}");
    assert!(line["api"]["failures"].as_u64().unwrap() >= 1, "{line}");
    assert!(line["vcpu"]["exit_io_out"].is_u64());
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("DEBUG") && logged.contains("/nothing-here"),
        "{logged}"
    );
}

/// A block device node this process can open for reading (husk, run by
/// the same user, can then too).
fn readable_block_device() -> PathBuf {
    use std::os::unix::fs::FileTypeExt;
    std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| Path::new("/dev").join(e.file_name()))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device())
                && std::fs::File::open(p).is_ok()
        })
        .expect("this test needs a block device it can open (as root: any /dev/loopN, /dev/vda)")
}

#[test]
fn a_path_naming_a_fifo_socket_or_device_is_a_400_not_a_hung_vmm() {
    let api = Api::start("fifo");
    let kernel = api.file("vmlinux", b"x");
    let disk = api.file("disk.img", &[0u8; 4096]);
    let fifo = api.dir.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: c is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let sock = api.dir.join("a.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    // Each answer must come within read_response's 10 s: opening the FIFO
    // the way a regular file is opened would wait for a writer for ever.
    for (path, found) in [
        (fifo.clone(), "a FIFO"),
        (sock.clone(), "a socket"),
        (PathBuf::from("/dev/null"), "a character device"),
        (api.dir.clone(), "a directory"),
    ] {
        let p = path.display();
        assert_fault(
            api.req(
                "PUT",
                "/boot-source",
                Some(&json!({"kernel_image_path": path}).to_string()),
            ),
            400,
            &format!("kernel image {p}: it is {found}, not a regular file"),
        );
        assert_fault(
            api.req(
                "PUT",
                "/boot-source",
                Some(&json!({"kernel_image_path": kernel, "initrd_path": path}).to_string()),
            ),
            400,
            &format!("initrd {p}: it is {found}, not a regular file"),
        );
        assert_fault(
            api.req(
                "PUT",
                "/drives/d",
                Some(
                    &json!({"drive_id": "d", "path_on_host": path, "is_root_device": false, "is_read_only": true})
                        .to_string(),
                ),
            ),
            400,
            &format!("drive {p}: it is {found}, not a regular file or a block device"),
        );
    }
    // PATCH /drives names a file the same way.
    let put_drive = |id: &str, path: &Path| {
        api.req(
            "PUT",
            &format!("/drives/{id}"),
            Some(
                &json!({"drive_id": id, "path_on_host": path, "is_root_device": false, "is_read_only": true})
                    .to_string(),
            ),
        )
    };
    assert_eq!(put_drive("d", &disk).0, 204);
    assert_fault(
        api.req(
            "PATCH",
            "/drives/d",
            Some(&json!({"drive_id": "d", "path_on_host": fifo}).to_string()),
        ),
        400,
        "it is a FIFO, not a regular file or a block device",
    );
    // A block device is a drive (an LVM volume, a loop device).
    let block = readable_block_device();
    let r = put_drive("blk", &block);
    assert_eq!(r.0, 204, "{}: {:?}", block.display(), r.1);
    // And the VMM is still there for everyone.
    assert_eq!(api.req("GET", "/", None).0, 200);
    let config = api.req("GET", "/vm/config", None).1;
    assert_eq!(config["drives"][0]["path_on_host"], json!(disk));
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_before_start_exits_and_removes_the_socket() {
    let mut api = Api::start("sigterm");
    // SAFETY: kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(api.child.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let status = wait_exit(&mut api.child, Duration::from_secs(5)).expect("husk exits on SIGTERM");
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
    assert!(!api.sock.exists());
}

fn husk(args: &[&str]) -> (i32, String) {
    let out = Command::new(husk_binary()).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn command_line_errors() {
    let dir = std::env::temp_dir().join(format!("husk-api-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    let (code, err) = husk(&["--no-api"]);
    assert_eq!(code, 1);
    assert!(err.contains("--no-api needs --config-file"), "{err}");
    std::fs::write(
        dir.join("bad.json"),
        "{\"machine-config\": {\"vcpu_count\": 1}}",
    )
    .unwrap();
    let (code, err) = husk(&["--no-api", "--config-file", &p("bad.json")]);
    assert_eq!(code, 1);
    assert!(
        err.contains("invalid config file") && err.contains("mem_size_mib"),
        "{err}"
    );
    std::fs::write(dir.join("nokernel.json"), "{}").unwrap();
    let (code, err) = husk(&["--no-api", "--config-file", &p("nokernel.json")]);
    assert_eq!(code, 1);
    assert!(err.contains("no boot source"), "{err}");
    std::fs::write(dir.join("taken.sock"), "").unwrap();
    let (code, err) = husk(&["--api-sock", &p("taken.sock")]);
    assert_eq!(code, 1);
    assert!(err.contains("already exists"), "{err}");
    assert!(
        Path::new(&p("taken.sock")).exists(),
        "a file husk did not create is left alone"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
