//! Port forwarding (CRI's PortForward): a host connection on a
//! `PortForward` channel becomes a TCP connection to `127.0.0.1:PORT` in
//! the guest, the network namespace every container of the pod shares,
//! and bytes are copied both ways until both have ended. End of file one
//! way half-closes the other side's write, so a client that sends its
//! request and shuts its write side still reads the answer.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use husk_protocol::{AgentError, ErrorCode};

use crate::transport::Stream;

/// How long connecting to the port in the guest may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to `port` on the guest's loopback: the forward's far end.
pub fn connect(port: u16) -> Result<TcpStream, AgentError> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(|e| {
        let code = if e.kind() == std::io::ErrorKind::ConnectionRefused {
            ErrorCode::NotFound
        } else {
            ErrorCode::System
        };
        AgentError::new(
            code,
            format!("cannot connect to port {port} in the pod: {e}"),
        )
    })
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
    }
}
