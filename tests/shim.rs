//! containerd-shim-husk-v2 under Debian's containerd, in the node VM: `ctr
//! run --runtime io.containerd.husk.v2` of a locally imported busybox image
//! runs the container in a microVM (its kernel is the guest's, not the
//! node's), prints its output and returns its exit code; exec, pause,
//! resume, kill, delete, a terminal (`ctr run -t`); a killed VMM ends the task with a non-zero status
//! and leaves nothing behind; a killed shim is cleaned up by containerd's
//! `delete`; repeated create/delete cycles leak no processes, mounts,
//! files or descriptors.

use husk_tests::containerd::{self, Containerd, IMAGE};
use husk_tests::{cargo_binary, host_tool, Payload};

fn containerd_payload(name: &str) -> Payload {
    containerd_payload_with(name, Containerd::V1_6)
}

fn containerd_payload_with(name: &str, version: Containerd) -> Payload {
    containerd::payload_with(name, version).add(&cargo_binary("husk-pty"), "husk-pty")
}

fn with_containerd(script: &str) -> String {
    containerd::script("", script)
}

fn run(name: &str, script: &str) -> husk_tests::RunResult {
    containerd_payload(name).run(&with_containerd(script))
}

/// Also: host bind mounts (a directory read-only, a file read-write) reach
/// the container as copies on its volumes disk; its writes stay in the VM.
/// The image's layers are cached once and shared read-only under each
/// container's own writable layer; a `--rootfs` directory is copied whole.
#[test]
fn ctr_runs_a_container_in_a_microvm() {
    let r = run(
        "shim-ctr-run",
        &format!(
            r#"echo "NODE-KERNEL $(uname -r)"
# Root filesystems as disks here (the image cache, writable layers, a
# whole copy); through the pod's share in the other tests.
echo 'rootfs = "block"' >> /etc/husk/config.toml
mkdir -p vol/sub && echo from-the-host > vol/sub/f && echo one-file > file.txt
# What confines the pod's husk, seen from the node while it runs.
jail_probe() {{
  for i in $(seq 100); do
    for p in /proc/[0-9]*; do
      if tr '\0' ' ' < $p/cmdline 2>/dev/null | grep -q "^husk --api-sock /run/api.sock --id hello"; then
        echo "JAIL-UID $(awk '/^Uid:/ {{print $2, $3, $4, $5}}' $p/status)"
        echo "JAIL-CAPS $(awk '/^CapEff:/ {{print $2}}' $p/status)"
        # The shim makes the metrics file once husk answers on its socket.
        for j in $(seq 100); do [ -e $p/root/metrics.json ] && break; sleep 0.1; done
        echo "JAIL-ROOT $(ls $p/root | tr '\n' ' ')"
        echo "JAIL-CGROUP $(cat $p/cgroup)"
        return
      fi
    done
    sleep 0.1
  done
}}
jail_probe > /tmp/jail-probe &
ctr run --rm --runtime io.containerd.husk.v2 \
  --mount type=bind,src=$PWD/vol,dst=/data,options=rbind:ro \
  --mount type=bind,src=$PWD/file.txt,dst=/etc/motd,options=rbind:rw \
  {IMAGE} hello sh -c '
    sleep 2; echo "GUEST-KERNEL $(uname -r)"; echo hello-from-husk
    echo "VOL-DIR $(cat /data/sub/f)"; echo "VOL-FILE $(cat /etc/motd)"
    touch /data/new 2>/dev/null && echo "VOL-RO writable" || echo "VOL-RO refused"
    echo changed > /etc/motd && echo "VOL-RW $(cat /etc/motd)"
    echo "ROOT-FS $(awk "\$2==\"/\" {{print \$3}}" /proc/mounts)"
    echo kept > /written && echo "ROOT-WRITE $(cat /written)"
    exit 7'
echo "CTR-EXIT $?"
wait; cat /tmp/jail-probe
echo "HOST-FILE $(cat file.txt)"
# The image's layers were copied once into the cache; a second container
# of the image uses that file (not rebuilt) under a fresh writable layer.
echo "CACHED $(ls /var/lib/husk/images/*.ext4 | wc -l)"
inode=$(stat -c %i /var/lib/husk/images/*.ext4)
ctr run --rm --runtime io.containerd.husk.v2 {IMAGE} again sh -c \
  'test -e /written && echo "FRESH no" || echo "FRESH yes"'
[ "$(stat -c %i /var/lib/husk/images/*.ext4)" = "$inode" ] && echo "REUSED yes" || echo "REUSED no"
# A rootfs given as a directory (no mounts) is copied whole instead.
mkdir -p /tmp/image-root && ctr image mount {IMAGE} /tmp/image-root > /dev/null
ctr run --rm --runtime io.containerd.husk.v2 --rootfs /tmp/image-root whole sh -c \
  'echo "WHOLE-FS $(awk "\$2==\"/\" {{print \$3}}" /proc/mounts)"'
ctr image unmount /tmp/image-root > /dev/null
echo "HUSK-LEFT $(husk_count)"
echo "STATE-LEFT $(ls /run/husk/default 2>/dev/null | wc -l)"
"#
        ),
    );
    r.assert_contains("hello-from-husk");
    assert_eq!(r.value("CTR-EXIT").as_deref(), Some("7"), "{}", r.output);
    for (key, want) in [
        ("VOL-DIR", "from-the-host"),
        ("VOL-FILE", "one-file"),
        ("VOL-RO", "refused"),
        ("VOL-RW", "changed"),
        // The node's own file (the pod's virtio-fs share): the
        // container's write reached it.
        ("HOST-FILE", "changed"),
        // The image's shared layers under the container's writable layer.
        ("ROOT-FS", "overlay"),
        ("ROOT-WRITE", "kept"),
        ("CACHED", "1"),
        ("FRESH", "yes"),
        ("REUSED", "yes"),
        ("WHOLE-FS", "ext4"),
    ] {
        assert_eq!(r.value(key).as_deref(), Some(want), "{key}:\n{}", r.output);
    }
    let node = r.value("NODE-KERNEL").expect("node kernel");
    let guest = r.value("GUEST-KERNEL").expect("guest kernel");
    assert_ne!(
        node, guest,
        "the container ran on the node's kernel:\n{}",
        r.output
    );
    assert_eq!(r.value("HUSK-LEFT").as_deref(), Some("0"), "{}", r.output);
    assert_eq!(r.value("STATE-LEFT").as_deref(), Some("0"), "{}", r.output);
    jailed(&r, "/default/hello");
}

/// The pod's husk ran jailed (docs/security.md): one unprivileged uid
/// (real, effective, saved and filesystem) from the shim's pool, no
/// capabilities, the pod's directory as its root (its own files, the
/// kernel, the agent and the image cache, none of the node's), and the
/// pod's cgroup.
fn jailed(r: &husk_tests::RunResult, cgroup: &str) {
    let uids = r.value("JAIL-UID").unwrap_or_default();
    let ids: Vec<u64> = uids.split(' ').filter_map(|u| u.parse().ok()).collect();
    assert!(
        ids.len() == 4 && ids.iter().all(|&u| u == ids[0] && u > 1_800_000_000),
        "husk's uids {uids:?}:\n{}",
        r.output
    );
    assert_eq!(
        r.value("JAIL-CAPS").as_deref(),
        Some("0000000000000000"),
        "{}",
        r.output
    );
    let root = r.value("JAIL-ROOT").unwrap_or_default();
    let entries: Vec<&str> = root.split_whitespace().collect();
    for want in [
        "husk",
        "dev",
        "run",
        "vmlinux",
        "initrd",
        "images",
        "metrics.json",
    ] {
        assert!(
            entries.contains(&want),
            "no {want} in husk's root {entries:?}:\n{}",
            r.output
        );
    }
    for node_only in ["etc", "usr", "proc", "bin"] {
        assert!(
            !entries.contains(&node_only),
            "{node_only} in husk's root {entries:?}"
        );
    }
    assert_eq!(
        r.value("JAIL-CGROUP").as_deref(),
        Some(format!("0::{cgroup}").as_str()),
        "{}",
        r.output
    );
}

#[test]
fn exec_pause_resume_kill_and_delete() {
    lifecycle("shim-lifecycle", Containerd::V1_6);
}

/// The same task API calls from containerd 1.7 and its ctr (Debian 13's).
#[test]
fn exec_pause_resume_kill_and_delete_with_containerd_1_7() {
    lifecycle("shim-lifecycle-containerd17", Containerd::V1_7);
}

/// exec, ps, metrics, pause, resume, kill, delete and a terminal, through
/// `version`'s ctr.
fn lifecycle(name: &str, version: Containerd) {
    let r = containerd_payload_with(name, version).run(&with_containerd(
        &format!(
            r#"R="--runtime io.containerd.husk.v2"
ctr run -d $R {IMAGE} long sleep 600; echo "RUN-D $?"
ctr task exec --exec-id e1 long sh -c 'echo exec-says-hi; exit 3'; echo "EXEC-EXIT $?"
ctr task ps long | tail -n +2 | wc -l | sed 's/^/PIDS /'
ctr task metrics long > metrics.txt 2>&1; echo "METRICS-EXIT $?"; grep -i -m1 memory metrics.txt
ctr task pause long; ctr task ls | grep '^long ' | awk '{{print "PAUSED-STATUS " $3}}'
ctr task resume long; ctr task ls | grep '^long ' | awk '{{print "RESUMED-STATUS " $3}}'
ctr task exec --exec-id e2 long true; echo "EXEC-AFTER-RESUME $?"
ctr task kill -s SIGKILL long
wait_stopped long
remove long
# A terminal: ctr run -t (on a 40x120 pty) gets the container's tty, sized
# by ResizePty, and its exit status.
timeout 90 ./husk-pty 40x120 ctr run -t --rm $R {IMAGE} tty1 sh -c 'echo "TTY $(tty)"; echo "TTY-SIZE $(stty size)"; exit 5' > tty.raw
echo "TTY-EXIT $?"
tr -d '\r' < tty.raw
ctr task ls | grep tty1 && for p in /proc/[0-9]*; do echo "$(cat $p/comm 2>/dev/null) $(cat $p/wchan 2>/dev/null) $(ls -l $p/fd 2>/dev/null | grep -c pts)"; done | grep -v " 0$"
sleep 1
echo "HUSK-LEFT $(husk_count)"
echo "STATE-LEFT $(ls /run/husk/default 2>/dev/null | wc -l)"
"#
        ),
    ));
    let ran = r.value("CONTAINERD-VERSION").unwrap_or_default();
    assert!(
        ran.starts_with(version.version_prefix()),
        "containerd {ran:?} ran, not {version:?}:\n{}",
        r.output
    );
    for (key, want) in [
        ("RUN-D", "0"),
        ("EXEC-EXIT", "3"),
        ("METRICS-EXIT", "0"),
        ("PAUSED-STATUS", "PAUSED"),
        ("RESUMED-STATUS", "RUNNING"),
        ("EXEC-AFTER-RESUME", "0"),
        // ctr task rm warns about the task's status: SIGKILL.
        ("TASK-RM", "137"),
        ("TTY-SIZE", "40 120"),
        ("TTY-EXIT", "5"),
        ("HUSK-LEFT", "0"),
        ("STATE-LEFT", "0"),
    ] {
        assert_eq!(r.value(key).as_deref(), Some(want), "{key}:\n{}", r.output);
    }
    r.assert_contains("exec-says-hi");
    let tty = r.value("TTY").unwrap_or_default();
    assert!(tty.starts_with("/dev/"), "tty {tty:?}:\n{}", r.output);
    let pids: u32 = r.value("PIDS").and_then(|p| p.parse().ok()).unwrap_or(0);
    assert!(pids >= 1, "no processes listed:\n{}", r.output);
}

#[test]
fn a_killed_vmm_ends_the_task_and_leaves_nothing() {
    let r = run(
        "shim-vmm-killed",
        &format!(
            r#"echo 'console_log_kib = 16' >> /etc/husk/config.toml
ctr run -d --privileged --runtime io.containerd.husk.v2 {IMAGE} doomed sleep 600; echo "RUN-D $?"
# The guest prints on its console as fast as it can for 6 s (a privileged
# container has the guest's /dev/ttyS0; about 14 KB/s in the node VM, each
# byte a trap to husk): husk.log must stay near its cap.
echo "FLOOD-BYTES $(ctr task exec --exec-id flood doomed sh -c 'timeout 6 yes husk-console-flood | tee /dev/ttyS0 | wc -c')"
sleep 2
echo "LOG-BYTES $(stat -c %s /run/husk/default/doomed/husk.log)"
echo "LOG1-BYTES $(stat -c %s /run/husk/default/doomed/husk.log.1)"
kill -9 "$(cat /run/husk/default/doomed/husk.pid)"; echo "KILL $?"
wait_stopped doomed
ctr task ls | grep '^doomed ' | awk '{{print "AFTER-KILL " $3}}'
echo "STATE-LEFT $(ls /run/husk/default 2>/dev/null | wc -l)"
remove doomed
sleep 1
echo "HUSK-LEFT $(husk_count)"
echo "SHIM-LEFT $(shim_pids | wc -l)"
"#
        ),
    );
    for (key, want) in [
        ("RUN-D", "0"),
        ("KILL", "0"),
        ("AFTER-KILL", "STOPPED"),
        ("STATE-LEFT", "0"),
        ("TASK-RM", "255"),
        ("HUSK-LEFT", "0"),
        ("SHIM-LEFT", "0"),
    ] {
        assert_eq!(r.value(key).as_deref(), Some(want), "{key}:\n{}", r.output);
    }
    // Both files near the 16 KiB cap: each holds at most the cap plus what
    // the guest printed between two of the keeper's checks (a second).
    let bytes = |key: &str| -> u64 {
        r.value(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key}:\n{}", r.output))
    };
    let (flood, log, log1) = (
        bytes("FLOOD-BYTES"),
        bytes("LOG-BYTES"),
        bytes("LOG1-BYTES"),
    );
    let cap = 16 << 10;
    assert!(
        flood > 2 * cap,
        "the flood was too slow to test the cap: {flood} bytes"
    );
    assert!(
        log1 > cap,
        "husk.log was never rotated: {log1} bytes in husk.log.1"
    );
    assert!(
        log <= cap + flood / 2 && log1 <= cap + flood / 2,
        "husk.log {log}, husk.log.1 {log1} bytes after {flood} bytes in 6 s"
    );
}

#[test]
fn a_killed_shim_is_cleaned_up_by_delete() {
    let r = run(
        "shim-killed",
        &format!(
            r#"# A volume through the pod's share: delete after the crash detaches
# it and keeps what it holds.
mkdir -p keepvol && echo kept-data > keepvol/f
ctr run -d --runtime io.containerd.husk.v2 --mount type=bind,src=$PWD/keepvol,dst=/keep,options=rbind \
  {IMAGE} orphan sleep 600; echo "RUN-D $?"
echo "SHARE-MOUNTED $(grep -c 'orphan[.]share/entries/v0' /proc/self/mountinfo)"
echo "HUSK-BEFORE $(husk_count)"
kill -9 $(shim_pids '.*-id orphan '); echo "KILL $?"
i=0; while [ "$(husk_count)" != 0 ] || [ -e /run/husk/default/orphan ]; do sleep 0.2; i=$((i+1)); [ $i -gt 100 ] && break; done
echo "HUSK-LEFT $(husk_count)"
echo "STATE-LEFT $(ls /run/husk/default 2>/dev/null | wc -l)"
echo "SHARE-MOUNTS-LEFT $(grep -c '[.]share' /proc/self/mountinfo)"
echo "VIRTIOFSD-LEFT $(grep -lx virtiofsd /proc/[0-9]*/comm 2>/dev/null | wc -l)"
echo "KEEPVOL $(cat keepvol/f)"
ctr task rm orphan > /dev/null 2>&1; ctr container rm orphan; echo "CONTAINER-RM $?"
# Killed while it copies a volume (volumes = "copy"): the copier's mounts
# were never the node's, and go with it; the volume itself is untouched.
echo 'volumes = "copy"' >> /etc/husk/config.toml
mkdir -p bigvol && for i in 1 2; do yes husk-volume-data | head -c 33554432 > bigvol/f$i; done
# One grep over every command line, not two processes per pid: under
# load that loop took longer than the copy, which came and went unseen.
# (The node's busybox has no pgrep.)
copier() {{ grep -l "[c]opy-image" /proc/[0-9]*/cmdline 2>/dev/null | cut -d/ -f3; }}
ctr run -d --runtime io.containerd.husk.v2 --mount type=bind,src=$PWD/bigvol,dst=/vol,options=rbind:ro \
  {IMAGE} midcopy true > midcopy.out 2>&1 &
i=0; until [ -n "$(copier)" ]; do sleep 0.05; i=$((i+1)); [ $i -gt 1200 ] && break; done
echo "COPIER-SEEN $([ -n "$(copier)" ] && echo yes || echo no)"
echo "COPY-MOUNTS-NODE $(grep -c husk-volumes /proc/self/mountinfo)"
kill -9 $(shim_pids '.*-id midcopy ')
wait
i=0; while [ -n "$(copier)" ] || [ "$(husk_count)" != 0 ]; do sleep 0.2; i=$((i+1)); [ $i -gt 100 ] && break; done
echo "COPIER-LEFT $(copier | wc -l)"
ctr task rm midcopy > /dev/null 2>&1; ctr container rm midcopy > /dev/null 2>&1
echo "MOUNTS-LEFT $(grep -c -e husk-volumes -e /run/husk /proc/self/mountinfo)"
echo "VOLUME-KEPT $(cat bigvol/* | wc -c)"
echo "STATE-LEFT-2 $(ls /run/husk/default 2>/dev/null | wc -l)"
"#
        ),
    );
    for (key, want) in [
        ("RUN-D", "0"),
        ("SHARE-MOUNTED", "1"),
        ("HUSK-BEFORE", "1"),
        ("KILL", "0"),
        ("HUSK-LEFT", "0"),
        ("STATE-LEFT", "0"),
        ("SHARE-MOUNTS-LEFT", "0"),
        ("VIRTIOFSD-LEFT", "0"),
        ("KEEPVOL", "kept-data"),
        ("CONTAINER-RM", "0"),
        ("COPIER-SEEN", "yes"),
        ("COPY-MOUNTS-NODE", "0"),
        ("COPIER-LEFT", "0"),
        ("MOUNTS-LEFT", "0"),
        ("VOLUME-KEPT", "67108864"),
        ("STATE-LEFT-2", "0"),
    ] {
        assert_eq!(r.value(key).as_deref(), Some(want), "{key}:\n{}", r.output);
    }
}

