//! The one place a microVM is driven from outside: the API server and the
//! `--config-file` launcher hand it [`Request`]s, it checks them against the
//! VM's state (configuration before InstanceStart, operations after), keeps
//! the [`VmResources`] put so far, builds and starts the [`Vmm`], and
//! answers with a [`Response`] or an [`ActionError`] (a 400 for the API).
//! It never speaks HTTP, and the API never reaches KVM except through it.

pub mod resources;
pub mod snapshot;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{SerialOutput, VmConfig};
use crate::error::Chain;
use crate::metrics::{Metrics, MetricsError, MetricsSink};
use crate::seccomp::SeccompFilters;
use crate::vmm::{Vmm, VmmError};
use crate::BootSource;
pub use husk_api_types::{
    Action, ActionType, InstanceInfo, InstanceState, VmState, VmStateRequest,
};
pub use resources::{
    BootSourceConfig, Drive, DriveUpdate, FsConfig, Logger, MachineConfig, MachineConfigUpdate,
    MemoryHotplugConfig, MemoryHotplugSizeUpdate, MemoryHotplugStatus, MetricsConfig,
    NetworkInterface, ResourceError, Validate, ValidateAt, VmResources, Vsock,
};

/// How often metrics are written without being asked.
pub const METRICS_PERIOD: Duration = Duration::from_secs(60);

/// Something asked of the VM.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// `GET /`.
    GetInstanceInfo,
    /// `GET /machine-config`.
    GetMachineConfig,
    /// `PUT /machine-config`.
    PutMachineConfig(MachineConfig),
    /// `PATCH /machine-config`.
    PatchMachineConfig(MachineConfigUpdate),
    /// `PUT /boot-source`.
    PutBootSource(BootSourceConfig),
    /// `PUT /drives/{id}` (id from the path, body).
    PutDrive(String, Drive),
    /// `PATCH /drives/{id}`.
    PatchDrive(String, DriveUpdate),
    /// `PUT /network-interfaces/{id}`.
    PutNetworkInterface(String, NetworkInterface),
    /// `PUT /vsock`.
    PutVsock(Vsock),
    /// `PUT /fs/{id}` (id from the path, body).
    PutFs(String, FsConfig),
    /// `PUT /actions`.
    Action(ActionType),
    /// `PATCH /vm`.
    PatchVm(VmStateRequest),
    /// `PUT /logger` (already applied by the binary, which owns logging;
    /// kept here for `GET /vm/config`).
    PutLogger(Logger),
    /// `PUT /metrics`.
    PutMetrics(MetricsConfig),
    /// `GET /vm/config`.
    GetVmConfig,
    /// `PUT /hotplug/memory`.
    PutMemoryHotplug(MemoryHotplugConfig),
    /// `PATCH /hotplug/memory`.
    PatchMemoryHotplug(MemoryHotplugSizeUpdate),
    /// `GET /hotplug/memory`.
    GetMemoryHotplug,
    /// `PUT /snapshot/create`.
    CreateSnapshot(snapshot::SnapshotCreateParams),
    /// `PUT /snapshot/load`.
    LoadSnapshot(snapshot::SnapshotLoadParams),
}

