//! `husk-cri port-forward`: what `kubectl port-forward` does, through
//! containerd's CRI: PortForward gives a URL of containerd's streaming
//! server, and a WebSocket client (the kubelet's v4 channel protocol:
//! binary frames whose first byte is the channel, a data and an error
//! channel per port, each starting with the port as two little-endian
//! bytes) sends a request to the pod's port and reads the answer. One pod
//! runs busybox's httpd on port 8080 serving a known page; the client
//! fetches it once, then 8 times at once, then asks for a port nothing
//! listens on (an error, and the stream ends). A second container serves
//! another page on IPv6 loopback only (`[::1]`), which containerd reaches
//! for a runc pod by falling back to IPv6 when IPv4 is refused. The pod
//! also maps its port to a port of the node (a `hostPort`, which the CNI
//! portmap plugin implements with DNAT rules on the node): the page must
//! come from there too, fetched on the node's address on the pod network.
//! Lines: `CRI-PF <key> <value>`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use k8s_cri::v1::{PortForwardRequest, PortMapping, Protocol};

use crate::{container_config, pod_config, Args, Client, Pod, Result};

/// What the pod's server serves.
pub const PAYLOAD: &str = "port-forward-payload-5f3a";

const SERVER_PORT: u16 = 8080;

/// What the second container serves, on `[::1]` only.
pub const PAYLOAD_V6: &str = "port-forward-ipv6-only-9c1d";

/// Its port.
const SERVER_V6_PORT: u16 = 8081;

/// A port nothing in the pod listens on.
const CLOSED_PORT: u16 = 9999;

/// The node's port mapped to the server's (`hostPort`).
const HOST_PORT: u16 = 18080;

/// The node's own address on the pod network (the CNI bridge's gateway,
/// start-in-node.sh): the host port is reached there.
const NODE_ADDRESS: &str = "10.88.0.1";

/// A WebSocket client connection, just enough of RFC 6455 for the
/// streaming server: binary frames out (masked, as a client must), binary,
/// close and ping frames in.
struct Ws(TcpStream);

impl Ws {
    /// Opens `url` (`http://host:port/path`) for forwarding `port`.
    fn connect(url: &str, port: u16) -> Result<Ws> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("not an http URL: {url}"))?;
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let mut s = TcpStream::connect(host).map_err(|e| format!("connect {host}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        write!(
            s,
            "GET /{path}?port={port} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: aHVzay1jcmktcG9ydGZ3ZA==\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: v4.channel.k8s.io\r\n\r\n"
        )
        .map_err(|e| e.to_string())?;
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match s.read(&mut b) {
                Ok(1) => head.push(b[0]),
                Ok(_) => return Err("the server closed during the handshake".into()),
                Err(e) => return Err(format!("handshake: {e}")),
            }
        }
        let head = String::from_utf8_lossy(&head);
        if !head.starts_with("HTTP/1.1 101") {
            return Err(format!(
                "handshake refused: {}",
                head.lines().next().unwrap_or("")
            ));
        }
        Ok(Ws(s))
    }

    /// One binary frame to `channel`.
    fn send(&mut self, channel: u8, data: &[u8]) -> Result<()> {
        let mut payload = vec![channel];
        payload.extend_from_slice(data);
        self.frame(0x2, &payload)
    }

    fn frame(&mut self, opcode: u8, payload: &[u8]) -> Result<()> {
        let mask = [0x5a, 0x17, 0xc3, 0x81];
        let mut f = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 0xffff => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.0.write_all(&f).map_err(|e| e.to_string())
    }

    /// The next binary message as (channel, data); `None` once the server
    /// closed.
    fn recv(&mut self) -> Result<Option<(u8, Vec<u8>)>> {
        loop {
            let mut h = [0u8; 2];
            match self.0.read_exact(&mut h) {
                Ok(()) => {}
                // The stream never ended: a hang, not an end.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err("no end of the stream within 30 s".into())
                }
                Err(_) => return Ok(None),
            }
            let opcode = h[0] & 0xf;
            let len = match h[1] & 0x7f {
                126 => {
                    let mut l = [0u8; 2];
                    self.0.read_exact(&mut l).map_err(|e| e.to_string())?;
                    u64::from(u16::from_be_bytes(l))
                }
                127 => {
                    let mut l = [0u8; 8];
                    self.0.read_exact(&mut l).map_err(|e| e.to_string())?;
                    u64::from_be_bytes(l)
                }
                n => u64::from(n),
            };
            if len > 16 << 20 {
                return Err(format!("a frame of {len} bytes"));
            }
            let mut payload = vec![0u8; len as usize];
            self.0.read_exact(&mut payload).map_err(|e| e.to_string())?;
            match opcode {
                0x8 => return Ok(None),
                0x9 => self.frame(0xa, &payload)?,
                0x1 | 0x2 if !payload.is_empty() => {
                    let channel = payload[0];
                    return Ok(Some((channel, payload[1..].to_vec())));
                }
                _ => {}
            }
        }
    }
}

/// One forwarded connection to `port`: `request` sent, everything read
/// until the stream ends. Returns the data and the error channel's text.
fn fetch(url: &str, port: u16, request: &[u8]) -> Result<(String, String)> {
    let mut ws = Ws::connect(url, port)?;
    ws.send(0, request)?;
    let (mut data, mut error) = (Vec::new(), Vec::new());
    // Each channel first carries its port (two bytes), then its stream.
    let (mut data_seen, mut error_seen) = (0usize, 0usize);
    while let Some((channel, bytes)) = ws.recv()? {
        let (buf, seen) = match channel {
            0 => (&mut data, &mut data_seen),
            1 => (&mut error, &mut error_seen),
            _ => continue,
        };
        let skip = 2usize.saturating_sub(*seen).min(bytes.len());
        *seen += bytes.len();
        buf.extend_from_slice(&bytes[skip..]);
    }
    Ok((
        String::from_utf8_lossy(&data).to_string(),
        String::from_utf8_lossy(&error).to_string(),
    ))
}

