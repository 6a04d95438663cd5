//! The virtio-fs device: the guest's side (features, configuration space,
//! queues, interrupt) kept by husk, the requests served by a vhost-user
//! backend over a unix socket.
//!
//! States: built with a connected, negotiated backend ([`Fs::new`]);
//! the driver's DRIVER_OK and reset become [`Op`]s that the event loop
//! carries out ([`Fs::run_pending`]); a backend that fails a request or
//! hangs up makes the device [`Fs::broken`] for good: DEVICE_NEEDS_RESET,
//! and every later activation fails at once.

use std::collections::VecDeque;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::metrics::FsMetrics;
use super::relay::{Relay, RelayError, Served, Shadow};
use super::{TAG_LEN, TYPE_FS};
use crate::config::FsConfig;
use crate::devices::virtio::persist::{running_queue, QueueSnapshot};
use crate::devices::virtio::{
    read_config_bytes, ActivateError, Interrupt, VirtioDevice, INTERRUPT_CONFIG,
    INTERRUPT_USED_RING, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::error::{Chain, Flat};

/// How long one reply of the backend may take before the device gives up
/// on it. virtiofsd answers set-up requests in microseconds; a backend
/// that is stopped must not stall the event loop for longer than this.
pub const BACKEND_TIMEOUT: Duration = Duration::from_secs(5);

/// VIRTIO_RING_F_INDIRECT_DESC.
const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;

/// The ring features husk passes through when the backend offers them:
/// nothing of the data path is husk's, so these are the backend's to serve.
const PASSED_THROUGH: u64 =
    (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX);

/// The protocol features husk uses when the backend has them: several
/// queues, and an acknowledgement of every request (so a set-up the
/// backend refused is seen at once, not as a dead queue later).
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK
}

/// Errors of a virtio-fs device.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The backend's socket could not be reached.
    #[error("cannot connect to the vhost-user backend at {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A request to the backend failed or was refused.
    #[error("the vhost-user backend at {path} failed to {what}")]
    Backend {
        /// The socket.
        path: PathBuf,
        /// What husk asked for.
        what: &'static str,
        /// What the vhost-user library said.
        source: Flat<vhost::Error>,
    },
    /// The backend lacks what husk needs of it.
    #[error("the vhost-user backend at {path} does not offer {what}")]
    Unsupported {
        /// The socket.
        path: PathBuf,
        /// What is missing.
        what: String,
    },
    /// Guest memory cannot be shared with the backend (not memfd backed,
    /// or a ring outside it).
    #[error("guest memory cannot be shared with the vhost-user backend: {0}")]
    Memory(String),
    /// An eventfd could not be made.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The backend went away; the device needs a reset it cannot get.
    #[error("the vhost-user backend at {0} disconnected")]
    Disconnected(PathBuf),
    /// The relay between the guest's queues and the backend's failed
    /// (the backend returned what it was never given).
    #[error("the virtio-fs relay failed")]
    Relay(#[from] RelayError),
}

/// Work for the event loop, queued by the driver's register writes on a
/// vCPU thread.
#[derive(Debug)]
pub(super) enum Op {
    /// DRIVER_OK: hand guest memory and the rings to the backend.
    Start {
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        features: u64,
    },
    /// A reset of an active device: the backend stops its rings.
    Stop { queues: usize },
}

/// The connected backend.
struct Backend {
    frontend: Frontend,
    /// The same socket, watched by the event loop for a hang-up.
    watch: UnixStream,
    /// Virtio features the backend offers (bit 30 is vhost-user's own).
    features: u64,
}

/// A virtio-fs device backed by a vhost-user backend.
pub struct Fs {
    config: FsConfig,
    backend: Backend,
    queue_sizes: Vec<u16>,
    /// Kicks: KVM's ioeventfds on QueueNotify, read by the backend (by
    /// husk's event loop when relaying).
    pub(super) queue_events: Vec<EventFd>,
    /// Calls: written by the backend, turned into the interrupt here.
    call_events: Vec<EventFd>,
    interrupt: Interrupt,
    /// Wakes the event loop when `pending` has work.
    work: EventFd,
    pending: VecDeque<Op>,
    /// Rings the backend is running (0 while stopped).
    running: usize,
    /// The queues the driver last started the device with, as they were
    /// handed over (for a snapshot; `None` before DRIVER_OK and after a
    /// reset).
    pub(super) started: Option<Vec<QueueSnapshot>>,
    broken: bool,
    metrics: Arc<FsMetrics>,
    /// Readable once guest memory is complete, while a restore still fills
    /// it (`vstate::lazy_memory`): until then the backend, whose mapping
    /// would see unfilled pages as zeroes, gets no kicks.
    memory_ready: Option<EventFd>,
    /// The running rings' kicks were not handed over yet (memory was not
    /// complete when the device started).
    kicks_held: bool,
    /// Relay mode (`None`: the backend maps guest memory).
    relay: Option<RelayMode>,
}

