//! The VM controller: builds a microVM from a [`VmConfig`] (KVM VM, guest
//! memory, devices, kernel, vCPUs), starts one thread per vCPU and runs the
//! epoll event loop on the calling thread until the guest ends. Everything
//! outside this crate drives a VM through here and nowhere else.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::Killable;

use crate::arch::x86_64::layout::MMIO_DEVICES_START;
use crate::arch::x86_64::{cpuid, mptable, regs};
use crate::boot;
use crate::config::{
    check_device_count, check_drives, check_max_vcpus, check_mem_hotplug, check_memory, check_net,
    check_vcpus, ConfigError, DriveConfig, HostLimits, SerialOutput, VmConfig,
};
use crate::devices::bus::{Bus, BusError};
use crate::devices::legacy::{i8042, serial, Serial, I8042};
use crate::devices::virtio::block::{Block, BlockError};
use crate::devices::virtio::fs::{Fs, FsError};
use crate::devices::virtio::mem::{Mem, MemError, MemStatus};
use crate::devices::virtio::mmio::{MmioTransport, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET};
use crate::devices::virtio::net::{Net, NetError};
use crate::devices::virtio::VirtioDevice;
use crate::error::Flat;
use crate::exit::{ExitNotifier, ResetTrigger, StopHandle, VmExit};
use crate::metrics::Metrics;
use crate::seccomp::{SeccompError, SeccompFilters, ThreadKind};
use crate::signal::TerminationFd;
use crate::vstate::memory::{self, MemoryError};
use crate::vstate::vcpu::{self, PauseGate, Vcpu, VcpuError, VcpuShared};
use crate::vstate::vm::{self, Vm, VmError};

/// How long to keep kicking a vCPU thread that has not stopped yet.
const VCPU_STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors while building or running a microVM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The configuration cannot be booted on this host.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// KVM refused something.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Guest memory could not be allocated.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The kernel, initrd or command line could not be loaded.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// A vCPU could not be set up.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The boot page tables or GDT could not be written.
    #[error(transparent)]
    BootTables(#[from] regs::RegsError),
    /// The MP table could not be written.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// A drive could not be set up.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// A network interface could not be set up.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The vsock device could not be set up.
    #[error(transparent)]
    Vsock(#[from] crate::devices::virtio::vsock::VsockError),
    /// A virtio-fs device could not be set up.
    #[error("cannot set up file system {id:?}")]
    Fs {
        /// The device's id.
        id: String,
        /// What failed.
        source: FsError,
    },
    /// No drive has that id.
    #[error("no drive with id {0:?}")]
    NoSuchDrive(String),
    /// The hot-pluggable memory could not be set up or resized.
    #[error(transparent)]
    MemHotplug(#[from] MemError),
    /// A resize of hot-pluggable memory in a VM built without any.
    #[error("this microVM has no hot-pluggable memory")]
    NoMemHotplug,
    /// Two devices claim the same addresses.
    #[error("cannot place a device on its bus")]
    Bus(#[from] BusError),
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("cannot read the CPUID KVM supports")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    /// The serial output file could not be opened.
    #[error("cannot open serial output {path}")]
    SerialOutput {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// An eventfd, signal handler, thread or epoll operation failed.
    #[error("cannot {what}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The event loop failed.
    #[error("the event loop failed")]
    EventLoop(#[source] Flat<event_manager::Error>),
    /// Not every vCPU stopped for a pause in time; the VM keeps running.
    #[error("the vCPUs did not pause within {0:?}")]
    PauseTimeout(Duration),
    /// A seccomp filter could not be installed; the guest never ran.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// A vCPU thread ended before saying whether its filter is in place.
    #[error("a vCPU thread ended during setup")]
    VcpuSetupLost,
}

fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> VmmError {
    move |source| VmmError::Os { what, source }
}

/// Turns termination signals into a VM exit.
struct SignalWatcher {
    fd: TerminationFd,
    exit: Arc<ExitNotifier>,
}

impl MutEventSubscriber for SignalWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        while let Some(sig) = self.fd.read() {
            tracing::info!(
                signal = crate::signal::signal_name(sig),
                "stopping the microVM"
            );
            self.exit.notify(VmExit::Signal(sig));
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            tracing::error!(error = ?e, "cannot watch termination signals");
        }
    }
}

/// Wakes the event loop when the VM exits.
pub(crate) struct ExitWatcher(pub(crate) Arc<ExitNotifier>);

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Drain the counter; `Vmm::run` reads the reason itself.
        let _ = self.0.event().read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.0.event(), EventSet::IN)) {
            tracing::error!(error = ?e, "cannot watch the exit event");
        }
    }
}

