//! The whole device against real guest memory, real descriptor chains
//! (virtio-queue's mock split queues), a real event loop and real unix
//! sockets in a scratch directory: what a guest driver and host programs
//! would see, including hostile chains.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::connection::BUF_ALLOC;
use super::muxer::FIRST_LOCAL_PORT;
use super::packet::{op, Header, HDR_SIZE, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use super::persist::{RESET_GRACE, VIRTIO_VSOCK_EVENT_TRANSPORT_RESET};
use super::{Vsock, VsockConfig, EVENT_QUEUE, RX_QUEUE, TX_QUEUE};
use crate::devices::virtio::test_utils::{
    d as desc, guest_mem, QueueLayout, WriteAudit, NEXT, WRITE,
};
use crate::devices::virtio::VirtioDevice;

const QSIZE: u16 = 64;
const RX_BUF: u32 = 4096;
const GUEST_PORT: u32 = 1234;

type Em = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

struct Guest {
    mem: &'static GuestMemoryMmap,
    rx: MockSplitQueue<'static, GuestMemoryMmap>,
    tx: MockSplitQueue<'static, GuestMemoryMmap>,
    ev: MockSplitQueue<'static, GuestMemoryMmap>,
    dev: Arc<Mutex<Vsock>>,
    em: Em,
    dir: PathBuf,
    rx_next: u16,
    tx_next: u16,
    rx_seen: u16,
    data_next: u64,
}

fn ghdr(op: u16, src_port: u32, dst_port: u32, len: u32) -> Header {
    Header {
        src_cid: 3,
        dst_cid: 2,
        src_port,
        dst_port,
        len,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 65536,
        fwd_cnt: 0,
    }
}

impl Guest {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("husk-vsock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(guest_mem(0x100_0000)));
        let rx = MockSplitQueue::create(mem, GuestAddress(0x1000), QSIZE);
        let tx = MockSplitQueue::create(mem, GuestAddress(0x10000), QSIZE);
        let ev = MockSplitQueue::create(mem, GuestAddress(0x20000), QSIZE);
        let dev = Arc::new(Mutex::new(
            Vsock::new(&VsockConfig {
                guest_cid: 3,
                uds_path: dir.join("v.sock"),
            })
            .unwrap(),
        ));
        let mut em = Em::new().unwrap();
        em.add_subscriber(dev.clone());
        let queues: Vec<Queue> = [&rx, &tx, &ev]
            .iter()
            .map(|q| q.create_queue().unwrap())
            .collect();
        dev.lock()
            .unwrap()
            .activate(mem.clone(), queues, 0)
            .unwrap();
        let mut g = Guest {
            mem,
            rx,
            tx,
            ev,
            dev,
            em,
            dir,
            rx_next: 0,
            tx_next: 0,
            rx_seen: 0,
            data_next: 0x10_0000,
        };
        g.pump();
        g
    }

    fn uds(&self) -> PathBuf {
        self.dir.join("v.sock")
    }

    /// Runs the event loop until it is idle. Panics if it never is (a busy
    /// loop), or if the device wrote guest memory it was not given: every
    /// test's device work is audited byte for byte.
    fn pump(&mut self) {
        let queues = [&self.rx, &self.tx, &self.ev].map(|q| QueueLayout::of(q, QSIZE));
        let audit = WriteAudit::new(self.mem, &queues);
        for _ in 0..1000 {
            if self.em.run_with_timeout(20).unwrap() == 0 {
                audit.check(self.mem);
                return;
            }
        }
        panic!("the event loop never went idle");
    }

    fn alloc(&mut self, len: u64) -> u64 {
        if self.data_next + len > 0xf0_0000 {
            self.data_next = 0x10_0000;
        }
        let a = self.data_next;
        self.data_next += (len + 63) & !63;
        a
    }

    fn notify(&mut self, queue: usize) {
        self.dev.lock().unwrap().queue_events()[queue]
            .write(1)
            .unwrap();
        self.pump();
    }

    /// Queues raw tx descriptors (table indices from the next free one).
    fn send_descs(&mut self, descs: Vec<virtio_queue::desc::RawDescriptor>) {
        let base = self.tx_next;
        // Chains use consecutive indices: relocate `next` fields.
        let descs: Vec<_> = descs
            .into_iter()
            .map(|d| {
                let s = virtio_queue::desc::split::Descriptor::from(d);
                desc(s.addr().0, s.len(), s.flags(), (s.next() + base) % QSIZE)
            })
            .collect();
        self.tx_next = (base + descs.len() as u16) % QSIZE;
        self.tx.add_desc_chains(&descs, base).unwrap();
        self.notify(TX_QUEUE);
    }

    fn send(&mut self, hdr: Header, payload: &[u8]) {
        let h = self.alloc(HDR_SIZE as u64);
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(h))
            .unwrap();
        if payload.is_empty() {
            self.send_descs(vec![desc(h, HDR_SIZE as u32, 0, 0)]);
        } else {
            let p = self.alloc(payload.len() as u64);
            self.mem.write_slice(payload, GuestAddress(p)).unwrap();
            self.send_descs(vec![
                desc(h, HDR_SIZE as u32, NEXT, 1),
                desc(p, payload.len() as u32, 0, 0),
            ]);
        }
    }

    fn post_rx_descs(&mut self, descs: Vec<virtio_queue::desc::RawDescriptor>) {
        let base = self.rx_next;
        self.rx_next = (base + descs.len() as u16) % QSIZE;
        self.rx.add_desc_chains(&descs, base).unwrap();
    }

    fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let a = self.alloc(u64::from(RX_BUF));
            self.post_rx_descs(vec![desc(a, RX_BUF, WRITE, 0)]);
        }
        self.notify(RX_QUEUE);
    }

    /// Packets the device put in the rx queue since the last call.
    fn recv(&mut self) -> Vec<(Header, Vec<u8>)> {
        let used = self.rx.used();
        let idx = used.idx().load();
        let mut out = Vec::new();
        while self.rx_seen != idx {
            let e = used
                .ring()
                .ref_at(usize::from(self.rx_seen % QSIZE))
                .unwrap()
                .load();
            self.rx_seen = self.rx_seen.wrapping_add(1);
            if e.len() == 0 {
                out.push((Header::default(), Vec::new()));
                continue;
            }
            let d = virtio_queue::desc::split::Descriptor::from(
                self.rx.desc_table().load(e.id() as u16).unwrap(),
            );
            let mut raw = [0u8; HDR_SIZE];
            self.mem.read_slice(&mut raw, d.addr()).unwrap();
            let h = Header::from_bytes(&raw);
            let mut p = vec![0u8; h.len as usize];
            self.mem
                .read_slice(&mut p, GuestAddress(d.addr().0 + HDR_SIZE as u64))
                .unwrap();
            assert_eq!(e.len() as usize, HDR_SIZE + p.len());
            out.push((h, p));
        }
        out
    }

    fn recv_one(&mut self) -> (Header, Vec<u8>) {
        self.post_rx(1);
        let mut v = self.recv();
        assert_eq!(v.len(), 1, "{v:?}");
        v.remove(0)
    }

    fn tx_used(&self) -> u16 {
        self.tx.used().idx().load()
    }

    fn sockets(&self) -> usize {
        self.dev.lock().unwrap().muxer().socket_count()
    }

    /// A guest-initiated stream to host port `port`, accepted on the host.
    fn connect_to_host(&mut self, port: u32, guest_port: u32) -> (UnixListener, UnixStream) {
        let l = UnixListener::bind(format!("{}_{port}", self.uds().display())).unwrap();
        self.send(ghdr(op::REQUEST, guest_port, port, 0), &[]);
        let (h, _) = self.recv_one();
        assert_eq!(
            (h.op, h.src_port, h.dst_port),
            (op::RESPONSE, port, guest_port)
        );
        assert_eq!((h.src_cid, h.dst_cid), (2, 3));
        assert_eq!(h.buf_alloc, BUF_ALLOC);
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (l, s)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn config_space_and_features() {
    let g = Guest::new("cfg");
    let dev = g.dev.lock().unwrap();
    let mut cid = [0u8; 8];
    dev.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), 3);
    assert_eq!(dev.device_type(), 19);
    assert_eq!(dev.queue_max_sizes().len(), 3);
    assert_eq!(dev.avail_features(), 1 << 32);
}

