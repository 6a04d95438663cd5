//! From an OCI image to the ext4 file a guest mounts as a container's root:
//! resolve the image, unpack its layers into a scratch directory, size a
//! file from the tree and fill it with `mke2fs -t ext4 -d DIR`. Results are
//! cached by manifest digest (`$HUSK_CACHE_DIR/rootfs/v1/<hex>.ext4`, default
//! cache `/var/cache/husk`), built under a temporary name in the same
//! directory and renamed into place, so a second run of the same image only
//! reads the manifest, and concurrent builds never see a half-written file.
//!
//! The cached file is shared: attach it read-only (an overlay in the guest
//! takes the writes), or ask for a private copy with `out`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

use super::layers::{self, LayerError};
use super::oci::{
    digest_hex, split_image_arg, ImageConfig, Layout, OciError, Platform, ResolvedImage,
};

/// Errors building a root filesystem image.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// Reading the image failed.
    #[error(transparent)]
    Oci(#[from] OciError),
    /// Unpacking a layer failed.
    #[error(transparent)]
    Layer(#[from] LayerError),
    /// A file or directory of the cache or the output could not be made.
    #[error("cannot write {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The bundled busybox image could not be built.
    #[error(transparent)]
    Busybox(#[from] super::busybox::BusyboxError),
    /// mke2fs could not be started.
    #[error("cannot run {program} for {path}")]
    Mke2fsRun {
        /// The mke2fs binary.
        program: PathBuf,
        /// The image being made.
        path: PathBuf,
        /// Why it did not start.
        source: io::Error,
    },
    /// mke2fs failed.
    #[error("mke2fs failed for {path}: {status}: {stderr}")]
    Mke2fs {
        /// The image being made.
        path: PathBuf,
        /// How it ended.
        status: std::process::ExitStatus,
        /// What it said.
        stderr: String,
    },
}

type Result<T> = std::result::Result<T, RootfsError>;

/// Bumped when the conversion changes, so old cache entries are not reused.
const CACHE_VERSION: &str = "v1";
/// Free space added on top of the tree: 20% plus this.
const HEADROOM_BYTES: u64 = 64 << 20;
/// ext4 block size we build with.
const BLOCK: u64 = 4096;

/// How to build.
#[derive(Debug, Clone)]
pub struct RootfsOptions {
    /// Which image of a multi-platform index.
    pub platform: Platform,
    /// Cache root (the image goes to `<cache_dir>/rootfs/v1/`).
    pub cache_dir: PathBuf,
    /// Also copy the image here (a private, writable copy).
    pub out: Option<PathBuf>,
}

impl Default for RootfsOptions {
    fn default() -> Self {
        RootfsOptions {
            platform: Platform::host(),
            cache_dir: cache_dir(),
            out: None,
        }
    }
}

/// The result, as `husk image rootfs` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct Rootfs {
    /// The ext4 image: the cached file, or `out` when given.
    pub rootfs: PathBuf,
    /// `sha256:...` of the image manifest.
    pub manifest_digest: String,
    /// How the image wants to be run.
    pub config: ImageConfig,
    /// Size of the ext4 file.
    pub size_bytes: u64,
    /// Whether the cache already held it.
    pub cached: bool,
}

/// `$HUSK_CACHE_DIR`, or `/var/cache/husk`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("HUSK_CACHE_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/husk"))
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> RootfsError + '_ {
    move |source| RootfsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What `husk run [IMAGE]` needs: the root filesystem of `image`, or of the
/// bundled busybox image (built into the cache from /bin/busybox on first
/// use) when there is none.
pub fn rootfs_for(image: Option<&str>, opts: &RootfsOptions) -> Result<Rootfs> {
    match image {
        Some(image) => build_rootfs(image, opts),
        None => {
            let busybox = Path::new(super::busybox::DEFAULT_BUSYBOX);
            let layout = super::busybox::default_image(&opts.cache_dir, busybox)?;
            build_rootfs(&layout.to_string_lossy(), opts)
        }
    }
}

/// Builds (or finds in the cache) the ext4 root filesystem of `image`:
/// `PATH` or `PATH:REF`, where PATH is an OCI layout directory or a tar of
/// one.
pub fn build_rootfs(image: &str, opts: &RootfsOptions) -> Result<Rootfs> {
    let (path, wanted) = split_image_arg(image);
    let layout = Layout::open(&path)?;
    let resolved = layout.resolve(wanted.as_deref(), &opts.platform)?;
    rootfs_of(&layout, resolved, opts)
}

/// Builds (or finds in the cache) the ext4 root filesystem of an image
/// already resolved in `layout`: a local layout, or the registry cache's.
pub fn rootfs_of(layout: &Layout, resolved: ResolvedImage, opts: &RootfsOptions) -> Result<Rootfs> {
    let hex = digest_hex(&resolved.manifest_digest)?;
    let dir = opts.cache_dir.join("rootfs").join(CACHE_VERSION);
    fs::create_dir_all(&dir).map_err(io_at(&dir))?;
    let cached_file = dir.join(format!("{hex}.ext4"));
    let cached = cached_file.is_file();
    if cached {
        tracing::debug!(path = %cached_file.display(), "rootfs cache hit");
    } else {
        build_into_cache(layout, &resolved.manifest.layers, &dir, &cached_file)?;
    }
    let result_path = match &opts.out {
        Some(out) => {
            sparse_copy(&cached_file, out).map_err(io_at(out))?;
            out.clone()
        }
        None => cached_file,
    };
    let size_bytes = fs::metadata(&result_path)
        .map_err(io_at(&result_path))?
        .len();
    Ok(Rootfs {
        rootfs: result_path,
        manifest_digest: resolved.manifest_digest,
        config: resolved.config,
        size_bytes,
        cached,
    })
}

/// Copies `src` to `dst` keeping its holes (SEEK_DATA/SEEK_HOLE): a fresh
/// ext4 image is mostly holes (the busybox one: 6 MiB of data in 68 MiB).
fn sparse_copy(src: &Path, dst: &Path) -> io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::fd::AsRawFd;
    let mut from = fs::File::open(src)?;
    let len = from.metadata()?.len();
    let end = libc::off_t::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file too large"))?;
    let mut to = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(dst)?;
    to.set_len(len)?;
    let fd = from.as_raw_fd();
    let mut pos: libc::off_t = 0;
    while pos < end {
        // SAFETY: lseek on a descriptor we own; it only moves the offset.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole is left
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let (start, stop) = (data.unsigned_abs(), hole.unsigned_abs());
        from.seek(SeekFrom::Start(start))?;
        to.seek(SeekFrom::Start(start))?;
        io::copy(&mut (&mut from).take(stop.saturating_sub(start)), &mut to)?;
        pos = hole.max(data.saturating_add(1));
    }
    Ok(())
}

