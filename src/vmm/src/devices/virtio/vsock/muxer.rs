//! The host side of vsock: one listening unix socket for host-initiated
//! streams, one unix socket per guest-initiated stream, and the bookkeeping
//! that maps them to guest ports.
//!
//! - A host program connects to `uds_path` and writes `CONNECT <port>\n`;
//!   the muxer reads that line without blocking (byte by byte, so nothing
//!   after it is consumed), picks a host port from [`FIRST_LOCAL_PORT`] up,
//!   sends the guest a REQUEST and, on the guest's RESPONSE, writes
//!   `OK <host port>\n`. A RST (nobody listens) closes the socket.
//! - A guest REQUEST to host port P connects (non-blocking) to
//!   `<uds_path>_<P>`; RESPONSE if that works, RST if not.
//!
//! Every socket is non-blocking and edge-triggered in the VMM's event loop.
//! The muxer never touches epoll itself: it lists the sockets to add and
//! the ones to drop, and the device applies both ([`Muxer::sync_epoll`])
//! whenever it runs with the loop's `EventOps`. Streams with something for
//! the guest wait in a round-robin queue, so one busy stream cannot starve
//! the others, and nothing is read from a host socket unless the guest has
//! both an rx buffer and credit for it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;

use event_manager::{EventOps, Events};
use vmm_sys_util::epoll::EventSet;

use super::connection::{Connection, RxPacket, Verdict, BUF_ALLOC};
use super::packet::{op, Header, MAX_PAYLOAD, TYPE_STREAM};
use super::HOST_CID;
use crate::error::Chain;
use crate::host_file::connect_nonblocking;
use crate::metrics::VsockMetrics;

/// The first port handed to host-initiated streams.
pub const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Most streams (and pending host handshakes) at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Longest `CONNECT <port>\n` line accepted.
pub const MAX_CONNECT_LINE: usize = 32;
/// RSTs for unknown streams waiting for an rx buffer; more are dropped
/// (the guest's connect then times out instead of failing at once).
const MAX_PENDING_RSTS: usize = 2 * MAX_CONNECTIONS;
/// How long the guest has to answer a host-initiated REQUEST.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// The first event-loop token of a host socket; lower ones are the device's.
pub const FIRST_SOCKET_TOKEN: u32 = 16;

/// Errors setting up the host side.
#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    /// The listening socket cannot be created.
    #[error("cannot listen on vsock socket {path}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Why a `CONNECT` line is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConnectLineError {
    /// Not `CONNECT <port>`.
    #[error("not a CONNECT line")]
    Garbage,
    /// The port is not a decimal u32.
    #[error("invalid port")]
    BadPort,
}

/// Parses `CONNECT <port>` (the newline already stripped; a trailing `\r`
/// is tolerated).
pub fn parse_connect_line(line: &[u8]) -> Result<u32, ConnectLineError> {
    let line = std::str::from_utf8(line).map_err(|_| ConnectLineError::Garbage)?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    let port = line
        .strip_prefix("CONNECT ")
        .ok_or(ConnectLineError::Garbage)?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ConnectLineError::BadPort);
    }
    port.parse().map_err(|_| ConnectLineError::BadPort)
}

/// (host port, guest port).
type ConnKey = (u32, u32);

enum Endpoint {
    Handshake(Handshake),
    Conn(ConnKey),
}

struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

/// The host-side multiplexer.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    conns: HashMap<ConnKey, (u32, Connection)>,
    endpoints: HashMap<u32, Endpoint>,
    rx_queue: VecDeque<ConnKey>,
    rx_queued: HashSet<ConnKey>,
    rsts: VecDeque<Header>,
    next_token: u32,
    next_local_port: u32,
    to_register: Vec<u32>,
    registered: HashSet<u32>,
    doomed: Vec<(u32, UnixStream)>,
    scratch: Vec<u8>,
    read_buf: Vec<u8>,
    /// Held so that a connection can still be refused when the process
    /// has run out of file descriptors.
    spare_fd: Option<std::fs::File>,
    /// The device's counters (streams opened and ended).
    metrics: Arc<VsockMetrics>,
}

/// The events every host socket is watched for (edge-triggered).
pub fn socket_events() -> EventSet {
    EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED
}

