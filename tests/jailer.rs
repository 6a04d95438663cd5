//! husk-jailer tests. The refusals run on this host directly: they happen
//! before the jailer mounts, mknods or changes anything (and need no KVM).
//! Most need root, as the jailer does: they are `#[ignore]`d, and
//! resources/test.sh runs them as root with `--include-ignored`.
//! The boots run in the node VM (see support/lib.rs): husk started by the
//! jailer as uid 1000, chrooted, in a cgroup with a memory limit, boots a
//! guest to user space.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use husk_tests::{artifacts, cargo_binary, Payload, RunResult};

fn jailer(args: &[&str]) -> RunResult {
    let out = Command::new(cargo_binary("husk-jailer"))
        .args(args)
        .output()
        .expect("run husk-jailer");
    let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
    output.push_str(&String::from_utf8_lossy(&out.stderr));
    RunResult {
        status: out.status.code().unwrap_or(-1),
        output,
    }
}

/// A scratch chroot base under target/tmp, emptied first.
fn scratch_base(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let target = exe
        .ancestors()
        .nth(3)
        .expect("test binary lives in target/<profile>/deps");
    let dir = target.join("tmp").join(format!("jailer-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch base");
    dir
}

/// The common arguments, with `base` as the chroot base.
fn args<'a>(base: &'a str, husk: &'a str, id: &'a str) -> Vec<&'a str> {
    vec![
        "--id",
        id,
        "--exec-file",
        husk,
        "--uid",
        "1000",
        "--gid",
        "1000",
        "--chroot-base-dir",
        base,
        "--",
        "boot",
    ]
}

#[test]
fn a_missing_id_is_refused() {
    let husk = cargo_binary("husk");
    let r = jailer(&[
        "--exec-file",
        husk.to_str().expect("utf-8"),
        "--uid",
        "1000",
        "--gid",
        "1000",
    ]);
    r.assert_status(1).assert_contains("missing --id");
}

#[test]
fn a_path_traversal_id_is_refused() {
    let base = scratch_base("traversal");
    let husk = cargo_binary("husk");
    let r = jailer(&args(
        base.to_str().expect("utf-8"),
        husk.to_str().expect("utf-8"),
        "../x",
    ));
    r.assert_status(1).assert_contains("invalid --id \"../x\"");
    assert_eq!(
        std::fs::read_dir(&base).expect("read base").count(),
        0,
        "the jailer created something"
    );
}

#[test]
fn uid_or_gid_0_needs_allow_root() {
    let husk = cargo_binary("husk");
    let husk = husk.to_str().expect("utf-8");
    for (uid, gid, what) in [("0", "1000", "uid"), ("1000", "0", "gid")] {
        let r = jailer(&[
            "--id",
            "vm1",
            "--exec-file",
            husk,
            "--uid",
            uid,
            "--gid",
            gid,
        ]);
        r.assert_status(1)
            .assert_contains(&format!("refusing to run husk as {what} 0"))
            .assert_contains("--allow-root");
    }
}

#[test]
fn unsafe_cgroup_files_are_refused() {
    let husk = cargo_binary("husk");
    let husk = husk.to_str().expect("utf-8");
    for bad in ["../../release_agent=/x", "cgroup.procs=1", "memory.max"] {
        let r = jailer(&[
            "--id",
            "vm1",
            "--exec-file",
            husk,
            "--uid",
            "1000",
            "--gid",
            "1000",
            "--cgroup",
            bad,
        ]);
        r.assert_status(1).assert_contains("invalid --cgroup");
    }
}

/// Makes `<base>/husk/<id>/root` as the caller would, then applies `spoil`.
fn existing_jail(name: &str, spoil: impl FnOnce(&Path)) -> (PathBuf, RunResult) {
    let base = scratch_base(name);
    let root = base.join("husk/vm1/root");
    std::fs::create_dir_all(&root).expect("create jail");
    spoil(&base.join("husk/vm1"));
    let husk = cargo_binary("husk");
    let r = jailer(&args(
        base.to_str().expect("utf-8"),
        husk.to_str().expect("utf-8"),
        "vm1",
    ));
    (base, r)
}

