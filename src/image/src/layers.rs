//! Applying image layers, bottom first, into a directory: the union a
//! container sees. A layer is a tar (plain or gzip); `.wh.NAME` deletes NAME
//! from the layers below, `.wh..wh..opq` empties its directory of what the
//! layers below put there. Entries keep mode, owner (when we run as root),
//! mtime, symlink targets, hard links and extended attributes; device nodes
//! are made only as root (skipped with a warning otherwise).
//!
//! Nothing a layer says can reach outside the root directory: names with `..`
//! are refused, and paths are resolved one component at a time with `lstat`,
//! symlinks met on the way being followed *inside* the root as if it were
//! `/` (what containerd does), so `a -> /etc` then `a/passwd` writes
//! `ROOT/etc/passwd`. The last component is never followed: it is removed and
//! created anew (`O_CREAT|O_EXCL|O_NOFOLLOW`, `symlink`, `mknod`, `linkat`
//! without `AT_SYMLINK_FOLLOW`).

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, OpenOptions};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::oci::{Descriptor, Layout, OciError};

/// Errors applying layers.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// A file system operation in the target failed.
    #[error("cannot write {path}")]
    Io {
        /// The path in the target.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The layer's tar stream is corrupt, or its blob fails verification.
    #[error("cannot read layer {digest}")]
    Read {
        /// The layer.
        digest: String,
        /// The cause.
        source: io::Error,
    },
    /// An entry name or link target climbs out with `..`.
    #[error("layer entry {0:?} has a '..' component")]
    UnsafePath(String),
    /// A path's parent is an existing non-directory.
    #[error("layer entry {0:?}: a parent is not a directory")]
    NotADirectory(String),
    /// Symlinks nest too deep while resolving a path.
    #[error("layer entry {0:?}: too many levels of symbolic links")]
    SymlinkLoop(String),
    /// A hard link's target is missing or a directory.
    #[error("hard link {path:?}: target {target:?} is missing or a directory")]
    HardLinkTarget {
        /// The link.
        path: String,
        /// Its target.
        target: String,
    },
    /// The layer's media type or compression is not one we read.
    #[error("layer {digest}: unsupported {what}")]
    Unsupported {
        /// The layer.
        digest: String,
        /// What.
        what: String,
    },
    /// Reading or verifying the blob failed.
    #[error(transparent)]
    Blob(#[from] OciError),
}

type Result<T> = std::result::Result<T, LayerError>;

/// Symlinks followed per path, as Linux's MAXSYMLINKS.
const MAX_SYMLINKS: usize = 40;

/// Owner, mode and mtime of a directory, applied after all layers (adding
/// entries changes a directory's mtime, and a read-only mode would stop us).
#[derive(Clone, Copy)]
struct DirMeta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: u64,
}

/// IDs beyond 32 bits (tar allows them, Linux does not) become nobody.
const OVERFLOW_ID: u32 = 65534;

/// What applying layers did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UnpackStats {
    /// Entries written (files, dirs, links, nodes).
    pub entries: u64,
    /// Whiteouts and opaque markers applied.
    pub whiteouts: u64,
    /// Entries skipped (device nodes when not root, unknown types).
    pub skipped: u64,
}

/// Applies layers into one root directory.
pub struct Unpacker {
    root: PathBuf,
    as_root: bool,
    dirs: BTreeMap<PathBuf, DirMeta>,
    stats: UnpackStats,
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> LayerError + '_ {
    move |source| LayerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The components of an entry name, refusing `..`; `/` and `.` are dropped.
fn entry_components(path: &Path) -> Result<Vec<OsString>> {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n.to_os_string()),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(LayerError::UnsafePath(path.display().to_string()))
            }
        }
    }
    Ok(out)
}