/// A relaying device's own parts.
struct RelayMode {
    /// The memory shared with the backend instead of guest memory.
    shadow: Shadow,
    /// The eventfds husk kicks the backend's rings with.
    kicks: Vec<EventFd>,
    /// The guest's queues, once the driver started the device.
    running: Option<Relay>,
}

impl std::fmt::Debug for Fs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fs")
            .field("config", &self.config)
            .field("running", &self.running)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

/// Turns the vhost-user library's error for request `what` to the backend
/// at `path` into the device's.
fn backend_err<'a>(
    path: &'a Path,
    what: &'static str,
) -> impl FnOnce(vhost::Error) -> FsError + 'a {
    move |source| FsError::Backend {
        path: path.to_path_buf(),
        what,
        source: Flat(source),
    }
}

fn eventfd() -> Result<EventFd, FsError> {
    EventFd::new(EFD_NONBLOCK).map_err(FsError::EventFd)
}

impl Backend {
    /// Connects to the backend and negotiates the session: ownership,
    /// virtio and protocol features, the queue count.
    fn connect(config: &FsConfig, queues: usize) -> Result<Self, FsError> {
        let path = &config.socket;
        let sock = UnixStream::connect(path).map_err(|source| FsError::Connect {
            path: path.clone(),
            source,
        })?;
        let timeouts = sock
            .set_read_timeout(Some(BACKEND_TIMEOUT))
            .and_then(|()| sock.set_write_timeout(Some(BACKEND_TIMEOUT)));
        let watch =
            timeouts
                .and_then(|()| sock.try_clone())
                .map_err(|source| FsError::Connect {
                    path: path.clone(),
                    source,
                })?;
        let mut frontend = Frontend::from_stream(sock, queues as u64);
        let fail = |what| backend_err(path, what);
        frontend.set_owner().map_err(fail("take ownership"))?;
        let features = frontend.get_features().map_err(fail("list its features"))?;
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if features & protocol_bit == 0 || features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(FsError::Unsupported {
                path: path.clone(),
                what: format!("VIRTIO_F_VERSION_1 and protocol features (it offers {features:#x})"),
            });
        }
        let offered = frontend
            .get_protocol_features()
            .map_err(fail("list its protocol features"))?;
        let acked = offered & wanted_protocol_features();
        frontend
            .set_protocol_features(acked)
            .map_err(fail("accept the protocol features"))?;
        if acked.contains(VhostUserProtocolFeatures::MQ) {
            let max = frontend
                .get_queue_num()
                .map_err(fail("say how many queues it serves"))?;
            if (max as usize) < queues {
                return Err(FsError::Unsupported {
                    path: path.clone(),
                    what: format!(
                        "{queues} queues (a high-priority one and {} request queues); it serves {max}",
                        queues - 1
                    ),
                });
            }
        } else if queues > 2 {
            return Err(FsError::Unsupported {
                path: path.clone(),
                what: "several request queues (the MQ protocol feature)".into(),
            });
        }
        if acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        Ok(Backend {
            frontend,
            watch,
            features,
        })
    }
}

/// The host address of `len` bytes of guest memory at `addr`, if they lie
/// in one region.
fn host_address(mem: &GuestMemoryMmap, addr: GuestAddress, len: usize) -> Option<u64> {
    let slice = mem.get_slice(addr, len).ok()?;
    (slice.len() == len).then(|| slice.ptr_guard().as_ptr() as u64)
}

/// What the backend needs to know of one queue's rings.
fn vring_config(mem: &GuestMemoryMmap, q: &Queue) -> Result<VringConfigData, FsError> {
    let size = usize::from(q.size());
    // virtio 1.1, 2.6: descriptor table, driver (avail) and device (used) rings.
    let rings = [
        (q.desc_table(), 16 * size, "descriptor table"),
        (q.avail_ring(), 6 + 2 * size, "available ring"),
        (q.used_ring(), 6 + 8 * size, "used ring"),
    ];
    let mut addrs = [0u64; 3];
    for (slot, (addr, len, what)) in addrs.iter_mut().zip(rings) {
        *slot = host_address(mem, GuestAddress(addr), len).ok_or_else(|| {
            FsError::Memory(format!(
                "the {what} at {addr:#x} does not lie in one region"
            ))
        })?;
    }
    Ok(VringConfigData {
        queue_max_size: q.max_size(),
        queue_size: q.size(),
        flags: 0,
        desc_table_addr: addrs[0],
        avail_ring_addr: addrs[1],
        used_ring_addr: addrs[2],
        log_addr: None,
    })
}

