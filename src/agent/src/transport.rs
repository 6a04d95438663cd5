//! Where the host reaches the agent: a vsock listener in the guest
//! (AF_VSOCK, any CID, the agent port), or a unix socket for host-side tests.
//! Connections are plain byte streams either way, behind [`Stream`], which
//! is also the seam the server's unit tests use ([`fake`]).

use std::fs::File;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

#[cfg(test)]
pub mod fake;

/// A connection from the host.
pub trait Stream: Read + Write + Send {
    /// A second handle on the same connection (for a writer thread).
    fn try_clone_stream(&self) -> std::io::Result<Box<dyn Stream>>;

    /// Bounds how long a write may wait for the host to read (the
    /// connection's every handle: it is a property of the socket).
    fn set_write_timeout(&self, timeout: Duration) -> std::io::Result<()>;

    /// Shuts the connection down both ways, for every handle on it: the
    /// host reads end of file, and a read blocked here returns 0.
    fn shutdown(&self) -> std::io::Result<()>;

    /// Shuts the writing side down: the host reads end of file, and can
    /// still send. (A stream that cannot shuts down both ways.)
    fn shutdown_write(&self) -> std::io::Result<()> {
        self.shutdown()
    }
}

impl Stream for UnixStream {
    fn try_clone_stream(&self) -> std::io::Result<Box<dyn Stream>> {
        Ok(Box::new(self.try_clone()?))
    }

    fn set_write_timeout(&self, timeout: Duration) -> std::io::Result<()> {
        UnixStream::set_write_timeout(self, Some(timeout))
    }

    fn shutdown(&self) -> std::io::Result<()> {
        UnixStream::shutdown(self, Shutdown::Both)
    }

    fn shutdown_write(&self) -> std::io::Result<()> {
        UnixStream::shutdown(self, Shutdown::Write)
    }
}

/// A connected vsock socket (read/write are the plain syscalls).
pub struct VsockStream(File);

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for VsockStream {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl Stream for VsockStream {
    fn try_clone_stream(&self) -> std::io::Result<Box<dyn Stream>> {
        Ok(Box::new(VsockStream(self.0.try_clone()?)))
    }

    fn set_write_timeout(&self, timeout: Duration) -> std::io::Result<()> {
        let tv = libc::timeval {
            tv_sec: timeout.as_secs().try_into().unwrap_or(libc::time_t::MAX),
            tv_usec: timeout.subsec_micros().into(),
        };
        // SAFETY: SO_SNDTIMEO on our socket reads a timeval of the size
        // passed, which outlives the call.
        let rc = unsafe {
            libc::setsockopt(
                self.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn shutdown(&self) -> std::io::Result<()> {
        // SAFETY: shutdown(2) on our socket; it touches no memory.
        if unsafe { libc::shutdown(self.as_raw_fd(), libc::SHUT_RDWR) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn shutdown_write(&self) -> std::io::Result<()> {
        // SAFETY: shutdown(2) on our socket; it touches no memory.
        if unsafe { libc::shutdown(self.as_raw_fd(), libc::SHUT_WR) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Listens for the host.
pub enum Listener {
    /// Host-side tests.
    Unix(UnixListener),
    /// In the guest.
    Vsock(OwnedFd),
}

impl Listener {
    /// A unix socket listener at `path` (an old socket file is replaced).
    pub fn unix(path: &Path) -> std::io::Result<Self> {
        let _ = std::fs::remove_file(path);
        Ok(Listener::Unix(UnixListener::bind(path)?))
    }

    /// A vsock listener on `port`, any local CID.
    pub fn vsock(port: u32) -> std::io::Result<Self> {
        // SAFETY: socket(2) with constant arguments; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_vm is plain data; all-zero is a valid start.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        addr.svm_port = port;
        // SAFETY: `addr` is a valid sockaddr_vm of the size passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: listen(2) on the socket owned above.
        if unsafe { libc::listen(fd.as_raw_fd(), 64) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Listener::Vsock(fd))
    }

    /// The next connection.
    pub fn accept(&self) -> std::io::Result<Box<dyn Stream>> {
        match self {
            Listener::Unix(l) => Ok(Box::new(l.accept()?.0)),
            Listener::Vsock(fd) => loop {
                // SAFETY: accept4(2) on our listening socket; no address wanted.
                let c = unsafe {
                    libc::accept4(
                        fd.as_raw_fd(),
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_CLOEXEC,
                    )
                };
                if c >= 0 {
                    // SAFETY: accept4 returned a new fd nothing else owns.
                    return Ok(Box::new(VsockStream(unsafe { File::from_raw_fd(c) })));
                }
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            },
        }
    }
}
