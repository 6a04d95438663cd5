//! virtio-fs: husk's vhost-user frontend against virtiofsd (the virtio-fs
//! project's own daemon, built by resources/lib.sh) on one side and the
//! guest kernel's virtiofs driver on the other, in the node VM. What the
//! guest writes is read back on the node by plain shell tools, and what
//! the node wrote is checked in the guest.

use husk_tests::{
    agent_initrd, artifacts, busybox_rootfs, husk_on_host, initrd_with_script, virtiofsd, Payload,
    RunResult,
};

const CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off quiet";

/// Starts virtiofsd on `share/` in the background (`$v` its pid) and waits
/// for its socket; virtiofsd serves one VM and exits when it goes.
///
/// Its namespace sandbox pivots its root into the shared directory, which
/// Linux refuses while the root is the initramfs the node VM runs from (a
/// real node's root is a mounted file system): so here it runs chrooted
/// into a bind mount of the node's root, in a mount namespace of its own.
const START_VIRTIOFSD: &str = r#"mkdir -p share /tmp/virtiofsd-root
    unshare -m sh -c 'mount --rbind / /tmp/virtiofsd-root &&
      exec chroot /tmp/virtiofsd-root "$0/virtiofsd" --socket-path="$0/fs.sock" \
        --shared-dir="$0/share" --sandbox=namespace --log-level=warn' "$PWD" \
      > virtiofsd.log 2>&1 &
    v=$!
    i=0; while [ ! -S fs.sock ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
    [ -S fs.sock ] || { cat virtiofsd.log; exit 20; }"#;

fn run(name: &str, guest_script: &str, node_script: &str) -> RunResult {
    let initrd = initrd_with_script(name, guest_script);
    let a = artifacts();
    once_more_after_a_guest_stall(name, || {
        Payload::new(name)
            .add(&a.husk, "husk")
            .add(&a.vmlinux, "vmlinux")
            .add(&initrd, "initrd.cpio")
            .add(&virtiofsd(), "virtiofsd")
            .run(node_script)
    })
}

/// Runs `attempt`, and once more if the guest stalled in it: husk stopped
/// by the test's timeout with the guest making no progress. That is the
/// rare guest stall of issue 22 (seen once here during virtio-fs traffic,
/// the stopped vCPU's RIP in module space with no modules, as in the
/// vsock stall recorded there), not this device's doing as far as is
/// known; the first attempt's output goes to the log as evidence for
/// that issue, and a second stall fails the test.
fn once_more_after_a_guest_stall(name: &str, attempt: impl Fn() -> RunResult) -> RunResult {
    let r = attempt();
    if !r.output.contains("vCPU stopped by a signal") {
        return r;
    }
    eprintln!(
        "fs: {name}: the guest stalled (issue 22); running it once more. First attempt:\n{}",
        r.output
    );
    attempt()
}

#[test]
fn a_host_directory_is_shared_both_ways_with_guest_memory_shared_and_relayed() {
    // 10 MiB each way, checksummed on both sides; a directory made and a
    // file renamed in the guest are seen on the node. Twice in one node
    // run: with guest memory shared with virtiofsd (the default), and
    // with husk relaying (relay=on), where virtiofsd must map nothing of
    // guest memory, only husk's relay buffers.
    let guest =
        "mkdir -p /mnt && mount -t virtiofs share /mnt || { dmesg | grep -i virtio; exit 1; }
        echo \"GUEST-READ-SHA $(sha256sum /mnt/host.bin | cut -d' ' -f1)\"
        yes 'husk virtio-fs test data' | head -c 10485760 > /mnt/guest.bin || exit 2
        echo \"GUEST-WRITE-SHA $(sha256sum /mnt/guest.bin | cut -d' ' -f1)\"
        mkdir /mnt/dir && echo from-the-guest > /mnt/dir/f && mv /mnt/dir/f /mnt/dir/g || exit 3
        echo \"GUEST-FSTYPE $(grep ' /mnt ' /proc/mounts | cut -d' ' -f3)\"
        echo GUEST-WROTE
        sleep 1
        umount /mnt || exit 4";
    let r = run(
        "fs-both-ways",
        guest,
        &format!(
            "both_ways() {{
             mode=$1
             rm -rf share console.txt && mkdir -p share && head -c 10485760 /dev/urandom > share/host.bin
             echo \"$mode-NODE-HOST-SHA $(sha256sum share/host.bin | cut -d' ' -f1)\"
             {START_VIRTIOFSD}
             timeout 120 ./husk boot --kernel vmlinux --initrd initrd.cpio --mem-mib 256 \
               --cmdline '{CMDLINE}' --fs tag=share,socket=fs.sock,relay=$mode \
               --serial file:console.txt &
             h=$!
             i=0; while ! grep -q GUEST-WROTE console.txt 2>/dev/null && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done
             # What virtiofsd (every process of it) maps of husk's memfds.
             for p in /proc/[0-9]*; do
               [ \"$(cat $p/comm 2>/dev/null)\" = virtiofsd ] && grep -o 'memfd:[a-z-]*' $p/maps
             done | sort -u | sed \"s/^/$mode-VIRTIOFSD-MAPS /\"
             wait $h
             echo \"$mode-HUSK-STATUS $?\"
             timeout 10 sh -c \"while kill -0 $v 2>/dev/null; do sleep 0.1; done\" \
               && echo \"$mode-VIRTIOFSD ended\" || echo \"$mode-VIRTIOFSD still running\"
             sed \"s/^/$mode-/\" console.txt
             echo \"$mode-NODE-GUEST-SHA $(sha256sum share/guest.bin | cut -d' ' -f1)\"
             echo \"$mode-NODE-RENAMED $(cat share/dir/g) $(ls share/dir | tr '\\n' ' ')\"
             cat virtiofsd.log
             }}
             both_ways off
             both_ways on"
        ),
    );
    for mode in ["off", "on"] {
        for needle in [
            "HUSK-STATUS 0",
            "HUSK-GUEST-TEST-STATUS 0",
            "GUEST-FSTYPE virtiofs",
            "NODE-RENAMED from-the-guest g ",
            // virtiofsd serves one frontend: husk's exit ends it.
            "VIRTIOFSD ended",
        ] {
            r.assert_contains(&format!("{mode}-{needle}"));
        }
        let v = |k: &str| r.value(&format!("{mode}-{k}"));
        let host = v("NODE-HOST-SHA").expect("node checksum");
        assert_eq!(host.len(), 64, "{}", r.output);
        assert_eq!(v("GUEST-READ-SHA"), Some(host), "{mode}\n{}", r.output);
        let written = v("GUEST-WRITE-SHA").expect("guest checksum");
        assert_eq!(v("NODE-GUEST-SHA"), Some(written), "{mode}\n{}", r.output);
    }
    // Shared, virtiofsd maps guest memory; relayed, only the relay's
    // buffers.
    let maps = |mode: &str| -> Vec<&str> {
        r.output
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("{mode}-VIRTIOFSD-MAPS ")))
            .map(str::trim)
            .collect()
    };
    assert_eq!(maps("off"), vec!["memfd:husk-guest-ram"], "{}", r.output);
    assert_eq!(maps("on"), vec!["memfd:husk-fs-relay"], "{}", r.output);
}