/// Create/delete cycles leave the node as they found it: processes (with a
/// command line, so not kernel threads), mounts, files under /run/husk,
/// containerd's descriptors, network links, containers and snapshots.
///
/// Twenty cycles, about 7-9 s each in the node VM (a hundred were 17
/// minutes of a 60-minute CI budget; `HUSK_SHIM_CYCLES=100` is the soak), run as node
/// boots of ten (`HUSK_SHIM_CYCLES`, `HUSK_SHIM_CYCLE_CHUNK` change the
/// numbers), each compared with its own before. That finds every leak one
/// long run would: each cycle lies in a boot that counts before and after
/// it. It is done so because this node's own kernel stops or panics now
/// and then under this churn of VMs created and destroyed (about once in
/// 40-100 VMs; see docs/testing.md): run.sh boots a failed node once more,
/// and a chunk whose node failed twice is run once more here, so a short
/// chunk almost always gets through, where one 15-minute run rarely did.
///
/// Two failures of the guest under this node's emulation (QEMU TCG
/// emulating AMD SVM) are counted and shown rather than failing the test,
/// up to three in all, because a failed create has to leave nothing
/// behind just the same, which is what this test checks: a guest boot that
/// ends in a triple fault (about one in a hundred, met in the net test
/// too; KVM on AMD resets the vCPU's state on the fault, so the evidence is
/// gone), and a guest whose agent stops answering (the rare vsock stall of
/// docs/devices.md: one full CI run met it at cycle 34, when the failed
/// create still left its shim and VM behind; the shim now stops the VM,
/// and `a_create_the_agent_never_answers_fails_and_leaves_nothing` covers
/// that path on purpose). Neither is understood. Any other failure, or
/// more of them, fails the test.
#[test]
fn create_delete_cycles_leak_nothing() {
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|c| c.parse().ok())
            .filter(|&n| n > 0)
            .unwrap_or(default)
    };
    let cycles = env("HUSK_SHIM_CYCLES", 20);
    let chunk = env("HUSK_SHIM_CYCLE_CHUNK", 10);
    let (mut done, mut faults, mut boots) = (0, 0, 0);
    while done < cycles {
        let n = chunk.min(cycles - done);
        let mut r = cycle_chunk(done, n);
        boots += 1;
        if r.status == 125 && r.output.contains("run.sh: again,") {
            // The node's own kernel failed on both of run.sh's boots.
            eprintln!(
                "cycles {done}..{}: the node failed twice; once more",
                done + n
            );
            r = cycle_chunk(done, n);
            boots += 1;
        }
        assert_eq!(
            r.value("CYCLES-FAILED").as_deref(),
            Some("0"),
            "cycles {done}..{}:\n{}",
            done + n,
            r.output
        );
        let before = r.value("BEFORE").expect("before");
        let after = r.value("AFTER").expect("after");
        assert_eq!(
            before,
            after,
            "something leaked in cycles {done}..{}:\n{}",
            done + n,
            r.output
        );
        for line in r.output.lines().filter(|l| l.contains("GUEST-FAILURE:")) {
            eprintln!("{line}");
        }
        faults += r
            .value("GUEST-FAILURES")
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0);
        assert!(
            faults <= 3,
            "{faults} guest failures in {} cycles:\n{}",
            done + n,
            r.output
        );
        done += n;
    }
    eprintln!("{cycles} cycles in {boots} node runs, {faults} guest failures, nothing leaked");
}