fn lstat(path: &Path) -> io::Result<Option<fs::Metadata>> {
    match fs::symlink_metadata(path) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

/// Sets atime and mtime of `path` itself (never a symlink's target).
fn set_mtime_nofollow(path: &Path, mtime: u64) -> io::Result<()> {
    let c = cstring(path)?;
    let secs = libc::time_t::try_from(mtime).unwrap_or(libc::time_t::MAX);
    let ts = [libc::timespec {
        tv_sec: secs,
        tv_nsec: 0,
    }; 2];
    // SAFETY: `c` is a NUL-terminated path and `ts` two valid timespecs, both
    // alive for the call; the kernel only reads them.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn lsetxattr(path: &Path, name: &[u8], value: &[u8]) -> io::Result<()> {
    let c = cstring(path)?;
    let n = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in xattr name"))?;
    // SAFETY: both strings are NUL-terminated and `value` is a valid slice,
    // all alive for the call; the kernel only reads them.
    let rc = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn mknod(path: &Path, mode: libc::mode_t, dev: libc::dev_t) -> io::Result<()> {
    let c = cstring(path)?;
    // SAFETY: `c` is a NUL-terminated path alive for the call.
    let rc = unsafe { libc::mknod(c.as_ptr(), mode, dev) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Removes whatever is at `path` (a directory with its contents), never
/// following a symlink.
fn remove_any(path: &Path) -> io::Result<()> {
    match lstat(path)? {
        Some(m) if m.is_dir() => fs::remove_dir_all(path),
        Some(_) => fs::remove_file(path),
        None => Ok(()),
    }
}

impl Unpacker {
    /// Unpacks into `root`, an existing (normally empty) directory.
    pub fn new(root: &Path) -> Result<Unpacker> {
        fs::set_permissions(root, fs::Permissions::from_mode(0o755)).map_err(io_at(root))?;
        Ok(Unpacker {
            root: root.to_path_buf(),
            // SAFETY: geteuid has no preconditions.
            as_root: unsafe { libc::geteuid() } == 0,
            dirs: BTreeMap::new(),
            stats: UnpackStats::default(),
        })
    }

    /// Resolves a directory path inside the root: each component is
    /// `lstat`ed; symlinks are followed with the root as `/`; missing
    /// directories are created (`create`) or end the walk with `None`.
    /// Returns the path relative to the root, made of real directories only.
    fn resolve_dir(&self, comps: &[OsString], create: bool, name: &str) -> Result<Option<PathBuf>> {
        let mut pending: VecDeque<OsString> = comps.iter().cloned().collect();
        let mut real: Vec<OsString> = Vec::new();
        let mut links = 0;
        while let Some(c) = pending.pop_front() {
            if c == ".." {
                real.pop();
                continue;
            }
            if c == "." || c.is_empty() {
                continue;
            }
            let mut full = self.root.clone();
            full.extend(&real);
            full.push(&c);
            match lstat(&full).map_err(io_at(&full))? {
                Some(m) if m.is_dir() => real.push(c),
                Some(m) if m.file_type().is_symlink() => {
                    links += 1;
                    if links > MAX_SYMLINKS {
                        return Err(LayerError::SymlinkLoop(name.into()));
                    }
                    let target = fs::read_link(&full).map_err(io_at(&full))?;
                    let mut spliced = VecDeque::new();
                    for tc in target.components() {
                        match tc {
                            Component::RootDir => real.clear(),
                            Component::ParentDir => spliced.push_back(OsString::from("..")),
                            Component::Normal(n) => spliced.push_back(n.to_os_string()),
                            Component::CurDir | Component::Prefix(_) => {}
                        }
                    }
                    spliced.extend(pending);
                    pending = spliced;
                }
                Some(_) => return Err(LayerError::NotADirectory(name.into())),
                None if create => {
                    fs::create_dir(&full).map_err(io_at(&full))?;
                    fs::set_permissions(&full, fs::Permissions::from_mode(0o755))
                        .map_err(io_at(&full))?;
                    real.push(c);
                }
                None => return Ok(None),
            }
        }
        Ok(Some(real.iter().collect()))
    }

    /// Forgets deferred directory metadata at and below `rel` (removed).
    fn forget_dirs(&mut self, rel: &Path) {
        self.dirs.retain(|k, _| !k.starts_with(rel));
    }

    /// Removes `rel` unless this layer created it.
    fn whiteout(&mut self, rel: &Path, created: &HashSet<PathBuf>) -> Result<()> {
        if created.contains(rel) {
            return Ok(());
        }
        let full = self.root.join(rel);
        remove_any(&full).map_err(io_at(&full))?;
        self.forget_dirs(rel);
        self.stats.whiteouts += 1;
        Ok(())
    }

    /// Empties directory `rel` of everything this layer did not create.
    fn opaque(&mut self, rel: &Path, created: &HashSet<PathBuf>) -> Result<()> {
        let full = self.root.join(rel);
        for child in fs::read_dir(&full).map_err(io_at(&full))? {
            let child = child.map_err(io_at(&full))?;
            let child_rel = rel.join(child.file_name());
            if !created.contains(&child_rel) {
                let p = child.path();
                remove_any(&p).map_err(io_at(&p))?;
                self.forget_dirs(&child_rel);
            }
        }
        self.stats.whiteouts += 1;
        Ok(())
    }

    /// Applies one layer blob: verifies it, decompresses it, unpacks it.
    pub fn apply_blob(&mut self, layout: &Layout, desc: &Descriptor) -> Result<()> {
        let unsupported = |what: String| LayerError::Unsupported {
            digest: desc.digest.clone(),
            what,
        };
        let mt = desc.media_type.as_str();
        if !(mt.contains(".layer.") || mt.contains("rootfs.diff")) || !mt.contains("tar") {
            return Err(unsupported(format!("media type {mt:?}")));
        }
        let mut reader = BufReader::with_capacity(256 << 10, layout.blob(desc)?);
        let head = match reader.fill_buf() {
            Ok(head) => head,
            Err(e) => return Err(reader.get_ref().error_from(e).into()),
        };
        let magic: [u8; 4] = head
            .get(..4)
            .and_then(|h| h.try_into().ok())
            .unwrap_or_default();
        if magic == [0x28, 0xb5, 0x2f, 0xfd] {
            return Err(unsupported("compression zstd".into()));
        }
        if magic[..2] == [0x1f, 0x8b] {
            // Multi: a gzip stream may be several concatenated members.
            let mut gz = flate2::bufread::MultiGzDecoder::new(reader);
            let applied = self.apply_tar_of(&mut gz, &desc.digest);
            // Read any tail so the whole blob is hashed before judging it.
            let drained = io::copy(&mut gz, &mut io::sink());
            let blob = gz.into_inner().into_inner();
            return finish_layer(blob, applied, drained, &desc.digest);
        }
        let applied = self.apply_tar_of(&mut reader, &desc.digest);
        let drained = io::copy(&mut reader, &mut io::sink());
        finish_layer(reader.into_inner(), applied, drained, &desc.digest)
    }

    /// Unpacks one uncompressed layer tar stream.
    #[cfg_attr(not(test), allow(dead_code))] // layers come as blobs outside tests
    pub fn apply_tar<R: Read>(&mut self, reader: R) -> Result<()> {
        self.apply_tar_of(reader, "<tar>")
    }

    /// Unpacks the uncompressed tar stream of layer `digest`.
    fn apply_tar_of<R: Read>(&mut self, reader: R, digest: &str) -> Result<()> {
        let mut archive = tar::Archive::new(reader);
        let mut created: HashSet<PathBuf> = HashSet::new();
        let tar_err = |source| LayerError::Read {
            digest: digest.into(),
            source,
        };
        for entry in archive.entries().map_err(tar_err)? {
            let mut entry = entry.map_err(tar_err)?;
            let path = entry.path().map_err(tar_err)?.into_owned();
            let name = path.display().to_string();
            let comps = entry_components(&path)?;
            let kind = entry.header().entry_type();
            let Some((last, parents)) = comps.split_last() else {
                // The root itself ("./").
                if kind.is_dir() {
                    let meta = self.meta_of(&entry);
                    self.dirs.insert(PathBuf::new(), meta);
                }
                continue;
            };
            let last_bytes = last.as_bytes();
            if let Some(target) = last_bytes.strip_prefix(b".wh.") {
                let Some(parent) = self.resolve_dir(parents, false, &name)? else {
                    continue;
                };
                if target == b"." || target == b".." {
                    return Err(LayerError::UnsafePath(name));
                }
                if target == b".wh..opq" {
                    self.opaque(&parent, &created)?;
                } else if target.starts_with(b".wh.") || target.is_empty() {
                    // aufs bookkeeping (.wh..wh.plnk etc.): not content.
                    self.stats.skipped += 1;
                } else {
                    self.whiteout(&parent.join(OsStr::from_bytes(target)), &created)?;
                }
                continue;
            }
            let parent = self
                .resolve_dir(parents, true, &name)?
                .ok_or_else(|| LayerError::NotADirectory(name.clone()))?;
            let rel = parent.join(last);
            let full = self.root.join(&rel);
            let meta = self.meta_of(&entry);
            let made = match kind {
                tar::EntryType::Directory => {
                    match lstat(&full).map_err(io_at(&full))? {
                        Some(m) if m.is_dir() => {}
                        other => {
                            if other.is_some() {
                                remove_any(&full).map_err(io_at(&full))?;
                            }
                            fs::create_dir(&full).map_err(io_at(&full))?;
                            fs::set_permissions(&full, fs::Permissions::from_mode(0o700))
                                .map_err(io_at(&full))?;
                        }
                    }
                    self.dirs.insert(rel.clone(), meta);
                    true
                }
                tar::EntryType::Regular
                | tar::EntryType::Continuous
                | tar::EntryType::GNUSparse => {
                    self.replace(&rel)?;
                    let mut file = OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                        .open(&full)
                        .map_err(io_at(&full))?;
                    io::copy(&mut entry, &mut file).map_err(tar_err)?;
                    if self.as_root {
                        std::os::unix::fs::fchown(&file, Some(meta.uid), Some(meta.gid))
                            .map_err(io_at(&full))?;
                    }
                    file.set_permissions(fs::Permissions::from_mode(meta.mode & 0o7777))
                        .map_err(io_at(&full))?;
                    file.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(meta.mtime))
                        .map_err(io_at(&full))?;
                    true
                }
                tar::EntryType::Symlink => {
                    let target = entry
                        .link_name()
                        .map_err(tar_err)?
                        .ok_or_else(|| LayerError::UnsafePath(name.clone()))?
                        .into_owned();
                    self.replace(&rel)?;
                    std::os::unix::fs::symlink(&target, &full).map_err(io_at(&full))?;
                    self.finish_node(&full, &meta, false)?;
                    true
                }
                tar::EntryType::Link => {
                    let target = entry
                        .link_name()
                        .map_err(tar_err)?
                        .ok_or_else(|| LayerError::UnsafePath(name.clone()))?
                        .into_owned();
                    let tcomps = entry_components(&target)?;
                    let bad = || LayerError::HardLinkTarget {
                        path: name.clone(),
                        target: target.display().to_string(),
                    };
                    let (tlast, tparents) = tcomps.split_last().ok_or_else(bad)?;
                    let tparent = self.resolve_dir(tparents, false, &name)?.ok_or_else(bad)?;
                    let trel = tparent.join(tlast);
                    let tfull = self.root.join(&trel);
                    match lstat(&tfull).map_err(io_at(&tfull))? {
                        Some(m) if !m.is_dir() => {}
                        _ => return Err(bad()),
                    }
                    if trel != rel {
                        self.replace(&rel)?;
                        // linkat without AT_SYMLINK_FOLLOW: links a symlink
                        // itself, never what it points to.
                        fs::hard_link(&tfull, &full).map_err(io_at(&full))?;
                    }
                    true
                }
                tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                    let (fmt, is_dev) = match kind {
                        tar::EntryType::Char => (libc::S_IFCHR, true),
                        tar::EntryType::Block => (libc::S_IFBLK, true),
                        _ => (libc::S_IFIFO, false),
                    };
                    if is_dev && !self.as_root {
                        tracing::warn!(entry = %name, "not root: skipping device node");
                        self.stats.skipped += 1;
                        false
                    } else {
                        let major = entry.header().device_major().ok().flatten().unwrap_or(0);
                        let minor = entry.header().device_minor().ok().flatten().unwrap_or(0);
                        self.replace(&rel)?;
                        mknod(&full, fmt | 0o600, libc::makedev(major, minor))
                            .map_err(io_at(&full))?;
                        self.finish_node(&full, &meta, true)?;
                        true
                    }
                }
                tar::EntryType::XGlobalHeader => false,
                other => {
                    tracing::warn!(entry = %name, kind = ?other, "skipping tar entry of unknown type");
                    self.stats.skipped += 1;
                    false
                }
            };
            if made {
                self.set_xattrs(&mut entry, &full)?;
                created.insert(rel);
                self.stats.entries += 1;
            }
        }
        Ok(())
    }

    fn meta_of<R: Read>(&self, entry: &tar::Entry<'_, R>) -> DirMeta {
        let h = entry.header();
        DirMeta {
            mode: h.mode().unwrap_or(0o755),
            uid: h
                .uid()
                .ok()
                .and_then(|id| u32::try_from(id).ok())
                .unwrap_or(OVERFLOW_ID),
            gid: h
                .gid()
                .ok()
                .and_then(|id| u32::try_from(id).ok())
                .unwrap_or(OVERFLOW_ID),
            mtime: h.mtime().unwrap_or(0),
        }
    }

    /// Clears the way for a non-directory entry at `rel`.
    fn replace(&mut self, rel: &Path) -> Result<()> {
        let full = self.root.join(rel);
        remove_any(&full).map_err(io_at(&full))?;
        self.forget_dirs(rel);
        Ok(())
    }

    /// Owner, mode (not for symlinks) and mtime of a node just made.
    fn finish_node(&self, full: &Path, meta: &DirMeta, chmod: bool) -> Result<()> {
        if self.as_root {
            std::os::unix::fs::lchown(full, Some(meta.uid), Some(meta.gid)).map_err(io_at(full))?;
        }
        if chmod {
            fs::set_permissions(full, fs::Permissions::from_mode(meta.mode & 0o7777))
                .map_err(io_at(full))?;
        }
        set_mtime_nofollow(full, meta.mtime).map_err(io_at(full))
    }

    fn set_xattrs<R: Read>(&self, entry: &mut tar::Entry<'_, R>, full: &Path) -> Result<()> {
        let Ok(Some(exts)) = entry.pax_extensions() else {
            return Ok(());
        };
        for ext in exts.flatten() {
            if let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                if let Err(e) = lsetxattr(full, name, ext.value_bytes()) {
                    tracing::warn!(path = %full.display(), xattr = %String::from_utf8_lossy(name), error = %e, "cannot set xattr");
                }
            }
        }
        Ok(())
    }

    /// Applies the deferred directory metadata, deepest first.
    pub fn finish(self) -> Result<UnpackStats> {
        for (rel, meta) in self.dirs.iter().rev() {
            let full = self.root.join(rel);
            if lstat(&full)
                .map_err(io_at(&full))?
                .is_some_and(|m| m.is_dir())
            {
                self.finish_node(&full, meta, true)?;
            }
        }
        Ok(self.stats)
    }
}

/// Judges a layer once its stream has been read: blob verification first
/// (a corrupt blob explains a broken tar), then the unpack result.
fn finish_layer(
    blob: super::oci::VerifiedBlob,
    applied: Result<()>,
    drained: io::Result<u64>,
    digest: &str,
) -> Result<()> {
    blob.finish()?;
    applied?;
    drained.map_err(|source| LayerError::Read {
        digest: digest.into(),
        source,
    })?;
    Ok(())
}

/// Unpacks every layer of `manifest` from `layout` into `root`.
pub fn unpack(layout: &Layout, layers: &[Descriptor], root: &Path) -> Result<UnpackStats> {
    let mut unpacker = Unpacker::new(root)?;
    for desc in layers {
        tracing::debug!(digest = %desc.digest, size = desc.size, "applying layer");
        unpacker.apply_blob(layout, desc)?;
    }
    unpacker.finish()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::oci::Platform;
    use crate::test_utils::{listing, write_image};
    use crate::writer::LayerBuilder;

    /// A tar entry with a raw (unchecked) name and link name: what a hostile
    /// image can contain, which the tar crate's builder refuses to write.
    fn raw_entry(tar: &mut Vec<u8>, name: &str, kind: tar::EntryType, link: &str, data: &[u8]) {
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_cksum();
        tar.extend_from_slice(h.as_bytes());
        tar.extend_from_slice(data);
        tar.resize(tar.len().div_ceil(512) * 512, 0);
    }

    fn end(tar: &mut Vec<u8>) {
        tar.extend_from_slice(&[0u8; 1024]);
    }

    fn apply(root: &Path, tars: &[Vec<u8>]) -> Result<UnpackStats> {
        let mut u = Unpacker::new(root)?;
        for t in tars {
            u.apply_tar(t.as_slice())?;
        }
        u.finish()
    }

    fn unpack_layout(layout_dir: &Path, root: &Path) -> Result<UnpackStats> {
        let layout = Layout::open(layout_dir)?;
        let img = layout.resolve(None, &Platform::host())?;
        unpack(&layout, &img.manifest.layers, root)
    }

    #[test]
    fn whiteouts_and_opaque_dirs_across_layers() {
        let (img, root) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut l1 = LayerBuilder::new();
        l1.dir("etc", 0o755).unwrap();
        l1.file("etc/keep", 0o644, b"keep").unwrap();
        l1.file("etc/gone", 0o644, b"gone").unwrap();
        l1.dir("etc/sub", 0o755).unwrap();
        l1.file("etc/sub/deep", 0o600, b"deep").unwrap();
        l1.dir("app", 0o755).unwrap();
        l1.file("app/old1", 0o644, b"1").unwrap();
        l1.dir("app/olddir", 0o755).unwrap();
        l1.file("app/olddir/x", 0o644, b"x").unwrap();
        let mut l2 = LayerBuilder::new();
        l2.whiteout("etc/gone").unwrap();
        l2.whiteout("etc/sub").unwrap();
        l2.whiteout("etc/never-existed").unwrap();
        l2.dir("app", 0o750).unwrap();
        // Same-layer entries before the marker survive it.
        l2.file("app/early", 0o644, b"early").unwrap();
        l2.opaque("app").unwrap();
        l2.file("app/new", 0o644, b"new").unwrap();
        let mut l3 = LayerBuilder::new();
        l3.file("etc/gone", 0o644, b"back").unwrap();
        write_image(img.path(), vec![(l1, true), (l2, false), (l3, true)]);
        let stats = unpack_layout(img.path(), root.path()).unwrap();
        assert_eq!(stats.whiteouts, 4, "{stats:?}");
        let r = root.path();
        assert_eq!(fs::read(r.join("etc/keep")).unwrap(), b"keep");
        assert_eq!(fs::read(r.join("etc/gone")).unwrap(), b"back");
        assert!(!r.join("etc/sub").exists());
        assert!(!r.join("app/old1").exists());
        assert!(!r.join("app/olddir").exists());
        assert_eq!(fs::read(r.join("app/early")).unwrap(), b"early");
        assert_eq!(fs::read(r.join("app/new")).unwrap(), b"new");
        let names: Vec<_> = fs::read_dir(r.join("app"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(!listing(r).iter().any(|l| l.contains(".wh.")));
        let m = fs::metadata(r.join("app")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o750);
        assert_eq!(m.mtime() as u64, crate::writer::FIXED_MTIME);
    }

    #[test]
    fn file_replaces_directory_and_directory_replaces_file() {
        let root = tempfile::tempdir().unwrap();
        let mut l1 = LayerBuilder::new();
        l1.dir("d", 0o755).unwrap();
        l1.file("d/f", 0o644, b"f").unwrap();
        l1.file("f", 0o644, b"f").unwrap();
        let mut l2 = LayerBuilder::new();
        l2.file("d", 0o644, b"now a file").unwrap();
        l2.dir("f", 0o755).unwrap();
        apply(root.path(), &[l1.finish().unwrap(), l2.finish().unwrap()]).unwrap();
        assert_eq!(fs::read(root.path().join("d")).unwrap(), b"now a file");
        assert!(root.path().join("f").is_dir());
    }

    #[test]
    fn hard_links_within_and_across_layers() {
        let root = tempfile::tempdir().unwrap();
        let mut l1 = LayerBuilder::new();
        l1.file("lower", 0o644, b"lower").unwrap();
        let mut l2 = LayerBuilder::new();
        l2.dir("bin", 0o755).unwrap();
        l2.file("bin/tool", 0o755, b"tool").unwrap();
        l2.hardlink("bin/alias", "bin/tool").unwrap();
        l2.hardlink("lower-link", "lower").unwrap();
        l2.symlink("sym", "/nowhere").unwrap();
        l2.hardlink("sym-link", "sym").unwrap();
        apply(root.path(), &[l1.finish().unwrap(), l2.finish().unwrap()]).unwrap();
        let r = root.path();
        let ino = |p: &str| fs::symlink_metadata(r.join(p)).unwrap().ino();
        assert_eq!(ino("bin/alias"), ino("bin/tool"));
        assert_eq!(ino("lower-link"), ino("lower"));
        assert_eq!(ino("sym-link"), ino("sym"));
        assert_eq!(fs::symlink_metadata(r.join("bin/tool")).unwrap().nlink(), 2);
        assert_eq!(
            fs::read_link(r.join("sym-link")).unwrap(),
            Path::new("/nowhere")
        );

        let mut bad = LayerBuilder::new();
        bad.hardlink("x", "missing").unwrap();
        assert!(matches!(
            apply(root.path(), &[bad.finish().unwrap()]),
            Err(LayerError::HardLinkTarget { .. })
        ));
        let mut bad = LayerBuilder::new();
        bad.hardlink("x", "bin").unwrap();
        assert!(matches!(
            apply(root.path(), &[bad.finish().unwrap()]),
            Err(LayerError::HardLinkTarget { .. })
        ));
    }

    #[test]
    fn dotdot_names_and_link_targets_are_refused() {
        let outside = tempfile::tempdir().unwrap();
        let root_parent = tempfile::tempdir().unwrap();
        let root = root_parent.path().join("root");
        fs::create_dir(&root).unwrap();
        fs::create_dir(root.join("sub")).unwrap();
        fs::write(root.join("sub/kept"), b"").unwrap();
        fs::write(root_parent.path().join("sentinel"), b"").unwrap();
        for (name, kind, link) in [
            ("../escaped", tar::EntryType::Regular, ""),
            ("a/../../escaped", tar::EntryType::Regular, ""),
            ("ok", tar::EntryType::Link, "../escaped"),
            ("../.wh.root", tar::EntryType::Regular, ""),
            // Whiteouts of `.` and `..` would remove the parent itself.
            (".wh..", tar::EntryType::Regular, ""),
            (".wh...", tar::EntryType::Regular, ""),
            ("sub/.wh...", tar::EntryType::Regular, ""),
        ] {
            let mut t = Vec::new();
            raw_entry(&mut t, name, kind, link, b"x");
            end(&mut t);
            let r = apply(&root, &[t]);
            assert!(matches!(r, Err(LayerError::UnsafePath(_))), "{name}: {r:?}");
        }
        assert!(!root_parent.path().join("escaped").exists());
        assert!(root_parent.path().join("sentinel").exists());
        assert!(root.join("sub/kept").exists());
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
    }

    #[test]
    fn symlinked_parents_resolve_inside_the_root() {
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        fs::write(&victim, b"untouched").unwrap();
        let root = tempfile::tempdir().unwrap();
        let out = outside.path().to_str().unwrap();
        let mut l1 = LayerBuilder::new();
        l1.symlink("abs", out).unwrap();
        l1.symlink("rel", "../../../../../../../..").unwrap();
        l1.symlink("a", "/etc").unwrap();
        l1.symlink("victim-link", &format!("{out}/victim")).unwrap();
        let mut l2 = LayerBuilder::new();
        l2.file("abs/victim", 0o644, b"via abs").unwrap();
        l2.file("rel/victim", 0o644, b"via rel").unwrap();
        l2.file("a/passwd", 0o644, b"root-in-image").unwrap();
        // A file over a symlink replaces the symlink, never writes through it.
        l2.file("victim-link", 0o644, b"replaced").unwrap();
        let mut l3 = LayerBuilder::new();
        l3.whiteout("abs/victim").unwrap();
        let (t1, t2, t3) = (
            l1.finish().unwrap(),
            l2.finish().unwrap(),
            l3.finish().unwrap(),
        );
        apply(root.path(), &[t1, t2, t3]).unwrap();
        let r = root.path();
        assert_eq!(fs::read(&victim).unwrap(), b"untouched");
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 1);
        // `abs` -> OUTSIDE inside the root is ROOT/OUTSIDE; its victim was
        // whited out again through the same in-root resolution.
        let inner = r.join(outside.path().strip_prefix("/").unwrap());
        assert!(inner.is_dir());
        assert!(!inner.join("victim").exists());
        assert_eq!(fs::read(r.join("victim")).unwrap(), b"via rel");
        assert_eq!(fs::read(r.join("etc/passwd")).unwrap(), b"root-in-image");
        assert!(fs::symlink_metadata(r.join("a"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(fs::symlink_metadata(r.join("etc")).unwrap().is_dir());
        assert!(fs::symlink_metadata(r.join("victim-link"))
            .unwrap()
            .is_file());
    }

    #[test]
    fn symlink_loops_and_file_parents_fail() {
        let root = tempfile::tempdir().unwrap();
        let mut l = LayerBuilder::new();
        l.symlink("loop", "loop").unwrap();
        l.file("loop/x", 0o644, b"").unwrap();
        let r = apply(root.path(), &[l.finish().unwrap()]);
        assert!(matches!(r, Err(LayerError::SymlinkLoop(_))), "{r:?}");
        let mut l = LayerBuilder::new();
        l.file("f", 0o644, b"").unwrap();
        l.file("f/x", 0o644, b"").unwrap();
        let r = apply(root.path(), &[l.finish().unwrap()]);
        assert!(matches!(r, Err(LayerError::NotADirectory(_))), "{r:?}");
    }

    #[test]
    fn metadata_and_device_nodes() {
        let root = tempfile::tempdir().unwrap();
        let mut l = LayerBuilder::new();
        l.owner(1000, 1001).mtime(12345);
        l.file("suid", 0o4755, b"x").unwrap();
        l.symlink("link", "suid").unwrap();
        l.char_device("null", 0o666, 1, 3).unwrap();
        let stats = apply(root.path(), &[l.finish().unwrap()]).unwrap();
        let m = fs::metadata(root.path().join("suid")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o4755);
        assert_eq!(m.mtime(), 12345);
        assert_eq!(
            fs::symlink_metadata(root.path().join("link"))
                .unwrap()
                .mtime(),
            12345
        );
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert_eq!((m.uid(), m.gid()), (1000, 1001));
            let n = fs::symlink_metadata(root.path().join("null")).unwrap();
            assert_eq!(n.mode() & libc::S_IFMT, libc::S_IFCHR);
            assert_eq!(n.rdev(), libc::makedev(1, 3));
            assert_eq!(stats.skipped, 0);
        } else {
            assert!(!root.path().join("null").exists());
            assert_eq!(stats.skipped, 1);
        }
    }

    fn lgetxattr(path: &Path, name: &str) -> Option<Vec<u8>> {
        let c = cstring(path).unwrap();
        let n = CString::new(name).unwrap();
        let mut buf = vec![0u8; 256];
        // SAFETY: NUL-terminated strings and a buffer of the length passed,
        // all alive for the call.
        let len =
            unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        let len = usize::try_from(len).ok()?;
        buf.truncate(len);
        Some(buf)
    }

    #[test]
    fn xattrs_from_pax_records() {
        let root = tempfile::tempdir().unwrap();
        let probe = root.path().join("probe");
        fs::write(&probe, b"").unwrap();
        // The suite's hosts keep their temporary directory on ext4, which
        // has user xattrs; a host without them cannot run this test.
        assert!(
            lsetxattr(&probe, b"user.probe", b"1").is_ok(),
            "this test needs user xattrs on {}",
            root.path().display()
        );
        let mut l = LayerBuilder::new();
        l.xattr("user.husk", b"yes").unwrap();
        l.file("f", 0o644, b"data").unwrap();
        l.file("g", 0o644, b"no xattr").unwrap();
        apply(root.path(), &[l.finish().unwrap()]).unwrap();
        assert_eq!(
            lgetxattr(&root.path().join("f"), "user.husk").as_deref(),
            Some(&b"yes"[..])
        );
        assert_eq!(lgetxattr(&root.path().join("g"), "user.husk"), None);
    }

    #[test]
    fn corrupt_truncated_and_missing_layers_are_refused() {
        let root = tempfile::tempdir().unwrap();
        for gzip in [false, true] {
            let img = tempfile::tempdir().unwrap();
            let mut l = LayerBuilder::new();
            l.file("f", 0o644, &[7u8; 4000]).unwrap();
            write_image(img.path(), vec![(l, gzip)]);
            let layout = Layout::open(img.path()).unwrap();
            let layer = layout
                .resolve(None, &Platform::host())
                .unwrap()
                .manifest
                .layers
                .remove(0);
            let blob = img.path().join("blobs/sha256").join(&layer.digest[7..]);
            let good = fs::read(&blob).unwrap();

            let mut flipped = good.clone();
            let last = flipped.len() - 1;
            flipped[last] ^= 1;
            fs::write(&blob, &flipped).unwrap();
            let r = unpack(&layout, std::slice::from_ref(&layer), root.path());
            assert!(
                matches!(r, Err(LayerError::Blob(OciError::DigestMismatch { .. }))),
                "{r:?}"
            );

            fs::write(&blob, &good[..good.len() - 10]).unwrap();
            let r = unpack(&layout, std::slice::from_ref(&layer), root.path());
            assert!(
                matches!(r, Err(LayerError::Blob(OciError::DigestMismatch { .. }))),
                "{r:?}"
            );

            let mut longer = good.clone();
            longer.extend_from_slice(&[0; 600]);
            fs::write(&blob, &longer).unwrap();
            let r = unpack(&layout, std::slice::from_ref(&layer), root.path());
            assert!(
                matches!(r, Err(LayerError::Blob(OciError::DigestMismatch { .. }))),
                "{r:?}"
            );

            fs::remove_file(&blob).unwrap();
            let r = unpack(&layout, std::slice::from_ref(&layer), root.path());
            assert!(
                matches!(r, Err(LayerError::Blob(OciError::MissingBlob(_)))),
                "{r:?}"
            );

            fs::write(&blob, &good).unwrap();
            unpack(&layout, &[layer], root.path()).unwrap();
        }
    }

    #[test]
    fn gzip_and_plain_layers_give_the_same_tree() {
        let mut trees = Vec::new();
        for gzip in [false, true] {
            let (img, root) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            let mut l1 = LayerBuilder::new();
            l1.dir("a", 0o755).unwrap();
            l1.file("a/b", 0o640, b"bee").unwrap();
            let mut l2 = LayerBuilder::new();
            l2.whiteout("a/b").unwrap();
            l2.file("a/c", 0o600, b"sea").unwrap();
            write_image(img.path(), vec![(l1, gzip), (l2, gzip)]);
            unpack_layout(img.path(), root.path()).unwrap();
            trees.push(listing(root.path()));
        }
        assert_eq!(trees[0], trees[1]);
        assert_eq!(trees[0].len(), 2, "{:?}", trees[0]);
    }

    /// Stores `data` as a blob of the layout in `dir`; its descriptor.
    fn raw_blob(dir: &Path, data: &[u8], media_type: &str) -> Descriptor {
        let digest = crate::oci::sha256_digest(data);
        fs::write(dir.join("blobs/sha256").join(&digest[7..]), data).unwrap();
        Descriptor {
            media_type: media_type.into(),
            digest,
            size: data.len() as u64,
            platform: None,
            annotations: None,
        }
    }

    #[test]
    fn multi_member_gzip_and_garbage_tar() {
        let img = tempfile::tempdir().unwrap();
        write_image(img.path(), vec![(LayerBuilder::new(), false)]);
        let layout = Layout::open(img.path()).unwrap();
        let mut l = LayerBuilder::new();
        l.file("a", 0o644, &[1u8; 3000]).unwrap();
        l.file("b", 0o644, b"b").unwrap();
        let tar = l.finish().unwrap();
        // Split mid-entry into two gzip members, as pigz or a concatenation
        // could write.
        let (first, second) = tar.split_at(1000);
        let mut gz = crate::writer::gzip(first).unwrap();
        gz.extend(crate::writer::gzip(second).unwrap());
        let desc = raw_blob(img.path(), &gz, crate::oci::media::OCI_LAYER_GZIP);
        let root = tempfile::tempdir().unwrap();
        unpack(&layout, &[desc], root.path()).unwrap();
        assert_eq!(fs::read(root.path().join("b")).unwrap(), b"b");
        assert_eq!(fs::read(root.path().join("a")).unwrap().len(), 3000);

        // A blob whose digest is right but whose tar is garbage.
        let garbage = vec![0x55u8; 2048];
        let desc = raw_blob(img.path(), &garbage, crate::oci::media::OCI_LAYER_TAR);
        let r = unpack(&layout, std::slice::from_ref(&desc), root.path());
        match r {
            Err(LayerError::Read { digest, .. }) => assert_eq!(digest, desc.digest),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn zstd_and_foreign_media_types_are_refused() {
        let img = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        let mut desc = write_image(img.path(), vec![(LayerBuilder::new(), false)]);
        let layout = Layout::open(img.path()).unwrap();
        let zstd = [0x28, 0xb5, 0x2f, 0xfd, 0, 0, 0, 0];
        let path = img.path().join("blobs/sha256");
        let digest = crate::oci::sha256_digest(&zstd);
        fs::write(path.join(&digest[7..]), zstd).unwrap();
        desc.digest = digest;
        desc.size = zstd.len() as u64;
        desc.media_type = "application/vnd.oci.image.layer.v1.tar+zstd".into();
        let r = unpack(&layout, &[desc.clone()], root.path());
        assert!(matches!(r, Err(LayerError::Unsupported { .. })), "{r:?}");
        desc.media_type = "application/vnd.example.not-a-layer".into();
        let r = unpack(&layout, &[desc], root.path());
        assert!(matches!(r, Err(LayerError::Unsupported { .. })), "{r:?}");
    }
}
