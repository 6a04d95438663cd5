//! `husk snapshot` and `husk restore`: snapshots from the command line.
//!
//! `husk snapshot` is a client of a running husk's API socket: it pauses
//! the VM if it runs, writes a full snapshot (`PUT /snapshot/create`), and
//! resumes it unless told to leave it paused. `husk restore` is a VMM
//! like `husk --api-sock`, which loads a snapshot (`PUT /snapshot/load`,
//! with Firecracker's overrides) instead of booting, and runs it until the
//! guest ends.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use vmm::controller::snapshot::{
    DriveOverride, FsOverride, NetworkOverride, SnapshotLoadParams, VsockOverride,
};
use vmm::seccomp::SeccompFilters;

/// `husk snapshot`.
#[derive(Args, Debug)]
pub struct SnapshotArgs {
    /// The running husk's API socket.
    #[arg(long, value_name = "PATH")]
    api_sock: PathBuf,
    /// Where the VM state file goes.
    #[arg(long, value_name = "FILE")]
    snapshot: PathBuf,
    /// Where the guest memory file goes.
    #[arg(long, value_name = "FILE")]
    mem_file: PathBuf,
    /// Leave the VM paused afterwards (it is resumed by default if it ran).
    #[arg(long)]
    keep_paused: bool,
}

/// `husk restore`.
#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The VM state file.
    #[arg(long, value_name = "FILE")]
    snapshot: PathBuf,
    /// The guest memory file.
    #[arg(long, value_name = "FILE")]
    mem_file: PathBuf,
    /// Serve the REST API on this socket too (to pause, snapshot again, ...).
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// The instance id reported by GET /.
    #[arg(long, default_value = "anonymous-instance")]
    id: String,
    /// Attach a network interface to another tap: id=ID,tap=TAP[,mac=MAC].
    #[arg(long = "net", value_name = "SPEC", value_parser = parse_net_override)]
    net: Vec<NetworkOverride>,
    /// Listen for vsock connections on this socket instead of the snapshot's.
    #[arg(long, value_name = "PATH")]
    vsock_uds: Option<PathBuf>,
    /// Open a drive from another file: id=ID,path=PATH (repeatable).
    #[arg(long = "drive", value_name = "SPEC", value_parser = parse_drive_override)]
    drives: Vec<DriveOverride>,
    /// Connect a virtio-fs device to another backend: id=ID,socket=PATH
    /// (repeatable).
    #[arg(long = "fs", value_name = "SPEC", value_parser = parse_fs_override)]
    fs: Vec<FsOverride>,
    /// Leave the VM paused (resume it through --api-sock).
    #[arg(long, requires = "api_sock")]
    paused: bool,
}

fn parse_net_override(spec: &str) -> Result<NetworkOverride, String> {
    let mut o = NetworkOverride {
        iface_id: String::new(),
        host_dev_name: String::new(),
        guest_mac: None,
    };
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("id", v)) => o.iface_id = v.to_string(),
            Some(("tap", v)) => o.host_dev_name = v.to_string(),
            Some(("mac", v)) => o.guest_mac = Some(v.to_string()),
            _ => {
                return Err(format!(
                    "unknown part {part:?}: want id=ID,tap=TAP[,mac=MAC]"
                ))
            }
        }
    }
    if o.iface_id.is_empty() || o.host_dev_name.is_empty() {
        return Err("want id=ID,tap=TAP[,mac=MAC]".to_string());
    }
    Ok(o)
}

/// The `id=...` and one other `KEY=...` of an override spec.
fn two_parts<'a>(spec: &'a str, key: &str) -> Result<(&'a str, &'a str), String> {
    let usage = || format!("want id=ID,{key}=PATH");
    let (mut id, mut value) = (None, None);
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("id", v)) if !v.is_empty() => id = Some(v),
            Some((k, v)) if k == key && !v.is_empty() => value = Some(v),
            _ => return Err(format!("unknown or empty part {part:?}: {}", usage())),
        }
    }
    Ok((id.ok_or_else(usage)?, value.ok_or_else(usage)?))
}

fn parse_drive_override(spec: &str) -> Result<DriveOverride, String> {
    let (id, path) = two_parts(spec, "path")?;
    Ok(DriveOverride {
        drive_id: id.to_string(),
        path_on_host: PathBuf::from(path),
    })
}

fn parse_fs_override(spec: &str) -> Result<FsOverride, String> {
    let (id, socket) = two_parts(spec, "socket")?;
    Ok(FsOverride {
        id: id.to_string(),
        socket: PathBuf::from(socket),
    })
}

