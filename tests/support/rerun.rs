//! A test that runs itself a second time where a real KVM is (in the node
//! VM on these machines): the test binary goes into the payload and runs
//! the same test there, alone, with `HUSK_TEST_RERUN` naming it, so the
//! test's body can tell its two runs apart with [`in_rerun`]. The first run
//! (on this host) builds what the second needs; the second does the work
//! where it can be done (as root, with cgroup v2's every controller, next
//! to a running microVM) and prints what the first one checks.
//!
//! ```text
//! #[test]
//! fn limits_are_enforced_in_the_node_vm() {
//!     if husk_tests::in_rerun() {
//!         return enforce_limits(); // in the node VM
//!     }
//!     Payload::new("limits")
//!         .add(&cargo_binary("husk-agent"), "husk-agent")
//!         .rerun_this_test()
//!         .env("HUSK_TEST_AGENT", "husk-agent")
//!         .run()
//!         .assert_contains("LIMITS-ENFORCED");
//! }
//! ```

use crate::{test_name, Payload, RunResult};

/// Set in a test's second run; its value is the test's name.
const RERUN_ENV: &str = "HUSK_TEST_RERUN";

/// The line the second run's status is reported on.
const STATUS_KEY: &str = "HUSK-TEST-RERUN-STATUS";

/// True in the second run of the calling test, the one [`Rerun::run`]
/// started (and only in that test: the variable names it).
pub fn in_rerun() -> bool {
    std::env::var(RERUN_ENV).is_ok_and(|t| t == test_name())
}

/// The calling test, run again where a real KVM is; made by
/// [`Payload::rerun_this_test`].
pub struct Rerun {
    payload: Payload,
    test: String,
    binary: String,
    env: Vec<(String, String)>,
    before: String,
    after: String,
    time_limit: Option<u64>,
}

/// `s` as one shell word.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl Payload {
    /// Runs the calling test again where a real KVM is (see [`Rerun`]),
    /// with this payload's files beside it.
    pub fn rerun_this_test(self) -> Rerun {
        let test = test_name();
        let exe = std::env::current_exe().expect("the test binary's path");
        let binary = exe
            .file_name()
            .and_then(|n| n.to_str())
            .expect("a test binary named in UTF-8")
            .to_string();
        let payload = self.add(&exe, &binary);
        Rerun {
            payload,
            test,
            binary,
            env: Vec::new(),
            before: String::new(),
            after: String::new(),
            time_limit: None,
        }
    }
}

impl Rerun {
    /// Sets `key` to `value` for the second run. `value` is a shell word
    /// as written (`$PWD/husk-agent` names a file of the payload, which is
    /// the working directory).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Shell commands (sh) run first, in the same shell (a microVM the
    /// test then talks to, started in the background).
    pub fn before(mut self, script: &str) -> Self {
        self.before = script.to_string();
        self
    }

    /// Shell commands run after the second run, whatever its outcome, in
    /// the same shell (what the first run checks as well, such as how the
    /// microVM ended).
    pub fn after(mut self, script: &str) -> Self {
        self.after = script.to_string();
        self
    }

    /// Ends the second run after `secs` (coreutils' `timeout`), so a hang
    /// leaves time for `after` and for the node's own diagnosis.
    pub fn time_limit(mut self, secs: u64) -> Self {
        self.time_limit = Some(secs);
        self
    }

    /// Runs it and returns what the node printed; panics with that output
    /// unless the second run ran exactly this test and the test passed.
    pub fn run(self) -> RunResult {
        let mut line = format!("{RERUN_ENV}={}", quote(&self.test));
        for (key, value) in &self.env {
            line += &format!(" {key}={value}");
        }
        if let Some(secs) = self.time_limit {
            line += &format!(" timeout {secs}");
        }
        line += &format!(
            " ./{} --exact {} --include-ignored --nocapture --test-threads 1",
            quote(&self.binary),
            quote(&self.test)
        );
        let script = format!(
            "{before}\n{line}\necho \"{STATUS_KEY} $?\"\n{after}\n",
            before = self.before,
            after = self.after
        );
        let r = self.payload.run(&script);
        let status = r.value(STATUS_KEY);
        assert_eq!(
            status.as_deref(),
            Some("0"),
            "the second run of {} (where a real KVM is) failed; what the node printed:\n{}",
            self.test,
            r.output
        );
        // `--exact` with a name that matches nothing runs no test and
        // exits 0: that must not pass.
        assert!(
            r.output.contains("test result: ok. 1 passed;"),
            "the second run of {} did not run it:\n{}",
            self.test,
            r.output
        );
        r
    }
}
