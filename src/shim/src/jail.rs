//! Each pod's husk in a jail of its own, through `husk-jailer`: a uid only
//! this pod's husk has (claimed from `jail_uid_base + 1 ..= jail_uid_base +
//! jail_uids` while the pod runs), the pool's shared group (which may read
//! the image cache and nothing else of the node's), no capabilities, and a
//! root that is the pod's state directory. husk sees its files there at
//! `/`: the drives, the metrics file, `/run` for its sockets (the only
//! directory it may write), and, bound read-only in its own mount
//! namespace, the guest kernel (`/vmlinux`), the agent (`/initrd`) and the
//! image cache (`/images`). Everything else of the pod directory is
//! root's, 0600: husk can neither read the console log nor swap a file the
//! shim uses.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::config::Config;
use crate::pod::PodDir;

/// Why a pod's jail could not be made.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// Every uid of the pool is some running pod's.
    #[error("all {count} jail uids from {first} are taken by running pods (jail_uids in the shim's config)")]
    NoUid {
        /// The pool's size.
        count: u32,
        /// Its first uid.
        first: u32,
    },
    /// husk needs a dynamic loader, which the jail does not have.
    #[error("{} is dynamically linked, and a jailed husk has no libraries: install a static husk (RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --target x86_64-unknown-linux-gnu -p husk) or set jailer = false", .0.display())]
    Dynamic(PathBuf),
    /// A file operation failed.
    #[error("cannot {what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> JailError {
    let what = what.into();
    move |source| JailError::Io { what, source }
}

/// Where the image cache is seen inside a jail.
const IMAGES: &str = "images";
/// The kernel's name inside a jail.
const KERNEL: &str = "vmlinux";
/// The agent initramfs's name inside a jail.
const INITRD: &str = "initrd";
/// The pod directory's mode when jailed: husk's uid may pass through it to
/// its own files, but not list it.
const JAILED_DIR_MODE: u32 = 0o711;

/// A pod's claim on a jail uid; given back when dropped (the pod is gone).
#[derive(Debug)]
pub struct PodJail {
    /// husk's uid.
    pub uid: u32,
    /// husk's group: the pool's, shared.
    pub gid: u32,
    /// The pod's state directory, the jail's root.
    pub root: PathBuf,
    /// The host's image cache, seen at `/images`.
    images: PathBuf,
    /// The claim: a link to `root`, named by the uid.
    claim: PathBuf,
}

/// The directory of uid claims: one symbolic link per uid in use, to the
/// pod directory that uses it.
fn claims_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("jail-uids")
}