pub(crate) type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// A file descriptor that only wakes the event loop (see [`Vmm::run_with`]).
struct WakeSource<F> {
    fd: F,
    drain: fn(&mut F),
}

impl<F: std::os::fd::AsRawFd + Send> MutEventSubscriber for WakeSource<F> {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        (self.drain)(&mut self.fd);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            tracing::error!(error = ?e, "cannot watch a wake-up source");
        }
    }
}

/// Opens where the guest's console goes.
pub(crate) fn serial_output(serial: &SerialOutput) -> Result<Box<dyn Write + Send>, VmmError> {
    Ok(match serial {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::Sink => Box::new(std::io::sink()),
        SerialOutput::File(path) => Box::new(
            // Never waits for a FIFO's reader.
            crate::host_file::open_append(path).map_err(|source| VmmError::SerialOutput {
                path: path.clone(),
                source,
            })?,
        ),
    })
}

/// The physical memory of this host, in MiB (from /proc/meminfo).
fn host_mem_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kib| kib / 1024)
        .unwrap_or(u64::MAX)
}

/// What this host allows a VM (vCPUs, address width, memory, KVM slots).
pub(crate) fn host_limits(kvm: &kvm_ioctls::Kvm, host_cpuid: &kvm_bindings::CpuId) -> HostLimits {
    HostLimits {
        kvm_max_vcpus: kvm.get_max_vcpus(),
        phys_address_bits: cpuid::phys_address_bits(host_cpuid),
        host_mem_mib: host_mem_mib(),
        kvm_memslots: usize::try_from(kvm.check_extension_int(kvm_ioctls::Cap::NrMemslots))
            .unwrap_or(0),
    }
}

/// The first GSI handed to virtio devices (4 is the serial port).
pub(crate) const FIRST_VIRTIO_GSI: u32 = 5;

/// Hands out virtio-mmio windows and their GSIs, one per device, in order:
/// drives first (the root drive in the first slot, so it is /dev/vda), then
/// network interfaces, then vsock.
pub(crate) struct MmioSlots {
    pub(crate) next: u32,
}

impl MmioSlots {
    pub(crate) fn new() -> Self {
        MmioSlots { next: 0 }
    }

    /// Puts `device` on the MMIO bus in the next free window, wires its queue
    /// notifications (ioeventfd) and interrupt (irqfd) into KVM, registers it
    /// with the event loop, and appends its announcement to `cmdline`.
    pub(crate) fn attach<D>(
        &mut self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
        mmio: &mut Bus,
        event_manager: &mut EventManager<Subscriber>,
        device: Arc<Mutex<D>>,
        cmdline: &mut String,
    ) -> Result<Arc<Mutex<MmioTransport>>, VmmError>
    where
        D: VirtioDevice + MutEventSubscriber + 'static,
    {
        if self.next as usize >= crate::config::MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices(self.next as usize + 1).into());
        }
        let base = MMIO_DEVICES_START + u64::from(self.next) * MMIO_WINDOW_SIZE;
        let gsi = FIRST_VIRTIO_GSI + self.next;
        {
            let dev = device.lock().unwrap_or_else(|e| e.into_inner());
            vm.register_irqfd(dev.interrupt().irqfd(), gsi)?;
            for (queue, event) in dev.queue_events().iter().enumerate() {
                vm.register_ioevent(event, base + QUEUE_NOTIFY_OFFSET, queue as u32)?;
            }
        }
        let transport = Arc::new(Mutex::new(MmioTransport::new(mem.clone(), device.clone())));
        mmio.insert(transport.clone(), base, MMIO_WINDOW_SIZE)?;
        event_manager.add_subscriber(device);
        cmdline.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{gsi}"));
        self.next += 1;
        tracing::debug!(base, gsi, "virtio device attached");
        Ok(transport)
    }
}