#[test]
fn a_killed_backend_is_noticed_and_the_vm_still_stops() {
    // virtiofsd is killed while the guest has the share mounted: husk
    // notices the hang-up (DEVICE_NEEDS_RESET, one error line), keeps
    // running the guest, which then resets the VM as usual. The guest's
    // late request to the share is never answered (Linux's virtiofs has
    // no timeout), so the guest resets without syncing; it must not take
    // the VMM down with it.
    let guest =
        "mkdir -p /mnt && mount -t virtiofs share /mnt || { dmesg | grep -i virtio; exit 1; }
        echo \"GUEST-SEES $(cat /mnt/marker)\"
        echo GUEST-MOUNTED
        sleep 4
        (ls /mnt > /dev/null 2>&1 &)
        sleep 1
        echo GUEST-DONE
        # Without a sync: syncing the share would wait for good too.
        reboot -n -f";
    let r = run(
        "fs-killed-backend",
        guest,
        &format!(
            "mkdir -p share && echo here > share/marker
             {START_VIRTIOFSD}
             timeout 120 ./husk boot --log-level warn --kernel vmlinux --initrd initrd.cpio \
               --mem-mib 256 --cmdline '{CMDLINE}' --fs tag=share,socket=fs.sock \
               --serial file:console.txt 2> husk.log &
             h=$!
             i=0; while ! grep -q GUEST-MOUNTED console.txt 2>/dev/null && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done
             kill -9 $v
             echo NODE-KILLED-VIRTIOFSD
             wait $h; echo \"HUSK-STATUS $?\"
             cat console.txt; cat husk.log"
        ),
    );
    r.assert_contains("GUEST-SEES here")
        .assert_contains("NODE-KILLED-VIRTIOFSD")
        .assert_contains("GUEST-DONE")
        .assert_contains("HUSK-STATUS 0")
        .assert_contains("virtio-fs device needs a reset")
        .assert_contains("disconnected");
}

