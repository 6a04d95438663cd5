//! husk's Debian package, installed as an operator would: resources/deb.sh
//! builds it (from the debug builds the suite has made; the release
//! build is the same script's default), `apt-get install ./husk_*.deb`
//! installs it into a pristine Debian 12 root file system (debootstrap's
//! minbase, cached by `husk_debian_chroot` in resources/lib.sh), with its
//! dependencies from Debian's registry. The test checks the installed
//! files and their modes, that /etc/husk/config.toml is a conffile the
//! shim's own parser accepts and whose edits survive an upgrade, then
//! carries the installed files, at their installed paths, into a node VM:
//! containerd gets the package's handler appended to its config, and a CRI
//! pod runs through them (`husk check` first, then husk-cri's scenario),
//! and `husk run` finds the package's kernel and agent by itself.
//! Back on the host, `apt-get purge` leaves nothing of the package's, its
//! run-time state included, and keeps what the administrator owns.
//!
//! Unlike the other CRI scenarios this one has no runc twin: it tests
//! husk's installation, which runc has no part in.

use std::path::{Path, PathBuf};
use std::process::Command;

use husk_tests::containerd;

/// A bash script run on this host; panics with its output unless it
/// exits 0. Returns its stdout.
fn host(script: &str) -> String {
    let out = Command::new("bash")
        .args(["-c", &format!("set -euo pipefail\n{script}")])
        .current_dir(husk_tests::repo_root())
        .output()
        .expect("run bash");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "host script failed ({}):\n{script}\n--- stdout\n{stdout}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The value after `key ` on the first line starting with `key`, trimmed.
fn value<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(' ')))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {key} line in:\n{out}"))
}

/// A Debian root file system unpacked under target/tmp, with /proc
/// mounted (husk check and the purge script read it); unmounted and
/// removed when dropped.
struct Chroot {
    dir: PathBuf,
}

impl Chroot {
    fn unpack(tarball: &Path) -> Chroot {
        let dir = husk_tests::repo_root().join("target/tmp/deb-chroot");
        let c = Chroot { dir };
        c.clean();
        std::fs::create_dir_all(c.root()).expect("mkdir the chroot");
        host(&format!(
            "tar -C {root} -xf {tarball}\nmount -t proc proc {root}/proc",
            root = c.root().display(),
            tarball = tarball.display()
        ));
        c
    }

    fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// Runs `script` (bash) inside the chroot; its stdout.
    fn run(&self, script: &str) -> String {
        let quoted = script.replace('\'', r"'\''");
        host(&format!(
            "chroot {} /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
             bash -c 'set -euo pipefail\n{quoted}'",
            self.root().display()
        ))
    }

