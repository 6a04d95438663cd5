//! The virtio-blk device: a raw file as a disk, read-only or writable, with
//! flush and GET_ID.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::request::{Request, RequestType};
use super::{ID_BYTES, QUEUE_SIZE, SECTOR_SIZE, TYPE_BLOCK};
use crate::error::Chain;

/// Data buffers per request the driver may use (VIRTIO_BLK_F_SEG_MAX): all
/// the descriptors a chain can have but the header and the status. Without
/// it Linux sends one buffer per request, so a large transfer from
/// scattered guest pages becomes many small requests.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
use crate::devices::virtio::chain;
use crate::devices::virtio::{
    read_config_bytes, ActivateError, Interrupt, Rearm, VirtioDevice, INTERRUPT_USED_RING,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::host_file::Accept;
use crate::log_limit::LogLimiter;
use crate::metrics::BlockMetrics;

/// A drive as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// The drive id, returned by GET_ID (at most 20 bytes are visible).
    pub id: String,
    /// The backing file.
    pub path: PathBuf,
    /// Refuse writes.
    pub read_only: bool,
}

/// Errors while setting up a drive.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The backing file cannot be opened.
    #[error("cannot open drive {id} backing file {path}")]
    Open {
        /// Drive id.
        id: String,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// An eventfd could not be created.
    #[error("cannot create drive {id} eventfds")]
    EventFd {
        /// Drive id.
        id: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

pub(super) enum State {
    Inactive,
    Active { mem: GuestMemoryMmap, queue: Queue },
}

/// A virtio-blk device.
pub struct Block {
    config: BlockConfig,
    file: File,
    capacity: u64,
    id_bytes: [u8; ID_BYTES],
    avail_features: u64,
    queue_sizes: [u16; 1],
    queue_events: [EventFd; 1],
    interrupt: Interrupt,
    pub(super) state: State,
    metrics: Arc<BlockMetrics>,
    /// Warnings the guest can cause at will (a bad used-ring entry).
    guest_log: LogLimiter,
    /// Host I/O errors, which a guest can repeat at will (a full disk).
    io_log: LogLimiter,
}

/// Opens a drive's backing: a regular file or a block device (an LVM
/// volume, a devmapper thin device, a loop device), whose size only a seek
/// to its end tells (its metadata says 0). Anything else (a FIFO, a
/// socket, a character device) is refused without blocking.
fn open_backing(path: &Path, read_only: bool) -> std::io::Result<(File, u64)> {
    let mut file = crate::host_file::open(path, !read_only, Accept::FileOrBlockDevice)?;
    let len = file.seek(SeekFrom::End(0))?;
    Ok((file, len))
}

impl Block {
    /// Opens the backing file and builds the device.
    pub fn new(config: BlockConfig) -> Result<Self, BlockError> {
        let (file, len) =
            open_backing(&config.path, config.read_only).map_err(|source| BlockError::Open {
                id: config.id.clone(),
                path: config.path.clone(),
                source,
            })?;
        let evt_err = |source| BlockError::EventFd {
            id: config.id.clone(),
            source,
        };
        let mut id_bytes = [0u8; ID_BYTES];
        let n = config.id.len().min(ID_BYTES);
        id_bytes[..n].copy_from_slice(&config.id.as_bytes()[..n]);
        let mut avail_features = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_BLK_F_FLUSH)
            | (1u64 << VIRTIO_BLK_F_SEG_MAX)
            | (1u64 << VIRTIO_RING_F_EVENT_IDX);
        if config.read_only {
            avail_features |= 1u64 << VIRTIO_BLK_F_RO;
        }
        Ok(Block {
            file,
            // A trailing partial sector is not addressable.
            capacity: len - len % SECTOR_SIZE,
            id_bytes,
            avail_features,
            queue_sizes: [QUEUE_SIZE],
            queue_events: [EventFd::new(EFD_NONBLOCK).map_err(evt_err)?],
            interrupt: Interrupt::new().map_err(evt_err)?,
            state: State::Inactive,
            metrics: Arc::new(BlockMetrics::default()),
            guest_log: LogLimiter::default(),
            io_log: LogLimiter::default(),
            config,
        })
    }

    /// The drive's I/O counters.
    pub fn metrics(&self) -> Arc<BlockMetrics> {
        self.metrics.clone()
    }

    fn count(m: &BlockMetrics, req: &Request, status: u8) {
        if u32::from(status) == virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR {
            m.io_errors.inc();
            return;
        }
        if u32::from(status) != virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK {
            m.invalid_requests.inc();
            return;
        }
        let bytes: u64 = req.data.iter().map(|&(_, len)| u64::from(len)).sum();
        match req.kind {
            RequestType::In => {
                m.read_count.inc();
                m.read_bytes.add(bytes);
            }
            RequestType::Out => {
                m.write_count.inc();
                m.write_bytes.add(bytes);
            }
            RequestType::Flush => m.flush_count.inc(),
            RequestType::GetId | RequestType::Unsupported(_) => {}
        }
    }

    /// The drive's configuration.
    pub fn config(&self) -> &BlockConfig {
        &self.config
    }

    /// The disk size in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Replaces the backing file (same read-only mode) on a running VM, the
    /// way container root filesystems arrive in spare drive slots. Requests
    /// already served used the old file; the caller then tells the driver
    /// the configuration changed, so it rereads the capacity. On error the
    /// old file stays in place.
    pub fn swap_backing(&mut self, path: PathBuf) -> Result<(), BlockError> {
        let (file, len) =
            open_backing(&path, self.config.read_only).map_err(|source| BlockError::Open {
                id: self.config.id.clone(),
                path: path.clone(),
                source,
            })?;
        self.file = file;
        self.capacity = len - len % SECTOR_SIZE;
        self.config.path = path;
        self.metrics.swaps.inc();
        tracing::info!(drive = %self.config.id, capacity = self.capacity, "backing file swapped");
        Ok(())
    }

    /// Serves every request the guest has queued; interrupts it if it wants
    /// to know. Called from the event loop when the queue is notified.
    /// While it drains the queue the driver is asked not to notify (it
    /// would only wake this loop for requests it is about to see anyway);
    /// notifications are re-armed before it returns, and requests that
    /// slipped in meanwhile are served first.
    pub fn process_queue(&mut self) {
        let State::Active { mem, queue } = &mut self.state else {
            // Notified before DRIVER_OK: nothing to serve yet.
            return;
        };
        let mut completed = false;
        let mut broken = false;
        // One event loop serves every device: a guest that keeps the queue
        // full gets a queue's worth per turn, then this comes back through
        // its own notification after the others had theirs.
        let mut budget = usize::from(QUEUE_SIZE);
        let mut rearm = Rearm::default();
        loop {
            if let Err(e) = queue.disable_notification(&*mem) {
                tracing::warn!(drive = %self.config.id, error = %Chain(&e), "cannot suppress notifications");
            }
            let budget_before = budget;
            while budget > 0 {
                let Some(chain) = chain::pop(queue, mem) else {
                    break;
                };
                budget -= 1;
                let head = chain.head_index();
                let used_len = match Request::parse(chain, mem) {
                    Ok(req) => {
                        let done = req.execute(
                            mem,
                            &mut self.file,
                            self.capacity,
                            self.config.read_only,
                            &self.id_bytes,
                            &mut self.io_log,
                        );
                        Self::count(&self.metrics, &req, done.status);
                        done.used_len
                    }
                    Err((e, status)) => {
                        self.metrics.invalid_requests.inc();
                        tracing::debug!(drive = %self.config.id, error = %Chain(&e), "bad virtio-blk request");
                        // Tell the guest if it left room to be told.
                        status
                            .filter(|(a, _)| {
                                let ioerr = virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8;
                                vm_memory::Bytes::write_obj(&*mem, ioerr, *a).is_ok()
                            })
                            .map_or(0, |(_, used_len)| used_len)
                    }
                };
                tracing::trace!(drive = %self.config.id, head, used_len, "virtio-blk request done");
                if let Err(e) = queue.add_used(&*mem, head, used_len) {
                    // A head index outside the queue: the guest's doing.
                    crate::limited!(self.guest_log, warn, drive = %self.config.id, error = %Chain(&e), "cannot return a virtio-blk request");
                    broken = true;
                    break;
                }
                completed = true;
            }
            if broken {
                break;
            }
            if budget == 0 {
                // Notifications stay off; this wakes the loop again.
                let _ = self.queue_events[0].write(1);
                break;
            }
            if budget != budget_before {
                rearm.served();
            }
            match rearm.rearm(queue, mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    // The avail ring is unreadable: the next pop fails the
                    // same way, so waiting for a notification is all that
                    // is left.
                    tracing::warn!(drive = %self.config.id, error = %Chain(&e), "cannot re-arm notifications");
                    break;
                }
            }
        }
        if completed {
            match queue.needs_notification(&*mem) {
                Ok(true) => self.interrupt.trigger(INTERRUPT_USED_RING),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(drive = %self.config.id, error = %Chain(&e), "used ring unreadable");
                    self.interrupt.trigger(INTERRUPT_USED_RING);
                }
            }
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config: capacity (sectors), size_max (not
        // offered: 0), seg_max; the rest belongs to features husk does not
        // offer and reads as zero.
        let mut config = [0u8; 16];
        config[..8].copy_from_slice(&(self.capacity / SECTOR_SIZE).to_le_bytes());
        config[12..].copy_from_slice(&SEG_MAX.to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!(offset, "virtio-blk config write ignored");
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        mut queues: Vec<Queue>,
        _acked_features: u64,
    ) -> Result<(), ActivateError> {
        let got = queues.len();
        let (Some(queue), 1) = (queues.pop(), got) else {
            return Err(ActivateError::QueueCount { expected: 1, got });
        };
        self.state = State::Active { mem, queue };
        // Requests queued before activation are served by the event loop,
        // like all others: this runs on a vCPU thread, whose seccomp
        // filter allows no disk I/O.
        let _ = self.queue_events[0].write(1);
        Ok(())
    }

    fn reset(&mut self) {
        self.state = State::Inactive;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{
        d, hand_laid_queue, mem, QueueLayout, WriteAudit, NEXT, WRITE,
    };
    use std::io::{Read, Seek, SeekFrom, Write};
    use virtio_bindings::virtio_blk::*;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x10_1000;
    const STATUS: u64 = 0x10_8000;

    struct Disk {
        path: PathBuf,
    }

    impl Disk {
        fn new(bytes: usize) -> Self {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let path = std::env::temp_dir().join(format!(
                "husk-blk-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let mut f = File::create(&path).unwrap();
            f.write_all(&vec![0u8; bytes]).unwrap();
            Disk { path }
        }
        fn read_at(&self, off: u64, len: usize) -> Vec<u8> {
            let mut f = File::open(&self.path).unwrap();
            f.seek(SeekFrom::Start(off)).unwrap();
            let mut b = vec![0; len];
            f.read_exact(&mut b).unwrap();
            b
        }
    }

    impl Drop for Disk {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn block(disk: &Disk, read_only: bool) -> Block {
        Block::new(BlockConfig {
            id: "rootfs-id".into(),
            path: disk.path.clone(),
            read_only,
        })
        .unwrap()
    }

    fn header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
        mem.write_obj(kind, GuestAddress(HDR)).unwrap();
        mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
    }

    /// Queues `descs` (descriptor table indices from 0), activates the device
    /// (which asks the event loop to serve them), serves them as the event
    /// loop would, and returns (used id, used len, status byte).
    fn serve(blk: &mut Block, mem: &GuestMemoryMmap, descs: &[RawDescriptor]) -> (u32, u32, u8) {
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let vq = MockSplitQueue::new(mem, 16);
        vq.add_desc_chains(descs, 0).unwrap();
        let q: Queue = vq.create_queue().unwrap();
        blk.activate(mem.clone(), vec![q], 0).unwrap();
        assert_eq!(
            blk.queue_events[0].read().unwrap(),
            1,
            "activation wakes the event loop"
        );
        // Every request served here is audited: the device writes nothing
        // but the used ring and, of the chain, as much as it says it did.
        let audit = WriteAudit::new(mem, &[QueueLayout::of(&vq, 16)]);
        blk.process_queue();
        audit.check(mem);
        let used = vq.used();
        assert_eq!(used.idx().load(), 1, "exactly one request completed");
        let elem = used.ring().ref_at(0).unwrap().load();
        let status: u8 = mem.read_obj(GuestAddress(STATUS)).unwrap();
        (elem.id(), elem.len(), status)
    }

    fn rw_chain(data_flags: u16, len: u32) -> Vec<RawDescriptor> {
        vec![
            d(HDR, 16, NEXT, 1),
            d(DATA, len, data_flags | NEXT, 2),
            d(STATUS, 1, WRITE, 0),
        ]
    }

    #[test]
    fn write_then_read_round_trips_through_the_file() {
        let disk = Disk::new(64 * 1024);
        let mut blk = block(&disk, false);
        let m = mem();
        let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
        m.write_slice(&pattern, GuestAddress(DATA)).unwrap();
        header(&m, VIRTIO_BLK_T_OUT, 3);
        let (id, len, status) = serve(&mut blk, &m, &rw_chain(0, 1024));
        assert_eq!((id, len, status), (0, 1, VIRTIO_BLK_S_OK as u8));
        assert_eq!(disk.read_at(3 * 512, 1024), pattern);

        let m = mem();
        let mut blk = block(&disk, false);
        header(&m, VIRTIO_BLK_T_IN, 3);
        let (_, len, status) = serve(&mut blk, &m, &rw_chain(WRITE, 1024));
        assert_eq!((len, status), (1025, VIRTIO_BLK_S_OK as u8));
        let mut back = vec![0u8; 1024];
        m.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(back, pattern);
    }

    #[test]
    fn scattered_buffers_and_buffers_across_memory_regions() {
        // Three buffers out of order in guest memory, one request: the
        // sectors hold them in chain order.
        let disk = Disk::new(8192);
        let m = mem();
        let parts: [(u64, u8); 3] = [(0x10_6000, 0xaa), (0x10_2000, 0xbb), (0x10_4000, 0xcc)];
        for (addr, byte) in parts {
            m.write_slice(&[byte; 512], GuestAddress(addr)).unwrap();
        }
        let mut chain = vec![d(HDR, 16, NEXT, 1)];
        for (i, (addr, _)) in parts.iter().enumerate() {
            chain.push(d(*addr, 512, NEXT, i as u16 + 2));
        }
        chain.push(d(STATUS, 1, WRITE, 0));
        let mut blk = block(&disk, false);
        header(&m, VIRTIO_BLK_T_OUT, 2);
        let (_, _, status) = serve(&mut blk, &m, &chain);
        assert_eq!(status, VIRTIO_BLK_S_OK as u8);
        let on_disk = disk.read_at(1024, 1536);
        assert!(on_disk[..512].iter().all(|&b| b == 0xaa));
        assert!(on_disk[512..1024].iter().all(|&b| b == 0xbb));
        assert!(on_disk[1024..].iter().all(|&b| b == 0xcc));

        // A buffer across the boundary of two guest memory regions takes
        // the buffer-by-buffer path and reads the same bytes.
        let boundary = 0x20_0000u64;
        let m = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), boundary as usize),
            (GuestAddress(boundary), boundary as usize),
        ])
        .unwrap();
        let mut blk = block(&disk, false);
        header(&m, VIRTIO_BLK_T_IN, 2);
        let across = boundary - 512;
        let chain = [
            d(HDR, 16, NEXT, 1),
            d(across, 1024, WRITE | NEXT, 2),
            d(STATUS, 1, WRITE, 0),
        ];
        let (_, len, status) = serve(&mut blk, &m, &chain);
        assert_eq!((len, status), (1025, VIRTIO_BLK_S_OK as u8));
        let mut back = vec![0u8; 1024];
        m.read_slice(&mut back, GuestAddress(across)).unwrap();
        assert_eq!(back, on_disk[..1024]);
    }

    #[test]
    fn features_and_config_space() {
        let disk = Disk::new(10 * 512 + 100);
        let rw = block(&disk, false);
        assert_eq!(rw.capacity(), 10 * 512, "partial sector dropped");
        let mut cap = [0u8; 8];
        rw.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 10);
        assert_ne!(rw.avail_features() & (1 << VIRTIO_BLK_F_FLUSH), 0);
        assert_eq!(rw.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(rw.avail_features() & (1 << VIRTIO_BLK_F_SEG_MAX), 0);
        let mut seg_max = [0u8; 4];
        rw.read_config(12, &mut seg_max);
        assert_eq!(u32::from_le_bytes(seg_max), u32::from(QUEUE_SIZE) - 2);
        assert_ne!(
            block(&disk, true).avail_features() & (1 << VIRTIO_BLK_F_RO),
            0
        );
    }

    #[test]
    fn read_only_drive_refuses_writes() {
        let disk = Disk::new(4096);
        let mut blk = block(&disk, true);
        let m = mem();
        m.write_slice(&[0xee; 512], GuestAddress(DATA)).unwrap();
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let (_, _, status) = serve(&mut blk, &m, &rw_chain(0, 512));
        assert_eq!(status, VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(disk.read_at(0, 512), vec![0; 512]);
    }

    #[test]
    fn requests_beyond_the_disk_fail() {
        let disk = Disk::new(4096);
        for (sector, data) in [
            (8u64, 512u32),
            (7, 1024),
            (u64::MAX, 512),
            (u64::MAX / 512, 512),
        ] {
            let mut blk = block(&disk, false);
            let m = mem();
            header(&m, VIRTIO_BLK_T_IN, sector);
            let (_, len, status) = serve(&mut blk, &m, &rw_chain(WRITE, data));
            // The status is the last of the chain's writable bytes, and
            // the used length counts from the first.
            assert_eq!(
                (len, status),
                (data + 1, VIRTIO_BLK_S_IOERR as u8),
                "sector {sector}"
            );
        }
    }

    #[test]
    fn partial_sectors_and_wrong_directions_fail() {
        let disk = Disk::new(4096);
        let cases = [
            (VIRTIO_BLK_T_IN, rw_chain(WRITE, 100)),
            (VIRTIO_BLK_T_IN, rw_chain(0, 512)),
            (VIRTIO_BLK_T_OUT, rw_chain(WRITE, 512)),
            // Write-only header.
            (
                VIRTIO_BLK_T_IN,
                vec![d(HDR, 16, WRITE | NEXT, 1), d(STATUS, 1, WRITE, 0)],
            ),
            // Short header.
            (
                VIRTIO_BLK_T_IN,
                vec![d(HDR, 8, NEXT, 1), d(STATUS, 1, WRITE, 0)],
            ),
            // No header at all.
            (VIRTIO_BLK_T_IN, vec![d(STATUS, 1, WRITE, 0)]),
        ];
        for (kind, chain) in cases {
            let mut blk = block(&disk, false);
            let m = mem();
            header(&m, kind, 0);
            let (_, _, status) = serve(&mut blk, &m, &chain);
            assert_eq!(status, VIRTIO_BLK_S_IOERR as u8, "{kind} {chain:?}");
        }
    }

    #[test]
    fn buffers_outside_guest_memory_never_touch_the_host() {
        let disk = Disk::new(4096);
        for (addr, len) in [
            (0xffff_0000_0000u64, 512u32),
            (0x40_0000 - 256, 512),
            (u64::MAX - 10, 512),
            (DATA, 0),
        ] {
            let mut blk = block(&disk, false);
            let m = mem();
            header(&m, VIRTIO_BLK_T_IN, 0);
            let chain = vec![
                d(HDR, 16, NEXT, 1),
                d(addr, len, WRITE | NEXT, 2),
                d(STATUS, 1, WRITE, 0),
            ];
            let (_, used, status) = serve(&mut blk, &m, &chain);
            assert_eq!(
                (used, status),
                (len + 1, VIRTIO_BLK_S_IOERR as u8),
                "{addr:#x}+{len:#x}"
            );
        }
    }

    #[test]
    fn chain_longer_than_4_gib_completes_with_nothing_written() {
        // virtio-queue stops yielding descriptors once a chain passes 4 GiB,
        // so the status descriptor is never reached.
        let disk = Disk::new(4096);
        let mut blk = block(&disk, false);
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let (_, used, status) = serve(&mut blk, &m, &rw_chain(WRITE, u32::MAX));
        assert_eq!((used, status), (0, 0xff));
    }

    #[test]
    fn unusable_status_descriptor_completes_with_nothing_written() {
        let disk = Disk::new(4096);
        for status_desc in [
            d(STATUS, 1, 0, 0),
            d(STATUS, 0, WRITE, 0),
            d(0xffff_0000_0000, 1, WRITE, 0),
        ] {
            let mut blk = block(&disk, false);
            let m = mem();
            header(&m, VIRTIO_BLK_T_IN, 0);
            let chain = vec![
                d(HDR, 16, NEXT, 1),
                d(DATA, 512, WRITE | NEXT, 2),
                status_desc,
            ];
            let (_, used, status) = serve(&mut blk, &m, &chain);
            assert_eq!((used, status), (0, 0xff));
        }
    }

    #[test]
    fn looping_chain_terminates() {
        let disk = Disk::new(4096);
        let mut blk = block(&disk, false);
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        // 0 -> 1 -> 2 -> 1 -> 2 ...: bounded by the queue size.
        let chain = vec![
            d(HDR, 16, NEXT, 1),
            d(DATA, 512, WRITE | NEXT, 2),
            d(STATUS, 1, WRITE | NEXT, 1),
        ];
        let vq = MockSplitQueue::new(&m, 16);
        vq.add_desc_chains(&chain, 0).unwrap();
        let q: Queue = vq.create_queue().unwrap();
        blk.activate(m.clone(), vec![q], 0).unwrap();
        blk.process_queue();
        assert_eq!(vq.used().idx().load(), 1);
    }

    #[test]
    fn an_indirect_descriptor_is_refused_and_its_table_never_read() {
        // VIRTIO_RING_F_INDIRECT_DESC is not offered, so the driver cannot
        // have negotiated it: the chain is completed with nothing written
        // and counted, as any malformed chain, whether the whole request or
        // only its tail sits in the table.
        use crate::devices::virtio::test_utils::{write_table, INDIRECT};
        use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
        const TABLE: u64 = 0x20_0000;
        let disk = Disk::new(4096);
        std::fs::write(&disk.path, [7u8; 4096]).unwrap();
        assert_eq!(
            block(&disk, false).avail_features() & (1 << VIRTIO_RING_F_INDIRECT_DESC),
            0
        );
        let whole = [
            d(HDR, 16, NEXT, 1),
            d(DATA, 512, WRITE | NEXT, 2),
            d(STATUS, 1, WRITE, 0),
        ];
        let tail = [d(DATA, 512, WRITE | NEXT, 1), d(STATUS, 1, WRITE, 0)];
        for (what, table, head) in [
            ("whole request", &whole[..], vec![]),
            ("tail", &tail[..], vec![d(HDR, 16, NEXT, 1)]),
        ] {
            let m = mem();
            header(&m, VIRTIO_BLK_T_IN, 0);
            let len = write_table(&m, TABLE, table);
            let mut chain = head;
            chain.push(d(TABLE, len, INDIRECT, 0));
            let mut blk = block(&disk, false);
            let (_, used, status) = serve(&mut blk, &m, &chain);
            assert_eq!((used, status), (0, 0xff), "{what}");
            let data: u8 = m.read_obj(GuestAddress(DATA)).unwrap();
            assert_eq!(
                data, 0,
                "{what}: the sector was read into the table's buffer"
            );
            assert_eq!(blk.metrics().invalid_requests.get(), 1, "{what}");
            assert_eq!(blk.metrics().read_count.get(), 0, "{what}");
        }
    }

    #[test]
    fn flush_get_id_and_unknown_types() {
        let disk = Disk::new(4096);
        let m = mem();
        let mut blk = block(&disk, false);
        header(&m, VIRTIO_BLK_T_FLUSH, 0);
        let (_, _, status) = serve(&mut blk, &m, &[d(HDR, 16, NEXT, 1), d(STATUS, 1, WRITE, 0)]);
        assert_eq!(status, VIRTIO_BLK_S_OK as u8);

        let m = mem();
        let mut blk = block(&disk, false);
        header(&m, VIRTIO_BLK_T_GET_ID, 0);
        let (_, used, status) = serve(&mut blk, &m, &rw_chain(WRITE, 20));
        assert_eq!((used, status), (21, VIRTIO_BLK_S_OK as u8));
        let mut id = [0u8; 20];
        m.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..9], b"rootfs-id");
        assert_eq!(id[9..], [0; 11]);

        let m = mem();
        let mut blk = block(&disk, false);
        header(&m, 77, 0);
        let (_, _, status) = serve(&mut blk, &m, &rw_chain(WRITE, 512));
        assert_eq!(status, VIRTIO_BLK_S_UNSUPP as u8);
    }

    #[test]
    fn notification_before_activation_does_nothing() {
        let disk = Disk::new(4096);
        let mut blk = block(&disk, false);
        blk.process_queue();
        blk.reset();
        blk.process_queue();
    }

    #[test]
    fn swapping_the_backing_file_changes_capacity_and_data() {
        let small = Disk::new(4096);
        let big = Disk::new(64 * 1024);
        std::fs::write(&big.path, [7u8; 64 * 1024]).unwrap();
        let mut blk = block(&small, false);
        blk.swap_backing(big.path.clone()).unwrap();
        assert_eq!(blk.capacity(), 64 * 1024);
        let mut cap = [0u8; 8];
        blk.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 128);
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 100);
        let (_, _, status) = serve(&mut blk, &m, &rw_chain(WRITE, 512));
        assert_eq!(status, VIRTIO_BLK_S_OK as u8);
        let b: u8 = m.read_obj(GuestAddress(DATA)).unwrap();
        assert_eq!(b, 7);
        // A failed swap keeps the drive as it was.
        assert!(blk.swap_backing("/nonexistent/img".into()).is_err());
        assert_eq!(blk.capacity(), 64 * 1024);
        assert_eq!(blk.config().path, big.path);
    }

    #[test]
    fn missing_backing_file_is_a_clear_error() {
        let err = Block::new(BlockConfig {
            id: "data".into(),
            path: "/nonexistent/disk.img".into(),
            read_only: false,
        })
        .err()
        .unwrap();
        assert!(err
            .to_string()
            .contains("cannot open drive data backing file /nonexistent/disk.img"));
    }

    /// Three flush requests, served with EVENT_IDX negotiated and the
    /// driver's used_event at `used_event`: returns whether the guest was
    /// interrupted, and the avail_event the device left. (The rings are laid
    /// out here by hand: MockSplitQueue puts its used ring over the end of
    /// its avail ring, where used_event lives.)
    fn serve_three_with_event_idx(used_event: u16) -> (bool, u16) {
        const SIZE: u16 = 16;
        const AVAIL: u64 = 0x1000;
        const USED: u64 = 0x2000;
        let disk = Disk::new(4096);
        let mut blk = block(&disk, false);
        let m = mem();
        header(&m, VIRTIO_BLK_T_FLUSH, 0);
        for i in 0..3u16 {
            let chain = [d(HDR, 16, NEXT, 2 * i + 1), d(STATUS, 1, WRITE, 0)];
            for (j, desc) in chain.into_iter().enumerate() {
                let index = u64::from(2 * i) + j as u64;
                m.write_obj(desc, GuestAddress(16 * index)).unwrap();
            }
            m.write_obj(2 * i, GuestAddress(AVAIL + 4 + 2 * u64::from(i)))
                .unwrap();
        }
        m.write_obj(3u16, GuestAddress(AVAIL + 2)).unwrap();
        m.write_obj(used_event, GuestAddress(AVAIL + 4 + 2 * u64::from(SIZE)))
            .unwrap();
        let q = hand_laid_queue(SIZE, AVAIL, USED, true);
        blk.activate(m.clone(), vec![q], 1 << VIRTIO_RING_F_EVENT_IDX)
            .unwrap();
        blk.process_queue();
        let used_idx: u16 = m.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(used_idx, 3, "all three served in one turn");
        let interrupted = blk.interrupt.status() & INTERRUPT_USED_RING != 0;
        let avail_event: u16 = m
            .read_obj(GuestAddress(USED + 4 + 8 * u64::from(SIZE)))
            .unwrap();
        (interrupted, avail_event)
    }

    #[test]
    fn event_idx_interrupts_only_when_the_driver_asked() {
        assert!(avail_features_offer_event_idx());
        // The driver wants to hear after the first completion: one
        // interrupt for the batch.
        assert_eq!(serve_three_with_event_idx(0), (true, 3));
        // It wants to hear only after the sixth: none yet. Either way the
        // device re-armed notifications at the next request it will see.
        assert_eq!(serve_three_with_event_idx(5), (false, 3));
    }

    fn avail_features_offer_event_idx() -> bool {
        let disk = Disk::new(4096);
        block(&disk, true).avail_features() & (1 << VIRTIO_RING_F_EVENT_IDX) != 0
    }

    #[test]
    fn notifications_are_suppressed_only_while_the_queue_is_drained() {
        // Without EVENT_IDX the device sets VRING_USED_F_NO_NOTIFY while it
        // works and must clear it before it waits again, or the driver
        // would never kick it.
        let disk = Disk::new(4096);
        let mut blk = block(&disk, false);
        let m = mem();
        header(&m, VIRTIO_BLK_T_FLUSH, 0);
        let vq = MockSplitQueue::new(&m, 16);
        vq.add_desc_chains(&[d(HDR, 16, NEXT, 1), d(STATUS, 1, WRITE, 0)], 0)
            .unwrap();
        blk.activate(m.clone(), vec![vq.create_queue().unwrap()], 0)
            .unwrap();
        blk.process_queue();
        assert_eq!(vq.used().idx().load(), 1);
        let flags: u16 = m.read_obj(vq.used_addr()).unwrap();
        assert_eq!(flags, 0, "notifications re-enabled");
        assert_ne!(blk.interrupt.status() & INTERRUPT_USED_RING, 0);
    }

    #[test]
    fn an_avail_index_more_than_a_queue_ahead_does_not_spin_the_loop() {
        // The driver claims 40 new requests in a queue of 16: virtio-queue
        // pops nothing, yet re-arming keeps saying there is more. The
        // device must give up, not spin the event loop (found by the
        // virtio_blk_queue fuzz target).
        for event_idx in [false, true] {
            let disk = Disk::new(4096);
            let mut blk = block(&disk, false);
            let m = mem();
            m.write_obj(40u16, GuestAddress(0x1000 + 2)).unwrap();
            let q = hand_laid_queue(16, 0x1000, 0x2000, event_idx);
            blk.activate(m, vec![q], 0).unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                blk.process_queue();
                let _ = tx.send(());
            });
            assert!(
                rx.recv_timeout(std::time::Duration::from_secs(10)).is_ok(),
                "process_queue spins (event_idx {event_idx})"
            );
        }
    }
}
