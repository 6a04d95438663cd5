//! `husk run [IMAGE] -- CMD ARGS`: the standalone main job. It turns a local
//! OCI image into a root-filesystem image (cached), boots a microVM with the
//! guest kernel and the husk-agent initramfs, a vsock and the rootfs as a
//! read-only drive (writes go to a tmpfs overlay in the guest), asks the
//! agent to run CMD in a container, streams its stdio, and exits with the
//! container's status (128+N for signal N).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use husk_protocol::client::{AgentClient, Endpoint};
use husk_protocol::{
    CreateContainer, ExitStatus, ProcessRef, Request, Response, Rootfs, Sandbox, StdioStream,
    DEFAULT_AGENT_PORT,
};
use vmm::error::Chain;
use vmm::seccomp::SeccompFilters;
use vmm::{BlockConfig, BootSource, DriveConfig, SerialOutput, VmConfig, Vmm, VsockConfig};

use husk_image as image;

/// Flags of `husk run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: usize,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    mem_mib: u64,
    /// Allocate a terminal for the container (stdin and stdout become one
    /// tty stream).
    #[arg(short = 't', long)]
    tty: bool,
    /// Pass this process's stdin to the container.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Guest kernel (default: $HUSK_KERNEL, else the newest cached build).
    #[arg(long, env = "HUSK_KERNEL")]
    kernel: Option<PathBuf>,
    /// The agent initramfs (default: $HUSK_AGENT_INITRD; resources/agent/build.sh makes it).
    #[arg(long, env = "HUSK_AGENT_INITRD")]
    agent_initrd: Option<PathBuf>,
    /// Keep the guest's console here instead of a temporary file.
    #[arg(long)]
    console: Option<PathBuf>,
    /// An OCI image layout (directory or tar, PATH[:REF]); the bundled
    /// busybox image when omitted.
    image: Option<String>,
    /// The command and its arguments (default: the image's entrypoint and cmd).
    #[arg(last = true)]
    command: Vec<String>,
}

fn newest_cached_kernel() -> Option<PathBuf> {
    let dir = image::rootfs::cache_dir().join("kernel");
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path().join("vmlinux"))
        .filter(|p| p.is_file())
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
}

/// The OCI runtime spec for the container.
fn container_spec(
    config: &image::ImageConfig,
    command: &[String],
    tty: bool,
) -> anyhow::Result<oci_spec::runtime::Spec> {
    use oci_spec::runtime::{LinuxNamespaceType, ProcessBuilder, UserBuilder};
    // As docker run: the entrypoint stays, the command replaces the cmd.
    let args = config.argv(command);
    if args.is_empty() {
        bail!("no command: the image has no entrypoint or cmd; give one after --");
    }
    let (uid, gid) = parse_user(&config.user)?;
    let mut env: Vec<String> = config.env.clone();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    }
    if tty {
        env.push("TERM=xterm".into());
    }
    let default = oci_spec::runtime::Spec::default();
    let process = ProcessBuilder::default()
        .terminal(tty)
        .args(args)
        .env(env)
        .cwd(config.working_dir.clone())
        .user(UserBuilder::default().uid(uid).gid(gid).build()?)
        .capabilities(
            default
                .process()
                .as_ref()
                .and_then(|p| p.capabilities().clone())
                .unwrap_or_default(),
        )
        .rlimits(
            default
                .process()
                .as_ref()
                .and_then(|p| p.rlimits().clone())
                .unwrap_or_default(),
        )
        .no_new_privileges(true)
        .build()?;
    let mut spec = default;
    spec.set_process(Some(process));
    spec.set_hostname(Some("husk".into()));
    // The container shares the VM's network namespace: the VM is the pod.
    if let Some(linux) = spec.linux_mut() {
        if let Some(ns) = linux.namespaces_mut() {
            ns.retain(|n| n.typ() != LinuxNamespaceType::Network);
        }
    }
    Ok(spec)
}

/// "uid" or "uid:gid"; names need the image's /etc/passwd, which husk does
/// not read yet.
fn parse_user(user: &str) -> anyhow::Result<(u32, u32)> {
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (u, g) = user.split_once(':').unwrap_or((user, ""));
    let uid: u32 = u
        .parse()
        .with_context(|| format!("image user {user:?}: only numeric uid[:gid] is supported"))?;
    let gid: u32 = if g.is_empty() {
        0
    } else {
        g.parse()
            .with_context(|| format!("image user {user:?}: only numeric uid[:gid] is supported"))?
    };
    Ok((uid, gid))
}