#[test]
#[ignore = "needs root: to chown, and the jailer runs only as root"]
fn a_root_dir_owned_by_someone_else_is_refused() {
    husk_tests::require_root();
    let (base, r) = existing_jail("foreign-owner", |id_dir| {
        std::os::unix::fs::chown(id_dir.join("root"), Some(4321), Some(4321)).expect("chown");
    });
    r.assert_status(1)
        .assert_contains("root: it is owned by uid 4321, not root");
    let root = base.join("husk/vm1/root");
    assert!(!root.join("husk").exists(), "the exec file was installed");
    assert!(!root.join("dev").exists(), "devices were made");
    assert_eq!(std::fs::metadata(&root).expect("stat").uid(), 4321);
}

#[test]
#[ignore = "needs root: the jailer makes this check after its root check"]
fn a_symlinked_id_dir_is_refused() {
    husk_tests::require_root();
    let (base, r) = existing_jail("symlink", |id_dir| {
        let elsewhere = id_dir.with_file_name("elsewhere");
        std::fs::rename(id_dir, &elsewhere).expect("move the id dir away");
        std::os::unix::fs::symlink(&elsewhere, id_dir).expect("symlink");
    });
    r.assert_status(1)
        .assert_contains("vm1: it is a symbolic link");
    let real = base.join("husk/elsewhere/root");
    assert_eq!(
        std::fs::read_dir(&real).expect("read").count(),
        0,
        "the jailer followed the link"
    );
}

#[test]
#[ignore = "needs root: the jailer makes this check after its root check"]
fn a_world_writable_root_dir_is_refused() {
    husk_tests::require_root();
    use std::os::unix::fs::PermissionsExt;
    let (_base, r) = existing_jail("writable", |id_dir| {
        std::fs::set_permissions(id_dir.join("root"), std::fs::Permissions::from_mode(0o777))
            .expect("chmod");
    });
    r.assert_status(1)
        .assert_contains("its mode 777 lets others than root write to it");
}

