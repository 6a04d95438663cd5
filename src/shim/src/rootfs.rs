//! A container's root filesystem as a disk for the guest. containerd hands
//! the rootfs as mounts (an overlay of the image's snapshot layers and the
//! container's writable layer); the shim mounts them on the bundle's
//! `rootfs` directory, copies the merged tree into a fresh ext4 image with
//! mke2fs -d, and unmounts. The image is the container's from then on:
//! its writes stay in it and go with it. A container created with a
//! rootfs path and no mounts (`ctr run --rootfs`) is copied the same way.

use std::path::{Path, PathBuf};

use containerd_shim::protos::types::mount::Mount;
use husk::image::rootfs::{disk_usage, make_ext4};

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
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// mke2fs failed.
    #[error("cannot build the rootfs image: {0}")]
    Image(#[from] husk::image::rootfs::RootfsError),
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
        let links = bundle_root.with_extension(format!("layers{i}"));
        let result = mount_at(m, bundle_root, &links);
        let _ = std::fs::remove_dir_all(&links);
        result?;
        mounted.0.push(bundle_root.to_path_buf());
    }
    image_of(bundle_root, image, mounted)
}

/// [`mount_one`] with its failure as a [`RootfsError`].
fn mount_at(m: &Mount, target: &Path, links: &Path) -> Result<(), RootfsError> {
    mount_one(m, target, links).map_err(|detail| RootfsError::Mount {
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
    std::fs::File::create(image).map_err(io_at(image))?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
