//! husk's logging: `tracing` to stderr, quiet by default (`--log-level`,
//! `HUSK_LOG`), and reconfigurable while running (the API's `PUT /logger`):
//! the filter, the destination file, and whether lines show their level and
//! source location.

use std::fs::OpenOptions;
use std::io::{IsTerminal, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Registry};

/// Errors of `PUT /logger`.
#[derive(Debug, thiserror::Error)]
pub enum LoggerError {
    /// An unknown level name.
    #[error("unknown log level {0:?}: use Error, Warning, Info, Debug, Trace or Off")]
    Level(String),
    /// A module path tracing cannot filter on.
    #[error("invalid module filter {0:?}")]
    Module(String),
    /// The log file could not be opened.
    #[error("cannot open the log file {path}")]
    Open {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Logging was never initialised (only in tests).
    #[error("logging is not initialised")]
    NotInitialised,
    /// The subscriber refused the change.
    #[error("cannot reconfigure logging")]
    Reload(#[source] reload::Error),
}

/// Where formatted lines go: stderr until a log file is configured.
#[derive(Clone)]
struct Destination(Arc<Mutex<Box<dyn Write + Send>>>);

struct Line<'a>(std::sync::MutexGuard<'a, Box<dyn Write + Send>>);

impl Write for Line<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl<'a> MakeWriter<'a> for Destination {
    type Writer = Line<'a>;
    fn make_writer(&'a self) -> Self::Writer {
        Line(self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

type FmtLayer = fmt::Layer<Registry, fmt::format::DefaultFields, fmt::format::Format, Destination>;

type ReloadFilter = Box<dyn Fn(EnvFilter) -> Result<(), reload::Error> + Send + Sync>;

struct Control {
    filter: ReloadFilter,
    format: reload::Handle<FmtLayer, Registry>,
    destination: Destination,
}

static CONTROL: OnceLock<Control> = OnceLock::new();

fn fmt_layer(dest: Destination, ansi: bool, level: bool, origin: bool) -> FmtLayer {
    fmt::layer()
        .with_writer(dest)
        .with_ansi(ansi)
        .with_target(false)
        .with_level(level)
        .with_file(origin)
        .with_line_number(origin)
}

/// Crates whose own log lines a guest can set off at will, silenced unless
/// a filter names them. virtio-queue logs an error for each malformed ring
/// it meets (a misaligned queue address written to the transport, a used
/// entry out of range, an avail index too far ahead): one host log line
/// per guest register write or notification. husk reports each of those
/// itself, through a rate limit (`vmm::log_limit`).
const GUEST_TRIGGERED_TARGETS: &[&str] = &["virtio_queue"];

/// Crates that log, at error level, what husk then reports itself with
/// what to do: the registry client's certificate verifier logs each
/// certificate it refuses, which `husk pull` turns into its own error.
const REPORTED_BY_HUSK_TARGETS: &[&str] = &["rustls_platform_verifier"];

/// `filter` with the [`GUEST_TRIGGERED_TARGETS`] and
/// [`REPORTED_BY_HUSK_TARGETS`] its `spec` does not name turned off.
fn quiet_targets(mut filter: EnvFilter, spec: &str) -> EnvFilter {
    for target in GUEST_TRIGGERED_TARGETS
        .iter()
        .chain(REPORTED_BY_HUSK_TARGETS)
    {
        if !spec.contains(target) {
            if let Ok(directive) = format!("{target}=off").parse() {
                filter = filter.add_directive(directive);
            }
        }
    }
    filter
}

/// Sets up logging to stderr with `level` (a tracing filter; `HUSK_LOG`
/// wins when set).
pub fn init(level: &str) {
    let parse = |spec: &str| EnvFilter::try_new(spec).map(|f| quiet_targets(f, spec));
    let filter = std::env::var("HUSK_LOG")
        .map_err(|_| ())
        .and_then(|spec| parse(&spec).map_err(|_| ()))
        .or_else(|_| parse(level))
        .unwrap_or_else(|_| quiet_targets(EnvFilter::new("warn"), ""));
    let destination = Destination(Arc::new(Mutex::new(Box::new(std::io::stderr()))));
    let ansi = std::io::stderr().is_terminal();
    // The format layer is reloaded before the filter is: its subscriber
    // type is the bare registry.
    let (format, format_handle) =
        reload::Layer::new(fmt_layer(destination.clone(), ansi, true, false));
    let (filter, filter_handle) = reload::Layer::new(filter);
    let _ = tracing_subscriber::registry()
        .with(format)
        .with(filter)
        .try_init();
    let _ = CONTROL.set(Control {
        filter: Box::new(move |f| filter_handle.reload(f)),
        format: format_handle,
        destination,
    });
}

/// Firecracker's level names (case-insensitive) to a tracing level.
fn level_directive(level: &str) -> Result<&'static str, LoggerError> {
    Ok(match level.to_ascii_lowercase().as_str() {
        "error" => "error",
        "warning" | "warn" => "warn",
        "info" => "info",
        "debug" => "debug",
        "trace" => "trace",
        "off" => "off",
        _ => return Err(LoggerError::Level(level.to_string())),
    })
}

/// Applies a `PUT /logger` body. Nothing changes unless all of it is valid.
pub fn configure(cfg: &vmm::controller::Logger) -> Result<(), LoggerError> {
    let level = cfg.level.as_deref().map(level_directive).transpose()?;
    let filter = match (&cfg.module, level) {
        (Some(module), level) => {
            let valid = !module.is_empty()
                && module.split("::").all(|p| {
                    !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                });
            if !valid {
                return Err(LoggerError::Module(module.clone()));
            }
            let spec = format!("off,{module}={}", level.unwrap_or("info"));
            Some(quiet_targets(
                EnvFilter::try_new(&spec).map_err(|_| LoggerError::Module(module.clone()))?,
                &spec,
            ))
        }
        (None, Some(level)) => Some(quiet_targets(EnvFilter::new(level), level)),
        (None, None) => None,
    };
    let file: Option<Box<dyn Write + Send>> = match &cfg.log_path {
        Some(path) => Some(Box::new(open_log(path)?)),
        None => None,
    };
    let control = CONTROL.get().ok_or(LoggerError::NotInitialised)?;
    if let Some(file) = file {
        *control
            .destination
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = file;
    }
    let show_level = cfg.show_level.unwrap_or(true);
    let show_origin = cfg.show_log_origin.unwrap_or(false);
    let ansi = cfg.log_path.is_none() && std::io::stderr().is_terminal();
    let dest = control.destination.clone();
    control
        .format
        .modify(|layer| *layer = fmt_layer(dest, ansi, show_level, show_origin))
        .map_err(LoggerError::Reload)?;
    if let Some(filter) = filter {
        (control.filter)(filter).map_err(LoggerError::Reload)?;
    }
    tracing::info!(?cfg, "logger configured");
    Ok(())
}

fn open_log(path: &Path) -> Result<std::fs::File, LoggerError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        // A FIFO without a reader fails at once instead of blocking the API.
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| LoggerError::Open {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_triggered_crates_are_off_unless_named() {
        let f = quiet_targets(EnvFilter::new("info"), "info");
        assert!(f.to_string().contains("virtio_queue=off"), "{f}");
        assert!(
            f.to_string().contains("rustls_platform_verifier=off"),
            "{f}"
        );
        let spec = "warn,virtio_queue=debug";
        let f = quiet_targets(EnvFilter::new(spec), spec);
        assert!(!f.to_string().contains("virtio_queue=off"), "{f}");
    }

    #[test]
    fn level_names() {
        assert_eq!(level_directive("Warning").unwrap(), "warn");
        assert_eq!(level_directive("DEBUG").unwrap(), "debug");
        assert!(matches!(
            level_directive("loud"),
            Err(LoggerError::Level(_))
        ));
    }

    #[test]
    fn invalid_bodies_change_nothing() {
        let bad_level = vmm::controller::Logger {
            level: Some("loud".into()),
            ..Default::default()
        };
        assert!(matches!(configure(&bad_level), Err(LoggerError::Level(_))));
        let bad_module = vmm::controller::Logger {
            module: Some("a b".into()),
            ..Default::default()
        };
        assert!(matches!(
            configure(&bad_module),
            Err(LoggerError::Module(_))
        ));
        let bad_path = vmm::controller::Logger {
            log_path: Some("/nonexistent/dir/log".into()),
            ..Default::default()
        };
        assert!(matches!(
            configure(&bad_path),
            Err(LoggerError::Open { .. })
        ));
    }
}
