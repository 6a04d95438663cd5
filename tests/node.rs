//! resources/node/run.sh's account of the node VM's own failures: a node
//! whose kernel fails before the command finished is booted once more,
//! and each failure is recorded with its cause for the test command's
//! closing line (resources/test.sh), so a second boot is never hidden in a
//! pass. The tests make the node fail on purpose (a command that sees
//! `husk_node.boot=2` on its kernel's command line on the second boot;
//! a node kernel whose init never starts), recorded in a file of the
//! test's own, not the suite's; always
//! in the node VM, never on this host (a panic would be this host's).

use std::path::PathBuf;

use husk_tests::{test_label, Payload};

/// An empty file for run.sh's record, under target/tmp.
fn record_file(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/tmp
    let dir = exe
        .ancestors()
        .nth(3)
        .expect("test binary lives in target/<profile>/deps")
        .join("tmp");
    std::fs::create_dir_all(&dir).expect("create target/tmp");
    let file = dir.join(format!("node-failures-{name}-{}", std::process::id()));
    std::fs::write(&file, "").expect("create the record");
    file
}

/// The record's lines, split at its tabs: label, cause, evidence, outcome.
fn records(file: &std::path::Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(file)
        .expect("read the record")
        .lines()
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect()
}

/// The record (removed after reading) holds two failures of `cause` with
/// `evidence`, this test's: the first booted the node again, the second
/// gave up.
fn assert_failed_twice_and_given_up(
    file: &std::path::Path,
    output: &str,
    cause: &str,
    evidence: &str,
) {
    let rec = records(file);
    let _ = std::fs::remove_file(file);
    assert_eq!(rec.len(), 2, "{rec:?}\n{output}");
    for (line, outcome) in rec.iter().zip(["booted again", "gave up"]) {
        assert_eq!(line[0], test_label(), "{rec:?}");
        assert_eq!(line[1], cause, "{rec:?}");
        assert!(line[2].contains(evidence), "{rec:?}");
        assert_eq!(line[3], outcome, "{rec:?}");
    }
}

/// Only on the node's first boot: what its kernel's watchdog prints when
/// both CPUs are stuck, which run.sh acts on (a real soft lockup cannot be
/// made to order).
const LOCKUP_ON_FIRST_BOOT: &str = "
if grep -qw husk_node.boot=2 /proc/cmdline; then echo SECOND-BOOT; exit 0; fi
echo FIRST-BOOT-OUTPUT
echo '[   42.000000] watchdog: BUG: soft lockup - CPU#1 stuck for 26s! [husk:123]'
sleep 120";

#[test]
fn a_node_that_locked_up_is_booted_again_and_recorded() {
    let file = record_file("lockup");
    let r = Payload::new("node-lockup")
        .in_the_node_vm()
        .record_node_failures_in(&file)
        .run(LOCKUP_ON_FIRST_BOOT);
    r.assert_status(0)
        .assert_contains("SECOND-BOOT")
        .assert_contains("run.sh: the node VM's kernel locked up");
    // The command ran again from its start; only the last boot's output
    // is the run's (a scenario's lines are not read twice). The first
    // boot's shows only in run.sh's report on stderr (the console's tail),
    // which follows the command's output.
    let (command_output, report) = r
        .output
        .split_once("run.sh: the node VM's kernel locked up")
        .expect("run.sh's report");
    assert_eq!(command_output.trim(), "SECOND-BOOT", "{}", r.output);
    assert!(report.contains("FIRST-BOOT-OUTPUT"), "{}", r.output);
    let rec = records(&file);
    let _ = std::fs::remove_file(&file);
    assert_eq!(rec.len(), 1, "{rec:?}\n{}", r.output);
    assert_eq!(rec[0][0], test_label(), "{rec:?}");
    assert_eq!(rec[0][1], "soft lockup", "{rec:?}");
    assert!(rec[0][2].contains("soft lockup - CPU#1"), "{rec:?}");
    assert_eq!(rec[0][3], "booted again", "{rec:?}");
}

#[test]
fn a_node_that_panicked_on_both_boots_is_recorded_twice_and_given_up() {
    let file = record_file("panic");
    // A real panic of the node's kernel (sysrq's crash), on every boot.
    let r = Payload::new("node-panic")
        .in_the_node_vm()
        .record_node_failures_in(&file)
        .run("echo c > /proc/sysrq-trigger; sleep 120");
    r.assert_status(125)
        .assert_contains("booting it again")
        .assert_contains("run.sh: again, the node VM's kernel panicked");
    assert_failed_twice_and_given_up(&file, &r.output, "panic", "Kernel panic - not syncing");
}

#[test]
fn a_node_that_never_reaches_its_init_is_given_up_after_its_start_timeout() {
    let file = record_file("no-start");
    // The node's kernel runs busybox's sleep as its init, on both boots:
    // no heartbeat ever, nothing on the console, as when a node hung in
    // its own boot (once in CI, where it cost the test run.sh's whole 600
    // s). 20 s rather than the default 60 keeps this test short.
    let r = Payload::new("node-no-start")
        .in_the_node_vm()
        .record_node_failures_in(&file)
        .env("HUSK_NODE_START_TIMEOUT", "20")
        .env("HUSK_NODE_APPEND", "rdinit=/bin/busybox -- sleep 600")
        .run("echo NEVER-HERE");
    r.assert_status(125)
        .assert_contains("booting it again")
        .assert_contains("run.sh: again, the node VM's kernel stopped (no heartbeat in the");
    assert!(!r.output.contains("NEVER-HERE"), "{}", r.output);
    assert_failed_twice_and_given_up(&file, &r.output, "silent stop", "s since it started");
}