    fn clean(&self) {
        let root = self.root();
        // Whatever is mounted under the root (its /proc, a test's volume
        // left by a failure), deepest first.
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut under: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| Path::new(m).starts_with(&root))
            .collect();
        under.sort_unstable_by(|a, b| b.cmp(a));
        for m in under {
            let _ = Command::new("umount").arg(m).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Chroot {
    fn drop(&mut self) {
        self.clean();
    }
}

#[test]
#[ignore = "needs root (chroot, mount, apt) and Debian's registry"]
fn the_package_installs_with_apt_runs_a_cri_pod_and_purges_clean() {
    husk_tests::require_root();
    let tarball = std::env::var_os("HUSK_DEBIAN_CHROOT")
        .map(PathBuf::from)
        .expect(
            "HUSK_DEBIAN_CHROOT is not set: resources/test.sh (husk_debian_chroot in \
         resources/lib.sh) makes a pristine Debian root file system and names it there",
        );
    let out_dir = husk_tests::repo_root().join("target/tmp/deb-packages");
    let _ = std::fs::remove_dir_all(&out_dir);
    // Two revisions of the same build: an upgrade from one to the other
    // must keep the administrator's edits of the conffile.
    let built = std::time::Instant::now();
    let mut debs = Vec::new();
    for revision in ["1", "2"] {
        let out = host(&format!(
            "resources/deb.sh --profile dev --fast --deb-revision {revision} --out {}",
            out_dir.display()
        ));
        debs.push(PathBuf::from(
            out.lines().last().expect("the .deb's path").trim(),
        ));
    }
    eprintln!("deb: both packages built in {:?}", built.elapsed());
    let installed_at = std::time::Instant::now();
    let chroot = Chroot::unpack(&tarball);
    let root = chroot.root();
    for deb in &debs {
        std::fs::copy(deb, root.join("tmp").join(deb.file_name().unwrap())).expect("copy the .deb");
    }
    // What the pristine system holds, to compare with after the purge.
    let before = chroot.run(
        "find / -xdev \\( -path /proc -o -path /var/lib/dpkg -o -path /var/lib/apt -o -path /var/cache \
         -o -path /var/log -o -path /tmp \\) -prune -o -print | sort > /tmp/before; \
         dpkg-query -W -f='${Package}\\n' | sort > /tmp/packages-before; wc -l < /tmp/before",
    );
    assert!(before.trim().parse::<u32>().unwrap() > 1000, "{before}");

    // The operator's command, with the package's dependencies and
    // recommendations from Debian's registry.
    chroot.run("apt-get update -q >&2; apt-get install -y -q /tmp/husk_0.1.0-1_amd64.deb >&2");
    let facts = chroot.run(
        r#"echo "STATUS $(dpkg-query -W -f='${Status} ${Version}' husk)"
echo "CONFFILES $(dpkg-query -W -f='${Conffiles}' husk | awk '{print $1}' | tr '\n' ' ')"
for f in /usr/bin/husk /usr/bin/husk-jailer /usr/bin/containerd-shim-husk-v2 /usr/share/husk/vmlinux \
  /usr/share/husk/husk-agent.cpio /etc/husk/config.toml /usr/share/doc/husk/containerd-husk.toml \
  /usr/share/doc/husk/runtimeclass.yaml; do
  echo "MODE $f $(stat -c '%a %U:%G' $f)"
done
echo "CONTAINERD $(dpkg-query -W -f='${Status}' containerd 2>/dev/null || echo absent)"
echo "CHECK $(husk check --json | tr -d '\n')"
"#,
    );
    assert_eq!(value(&facts, "STATUS"), "install ok installed 0.1.0-1");
    assert_eq!(value(&facts, "CONFFILES"), "/etc/husk/config.toml");
    for (file, mode) in [
        ("/usr/bin/husk", "755 root:root"),
        ("/usr/bin/husk-jailer", "755 root:root"),
        ("/usr/bin/containerd-shim-husk-v2", "755 root:root"),
        ("/usr/share/husk/vmlinux", "644 root:root"),
        ("/usr/share/husk/husk-agent.cpio", "644 root:root"),
        ("/etc/husk/config.toml", "644 root:root"),
        ("/usr/share/doc/husk/containerd-husk.toml", "644 root:root"),
        ("/usr/share/doc/husk/runtimeclass.yaml", "644 root:root"),
    ] {
        assert_eq!(value(&facts, &format!("MODE {file}")), mode, "{facts}");
    }
    // containerd is recommended, so apt brings it.
    assert_eq!(value(&facts, "CONTAINERD"), "install ok installed");
    // The installed husk's own checks of the installed files: the shipped
    // config parses, the jailed husk is static, kernel and agent are
    // where the shim looks (this host's KVM fails, as it must here).
    let report: serde_json::Value =
        serde_json::from_str(value(&facts, "CHECK")).expect("husk check --json");
    for name in ["config", "husk", "kernel", "initrd", "shim"] {
        let check = report["checks"]
            .as_array()
            .expect("checks")
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no {name} check: {report:#}"));
        assert_eq!(check["status"], "ok", "{name}: {report:#}");
    }
    // containerd (recommended, so installed) has no husk handler yet, and
    // husk check says to append the package's.
    let runtime = report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["name"] == "containerd-runtime")
        .unwrap_or_else(|| panic!("no containerd-runtime check: {report:#}"));
    assert_eq!(runtime["status"], "fail", "{report:#}");
    assert!(
        runtime["fix"]
            .as_str()
            .is_some_and(|f| f.contains("cat /usr/share/doc/husk/containerd-husk.toml >> ")),
        "{report:#}"
    );
    let file = host(&format!("file {}/usr/bin/husk", root.display()));
    assert!(file.contains("static"), "{file}");

    // An edit of the conffile survives the upgrade to revision 2.
    let upgraded = chroot.run(
        r#"echo 'max_vcpus = 4 # the administrator'"'"'s' >> /etc/husk/config.toml
apt-get install -y -q /tmp/husk_0.1.0-2_amd64.deb >&2
echo "STATUS $(dpkg-query -W -f='${Status} ${Version}' husk)"
echo "EDIT $(grep -c "the administrator's" /etc/husk/config.toml)"
"#,
    );
    assert_eq!(value(&upgraded, "STATUS"), "install ok installed 0.1.0-2");
    assert_eq!(value(&upgraded, "EDIT"), "1", "{upgraded}");
    eprintln!(
        "deb: installed and upgraded in {:?}",
        installed_at.elapsed()
    );

    // The installed files, at their installed paths, run a CRI pod.
    let files = chroot.run("dpkg -L husk");
    let payload = containerd::installed_cri_payload("deb", &root, files.lines());
    let r = payload.run(&containerd::script(
        "--cri --installed",
        r#"# Where the package put its programs (the node's own PATH is /bin:/sbin).
export PATH=$PATH:/usr/bin:/usr/sbin
echo "NODE-KERNEL $(uname -r)"
echo "SHIM $(command -v containerd-shim-husk-v2)"
echo "HUSK-CONFIG-SECCOMP $(grep -c '^seccomp = true' /etc/husk/config.toml)"
husk check; echo "CHECK-EXIT $?"
husk-cri scenario --handler husk --image husk.local/busybox:1 --log-dir /tmp/cri-logs
echo "CRI-EXIT $?"
# husk run finds the package's kernel and agent without being told (the
# image is the payload's busybox archive: the bundled one is made from the
# node's busybox, which needs an ldd the node lacks).
husk run busybox.tar -- sh -c 'echo "RUN-SAYS $(uname -r)"'
echo "RUN-EXIT $?"
echo "HUSK-LEFT $(husk_count)"
echo "STATE-LEFT $(ls /run/husk/k8s.io 2>/dev/null | wc -l)"
"#,
    ));
    for (key, want) in [
        ("SHIM", "/usr/bin/containerd-shim-husk-v2"),
        ("HUSK-CONFIG-SECCOMP", "1"),
        ("CHECK-EXIT", "0"),
        ("CRI-EXIT", "0"),
        ("CRI-SERVER-STATE", "CONTAINER_RUNNING"),
        ("CRI-EXEC-STDOUT", "exec-out"),
        ("CRI-CLIENT-LOG", "stdout pod-says-hi"),
        ("CRI-PODS-LEFT", "0"),
        ("RUN-EXIT", "0"),
        ("HUSK-LEFT", "0"),
        ("STATE-LEFT", "0"),
    ] {
        assert_eq!(r.value(key).as_deref(), Some(want), "{key}:\n{}", r.output);
    }
    // The pod ran on the package's guest kernel, not the node's.
    let guest = r.value("CRI-EXEC-KERNEL").unwrap_or_default();
    assert!(
        !guest.is_empty() && Some(&guest) != r.value("NODE-KERNEL").as_ref(),
        "{}",
        r.output
    );
    r.assert_contains("husk check: a pod would run on this host");
    assert_eq!(r.value("RUN-SAYS"), Some(guest), "{}", r.output);

    // Run-time state as the shim and husk run leave it, and a file of the
    // administrator's; then the purge.
    let purged = chroot.run(
        r#"mkdir -p /run/husk/k8s.io/pod-1 /var/lib/husk/images/templates/pod-v1/x /var/cache/husk/rootfs/v1
touch /run/husk/boot-times.json /var/lib/husk/images/layer.ext4 /var/cache/husk/rootfs/v1/a.ext4
echo mine > /etc/husk/notes.txt
# A pod still running: its volume bound into its share.
vol=/run/husk/k8s.io/pod-1.share/entries/v0
mkdir -p $vol && mount -t tmpfs volume $vol && echo precious > $vol/data
apt-get purge -y -q --autoremove husk >&2 2> /tmp/purge.err
echo "PURGE-NOTE $(grep -c '/run/husk has mounts under it' /tmp/purge.err)"
echo "VOLUME $(cat $vol/data)"
echo "LIB-LEFT $(ls -d /var/lib/husk 2>/dev/null | wc -l)"
# The pod gone (or the node rebooted), /run/husk is the administrator's to
# remove.
umount $vol && rm -r /run/husk
echo "STATUS $(dpkg-query -W -f='${Status}' husk 2>/dev/null || echo absent)"
echo "ADMIN $(cat /etc/husk/notes.txt)"
rm /etc/husk/notes.txt && rmdir /etc/husk
# What the install brought and autoremove keeps (apt itself recommends
# ca-certificates, which containerd's dependencies pulled in): purged
# too, so that the tree can be compared with the pristine one.
kept=$(dpkg-query -W -f='${Package}\n' | sort | comm -13 /tmp/packages-before -)
echo "KEPT $(echo $kept)"
if [ -n "$kept" ]; then apt-get purge -y -q $kept >&2; fi
find / -xdev \( -path /proc -o -path /var/lib/dpkg -o -path /var/lib/apt -o -path /var/cache \
  -o -path /var/log -o -path /tmp \) -prune -o -print | sort > /tmp/after
echo "ADDED $(comm -13 /tmp/before /tmp/after | tr '\n' ' ')"
echo "CACHE-LEFT $(ls -A /var/cache/husk 2>/dev/null | wc -l)"
"#,
    );
    let status = value(&purged, "STATUS");
    assert!(
        status == "absent" || status.starts_with("unknown ok not-installed"),
        "{purged}"
    );
    assert_eq!(value(&purged, "ADMIN"), "mine", "{purged}");
    // Nothing under a mount is touched: the running pod's state stays, its
    // volume's data with it; the rest of the state goes.
    assert_eq!(value(&purged, "PURGE-NOTE"), "1", "{purged}");
    assert_eq!(value(&purged, "VOLUME"), "precious", "{purged}");
    assert_eq!(value(&purged, "LIB-LEFT"), "0", "{purged}");
    let kept = value(&purged, "KEPT");
    assert!(!kept.split(' ').any(|p| p == "husk"), "{purged}");
    eprintln!("deb: packages the install brought that autoremove kept: {kept:?}");
    assert_eq!(value(&purged, "ADDED"), "", "{purged}");
    assert_eq!(value(&purged, "CACHE-LEFT"), "0", "{purged}");
}

/// What `containerd config dump` makes of the package's handler, for
/// containerd 1.6 and 1.7: appended to a config whose CRI section has
/// settings of its own (Debian's sets the CNI directory), it adds the husk
/// runtime and keeps them. Imported instead, containerd 1.6 replaces the
/// whole CRI section with the fragment's (the CNI directory falls back to
/// its default), which is why README.Debian says to append it; 1.7
/// merges.
#[test]
fn the_handler_appended_keeps_the_nodes_cri_settings() {
    let dir = std::env::temp_dir().join(format!("husk-deb-handler-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let fragment = husk_tests::repo_root().join("resources/deb/containerd-husk.toml");
    let node =
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".cni]\n  bin_dir = \"/usr/lib/cni\"\n";
    let appended = dir.join("appended.toml");
    std::fs::write(
        &appended,
        format!(
            "{node}{}",
            std::fs::read_to_string(&fragment).expect("the fragment")
        ),
    )
    .expect("write");
    let imported = dir.join("imported.toml");
    std::fs::write(
        &imported,
        node.replace(
            "version = 2\n",
            &format!("version = 2\nimports = [\"{}\"]\n", fragment.display()),
        ),
    )
    .expect("write");
    let dump = |version: containerd::Containerd, config: &Path| -> String {
        let out = Command::new(version.binary("containerd"))
            .arg("--config")
            .arg(config)
            .args(["config", "dump"])
            .output()
            .expect("run containerd config dump");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for version in [containerd::Containerd::V1_6, containerd::Containerd::V1_7] {
        let d = dump(version, &appended);
        assert!(
            d.contains("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.husk]")
                && d.contains("runtime_type = \"io.containerd.husk.v2\"")
                && d.contains("bin_dir = \"/usr/lib/cni\""),
            "{version:?}:\n{d}"
        );
    }
    let d = dump(containerd::Containerd::V1_6, &imported);
    assert!(
        d.contains("runtimes.husk]") && !d.contains("bin_dir = \"/usr/lib/cni\""),
        "containerd 1.6 kept the node's CRI settings beside an import; \
         README.Debian's advice to append is stale:\n{d}"
    );
    let d = dump(containerd::Containerd::V1_7, &imported);
    assert!(
        d.contains("runtimes.husk]") && d.contains("bin_dir = \"/usr/lib/cni\""),
        "{d}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