/// Shell functions for tests that compare the node before and after
/// (`warm_up IMAGE` prints BEFORE, `settle N` AFTER):
/// `cmdlines` lists every process with a command line, less what comes and
/// goes by itself (the tools counting them, the node init's heartbeat and
/// deadline sleeps, and the subshells of the script and of init, copies of
/// their command lines); `snapshot` prints one line of everything a pod
/// could leak (processes, mounts, files under /run/husk, containerd's
/// descriptors, network links, containers and snapshots).
const SNAPSHOT_SH: &str = r#"cmdlines() {
  for p in /proc/[0-9]*; do c=$(tr '\0\n' '  ' < $p/cmdline 2>/dev/null | cut -c1-100); [ -n "$c" ] && echo "$c"; done |
    grep -v -E '^(tr|cut|sort|wc|ls|find|pidof|ctr|awk|grep|sed|sleep)( |$)' | sort |
    awk '/^(sh -c |\/bin\/busybox sh \/init)/ { if (seen[$0]++) next } { print }'
}
snapshot() {
  echo "procs=$(cmdlines | wc -l) mounts=$(wc -l < /proc/mounts) files=$(find /run/husk 2>/dev/null | wc -l) containerd_fds=$(ls /proc/$(pidof containerd)/fd | wc -l) links=$(ls /sys/class/net | wc -l) containers=$(ctr containers ls -q | wc -l) snapshots=$(ctr snapshots ls | wc -l)"
}
# One container of image $1 first (containerd opens what it keeps open on
# its first task), then BEFORE.
warm_up() {
  ctr run --rm --runtime io.containerd.husk.v2 "$1" warm true
  sleep 1
  before=$(snapshot); cmdlines > procs.before
  echo "BEFORE $before"
}
# Waits up to $1 half-seconds for the node to be as BEFORE (what went last
# may still be on its way out), then prints AFTER and, if it differs, the
# processes and files that do.
settle() {
  for i in $(seq $1); do [ "$(snapshot)" = "$before" ] && break; sleep 0.5; done
  after=$(snapshot)
  echo "AFTER $after"
  if [ "$after" != "$before" ]; then
    cmdlines > procs.after
    diff procs.before procs.after | sed 's/^/PROCS-DIFF /'
    find /run/husk | sed 's/^/FILE-LEFT /'
  fi
}
"#;