/// The streaming URL for `port` of the pod.
async fn stream_url(c: &mut Client, pod: &Pod, port: u16) -> Result<String> {
    Ok(c.port_forward(PortForwardRequest {
        pod_sandbox_id: pod.id.clone(),
        port: vec![i32::from(port)],
    })
    .await
    .map_err(crate::status_err("PortForward"))?
    .into_inner()
    .url)
}

const GET: &[u8] = b"GET /index.html HTTP/1.0\r\n\r\n";

/// Fetches the page on `port` until it holds `payload`, for up to 20 s
/// (a server may take a moment to listen); a stream URL is good for one
/// connection, so a new one per try. The last try's data and error
/// channel text, or its failure.
async fn fetch_until(
    c: &mut Client,
    pod: &Pod,
    port: u16,
    payload: &str,
) -> Result<std::result::Result<String, String>> {
    let t0 = Instant::now();
    loop {
        let u = stream_url(c, pod, port).await?;
        let got = tokio::task::spawn_blocking(move || fetch(&u, port, GET))
            .await
            .map_err(|e| e.to_string())?;
        match got {
            Ok((data, _)) if data.contains(payload) => return Ok(Ok(data)),
            other if t0.elapsed() > Duration::from_secs(20) => {
                return Ok(other.map(|(d, e)| format!("{d}{e}")))
            }
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

pub async fn port_forward(c: &mut Client, args: &Args) -> Result<()> {
    let name = format!("pf-{}", args.handler);
    let mut config = pod_config(&name, &args.log_dir);
    config.port_mappings = vec![PortMapping {
        protocol: Protocol::Tcp as i32,
        container_port: i32::from(SERVER_PORT),
        host_port: i32::from(HOST_PORT),
        host_ip: String::new(),
    }];
    std::fs::create_dir_all(&config.log_directory).map_err(|e| e.to_string())?;
    let pod = Pod::run(c, config, &args.handler).await?;
    let result = async {
        let script = format!(
            "mkdir -p /www && echo {PAYLOAD} > /www/index.html && exec httpd -f -p {SERVER_PORT} -h /www"
        );
        pod.create(c, container_config("server", &args.image, &["sh", "-c", &script]))
            .await?;
        let script6 = format!(
            "mkdir -p /www && echo {PAYLOAD_V6} > /www/index.html && exec httpd -f -p [::1]:{SERVER_V6_PORT} -h /www"
        );
        pod.create(c, container_config("server6", &args.image, &["sh", "-c", &script6]))
            .await?;
        // The server may take a moment to listen (a container whose root
        // comes through the share starts its first program more slowly).
        let first = fetch_until(c, &pod, SERVER_PORT, PAYLOAD).await??;
        println!("CRI-PF one {}", first.contains(PAYLOAD));
        // Many at once, each on a URL of its own (as many kubectl clients).
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let u = stream_url(c, &pod, SERVER_PORT).await?;
            tasks.push(tokio::task::spawn_blocking(move || fetch(&u, SERVER_PORT, GET)));
        }
        let mut ok = 0;
        for t in tasks {
            match t.await.map_err(|e| e.to_string())? {
                Ok((data, _)) if data.contains(PAYLOAD) => ok += 1,
                Ok((data, error)) => println!("CRI-PF many-miss {data:?} {error:?}"),
                Err(e) => println!("CRI-PF many-error {e}"),
            }
        }
        println!("CRI-PF many {ok}");
        // The IPv6-only server (started with the first, so listening by
        // now; tried the same way all the same).
        let v6 = fetch_until(c, &pod, SERVER_V6_PORT, PAYLOAD_V6)
            .await?
            .unwrap_or_else(|e| e);
        println!("CRI-PF ipv6-loopback {}", v6.contains(PAYLOAD_V6));
        if !v6.contains(PAYLOAD_V6) {
            println!("CRI-PF ipv6-loopback-got {v6:?}");
        }
        // The host port: a plain TCP connection on the node, DNATed by
        // portmap's rules to the pod's address, which in a microVM is the
        // guest's.
        let direct = tokio::task::spawn_blocking(|| -> std::io::Result<String> {
            let addr = format!("{NODE_ADDRESS}:{HOST_PORT}");
            let addr = addr
                .parse()
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(GET)?;
            let mut page = String::new();
            s.read_to_string(&mut page)?;
            Ok(page)
        })
        .await
        .map_err(|e| e.to_string())?;
        match direct {
            Ok(page) => println!("CRI-PF host-port {}", page.contains(PAYLOAD)),
            Err(e) => println!("CRI-PF host-port-error {e}"),
        }
        // Nothing listens: an error on the error channel, and the stream
        // ends (no hang).
        let u = stream_url(c, &pod, CLOSED_PORT).await?;
        let closed = tokio::task::spawn_blocking(move || fetch(&u, CLOSED_PORT, GET))
            .await
            .map_err(|e| e.to_string())?;
        match closed {
            Ok((data, error)) => {
                println!("CRI-PF closed-data {}", data.len());
                println!("CRI-PF closed-error {}", !error.is_empty());
            }
            Err(e) => println!("CRI-PF closed-failed {e}"),
        }
        Ok::<_, String>(())
    }
    .await;
    let removed = pod.remove(c).await;
    result.and(removed)
}
