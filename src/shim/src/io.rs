//! A process's stdio: containerd's fifos on one side, the agent's stdio
//! channels on the other, one copying thread per direction.
//!
//! Output fifos are opened read-write, so opening never blocks and the
//! reader sees EOF when the shim closes its end after the process's stream
//! ends. The stdin fifo is opened for reading on its thread (it blocks
//! until containerd's side opens it); the process's end of stdin closes
//! when containerd closes its writer or asks CloseIO.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use husk_protocol::client::{ClientError, Endpoint};
use husk_protocol::{Channel, StdioStream};

use crate::pod::ProcessStdio;

/// The fifo paths containerd gave a process (empty: not wanted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    /// Host to process.
    pub stdin: String,
    /// Process to host.
    pub stdout: String,
    /// Process to host.
    pub stderr: String,
    /// One terminal stream instead of three.
    pub terminal: bool,
}

/// The copying threads of one process.
pub struct ProcessIo {
    outputs: Vec<JoinHandle<()>>,
    /// The agent's ends of the output streams, to cut at the end.
    output_streams: Vec<UnixStream>,
    /// The agent's end of the process's stdin (or terminal), to close.
    stdin: Arc<Mutex<Option<UnixStream>>>,
    /// The stdin fifo, to unblock its opener at the end.
    stdin_fifo: Option<PathBuf>,
}

fn open_output(path: &str) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
}

/// Starts a copying thread; a thread the system cannot give is an error,
/// not an abort.
fn spawn(stream: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, ClientError> {
    Ok(std::thread::Builder::new()
        .name(format!("shim-io-{stream}"))
        .spawn(f)?)
}

/// Copies until EOF on `from` or an error on `to`.
fn copy(mut from: impl Read, mut to: impl Write) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        if to.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

impl ProcessIo {
    /// Attaches the process `container_id`/`exec_id` to `paths`, each
    /// stream's channel opened within `limit`.
    pub fn attach(
        endpoint: &Endpoint,
        limit: Duration,
        container_id: &str,
        exec_id: Option<&str>,
        paths: &StdioPaths,
    ) -> Result<ProcessIo, ClientError> {
        let open = |stream| {
            endpoint.open_within(
                Channel::Stdio {
                    container_id: container_id.to_string(),
                    exec_id: exec_id.map(str::to_string),
                    stream,
                },
                limit,
            )
        };
        let mut io = ProcessIo {
            outputs: Vec::new(),
            output_streams: Vec::new(),
            stdin: Arc::new(Mutex::new(None)),
            stdin_fifo: None,
        };
        // Whatever was set up before a step failed is cut again.
        if let Err(e) = io.connect(&open, paths) {
            io.finish();
            return Err(e);
        }
        Ok(io)
    }

    fn connect(
        &mut self,
        open: &dyn Fn(StdioStream) -> Result<UnixStream, ClientError>,
        paths: &StdioPaths,
    ) -> Result<(), ClientError> {
        let stdin_side = if paths.terminal {
            let tty = open(StdioStream::Tty)?;
            if !paths.stdout.is_empty() {
                let fifo = open_output(&paths.stdout)?;
                let reader = tty.try_clone()?;
                self.output_streams.push(tty.try_clone()?);
                self.outputs
                    .push(spawn("stdout", move || copy(reader, fifo))?);
            }
            tty
        } else {
            for (path, stream) in [
                (&paths.stdout, StdioStream::Stdout),
                (&paths.stderr, StdioStream::Stderr),
            ] {
                if path.is_empty() {
                    continue;
                }
                let fifo = open_output(path)?;
                let s = open(stream)?;
                self.output_streams.push(s.try_clone()?);
                self.outputs.push(spawn("output", move || copy(s, fifo))?);
            }
            let s = open(StdioStream::Stdin)?;
            if paths.stdin.is_empty() {
                // No input: EOF at once.
                s.shutdown(Shutdown::Write)?;
            }
            s
        };
        *self.stdin.lock().unwrap_or_else(|e| e.into_inner()) = Some(stdin_side);
        if !paths.stdin.is_empty() {
            let path = PathBuf::from(&paths.stdin);
            self.stdin_fifo = Some(path.clone());
            let stdin = self.stdin.clone();
            let terminal = paths.terminal;
            spawn("stdin", move || {
                // Blocks until containerd opens its end.
                let Ok(fifo) = File::open(&path) else { return };
                let writer = {
                    let guard = stdin.lock().unwrap_or_else(|e| e.into_inner());
                    guard.as_ref().and_then(|s| s.try_clone().ok())
                };
                if let Some(w) = writer {
                    copy(fifo, &w);
                    if !terminal {
                        let _ = w.shutdown(Shutdown::Write);
                    }
                }
            })?;
        }
        Ok(())
    }
}

impl ProcessStdio for ProcessIo {
    fn close_stdin(&self) {
        if let Some(s) = self.stdin.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = s.shutdown(Shutdown::Write);
        }
    }

    /// A background process may hold the output open after the one waited
    /// for exited: the caller decides how long to wait for this.
    fn output_done(&self) -> bool {
        self.outputs.iter().all(|t| t.is_finished())
    }

    /// Closes stdin, lets a stdin opener still waiting for containerd go
    /// (by opening the fifo's write end for a moment), and cuts output
    /// streams still open (a background process holding them, or a
    /// stalled guest), so the output fifos close and containerd's copy
    /// ends: after an exit was reported, nothing may keep the client
    /// waiting.
    fn finish(&self) {
        self.close_stdin();
        for s in &self.output_streams {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(path) = &self.stdin_fifo {
            let _ = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(Path::new(path));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_fifos_open_without_a_reader_and_end_with_eof() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdout");
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let mut w = open_output(path.to_str().unwrap()).unwrap();
        w.write_all(b"hello\n").unwrap();
        let mut r = File::open(&path).unwrap();
        drop(w);
        let mut got = String::new();
        r.read_to_string(&mut got).unwrap();
        assert_eq!(got, "hello\n");
    }
}