/// Copies `from` to `to` until EOF, then closes `to`'s write side if asked.
fn pump(mut from: impl Read, mut to: impl Write) -> std::io::Result<u64> {
    let mut buf = [0u8; 16 * 1024];
    let mut total = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        to.flush()?;
        total += n as u64;
    }
}

const CONTAINER: &str = "run";

/// How long output may keep arriving after the container's process exited.
const STREAM_DRAIN: Duration = Duration::from_secs(2);

/// Talks to the agent: runs the container, streams its stdio, returns its
/// exit status, and asks the guest to shut down.
fn session(
    endpoint: Endpoint,
    spec: oci_spec::runtime::Spec,
    tty: bool,
    interactive: bool,
) -> anyhow::Result<ExitStatus> {
    let t0 = Instant::now();
    let mut agent = AgentClient::connect(endpoint, Duration::from_secs(120))
        .context("cannot reach the agent in the guest")?;
    tracing::debug!(ms = t0.elapsed().as_millis() as u64, "agent answered");
    agent.call(Request::CreateSandbox(Sandbox {
        hostname: Some("husk".into()),
        ..Default::default()
    }))?;
    agent.call(Request::CreateContainer(CreateContainer {
        container_id: CONTAINER.into(),
        spec: Box::new(spec),
        rootfs: Rootfs {
            drive_id: "rootfs".into(),
            fstype: "ext4".into(),
            read_only: true,
            writable_overlay: true,
            writable_layer: None,
            size_bytes: None,
        },
        volumes: None,
    }))?;
    let mut pumps = Vec::new();
    if tty {
        let stream = agent.open_stdio(CONTAINER, None, StdioStream::Tty)?;
        let reader = stream.try_clone()?;
        pumps.push(std::thread::spawn(move || pump(reader, std::io::stdout())));
        if interactive {
            std::thread::spawn(move || {
                let _ = pump(std::io::stdin(), &stream);
            });
        }
    } else {
        let out = agent.open_stdio(CONTAINER, None, StdioStream::Stdout)?;
        let err = agent.open_stdio(CONTAINER, None, StdioStream::Stderr)?;
        pumps.push(std::thread::spawn(move || pump(out, std::io::stdout())));
        pumps.push(std::thread::spawn(move || pump(err, std::io::stderr())));
        let stdin = agent.open_stdio(CONTAINER, None, StdioStream::Stdin)?;
        if interactive {
            std::thread::spawn(move || {
                let _ = pump(std::io::stdin(), &stdin);
                let _ = stdin.shutdown(std::net::Shutdown::Write);
            });
        } else {
            // No input: the container's stdin is at EOF at once.
            stdin.shutdown(std::net::Shutdown::Write)?;
        }
    }
    agent.call(Request::StartContainer {
        container_id: CONTAINER.into(),
    })?;
    let status = match agent.call(Request::WaitProcess(ProcessRef {
        container_id: CONTAINER.into(),
        exec_id: None,
    }))? {
        Response::Exited(status) => status,
        other => bail!("unexpected answer to WaitProcess: {other:?}"),
    };
    // The streams end when the process side closes them: let the output
    // drain, but not forever (a background process may hold them open; the
    // VM is about to go and take it along).
    let deadline = Instant::now() + STREAM_DRAIN;
    while pumps.iter().any(|p| !p.is_finished()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    if pumps.iter().any(|p| !p.is_finished()) {
        tracing::debug!("output streams still open after the container exited");
    }
    match agent.call(Request::Shutdown) {
        Ok(_) => {}
        // The guest reset before its reply left it: shut down all the same.
        Err(e) if e.is_closed() => tracing::debug!("the agent closed its connection on shutdown"),
        Err(e) => tracing::warn!(error = %Chain(&e), "the agent did not acknowledge the shutdown"),
    }
    Ok(status)
}

/// A directory under /run for this run's sockets and console, removed at
/// the end.
struct RunDir(PathBuf);

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the container; returns the status to exit with.
pub fn run(args: RunArgs, seccomp: &SeccompFilters) -> anyhow::Result<u8> {
    let kernel = args
        .kernel
        .clone()
        .or_else(newest_cached_kernel)
        .context("no guest kernel: pass --kernel or set HUSK_KERNEL (guest-kernel-config/build.sh builds one)")?;
    let agent_initrd = args
        .agent_initrd
        .clone()
        .context("no agent initramfs: pass --agent-initrd or set HUSK_AGENT_INITRD (resources/agent/build.sh builds it)")?;
    let rootfs = image::rootfs_for(args.image.as_deref(), &image::RootfsOptions::default())
        .with_context(|| {
            format!(
                "image {}",
                args.image.as_deref().unwrap_or("(bundled busybox)")
            )
        })?;
    let spec = container_spec(&rootfs.config, &args.command, args.tty)?;

    let dir = std::env::temp_dir().join(format!("husk-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = RunDir(dir);
    let uds = dir.0.join("vsock.sock");
    let console = args
        .console
        .clone()
        .unwrap_or_else(|| dir.0.join("console.log"));
    let mut cmdline = husk_protocol::AGENT_KERNEL_CMDLINE.to_string();
    if tracing::enabled!(tracing::Level::DEBUG) {
        cmdline.push_str(" husk.agent_debug");
    }
    let config = VmConfig {
        vcpus: args.vcpus,
        mem_mib: args.mem_mib,
        boot: BootSource {
            kernel,
            initrd: Some(agent_initrd),
            cmdline,
        },
        serial: SerialOutput::File(console.clone()),
        drives: vec![DriveConfig {
            block: BlockConfig {
                id: "rootfs".into(),
                path: rootfs.rootfs.clone(),
                read_only: true,
            },
            is_root: false,
        }],
        net: Vec::new(),
        vsock: Some(VsockConfig {
            guest_cid: husk_protocol::AGENT_GUEST_CID,
            uds_path: uds.clone(),
        }),
        max_vcpus: None,
        mem_hotplug: None,
        fs: Vec::new(),
    };
    let mut vmm = Vmm::new(&config).context("cannot build the microVM")?;
    let stop = vmm.stop_handle();
    // The VMM gets a thread of its own: the seccomp filters confine it and
    // its vCPUs, not this side, which talks to the agent and cleans up.
    let (started_tx, started) = std::sync::mpsc::channel();
    let seccomp = seccomp.clone();
    let vmm_thread = std::thread::Builder::new()
        .name("husk-vmm".into())
        .spawn(move || -> anyhow::Result<vmm::VmExit> {
            let start = vmm.start(&seccomp);
            let ok = start.is_ok();
            let _ = started_tx.send(start);
            if !ok {
                return Err(anyhow::anyhow!("the vCPUs did not start"));
            }
            // Dropped here, on the confined thread, once the guest is gone.
            vmm.run().context("the VMM failed while the guest ran")
        })
        .context("cannot start the VMM thread")?;
    match started.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let _ = vmm_thread.join();
            return Err(anyhow::Error::new(e).context("cannot start the vCPUs"));
        }
        Err(_) => bail!("the VMM thread ended during start"),
    }
    let outcome = Arc::new(Mutex::new(None));
    let client = {
        let outcome = outcome.clone();
        let endpoint = Endpoint::Vsock {
            uds,
            port: DEFAULT_AGENT_PORT,
        };
        let (tty, interactive) = (args.tty, args.interactive);
        std::thread::Builder::new()
            .name("husk-run".into())
            .spawn(move || {
                let r = session(endpoint, spec, tty, interactive);
                let failed = r.is_err();
                *outcome.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                if failed {
                    stop.stop();
                }
            })
            .context("cannot start the agent session")?
    };
    let exit = vmm_thread
        .join()
        .map_err(|_| anyhow::anyhow!("the VMM thread panicked"))??;
    if let vmm::VmExit::Signal(sig) = exit {
        // Ctrl-C or SIGTERM: the VM is gone and the container with it.
        eprintln!("husk: {exit}");
        return Ok(u8::try_from(128 + sig).unwrap_or(255));
    }
    // The guest is gone (and the VMM with it, on its thread): a session
    // still waiting would wait forever.
    let result = outcome.lock().unwrap_or_else(|e| e.into_inner()).take();
    if result.is_some() {
        let _ = client.join();
    }
    match result {
        Some(Ok(status)) => Ok(u8::try_from(status.as_shell_status()).unwrap_or(255)),
        Some(Err(e)) => {
            print_console_tail(&console);
            Err(e)
        }
        None => {
            print_console_tail(&console);
            bail!("the microVM ended before the container did: {exit}")
        }
    }
}

fn print_console_tail(console: &Path) {
    if let Ok(text) = std::fs::read_to_string(console) {
        let lines: Vec<&str> = text.lines().collect();
        eprintln!("husk: the guest console's last lines:");
        for l in &lines[lines.len().saturating_sub(20)..] {
            eprintln!("  {l}");
        }
    }
}
