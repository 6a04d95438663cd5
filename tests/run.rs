//! `husk run` end to end in the node VM: a local OCI image becomes the
//! root filesystem of a container that husk-agent runs inside a fresh
//! microVM, with the container's stdout, stderr, stdin, terminal and exit
//! status carried back to the caller. The images are built on this host
//! (the bundled busybox image, and a multi-layer one written by umoci) and
//! their root filesystems are put in a cache directory the run in the node
//! VM finds them in (the node has no e2fsprogs of its own).

use std::path::PathBuf;
use std::process::Command;

use husk_tests::{agent_initrd, artifacts, busybox_rootfs, husk_with_cache, Payload, RunResult};

/// A payload with husk, the kernel, the agent, the busybox image as
/// `busybox/` and its root filesystem in `cache/`.
fn payload(name: &str) -> (Payload, PathBuf) {
    let a = artifacts();
    let p = Payload::new(name)
        .add(&a.husk, "husk")
        .add(&a.vmlinux, "vmlinux")
        .add(agent_initrd(), "agent.cpio");
    let dir = p.path().to_path_buf();
    busybox_rootfs(&dir);
    (p, dir)
}

const RUN: &str =
    "HUSK_CACHE_DIR=./cache timeout 120 ./husk run --kernel vmlinux --agent-initrd agent.cpio";

fn status_line(r: &RunResult) -> i32 {
    r.value("STATUS")
        .unwrap_or_else(|| panic!("no STATUS line:\n{}", r.output))
        .parse()
        .unwrap()
}

#[test]
fn output_streams_and_the_exit_status_come_back() {
    let (p, _) = payload("run-echo");
    let r = p.run(&format!(
        "{RUN} ./busybox -- sh -c 'echo out-line; echo err-line >&2; echo \"ID $(id -u) $(hostname)\"; exit 42' > out.txt 2> err.txt
         echo \"STATUS $?\"; sed 's/^/OUT /' out.txt; sed 's/^/ERR /' err.txt
         {RUN} ./busybox -- sh -c 'sleep 100 & kill -9 $!; wait $!'; echo \"KILLED $?\""
    ));
    r.assert_status(0);
    assert_eq!(status_line(&r), 42, "{}", r.output);
    r.assert_contains("OUT out-line")
        .assert_contains("OUT ID 0 husk");
    r.assert_contains("ERR err-line");
    assert!(
        !r.output.contains("OUT err-line"),
        "stderr mixed into stdout:\n{}",
        r.output
    );
    // A child killed by SIGKILL: the shell's 128 + 9 comes back. (The
    // container's own init, PID 1 of its namespace, cannot be killed from
    // inside; the agent's tests kill it from outside.)
    assert_eq!(r.value("KILLED").as_deref(), Some("137"), "{}", r.output);
}

#[test]
fn stdin_and_a_terminal() {
    let (p, _) = payload("run-stdio");
    let r = p.run(&format!(
        "printf 'first\\nsecond\\n' | {RUN} -i ./busybox -- sh -c 'while read l; do echo \"GOT $l\"; done; echo STDIN-EOF'
         echo \"STATUS $?\"
         {RUN} -t ./busybox -- sh -c 'echo \"TTY $(tty)\"; test -t 1 && echo IS-A-TTY'"
    ));
    r.assert_status(0);
    assert_eq!(status_line(&r), 0);
    r.assert_contains("GOT first")
        .assert_contains("GOT second")
        .assert_contains("STDIN-EOF");
    r.assert_contains("TTY /dev/console")
        .assert_contains("IS-A-TTY");
}

#[test]
fn a_multi_layer_image_whose_upper_layer_deletes_a_file() {
    let (p, dir) = payload("run-layers");
    // Three layers written by umoci: busybox and a file, the file deleted
    // and another added, an environment and a working directory.
    let umoci = |args: &[&str]| {
        let st = Command::new("umoci")
            .args(args)
            .current_dir(&dir)
            .status()
            .expect("umoci (resources/lib.sh installs it)");
        assert!(st.success(), "umoci {args:?}");
    };
    umoci(&["init", "--layout", "img"]);
    umoci(&["new", "--image", "img:t"]);
    umoci(&["unpack", "--image", "img:t", "b"]);
    let rootfs = dir.join("b/rootfs");
    for d in ["bin", "etc", "srv"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    for applet in ["sh", "cat", "ls", "test"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    std::fs::write(rootfs.join("etc/doomed"), "lower layer\n").unwrap();
    umoci(&["repack", "--image", "img:t", "b"]);
    std::fs::remove_dir_all(dir.join("b")).unwrap();
    umoci(&["unpack", "--image", "img:t", "b"]);
    std::fs::remove_file(rootfs.join("etc/doomed")).unwrap();
    std::fs::write(rootfs.join("srv/added"), "upper layer\n").unwrap();
    umoci(&["repack", "--image", "img:t", "b"]);
    umoci(&[
        "config",
        "--image",
        "img:t",
        "--config.env",
        "GREETING=from-the-image",
        "--config.workingdir",
        "/srv",
        "--config.cmd",
        "sh",
    ]);
    std::fs::remove_dir_all(dir.join("b")).unwrap();
    husk_with_cache(
        &["image", "rootfs", dir.join("img:t").to_str().unwrap()],
        &dir.join("cache"),
    );
    let r = p.run(&format!(
        "{RUN} ./img:t -- sh -c 'test -e /etc/doomed && echo DOOMED present || echo DOOMED gone; cat /srv/added; echo \"ENV $GREETING $(pwd)\"'
         echo \"STATUS $?\""
    ));
    r.assert_status(0);
    assert_eq!(status_line(&r), 0);
    assert_eq!(r.value("DOOMED").as_deref(), Some("gone"), "{}", r.output);
    r.assert_contains("upper layer")
        .assert_contains("ENV from-the-image /srv");
}
