//! Templates for `husk run` (its default; `--no-template` boots): a guest
//! booted once to the point where its agent answers, snapshotted, and from
//! then on restored for every run instead of booted, so a run pays a restore (the guest's pages
//! read from the memory file as it touches them) where it paid a kernel
//! boot.
//!
//! A template is kept under `$HUSK_CACHE_DIR/templates/run-v1/<key>/`,
//! keyed by everything that shapes the booted guest: the guest kernel and
//! agent initramfs (path, size, modification time, inode), the vCPU count,
//! memory size and kernel command line, and the husk binary itself (a
//! newer VMM may save devices differently). Change any of them and a new
//! template is made at the next run; one made for a kernel or initramfs
//! that has since changed at the same path is removed then.
//!
//! The template's only drive is a placeholder (4 KiB of zeros, read-only,
//! one file for all templates):
//! a restored run swaps its image's root filesystem in before its vCPUs
//! resume, as the shim swaps container disks into spare slots. Every
//! clone starts with the template's random pool and a clock stopped at the
//! snapshot; the agent reseeds the one and sets the other from the host
//! before the container is created (`Sandbox::restored`).

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use husk_api_types::template::{
    file_identity, key as key_of, prune_superseded, INPUTS_FILE, MEM_FILE, STATE_FILE,
};
use husk_protocol::client::{AgentClient, Endpoint};
use husk_protocol::DEFAULT_AGENT_PORT;
use vmm::seccomp::SeccompFilters;
use vmm::{SerialOutput, VmConfig, Vmm};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The template's drive id: the one `husk run` gives the root filesystem.
pub const ROOTFS_DRIVE: &str = "rootfs";

