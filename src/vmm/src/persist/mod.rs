//! Snapshots: a paused microVM written to two files, and a new microVM
//! built from them that carries on where the first one stopped.
//!
//! The *state file* ([`format`]: versioned, checksummed) holds what KVM
//! and the devices know ([`MicrovmState`]): every vCPU
//! (`vstate::persist`), the interrupt controllers, PIT and kvmclock, the
//! UART and i8042 (`devices::legacy::persist`), and every virtio device's
//! transport and queues (`devices::virtio::persist`) and its own state
//! (each device's `persist` module). The *memory file* holds guest RAM,
//! region after region, with untouched pages left as holes.
//!
//! Restoring checks everything before anything runs: the file's format
//! and checksum, that it describes a VM this husk builds (vCPU count,
//! memory layout), the host's CPU model, and the memory file's size. Guest
//! memory is then the memory file mapped private and copy-on-write
//! (`vstate::memory::from_file`): pages are read on first touch and shared,
//! through the page cache, by every VM restored from the same file.
//!
//! A restored VM is a new process's VM: drives are opened again from their
//! paths (or [`LoadParams::drive_overrides`]), network interfaces attach
//! to their taps (or the ones given in [`LoadParams::net_overrides`]), the
//! vsock device listens on its socket (or [`LoadParams::vsock_uds_path`])
//! with no streams, after telling the guest its transport was reset, and
//! virtio-fs devices connect to their backends (or
//! [`LoadParams::fs_overrides`]) and, if the driver had started them, hand
//! them guest memory and the rings before the guest runs.
//!
//! Two kinds of device are saved only in the state a template VM has them
//! in: a virtio-fs device the guest never sent a request (its FUSE session
//! would live in the backend), and a virtio-mem device with nothing
//! plugged (its region is then left out of the memory file and rebuilt
//! empty). A VM with a vhost-user device needs guest memory the backend
//! can map: its restore copies the memory file's data into memfds
//! ([`memory::from_file_shared`]) instead of mapping the file.

pub mod format;

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::layout::ram_regions;
use crate::config::{HostLimits, MemHotplugConfig, SerialOutput, MIN_MEM_MIB};
use crate::devices::bus::Bus;
use crate::devices::legacy::persist::{I8042State, SerialSnapshot};
use crate::devices::legacy::{i8042, serial, Serial, I8042};
use crate::devices::virtio::block::persist::BlockState;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::fs::persist::{FsSnapshotError, FsState};
use crate::devices::virtio::fs::{Fs, FsError};
use crate::devices::virtio::mem::persist::{MemSnapshotError, MemState};
use crate::devices::virtio::mem::Mem;
use crate::devices::virtio::net::persist::NetState;
use crate::devices::virtio::net::MacAddr;
use crate::devices::virtio::net::Net;
use crate::devices::virtio::persist::{TransportRestoreError, TransportState};
use crate::devices::virtio::vsock::persist::VsockState;
use crate::devices::virtio::vsock::Vsock;
use crate::exit::{ExitNotifier, ResetTrigger};
use crate::metrics::Metrics;
use crate::vmm::{
    AttachedDevice, AttachedDrive, AttachedMem, MmioSlots, VirtioSlot, Vmm, VmmError,
};
use crate::vstate::lazy_memory;
use crate::vstate::memory::{self, MemoryFileError, RegionState};
use crate::vstate::persist::{msrs_to_save, CpuModel, StateError, VcpuState, VmState};
use crate::vstate::vcpu::{PauseGate, Vcpu, VcpuShared};
use crate::vstate::vm::{self, Vm, VmError};

/// How long a snapshot waits for each parked vCPU's state.
const VCPU_STATE_TIMEOUT: Duration = Duration::from_secs(2);

/// What a snapshot records, and a restore checks, about the host.
#[derive(Debug, Clone)]
pub struct HostInfo {
    /// The CPU model KVM reports.
    pub cpu: CpuModel,
    /// The MSRs to save for each vCPU, in restore order.
    pub msrs: Arc<Vec<u32>>,
}

impl HostInfo {
    /// Reads it from KVM (before the VMM thread is confined).
    pub fn read(kvm: &kvm_ioctls::Kvm, supported: &CpuId) -> Result<Self, VmError> {
        let list = kvm.get_msr_index_list().map_err(|source| VmError::Ioctl {
            what: "read the MSR list",
            source,
        })?;
        Ok(HostInfo {
            cpu: CpuModel::from_cpuid(supported.as_slice()),
            msrs: Arc::new(msrs_to_save(list.as_slice())),
        })
    }
}

/// One virtio device's own state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// A drive.
    Block(BlockState),
    /// A network interface.
    Net(NetState),
    /// The vsock device.
    Vsock(VsockState),
    /// A virtio-fs device the guest has not used.
    Fs(FsState),
    /// The virtio-mem device, with nothing plugged.
    Mem(MemState),
}

/// A virtio device in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioDeviceState {
    /// Its MMIO window and GSI index (the guest found it there).
    pub slot: u32,
    /// The transport's registers.
    pub transport: TransportState,
    /// The device's own state.
    pub device: DeviceState,
}

