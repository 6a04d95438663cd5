//! Support for husk's integration tests: finds (and if needed builds) the
//! artifacts a real boot needs, and runs commands where a real KVM is.
//!
//! On a host whose /dev/kvm is hardware-backed, commands run directly. On
//! these machines (/dev/kvm from kvm_pvm, which cannot run a Linux guest's
//! user space) they run inside the node VM that `resources/node/run.sh`
//! boots: QEMU TCG with emulated AMD SVM and a real KVM inside.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub mod containerd;
pub mod registry;
mod rerun;

pub use rerun::{in_rerun, Rerun};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Everything a guest boot needs.
#[derive(Debug)]
pub struct Artifacts {
    /// The husk binary.
    pub husk: PathBuf,
    /// Uncompressed guest kernel.
    pub vmlinux: PathBuf,
    /// The same kernel as a bzImage.
    pub bzimage: PathBuf,
    /// Initramfs whose /init prints the HUSK-GUEST-* lines and reboots.
    pub test_initrd: PathBuf,
}

fn run_script(script: &Path, args: &[&str]) -> String {
    let out = Command::new("bash")
        .arg(script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed ({}):\n{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout.lines().last().unwrap_or_default().trim().to_string()
}

/// The husk binary: $HUSK_BIN, or the one cargo built next to this test.
pub fn husk_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("HUSK_BIN") {
        return PathBuf::from(p);
    }
    cargo_binary("husk")
}

/// husk-bench, built next to husk (it also holds set-up helpers such as
/// `husk-bench tap`).
pub fn husk_bench_binary() -> PathBuf {
    cargo_binary("husk-bench")
}

/// A binary of this workspace that cargo built next to this test.
pub fn cargo_binary(name: &str) -> PathBuf {
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let exe = std::env::current_exe().expect("current_exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join(name))
        .expect("test binary lives in target/<profile>/deps");
    assert!(
        bin.exists(),
        "{} does not exist: build it first (cargo build --workspace --bins)",
        bin.display()
    );
    bin
}

/// Builds (or finds in the cache) the guest kernel and the test initramfs.
pub fn artifacts() -> &'static Artifacts {
    static A: OnceLock<Artifacts> = OnceLock::new();
    A.get_or_init(|| {
        let root = repo_root();
        let kernel_dir = PathBuf::from(run_script(&root.join("guest-kernel-config/build.sh"), &[]));
        let initrd =
            std::env::temp_dir().join(format!("husk-test-initrd-{}.cpio", std::process::id()));
        let init = root.join("resources/guest/test-init");
        run_script(
            &root.join("resources/guest/build-initramfs.sh"),
            &[
                initrd.to_str().expect("utf-8 path"),
                init.to_str().expect("utf-8 path"),
            ],
        );
        Artifacts {
            husk: husk_binary(),
            vmlinux: kernel_dir.join("vmlinux"),
            bzimage: kernel_dir.join("bzImage"),
            test_initrd: initrd,
        }
    })
}

/// True when this host's /dev/kvm is hardware-backed and runs guests itself
/// (the same test as resources/node/run.sh makes).
pub fn hardware_kvm() -> bool {
    Path::new("/dev/kvm").exists()
        && !Path::new("/sys/module/kvm_pvm").exists()
        && std::fs::read_to_string("/proc/cpuinfo")
            .map(|c| {
                c.lines()
                    .filter(|l| l.starts_with("flags"))
                    .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
            })
            .unwrap_or(false)
}

/// The node VM image, built once per test process (None where guests run
/// directly).
fn node_image() -> Option<&'static Path> {
    static IMAGE: OnceLock<Option<PathBuf>> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            if std::env::var_os("HUSK_NODE_IMAGE").is_some()
                || std::env::var("HUSK_NODE").as_deref() == Ok("direct")
                || (hardware_kvm() && std::env::var("HUSK_NODE").as_deref() != Ok("vm"))
            {
                return None;
            }
            Some(PathBuf::from(run_script(
                &repo_root().join("resources/node/build.sh"),
                &[],
            )))
        })
        .as_deref()
}

