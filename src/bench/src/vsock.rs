//! vsock load and test tool, the same binary on both sides:
//!
//! - `husk-bench vsock-serve --listen vsock:PORT|unix:PATH` serves streams;
//! - `husk-bench vsock-client --connect vsock:CID:PORT|uds:PATH:PORT` opens
//!   N concurrent streams and checks what comes back;
//! - `husk-bench vsock` (the benchmark) boots a guest that serves, and
//!   measures host->guest and guest->host throughput through husk's vsock.
//!
//! A stream starts with a 17-byte request: a mode byte, the size (u64 LE)
//! and a seed (u64 LE). `E` echoes `size` bytes back, `U` reads `size` bytes
//! and answers their checksum, `D` sends `size` bytes made from the seed,
//! `F` reads until EOF and answers the byte count (a flood of zeros, for
//! load, checked by count only), `H` holds the stream open until the
//! client closes it (a connection that outlives a snapshot), `Q` makes the
//! server exit. The data is a counter-based pseudo-random
//! stream, so both ends can check every byte through a checksum. `uds:`
//! speaks husk's `CONNECT <port>` handshake on the VMM's unix socket.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

const CHUNK: usize = 64 * 1024;

/// A connected stream socket of either family; read(2) and write(2) work
/// on any socket, so `File` carries it.
pub struct Sock(File);

impl Sock {
    fn from_fd(fd: OwnedFd) -> Self {
        Sock(File::from(fd))
    }

    fn shutdown_write(&self) {
        // SAFETY: shutdown(2) on a descriptor we own; no pointers.
        unsafe { libc::shutdown(self.0.as_raw_fd(), libc::SHUT_WR) };
    }

    /// A stalled stream fails after `d` instead of hanging the run.
    fn set_timeouts(&self, d: Duration) {
        let tv = libc::timeval {
            tv_sec: d.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
            // SAFETY: tv is a valid timeval for the duration of the call.
            unsafe {
                libc::setsockopt(
                    self.0.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    std::ptr::addr_of!(tv).cast(),
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                )
            };
        }
    }

