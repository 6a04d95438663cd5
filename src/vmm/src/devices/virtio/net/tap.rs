//! A host tap interface as a virtio-net [`Backend`].
//!
//! The VMM attaches to a tap that already exists (created and configured by
//! whoever runs it, e.g. `ip tuntap add tap0 mode tap`), the way Firecracker's
//! `host_dev_name` works: /dev/net/tun, TUNSETIFF with IFF_TAP | IFF_NO_PI |
//! IFF_VNET_HDR, a 12-byte virtio_net_hdr_v1 per frame (TUNSETVNETHDRSZ), and
//! the offloads the guest negotiated (TUNSETOFFLOAD). The fd is nonblocking.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::{Backend, VNET_HDR_LEN};

/// Longest interface name, NUL excluded (IFNAMSIZ - 1).
const MAX_NAME_LEN: usize = 15;

/// Why a tap could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name is empty, too long or has a NUL, '/' or whitespace.
    #[error("invalid tap name {0:?}: 1 to 15 characters, no '/', whitespace or NUL")]
    InvalidName(String),
    /// No interface of that name exists on the host.
    #[error("tap {0} does not exist (create it first, e.g. `ip tuntap add {0} mode tap`)")]
    NotFound(String),
    /// /dev/net/tun cannot be opened.
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] std::io::Error),
    /// An ioctl on the tap failed.
    #[error("tap {name}: {what} failed")]
    Ioctl {
        /// The interface.
        name: String,
        /// Which ioctl.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

/// An open tap interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// struct ifreq as TUNSETIFF reads it: the name, then the flags.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn check_name(name: &str) -> Result<CString, TapError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.contains(['/', '\0'])
        && !name.chars().any(char::is_whitespace);
    if !ok {
        return Err(TapError::InvalidName(name.to_string()));
    }
    CString::new(name).map_err(|_| TapError::InvalidName(name.to_string()))
}

impl Tap {
    /// Attaches to the existing tap `name`, with virtio-net headers and no
    /// offloads yet (see [`Backend::set_offload`]).
    pub fn open(name: &str) -> Result<Tap, TapError> {
        let c_name = check_name(name)?;
        // SAFETY: `c_name` is a valid NUL-terminated string.
        if unsafe { libc::if_nametoindex(c_name.as_ptr()) } == 0 {
            return Err(TapError::NotFound(name.to_string()));
        }
        let tap = Self::attach(name)?;
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        tap.ioctl_ptr(libc::TUNSETVNETHDRSZ, &hdr_len, "TUNSETVNETHDRSZ")?;
        tap.ioctl_val(libc::TUNSETOFFLOAD, 0, "TUNSETOFFLOAD")?;
        Ok(tap)
    }

    /// Creates the tap `name` (or attaches to it) and makes it outlive this
    /// process, for test and benchmark set-up where `ip tuntap` is missing.
    /// Needs CAP_NET_ADMIN.
    pub fn create_persistent(name: &str) -> Result<Tap, TapError> {
        check_name(name)?;
        let tap = Self::attach(name)?;
        tap.set_persistent(true)?;
        Ok(tap)
    }

    /// Whether the interface outlives the last fd attached to it; turning it
    /// off on a persistent tap deletes the interface when this fd closes.
    pub fn set_persistent(&self, on: bool) -> Result<(), TapError> {
        self.ioctl_val(
            libc::TUNSETPERSIST,
            libc::c_ulong::from(on),
            "TUNSETPERSIST",
        )
    }