/// Cycles `first..first + n` in one node VM (run.sh may boot it twice):
/// prints BEFORE and AFTER (what the cycles could leak), GUEST-FAILURES and
/// CYCLES-FAILED.
fn cycle_chunk(first: u64, n: u64) -> husk_tests::RunResult {
    containerd_payload(&format!("shim-cycles-{first}"))
        .timeout(300 + 20 * n)
        .run(&with_containerd(&format!(
            r#"{SNAPSHOT_SH}
warm_up {IMAGE}
n={first}; failed=0; faults=0
while [ $n -lt {end} ]; do
  # A cycle that hangs is a failure with its evidence, not a hung test.
  if ! timeout 120 ctr run --rm --runtime io.containerd.husk.v2 {IMAGE} cycle$n sh -c 'echo cycle' > cycle.out 2>&1; then
    if grep -q -e "triple-faulted" -e "the agent did not answer" cycle.out && [ $faults -lt 3 ]; then
      # See the test's comment: counted, and it must leave nothing either.
      faults=$((faults+1))
      echo "CYCLE $n GUEST-FAILURE: $(cut -c1-400 cycle.out)"
    else
      failed=$((failed+1))
      echo "CYCLE $n FAILED:"; cat cycle.out
      echo "--- its VM's log"; tail -n 40 /run/husk/default/cycle$n/husk.log 2>/dev/null
      break
    fi
  fi
  n=$((n+1))
done
echo "GUEST-FAILURES $faults"
settle 30
echo "CYCLES-FAILED $failed"
"#,
            end = first + n
        )))
}