/// A drive attached to the VM.
pub struct AttachedDrive {
    /// The device.
    pub block: Arc<Mutex<Block>>,
    /// Its transport, for configuration-change notifications.
    pub transport: Arc<Mutex<MmioTransport>>,
    /// Whether it is the root device.
    pub is_root: bool,
}

/// Attaches the drives (root first) and returns them; `root=` goes on the
/// command line for the root drive.
fn attach_drives(
    slots: &mut MmioSlots,
    vm: &Vm,
    mem: &GuestMemoryMmap,
    mmio: &mut Bus,
    event_manager: &mut EventManager<Subscriber>,
    drives: &[DriveConfig],
    cmdline: &mut String,
) -> Result<Vec<AttachedDrive>, VmmError> {
    let mut attached = Vec::with_capacity(drives.len());
    for drive in drives {
        let block = Arc::new(Mutex::new(Block::new(drive.block.clone())?));
        let transport = slots.attach(vm, mem, mmio, event_manager, block.clone(), cmdline)?;
        if drive.is_root {
            let mode = if drive.block.read_only { "ro" } else { "rw" };
            cmdline.push_str(&format!(" root=/dev/vda {mode}"));
        }
        tracing::debug!(drive = %drive.block.id, "virtio-blk attached");
        attached.push(AttachedDrive {
            block,
            transport,
            is_root: drive.is_root,
        });
    }
    Ok(attached)
}

/// The hot-pluggable memory attached to the VM.
pub(crate) struct AttachedMem {
    pub(crate) device: Arc<Mutex<Mem>>,
    pub(crate) transport: Arc<Mutex<MmioTransport>>,
}

/// Appends `word` to `cmdline` unless the command line already sets its
/// parameter (the part before `=`): what the user wrote wins.
fn add_kernel_param(cmdline: &mut String, word: &str) {
    let key = word.split('=').next().unwrap_or(word);
    let set = cmdline
        .split_whitespace()
        .any(|w| w == key || w.starts_with(&format!("{key}=")));
    if !set {
        cmdline.push(' ');
        cmdline.push_str(word);
    }
}

/// A virtio device attached to the VM, as a snapshot needs to see it.
pub(crate) enum AttachedDevice {
    /// A drive (also in `Vmm::drives`).
    Block {
        /// The device.
        device: Arc<Mutex<crate::devices::virtio::block::Block>>,
        /// Whether it is /dev/vda.
        is_root: bool,
    },
    /// A network interface.
    Net {
        /// The device.
        device: Arc<Mutex<Net>>,
        /// What it was attached with.
        config: crate::config::NetConfig,
    },
    /// The vsock device.
    Vsock {
        /// The device.
        device: Arc<Mutex<crate::devices::virtio::vsock::Vsock>>,
        /// What it was built with.
        config: crate::config::VsockConfig,
    },
    /// A virtio-fs device (saved only while the guest never used it).
    Fs {
        /// The device.
        device: Arc<Mutex<Fs>>,
    },
    /// The virtio-mem device (also in `Vmm::mem_hotplug`; saved only with
    /// nothing plugged).
    Mem {
        /// The device.
        device: Arc<Mutex<Mem>>,
    },
}