/// An initramfs like the test one whose /husk-test.sh is `script` (run after
/// the HUSK-GUEST-* lines; its status is reported as HUSK-GUEST-TEST-STATUS).
pub fn initrd_with_script(name: &str, script: &str) -> PathBuf {
    initrd_with_files(name, script, &[])
}

/// Like [`initrd_with_script`], plus `extra` files (source, absolute guest
/// path); dynamically linked programs bring their libraries.
pub fn initrd_with_files(name: &str, script: &str, extra: &[(&Path, &str)]) -> PathBuf {
    let root = repo_root();
    use std::os::unix::fs::PermissionsExt;
    // Under target/tmp: kept for a look after a failure, never in /tmp.
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/tmp
    let target = exe
        .ancestors()
        .nth(3)
        .expect("test binary lives in target/<profile>/deps");
    let dir = target.join("tmp").join(format!("initrd-{name}"));
    std::fs::create_dir_all(&dir).expect("create initrd dir");
    let script_path = dir.join("husk-test.sh");
    std::fs::write(&script_path, format!("#!/bin/sh\n{script}\n")).expect("write test script");
    std::fs::set_permissions(&script_path, std::fs::Permissions::from_mode(0o755))
        .expect("make the test script executable");
    let out = dir.join("initrd.cpio");
    let init = root.join("resources/guest/test-init");
    let mut args = vec![
        out.to_str().expect("utf-8 path").to_string(),
        init.to_str().expect("utf-8 path").to_string(),
        format!("{}:/husk-test.sh", script_path.display()),
    ];
    args.extend(
        extra
            .iter()
            .map(|(src, dest)| format!("{}:{dest}", src.display())),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_script(&root.join("resources/guest/build-initramfs.sh"), &args);
    out
}

/// A host program (e.g. from e2fsprogs), found on PATH or in the sbin dirs.
pub fn host_tool(name: &str) -> PathBuf {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{name} is not installed (resources/test.sh installs it)"))
}

/// What a command printed and how it ended.
#[derive(Debug)]
pub struct RunResult {
    /// Exit status (125: the node VM itself failed).
    pub status: i32,
    /// stdout and stderr, interleaved as the console showed them.
    pub output: String,
}

fn value_of(line: &str, key: &str) -> Option<String> {
    line.trim()
        .strip_prefix(key)
        .and_then(|rest| rest.strip_prefix(' '))
        .map(|v| v.trim().to_string())
}

impl RunResult {
    /// The value after `key ` on the first line that starts with `key`.
    pub fn value(&self, key: &str) -> Option<String> {
        self.output.lines().find_map(|l| value_of(l, key))
    }

    /// Panics with the whole output unless the command exited with `status`.
    pub fn assert_status(&self, status: i32) -> &Self {
        assert_eq!(
            self.status, status,
            "expected exit status {status}, got {}; output:\n{}",
            self.status, self.output
        );
        self
    }

    /// Panics with the whole output unless it contains `needle`.
    pub fn assert_contains(&self, needle: &str) -> &Self {
        assert!(
            self.output.contains(needle),
            "output lacks {needle:?}:\n{}",
            self.output
        );
        self
    }
}

/// A directory of files to hand to a command, removed when dropped.
pub struct Payload {
    dir: PathBuf,
    /// run.sh's limit for the whole node VM run (s); its default if None.
    timeout: Option<u64>,
    /// Where run.sh records the node's failures instead of the suite's
    /// `HUSK_NODE_RETRIES` (for the test of that record itself).
    retries: Option<PathBuf>,
    /// In the node VM even where guests could run on this host.
    node_vm: bool,
    /// More of run.sh's environment.
    env: Vec<(String, String)>,
}

impl Payload {
    /// An empty payload directory.
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("husk-payload-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create payload dir");
        Payload {
            dir,
            timeout: None,
            retries: None,
            node_vm: false,
            env: Vec::new(),
        }
    }

    /// Gives the node VM `secs` for the run instead of run.sh's default
    /// (600 s), for the few tests that run that long by design.
    pub fn timeout(mut self, secs: u64) -> Self {
        self.timeout = Some(secs);
        self
    }

    /// Has run.sh append the node's failures to `file` rather than to the
    /// file the suite names in `HUSK_NODE_RETRIES`: for a test that makes
    /// the node fail on purpose, so the suite's count stays the truth.
    pub fn record_node_failures_in(mut self, file: &Path) -> Self {
        self.retries = Some(file.to_path_buf());
        self
    }

    /// Runs the command in the node VM even on a host whose /dev/kvm
    /// could run guests itself (`HUSK_NODE=vm`): for tests of the node VM.
    pub fn in_the_node_vm(mut self) -> Self {
        self.node_vm = true;
        self
    }

    /// Sets `key` in run.sh's environment (its `HUSK_NODE_*` knobs).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// The payload directory (the command's working directory).
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Adds `src` under `name` (hard link when possible, else a copy).
    pub fn add(self, src: &Path, name: &str) -> Self {
        let dst = self.dir.join(name);
        // A hard link to a symlink would be the symlink, which means
        // something else inside the node (/usr/sbin/ip -> /bin/ip there
        // is busybox's).
        let src = &std::fs::canonicalize(src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
        if std::fs::hard_link(src, &dst).is_err() {
            std::fs::copy(src, &dst)
                .unwrap_or_else(|e| panic!("copy {} into payload: {e}", src.display()));
        }
        self
    }

    /// Adds a file with `contents` under `name`.
    pub fn write(self, name: &str, contents: &[u8]) -> Self {
        std::fs::write(self.dir.join(name), contents).expect("write payload file");
        self
    }

    /// Adds husk, both kernels and the test initramfs.
    pub fn with_guest(self) -> Self {
        let a = artifacts();
        self.add(&a.husk, "husk")
            .add(&a.vmlinux, "vmlinux")
            .add(&a.bzimage, "bzImage")
            .add(&a.test_initrd, "initrd.cpio")
    }

    /// Runs `script` (sh) with the payload as its working directory, where a
    /// real KVM is: directly on a hardware-KVM host, else in the node VM.
    pub fn run(&self, script: &str) -> RunResult {
        let mut cmd = Command::new("bash");
        if let Some(image) = node_image() {
            cmd.env("HUSK_NODE_IMAGE", image);
        }
        // The name run.sh gives this run where it records a failure of
        // the node (resources/test.sh lists them in its summary).
        cmd.env("HUSK_NODE_LABEL", test_label());
        if let Some(file) = &self.retries {
            cmd.env("HUSK_NODE_RETRIES", file);
        }
        if self.node_vm {
            cmd.env("HUSK_NODE", "vm");
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let out = cmd
            .arg(repo_root().join("resources/node/run.sh"))
            .args(
                self.timeout
                    .map(|t| ["--timeout".to_string(), t.to_string()])
                    .into_iter()
                    .flatten(),
            )
            .arg("--payload")
            .arg(&self.dir)
            .args(["--", "sh", "-c", script])
            .output()
            .expect("run resources/node/run.sh");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let mut output = last_boot(&stdout).to_string();
        output.push_str(&String::from_utf8_lossy(&out.stderr));
        // Tests show the node's output when they fail; this shows it always
        // (with --nocapture), to read what a passing test saw.
        if std::env::var_os("HUSK_TEST_SHOW_OUTPUT").is_some() {
            eprintln!("{output}");
        }
        // A test that makes the node fail on purpose keeps its own record.
        if self.retries.is_none() {
            report_node_failures(&output);
        }
        report_lost_notifications(&output);
        RunResult {
            status: out.status.code().unwrap_or(-1),
            output,
        }
    }
}

/// What the command printed in the node's last boot: when run.sh booted
/// the node again, the command ran again from its start, and what it
/// printed the first time (up to run.sh's marker line) would otherwise be
/// read twice.
fn last_boot(stdout: &str) -> &str {
    const MARKER: &str = "run.sh: HUSK-NODE-BOOTED-AGAIN\n";
    match stdout.rfind(MARKER) {
        Some(i) if i == 0 || stdout[..i].ends_with('\n') => &stdout[i + MARKER.len()..],
        _ => stdout,
    }
}

/// Says on the terminal, even for a test that passes, that run.sh had to
/// boot the node VM again (or gave up on it): written to stderr itself,
/// which the test harness does not capture, so a second boot is never
/// hidden in a pass. resources/test.sh counts them in its closing line.
fn report_node_failures(output: &str) {
    use std::io::Write;
    for line in output.lines().filter(|l| {
        l.starts_with("run.sh: ")
            && (l.contains("; booting it again") || l.starts_with("run.sh: again, "))
    }) {
        let _ = writeln!(std::io::stderr(), "husk-tests: {}: {line}", test_label());
    }
}

/// Says on the terminal, even for a test that passes, that husk's timer
/// found a virtio queue whose notification was lost (its warning "...
/// waited a whole second without a notification ...", in whatever of
/// husk's log the scenario printed). resources/test.sh counts them in its
/// closing line.
fn report_lost_notifications(output: &str) {
    use std::io::Write;
    for line in output
        .lines()
        .filter(|l| l.contains("waited a whole second without a notification"))
    {
        let _ = writeln!(
            std::io::stderr(),
            "husk-tests: {}: lost queue notification: {line}",
            test_label()
        );
    }
}

/// The running test's name: libtest runs each test on a thread named
/// after it (`module::name` for tests in a module).
pub fn test_name() -> String {
    match std::thread::current().name() {
        Some(name) if name != "main" => name.to_string(),
        _ => panic!("test_name() called outside a test's own thread"),
    }
}

/// `<test binary>::<test>` (`shim::create_delete_cycles_leak_nothing`), or
/// the binary's name alone off a test's thread.
pub fn test_label() -> String {
    let exe = std::env::current_exe().ok();
    let stem = exe
        .as_deref()
        .and_then(Path::file_name)
        .and_then(|n| n.to_str())
        .unwrap_or("test");
    // cargo names test binaries <name>-<16 hex digits>.
    let binary = match stem.rsplit_once('-') {
        Some((name, hash)) if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
            name
        }
        _ => stem,
    };
    match std::thread::current().name() {
        Some(name) if name != "main" => format!("{binary}::{name}"),
        _ => binary.to_string(),
    }
}

/// Panics unless this process runs as root: for the tests marked
/// `#[ignore = "needs root..."]`, which `--include-ignored` (resources/test.sh,
/// as root) runs; run without root they fail rather than pass unseen.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (it is #[ignore]d for that reason; run it as root with --include-ignored)"
    );
}

