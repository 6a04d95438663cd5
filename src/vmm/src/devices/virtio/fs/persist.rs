//! A virtio-fs device in a snapshot: its configuration (id, tag, backend
//! socket, queue count and size) and the queues the driver started it
//! with.
//!
//! The file system itself is not the VMM's: the guest's FUSE session
//! (begun by FUSE_INIT when the guest mounts the tag) and every open file
//! live in the backend process, which a snapshot cannot save. So a device
//! is saved only while the guest has never sent it a request: every ring
//! index still 0 and no reply ever signalled. That is what a template
//! taken before the guest mounts anything looks like. A restored device
//! connects to a backend (the snapshot's socket, or an override),
//! negotiates afresh and, if the driver had started it, hands the backend
//! guest memory and the rings exactly as a DRIVER_OK does.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::device::Fs;
use crate::config::FsConfig;
use crate::devices::virtio::persist::QueueSnapshot;

/// One virtio-fs device's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsState {
    /// The device id.
    pub id: String,
    /// The tag the guest mounts.
    pub tag: String,
    /// The backend's socket at the snapshot (replaceable on load).
    pub socket: PathBuf,
    /// Request queues (besides the high-priority one).
    pub num_queues: u16,
    /// Entries per queue.
    pub queue_size: u16,
    /// The queues as the driver started the device (empty before
    /// DRIVER_OK).
    pub queues: Vec<QueueSnapshot>,
    /// The device relays requests (guest memory is not the backend's).
    #[serde(default)]
    pub relay: bool,
}

/// Why a virtio-fs device cannot be saved.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FsSnapshotError {
    /// The guest sent the device requests (it mounted the tag).
    #[error("the guest has used virtio-fs device {0}: its FUSE session lives in the backend and is not saved")]
    Used(String),
    /// The backend failed or went away.
    #[error("virtio-fs device {0} lost its backend and needs a reset")]
    Broken(String),
}

/// Offset of `idx` in both the available and the used ring (after `flags`).
const RING_IDX_OFFSET: u64 = 2;

impl Fs {
    /// Whether the guest ever gave the backend a request: a started
    /// queue's available or used index moved, or the backend signalled a
    /// used buffer. A ring index that cannot be read counts as used.
    pub fn guest_used(&self, mem: &GuestMemoryMmap) -> bool {
        if self.metrics().interrupts.get() > 0 {
            return true;
        }
        let Some(queues) = &self.started else {
            return false;
        };
        let idx = |ring: u64| {
            ring.checked_add(RING_IDX_OFFSET)
                .and_then(|a| mem.read_obj::<u16>(GuestAddress(a)).ok())
        };
        queues
            .iter()
            .any(|q| idx(q.avail_ring) != Some(0) || idx(q.used_ring) != Some(0))
    }

    /// The device's state, if it can be saved (see the module's doc).
    pub fn save_state(&self, mem: &GuestMemoryMmap) -> Result<FsState, FsSnapshotError> {
        let id = self.config().id.clone();
        if self.broken() {
            return Err(FsSnapshotError::Broken(id));
        }
        if self.guest_used(mem) {
            return Err(FsSnapshotError::Used(id));
        }
        let c = self.config();
        Ok(FsState {
            id,
            tag: c.tag.clone(),
            socket: c.socket.clone(),
            num_queues: c.num_queues,
            queue_size: c.queue_size,
            queues: self.started.clone().unwrap_or_default(),
            relay: c.relay,
        })
    }
}