/// A virtio device in its MMIO slot.
pub(crate) struct VirtioSlot {
    /// The slot (window and GSI) index.
    pub(crate) slot: u32,
    /// Its transport.
    pub(crate) transport: Arc<Mutex<MmioTransport>>,
    /// The device.
    pub(crate) device: AttachedDevice,
}

/// A built (and possibly running) microVM.
pub struct Vmm {
    pub(crate) vcpus: Vec<Vcpu>,
    pub(crate) vcpu_threads: Vec<JoinHandle<()>>,
    pub(crate) shared: VcpuShared,
    pub(crate) event_manager: EventManager<Subscriber>,
    pub(crate) image_load: Duration,
    pub(crate) drives: Vec<AttachedDrive>,
    /// The virtio-mem device, if the VM has hot-pluggable memory.
    pub(crate) mem_hotplug: Option<AttachedMem>,
    /// The vCPUs the guest booted with (`maxcpus=`); the rest of the
    /// vCPUs are the hot-pluggable ones, parked until the guest onlines
    /// them.
    pub(crate) boot_vcpus: u8,
    pub(crate) i8042: Arc<Mutex<I8042>>,
    pub(crate) serial: Arc<Mutex<Serial>>,
    /// Every virtio device, in slot order (for snapshots).
    pub(crate) virtio: Vec<VirtioSlot>,
    /// What a snapshot records and a restore checks about this host.
    pub(crate) host: crate::persist::HostInfo,
    pub(crate) metrics: Arc<Metrics>,
    // They must outlive the vCPUs and devices above, and the VM fd (with
    // its memory slots) must go before the memory it maps.
    pub(crate) vm: Vm,
    pub(crate) mem: GuestMemoryMmap,
    /// A restore's fill of shared guest memory, while it may still run.
    pub(crate) memory_fill: Option<crate::vstate::lazy_memory::FillHandle>,
}

impl Vmm {
    /// Builds the microVM described by `config`; its vCPUs do not run yet.
    pub fn new(config: &VmConfig) -> Result<Self, VmmError> {
        Self::with_metrics(config, Arc::new(Metrics::default()))
    }