/// The configuration space: `struct virtio_fs_config { u8 tag[36]; le32
/// num_request_queues; }`.
fn config_space(tag: &str, request_queues: u16) -> [u8; TAG_LEN + 4] {
    let mut space = [0u8; TAG_LEN + 4];
    let bytes = tag.as_bytes();
    let n = bytes.len().min(TAG_LEN);
    space[..n].copy_from_slice(&bytes[..n]);
    space[TAG_LEN..].copy_from_slice(&u32::from(request_queues).to_le_bytes());
    space
}

impl Fs {
    /// Connects to the backend named by `config` (already checked by
    /// `config::check_fs`) and negotiates with it. Unless the device
    /// relays (`config.relay`), the VM's memory must be
    /// [`crate::vstate::memory::Backing::Shared`].
    pub fn new(config: &FsConfig) -> Result<Self, FsError> {
        let queues = 1 + usize::from(config.num_queues);
        let backend = Backend::connect(config, queues)?;
        let relay = if config.relay {
            Some(RelayMode {
                shadow: Shadow::new(queues)?,
                kicks: (0..queues).map(|_| eventfd()).collect::<Result<_, _>>()?,
                running: None,
            })
        } else {
            None
        };
        Ok(Fs {
            config: config.clone(),
            backend,
            queue_sizes: vec![config.queue_size; queues],
            queue_events: (0..queues).map(|_| eventfd()).collect::<Result<_, _>>()?,
            call_events: (0..queues).map(|_| eventfd()).collect::<Result<_, _>>()?,
            interrupt: Interrupt::new().map_err(FsError::EventFd)?,
            work: eventfd()?,
            pending: VecDeque::new(),
            running: 0,
            started: None,
            broken: false,
            metrics: Arc::new(FsMetrics::default()),
            memory_ready: None,
            kicks_held: false,
            relay,
        })
    }

    /// Whether the device relays requests instead of sharing guest memory
    /// with the backend.
    pub fn relays(&self) -> bool {
        self.relay.is_some()
    }

    /// Stops relaying the guest's queues (the device stopped or broke).
    fn drop_relay(&mut self) {
        if let Some(r) = &mut self.relay {
            r.running = None;
        }
    }

