//! husk-agent on a unix socket on this host (not as PID 1, so it leaves the
//! system alone): the protocol's handshake, every request it serves, and
//! bad input of every kind, which must get an error reply and never take
//! the agent down.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use husk_protocol::frame::{read_frame, write_frame};
use husk_protocol::{
    Accepted, Channel, ErrorCode, Hello, ReplyFrame, Request, RequestFrame, Response, Sandbox,
    StdioStream, MAX_FRAME, PROTOCOL_VERSION,
};
use husk_tests::cargo_binary;

struct Agent {
    child: Child,
    dir: PathBuf,
    sock: PathBuf,
}

impl Agent {
    fn start(name: &str) -> Agent {
        let dir = std::env::temp_dir().join(format!("husk-agent-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("root/proc/sys/net/ipv4")).unwrap();
        let sock = dir.join("agent.sock");
        let child = Command::new(cargo_binary("husk-agent"))
            .arg("--unix")
            .arg(&sock)
            .env("HUSK_AGENT_ROOT", dir.join("root"))
            .stderr(Stdio::null())
            .spawn()
            .expect("start husk-agent");
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&sock).is_err() {
            assert!(Instant::now() < deadline, "the agent does not listen");
            std::thread::sleep(Duration::from_millis(10));
        }
        Agent { child, dir, sock }
    }

    fn connect(&self, channel: Channel) -> (UnixStream, Accepted) {
        let mut s = UnixStream::connect(&self.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
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

    fn control(&self) -> UnixStream {
        let (s, acc) = self.connect(Channel::Control);
        assert_eq!(acc.error, None);
        s
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn call(s: &mut UnixStream, id: u64, request: Request) -> ReplyFrame {
    write_frame(s, &RequestFrame { id, request }).unwrap();
    read_frame(s).unwrap()
}

#[test]
fn ping_and_pipelined_requests() {
    let agent = Agent::start("ping");
    let mut s = agent.control();
    let r = call(&mut s, 1, Request::Ping);
    assert_eq!(r.id, 1);
    assert!(matches!(
        r.reply,
        Ok(Response::Pong {
            version: PROTOCOL_VERSION,
            ..
        })
    ));
    for id in 10..13 {
        write_frame(
            &mut s,
            &RequestFrame {
                id,
                request: Request::Ping,
            },
        )
        .unwrap();
    }
    for id in 10..13 {
        assert_eq!(read_frame::<_, ReplyFrame>(&mut s).unwrap().id, id);
    }
}

#[test]
fn create_sandbox_writes_names_and_sysctls() {
    let agent = Agent::start("sandbox");
    let mut s = agent.control();
    let sandbox = Sandbox {
        hostname: Some("pod-1".into()),
        dns: vec!["10.96.0.10".into()],
        sysctls: [("net.ipv4.ip_forward".to_string(), "1".to_string())].into(),
        ..Default::default()
    };
    let r = call(&mut s, 2, Request::CreateSandbox(sandbox));
    assert_eq!(r.reply, Ok(Response::Ok));
    let root = agent.dir.join("root");
    assert_eq!(
        std::fs::read_to_string(root.join("etc/hostname")).unwrap(),
        "pod-1\n"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("etc/resolv.conf")).unwrap(),
        "nameserver 10.96.0.10\n"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("proc/sys/net/ipv4/ip_forward")).unwrap(),
        "1"
    );
    let bad = Sandbox {
        sysctls: [("../../../etc/shadow".to_string(), "x".to_string())].into(),
        ..Default::default()
    };
    let r = call(&mut s, 3, Request::CreateSandbox(bad));
    assert_eq!(r.reply.unwrap_err().code, ErrorCode::InvalidArgument);
}

#[test]
fn bad_input_gets_errors_and_the_agent_survives() {
    let mut agent = Agent::start("bad");
    // An unknown version is refused at the handshake.
    let mut s = UnixStream::connect(&agent.sock).unwrap();
    write_frame(
        &mut s,
        &Hello {
            version: 99,
            channel: Channel::Control,
        },
    )
    .unwrap();
    let acc: Accepted = read_frame(&mut s).unwrap();
    assert_eq!(acc.error.unwrap().code, ErrorCode::UnsupportedVersion);
    // A hello that is not JSON.
    let mut s = UnixStream::connect(&agent.sock).unwrap();
    s.write_all(&5u32.to_be_bytes()).unwrap();
    s.write_all(b"hello").unwrap();
    let acc: Accepted = read_frame(&mut s).unwrap();
    assert_eq!(acc.error.unwrap().code, ErrorCode::InvalidMessage);

    let mut s = agent.control();
    // Invalid JSON, an unknown request, a missing field: errors, and the
    // connection stays usable (the id is kept when it can be read).
    for (raw, id) in [
        (&b"{not json"[..], 0),
        (br#"{"id": 5, "request": {"type": "format_disk"}}"#, 5),
        (br#"{"id": 6, "request": {"type": "start_container"}}"#, 6),
        (br#"{"id": 7, "request": {"type": "ping"}, "extra": 1}"#, 7),
    ] {
        s.write_all(&(raw.len() as u32).to_be_bytes()).unwrap();
        s.write_all(raw).unwrap();
        let r: ReplyFrame = read_frame(&mut s).unwrap();
        assert_eq!(r.id, id, "{}", String::from_utf8_lossy(raw));
        assert_eq!(r.reply.unwrap_err().code, ErrorCode::InvalidMessage);
    }
    assert!(call(&mut s, 8, Request::Ping).reply.is_ok());
    // Requests for a container that does not exist.
    let r = call(
        &mut s,
        9,
        Request::StartContainer {
            container_id: "c".into(),
        },
    );
    assert_eq!(r.reply.unwrap_err().code, ErrorCode::NotFound);
    // A stdio channel for a container that does not exist.
    let (_, acc) = agent.connect(Channel::Stdio {
        container_id: "nope".into(),
        exec_id: None,
        stream: StdioStream::Stdout,
    });
    assert_eq!(acc.error.unwrap().code, ErrorCode::NotFound);
    // An oversized frame: an error, then the connection closes.
    let mut s2 = agent.control();
    s2.write_all(&((MAX_FRAME as u32) + 1).to_be_bytes())
        .unwrap();
    let r: ReplyFrame = read_frame(&mut s2).unwrap();
    assert_eq!(r.reply.unwrap_err().code, ErrorCode::InvalidMessage);
    let mut rest = Vec::new();
    assert_eq!(s2.read_to_end(&mut rest).unwrap(), 0);
    // A truncated frame and a vanished peer.
    let mut s3 = agent.control();
    s3.write_all(&100u32.to_be_bytes()).unwrap();
    s3.write_all(b"{\"id\":").unwrap();
    drop(s3);
    drop(agent.connect(Channel::Events));
    // Still serving.
    assert!(agent.alive());
    let mut s = agent.control();
    assert!(call(&mut s, 10, Request::Ping).reply.is_ok());
}

#[test]
fn the_host_client_connects_retrying_until_the_agent_listens() {
    use husk_protocol::client::{AgentClient, ClientError, Endpoint};
    let dir = std::env::temp_dir().join(format!("husk-agent-client-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("late.sock");
    // Nobody listens: the client gives up after its timeout.
    let t0 = Instant::now();
    let r = AgentClient::connect(Endpoint::Unix(sock.clone()), Duration::from_millis(200));
    assert!(matches!(r, Err(ClientError::Timeout(_))));
    assert!(t0.elapsed() < Duration::from_secs(5));
    // The agent comes up while the client is waiting.
    let sock2 = sock.clone();
    let waiter = std::thread::spawn(move || {
        AgentClient::connect(Endpoint::Unix(sock2), Duration::from_secs(10))
    });
    std::thread::sleep(Duration::from_millis(100));
    let mut child = Command::new(cargo_binary("husk-agent"))
        .arg("--unix")
        .arg(&sock)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut client = waiter
        .join()
        .unwrap()
        .expect("connected once the agent listened");
    assert!(matches!(
        client.call(Request::Ping),
        Ok(Response::Pong { .. })
    ));
    let e = client
        .open_stdio("none", None, StdioStream::Stdout)
        .expect_err("no such container");
    assert!(
        matches!(e, ClientError::Agent(ref a) if a.code == ErrorCode::NotFound),
        "{e}"
    );
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn shutdown_ends_the_agent() {
    let mut agent = Agent::start("shutdown");
    let mut s = agent.control();
    assert_eq!(call(&mut s, 1, Request::Shutdown).reply, Ok(Response::Ok));
    let deadline = Instant::now() + Duration::from_secs(5);
    while agent.alive() {
        assert!(Instant::now() < deadline, "the agent did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(agent.child.wait().unwrap().code(), Some(0));
}
