//! One vsock stream between a guest port and a host unix socket: its
//! state, the credit on both sides, and the bounded buffer toward the host.
//!
//! Guest data is appended to `to_host` (at most [`BUF_ALLOC`] bytes, the
//! receive buffer we advertise) and written to the unix socket as it takes
//! it; `fwd_cnt` counts what the socket took. A host reader that falls
//! behind only stops this stream's credit from growing. Host data is read
//! only when the guest has an rx buffer and credit for it (its `buf_alloc`
//! minus what is in flight), up to 64 KiB at once; what does not fit the
//! rx buffer waits in `staged` for the next ones.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use super::packet::{op, Header, SHUTDOWN_RCV, SHUTDOWN_SEND};

/// The receive buffer each connection advertises to the guest: the most
/// guest data that waits for a slow host reader.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// A CREDIT_UPDATE goes out when the guest's idea of our free space drops
/// below this and we have freed more than it knows.
pub const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 2;

/// Where a connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: REQUEST sent (or due), waiting for the guest's RESPONSE.
    Connecting,
    /// Data flows.
    Established,
}

/// What the muxer must do after a guest packet or a host event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Keep the connection.
    Keep,
    /// Close the host socket, forget the connection and send the guest an RST.
    Reset,
    /// Close the host socket and forget the connection, nothing to the guest
    /// (it sent the RST).
    Drop,
}

/// A control or data packet the connection wants to send to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxPacket {
    /// Operation.
    pub op: u16,
    /// SHUTDOWN flags.
    pub flags: u32,
    /// Payload bytes (OP_RW), at the start of the caller's buffer.
    pub len: usize,
}

/// One stream.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    /// The host side's port (the guest's destination port).
    pub local_port: u32,
    /// The guest side's port.
    pub peer_port: u32,
    state: ConnState,
    /// When the REQUEST of a host-initiated stream went to the guest.
    requested_at: Option<std::time::Instant>,
    // Control packets due to the guest.
    want_request: bool,
    want_response: bool,
    want_credit_update: bool,
    want_credit_request: bool,
    want_shutdown: u32,
    shutdown_sent: u32,
    // Host -> guest.
    host_readable: bool,
    host_eof: bool,
    host_hup: bool,
    /// Read from the host, within the guest's credit, not yet in an rx buffer.
    staged: VecDeque<u8>,
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    // Guest -> host.
    greeting: Vec<u8>,
    to_host: VecDeque<u8>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    guest_shutdown: u32,
    host_write_shut: bool,
}

impl Connection {
    fn new(stream: UnixStream, local_port: u32, peer_port: u32, state: ConnState) -> Self {
        Connection {
            stream,
            local_port,
            peer_port,
            state,
            requested_at: None,
            want_request: false,
            want_response: false,
            want_credit_update: false,
            want_credit_request: false,
            want_shutdown: 0,
            shutdown_sent: 0,
            // Data may already wait: an edge-triggered registration only
            // reports what arrives later.
            host_readable: true,
            host_eof: false,
            host_hup: false,
            staged: VecDeque::new(),
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            greeting: Vec::new(),
            to_host: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            guest_shutdown: 0,
            host_write_shut: false,
        }
    }

    /// A host-initiated stream: a REQUEST to the guest is due.
    pub fn host_initiated(stream: UnixStream, local_port: u32, peer_port: u32) -> Self {
        let mut c = Self::new(stream, local_port, peer_port, ConnState::Connecting);
        c.want_request = true;
        c
    }

    /// A guest-initiated stream whose host socket is connected: a RESPONSE
    /// is due; `hdr` is the guest's REQUEST (its credit).
    pub fn guest_initiated(stream: UnixStream, hdr: &Header) -> Self {
        let mut c = Self::new(stream, hdr.dst_port, hdr.src_port, ConnState::Established);
        c.want_response = true;
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        c
    }