impl FsState {
    /// The configuration to build the device with again.
    pub fn config(&self) -> FsConfig {
        FsConfig {
            id: self.id.clone(),
            tag: self.tag.clone(),
            socket: self.socket.clone(),
            num_queues: self.num_queues,
            queue_size: self.queue_size,
            relay: self.relay,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::fs::test_backend::{req, Script, StubBackend};
    use crate::devices::virtio::mmio::tests::handshake;
    use crate::devices::virtio::mmio::MmioTransport;
    use crate::vstate::memory::{create_with, Backing};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    fn stub(name: &str, script: Script) -> StubBackend {
        let dir =
            std::env::temp_dir().join(format!("husk-fs-persist-{}-{name}", std::process::id()));
        StubBackend::spawn(&dir, name, script).unwrap()
    }

    fn two_queues() -> Script {
        Script {
            queues: 2,
            ..Default::default()
        }
    }

    fn config(socket: &std::path::Path) -> FsConfig {
        FsConfig {
            id: "share".into(),
            tag: "share".into(),
            socket: socket.to_path_buf(),
            num_queues: 1,
            queue_size: 256,
            relay: false,
        }
    }

    fn wait_for(stub: &StubBackend, code: u32, count: usize) -> Vec<u32> {
        for _ in 0..500 {
            let seen = stub.seen();
            if seen.iter().filter(|c| **c == code).count() >= count {
                return seen;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        stub.seen()
    }

    /// A device started by a driver (the mmio tests' handshake: queues of
    /// 16 at 0x1000 and 0x2000) on shared memory.
    fn started(name: &str) -> (StubBackend, Arc<Mutex<Fs>>, MmioTransport, GuestMemoryMmap) {
        let b = stub(name, two_queues());
        let fs = Arc::new(Mutex::new(Fs::new(&config(b.socket())).unwrap()));
        let mem = create_with(1 << 20, Backing::Shared).unwrap();
        let mut t = MmioTransport::new(mem.clone(), fs.clone());
        handshake(&mut t, 2);
        fs.lock().unwrap().run_pending();
        wait_for(&b, req::SET_VRING_ENABLE, 2);
        (b, fs, t, mem)
    }

    #[test]
    fn a_device_never_started_or_never_used_is_saved() {
        let b = stub("fresh", two_queues());
        let fs = Fs::new(&config(b.socket())).unwrap();
        let mem = create_with(1 << 20, Backing::Shared).unwrap();
        let s = fs.save_state(&mem).unwrap();
        assert_eq!(s.config(), config(b.socket()));
        assert!(s.queues.is_empty());

        let (_b, fs, _t, mem) = started("unused");
        let s = fs.lock().unwrap().save_state(&mem).unwrap();
        assert_eq!(s.queues.len(), 2);
        assert_eq!(s.queues[1].desc_table, 0x2000);
        assert_eq!((s.queues[0].next_avail, s.queues[0].next_used), (0, 0));
    }

    #[test]
    fn a_device_the_guest_sent_a_request_is_refused_by_name() {
        for (name, ring_idx) in [("avail", 0x1100 + 2), ("used", 0x2200 + 2)] {
            let (_b, fs, _t, mem) = started(name);
            mem.write_obj(1u16, GuestAddress(ring_idx)).unwrap();
            let err = fs.lock().unwrap().save_state(&mem).unwrap_err();
            assert_eq!(err, FsSnapshotError::Used("share".into()), "{name}");
            assert_eq!(
                err.to_string(),
                "the guest has used virtio-fs device share: its FUSE session lives in the backend and is not saved"
            );
        }
        // A reply the backend signalled counts too, whatever the rings say.
        let (_b, fs, _t, mem) = started("signalled");
        fs.lock().unwrap().call_events()[1].write(1).unwrap();
        fs.lock().unwrap().signal_used(1);
        assert!(matches!(
            fs.lock().unwrap().save_state(&mem),
            Err(FsSnapshotError::Used(_))
        ));
    }

    #[test]
    fn a_device_whose_backend_went_away_is_refused() {
        let (_b, fs, _t, mem) = started("gone");
        fs.lock().unwrap().handle_event(
            super::super::event_handler::TOKEN_BACKEND,
            vmm_sys_util::epoll::EventSet::READ_HANG_UP,
        );
        assert_eq!(
            fs.lock().unwrap().save_state(&mem),
            Err(FsSnapshotError::Broken("share".into()))
        );
    }

    #[test]
    fn a_restored_started_device_hands_its_rings_to_the_new_backend() {
        let (_b, fs, t, mem) = started("before");
        let state = fs.lock().unwrap().save_state(&mem).unwrap();
        let transport = t.save_state();

        let b2 = stub("after", two_queues());
        let mut c = state.config();
        c.socket = b2.socket().to_path_buf();
        let restored = Arc::new(Mutex::new(Fs::new(&c).unwrap()));
        let mut t2 = MmioTransport::new(mem.clone(), restored.clone());
        t2.restore_state(&transport, &state.queues).unwrap();
        assert!(t2.is_activated());
        restored.lock().unwrap().try_run_pending().unwrap();
        let seen = wait_for(&b2, req::SET_VRING_ENABLE, 2);
        for code in [req::SET_FEATURES, req::SET_MEM_TABLE, req::SET_VRING_KICK] {
            assert!(seen.contains(&code), "{code} not in {seen:?}");
        }
        assert_eq!(seen.iter().filter(|c| **c == req::SET_VRING_NUM).count(), 2);
        assert!(!restored.lock().unwrap().broken());
        // Saved again, it is the same device.
        assert_eq!(
            restored.lock().unwrap().save_state(&mem).unwrap().queues,
            state.queues
        );
    }

    #[test]
    fn a_backend_that_refuses_the_restored_device_fails_the_restore() {
        let (_b, fs, t, mem) = started("refusing-before");
        let state = fs.lock().unwrap().save_state(&mem).unwrap();
        let b2 = stub(
            "refusing-after",
            Script {
                queues: 2,
                refuse: Some(req::SET_MEM_TABLE),
                ..Default::default()
            },
        );
        let mut c = state.config();
        c.socket = b2.socket().to_path_buf();
        let restored = Arc::new(Mutex::new(Fs::new(&c).unwrap()));
        let mut t2 = MmioTransport::new(mem, restored.clone());
        t2.restore_state(&t.save_state(), &state.queues).unwrap();
        let err = restored.lock().unwrap().try_run_pending().unwrap_err();
        assert!(
            matches!(err, crate::devices::virtio::fs::FsError::Backend { .. }),
            "{err}"
        );
    }
}
