//! Everything the agent is told at start, read in one place: its arguments,
//! every `HUSK_AGENT_*` variable and (as the guest's init) the kernel
//! command line. `main` turns them into one [`Config`]; nothing else in the
//! agent reads the environment or /proc/cmdline. The parsing is pure, so it
//! is tested without touching the process's environment.

use std::ffi::OsString;
use std::path::PathBuf;

/// Why the agent's arguments were refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--unix` without a path.
    #[error("--unix needs a path")]
    UnixPath,
    /// `--port` without a number.
    #[error("--port needs a number")]
    Port,
    /// Something else.
    #[error("unknown argument {0:?} (want --unix PATH, --port N)")]
    Unknown(String),
}

/// How the agent was started (its arguments).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Serve on this unix socket instead of vsock.
    pub unix: Option<PathBuf>,
    /// The vsock port (`--port`).
    pub port: u32,
    /// Running as the guest's init (PID 1).
    pub pid1: bool,
}

impl Options {
    /// Parses the arguments after the program name. As PID 1 unknown words
    /// are ignored: the kernel passes unknown command-line words to init.
    pub fn parse(pid1: bool, args: impl IntoIterator<Item = String>) -> Result<Self, ConfigError> {
        let mut opts = Options {
            unix: None,
            port: husk_protocol::DEFAULT_AGENT_PORT,
            pid1,
        };
        let mut args = args.into_iter();
        while let Some(a) = args.next() {
            match a.as_str() {
                "--unix" => opts.unix = Some(args.next().ok_or(ConfigError::UnixPath)?.into()),
                "--port" => {
                    opts.port = args
                        .next()
                        .and_then(|p| p.parse().ok())
                        .ok_or(ConfigError::Port)?
                }
                _ if pid1 => {}
                _ => return Err(ConfigError::Unknown(a)),
            }
        }
        Ok(opts)
    }
}

/// The `HUSK_AGENT_*` variables, captured once at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Environment {
    /// `HUSK_AGENT_SWITCHED`: set by the agent itself when it re-executes
    /// after leaving the initramfs.
    pub switched: bool,
    /// `HUSK_AGENT_DRIVES=id=/dev/loop3,...` (tests only).
    pub drives: Option<String>,
    /// `HUSK_AGENT_STATE` (tests only, outside a guest).
    pub state: Option<PathBuf>,
    /// `HUSK_AGENT_CGROUP_ROOT` (tests only, outside a guest).
    pub cgroup_root: Option<PathBuf>,
    /// `HUSK_AGENT_ROOT`: where CreateSandbox writes outside a guest.
    pub sandbox_root: Option<PathBuf>,
}

/// The variable the agent sets for itself when it re-executes from the
/// tmpfs it copied itself into.
pub const SWITCHED: &str = "HUSK_AGENT_SWITCHED";

impl Environment {
    /// Reads the variables from `var` (the process's environment in `main`).
    pub fn from_vars(var: impl Fn(&str) -> Option<OsString>) -> Self {
        Environment {
            switched: var(SWITCHED).is_some(),
            drives: var("HUSK_AGENT_DRIVES").map(|v| v.to_string_lossy().into_owned()),
            state: var("HUSK_AGENT_STATE").map(Into::into),
            cgroup_root: var("HUSK_AGENT_CGROUP_ROOT").map(Into::into),
            sandbox_root: var("HUSK_AGENT_ROOT").map(Into::into),
        }
    }

    /// The process's own variables.
    pub fn capture() -> Self {
        Environment::from_vars(|k| std::env::var_os(k))
    }
}

/// What the agent learns from the kernel command line (as init).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelCmdline {
    /// `husk.agent_port=N`.
    pub port: Option<u32>,
    /// `husk.agent_debug`.
    pub debug: bool,
    /// Words that looked like ours but were not valid, for a warning.
    pub ignored: Vec<String>,
}

impl KernelCmdline {
    /// Parses the contents of /proc/cmdline.
    pub fn parse(cmdline: &str) -> Self {
        let mut out = KernelCmdline::default();
        for word in cmdline.split_whitespace() {
            if let Some(port) = word.strip_prefix("husk.agent_port=") {
                match port.parse() {
                    Ok(p) => out.port = Some(p),
                    Err(_) => out.ignored.push(word.to_string()),
                }
            } else if word == "husk.agent_debug" {
                out.debug = true;
            }
        }
        out
    }

    /// Reads /proc/cmdline (mounted by then); empty if it cannot be read.
    pub fn read() -> Self {
        KernelCmdline::parse(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default())
    }
}

/// Where the host reaches the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A unix socket (host-side tests).
    Unix(PathBuf),
    /// A vsock port, any local CID (in a guest).
    Vsock(u32),
}

/// How drive ids become block devices.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drives {
    /// Drive ids mapped to devices (`HUSK_AGENT_DRIVES`), consulted first.
    pub map: Vec<(String, PathBuf)>,
    /// Also look for a disk whose serial is the id (in a guest; outside
    /// one the disks' serials mean nothing).
    pub guest_disks: bool,
}

impl Drives {
    /// Parses `id=/dev/loop3,...`; malformed pairs are skipped.
    pub fn parse(map: Option<&str>, guest_disks: bool) -> Self {
        let map = map
            .unwrap_or_default()
            .split(',')
            .filter_map(|pair| pair.split_once('='))
            .map(|(id, dev)| (id.to_string(), PathBuf::from(dev)))
            .collect();
        Drives { map, guest_disks }
    }
}

