//! Pod templates (`template = true`): instead of booting each pod's
//! guest kernel, the shim restores the pod's microVM from a snapshot of a
//! guest booted once to the point where its agent answers, before any pod
//! configuration.
//!
//! A template stands for a pod *shape*: everything the guest has seen by
//! then — the husk binary, guest kernel and agent (each by path, size,
//! modification time and inode), the kernel command line, vCPUs (and
//! hot-pluggable ones), memory (and the hot-pluggable region), the spare
//! drive slots, and whether the pod has a network interface and a share
//! (and whether the share relays).
//! The shape's text, hashed, names the template's directory under
//! `image_cache_dir/templates/pod-v1/` (so a jailed husk, which sees the
//! image cache, can read it). The first pod of a shape makes it, under a
//! lock that the node's shims share; the others wait and use it.
//!
//! The template's VM is a husk of its own, unjailed, in a network
//! namespace of its own where it makes its tap, with a virtiofsd serving
//! an empty directory when pods have a share, its NIC at
//! [`TEMPLATE_MAC`]. Once the agent answers it is paused and snapshotted
//! and everything but the two snapshot files goes. A pod restores it with
//! its own tap, MAC, placeholders, virtiofsd socket and vsock socket in
//! place of the template's (`PUT /snapshot/load` overrides); the agent
//! then reseeds the guest's random pool, sets its clock and gives its NIC
//! the pod's MAC (`Sandbox::restored`, `Interface::device_mac`) before it
//! sets the pod up as after a boot.

use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use husk_api_types::template::{
    file_identity, key, prune_superseded, INPUTS_FILE, MEM_FILE, STATE_FILE,
};
use husk_api_types::{ActionType, VmStateRequest};

use crate::config::Config;
use crate::pod::{PodDir, VmSpec};
use crate::slots::SlotSpec;
use crate::vm::VmError;

/// The MAC of a template's NIC, which every clone's guest comes up with
/// until the agent gives it the pod's ("husk" in its last four bytes; a
/// locally administered unicast address).
pub const TEMPLATE_MAC: &str = "02:00:68:75:73:6b";

/// `_IOW('T', 202, int)` (linux/if_tun.h).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `_IOW('T', 203, int)`.
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;