    /// What the device was built with.
    pub fn config(&self) -> &FsConfig {
        &self.config
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<FsMetrics> {
        self.metrics.clone()
    }

    /// Whether the backend failed or went away.
    pub fn broken(&self) -> bool {
        self.broken
    }

    pub(super) fn work_event(&self) -> &EventFd {
        &self.work
    }

    pub(super) fn call_events(&self) -> &[EventFd] {
        &self.call_events
    }

    pub(super) fn backend_socket(&self) -> &UnixStream {
        &self.backend.watch
    }

    pub(super) fn memory_ready_event(&self) -> Option<&EventFd> {
        self.memory_ready.as_ref()
    }

    /// Guest memory is being filled and `ready` becomes readable when it
    /// is complete: rings started before then are handed to the backend
    /// without their kicks, which follow when `ready` fires (the backend
    /// touches guest memory only when kicked; a kick the guest gave
    /// meanwhile waits in its eventfd). Call before the device starts.
    pub fn wait_for_memory(&mut self, ready: EventFd) {
        self.memory_ready = Some(ready);
    }

    /// Guest memory is complete: hands over the kicks held back.
    pub(super) fn memory_complete(&mut self) {
        if let Some(ready) = &self.memory_ready {
            let _ = ready.read();
        }
        let held = std::mem::take(&mut self.kicks_held);
        if held && !self.broken {
            if let Err(e) = self.hand_over_kicks(self.running) {
                self.fail(&e);
            }
        }
    }

    /// Drops the memory-complete eventfd (after the event loop stopped
    /// watching it).
    pub(super) fn forget_memory_ready(&mut self) {
        self.memory_ready = None;
    }

    /// Gives the backend the kick eventfds of rings `0..queues` and
    /// enables them: from here on it serves them.
    fn hand_over_kicks(&mut self, queues: usize) -> Result<(), FsError> {
        let path = &self.config.socket;
        let f = &mut self.backend.frontend;
        // Relaying, husk serves the guest's notifications and kicks the
        // backend's rings itself.
        let kicks = match &self.relay {
            Some(r) => &r.kicks,
            None => &self.queue_events,
        };
        for (index, kick) in kicks.iter().enumerate().take(queues) {
            f.set_vring_kick(index, kick)
                .map_err(backend_err(path, "take a queue's notification eventfd"))?;
        }
        // Rings start disabled once protocol features are in use.
        for index in 0..queues {
            f.set_vring_enable(index, true)
                .map_err(backend_err(path, "enable a queue"))?;
        }
        Ok(())
    }

    fn queue(&mut self, op: Op) {
        self.pending.push_back(op);
        if let Err(e) = self.work.write(1) {
            tracing::error!(fs = %self.config.id, error = %Chain(&e), "cannot wake the event loop");
        }
    }

    /// The backend is gone or failed: the driver must reset the device,
    /// which cannot work again in this VM.
    pub(super) fn fail(&mut self, error: &FsError) {
        if !self.broken {
            self.metrics.backend_failures.inc();
            tracing::error!(fs = %self.config.id, tag = %self.config.tag, error = %Chain(error),
                "virtio-fs device needs a reset; its file system is unavailable");
        }
        self.broken = true;
        self.running = 0;
        self.drop_relay();
        self.pending.clear();
        self.interrupt.trigger(INTERRUPT_CONFIG);
    }

    /// Carries out the work the driver's register writes queued (what the
    /// event loop does when the work eventfd fires).
    pub fn run_pending(&mut self) {
        if let Err(e) = self.try_run_pending() {
            self.fail(&e);
        }
    }

    /// Carries out the queued work until a step fails, and returns that
    /// failure (the rest of the work is dropped; the caller decides whether
    /// the device is broken). A restore uses it to refuse a snapshot whose
    /// backend will not take the device before the guest runs.
    pub fn try_run_pending(&mut self) -> Result<(), FsError> {
        while let Some(op) = self.pending.pop_front() {
            if self.broken {
                self.pending.clear();
                return Ok(());
            }
            let result = match op {
                Op::Start {
                    mem,
                    queues,
                    features,
                } => self.start(&mem, queues, features),
                Op::Stop { queues } => self.stop(queues),
            };
            if let Err(e) = result {
                self.pending.clear();
                return Err(e);
            }
        }
        Ok(())
    }

    /// Tells the backend the features, the memory table and each ring
    /// (`rings[i]`: where queue `i` is and its first index) with its call
    /// eventfd; the kicks follow separately. `what` names the features'
    /// and the memory table's requests in errors.
    fn hand_over_rings(
        &mut self,
        features: u64,
        regions: &[VhostUserMemoryRegionInfo],
        rings: &[(VringConfigData, u16)],
        what: [&'static str; 2],
    ) -> Result<(), FsError> {
        let path = &self.config.socket;
        let f = &mut self.backend.frontend;
        let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        f.set_features(features | protocol)
            .map_err(backend_err(path, what[0]))?;
        f.set_mem_table(regions)
            .map_err(backend_err(path, what[1]))?;
        for (index, (config, base)) in rings.iter().enumerate() {
            f.set_vring_num(index, config.queue_size)
                .map_err(backend_err(path, "size a queue"))?;
            f.set_vring_addr(index, config)
                .map_err(backend_err(path, "place a queue's rings"))?;
            f.set_vring_base(index, *base)
                .map_err(backend_err(path, "set a queue's first index"))?;
            f.set_vring_call(index, &self.call_events[index])
                .map_err(backend_err(path, "take a queue's interrupt eventfd"))?;
        }
        Ok(())
    }

    /// Relaying: hands the backend the shadow and its rings, keeps the
    /// guest's queues, and serves what the guest queued already.
    fn start_relay(&mut self, mem: &GuestMemoryMmap, queues: Vec<Queue>) -> Result<(), FsError> {
        let Some(r) = &self.relay else {
            return Err(FsError::Memory("no relay buffers".into()));
        };
        let regions = r.shadow.regions().map_err(FsError::Memory)?;
        let rings = (0..queues.len())
            .map(|index| {
                r.shadow
                    .vring_config(index)
                    .map(|config| (config, 0))
                    .ok_or_else(|| FsError::Memory(format!("no relay ring for queue {index}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // The shadow rings use nothing but what every backend has.
        self.hand_over_rings(
            1 << VIRTIO_F_VERSION_1,
            &regions,
            &rings,
            ["accept the relay's features", "map the relay's buffers"],
        )?;
        let count = queues.len();
        if let Some(r) = &mut self.relay {
            r.running = Some(Relay::new(&r.shadow, mem.clone(), queues)?);
        }
        self.hand_over_kicks(count)?;
        self.running = count;
        self.metrics.activations.inc();
        tracing::debug!(fs = %self.config.id, queues = count, "virtio-fs relay started");
        for index in 0..count {
            self.guest_requests(index);
        }
        Ok(())
    }

    /// The guest notified queue `index` (relay mode): forward its requests.
    pub(super) fn guest_requests(&mut self, index: usize) {
        let Some(RelayMode {
            shadow,
            running: Some(relay),
            ..
        }) = &mut self.relay
        else {
            return;
        };
        match relay.requests(shadow, index) {
            Ok(served) => self.served(index, served),
            Err(e) => self.fail(&e.into()),
        }
    }

    /// The backend signalled queue `index` (relay mode): return its
    /// replies to the guest.
    fn backend_replies(&mut self, index: usize) {
        let Some(RelayMode {
            shadow,
            running: Some(relay),
            ..
        }) = &mut self.relay
        else {
            return;
        };
        match relay.replies(shadow, index) {
            Ok(served) => self.served(index, served),
            Err(e) => self.fail(&e.into()),
        }
    }

    /// Kicks the backend and interrupts the guest as `served` needs.
    fn served(&mut self, index: usize, served: Served) {
        let m = &self.metrics;
        m.requests.add(u64::from(served.forwarded));
        m.invalid_requests.add(u64::from(served.invalid));
        m.bytes_to_backend.add(served.bytes_in);
        m.bytes_from_backend.add(served.bytes_out);
        let Some(r) = &mut self.relay else {
            return;
        };
        if served.forwarded > 0 {
            if let Some(kick) = r.kicks.get(index) {
                if let Err(e) = kick.write(1) {
                    tracing::warn!(fs = %self.config.id, error = %e, "cannot kick the virtio-fs backend");
                }
            }
        }
        if served.returned > 0 {
            let wants = r.running.as_mut().is_some_and(|q| q.needs_interrupt(index));
            if wants {
                self.metrics.interrupts.inc();
                self.interrupt.trigger(INTERRUPT_USED_RING);
            }
        }
    }

    /// Hands guest memory and the rings to the backend and starts them.
    fn start(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: Vec<Queue>,
        features: u64,
    ) -> Result<(), FsError> {
        if self.relay.is_some() {
            return self.start_relay(mem, queues);
        }
        let regions = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| FsError::Memory(e.to_string()))?;
        let rings = queues
            .iter()
            .map(|q| Ok((vring_config(mem, q)?, q.next_avail())))
            .collect::<Result<Vec<_>, FsError>>()?;
        self.hand_over_rings(
            features,
            &regions,
            &rings,
            ["accept the driver's features", "map guest memory"],
        )?;
        if self.memory_ready.is_some() {
            self.kicks_held = true;
            tracing::debug!(fs = %self.config.id, "virtio-fs kicks held until guest memory is complete");
        } else {
            self.hand_over_kicks(queues.len())?;
        }
        self.running = queues.len();
        self.metrics.activations.inc();
        tracing::debug!(fs = %self.config.id, queues = queues.len(), "virtio-fs backend started");
        Ok(())
    }

    /// Stops the backend's rings (a driver reset); the session stays, so
    /// the driver can start the device again.
    fn stop(&mut self, queues: usize) -> Result<(), FsError> {
        let path = &self.config.socket;
        let f = &mut self.backend.frontend;
        for index in 0..queues {
            f.set_vring_enable(index, false)
                .map_err(backend_err(path, "disable a queue"))?;
            // GET_VRING_BASE stops the ring (vhost-user, "Stopping rings").
            f.get_vring_base(index)
                .map_err(backend_err(path, "stop a queue"))?;
        }
        self.running = 0;
        self.kicks_held = false;
        self.drop_relay();
        self.metrics.resets.inc();
        tracing::debug!(fs = %self.config.id, "virtio-fs backend stopped");
        Ok(())
    }

    /// The backend used buffers of queue `index`: interrupt the guest
    /// (relaying: return the replies first).
    pub(super) fn signal_used(&mut self, index: usize) {
        let Some(call) = self.call_events.get(index) else {
            return;
        };
        if call.read().is_err() {
            return;
        }
        if self.relay.is_some() {
            self.backend_replies(index);
        } else {
            self.metrics.interrupts.inc();
            self.interrupt.trigger(INTERRUPT_USED_RING);
        }
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        TYPE_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        if self.relay.is_some() {
            // husk serves the guest's rings: its own ring features.
            (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)
        } else {
            self.backend.features & PASSED_THROUGH
        }
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(
            &config_space(&self.config.tag, self.config.num_queues),
            offset,
            data,
        );
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!(offset, "virtio-fs config write ignored");
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        acked_features: u64,
    ) -> Result<(), ActivateError> {
        let expected = self.queue_sizes.len();
        if queues.len() != expected {
            return Err(ActivateError::QueueCount {
                expected,
                got: queues.len(),
            });
        }
        self.started = Some(queues.iter().map(running_queue).collect());
        self.queue(Op::Start {
            mem,
            queues,
            features: acked_features,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.started = None;
        // The event loop carries out the queued work in order: a start
        // still queued runs and is undone right after.
        let started = self.pending.iter().any(|op| matches!(op, Op::Start { .. }));
        if started || self.running > 0 {
            let queues = self.queue_sizes.len();
            self.queue(Op::Stop { queues });
        }
    }

    fn needs_reset(&self) -> bool {
        self.broken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_holds_the_tag_and_the_request_queues() {
        let space = config_space("vol", 1);
        assert_eq!(&space[..3], b"vol");
        assert!(space[3..TAG_LEN].iter().all(|b| *b == 0));
        assert_eq!(&space[TAG_LEN..], &1u32.to_le_bytes());
        let long = "t".repeat(TAG_LEN);
        let space = config_space(&long, 2);
        assert_eq!(&space[..TAG_LEN], long.as_bytes());
        assert_eq!(&space[TAG_LEN..], &2u32.to_le_bytes());
    }

    #[test]
    fn rings_outside_guest_memory_are_refused() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut q = Queue::new(256).unwrap();
        q.set_size(256);
        q.set_desc_table_address(Some(0x1000), Some(0));
        q.set_avail_ring_address(Some(0x3000), Some(0));
        q.set_used_ring_address(Some(0x4000), Some(0));
        let rings = vring_config(&mem, &q).unwrap();
        assert_eq!(rings.queue_size, 256);
        assert_eq!(rings.avail_ring_addr - rings.desc_table_addr, 0x2000);
        // The used ring runs past the end of memory.
        q.set_used_ring_address(Some(0x10000 - 64), Some(0));
        assert!(matches!(vring_config(&mem, &q), Err(FsError::Memory(_))));
    }

    use super::super::test_backend::{req, Script, StubBackend};
    use crate::vstate::memory::{create_with, Backing};

    fn dir(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("husk-fs-{}-{name}", std::process::id()))
    }

    fn config(socket: &std::path::Path, num_queues: u16) -> FsConfig {
        FsConfig {
            id: "fs0".into(),
            tag: "vol".into(),
            socket: socket.to_path_buf(),
            num_queues,
            queue_size: 256,
            relay: false,
        }
    }

    fn stub(name: &str, script: Script) -> StubBackend {
        StubBackend::spawn(&dir(name), name, script).unwrap()
    }

    /// The driver's queues, laid out in the first 64 KiB of `mem`.
    fn queues(n: usize) -> Vec<Queue> {
        (0..n)
            .map(|i| {
                let base = 0x1_0000 * (i as u64 + 1);
                let mut q = Queue::new(256).unwrap();
                q.set_size(256);
                q.set_desc_table_address(Some(base as u32), Some(0));
                q.set_avail_ring_address(Some((base + 0x1000) as u32), Some(0));
                q.set_used_ring_address(Some((base + 0x2000) as u32), Some(0));
                q.set_ready(true);
                q
            })
            .collect()
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

    #[test]
    fn the_backend_is_negotiated_with_when_the_device_is_built() {
        let b = stub(
            "negotiate",
            Script {
                queues: 2,
                ..Default::default()
            },
        );
        let fs = Fs::new(&config(b.socket(), 1)).unwrap();
        assert_eq!(
            b.seen(),
            [
                req::SET_OWNER,
                req::GET_FEATURES,
                req::GET_PROTOCOL_FEATURES,
                16,
                req::GET_QUEUE_NUM
            ]
        );
        // Only what husk passes through: not ACCESS_PLATFORM (bit 33) nor
        // vhost-user's own bit 30.
        assert_eq!(fs.avail_features(), (1 << 32) | (1 << 29) | (1 << 28));
        assert_eq!(fs.queue_max_sizes(), [256, 256]);
        let mut space = [0u8; 40];
        fs.read_config(0, &mut space);
        assert_eq!(&space[..4], b"vol\0");
        assert_eq!(&space[36..], &1u32.to_le_bytes());
    }

    #[test]
    fn more_queues_than_the_backend_serves_are_refused() {
        let b = stub(
            "queues",
            Script {
                queues: 2,
                ..Default::default()
            },
        );
        let e = Fs::new(&config(b.socket(), 2)).unwrap_err();
        assert!(matches!(e, FsError::Unsupported { .. }), "{e}");
        assert!(e.to_string().contains("it serves 2"), "{e}");
    }

    #[test]
    fn start_hands_memory_and_rings_over_and_a_reset_stops_them() {
        let b = stub(
            "start",
            Script {
                queues: 2,
                ..Default::default()
            },
        );
        let mut fs = Fs::new(&config(b.socket(), 1)).unwrap();
        let mem = create_with(1 << 20, Backing::Shared).unwrap();
        fs.activate(mem.clone(), queues(2), 1 << 32).unwrap();
        // Nothing reaches the backend on the driver's thread.
        assert!(!b.seen().contains(&req::SET_MEM_TABLE));
        fs.run_pending();
        let seen = wait_for(&b, req::SET_VRING_ENABLE, 2);
        for code in [
            req::SET_FEATURES,
            req::SET_MEM_TABLE,
            req::SET_VRING_CALL,
            req::SET_VRING_KICK,
        ] {
            assert!(seen.contains(&code), "{code} not in {seen:?}");
        }
        assert_eq!(seen.iter().filter(|c| **c == req::SET_VRING_NUM).count(), 2);
        assert!(!fs.broken() && !fs.needs_reset());
        assert_eq!(fs.metrics().activations.get(), 1);
        // A reset stops both rings; the session stays for the next start.
        fs.reset();
        fs.run_pending();
        assert_eq!(
            wait_for(&b, req::GET_VRING_BASE, 2)
                .iter()
                .filter(|c| **c == req::GET_VRING_BASE)
                .count(),
            2
        );
        fs.activate(mem, queues(2), 1 << 32).unwrap();
        fs.run_pending();
        wait_for(&b, req::SET_MEM_TABLE, 2);
        assert_eq!(fs.metrics().activations.get(), 2);
        assert!(!fs.broken());
    }

    /// A two-queue device whose guest memory is still being filled: its
    /// backend, the device, and the memory-complete eventfd.
    fn filling(name: &str) -> (StubBackend, Fs, EventFd) {
        let b = stub(
            name,
            Script {
                queues: 2,
                ..Default::default()
            },
        );
        let mut fs = Fs::new(&config(b.socket(), 1)).unwrap();
        let ready = EventFd::new(EFD_NONBLOCK).unwrap();
        fs.wait_for_memory(ready.try_clone().unwrap());
        (b, fs, ready)
    }

    fn kicks_handed_over(b: &StubBackend) -> usize {
        let seen = wait_for(b, req::SET_VRING_ENABLE, 2);
        seen.iter().filter(|c| **c == req::SET_VRING_KICK).count()
    }

    #[test]
    fn kicks_wait_until_guest_memory_is_complete() {
        use super::super::event_handler::TOKEN_MEMORY;
        let (b, mut fs, ready) = filling("held");
        let mem = create_with(1 << 20, Backing::Shared).unwrap();
        fs.activate(mem, queues(2), 1 << 32).unwrap();
        fs.try_run_pending().unwrap();
        // Memory and rings are the backend's; the kicks are not, so it
        // cannot start serving (and reading guest memory) yet.
        let seen = wait_for(&b, req::SET_VRING_CALL, 2);
        assert!(seen.contains(&req::SET_MEM_TABLE), "{seen:?}");
        assert!(!seen.contains(&req::SET_VRING_KICK), "{seen:?}");
        assert!(!seen.contains(&req::SET_VRING_ENABLE), "{seen:?}");
        // A kick the guest gives meanwhile waits in its eventfd.
        fs.queue_events()[1].write(1).unwrap();
        ready.write(1).unwrap();
        assert_eq!(
            fs.handle_event(TOKEN_MEMORY, vmm_sys_util::epoll::EventSet::IN),
            Some(TOKEN_MEMORY)
        );
        assert_eq!(kicks_handed_over(&b), 2);
        assert!(!fs.broken());
        assert_eq!(fs.queue_events()[1].read().unwrap(), 1);
        fs.forget_memory_ready();
        assert!(fs.memory_ready_event().is_none());
    }

    #[test]
    fn a_device_started_after_memory_is_complete_gets_its_kicks_at_once() {
        use super::super::event_handler::TOKEN_MEMORY;
        let (b, mut fs, ready) = filling("late");
        ready.write(1).unwrap();
        fs.handle_event(TOKEN_MEMORY, vmm_sys_util::epoll::EventSet::IN);
        fs.forget_memory_ready();
        let mem = create_with(1 << 20, Backing::Shared).unwrap();
        fs.activate(mem, queues(2), 1 << 32).unwrap();
        fs.run_pending();
        assert_eq!(kicks_handed_over(&b), 2);
    }

    #[test]
    fn private_memory_cannot_be_handed_over() {
        let b = stub(
            "private",
            Script {
                queues: 2,
                ..Default::default()
            },
        );
        let mut fs = Fs::new(&config(b.socket(), 1)).unwrap();
        let mem = create_with(1 << 20, Backing::Private).unwrap();
        fs.activate(mem, queues(2), 1 << 32).unwrap();
        fs.run_pending();
        assert!(fs.needs_reset());
        assert_eq!(fs.interrupt().status() & INTERRUPT_CONFIG, INTERRUPT_CONFIG);
        assert!(!b.seen().contains(&req::SET_MEM_TABLE));
    }

    #[test]
    fn a_relaying_device_takes_private_memory_and_serves_the_guest_s_kicks() {
        use super::super::event_handler::TOKEN_KICK;
        use vm_memory::Bytes;
        let b = stub(
            "relay",
            Script {
                queues: 2,
                ..Default::default()
            },
        );
        let mut fs = Fs::new(&FsConfig {
            relay: true,
            ..config(b.socket(), 1)
        })
        .unwrap();
        assert!(fs.relays());
        // husk's own ring features, whatever the backend offers.
        assert_eq!(fs.avail_features(), (1 << 32) | (1 << 29));
        let mem = create_with(1 << 20, Backing::Private).unwrap();
        fs.activate(mem.clone(), queues(2), 1 << 32).unwrap();
        fs.run_pending();
        // The backend gets the relay's memory and rings, and its kicks.
        assert_eq!(kicks_handed_over(&b), 2);
        assert!(!fs.broken(), "private memory is fine when relaying");
        // The guest offers a chain too short for a FUSE request on the
        // request queue and kicks: husk returns it, unforwarded.
        let (table, avail, used) = (0x2_0000u64, 0x2_1000u64, 0x2_2000u64);
        let desc = virtio_queue::desc::split::Descriptor::new(0x8_0000, 8, 0, 0);
        mem.write_obj(desc, GuestAddress(table)).unwrap();
        mem.write_obj(0u16, GuestAddress(avail + 4)).unwrap();
        mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
        fs.queue_events()[1].write(1).unwrap();
        fs.handle_event(TOKEN_KICK + 1, vmm_sys_util::epoll::EventSet::IN);
        assert_eq!(mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap(), 1);
        assert_eq!(mem.read_obj::<u32>(GuestAddress(used + 8)).unwrap(), 0);
        assert_eq!(fs.metrics().invalid_requests.get(), 1);
        assert_eq!(fs.metrics().requests.get(), 0);
        assert_eq!(
            fs.interrupt().status() & INTERRUPT_USED_RING,
            INTERRUPT_USED_RING
        );
        assert_eq!(fs.queue_events()[1].read().ok(), None);
    }

    #[test]
    fn a_refused_or_abandoned_set_up_breaks_the_device_for_good() {
        for (name, script) in [
            (
                "refused",
                Script {
                    queues: 2,
                    refuse: Some(req::SET_MEM_TABLE),
                    ..Default::default()
                },
            ),
            (
                "hung-up",
                Script {
                    queues: 2,
                    hang_up_on: Some(req::SET_VRING_KICK),
                    ..Default::default()
                },
            ),
        ] {
            let b = stub(name, script);
            let mut fs = Fs::new(&config(b.socket(), 1)).unwrap();
            let mem = create_with(1 << 20, Backing::Shared).unwrap();
            fs.activate(mem.clone(), queues(2), 1 << 32).unwrap();
            fs.run_pending();
            assert!(fs.broken(), "{name}");
            assert_eq!(fs.metrics().backend_failures.get(), 1, "{name}");
            // Later starts fail at once, without the backend.
            let before = b.seen().len();
            fs.reset();
            fs.activate(mem, queues(2), 1 << 32).unwrap();
            fs.run_pending();
            assert_eq!(b.seen().len(), before, "{name}");
            assert_eq!(fs.metrics().backend_failures.get(), 1, "{name}");
        }
    }

    #[test]
    fn a_hang_up_is_noticed_by_the_event_loop() {
        let b = stub(
            "hang-up",
            Script {
                queues: 2,
                ..Default::default()
            },
        );
        let mut fs = Fs::new(&config(b.socket(), 1)).unwrap();
        assert_eq!(
            fs.handle_event(
                super::super::event_handler::TOKEN_BACKEND,
                vmm_sys_util::epoll::EventSet::READ_HANG_UP
            ),
            Some(super::super::event_handler::TOKEN_BACKEND)
        );
        assert!(fs.needs_reset());
        assert_eq!(fs.metrics().backend_failures.get(), 1);
    }

    #[test]
    fn a_missing_backend_is_a_connect_error() {
        let dir = std::env::temp_dir().join(format!("husk-fs-test-{}", std::process::id()));
        let config = FsConfig {
            id: "fs0".into(),
            tag: "vol".into(),
            socket: dir.join("absent.sock"),
            num_queues: 1,
            queue_size: 1024,
            relay: false,
        };
        assert!(matches!(Fs::new(&config), Err(FsError::Connect { .. })));
    }
}
