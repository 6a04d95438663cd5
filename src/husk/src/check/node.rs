//! What the shim runs with: `/etc/husk/config.toml` (read by the shim's own
//! parser, so that a file the shim would refuse fails here too) and the
//! files it names (husk, the guest kernel, the agent initramfs), the host
//! tools it calls (mke2fs, ip, tc), and containerd: its version, whether
//! its CRI configuration names the husk runtime (read through `containerd
//! config dump`, so `imports` count), and the shim's binary on the PATH
//! containerd searches; with `volumes = "share"`, the virtiofsd the shim
//! would start and the kernel's mount API it binds volumes with.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use vmm::error::Chain;

use super::Check;

/// The shim's configuration, parsed by the shim's own code (compiled in
/// here too): the same keys, defaults and range checks.
#[allow(dead_code)] // husk check reads the paths; the shim uses the rest
#[path = "../../../shim/src/config.rs"]
pub(super) mod shim_config;

use shim_config::{Config, Volumes};

/// The runtime type containerd maps to `containerd-shim-husk-v2`.
pub const RUNTIME_TYPE: &str = "io.containerd.husk.v2";
/// The shim's binary name.
const SHIM: &str = "containerd-shim-husk-v2";
/// Where the installation steps are.
const INSTALL_DOC: &str = "docs/getting-started.md";

pub(super) fn checks(config: &Path, containerd_config: Option<&Path>) -> Vec<Check> {
    let (config_check, settings) = husk_config(config);
    let mut checks = vec![config_check];
    if let Some(s) = settings {
        checks.push(husk_binary(&s));
        checks.push(kernel(&s.kernel));
        checks.push(initrd(&s.initrd));
        checks.push(virtiofsd(&s));
        if s.volumes == Volumes::Share {
            checks.push(if s.share_relay {
                Check::ok(
                    "shared-memory",
                    "pods' guest memory is private (the share relays): nothing to set",
                )
            } else {
                shared_memory(std::fs::read_to_string(SHMEM_ENABLED).ok())
            });
        }
    }
    checks.push(tools());
    checks.push(shim());
    let version = containerd_version();
    let installed = version.status != super::Status::Fail;
    checks.push(version);
    if installed {
        checks.push(containerd_runtime(containerd_config));
    }
    checks
}

fn husk_config(path: &Path) -> (Check, Option<Config>) {
    const NAME: &str = "config";
    if !path.exists() {
        return (
            Check::ok(NAME, format!("no {}: the shim's defaults", path.display())),
            Some(Config::default()),
        );
    }
    match Config::load(path) {
        Ok(c) => (Check::ok(NAME, format!("{} reads", path.display())), Some(c)),
        Err(e) => (
            Check::fail(
                NAME,
                Chain(&e).to_string(),
                format!("fix the file: the shim refuses to start with it ({INSTALL_DOC} lists the keys)"),
            ),
            None,
        ),
    }
}

/// With volumes shared, the shim's virtiofsd (`--version` answers) and
/// mount_setattr(2) (Linux 5.12), with which it binds read-only volumes.
fn virtiofsd(s: &Config) -> Check {
    const NAME: &str = "virtiofsd";
    if s.volumes == Volumes::Copy {
        return Check::ok(NAME, "volumes = \"copy\": none needed");
    }
    // SAFETY: mount_setattr(2) on descriptor -1 with no attributes: it
    // changes nothing, and fails EBADF where it exists, ENOSYS where not.
    let probe = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            -1,
            c"".as_ptr(),
            0,
            std::ptr::null::<u8>(),
            0,
        )
    };
    if probe < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
        return Check::fail(
            NAME,
            "the kernel has no mount_setattr(2), which the shim binds volumes with",
            "run Linux 5.12 or later, or set volumes = \"copy\" in the config",
        );
    }
    let path = s.virtiofsd();
    match first_line(&path, &["--version"]) {
        Ok(v) => Check::ok(NAME, format!("{} ({v})", path.display())),
        Err(e) => Check::fail(
            NAME,
            e,
            "install virtiofsd (Debian 13's package, or cargo install virtiofsd), set virtiofsd in the config, or volumes = \"copy\"",
        ),
    }
}

/// Where the kernel says whether shared memory gets transparent huge pages.
const SHMEM_ENABLED: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";

/// The selected policy in a `shmem_enabled` file (`always within_size
/// [advise] never deny force`).
fn selected(policies: &str) -> Option<&str> {
    let start = policies.find('[')? + 1;
    let len = policies[start..].find(']')?;
    Some(&policies[start..start + len])
}