/// Runs `husk restore`; returns the exit status of the restored guest.
pub fn restore(args: RestoreArgs, seccomp: &SeccompFilters) -> anyhow::Result<u8> {
    let mut load = SnapshotLoadParams::new(args.snapshot, args.mem_file);
    load.resume_vm = !args.paused;
    load.network_overrides = args.net;
    load.vsock_override = args.vsock_uds.map(|uds_path| VsockOverride { uds_path });
    load.drive_overrides = args.drives;
    load.fs_overrides = args.fs;
    crate::api_cmd::run(
        crate::api_cmd::ApiArgs::for_restore(args.api_sock, args.id, load),
        seccomp,
    )
}

/// One request to a husk API socket; returns the status and body.
fn call(
    sock: &std::path::Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> anyhow::Result<(u16, String)> {
    let mut s = UnixStream::connect(sock)
        .with_context(|| format!("cannot connect to husk's API socket {}", sock.display()))?;
    // A snapshot of a large guest takes its time; a dead husk does not.
    s.set_read_timeout(Some(Duration::from_secs(600)))
        .context("cannot set a timeout on the API socket")?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())
        .context("cannot send the request to husk")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)
        .context("cannot read husk's answer")?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .with_context(|| format!("husk answered something that is not HTTP: {resp:?}"))?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

fn expect_ok(what: &str, (status, body): (u16, String)) -> anyhow::Result<String> {
    if (200..300).contains(&status) {
        return Ok(body);
    }
    let fault = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["fault_message"].as_str().map(str::to_string))
        .unwrap_or(body);
    bail!("{what} refused ({status}): {fault}")
}

/// Runs `husk snapshot`.
pub fn snapshot(args: SnapshotArgs) -> anyhow::Result<u8> {
    let sock = &args.api_sock;
    let info = expect_ok("GET /", call(sock, "GET", "/", None)?)?;
    let state: serde_json::Value =
        serde_json::from_str(&info).context("husk's GET / is not JSON")?;
    let running = match state["state"].as_str() {
        Some("Running") => true,
        Some("Paused") => false,
        other => bail!("the microVM is not started (its state is {other:?})"),
    };
    if running {
        expect_ok(
            "pausing the microVM",
            call(
                sock,
                "PATCH",
                "/vm",
                Some(&serde_json::json!({"state": "Paused"})),
            )?,
        )?;
    }
    let abs = |p: &PathBuf| std::path::absolute(p).unwrap_or_else(|_| p.clone());
    let body = serde_json::json!({
        "snapshot_type": "Full",
        "snapshot_path": abs(&args.snapshot),
        "mem_file_path": abs(&args.mem_file),
    });
    let created = call(sock, "PUT", "/snapshot/create", Some(&body))
        .and_then(|r| expect_ok("the snapshot", r));
    if running && !args.keep_paused {
        expect_ok(
            "resuming the microVM",
            call(
                sock,
                "PATCH",
                "/vm",
                Some(&serde_json::json!({"state": "Resumed"})),
            )?,
        )?;
    }
    created?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_overrides_parse() {
        let o = parse_net_override("id=eth0,tap=tap7,mac=06:00:00:00:00:07").unwrap();
        assert_eq!(
            (o.iface_id.as_str(), o.host_dev_name.as_str()),
            ("eth0", "tap7")
        );
        assert_eq!(o.guest_mac.as_deref(), Some("06:00:00:00:00:07"));
        assert!(parse_net_override("id=eth0").is_err());
        assert!(parse_net_override("tap=tap0").is_err());
        assert!(parse_net_override("id=eth0,tap=t,colour=red").is_err());
    }

    #[test]
    fn drive_and_fs_overrides_parse() {
        let d = parse_drive_override("id=rootfs,path=/pods/a/root.img").unwrap();
        assert_eq!(d.drive_id, "rootfs");
        assert_eq!(d.path_on_host, PathBuf::from("/pods/a/root.img"));
        let f = parse_fs_override("socket=/run/a.sock,id=share").unwrap();
        assert_eq!(
            (f.id.as_str(), f.socket.to_str()),
            ("share", Some("/run/a.sock"))
        );
        assert!(parse_drive_override("id=rootfs").is_err());
        assert!(parse_drive_override("id=rootfs,socket=/x").is_err());
        assert!(parse_fs_override("id=,socket=/x").is_err());
        assert!(parse_fs_override("id=a,socket=/x,tap=t").is_err());
    }
}
