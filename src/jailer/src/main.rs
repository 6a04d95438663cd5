//! `husk-jailer`: starts one husk process confined the way a production
//! host runs it. Given an id, a uid/gid, a chroot base and a cgroup parent,
//! it checks its arguments, closes inherited descriptors, builds
//! `<base>/<exec name>/<id>/root` with the husk binary and /dev/kvm,
//! /dev/net/tun and /dev/urandom, creates and joins the VM's cgroup with the
//! given limits, optionally joins a network namespace, switches its root to
//! the jail in a new mount namespace, optionally forks into a new pid
//! namespace, drops to the uid/gid with no capabilities and execs husk.
//! docs/security.md explains each step and how to run it in production.
//!
//! Exit status: 1 when a check or step fails (the message names it), 2 for
//! usage errors; otherwise husk's own status (the jailer becomes husk).

mod args;
mod cgroup;
mod chroot;
mod error;
mod process;

use std::convert::Infallible;
use std::process::ExitCode;

use clap::Parser;

use crate::args::Config;
use crate::error::{Error, Result};

/// Does every step; returns only on failure (success is the exec).
fn run(cfg: Config) -> Result<Infallible> {
    // SAFETY: geteuid has no arguments and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(Error::NotRoot(euid));
    }
    // First, so nothing inherited leaks into the jail or is touched by the
    // steps below.
    process::close_inherited_fds(&cfg.keep_fds)?;
    let jail = match &cfg.chroot_dir {
        Some(root) => chroot::use_root(root, &cfg.exec_name)?,
        None => chroot::prepare_dirs(&cfg.chroot_base_dir, &cfg.exec_name, &cfg.id)?,
    };
    let exec = chroot::install_exec(&jail, &cfg.exec_file)?;
    chroot::make_devices(&jail, cfg.uid, cfg.gid)?;
    chroot::prepare_binds(&jail, &cfg.binds)?;
    if cfg.cgroup {
        cgroup::setup(
            cfg.cgroup_version,
            &cfg.parent_cgroup,
            &cfg.id,
            &cfg.cgroups,
        )?;
    }
    if let Some(netns) = &cfg.netns {
        process::join_netns(netns)?;
    }
    let exec = exec.as_ref().map(|f| (cfg.exec_file.as_path(), f));
    if chroot::enter(&jail, exec, &cfg.binds)? == chroot::RootSwitch::MoveAndChroot {
        eprintln!(
            "husk-jailer: the host's root is an initramfs, which pivot_root cannot leave; \
             moved the jail over / and chrooted instead"
        );
    }
    if cfg.new_pid_ns {
        process::enter_new_pid_ns(cfg.uid, cfg.gid)?;
    }
    process::drop_privileges(cfg.uid, cfg.gid)?;
    Err(process::exec(&jail.exec_in_jail, &cfg.husk_args, &[]))
}

fn main() -> ExitCode {
    let cli = args::Cli::parse();
    let Err(err) = cli.validate().and_then(run);
    // The error and its causes, once each: "cannot create directory /srv/
    // jail/husk: Permission denied (os error 13)".
    eprintln!("husk-jailer: {:#}", anyhow::Error::new(err));
    ExitCode::FAILURE
}
