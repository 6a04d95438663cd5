//! Debian's containerd in the node VM, for the shim and CRI tests: a
//! payload with containerd, ctr, husk, the shim, the guest kernel, the
//! agent and the bundled busybox image, and the script preamble that
//! starts containerd from it (resources/containerd/start-in-node.sh).
//! The containerd is the host's (Debian 12's 1.6) unless a test asks for
//! Debian 13's 1.7 ([`Containerd`]).

use std::path::{Path, PathBuf};

use crate::{agent_initrd, artifacts, cargo_binary, host_tool, husk_with_cache, Payload};

/// The busybox image's name in containerd (ctr's namespace).
pub const IMAGE: &str = "busybox:latest";

/// Writes the bundled busybox image as an OCI archive `tar` in `dir`;
/// with `named`, under that name and with that default command.
pub fn busybox_tar(dir: &Path, tar: &str, named: Option<(&str, &[&str])>) {
    busybox_tar_with(dir, tar, named, &[]);
}

/// As [`busybox_tar`], with more arguments to `husk image build-busybox`
/// (`--busybox PATH`, `--add PROGRAM`).
pub fn busybox_tar_with(dir: &Path, tar: &str, named: Option<(&str, &[&str])>, more: &[&str]) {
    let layout = dir.join(format!("{tar}.layout"));
    let mut args = vec![
        "image",
        "build-busybox",
        layout.to_str().expect("utf-8 path"),
    ];
    args.extend(more);
    if let Some((name, cmd)) = named {
        args.extend(["--ref", name, "--"]);
        args.extend(cmd);
    }
    husk_with_cache(&args, &dir.join("cache"));
    let st = std::process::Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(dir.join(tar))
        .arg(".")
        .status()
        .expect("run tar");
    assert!(st.success());
    std::fs::remove_dir_all(&layout).expect("remove the layout");
    let _ = std::fs::remove_dir_all(dir.join("cache"));
}

/// Which containerd a payload carries: its binaries (containerd, ctr and
/// containerd-shim-runc-v2) come from the same package.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Containerd {
    /// The host's, Debian 12's containerd package (1.6).
    V1_6,
    /// Debian 13's containerd package (1.7), which `husk_containerd17` in
    /// resources/lib.sh unpacks and names in `HUSK_CONTAINERD17_DIR`.
    V1_7,
}

impl Containerd {
    /// The start of the version `containerd --version` reports, which
    /// start-in-node.sh prints as `CONTAINERD-VERSION <version>`.
    pub fn version_prefix(self) -> &'static str {
        match self {
            Containerd::V1_6 => "1.6.",
            Containerd::V1_7 => "1.7.",
        }
    }

    /// The package's program `name` (containerd, ctr,
    /// containerd-shim-runc-v2).
    pub fn binary(self, name: &str) -> PathBuf {
        match self {
            Containerd::V1_6 => host_tool(name),
            Containerd::V1_7 => {
                let dir = std::env::var_os("HUSK_CONTAINERD17_DIR").unwrap_or_else(|| {
                    panic!(
                        "HUSK_CONTAINERD17_DIR is not set: resources/test.sh (husk_build_images, \
                         husk_containerd17 in resources/lib.sh) unpacks Debian 13's containerd \
                         1.7 and names it there"
                    )
                });
                let path = Path::new(&dir).join("usr/bin").join(name);
                assert!(
                    path.exists(),
                    "{} is missing: HUSK_CONTAINERD17_DIR must be where husk_containerd17 \
                     (resources/lib.sh) unpacked Debian 13's containerd package",
                    path.display()
                );
                path
            }
        }
    }
}

/// A payload with containerd (the host's, 1.6), ctr, husk, the shim, the
/// guest kernel, the agent, mke2fs, iproute2, virtiofsd (behind
/// virtiofsd-in-node.sh) and the bundled busybox image as an OCI archive
/// (busybox.tar).
pub fn payload(name: &str) -> Payload {
    payload_with(name, Containerd::V1_6)
}