fn build_into_cache(
    layout: &Layout,
    layers: &[super::oci::Descriptor],
    dir: &Path,
    dest: &Path,
) -> Result<()> {
    let tree = tempfile::Builder::new()
        .prefix(".unpack-")
        .tempdir_in(dir)
        .map_err(io_at(dir))?;
    // The scratch directory stays 0700: the image's setuid files and
    // device nodes are never reachable by other users of the host while
    // they sit here. The tree itself (0755) is one level down.
    let root = tree.path().join("rootfs");
    fs::create_dir(&root).map_err(io_at(&root))?;
    let stats = layers::unpack(layout, layers, &root)?;
    let usage = disk_usage(&root).map_err(io_at(&root))?;
    tracing::debug!(?stats, ?usage, "layers unpacked");
    let image = tempfile::Builder::new()
        .prefix(".build-")
        .suffix(".ext4")
        .tempfile_in(dir)
        .map_err(io_at(dir))?;
    make_ext4(&root, image.path(), &usage)?;
    image.persist(dest).map_err(|e| RootfsError::Io {
        path: dest.to_path_buf(),
        source: e.error,
    })?;
    Ok(())
}

/// What a tree needs on ext4.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Bytes of data blocks (files rounded up to blocks, a block per directory).
    pub bytes: u64,
    /// Inodes (every entry, plus the root).
    pub inodes: u64,
}