/// The TUNSETIFF request for the pod tap's name: a tap, no packet
/// information, virtio-net headers (what husk attaches with). Built from
/// plain data in the child (an ifreq holds a pointer, so it cannot be
/// moved into the closure).
fn tap_request(name: &[u8; libc::IFNAMSIZ]) -> libc::ifreq {
    // SAFETY: ifreq is plain data; zero is a valid initial value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name) {
        *dst = *src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    req
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmError {
    let what = what.into();
    move |source| VmError::Io { what, source }
}

/// One template on disk.
#[derive(Debug, Clone)]
pub struct Template {
    dir: PathBuf,
}

impl Template {
    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The VM state file.
    pub fn state(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// The guest memory file.
    pub fn mem(&self) -> PathBuf {
        self.dir.join(MEM_FILE)
    }

    fn ready(&self) -> bool {
        self.state().is_file() && self.mem().is_file() && self.dir.join(INPUTS_FILE).is_file()
    }

    /// Removes a template that failed to restore, so the next pod of its
    /// shape makes a new one (VMs restored from it keep what they mapped).
    pub fn discard(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Where the node's pod templates are.
pub fn templates_dir(config: &Config) -> PathBuf {
    config.image_cache_dir.join("templates").join("pod-v1")
}

/// The text that names a pod shape's template.
fn inputs(config: &Config, spec: &VmSpec, slots: &[SlotSpec]) -> Result<String, VmError> {
    let id = |what: &str, path: &Path| {
        file_identity(what, path).map_err(io(format!("find the {what} {}", path.display())))
    };
    let slots: Vec<String> = slots
        .iter()
        .map(|s| format!("{}:{}", s.id, if s.read_only { "ro" } else { "rw" }))
        .collect();
    Ok(format!(
        "format pod-v1\n{}\n{}\n{}\ncmdline {}\nvcpus {}\nmax_vcpus {}\nmem_mib {}\nhotplug_mib {}\nslots {}\nnetwork {}\nshare {}\nshare_relay {}\n",
        id("husk", &config.husk())?,
        id("kernel", &config.kernel)?,
        id("initrd", &config.initrd)?,
        config.kernel_params,
        spec.vcpus,
        spec.max_vcpus,
        spec.mem_mib,
        spec.hotplug_mib,
        slots.join(" "),
        spec.network.is_some(),
        spec.share.is_some(),
        spec.share.is_some() && config.share_relay,
    ))
}

/// The template of the pod's shape: cached, or made now. `None` (with a
/// warning) when there is none to be had: the pod boots.
pub fn for_pod(config: &Config, spec: &VmSpec, slots: &[SlotSpec]) -> Option<Template> {
    match get_or_make(config, spec, slots) {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!(pod = %spec.id, error = %crate::error::Chain(&e),
                "no template for the pod's shape: booting it");
            None
        }
    }
}

/// An exclusive flock(2) on `file`, held until it is closed.
fn lock(file: &std::fs::File) -> std::io::Result<()> {
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn get_or_make(config: &Config, spec: &VmSpec, slots: &[SlotSpec]) -> Result<Template, VmError> {
    let text = inputs(config, spec, slots)?;
    let key = key(&text);
    let root = templates_dir(config);
    let template = Template {
        dir: root.join(&key),
    };
    if template.ready() {
        return Ok(template);
    }
    for dir in [root.parent().unwrap_or(&root), &root] {
        std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
        // Passable by jailed husks (the pool's group reads the files).
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .map_err(io(format!("chmod {}", dir.display())))?;
    }
    // One maker at a time on the node: the others wait here, then find
    // the template made.
    let lock_path = root.join(".lock");
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io(format!("open {}", lock_path.display())))?;
    lock(&lock_file).map_err(io(format!("lock {}", lock_path.display())))?;
    if template.ready() {
        return Ok(template);
    }
    // Only the lock's holder makes templates: any unfinished one is a
    // dead maker's.
    if let Ok(entries) = std::fs::read_dir(&root) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().contains(".tmp-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let tmp = root.join(format!(".{key}.tmp-{}", std::process::id()));
    std::fs::create_dir(&tmp).map_err(io(format!("create {}", tmp.display())))?;
    let t0 = Instant::now();
    let mut zeroed = 0;
    let made = make(config, spec, slots, &key, &tmp)
        .and_then(|z| {
            zeroed = z;
            std::fs::write(tmp.join(INPUTS_FILE), &text)
                .map_err(io(format!("write {}", tmp.join(INPUTS_FILE).display())))
        })
        .and_then(|()| {
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
                .map_err(io(format!("chmod {}", tmp.display())))
        })
        .and_then(|()| {
            let _ = std::fs::remove_dir_all(&template.dir);
            std::fs::rename(&tmp, &template.dir).map_err(io(format!(
                "move the template to {}",
                template.dir.display()
            )))
        });
    if let Err(e) = made {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    tracing::info!(pod = %spec.id, template = %template.dir.display(),
        ms = t0.elapsed().as_millis() as u64, zeroed_mib = zeroed >> 20,
        "made a template for the pod's shape");
    let husk = config.husk();
    let pruned = prune_superseded(
        &root,
        &key,
        &[
            ("husk", husk.as_path()),
            ("kernel", &config.kernel),
            ("initrd", &config.initrd),
        ],
    );
    if pruned > 0 {
        tracing::info!(
            pruned,
            "removed templates of a changed husk, kernel or agent"
        );
    }
    Ok(template)
}

/// Boots the template's VM, waits for its agent, has it prepared and
/// writes its snapshot in `tmp`; everything else it made is gone when
/// this returns. Returns the bytes of free memory the guest zeroed (none
/// if it could not).
fn make(
    config: &Config,
    spec: &VmSpec,
    slots: &[SlotSpec],
    key: &str,
    tmp: &Path,
) -> Result<u64, VmError> {
    // The VM's sockets in a short directory of the state directory (a
    // unix socket's path has at most 108 bytes, husk's vsock at most 96);
    // only the snapshot goes to the cache.
    let vm_dir = PodDir(
        config
            .state_dir
            .join(format!("template-{}", std::process::id())),
    );
    let _ = std::fs::remove_dir_all(&vm_dir.0);
    let share = vm_dir.0.join("share");
    crate::private::dir(&config.state_dir)
        .map_err(io(format!("create {}", config.state_dir.display())))?;
    for d in [vm_dir.0.clone(), vm_dir.run_dir(), share.clone()] {
        crate::private::dir(&d).map_err(io(format!("create {}", d.display())))?;
    }
    let result = boot_and_snapshot(config, spec, slots, key, tmp, &vm_dir, &share);
    let _ = std::fs::remove_dir_all(&vm_dir.0);
    result
}

fn boot_and_snapshot(
    config: &Config,
    spec: &VmSpec,
    slots: &[SlotSpec],
    key: &str,
    tmp: &Path,
    vm_dir: &PodDir,
    share: &Path,
) -> Result<u64, VmError> {
    // Dropped (stopped) when this returns, after husk.
    let _virtiofsd = match spec.share {
        Some(_) => Some(crate::virtiofsd::Virtiofsd::start(
            &config.virtiofsd(),
            vm_dir,
            share,
            None,
            None,
        )?),
        None => None,
    };
    let log = crate::private::file(&vm_dir.log())
        .map_err(io(format!("create {}", vm_dir.log().display())))?;
    let mut cmd = Command::new(config.husk());
    cmd.arg("--api-sock")
        .arg(vm_dir.api_socket())
        .arg("--id")
        .arg(format!("template-{key}"));
    if !config.seccomp {
        cmd.arg("--no-seccomp");
    }
    if spec.network.is_some() {
        // The template's tap, as the shim makes a pod's (`ip tuntap add
        // ... mode tap vnet_hdr`), in a network namespace of husk's own
        // that goes with it. Everything the child does is prepared here.
        let mut name = [0u8; libc::IFNAMSIZ];
        let tap = crate::network::TAP.as_bytes();
        // Leaves the name's NUL (the constant is short).
        let len = tap.len().min(libc::IFNAMSIZ - 1);
        name[..len].copy_from_slice(&tap[..len]);
        let tun = c"/dev/net/tun";
        // SAFETY: unshare, open, ioctl and close are async-signal-safe;
        // `req` and `tun` are the child's copies, valid through the calls.
        unsafe {
            cmd.pre_exec(move || {
                if libc::unshare(libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let fd = libc::open(tun.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let mut req = tap_request(&name);
                let made = libc::ioctl(fd, TUNSETIFF as _, &mut req) == 0
                    && libc::ioctl(fd, TUNSETPERSIST as _, 1 as libc::c_ulong) == 0;
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if !made {
                    return Err(err);
                }
                Ok(())
            });
        }
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(io("dup the log"))?)
        .stderr(log)
        .spawn()
        .map_err(io(format!("start {}", config.husk().display())))?;
    let t_spec = VmSpec {
        id: format!("template-{key}"),
        cgroup: None,
        hostname: None,
        network: None,
        jail: None,
        ..spec.clone()
    };
    let t_slots: Vec<SlotSpec> = slots
        .iter()
        .map(|s| SlotSpec {
            placeholder: vm_dir.slot_placeholder(&s.id),
            ..s.clone()
        })
        .collect();
    let result = (|| {
        let api = crate::vm::wait_for_api(vm_dir, &mut child)?;
        let mac = spec.network.as_ref().map(|_| TEMPLATE_MAC);
        crate::vm::configure_devices(&api, config, vm_dir, &t_spec, &t_slots, mac)?;
        api.action(ActionType::InstanceStart)?;
        let mut agent = crate::vm::connect_agent(config, vm_dir, &mut child)?;
        // Every pod restored from the template copies its memory file
        // into memory shared with its virtio-fs backend (docs/snapshots.md),
        // so each byte of the file is memory every pod holds while it
        // runs: the agent zeroes the guest's free memory first, and the
        // file keeps the pages in use, not what boot left in freed ones
        // (about 8 MiB less per pod, for a few seconds once per template).
        // A guest that cannot do it makes a larger template, not a wrong
        // one.
        let zeroed = agent.prepare_template().unwrap_or_else(|e| {
            tracing::warn!(error = %crate::error::Chain(&e),
                "the template's guest was not prepared: its snapshot keeps its free memory");
            0
        });
        drop(agent);
        api.set_vm_state(VmStateRequest::Paused)?;
        api.create_snapshot(&tmp.join(STATE_FILE), &tmp.join(MEM_FILE))?;
        Ok(zeroed)
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shape_names_everything_the_guest_saw() {
        let tmp = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        for (name, field) in [("vmlinux", 0), ("agent.cpio", 1), ("husk", 2)] {
            let p = tmp.path().join(name);
            std::fs::write(&p, name).unwrap();
            match field {
                0 => config.kernel = p,
                1 => config.initrd = p,
                _ => config.husk_binary = Some(p),
            }
        }
        let spec = VmSpec {
            id: "pod".into(),
            vcpus: 1,
            max_vcpus: 2,
            mem_mib: 256,
            hotplug_mib: 512,
            cgroup: None,
            hostname: Some("a".into()),
            network: None,
            jail: None,
            share: Some(tmp.path().join("share")),
        };
        let slots = vec![SlotSpec {
            id: "slot0".into(),
            read_only: false,
            placeholder: tmp.path().join("slot0.empty"),
        }];
        let text = inputs(&config, &spec, &slots).unwrap();
        for needle in [
            "husk ",
            "kernel ",
            "initrd ",
            "vcpus 1",
            "max_vcpus 2",
            "mem_mib 256",
            "hotplug_mib 512",
            "slots slot0:rw",
            "network false",
            "share true",
        ] {
            assert!(text.contains(needle), "{needle:?} not in {text}");
        }
        // The pod's own names are not the shape's.
        let other = VmSpec {
            id: "another".into(),
            hostname: Some("b".into()),
            ..spec.clone()
        };
        assert_eq!(text, inputs(&config, &other, &slots).unwrap());
        let bigger = VmSpec {
            mem_mib: 512,
            ..spec.clone()
        };
        assert_ne!(text, inputs(&config, &bigger, &slots).unwrap());
        config.kernel = tmp.path().join("missing");
        assert!(inputs(&config, &spec, &slots).is_err());
    }
}