#[test]
fn packets_for_unknown_streams_get_rst() {
    let mut g = Guest::new("unknown");
    g.send(ghdr(op::RW, GUEST_PORT, 99, 3), b"abc");
    let (h, _) = g.recv_one();
    assert_eq!((h.op, h.src_port, h.dst_port), (op::RST, 99, GUEST_PORT));
    // An RST for an unknown stream is not answered.
    g.send(ghdr(op::RST, GUEST_PORT, 99, 0), &[]);
    g.post_rx(1);
    assert!(g.recv().is_empty());
}

#[test]
fn guest_connect_to_a_port_nobody_listens_on_is_reset() {
    let mut g = Guest::new("noport");
    g.send(ghdr(op::REQUEST, GUEST_PORT, 4444, 0), &[]);
    let (h, _) = g.recv_one();
    assert_eq!((h.op, h.src_port, h.dst_port), (op::RST, 4444, GUEST_PORT));
    assert_eq!(g.sockets(), 0);
}

#[test]
fn guest_initiated_stream_lifecycle() {
    let mut g = Guest::new("g2h");
    let (_l, mut host) = g.connect_to_host(5000, GUEST_PORT);
    // Guest -> host.
    g.send(ghdr(op::RW, GUEST_PORT, 5000, 5), b"hello");
    let mut b = [0u8; 5];
    host.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"hello");
    // Host -> guest.
    host.write_all(b"world").unwrap();
    g.pump();
    let (h, p) = g.recv_one();
    assert_eq!((h.op, p.as_slice()), (op::RW, &b"world"[..]));
    let m = g.dev.lock().unwrap().metrics();
    assert_eq!(m.tx_bytes.get(), 5, "the guest's hello");
    assert!(m.tx_packets.get() >= 2 && m.rx_packets.get() >= 2);
    // Host half-close -> SHUTDOWN(SEND) to the guest.
    host.shutdown(std::net::Shutdown::Write).unwrap();
    g.pump();
    let (h, _) = g.recv_one();
    assert_eq!((h.op, h.flags), (op::SHUTDOWN, SHUTDOWN_SEND));
    // Guest full close -> host EOF, RST to the guest, nothing left open.
    let mut s = ghdr(op::SHUTDOWN, GUEST_PORT, 5000, 0);
    s.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
    g.send(s, &[]);
    assert_eq!(host.read(&mut b).unwrap(), 0);
    let (h, _) = g.recv_one();
    assert_eq!(h.op, op::RST);
    assert_eq!(g.sockets(), 0);
    assert_eq!(g.dev.lock().unwrap().muxer().connection_count(), 0);
    // One stream opened by the guest, and ended.
    assert_eq!(
        (
            m.guest_connections.get(),
            m.host_connections.get(),
            m.closed_connections.get()
        ),
        (1, 0, 1)
    );
}