/// The agent stops answering once the pod's VM is up (the cycle test met
/// it as a guest whose vsock stalled; here the VM is paused through husk's
/// API while the shim copies the container's volume): Create fails with a
/// clear error within the configured agent timeout, and the pod's VM,
/// shim, state and containerd records go with it: the node is as before.
#[test]
fn a_create_the_agent_never_answers_fails_and_leaves_nothing() {
    let r = containerd_payload("shim-agent-silent")
        .add(&host_tool("curl"), "curl")
        .run(&with_containerd(&format!(
            r#"{SNAPSHOT_SH}
echo 'agent_timeout_secs = 10' >> /etc/husk/config.toml
# A volume whose copy (volumes = "copy") keeps the shim busy for a while
# after the VM is up (not zeros: mke2fs would skip those).
echo 'volumes = "copy"' >> /etc/husk/config.toml
warm_up {IMAGE}
mkdir -p bigvol && for i in 1 2; do yes husk-volume-data | head -c 33554432 > bigvol/f$i; done
dir=/run/husk/default/silent
start=$(date +%s)
ctr run --rm --runtime io.containerd.husk.v2 --mount type=bind,src=$PWD/bigvol,dst=/vol,options=rbind:ro \
  {IMAGE} silent true > silent.out 2>&1 &
ctr_pid=$!
# The container's rootfs image appears once the agent has answered the
# sandbox's set-up, before the volume is copied and the container created.
i=0; until [ -e $dir/rootfs-silent.ext4 ]; do sleep 0.02; i=$((i+1)); [ $i -gt 6000 ] && break; done
echo "PAUSE $(./curl -s -o /dev/null -w '%{{http_code}}' --unix-socket $dir/run/api.sock -X PATCH \
  -H 'Content-Type: application/json' -d '{{"state": "Paused"}}' http://localhost/vm)"
wait $ctr_pid; echo "CTR-EXIT $?"
echo "CTR-SAYS $(tr '\n' ' ' < silent.out | cut -c1-300)"
echo "FAILED-AFTER $(( $(date +%s) - start ))"
settle 120
echo "SETTLED-AFTER $(( $(date +%s) - start ))"
# The shim stopped its VM itself and exited when containerd asked, rather
# than being cleaned up as a dead shim.
echo "SHUTDOWN-FAILED $(grep -c 'failed to shutdown shim task' containerd.log)"
"#
        )));
    assert_eq!(r.value("PAUSE").as_deref(), Some("204"), "{}", r.output);
    assert_ne!(r.value("CTR-EXIT").as_deref(), Some("0"), "{}", r.output);
    let says = r.value("CTR-SAYS").unwrap_or_default();
    assert!(
        says.contains("agent did not answer"),
        "ctr said {says:?}:\n{}",
        r.output
    );
    assert_eq!(r.value("BEFORE"), r.value("AFTER"), "{}", r.output);
    assert_eq!(
        r.value("SHUTDOWN-FAILED").as_deref(),
        Some("0"),
        "{}",
        r.output
    );
}