/// [`payload`] with the containerd and ctr of `containerd`.
pub fn payload_with(name: &str, containerd: Containerd) -> Payload {
    let a = artifacts();
    // The shim starts a static husk through the jailer beside it.
    let p = Payload::new(name)
        .add(crate::static_husk(), "husk")
        .add(&cargo_binary("husk-jailer"), "husk-jailer")
        .add(
            &cargo_binary("containerd-shim-husk-v2"),
            "containerd-shim-husk-v2",
        )
        .add(&a.vmlinux, "vmlinux")
        .add(agent_initrd(), "agent.cpio")
        .add(&containerd.binary("containerd"), "containerd")
        .add(&containerd.binary("ctr"), "ctr")
        .add(&host_tool("mke2fs"), "mke2fs")
        // iproute2 (the shim wires the pod's network with ip and tc).
        .add(&host_tool("ip"), "ip")
        .add(&host_tool("tc"), "tc")
        .add(
            &crate::repo_root().join("resources/containerd/start-in-node.sh"),
            "start-in-node.sh",
        )
        // Each pod's share is served by a virtiofsd of its own.
        .add(&crate::virtiofsd(), "virtiofsd")
        .add(
            &crate::repo_root().join("resources/containerd/virtiofsd-in-node.sh"),
            "virtiofsd-in-node.sh",
        );
    busybox_tar(p.path(), "busybox.tar", None);
    p
}

/// Debian's CNI plugins (containernetworking-plugins).
const CNI_DIR: &str = "/usr/lib/cni";

/// The iptables extensions the portmap CNI plugin's rules use.
const XTABLES_DIR: &str = "/usr/lib/x86_64-linux-gnu/xtables";
const XTABLES: [&str; 14] = [
    "libxt_standard.so",
    "libxt_comment.so",
    "libxt_multiport.so",
    "libxt_tcp.so",
    "libxt_udp.so",
    "libxt_mark.so",
    "libxt_MARK.so",
    "libxt_MASQUERADE.so",
    "libxt_DNAT.so",
    "libxt_SNAT.so",
    "libxt_NAT.so",
    "libxt_addrtype.so",
    "libxt_conntrack.so",
    "libipt_icmp.so",
];

/// [`payload`] plus what containerd's CRI plugin needs: runc and its shim,
/// the bridge, host-local, loopback and portmap CNI plugins under cni/
/// (with iptables, the nft flavour, and its extensions under xtables/,
/// for portmap's host ports), the pod
/// sandbox image (pause.tar: busybox sleeping), busybox under a full name
/// (cri-busybox.tar) and the husk-cri client. containerd is the host's
/// (1.6).
pub fn cri_payload(name: &str) -> Payload {
    cri_payload_with(name, Containerd::V1_6)
}

/// [`cri_payload`] with the containerd, ctr and runc shim of `containerd`
/// (runc itself is the host's either way).
pub fn cri_payload_with(name: &str, containerd: Containerd) -> Payload {
    let mut p = payload_with(name, containerd)
        .add(&host_tool("runc"), "runc")
        .add(
            &containerd.binary("containerd-shim-runc-v2"),
            "containerd-shim-runc-v2",
        )
        .add(&cargo_binary("husk-cri"), "husk-cri");
    std::fs::create_dir_all(p.path().join("cni")).expect("mkdir cni");
    for plugin in ["bridge", "host-local", "loopback", "portmap"] {
        let src = Path::new(CNI_DIR).join(plugin);
        assert!(
            src.exists(),
            "{} is missing (resources/test.sh installs containernetworking-plugins)",
            src.display()
        );
        p = p.add(&src, &format!("cni/{plugin}"));
    }
    // xtables-nft-multi is iptables by the name it is called with.
    p = p.add(&host_tool("xtables-nft-multi"), "iptables");
    std::fs::create_dir_all(p.path().join("xtables")).expect("mkdir xtables");
    for lib in XTABLES {
        p = p.add(&Path::new(XTABLES_DIR).join(lib), &format!("xtables/{lib}"));
    }
    busybox_tar(
        p.path(),
        "pause.tar",
        Some(("husk.local/pause:1", &["sleep", "2147483647"])),
    );
    busybox_tar(
        p.path(),
        "cri-busybox.tar",
        Some(("husk.local/busybox:1", &["sh"])),
    );
    let dynamic = dynamic_busybox();
    busybox_tar_with(
        p.path(),
        "cri-busybox-dynamic.tar",
        Some((DYNAMIC_IMAGE, &["sh"])),
        &[
            "--busybox",
            dynamic.to_str().expect("utf-8 path"),
            "--add",
            "/usr/bin/ipcs",
        ],
    );
    p
}