    /// The host socket.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Gives up the host socket (to be closed).
    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    /// A host-initiated stream whose REQUEST the guest has left unanswered
    /// for `timeout` (Linux drops its RST when the driver is not ready yet).
    pub fn request_expired(&self, now: std::time::Instant, timeout: std::time::Duration) -> bool {
        self.state == ConnState::Connecting
            && self
                .requested_at
                .is_some_and(|t| now.saturating_duration_since(t) >= timeout)
    }

    /// Where the connection stands.
    pub fn state(&self) -> ConnState {
        self.state
    }

    /// Bytes of guest data waiting for the host reader.
    pub fn pending_to_host(&self) -> usize {
        self.to_host.len()
    }

    /// Our forwarded count, as advertised in every packet.
    pub fn fwd_cnt(&self) -> u32 {
        self.fwd_cnt.0
    }

    /// How much more the guest can take: its buffer minus what is in flight.
    pub fn peer_free(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn receiving(&self) -> bool {
        self.state == ConnState::Established && self.guest_shutdown & SHUTDOWN_RCV == 0
    }

    /// Whether the connection has a packet for the guest now.
    pub fn wants_rx(&self) -> bool {
        let has_data = !self.staged.is_empty() || (self.host_readable && !self.host_eof);
        self.want_request
            || self.want_response
            || self.want_credit_update
            || self.want_credit_request
            || (self.want_shutdown & !self.shutdown_sent != 0 && self.staged.is_empty())
            || (self.receiving() && has_data && self.peer_free() > 0)
    }

    /// The host socket reported events (`hup`: both directions closed).
    pub fn host_event(&mut self, readable: bool, writable: bool, hup: bool) -> Verdict {
        if readable || hup {
            self.host_readable = true;
        }
        if hup {
            self.host_hup = true;
            if self.host_eof {
                // Half-closed before, now gone entirely: the guest may stop
                // receiving too (Linux then finishes with an RST).
                self.want_shutdown |= SHUTDOWN_SEND | SHUTDOWN_RCV;
            }
        }
        if writable || hup {
            return self.flush_to_host();
        }
        Verdict::Keep
    }

    /// A packet from the guest for this connection (`payload`: OP_RW data).
    pub fn guest_packet(&mut self, hdr: &Header, payload: &[u8]) -> Verdict {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        match (hdr.op, self.state) {
            (op::RST, _) => Verdict::Drop,
            (op::RESPONSE, ConnState::Connecting) => {
                self.state = ConnState::Established;
                self.greeting = format!("OK {}\n", self.local_port).into_bytes();
                self.flush_to_host()
            }
            (op::RW, ConnState::Established) => {
                let room = (BUF_ALLOC as usize).saturating_sub(self.to_host.len());
                if self.guest_shutdown & SHUTDOWN_SEND != 0 || payload.len() > room {
                    // Data after its own SHUTDOWN, or beyond the credit we gave.
                    tracing::debug!(
                        port = self.local_port,
                        len = payload.len(),
                        room,
                        "guest broke vsock flow control"
                    );
                    return Verdict::Reset;
                }
                let mut rest = payload;
                if self.to_host.is_empty() && self.greeting.is_empty() && !rest.is_empty() {
                    // Nothing queued: straight to the socket, buffer the rest.
                    match self.stream.write(rest) {
                        Ok(n) => {
                            rest = rest.get(n..).unwrap_or(&[]);
                            // n <= 64 KiB.
                            self.fwd_cnt += Wrapping(n as u32);
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                ErrorKind::WouldBlock | ErrorKind::Interrupted
                            ) => {}
                        Err(_) => return Verdict::Reset,
                    }
                }
                self.to_host.extend(rest);
                self.flush_to_host()
            }
            (op::CREDIT_UPDATE, _) => Verdict::Keep,
            (op::CREDIT_REQUEST, _) => {
                self.want_credit_update = true;
                Verdict::Keep
            }
            (op::SHUTDOWN, ConnState::Established) => {
                self.guest_shutdown |= hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                if self.guest_shutdown & SHUTDOWN_RCV != 0 {
                    // The guest will not read it.
                    self.staged.clear();
                }
                self.flush_to_host()
            }
            _ => Verdict::Reset,
        }
    }

    /// Writes what is due to the host socket until it would block; shuts
    /// its write side once the guest will send no more and all is written.
    pub fn flush_to_host(&mut self) -> Verdict {
        while !self.greeting.is_empty() {
            match self.stream.write(&self.greeting) {
                Ok(0) => return Verdict::Reset,
                Ok(n) => {
                    self.greeting.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Verdict::Keep,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Verdict::Reset,
            }
        }
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Verdict::Reset,
                Ok(n) => {
                    self.to_host.drain(..n);
                    // n <= BUF_ALLOC, so it fits.
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Verdict::Reset,
            }
        }
        // The guest thinks we hold everything it sent since the fwd_cnt it
        // last saw; tell it about the room we made when that view gets tight.
        let unacked = (self.fwd_cnt - self.last_fwd_cnt_sent).0 as usize + self.to_host.len();
        let guest_view_free = (BUF_ALLOC as usize).saturating_sub(unacked);
        if self.fwd_cnt != self.last_fwd_cnt_sent
            && guest_view_free < CREDIT_UPDATE_THRESHOLD as usize
        {
            self.want_credit_update = true;
        }
        if self.to_host.is_empty() && self.greeting.is_empty() {
            if self.guest_shutdown & SHUTDOWN_SEND != 0 && !self.host_write_shut {
                self.host_write_shut = true;
                let _ = self.stream.shutdown(std::net::Shutdown::Write);
            }
            if self.guest_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND {
                // Fully closed by the guest and all delivered: Linux waits
                // for our RST to finish its close.
                return Verdict::Reset;
            }
        }
        Verdict::Keep
    }

    /// Produces the next packet for the guest. Host data is read into
    /// `read_buf` (up to the guest's credit), as much as fits goes to `out`
    /// (the room in the guest's rx buffer) and the rest waits here for the
    /// next buffers, so one read serves several 4 KiB rx buffers. `None` if
    /// nothing is due.
    pub fn next_rx(
        &mut self,
        out: &mut [u8],
        read_buf: &mut [u8],
    ) -> Result<Option<RxPacket>, Verdict> {
        let ctl = |op| {
            Ok(Some(RxPacket {
                op,
                flags: 0,
                len: 0,
            }))
        };
        if std::mem::take(&mut self.want_request) {
            self.requested_at = Some(std::time::Instant::now());
            return ctl(op::REQUEST);
        }
        if std::mem::take(&mut self.want_response) {
            self.last_fwd_cnt_sent = self.fwd_cnt;
            return ctl(op::RESPONSE);
        }
        if self.receiving() {
            if self.staged.is_empty() && self.host_readable && !self.host_eof {
                let want = (self.peer_free() as usize).min(read_buf.len());
                if want > 0 {
                    self.read_host(&mut read_buf[..want])?;
                }
            }
            let n = self
                .staged
                .len()
                .min(out.len())
                .min(self.peer_free() as usize);
            if n > 0 {
                let (a, b) = self.staged.as_slices();
                let na = a.len().min(n);
                out[..na].copy_from_slice(&a[..na]);
                out[na..n].copy_from_slice(&b[..n - na]);
                self.staged.drain(..n);
                // n <= 64 KiB.
                self.rx_cnt += Wrapping(n as u32);
                self.last_fwd_cnt_sent = self.fwd_cnt;
                self.want_credit_update = false;
                if self.peer_free() == 0 {
                    self.want_credit_request = true;
                }
                return Ok(Some(RxPacket {
                    op: op::RW,
                    flags: 0,
                    len: n,
                }));
            }
        }
        let shutdown = self.want_shutdown & !self.shutdown_sent;
        if shutdown != 0 && self.staged.is_empty() {
            self.shutdown_sent |= shutdown;
            self.last_fwd_cnt_sent = self.fwd_cnt;
            return Ok(Some(RxPacket {
                op: op::SHUTDOWN,
                flags: self.want_shutdown,
                len: 0,
            }));
        }
        if std::mem::take(&mut self.want_credit_update) {
            self.last_fwd_cnt_sent = self.fwd_cnt;
            return ctl(op::CREDIT_UPDATE);
        }
        if std::mem::take(&mut self.want_credit_request) {
            return ctl(op::CREDIT_REQUEST);
        }
        Ok(None)
    }

    /// One read from the host socket into `buf`, kept in `staged`.
    fn read_host(&mut self, buf: &mut [u8]) -> Result<(), Verdict> {
        loop {
            match self.stream.read(buf) {
                Ok(0) => {
                    self.host_eof = true;
                    self.want_shutdown = if self.host_hup {
                        SHUTDOWN_SEND | SHUTDOWN_RCV
                    } else {
                        SHUTDOWN_SEND
                    };
                    return Ok(());
                }
                Ok(n) => {
                    self.staged.extend(buf.get(..n).unwrap_or(&[]));
                    return Ok(());
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.host_readable = false;
                    return Ok(());
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Err(Verdict::Reset),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::vsock::packet::TYPE_STREAM;

    fn guest_hdr(op: u16, len: u32, buf_alloc: u32, fwd_cnt: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 5000,
            dst_port: 1024,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc,
            fwd_cnt,
        }
    }

    fn established() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        let mut c = Connection::guest_initiated(a, &guest_hdr(op::REQUEST, 0, 4096, 0));
        let mut buf = [0u8; 64];
        assert_eq!(
            c.next_rx(&mut buf, &mut vec![0u8; 65536])
                .unwrap()
                .unwrap()
                .op,
            op::RESPONSE
        );
        (c, b)
    }

    #[test]
    fn host_data_never_exceeds_the_guests_credit() {
        let (mut c, mut host) = established();
        host.write_all(&vec![7u8; 10_000]).unwrap();
        let mut buf = vec![0u8; 65536];
        let mut sent = 0;
        while let Ok(Some(p)) = c.next_rx(&mut buf, &mut vec![0u8; 65536]) {
            if p.op == op::RW {
                sent += p.len;
            } else {
                assert_eq!(p.op, op::CREDIT_REQUEST);
                break;
            }
        }
        assert_eq!(sent, 4096, "exactly the guest's buf_alloc");
        assert_eq!(c.peer_free(), 0);
        assert!(!c.wants_rx());
        // The guest consumed 1000 bytes.
        assert_eq!(
            c.guest_packet(&guest_hdr(op::CREDIT_UPDATE, 0, 4096, 1000), &[]),
            Verdict::Keep
        );
        assert!(c.wants_rx());
        let p = c.next_rx(&mut buf, &mut vec![0u8; 65536]).unwrap().unwrap();
        assert_eq!((p.op, p.len), (op::RW, 1000));
    }

    #[test]
    fn guest_data_beyond_our_credit_resets() {
        let (mut c, _host) = established();
        // The host never reads: 256 KiB fit, one more byte does not.
        let chunk = vec![1u8; 65536];
        let mut verdict = Verdict::Keep;
        let mut total = 0;
        while verdict == Verdict::Keep && total <= BUF_ALLOC as usize * 2 {
            verdict = c.guest_packet(&guest_hdr(op::RW, 65536, 4096, 0), &chunk);
            total += chunk.len();
        }
        assert_eq!(verdict, Verdict::Reset);
        assert!(total > BUF_ALLOC as usize);
    }

    #[test]
    fn forwarded_bytes_produce_a_credit_update() {
        let (mut c, mut host) = established();
        let chunk = vec![1u8; 65536];
        for _ in 0..3 {
            assert_eq!(
                c.guest_packet(&guest_hdr(op::RW, 65536, 4096, 0), &chunk),
                Verdict::Keep
            );
        }
        // The host reads everything (the socket buffer took some already).
        let mut sink = vec![0u8; 1 << 20];
        let mut got = 0;
        while got < 3 * 65536 {
            match host.read(&mut sink) {
                Ok(n) => got += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    assert_eq!(c.host_event(false, true, false), Verdict::Keep);
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(c.fwd_cnt(), 3 * 65536);
        let mut buf = [0u8; 16];
        let mut saw_update = false;
        while let Ok(Some(p)) = c.next_rx(&mut buf, &mut vec![0u8; 65536]) {
            saw_update |= p.op == op::CREDIT_UPDATE;
        }
        assert!(saw_update);
        // A CREDIT_REQUEST is answered.
        c.guest_packet(&guest_hdr(op::CREDIT_REQUEST, 0, 4096, 0), &[]);
        assert_eq!(
            c.next_rx(&mut buf, &mut vec![0u8; 65536])
                .unwrap()
                .unwrap()
                .op,
            op::CREDIT_UPDATE
        );
    }

    #[test]
    fn shutdowns_in_both_directions() {
        let (mut c, mut host) = established();
        let mut s = guest_hdr(op::SHUTDOWN, 0, 4096, 0);
        s.flags = SHUTDOWN_SEND;
        c.guest_packet(&guest_hdr(op::RW, 3, 4096, 0), b"abc");
        assert_eq!(c.guest_packet(&s, &[]), Verdict::Keep);
        let mut got = Vec::new();
        host.set_nonblocking(false).unwrap();
        host.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"abc", "host sees the data, then EOF");
        host.shutdown(std::net::Shutdown::Write).unwrap();
        let mut buf = [0u8; 16];
        let p = c.next_rx(&mut buf, &mut vec![0u8; 65536]).unwrap().unwrap();
        assert_eq!((p.op, p.flags), (op::SHUTDOWN, SHUTDOWN_SEND));
        // The host closes entirely: the guest hears it may stop receiving.
        drop(host);
        c.host_event(false, false, true);
        let p = c.next_rx(&mut buf, &mut vec![0u8; 65536]).unwrap().unwrap();
        assert_eq!(
            (p.op, p.flags),
            (op::SHUTDOWN, SHUTDOWN_SEND | SHUTDOWN_RCV)
        );
        assert_eq!(c.next_rx(&mut buf, &mut vec![0u8; 65536]).unwrap(), None);
        s.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
        assert_eq!(c.guest_packet(&s, &[]), Verdict::Reset);
    }

    #[test]
    fn host_initiated_handshake() {
        let (a, mut host) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut c = Connection::host_initiated(a, 1 << 30, 1024);
        let mut buf = [0u8; 16];
        assert_eq!(
            c.next_rx(&mut buf, &mut vec![0u8; 65536])
                .unwrap()
                .unwrap()
                .op,
            op::REQUEST
        );
        assert_eq!(
            c.next_rx(&mut buf, &mut vec![0u8; 65536]).unwrap(),
            None,
            "no data before RESPONSE"
        );
        let mut r = guest_hdr(op::RESPONSE, 0, 4096, 0);
        r.src_port = 1024;
        assert_eq!(c.guest_packet(&r, &[]), Verdict::Keep);
        let mut line = [0u8; 14];
        host.read_exact(&mut line).unwrap();
        assert_eq!(&line, b"OK 1073741824\n");
        // A second RESPONSE is a protocol error.
        assert_eq!(c.guest_packet(&r, &[]), Verdict::Reset);
        assert_eq!(
            c.guest_packet(&guest_hdr(op::RST, 0, 0, 0), &[]),
            Verdict::Drop
        );
    }

    #[test]
    fn one_host_read_fills_several_rx_buffers_before_the_shutdown() {
        let (a, mut host) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut c = Connection::guest_initiated(a, &guest_hdr(op::REQUEST, 0, 1 << 20, 0));
        let mut rb = vec![0u8; 65536];
        let mut out = [0u8; 4096];
        assert_eq!(
            c.next_rx(&mut out, &mut rb).unwrap().unwrap().op,
            op::RESPONSE
        );
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        host.write_all(&data).unwrap();
        host.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = Vec::new();
        let mut ops = Vec::new();
        while let Some(p) = c.next_rx(&mut out, &mut rb).unwrap() {
            ops.push(p.op);
            got.extend_from_slice(&out[..p.len]);
        }
        assert_eq!(got, data);
        assert_eq!(ops, [op::RW, op::RW, op::RW, op::SHUTDOWN]);
    }
}