/// A pod network namespace as CNI's bridge plugin leaves it (a veth with
/// the pod's address, a default route through the node's end), handed to
/// the shim with `ctr run --with-ns`: the pod's IP answers from the node,
/// and the container reaches the node, through the tap the shim joined
/// with the veth. The tap and the redirect go with the pod, and with a
/// pod whose husk was killed before its task is reported exited.
#[test]
fn the_pod_network_reaches_the_guest() {
    let r = run(
        "shim-network",
        &format!(
            r#"# busybox sh runs its own applet for a bare `ip`: iproute2 by path.
IP=$PWD/ip TC=$PWD/tc
$IP netns add pod1
$IP link add veth-node type veth peer name eth0 netns pod1
$IP addr add 10.88.0.1/24 dev veth-node && $IP link set veth-node up
$IP -n pod1 link set lo up && $IP -n pod1 addr add 10.88.0.2/24 dev eth0 && $IP -n pod1 link set eth0 up
$IP -n pod1 route add default via 10.88.0.1
mkdir -p www && echo hello-from-the-node > www/index.html
busybox httpd -p 10.88.0.1:9090 -h www
ctr run -d --runtime io.containerd.husk.v2 --with-ns network:/run/netns/pod1 {IMAGE} web   sh -c 'mkdir -p /tmp/www && echo hello-from-the-pod > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www'
echo "RUN-D $?"
# (The node's busybox wget crashes on the host's glibc; nc does not.)
get() {{ printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 2 "$1" "$2" 2>/dev/null | tail -n 1; }}
i=0; until out=$(get 10.88.0.2 8080) && [ -n "$out" ]; do sleep 0.5; i=$((i+1)); [ $i -gt 40 ] && break; done
echo "NODE-TO-POD $out"
echo "POD-TO-NODE $(ctr task exec --exec-id get web wget -q -O - http://10.88.0.1:9090/)"
echo "GUEST-ADDR $(ctr task exec --exec-id addr web ip -o -4 addr show dev eth0 | awk '{{print $4}}')"
echo "TAP-BEFORE $($IP -n pod1 -o link | grep -c husktap0)"
ctr task kill -s SIGKILL web
wait_stopped web
remove web > /dev/null
sleep 1
echo "TAP-AFTER $($IP -n pod1 -o link | grep -c husktap0)"
echo "QDISC-AFTER $($TC -n pod1 qdisc show dev eth0 | grep -c ingress)"
# The same namespace for a pod whose husk is killed: the shim unwires it
# before it reports the task exited.
ctr run -d --runtime io.containerd.husk.v2 --with-ns network:/run/netns/pod1 {IMAGE} doomed sleep 600
echo "RUN-D2 $?"
echo "TAP-BEFORE-KILL $($IP -n pod1 -o link | grep -c husktap0)"
kill -9 "$(cat /run/husk/default/doomed/husk.pid)"
wait_stopped doomed
echo "TAP-AFTER-KILL $($IP -n pod1 -o link | grep -c husktap0)"
echo "QDISC-AFTER-KILL $($TC -n pod1 qdisc show dev eth0 | grep -c ingress)"
remove doomed
"#
        ),
    );
    for (key, want) in [
        ("RUN-D", "0"),
        ("NODE-TO-POD", "hello-from-the-pod"),
        ("POD-TO-NODE", "hello-from-the-node"),
        ("GUEST-ADDR", "10.88.0.2/24"),
        ("TAP-BEFORE", "1"),
        ("TAP-AFTER", "0"),
        ("QDISC-AFTER", "0"),
        ("RUN-D2", "0"),
        ("TAP-BEFORE-KILL", "1"),
        ("TAP-AFTER-KILL", "0"),
        ("QDISC-AFTER-KILL", "0"),
        ("TASK-RM", "255"),
    ] {
        assert_eq!(r.value(key).as_deref(), Some(want), "{key}:\n{}", r.output);
    }
}