#[test]
fn host_initiated_stream_keeps_data_after_the_connect_line() {
    let mut g = Guest::new("h2g");
    let mut host = UnixStream::connect(g.uds()).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    host.write_all(b"CONNECT 1024\nearly").unwrap();
    g.pump();
    let (h, _) = g.recv_one();
    assert_eq!(
        (h.op, h.src_port, h.dst_port),
        (op::REQUEST, FIRST_LOCAL_PORT, 1024)
    );
    g.send(ghdr(op::RESPONSE, 1024, FIRST_LOCAL_PORT, 0), &[]);
    let mut line = [0u8; 14];
    host.read_exact(&mut line).unwrap();
    assert_eq!(&line, b"OK 1073741824\n");
    let (h, p) = g.recv_one();
    assert_eq!((h.op, p.as_slice()), (op::RW, &b"early"[..]));
    // A second host connection gets the next port.
    let mut second = UnixStream::connect(g.uds()).unwrap();
    second.write_all(b"CONNECT 1024\n").unwrap();
    g.pump();
    let (h, _) = g.recv_one();
    assert_eq!(h.src_port, FIRST_LOCAL_PORT + 1);
    // The guest resets the first stream: the host sees EOF at once.
    g.send(ghdr(op::RST, 1024, FIRST_LOCAL_PORT, 0), &[]);
    let mut b = [0u8; 1];
    assert_eq!(host.read(&mut b).unwrap(), 0);
    assert_eq!(g.sockets(), 1);
    // Two streams asked for by the host, one ended; one open.
    let m = g.dev.lock().unwrap().metrics();
    assert_eq!(
        (
            m.host_connections.get(),
            m.guest_connections.get(),
            m.closed_connections.get()
        ),
        (2, 0, 1)
    );
}

/// Posts event buffers `first..first + n` (8 bytes each, at 0xf0_0000 on)
/// without notifying.
fn post_event_buffers(g: &mut Guest, first: u16, n: u16) {
    let descs: Vec<_> = (first..first + n)
        .map(|i| desc(0xf0_0000 + u64::from(i) * 8, 8, WRITE, 0))
        .collect();
    g.ev.add_desc_chains(&descs, first).unwrap();
}