impl Drop for Payload {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs the husk binary directly on this host, for checks that fail before
/// any guest code runs (configuration and input errors). Needs only a
/// /dev/kvm that can create VMs, which kvm_pvm can.
pub fn husk_on_host(args: &[&str]) -> RunResult {
    let out = Command::new(husk_binary())
        .args(args)
        .output()
        .expect("run husk");
    let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
    output.push_str(&String::from_utf8_lossy(&out.stderr));
    RunResult {
        status: out.status.code().unwrap_or(-1),
        output,
    }
}

pub use vmm::test_utils::tiny_elf;

/// A spec like containerd's default, running `args`.
pub fn oci_spec(args: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "ociVersion": "1.1.0",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin", "HOME=/root"],
            "cwd": "/",
            "capabilities": {
                "bounding": ["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_SETUID", "CAP_SETGID"],
                "effective": ["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_SETUID", "CAP_SETGID"],
                "permitted": ["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_SETUID", "CAP_SETGID"]
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 512}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs"},
        "hostname": "box",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/sys/firmware"],
            "readonlyPaths": ["/proc/sys", "/proc/bus"],
            "sysctl": {"kernel.msgmax": "4096"}
        }
    })
}

/// The agent initramfs (`resources/agent/build.sh`), built once per test
/// process.
pub fn agent_initrd() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let out = std::env::temp_dir().join(format!("husk-test-agent-{}.cpio", std::process::id()));
        let st = Command::new("bash")
            .arg(repo_root().join("resources/agent/build.sh"))
            .arg(&out)
            .status()
            .expect("run resources/agent/build.sh");
        assert!(st.success(), "resources/agent/build.sh failed");
        out
    })
}