impl PodJail {
    /// Claims a uid for the pod whose state directory is `dir`. A claim
    /// whose pod directory is gone (its shim died and `delete` removed the
    /// directory) is taken over.
    pub fn claim(config: &Config, dir: &PodDir) -> Result<PodJail, JailError> {
        let husk = config.husk();
        if needs_loader(&husk).map_err(io(format!("read {}", husk.display())))? {
            return Err(JailError::Dynamic(husk));
        }
        let claims = claims_dir(&config.state_dir);
        crate::private::dir(&claims).map_err(io(format!("create {}", claims.display())))?;
        let (first, count) = (config.jail_uid_base + 1, config.jail_uids);
        // Start where the directory's name points, so pods of one node
        // rarely probe each other's claims.
        let start = dir
            .0
            .as_os_str()
            .as_encoded_bytes()
            .iter()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(*b)));
        for n in 0..count {
            let uid = first + (start.wrapping_add(n) % count);
            let claim = claims.join(uid.to_string());
            match std::os::unix::fs::symlink(&dir.0, &claim) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let owner = std::fs::read_link(&claim).ok();
                    let stale = owner.as_ref().is_some_and(|o| !o.exists());
                    if owner.as_deref() != Some(dir.0.as_path()) && !stale {
                        continue;
                    }
                    // Ours already (a boot retried), or a dead pod's.
                    let _ = std::fs::remove_file(&claim);
                    if std::os::unix::fs::symlink(&dir.0, &claim).is_err() {
                        continue;
                    }
                }
                Err(e) => return Err(io(format!("create {}", claim.display()))(e)),
            }
            return Ok(PodJail {
                uid,
                gid: config.jail_uid_base,
                root: dir.0.clone(),
                images: config.image_cache_dir.clone(),
                claim,
            });
        }
        Err(JailError::NoUid { count, first })
    }

    /// Makes the pod directory a jail's root: passable (not listable) by
    /// husk's uid, with `/run` husk's own; the image cache readable by
    /// the pool's group.
    pub fn prepare(&self, dir: &PodDir) -> Result<(), JailError> {
        std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(JAILED_DIR_MODE))
            .map_err(io(format!("chmod {}", dir.0.display())))?;
        let run = dir.run_dir();
        crate::private::dir(&run).map_err(io(format!("create {}", run.display())))?;
        self.give(&run)?;
        crate::private::dir(&self.images)
            .map_err(io(format!("create {}", self.images.display())))?;
        share_with_group(&self.images, self.gid, 0o750).map_err(io(format!(
            "share {} with the jails",
            self.images.display()
        )))
    }

    /// Makes `path` husk's (its uid and group, mode unchanged).
    pub fn give(&self, path: &Path) -> Result<(), JailError> {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid))
            .map_err(io(format!("chown {}", path.display())))
    }

    /// What husk calls the host's `path`: under the pod directory, the
    /// same name from `/`; in the image cache, under `/images` (the file
    /// made readable by the pool's group). `None` for any other path,
    /// which husk cannot see.
    pub fn path_in_jail(&self, path: &Path) -> Result<Option<PathBuf>, JailError> {
        if let Ok(rel) = path.strip_prefix(&self.root) {
            return Ok(Some(Path::new("/").join(rel)));
        }
        if let Ok(rel) = path.strip_prefix(&self.images) {
            share_with_group(path, self.gid, 0o640)
                .map_err(io(format!("share {} with the jails", path.display())))?;
            return Ok(Some(Path::new("/").join(IMAGES).join(rel)));
        }
        Ok(None)
    }

    /// The command that starts husk jailed, with `husk_args` (whose paths
    /// are inside the jail): the kernel, the agent and the image cache
    /// bound read-only, no cgroup of the jailer's (the shim moves husk
    /// into the pod's).
    pub fn command(&self, config: &Config, id: &str, husk_args: &[&std::ffi::OsStr]) -> Command {
        let mut cmd = Command::new(config.jailer());
        cmd.arg("--id")
            .arg(id)
            .arg("--exec-file")
            .arg(config.husk())
            .arg("--uid")
            .arg(self.uid.to_string())
            .arg("--gid")
            .arg(self.gid.to_string())
            .arg("--chroot-dir")
            .arg(&self.root)
            .arg("--no-cgroup");
        for (source, name) in [
            (&config.kernel, KERNEL),
            (&config.initrd, INITRD),
            (&self.images, IMAGES),
        ] {
            let mut bind = source.as_os_str().to_owned();
            bind.push(":");
            bind.push(name);
            cmd.arg("--bind-ro").arg(bind);
        }
        cmd.arg("--").args(husk_args);
        cmd
    }

    /// The kernel and initramfs as husk sees them.
    pub fn boot_files() -> (PathBuf, PathBuf) {
        (Path::new("/").join(KERNEL), Path::new("/").join(INITRD))
    }

    /// Gives the uid back (if the claim is still this pod's). The pod's
    /// end calls it: the last handle on the jail may be on a thread still
    /// running when the shim exits, and a drop that never runs would
    /// leave the claim behind (taken over later, but a leak until then).
    pub fn release(&self) {
        if std::fs::read_link(&self.claim).ok().as_deref() == Some(self.root.as_path()) {
            let _ = std::fs::remove_file(&self.claim);
        }
    }
}

impl Drop for PodJail {
    fn drop(&mut self) {
        self.release();
    }
}

