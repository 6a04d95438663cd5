//! `husk check`: would a pod run on this host? What `kata-runtime check`
//! does for Kata, for husk: KVM (a tiny 64-bit guest that makes a syscall
//! from user space, not just `open("/dev/kvm")`), the capabilities, tun,
//! vsock and vhost, cgroup v2, containerd (its version, whether its CRI
//! config names the husk runtime, the shim on its PATH), and what
//! `/etc/husk/config.toml` names (husk, the guest kernel, the agent
//! initramfs). One line per check, OK / WARN / FAIL, with what
//! to do about it; `--json` for machines. The exit status is 0 only when
//! no check failed: a FAIL means a pod would not run, a WARN that one
//! would, with something missing or unusual.
//!
//! [`host`] checks the kernel and the process, [`node`] the tools and
//! files the shim uses (containerd, the husk configuration).

mod host;
mod node;

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use serde::Serialize;

/// Flags of `husk check`.
#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Print one JSON document instead of lines.
    #[arg(long)]
    json: bool,
    /// The shim's configuration (HUSK_SHIM_CONFIG, as the shim reads it).
    #[arg(
        long,
        env = "HUSK_SHIM_CONFIG",
        default_value = node::shim_config::DEFAULT_PATH
    )]
    config: PathBuf,
    /// containerd's configuration file (default: containerd's own default).
    #[arg(long)]
    containerd_config: Option<PathBuf>,
}

/// How one check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Fine.
    Ok,
    /// A pod would run, but something is missing or unusual.
    Warn,
    /// A pod would not run.
    Fail,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        }
    }
}

/// One check's result.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Short name (`kvm`, `containerd-runtime`, ...).
    pub name: &'static str,
    /// OK, WARN or FAIL.
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to do, for WARN and FAIL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    pub(crate) fn ok(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    pub(crate) fn warn(
        name: &'static str,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        Check {
            name,
            status: Status::Warn,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    pub(crate) fn fail(
        name: &'static str,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        Check {
            name,
            status: Status::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    /// The check's one line: `FAIL  kvm: what was found; fix: what to do`.
    pub fn line(&self) -> String {
        let mut line = format!("{:<4}  {}: {}", self.status.label(), self.name, self.detail);
        if let Some(fix) = &self.fix {
            line.push_str(" -- ");
            line.push_str(fix);
        }
        line
    }
}

/// Everything `husk check` reports.
#[derive(Debug, Serialize)]
pub struct Report {
    /// True when no check failed.
    pub pod_would_run: bool,
    /// Each check, in order.
    pub checks: Vec<Check>,
}

/// Runs every check.
pub fn run_checks(args: &CheckArgs) -> Report {
    let mut checks = host::checks();
    checks.extend(node::checks(
        &args.config,
        args.containerd_config.as_deref(),
    ));
    Report {
        pod_would_run: checks.iter().all(|c| c.status != Status::Fail),
        checks,
    }
}

/// Runs `husk check`; exits 0 when a pod would run, 1 when not.
pub fn run(args: CheckArgs) -> anyhow::Result<u8> {
    let report = run_checks(&args);
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        for c in &report.checks {
            writeln!(out, "{}", c.line())?;
        }
        let summary = if report.pod_would_run {
            "a pod would run on this host"
        } else {
            "a pod would not run on this host (see FAIL above)"
        };
        writeln!(out, "husk check: {summary}")?;
    }
    Ok(if report.pod_would_run { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_carries_status_name_detail_and_fix() {
        let c = Check::fail("tun", "/dev/net/tun is missing", "modprobe tun");
        assert_eq!(
            c.line(),
            "FAIL  tun: /dev/net/tun is missing -- modprobe tun"
        );
        assert_eq!(Check::ok("vsock", "fine").line(), "OK    vsock: fine");
    }

    #[test]
    fn json_names_statuses_in_lowercase_and_omits_an_empty_fix() {
        let v = serde_json::to_value(Check::ok("kvm", "runs")).unwrap();
        assert_eq!(v["status"], "ok");
        assert!(v.get("fix").is_none());
        let v = serde_json::to_value(Check::warn("cgroup", "v1", "boot with v2")).unwrap();
        assert_eq!(v["status"], "warn");
        assert_eq!(v["fix"], "boot with v2");
    }
}
