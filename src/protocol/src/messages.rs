//! The messages. Requests and replies travel on a control connection; each
//! request carries an id its reply repeats, so a host may pipeline. Process
//! stdio and the event stream have connections of their own, named by the
//! connection's first frame ([`Hello`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The first frame on every connection: who is speaking which version, and
/// what the connection is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// The sender's [`crate::PROTOCOL_VERSION`].
    pub version: u32,
    /// What the connection carries from now on.
    pub channel: Channel,
}

/// What a connection is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Channel {
    /// [`RequestFrame`]s from the host, [`ReplyFrame`]s from the agent.
    Control,
    /// Raw bytes of one process's stdio (after the agent's [`Accepted`]).
    Stdio {
        /// The container.
        container_id: String,
        /// The process: `None` for the container's init process.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exec_id: Option<String>,
        /// Which stream.
        stream: StdioStream,
    },
    /// [`Event`] frames from the agent, until the connection closes.
    Events,
    /// Raw bytes of one TCP connection the agent opens to `127.0.0.1:port`
    /// in the guest (after its [`Accepted`]): the pod's port, forwarded
    /// (CRI's PortForward). Either side's end of file half-closes the
    /// other.
    PortForward {
        /// The port in the guest.
        port: u16,
    },
}

/// One of a process's standard streams, or its terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StdioStream {
    /// Host to process; the host closing its write side closes stdin.
    Stdin,
    /// Process to host.
    Stdout,
    /// Process to host.
    Stderr,
    /// Both ways, for a process with `terminal: true`.
    Tty,
}

/// The agent's answer to a [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Accepted {
    /// The agent's protocol version.
    pub version: u32,
    /// `None` if the channel is open; otherwise why it is refused (the
    /// connection is then closed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<AgentError>,
}

/// A request with its id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestFrame {
    /// Chosen by the host; repeated in the reply.
    pub id: u64,
    /// What is asked.
    pub request: Request,
}

/// A reply with its request's id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplyFrame {
    /// The request's id (0 when the request could not even be decoded).
    pub id: u64,
    /// The outcome.
    pub reply: Result<Response, AgentError>,
}

/// Everything the host can ask.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Is the agent there, and which version is it?
    Ping,
    /// Set up the pod: hostname, DNS, interfaces, routes, sysctls.
    CreateSandbox(Sandbox),
    /// Create a container (its init process is created, not started).
    CreateContainer(CreateContainer),
    /// Start a created container's init process.
    StartContainer {
        /// The container.
        container_id: String,
    },
    /// Run another process in a running container.
    ExecProcess {
        /// The container.
        container_id: String,
        /// A name for the process, unique in the container.
        exec_id: String,
        /// What to run, as in the OCI runtime spec.
        process: Box<oci_spec::runtime::Process>,
    },
    /// Wait until a process exits.
    WaitProcess(ProcessRef),
    /// Send a signal to a process.
    SignalProcess {
        /// The process.
        #[serde(flatten)]
        process: ProcessRef,
        /// The signal number.
        signal: i32,
        /// All processes of the container, not just this one.
        #[serde(default)]
        all: bool,
    },
    /// Change a process's terminal size.
    ResizeTty {
        /// The process.
        #[serde(flatten)]
        process: ProcessRef,
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
    /// Close a process's stdin (EOF).
    CloseStdin(ProcessRef),
    /// Resource usage from the container's cgroup.
    StatsContainer {
        /// The container.
        container_id: String,
    },
    /// The pids in the container's cgroup.
    ListProcesses {
        /// The container.
        container_id: String,
    },
    /// New cgroup limits.
    UpdateContainer {
        /// The container.
        container_id: String,
        /// The limits, as in the OCI runtime spec.
        resources: Box<oci_spec::runtime::LinuxResources>,
    },
    /// Remove a stopped container (its cgroup, mounts, state).
    RemoveContainer {
        /// The container.
        container_id: String,
    },
    /// Every process of every container not yet removed, with its exit
    /// status once it has exited: what a host that lost its event stream
    /// reads after reconnecting, to learn the exits it missed.
    ListProcessStates,
    /// Bring vCPUs online or offline so that `online` of them run: the
    /// lowest-numbered first (vCPU 0 is always online). vCPUs the VM was
    /// built with beyond its boot count wait parked until brought online.
    SetOnlineCpus {
        /// How many vCPUs should be online.
        online: u32,
    },
    /// Make the guest cheap to snapshot as a template, just before its
    /// snapshot: sync, drop the clean page cache, and zero every free page
    /// the guest can spare (a child process allocates and releases them),
    /// so that the snapshot's memory file holds the pages in use and not
    /// what boot left in freed memory. Refused outside a guest and once a
    /// container exists.
    PrepareTemplate,
    /// Stop every container, sync, and reset the guest (the VMM exits).
    Shutdown,
}