/// Everything in a state file.
#[derive(Debug, Serialize, Deserialize)]
pub struct MicrovmState {
    /// The husk that wrote it (for people; the format version decides).
    pub husk_version: String,
    /// The CPU model of the host it was taken on.
    pub cpu: CpuModel,
    /// Number of vCPUs (all of them: the ones the guest booted with and
    /// the hot-pluggable ones).
    pub vcpu_count: u8,
    /// The vCPUs the guest booted with (`maxcpus=`); the others wait for
    /// the guest to online them.
    pub boot_vcpu_count: u8,
    /// Guest memory in MiB (boot RAM; the hot-pluggable region is the
    /// virtio-mem device's).
    pub mem_size_mib: u64,
    /// Guest RAM's regions and where they are in the memory file.
    pub memory: Vec<RegionState>,
    /// Interrupt controllers, PIT, clock.
    pub vm: VmState,
    /// Every vCPU, by index.
    pub vcpus: Vec<VcpuState>,
    /// The UART.
    pub serial: SerialSnapshot,
    /// The i8042.
    pub i8042: I8042State,
    /// The virtio devices, by slot.
    pub devices: Vec<VirtioDeviceState>,
}

/// Why a snapshot could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The virtio-mem device has memory plugged.
    #[error(transparent)]
    MemHotplug(#[from] MemSnapshotError),
    /// A virtio-fs device cannot be saved (the guest used it).
    #[error(transparent)]
    Fs(#[from] FsSnapshotError),
    /// The vCPUs are running.
    #[error("the microVM must be paused to snapshot it (PATCH /vm with state Paused)")]
    NotPaused,
    /// A vCPU thread did not answer (it may have stopped).
    #[error("vCPU {0} did not report its state")]
    VcpuTimeout(usize),
    /// KVM refused to hand out some state.
    #[error("cannot read the microVM's state")]
    State(#[source] StateError),
    /// The state could not be encoded.
    #[error("cannot encode the microVM's state")]
    Encode(#[source] format::FormatError),
    /// A file could not be created or written.
    #[error("cannot write {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// Guest memory could not be written.
    #[error("cannot write guest memory to {}", path.display())]
    Memory {
        /// The memory file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: MemoryFileError,
    },
}

/// Why a snapshot could not be loaded. Nothing of the VM has run when one
/// of these is returned.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The state file could not be read.
    #[error("cannot read the snapshot file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The state file is not one this husk can use.
    #[error("invalid snapshot file {}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: format::FormatError,
    },
    /// The number of vCPU states is not the snapshot's vCPU count.
    #[error("the snapshot is of a {expected}-vCPU microVM but holds the state of {found} vCPUs")]
    VcpuCount {
        /// The machine's vCPU count.
        expected: u8,
        /// vCPU states in the file.
        found: usize,
    },
    /// More vCPUs than this host's KVM creates.
    #[error("the snapshot has {found} vCPUs; this host's KVM allows {max}")]
    TooManyVcpus {
        /// vCPUs in the snapshot.
        found: u8,
        /// KVM's limit.
        max: usize,
    },
    /// Taken on another CPU model.
    #[error("the snapshot was taken on a {snapshot} CPU; this host has a {host} CPU")]
    CpuModel {
        /// The snapshot's.
        snapshot: CpuModel,
        /// This host's.
        host: CpuModel,
    },
    /// The memory layout is not the one husk gives a VM of that size.
    #[error("the snapshot's memory layout is not the one husk gives a {0} MiB microVM")]
    MemoryLayout(u64),
    /// The memory file cannot be opened.
    #[error("cannot open the memory file {}", path.display())]
    OpenMemory {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The memory file does not fit the snapshot, or cannot be mapped.
    #[error("cannot use the memory file {}", path.display())]
    Memory {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: MemoryFileError,
    },
    /// An override names a device the snapshot does not have.
    #[error("the snapshot has no network interface {0:?} to override")]
    NoSuchInterface(String),
    /// A vsock override for a snapshot without vsock.
    #[error("the snapshot has no vsock device to override")]
    NoVsock,
    /// A drive override names a drive the snapshot does not have.
    #[error("the snapshot has no drive {0:?} to override")]
    NoSuchDrive(String),
    /// A virtio-fs override names a device the snapshot does not have.
    #[error("the snapshot has no virtio-fs device {0:?} to override")]
    NoSuchFs(String),
    /// The boot vCPU count does not fit the vCPUs.
    #[error("the snapshot's guest booted with {boot} of its {count} vCPUs")]
    BootVcpus {
        /// vCPUs the guest booted with.
        boot: u8,
        /// vCPUs in the snapshot.
        count: u8,
    },
    /// The hot-pluggable region is not where a boot of this machine puts it.
    #[error(
        "the snapshot's hot-pluggable memory region is not the one husk gives a {0} MiB microVM"
    )]
    HotplugLayout(u64),
    /// A virtio-fs device's backend refused the restored device.
    #[error("the backend of virtio-fs device {id} cannot take the restored device")]
    FsBackend {
        /// The device id.
        id: String,
        /// What failed.
        #[source]
        source: FsError,
    },
    /// Two devices of the snapshot claim one slot, or a slot is out of range.
    #[error("the snapshot's device slot {0} is invalid or taken twice")]
    Slot(u32),
    /// A device's transport does not fit the device.
    #[error("cannot restore virtio device {id}")]
    Transport {
        /// The device id.
        id: String,
        /// What does not fit.
        #[source]
        source: TransportRestoreError,
    },
    /// The UART's state is invalid.
    #[error("cannot restore the serial port")]
    Serial(#[source] crate::devices::legacy::persist::SerialRestoreError),
    /// KVM refused the VM's saved state.
    #[error("cannot restore the interrupt controllers, PIT and clock")]
    VmState(#[source] StateError),
    /// Building the VM or a device failed.
    #[error("cannot build the restored microVM")]
    Build(#[source] VmmError),
}

impl From<VmmError> for RestoreError {
    fn from(e: VmmError) -> Self {
        RestoreError::Build(e)
    }
}

impl From<VmError> for RestoreError {
    fn from(e: VmError) -> Self {
        RestoreError::Build(VmmError::Vm(e))
    }
}

/// A network interface's replacement tap (and MAC) for a restored VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetOverride {
    /// The interface id in the snapshot.
    pub iface_id: String,
    /// The tap to attach to instead.
    pub host_dev_name: String,
    /// The MAC its configuration space reports instead, if any.
    pub guest_mac: Option<MacAddr>,
}

/// A drive's replacement backing file for a restored VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveOverride {
    /// The drive id in the snapshot.
    pub drive_id: String,
    /// The file to open instead (the snapshot's need not exist).
    pub path_on_host: PathBuf,
}

/// A virtio-fs device's replacement backend for a restored VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsOverride {
    /// The device id in the snapshot.
    pub id: String,
    /// The backend's socket to connect to instead.
    pub socket: PathBuf,
}