/// On the host, with no guest needed: a kernel path that does not exist
/// makes containerd's Create fail with husk's own fault message, and the
/// shim leaves no husk, no state and no shim behind.
#[test]
fn a_bad_kernel_fails_create_with_a_clear_error_and_leaves_nothing() {
    use std::process::{Command, Stdio};
    let dir = std::env::temp_dir().join(format!("husk-shim-host-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    containerd::busybox_tar(&dir, "busybox.tar", None);
    let tar = dir.join("busybox.tar");
    let state = dir.join("husk-state");
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "kernel = \"{0}/no-such-vmlinux\"\ninitrd = \"{0}/no-such.cpio\"\nhusk_binary = \"{1}\"\nstate_dir = \"{2}\"\n",
            dir.display(),
            // Static: the shim jails it (the jailer is beside the shim).
            husk_tests::static_husk().display(),
            state.display()
        ),
    )
    .unwrap();
    let shim_dir = cargo_binary("containerd-shim-husk-v2");
    let path = format!(
        "{}:{}",
        shim_dir.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let sock = dir.join("containerd.sock");
    let mut containerd = Command::new(host_tool("containerd"))
        .arg("--root")
        .arg(dir.join("root"))
        .arg("--state")
        .arg(dir.join("state"))
        .arg("--address")
        .arg(&sock)
        .env("PATH", &path)
        .env("HUSK_SHIM_CONFIG", &config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start containerd");
    let ctr = |args: &[&str]| {
        Command::new(host_tool("ctr"))
            .arg("--address")
            .arg(&sock)
            .args(args)
            .output()
            .expect("run ctr")
    };
    let mut waited = 0;
    while !sock.exists() && waited < 300 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        waited += 1;
    }
    assert!(ctr(&["image", "import", tar.to_str().unwrap()])
        .status
        .success());
    let out = ctr(&[
        "run",
        "--rm",
        "--runtime",
        "io.containerd.husk.v2",
        IMAGE,
        "badkernel",
        "true",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    // What is left: husk processes of this test, the pod's state, shims.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let leftover_pods = std::fs::read_dir(state.join("default"))
        .map(|d| d.count())
        .unwrap_or(0);
    let shims = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read(e.path().join("cmdline"))
                .map(|c| {
                    let c = String::from_utf8_lossy(&c).into_owned();
                    c.contains("containerd-shim-husk-v2") && c.contains(sock.to_str().unwrap())
                })
                .unwrap_or(false)
        })
        .count();
    let _ = containerd.kill();
    let _ = containerd.wait();
    // containerd's overlay mounts under its root go with it.
    let _ = Command::new("umount")
        .arg("-R")
        .arg(dir.join("root"))
        .stderr(Stdio::null())
        .status();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success(), "ctr run succeeded without a kernel");
    assert!(
        stderr.contains("kernel image") && stderr.contains("no-such-vmlinux"),
        "the error does not say what is wrong: {stderr}"
    );
    assert_eq!(leftover_pods, 0, "the pod's state was left behind");
    assert_eq!(shims, 0, "the shim is still running");
}