/// A process: a container's init (`exec_id` absent) or one of its execs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessRef {
    /// The container.
    pub container_id: String,
    /// The exec, or `None` for the init process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec_id: Option<String>,
}

/// The pod's network and naming, applied once per VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sandbox {
    /// The guest's hostname.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Name servers for /etc/resolv.conf.
    #[serde(default)]
    pub dns: Vec<String>,
    /// DNS search domains.
    #[serde(default)]
    pub dns_search: Vec<String>,
    /// Interfaces to configure (matched by MAC).
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    /// Routes to add after the interfaces are up.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// Sysctls to set (key in dotted form, e.g. net.ipv4.ip_forward).
    #[serde(default)]
    pub sysctls: BTreeMap<String, String>,
    /// Set when the guest was restored from a snapshot that other VMs are
    /// restored from too (a template): what makes it itself again. Applied
    /// before anything else of the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored: Option<Restored>,
}

/// The most entropy bytes a [`Restored`] may carry.
pub const MAX_RESTORE_ENTROPY: usize = 512;

/// The fewest entropy bytes a [`Restored`] may carry (256 bits: what the
/// guest kernel's random pool needs to count as seeded).
pub const MIN_RESTORE_ENTROPY: usize = 32;

/// A restored guest's fresh start: every clone of one snapshot has the
/// same random pool and a wall clock stopped at the snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Restored {
    /// Bytes from the host's random source
    /// ([`MIN_RESTORE_ENTROPY`]..=[`MAX_RESTORE_ENTROPY`]), mixed into the
    /// guest kernel's pool, credited in full, before the kernel reseeds its
    /// generator from the pool.
    pub entropy: Vec<u8>,
    /// The host's wall clock when the request was sent (nanoseconds since
    /// the Unix epoch): the guest's `CLOCK_REALTIME` is set to it.
    pub realtime_ns: u64,
}

impl Restored {
    /// 64 bytes from this host's random source and its wall clock now.
    pub fn now() -> std::io::Result<Restored> {
        let mut entropy = vec![0u8; 64];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut entropy)?;
        let realtime_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(std::io::Error::other)?
            .as_nanos();
        Ok(Restored {
            entropy,
            realtime_ns: u64::try_from(realtime_ns).unwrap_or(u64::MAX),
        })
    }
}

/// One network interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interface {
    /// The name to give it (e.g. eth0).
    pub name: String,
    /// The MAC address that identifies the guest device.
    pub mac: String,
    /// The MAC the guest device has now, when it is not `mac`: a guest
    /// restored from a template came up with the template's. The
    /// interface is found by it and given `mac`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_mac: Option<String>,
    /// MTU (default: leave as is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Addresses in CIDR form (10.0.0.2/24, fd00::2/64).
    #[serde(default)]
    pub addresses: Vec<String>,
}

/// One route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Destination in CIDR form; "default" or 0.0.0.0/0 for the default.
    pub destination: String,
    /// Next hop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Output interface name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

/// Where a container's root filesystem comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rootfs {
    /// The virtio-blk drive id (its serial in the guest) that holds it.
    pub drive_id: String,
    /// The filesystem type (ext4).
    pub fstype: String,
    /// Mount it read-only.
    #[serde(default)]
    pub read_only: bool,
    /// Put a writable overlay over a read-only rootfs: its upper layer on
    /// `writable_layer` if given, else on a tmpfs (writes kept in guest
    /// memory); either way lost with the container.
    #[serde(default)]
    pub writable_overlay: bool,
    /// The disk that holds the overlay's upper layer (with
    /// `writable_overlay` only): the rootfs disk can then be an image's
    /// shared, read-only layers and this one the container's own writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writable_layer: Option<WritableLayer>,
    /// The disk's size in bytes, when the host has just swapped the drive's
    /// backing file on a running VM: the guest's kernel learns the new size
    /// from a config-change interrupt it handles asynchronously, so the
    /// agent waits (a few seconds at most) until the disk has this size
    /// before mounting it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// A path in a virtio-fs share (`/.husk-shares/<tag>/<path>`, see
    /// [`share_source`]) holding the root filesystem, bound instead of a
    /// disk: `drive_id`, `fstype` and the overlay fields are then unused.
    /// The host's files are the container's root, as under runc.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share: Option<String>,
}

