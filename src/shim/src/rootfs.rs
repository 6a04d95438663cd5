//! A container's root filesystem as disks for the guest. containerd hands
//! the rootfs as mounts: for a new container, an overlay of the image's
//! snapshot layers (read-only, committed) and the container's own, empty,
//! writable layer.
//!
//! - **Shared layers** (the usual case): the image's layers, merged, are
//!   copied once into a read-only ext4 file in the image cache, keyed by
//!   the chain of snapshot directories; every container of that image, in
//!   every pod, gets that same file on a read-only drive, and an empty
//!   ext4 of its own for its writes; the agent puts an overlay of the two
//!   together in the guest. A container's start then costs one mke2fs of
//!   an empty file system, whatever the image's size.
//! - **A full copy** (a rootfs path with no mounts, as `ctr run --rootfs`
//!   gives; a writable layer that is not empty; any other shape of mounts;
//!   no read-only slot left): the shim mounts containerd's mounts on the
//!   bundle's `rootfs` directory, copies the merged tree into a fresh ext4
//!   image with mke2fs -d, and unmounts. The image is the container's from
//!   then on: its writes stay in it and go with it.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use containerd_shim::protos::types::mount::Mount;
use husk_image::rootfs::{disk_usage, make_empty_ext4, make_ext4};
use sha2::{Digest, Sha256};

/// Why the disk could not be made.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// Mounting containerd's rootfs failed.
    #[error("cannot mount the rootfs ({typ} {source_path} on {target}): {detail}")]
    Mount {
        /// The mount type.
        typ: String,
        /// Its source.
        source_path: String,
        /// Where.
        target: PathBuf,
        /// Why.
        detail: String,
    },
    /// A file operation failed.
    #[error("{}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// mke2fs failed.
    #[error("cannot build the ext4 image")]
    Image(#[from] husk_image::rootfs::RootfsError),
    /// The copier process failed (its own error, or how it ended).
    #[error("{0}")]
    Copier(String),
}

/// One of containerd's mounts, as the copier takes it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MountSpec {
    /// The file system type.
    pub fstype: String,
    /// The source.
    pub source: String,
    /// The options.
    pub options: Vec<String>,
}

impl MountSpec {
    pub fn of(m: &Mount) -> MountSpec {
        MountSpec {
            fstype: m.type_.clone(),
            source: m.source.clone(),
            options: m.options.clone(),
        }
    }

    fn mount(&self) -> Mount {
        Mount {
            type_: self.fstype.clone(),
            source: self.source.clone(),
            options: self.options.clone(),
            ..Default::default()
        }
    }
}

/// An image the copier builds: every mount it needs is made in its own
/// mount namespace, so none is ever on the node, and none outlives it
/// (a shim killed mid-copy leaves no mount under the bundle for
/// containerd's removal of the bundle to recurse into).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum CopyJob {
    /// [`build_image`]: `mounts` on `root`, copied into `image`.
    Tree {
        /// containerd's mounts.
        mounts: Vec<MountSpec>,
        /// Where they are mounted.
        root: PathBuf,
        /// The ext4 file made.
        image: PathBuf,
    },
    /// [`build_volumes_image`].
    Volumes {
        /// The host paths copied.
        sources: Vec<PathBuf>,
        /// Where they are bound.
        staging: PathBuf,
        /// The ext4 file made.
        image: PathBuf,
    },
}

/// The shim's argument that makes it the copier.
pub const COPIER_ARG: &str = "copy-image";

impl CopyJob {
    /// Runs the job in this process (the copier, in its own mount
    /// namespace); the image's size.
    pub fn run_here(&self) -> Result<u64, RootfsError> {
        match self {
            CopyJob::Tree {
                mounts,
                root,
                image,
            } => {
                let mounts: Vec<Mount> = mounts.iter().map(MountSpec::mount).collect();
                build_image(&mounts, root, image)
            }
            CopyJob::Volumes {
                sources,
                staging,
                image,
            } => build_volumes_image(sources, staging, image),
        }
    }

