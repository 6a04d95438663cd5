//! `husk image`: the bundled busybox image and an image written by umoci,
//! with a file deleted and a directory replaced in an upper layer, become
//! ext4 root filesystems whose content is checked with debugfs on this host;
//! the cache answers the second time; a tar archive of the layout gives the
//! same image; corrupt input fails cleanly. One test boots a guest (in the
//! node VM) with the busybox root filesystem as its root device.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use husk_tests::{artifacts, husk_binary, run_ok, Payload};
use serde_json::Value;

/// A scratch directory of this test, emptied first.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("husk-image-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn husk_image(cache: &Path, args: &[&str]) -> Output {
    Command::new(husk_binary())
        .arg("image")
        .args(args)
        .env("HUSK_CACHE_DIR", cache)
        .output()
        .expect("run husk image")
}

fn rootfs(cache: &Path, image: &str) -> Value {
    let out = husk_image(cache, &["rootfs", image]);
    assert!(
        out.status.success(),
        "husk image rootfs {image}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

fn debugfs(image: &str, request: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", request, image])
        .output()
        .expect("debugfs (e2fsprogs) runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The names in a directory of the image, without `.` and `..`.
fn names(image: &str, dir: &str) -> Vec<String> {
    let mut names: Vec<String> = debugfs(image, &format!("ls -l {dir}"))
        .lines()
        .filter_map(|l| l.split_whitespace().last().map(str::to_string))
        .filter(|n| n != "." && n != "..")
        .collect();
    names.sort();
    names
}

#[test]
fn busybox_image_cold_then_cached() {
    let dir = scratch("busybox");
    let cache = dir.join("cache");
    let out = husk_image(&cache, &["build-busybox"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let layout = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(layout.starts_with(cache.join("images/busybox-").to_str().unwrap()));

    let first = rootfs(&cache, &format!("{layout}:busybox:latest"));
    assert_eq!(first["cached"], false);
    assert_eq!(first["config"]["cmd"], serde_json::json!(["sh"]));
    let ext4 = first["rootfs"].as_str().unwrap().to_string();
    assert_eq!(
        fs::metadata(&ext4).unwrap().len(),
        first["size_bytes"].as_u64().unwrap()
    );
    assert!(debugfs(&ext4, "stat /bin/busybox").contains("Type: regular"));
    assert!(debugfs(&ext4, "stat /bin/sh").contains("Fast link dest: \"/bin/busybox\""));
    assert!(debugfs(&ext4, "cat /etc/passwd").starts_with("root:x:0:0:"));
    assert!(debugfs(&ext4, "stat /tmp").contains("Mode:  01777"));

    // No IMAGE: the bundled busybox image, the same one.
    let out = husk_image(&cache, &["rootfs"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let default: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(default["manifest_digest"], first["manifest_digest"]);
    assert_eq!(default["cached"], true);

    let second = rootfs(&cache, &layout);
    assert_eq!(second["cached"], true);
    assert_eq!(second["rootfs"], first["rootfs"]);
    assert_eq!(second["manifest_digest"], first["manifest_digest"]);

    // The same layout written to a directory of our choosing: same digest.
    let copy = dir.join("busybox-oci");
    let out = husk_image(&cache, &["build-busybox", copy.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let third = rootfs(&cache, copy.to_str().unwrap());
    assert_eq!(third["manifest_digest"], first["manifest_digest"]);
    assert_eq!(third["cached"], true);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn umoci_layers_with_deletions_and_an_opaque_directory() {
    if Command::new("umoci").arg("--version").output().is_err() {
        panic!("umoci is missing: resources/lib.sh's husk_install_packages installs it");
    }
    let dir = scratch("umoci");
    let cache = dir.join("cache");
    let layout = dir.join("L");
    let image = format!("{}:t", layout.display());
    let umoci = |args: &[&str]| {
        let mut c = Command::new("umoci");
        c.args(args).current_dir(&dir);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            c.arg("--rootless");
        }
        c
    };
    run_ok(
        Command::new("umoci")
            .args(["init", "--layout", "L"])
            .current_dir(&dir),
    );
    run_ok(
        Command::new("umoci")
            .args(["new", "--image", "L:t"])
            .current_dir(&dir),
    );
    // Layer 1: a base with a secret and a library directory.
    run_ok(&mut umoci(&["unpack", "--image", "L:t", "b1"]));
    let r1 = dir.join("b1/rootfs");
    fs::create_dir_all(r1.join("etc")).unwrap();
    fs::create_dir_all(r1.join("app/lib/sub")).unwrap();
    fs::write(r1.join("etc/keep"), "kept\n").unwrap();
    fs::write(r1.join("etc/secret"), "secret\n").unwrap();
    fs::write(r1.join("app/lib/old.so"), "old\n").unwrap();
    fs::write(r1.join("app/lib/sub/x"), "x\n").unwrap();
    fs::create_dir_all(r1.join("srv/old")).unwrap();
    fs::write(r1.join("srv/a"), "a\n").unwrap();
    run_ok(&mut umoci(&["repack", "--image", "L:t", "b1"]));
    // Layer 2: the secret deleted, the library directory replaced.
    run_ok(&mut umoci(&["unpack", "--image", "L:t", "b2"]));
    let r2 = dir.join("b2/rootfs");
    fs::remove_file(r2.join("etc/secret")).unwrap();
    fs::remove_dir_all(r2.join("app/lib")).unwrap();
    fs::create_dir(r2.join("app/lib")).unwrap();
    fs::write(r2.join("app/lib/new.so"), "new\n").unwrap();
    run_ok(&mut umoci(&["repack", "--image", "L:t", "b2"]));
    // Layer 3: a hard link and a symlink.
    run_ok(&mut umoci(&["unpack", "--image", "L:t", "b3"]));
    let r3 = dir.join("b3/rootfs");
    fs::hard_link(r3.join("etc/keep"), r3.join("etc/keep2")).unwrap();
    std::os::unix::fs::symlink("/etc/keep", r3.join("keep-link")).unwrap();
    run_ok(&mut umoci(&["repack", "--image", "L:t", "b3"]));
    // Layer 4, a tar of our own added as is: an opaque /srv.
    let stage = dir.join("stage");
    fs::create_dir_all(stage.join("srv")).unwrap();
    fs::write(stage.join("srv/.wh..wh..opq"), "").unwrap();
    fs::write(stage.join("srv/c"), "c\n").unwrap();
    run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(&stage)
            .arg("-cf")
            .arg(dir.join("l4.tar"))
            .arg("srv"),
    );
    run_ok(
        Command::new("umoci")
            .args(["raw", "add-layer", "--image", "L:t", "l4.tar"])
            .current_dir(&dir),
    );
    run_ok(&mut umoci(&[
        "config",
        "--image",
        "L:t",
        "--config.cmd",
        "/bin/true",
        "--config.workingdir",
        "/app",
        "--config.env",
        "A=b",
    ]));

    let got = rootfs(&cache, &image);
    assert_eq!(got["cached"], false);
    assert_eq!(got["config"]["cmd"], serde_json::json!(["/bin/true"]));
    assert_eq!(got["config"]["working_dir"], "/app");
    assert!(got["config"]["env"]
        .as_array()
        .unwrap()
        .contains(&"A=b".into()));
    let ext4 = got["rootfs"].as_str().unwrap();
    assert_eq!(names(ext4, "/etc"), ["keep", "keep2"]);
    assert_eq!(debugfs(ext4, "cat /etc/keep"), "kept\n");
    assert_eq!(names(ext4, "/app/lib"), ["new.so"]);
    assert!(debugfs(ext4, "stat /etc/keep2").contains("Links: 2"));
    assert!(debugfs(ext4, "stat /keep-link").contains("Fast link dest: \"/etc/keep\""));
    assert_eq!(names(ext4, "/srv"), ["c"]);
    assert_eq!(debugfs(ext4, "cat /srv/c"), "c\n");
    assert!(!debugfs(ext4, "ls -R /").contains(".wh."));

    // A tar archive of the layout (as skopeo's oci-archive: writes) is the
    // same image: same digest, served from the cache.
    let archive = dir.join("L.tar");
    run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(&layout)
            .arg("-cf")
            .arg(&archive)
            .arg("."),
    );
    let from_tar = rootfs(&cache, &format!("{}:t", archive.display()));
    assert_eq!(from_tar["manifest_digest"], got["manifest_digest"]);
    assert_eq!(from_tar["cached"], true);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn corrupt_or_missing_images_fail_cleanly() {
    let dir = scratch("corrupt");
    let cache = dir.join("cache");
    let out = husk_image(&cache, &["rootfs", "/nonexistent/layout"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/layout"));

    let layout = dir.join("bb");
    let out = husk_image(&cache, &["build-busybox", layout.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Flip a byte in the biggest blob (the layer).
    let blob = fs::read_dir(layout.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    let mut data = fs::read(&blob).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    fs::write(&blob, data).unwrap();
    let out = husk_image(&cache, &["rootfs", layout.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("does not match its descriptor"), "{err}");
    // Nothing half-built is left in the cache.
    let left: Vec<_> = fs::read_dir(cache.join("rootfs/v1")).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");

    let out = husk_image(&cache, &["rootfs", &format!("{}:nope", layout.display())]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no image named \"nope\""));
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn busybox_rootfs_boots_as_the_guest_root() {
    // A private copy (--out) of the busybox root filesystem, with an init
    // script written into it by debugfs, is the guest's root device.
    let dir = scratch("boot");
    let cache = dir.join("cache");
    let root = dir.join("root.ext4");
    let out = husk_image(&cache, &["rootfs", "--out", root.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let script = dir.join("init.sh");
    fs::write(
        &script,
        "#!/bin/sh\n\
         mount -t proc proc /proc\n\
         echo \"HUSK-IMAGE-ROOT uid=$(id -u) user=$(whoami) applets=$(ls /bin | wc -l)\"\n\
         echo written > /tmp/f && echo \"HUSK-IMAGE-WRITE $(cat /tmp/f)\"\n\
         reboot -f\n",
    )
    .unwrap();
    let request = format!("write {} init.sh", script.display());
    run_ok(
        Command::new("debugfs")
            .args(["-w", "-R", &request])
            .arg(&root),
    );
    run_ok(
        Command::new("debugfs")
            .args(["-w", "-R", "sif /init.sh mode 0100755"])
            .arg(&root),
    );
    let a = artifacts();
    let r = Payload::new("image-boot")
        .add(&a.husk, "husk")
        .add(&a.vmlinux, "vmlinux")
        .add(&root, "root.ext4")
        .run(
            "timeout 300 ./husk boot --kernel vmlinux --mem-mib 128 \
               --cmdline 'console=ttyS0 reboot=k panic=1 pci=off quiet init=/init.sh' \
               --drive id=rootfs,path=root.ext4,root",
        );
    r.assert_status(0);
    let line = r.value("HUSK-IMAGE-ROOT").unwrap_or_default();
    assert!(line.starts_with("uid=0 user=root applets="), "{}", r.output);
    let applets: usize = line.rsplit('=').next().unwrap().parse().unwrap();
    assert!(applets > 50, "{line}");
    assert_eq!(r.value("HUSK-IMAGE-WRITE").as_deref(), Some("written"));
    fs::remove_dir_all(&dir).unwrap();
}