/// A disk for a container's writable layer: the agent mounts it and keeps
/// the overlay's `upper` and `work` directories at its top.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WritableLayer {
    /// The virtio-blk drive id (its serial in the guest).
    pub drive_id: String,
    /// The filesystem type (ext4).
    pub fstype: String,
    /// The disk's size in bytes after a swap (see [`Rootfs::size_bytes`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
}

/// CreateContainer's body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateContainer {
    /// The container id (unique in the VM).
    pub container_id: String,
    /// The OCI runtime spec (`root.path` is ignored: the rootfs comes from
    /// `rootfs`).
    pub spec: Box<oci_spec::runtime::Spec>,
    /// The root filesystem.
    pub rootfs: Rootfs,
    /// The container's volumes: one disk holding a copy of every host path
    /// the spec bind-mounts, entry N at the disk's top level named `N`. A
    /// spec mount whose source is [`VOLUME_SOURCE_PREFIX`]`N` binds entry N.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<Box<Rootfs>>,
}

/// The source prefix of a spec mount that names an entry of the
/// container's volumes disk (see [`CreateContainer::volumes`]).
pub const VOLUME_SOURCE_PREFIX: &str = "/.husk-volumes/";

/// The source a spec mount of volume entry `n` carries.
pub fn volume_source(n: usize) -> String {
    format!("{VOLUME_SOURCE_PREFIX}{n}")
}

/// The volume entry a spec mount's `source` names, if it names one: `None`
/// for other sources, `Some(Err(()))` for a malformed entry name.
pub fn volume_entry(source: &str) -> Option<Result<usize, ()>> {
    let rest = source.strip_prefix(VOLUME_SOURCE_PREFIX)?;
    Some(
        rest.parse::<usize>()
            .ok()
            .filter(|n| volume_source(*n) == source)
            .ok_or(()),
    )
}

/// The source prefix of a spec mount that names a path in a virtio-fs
/// share: `/.husk-shares/<tag>/<path>`. The agent mounts the share with
/// that tag once (`mount -t virtiofs <tag>`) and binds the path from it,
/// so every container of the pod naming the same path sees one directory.
pub const SHARE_SOURCE_PREFIX: &str = "/.husk-shares/";

/// The source a spec mount of `path` (relative; empty for the share's
/// root) in the share tagged `tag` carries.
pub fn share_source(tag: &str, path: &str) -> String {
    if path.is_empty() {
        format!("{SHARE_SOURCE_PREFIX}{tag}")
    } else {
        format!("{SHARE_SOURCE_PREFIX}{tag}/{path}")
    }
}

/// The share tag and the relative path a spec mount's `source` names, if
/// it names a share: `None` for other sources, `Some(Err(()))` for a
/// malformed one (an empty or over-long tag, a tag with characters other
/// than A-Z a-z 0-9 . _ -, a path with `.` or `..` components or empty
/// ones).
pub fn share_entry(source: &str) -> Option<Result<(&str, &str), ()>> {
    let rest = source.strip_prefix(SHARE_SOURCE_PREFIX)?;
    let (tag, path) = rest.split_once('/').unwrap_or((rest, ""));
    let tag_ok = !tag.is_empty()
        && tag.len() <= 36
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && tag != "."
        && tag != "..";
    let path_ok = path.is_empty()
        || path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..");
    Some(if tag_ok && path_ok {
        Ok((tag, path))
    } else {
        Err(())
    })
}

