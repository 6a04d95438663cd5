//! `kubectl port-forward` to a pod in a microVM. containerd serves CRI's
//! PortForward by dialling `localhost:PORT` inside the pod's network
//! namespace on the node; under husk nothing of the pod listens there (its
//! containers run in the guest). So the shim owns one listening socket in
//! that namespace and a BPF `sk_lookup` program attached to the namespace
//! steers every TCP connection to 127.0.0.1, whatever its port, to that
//! socket. The connection keeps its destination, so the accepted socket's
//! local port is the port asked for; each connection is then carried over
//! a vsock stream to the agent (a `PortForward` channel), which connects
//! to localhost:PORT in the guest, where the pod's containers listen
//! (127.0.0.1, then ::1: containerd's own dial for a runc pod falls back
//! to IPv6, and here the dial that could fail is the agent's).
//! Nothing is installed on the node (no iptables rule, no conntrack
//! entry), and nothing runs while no one forwards. A port nothing listens
//! on in the guest gets its connection reset.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use husk_protocol::client::Endpoint;
use husk_protocol::Channel;

use crate::error::Chain;

/// How long opening the agent's end of one forwarded connection may take.
const OPEN_LIMIT: Duration = Duration::from_secs(10);

/// Why port forwarding could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// A system call failed.
    #[error("cannot {what}")]
    Sys {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel refused the BPF program (its verifier's log follows).
    #[error("the kernel refused the sk_lookup program: {log}")]
    Verifier {
        /// Why.
        #[source]
        source: std::io::Error,
        /// The verifier's log.
        log: String,
    },
}

fn sys(what: &'static str) -> impl FnOnce(std::io::Error) -> ForwardError {
    move |source| ForwardError::Sys { what, source }
}

/// bpf(2) commands, program and map types (linux/bpf.h).
mod abi {
    pub const MAP_CREATE: libc::c_int = 0;
    pub const MAP_UPDATE_ELEM: libc::c_int = 2;
    pub const PROG_LOAD: libc::c_int = 5;
    pub const LINK_CREATE: libc::c_int = 28;
    pub const MAP_TYPE_SOCKMAP: u32 = 15;
    pub const PROG_TYPE_SK_LOOKUP: u32 = 30;
    pub const ATTACH_SK_LOOKUP: u32 = 36;
    /// `ld_imm64`'s source register naming a map by its fd.
    pub const PSEUDO_MAP_FD: u8 = 1;
    pub const FUNC_MAP_LOOKUP_ELEM: i32 = 1;
    pub const FUNC_SK_RELEASE: i32 = 86;
    pub const FUNC_SK_ASSIGN: i32 = 124;
    /// `struct bpf_sk_lookup`'s fields the program reads.
    pub const CTX_PROTOCOL: i16 = 12;
    pub const CTX_LOCAL_IP4: i16 = 40;
    pub const SK_PASS: i32 = 1;

    #[repr(C)]
    #[derive(Default)]
    pub struct MapCreate {
        pub map_type: u32,
        pub key_size: u32,
        pub value_size: u32,
        pub max_entries: u32,
        pub map_flags: u32,
    }

    #[repr(C)]
    #[derive(Default)]
    pub struct MapUpdate {
        pub map_fd: u32,
        pub _pad: u32,
        pub key: u64,
        pub value: u64,
        pub flags: u64,
    }

    #[repr(C)]
    #[derive(Default)]
    pub struct ProgLoad {
        pub prog_type: u32,
        pub insn_cnt: u32,
        pub insns: u64,
        pub license: u64,
        pub log_level: u32,
        pub log_size: u32,
        pub log_buf: u64,
        pub kern_version: u32,
        pub prog_flags: u32,
        pub prog_name: [u8; 16],
        pub prog_ifindex: u32,
        pub expected_attach_type: u32,
    }

    #[repr(C)]
    #[derive(Default)]
    pub struct LinkCreate {
        pub prog_fd: u32,
        pub target_fd: u32,
        pub attach_type: u32,
        pub flags: u32,
    }

    /// One instruction.
    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct Insn {
        pub code: u8,
        pub regs: u8,
        pub off: i16,
        pub imm: i32,
    }
}

use abi::Insn;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | (dst & 0xf),
        off,
        imm,
    }
}

