//! `husk run [IMAGE] -- CMD ARGS`: the standalone main job. It turns a local
//! OCI image, or one pulled from a registry (pull_cmd.rs), into a
//! root-filesystem image (cached), boots a microVM with the
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
    CreateContainer, ExitStatus, ProcessRef, Request, Response, Restored, Rootfs, Sandbox,
    StdioStream, DEFAULT_AGENT_PORT,
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
    /// Guest kernel (default: $HUSK_KERNEL, else the newest cached build,
    /// else the Debian package's /usr/share/husk/vmlinux).
    #[arg(long, env = "HUSK_KERNEL")]
    kernel: Option<PathBuf>,
    /// The agent initramfs (default: $HUSK_AGENT_INITRD, else the Debian
    /// package's /usr/share/husk/husk-agent.cpio; resources/agent/build.sh
    /// makes it).
    #[arg(long, env = "HUSK_AGENT_INITRD")]
    agent_initrd: Option<PathBuf>,
    /// Keep the guest's console here instead of a temporary file.
    #[arg(long)]
    console: Option<PathBuf>,
    /// A host directory shared with the container through virtio-fs, as
    /// `docker run -v` does: HOST_DIR:CONTAINER_DIR[:ro]. Repeatable; each
    /// is served by a virtiofsd of its own (--virtiofsd), in its namespace
    /// sandbox; `ro` is enforced by virtiofsd (--readonly) and the bind.
    #[arg(short = 'v', long = "volume", value_name = "HOST:DEST[:ro]", value_parser = parse_volume)]
    volumes: Vec<Volume>,
    /// virtiofsd, for --volume (default: $HUSK_VIRTIOFSD, else virtiofsd
    /// on PATH, else Debian's /usr/libexec/virtiofsd).
    #[arg(long, env = "HUSK_VIRTIOFSD")]
    virtiofsd: Option<PathBuf>,
    /// Boot the guest instead of restoring it from a template. By default
    /// the first run per kernel, agent, vCPU count, memory size and
    /// number of volumes boots a guest to its agent and snapshots it
    /// (under $HUSK_CACHE_DIR/templates), and every run, that one too, is
    /// restored from that snapshot, its random pool reseeded and its clock
    /// set by the agent. A run with --volume connects the restored guest
    /// to its own virtiofsds, and copies the template's memory (the
    /// backends map guest memory) where other runs map it.
    #[arg(long, env = "HUSK_NO_TEMPLATE")]
    no_template: bool,
    /// When to contact the registry for a registry IMAGE: `missing` (the
    /// default, as docker run) pulls only what the cache lacks and does
    /// not check a cached tag again; `always` resolves the tag again
    /// (layers already cached are not fetched again); `never` runs only
    /// what the cache holds.
    #[arg(long, value_name = "always|missing|never", default_value = "missing")]
    pull: image::registry::PullPolicy,
    #[command(flatten)]
    registry: crate::pull_cmd::RegistryArgs,
    /// The image: a registry reference, [REGISTRY/]NAME[:TAG][@sha256:DIGEST]
    /// (e.g. 127.0.0.1:5000/busybox:latest; without REGISTRY, Docker Hub),
    /// pulled into $HUSK_CACHE_DIR/registry as --pull says; or a local OCI
    /// image layout, PATH[:REF] (a directory or tar; a path that exists,
    /// or starts with / or ./, is always local). The bundled busybox image
    /// when omitted.
    image: Option<String>,
    /// The command and its arguments (default: the image's entrypoint and cmd).
    #[arg(last = true)]
    command: Vec<String>,
}

/// A `--volume`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// The host directory.
    host: PathBuf,
    /// Where the container sees it (absolute).
    dest: String,
    /// Read-only.
    read_only: bool,
}