/// What loading a snapshot needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadParams {
    /// The state file.
    pub snapshot_path: PathBuf,
    /// The memory file.
    pub mem_file_path: PathBuf,
    /// Taps (and MACs) to use instead of the snapshot's.
    pub net_overrides: Vec<NetOverride>,
    /// The vsock socket to listen on instead of the snapshot's.
    pub vsock_uds_path: Option<PathBuf>,
    /// Drives' backing files to open instead of the snapshot's.
    pub drive_overrides: Vec<DriveOverride>,
    /// virtio-fs backends to connect to instead of the snapshot's.
    pub fs_overrides: Vec<FsOverride>,
    /// Where the restored guest's console goes.
    pub serial: SerialOutput,
    /// The filters for the thread that fills shared guest memory (the
    /// other threads get theirs from [`Vmm::start`]).
    pub seccomp: crate::seccomp::SeccompFilters,
}

/// What a snapshot produced (for logs and benchmarks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotStats {
    /// Bytes in the state file.
    pub state_bytes: u64,
    /// The memory file's size.
    pub mem_bytes: u64,
    /// Bytes of guest memory actually written (the rest are holes).
    pub mem_written: u64,
}

/// Creates `path` afresh. An existing file is unlinked first, never
/// truncated: VMs restored from it map it, and a page they have not read
/// yet must still be there (its inode lives on until they are gone).
fn create_file(path: &Path) -> Result<File, SnapshotError> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(SnapshotError::Write {
                path: path.to_path_buf(),
                source,
            })
        }
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|source| SnapshotError::Write {
            path: path.to_path_buf(),
            source,
        })
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Vmm {
    /// Guest RAM's regions as a memory file holds them: every region but
    /// the hot-pluggable one (saved only with nothing plugged, so nothing
    /// of it is worth keeping).
    fn ram_regions(&self) -> Vec<RegionState> {
        let hotplug = self
            .mem_hotplug
            .as_ref()
            .map(|m| lock(&m.device).region().addr);
        memory::region_states_except(&self.mem, hotplug)
    }

    /// The state of the paused VM (vCPUs answer from their threads).
    fn save_state(&mut self) -> Result<MicrovmState, SnapshotError> {
        if !self.is_paused() {
            return Err(SnapshotError::NotPaused);
        }
        // The devices first: the ones that cannot be saved in their state
        // (plugged memory, a used virtio-fs device) refuse before a vCPU
        // is asked for anything.
        let mut devices = Vec::with_capacity(self.virtio.len());
        for slot in &self.virtio {
            let transport = lock(&slot.transport).save_state();
            let device = match &slot.device {
                AttachedDevice::Block { device, is_root } => {
                    DeviceState::Block(lock(device).save_state(*is_root))
                }
                AttachedDevice::Net { device, config } => {
                    DeviceState::Net(NetState::new(config, &lock(device)))
                }
                AttachedDevice::Vsock { device, config } => {
                    DeviceState::Vsock(VsockState::new(config, &lock(device)))
                }
                AttachedDevice::Fs { device } => {
                    DeviceState::Fs(lock(device).save_state(&self.mem)?)
                }
                AttachedDevice::Mem { device } => DeviceState::Mem(lock(device).save_state()?),
            };
            devices.push(VirtioDeviceState {
                slot: slot.slot,
                transport,
                device,
            });
        }
        let count = self.vcpu_threads.len();
        let answers = self.shared.pause.request_state(self.host.msrs.clone());
        let mut vcpus = Vec::with_capacity(count);
        for _ in 0..count {
            let got = answers.recv_timeout(VCPU_STATE_TIMEOUT);
            match got {
                Ok((_, Ok(state))) => vcpus.push(state),
                Ok((_, Err(e))) => {
                    self.shared.pause.clear_state_request();
                    return Err(SnapshotError::State(e));
                }
                Err(_) => {
                    self.shared.pause.clear_state_request();
                    return Err(SnapshotError::VcpuTimeout(vcpus.len()));
                }
            }
        }
        self.shared.pause.clear_state_request();
        vcpus.sort_by_key(|v| v.index);
        let vm = VmState::save(self.vm.fd()).map_err(SnapshotError::State)?;
        let memory = self.ram_regions();
        Ok(MicrovmState {
            husk_version: env!("CARGO_PKG_VERSION").to_string(),
            cpu: self.host.cpu.clone(),
            vcpu_count: vcpus.len() as u8,
            boot_vcpu_count: self.boot_vcpus,
            mem_size_mib: memory::file_size(&memory) >> 20,
            memory,
            vm,
            vcpus,
            serial: lock(&self.serial).save_state(),
            i8042: lock(&self.i8042).save_state(),
            devices,
        })
    }

    /// Writes a full snapshot of the paused VM: its state to
    /// `snapshot_path`, guest memory to `mem_file_path` (both replaced if
    /// they exist). The VM stays paused.
    pub fn snapshot(
        &mut self,
        snapshot_path: &Path,
        mem_file_path: &Path,
    ) -> Result<SnapshotStats, SnapshotError> {
        let t0 = Instant::now();
        let state = self.save_state()?;
        let bytes = format::encode(&state).map_err(SnapshotError::Encode)?;
        let mem_file = create_file(mem_file_path)?;
        let mem_written = memory::dump(&self.mem, &state.memory, &mem_file).map_err(|source| {
            SnapshotError::Memory {
                path: mem_file_path.to_path_buf(),
                source,
            }
        })?;
        let state_file = create_file(snapshot_path)?;
        std::io::Write::write_all(&mut &state_file, &bytes).map_err(|source| {
            SnapshotError::Write {
                path: snapshot_path.to_path_buf(),
                source,
            }
        })?;
        let stats = SnapshotStats {
            state_bytes: bytes.len() as u64,
            mem_bytes: memory::file_size(&state.memory),
            mem_written,
        };
        tracing::info!(
            elapsed_us = t0.elapsed().as_micros() as u64,
            state_bytes = stats.state_bytes,
            mem_bytes = stats.mem_bytes,
            mem_written = stats.mem_written,
            "snapshot written"
        );
        Ok(stats)
    }

    /// Builds a VM from a snapshot. Its vCPUs are paused: start it with
    /// [`Vmm::start`], then [`Vmm::resume`] it. Everything is checked
    /// before any vCPU exists.
    pub fn restore(params: &LoadParams, metrics: Arc<Metrics>) -> Result<Self, RestoreError> {
        let t0 = Instant::now();
        let state = read_state(&params.snapshot_path)?;
        let kvm = vm::open_kvm()?;
        let host_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VmmError::SupportedCpuid)?;
        let host = HostInfo::read(&kvm, &host_cpuid)?;
        let limits = crate::vmm::host_limits(&kvm, &host_cpuid);
        check_state(&state, &host, &limits, params)?;
        let mem_file =
            File::open(&params.mem_file_path).map_err(|source| RestoreError::OpenMemory {
                path: params.mem_file_path.clone(),
                source,
            })?;
        let mem_err = |source| RestoreError::Memory {
            path: params.mem_file_path.clone(),
            source,
        };
        // A vhost-user backend that maps guest memory itself needs it
        // shared (memfds), as a boot with such a device makes it; a
        // relaying device does not (its memory is its own).
        let backing = if state
            .devices
            .iter()
            .any(|d| matches!(&d.device, DeviceState::Fs(f) if !f.relay))
        {
            memory::Backing::Shared
        } else {
            memory::Backing::Private
        };
        let exit = ExitNotifier::new().map_err(|source| VmmError::Os {
            what: "create the exit eventfd",
            source,
        })?;
        let (mem, memory_fill) = match backing {
            memory::Backing::Private => (
                memory::from_file(&mem_file, &state.memory).map_err(mem_err)?,
                None,
            ),
            memory::Backing::Shared => {
                shared_memory(&mem_file, &state.memory, &params.seccomp, &exit).map_err(mem_err)?
            }
        };

        let vm = Vm::new(&kvm)?;
        vm.register_memory(&mem)?;
        // The hot-pluggable region joins guest memory, not KVM, as at boot.
        let boot_slots = state.memory.len() as u32;
        let mem = match state.devices.iter().find_map(|d| match &d.device {
            DeviceState::Mem(m) => Some(m),
            _ => None,
        }) {
            Some(m) => memory::add_region(&mem, vm_memory::GuestAddress(m.addr), m.size, backing)
                .map_err(VmmError::Memory)?,
            None => mem,
        };
        let os = |what: &'static str| move |source| VmmError::Os { what, source };

        let mut pio = Bus::new();
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(os("create the serial irqfd"))?;
        vm.register_irqfd(&serial_irq, serial::COM1_IRQ)?;
        let out = crate::vmm::serial_output(&params.serial)?;
        let serial = Arc::new(Mutex::new(
            Serial::from_state(&state.serial, serial_irq, out).map_err(RestoreError::Serial)?,
        ));
        pio.insert(serial.clone(), serial::COM1_BASE, serial::UART_REGS)
            .map_err(VmmError::Bus)?;
        let kbd_irq = EventFd::new(EFD_NONBLOCK).map_err(os("create the keyboard irqfd"))?;
        vm.register_irqfd(&kbd_irq, i8042::KBD_IRQ)?;
        let mut kbd = I8042::new(ResetTrigger(exit.clone()), Some(kbd_irq));
        kbd.restore_state(&state.i8042);
        let i8042 = Arc::new(Mutex::new(kbd));
        pio.insert(i8042.clone(), i8042::I8042_BASE, i8042::I8042_PORTS)
            .map_err(VmmError::Bus)?;

        let mut event_manager = EventManager::<crate::vmm::Subscriber>::new()
            .map_err(|e| VmmError::EventLoop(crate::error::Flat(e)))?;
        let mut mmio = Bus::new();
        let mut slots = MmioSlots::new();
        // The announcements went to the guest's command line at its boot.
        let mut unused_cmdline = String::new();
        let mut virtio = Vec::with_capacity(state.devices.len());
        let mut drives = Vec::new();
        let mut mem_hotplug = None;
        let mut resized = Vec::new();
        // Each device goes back to the slot (and so the address and
        // interrupt) it had.
        macro_rules! attach {
            ($device:expr) => {
                slots.attach(
                    &vm,
                    &mem,
                    &mut mmio,
                    &mut event_manager,
                    $device,
                    &mut unused_cmdline,
                )?
            };
        }
        for dev in &state.devices {
            slots.next = dev.slot;
            let id;
            let running;
            let mut saved_capacity = None;
            let (transport, attached) = match &dev.device {
                DeviceState::Block(b) => {
                    id = b.id.clone();
                    running = b.queues.clone();
                    saved_capacity = Some(b.capacity);
                    let mut config = b.config();
                    if let Some(o) = params.drive_overrides.iter().find(|o| o.drive_id == b.id) {
                        config.path = o.path_on_host.clone();
                    }
                    let block = Arc::new(Mutex::new(Block::new(config).map_err(VmmError::Block)?));
                    metrics.register_device("block", &b.id, lock(&block).metrics());
                    let t = attach!(block.clone());
                    drives.push(AttachedDrive {
                        block: block.clone(),
                        transport: t.clone(),
                        is_root: b.is_root,
                    });
                    (
                        t,
                        AttachedDevice::Block {
                            device: block,
                            is_root: b.is_root,
                        },
                    )
                }
                DeviceState::Net(n) => {
                    id = n.id.clone();
                    running = n.queues.clone();
                    let mut config = n.config();
                    if let Some(o) = params.net_overrides.iter().find(|o| o.iface_id == n.id) {
                        config.host_dev_name = o.host_dev_name.clone();
                        if o.guest_mac.is_some() {
                            config.guest_mac = o.guest_mac;
                        }
                    }
                    let net = Net::new(&config).map_err(VmmError::Net)?;
                    metrics.register_device("net", &config.id, net.metrics());
                    let net = Arc::new(Mutex::new(net));
                    let t = attach!(net.clone());
                    (
                        t,
                        AttachedDevice::Net {
                            device: net,
                            config,
                        },
                    )
                }
                DeviceState::Vsock(v) => {
                    id = "vsock".to_string();
                    running = v.queues.clone();
                    let mut config = v.config();
                    if let Some(path) = &params.vsock_uds_path {
                        config.uds_path = path.clone();
                    }
                    crate::config::check_vsock(&config).map_err(VmmError::Config)?;
                    let dev = Vsock::new(&config).map_err(VmmError::Vsock)?;
                    metrics.register_device("vsock", "vsock", dev.metrics());
                    let dev = Arc::new(Mutex::new(dev));
                    let t = attach!(dev.clone());
                    (
                        t,
                        AttachedDevice::Vsock {
                            device: dev,
                            config,
                        },
                    )
                }
                DeviceState::Fs(f) => {
                    id = f.id.clone();
                    running = f.queues.clone();
                    let mut config = f.config();
                    if let Some(o) = params.fs_overrides.iter().find(|o| o.id == f.id) {
                        config.socket = o.socket.clone();
                    }
                    crate::config::check_fs(std::slice::from_ref(&config))
                        .map_err(VmmError::Config)?;
                    let fs_err = |source| VmmError::Fs {
                        id: f.id.clone(),
                        source,
                    };
                    let mut dev = Fs::new(&config).map_err(fs_err)?;
                    if let Some(fill) = &memory_fill {
                        dev.wait_for_memory(
                            fill.when_done()
                                .map_err(os("create the memory-complete eventfd"))?,
                        );
                    }
                    metrics.register_device("fs", &f.id, dev.metrics());
                    tracing::debug!(fs = %f.id, socket = %config.socket.display(), "virtio-fs backend connected");
                    let dev = Arc::new(Mutex::new(dev));
                    let t = attach!(dev.clone());
                    (t, AttachedDevice::Fs { device: dev })
                }
                DeviceState::Mem(m) => {
                    id = "hotplug".to_string();
                    running = m.queues.clone();
                    let kvm_slots = vm.memory_slots(mem.clone(), boot_slots);
                    let mut dev = Mem::new(m.region(), mem.clone(), Box::new(kvm_slots))
                        .map_err(VmmError::MemHotplug)?;
                    dev.restore_requested_size(m.requested_size)
                        .map_err(VmmError::MemHotplug)?;
                    metrics.register_device("mem", "hotplug", dev.metrics());
                    let dev = Arc::new(Mutex::new(dev));
                    let t = attach!(dev.clone());
                    mem_hotplug = Some(AttachedMem {
                        device: dev.clone(),
                        transport: t.clone(),
                    });
                    (t, AttachedDevice::Mem { device: dev })
                }
            };
            lock(&transport)
                .restore_state(&dev.transport, &running)
                .map_err(|source| RestoreError::Transport {
                    id: id.clone(),
                    source,
                })?;
            match &attached {
                AttachedDevice::Block { device, .. }
                    if saved_capacity.is_some_and(|c| c != lock(device).capacity()) =>
                {
                    tracing::info!(drive = %id, "the drive's size changed since the snapshot; the guest is told");
                    resized.push(virtio.len());
                }
                AttachedDevice::Fs { device } => {
                    // A started device's backend gets guest memory and the
                    // rings now, as the event loop would after DRIVER_OK:
                    // a backend that refuses fails the load, before the
                    // guest runs.
                    lock(device)
                        .try_run_pending()
                        .map_err(|source| RestoreError::FsBackend {
                            id: id.clone(),
                            source,
                        })?;
                }
                _ => {}
            }
            virtio.push(VirtioSlot {
                slot: dev.slot,
                transport,
                device: attached,
            });
        }

        state.vm.restore(vm.fd()).map_err(RestoreError::VmState)?;

        let shared = VcpuShared {
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            exit: exit.clone(),
            stop: Arc::new(AtomicBool::new(false)),
            first_entry: Arc::new(OnceLock::new()),
            pause: Arc::new(PauseGate::default()),
            metrics: metrics.clone(),
        };
        // Parked from their first instruction: resumed by the caller.
        shared.pause.request_pause();
        let mut vcpus = Vec::with_capacity(state.vcpus.len());
        for vs in &state.vcpus {
            let vcpu = Vcpu::new(vm.fd(), vs.index, shared.clone()).map_err(VmmError::Vcpu)?;
            vcpu.restore(vs).map_err(VmmError::Vcpu)?;
            vcpus.push(vcpu);
        }
        // Interrupts only now: KVM delivers them into the local APICs,
        // which the vCPU state above has just overwritten.
        for (slot, dev) in virtio.iter().zip(&state.devices) {
            lock(&slot.transport).raise_interrupt(dev.transport.interrupt_status);
            if let AttachedDevice::Vsock { device, .. } = &slot.device {
                lock(device).send_transport_reset();
            }
        }
        for i in resized {
            lock(&virtio[i].transport).notify_config_change();
        }
        event_manager.add_subscriber(Arc::new(Mutex::new(crate::vmm::ExitWatcher(exit))));
        tracing::info!(
            elapsed_us = t0.elapsed().as_micros() as u64,
            vcpus = vcpus.len(),
            devices = virtio.len(),
            "microVM restored from a snapshot"
        );
        Ok(Vmm {
            vcpus,
            vcpu_threads: Vec::new(),
            shared,
            event_manager,
            image_load: Duration::ZERO,
            drives,
            mem_hotplug,
            boot_vcpus: state.boot_vcpu_count,
            i8042,
            serial,
            virtio,
            host,
            metrics,
            vm,
            mem,
            memory_fill,
        })
    }
}

