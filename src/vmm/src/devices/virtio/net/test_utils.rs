//! A socket-pair backend for tests and fuzzing: what the device writes, the
//! peer reads as one datagram per frame, and the other way round. It stands
//! in for a tap, down to reading: a frame longer than the buffer is cut, and
//! its whole length reported.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use super::Backend;

/// The device's end of a datagram socket pair.
pub struct SocketBackend {
    sock: UnixDatagram,
    /// The last TUN_F_* flags set.
    pub offloads: Arc<AtomicU32>,
    /// Makes every read and write fail with EBADFD, as a deleted tap does.
    pub broken: Arc<AtomicBool>,
    /// Refuse offloads, as a tap without IFF_VNET_HDR support would.
    pub refuse_offloads: bool,
}

impl SocketBackend {
    /// A backend and the peer socket a test talks to (both nonblocking).
    pub fn pair() -> std::io::Result<(SocketBackend, UnixDatagram)> {
        let (a, b) = UnixDatagram::pair()?;
        a.set_nonblocking(true)?;
        b.set_nonblocking(true)?;
        Ok((
            SocketBackend {
                sock: a,
                offloads: Arc::default(),
                broken: Arc::default(),
                refuse_offloads: false,
            },
            b,
        ))
    }

    fn check(&self) -> std::io::Result<()> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(std::io::Error::from_raw_os_error(libc::EBADFD));
        }
        Ok(())
    }
}

impl AsRawFd for SocketBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl Backend for SocketBackend {
    /// Like a tap, reports a frame's whole length even when only the part
    /// that fits `buf` was copied (MSG_TRUNC).
    fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.check()?;
        // SAFETY: `buf` is valid for writes of its length, which is what
        // the kernel is told; the socket is ours.
        let n = unsafe {
            libc::recv(
                self.sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_TRUNC,
            )
        };
        usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
    }

    fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize> {
        self.check()?;
        self.sock.send(frame)
    }

    fn set_offload(&mut self, tun_flags: u32) -> std::io::Result<()> {
        if self.refuse_offloads {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.offloads.store(tun_flags, Ordering::SeqCst);
        Ok(())
    }
}