/// A restored guest: the transport reset goes on the event queue, and a
/// host connection made before the guest has taken it waits (no REQUEST
/// the reset would kill) until the driver posts an event buffer again.
#[test]
fn host_connections_wait_until_the_guest_took_the_transport_reset() {
    let mut g = Guest::new("reset-wait");
    post_event_buffers(&mut g, 0, 2);
    assert!(g.dev.lock().unwrap().send_transport_reset());
    let used = g.ev.used();
    assert_eq!(used.idx().load(), 1);
    let e = used.ring().ref_at(0).unwrap().load();
    assert_eq!((e.id(), e.len()), (0, 4));
    let mut event = [0u8; 4];
    g.mem
        .read_slice(&mut event, GuestAddress(0xf0_0000))
        .unwrap();
    assert_eq!(
        u32::from_le_bytes(event),
        VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
    );

    let mut host = UnixStream::connect(g.uds()).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    host.write_all(b"CONNECT 1024\n").unwrap();
    g.pump();
    g.post_rx(4);
    g.notify(TX_QUEUE);
    assert!(
        g.recv().is_empty(),
        "a REQUEST went out before the reset was taken"
    );

    // The driver handled the event and gives the buffer back.
    post_event_buffers(&mut g, 2, 1);
    g.notify(EVENT_QUEUE);
    let v = g.recv();
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!((v[0].0.op, v[0].0.dst_port), (op::REQUEST, 1024));
    g.send(ghdr(op::RESPONSE, 1024, FIRST_LOCAL_PORT, 0), &[]);
    let mut line = [0u8; 14];
    host.read_exact(&mut line).unwrap();
    assert_eq!(&line, b"OK 1073741824\n");
}

/// A guest that never posts its event buffer back holds host connections
/// for RESET_GRACE only: the timer lets them through.
#[test]
fn a_reset_the_guest_never_takes_holds_host_connections_for_the_grace_only() {
    let mut g = Guest::new("reset-grace");
    post_event_buffers(&mut g, 0, 1);
    assert!(g.dev.lock().unwrap().send_transport_reset());
    let sent = std::time::Instant::now();
    let mut host = UnixStream::connect(g.uds()).unwrap();
    host.write_all(b"CONNECT 1024\n").unwrap();
    g.post_rx(1);
    let mut got = Vec::new();
    while got.is_empty() && sent.elapsed() < RESET_GRACE * 3 {
        g.em.run_with_timeout(100).unwrap();
        got = g.recv();
    }
    assert!(sent.elapsed() >= RESET_GRACE, "the hold ended early");
    assert_eq!(got.len(), 1, "the hold never ended");
    assert_eq!(got[0].0.op, op::REQUEST);
}

/// Without an event buffer there is no reset to wait for.
#[test]
fn without_an_event_buffer_nothing_waits() {
    let mut g = Guest::new("reset-none");
    assert!(!g.dev.lock().unwrap().send_transport_reset());
    let mut host = UnixStream::connect(g.uds()).unwrap();
    host.write_all(b"CONNECT 1024\n").unwrap();
    g.pump();
    let (h, _) = g.recv_one();
    assert_eq!(h.op, op::REQUEST);
}

#[test]
fn closed_guest_port_closes_the_host_socket() {
    let mut g = Guest::new("closed");
    let mut host = UnixStream::connect(g.uds()).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    host.write_all(b"CONNECT 7777\n").unwrap();
    g.pump();
    let (h, _) = g.recv_one();
    g.send(ghdr(op::RST, 7777, h.src_port, 0), &[]);
    let mut b = [0u8; 16];
    assert_eq!(host.read(&mut b).unwrap(), 0, "EOF, no OK line");
    assert_eq!(g.sockets(), 0);
}

#[test]
fn tx_packets_are_counted_by_the_timer_only_when_their_notification_was_lost() {
    let mut g = Guest::new("lost-kick");
    // Queued as `send` would, but without the notification.
    let queue_rst = |g: &mut Guest| {
        let h = g.alloc(HDR_SIZE as u64);
        g.mem
            .write_slice(&ghdr(op::RST, 4000, 5000, 0).to_bytes(), GuestAddress(h))
            .unwrap();
        let base = g.tx_next;
        g.tx.add_desc_chains(&[desc(h, HDR_SIZE as u32, 0, 0)], base)
            .unwrap();
        g.tx_next = (base + 1) % QSIZE;
    };
    let used = |g: &Guest| g.tx.used().idx().load();
    let tick = |g: &Guest| g.dev.lock().unwrap().watch_tx();
    let found = |g: &Guest| g.dev.lock().unwrap().metrics().tx_found_by_timer.get();
    let before = used(&g);
    tick(&g);
    assert_eq!(found(&g), 0, "nothing waiting, nothing lost");
    queue_rst(&mut g);
    tick(&g);
    assert_eq!(found(&g), 0, "one tick proves nothing");
    tick(&g);
    assert_eq!(found(&g), 1, "a whole tick without a notification");
    assert_eq!(used(&g), before, "counted, not served");
    // Its notification serves it.
    g.notify(TX_QUEUE);
    assert_eq!(used(&g), before + 1);
    // Notified between two ticks: not counted.
    queue_rst(&mut g);
    tick(&g);
    g.notify(TX_QUEUE);
    assert_eq!(used(&g), before + 2);
    tick(&g);
    tick(&g);
    assert_eq!(found(&g), 1);
}