/// Shared guest memory for a restore (a vhost-user backend maps it too):
/// filled on demand and in the background where the host gives husk a
/// userfaultfd (`vstate::lazy_memory`), else copied from the memory file
/// before the guest runs.
fn shared_memory(
    file: &File,
    regions: &[memory::RegionState],
    seccomp: &crate::seccomp::SeccompFilters,
    exit: &Arc<ExitNotifier>,
) -> Result<(vm_memory::GuestMemoryMmap, Option<lazy_memory::FillHandle>), MemoryFileError> {
    use crate::error::Chain;
    use lazy_memory::LazyError;
    let why = match lazy_memory::from_file(file, regions) {
        Ok((mem, fill)) => {
            let pending = fill.pending_bytes();
            match fill.spawn(seccomp, exit.clone()) {
                Ok(handle) => {
                    tracing::info!(
                        pending_bytes = pending,
                        "shared guest memory restored on demand: pages are filled as touched and in the background"
                    );
                    return Ok((mem, Some(handle)));
                }
                Err(e) => Chain(&e).to_string(),
            }
        }
        Err(LazyError::File(e)) => return Err(e),
        Err(e) => Chain(&e).to_string(),
    };
    let t = Instant::now();
    let (mem, copy) = memory::from_file_shared(file, regions)?;
    tracing::info!(
        elapsed_us = t.elapsed().as_micros() as u64,
        read_bytes = copy.read_bytes,
        copied_bytes = copy.copied_bytes,
        extents = copy.extents,
        why = %why,
        "memory file copied into shared guest memory before the guest runs"
    );
    Ok((mem, None))
}