#[test]
#[ignore = "needs root: to start the jailer as another uid"]
fn refuses_without_root() {
    husk_tests::require_root();
    // The jailer started by uid 65534 (the child drops its uid before exec),
    // from a copy in a directory anyone may enter: the build's own directory
    // may be closed to others.
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let husk = cargo_binary("husk");
    let dir = std::env::temp_dir().join(format!("husk-jailer-nobody-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).expect("create a directory for the jailer's copy");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let jailer = dir.join("husk-jailer");
    std::fs::copy(cargo_binary("husk-jailer"), &jailer).expect("copy husk-jailer");
    let out = Command::new(&jailer)
        .args([
            "--id",
            "vm1",
            "--uid",
            "1000",
            "--gid",
            "1000",
            "--exec-file",
        ])
        .arg(&husk)
        .uid(65534)
        .gid(65534)
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    let out = out.expect("run husk-jailer as uid 65534");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("the jailer must run as root"), "{err}");
}

/// The shared libraries of `bin` (absolute paths, as ldd reports them).
fn shared_libs(bin: &Path) -> Vec<String> {
    let out = Command::new("ldd").arg(bin).output().expect("run ldd");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
        .map(str::to_string)
        .collect()
}

/// Boots the test guest through the jailer in the node VM, with `extra`
/// jailer flags; with `real_root` from a tmpfs root rather than the
/// node's initramfs.
/// The script reports what it sees of husk while it runs as JAIL-* lines.
fn jailed_boot(name: &str, extra: &str, real_root: bool) -> RunResult {
    let a = artifacts();
    // The caller provides what the VM needs inside the jail: the kernel, the
    // initramfs and (husk being dynamically linked here) its loader and
    // libraries.
    let libs = shared_libs(&a.husk).join(" ");
    let script = format!(
        r#"
set -u
base=/srv/jailer
root=$base/husk/vm1/root
mkdir -p "$root"
cp vmlinux initrd.cpio "$root/"
chmod 0644 "$root/vmlinux" "$root/initrd.cpio"
for lib in {libs}; do
  mkdir -p "$root$(dirname "$lib")"
  cp "$lib" "$root$lib"
done
# A network namespace to join (a sleeping process holds it).
unshare -n sleep 300 &
npid=$!
while [ "$(readlink /proc/$npid/ns/net)" = "$(readlink /proc/self/ns/net)" ]; do sleep 0.1; done
./husk-jailer --id vm1 --uid 1000 --gid 1000 --exec-file ./husk \
  --chroot-base-dir "$base" --cgroup memory.max=268435456 {extra} -- \
  boot --kernel /vmlinux --initrd /initrd.cpio --mem-mib 128 \
  --cmdline 'console=ttyS0 reboot=k panic=1 pci=off quiet husk.hold=4' &
jpid=$!
(sleep 240; kill -9 $jpid 2>/dev/null) &
wpid=$!
# husk's pid: the jailer's own (it execs husk), or with a new pid
# namespace the jailer's child.
pid=""
i=0
while [ $i -lt 600 ]; do
  for s in /proc/[0-9]*/status; do
    p=${{s#/proc/}}
    p=${{p%/status}}
    if awk -v j=$jpid -v p=$p '/^Name:/ {{n = $2}} /^PPid:/ {{pp = $2}}
        END {{exit !(n == "husk" && (p == j || pp == j))}}' "$s" 2>/dev/null; then
      pid=$p
    fi
  done
  [ -n "$pid" ] && break
  i=$((i + 1))
  sleep 0.1
done
if [ -n "$pid" ]; then
  echo "JAIL-UID $(awk '/^Uid:/ {{print $2, $3, $4, $5}}' /proc/$pid/status)"
  echo "JAIL-GID $(awk '/^Gid:/ {{print $2, $3, $4, $5}}' /proc/$pid/status)"
  echo "JAIL-GROUPS $(awk '/^Groups:/ {{print $2}}' /proc/$pid/status)."
  echo "JAIL-CAPS $(awk '/^Cap(Inh|Prm|Eff|Bnd|Amb):/ {{printf "%s", $2}}' /proc/$pid/status)"
  echo "JAIL-NONEWPRIVS $(awk '/^NoNewPrivs:/ {{print $2}}' /proc/$pid/status)"
  echo "JAIL-NSPID $(awk '/^NSpid:/ {{$1 = ""; print}}' /proc/$pid/status)"
  echo "JAIL-CGROUP $(cat /proc/$pid/cgroup)"
  if [ "$(readlink /proc/$pid/ns/net)" = "$(readlink /proc/$npid/ns/net)" ]; then
    echo "JAIL-IN-NETNS yes"
  else
    echo "JAIL-IN-NETNS no"
  fi
  echo "JAIL-MEMORY-MAX $(cat /sys/fs/cgroup/husk/vm1/memory.max)"
  echo "JAIL-ROOT-ENTRIES $(ls /proc/$pid/root | tr '\n' ' ')"
  echo "JAIL-FDS $(ls /proc/$pid/fd | tr '\n' ' ')"
  # Once the vCPUs run, every thread is confined by its seccomp filter.
  i=0
  while [ $i -lt 600 ]; do
    modes=""
    for t in /proc/$pid/task/*; do
      modes="$modes $(cat $t/comm 2>/dev/null):$(awk '/^Seccomp:/ {{print $2}}' $t/status 2>/dev/null)"
    done
    case "$modes" in *husk-vcpu0:2*) case "$modes" in *:0*|*:1*) ;; *) break ;; esac ;; esac
    i=$((i + 1))
    sleep 0.1
  done
  echo "JAIL-SECCOMP$modes"
else
  echo "JAIL-NO-HUSK"
fi
wait $jpid
status=$?
kill $wpid $npid 2>/dev/null
echo "JAIL-EXIT $status"
ls -ln "$root" "$root/dev" "$root/dev/net"
"#
    );
    let payload = Payload::new(name)
        .with_guest()
        .add(&cargo_binary("husk-jailer"), "husk-jailer")
        .write("jail.sh", script.as_bytes());
    if !real_root {
        return payload.run("sh jail.sh");
    }
    // The node VM's root is its initramfs, which pivot_root cannot leave
    // (the jailer then falls back to moving the jail over / and chrooting).
    // A production host's root is a real file system: give the script one,
    // a tmpfs moved over / in a private mount namespace, the way
    // switch_root does it, so the jailer's pivot_root path runs.
    payload.run(
        r#"exec unshare -m sh -c '
set -e
mkdir -p /newroot
mount -t tmpfs tmpfs /newroot
for d in bin sbin lib lib64 usr payload; do
  if [ -d /$d ]; then mkdir /newroot/$d && mount --rbind /$d /newroot/$d; fi
done
mkdir /newroot/proc /newroot/sys /newroot/dev /newroot/tmp /newroot/srv
mount -t proc proc /newroot/proc
mount --rbind /sys /newroot/sys
mount --rbind /dev /newroot/dev
cd /newroot
mount --move . /
exec chroot . sh -c "cd /payload && sh jail.sh"
'"#,
    )
}

fn check_jailed(r: &RunResult) {
    eprintln!("{}", r.output);
    r.assert_status(0).assert_contains("HUSK-GUEST-READY");
    let v = |k: &str| {
        r.value(k)
            .unwrap_or_else(|| panic!("no {k}:\n{}", r.output))
    };
    assert_eq!(v("JAIL-EXIT"), "0", "{}", r.output);
    assert_eq!(v("JAIL-UID"), "1000 1000 1000 1000", "{}", r.output);
    assert_eq!(v("JAIL-GID"), "1000 1000 1000 1000", "{}", r.output);
    assert_eq!(v("JAIL-GROUPS"), ".", "supplementary groups left");
    assert_eq!(v("JAIL-CAPS"), "0".repeat(80), "{}", r.output);
    assert_eq!(v("JAIL-NONEWPRIVS"), "1");
    // Every thread (main, vCPU) runs under its seccomp filter (mode 2).
    let seccomp = v("JAIL-SECCOMP");
    let threads: Vec<&str> = seccomp.split_whitespace().collect();
    assert!(threads.contains(&"husk-vcpu0:2"), "{seccomp}\n{}", r.output);
    assert!(
        threads.iter().all(|t| t.ends_with(":2")),
        "{seccomp}\n{}",
        r.output
    );
    assert_eq!(v("JAIL-CGROUP"), "0::/husk/vm1");
    assert_eq!(v("JAIL-MEMORY-MAX"), "268435456");
    // Inside the jail husk sees only what the jailer and the caller put
    // there (lib and lib64 hold husk's shared libraries).
    assert_eq!(
        v("JAIL-ROOT-ENTRIES"),
        "dev husk initrd.cpio lib lib64 vmlinux",
        "{}",
        r.output
    );
}

#[test]
fn a_jailed_husk_boots_a_guest_as_uid_1000_in_a_memory_limited_cgroup() {
    let r = jailed_boot("jail-boot", "", true);
    check_jailed(&r);
    assert!(
        !r.output.contains("pivot_root cannot leave"),
        "pivot_root was not used:\n{}",
        r.output
    );
    assert_eq!(r.value("JAIL-IN-NETNS").as_deref(), Some("no"));
    // Without a new pid namespace husk keeps the jailer's pid.
    let nspid = r.value("JAIL-NSPID").unwrap_or_default();
    assert_eq!(nspid.split_whitespace().count(), 1, "{}", r.output);
}

#[test]
fn with_a_new_pid_namespace_husk_is_its_pid_1_in_the_given_netns() {
    let r = jailed_boot(
        "jail-pidns",
        "--new-pid-ns --netns /proc/$npid/ns/net",
        false,
    );
    check_jailed(&r);
    assert_eq!(r.value("JAIL-IN-NETNS").as_deref(), Some("yes"));
    // From the node's initramfs root the jailer says it chrooted instead.
    r.assert_contains("moved the jail over / and chrooted instead");
    let nspid = r.value("JAIL-NSPID").unwrap_or_default();
    assert_eq!(
        nspid.split_whitespace().last(),
        Some("1"),
        "NSpid {nspid}:\n{}",
        r.output
    );
}

/// The whole jail on this host, without KVM: a static busybox as the exec
/// file reports what it sees from inside (uid, root, devices, descriptors)
/// while the test looks at it from outside (cgroup, capabilities). On this
/// host's real root file system the jailer's pivot_root path runs; with
/// cgroup v1 hierarchies (as here) the v1 path does.
#[test]
#[ignore = "needs root: the jailer runs only as root"]
fn a_jailed_program_on_this_host_sees_only_its_jail() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    husk_tests::require_root();
    let base = scratch_base("host");
    let kept = base.join("kept");
    std::fs::write(&kept, "kept-fd-contents\n").expect("write");
    let kept = std::fs::File::open(&kept).expect("open");
    let id = format!("host-{}", std::process::id());
    let busybox = husk_tests::host_tool("busybox");
    // No /proc in the jail, so busybox cannot re-exec itself: only shell
    // builtins and applets it runs in-process (id, ls) are used.
    let script = "id; echo ROOT; ls /; echo END; ls -ln /dev /dev/net; \
        read -r k <&20 && echo \"FD20 $k\"; \
        if (: <&21) 2>&-; then echo 'FD21 open'; else echo 'FD21 closed'; fi; \
        echo MARK; read -r x; exit 0";
    let mut cmd = Command::new(cargo_binary("husk-jailer"));
    cmd.args(["--id", &id, "--uid", "1000", "--gid", "1000"])
        .args(["--parent-cgroup", "husk-test", "--cgroup", "pids.max=64"])
        .args(["--keep-fd", "20", "--exec-file"])
        .arg(&busybox)
        .arg("--chroot-base-dir")
        .arg(&base)
        .args(["--", "sh", "-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let raw = std::os::fd::AsRawFd::as_raw_fd(&kept);
    // SAFETY: between fork and exec only dup2, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            for target in [20, 21] {
                if libc::dup2(raw, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn husk-jailer");
    let pid = child.id();
    let mut lines = Vec::new();
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    loop {
        let mut l = String::new();
        if out.read_line(&mut l).expect("read") == 0 || l.trim() == "MARK" {
            break;
        }
        lines.push(l.trim_end().to_string());
    }
    // Seen from outside while it waits for its stdin.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    drop(child.stdin.take());
    let end = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&end.stderr);
    let seen = lines.join("\n");
    let report =
        format!("inside:\n{seen}\nstatus:\n{status}\ncgroups:\n{cgroups}\nstderr:\n{stderr}");

    // Clean the cgroups up before asserting (they are empty now).
    let cgroup_line = cgroups
        .lines()
        .find(|l| l.ends_with(&format!(":/husk-test/{id}")))
        .map(str::to_string);
    let cgroup_dir = cgroup_line.as_ref().map(|l| {
        if l.starts_with("0::") {
            let unified = Path::new("/sys/fs/cgroup/unified");
            let root = if unified.join("cgroup.controllers").exists() {
                unified
            } else {
                Path::new("/sys/fs/cgroup")
            };
            root.join("husk-test").join(&id)
        } else {
            Path::new("/sys/fs/cgroup/pids/husk-test").join(&id)
        }
    });
    let pids_max = cgroup_dir
        .as_ref()
        .and_then(|d| std::fs::read_to_string(d.join("pids.max")).ok());
    if let Some(d) = &cgroup_dir {
        let _ = std::fs::remove_dir(d);
        let _ = std::fs::remove_dir(d.parent().expect("parent"));
    }
    let _ = std::fs::remove_dir_all(&base);

    assert_eq!(end.status.code(), Some(0), "{report}");
    assert!(
        lines
            .iter()
            .any(|l| l == "uid=1000 gid=1000 groups=1000" || l == "uid=1000 gid=1000"),
        "{report}"
    );
    let root_entries = seen
        .split_once("ROOT\n")
        .and_then(|(_, r)| r.split_once("\nEND"))
        .map(|(r, _)| r.split_whitespace().collect::<Vec<_>>());
    assert_eq!(root_entries, Some(vec!["busybox", "dev"]), "{report}");
    assert!(
        lines.contains(&"FD20 kept-fd-contents".to_string()),
        "{report}"
    );
    assert!(lines.contains(&"FD21 closed".to_string()), "{report}");
    assert!(
        lines.iter().any(|l| l.starts_with("crw-------")
            && l.contains("1000     1000")
            && l.ends_with(" kvm")),
        "{report}"
    );
    assert!(lines.iter().any(|l| l.ends_with(" tun")), "{report}");
    assert!(lines.iter().any(|l| l.ends_with(" urandom")), "{report}");
    // Made where the host has it (restores fill shared memory through it).
    assert_eq!(
        lines.iter().any(|l| l.starts_with("crw-------")
            && l.contains("1000     1000")
            && l.ends_with(" userfaultfd")),
        Path::new("/dev/userfaultfd").exists(),
        "{report}"
    );
    assert!(status.contains("\nCapEff:\t0000000000000000\n"), "{report}");
    assert!(status.contains("\nCapBnd:\t0000000000000000\n"), "{report}");
    assert!(status.contains("\nNoNewPrivs:\t1\n"), "{report}");
    assert!(cgroup_line.is_some(), "{report}");
    assert_eq!(pids_max.as_deref().map(str::trim), Some("64"), "{report}");
    assert!(!stderr.contains("chrooted instead"), "{report}");
}

/// The jailer checks the owner and mode of the file an `--exec-file`
/// symlink names; the jail must then get that file, not the link (which
/// inside the jail would name whatever the jail holds at its target path).
#[test]
#[ignore = "needs root: to chown, and the jailer runs only as root"]
fn an_exec_file_behind_a_symlink_is_installed_as_the_file_it_names() {
    use std::os::unix::fs::PermissionsExt;
    let base = scratch_base("exec-link");
    let real = base.join("real/busybox");
    std::fs::create_dir_all(real.parent().expect("parent")).expect("mkdir");
    std::fs::copy(husk_tests::host_tool("busybox"), &real).expect("copy busybox");
    std::os::unix::fs::chown(&real, Some(0), Some(0)).expect("chown");
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let link = base.join("links/busybox");
    std::fs::create_dir_all(link.parent().expect("parent")).expect("mkdir");
    std::os::unix::fs::symlink(&real, &link).expect("symlink");
    let chroot_base = base.join("jails");
    let id = format!("exec-link-{}", std::process::id());
    let r = jailer(&[
        "--id",
        &id,
        "--uid",
        "1000",
        "--gid",
        "1000",
        "--exec-file",
        link.to_str().expect("utf-8"),
        "--chroot-base-dir",
        chroot_base.to_str().expect("utf-8"),
        "--",
        "sh",
        "-c",
        "echo JAILED-EXEC-RAN",
    ]);
    let installed = chroot_base.join("busybox").join(&id).join("root/busybox");
    let seen = std::fs::symlink_metadata(&installed);
    let real_ino = std::fs::metadata(&real).expect("stat").ino();
    // On a cgroup v2 host the jailer made <parent>/<id>; empty now.
    let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup/husk").join(&id));
    let _ = std::fs::remove_dir_all(&base);
    let m = seen.unwrap_or_else(|e| panic!("nothing installed ({e}):\n{}", r.output));
    assert!(
        m.file_type().is_file(),
        "the jail got a {:?}, not the file\n{}",
        m.file_type(),
        r.output
    );
    assert_eq!(m.ino(), real_ino, "not a hard link of the checked file");
    r.assert_status(0).assert_contains("JAILED-EXEC-RAN");
}

#[test]
#[ignore = "needs root: the jailer makes this check after its root check"]
fn a_world_writable_chroot_base_is_refused() {
    husk_tests::require_root();
    use std::os::unix::fs::PermissionsExt;
    let base = scratch_base("writable-base");
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    let husk = cargo_binary("husk");
    let r = jailer(&args(
        base.to_str().expect("utf-8"),
        husk.to_str().expect("utf-8"),
        "vm1",
    ));
    r.assert_status(1)
        .assert_contains("its mode 1777 lets others than root write to it");
    assert_eq!(std::fs::read_dir(&base).expect("read").count(), 0);
}

#[test]
#[ignore = "needs root: the jailer makes this check after its root check"]
fn a_keep_fd_that_is_not_open_is_refused() {
    husk_tests::require_root();
    let base = scratch_base("keep-fd");
    let husk = cargo_binary("husk");
    let mut a = vec!["--keep-fd", "250"];
    a.extend(args(
        base.to_str().expect("utf-8"),
        husk.to_str().expect("utf-8"),
        "vm1",
    ));
    jailer(&a)
        .assert_status(1)
        .assert_contains("--keep-fd 250 is not an open file descriptor");
    assert_eq!(std::fs::read_dir(&base).expect("read").count(), 0);
}

/// With --new-pid-ns the jailer stays as the parent of husk (pid 1 of the
/// new namespace) and passes SIGTERM on to it, so a supervisor that signals
/// the process it started still gets a clean stop; the jailer exits with
/// the program's status.
#[test]
#[ignore = "needs root: the jailer runs only as root"]
fn sigterm_to_the_jailer_reaches_pid_1_of_the_new_namespace() {
    use std::io::{BufRead, BufReader, Read};
    use std::process::Stdio;
    husk_tests::require_root();
    let base = scratch_base("sigterm");
    let busybox = husk_tests::host_tool("busybox");
    let mut child = Command::new(cargo_binary("husk-jailer"))
        .args([
            "--id",
            "sig",
            "--uid",
            "1000",
            "--gid",
            "1000",
            "--new-pid-ns",
        ])
        .arg("--exec-file")
        .arg(&busybox)
        .arg("--chroot-base-dir")
        .arg(&base)
        .args([
            "--",
            "sh",
            "-c",
            "trap 'echo GOT-TERM; exit 7' TERM; echo \"PID $$\"; read -r x",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn husk-jailer");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut first = String::new();
    out.read_line(&mut first).expect("read");
    // SAFETY: kill with the pid of our own child process.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let mut rest = String::new();
    out.read_to_string(&mut rest).expect("read");
    let status = child.wait().expect("wait");
    let _ = std::fs::remove_dir_all(&base);
    assert_eq!(first.trim(), "PID 1", "{first}{rest}");
    assert_eq!(rest.trim(), "GOT-TERM", "{first}{rest}");
    assert_eq!(status.code(), Some(7), "{first}{rest}");
}

/// A jailed husk as pid 1 of its own pid namespace stops cleanly (status
/// 143, "stopped by SIGTERM") when its supervisor sends SIGTERM to the
/// jailer, the process it started.
#[test]
fn sigterm_to_the_jailer_stops_a_jailed_guest_cleanly() {
    let a = artifacts();
    let libs = shared_libs(&a.husk).join(" ");
    let script = format!(
        r#"
root=/srv/jailer/husk/vm1/root
mkdir -p "$root"
cp vmlinux initrd.cpio "$root/"
chmod 0644 "$root/vmlinux" "$root/initrd.cpio"
for lib in {libs}; do
  mkdir -p "$root$(dirname "$lib")"
  cp "$lib" "$root$lib"
done
./husk-jailer --id vm1 --uid 1000 --gid 1000 --exec-file ./husk --new-pid-ns \
  --cgroup memory.max=268435456 -- \
  boot --kernel /vmlinux --initrd /initrd.cpio --mem-mib 128 \
  --cmdline 'console=ttyS0 reboot=k panic=1 pci=off quiet husk.hold=600' > out.txt 2>&1 &
jpid=$!
i=0
until grep -q HUSK-GUEST-READY out.txt; do
  i=$((i + 1))
  [ $i -gt 2400 ] && break
  sleep 0.1
done
kill -TERM $jpid
wait $jpid
echo "JAIL-EXIT $?"
cat out.txt
"#
    );
    let r = Payload::new("jail-sigterm")
        .with_guest()
        .add(&cargo_binary("husk-jailer"), "husk-jailer")
        .run(&script);
    r.assert_status(0)
        .assert_contains("HUSK-GUEST-READY")
        .assert_contains("stopped by SIGTERM");
    assert_eq!(r.value("JAIL-EXIT").as_deref(), Some("143"), "{}", r.output);
}
