//! A scripted vhost-user backend, for the device's unit tests and its fuzz
//! target. The real backend (virtiofsd) runs in `tests/fs.rs`, in the node
//! VM against a real guest driver; here the backend must do what virtiofsd
//! will not do on demand (refuse one request, hang up in the middle of a
//! set-up) and must run where no guest and no root are: it speaks the
//! vhost-user wire format itself, answers what needs an answer, records
//! every request code, and serves no FUSE request at all.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// vhost-user request codes the stub answers or records.
pub mod req {
    /// GET_FEATURES.
    pub const GET_FEATURES: u32 = 1;
    /// SET_FEATURES.
    pub const SET_FEATURES: u32 = 2;
    /// SET_OWNER.
    pub const SET_OWNER: u32 = 3;
    /// SET_MEM_TABLE.
    pub const SET_MEM_TABLE: u32 = 5;
    /// SET_VRING_NUM.
    pub const SET_VRING_NUM: u32 = 8;
    /// GET_VRING_BASE (stops a ring).
    pub const GET_VRING_BASE: u32 = 11;
    /// SET_VRING_KICK.
    pub const SET_VRING_KICK: u32 = 12;
    /// SET_VRING_CALL.
    pub const SET_VRING_CALL: u32 = 13;
    /// GET_PROTOCOL_FEATURES.
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    /// GET_QUEUE_NUM.
    pub const GET_QUEUE_NUM: u32 = 17;
    /// SET_VRING_ENABLE.
    pub const SET_VRING_ENABLE: u32 = 18;
}

const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
/// VIRTIO_F_VERSION_1, INDIRECT_DESC, EVENT_IDX and vhost-user's protocol
/// features bit, as virtiofsd offers them (plus VIRTIO_F_ACCESS_PLATFORM,
/// which husk must not pass on).
pub const FEATURES: u64 = (1 << 32) | (1 << 33) | (1 << 30) | (1 << 29) | (1 << 28);
/// MQ and REPLY_ACK.
const PROTOCOL_FEATURES: u64 = 0x1 | 0x8;

/// What the stub does besides answering.
#[derive(Debug, Clone, Copy, Default)]
pub struct Script {
    /// Queues it says it serves (GET_QUEUE_NUM).
    pub queues: u64,
    /// A request it refuses (a non-zero REPLY_ACK).
    pub refuse: Option<u32>,
    /// A request on which it closes the connection instead of answering.
    pub hang_up_on: Option<u32>,
}

/// A stub backend listening on a socket of its own.
pub struct StubBackend {
    socket: PathBuf,
    seen: Arc<Mutex<Vec<u32>>>,
    thread: Option<JoinHandle<()>>,
}

impl StubBackend {
    /// Listens on `dir/<name>.sock` and serves one frontend with `script`.
    pub fn spawn(dir: &Path, name: &str, script: Script) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let socket = dir.join(format!("{name}.sock"));
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket)?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let thread = std::thread::spawn(move || {
            if let Ok((conn, _)) = listener.accept() {
                serve(conn, script, &record);
            }
        });
        Ok(StubBackend {
            socket,
            seen,
            thread: Some(thread),
        })
    }

    /// Where it listens.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Waits for the serving thread to end, once the frontend is gone
    /// (its connection closed): a thread still waiting for a frontend is
    /// woken by a connection that closes at once. So nothing of the
    /// backend outlives the caller (a fuzz target's leak check).
    pub fn finish(mut self) {
        drop(UnixStream::connect(&self.socket));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// The request codes received so far, in order.
    pub fn seen(&self) -> Vec<u32> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for StubBackend {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        // The thread ends when the frontend closes its side.
        drop(self.thread.take());
    }
}

fn reply(conn: &mut UnixStream, code: u32, body: &[u8]) -> std::io::Result<()> {
    let mut msg = Vec::with_capacity(12 + body.len());
    msg.extend_from_slice(&code.to_le_bytes());
    msg.extend_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(body);
    conn.write_all(&msg)
}

fn serve(mut conn: UnixStream, script: Script, seen: &Mutex<Vec<u32>>) {
    let mut header = [0u8; 12];
    // Attached descriptors (memfds, eventfds) are dropped with the
    // ancillary data a plain read does not take: the kernel closes them.
    while conn.read_exact(&mut header).is_ok() {
        let word =
            |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
        let (code, flags, size) = (word(0), word(4), word(8));
        let mut body = vec![0u8; size as usize];
        if conn.read_exact(&mut body).is_err() {
            return;
        }
        seen.lock().unwrap_or_else(|e| e.into_inner()).push(code);
        if script.hang_up_on == Some(code) {
            return;
        }
        let answer = match code {
            req::GET_FEATURES => Some(FEATURES.to_le_bytes().to_vec()),
            req::GET_PROTOCOL_FEATURES => Some(PROTOCOL_FEATURES.to_le_bytes().to_vec()),
            req::GET_QUEUE_NUM => Some(script.queues.to_le_bytes().to_vec()),
            req::GET_VRING_BASE => {
                // struct vhost_vring_state { u32 index; u32 num; }
                let mut state = body.get(..4).map(<[u8]>::to_vec).unwrap_or(vec![0; 4]);
                state.extend_from_slice(&0u32.to_le_bytes());
                Some(state)
            }
            _ if flags & FLAG_NEED_REPLY != 0 => {
                let status = u64::from(script.refuse == Some(code));
                Some(status.to_le_bytes().to_vec())
            }
            _ => None,
        };
        if let Some(body) = answer {
            if reply(&mut conn, code, &body).is_err() {
                return;
            }
        }
    }
}