/// A VM's machine and devices as they are (for a restored VM's
/// configuration report).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmDescription {
    /// vCPUs the guest booted with.
    pub vcpu_count: u8,
    /// All vCPUs, the hot-pluggable ones included.
    pub max_vcpu_count: u8,
    /// Guest memory in MiB.
    pub mem_size_mib: u64,
    /// Drives, in slot order.
    pub drives: Vec<crate::config::DriveConfig>,
    /// Network interfaces, in slot order.
    pub net: Vec<crate::config::NetConfig>,
    /// The vsock device.
    pub vsock: Option<crate::config::VsockConfig>,
    /// virtio-fs devices, in slot order.
    pub fs: Vec<crate::config::FsConfig>,
    /// The hot-pluggable memory region.
    pub mem_hotplug: Option<crate::devices::virtio::mem::MemRegion>,
}

impl Vmm {
    /// The VM's machine and devices.
    pub fn describe(&self) -> VmDescription {
        let mut d = VmDescription {
            vcpu_count: self.boot_vcpus,
            max_vcpu_count: (self.vcpus.len() + self.vcpu_threads.len()) as u8,
            mem_size_mib: memory::file_size(&self.ram_regions()) >> 20,
            drives: Vec::new(),
            net: Vec::new(),
            vsock: None,
            fs: Vec::new(),
            mem_hotplug: None,
        };
        for slot in &self.virtio {
            match &slot.device {
                AttachedDevice::Block { device, is_root } => {
                    d.drives.push(crate::config::DriveConfig {
                        block: lock(device).config().clone(),
                        is_root: *is_root,
                    })
                }
                AttachedDevice::Net { config, .. } => d.net.push(config.clone()),
                AttachedDevice::Vsock { config, .. } => d.vsock = Some(config.clone()),
                AttachedDevice::Fs { device } => d.fs.push(lock(device).config().clone()),
                AttachedDevice::Mem { device } => d.mem_hotplug = Some(lock(device).region()),
            }
        }
        d
    }
}

