//! `husk boot`: build a microVM from command-line flags, run it to the end,
//! and turn how it ended into an exit status.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use vmm::config::{FsConfig, MemHotplugConfig};
use vmm::seccomp::SeccompFilters;
use vmm::{
    BlockConfig, BootSource, DriveConfig, MacAddr, NetConfig, SerialOutput, VmConfig, Vmm,
    VsockConfig, DEFAULT_CMDLINE,
};

/// Flags of `husk boot`.
#[derive(Args, Debug)]
pub struct BootArgs {
    /// Guest kernel: an uncompressed ELF vmlinux (fastest) or a bzImage.
    #[arg(long)]
    kernel: PathBuf,
    /// Initramfs (cpio, plain or compressed).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Number of vCPUs online at boot.
    #[arg(long, default_value_t = 1)]
    vcpus: usize,
    /// vCPUs the VM is built with (default: --vcpus): the guest boots with
    /// --vcpus of them online (maxcpus=) and can bring the others online
    /// through /sys/devices/system/cpu/cpuN/online.
    #[arg(long)]
    max_vcpus: Option<usize>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    mem_mib: u64,
    /// Hot-pluggable memory in MiB (a virtio-mem device, 2 MiB blocks,
    /// 128 MiB slots; a multiple of 128), above the guest's RAM and all of
    /// it unplugged at boot. Only an API-driven VMM (`husk --api-sock`)
    /// can ask the guest to plug it.
    #[arg(long, value_name = "MIB")]
    mem_hotplug_mib: Option<u64>,
    /// Where the guest console goes: stdout, file:PATH or none.
    #[arg(long, default_value = "stdout", value_parser = parse_serial)]
    serial: SerialOutput,
    /// A virtio-blk drive: id=ID,path=FILE[,ro][,root]. Repeatable; the root
    /// drive becomes /dev/vda and adds root=/dev/vda to the command line, the
    /// others follow in order (/dev/vdb, ...).
    #[arg(long = "drive", value_name = "SPEC", value_parser = parse_drive)]
    drives: Vec<DriveConfig>,
    /// A virtio-net interface on an existing host tap:
    /// id=ID,tap=TAP[,mac=02:00:00:00:00:01]. Repeatable; eth0, eth1, ... in
    /// the guest, in order.
    #[arg(long = "net", value_name = "SPEC", value_parser = parse_net)]
    net: Vec<NetConfig>,
    /// A virtio-vsock device: cid=CID,uds=PATH. Host programs reach guest
    /// port P by connecting to PATH and sending `CONNECT P\n`; the guest
    /// reaches host port P at PATH_P.
    #[arg(long, value_name = "SPEC", value_parser = parse_vsock)]
    vsock: Option<VsockConfig>,
    /// A virtio-fs device served by a vhost-user backend (virtiofsd)
    /// listening on SOCKET: tag=TAG,socket=SOCKET[,id=ID][,num_queues=N]
    /// [,queue_size=N][,relay=on|off]. Repeatable; the guest mounts it
    /// with `mount -t virtiofs TAG DIR`. Guest memory becomes shared
    /// (memfd) unless every such device relays (relay=on: husk copies
    /// requests and replies through buffers of its own).
    #[arg(long = "fs", value_name = "SPEC", value_parser = parse_fs)]
    fs: Vec<FsConfig>,
    /// Print one JSON line of timings to stderr when the VM ends.
    #[arg(long)]
    timings: bool,
}

fn parse_serial(s: &str) -> Result<SerialOutput, String> {
    match s {
        "stdout" => Ok(SerialOutput::Stdout),
        "none" => Ok(SerialOutput::Sink),
        _ => match s.strip_prefix("file:") {
            Some(p) if !p.is_empty() => Ok(SerialOutput::File(p.into())),
            _ => Err(format!("'{s}' is not stdout, none or file:PATH")),
        },
    }
}

