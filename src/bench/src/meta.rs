//! `husk-bench meta`: metadata-heavy work on a directory, run the same way
//! in a guest on an ext4 drive (virtio-blk) and on a virtio-fs share, so
//! the two can be compared where throughput says little: creating many
//! small files, stat-ing them from a cold cache, and `tar c` of a tree (a
//! busybox root: one binary and hundreds of links), each timed.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use serde_json::{json, Value};

/// Drops the kernel's clean caches (dentries, inodes, pages), so what
/// follows reads through the device; false where it cannot (not root).
fn drop_caches() -> bool {
    // SAFETY: sync(2) takes no arguments.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

fn secs(t0: Instant) -> f64 {
    (t0.elapsed().as_secs_f64() * 1e6).round() / 1e6
}

/// Creates `files` files of 4 KiB under `dir/husk-meta` (made afresh),
/// syncs them, stats each from a cold cache, `tar c`s `tree` if given
/// (bytes counted, not kept), and removes the files; the seconds of each.
pub fn meta(dir: &Path, files: u32, tree: Option<&Path>) -> anyhow::Result<Value> {
    let work = dir.join("husk-meta");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let block = vec![0x5au8; 4096];
    let names: Vec<_> = (0..files).map(|i| work.join(format!("f{i:05}"))).collect();

    let t0 = Instant::now();
    for n in &names {
        let mut f =
            std::fs::File::create(n).with_context(|| format!("cannot create {}", n.display()))?;
        f.write_all(&block)?;
    }
    let d = std::fs::File::open(&work)?;
    // SAFETY: syncfs(2) on a descriptor this function owns.
    if unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&d)) } < 0 {
        bail!(
            "syncfs {}: {}",
            work.display(),
            std::io::Error::last_os_error()
        );
    }
    let create_s = secs(t0);

    let cold = drop_caches();
    let t0 = Instant::now();
    let mut bytes = 0;
    for n in &names {
        bytes += std::fs::metadata(n)
            .with_context(|| format!("cannot stat {}", n.display()))?
            .len();
    }
    let stat_s = secs(t0);
    if bytes != u64::from(files) * block.len() as u64 {
        bail!(
            "the files hold {bytes} bytes, not {}",
            u64::from(files) * 4096
        );
    }

    let tar = match tree {
        Some(tree) => {
            drop_caches();
            let t0 = Instant::now();
            let mut child = Command::new("tar")
                .arg("cf")
                .arg("-")
                .arg("-C")
                .arg(tree)
                .arg(".")
                .stdout(Stdio::piped())
                .spawn()
                .context("cannot run tar")?;
            let mut out = child.stdout.take().context("tar's stdout")?;
            let tar_bytes = std::io::copy(&mut out, &mut std::io::sink())?;
            let status = child.wait()?;
            if !status.success() {
                bail!("tar of {} ended with {status}", tree.display());
            }
            json!({"tar_s": secs(t0), "tar_bytes": tar_bytes})
        }
        None => Value::Null,
    };

    // File by file, by name: removing while reading the directory (as
    // remove_dir_all does) skips entries on a FUSE directory whose
    // offsets shift under it.
    let t0 = Instant::now();
    for n in &names {
        std::fs::remove_file(n).with_context(|| format!("cannot remove {}", n.display()))?;
    }
    std::fs::remove_dir(&work).with_context(|| format!("cannot remove {}", work.display()))?;
    drop(d);
    // SAFETY: sync(2) takes no arguments.
    unsafe { libc::sync() };
    let remove_s = secs(t0);
    Ok(json!({
        "files": files,
        "cold_cache": cold,
        "create_s": create_s,
        "stat_s": stat_s,
        "remove_s": remove_s,
        "tar": tar,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_made_stat_ed_tarred_and_removed() {
        let dir = std::env::temp_dir().join(format!("husk-meta-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let tree = dir.join("tree");
        std::fs::create_dir_all(tree.join("bin")).unwrap();
        std::fs::write(tree.join("bin/busybox"), vec![1u8; 10_000]).unwrap();
        std::os::unix::fs::symlink("busybox", tree.join("bin/sh")).unwrap();
        let v = meta(&dir, 50, Some(&tree)).unwrap();
        assert_eq!(v["files"], 50);
        assert!(v["create_s"].as_f64().unwrap() > 0.0);
        assert!(v["tar"]["tar_bytes"].as_u64().unwrap() > 10_000, "{v}");
        assert!(!dir.join("husk-meta").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