/// Where the container runtime keeps its things.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    /// Mount points and scratch space (`<state>/c/<id>`).
    pub state: PathBuf,
    /// The cgroup v2 mount the containers' cgroups go under (`None`: no
    /// cgroups, host-side tests without a cgroup2 mount).
    pub cgroup_root: Option<PathBuf>,
    /// Where CreateSandbox writes /etc/hostname, /etc/resolv.conf and
    /// sysctls: "/" in a guest.
    pub sandbox_root: PathBuf,
}

/// The agent's whole configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Running as the guest's init: the system is the agent's to change.
    pub pid1: bool,
    /// Where to listen.
    pub listen: Listen,
    /// Debug log lines.
    pub debug: bool,
    /// The runtime's directories.
    pub paths: Paths,
    /// How drive ids are found.
    pub drives: Drives,
}

impl Config {
    /// Puts the pieces together (`cmdline` is empty outside a guest).
    pub fn new(opts: Options, env: Environment, cmdline: &KernelCmdline) -> Self {
        let listen = match opts.unix {
            Some(path) => Listen::Unix(path),
            None => Listen::Vsock(cmdline.port.unwrap_or(opts.port)),
        };
        let paths = if opts.pid1 {
            Paths {
                state: PathBuf::from("/run/husk"),
                cgroup_root: Some(PathBuf::from("/sys/fs/cgroup")),
                sandbox_root: PathBuf::from("/"),
            }
        } else {
            Paths {
                state: env
                    .state
                    .unwrap_or_else(|| std::env::temp_dir().join("husk-agent-state")),
                cgroup_root: env.cgroup_root,
                sandbox_root: env
                    .sandbox_root
                    .unwrap_or_else(|| std::env::temp_dir().join("husk-agent-root")),
            }
        };
        Config {
            pid1: opts.pid1,
            listen,
            debug: cmdline.debug,
            paths,
            drives: Drives::parse(env.drives.as_deref(), opts.pid1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn arguments_outside_a_guest_are_checked() {
        let o = Options::parse(false, args(&["--unix", "/tmp/a.sock", "--port", "7"])).unwrap();
        assert_eq!(o.unix, Some(PathBuf::from("/tmp/a.sock")));
        assert_eq!(o.port, 7);
        assert!(matches!(
            Options::parse(false, args(&["--unix"])),
            Err(ConfigError::UnixPath)
        ));
        assert!(matches!(
            Options::parse(false, args(&["--port", "x"])),
            Err(ConfigError::Port)
        ));
        assert!(matches!(
            Options::parse(false, args(&["quiet"])),
            Err(ConfigError::Unknown(w)) if w == "quiet"
        ));
    }

    #[test]
    fn init_ignores_the_kernels_leftover_words() {
        let o = Options::parse(true, args(&["quiet", "--port", "9"])).unwrap();
        assert_eq!(o.port, 9);
        assert!(o.pid1);
    }

    #[test]
    fn the_kernel_command_line_sets_port_and_debug() {
        let c = KernelCmdline::parse("console=ttyS0 husk.agent_port=2048 husk.agent_debug\n");
        assert_eq!(c.port, Some(2048));
        assert!(c.debug);
        let c = KernelCmdline::parse("husk.agent_port=many");
        assert_eq!(c.port, None);
        assert_eq!(c.ignored, ["husk.agent_port=many"]);
        assert!(!c.debug);
    }

    #[test]
    fn a_guest_uses_the_system_paths_and_the_command_lines_port() {
        let opts = Options::parse(true, args(&[])).unwrap();
        let env = Environment::from_vars(|k| {
            (k == "HUSK_AGENT_STATE" || k == "HUSK_AGENT_DRIVES").then(|| "r=/dev/vdb".into())
        });
        let cmdline = KernelCmdline::parse("husk.agent_port=2000");
        let c = Config::new(opts, env, &cmdline);
        assert_eq!(c.listen, Listen::Vsock(2000));
        assert_eq!(c.paths.state, PathBuf::from("/run/husk"));
        assert_eq!(c.paths.cgroup_root, Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(c.paths.sandbox_root, PathBuf::from("/"));
        assert!(c.drives.guest_disks);
        assert_eq!(c.drives.map, [("r".into(), PathBuf::from("/dev/vdb"))]);
    }

    #[test]
    fn host_side_paths_come_from_the_variables() {
        let opts = Options::parse(false, args(&["--unix", "/s"])).unwrap();
        let env = Environment::from_vars(|k| match k {
            "HUSK_AGENT_STATE" => Some("/st".into()),
            "HUSK_AGENT_CGROUP_ROOT" => Some("/cg".into()),
            "HUSK_AGENT_ROOT" => Some("/root".into()),
            "HUSK_AGENT_DRIVES" => Some("a=/dev/loop1,junk,b=/dev/loop2".into()),
            _ => None,
        });
        let c = Config::new(opts, env, &KernelCmdline::default());
        assert_eq!(c.listen, Listen::Unix("/s".into()));
        assert_eq!(
            c.paths,
            Paths {
                state: "/st".into(),
                cgroup_root: Some("/cg".into()),
                sandbox_root: "/root".into(),
            }
        );
        assert!(!c.drives.guest_disks);
        assert_eq!(
            c.drives.map,
            [
                ("a".into(), PathBuf::from("/dev/loop1")),
                ("b".into(), PathBuf::from("/dev/loop2"))
            ]
        );
        // Without the variables: no cgroups, scratch directories.
        let c = Config::new(
            Options::parse(false, args(&[])).unwrap(),
            Environment::default(),
            &KernelCmdline::default(),
        );
        assert_eq!(c.paths.cgroup_root, None);
        assert_eq!(c.listen, Listen::Vsock(husk_protocol::DEFAULT_AGENT_PORT));
    }
}