fn parse_drive(spec: &str) -> Result<DriveConfig, String> {
    let (mut id, mut path, mut read_only, mut is_root) = (None, None, false, false);
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("id", v)) => id = Some(v.to_string()),
            Some(("path", v)) => path = Some(PathBuf::from(v)),
            None if part == "ro" => read_only = true,
            None if part == "root" => is_root = true,
            _ => {
                return Err(format!(
                    "unknown drive option '{part}' (want id=,path=,ro,root)"
                ))
            }
        }
    }
    match (id, path) {
        (Some(id), Some(path)) => Ok(DriveConfig {
            block: BlockConfig {
                id,
                path,
                read_only,
            },
            is_root,
        }),
        _ => Err("a drive needs id=ID and path=FILE".into()),
    }
}

fn parse_net(spec: &str) -> Result<NetConfig, String> {
    let (mut id, mut tap, mut mac) = (None, None, None);
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("id", v)) => id = Some(v.to_string()),
            Some(("tap", v)) => tap = Some(v.to_string()),
            Some(("mac", v)) => mac = Some(v.parse::<MacAddr>().map_err(|e| e.to_string())?),
            _ => return Err(format!("unknown net option '{part}' (want id=,tap=,mac=)")),
        }
    }
    match (id, tap) {
        (Some(id), Some(host_dev_name)) => Ok(NetConfig {
            id,
            host_dev_name,
            guest_mac: mac,
        }),
        _ => Err("a network interface needs id=ID and tap=TAP".into()),
    }
}

fn parse_vsock(spec: &str) -> Result<VsockConfig, String> {
    let (mut cid, mut uds) = (None, None);
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("cid", v)) => {
                cid = Some(
                    v.parse::<u32>()
                        .map_err(|_| format!("vsock cid '{v}' is not a number"))?,
                )
            }
            Some(("uds", v)) if !v.is_empty() => uds = Some(PathBuf::from(v)),
            _ => return Err(format!("unknown vsock option '{part}' (want cid=,uds=)")),
        }
    }
    match (cid, uds) {
        (Some(guest_cid), Some(uds_path)) => Ok(VsockConfig {
            guest_cid,
            uds_path,
        }),
        _ => Err("vsock needs cid=CID and uds=PATH".into()),
    }
}

fn parse_fs(spec: &str) -> Result<FsConfig, String> {
    let (mut id, mut tag, mut socket) = (None, None, None);
    let mut num_queues = 1u16;
    let mut queue_size = vmm::config::DEFAULT_FS_QUEUE_SIZE;
    let mut relay = false;
    let number = |k: &str, v: &str| {
        v.parse::<u16>()
            .map_err(|_| format!("fs {k} '{v}' is not a number"))
    };
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("id", v)) => id = Some(v.to_string()),
            Some(("tag", v)) => tag = Some(v.to_string()),
            Some(("socket", v)) if !v.is_empty() => socket = Some(PathBuf::from(v)),
            Some(("num_queues", v)) => num_queues = number("num_queues", v)?,
            Some(("queue_size", v)) => queue_size = number("queue_size", v)?,
            Some(("relay", "on")) => relay = true,
            Some(("relay", "off")) => relay = false,
            _ => {
                return Err(format!(
                    "unknown fs option '{part}' (want tag=,socket=,id=,num_queues=,queue_size=,relay=on|off)"
                ))
            }
        }
    }
    match (tag, socket) {
        (Some(tag), Some(socket)) => {
            let config = FsConfig {
                id: id.unwrap_or_else(|| tag.clone()),
                tag,
                socket,
                num_queues,
                queue_size,
                relay,
            };
            vmm::config::check_fs(std::slice::from_ref(&config)).map_err(|e| e.to_string())?;
            Ok(config)
        }
        _ => Err("a file system needs tag=TAG and socket=SOCKET".into()),
    }
}