/// Successful answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    /// Done.
    Ok,
    /// Ping's answer.
    Pong {
        /// The agent's protocol version.
        version: u32,
        /// The agent's build version.
        agent_version: String,
    },
    /// A process was created or started.
    Started {
        /// Its pid in the guest.
        pid: u32,
    },
    /// WaitProcess's answer.
    Exited(ExitStatus),
    /// StatsContainer's answer.
    Stats(Stats),
    /// ListProcesses' answer.
    Processes {
        /// Guest pids.
        pids: Vec<u32>,
    },
    /// SetOnlineCpus' answer: the vCPUs online afterwards, and how many
    /// the guest knows of (online or not).
    Cpus {
        /// Online now.
        online: u32,
        /// Present (the most that can be online).
        present: u32,
    },
    /// PrepareTemplate's answer.
    TemplatePrepared {
        /// Bytes of free memory the guest zeroed.
        zeroed_bytes: u64,
    },
    /// ListProcessStates' answer.
    ProcessStates {
        /// One entry per process, containers' init processes and execs.
        processes: Vec<ProcessState>,
    },
}

/// One process the agent started, as ListProcessStates reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessState {
    /// The process.
    #[serde(flatten)]
    pub process: ProcessRef,
    /// Its pid in the guest.
    pub pid: u32,
    /// How it ended, once it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<ExitStatus>,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ExitStatus {
    /// exit(code).
    Code(i32),
    /// Killed by a signal.
    Signal(i32),
}

impl ExitStatus {
    /// The shell convention: the code, or 128 + the signal (saturating:
    /// the values come from the guest, which may send anything).
    pub fn as_shell_status(&self) -> i32 {
        match *self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128i32.saturating_add(s),
        }
    }
}

/// A container's resource usage from cgroup v2.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stats {
    /// cpu.stat usage_usec.
    pub cpu_usage_usec: u64,
    /// cpu.stat user_usec.
    pub cpu_user_usec: u64,
    /// cpu.stat system_usec.
    pub cpu_system_usec: u64,
    /// memory.current.
    pub memory_bytes: u64,
    /// memory.max (None: unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit_bytes: Option<u64>,
    /// memory.events oom_kill.
    pub oom_kills: u64,
    /// pids.current.
    pub pids: u64,
    /// io.stat rbytes summed over devices.
    pub io_read_bytes: u64,
    /// io.stat wbytes summed over devices.
    pub io_write_bytes: u64,
}

/// Something that happened, pushed on the event stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Event {
    /// A process exited.
    ProcessExited {
        /// The process.
        #[serde(flatten)]
        process: ProcessRef,
        /// How.
        status: ExitStatus,
    },
    /// The kernel's OOM killer killed a process in the container.
    Oom {
        /// The container.
        container_id: String,
    },
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
#[serde(deny_unknown_fields)]
pub struct AgentError {
    /// The class of failure.
    pub code: ErrorCode,
    /// What happened, for people.
    pub message: String,
}

impl AgentError {
    /// An error of class `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        AgentError {
            code,
            message: message.into(),
        }
    }
}

/// Classes of failure a host can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame or message could not be decoded.
    InvalidMessage,
    /// The peer speaks another protocol version.
    UnsupportedVersion,
    /// A value in a valid message is not acceptable.
    InvalidArgument,
    /// No container or process with that id.
    NotFound,
    /// The id is taken.
    AlreadyExists,
    /// The container or process is not in a state that allows this.
    FailedPrecondition,
    /// This agent does not do that (yet).
    Unsupported,
    /// The guest's kernel refused something.
    System,
}

#[cfg(test)]
mod tests {
    #[test]
    fn share_sources_name_a_tag_and_a_path_inside_it() {
        assert_eq!(share_source("vol0", ""), "/.husk-shares/vol0");
        assert_eq!(share_source("vol0", "a/b"), "/.husk-shares/vol0/a/b");
        assert_eq!(share_entry("/.husk-shares/vol0"), Some(Ok(("vol0", ""))));
        assert_eq!(
            share_entry("/.husk-shares/vol0/a/b"),
            Some(Ok(("vol0", "a/b")))
        );
        assert_eq!(share_entry("/data"), None);
        assert_eq!(share_entry("/.husk-volumes/0"), None);
        for bad in [
            "/.husk-shares/",
            "/.husk-shares/..",
            "/.husk-shares/vol0/../etc",
            "/.husk-shares/vol0/./x",
            "/.husk-shares/vol0//x",
            "/.husk-shares/vol0/x/",
            "/.husk-shares/v l/x",
            "/.husk-shares/vol\u{0}/x",
        ] {
            assert_eq!(share_entry(bad), Some(Err(())), "{bad}");
        }
        let long = format!("/.husk-shares/{}", "t".repeat(37));
        assert_eq!(share_entry(&long), Some(Err(())));
    }