    /// Like [`Vmm::new`], counting into `metrics` (shared with whoever
    /// writes them out, such as the API server).
    pub fn with_metrics(config: &VmConfig, metrics: Arc<Metrics>) -> Result<Self, VmmError> {
        let t0 = Instant::now();
        let kvm = vm::open_kvm()?;
        let host_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VmmError::SupportedCpuid)?;
        let limits = host_limits(&kvm, &host_cpuid);
        let vcpu_count = check_vcpus(config.vcpus, &limits)?;
        // vCPUs beyond vcpu_count are built and parked: the guest boots
        // with maxcpus=vcpu_count and brings them online later.
        let max_vcpus = check_max_vcpus(config.vcpus, config.max_vcpus, &limits)?;
        let host = crate::persist::HostInfo::read(&kvm, &host_cpuid)?;
        let mut host_cpuid = host_cpuid;
        if kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer) {
            cpuid::enable_tsc_deadline(&mut host_cpuid);
        }
        let mem_size = check_memory(config.mem_mib, &limits)?;
        let boot_slots = crate::arch::x86_64::layout::ram_regions(mem_size).len();
        let hotplug = config
            .mem_hotplug
            .map(|h| check_mem_hotplug(&h, mem_size, boot_slots, &limits))
            .transpose()?;
        let drives = check_drives(&config.drives)?;
        check_net(&config.net)?;
        crate::config::check_fs(&config.fs)?;
        check_device_count(config)?;
        tracing::debug!(vcpus = vcpu_count, mem_size, ?limits, "building microVM");

        let vm = Vm::new(&kvm)?;
        // A backend that maps guest memory itself needs it shared; a
        // relaying device shares only its own buffers.
        let backing = if config.fs.iter().all(|f| f.relay) {
            memory::Backing::Private
        } else {
            memory::Backing::Shared
        };
        let mem = memory::create_with(mem_size, backing)?;
        vm.register_memory(&mem)?;
        // The hot-pluggable region joins guest memory (devices may be given
        // buffers there) but not KVM: the virtio-mem device maps its slots.
        let mem = match &hotplug {
            Some(r) => memory::add_region(&mem, vm_memory::GuestAddress(r.addr), r.size, backing)?,
            None => mem,
        };
        tracing::debug!(
            elapsed_us = t0.elapsed().as_micros() as u64,
            "VM and memory ready"
        );

        let exit = ExitNotifier::new().map_err(os("create the exit eventfd"))?;
        let mut pio = Bus::new();
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(os("create the serial irqfd"))?;
        vm.register_irqfd(&serial_irq, serial::COM1_IRQ)?;
        let out = serial_output(&config.serial)?;
        let serial = Arc::new(Mutex::new(Serial::new(serial_irq, out)));
        pio.insert(serial.clone(), serial::COM1_BASE, serial::UART_REGS)?;
        let kbd_irq = EventFd::new(EFD_NONBLOCK).map_err(os("create the keyboard irqfd"))?;
        vm.register_irqfd(&kbd_irq, i8042::KBD_IRQ)?;
        let i8042 = Arc::new(Mutex::new(I8042::new(
            ResetTrigger(exit.clone()),
            Some(kbd_irq),
        )));
        pio.insert(i8042.clone(), i8042::I8042_BASE, i8042::I8042_PORTS)?;

        let mut event_manager =
            EventManager::<Subscriber>::new().map_err(|e| VmmError::EventLoop(Flat(e)))?;
        let mut mmio = Bus::new();
        let mut slots = MmioSlots::new();
        let mut device_cmdline = String::new();
        let drives = attach_drives(
            &mut slots,
            &vm,
            &mem,
            &mut mmio,
            &mut event_manager,
            &drives,
            &mut device_cmdline,
        )?;
        let mut virtio = Vec::new();
        for (slot, drive) in drives.iter().enumerate() {
            let block = drive.block.lock().unwrap_or_else(|e| e.into_inner());
            metrics.register_device("block", &block.config().id, block.metrics());
            virtio.push(VirtioSlot {
                slot: slot as u32,
                transport: drive.transport.clone(),
                device: AttachedDevice::Block {
                    device: drive.block.clone(),
                    is_root: drive.is_root,
                },
            });
        }
        for nic in &config.net {
            let net = Net::new(nic)?;
            metrics.register_device("net", &nic.id, net.metrics());
            let net = Arc::new(Mutex::new(net));
            let slot = slots.next;
            let transport = slots.attach(
                &vm,
                &mem,
                &mut mmio,
                &mut event_manager,
                net.clone(),
                &mut device_cmdline,
            )?;
            virtio.push(VirtioSlot {
                slot,
                transport,
                device: AttachedDevice::Net {
                    device: net,
                    config: nic.clone(),
                },
            });
            tracing::debug!(net = %nic.id, tap = %nic.host_dev_name, "virtio-net attached");
        }
        if let Some(vsock) = &config.vsock {
            crate::config::check_vsock(vsock)?;
            let dev = crate::devices::virtio::vsock::Vsock::new(vsock)?;
            metrics.register_device("vsock", "vsock", dev.metrics());
            let dev = Arc::new(Mutex::new(dev));
            let slot = slots.next;
            let transport = slots.attach(
                &vm,
                &mem,
                &mut mmio,
                &mut event_manager,
                dev.clone(),
                &mut device_cmdline,
            )?;
            virtio.push(VirtioSlot {
                slot,
                transport,
                device: AttachedDevice::Vsock {
                    device: dev,
                    config: vsock.clone(),
                },
            });
            tracing::debug!(cid = vsock.guest_cid, "virtio-vsock attached");
        }
        for f in &config.fs {
            let dev = Fs::new(f).map_err(|source| VmmError::Fs {
                id: f.id.clone(),
                source,
            })?;
            metrics.register_device("fs", &f.id, dev.metrics());
            let dev = Arc::new(Mutex::new(dev));
            let slot = slots.next;
            let transport = slots.attach(
                &vm,
                &mem,
                &mut mmio,
                &mut event_manager,
                dev.clone(),
                &mut device_cmdline,
            )?;
            virtio.push(VirtioSlot {
                slot,
                transport,
                device: AttachedDevice::Fs { device: dev },
            });
            tracing::debug!(fs = %f.id, tag = %f.tag, socket = %f.socket.display(), "virtio-fs attached");
        }
        let mem_hotplug = match hotplug {
            Some(region) => {
                let kvm_slots = vm.memory_slots(mem.clone(), boot_slots as u32);
                let dev = Mem::new(region, mem.clone(), Box::new(kvm_slots))?;
                metrics.register_device("mem", "hotplug", dev.metrics());
                let device = Arc::new(Mutex::new(dev));
                let slot = slots.next;
                let transport = slots.attach(
                    &vm,
                    &mem,
                    &mut mmio,
                    &mut event_manager,
                    device.clone(),
                    &mut device_cmdline,
                )?;
                virtio.push(VirtioSlot {
                    slot,
                    transport: transport.clone(),
                    device: AttachedDevice::Mem {
                        device: device.clone(),
                    },
                });
                tracing::debug!(
                    addr = region.addr,
                    size = region.size,
                    "virtio-mem attached"
                );
                Some(AttachedMem { device, transport })
            }
            None => None,
        };
        let mut boot_source = config.boot.clone();
        boot_source.cmdline.push_str(&device_cmdline);
        if mem_hotplug.is_some() {
            // Plugged memory goes to ZONE_MOVABLE, so the guest can empty
            // it again when asked to unplug.
            add_kernel_param(
                &mut boot_source.cmdline,
                "memhp_default_state=online_movable",
            );
        }
        if max_vcpus > vcpu_count {
            add_kernel_param(&mut boot_source.cmdline, &format!("maxcpus={vcpu_count}"));
        }

        let load_start = Instant::now();
        let loaded = boot::load(&mem, mem_size, &boot_source)?;
        let image_load = load_start.elapsed();
        regs::write_boot_tables(&mem)?;
        mptable::setup_mptable(&mem, max_vcpus)?;
        tracing::debug!(elapsed_us = t0.elapsed().as_micros() as u64, "guest loaded");

        let shared = VcpuShared {
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            exit: exit.clone(),
            stop: Arc::new(AtomicBool::new(false)),
            first_entry: Arc::new(OnceLock::new()),
            pause: Arc::new(PauseGate::default()),
            metrics: metrics.clone(),
        };
        let mut vcpus = Vec::with_capacity(usize::from(max_vcpus));
        for index in 0..max_vcpus {
            let vcpu = Vcpu::new(vm.fd(), index, shared.clone())?;
            vcpu.configure(&host_cpuid, max_vcpus, (index == 0).then_some(loaded.entry))?;
            vcpus.push(vcpu);
        }

        tracing::debug!(
            elapsed_us = t0.elapsed().as_micros() as u64,
            "vCPUs configured"
        );
        event_manager.add_subscriber(Arc::new(Mutex::new(ExitWatcher(exit))));

        Ok(Vmm {
            vcpus,
            vcpu_threads: Vec::new(),
            shared,
            event_manager,
            image_load,
            drives,
            mem_hotplug,
            boot_vcpus: vcpu_count,
            i8042,
            serial,
            virtio,
            host,
            metrics,
            vm,
            mem,
            memory_fill: None,
        })
    }

    /// How long copying the kernel and initrd into guest memory took: the
    /// part of setup that scales with the images, not with the VMM.
    pub fn image_load_time(&self) -> Duration {
        self.image_load
    }

    /// Points drive `id` at a new backing file while the VM runs and tells
    /// the guest's driver, which rereads the capacity (a config-change
    /// interrupt). Used for container root filesystems arriving in spare
    /// drive slots.
    pub fn swap_drive(&self, id: &str, path: std::path::PathBuf) -> Result<(), VmmError> {
        let drive = self
            .drives
            .iter()
            .find(|d| {
                d.block
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .config()
                    .id
                    == id
            })
            .ok_or_else(|| VmmError::NoSuchDrive(id.to_string()))?;
        drive
            .block
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .swap_backing(path)?;
        drive
            .transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .notify_config_change();
        Ok(())
    }

    /// The hot-pluggable memory's sizes, if the VM has any.
    pub fn mem_hotplug_status(&self) -> Option<MemStatus> {
        self.mem_hotplug
            .as_ref()
            .map(|m| m.device.lock().unwrap_or_else(|e| e.into_inner()).status())
    }

    /// Asks the guest to have `bytes` of the hot-pluggable region plugged
    /// (a multiple of the block size, at most the region): the device's
    /// requested size changes and the guest's driver gets a
    /// configuration-change interrupt, then plugs or unplugs blocks until
    /// it has that much ([`Vmm::mem_hotplug_status`] follows it).
    pub fn resize_mem_hotplug(&self, bytes: u64) -> Result<(), VmmError> {
        let m = self.mem_hotplug.as_ref().ok_or(VmmError::NoMemHotplug)?;
        let changed = m
            .device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_requested_size(bytes)?;
        if changed {
            m.transport
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .notify_config_change();
        }
        Ok(())
    }

    /// Starts one thread per vCPU and confines them and the calling thread
    /// (which runs the event loop) with `seccomp`'s filters: every vCPU
    /// installs its own, then waits until this thread has installed the VMM
    /// filter, so the guest runs no instruction before all are in place.
    /// From here on SIGTERM, SIGINT and SIGHUP stop the VM through the
    /// event loop (they are blocked in every thread started after this
    /// call).
    pub fn start(&mut self, seccomp: &SeccompFilters) -> Result<(), VmmError> {
        vcpu::install_kick_handler()
            .map_err(|e| os("install the vCPU kick handler")(std::io::Error::from(e)))?;
        let fd = TerminationFd::new().map_err(os("watch termination signals"))?;
        self.event_manager
            .add_subscriber(Arc::new(Mutex::new(SignalWatcher {
                fd,
                exit: self.shared.exit.clone(),
            })));
        let (ready_tx, ready) = mpsc::channel::<Result<(), SeccompError>>();
        let mut go = Vec::with_capacity(self.vcpus.len());
        let mut failure = None;
        for vcpu in self.vcpus.drain(..) {
            let (go_tx, go_rx) = mpsc::channel::<bool>();
            let ready_tx = ready_tx.clone();
            let seccomp = seccomp.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("husk-vcpu{}", vcpu.index()))
                .spawn(move || {
                    let _ = ready_tx.send(seccomp.install(ThreadKind::Vcpu));
                    if go_rx.recv() == Ok(true) {
                        vcpu.run();
                    }
                });
            match spawned {
                Ok(handle) => {
                    self.vcpu_threads.push(handle);
                    go.push(go_tx);
                }
                Err(e) => {
                    failure = Some(os("spawn a vCPU thread")(e));
                    break;
                }
            }
        }
        drop(ready_tx);
        for _ in 0..go.len() {
            match ready.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failure = failure.or(Some(VmmError::Seccomp(e))),
                Err(_) => failure = failure.or(Some(VmmError::VcpuSetupLost)),
            }
        }
        if failure.is_none() {
            if let Err(e) = seccomp.install(ThreadKind::Vmm) {
                failure = Some(VmmError::Seccomp(e));
            }
        }
        let ok = failure.is_none();
        for tx in go {
            let _ = tx.send(ok);
        }
        match failure {
            None => Ok(()),
            Some(e) => {
                // The threads return without entering the guest.
                for handle in self.vcpu_threads.drain(..) {
                    let _ = handle.join();
                }
                Err(e)
            }
        }
    }

    /// When vCPU 0 first entered the guest.
    pub fn first_vcpu_entry(&self) -> Option<Instant> {
        self.shared.first_entry.get().copied()
    }

    /// Runs the event loop until the guest ends, then stops every vCPU.
    pub fn run(&mut self) -> Result<VmExit, VmmError> {
        self.run_with(|_| {})
    }

    /// Runs the event loop until the guest ends, calling `on_wake` after
    /// every round of events (so a controller woken through a source added
    /// with [`Vmm::add_wake_source`] can act on the VM), then stops every
    /// vCPU.
    pub fn run_with(&mut self, mut on_wake: impl FnMut(&mut Vmm)) -> Result<VmExit, VmmError> {
        let exit = loop {
            if let Some(exit) = self.shared.exit.reason() {
                break exit;
            }
            self.event_manager
                .run()
                .map_err(|e| VmmError::EventLoop(Flat(e)))?;
            on_wake(self);
        };
        self.stop_vcpus();
        Ok(exit)
    }

    /// Makes `fd` wake the event loop (see [`Vmm::run_with`]); `drain` is
    /// called when it is readable and must consume the readiness.
    pub fn add_wake_source<F>(&mut self, fd: F, drain: fn(&mut F))
    where
        F: std::os::fd::AsRawFd + Send + 'static,
    {
        self.event_manager
            .add_subscriber(Arc::new(Mutex::new(WakeSource { fd, drain })));
    }

    /// A handle another thread can stop this VM with.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.shared.exit.clone())
    }

    /// The counters this VM keeps.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Stops every vCPU between two guest instructions; devices keep
    /// serving what is already queued. Returns once all vCPUs are parked.
    pub fn pause(&mut self) -> Result<(), VmmError> {
        let gate = &self.shared.pause;
        gate.request_pause();
        let signal = vcpu::vcpu_kick_signal();
        let deadline = Instant::now() + VCPU_STOP_TIMEOUT;
        let count = self.vcpu_threads.len();
        while Instant::now() < deadline {
            for handle in &self.vcpu_threads {
                if !handle.is_finished() {
                    let _ = handle.kill(signal);
                }
            }
            if gate.wait_parked(count, Duration::from_millis(1)) {
                tracing::info!("microVM paused");
                return Ok(());
            }
        }
        gate.resume();
        Err(VmmError::PauseTimeout(VCPU_STOP_TIMEOUT))
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&mut self) {
        self.shared.pause.resume();
        tracing::info!("microVM resumed");
    }

    /// Presses Ctrl+Alt+Del on the guest's keyboard controller. A guest
    /// kernel with an i8042 keyboard driver and a VT reboots (or signals its
    /// init); husk's own guest kernel has neither, and ignores it.
    pub fn send_ctrl_alt_del(&self) {
        self.i8042
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ctrl_alt_del();
    }

    /// True while the VM is paused.
    pub fn is_paused(&self) -> bool {
        self.shared.pause.is_paused()
    }

    /// Asks every vCPU thread to stop and waits (bounded) for them.
    fn stop_vcpus(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.pause.wake_all();
        let signal = vcpu::vcpu_kick_signal();
        let deadline = Instant::now() + VCPU_STOP_TIMEOUT;
        for handle in self.vcpu_threads.drain(..) {
            while !handle.is_finished() && Instant::now() < deadline {
                // Repeat the kick: one that lands just before KVM_RUN is lost.
                let _ = handle.kill(signal);
                std::thread::sleep(Duration::from_millis(1));
            }
            if handle.is_finished() {
                if handle.join().is_err() {
                    tracing::error!("a vCPU thread panicked");
                }
            } else {
                tracing::warn!("a vCPU thread did not stop in time");
            }
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if !self.vcpu_threads.is_empty() {
            self.stop_vcpus();
        }
        // After the vCPUs: one waiting on a page is served until then.
        if let Some(fill) = &self.memory_fill {
            fill.stop();
        }
    }
}