/// A statically linked husk (glibc's static-pie), built once per test
/// process: what the shim runs in its jail, which has no libraries.
/// Built for the explicit target, so the flag reaches husk's crates only,
/// not the build's proc-macros.
pub fn static_husk() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        const TARGET: &str = "x86_64-unknown-linux-gnu";
        let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(repo_root())
            .args([
                "build", "--quiet", "-p", "husk", "--bin", "husk", "--target", TARGET,
            ])
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            // A build of its own (the target's directory): without debug
            // information it costs the suite less.
            .env("CARGO_PROFILE_DEV_DEBUG", "0")
            .status()
            .expect("run cargo build for a static husk");
        assert!(st.success(), "cargo build of a static husk failed");
        repo_root().join("target").join(TARGET).join("debug/husk")
    })
}

/// Runs `cmd` on this host; panics with its stderr unless it succeeds.
pub fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs this host's husk with `args` and `HUSK_CACHE_DIR=cache`; panics
/// with its stderr if it fails.
pub fn husk_with_cache(args: &[&str], cache: &Path) {
    let out = Command::new(husk_binary())
        .args(args)
        .env("HUSK_CACHE_DIR", cache)
        .output()
        .expect("run husk");
    assert!(
        out.status.success(),
        "husk {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Builds the bundled busybox image as `<dir>/busybox` and its root
/// filesystem into the cache `<dir>/cache` (the node VM has no e2fsprogs
/// to build one); returns the ext4 image's path.
pub fn busybox_rootfs(dir: &Path) -> PathBuf {
    let image = dir.join("busybox");
    let cache = dir.join("cache");
    husk_with_cache(
        &[
            "image",
            "build-busybox",
            image.to_str().expect("utf-8 path"),
        ],
        &cache,
    );
    husk_with_cache(
        &["image", "rootfs", image.to_str().expect("utf-8 path")],
        &cache,
    );
    let ext4 = std::fs::read_dir(cache.join("rootfs/v1"))
        .expect("the rootfs cache")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "ext4"))
        .expect("an ext4 image in the rootfs cache");
    ext4
}

/// virtiofsd, the virtio-fs project's vhost-user file server, which
/// `husk_virtiofsd` in resources/lib.sh builds (the test command runs it)
/// and names in `HUSK_VIRTIOFSD`.
pub fn virtiofsd() -> PathBuf {
    cached_tool(
        "HUSK_VIRTIOFSD",
        "/var/cache/husk/virtiofsd/1.14.0/bin/virtiofsd",
        "resources/test.sh builds virtiofsd there (husk_virtiofsd in resources/lib.sh)",
    )
}

/// A tool the test command's set-up puts in husk's cache and names in
/// the environment variable `env` (else at `default`); panics with `how`
/// (what makes it) when it is not there.
pub fn cached_tool(env: &str, default: &str, how: &str) -> PathBuf {
    let path = std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| default.into());
    assert!(path.exists(), "{} is missing: {how}", path.display());
    path
}