#[test]
fn unanswered_requests_expire() {
    let mut g = Guest::new("expire");
    let mut host = UnixStream::connect(g.uds()).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    host.write_all(b"CONNECT 1024\n").unwrap();
    g.pump();
    let (h, _) = g.recv_one();
    assert_eq!(h.op, op::REQUEST);
    let later = std::time::Instant::now() + super::muxer::REQUEST_TIMEOUT;
    {
        // As the timer tick would (then the loop closes what it dropped).
        let mut dev = g.dev.lock().unwrap();
        dev.muxer.expire_requests(later);
        dev.wake_event().write(1).unwrap();
    }
    g.pump();
    let mut b = [0u8; 4];
    assert_eq!(host.read(&mut b).unwrap(), 0, "EOF, no OK line");
    let (h, _) = g.recv_one();
    assert_eq!((h.op, h.src_port), (op::RST, FIRST_LOCAL_PORT));
    assert_eq!(g.sockets(), 0);
}

#[test]
fn bad_connect_lines_close_the_host_socket() {
    let mut g = Guest::new("badline");
    let long = format!("CONNECT {}\n", "1".repeat(100));
    for line in [
        "GET / HTTP/1.0\n",
        "CONNECT abc\n",
        "CONNECT -5\n",
        "CONNECT 99999999999\n",
        long.as_str(),
    ] {
        let mut host = UnixStream::connect(g.uds()).unwrap();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = host.write_all(line.as_bytes());
        g.pump();
        let mut b = [0u8; 16];
        let n = host.read(&mut b).unwrap_or(0);
        assert_eq!(n, 0, "{line:?} got an answer");
    }
    // An incomplete line is just waited for, without blocking the loop.
    let mut partial = UnixStream::connect(g.uds()).unwrap();
    partial.write_all(b"CONN").unwrap();
    g.pump();
    g.post_rx(1);
    assert!(g.recv().is_empty(), "no REQUEST, no RST");
    assert_eq!(g.sockets(), 1);
    partial.write_all(b"ECT 5\n").unwrap();
    g.pump();
    assert_eq!(g.recv()[0].0.op, op::REQUEST);
}

#[test]
fn without_rx_buffers_host_data_waits_and_nothing_spins() {
    let mut g = Guest::new("norx");
    let (_l, mut host) = g.connect_to_host(5000, GUEST_PORT);
    host.write_all(&[9u8; 10_000]).unwrap();
    // pump() panics if the loop never goes idle: the readable socket must
    // not be polled again and again while the guest has no buffers.
    g.pump();
    assert!(g.recv().is_empty());
    g.post_rx(4);
    let got: usize = g.recv().iter().map(|(_, p)| p.len()).sum();
    assert_eq!(got, 10_000);
}

#[test]
fn host_data_respects_the_guests_credit() {
    let mut g = Guest::new("credit");
    let mut req = ghdr(op::REQUEST, GUEST_PORT, 5000, 0);
    req.buf_alloc = 6000;
    let l = UnixListener::bind(format!("{}_5000", g.uds().display())).unwrap();
    g.send(req, &[]);
    g.post_rx(1);
    let (mut host, _) = l.accept().unwrap();
    host.write_all(&[1u8; 20_000]).unwrap();
    g.pump();
    g.post_rx(8);
    let pkts = g.recv();
    let data: usize = pkts
        .iter()
        .filter(|(h, _)| h.op == op::RW)
        .map(|(_, p)| p.len())
        .sum();
    assert_eq!(data, 6000, "exactly buf_alloc in flight");
    assert!(pkts.iter().any(|(h, _)| h.op == op::CREDIT_REQUEST));
    // The guest's reader consumed 4000 bytes.
    let mut upd = ghdr(op::CREDIT_UPDATE, GUEST_PORT, 5000, 0);
    upd.buf_alloc = 6000;
    upd.fwd_cnt = 4000;
    g.send(upd, &[]);
    let data: usize = g.recv().iter().map(|(_, p)| p.len()).sum();
    assert_eq!(data, 4000);
}