#[test]
fn a_missing_backend_is_a_clear_error() {
    // No socket at all: husk says which and builds nothing (on the host:
    // the VM is never run).
    let dir = std::env::temp_dir().join(format!("husk-fs-missing-{}", std::process::id()));
    let socket = dir.join("absent.sock");
    let a = artifacts();
    let r = husk_on_host(&[
        "boot",
        "--kernel",
        a.vmlinux.to_str().expect("utf-8 path"),
        "--fs",
        &format!("tag=share,socket={}", socket.display()),
    ]);
    assert_ne!(r.status, 0, "{}", r.output);
    r.assert_contains("cannot set up file system \"share\"")
        .assert_contains("cannot connect to the vhost-user backend at")
        .assert_contains("absent.sock");
}

/// virtiofsd behind a wrapper that gives it a root pivot_root can leave
/// (see [`START_VIRTIOFSD`]); `husk run --virtiofsd` starts it with
/// whatever arguments, one per volume.
const BOUND_VIRTIOFSD: &str = r#"#!/bin/sh
exec unshare -m sh -c 'mkdir -p /tmp/virtiofsd-root && mount --rbind / /tmp/virtiofsd-root &&
  exec chroot /tmp/virtiofsd-root "$0" "$@"' "$(dirname "$(readlink -f "$0")")/virtiofsd" "$@"
"#;