/// [`cri_payload`] with husk as a package installed it instead of the
/// build's: `files` (`dpkg -L husk`) copied from the root file system
/// `root` into `installed/` at their paths, with their modes, and the
/// build's husk, jailer, shim, kernel and agent taken out, for
/// `start-in-node.sh --cri --installed`.
pub fn installed_cri_payload<'a>(
    name: &str,
    root: &Path,
    files: impl Iterator<Item = &'a str>,
) -> Payload {
    let p = cri_payload(name);
    for built in [
        "husk",
        "husk-jailer",
        "containerd-shim-husk-v2",
        "vmlinux",
        "agent.cpio",
    ] {
        std::fs::remove_file(p.path().join(built)).expect("remove a built file from the payload");
    }
    let installed = p.path().join("installed");
    for file in files.map(str::trim).filter(|f| f.starts_with('/')) {
        let src = root.join(&file[1..]);
        let dst = installed.join(&file[1..]);
        // Directories are made as their files need them.
        if src.is_file() {
            std::fs::create_dir_all(dst.parent().expect("a parent")).expect("mkdir in installed/");
            std::fs::copy(&src, &dst)
                .unwrap_or_else(|e| panic!("copy {} into the payload: {e}", src.display()));
        }
    }
    p
}

/// The dynamically linked image [`cri_payload`] imports: Debian's
/// busybox with its libc and loader, and util-linux's ipcs.
pub const DYNAMIC_IMAGE: &str = "husk.local/busybox-dynamic:1";

/// Debian's dynamically linked busybox, which `husk_dynamic_busybox` in
/// resources/lib.sh unpacks (the test command runs it) and names in
/// `HUSK_DYNAMIC_BUSYBOX`.
pub fn dynamic_busybox() -> PathBuf {
    crate::cached_tool(
        "HUSK_DYNAMIC_BUSYBOX",
        "/var/cache/husk/debian-busybox/bin/busybox",
        "resources/test.sh unpacks Debian's busybox there (husk_dynamic_busybox in resources/lib.sh)",
    )
}

/// The shell functions and set-up every containerd test script starts
/// with: containerd started (`start-in-node.sh START_ARGS`), the image
/// imported, the shim's log at info; after `script`, containerd's log tail.
pub fn script(start_args: &str, script: &str) -> String {
    let setup = r#"set -u
export PATH=$PWD:$PATH
sh start-in-node.sh START_ARGS || exit 1
# The shims' own account of each step, in containerd's log.
echo 'log_level = "info"' >> /etc/husk/config.toml
ctr image ls -q
husk_count() { n=0; for s in /proc/[0-9]*/stat; do case "$(cat "$s" 2>/dev/null)" in *"(husk) "[!Z]*) n=$((n+1)) ;; esac; done; echo $n; }
# Waits until task $1 stopped (at most 20 s).
wait_stopped() { i=0; until ctr task ls | grep -q "^$1 .*STOPPED"; do sleep 0.2; i=$((i+1)); [ $i -gt 100 ] && break; done; }
# Removes stopped task $1 and its container; prints "TASK-RM <status>" when
# the status was not 0 (ctr warns about it and exits 0).
remove() { ctr task rm "$1" 2>&1 | sed -n 's/.*exit with non-zero exit code \([0-9]*\).*/TASK-RM \1/p'; ctr container rm "$1"; }
# The pattern's brackets keep it from matching this script's own shell.
shim_pids() { for p in /proc/[0-9]*; do tr '\0' ' ' < $p/cmdline 2>/dev/null | grep -q "[c]ontainerd-shim-husk-v2 $1" && echo ${p#/proc/}; done; }
"#
    .replace("START_ARGS", start_args);
    format!("{setup}\n{script}\necho '--- containerd log'; tail -n 40 containerd.log\n")
}

/// Prometheus' promtool, which `husk_promtool` in resources/lib.sh
/// unpacks from Debian's prometheus package (the test command runs it)
/// and names in `HUSK_PROMTOOL`.
pub fn promtool() -> PathBuf {
    crate::cached_tool(
        "HUSK_PROMTOOL",
        "/var/cache/husk/prometheus/usr/bin/promtool",
        "resources/test.sh unpacks Debian's promtool there (husk_promtool in resources/lib.sh)",
    )
}