/// Boots the VM; returns the process exit status.
pub fn run(args: BootArgs, process_start: Instant, seccomp: &SeccompFilters) -> anyhow::Result<u8> {
    let config = VmConfig {
        vcpus: args.vcpus,
        mem_mib: args.mem_mib,
        boot: BootSource {
            kernel: args.kernel,
            initrd: args.initrd,
            cmdline: args.cmdline,
        },
        serial: args.serial,
        drives: args.drives,
        net: args.net,
        vsock: args.vsock,
        max_vcpus: args.max_vcpus,
        mem_hotplug: args.mem_hotplug_mib.map(MemHotplugConfig::new),
        fs: args.fs,
    };
    let mut vmm = Vmm::new(&config).context("cannot build the microVM")?;
    vmm.start(seccomp).context("cannot start the vCPUs")?;
    let exit = vmm.run().context("the VMM failed while the guest ran")?;
    let code = exit.exit_code();
    match exit {
        _ if exit.is_clean() => tracing::info!(%exit, "microVM ended"),
        vmm::VmExit::Signal(_) => eprintln!("husk: {exit}"),
        _ => eprintln!("husk: guest failure: {exit}"),
    }
    if args.timings {
        let setup_us = vmm
            .first_vcpu_entry()
            .map(|t| t.duration_since(process_start).as_micros() as u64);
        let line = serde_json::json!({
            "setup_before_first_vcpu_entry_us": setup_us,
            "guest_image_load_us": vmm.image_load_time().as_micros() as u64,
            "total_ms": process_start.elapsed().as_millis() as u64,
            "exit": exit.to_string(),
            "exit_code": code,
        });
        eprintln!("{line}");
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fs_flag() {
        let f = parse_fs("tag=vol,socket=/run/fs.sock").unwrap();
        assert_eq!((f.id.as_str(), f.tag.as_str()), ("vol", "vol"));
        assert_eq!(f.socket, PathBuf::from("/run/fs.sock"));
        assert_eq!((f.num_queues, f.queue_size), (1, 1024));
        let f = parse_fs("id=fs0,tag=a,socket=s,num_queues=2,queue_size=256").unwrap();
        assert_eq!((f.id.as_str(), f.num_queues, f.queue_size), ("fs0", 2, 256));
        assert!(parse_fs("tag=vol").unwrap_err().contains("socket="));
        assert!(parse_fs("tag=vol,socket=s,queue_size=1000")
            .unwrap_err()
            .contains("power of two"));
        assert!(parse_fs(&format!("id=x,tag={},socket=s", "t".repeat(37)))
            .unwrap_err()
            .contains("36 bytes"));
        assert!(parse_fs("tag=a,socket=s,cache=always").is_err());
    }

    #[test]
    fn serial_flag() {
        assert_eq!(parse_serial("stdout"), Ok(SerialOutput::Stdout));
        assert_eq!(parse_serial("none"), Ok(SerialOutput::Sink));
        assert_eq!(
            parse_serial("file:/tmp/x"),
            Ok(SerialOutput::File("/tmp/x".into()))
        );
        assert!(parse_serial("file:").is_err());
        assert!(parse_serial("tcp:1").is_err());
    }

    #[test]
    fn drive_flag() {
        let d = parse_drive("id=rootfs,path=/img,ro,root").unwrap();
        assert_eq!(d.block.id, "rootfs");
        assert_eq!(d.block.path, PathBuf::from("/img"));
        assert!(d.block.read_only && d.is_root);
        let d = parse_drive("path=/a,id=b").unwrap();
        assert!(!d.block.read_only && !d.is_root);
        assert!(parse_drive("id=a").is_err());
        assert!(parse_drive("id=a,path=/x,rw").is_err());
    }

    #[test]
    fn net_flag() {
        let n = parse_net("id=eth0,tap=tap0,mac=02:00:00:00:00:01").unwrap();
        assert_eq!(n.id, "eth0");
        assert_eq!(n.host_dev_name, "tap0");
        assert_eq!(n.guest_mac, Some(MacAddr([2, 0, 0, 0, 0, 1])));
        assert_eq!(parse_net("tap=t,id=e").unwrap().guest_mac, None);
        assert!(parse_net("id=eth0").is_err());
        assert!(parse_net("id=eth0,tap=tap0,mac=zz").is_err());
        assert!(parse_net("id=eth0,tap=tap0,mtu=9000").is_err());
    }

    #[test]
    fn vsock_flag() {
        let v = parse_vsock("cid=3,uds=/tmp/v.sock").unwrap();
        assert_eq!((v.guest_cid, v.uds_path), (3, PathBuf::from("/tmp/v.sock")));
        assert!(parse_vsock("cid=x,uds=/a").is_err());
        assert!(parse_vsock("cid=3").is_err());
        assert!(parse_vsock("cid=3,uds=").is_err());
        assert!(parse_vsock("cid=3,uds=/a,port=1").is_err());
    }
}