    #[test]
    fn volume_sources_name_entries_exactly() {
        assert_eq!(volume_source(3), "/.husk-volumes/3");
        assert_eq!(volume_entry("/.husk-volumes/3"), Some(Ok(3)));
        assert_eq!(volume_entry("/srv/data"), None);
        for bad in [
            "/.husk-volumes/",
            "/.husk-volumes/x",
            "/.husk-volumes/03",
            "/.husk-volumes/1/..",
        ] {
            assert_eq!(volume_entry(bad), Some(Err(())), "{bad}");
        }
    }

    use super::*;

    #[test]
    fn wire_shapes() {
        let hello = Hello {
            version: 1,
            channel: Channel::Stdio {
                container_id: "c1".into(),
                exec_id: None,
                stream: StdioStream::Stdout,
            },
        };
        assert_eq!(
            serde_json::to_value(&hello).unwrap(),
            serde_json::json!({"version": 1, "channel": {"kind": "stdio", "container_id": "c1", "stream": "stdout"}})
        );
        let req = RequestFrame {
            id: 7,
            request: Request::SignalProcess {
                process: ProcessRef {
                    container_id: "c1".into(),
                    exec_id: Some("e1".into()),
                },
                signal: 9,
                all: false,
            },
        };
        let v = serde_json::to_value(&req).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id": 7, "request": {"type": "signal_process", "container_id": "c1", "exec_id": "e1", "signal": 9, "all": false}})
        );
        assert_eq!(serde_json::from_value::<RequestFrame>(v).unwrap(), req);
        let reply = ReplyFrame {
            id: 7,
            reply: Ok(Response::Exited(ExitStatus::Signal(9))),
        };
        let v = serde_json::to_value(&reply).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id": 7, "reply": {"Ok": {"type": "exited", "signal": 9}}})
        );
        assert_eq!(serde_json::from_value::<ReplyFrame>(v).unwrap(), reply);
        assert_eq!(
            serde_json::to_value(Request::SetOnlineCpus { online: 2 }).unwrap(),
            serde_json::json!({"type": "set_online_cpus", "online": 2})
        );
        assert_eq!(
            serde_json::to_value(Response::Cpus {
                online: 2,
                present: 4
            })
            .unwrap(),
            serde_json::json!({"type": "cpus", "online": 2, "present": 4})
        );
    }

    #[test]
    fn an_oci_spec_travels_in_create_container() {
        let spec = oci_spec::runtime::Spec::default();
        let req = Request::CreateContainer(CreateContainer {
            container_id: "c1".into(),
            spec: Box::new(spec),
            rootfs: Rootfs {
                drive_id: "rootfs-c1".into(),
                fstype: "ext4".into(),
                read_only: true,
                writable_overlay: true,
                writable_layer: Some(WritableLayer {
                    drive_id: "slot1".into(),
                    fstype: "ext4".into(),
                    size_bytes: Some(1 << 30),
                }),
                size_bytes: None,
                share: None,
            },
            volumes: None,
        });
        let json = serde_json::to_string(&req).unwrap();
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), req);
    }

    #[test]
    fn unknown_requests_and_fields_are_refused() {
        assert!(serde_json::from_str::<Request>(r#"{"type":"format_disk"}"#).is_err());
        assert!(serde_json::from_str::<Request>(
            r#"{"type":"start_container","container_id":"a","x":1}"#
        )
        .is_err());
        assert!(serde_json::from_str::<Request>(r#"{"type":"start_container"}"#).is_err());
        assert_eq!(ExitStatus::Signal(9).as_shell_status(), 137);
        assert_eq!(ExitStatus::Signal(i32::MAX).as_shell_status(), i32::MAX);
    }

    #[test]
    fn process_states_travel_flat() {
        let r = Response::ProcessStates {
            processes: vec![ProcessState {
                process: ProcessRef {
                    container_id: "c1".into(),
                    exec_id: Some("e1".into()),
                },
                pid: 42,
                exit: Some(ExitStatus::Code(3)),
            }],
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type": "process_states", "processes": [
                {"container_id": "c1", "exec_id": "e1", "pid": 42, "exit": {"code": 3}}]})
        );
        assert_eq!(serde_json::from_value::<Response>(v).unwrap(), r);
    }
}