    fn try_clone(&self) -> std::io::Result<Sock> {
        Ok(Sock(self.0.try_clone()?))
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all zeroes is valid.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

fn vsock_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn vsock_connect(cid: u32, port: u32) -> std::io::Result<Sock> {
    let fd = vsock_socket()?;
    let addr = vsock_addr(cid, port);
    // SAFETY: addr is a valid sockaddr_vm for the duration of the call.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Sock::from_fd(fd))
}

fn vsock_listen(port: u32) -> std::io::Result<OwnedFd> {
    let fd = vsock_socket()?;
    let addr = vsock_addr(libc::VMADDR_CID_ANY, port);
    // SAFETY: addr is a valid sockaddr_vm for the duration of the call.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    // SAFETY: listen(2) takes no pointers.
    if rc < 0 || unsafe { libc::listen(fd.as_raw_fd(), 128) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

fn vsock_accept(listener: &OwnedFd) -> std::io::Result<Sock> {
    // SAFETY: null address pointers are allowed (peer address not wanted).
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(Sock::from_fd(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// The `n`-th 8 bytes of the stream for `seed` (splitmix64).
fn word(seed: u64, n: u64) -> u64 {
    let mut z = seed
        .wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `buf` with the stream for `seed` from byte `offset` (a multiple of 8).
fn fill(seed: u64, offset: u64, buf: &mut [u8]) {
    for (i, chunk) in buf.chunks_mut(8).enumerate() {
        let w = word(seed, offset / 8 + i as u64).to_le_bytes();
        chunk.copy_from_slice(&w[..chunk.len()]);
    }
}

/// A checksum over a byte stream, independent of how it is chunked.
#[derive(Default)]
struct Checksum {
    h: u64,
    pending: [u8; 8],
    npending: usize,
    len: u64,
}

impl Checksum {
    fn word(&mut self, w: u64) {
        self.h = (self.h ^ w)
            .wrapping_mul(0x0000_0100_0000_01b3)
            .rotate_left(17);
    }
    fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        while self.npending > 0 && !data.is_empty() {
            self.pending[self.npending] = data[0];
            self.npending += 1;
            data = &data[1..];
            if self.npending == 8 {
                self.word(u64::from_le_bytes(self.pending));
                self.npending = 0;
            }
        }
        let mut words = data.chunks_exact(8);
        for w in &mut words {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            self.word(u64::from_le_bytes(b));
        }
        for &b in words.remainder() {
            self.pending[self.npending] = b;
            self.npending += 1;
        }
    }
    fn finish(&self) -> u64 {
        let mut h = self.h;
        for &b in &self.pending[..self.npending] {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^ self.len
    }
}

/// Writes `size` bytes of the seed's stream; returns their checksum.
fn send_stream(s: &mut Sock, seed: u64, size: u64) -> std::io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut sum = Checksum::default();
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(CHUNK as u64) as usize;
        fill(seed, off, &mut buf[..n]);
        s.write_all(&buf[..n])?;
        sum.update(&buf[..n]);
        off += n as u64;
    }
    Ok(sum.finish())
}

/// Reads until EOF (or `limit` bytes); returns (bytes, checksum).
///
/// ENOTCONN counts as EOF. Linux's vsock (6.1 and upstream alike) has a
/// stream whose peer closed it report that on `recv` when the socket was
/// then shut down locally: the peer's close marks it done, our
/// `shutdown()` clears that mark, and `recv` on a closing socket not
/// marked done says "not connected" instead of 0, until the RST that
/// answers our SHUTDOWN marks it done again. A client whose request
/// makes the server close on its own (an echo: it closes once it has
/// echoed the request's length) shuts down its write side at the same
/// time, so the two race; the callers check the byte count and checksum,
/// so a stream cut short is still caught.
fn recv_stream(s: &mut Sock, limit: u64) -> std::io::Result<(u64, u64)> {
    let mut buf = vec![0u8; CHUNK];
    let mut sum = Checksum::default();
    while sum.len < limit {
        let want = (limit - sum.len).min(CHUNK as u64) as usize;
        let n = match s.read(&mut buf[..want]) {
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => 0,
            r => r?,
        };
        if n == 0 {
            break;
        }
        sum.update(&buf[..n]);
    }
    Ok((sum.len, sum.finish()))
}

fn expected_checksum(seed: u64, size: u64) -> u64 {
    let mut buf = vec![0u8; CHUNK];
    let mut sum = Checksum::default();
    let mut off = 0;
    while off < size {
        let n = (size - off).min(CHUNK as u64) as usize;
        fill(seed, off, &mut buf[..n]);
        sum.update(&buf[..n]);
        off += n as u64;
    }
    sum.finish()
}

fn serve_one(mut s: Sock) -> anyhow::Result<()> {
    let mut req = [0u8; 17];
    s.read_exact(&mut req).context("request")?;
    let mut n = [0u8; 8];
    n.copy_from_slice(&req[1..9]);
    let size = u64::from_le_bytes(n);
    n.copy_from_slice(&req[9..17]);
    let seed = u64::from_le_bytes(n);
    match req[0] {
        b'E' => {
            let mut buf = vec![0u8; CHUNK];
            let mut left = size;
            while left > 0 {
                let want = left.min(CHUNK as u64) as usize;
                let got = s.read(&mut buf[..want])?;
                if got == 0 {
                    bail!("EOF with {left} bytes to echo");
                }
                s.write_all(&buf[..got])?;
                left -= got as u64;
            }
        }
        b'U' => {
            let (_, sum) = recv_stream(&mut s, size)?;
            s.write_all(&sum.to_le_bytes())?;
        }
        b'D' => {
            send_stream(&mut s, seed, size)?;
        }
        b'F' => {
            // A sink: count, do not check (the checksum would be the
            // bottleneck under emulation, not the transport).
            let mut buf = vec![0u8; CHUNK];
            let mut got = 0u64;
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                got += n as u64;
            }
            s.write_all(&got.to_le_bytes())?;
        }
        b'H' => {
            recv_stream(&mut s, u64::MAX)?;
        }
        b'Q' => {
            eprintln!("husk-bench vsock-serve: quit");
            std::process::exit(0);
        }
        m => bail!("unknown mode {m}"),
    }
    s.shutdown_write();
    Ok(())
}

/// `vsock-serve`: serves streams until a `Q` request.
pub fn serve(listen: &str) -> anyhow::Result<()> {
    let spawn = |s: Sock| {
        std::thread::spawn(move || {
            if let Err(e) = serve_one(s) {
                eprintln!("husk-bench vsock-serve: {e:#}");
            }
        });
    };
    if let Some(port) = listen.strip_prefix("vsock:") {
        let l = vsock_listen(port.parse().context("vsock port")?).context("vsock listen")?;
        eprintln!("husk-bench vsock-serve: listening on vsock port {port}");
        loop {
            spawn(vsock_accept(&l).context("vsock accept")?);
        }
    } else if let Some(path) = listen.strip_prefix("unix:") {
        let _ = std::fs::remove_file(path);
        let l = UnixListener::bind(path).with_context(|| format!("bind {path}"))?;
        eprintln!("husk-bench vsock-serve: listening on {path}");
        for s in l.incoming() {
            spawn(Sock::from_fd(OwnedFd::from(s.context("accept")?)));
        }
        Ok(())
    } else {
        bail!("--listen wants vsock:PORT or unix:PATH")
    }
}

/// Where a client connects.
#[derive(Clone, Debug)]
pub enum Target {
    /// AF_VSOCK (in a guest).
    Vsock(u32, u32),
    /// husk's unix socket with the CONNECT handshake.
    Uds(PathBuf, u32),
    /// A plain unix socket (the baseline, and `<uds>_<port>` servers).
    Unix(PathBuf),
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("vsock:") {
            let (cid, port) = rest.split_once(':').ok_or("vsock:CID:PORT")?;
            return Ok(Target::Vsock(
                cid.parse().map_err(|_| "bad cid")?,
                port.parse().map_err(|_| "bad port")?,
            ));
        }
        if let Some(rest) = s.strip_prefix("uds:") {
            let (path, port) = rest.rsplit_once(':').ok_or("uds:PATH:PORT")?;
            return Ok(Target::Uds(
                path.into(),
                port.parse().map_err(|_| "bad port")?,
            ));
        }
        if let Some(path) = s.strip_prefix("unix:") {
            return Ok(Target::Unix(path.into()));
        }
        Err("want vsock:CID:PORT, uds:PATH:PORT or unix:PATH".into())
    }
}

/// How long a client stream may wait for its peer before it fails.
const STREAM_TIMEOUT: Duration = Duration::from_secs(120);

/// Opens one stream; an error means refused (or failed).
pub fn connect(t: &Target) -> std::io::Result<Sock> {
    let s = connect_once(t)?;
    s.set_timeouts(STREAM_TIMEOUT);
    Ok(s)
}

fn connect_once(t: &Target) -> std::io::Result<Sock> {
    match t {
        Target::Vsock(cid, port) => vsock_connect(*cid, *port),
        Target::Unix(path) => Ok(Sock::from_fd(OwnedFd::from(UnixStream::connect(path)?))),
        Target::Uds(path, port) => {
            let mut s = UnixStream::connect(path)?;
            s.set_read_timeout(Some(STREAM_TIMEOUT))?;
            s.write_all(format!("CONNECT {port}\n").as_bytes())?;
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while line.len() < 64 {
                if s.read(&mut b)? == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionRefused,
                        "closed without OK",
                    ));
                }
                if b[0] == b'\n' {
                    break;
                }
                line.push(b[0]);
            }
            if !line.starts_with(b"OK ") {
                return Err(std::io::Error::other(format!(
                    "bad answer {:?}",
                    String::from_utf8_lossy(&line)
                )));
            }
            Ok(Sock::from_fd(OwnedFd::from(s)))
        }
    }
}

fn connect_retrying(t: &Target, retry: Duration) -> anyhow::Result<Sock> {
    let deadline = Instant::now() + retry;
    loop {
        match connect(t) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e).with_context(|| format!("connect to {t:?}")),
        }
    }
}