impl Muxer {
    /// Listens on `uds_path` (which must not exist) for host-initiated
    /// streams, counting streams into `metrics`.
    pub fn new(
        guest_cid: u64,
        uds_path: PathBuf,
        metrics: Arc<VsockMetrics>,
    ) -> Result<Self, MuxerError> {
        let bind_err = |source| MuxerError::Bind {
            path: uds_path.clone(),
            source,
        };
        let listener = UnixListener::bind(&uds_path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(Muxer {
            guest_cid,
            uds_path,
            listener,
            conns: HashMap::new(),
            endpoints: HashMap::new(),
            rx_queue: VecDeque::new(),
            rx_queued: HashSet::new(),
            rsts: VecDeque::new(),
            next_token: FIRST_SOCKET_TOKEN,
            next_local_port: FIRST_LOCAL_PORT,
            to_register: Vec::new(),
            registered: HashSet::new(),
            doomed: Vec::new(),
            scratch: vec![0u8; MAX_PAYLOAD],
            read_buf: vec![0u8; MAX_PAYLOAD],
            spare_fd: std::fs::File::open("/dev/null").ok(),
            metrics,
        })
    }

    /// The listening socket.
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// Open streams.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Host sockets open, including pending handshakes and sockets not yet
    /// closed (for leak checks).
    pub fn socket_count(&self) -> usize {
        self.endpoints.len() + self.doomed.len()
    }

    fn alloc_token(&mut self) -> u32 {
        loop {
            let t = self.next_token;
            self.next_token = self.next_token.checked_add(1).unwrap_or(FIRST_SOCKET_TOKEN);
            if !self.endpoints.contains_key(&t) {
                return t;
            }
        }
    }

    fn alloc_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(p, peer_port)) {
                return p;
            }
        }
    }

    fn schedule(&mut self, key: ConnKey) {
        let wants = self.conns.get(&key).is_some_and(|(_, c)| c.wants_rx());
        if wants && self.rx_queued.insert(key) {
            self.rx_queue.push_back(key);
        }
    }

    fn rst_for(&mut self, local_port: u32, peer_port: u32) {
        if self.rsts.len() < MAX_PENDING_RSTS {
            self.rsts
                .push_back(self.header(local_port, peer_port, op::RST, 0, 0));
        } else {
            tracing::debug!(
                local_port,
                peer_port,
                "too many pending vsock RSTs, one dropped"
            );
        }
    }

    fn header(&self, local_port: u32, peer_port: u32, op: u16, len: u32, fwd_cnt: u32) -> Header {
        Header {
            src_cid: u64::from(HOST_CID),
            dst_cid: self.guest_cid,
            src_port: local_port,
            dst_port: peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: BUF_ALLOC,
            fwd_cnt,
        }
    }

    /// Forgets a stream and closes its socket (at the next `sync_epoll`).
    fn kill(&mut self, key: ConnKey, send_rst: bool) {
        if let Some((token, conn)) = self.conns.remove(&key) {
            self.endpoints.remove(&token);
            let (local, peer) = (conn.local_port, conn.peer_port);
            tracing::debug!(local, peer, send_rst, "vsock stream closed");
            self.metrics.closed_connections.inc();
            self.doomed.push((token, conn.into_stream()));
            if send_rst {
                self.rst_for(local, peer);
            }
        }
    }

    fn apply(&mut self, key: ConnKey, verdict: Verdict) {
        match verdict {
            Verdict::Keep => self.schedule(key),
            Verdict::Reset => self.kill(key, true),
            Verdict::Drop => self.kill(key, false),
        }
    }

    /// Accepts pending host connections.
    pub fn accept_host(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!(error = %Chain(&e), "vsock accept failed");
                    if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                        self.refuse_without_fds();
                    }
                    return;
                }
            };
            if self.endpoints.len() >= MAX_CONNECTIONS {
                tracing::warn!("too many vsock streams, host connection refused");
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let token = self.alloc_token();
            self.endpoints.insert(
                token,
                Endpoint::Handshake(Handshake {
                    stream,
                    line: Vec::new(),
                }),
            );
            self.to_register.push(token);
            self.read_handshake(token);
        }
    }

    /// Out of file descriptors, the pending connection would keep the
    /// (level-triggered) listener readable and the loop spinning: give up
    /// the spare descriptor, accept and close the connection, take the
    /// spare back.
    fn refuse_without_fds(&mut self) {
        self.spare_fd = None;
        if let Ok((s, _)) = self.listener.accept() {
            drop(s);
        }
        self.spare_fd = std::fs::File::open("/dev/null").ok();
    }

    fn read_handshake(&mut self, token: u32) {
        let Some(Endpoint::Handshake(hs)) = self.endpoints.get_mut(&token) else {
            return;
        };
        // One byte at a time: what follows the line is stream data and
        // stays in the socket.
        let mut byte = [0u8; 1];
        let outcome = loop {
            match hs.stream.read(&mut byte) {
                Ok(0) => break Some(Err(ConnectLineError::Garbage)),
                Ok(_) if byte[0] == b'\n' => break Some(parse_connect_line(&hs.line)),
                Ok(_) if hs.line.len() >= MAX_CONNECT_LINE => {
                    break Some(Err(ConnectLineError::Garbage))
                }
                Ok(_) => hs.line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break None,
                Err(_) => break Some(Err(ConnectLineError::Garbage)),
            }
        };
        let Some(outcome) = outcome else { return };
        let Some(Endpoint::Handshake(hs)) = self.endpoints.remove(&token) else {
            return;
        };
        match outcome {
            Ok(peer_port) => {
                let local = self.alloc_local_port(peer_port);
                tracing::debug!(local, peer_port, "host connects to a guest port");
                self.metrics.host_connections.inc();
                let key = (local, peer_port);
                self.conns.insert(
                    key,
                    (
                        token,
                        Connection::host_initiated(hs.stream, local, peer_port),
                    ),
                );
                self.endpoints.insert(token, Endpoint::Conn(key));
                self.schedule(key);
            }
            Err(e) => {
                tracing::debug!(error = %Chain(&e), "bad vsock CONNECT line, closing");
                self.doomed.push((token, hs.stream));
            }
        }
    }

    /// A host socket reported `events`.
    pub fn host_event(&mut self, token: u32, events: EventSet) {
        match self.endpoints.get_mut(&token) {
            Some(Endpoint::Handshake(_)) => self.read_handshake(token),
            Some(Endpoint::Conn(key)) => {
                let key = *key;
                let Some((_, conn)) = self.conns.get_mut(&key) else {
                    return;
                };
                let verdict = conn.host_event(
                    events.intersects(EventSet::IN | EventSet::READ_HANG_UP),
                    events.contains(EventSet::OUT),
                    events.intersects(EventSet::HANG_UP | EventSet::ERROR),
                );
                self.apply(key, verdict);
            }
            None => {}
        }
    }

    /// A packet the guest sent (`payload`: its OP_RW data).
    pub fn guest_packet(&mut self, hdr: &Header, payload: &[u8]) {
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != u64::from(HOST_CID) {
            tracing::debug!(
                src = hdr.src_cid,
                dst = hdr.dst_cid,
                "vsock packet with wrong cids dropped"
            );
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.type_ != TYPE_STREAM {
            if hdr.op != op::RST {
                self.rst_for(hdr.dst_port, hdr.src_port);
            }
            return;
        }
        if hdr.op == op::REQUEST {
            if self.conns.contains_key(&key) {
                self.kill(key, true);
                return;
            }
            self.guest_connect(hdr);
            return;
        }
        match self.conns.get_mut(&key) {
            Some((_, conn)) => {
                let verdict = conn.guest_packet(hdr, payload);
                self.apply(key, verdict);
            }
            None if hdr.op != op::RST => self.rst_for(hdr.dst_port, hdr.src_port),
            None => {}
        }
    }

    fn guest_connect(&mut self, hdr: &Header) {
        let (port, peer) = (hdr.dst_port, hdr.src_port);
        if self.endpoints.len() >= MAX_CONNECTIONS {
            // debug, not warn: the guest controls how often this happens.
            tracing::debug!(port, "too many vsock streams, guest connection refused");
            self.rst_for(port, peer);
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{port}"));
        let path = PathBuf::from(path);
        match connect_nonblocking(&path) {
            Ok(stream) => {
                tracing::debug!(port, peer, "guest connected to a host port");
                self.metrics.guest_connections.inc();
                let token = self.alloc_token();
                let key = (port, peer);
                self.conns
                    .insert(key, (token, Connection::guest_initiated(stream, hdr)));
                self.endpoints.insert(token, Endpoint::Conn(key));
                self.to_register.push(token);
                self.schedule(key);
            }
            Err(e) => {
                tracing::debug!(port, path = %path.display(), error = %Chain(&e), "nobody listens on the host port");
                self.rst_for(port, peer);
            }
        }
    }

    /// Gives up on host-initiated streams whose REQUEST the guest left
    /// unanswered: their host socket is closed (the program sees EOF, as
    /// for a closed port) and the guest gets an RST in case it answers late.
    pub fn expire_requests(&mut self, now: std::time::Instant) {
        let expired: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, (_, c))| c.request_expired(now, REQUEST_TIMEOUT))
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            tracing::debug!(local = key.0, peer = key.1, "vsock REQUEST unanswered");
            self.kill(key, true);
        }
    }

    /// Whether anything may be due to the guest.
    pub fn has_rx_work(&self) -> bool {
        !self.rsts.is_empty() || !self.rx_queue.is_empty()
    }

    /// The next packet for the guest, if any, whose payload (at most
    /// `max_payload` bytes) is then in [`Muxer::payload`].
    pub fn next_rx(&mut self, max_payload: usize) -> Option<Header> {
        if let Some(rst) = self.rsts.pop_front() {
            return Some(rst);
        }
        let max_payload = max_payload.min(self.scratch.len());
        while let Some(key) = self.rx_queue.pop_front() {
            self.rx_queued.remove(&key);
            let Some((_, conn)) = self.conns.get_mut(&key) else {
                continue;
            };
            let result = conn.next_rx(&mut self.scratch[..max_payload], &mut self.read_buf);
            let fwd_cnt = conn.fwd_cnt();
            match result {
                Ok(Some(RxPacket { op, flags, len })) => {
                    let mut hdr = self.header(key.0, key.1, op, len as u32, fwd_cnt);
                    hdr.flags = flags;
                    // Round robin: back of the queue if it has more.
                    self.schedule(key);
                    return Some(hdr);
                }
                Ok(None) => {}
                Err(v) => {
                    self.apply(key, v);
                    if let Some(rst) = self.rsts.pop_front() {
                        return Some(rst);
                    }
                }
            }
        }
        None
    }

    /// The payload of the packet [`Muxer::next_rx`] just returned.
    pub fn payload(&self, len: u32) -> &[u8] {
        self.scratch.get(..len as usize).unwrap_or(&[])
    }

    /// Forgets every stream (the guest's driver was reset); their sockets
    /// close at the next `sync_epoll`. Pending host handshakes stay.
    pub fn reset(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.kill(key, false);
        }
        self.rsts.clear();
        self.rx_queue.clear();
        self.rx_queued.clear();
    }

    /// Adds new host sockets to the event loop and drops closed ones.
    pub fn sync_epoll(&mut self, ops: &mut EventOps) {
        for (token, stream) in self.doomed.drain(..) {
            if self.registered.remove(&token) {
                if let Err(e) = ops.remove(Events::empty(&stream)) {
                    tracing::warn!(error = ?e, "cannot unwatch a vsock socket");
                }
            }
            drop(stream);
        }
        self.to_register.retain(|t| self.endpoints.contains_key(t));
        for token in std::mem::take(&mut self.to_register) {
            let fd = match self.endpoints.get(&token) {
                Some(Endpoint::Handshake(h)) => h.stream.as_raw_fd(),
                Some(Endpoint::Conn(key)) => match self.conns.get(key) {
                    Some((_, c)) => c.stream().as_raw_fd(),
                    None => continue,
                },
                None => continue,
            };
            match ops.add(Events::with_data_raw(fd, token, socket_events())) {
                Ok(()) => {
                    self.registered.insert(token);
                }
                Err(e) => {
                    // A socket the loop does not watch would stall: give up on it.
                    tracing::warn!(error = ?e, "cannot watch a vsock socket, closing it");
                    match self.endpoints.remove(&token) {
                        Some(Endpoint::Conn(key)) => {
                            self.endpoints.insert(token, Endpoint::Conn(key));
                            self.kill(key, true);
                        }
                        Some(Endpoint::Handshake(h)) => self.doomed.push((token, h.stream)),
                        None => {}
                    }
                }
            }
        }
        // Those were never watched: just close them.
        for (token, stream) in self.doomed.drain(..) {
            self.registered.remove(&token);
            drop(stream);
        }
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // The socket file is ours: it goes with the device.
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect_line(b"CONNECT 1024"), Ok(1024));
        assert_eq!(parse_connect_line(b"CONNECT 52\r"), Ok(52));
        assert_eq!(parse_connect_line(b"CONNECT 4294967295"), Ok(u32::MAX));
        assert_eq!(
            parse_connect_line(b"CONNECT 4294967296"),
            Err(ConnectLineError::BadPort)
        );
        for bad in [
            &b"CONNECT x"[..],
            b"CONNECT ",
            b"CONNECT -1",
            b"CONNECT +1",
            b"CONNECT 1 2",
        ] {
            assert_eq!(
                parse_connect_line(bad),
                Err(ConnectLineError::BadPort),
                "{bad:?}"
            );
        }
        for bad in [&b"connect 1"[..], b"", b"GET / HTTP/1.1", b"\xff\xfe"] {
            assert_eq!(
                parse_connect_line(bad),
                Err(ConnectLineError::Garbage),
                "{bad:?}"
            );
        }
    }
}