#[test]
fn a_slow_host_reader_stalls_only_its_own_stream() {
    let mut g = Guest::new("slow");
    let (_la, _slow) = g.connect_to_host(5000, 1);
    let (_lb, mut fast) = g.connect_to_host(5001, 2);
    // Fill the slow stream's whole credit; its reader never reads.
    let chunk = vec![7u8; 65536];
    for _ in 0..(BUF_ALLOC as usize / chunk.len()) {
        g.send(ghdr(op::RW, 1, 5000, 65536), &chunk);
    }
    // The other stream still flows both ways.
    g.send(ghdr(op::RW, 2, 5001, 4), b"ping");
    let mut b = [0u8; 4];
    fast.read_exact(&mut b).unwrap();
    fast.write_all(b"pong").unwrap();
    g.pump();
    let (h, p) = g.recv_one();
    assert_eq!((h.dst_port, p.as_slice()), (2, &b"pong"[..]));
    // What the host socket took was forwarded (and credited); beyond that
    // and our buffer, more data on the slow stream is a protocol violation
    // and resets it, while the fast one stays.
    let mut sent = BUF_ALLOC as usize;
    let mut reset = false;
    while !reset && sent < 4 << 20 {
        g.send(ghdr(op::RW, 1, 5000, 65536), &chunk);
        sent += chunk.len();
        g.post_rx(2);
        reset = g
            .recv()
            .iter()
            .any(|(h, _)| h.op == op::RST && h.dst_port == 1);
    }
    assert!(reset, "never reset after {sent} bytes");
    assert_eq!(g.sockets(), 1);
}

#[test]
fn hostile_tx_chains_are_consumed_and_ignored() {
    let mut g = Guest::new("hostile-tx");
    let h = g.alloc(64);
    g.mem
        .write_slice(
            &ghdr(op::RW, GUEST_PORT, 99, 16).to_bytes(),
            GuestAddress(h),
        )
        .unwrap();
    let mut huge = ghdr(op::RW, GUEST_PORT, 99, u32::MAX).to_bytes();
    let hh = g.alloc(64);
    g.mem.write_slice(&huge, GuestAddress(hh)).unwrap();
    huge.fill(0);
    let payload = g.alloc(64);
    let chains = vec![
        // Device-writable header on the tx queue.
        vec![desc(h, 44, WRITE, 0)],
        // Short header.
        vec![desc(h, 20, 0, 0)],
        // Payload announced but missing.
        vec![desc(h, 44, 0, 0)],
        // Huge announced length.
        vec![desc(hh, 44, NEXT, 1), desc(h, 0x10000, 0, 0)],
        // Outside guest memory.
        vec![desc(0xffff_ffff_0000, 44, 0, 0)],
        vec![desc(h, 44, NEXT, 1), desc(u64::MAX - 4, 16, 0, 0)],
        // Zero length.
        vec![desc(h, 0, 0, 0)],
        // A loop: 0 -> 1 -> 0 ...
        vec![desc(h, 44, NEXT, 1), desc(h + 44, 16, NEXT, 0)],
        // Header and payload overlap.
        vec![desc(h, 44, NEXT, 1), desc(h, 16, 0, 0)],
        // Finally a valid RW for an unknown stream: the device still
        // serves, and answers it with an RST.
        vec![desc(h, 44, NEXT, 1), desc(payload, 16, 0, 0)],
    ];
    let n = chains.len() as u16;
    for c in chains {
        g.send_descs(c);
    }
    assert_eq!(g.tx_used(), n, "every chain returned");
    g.post_rx(4);
    let pkts = g.recv();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    assert_eq!(pkts[0].0.op, op::RST);
}

#[test]
fn hostile_rx_chains_are_returned_empty() {
    let mut g = Guest::new("hostile-rx");
    g.send(ghdr(op::RW, GUEST_PORT, 99, 3), b"abc");
    let a = g.alloc(4096);
    for c in [
        vec![desc(a, 4096, 0, 0)],                    // read-only
        vec![desc(a, 20, WRITE, 0)],                  // too short
        vec![desc(0xffff_ffff_0000, 4096, WRITE, 0)], // outside
        vec![desc(a, 100, WRITE | NEXT, 1), desc(a + 50, 100, WRITE, 0)], // overlap
    ] {
        g.post_rx_descs(c);
    }
    g.post_rx(1);
    let pkts = g.recv();
    assert_eq!(pkts.len(), 5);
    assert!(pkts[..4].iter().all(|(h, _)| h.op == 0), "{pkts:?}");
    assert_eq!(pkts[4].0.op, op::RST);
}