impl Usage {
    /// Image size: 20% and 64 MiB over the data and inode tables, rounded
    /// up to 1 MiB.
    pub fn image_size(&self) -> u64 {
        let base = self.bytes.saturating_add(self.inodes.saturating_mul(256));
        let size = base.saturating_add(base / 5).saturating_add(HEADROOM_BYTES);
        size.div_ceil(1 << 20).saturating_mul(1 << 20)
    }

    /// Inodes to ask mke2fs for: twice those used, at least 16384.
    pub fn inode_count(&self) -> u64 {
        self.inodes.saturating_mul(2).max(16384)
    }
}

/// Sums what a directory tree needs, without following symlinks.
pub fn disk_usage(root: &Path) -> io::Result<Usage> {
    let mut usage = Usage {
        bytes: BLOCK,
        inodes: 1,
    };
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let meta = fs::symlink_metadata(entry.path())?;
            usage.inodes += 1;
            let data = if meta.is_dir() {
                stack.push(entry.path());
                BLOCK
            } else if meta.is_file() || meta.file_type().is_symlink() {
                // Short symlinks live in the inode; the rounding covers it.
                meta.len().div_ceil(BLOCK).saturating_mul(BLOCK)
            } else {
                0
            };
            usage.bytes = usage.bytes.saturating_add(data);
        }
    }
    Ok(usage)
}