/// What a request returns.
#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    /// Done, nothing to say (204).
    Empty,
    /// A JSON document (200).
    Json(serde_json::Value),
}

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    /// A body or value that cannot be accepted.
    #[error(transparent)]
    Resource(#[from] ResourceError),
    /// Configuration after the VM started.
    #[error("the microVM is running: {0} can only be done before InstanceStart")]
    AfterStart(&'static str),
    /// An operation that needs a running VM.
    #[error("the microVM is not started: {0} needs InstanceStart first")]
    BeforeStart(&'static str),
    /// InstanceStart without a kernel.
    #[error("no boot source: PUT /boot-source before InstanceStart")]
    NoBootSource,
    /// InstanceStart twice.
    #[error("the microVM is already started")]
    AlreadyStarted,
    /// Resume a running VM, pause a paused one.
    #[error("the microVM is already {0}")]
    AlreadyInState(&'static str),
    /// The VM could not be built or started.
    #[error("cannot start the microVM")]
    Start(#[source] VmmError),
    /// A running VM refused an operation.
    #[error(transparent)]
    Vmm(VmmError),
    /// Metrics could not be set up or written.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// A snapshot load after something was configured for a boot.
    #[error("a snapshot can only be loaded into a fresh microVM: nothing but the logger and metrics may be configured before PUT /snapshot/load")]
    LoadNotAllowed,
    /// A snapshot load into a running VM.
    #[error("the microVM is already running: a snapshot can only be loaded before InstanceStart")]
    LoadAfterStart,
    /// The snapshot could not be written.
    #[error("cannot create the snapshot")]
    CreateSnapshot(#[source] crate::persist::SnapshotError),
    /// The snapshot could not be loaded; nothing ran.
    #[error("cannot load the snapshot")]
    LoadSnapshot(#[source] crate::persist::RestoreError),
}

/// The state machine behind the API.
pub struct Controller {
    id: String,
    resources: VmResources,
    metrics: Arc<Metrics>,
    sink: Option<MetricsSink>,
    last_flush: Instant,
    started: bool,
    /// Something a boot needs was configured: a snapshot load is refused
    /// from then on, as Firecracker does.
    boot_path: bool,
    /// When InstanceStart arrived, until the first vCPU entry is recorded.
    start_requested: Option<Instant>,
    serial: SerialOutput,
    seccomp: SeccompFilters,
}

impl Controller {
    /// A controller for instance `id` whose guest console goes to `serial`,
    /// counting into `metrics`.
    pub fn new(id: String, serial: SerialOutput, metrics: Arc<Metrics>) -> Self {
        Controller {
            id,
            resources: VmResources::default(),
            metrics,
            sink: None,
            last_flush: Instant::now(),
            started: false,
            boot_path: false,
            start_requested: None,
            serial,
            seccomp: SeccompFilters::builtin(),
        }
    }

    /// The seccomp filters InstanceStart confines the VM's threads with
    /// (the built-in ones unless changed here).
    pub fn set_seccomp(&mut self, seccomp: SeccompFilters) {
        self.seccomp = seccomp;
    }

    /// The counters shared with the API server.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// What has been configured so far.
    pub fn resources(&self) -> &VmResources {
        &self.resources
    }

    /// Applies a whole configuration document (`--config-file`), as if each
    /// of its parts had been put in turn.
    pub fn load(&mut self, resources: VmResources) -> Result<(), ActionError> {
        resources.validate()?;
        let boots = resources.boot_source.is_some()
            || resources.machine_config != MachineConfig::default()
            || !resources.drives.is_empty()
            || !resources.network_interfaces.is_empty()
            || resources.vsock.is_some()
            || !resources.fs.is_empty()
            || resources.memory_hotplug.is_some();
        if resources.snapshot_load.is_some() && boots {
            return Err(ActionError::LoadNotAllowed);
        }
        self.boot_path = boots;
        if let Some(m) = &resources.metrics {
            self.sink = Some(MetricsSink::open(&m.metrics_path)?);
        }
        self.resources = resources;
        Ok(())
    }

    fn info(&self, state: InstanceState) -> Response {
        json(&InstanceInfo {
            id: self.id.clone(),
            state,
            vmm_version: env!("CARGO_PKG_VERSION").to_string(),
            app_name: "husk".to_string(),
        })
    }

    /// Serves a request before InstanceStart. A successful InstanceStart
    /// returns the started VM, which the caller then runs (handing later
    /// requests to [`Controller::handle_running`]).
    pub fn handle(&mut self, request: Request) -> Result<(Response, Option<Vmm>), ActionError> {
        if self.started {
            return Err(ActionError::AlreadyStarted);
        }
        if matches!(
            request,
            Request::PutMachineConfig(_)
                | Request::PatchMachineConfig(_)
                | Request::PutBootSource(_)
                | Request::PutDrive(..)
                | Request::PatchDrive(..)
                | Request::PutNetworkInterface(..)
                | Request::PutVsock(_)
                | Request::PutFs(..)
                | Request::PutMemoryHotplug(_)
        ) {
            self.boot_path = true;
        }
        let r = &mut self.resources;
        let response = match request {
            Request::GetInstanceInfo => self.info(InstanceState::NotStarted),
            Request::GetMachineConfig => json(&r.machine_config),
            Request::GetVmConfig => json(&self.resources),
            Request::PutMachineConfig(m) => {
                m.validate()?;
                r.machine_config = m;
                Response::Empty
            }
            Request::PatchMachineConfig(patch) => {
                let m = patch.apply(&r.machine_config);
                m.validate()?;
                r.machine_config = m;
                Response::Empty
            }
            Request::PutBootSource(b) => {
                b.validate()?;
                r.boot_source = Some(b);
                Response::Empty
            }
            Request::PutDrive(id, d) => {
                d.validate(&id)?;
                resources::put_drive(r, d)?;
                Response::Empty
            }
            Request::PatchDrive(id, patch) => {
                patch.validate(&id)?;
                let drive = r
                    .drives
                    .iter_mut()
                    .find(|d| d.drive_id == id)
                    .ok_or(ResourceError::NoSuchDrive(id))?;
                if let Some(p) = patch.path_on_host {
                    drive.path_on_host = p;
                }
                Response::Empty
            }
            Request::PutNetworkInterface(id, i) => {
                i.validate(&id)?;
                resources::put_network_interface(r, i)?;
                Response::Empty
            }
            Request::PutVsock(v) => {
                v.validate()?;
                resources::put_vsock(r, v)?;
                Response::Empty
            }
            Request::PutFs(id, f) => {
                f.validate(&id)?;
                resources::put_fs(r, f)?;
                Response::Empty
            }
            Request::PutLogger(l) => {
                r.logger = Some(l);
                Response::Empty
            }
            Request::PutMetrics(m) => {
                self.put_metrics(m)?;
                Response::Empty
            }
            Request::PutMemoryHotplug(h) => {
                h.validate()?;
                resources::put_memory_hotplug(r, h)?;
                Response::Empty
            }
            Request::PatchMemoryHotplug(_) => {
                return Err(ActionError::BeforeStart("resizing hot-pluggable memory"))
            }
            Request::GetMemoryHotplug => {
                let h = r
                    .memory_hotplug
                    .as_ref()
                    .ok_or(ResourceError::NoMemoryHotplug)?;
                json(&resources::unplugged_status(h))
            }
            Request::PatchVm(_) => return Err(ActionError::BeforeStart("pausing or resuming")),
            Request::Action(ActionType::FlushMetrics) => {
                self.flush_metrics()?;
                Response::Empty
            }
            Request::Action(ActionType::SendCtrlAltDel) => {
                return Err(ActionError::BeforeStart("SendCtrlAltDel"))
            }
            Request::Action(ActionType::InstanceStart) => {
                let vmm = self.start()?;
                return Ok((Response::Empty, Some(vmm)));
            }
            Request::CreateSnapshot(_) => {
                return Err(ActionError::BeforeStart("creating a snapshot"))
            }
            Request::LoadSnapshot(params) => {
                let vmm = self.load_snapshot(&params)?;
                return Ok((Response::Empty, Some(vmm)));
            }
        };
        Ok((response, None))
    }

    /// Builds the VM from a snapshot, starts its (paused) vCPUs, and
    /// resumes them if asked. A refusal leaves the controller as it was.
    fn load_snapshot(&mut self, params: &snapshot::SnapshotLoadParams) -> Result<Vmm, ActionError> {
        if self.boot_path {
            return Err(ActionError::LoadNotAllowed);
        }
        let mut load = snapshot::load_params(params, self.serial.clone())?;
        load.seccomp = self.seccomp.clone();
        let t0 = Instant::now();
        let mut vmm =
            Vmm::restore(&load, self.metrics.clone()).map_err(ActionError::LoadSnapshot)?;
        vmm.start(&self.seccomp).map_err(ActionError::Start)?;
        if params.resume_vm {
            vmm.resume();
        }
        self.started = true;
        self.resources = snapshot::restored_resources(&vmm, &self.resources);
        self.metrics
            .boot
            .build_us
            .add(t0.elapsed().as_micros() as u64);
        tracing::info!(
            id = %self.id,
            load_us = t0.elapsed().as_micros() as u64,
            resumed = params.resume_vm,
            "microVM loaded from a snapshot"
        );
        Ok(vmm)
    }

    fn put_metrics(&mut self, m: MetricsConfig) -> Result<(), ActionError> {
        self.sink = Some(MetricsSink::open(&m.metrics_path)?);
        self.resources.metrics = Some(m);
        Ok(())
    }

    /// Builds the VM from the resources and starts its vCPUs.
    fn start(&mut self) -> Result<Vmm, ActionError> {
        let config = self.vm_config()?;
        let t0 = Instant::now();
        let mut vmm =
            Vmm::with_metrics(&config, self.metrics.clone()).map_err(ActionError::Start)?;
        vmm.start(&self.seccomp).map_err(ActionError::Start)?;
        self.started = true;
        self.start_requested = Some(t0);
        self.metrics
            .boot
            .build_us
            .add(t0.elapsed().as_micros() as u64);
        tracing::info!(
            id = %self.id,
            setup_us = t0.elapsed().as_micros() as u64,
            "microVM started"
        );
        Ok(vmm)
    }

    /// The VMM configuration the resources describe.
    pub fn vm_config(&self) -> Result<VmConfig, ActionError> {
        let r = &self.resources;
        let boot = r.boot_source.as_ref().ok_or(ActionError::NoBootSource)?;
        Ok(VmConfig {
            vcpus: usize::from(r.machine_config.vcpu_count),
            mem_mib: r.machine_config.mem_size_mib,
            boot: BootSource {
                kernel: boot.kernel_image_path.clone(),
                initrd: boot.initrd_path.clone(),
                cmdline: boot
                    .boot_args
                    .clone()
                    .unwrap_or_else(|| resources::DEFAULT_BOOT_ARGS.to_string()),
            },
            serial: self.serial.clone(),
            drives: r.drives.iter().map(resources::drive_config).collect(),
            net: r
                .network_interfaces
                .iter()
                .map(resources::net_config)
                .collect::<Result<_, _>>()?,
            vsock: r.vsock.as_ref().map(resources::vsock_config).transpose()?,
            max_vcpus: r.machine_config.max_vcpu_count.map(usize::from),
            mem_hotplug: r.memory_hotplug.as_ref().map(resources::mem_hotplug_config),
            fs: r
                .fs
                .iter()
                .map(resources::fs_config)
                .collect::<Result<_, _>>()?,
        })
    }

    /// Records when the guest first ran, once it has (call it whenever the
    /// VM's event loop wakes).
    pub fn note_first_entry(&mut self, vmm: &Vmm) {
        if let (Some(t0), Some(entry)) = (self.start_requested, vmm.first_vcpu_entry()) {
            let us = entry.saturating_duration_since(t0).as_micros() as u64;
            self.metrics.boot.start_to_first_entry_us.add(us.max(1));
            self.start_requested = None;
        }
    }

    /// Serves a request while the VM runs.
    pub fn handle_running(
        &mut self,
        vmm: &mut Vmm,
        request: Request,
    ) -> Result<Response, ActionError> {
        self.note_first_entry(vmm);
        Ok(match request {
            Request::GetInstanceInfo => self.info(if vmm.is_paused() {
                InstanceState::Paused
            } else {
                InstanceState::Running
            }),
            Request::GetMachineConfig => json(&self.resources.machine_config),
            Request::GetVmConfig => json(&self.resources),
            Request::PatchDrive(id, patch) => {
                patch.validate(&id)?;
                if let Some(path) = patch.path_on_host {
                    vmm.swap_drive(&id, path.clone())
                        .map_err(ActionError::Vmm)?;
                    if let Some(d) = self.resources.drives.iter_mut().find(|d| d.drive_id == id) {
                        d.path_on_host = path;
                    }
                }
                Response::Empty
            }
            Request::PatchVm(VmStateRequest::Paused) => {
                if vmm.is_paused() {
                    return Err(ActionError::AlreadyInState("paused"));
                }
                vmm.pause().map_err(ActionError::Vmm)?;
                Response::Empty
            }
            Request::PatchVm(VmStateRequest::Resumed) => {
                if !vmm.is_paused() {
                    return Err(ActionError::AlreadyInState("running"));
                }
                vmm.resume();
                Response::Empty
            }
            Request::Action(ActionType::InstanceStart) => return Err(ActionError::AlreadyStarted),
            Request::CreateSnapshot(params) => {
                snapshot::check_create(&params)?;
                let stats = vmm
                    .snapshot(&params.snapshot_path, &params.mem_file_path)
                    .map_err(ActionError::CreateSnapshot)?;
                tracing::debug!(?stats, "snapshot created");
                Response::Empty
            }
            Request::LoadSnapshot(_) => return Err(ActionError::LoadAfterStart),
            Request::Action(ActionType::SendCtrlAltDel) => {
                vmm.send_ctrl_alt_del();
                Response::Empty
            }
            Request::Action(ActionType::FlushMetrics) => {
                self.flush_metrics()?;
                Response::Empty
            }
            Request::PutLogger(_) => return Err(ActionError::AfterStart("configuring the logger")),
            Request::PutMetrics(m) => {
                self.put_metrics(m)?;
                Response::Empty
            }
            Request::PutMachineConfig(_) | Request::PatchMachineConfig(_) => {
                return Err(ActionError::AfterStart("machine configuration"))
            }
            Request::PutBootSource(_) => {
                return Err(ActionError::AfterStart("setting the boot source"))
            }
            Request::PutDrive(..) => return Err(ActionError::AfterStart("adding a drive")),
            Request::PutNetworkInterface(..) => {
                return Err(ActionError::AfterStart("adding a network interface"))
            }
            Request::PutVsock(_) => return Err(ActionError::AfterStart("adding a vsock device")),
            Request::PutFs(..) => return Err(ActionError::AfterStart("adding a file system")),
            Request::PutMemoryHotplug(_) => {
                return Err(ActionError::AfterStart("configuring hot-pluggable memory"))
            }
            Request::PatchMemoryHotplug(update) => {
                let h = self
                    .resources
                    .memory_hotplug
                    .as_ref()
                    .ok_or(ResourceError::NoMemoryHotplug)?;
                let bytes = resources::requested_bytes(h, &update)?;
                vmm.resize_mem_hotplug(bytes).map_err(ActionError::Vmm)?;
                Response::Empty
            }
            Request::GetMemoryHotplug => {
                let status = vmm
                    .mem_hotplug_status()
                    .ok_or(ResourceError::NoMemoryHotplug)?;
                json(&resources::hotplug_status(&status))
            }
        })
    }

    /// Writes one metrics line now.
    pub fn flush_metrics(&mut self) -> Result<(), ActionError> {
        let sink = self.sink.as_mut().ok_or(MetricsError::NotConfigured)?;
        sink.write(&self.metrics)?;
        self.last_flush = Instant::now();
        Ok(())
    }

    /// Writes a metrics line if a file is configured and the last one is a
    /// period old; returns how long until the next one is due.
    pub fn periodic_metrics(&mut self) -> Duration {
        if self.sink.is_some() && self.last_flush.elapsed() >= METRICS_PERIOD {
            if let Err(e) = self.flush_metrics() {
                tracing::warn!(error = %Chain(&e), "cannot write the periodic metrics");
                self.last_flush = Instant::now();
            }
        }
        METRICS_PERIOD.saturating_sub(self.last_flush.elapsed())
    }
}

fn json<T: serde::Serialize>(value: &T) -> Response {
    Response::Json(serde_json::to_value(value).unwrap_or(serde_json::Value::Null))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controller() -> Controller {
        Controller::new(
            "vm0".into(),
            SerialOutput::Sink,
            Arc::new(Metrics::default()),
        )
    }

    #[test]
    fn info_and_defaults_before_start() {
        let mut c = controller();
        let (r, vmm) = c.handle(Request::GetInstanceInfo).unwrap();
        assert!(vmm.is_none());
        let Response::Json(v) = r else { panic!() };
        assert_eq!(v["state"], "Not started");
        assert_eq!(v["id"], "vm0");
        assert_eq!(v["app_name"], "husk");
        let (r, _) = c.handle(Request::GetMachineConfig).unwrap();
        assert_eq!(
            r,
            Response::Json(
                serde_json::json!({"vcpu_count": 1, "mem_size_mib": 128, "smt": false, "track_dirty_pages": false})
            )
        );
    }

    #[test]
    fn wrong_state_requests_are_refused() {
        let mut c = controller();
        assert!(matches!(
            c.handle(Request::PatchVm(VmStateRequest::Resumed)),
            Err(ActionError::BeforeStart(_))
        ));
        assert!(matches!(
            c.handle(Request::Action(ActionType::InstanceStart)),
            Err(ActionError::NoBootSource)
        ));
        assert!(matches!(
            c.handle(Request::Action(ActionType::FlushMetrics)),
            Err(ActionError::Metrics(MetricsError::NotConfigured))
        ));
        assert!(matches!(
            c.handle(Request::PatchDrive(
                "d".into(),
                DriveUpdate {
                    drive_id: "d".into(),
                    path_on_host: None,
                    rate_limiter: None
                }
            )),
            Err(ActionError::Resource(ResourceError::NoSuchDrive(_)))
        ));
    }

    #[test]
    fn snapshots_follow_firecrackers_state_rules() {
        use snapshot::{SnapshotCreateParams, SnapshotLoadParams, SnapshotType};
        let mut c = controller();
        assert!(matches!(
            c.handle(Request::CreateSnapshot(SnapshotCreateParams {
                snapshot_type: SnapshotType::Full,
                snapshot_path: "/s".into(),
                mem_file_path: "/m".into(),
            })),
            Err(ActionError::BeforeStart(_))
        ));
        // The logger and metrics may come first; a load then fails on the
        // missing file, and the controller stays configurable.
        c.handle(Request::PutLogger(Logger::default())).unwrap();
        let load = SnapshotLoadParams::new("/nonexistent/husk.state", "/nonexistent/husk.mem");
        let err = c.handle(Request::LoadSnapshot(load.clone())).err().unwrap();
        assert!(matches!(err, ActionError::LoadSnapshot(_)), "{err}");
        assert!(
            crate::error::chain(&err)
                .contains("cannot read the snapshot file /nonexistent/husk.state"),
            "{}",
            crate::error::chain(&err)
        );
        // Anything a boot needs closes the door.
        c.handle(Request::PutMachineConfig(MachineConfig::default()))
            .unwrap();
        assert!(matches!(
            c.handle(Request::LoadSnapshot(load.clone())),
            Err(ActionError::LoadNotAllowed)
        ));
        // A config file with a load and a machine: refused as a whole.
        let mut fresh = controller();
        let resources = VmResources {
            machine_config: MachineConfig {
                vcpu_count: 2,
                ..Default::default()
            },
            snapshot_load: Some(load),
            ..Default::default()
        };
        assert!(matches!(
            fresh.load(resources),
            Err(ActionError::LoadNotAllowed)
        ));
    }

    #[test]
    fn a_patch_keeps_what_it_does_not_name() {
        let mut c = controller();
        c.handle(Request::PutMachineConfig(MachineConfig {
            vcpu_count: 2,
            mem_size_mib: 512,
            ..Default::default()
        }))
        .unwrap();
        c.handle(Request::PatchMachineConfig(MachineConfigUpdate {
            mem_size_mib: Some(256),
            ..Default::default()
        }))
        .unwrap();
        assert_eq!(c.resources().machine_config.vcpu_count, 2);
        assert_eq!(c.resources().machine_config.mem_size_mib, 256);
        // A refused patch changes nothing.
        assert!(c
            .handle(Request::PatchMachineConfig(MachineConfigUpdate {
                vcpu_count: Some(0),
                ..Default::default()
            }))
            .is_err());
        assert_eq!(c.resources().machine_config.vcpu_count, 2);
    }

    #[test]
    fn hotplug_memory_is_configured_before_start_and_resized_after() {
        let mut c = controller();
        // Nothing configured: GET says so.
        let err = c.handle(Request::GetMemoryHotplug).err().unwrap();
        assert!(
            err.to_string()
                .contains("PUT /hotplug/memory before InstanceStart"),
            "{err}"
        );
        c.handle(Request::PutMemoryHotplug(MemoryHotplugConfig::new(1024)))
            .unwrap();
        let (r, _) = c.handle(Request::GetMemoryHotplug).unwrap();
        assert_eq!(
            r,
            Response::Json(
                serde_json::json!({"total_size_mib": 1024, "block_size_mib": 2,
                "slot_size_mib": 128, "plugged_size_mib": 0, "requested_size_mib": 0})
            )
        );
        // Resizing needs a running VM.
        assert!(matches!(
            c.handle(Request::PatchMemoryHotplug(MemoryHotplugSizeUpdate {
                requested_size_mib: 512
            })),
            Err(ActionError::BeforeStart(_))
        ));
        // A bad shape is refused and leaves the good one in place.
        assert!(matches!(
            c.handle(Request::PutMemoryHotplug(MemoryHotplugConfig {
                slot_size_mib: 100,
                ..MemoryHotplugConfig::new(1000)
            })),
            Err(ActionError::Resource(ResourceError::MemoryHotplug(_)))
        ));
        assert_eq!(
            c.resources().memory_hotplug,
            Some(MemoryHotplugConfig::new(1024))
        );
        // It reaches the VMM's configuration.
        c.handle(Request::PutBootSource(BootSourceConfig {
            kernel_image_path: "/proc/self/exe".into(),
            initrd_path: None,
            boot_args: None,
        }))
        .unwrap();
        let config = c.vm_config().unwrap();
        assert_eq!(
            config.mem_hotplug,
            Some(crate::config::MemHotplugConfig::new(1024))
        );
        let (r, _) = c.handle(Request::GetVmConfig).unwrap();
        let Response::Json(v) = r else { panic!() };
        assert_eq!(v["memory-hotplug"]["total_size_mib"], 1024);
    }

    #[test]
    fn metrics_flush_writes_a_line() {
        let path = std::env::temp_dir().join(format!("husk-ctl-metrics-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut c = controller();
        c.handle(Request::PutMetrics(MetricsConfig {
            metrics_path: path.clone(),
        }))
        .unwrap();
        c.handle(Request::Action(ActionType::FlushMetrics)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert!(line["uptime_ms"].is_u64());
        std::fs::remove_file(path).unwrap();
    }
}