#[test]
fn indirect_descriptors_are_refused_and_their_tables_never_read() {
    // husk does not offer VIRTIO_RING_F_INDIRECT_DESC: a chain that uses
    // it is malformed, returned unused and counted.
    use crate::devices::virtio::test_utils::{write_table, INDIRECT};
    let mut g = Guest::new("indirect");
    assert_eq!(g.dev.lock().unwrap().avail_features() & (1 << 28), 0);
    let metrics = g.dev.lock().unwrap().metrics();
    // tx: a REQUEST to a port nobody listens on, in a table. Followed, it
    // would be answered with an RST.
    let h = g.alloc(64);
    g.mem
        .write_slice(
            &ghdr(op::REQUEST, GUEST_PORT, 7777, 0).to_bytes(),
            GuestAddress(h),
        )
        .unwrap();
    let table = g.alloc(64);
    let len = write_table(g.mem, table, &[desc(h, HDR_SIZE as u32, 0, 0)]);
    g.send_descs(vec![desc(table, len, INDIRECT, 0)]);
    assert_eq!(g.tx_used(), 1);
    assert!(!g.dev.lock().unwrap().muxer().has_rx_work());
    assert_eq!(metrics.invalid_chains.get(), 1);
    assert_eq!(metrics.tx_packets.get(), 0);
    // rx: a buffer in a table is returned empty; the RST for a direct
    // REQUEST goes to the next buffer.
    let buf = g.alloc(4096);
    let len = write_table(g.mem, table, &[desc(buf, 4096, WRITE, 0)]);
    g.post_rx_descs(vec![desc(table, len, INDIRECT, 0)]);
    g.send(ghdr(op::REQUEST, GUEST_PORT, 7777, 0), &[]);
    g.post_rx(1);
    let pkts = g.recv();
    assert_eq!(pkts.len(), 2, "{pkts:?}");
    assert_eq!(pkts[0].0.op, 0, "{pkts:?}");
    assert_eq!(pkts[1].0.op, op::RST);
    let untouched: u8 = g.mem.read_obj(GuestAddress(buf)).unwrap();
    assert_eq!(untouched, 0, "the RST went into the table's buffer");
    assert_eq!(metrics.invalid_chains.get(), 2);
}

#[test]
fn packets_with_wrong_cids_are_dropped() {
    let mut g = Guest::new("cids");
    let mut h = ghdr(op::REQUEST, GUEST_PORT, 5000, 0);
    h.src_cid = 7;
    g.send(h, &[]);
    g.post_rx(1);
    assert!(g.recv().is_empty());
}

#[test]
fn a_driver_reset_closes_every_host_socket() {
    let mut g = Guest::new("reset");
    let (_l, mut host) = g.connect_to_host(5000, GUEST_PORT);
    assert_eq!(g.sockets(), 1);
    g.dev.lock().unwrap().reset();
    g.pump();
    let mut b = [0u8; 1];
    assert_eq!(host.read(&mut b).unwrap(), 0);
    assert_eq!(g.sockets(), 0);
}