/// With volumes shared and not relayed, every pod's guest memory is
/// shared (memfd) and
/// husk asks for huge pages on it; `never` or `deny` gives 4 KiB pages,
/// slower for the guest and, measured under nested emulation, with
/// guests failing (docs/devices.md).
fn shared_memory(policies: Option<String>) -> Check {
    const NAME: &str = "shared-memory";
    let Some(policies) = policies else {
        return Check::ok(
            NAME,
            "the kernel has no transparent huge pages: nothing to set",
        );
    };
    match selected(&policies) {
        Some(p @ ("never" | "deny")) => Check::warn(
            NAME,
            format!("shared memory gets no huge pages ({SHMEM_ENABLED}: {p}); pods' guest memory is shared"),
            format!("echo advise > {SHMEM_ENABLED} (and at boot: transparent_hugepage_shmem=advise, Linux 6.14, or a boot script)"),
        ),
        Some(p) => Check::ok(NAME, format!("huge pages for guest memory ({SHMEM_ENABLED}: {p})")),
        None => Check::warn(
            NAME,
            format!("{SHMEM_ENABLED} reads {:?}", policies.trim()),
            format!("echo advise > {SHMEM_ENABLED}"),
        ),
    }
}

/// `name` in PATH's directories (and the sbin ones, where Debian puts
/// mke2fs), as an executable file.
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Runs `program args`; its first line of stdout, or why it did not run.
fn first_line(program: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "{} {} failed ({}): {}",
            program.display(),
            args.join(" "),
            out.status,
            err.lines().last().unwrap_or("").trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string())
}

fn husk_binary(s: &Config) -> Check {
    const NAME: &str = "husk";
    // As the shim looks: the configured path, else beside the shim, else PATH.
    let found = s.husk_binary.clone().or_else(|| {
        which(SHIM)
            .and_then(|shim| shim.parent().map(|d| d.join("husk")))
            .filter(|p| is_executable(p))
            .or_else(|| which("husk"))
    });
    let Some(path) = found else {
        return Check::fail(
            NAME,
            "no husk binary beside the shim or on PATH",
            format!(
                "install husk beside the shim ({INSTALL_DOC}), or set husk_binary in the config"
            ),
        );
    };
    match first_line(&path, &["--version"]) {
        Ok(v) => Check::ok(NAME, format!("{} ({v})", path.display())),
        Err(e) => Check::fail(NAME, e, "reinstall husk, or fix husk_binary in the config"),
    }
}

fn read_prefix(path: &Path, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(len);
    std::fs::File::open(path)?
        .take(len as u64)
        .read_to_end(&mut buf)?;
    Ok(buf)
}

/// What kind of kernel image `head` (the file's first 0x206 bytes) is.
fn kernel_kind(head: &[u8]) -> Option<&'static str> {
    if head.starts_with(b"\x7fELF") {
        Some("an ELF vmlinux")
    } else if head.get(0x202..0x206) == Some(b"HdrS") {
        Some("a bzImage")
    } else {
        None
    }
}

fn kernel(path: &Path) -> Check {
    const NAME: &str = "kernel";
    match read_prefix(path, 0x206) {
        Ok(head) => match kernel_kind(&head) {
            Some(kind) => Check::ok(NAME, format!("{} is {kind}", path.display())),
            None => Check::fail(
                NAME,
                format!("{} is neither an ELF vmlinux nor a bzImage", path.display()),
                "point kernel in the config at husk's guest kernel (guest-kernel-config/build.sh builds it)",
            ),
        },
        Err(e) => Check::fail(
            NAME,
            format!("cannot read the guest kernel {}: {e}", path.display()),
            format!("install the guest kernel as {INSTALL_DOC} says, or set kernel in the config"),
        ),
    }
}

fn initrd(path: &Path) -> Check {
    const NAME: &str = "initrd";
    match read_prefix(path, 6) {
        Ok(head) if head == b"070701" || head == b"070702" => Check::ok(
            NAME,
            format!("{} is a newc cpio archive", path.display()),
        ),
        Ok(head) if head.starts_with(&[0x1f, 0x8b]) => Check::ok(
            NAME,
            format!("{} is a gzip-compressed archive", path.display()),
        ),
        Ok(_) => Check::fail(
            NAME,
            format!("{} is not a cpio archive", path.display()),
            "point initrd in the config at the agent's initramfs (resources/agent/build.sh makes it)",
        ),
        Err(e) => Check::fail(
            NAME,
            format!("cannot read the agent initramfs {}: {e}", path.display()),
            format!("install the agent's initramfs as {INSTALL_DOC} says, or set initrd in the config"),
        ),
    }
}

