//! A process's standard streams: three pipes, or one pseudo-terminal for
//! `terminal: true`. The agent keeps its ends until the host attaches a
//! Stdio channel for (container, exec, stream); the connection's thread
//! then copies bytes until either side closes. Output written before the
//! host attaches waits in the pipe. The host half-closing its stdin
//! connection, or CloseStdin, closes the pipe: EOF for the process.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use husk_protocol::{AgentError, ErrorCode, StdioStream};

use super::process::ChildStdio;
use crate::transport::Stream;

/// The agent's ends of one process's streams.
pub struct ProcStdio {
    stdin: Arc<Mutex<Option<File>>>,
    stdout: Mutex<Option<File>>,
    stderr: Mutex<Option<File>>,
    tty: Mutex<Option<File>>,
    /// A second handle on the terminal, for resizing.
    tty_ctl: Option<File>,
}

fn sys(what: &str) -> AgentError {
    crate::error::reply(ErrorCode::System, what, &std::io::Error::last_os_error())
}

fn pipe() -> Result<(File, File), AgentError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(sys("pipe"));
    }
    // SAFETY: fresh fds nothing else owns.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ProcStdio {
    /// New streams; the second value goes to the child.
    pub fn new(terminal: bool) -> Result<(ProcStdio, ChildStdio), AgentError> {
        if terminal {
            let (mut master, mut slave) = (0, 0);
            // SAFETY: openpty writes two fds; no name, termios or size.
            let rc = unsafe {
                libc::openpty(
                    &mut master,
                    &mut slave,
                    std::ptr::null_mut(),
                    std::ptr::null(),
                    std::ptr::null(),
                )
            };
            if rc < 0 {
                return Err(sys("openpty"));
            }
            for fd in [master, slave] {
                // SAFETY: fcntl on fds openpty just returned.
                unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            }
            // SAFETY: fresh fds nothing else owns.
            let (master, slave) =
                unsafe { (File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
            let ctl = master.try_clone().map_err(|_| sys("dup"))?;
            let mut name = [0u8; 64];
            // SAFETY: ptsname_r writes a NUL-terminated name into the buffer.
            if unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr().cast(), name.len()) }
                != 0
            {
                return Err(sys("ptsname"));
            }
            let name = std::ffi::CStr::from_bytes_until_nul(&name)
                .map_err(|_| sys("ptsname"))?
                .to_owned();
            Ok((
                ProcStdio {
                    stdin: Arc::new(Mutex::new(None)),
                    stdout: Mutex::new(None),
                    stderr: Mutex::new(None),
                    tty: Mutex::new(Some(master)),
                    tty_ctl: Some(ctl),
                },
                ChildStdio::Tty(slave, name),
            ))
        } else {
            let (in_r, in_w) = pipe()?;
            let (out_r, out_w) = pipe()?;
            let (err_r, err_w) = pipe()?;
            Ok((
                ProcStdio {
                    stdin: Arc::new(Mutex::new(Some(in_w))),
                    stdout: Mutex::new(Some(out_r)),
                    stderr: Mutex::new(Some(err_r)),
                    tty: Mutex::new(None),
                    tty_ctl: None,
                },
                ChildStdio::Pipes(in_r.into(), out_w.into(), err_w.into()),
            ))
        }
    }

    /// Takes the stream for a host connection.
    pub fn attach(&self, stream: StdioStream) -> Result<Attachment, AgentError> {
        let taken = || {
            AgentError::new(
                ErrorCode::FailedPrecondition,
                format!(
                    "{stream:?} is already attached, closed, or not this process's kind of stdio"
                ),
            )
        };
        match stream {
            StdioStream::Stdin => {
                if lock(&self.stdin).is_none() {
                    return Err(taken());
                }
                Ok(Attachment::In(self.stdin.clone()))
            }
            StdioStream::Stdout => lock(&self.stdout)
                .take()
                .map(Attachment::Out)
                .ok_or_else(taken),
            StdioStream::Stderr => lock(&self.stderr)
                .take()
                .map(Attachment::Out)
                .ok_or_else(taken),
            StdioStream::Tty => lock(&self.tty)
                .take()
                .map(Attachment::Tty)
                .ok_or_else(taken),
        }
    }

    /// Closes stdin (EOF for the process).
    pub fn close_stdin(&self) {
        lock(&self.stdin).take();
    }

    /// Sets the terminal's size.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), AgentError> {
        let Some(ctl) = &self.tty_ctl else {
            return Err(AgentError::new(
                ErrorCode::FailedPrecondition,
                "the process has no terminal",
            ));
        };
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize that outlives the call.
        if unsafe { libc::ioctl(ctl.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
            return Err(sys("TIOCSWINSZ"));
        }
        Ok(())
    }
}

/// A stream handed to a host connection.
pub enum Attachment {
    /// Host to process.
    In(Arc<Mutex<Option<File>>>),
    /// Process to host.
    Out(File),
    /// Both ways.
    Tty(File),
}

impl Attachment {
    /// Copies until either side closes (runs in the connection's thread).
    pub fn run(self, mut conn: Box<dyn Stream>) {
        match self {
            Attachment::Out(mut f) => {
                let _ = std::io::copy(&mut f, &mut conn);
            }
            Attachment::In(stdin) => copy_in(&mut conn, &stdin),
            Attachment::Tty(master) => {
                if let (Ok(mut reader), Ok(writer)) = (conn.try_clone_stream(), master.try_clone())
                {
                    let writer = Arc::new(Mutex::new(Some(writer)));
                    let _ = std::thread::Builder::new()
                        .name("husk-agent-tty".into())
                        .spawn(move || copy_in(&mut reader, &writer));
                }
                let mut master = master;
                // EIO once the process side has closed.
                let _ = std::io::copy(&mut master, &mut conn);
            }
        }
    }
}

fn copy_in(conn: &mut Box<dyn Stream>, target: &Mutex<Option<File>>) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match conn.read(&mut buf) {
            Ok(0) | Err(_) => {
                // The host closed its side: EOF for the process.
                lock(target).take();
                return;
            }
            Ok(n) => n,
        };
        let mut t = lock(target);
        match t.as_mut() {
            Some(f) => {
                if f.write_all(&buf[..n]).is_err() {
                    t.take();
                    return;
                }
            }
            None => return,
        }
    }
}
