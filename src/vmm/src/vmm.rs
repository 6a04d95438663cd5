//! The VM controller: builds a microVM from a [`VmConfig`] (KVM VM, guest
//! memory, devices, kernel, vCPUs), starts one thread per vCPU and runs the
//! epoll event loop on the calling thread until the guest ends. Everything
//! outside this crate drives a VM through here and nowhere else.

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
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
    check_drives, check_memory, check_vcpus, ConfigError, DriveConfig, HostLimits, SerialOutput,
    VmConfig,
};
use crate::devices::bus::{Bus, BusError};
use crate::devices::legacy::{i8042, serial, Serial, I8042};
use crate::devices::virtio::block::{Block, BlockError};
use crate::devices::virtio::mmio::{MmioTransport, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET};
use crate::devices::virtio::VirtioDevice;
use crate::exit::{ExitNotifier, ResetTrigger, VmExit};
use crate::signal::TerminationFd;
use crate::vstate::memory::{self, MemoryError};
use crate::vstate::vcpu::{self, Vcpu, VcpuError, VcpuShared};
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
    #[error("cannot write the boot tables: {0}")]
    BootTables(#[from] regs::RegsError),
    /// The MP table could not be written.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// A drive could not be set up.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// No drive has that id.
    #[error("no drive with id {0:?}")]
    NoSuchDrive(String),
    /// Two devices claim the same addresses.
    #[error("device layout: {0}")]
    Bus(#[from] BusError),
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("cannot read the CPUID KVM supports: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
    /// The serial output file could not be opened.
    #[error("cannot open serial output {path}: {source}")]
    SerialOutput {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// An eventfd, signal handler, thread or epoll operation failed.
    #[error("{what}: {source}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The event loop failed.
    #[error("event loop: {0:?}")]
    EventLoop(event_manager::Error),
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
struct ExitWatcher(Arc<ExitNotifier>);

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

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

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

/// The first GSI handed to virtio devices (4 is the serial port).
const FIRST_VIRTIO_GSI: u32 = 5;

/// A drive attached to the VM.
pub struct AttachedDrive {
    /// The device.
    pub block: Arc<Mutex<Block>>,
    /// Its transport, for configuration-change notifications.
    pub transport: Arc<Mutex<MmioTransport>>,
}

/// Puts the drives on the MMIO bus, wires their queue notifications and
/// interrupts into KVM, registers them with the event loop, and returns the
/// kernel command-line fragment that announces them.
fn attach_drives(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    mmio: &mut Bus,
    event_manager: &mut EventManager<Subscriber>,
    drives: &[DriveConfig],
) -> Result<(Vec<AttachedDrive>, String), VmmError> {
    let mut attached = Vec::with_capacity(drives.len());
    let mut cmdline = String::new();
    for (slot, drive) in drives.iter().enumerate() {
        let base = MMIO_DEVICES_START + slot as u64 * MMIO_WINDOW_SIZE;
        let gsi = FIRST_VIRTIO_GSI + slot as u32;
        let block = Block::new(drive.block.clone())?;
        vm.register_irqfd(block.interrupt().irqfd(), gsi)?;
        for (queue, event) in block.queue_events().iter().enumerate() {
            vm.register_ioevent(event, base + QUEUE_NOTIFY_OFFSET, queue as u32)?;
        }
        let block = Arc::new(Mutex::new(block));
        let transport = Arc::new(Mutex::new(MmioTransport::new(mem.clone(), block.clone())));
        mmio.insert(transport.clone(), base, MMIO_WINDOW_SIZE)?;
        event_manager.add_subscriber(block.clone());
        cmdline.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{gsi}"));
        if drive.is_root {
            let mode = if drive.block.read_only { "ro" } else { "rw" };
            cmdline.push_str(&format!(" root=/dev/vda {mode}"));
        }
        tracing::debug!(drive = %drive.block.id, base, gsi, "virtio-blk attached");
        attached.push(AttachedDrive { block, transport });
    }
    Ok((attached, cmdline))
}

/// A built (and possibly running) microVM.
pub struct Vmm {
    vcpus: Vec<Vcpu>,
    vcpu_threads: Vec<JoinHandle<()>>,
    shared: VcpuShared,
    event_manager: EventManager<Subscriber>,
    image_load: Duration,
    drives: Vec<AttachedDrive>,
    // Held, not read: they must outlive the vCPUs and devices above, and the
    // VM fd (with its memory slots) must go before the memory it maps.
    _vm: Vm,
    _mem: GuestMemoryMmap,
}

impl Vmm {
    /// Builds the microVM described by `config`; its vCPUs do not run yet.
    pub fn new(config: &VmConfig) -> Result<Self, VmmError> {
        let t0 = Instant::now();
        let kvm = vm::open_kvm()?;
        let host_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VmmError::SupportedCpuid)?;
        let limits = HostLimits {
            kvm_max_vcpus: kvm.get_max_vcpus(),
            phys_address_bits: cpuid::phys_address_bits(&host_cpuid),
            host_mem_mib: host_mem_mib(),
        };
        let vcpu_count = check_vcpus(config.vcpus, &limits)?;
        let mem_size = check_memory(config.mem_mib, &limits)?;
        let drives = check_drives(&config.drives)?;
        tracing::debug!(vcpus = vcpu_count, mem_size, ?limits, "building microVM");

        let vm = Vm::new(&kvm)?;
        let mem = memory::create(mem_size)?;
        vm.register_memory(&mem)?;
        tracing::debug!(
            elapsed_us = t0.elapsed().as_micros() as u64,
            "VM and memory ready"
        );

        let exit = ExitNotifier::new().map_err(os("create the exit eventfd"))?;
        let mut pio = Bus::new();
        let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(os("create the serial irqfd"))?;
        vm.register_irqfd(&serial_irq, serial::COM1_IRQ)?;
        let out: Box<dyn Write + Send> = match &config.serial {
            SerialOutput::Stdout => Box::new(std::io::stdout()),
            SerialOutput::Sink => Box::new(std::io::sink()),
            SerialOutput::File(path) => Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| VmmError::SerialOutput {
                        path: path.clone(),
                        source,
                    })?,
            ),
        };
        pio.insert(
            Arc::new(Mutex::new(Serial::new(serial_irq, out))),
            serial::COM1_BASE,
            serial::UART_REGS,
        )?;
        pio.insert(
            Arc::new(Mutex::new(I8042::new(ResetTrigger(exit.clone())))),
            i8042::I8042_BASE,
            i8042::I8042_PORTS,
        )?;

        let mut event_manager = EventManager::<Subscriber>::new().map_err(VmmError::EventLoop)?;
        let mut mmio = Bus::new();
        let (drives, device_cmdline) =
            attach_drives(&vm, &mem, &mut mmio, &mut event_manager, &drives)?;
        let mut boot_source = config.boot.clone();
        boot_source.cmdline.push_str(&device_cmdline);

        let load_start = Instant::now();
        let loaded = boot::load(&mem, mem_size, &boot_source)?;
        let image_load = load_start.elapsed();
        regs::write_boot_tables(&mem)?;
        mptable::setup_mptable(&mem, vcpu_count)?;
        tracing::debug!(elapsed_us = t0.elapsed().as_micros() as u64, "guest loaded");

        let shared = VcpuShared {
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            exit: exit.clone(),
            stop: Arc::new(AtomicBool::new(false)),
            first_entry: Arc::new(OnceLock::new()),
        };
        let mut vcpus = Vec::with_capacity(usize::from(vcpu_count));
        for index in 0..vcpu_count {
            let vcpu = Vcpu::new(vm.fd(), index, shared.clone())?;
            vcpu.configure(
                &host_cpuid,
                vcpu_count,
                (index == 0).then_some(loaded.entry),
            )?;
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
            _vm: vm,
            _mem: mem,
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

    /// Starts one thread per vCPU. From here on SIGTERM, SIGINT and SIGHUP
    /// stop the VM through the event loop (they are blocked in every thread
    /// started after this call).
    pub fn start(&mut self) -> Result<(), VmmError> {
        vcpu::install_kick_handler()
            .map_err(|e| os("install the vCPU kick handler")(std::io::Error::from(e)))?;
        let fd = TerminationFd::new().map_err(os("watch termination signals"))?;
        self.event_manager
            .add_subscriber(Arc::new(Mutex::new(SignalWatcher {
                fd,
                exit: self.shared.exit.clone(),
            })));
        for vcpu in self.vcpus.drain(..) {
            let handle = std::thread::Builder::new()
                .name(format!("husk-vcpu{}", vcpu.index()))
                .spawn(move || vcpu.run())
                .map_err(os("spawn a vCPU thread"))?;
            self.vcpu_threads.push(handle);
        }
        Ok(())
    }

    /// When vCPU 0 first entered the guest.
    pub fn first_vcpu_entry(&self) -> Option<Instant> {
        self.shared.first_entry.get().copied()
    }

    /// Runs the event loop until the guest ends, then stops every vCPU.
    pub fn run(&mut self) -> Result<VmExit, VmmError> {
        let exit = loop {
            if let Some(exit) = self.shared.exit.reason() {
                break exit;
            }
            self.event_manager.run().map_err(VmmError::EventLoop)?;
        };
        self.stop_vcpus();
        Ok(exit)
    }

    /// Asks every vCPU thread to stop and waits (bounded) for them.
    fn stop_vcpus(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
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
    }
}