fn parse_volume(spec: &str) -> Result<Volume, String> {
    let mut parts = spec.split(':');
    let (Some(host), Some(dest)) = (parts.next(), parts.next()) else {
        return Err(format!("volume {spec:?}: want HOST_DIR:CONTAINER_DIR[:ro]"));
    };
    let read_only = match parts.next() {
        None | Some("rw") => false,
        Some("ro") => true,
        Some(other) => {
            return Err(format!(
                "volume {spec:?}: unknown option {other:?} (ro or rw)"
            ))
        }
    };
    if parts.next().is_some() || host.is_empty() || !dest.starts_with('/') {
        return Err(format!(
            "volume {spec:?}: want HOST_DIR:CONTAINER_DIR[:ro], CONTAINER_DIR absolute"
        ));
    }
    Ok(Volume {
        host: PathBuf::from(host),
        dest: dest.to_string(),
        read_only,
    })
}

/// The spec's bind mounts of the volumes, from their shares.
fn add_volume_mounts(spec: &mut oci_spec::runtime::Spec, volumes: &[Volume]) -> anyhow::Result<()> {
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    for (i, v) in volumes.iter().enumerate() {
        let mode = if v.read_only { "ro" } else { "rw" };
        mounts.push(
            oci_spec::runtime::MountBuilder::default()
                .destination(&v.dest)
                .typ("bind")
                .source(husk_protocol::share_source(&format!("vol{i}"), ""))
                .options(vec!["rbind".to_string(), mode.to_string()])
                .build()?,
        );
    }
    spec.set_mounts(Some(mounts));
    Ok(())
}

/// Where the Debian package installs the guest kernel and the agent.
const INSTALLED_DIR: &str = "/usr/share/husk";