/// How long a template's guest has to boot to its agent.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// How long pausing and writing the snapshot may take.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a template could not be found or made.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// A file or directory operation failed.
    #[error("cannot {what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The template's VM could not be built or started.
    #[error("cannot boot the template's microVM")]
    Vmm(#[source] vmm::VmmError),
    /// Its agent never answered.
    #[error("the template's agent did not answer (its console: {console})")]
    Agent {
        /// The guest console's last lines.
        console: String,
        /// Why.
        #[source]
        source: husk_protocol::client::ClientError,
    },
    /// The snapshot failed.
    #[error("cannot snapshot the template's microVM")]
    Snapshot(#[source] vmm::persist::SnapshotError),
    /// A virtio-fs device's backend did not start.
    #[error("cannot start the template's virtio-fs backend")]
    Virtiofsd(#[source] crate::virtiofsd::VirtiofsdError),
    /// The VMM thread ended or stalled before the snapshot was written.
    #[error("the template's microVM ended or stalled before its snapshot was written")]
    Lost,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TemplateError {
    let what = what.into();
    move |source| TemplateError::Io { what, source }
}

/// What a template is made of.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The agent initramfs.
    pub initrd: PathBuf,
    /// vCPUs.
    pub vcpus: usize,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// The kernel command line.
    pub cmdline: String,
    /// The virtio-fs devices' ids (one per `--volume`; the guest sees
    /// their tags at boot).
    pub fs: Vec<String>,
}

/// A file's identity line for the key.
fn identity(what: &str, path: &Path) -> Result<String, TemplateError> {
    file_identity(what, path).map_err(io(format!("find the {what} {}", path.display())))
}

impl Inputs {
    /// The inputs of a run's VM.
    pub fn of(config: &VmConfig) -> Inputs {
        Inputs {
            kernel: config.boot.kernel.clone(),
            initrd: config.boot.initrd.clone().unwrap_or_default(),
            vcpus: config.vcpus,
            mem_mib: config.mem_mib,
            cmdline: config.boot.cmdline.clone(),
            fs: config
                .fs
                .iter()
                .map(|f| format!("{}:{}:{}:{}", f.id, f.tag, f.num_queues, f.queue_size))
                .collect(),
        }
    }

    /// The inputs as text, one per line (kept with the template for
    /// people; hashed into its key).
    fn describe(&self, husk: &Path) -> Result<String, TemplateError> {
        let mut text = format!(
            "format run-v1 snapshot-v{}\n{}\n{}\n{}\nvcpus {}\nmem_mib {}\ncmdline {}\n",
            vmm::persist::format::FORMAT_VERSION,
            identity("husk", husk)?,
            identity("kernel", &self.kernel)?,
            identity("initrd", &self.initrd)?,
            self.vcpus,
            self.mem_mib,
            self.cmdline,
        );
        // (Absent without volumes: those templates keep their keys.)
        if !self.fs.is_empty() {
            text.push_str(&format!("fs {}\n", self.fs.join(" ")));
        }
        Ok(text)
    }
}

/// The directory of `husk run`'s templates.
pub fn templates_dir() -> PathBuf {
    husk_image::rootfs::cache_dir()
        .join("templates")
        .join("run-v1")
}

/// One template on disk.
#[derive(Debug, Clone)]
pub struct Template {
    dir: PathBuf,
}

impl Template {
    /// The VM state file.
    pub fn state(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// The guest memory file.
    pub fn mem(&self) -> PathBuf {
        self.dir.join(MEM_FILE)
    }

    /// Removes a template that failed to restore, so the next run makes a
    /// new one. (Runs restored from it keep their mapped pages.)
    pub fn discard(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The template for a run's VM `config` (its drive [`ROOTFS_DRIVE`] and
/// vsock are the run's own; a template gets its own): the cached one, or
/// a new one made now (the second value says which).
pub fn get_or_create(
    config: &VmConfig,
    seccomp: &SeccompFilters,
    virtiofsd: &Path,
) -> Result<(Template, bool), TemplateError> {
    let inputs = &Inputs::of(config);
    let husk = std::env::current_exe().map_err(io("find the husk binary"))?;
    let text = inputs.describe(&husk)?;
    let key = key_of(&text);
    let root = templates_dir();
    let dir = root.join(&key);
    let template = Template { dir: dir.clone() };
    if template.state().is_file() && template.mem().is_file() {
        return Ok((template, false));
    }
    std::fs::create_dir_all(&root).map_err(io(format!("create {}", root.display())))?;
    let tmp = root.join(format!(".{key}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(io(format!("create {}", tmp.display())))?;
    let t0 = Instant::now();
    let made = create(config, &tmp, seccomp, virtiofsd).and_then(|()| {
        std::fs::write(tmp.join(INPUTS_FILE), &text)
            .map_err(io(format!("write {}", tmp.join(INPUTS_FILE).display())))
    });
    if let Err(e) = made {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    // The vsock socket, the virtiofsds' sockets and their empty directory
    // were the template VM's own.
    if let Ok(entries) = std::fs::read_dir(&tmp) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().ends_with(".sock") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(tmp.join("empty"));
    if std::fs::rename(&tmp, &dir).is_err() {
        // Another run made it first: theirs is as good.
        let _ = std::fs::remove_dir_all(&tmp);
        if !template.state().is_file() {
            return Err(TemplateError::Io {
                what: format!("move the new template to {}", dir.display()),
                source: std::io::Error::other("the rename failed and no template is there"),
            });
        }
    }
    tracing::info!(
        template = %dir.display(),
        ms = t0.elapsed().as_millis() as u64,
        "template made"
    );
    let pruned = prune_superseded(
        &root,
        &key,
        &[
            ("husk", husk.as_path()),
            ("kernel", &inputs.kernel),
            ("initrd", &inputs.initrd),
        ],
    );
    if pruned > 0 {
        tracing::info!(
            pruned,
            "removed templates of a changed husk, kernel or initramfs"
        );
    }
    Ok((template, true))
}

/// The last lines of a console file.
fn console_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join(" | ")
}

/// Boots the template's guest in `dir` until its agent answers, then
/// pauses it and writes its snapshot there: the run's VM `run`, with a
/// placeholder for its root filesystem, a console and vsock of its own,
/// and for each virtio-fs device a virtiofsd of its own on an empty
/// directory (the guest never mounts it; a clone connects to its run's).
fn create(
    run: &VmConfig,
    dir: &Path,
    seccomp: &SeccompFilters,
    virtiofsd: &Path,
) -> Result<(), TemplateError> {
    // One for all templates, outside each one's directory: the state
    // file names it, and the directory is renamed into place afterwards.
    let placeholder = templates_dir().join("rootfs.placeholder");
    if std::fs::metadata(&placeholder).map(|m| m.len()).ok() != Some(4096) {
        let f = std::fs::File::create(&placeholder)
            .map_err(io(format!("create {}", placeholder.display())))?;
        f.set_len(4096)
            .map_err(io(format!("size {}", placeholder.display())))?;
    }
    let uds = dir.join("vsock.sock");
    let console = dir.join("console.log");
    let mut config = run.clone();
    config.serial = SerialOutput::File(console.clone());
    for d in &mut config.drives {
        if d.block.id == ROOTFS_DRIVE {
            d.block.path = placeholder.clone();
        }
    }
    if let Some(v) = config.vsock.as_mut() {
        v.uds_path = uds.clone();
    }
    let empty = dir.join("empty");
    let (_virtiofsds, fs) = if config.fs.is_empty() {
        Default::default()
    } else {
        std::fs::create_dir(&empty).map_err(io(format!("create {}", empty.display())))?;
        let shares: Vec<_> = (0..config.fs.len())
            .map(|_| crate::virtiofsd::Share {
                dir: &empty,
                read_only: true,
            })
            .collect();
        // Absolute: virtiofsd may run in a root of its own (a wrapper's
        // chroot) where a relative cache directory means nothing.
        let sockets = std::path::absolute(dir).map_err(io("find the template's directory"))?;
        crate::virtiofsd::start(&shares, virtiofsd, &sockets).map_err(TemplateError::Virtiofsd)?
    };
    // The same devices as the run's (ids, tags, queues), on the
    // template's own backends.
    for (mine, theirs) in config.fs.iter_mut().zip(fs) {
        mine.socket = theirs.socket;
    }
    let mut vmm = Vmm::new(&config).map_err(TemplateError::Vmm)?;
    let wake = EventFd::new(EFD_NONBLOCK).map_err(io("create an eventfd"))?;
    let wake_source = wake.try_clone().map_err(io("dup an eventfd"))?;
    vmm.add_wake_source(wake_source, |e| {
        let _ = e.read();
    });
    let stop = vmm.stop_handle();
    let (started_tx, started) = mpsc::channel();
    let (order_tx, order) = mpsc::channel::<()>();
    let (done_tx, done) = mpsc::channel();
    let (state, mem) = (dir.join(STATE_FILE), dir.join(MEM_FILE));
    let seccomp = seccomp.clone();
    let thread = std::thread::Builder::new()
        .name("husk-template".into())
        .spawn(move || {
            let start = vmm.start(&seccomp);
            let ok = start.is_ok();
            let _ = started_tx.send(start);
            if !ok {
                return;
            }
            let _ = vmm.run_with(|vmm| {
                if order.try_recv().is_ok() {
                    let r = vmm
                        .pause()
                        .map_err(TemplateError::Vmm)
                        .and_then(|()| vmm.snapshot(&state, &mem).map_err(TemplateError::Snapshot));
                    let _ = done_tx.send(r);
                    vmm.stop_handle().stop();
                }
            });
        })
        .map_err(io("start the template's VMM thread"))?;
    let outcome = (|| {
        match started.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(TemplateError::Vmm(e)),
            Err(_) => return Err(TemplateError::Lost),
        }
        let endpoint = Endpoint::Vsock {
            uds,
            port: DEFAULT_AGENT_PORT,
        };
        // Connected is answering: the handshake is the agent's.
        // (Not prepared, as the shim's templates are: a run's memory is
        // its own and short-lived, and zeroing the template's free memory
        // would make the first run seconds slower for no faster restore;
        // docs/snapshots.md.)
        let agent = AgentClient::connect(endpoint, BOOT_TIMEOUT).map_err(|source| {
            TemplateError::Agent {
                console: console_tail(&console),
                source,
            }
        })?;
        drop(agent);
        order_tx.send(()).map_err(|_| TemplateError::Lost)?;
        wake.write(1).map_err(io("wake the template's VMM"))?;
        done.recv_timeout(SNAPSHOT_TIMEOUT)
            .map_err(|_| TemplateError::Lost)?
    })();
    stop.stop();
    let _ = thread.join();
    let stats = outcome?;
    tracing::debug!(
        state_bytes = stats.state_bytes,
        mem_written = stats.mem_written,
        "template snapshot written"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(dir: &Path) -> Inputs {
        std::fs::write(dir.join("vmlinux"), b"kernel").unwrap();
        std::fs::write(dir.join("initrd"), b"initrd").unwrap();
        Inputs {
            kernel: dir.join("vmlinux"),
            initrd: dir.join("initrd"),
            vcpus: 1,
            mem_mib: 128,
            cmdline: "console=ttyS0".into(),
            fs: Vec::new(),
        }
    }

    #[test]
    fn the_key_text_names_every_input_and_changes_with_them() {
        let tmp = tempfile::tempdir().unwrap();
        let i = inputs(tmp.path());
        let husk = tmp.path().join("initrd");
        let a = i.describe(&husk).unwrap();
        for needle in [
            "kernel ",
            "initrd ",
            "vcpus 1",
            "mem_mib 128",
            "cmdline console=ttyS0",
        ] {
            assert!(a.contains(needle), "{needle:?} not in {a}");
        }
        assert!(!a.contains("fs "), "{a}");
        let mut more = i.clone();
        more.mem_mib = 256;
        assert_ne!(a, more.describe(&husk).unwrap());
        // Each volume count is a template of its own.
        let mut volumes = i.clone();
        volumes.fs = vec!["vol0:vol0:1:1024".into()];
        let one = volumes.describe(&husk).unwrap();
        assert!(one.contains("fs vol0:vol0:1:1024\n"), "{one}");
        volumes.fs.push("vol1:vol1:1:1024".into());
        assert_ne!(one, volumes.describe(&husk).unwrap());
        std::fs::write(tmp.path().join("vmlinux"), b"a newer kernel").unwrap();
        assert_ne!(
            a,
            i.describe(&husk).unwrap(),
            "a rebuilt kernel is a new key"
        );
        let mut gone = i.clone();
        gone.kernel = tmp.path().join("missing");
        assert!(gone.describe(&husk).is_err());
    }
}