fn request(s: &mut Sock, mode: u8, size: u64, seed: u64) -> std::io::Result<()> {
    let mut req = [0u8; 17];
    req[0] = mode;
    req[1..9].copy_from_slice(&size.to_le_bytes());
    req[9..17].copy_from_slice(&seed.to_le_bytes());
    s.write_all(&req)
}

/// One client stream: returns whether every byte checked out. An echo
/// half-closes the stream once it sent everything unless `open` (the
/// request carries the length, so the server needs no EOF; Firecracker
/// ends both directions on a host's half-close).
fn run_stream(
    t: &Target,
    mode: u8,
    size: u64,
    seed: u64,
    retry: Duration,
    open: bool,
) -> anyhow::Result<()> {
    let mut s = connect_retrying(t, retry)?;
    request(&mut s, mode, size, seed)?;
    match mode {
        b'E' => {
            let mut w = s.try_clone()?;
            let writer = std::thread::spawn(move || {
                let r = send_stream(&mut w, seed, size);
                if !open {
                    w.shutdown_write();
                }
                r
            });
            let (got, sum) = recv_stream(&mut s, u64::MAX)?;
            let sent = writer
                .join()
                .map_err(|_| anyhow::anyhow!("writer panicked"))??;
            if got != size || sum != sent {
                bail!("echo mismatch: {got} of {size} bytes, checksum {sum:#x} != {sent:#x}");
            }
        }
        b'U' => {
            let sent = send_stream(&mut s, seed, size)?;
            s.shutdown_write();
            let mut r = [0u8; 8];
            s.read_exact(&mut r).context("checksum answer")?;
            if u64::from_le_bytes(r) != sent {
                bail!("upload checksum mismatch");
            }
        }
        b'D' => {
            s.shutdown_write();
            let (got, sum) = recv_stream(&mut s, u64::MAX)?;
            if got != size || sum != expected_checksum(seed, size) {
                bail!("download mismatch: {got} of {size} bytes");
            }
        }
        b'F' => {
            // As fast as the transport takes it: zeros, counted by the
            // server, no checksum on either side.
            let buf = vec![0u8; CHUNK];
            let mut off = 0u64;
            while off < size {
                let n = (size - off).min(CHUNK as u64) as usize;
                s.write_all(&buf[..n])?;
                off += n as u64;
            }
            s.shutdown_write();
            let mut r = [0u8; 8];
            s.read_exact(&mut r).context("byte count answer")?;
            if u64::from_le_bytes(r) != size {
                bail!(
                    "flood: the server counted {} of {size} bytes",
                    u64::from_le_bytes(r)
                );
            }
        }
        b'Q' => {}
        m => bail!("unknown mode {m}"),
    }
    Ok(())
}