/// Gives `path` to root and `gid` with `mode` (readable by the group,
/// nothing for others).
fn share_with_group(path: &Path, gid: u32, mode: u32) -> std::io::Result<()> {
    std::os::unix::fs::chown(path, Some(0), Some(gid))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Whether the ELF file at `path` names a program interpreter (a dynamic
/// loader): a PT_INTERP program header.
pub fn needs_loader(path: &Path) -> std::io::Result<bool> {
    const PT_INTERP: u32 = 3;
    let mut bytes = Vec::new();
    // The headers are at the front; 64 KiB holds them in any husk.
    File::open(path)?.take(64 << 10).read_to_end(&mut bytes)?;
    let u16_at = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u64_at = |o: usize| {
        bytes
            .get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    // Only a 64-bit little-endian ELF is a husk this shim can run.
    if bytes.get(..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        return Ok(false);
    }
    let (Some(phoff), Some(entsize), Some(num)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        return Ok(false);
    };
    let phoff = usize::try_from(phoff).unwrap_or(usize::MAX);
    Ok((0..usize::from(num)).any(|i| {
        let at = phoff.saturating_add(i.saturating_mul(usize::from(entsize)));
        bytes
            .get(at..at + 4)
            .is_some_and(|t| u32::from_le_bytes([t[0], t[1], t[2], t[3]]) == PT_INTERP)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(state: &Path, husk: &Path) -> Config {
        Config {
            state_dir: state.to_path_buf(),
            husk_binary: Some(husk.to_path_buf()),
            image_cache_dir: state.join("images"),
            jail_uid_base: 5000,
            jail_uids: 2,
            ..Config::default()
        }
    }

    /// A static stand-in for husk: an ELF header with no program headers.
    fn static_elf(path: &Path) {
        let mut h = vec![0u8; 64];
        h[..6].copy_from_slice(b"\x7fELF\x02\x01");
        std::fs::write(path, h).unwrap();
    }

    /// A scratch state directory and a config whose husk is a static
    /// stand-in.
    fn with_static_husk() -> (tempfile::TempDir, Config) {
        let dir = tempfile::tempdir().unwrap();
        let husk = dir.path().join("husk");
        static_elf(&husk);
        let c = config(dir.path(), &husk);
        (dir, c)
    }

    #[test]
    fn a_dynamic_husk_is_refused_and_the_shims_own_binary_is_dynamic() {
        // The test binary itself is dynamically linked.
        let me = std::env::current_exe().unwrap();
        assert!(needs_loader(&me).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let e =
            PodJail::claim(&config(dir.path(), &me), &PodDir(dir.path().join("p"))).unwrap_err();
        assert!(matches!(e, JailError::Dynamic(_)), "{e}");
        assert!(e.to_string().contains("crt-static"), "{e}");
        let husk = dir.path().join("husk");
        static_elf(&husk);
        assert!(!needs_loader(&husk).unwrap());
    }

    #[test]
    fn uids_are_one_per_pod_reused_when_given_back_or_left_by_a_dead_pod() {
        let (dir, c) = with_static_husk();
        let pod = |n: &str| {
            let p = PodDir(dir.path().join("k8s.io").join(n));
            std::fs::create_dir_all(&p.0).unwrap();
            p
        };
        let (a, b, c3) = (pod("a"), pod("b"), pod("c"));
        let ja = PodJail::claim(&c, &a).unwrap();
        let jb = PodJail::claim(&c, &b).unwrap();
        assert_ne!(ja.uid, jb.uid);
        for j in [&ja, &jb] {
            assert!((5001..=5002).contains(&j.uid), "{}", j.uid);
            assert_eq!(j.gid, 5000);
        }
        // The pool is two: a third pod waits for one to go.
        let e = PodJail::claim(&c, &c3).unwrap_err();
        assert!(
            matches!(
                e,
                JailError::NoUid {
                    count: 2,
                    first: 5001
                }
            ),
            "{e}"
        );
        let freed = jb.uid;
        drop(jb);
        assert_eq!(PodJail::claim(&c, &c3).unwrap().uid, freed);
        // A pod whose shim died keeps its claim until its directory goes.
        let kept = ja.uid;
        std::mem::forget(ja);
        let jb = PodJail::claim(&c, &b).unwrap();
        assert_ne!(jb.uid, kept);
        assert!(PodJail::claim(&c, &c3).is_err());
        std::fs::remove_dir(&a.0).unwrap();
        let jc = PodJail::claim(&c, &c3).unwrap();
        assert_eq!(jc.uid, kept);
        // Released while a handle still lives (the pod's end): the uid is
        // free at once, and the handle's later drop takes nothing of the
        // next pod's.
        jc.release();
        std::fs::create_dir_all(&a.0).unwrap();
        let ja = PodJail::claim(&c, &a).unwrap();
        assert_eq!(ja.uid, kept);
        drop(jc);
        assert_eq!(
            std::fs::read_link(&ja.claim).unwrap(),
            a.0,
            "a stale handle's drop removed another pod's claim"
        );
    }

    #[test]
    fn husk_sees_the_pod_directory_at_its_root_and_the_cache_at_images() {
        let (dir, c) = with_static_husk();
        let p = PodDir(dir.path().join("k8s.io").join("p"));
        std::fs::create_dir_all(&p.0).unwrap();
        let j = PodJail::claim(&c, &p).unwrap();
        assert_eq!(
            j.path_in_jail(&p.0.join("rootfs-c.ext4")).unwrap(),
            Some(PathBuf::from("/rootfs-c.ext4"))
        );
        std::fs::create_dir_all(&c.image_cache_dir).unwrap();
        let cached = c.image_cache_dir.join("k.ext4");
        std::fs::write(&cached, "").unwrap();
        assert_eq!(
            j.path_in_jail(&cached).unwrap(),
            Some(PathBuf::from("/images/k.ext4"))
        );
        assert_eq!(j.path_in_jail(Path::new("/etc/shadow")).unwrap(), None);
        let args = j.command(&c, "p", &["--api-sock".as_ref(), "/run/api.sock".as_ref()]);
        let argv: Vec<String> = args
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let line = argv.join(" ");
        assert!(
            line.contains(&format!("--chroot-dir {}", p.0.display())),
            "{line}"
        );
        assert!(line.contains("--no-cgroup"), "{line}");
        assert!(line.ends_with("-- --api-sock /run/api.sock"), "{line}");
    }
}
