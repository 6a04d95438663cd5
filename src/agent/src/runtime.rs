//! The agent's one owned value: built in `main` from the [`Config`], it
//! holds every piece of the agent's state, each with one owner -- the
//! container table ([`Containers`]), the registry of processes waiting to
//! be reaped ([`Reaper`]), the event channel ([`Events`], whose publisher
//! thread owns the subscribers) -- and is shared (an `Arc`) by the
//! connection threads and the signal thread. Nothing lives in a `static`.

use std::sync::Arc;

use husk_protocol::{
    AgentError, CreateContainer, ErrorCode, ExitStatus, ProcessRef, ProcessState, Sandbox, Stats,
    StdioStream,
};
use oci_spec::runtime::{LinuxResources, Process};

use crate::config::Config;
use crate::container::stdio::Attachment;
use crate::container::Containers;
use crate::events::{Events, WRITE_TIMEOUT};
use crate::reaper::Reaper;
use crate::server::Agent;

/// Why the runtime could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The event publisher's thread.
    #[error("cannot start the event publisher")]
    Publisher(#[source] std::io::Error),
}

/// The agent.
pub struct Runtime {
    config: Config,
    containers: Containers,
    reaper: Arc<Reaper>,
    events: Events,
}

impl Runtime {
    /// Builds the runtime for `config` and starts its event publisher.
    pub fn start(config: Config) -> Result<Arc<Runtime>, RuntimeError> {
        let events = Events::start(WRITE_TIMEOUT).map_err(RuntimeError::Publisher)?;
        let reaper = Arc::new(Reaper::new(events.clone()));
        let containers = Containers::new(
            config.paths.clone(),
            config.drives.clone(),
            reaper.clone(),
            events.clone(),
        );
        Ok(Arc::new(Runtime {
            config,
            containers,
            reaper,
            events,
        }))
    }

    /// What the agent was configured with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The reaper (the signal thread reaps on SIGCHLD).
    pub fn reaper(&self) -> &Reaper {
        &self.reaper
    }

    /// The event channel (the server subscribes the host's event
    /// connections).
    pub fn events(&self) -> &Events {
        &self.events
    }

    /// Stops every container and ends the guest (or, outside one, this
    /// process); never returns.
    pub fn power_off(&self) -> ! {
        self.containers.kill_all();
        crate::init::shutdown(self.config.pid1)
    }
}

impl Agent for Runtime {
    fn create_sandbox(&self, sandbox: &Sandbox) -> Result<(), AgentError> {
        crate::sandbox::apply(sandbox, &self.config.paths.sandbox_root, self.config.pid1)
    }

    fn create_container(&self, request: CreateContainer) -> Result<u32, AgentError> {
        self.containers.create(request)
    }

    fn start_container(&self, id: &str) -> Result<(), AgentError> {
        self.containers.start(id)
    }

    fn exec_process(&self, id: &str, exec_id: &str, process: &Process) -> Result<u32, AgentError> {
        self.containers.exec(id, exec_id, process)
    }

    fn wait_process(&self, process: &ProcessRef) -> Result<ExitStatus, AgentError> {
        self.containers.wait(process)
    }

    fn signal_process(
        &self,
        process: &ProcessRef,
        signal: i32,
        all: bool,
    ) -> Result<(), AgentError> {
        self.containers.signal(process, signal, all)
    }

    fn resize_tty(&self, process: &ProcessRef, rows: u16, cols: u16) -> Result<(), AgentError> {
        self.containers.resize(process, rows, cols)
    }

    fn close_stdin(&self, process: &ProcessRef) -> Result<(), AgentError> {
        self.containers.close_stdin(process)
    }

    fn stats(&self, id: &str) -> Result<Stats, AgentError> {
        self.containers.stats(id)
    }

    fn list_processes(&self, id: &str) -> Result<Vec<u32>, AgentError> {
        self.containers.list(id)
    }

    fn update_container(&self, id: &str, resources: &LinuxResources) -> Result<(), AgentError> {
        self.containers.update(id, resources)
    }

    fn remove_container(&self, id: &str) -> Result<(), AgentError> {
        self.containers.remove(id)
    }

    fn set_online_cpus(&self, online: u32) -> Result<(u32, u32), AgentError> {
        // Outside a guest the CPUs are the host's, not the agent's.
        if !self.config.pid1 {
            return Err(AgentError::new(
                ErrorCode::Unsupported,
                "vCPUs are brought online only in a guest",
            ));
        }
        Ok(crate::cpus::set_online(
            std::path::Path::new(crate::cpus::SYSFS_CPUS),
            online,
        )?)
    }

    fn prepare_template(&self) -> Result<u64, AgentError> {
        crate::template::prepare(self.config.pid1, self.containers.count())
    }

    fn process_states(&self) -> Vec<ProcessState> {
        self.containers.process_states()
    }

    fn attach(&self, process: &ProcessRef, stream: StdioStream) -> Result<Attachment, AgentError> {
        self.containers.attach(process, stream)
    }

    fn shutdown(&self) {
        self.power_off()
    }
}
