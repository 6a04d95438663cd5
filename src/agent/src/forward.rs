//! Port forwarding (CRI's PortForward): a host connection on a
//! `PortForward` channel becomes a TCP connection to `localhost:PORT` in
//! the guest, the network namespace every container of the pod shares
//! (`127.0.0.1`, then `::1`: what containerd dials in a runc pod's
//! namespace), and bytes are copied both ways until both have ended. End of file one
//! way half-closes the other side's write, so a client that sends its
//! request and shuts its write side still reads the answer.

use std::io::ErrorKind;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use husk_protocol::{AgentError, ErrorCode};

use crate::transport::Stream;

/// How long connecting to the port in the guest may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to `port` on the guest's loopback: the forward's far end.
/// IPv4 first, then IPv6, as containerd does for a runc pod (it dials
/// `localhost` in the pod's namespace, `tcp4` then `tcp6`): a server
/// that listens on `[::1]` or on an IPv6-only socket is reached either
/// way. Under husk containerd's own dial always lands (the shim takes
/// every connection to 127.0.0.1 in the pod's namespace on the node), so
/// the fallback has to happen here, where the pod's servers are.
pub fn connect(port: u16) -> Result<TcpStream, AgentError> {
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let e4 = match TcpStream::connect_timeout(&v4, CONNECT_TIMEOUT) {
        Ok(s) => return Ok(s),
        Err(e) => e,
    };
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    let e6 = match TcpStream::connect_timeout(&v6, CONNECT_TIMEOUT) {
        Ok(s) => return Ok(s),
        Err(e) => e,
    };
    let code = if nothing_listens(&e4) && nothing_listens(&e6) {
        ErrorCode::NotFound
    } else {
        ErrorCode::System
    };
    Err(AgentError::new(
        code,
        format!("cannot connect to port {port} in the pod: 127.0.0.1: {e4}; [::1]: {e6}"),
    ))
}

/// Whether a failed connect means no server on that address: refused, or
/// the address family not there at all (a guest without IPv6 loopback).
fn nothing_listens(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::AddrNotAvailable
    ) || e.raw_os_error() == Some(libc::EAFNOSUPPORT)
}

/// Copies `from` into `to` until `from` ends; returns the bytes copied.
fn pump(from: &mut dyn Read, to: &mut dyn Write) -> u64 {
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => return total,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            return total;
        }
        total += n as u64;
    }
}

/// Joins the accepted host connection `host` and the pod's connection
/// `pod` until both directions have ended.
pub fn run(host: Box<dyn Stream>, pod: TcpStream) {
    let (mut host_read, mut pod_write) = match (host.try_clone_stream(), pod.try_clone()) {
        (Ok(h), Ok(p)) => (h, p),
        _ => {
            let _ = host.shutdown();
            return;
        }
    };
    let mut host_write = host;
    let mut pod_read = pod;
    // Host to pod on a thread of its own; pod to host here.
    let upstream = std::thread::Builder::new()
        .name("port-forward".into())
        .spawn(move || {
            pump(&mut *host_read, &mut pod_write);
            let _ = pod_write.shutdown(Shutdown::Write);
        });
    pump(&mut pod_read, &mut *host_write);
    // The pod's side ended: the host reads end of file.
    let _ = host_write.shutdown_write();
    match upstream {
        Ok(t) => {
            let _ = t.join();
        }
        Err(_) => {
            let _ = host_write.shutdown();
        }
    }
    let _ = pod_read.shutdown(Shutdown::Both);
    let _ = host_write.shutdown();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::os::unix::net::UnixStream;

    #[test]
    fn bytes_go_both_ways_and_end_of_file_half_closes() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = server.local_addr().unwrap().port();
        // The pod's server: reads everything, then answers and closes.
        let served = std::thread::spawn(move || {
            let (mut c, _) = server.accept().unwrap();
            let mut got = Vec::new();
            c.read_to_end(&mut got).unwrap();
            c.write_all(b"answer:").unwrap();
            c.write_all(&got).unwrap();
        });
        let (mut host, agent_end) = UnixStream::pair().unwrap();
        let pod = connect(port).unwrap();
        let forward = std::thread::spawn(move || run(Box::new(agent_end), pod));
        host.write_all(b"request").unwrap();
        host.shutdown(Shutdown::Write).unwrap();
        let mut answer = Vec::new();
        host.read_to_end(&mut answer).unwrap();
        assert_eq!(answer, b"answer:request");
        served.join().unwrap();
        forward.join().unwrap();
    }

    #[test]
    fn a_port_nobody_listens_on_is_not_found() {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let e = connect(port).unwrap_err();
        assert_eq!(e.code, ErrorCode::NotFound);
        assert!(e.message.contains(&format!("port {port}")), "{}", e.message);
        assert!(e.message.contains("[::1]"), "{}", e.message);
    }

    #[test]
    fn a_server_on_ipv6_loopback_only_is_reached() {
        // What containerd reaches for a runc pod by its tcp6 fallback.
        let server = TcpListener::bind("[::1]:0").unwrap();
        let port = server.local_addr().unwrap().port();
        let served = std::thread::spawn(move || {
            let (mut c, _) = server.accept().unwrap();
            c.write_all(b"over ipv6").unwrap();
        });
        let mut pod = connect(port).unwrap();
        assert!(pod.peer_addr().unwrap().is_ipv6());
        let mut got = String::new();
        pod.read_to_string(&mut got).unwrap();
        assert_eq!(got, "over ipv6");
        served.join().unwrap();
    }

    #[test]
    fn ipv4_comes_first_when_both_listen() {
        // A port free on ::1, then the same port on 127.0.0.1 (a socket
        // bound to ::1 does not hold the IPv4 one).
        let _v6 = TcpListener::bind("[::1]:0").unwrap();
        let port = _v6.local_addr().unwrap().port();
        let _v4 = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let pod = connect(port).unwrap();
        assert!(pod.peer_addr().unwrap().is_ipv4());
    }
}