/// How long a held stream waits for its end.
const HOLD_TIMEOUT: Duration = Duration::from_secs(900);

/// `--mode hold`: one stream that sends nothing and waits until it ends;
/// says how (`eof`, `reset`, `timeout`, `error`). A stream the guest holds
/// across a snapshot ends with `reset` once the restored VM's transport
/// reset reaches it.
fn hold(t: &Target, retry: Duration) -> Value {
    let start = Instant::now();
    let outcome = connect_retrying(t, retry).and_then(|mut s| {
        request(&mut s, b'H', 0, 0)?;
        s.set_timeouts(HOLD_TIMEOUT);
        eprintln!("husk-bench vsock-client: holding a stream");
        let mut b = [0u8; 64];
        loop {
            match s.read(&mut b) {
                Ok(0) => return Ok("eof"),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    });
    let (ended, error) = match outcome {
        Ok(how) => (how, None),
        Err(e) => {
            let io = e.downcast_ref::<std::io::Error>();
            let how = match io.map(std::io::Error::kind) {
                Some(std::io::ErrorKind::ConnectionReset) => "reset",
                Some(std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => "timeout",
                _ => "error",
            };
            (how, Some(format!("{e:#}")))
        }
    };
    json!({
        "mode": "hold",
        "ended": ended,
        "error": error,
        "seconds": (start.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
    })
}

/// `vsock-client`: `streams` concurrent streams of `mode`, `total` bytes in all.
pub fn client(
    t: &Target,
    mode: &str,
    streams: usize,
    total: u64,
    retry: Duration,
) -> anyhow::Result<Value> {
    let m = match mode {
        "echo" | "echo-open" => b'E',
        "upload" => b'U',
        "download" => b'D',
        "flood" => b'F',
        "quit" => b'Q',
        "probe" => {
            let start = Instant::now();
            let r = connect(t);
            return Ok(json!({
                "mode": "probe",
                "connected": r.is_ok(),
                "error": r.err().map(|e| e.to_string()),
                "ms": start.elapsed().as_secs_f64() * 1e3,
            }));
        }
        "hold" => return Ok(hold(t, retry)),
        _ => bail!("--mode wants echo, echo-open, upload, download, flood, probe, hold or quit"),
    };
    let open = mode == "echo-open";
    let streams = streams.max(1);
    let per = total / streams as u64;
    // Wait for the server once, then start every stream together.
    if retry > Duration::ZERO && m != b'Q' {
        let mut probe = connect_retrying(t, retry)?;
        request(&mut probe, b'E', 0, 0)?;
        if !open {
            probe.shutdown_write();
        }
        recv_stream(&mut probe, u64::MAX)?;
    }
    let start = Instant::now();
    let handles: Vec<_> = (0..streams)
        .map(|i| {
            let t = t.clone();
            std::thread::spawn(move || run_stream(&t, m, per, 0x5eed + i as u64, retry, open))
        })
        .collect();
    let mut errors = Vec::new();
    for h in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errors.push(format!("{e:#}")),
            Err(_) => errors.push("stream thread panicked".into()),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let bytes = per * streams as u64;
    Ok(json!({
        "mode": mode,
        "streams": streams,
        "bytes": bytes,
        "seconds": (secs * 1000.0).round() / 1000.0,
        "mib_s": ((bytes as f64 / (1 << 20) as f64 / secs) * 10.0).round() / 10.0,
        "checksums_equal": errors.is_empty(),
        "errors": errors,
    }))
}

/// The guest the vsock benchmarks boot: husk, a kernel, and an initramfs
/// whose /husk-test.sh runs `husk-bench vsock-serve --listen vsock:PORT`
/// (resources/bench.sh makes it).
#[derive(clap::Args)]
pub struct VsockGuest {
    /// The husk binary.
    #[arg(long, default_value = "husk")]
    pub husk: PathBuf,
    /// Guest kernel.
    #[arg(long)]
    pub kernel: PathBuf,
    /// Guest initramfs whose /husk-test.sh runs `husk-bench vsock-serve
    /// --listen vsock:PORT` (resources/bench.sh makes it).
    #[arg(long)]
    pub initrd: PathBuf,
}

/// `husk-bench vsock`: boots a guest whose /husk-test.sh runs
/// `husk-bench vsock-serve --listen vsock:PORT`, then measures uploads
/// (host->guest) and downloads (guest->host) through the VMM's socket.
pub fn bench(
    guest: &VsockGuest,
    port: u32,
    size_mib: u64,
    streams: usize,
) -> anyhow::Result<Value> {
    let uds = std::env::current_dir()?.join("husk-vsock-bench.sock");
    let mut vmm = Command::new(&guest.husk)
        .args(["boot", "--mem-mib", "256", "--kernel"])
        .arg(&guest.kernel)
        .arg("--initrd")
        .arg(&guest.initrd)
        .args(["--cmdline", "console=ttyS0 reboot=k panic=1 pci=off quiet"])
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", uds.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", guest.husk.display()))?;
    let t = Target::Uds(uds, port);
    let retry = Duration::from_secs(120);
    let run = || -> anyhow::Result<Value> {
        let size = size_mib << 20;
        let mut out = serde_json::Map::new();
        for (name, mode) in [("host_to_guest", "upload"), ("guest_to_host", "download")] {
            for n in [1usize, streams] {
                eprintln!("husk-bench vsock: {name}, {n} streams");
                let r = client(&t, mode, n, size, retry)?;
                if r["checksums_equal"] != json!(true) {
                    bail!("{name} with {n} streams failed: {r}");
                }
                out.insert(format!("{name}_{n}_streams_mib_s"), r["mib_s"].clone());
            }
        }
        Ok(Value::Object(out))
    };
    let result = run();
    let _ = client(&t, "quit", 1, 0, Duration::ZERO);
    // The guest resets once its server quits; never wait forever for it.
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = vmm.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = vmm.kill();
            let _ = vmm.wait();
            bail!("husk did not exit after the guest server was told to quit");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let results = result?;
    if !status.success() {
        bail!("husk exited with {status}");
    }
    // The same streams over a plain unix socket on this machine: what the
    // copies cost without a VM in between.
    let path = std::env::current_dir()?.join("husk-vsock-baseline.sock");
    let listen = format!("unix:{}", path.display());
    std::thread::spawn(move || serve(&listen));
    let base = Target::Unix(path.clone());
    let mut baseline = serde_json::Map::new();
    for (name, mode) in [("upload", "upload"), ("download", "download")] {
        for n in [1usize, streams] {
            let r = client(&base, mode, n, size_mib << 20, Duration::from_secs(10))?;
            baseline.insert(format!("{name}_{n}_streams_mib_s"), r["mib_s"].clone());
        }
    }
    let _ = std::fs::remove_file(&path);
    Ok(json!({
        "benchmark": "virtio-vsock",
        "size_mib_per_run": size_mib,
        "streams": [1, streams],
        "results": results,
        "node_unix_socket_baseline": baseline,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_ignores_chunking() {
        let mut data = vec![0u8; 1000];
        fill(7, 0, &mut data);
        let mut a = Checksum::default();
        a.update(&data);
        let mut b = Checksum::default();
        for c in data.chunks(3) {
            b.update(c);
        }
        assert_eq!(a.finish(), b.finish());
        assert_eq!(a.finish(), expected_checksum(7, 1000));
        data[500] ^= 1;
        let mut c = Checksum::default();
        c.update(&data);
        assert_ne!(a.finish(), c.finish());
    }

    #[test]
    fn streams_through_a_connect_handshake() {
        let dir = std::env::temp_dir().join(format!("husk-bench-vs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        let l = UnixListener::bind(&path).unwrap();
        // A stand-in for husk's muxer: answers the CONNECT line, then serves.
        std::thread::spawn(move || {
            for s in l.incoming() {
                let mut s = s.unwrap();
                std::thread::spawn(move || {
                    let mut line = [0u8; 10];
                    s.read_exact(&mut line).unwrap();
                    assert_eq!(&line, b"CONNECT 9\n");
                    s.write_all(b"OK 1073741824\n").unwrap();
                    serve_one(Sock::from_fd(OwnedFd::from(s))).unwrap();
                });
            }
        });
        let t = Target::Uds(path, 9);
        for mode in ["echo", "upload", "download"] {
            let r = client(&t, mode, 3, 3 << 20, Duration::from_secs(5)).unwrap();
            assert_eq!(r["checksums_equal"], json!(true), "{r}");
            assert_eq!(r["bytes"], json!(3 << 20));
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