fn find_mke2fs() -> PathBuf {
    for dir in ["/usr/sbin", "/sbin"] {
        let p = Path::new(dir).join("mke2fs");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("mke2fs")
}

/// Makes `image` an ext4 file system holding `tree`.
pub fn make_ext4(tree: &Path, image: &Path, usage: &Usage) -> Result<()> {
    let mut args: Vec<std::ffi::OsString> = vec!["-L".into(), "rootfs".into(), "-N".into()];
    args.push(usage.inode_count().to_string().into());
    args.push("-d".into());
    args.push(tree.into());
    mke2fs(image, usage.image_size(), &args)
}

/// Makes `image` (a sparse file of `bytes`) an empty ext4 file system for
/// a container's writable layer: no journal (the layer does not outlive
/// its container, so there is nothing to recover), inode tables left for
/// the kernel (they read as zeros in a fresh sparse file), so only a few
/// hundred KiB are written whatever the size.
pub fn make_empty_ext4(image: &Path, bytes: u64) -> Result<()> {
    let args = [
        "-L",
        "writable",
        "-O",
        "^has_journal",
        "-E",
        "lazy_itable_init=1",
    ];
    mke2fs(image, bytes, &args.map(std::ffi::OsString::from))
}

/// Sizes the existing file `image` to `bytes` and runs mke2fs on it with
/// the common options and `args`.
fn mke2fs(image: &Path, bytes: u64, args: &[std::ffi::OsString]) -> Result<()> {
    let file = fs::OpenOptions::new()
        .write(true)
        .open(image)
        .map_err(io_at(image))?;
    file.set_len(bytes).map_err(io_at(image))?;
    drop(file);
    let mke2fs = find_mke2fs();
    let out = Command::new(&mke2fs)
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0"])
        .args(args)
        .arg(image)
        .output()
        .map_err(|source| RootfsError::Mke2fsRun {
            program: mke2fs.clone(),
            path: image.to_path_buf(),
            source,
        })?;
    if !out.status.success() {
        return Err(RootfsError::Mke2fs {
            path: image.to_path_buf(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::write_image;
    use crate::writer::LayerBuilder;

    /// Runs a debugfs request against an ext4 image.
    pub(crate) fn debugfs(image: &Path, request: &str) -> String {
        let out = Command::new("debugfs")
            .args(["-R", request])
            .arg(image)
            .output()
            .expect("debugfs (e2fsprogs) runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn three_layers_to_cached_ext4() {
        let (img, cache, out) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        let mut l1 = LayerBuilder::new();
        l1.dir("etc", 0o755).unwrap();
        l1.file("etc/keep", 0o644, b"kept\n").unwrap();
        l1.file("etc/secret", 0o600, b"deleted later\n").unwrap();
        l1.dir("app", 0o755).unwrap();
        l1.file("app/v1", 0o644, b"old\n").unwrap();
        l1.dir("app/lib", 0o755).unwrap();
        l1.file("app/lib/old.so", 0o644, b"old\n").unwrap();
        let mut l2 = LayerBuilder::new();
        l2.whiteout("etc/secret").unwrap();
        l2.dir("app", 0o755).unwrap();
        l2.opaque("app").unwrap();
        l2.file("app/v2", 0o755, b"new\n").unwrap();
        let mut l3 = LayerBuilder::new();
        l3.owner(1000, 1000);
        l3.dir("home", 0o755).unwrap();
        l3.xattr("user.husk", b"kept").unwrap();
        l3.file("home/data", 0o640, b"data\n").unwrap();
        l3.hardlink("home/data-link", "home/data").unwrap();
        l3.symlink("home/etc-link", "/etc/keep").unwrap();
        let desc = write_image(img.path(), vec![(l1, true), (l2, false), (l3, true)]);
        let opts = RootfsOptions {
            cache_dir: cache.path().into(),
            ..RootfsOptions::default()
        };
        let arg = format!("{}:test:latest", img.path().display());
        let first = build_rootfs(&arg, &opts).unwrap();
        assert!(!first.cached);
        assert_eq!(first.manifest_digest, desc.digest);
        assert_eq!(first.config.cmd, ["sh"]);
        assert!(first.rootfs.starts_with(cache.path().join("rootfs/v1")));
        assert!(first.size_bytes >= 64 << 20);
        let f = &first.rootfs;
        assert_eq!(debugfs(f, "cat /etc/keep"), "kept\n");
        let etc = debugfs(f, "ls /etc");
        assert!(etc.contains("keep") && !etc.contains("secret"), "{etc}");
        let app = debugfs(f, "ls /app");
        assert!(
            app.contains("v2") && !app.contains("v1") && !app.contains("lib"),
            "{app}"
        );
        assert_eq!(debugfs(f, "cat /app/v2"), "new\n");
        let home = debugfs(f, "ls -l /home");
        assert!(home.contains("etc-link"), "{home}");
        let stat = debugfs(f, "stat /home/data");
        assert!(stat.contains("Links: 2"), "{stat}");
        assert!(stat.contains("Mode:  0640"), "{stat}");
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert!(stat.contains("User:  1000   Group:  1000"), "{stat}");
        }
        assert!(debugfs(f, "stat /home/etc-link").contains("Fast link dest: \"/etc/keep\""));
        let ea = debugfs(f, "ea_list /home/data");
        assert!(ea.contains("user.husk") && ea.contains("kept"), "{ea}");
        // No scratch files left in the cache.
        let entries: Vec<_> = fs::read_dir(cache.path().join("rootfs/v1"))
            .unwrap()
            .collect();
        assert_eq!(entries.len(), 1);

        let second = build_rootfs(&arg, &opts).unwrap();
        assert!(second.cached);
        assert_eq!(second.rootfs, first.rootfs);

        let copy = out.path().join("private.ext4");
        let third = build_rootfs(
            &arg,
            &RootfsOptions {
                out: Some(copy.clone()),
                ..opts
            },
        )
        .unwrap();
        assert!(third.cached);
        assert_eq!(third.rootfs, copy);
        assert_eq!(debugfs(&copy, "cat /app/v2"), "new\n");
        assert_eq!(fs::read(&copy).unwrap(), fs::read(&first.rootfs).unwrap());
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(&copy).unwrap();
        assert!(m.blocks() * 512 < m.len() / 2, "copy is not sparse");
    }

    #[test]
    fn sizing_leaves_headroom() {
        let u = Usage {
            bytes: 100 << 20,
            inodes: 1000,
        };
        assert!(u.image_size() >= (120 << 20) + HEADROOM_BYTES);
        assert_eq!(u.image_size() % (1 << 20), 0);
        assert_eq!(u.inode_count(), 16384);
        let tree = tempfile::tempdir().unwrap();
        fs::write(tree.path().join("f"), [0u8; 5000]).unwrap();
        fs::create_dir(tree.path().join("d")).unwrap();
        let u = disk_usage(tree.path()).unwrap();
        assert_eq!(
            u,
            Usage {
                bytes: 4096 * 4,
                inodes: 3
            }
        );
    }
}