/// `name` as the Debian package installed it, if it did.
fn installed(name: &str) -> Option<PathBuf> {
    Some(Path::new(INSTALLED_DIR).join(name)).filter(|p| p.is_file())
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
    restored: Option<u64>,
) -> anyhow::Result<ExitStatus> {
    let t0 = Instant::now();
    let mut agent = AgentClient::connect(endpoint, Duration::from_secs(120))
        .context("cannot reach the agent in the guest")?;
    tracing::debug!(ms = t0.elapsed().as_millis() as u64, "agent answered");
    let fresh = match restored {
        Some(_) => Some(Restored::now().context("cannot read this host's entropy and clock")?),
        None => None,
    };
    agent.call(Request::CreateSandbox(Sandbox {
        hostname: Some("husk".into()),
        restored: fresh,
        ..Default::default()
    }))?;
    agent.call(Request::CreateContainer(CreateContainer {
        container_id: CONTAINER.into(),
        spec: Box::new(spec),
        rootfs: Rootfs {
            drive_id: crate::template::ROOTFS_DRIVE.into(),
            fstype: "ext4".into(),
            read_only: true,
            writable_overlay: true,
            writable_layer: None,
            // A restored guest's drive was the template's placeholder: the
            // agent waits for the swapped disk's size.
            size_bytes: restored,
            share: None,
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
        .or_else(|| installed("vmlinux"))
        .context("no guest kernel: pass --kernel or set HUSK_KERNEL (guest-kernel-config/build.sh builds one)")?;
    let agent_initrd = args
        .agent_initrd
        .clone()
        .or_else(|| installed("husk-agent.cpio"))
        .context("no agent initramfs: pass --agent-initrd or set HUSK_AGENT_INITRD (resources/agent/build.sh builds it)")?;
    let rootfs = crate::pull_cmd::rootfs_for(
        args.image.as_deref(),
        args.pull,
        &args.registry,
        &image::RootfsOptions::default(),
    )?;
    let mut spec = container_spec(&rootfs.config, &args.command, args.tty)?;
    add_volume_mounts(&mut spec, &args.volumes)?;

    let dir = std::env::temp_dir().join(format!("husk-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = RunDir(dir);
    // Dropped (killed) after the VM, before the run directory goes.
    let virtiofsd = crate::virtiofsd::find(args.virtiofsd.clone());
    let shares: Vec<_> = args
        .volumes
        .iter()
        .map(|v| crate::virtiofsd::Share {
            dir: &v.host,
            read_only: v.read_only,
        })
        .collect();
    let (_virtiofsds, fs) = crate::virtiofsd::start(&shares, &virtiofsd, &dir.0)?;
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
                id: crate::template::ROOTFS_DRIVE.into(),
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
        fs,
    };
    let (mut vmm, restored) = build_vm(
        &args,
        &config,
        &rootfs.rootfs,
        &uds,
        &console,
        seccomp,
        &virtiofsd,
    )?;
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
            if restored.is_some() {
                // A restored VM's vCPUs wait, parked, until now.
                vmm.resume();
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
                let r = session(endpoint, spec, tty, interactive, restored);
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

/// The run's VM: restored from its template (made first
/// if there is none; a template that fails to restore is removed and the
/// VM booted instead, with a warning), else booted. The second value is
/// the root filesystem's size when the VM was restored.
fn build_vm(
    args: &RunArgs,
    config: &VmConfig,
    rootfs: &Path,
    uds: &Path,
    console: &Path,
    seccomp: &SeccompFilters,
    virtiofsd: &Path,
) -> anyhow::Result<(Vmm, Option<u64>)> {
    let boot = || Vmm::new(config).context("cannot build the microVM");
    if args.no_template {
        return Ok((boot()?, None));
    }
    let template = match crate::template::get_or_create(config, seccomp, virtiofsd) {
        Ok((t, created)) => {
            if created {
                tracing::info!("a template was made for this kernel, agent and machine size");
            }
            t
        }
        Err(e) => {
            tracing::warn!(error = %Chain(&e), "no template: booting");
            return Ok((boot()?, None));
        }
    };
    let size = std::fs::metadata(rootfs)
        .with_context(|| format!("cannot stat {}", rootfs.display()))?
        .len();
    let params = vmm::persist::LoadParams {
        snapshot_path: template.state(),
        mem_file_path: template.mem(),
        net_overrides: Vec::new(),
        vsock_uds_path: Some(uds.to_path_buf()),
        drive_overrides: Vec::new(),
        // The run's virtiofsds, in place of the template's.
        fs_overrides: config
            .fs
            .iter()
            .map(|f| vmm::persist::FsOverride {
                id: f.id.clone(),
                socket: f.socket.clone(),
            })
            .collect(),
        serial: SerialOutput::File(console.to_path_buf()),
        seccomp: seccomp.clone(),
    };
    let restored = Vmm::restore(&params, Arc::new(vmm::metrics::Metrics::default()))
        .map_err(anyhow::Error::new)
        .and_then(|vmm| {
            vmm.swap_drive(crate::template::ROOTFS_DRIVE, rootfs.to_path_buf())
                .context("cannot give the restored guest its root filesystem")?;
            Ok(vmm)
        });
    match restored {
        Ok(vmm) => Ok((vmm, Some(size))),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "the template did not restore: removing it and booting");
            template.discard();
            Ok((boot()?, None))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_flags() {
        let v = parse_volume("/srv/data:/data").unwrap();
        assert_eq!(
            (v.host.as_path(), v.dest.as_str(), v.read_only),
            (Path::new("/srv/data"), "/data", false)
        );
        assert!(parse_volume("./in:/in:ro").unwrap().read_only);
        assert!(!parse_volume("./in:/in:rw").unwrap().read_only);
        for bad in ["/srv", "/srv:data", ":/data", "/a:/b:rx", "/a:/b:ro:x"] {
            assert!(parse_volume(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn volumes_become_binds_of_their_shares() {
        let mut spec = oci_spec::runtime::Spec::default();
        let n = spec.mounts().as_ref().map_or(0, Vec::len);
        let vols = [
            parse_volume("/a:/data").unwrap(),
            parse_volume("/b:/etc/conf:ro").unwrap(),
        ];
        add_volume_mounts(&mut spec, &vols).unwrap();
        let mounts = spec.mounts().as_ref().unwrap();
        assert_eq!(mounts.len(), n + 2);
        let ro = &mounts[n + 1];
        assert_eq!(ro.destination(), Path::new("/etc/conf"));
        assert_eq!(
            ro.source().as_deref(),
            Some(Path::new("/.husk-shares/vol1"))
        );
        assert_eq!(
            ro.options().as_deref(),
            Some(&["rbind".to_string(), "ro".to_string()][..])
        );
    }
}