fn tools() -> Check {
    const NAME: &str = "tools";
    let needed = [
        ("mke2fs", "e2fsprogs"),
        ("ip", "iproute2"),
        ("tc", "iproute2"),
    ];
    let missing: Vec<(&str, &str)> = needed
        .into_iter()
        .filter(|(tool, _)| which(tool).is_none())
        .collect();
    if missing.is_empty() {
        return Check::ok(NAME, "mke2fs, ip and tc are on PATH");
    }
    let mut packages: Vec<&str> = missing.iter().map(|(_, p)| *p).collect();
    packages.dedup();
    Check::fail(
        NAME,
        format!(
            "missing {}",
            missing
                .iter()
                .map(|(t, _)| *t)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        format!("apt install {}", packages.join(" ")),
    )
}

fn shim() -> Check {
    const NAME: &str = "shim";
    match which(SHIM) {
        Some(p) => Check::ok(
            NAME,
            format!("{} (containerd finds it by {RUNTIME_TYPE})", p.display()),
        ),
        None => Check::fail(
            NAME,
            format!("{SHIM} is not on PATH"),
            format!("install the shim where containerd's PATH reaches ({INSTALL_DOC})"),
        ),
    }
}

/// `1.6.20` from `containerd github.com/containerd/containerd 1.6.20~ds1 ...`.
fn parse_containerd_version(line: &str) -> Option<(u32, u32, String)> {
    let word = line.split_whitespace().nth(2)?;
    let version = word.trim_start_matches('v');
    let mut parts = version.split(['.', '~', '-', '+']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor, version.to_string()))
}

fn containerd_version() -> Check {
    const NAME: &str = "containerd";
    let Some(bin) = which("containerd") else {
        return Check::fail(
            NAME,
            "containerd is not installed",
            "apt install containerd (1.6 or later)",
        );
    };
    let line = match first_line(&bin, &["--version"]) {
        Ok(l) => l,
        Err(e) => return Check::fail(NAME, e, "reinstall containerd"),
    };
    match parse_containerd_version(&line) {
        Some((major, minor, v)) if (major, minor) >= (1, 6) => {
            Check::ok(NAME, format!("{v} ({})", bin.display()))
        }
        Some((_, _, v)) => Check::fail(
            NAME,
            format!("containerd {v} is older than 1.6"),
            "upgrade containerd to 1.6 or later (runtime v2 shims, CRI config version 2)",
        ),
        None => Check::warn(
            NAME,
            format!("cannot read a version from {line:?}"),
            "check that containerd is 1.6 or later",
        ),
    }
}

/// The CRI runtime handlers whose runtime_type is husk's, in a dumped
/// containerd config (CRI's table in config versions 2 and 3).
fn husk_handlers(config: &toml::Table) -> Vec<String> {
    let mut found = Vec::new();
    for plugin in ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.runtime"] {
        let runtimes = config
            .get("plugins")
            .and_then(|p| p.get(plugin))
            .and_then(|c| c.get("containerd"))
            .and_then(|c| c.get("runtimes"))
            .and_then(toml::Value::as_table);
        for (name, runtime) in runtimes.into_iter().flatten() {
            if runtime.get("runtime_type").and_then(toml::Value::as_str) == Some(RUNTIME_TYPE) {
                found.push(name.clone());
            }
        }
    }
    found
}