    /// Runs the job in a copier process: this binary again, in a mount
    /// namespace of its own (private, so nothing propagates back), in
    /// `cgroup` when given (what it writes, page cache and tmpfs alike,
    /// is charged to the pod), killed if the thread waiting for it dies.
    /// Returns the image's size.
    pub fn run(&self, cgroup: Option<&Path>) -> Result<u64, RootfsError> {
        // A unit test's binary is not the shim: the same job runs in the
        // test's process (the copier process is tested in the node VM).
        if cfg!(test) {
            let _ = cgroup;
            return self.run_here();
        }
        use std::io::Write;
        use std::os::unix::process::CommandExt;
        let copier = |e: String| RootfsError::Copier(format!("the image copier: {e}"));
        let exe = std::env::current_exe().map_err(|e| copier(e.to_string()))?;
        let job = serde_json::to_vec(self).map_err(|e| copier(e.to_string()))?;
        let procs = cgroup
            .map(|c| {
                std::ffi::CString::new(c.join("cgroup.procs").into_os_string().into_encoded_bytes())
            })
            .transpose()
            .map_err(|_| copier("a NUL byte in the cgroup's path".into()))?;
        let mut cmd = std::process::Command::new(exe);
        cmd.arg(COPIER_ARG)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        // SAFETY: between fork and exec only async-signal-safe calls
        // (prctl, open, write, close, unshare, mount) on data made before
        // the fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(procs) = &procs {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                    libc::close(fd);
                    if written != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if libc::unshare(libc::CLONE_NEWNS) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let root = c"/";
                if libc::mount(
                    std::ptr::null(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| copier(format!("cannot start it: {e}")))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(&job)
                .map_err(|e| copier(format!("cannot give it its job: {e}")))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| copier(format!("cannot wait for it: {e}")))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stderr = stderr.trim();
        if !out.status.success() {
            return Err(RootfsError::Copier(if stderr.is_empty() {
                // Killed (the pod's memory limit, when it is in the pod's
                // cgroup) rather than failed.
                format!("the image copier ended ({}) without a word: was it killed by the pod's memory limit?", out.status)
            } else {
                stderr.to_string()
            }));
        }
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|_| copier(format!("it printed no size: {stderr}")))
    }
}

/// The copier's main: a [`CopyJob`] on stdin, the image's size on stdout,
/// the error and its causes on stderr.
/// Returns the exit status.
pub fn copier_main() -> i32 {
    let mut input = Vec::new();
    if let Err(e) = std::io::Read::read_to_end(&mut std::io::stdin(), &mut input) {
        eprintln!("cannot read the job: {e}");
        return 1;
    }
    let job: CopyJob = match serde_json::from_slice(&input) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("a job that is not one: {e}");
            return 1;
        }
    };
    match job.run_here() {
        Ok(size) => {
            println!("{size}");
            0
        }
        Err(e) => {
            eprintln!("{}", crate::error::Chain(&e));
            1
        }
    }
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> RootfsError + '_ {
    move |source| RootfsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Mounts undone when dropped (innermost first).
struct Mounted(Vec<PathBuf>);

impl Drop for Mounted {
    fn drop(&mut self) {
        for target in self.0.iter().rev() {
            if let Ok(c) = std::ffi::CString::new(target.as_os_str().as_encoded_bytes()) {
                // SAFETY: a NUL-terminated path; umount2 only reads it.
                if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
                    tracing::warn!(target = %target.display(), error = %std::io::Error::last_os_error(), "cannot unmount the rootfs");
                }
            }
        }
    }
}