/// Reads and decodes a state file (without checking it against the host).
pub fn read_state(path: &Path) -> Result<MicrovmState, RestoreError> {
    let read_err = |source| RestoreError::Read {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(read_err)?.len();
    let limit = format::MAX_BODY_LEN + (format::HEADER_LEN + format::CHECKSUM_LEN) as u64;
    if len > limit {
        return Err(RestoreError::Format {
            path: path.to_path_buf(),
            source: format::FormatError::BodyTooLarge(len),
        });
    }
    let bytes = std::fs::read(path).map_err(read_err)?;
    format::decode(&bytes).map_err(|source| RestoreError::Format {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes a state file (tests and tools that edit snapshots use it).
pub fn write_state(path: &Path, state: &MicrovmState) -> std::io::Result<()> {
    let bytes = format::encode(state).map_err(std::io::Error::other)?;
    std::fs::write(path, bytes)
}

/// Checks a decoded state against itself, this host and the overrides.
fn check_state(
    state: &MicrovmState,
    host: &HostInfo,
    limits: &HostLimits,
    params: &LoadParams,
) -> Result<(), RestoreError> {
    let kvm_max_vcpus = limits.kvm_max_vcpus;
    let count = state.vcpu_count;
    let indices_ok = state
        .vcpus
        .iter()
        .enumerate()
        .all(|(i, v)| usize::from(v.index) == i);
    if count == 0 || state.vcpus.len() != usize::from(count) || !indices_ok {
        return Err(RestoreError::VcpuCount {
            expected: count,
            found: state.vcpus.len(),
        });
    }
    if usize::from(count) > kvm_max_vcpus.min(usize::from(crate::arch::x86_64::mptable::MAX_VCPUS))
    {
        return Err(RestoreError::TooManyVcpus {
            found: count,
            max: kvm_max_vcpus,
        });
    }
    check_boot_vcpus(state.boot_vcpu_count, count)?;
    if state.cpu != host.cpu {
        return Err(RestoreError::CpuModel {
            snapshot: state.cpu.clone(),
            host: host.cpu.clone(),
        });
    }
    let mib = state.mem_size_mib;
    let layout_ok = mib >= MIN_MEM_MIB
        && mib.checked_mul(1 << 20).is_some_and(|size| {
            let expected: Vec<(u64, u64)> = ram_regions(size)
                .into_iter()
                .map(|(a, s)| (a.0, s))
                .collect();
            let mut offset = 0;
            let mut found = Vec::new();
            for r in &state.memory {
                if r.file_offset != offset {
                    return false;
                }
                offset += r.size;
                found.push((r.guest_base, r.size));
            }
            found == expected
        });
    if !layout_ok {
        return Err(RestoreError::MemoryLayout(mib));
    }
    check_hotplug_region(&state.devices, mib, state.memory.len(), limits)?;
    let mut seen = std::collections::HashSet::new();
    for d in &state.devices {
        if d.slot as usize >= crate::config::MAX_VIRTIO_DEVICES || !seen.insert(d.slot) {
            return Err(RestoreError::Slot(d.slot));
        }
    }
    check_overrides(&state.devices, params)
}

/// Checks that the guest booted with at least one of the vCPUs and at
/// most all of them (the rest are the parked, hot-pluggable ones).
fn check_boot_vcpus(boot: u8, count: u8) -> Result<(), RestoreError> {
    if boot == 0 || boot > count {
        return Err(RestoreError::BootVcpus { boot, count });
    }
    Ok(())
}

/// Checks that every override names a device of the snapshot.
fn check_overrides(devices: &[VirtioDeviceState], params: &LoadParams) -> Result<(), RestoreError> {
    for o in &params.net_overrides {
        let known = devices
            .iter()
            .any(|d| matches!(&d.device, DeviceState::Net(n) if n.id == o.iface_id));
        if !known {
            return Err(RestoreError::NoSuchInterface(o.iface_id.clone()));
        }
    }
    if params.vsock_uds_path.is_some()
        && !devices
            .iter()
            .any(|d| matches!(d.device, DeviceState::Vsock(_)))
    {
        return Err(RestoreError::NoVsock);
    }
    for o in &params.drive_overrides {
        let known = devices
            .iter()
            .any(|d| matches!(&d.device, DeviceState::Block(b) if b.id == o.drive_id));
        if !known {
            return Err(RestoreError::NoSuchDrive(o.drive_id.clone()));
        }
    }
    for o in &params.fs_overrides {
        let known = devices
            .iter()
            .any(|d| matches!(&d.device, DeviceState::Fs(f) if f.id == o.id));
        if !known {
            return Err(RestoreError::NoSuchFs(o.id.clone()));
        }
    }
    Ok(())
}

/// Checks that the snapshot's hot-pluggable region (if any) is the one a
/// boot of this machine on this host places: same sizes, right above the
/// guest's RAM, within the host's limits and KVM's slots.
fn check_hotplug_region(
    devices: &[VirtioDeviceState],
    mib: u64,
    ram_slots: usize,
    limits: &HostLimits,
) -> Result<(), RestoreError> {
    let mut regions = devices.iter().filter_map(|d| match &d.device {
        DeviceState::Mem(m) => Some(m.region()),
        _ => None,
    });
    let Some(saved) = regions.next() else {
        return Ok(());
    };
    if regions.next().is_some() {
        return Err(RestoreError::HotplugLayout(mib));
    }
    let config = MemHotplugConfig {
        total_mib: saved.size >> 20,
        block_mib: saved.block_size >> 20,
        slot_mib: saved.slot_size >> 20,
    };
    let placed = crate::config::check_mem_hotplug(&config, mib << 20, ram_slots, limits)
        .map_err(|_| RestoreError::HotplugLayout(mib))?;
    if placed != saved {
        return Err(RestoreError::HotplugLayout(mib));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::persist::QueueSnapshot;

    const LIMITS: HostLimits = HostLimits {
        kvm_max_vcpus: 254,
        phys_address_bits: 40,
        host_mem_mib: 16 << 10,
        kvm_memslots: 509,
    };

    fn transport() -> TransportState {
        TransportState {
            device_status: 0,
            features_select: 0,
            acked_features_select: 0,
            acked_features: 0,
            queue_select: 0,
            queues: Vec::<QueueSnapshot>::new(),
            bad_size: Vec::new(),
            config_generation: 0,
            activated: false,
            interrupt_status: 0,
        }
    }

    fn device(slot: u32, device: DeviceState) -> VirtioDeviceState {
        VirtioDeviceState {
            slot,
            transport: transport(),
            device,
        }
    }

    /// A pod template's devices: a drive, a virtio-fs share, and 1 GiB of
    /// hot-pluggable memory placed where a boot of a 256 MiB guest puts it.
    fn template() -> Vec<VirtioDeviceState> {
        let region =
            crate::config::check_mem_hotplug(&MemHotplugConfig::new(1024), 256 << 20, 1, &LIMITS)
                .unwrap();
        vec![
            device(
                0,
                DeviceState::Block(BlockState {
                    id: "rootfs".into(),
                    path: "/template/root.img".into(),
                    read_only: false,
                    is_root: false,
                    capacity: 1 << 20,
                    queues: Vec::new(),
                }),
            ),
            device(
                1,
                DeviceState::Fs(FsState {
                    id: "share".into(),
                    tag: "share".into(),
                    socket: "/template/fs.sock".into(),
                    num_queues: 1,
                    queue_size: 1024,
                    queues: Vec::new(),
                    relay: false,
                }),
            ),
            device(
                2,
                DeviceState::Mem(MemState {
                    addr: region.addr,
                    size: region.size,
                    block_size: region.block_size,
                    slot_size: region.slot_size,
                    requested_size: 0,
                    queues: Vec::new(),
                }),
            ),
        ]
    }

    fn params() -> LoadParams {
        LoadParams {
            snapshot_path: "/s".into(),
            mem_file_path: "/m".into(),
            net_overrides: Vec::new(),
            vsock_uds_path: None,
            drive_overrides: Vec::new(),
            fs_overrides: Vec::new(),
            serial: SerialOutput::Sink,
            seccomp: crate::seccomp::SeccompFilters::builtin(),
        }
    }

    #[test]
    fn overrides_of_the_snapshots_drives_and_file_systems_pass() {
        let mut p = params();
        p.drive_overrides.push(DriveOverride {
            drive_id: "rootfs".into(),
            path_on_host: "/pods/a/root.img".into(),
        });
        p.fs_overrides.push(FsOverride {
            id: "share".into(),
            socket: "/pods/a/fs.sock".into(),
        });
        assert!(check_overrides(&template(), &p).is_ok());
    }

    #[test]
    fn overrides_of_devices_the_snapshot_lacks_are_refused_by_name() {
        let mut p = params();
        p.drive_overrides.push(DriveOverride {
            drive_id: "data".into(),
            path_on_host: "/x".into(),
        });
        let err = check_overrides(&template(), &p).unwrap_err();
        assert!(matches!(&err, RestoreError::NoSuchDrive(id) if id == "data"));
        assert_eq!(
            err.to_string(),
            "the snapshot has no drive \"data\" to override"
        );

        let mut p = params();
        p.fs_overrides.push(FsOverride {
            id: "rootfs".into(),
            socket: "/x.sock".into(),
        });
        let err = check_overrides(&template(), &p).unwrap_err();
        assert!(
            matches!(&err, RestoreError::NoSuchFs(id) if id == "rootfs"),
            "{err}"
        );

        let mut p = params();
        p.vsock_uds_path = Some("/v.sock".into());
        assert!(matches!(
            check_overrides(&template(), &p),
            Err(RestoreError::NoVsock)
        ));
    }

    #[test]
    fn the_hotplug_region_must_be_where_a_boot_puts_it() {
        let devices = template();
        assert!(check_hotplug_region(&devices, 256, 1, &LIMITS).is_ok());
        // A guest with 6 GiB of RAM has its region higher up.
        assert!(matches!(
            check_hotplug_region(&devices, 6 << 10, 2, &LIMITS),
            Err(RestoreError::HotplugLayout(_))
        ));
        for edit in [
            |m: &mut MemState| m.addr += 128 << 20,
            |m: &mut MemState| m.size += 3 << 20,
            |m: &mut MemState| m.block_size = 3 << 20,
        ] {
            let mut moved = template();
            if let DeviceState::Mem(m) = &mut moved[2].device {
                edit(m);
            }
            assert!(matches!(
                check_hotplug_region(&moved, 256, 1, &LIMITS),
                Err(RestoreError::HotplugLayout(256))
            ));
        }
        // Two virtio-mem devices are not something husk builds.
        let mut twice = template();
        twice.push(device(3, twice[2].device.clone()));
        assert!(check_hotplug_region(&twice, 256, 1, &LIMITS).is_err());
        // Too large for this host now.
        let small = HostLimits {
            host_mem_mib: 512,
            ..LIMITS
        };
        assert!(check_hotplug_region(&devices, 256, 1, &small).is_err());
        // No region, nothing to check.
        assert!(check_hotplug_region(&devices[..2], 256, 1, &LIMITS).is_ok());
    }

    #[test]
    fn the_guest_booted_with_some_of_its_vcpus() {
        assert!(check_boot_vcpus(1, 2).is_ok());
        assert!(check_boot_vcpus(2, 2).is_ok());
        assert!(matches!(
            check_boot_vcpus(0, 2),
            Err(RestoreError::BootVcpus { boot: 0, count: 2 })
        ));
        assert!(check_boot_vcpus(3, 2).is_err());
    }
}