#[test]
fn the_socket_file_goes_with_the_device_and_stale_ones_are_replaced() {
    let dir = std::env::temp_dir().join(format!("husk-vsock-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("v.sock");
    let config = VsockConfig {
        guest_cid: 3,
        uds_path: path.clone(),
    };
    let v = Vsock::new(&config).unwrap();
    assert!(path.exists());
    // A second device on a live socket is refused.
    let err = Vsock::new(&config).err().unwrap();
    assert!(err.to_string().contains("in use"), "{err}");
    drop(v);
    assert!(!path.exists(), "removed with the device");
    // A stale socket (nobody listening) is replaced.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let v = Vsock::new(&config).unwrap();
    assert!(UnixStream::connect(&path).is_ok());
    drop(v);
    // Anything else in the way is refused.
    std::fs::write(&path, b"data").unwrap();
    let err = Vsock::new(&config).err().unwrap();
    assert!(err.to_string().contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"data");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn running_out_of_fds_refuses_host_connections_without_spinning() {
    // Lowering the descriptor limit is process-wide: run in a child.
    const CHILD: &str = "HUSK_VSOCK_EMFILE_CHILD";
    if std::env::var_os(CHILD).is_none() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "devices::virtio::vsock::tests::running_out_of_fds_refuses_host_connections_without_spinning",
                "--test-threads=1",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && text.contains("1 passed"), "{text}");
        return;
    }
    let mut g = Guest::new("emfile");
    // The limit bounds descriptor numbers, not their count: a harness may
    // leave a high-numbered descriptor open, and every hole below it is
    // room for one more. Put the limit just past the seventh free number.
    let mut free = 0;
    let mut next: u64 = 0;
    while free < 7 {
        // SAFETY: F_GETFD only reads the flags of a descriptor number.
        if unsafe { libc::fcntl(next as i32, libc::F_GETFD) } == -1 {
            free += 1;
        }
        next += 1;
    }
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    // Room for three client/server pairs and one more client socket, whose
    // server side can then not be accepted.
    lim.rlim_cur = next;
    // SAFETY: as above.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
    let mut clients = Vec::new();
    let mut refused = false;
    for _ in 0..10 {
        let Ok(mut c) = UnixStream::connect(g.uds()) else {
            break;
        };
        // Panics if the loop spins on a listener it cannot serve.
        g.pump();
        c.set_nonblocking(true).unwrap();
        if matches!(c.read(&mut [0u8; 1]), Ok(0)) {
            refused = true;
            break;
        }
        clients.push(c);
    }
    assert!(refused, "{} connections, none refused", clients.len());
    // With descriptors back, connections work again.
    clients.clear();
    g.pump();
    let mut c = UnixStream::connect(g.uds()).unwrap();
    c.write_all(b"CONNECT 5\n").unwrap();
    g.pump();
    assert_eq!(g.recv_one().0.op, op::REQUEST);
}

/// A guest that refills its tx ring as fast as the device returns buffers
/// (a real concurrent "driver" on another thread, as in a guest that floods
/// vsock) gets a queue's worth of chains per call, never more: the event
/// loop, and with it the API and the other devices, has a turn between
/// batches. Before the budget one call served 431 chains from a 256-entry
/// ring in the node VM.
#[test]
fn a_guest_that_keeps_its_tx_ring_full_gets_a_queue_worth_per_turn() {
    use super::device::BUDGET;
    use crate::devices::virtio::test_utils::hand_laid_queue;
    use std::sync::atomic::{AtomicBool, Ordering};
    const SIZE: u16 = super::QUEUE_SIZE;
    const AVAIL: u64 = 0x1_0000;
    const USED: u64 = 0x2_0000;
    const HDR: u64 = 0x8_0000;
    const PAYLOAD: u32 = 64 * 1024;
    const TOTAL: u16 = 8 * SIZE;
    let dir = std::env::temp_dir().join(format!("husk-vsock-flood-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mem = guest_mem(0x10_0000);
    // Every chain is 64 KiB of data for a stream nobody knows: read,
    // checked, copied, and answered with an RST the guest never collects.
    mem.write_slice(
        &ghdr(op::RW, GUEST_PORT, 99, PAYLOAD).to_bytes(),
        GuestAddress(HDR),
    )
    .unwrap();
    for i in 0..u64::from(SIZE) {
        let chain = desc(HDR, HDR_SIZE as u32 + PAYLOAD, 0, 0);
        mem.write_obj(chain, GuestAddress(16 * i)).unwrap();
    }
    let mut dev = Vsock::new(&VsockConfig {
        guest_cid: 3,
        uds_path: dir.join("v.sock"),
    })
    .unwrap();
    let queues = vec![
        hand_laid_queue(SIZE, 0x4_0000, 0x5_0000, false),
        hand_laid_queue(SIZE, AVAIL, USED, false),
        hand_laid_queue(SIZE, 0x6_0000, 0x7_0000, false),
    ];
    dev.activate(mem.clone(), queues, 0).unwrap();
    let idx = |m: &GuestMemoryMmap, at: u64| m.load::<u16>(GuestAddress(at + 2), Ordering::Acquire);

    // The driver: fills the ring, then puts each returned buffer back at
    // once, TOTAL chains in all.
    let stop = Arc::new(AtomicBool::new(false));
    let driver = {
        let (mem, stop) = (mem.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut published: u16 = 0;
            while published < TOTAL && !stop.load(Ordering::Relaxed) {
                let used = idx(&mem, USED).unwrap();
                while published < TOTAL && published.wrapping_sub(used) < SIZE {
                    let slot = published % SIZE;
                    mem.write_obj(slot, GuestAddress(AVAIL + 4 + 2 * u64::from(slot)))
                        .unwrap();
                    published += 1;
                    mem.store(published, GuestAddress(AVAIL + 2), Ordering::Release)
                        .unwrap();
                }
                std::hint::spin_loop();
            }
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while idx(&mem, AVAIL).unwrap() < SIZE {
        assert!(
            std::time::Instant::now() < deadline,
            "the driver never filled the ring"
        );
        std::thread::yield_now();
    }

    // One call: a queue's worth, and the device asks for another turn.
    let first = dev.process_tx();
    assert_eq!(
        first, BUDGET,
        "one call served more (or less) than the budget"
    );
    assert!(
        dev.queue_events()[TX_QUEUE].read().is_ok(),
        "the device did not ask the event loop to come back"
    );
    // The rest on later turns, at most a queue's worth each.
    let mut served = first;
    while idx(&mem, USED).unwrap() < TOTAL {
        assert!(
            std::time::Instant::now() < deadline,
            "{served} of {TOTAL} chains served"
        );
        let n = dev.process_tx();
        assert!(n <= BUDGET, "one call served {n}");
        served += n;
    }
    stop.store(true, Ordering::Relaxed);
    driver.join().unwrap();
    assert_eq!(served, usize::from(TOTAL));
    assert!(dev.metrics().tx_budget_spent.get() >= 1);
    assert_eq!(dev.metrics().tx_packets.get(), u64::from(TOTAL));
    assert_eq!(dev.metrics().invalid_chains.get(), 0);
    drop(dev);
    let _ = std::fs::remove_dir_all(&dir);
}