#[test]
fn husk_run_shares_volumes_both_ways_and_a_read_only_one_refuses_writes() {
    // `husk run -v`: each volume is a virtio-fs device with a virtiofsd of
    // its own, the agent binds the share where the container wants it.
    let a = artifacts();
    let p = Payload::new("fs-run-volumes")
        .add(&a.husk, "husk")
        .add(&a.vmlinux, "vmlinux")
        .add(agent_initrd(), "agent.cpio")
        .add(&virtiofsd(), "virtiofsd")
        .write("virtiofsd-bound", BOUND_VIRTIOFSD.as_bytes());
    busybox_rootfs(p.path());
    let r = once_more_after_a_guest_stall("fs-run-volumes", || {
        p.run(
        "chmod +x virtiofsd-bound
         mkdir -p vol conf && echo from-the-node > vol/in && echo kept > conf/file
         HUSK_CACHE_DIR=./cache timeout 120 ./husk run --kernel vmlinux --agent-initrd agent.cpio \
           --virtiofsd ./virtiofsd-bound -v \"$PWD/vol:/data\" -v \"$PWD/conf:/etc/app:ro\" ./busybox -- \
           sh -c 'echo \"IN $(cat /data/in)\"; echo from-the-container > /data/out && mkdir /data/made &&
                  if echo x > /etc/app/file; then echo RO-WRITE accepted; else echo RO-WRITE refused; fi;
                  echo \"CONF $(cat /etc/app/file)\"; grep -c virtiofs /proc/mounts | sed \"s/^/MOUNTS /\"'
         echo \"STATUS $?\"
         # Restored from the template the first run made (one per volume
         # count), with this run's own virtiofsd.
         HUSK_CACHE_DIR=./cache timeout 120 ./husk run --kernel vmlinux --agent-initrd agent.cpio \
           --virtiofsd ./virtiofsd-bound -v \"$PWD/vol:/data\" -v \"$PWD/conf:/etc/app:ro\" ./busybox -- \
           sh -c 'echo \"AGAIN $(cat /data/out)\"'
         echo \"TEMPLATES $(ls -d cache/templates/run-v1/*/ | wc -l)\"
         echo \"NODE-OUT $(cat vol/out)\"; ls vol | tr '\\n' ' ' | sed 's/^/NODE-LS /'; echo
         echo \"NODE-CONF $(cat conf/file)\"
         sleep 0.5
         # (The node's busybox has no pgrep.)
         if grep -qx virtiofsd /proc/[0-9]*/comm 2>/dev/null; then echo VIRTIOFSD-LEFT; else echo VIRTIOFSD-GONE; fi
         sleep 30 & s=$!; sleep 0.2
         grep -qx sleep /proc/[0-9]*/comm 2>/dev/null && echo CHECK-SEES; kill $s",
    )
    });
    r.assert_contains("STATUS 0")
        .assert_contains("IN from-the-node")
        .assert_contains("NODE-OUT from-the-container")
        .assert_contains("RO-WRITE refused")
        .assert_contains("CONF kept")
        .assert_contains("NODE-CONF kept")
        .assert_contains("MOUNTS 2")
        .assert_contains("AGAIN from-the-container")
        .assert_contains("TEMPLATES 1")
        .assert_contains("VIRTIOFSD-GONE")
        // The process check sees a process that runs.
        .assert_contains("CHECK-SEES");
    let ls = r.value("NODE-LS").unwrap_or_default();
    assert!(
        ls.contains("made") && ls.contains("out") && ls.contains("in"),
        "{}",
        r.output
    );
}

#[test]
fn a_killed_husk_run_takes_its_virtiofsd_with_it() {
    // husk killed while its virtiofsd is not yet listening: a virtiofsd
    // that has had its frontend ends when that goes, but this one never
    // had one and would listen forever (seen in CI: a husk run killed by
    // SIGTERM while it made a template). SIGKILL leaves husk no time to
    // stop anything: the kernel must end virtiofsd with husk.
    let a = artifacts();
    let p = Payload::new("fs-run-killed")
        .add(&a.husk, "husk")
        .add(&a.vmlinux, "vmlinux")
        .add(agent_initrd(), "agent.cpio")
        .add(&virtiofsd(), "virtiofsd")
        .write("virtiofsd-bound", BOUND_VIRTIOFSD.as_bytes())
        .write(
            "virtiofsd-slow",
            b"#!/bin/sh\nsleep 3\nexec \"$(dirname \"$(readlink -f \"$0\")\")/virtiofsd-bound\" \"$@\"\n",
        );
    busybox_rootfs(p.path());
    let r = p.run(
        "chmod +x virtiofsd-bound virtiofsd-slow
         mkdir -p vol
         count() { grep -lx virtiofsd /proc/[0-9]*/comm 2>/dev/null | wc -l; }
         HUSK_CACHE_DIR=./cache ./husk run --kernel vmlinux --agent-initrd agent.cpio --no-template \
           --virtiofsd ./virtiofsd-slow -v \"$PWD/vol:/data\" ./busybox -- true & pid=$!
         sleep 1
         kill -9 $pid; wait $pid 2>/dev/null
         sleep 6
         echo \"AFTER $(count)\"",
    );
    assert_eq!(r.value("AFTER").as_deref(), Some("0"), "{}", r.output);
}