/// mount(2) flags of the options containerd uses; other options are
/// passed to the file system as data.
const FLAGS: &[(&str, libc::c_ulong, bool)] = &[
    ("ro", libc::MS_RDONLY, true),
    ("rw", libc::MS_RDONLY, false),
    ("bind", libc::MS_BIND, true),
    ("rbind", libc::MS_BIND | libc::MS_REC, true),
    ("nosuid", libc::MS_NOSUID, true),
    ("suid", libc::MS_NOSUID, false),
    ("nodev", libc::MS_NODEV, true),
    ("dev", libc::MS_NODEV, false),
    ("noexec", libc::MS_NOEXEC, true),
    ("exec", libc::MS_NOEXEC, false),
    ("sync", libc::MS_SYNCHRONOUS, true),
    ("async", libc::MS_SYNCHRONOUS, false),
    ("noatime", libc::MS_NOATIME, true),
    ("atime", libc::MS_NOATIME, false),
    ("nodiratime", libc::MS_NODIRATIME, true),
    ("relatime", libc::MS_RELATIME, true),
    ("norelatime", libc::MS_RELATIME, false),
    ("strictatime", libc::MS_STRICTATIME, true),
];

/// The longest mount data the kernel takes (one page, with room to spare).
const MAX_DATA: usize = 4096 - 512;

