//! `husk run` end to end in the node VM: a local OCI image becomes the
//! root filesystem of a container that husk-agent runs inside a fresh
//! microVM, with the container's stdout, stderr, stdin, terminal and exit
//! status carried back to the caller. The images are built on this host
//! (the bundled busybox image, a multi-layer one written by umoci, and one
//! pulled from a registry on this host by `husk image rootfs REF`) and
//! their root filesystems are put in a cache directory the run in the node
//! VM finds them in (the node has no e2fsprogs and no network of its own).

use std::path::{Path, PathBuf};
use std::process::Command;

use husk_tests::registry::Registry;
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

/// Pushes a busybox image whose default command prints a line to a
/// registry on this host, and pulls it (and builds its root filesystem)
/// into the payload's cache with `husk image rootfs REF`, as a host with a
/// registry would: the node has no network and no e2fsprogs, so its run
/// finds the image in the cache (`--pull never`). Returns the reference.
fn registry_image(dir: &Path) -> String {
    let image = dir.join("from-registry");
    husk_with_cache(
        &[
            "image",
            "build-busybox",
            image.to_str().unwrap(),
            "--ref",
            "hello:1",
            "--",
            "sh",
            "-c",
            "echo REGISTRY-IMAGE-CMD $(id -u)",
        ],
        &dir.join("cache"),
    );
    let registry = Registry::start(&dir.join("registry"), false);
    registry.push(&image, "hello:1", "hello:1");
    let reference = registry.reference("hello:1");
    husk_with_cache(&["image", "rootfs", &reference], &dir.join("cache"));
    // The registry is gone before the node runs: the run needs only the cache.
    drop(registry);
    std::fs::remove_dir_all(dir.join("registry")).unwrap();
    std::fs::remove_dir_all(&image).unwrap();
    reference
}

#[test]
fn output_streams_and_the_exit_status_come_back() {
    let (p, dir) = payload("run-echo");
    let reference = registry_image(&dir);
    let r = p.run(&format!(
        "{RUN} ./busybox -- sh -c 'echo out-line; echo err-line >&2; echo \"ID $(id -u) $(hostname)\"; exit 42' > out.txt 2> err.txt
         echo \"STATUS $?\"; sed 's/^/OUT /' out.txt; sed 's/^/ERR /' err.txt
         {RUN} ./busybox -- sh -c 'sleep 100 & kill -9 $!; wait $!'; echo \"KILLED $?\"
         {RUN} --pull never {reference}; echo \"REGISTRY-STATUS $?\""
    ));
    assert_eq!(
        r.value("REGISTRY-IMAGE-CMD").as_deref(),
        Some("0"),
        "the registry image's own command did not run:\n{}",
        r.output
    );
    assert_eq!(
        r.value("REGISTRY-STATUS").as_deref(),
        Some("0"),
        "{}",
        r.output
    );
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

/// `husk run` from a template (its default): the first run makes the template (and is
/// restored from it), later ones (two at once) are restored from it, and
/// each restored guest is its own: different random bytes and the node's
/// wall clock, not the template's, stopped seconds earlier. (The clock is
/// what catches a clone the agent did not freshen: this guest kernel also
/// reseeds its generator from interrupt timings within a second or so of
/// a restore, so clones' random bytes differ even without the agent's
/// reseed, which makes them differ from the first byte.) A template that
/// no longer loads is removed, the run boots instead and says so, and the
/// next run makes a new one.
#[test]
fn runs_from_a_template_are_restored_clones_that_differ() {
    let (p, _) = payload("run-template");
    let probe = r#"sh -c 'echo RAND $(head -c 32 /dev/urandom | od -An -tx1 | tr -d " \n"); echo CLOCK $(date +%s)'"#;
    let r = p.run(&format!(
        r#"T="./husk --log-level info run --kernel vmlinux --agent-initrd agent.cpio"
export HUSK_CACHE_DIR=./cache
timeout 120 $T ./busybox -- {probe} > first.txt 2> first.log; echo "FIRST-STATUS $?"
echo "TEMPLATES $(ls -d cache/templates/run-v1/*/ | wc -l)"
sleep 3
echo "NODE-BEFORE $(date +%s)"
timeout 120 $T ./busybox -- {probe} > a.txt 2> a.log &
a=$!
timeout 120 $T ./busybox -- {probe} > b.txt 2> b.log &
b=$!
wait $a; echo "A-STATUS $?"
wait $b; echo "B-STATUS $?"
echo "NODE-AFTER $(date +%s)"
sed 's/^/A-/' a.txt; sed 's/^/B-/' b.txt; sed 's/^/FIRST-/' first.txt
grep -c 'microVM restored from a snapshot' a.log b.log first.log | sed 's/^/RESTORED /'
grep -c 'template made' first.log a.log | sed 's/^/MADE /'
for t in cache/templates/run-v1/*/vm.state; do head -c 100 "$t" > "$t.cut" && mv "$t.cut" "$t"; done
timeout 120 $T ./busybox -- {probe} > c.txt 2> c.log; echo "C-STATUS $?"
sed 's/^/C-/' c.txt
grep -q 'the template did not restore' c.log && echo "C-FELL-BACK"
timeout 120 $T ./busybox -- {probe} > d.txt 2> d.log; echo "D-STATUS $?"
grep -c 'template made' d.log | sed 's/^/D-MADE /'
grep -c 'microVM restored from a snapshot' d.log | sed 's/^/D-RESTORED /'
echo "TEMPLATES-AT-END $(ls -d cache/templates/run-v1/*/ | wc -l)"
"#
    ));
    r.assert_status(0);
    for tag in ["FIRST", "A", "B", "C", "D"] {
        assert_eq!(
            r.value(&format!("{tag}-STATUS")).as_deref(),
            Some("0"),
            "run {tag}:\n{}",
            r.output
        );
    }
    assert_eq!(r.value("TEMPLATES").as_deref(), Some("1"), "{}", r.output);
    r.assert_contains("MADE first.log:1")
        .assert_contains("MADE a.log:0")
        .assert_contains("RESTORED first.log:1")
        .assert_contains("RESTORED a.log:1")
        .assert_contains("RESTORED b.log:1");
    let rand = |tag: &str| {
        r.value(&format!("{tag}-RAND"))
            .unwrap_or_else(|| panic!("no {tag}-RAND:\n{}", r.output))
    };
    let (a, b, first) = (rand("A"), rand("B"), rand("FIRST"));
    assert_eq!(a.len(), 64, "{}", r.output);
    assert_ne!(a, b, "two clones read the same random bytes:\n{}", r.output);
    assert_ne!(a, first, "{}", r.output);
    let secs = |tag: &str| -> u64 {
        r.value(tag)
            .unwrap_or_else(|| panic!("no {tag}:\n{}", r.output))
            .parse()
            .unwrap()
    };
    let (before, after) = (secs("NODE-BEFORE"), secs("NODE-AFTER"));
    for tag in ["A-CLOCK", "B-CLOCK"] {
        let t = secs(tag);
        assert!(
            (before..=after).contains(&t),
            "{tag} {t} is not the node's time ({before}..={after}): the clone kept the template's clock\n{}",
            r.output
        );
    }
    r.assert_contains("C-FELL-BACK");
    assert!(r.value("C-RAND").is_some(), "{}", r.output);
    r.assert_contains("D-MADE 1")
        .assert_contains("D-RESTORED 1");
    assert_eq!(
        r.value("TEMPLATES-AT-END").as_deref(),
        Some("1"),
        "{}",
        r.output
    );
}