/// The program: a TCP connection to 127.0.0.1 goes to the socket in slot
/// 0 of `map_fd`; everything else is looked up as usual.
///
/// ```text
///  0  r6 = r1                        ctx
///  1  r2 = *(u32 *)(r6 + protocol)
///  2  if r2 != IPPROTO_TCP goto 19
///  3  r2 = *(u32 *)(r6 + local_ip4)
///  4  if r2 != 127.0.0.1 goto 19     (network order, read little-endian)
///  5  *(u32 *)(r10 - 4) = 0          the key
///  6  r1 = map                       (two slots)
///  8  r2 = r10
///  9  r2 += -4
/// 10  r0 = map_lookup_elem(r1, r2)
/// 11  if r0 == 0 goto 19
/// 12  r7 = r0
/// 13  r1 = r6
/// 14  r2 = r7
/// 15  r3 = 0
/// 16  sk_assign(r1, r2, r3)
/// 17  r1 = r7
/// 18  sk_release(r1)
/// 19  r0 = SK_PASS
/// 20  exit
/// ```
fn program(map_fd: RawFd) -> Vec<Insn> {
    use abi::*;
    let localhost = i32::from_le_bytes([127, 0, 0, 1]);
    vec![
        insn(0xbf, 6, 1, 0, 0),
        insn(0x61, 2, 6, CTX_PROTOCOL, 0),
        insn(0x55, 2, 0, 16, libc::IPPROTO_TCP),
        insn(0x61, 2, 6, CTX_LOCAL_IP4, 0),
        insn(0x55, 2, 0, 14, localhost),
        insn(0x62, 10, 0, -4, 0),
        insn(0x18, 1, PSEUDO_MAP_FD, 0, map_fd),
        insn(0, 0, 0, 0, 0),
        insn(0xbf, 2, 10, 0, 0),
        insn(0x07, 2, 0, 0, -4),
        insn(0x85, 0, 0, 0, FUNC_MAP_LOOKUP_ELEM),
        insn(0x15, 0, 0, 7, 0),
        insn(0xbf, 7, 0, 0, 0),
        insn(0xbf, 1, 6, 0, 0),
        insn(0xbf, 2, 7, 0, 0),
        insn(0xb7, 3, 0, 0, 0),
        insn(0x85, 0, 0, 0, FUNC_SK_ASSIGN),
        insn(0xbf, 1, 7, 0, 0),
        insn(0x85, 0, 0, 0, FUNC_SK_RELEASE),
        insn(0xb7, 0, 0, 0, SK_PASS),
        insn(0x95, 0, 0, 0, 0),
    ]
}

/// bpf(2); a new descriptor, or `what` failed.
fn bpf<T>(cmd: libc::c_int, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a repr(C) prefix of the kernel's `union bpf_attr`
    // for `cmd`, of the size passed; the pointers in it outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            (attr as *mut T).cast::<libc::c_void>(),
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: bpf(2) just returned this new descriptor; nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
}