/// Mounts one of containerd's mounts on `target` in this process (no
/// fork: the shim is multi-threaded). An overlay whose lowerdir list is
/// too long for one page gets short symlinks to its layers under `links`.
fn mount_one(m: &Mount, target: &Path, links: &Path) -> Result<(), String> {
    let mut flags: libc::c_ulong = 0;
    let mut data: Vec<String> = Vec::new();
    for o in &m.options {
        match FLAGS.iter().find(|(name, _, _)| name == o) {
            Some((_, f, true)) => flags |= f,
            Some((_, f, false)) => flags &= !f,
            None => data.push(o.clone()),
        }
    }
    let mut joined = data.join(",");
    if joined.len() > MAX_DATA && m.type_ == "overlay" {
        std::fs::create_dir_all(links).map_err(|e| format!("{}: {e}", links.display()))?;
        for d in data.iter_mut() {
            if let Some(lower) = d.strip_prefix("lowerdir=") {
                let mut short = Vec::new();
                for (i, layer) in lower.split(':').enumerate() {
                    let link = links.join(i.to_string());
                    std::os::unix::fs::symlink(layer, &link)
                        .map_err(|e| format!("{}: {e}", link.display()))?;
                    short.push(link.display().to_string());
                }
                *d = format!("lowerdir={}", short.join(":"));
            }
        }
        joined = data.join(",");
    }
    if joined.len() > MAX_DATA {
        return Err(format!(
            "mount options of {} bytes are too long",
            joined.len()
        ));
    }
    let c = |s: &str| std::ffi::CString::new(s).map_err(|_| format!("NUL byte in {s:?}"));
    let source = c(if m.source.is_empty() {
        "none"
    } else {
        &m.source
    })?;
    let fstype = c(&m.type_)?;
    let target_c = c(&target.display().to_string())?;
    let data_c = c(&joined)?;
    let is_bind = flags & libc::MS_BIND != 0;
    // SAFETY: NUL-terminated strings that outlive the call; mount(2)
    // only reads them.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target_c.as_ptr(),
            if is_bind {
                std::ptr::null()
            } else {
                fstype.as_ptr()
            },
            flags & !libc::MS_RDONLY | if is_bind { 0 } else { flags & libc::MS_RDONLY },
            if joined.is_empty() {
                std::ptr::null()
            } else {
                data_c.as_ptr().cast()
            },
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    if is_bind && flags & libc::MS_RDONLY != 0 {
        // A bind mount takes read-only only on a remount.
        // SAFETY: as above.
        let rc = unsafe {
            libc::mount(
                std::ptr::null(),
                target_c.as_ptr(),
                std::ptr::null(),
                flags | libc::MS_REMOUNT,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: as above.
            unsafe { libc::umount2(target_c.as_ptr(), libc::MNT_DETACH) };
            return Err(format!("remount read-only: {e}"));
        }
    }
    Ok(())
}

/// Builds `image` (an ext4 file) from the container's root filesystem:
/// `mounts` mounted on `bundle_root`, or `bundle_root` itself when there
/// are none. Returns the image's size in bytes.
pub fn build_image(mounts: &[Mount], bundle_root: &Path, image: &Path) -> Result<u64, RootfsError> {
    std::fs::create_dir_all(bundle_root).map_err(io_at(bundle_root))?;
    let mut mounted = Mounted(Vec::new());
    for (i, m) in mounts.iter().enumerate() {
        mount_at(
            m,
            bundle_root,
            &bundle_root.with_extension(format!("layers{i}")),
        )?;
        mounted.0.push(bundle_root.to_path_buf());
    }
    image_of(bundle_root, image, mounted)
}

/// Mounts containerd's `mounts` (a snapshot: an overlay of the image's
/// layers and the container's own upper layer) on `bundle_root` in the
/// node's mount namespace, as runc's shim does, for a rootfs served to
/// the guest through the pod's share; undone by [`unmount_tree`].
pub fn mount_tree(mounts: &[Mount], bundle_root: &Path) -> Result<(), RootfsError> {
    std::fs::create_dir_all(bundle_root).map_err(io_at(bundle_root))?;
    for (i, m) in mounts.iter().enumerate() {
        let links = bundle_root.with_extension(format!("layers{i}"));
        if let Err(e) = mount_at(m, bundle_root, &links) {
            unmount_tree(bundle_root);
            return Err(e);
        }
    }
    Ok(())
}

/// Detaches whatever is mounted on `bundle_root`.
pub fn unmount_tree(bundle_root: &Path) {
    let _ = containerd_shim::mount::umount_recursive(bundle_root.to_str(), libc::MNT_DETACH);
}

/// [`mount_one`] with its failure as a [`RootfsError`].
/// The overlay's short layer links (under `links`) are needed only while
/// mount(2) resolves them, so they go right after, whatever the outcome.
fn mount_at(m: &Mount, target: &Path, links: &Path) -> Result<(), RootfsError> {
    let result = mount_one(m, target, links);
    let _ = std::fs::remove_dir_all(links);
    result.map_err(|detail| RootfsError::Mount {
        typ: m.type_.clone(),
        source_path: m.source.clone(),
        target: target.to_path_buf(),
        detail,
    })
}

/// Copies `tree` into a fresh ext4 file `image` sized for it, then undoes
/// `mounted` (what makes up the tree); no image is left on failure.
/// Returns the image's size in bytes.
fn image_of(tree: &Path, image: &Path, mounted: Mounted) -> Result<u64, RootfsError> {
    let usage = disk_usage(tree).map_err(io_at(tree))?;
    crate::private::file(image).map_err(io_at(image))?;
    let built = make_ext4(tree, image, &usage);
    drop(mounted);
    if let Err(e) = built {
        let _ = std::fs::remove_file(image);
        return Err(e.into());
    }
    Ok(std::fs::metadata(image).map_err(io_at(image))?.len())
}

/// Builds `image` (an ext4 file) holding a copy of each host path in
/// `sources` (directories with everything under them, regular files),
/// entry N named `N` at the top level, for the container's bind mounts
/// (volumes). Each source is bind-mounted into `staging` for the copy and
/// unmounted after; `staging` is removed. Returns the image's size in bytes.
pub fn build_volumes_image(
    sources: &[PathBuf],
    staging: &Path,
    image: &Path,
) -> Result<u64, RootfsError> {
    std::fs::create_dir_all(staging).map_err(io_at(staging))?;
    let result = (|| {
        let mut mounted = Mounted(Vec::new());
        for (n, source) in sources.iter().enumerate() {
            let target = staging.join(n.to_string());
            let md = std::fs::metadata(source).map_err(io_at(source))?;
            if md.is_dir() {
                std::fs::create_dir(&target).map_err(io_at(&target))?;
            } else {
                std::fs::File::create(&target).map_err(io_at(&target))?;
            }
            let m = Mount {
                type_: "bind".into(),
                source: source.display().to_string(),
                options: vec!["rbind".into(), "ro".into()],
                ..Default::default()
            };
            mount_at(&m, &target, &staging.join(".links"))?;
            mounted.0.push(target);
        }
        image_of(staging, image, mounted)
    })();
    let _ = std::fs::remove_dir_all(staging);
    result
}

/// The image layers under a new container's rootfs: containerd's mounts
/// are one overlay whose upper (writable) directory is still empty. The
/// lower directories, top-most first, as containerd lists them.
pub fn fresh_layers(mounts: &[Mount]) -> Option<Vec<PathBuf>> {
    let [m] = mounts else { return None };
    if m.type_ != "overlay" {
        return None;
    }
    let option = |name: &str| {
        m.options
            .iter()
            .find_map(|o| o.strip_prefix(name)?.strip_prefix('='))
    };
    let upper = Path::new(option("upperdir")?);
    if std::fs::read_dir(upper).ok()?.next().is_some() {
        return None;
    }
    let lowers: Vec<PathBuf> = option("lowerdir")?.split(':').map(PathBuf::from).collect();
    if lowers.iter().any(|l| !l.is_absolute()) {
        return None;
    }
    Some(lowers)
}

/// Makes `image` an empty ext4 file system of `bytes` for a container's
/// writable layer; no image is left on failure.
pub fn build_writable_layer(image: &Path, bytes: u64) -> Result<u64, RootfsError> {
    crate::private::file(image).map_err(io_at(image))?;
    if let Err(e) = make_empty_ext4(image, bytes) {
        let _ = std::fs::remove_file(image);
        return Err(e.into());
    }
    Ok(bytes)
}

/// Read-only ext4 files of images' merged layers, shared by every
/// container of the image in every pod: `<key>.ext4`, with `<key>.layers`
/// naming the snapshot directories it was built from. A snapshot's
/// directory never changes once committed, and containerd does not reuse
/// its number; the key also covers each directory's inode and change
/// time, so a recreated containerd root cannot match an old entry.
/// Entries whose layers are gone (the image was removed) are swept.
pub struct ImageCache {
    dir: PathBuf,
}

/// Distinguishes concurrent builds of one shim.
static BUILDS: AtomicU64 = AtomicU64::new(0);

impl ImageCache {
    /// The cache at `dir` (created when first used).
    pub fn new(dir: &Path) -> ImageCache {
        ImageCache {
            dir: dir.to_path_buf(),
        }
    }

    /// The cache key of a chain of layer directories.
    fn key(lowers: &[PathBuf]) -> Result<String, RootfsError> {
        let mut h = Sha256::new();
        for l in lowers {
            let md = std::fs::metadata(l).map_err(io_at(l))?;
            h.update(l.as_os_str().as_encoded_bytes());
            h.update([0]);
            for n in [
                md.dev(),
                md.ino(),
                md.ctime() as u64,
                md.ctime_nsec() as u64,
            ] {
                h.update(n.to_le_bytes());
            }
        }
        Ok(h.finalize()
            .iter()
            .take(16)
            .map(|b| format!("{b:02x}"))
            .collect())
    }

    /// The image of `lowers` merged (top-most first), built now if the
    /// cache has none, with `staging` (an empty directory) as the mount
    /// point for the copy. Returns the file and its size.
    pub fn layers_image(
        &self,
        lowers: &[PathBuf],
        staging: &Path,
    ) -> Result<(PathBuf, u64), RootfsError> {
        // Made private if missing; an existing cache keeps its mode (the
        // jails' group may read it: jail.rs).
        if !self.dir.is_dir() {
            crate::private::dir(&self.dir).map_err(io_at(&self.dir))?;
        }
        self.sweep();
        let key = Self::key(lowers)?;
        let image = self.dir.join(format!("{key}.ext4"));
        if let Ok(md) = std::fs::metadata(&image) {
            tracing::debug!(image = %image.display(), "image layers from the cache");
            return Ok((image, md.len()));
        }
        let t0 = std::time::Instant::now();
        let list = self.dir.join(format!("{key}.layers"));
        let text: String = lowers
            .iter()
            .map(|l| format!("{}\n", l.display()))
            .collect();
        std::fs::write(&list, text).map_err(io_at(&list))?;
        // Built under a name of its own, then renamed: a concurrent build
        // of the same layers (another pod's shim) is harmless, and no one
        // sees half an image.
        let n = BUILDS.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .dir
            .join(format!("{key}.{}-{n}.tmp", std::process::id()));
        std::fs::create_dir_all(staging).map_err(io_at(staging))?;
        let m = if let [only] = lowers {
            Mount {
                type_: "bind".into(),
                source: only.display().to_string(),
                options: vec!["rbind".into(), "ro".into()],
                ..Default::default()
            }
        } else {
            let joined: Vec<String> = lowers.iter().map(|l| l.display().to_string()).collect();
            Mount {
                type_: "overlay".into(),
                source: "overlay".into(),
                options: vec!["ro".into(), format!("lowerdir={}", joined.join(":"))],
                ..Default::default()
            }
        };
        // Charged to no pod: the cache is the node's, shared by all.
        let size = CopyJob::Tree {
            mounts: vec![MountSpec::of(&m)],
            root: staging.to_path_buf(),
            image: tmp.clone(),
        }
        .run(None)?;
        std::fs::rename(&tmp, &image).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            RootfsError::Io {
                path: image.clone(),
                source: e,
            }
        })?;
        tracing::info!(image = %image.display(), layers = lowers.len(), size, ms = t0.elapsed().as_millis() as u64, "image layers cached");
        Ok((image, size))
    }

    /// Removes entries whose layers are gone and builds that died.
    fn sweep(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(key) = name.strip_suffix(".layers") {
                let layers = std::fs::read_to_string(&path).unwrap_or_default();
                if layers.lines().any(|l| !Path::new(l).exists()) {
                    let _ = std::fs::remove_file(self.dir.join(format!("{key}.ext4")));
                    let _ = std::fs::remove_file(&path);
                    tracing::info!(key, "image layers gone: cache entry removed");
                }
            } else if let Some(stem) = name.strip_suffix(".tmp") {
                // <key>.<pid>-<n>.tmp of a shim that is no longer running.
                let pid = stem
                    .rsplit_once('.')
                    .and_then(|(_, p)| p.split_once('-'))
                    .map(|(pid, _)| pid);
                if let Some(pid) = pid {
                    if !Path::new("/proc").join(pid).exists() {
                        let _ = std::fs::remove_file(&path);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Host directories and files become entries 0, 1, ... of one image;
    /// nothing stays mounted and the staging directory goes.
    #[test]
    fn volumes_are_copied_into_one_image() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(data.join("sub")).unwrap();
        std::fs::write(data.join("sub/f"), "in a volume\n").unwrap();
        let hosts = dir.path().join("hosts");
        std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
        let staging = dir.path().join("staging");
        let image = dir.path().join("v.ext4");
        build_volumes_image(&[data.clone(), hosts], &staging, &image).unwrap();
        // Copies of Secret volumes are in it: the owner's alone.
        let mode = std::fs::metadata(&image).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, crate::private::FILE_MODE);
        let cat = |path: &str| {
            let out = std::process::Command::new("debugfs")
                .args(["-R", &format!("cat {path}")])
                .arg(&image)
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        assert_eq!(cat("/0/sub/f"), "in a volume\n");
        assert_eq!(cat("/1"), "127.0.0.1 localhost\n");
        assert!(!staging.exists());
        // The sources are untouched.
        assert!(data.join("sub/f").exists());

        let missing = build_volumes_image(&[dir.path().join("nope")], &staging, &image);
        assert!(
            matches!(missing, Err(RootfsError::Io { .. })),
            "{missing:?}"
        );
        assert!(!staging.exists());
    }

    /// A tree with no mounts (the `--rootfs` case) becomes an ext4 image
    /// holding its files; needs mke2fs and debugfs (e2fsprogs).
    #[test]
    fn a_plain_tree_becomes_an_ext4_image() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("rootfs");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/hostname"), "pod\n").unwrap();
        let image = dir.path().join("c1.ext4");
        let size = build_image(&[], &root, &image).unwrap();
        assert_eq!(size % (1 << 20), 0);
        let out = std::process::Command::new("debugfs")
            .args(["-R", "cat /etc/hostname"])
            .arg(&image)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "pod\n");
    }

    /// containerd's mounts are mounted for the copy and unmounted after:
    /// a read-only bind mount stands in for a snapshot here.
    #[test]
    fn mounts_are_copied_and_unmounted() {
        let dir = tempfile::tempdir().unwrap();
        let snapshot = dir.path().join("snapshot");
        std::fs::create_dir_all(snapshot.join("bin")).unwrap();
        std::fs::write(snapshot.join("bin/hello"), "hi\n").unwrap();
        let root = dir.path().join("rootfs");
        let image = dir.path().join("c1.ext4");
        let m = Mount {
            type_: "bind".into(),
            source: snapshot.display().to_string(),
            options: vec!["rbind".into(), "ro".into()],
            ..Default::default()
        };
        build_image(&[m], &root, &image).unwrap();
        let out = std::process::Command::new("debugfs")
            .args(["-R", "cat /bin/hello"])
            .arg(&image)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
        // Unmounted: the bundle's rootfs is an empty directory again.
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
    }

    #[test]
    fn a_bad_mount_is_a_clear_error_and_leaves_no_image() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("rootfs");
        let image = dir.path().join("c1.ext4");
        let m = Mount {
            type_: "no-such-fs".into(),
            source: "none".into(),
            ..Default::default()
        };
        let e = build_image(&[m], &root, &image).unwrap_err();
        assert!(matches!(e, RootfsError::Mount { .. }), "{e}");
        assert!(!image.exists());
    }
    fn overlay(options: &[String]) -> Mount {
        Mount {
            type_: "overlay".into(),
            source: "overlay".into(),
            options: options.to_vec(),
            ..Default::default()
        }
    }

    /// Only a new container's overlay (its upper directory empty) is taken
    /// apart into layers; anything else is copied whole.
    #[test]
    fn fresh_layers_only_of_a_new_containers_overlay() {
        let dir = tempfile::tempdir().unwrap();
        let d = |n: &str| {
            let p = dir.path().join(n);
            std::fs::create_dir_all(&p).unwrap();
            p.display().to_string()
        };
        let (l1, l2, upper, work) = (d("1/fs"), d("2/fs"), d("3/fs"), d("3/work"));
        let opts = |upper: &str| {
            vec![
                "index=off".to_string(),
                format!("workdir={work}"),
                format!("upperdir={upper}"),
                format!("lowerdir={l2}:{l1}"),
            ]
        };
        assert_eq!(
            fresh_layers(&[overlay(&opts(&upper))]),
            Some(vec![PathBuf::from(&l2), PathBuf::from(&l1)])
        );
        // Written to already (a restarted container's snapshot).
        std::fs::write(Path::new(&upper).join("f"), "x").unwrap();
        assert_eq!(fresh_layers(&[overlay(&opts(&upper))]), None);
        let empty = d("4/fs");
        // Two mounts, a bind, no lowerdir, a relative layer: not ours.
        let m = overlay(&opts(&empty));
        assert_eq!(fresh_layers(&[m.clone(), m]), None);
        let bind = Mount {
            type_: "bind".into(),
            source: l1.clone(),
            options: vec!["rbind".into()],
            ..Default::default()
        };
        assert_eq!(fresh_layers(&[bind]), None);
        assert_eq!(
            fresh_layers(&[overlay(&[format!("upperdir={empty}")])]),
            None
        );
        let relative = vec![format!("upperdir={empty}"), "lowerdir=a:b".to_string()];
        assert_eq!(fresh_layers(&[overlay(&relative)]), None);
        assert_eq!(fresh_layers(&[]), None);
    }

    /// Layers merged as overlayfs merges them (the top one wins, a
    /// whiteout hides a file), built once, reused, swept when a layer goes.
    #[test]
    fn image_layers_are_merged_cached_and_swept() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("snapshots/1/fs");
        let top = dir.path().join("snapshots/2/fs");
        std::fs::create_dir_all(base.join("etc")).unwrap();
        std::fs::create_dir_all(top.join("etc")).unwrap();
        std::fs::write(base.join("etc/os"), "base\n").unwrap();
        std::fs::write(base.join("etc/gone"), "deleted above\n").unwrap();
        std::fs::write(top.join("etc/os"), "top\n").unwrap();
        // An overlay whiteout: a 0/0 character device.
        let gone =
            std::ffi::CString::new(top.join("etc/gone").as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path; mknod only reads it.
        assert_eq!(unsafe { libc::mknod(gone.as_ptr(), libc::S_IFCHR, 0) }, 0);
        let cache = ImageCache::new(&dir.path().join("cache"));
        let staging = dir.path().join("rootfs");
        let lowers = vec![top.clone(), base.clone()];
        let (image, size) = cache.layers_image(&lowers, &staging).unwrap();
        assert_eq!(size, std::fs::metadata(&image).unwrap().len());
        let debugfs = |cmd: &str| {
            let out = std::process::Command::new("debugfs")
                .args(["-R", cmd])
                .arg(&image)
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr)
        };
        assert!(debugfs("cat /etc/os").contains("top\n"));
        assert!(debugfs("stat /etc/gone").contains("File not found"));
        // Unmounted after the copy.
        assert_eq!(std::fs::read_dir(&staging).unwrap().count(), 0);

        // The same layers again: the same file, not rebuilt.
        let inode = std::fs::metadata(&image).unwrap().ino();
        let (again, _) = cache.layers_image(&lowers, &staging).unwrap();
        assert_eq!(again, image);
        assert_eq!(std::fs::metadata(&again).unwrap().ino(), inode);
        // One layer alone (a bind mount, not an overlay) is another entry.
        let (alone, _) = cache
            .layers_image(std::slice::from_ref(&base), &staging)
            .unwrap();
        assert_ne!(alone, image);

        // The top layer removed (its image deleted): its entry goes at the
        // next use of the cache, the other stays.
        std::fs::remove_dir_all(dir.path().join("snapshots/2")).unwrap();
        let err = cache.layers_image(&lowers, &staging).unwrap_err();
        assert!(matches!(err, RootfsError::Io { .. }), "{err}");
        assert!(!image.exists());
        assert!(alone.exists());
        let names: Vec<String> = std::fs::read_dir(dir.path().join("cache"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    /// A writable layer is an empty ext4 of the size asked for, sparse.
    #[test]
    fn a_writable_layer_is_an_empty_sparse_ext4() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("w.ext4");
        assert_eq!(build_writable_layer(&image, 1 << 30).unwrap(), 1 << 30);
        let md = std::fs::metadata(&image).unwrap();
        assert_eq!(md.len(), 1 << 30);
        assert_eq!(md.permissions().mode() & 0o777, crate::private::FILE_MODE);
        assert!(
            md.blocks() * 512 < 4 << 20,
            "{} bytes written",
            md.blocks() * 512
        );
        let out = std::process::Command::new("debugfs")
            .args(["-R", "ls -l /"])
            .arg(&image)
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("lost+found"));
        let bad = build_writable_layer(&dir.path().join("no/such/dir/w.ext4"), 1 << 30);
        assert!(matches!(bad, Err(RootfsError::Io { .. })), "{bad:?}");
    }
}
