//! `containerd-shim-husk-v2`: containerd's runtime v2 shim for husk
//! (`runtime_type = "io.containerd.husk.v2"`). containerd runs it with
//! `start` to get a shim for a container: one shim serves a whole pod
//! (grouped by the CRI sandbox id), and the pod's first container boots
//! its microVM. `delete` cleans up after a shim that died. Without an
//! action it serves containerd's task API on the socket `start` printed.

mod api_client;
mod cgroup;
mod config;
mod error;
mod io;
mod jail;
mod metrics;
mod network;
mod pod;
mod portforward;
mod private;
mod rootfs;
mod service;
mod share;
mod sizing;
mod slots;
mod spec;
mod template;
mod virtiofsd;
mod vm;

use std::path::Path;
use std::sync::Arc;

use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{DeleteResponse, ExitSignal, Flags, StartOpts};

use crate::config::Config;
use crate::service::Service;

/// The runtime's name in containerd.
const RUNTIME_ID: &str = "io.containerd.husk.v2";

struct Shim {
    namespace: String,
    id: String,
    config: Result<Config, String>,
    exit: Arc<ExitSignal>,
}

fn config_path() -> std::path::PathBuf {
    std::env::var_os("HUSK_SHIM_CONFIG")
        .map(Into::into)
        .unwrap_or_else(|| config::DEFAULT_PATH.into())
}

/// Logs go to the `log` fifo containerd opened in the bundle (the shim's
/// working directory), which it copies into its own log.
fn init_logging(debug: bool, level: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let filter = if debug { "debug" } else { level };
    let filter = tracing_subscriber::EnvFilter::try_from_env("HUSK_SHIM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    // Non-blocking open: without a reader (no containerd) there is no log.
    let fifo = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("log");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false);
    let _ = match fifo {
        Ok(f) => {
            // Writes block again, as a log should (containerd reads it).
            use std::os::fd::AsRawFd;
            // SAFETY: fcntl on a descriptor this function owns.
            unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, 0) };
            builder.with_writer(std::sync::Mutex::new(f)).try_init()
        }
        Err(_) => builder.with_writer(std::io::sink).try_init(),
    };
}

impl containerd_shim::Shim for Shim {
    type T = Service;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut containerd_shim::Config) -> Self {
        let config = Config::load(&config_path()).map_err(|e| error::Chain(&e).to_string());
        if args.action.is_empty() {
            let level = config
                .as_ref()
                .map(|c| c.log_level.as_str())
                .unwrap_or("warn");
            init_logging(args.debug, level);
            if let Err(e) = &config {
                tracing::error!(error = %e, "bad configuration");
            }
        }
        Shim {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            config,
            exit: Arc::new(ExitSignal::default()),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> Result<String, containerd_shim::Error> {
        self.config
            .as_ref()
            .map_err(|e| containerd_shim::Error::InvalidArgument(e.clone()))?;
        // One shim per pod: later containers of the pod get its address.
        let grouping = oci_spec::runtime::Spec::load("config.json")
            .map(|s| spec::sandbox_id(&s, &opts.id))
            .unwrap_or_else(|_| opts.id.clone());
        let (_pid, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
        containerd_shim::util::write_address(&address)?;
        Ok(address)
    }

    fn delete_shim(&mut self) -> Result<DeleteResponse, containerd_shim::Error> {
        let config = self.config.clone().unwrap_or_default();
        let bundle = std::env::current_dir().unwrap_or_else(|_| Path::new(".").to_path_buf());
        service::cleanup_after_crash(&config, &self.namespace, &self.id, &bundle);
        Ok(DeleteResponse {
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: containerd_shim::protos::protobuf::MessageField::some(
                containerd_shim::util::timestamp()?,
            ),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        let config = self.config.clone().unwrap_or_default();
        Service::new(
            &self.namespace,
            config.clone(),
            self.exit.clone(),
            Box::new(vm::Husk::new(config)),
            Box::new(pod::Containerd {
                publisher,
                namespace: self.namespace.clone(),
            }),
            std::sync::Arc::new(share::Kernel),
        )
    }
}

fn main() {
    // The image copier (rootfs.rs): this binary again, in a mount
    // namespace of its own.
    if std::env::args().nth(1).as_deref() == Some(rootfs::COPIER_ARG) {
        std::process::exit(rootfs::copier_main());
    }
    let opts = containerd_shim::Config {
        // Logging is set up above, through tracing.
        no_setup_logger: true,
        // husk is waited for by its own thread (std::process::Child); the
        // shim runs no containers on the host to reap.
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    containerd_shim::run::<Shim>(RUNTIME_ID, Some(opts));
}