/// Loads the program steering 127.0.0.1 to `listener` and attaches it to
/// the network namespace `netns`; the link lives as long as its fd.
fn steer(netns: &File, listener: &TcpListener) -> Result<OwnedFd, ForwardError> {
    let mut create = abi::MapCreate {
        map_type: abi::MAP_TYPE_SOCKMAP,
        key_size: 4,
        value_size: 8,
        max_entries: 1,
        map_flags: 0,
    };
    let map = owned(bpf(abi::MAP_CREATE, &mut create).map_err(sys("create the socket map"))?);
    let key = 0u32;
    let value = listener.as_raw_fd() as u64;
    let mut update = abi::MapUpdate {
        map_fd: map.as_raw_fd() as u32,
        key: &key as *const u32 as u64,
        value: &value as *const u64 as u64,
        ..Default::default()
    };
    bpf(abi::MAP_UPDATE_ELEM, &mut update).map_err(sys("put the listener in the socket map"))?;
    let insns = program(map.as_raw_fd());
    let license = c"Apache-2.0";
    let mut log = vec![0u8; 64 << 10];
    let mut load = abi::ProgLoad {
        prog_type: abi::PROG_TYPE_SK_LOOKUP,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        expected_attach_type: abi::ATTACH_SK_LOOKUP,
        ..Default::default()
    };
    load.prog_name[..12].copy_from_slice(b"husk_forward");
    let prog = match bpf(abi::PROG_LOAD, &mut load) {
        Ok(fd) => owned(fd),
        Err(source) => {
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            return Err(ForwardError::Verifier {
                source,
                log: String::from_utf8_lossy(&log[..end]).trim().to_string(),
            });
        }
    };
    let mut link = abi::LinkCreate {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: netns.as_raw_fd() as u32,
        attach_type: abi::ATTACH_SK_LOOKUP,
        flags: 0,
    };
    let link = bpf(abi::LINK_CREATE, &mut link).map_err(sys(
        "attach the sk_lookup program to the pod's network namespace",
    ))?;
    // The map and the program stay alive through the link.
    Ok(owned(link))
}

/// A listening socket made in the network namespace `netns` (on a thread
/// that enters it, so the shim's own threads stay where they are), bound
/// to 127.0.0.1 on a port of the kernel's choice.
fn listen_in(netns: &File) -> Result<TcpListener, ForwardError> {
    let ns = netns
        .try_clone()
        .map_err(sys("duplicate the namespace's fd"))?;
    let made = std::thread::Builder::new()
        .name("shim-netns".into())
        .spawn(move || {
            // SAFETY: setns(2) on a namespace fd we own; it moves only
            // this thread, which ends right after.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            TcpListener::bind("127.0.0.1:0")
        })
        .map_err(sys("start a thread"))?;
    made.join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the thread panicked")))
        .map_err(sys("listen in the pod's network namespace"))
}

/// Port forwarding into one pod's VM, until dropped.
pub struct PortForward {
    listener: Arc<TcpListener>,
    stop: Arc<AtomicBool>,
    /// The BPF link: closing it detaches the program.
    _link: OwnedFd,
}