    /// TUNSETIFF: creates the interface if it does not exist.
    fn attach(name: &str) -> Result<Tap, TapError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq {
            name: [0; 16],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        let tap = Tap {
            file,
            name: name.to_string(),
        };
        tap.ioctl_ptr(libc::TUNSETIFF, &req, "TUNSETIFF")?;
        Ok(tap)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn ioctl_ptr<T>(&self, req: libc::Ioctl, arg: &T, what: &'static str) -> Result<(), TapError> {
        // SAFETY: the fd is a tun fd we own; `arg` points to a live value of
        // the type this tun ioctl reads, and the kernel only reads it.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), req, arg as *const T) };
        self.check(r, what)
    }

    fn ioctl_val(
        &self,
        req: libc::Ioctl,
        arg: libc::c_ulong,
        what: &'static str,
    ) -> Result<(), TapError> {
        // SAFETY: the fd is a tun fd we own; these tun ioctls take an integer
        // argument by value, no memory is passed.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), req, arg) };
        self.check(r, what)
    }

    fn check(&self, r: libc::c_int, what: &'static str) -> Result<(), TapError> {
        if r < 0 {
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                what,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl Backend for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize> {
        self.file.write(frame)
    }

    fn set_offload(&mut self, tun_flags: u32) -> std::io::Result<()> {
        self.ioctl_val(
            libc::TUNSETOFFLOAD,
            libc::c_ulong::from(tun_flags),
            "TUNSETOFFLOAD",
        )
        .map_err(|e| match e {
            TapError::Ioctl { source, .. } => source,
            other => std::io::Error::other(other.to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::net::device::tests::{activate, RXQ, TXQ};
    use crate::devices::virtio::net::device::{Net, RxOutcome};
    use crate::devices::virtio::test_utils::{d, mem, WRITE};
    use std::process::Command;
    use std::time::{Duration, Instant};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    /// Real taps need /dev/net/tun, root and iproute2: the tests that make
    /// them are #[ignore]d for plain users and fail loudly when run without.
    fn require_taps() {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        assert!(
            root && std::path::Path::new("/dev/net/tun").exists()
                && Command::new("ip").arg("-V").output().is_ok(),
            "this test needs root, /dev/net/tun and iproute2's ip"
        );
    }

    /// A persistent tap, deleted when dropped.
    struct TestTap(String);

    impl TestTap {
        fn new(tag: &str) -> TestTap {
            let name = format!("hk{tag}{}", std::process::id() % 100_000);
            Tap::create_persistent(&name).unwrap();
            TestTap(name)
        }
        fn ip(&self, args: &[&str]) {
            let ok = Command::new("ip").args(args).status().unwrap().success();
            assert!(ok, "ip {args:?}");
        }
    }

    impl Drop for TestTap {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["link", "del", &self.0]).status();
        }
    }

    /// An AF_PACKET socket on one interface: sees what the tap hands the
    /// host stack and injects frames the stack sends out through the tap.
    struct PacketSocket {
        fd: std::os::fd::OwnedFd,
        ifindex: i32,
    }

    impl PacketSocket {
        fn new(name: &str) -> PacketSocket {
            use std::os::fd::FromRawFd;
            let c = CString::new(name).unwrap();
            // SAFETY: valid NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) } as i32;
            assert!(ifindex > 0);
            let proto = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: plain socket(2) call; the fd is owned below.
            let raw = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_NONBLOCK,
                    i32::from(proto),
                )
            };
            assert!(raw >= 0, "{}", std::io::Error::last_os_error());
            // SAFETY: `raw` is a fresh fd nobody else owns.
            let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
            let s = PacketSocket { fd, ifindex };
            let addr = s.addr(proto);
            // SAFETY: `addr` is a valid sockaddr_ll of the size passed.
            let r = unsafe {
                libc::bind(
                    s.fd.as_raw_fd(),
                    &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
            s
        }

        fn addr(&self, proto: u16) -> libc::sockaddr_ll {
            // SAFETY: sockaddr_ll is plain data; all-zero is valid.
            let mut a: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            a.sll_family = libc::AF_PACKET as u16;
            a.sll_protocol = proto;
            a.sll_ifindex = self.ifindex;
            a
        }

        fn send(&self, frame: &[u8]) {
            let addr = self.addr((libc::ETH_P_ALL as u16).to_be());
            // SAFETY: `frame` and `addr` are valid for the lengths passed.
            let n = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(
                n,
                frame.len() as isize,
                "{}",
                std::io::Error::last_os_error()
            );
        }

        /// The first frame with ethertype `ethertype` within a second.
        fn recv(&self, ethertype: u16) -> Option<Vec<u8>> {
            let deadline = Instant::now() + Duration::from_secs(1);
            let mut buf = vec![0u8; 2048];
            while Instant::now() < deadline {
                // SAFETY: `buf` is valid for its length.
                let n = unsafe {
                    libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
                };
                if n >= 14 && buf[12..14] == ethertype.to_be_bytes() {
                    return Some(buf[..n as usize].to_vec());
                }
                if n < 0 {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            None
        }
    }

    fn eth_frame(ethertype: u16, len: usize) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&[2, 0, 0, 0, 0, 0x42]);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend((0..len).map(|i| i as u8));
        f
    }

    #[test]
    fn bad_and_missing_taps_are_clear_errors() {
        for bad in ["", "0123456789abcdef", "a/b", "a b"] {
            assert!(
                matches!(Tap::open(bad), Err(TapError::InvalidName(_))),
                "{bad:?}"
            );
        }
        let err = Tap::open("husknosuchtap").unwrap_err();
        assert!(matches!(err, TapError::NotFound(_)));
        assert!(
            err.to_string().contains("tap husknosuchtap does not exist"),
            "{err}"
        );
    }

    #[test]
    #[ignore = "needs root, /dev/net/tun and iproute2"]
    fn frames_cross_a_real_tap_both_ways_until_it_is_deleted() {
        require_taps();
        let t = TestTap::new("x");
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", t.0), "1");
        t.ip(&["link", "set", &t.0, "up"]);
        let mut tap = Tap::open(&t.0).unwrap();
        assert_eq!(tap.name(), t.0);
        tap.set_offload(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6)
            .unwrap();
        let mut net = Net::with_backend("eth0".into(), None, Box::new(tap)).unwrap();
        let packets = PacketSocket::new(&t.0);

        let m = mem();
        let rxq = MockSplitQueue::create(&m, GuestAddress(RXQ), 16);
        let txq = MockSplitQueue::create(&m, GuestAddress(TXQ), 16);
        // Guest -> host: header + frame in one descriptor.
        let out = eth_frame(0x88b5, 200);
        let mut with_hdr = vec![0u8; 12];
        with_hdr.extend_from_slice(&out);
        m.write_slice(&with_hdr, GuestAddress(0x10_0000)).unwrap();
        txq.add_desc_chains(&[d(0x10_0000, with_hdr.len() as u32, 0, 0)], 0)
            .unwrap();
        rxq.add_desc_chains(&[d(0x20_0000, 4096, WRITE, 0)], 0)
            .unwrap();
        activate(&mut net, &m, &rxq, &txq, 0);
        assert!(net.process_tx());
        assert_eq!(packets.recv(0x88b5), Some(out));

        // Host -> guest.
        let inbound = eth_frame(0x88b6, 300);
        packets.send(&inbound);
        let deadline = Instant::now() + Duration::from_secs(2);
        while rxq.used().idx().load() == 0 && Instant::now() < deadline {
            assert_eq!(net.process_rx(), RxOutcome::Drained);
            std::thread::sleep(Duration::from_millis(5));
        }
        let used = rxq.used().ring().ref_at(0).unwrap().load();
        assert_eq!(used.len() as usize, 12 + inbound.len());
        let mut got = vec![0u8; inbound.len()];
        m.read_slice(&mut got, GuestAddress(0x20_000c)).unwrap();
        assert_eq!(got, inbound);

        // The tap goes away under the device: one error, then silence.
        t.ip(&["link", "del", &t.0]);
        assert_eq!(net.process_rx(), RxOutcome::BackendGone);
        assert!(net.backend_gone());
    }
}