fn containerd_runtime(config: Option<&Path>) -> Check {
    const NAME: &str = "containerd-runtime";
    // Where the Debian package installed the handler to append.
    const PACKAGED: &str = "/usr/share/doc/husk/containerd-husk.toml";
    let fix = if Path::new(PACKAGED).is_file() {
        format!(
            "append the package's handler (cat {PACKAGED} >> /etc/containerd/config.toml) \
             and restart containerd"
        )
    } else {
        format!(
            "add a CRI runtime handler with runtime_type = \"{RUNTIME_TYPE}\" to containerd's \
             config.toml and restart containerd ({INSTALL_DOC}, \"Configure containerd\")"
        )
    };
    let mut cmd = Command::new("containerd");
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    let out = match cmd.args(["config", "dump"]).output() {
        Ok(o) => o,
        Err(e) => return Check::fail(NAME, format!("cannot run containerd config dump: {e}"), fix),
    };
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Check::fail(
            NAME,
            format!(
                "containerd cannot read its configuration: {}",
                err.lines().last().unwrap_or("").trim()
            ),
            "fix containerd's config.toml",
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let table: toml::Table = match toml::from_str(&text) {
        Ok(t) => t,
        Err(e) => {
            return Check::warn(
                NAME,
                format!("cannot parse containerd config dump: {}", e.message()),
                "check by hand that a CRI runtime has runtime_type = \"io.containerd.husk.v2\"",
            )
        }
    };
    let handlers = husk_handlers(&table);
    if handlers.is_empty() {
        Check::fail(
            NAME,
            format!("no CRI runtime handler has runtime_type = \"{RUNTIME_TYPE}\" (ctr run --runtime works without one)"),
            fix,
        )
    } else {
        Check::ok(
            NAME,
            format!(
                "CRI runtime handler {} runs {RUNTIME_TYPE} (a RuntimeClass with that handler selects it)",
                handlers.join(", ")
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::Status;

    #[test]
    fn a_config_the_shim_refuses_fails_and_a_missing_one_means_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let (c, s) = husk_config(&dir.path().join("none.toml"));
        assert_eq!(c.status, Status::Ok);
        assert_eq!(s, Some(Config::default()));
        let bad = dir.path().join("bad.toml");
        // An unknown key: the shim's parser refuses it, so the check fails.
        std::fs::write(&bad, "kernal = \"/k\"\n").unwrap();
        let (c, s) = husk_config(&bad);
        assert_eq!(c.status, Status::Fail);
        assert!(c.detail.contains("kernal"), "{}", c.detail);
        assert!(s.is_none());
        std::fs::write(&bad, "kernel = \"/k\"\ndefault_vcpus = 0\n").unwrap();
        assert_eq!(husk_config(&bad).0.status, Status::Fail);
        std::fs::write(&bad, "kernel = \"/k\"\n").unwrap();
        let (c, s) = husk_config(&bad);
        assert_eq!(c.status, Status::Ok);
        assert_eq!(s.map(|s| s.kernel), Some(PathBuf::from("/k")));
    }

    #[test]
    fn containerd_versions_parse_from_debian_and_upstream_builds() {
        let debian = "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3";
        assert_eq!(
            parse_containerd_version(debian).map(|v| (v.0, v.1)),
            Some((1, 6))
        );
        // Debian 13's, which tests/cri.rs and tests/shim.rs run too.
        let trixie = "containerd github.com/containerd/containerd 1.7.24~ds1 1.7.24~ds1-6+deb13u1";
        assert_eq!(
            parse_containerd_version(trixie).map(|v| (v.0, v.1, v.2)),
            Some((1, 7, "1.7.24~ds1".to_string()))
        );
        let upstream = "containerd github.com/containerd/containerd/v2 v2.0.2 c507a0257ea6";
        assert_eq!(
            parse_containerd_version(upstream).map(|v| (v.0, v.1)),
            Some((2, 0))
        );
        assert_eq!(parse_containerd_version("containerd"), None);
    }

    #[test]
    fn handlers_are_found_by_runtime_type_in_both_config_versions() {
        let v2: toml::Table = toml::from_str(
            r#"
            [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
            runtime_type = "io.containerd.runc.v2"
            [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.vm]
            runtime_type = "io.containerd.husk.v2"
            "#,
        )
        .unwrap();
        assert_eq!(husk_handlers(&v2), ["vm"]);
        let v3: toml::Table = toml::from_str(
            r#"
            [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.husk]
            runtime_type = "io.containerd.husk.v2"
            "#,
        )
        .unwrap();
        assert_eq!(husk_handlers(&v3), ["husk"]);
        assert!(husk_handlers(&toml::Table::new()).is_empty());
    }

    #[test]
    fn shared_memory_without_huge_pages_is_a_warning() {
        let status = |s: Option<&str>| shared_memory(s.map(String::from)).status;
        assert_eq!(
            selected("always within_size [advise] never deny force\n"),
            Some("advise")
        );
        assert_eq!(
            status(Some("always within_size advise [never] deny force\n")),
            super::super::Status::Warn
        );
        assert_eq!(
            status(Some("always within_size advise never [deny] force")),
            super::super::Status::Warn
        );
        assert_eq!(
            status(Some("[always] within_size advise never deny force")),
            super::super::Status::Ok
        );
        assert_eq!(status(Some("garbage")), super::super::Status::Warn);
        assert_eq!(status(None), super::super::Status::Ok);
    }

    #[test]
    fn kernels_are_told_by_their_magic() {
        assert_eq!(kernel_kind(b"\x7fELF\x02\x01"), Some("an ELF vmlinux"));
        let mut bz = vec![0u8; 0x206];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(kernel_kind(&bz), Some("a bzImage"));
        assert_eq!(kernel_kind(b"garbage"), None);
    }

    #[test]
    fn a_missing_kernel_and_a_garbage_initrd_fail_and_a_cpio_passes() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(kernel(&dir.path().join("none")).status, Status::Fail);
        let junk = dir.path().join("junk");
        std::fs::write(&junk, b"not an archive").unwrap();
        assert_eq!(initrd(&junk).status, Status::Fail);
        std::fs::write(&junk, b"070701rest").unwrap();
        assert_eq!(initrd(&junk).status, Status::Ok);
    }
}