impl PortForward {
    /// Sets up forwarding from the pod's network namespace `netns` into
    /// the guest whose agent is at `agent`.
    pub fn start(netns: &Path, agent: Endpoint) -> Result<PortForward, ForwardError> {
        let ns = File::open(netns).map_err(sys("open the pod's network namespace"))?;
        let listener = Arc::new(listen_in(&ns)?);
        let link = steer(&ns, &listener)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s) = (listener.clone(), stop.clone());
        std::thread::Builder::new()
            .name("shim-port-forward".into())
            .spawn(move || accept_loop(&l, &s, &agent))
            .map_err(sys("start the port-forward thread"))?;
        Ok(PortForward {
            listener,
            stop,
            _link: link,
        })
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept.
        // SAFETY: shutdown(2) on the listener's descriptor, still open.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

fn accept_loop(listener: &TcpListener, stop: &AtomicBool, agent: &Endpoint) {
    loop {
        let conn = listener.accept();
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let conn = match conn {
            Ok((c, _)) => c,
            Err(e) => {
                tracing::warn!(error = %e, "port forwarding: accept failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let agent = agent.clone();
        let spawned = std::thread::Builder::new()
            .name("shim-forward".into())
            .spawn(move || forward(conn, &agent));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "port forwarding: no thread for a connection");
        }
    }
}

/// Carries one connection into the guest.
fn forward(conn: TcpStream, agent: &Endpoint) {
    let port = match conn.local_addr() {
        Ok(a) => a.port(),
        Err(_) => return,
    };
    let guest = match agent.open_within(Channel::PortForward { port }, OPEN_LIMIT) {
        Ok(g) => g,
        Err(e) => {
            tracing::info!(port, error = %Chain(&e), "port forwarding: the guest refused the connection");
            reset(&conn);
            return;
        }
    };
    tracing::debug!(port, "port forwarding: connection open");
    join(conn, guest);
}

/// Closes `conn` with a reset, as a port nothing listens on answers.
fn reset(conn: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: SO_LINGER reads a linger struct of the size passed, which
    // outlives the call; the socket closes when `conn` drops.
    unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

/// Copies `from` into `to` until `from` ends.
fn pump(mut from: impl Read, mut to: impl Write) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

/// Joins the node's connection and the guest's until both ways ended;
/// end of file one way half-closes the other.
fn join(conn: TcpStream, guest: UnixStream) {
    let (Ok(conn_in), Ok(guest_out)) = (conn.try_clone(), guest.try_clone()) else {
        return;
    };
    let upstream = std::thread::Builder::new()
        .name("shim-forward-up".into())
        .spawn(move || {
            pump(&conn_in, &guest_out);
            let _ = guest_out.shutdown(Shutdown::Write);
        });
    pump(&guest, &conn);
    let _ = conn.shutdown(Shutdown::Write);
    if let Ok(t) = upstream {
        let _ = t.join();
    }
    let _ = conn.shutdown(Shutdown::Both);
    let _ = guest.shutdown(Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_jumps_land_on_the_pass() {
        let p = program(3);
        assert_eq!(p.len(), 21);
        let pass = p.len() - 2;
        for (i, ins) in p.iter().enumerate() {
            if matches!(ins.code, 0x55 | 0x15) {
                assert_eq!(i as i64 + 1 + i64::from(ins.off), pass as i64, "insn {i}");
            }
        }
        assert_eq!((p[pass].code, p[pass].imm), (0xb7, abi::SK_PASS));
        assert_eq!(p[pass + 1].code, 0x95);
        assert_eq!(
            p[4].imm.to_le_bytes(),
            [127, 0, 0, 1],
            "127.0.0.1 in network order"
        );
        assert_eq!(std::mem::size_of::<Insn>(), 8);
        assert_eq!(std::mem::size_of::<abi::ProgLoad>(), 72);
        assert_eq!(std::mem::size_of::<abi::MapUpdate>(), 32);
    }

    /// The steering in a network namespace of its own: a connection to
    /// any port of 127.0.0.1 there reaches the listener, keeping its port.
    /// It needs root (a new namespace, bpf(2)); without it, it says so and
    /// passes.
    #[test]
    fn connections_to_any_loopback_port_reach_the_listener_with_their_port() {
        // SAFETY: geteuid(2) takes nothing and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        std::thread::spawn(|| {
            // SAFETY: unshare(2) moves only this thread, which ends here.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            let st = std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status()
                .unwrap();
            assert!(st.success());
            let ns = File::open("/proc/thread-self/ns/net").unwrap();
            let listener = listen_in(&ns).unwrap();
            let _link = steer(&ns, &listener).unwrap();
            for port in [1u16, 8080, 65535] {
                let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
                let (mut accepted, _) = listener.accept().unwrap();
                assert_eq!(accepted.local_addr().unwrap().port(), port);
                c.write_all(b"x").unwrap();
                let mut b = [0u8; 1];
                accepted.read_exact(&mut b).unwrap();
            }
            // Other addresses are left alone: nothing listens there.
            assert!(TcpStream::connect(("127.0.0.2", 8080)).is_err());
        })
        .join()
        .unwrap();
    }
}
