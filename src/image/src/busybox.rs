//! The bundled default image: an OCI layout with one reproducible layer made
//! from a static busybox (Debian's busybox-static): `/bin/busybox`, a symlink
//! per applet where `busybox --list-full` puts it, `/etc/passwd` and
//! `/etc/group` (root, nobody), and the usual empty directories. Same
//! busybox in, same bytes (and manifest digest) out. A dynamically linked
//! busybox (Debian's busybox package, for tests of images that load shared
//! libraries) brings its ELF interpreter and libraries as `ldd` finds them
//! on the host, and its applets are hard links, as a distribution installs
//! them. It is cached under
//! `<cache>/images/busybox-<version>/`, keyed by the busybox-static package
//! version (or the binary's digest when dpkg does not know it).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::oci::{sha256_digest, Descriptor, ExecConfig};
use super::writer::{self, Layer, LayerBuilder, WriterError};

/// Where Debian's busybox-static installs it.
pub const DEFAULT_BUSYBOX: &str = "/bin/busybox";
/// Ref name of the image in its layout.
pub const REF: &str = "busybox:latest";

/// Errors building the busybox image.
#[derive(Debug, thiserror::Error)]
pub enum BusyboxError {
    /// The busybox binary could not be read.
    #[error("cannot read busybox {path}")]
    Read {
        /// The binary.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The busybox binary could not be run.
    #[error("cannot run busybox {path}")]
    Run {
        /// The binary.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// `ldd` could not tell the libraries of a dynamically linked busybox.
    #[error("cannot list the shared libraries of {path} with ldd")]
    Ldd {
        /// The binary.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// `busybox --list-full` failed.
    #[error("busybox {path} --list-full failed: {status}")]
    List {
        /// The binary.
        path: PathBuf,
        /// How it ended.
        status: std::process::ExitStatus,
    },
    /// Writing the layout failed.
    #[error(transparent)]
    Writer(#[from] WriterError),
    /// A cache directory could not be made.
    #[error("cannot write {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

type Result<T> = std::result::Result<T, BusyboxError>;

enum Node {
    Dir(u32),
    File(u32, Vec<u8>),
    Symlink(String),
    HardLink(String),
}

const PASSWD: &str =
    "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
const GROUP: &str = "root:x:0:\nnobody:x:65534:\n";
const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The applets' install paths (`bin/ls`, `usr/bin/awk`, ...).
fn applets(busybox: &Path) -> Result<Vec<String>> {
    let out = Command::new(busybox)
        .arg("--list-full")
        .output()
        .map_err(|source| BusyboxError::Run {
            path: busybox.into(),
            source,
        })?;
    if !out.status.success() {
        return Err(BusyboxError::List {
            path: busybox.into(),
            status: out.status,
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().trim_start_matches('/').to_string())
        // Only plain relative names: an applet list must not place files
        // outside the usual directories.
        .filter(|l| !l.is_empty() && !l.split('/').any(|c| c.is_empty() || c == "." || c == ".."))
        .collect())
}

/// The shared objects a dynamically linked `binary` loads (its ELF
/// interpreter first), as absolute paths on the host; empty for a static
/// binary.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|source| BusyboxError::Ldd {
            path: binary.into(),
            source,
        })?;
    // ldd fails ("not a dynamic executable") for a static binary.
    if !out.status.success() {
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; the vDSO has no file.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|source| BusyboxError::Read {
        path: path.into(),
        source,
    })
}

/// Adds `rel` (a relative path) and the directories above it.
fn insert_with_parents(nodes: &mut BTreeMap<String, Node>, rel: &Path, node: Node) {
    let mut parent = rel.parent();
    while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
        nodes
            .entry(p.to_string_lossy().into_owned())
            .or_insert(Node::Dir(0o755));
        parent = p.parent();
    }
    nodes.insert(rel.to_string_lossy().into_owned(), node);
}

/// The layer tar: deterministic (sorted entries, fixed mtime, uid 0).
pub fn busybox_layer(busybox: &Path) -> Result<Vec<u8>> {
    busybox_layer_with(busybox, &[])
}

/// [`busybox_layer`] plus host programs (`extras`, each to /usr/bin under
/// its own name) and the shared libraries they and busybox load.
pub fn busybox_layer_with(busybox: &Path, extras: &[PathBuf]) -> Result<Vec<u8>> {
    let binary = read(busybox)?;
    let libraries = shared_libraries(busybox)?;
    let dynamic = !libraries.is_empty();
    let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
    for d in [
        "bin", "dev", "etc", "home", "proc", "sbin", "sys", "usr", "usr/bin", "usr/sbin", "var",
    ] {
        nodes.insert(d.into(), Node::Dir(0o755));
    }
    nodes.insert("root".into(), Node::Dir(0o700));
    nodes.insert("tmp".into(), Node::Dir(0o1777));
    for applet in applets(busybox)? {
        if applet == "bin/busybox" {
            continue;
        }
        let mut parent = Path::new(&applet).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            nodes
                .entry(p.to_string_lossy().into_owned())
                .or_insert(Node::Dir(0o755));
            parent = p.parent();
        }
        let link = if dynamic {
            Node::HardLink("bin/busybox".into())
        } else {
            Node::Symlink("/bin/busybox".into())
        };
        nodes.insert(applet, link);
    }
    let mut libraries = libraries;
    for extra in extras {
        let name = extra.file_name().map(PathBuf::from).unwrap_or_default();
        insert_with_parents(
            &mut nodes,
            &Path::new("usr/bin").join(name),
            Node::File(0o755, read(extra)?),
        );
        libraries.extend(shared_libraries(extra)?);
    }
    for lib in &libraries {
        let rel = lib.strip_prefix("/").unwrap_or(lib);
        insert_with_parents(&mut nodes, rel, Node::File(0o755, read(lib)?));
    }
    nodes.insert("bin/busybox".into(), Node::File(0o755, binary));
    nodes.insert("etc/passwd".into(), Node::File(0o644, PASSWD.into()));
    nodes.insert("etc/group".into(), Node::File(0o644, GROUP.into()));
    let mut layer = LayerBuilder::new();
    // Sorted names put every directory before what it holds.
    for (path, node) in &nodes {
        match node {
            Node::Dir(mode) => layer.dir(path, *mode)?,
            Node::File(mode, data) => layer.file(path, *mode, data)?,
            Node::Symlink(target) => layer.symlink(path, target)?,
            Node::HardLink(_) => continue,
        };
    }
    // Hard links after everything else: their target must come first.
    for (path, node) in &nodes {
        if let Node::HardLink(target) = node {
            layer.hardlink(path, target)?;
        }
    }
    Ok(layer.finish()?)
}

/// Writes the busybox image as an OCI layout into `out` (ref
/// `busybox:latest`); returns the manifest descriptor.
pub fn write_busybox_layout(out: &Path, busybox: &Path) -> Result<Descriptor> {
    write_busybox_image(out, busybox, &[], REF, vec!["sh".into()])
}

/// Writes an image of the same busybox layer named `ref_name` whose default
/// command is `cmd` (a pod's sandbox image, for one).
pub fn write_busybox_image(
    out: &Path,
    busybox: &Path,
    extras: &[PathBuf],
    ref_name: &str,
    cmd: Vec<String>,
) -> Result<Descriptor> {
    let tar = busybox_layer_with(busybox, extras)?;
    let exec = ExecConfig {
        env: Some(vec![PATH_ENV.into()]),
        cmd: Some(cmd),
        working_dir: Some("/".into()),
        ..ExecConfig::default()
    };
    Ok(writer::write_layout(
        out,
        &[Layer { tar, gzip: true }],
        exec,
        Some(ref_name),
    )?)
}

/// The cache key: busybox-static's package version if dpkg knows the
/// binary's package, else the first 16 hex digits of the binary's sha256.
fn version_key(busybox: &Path) -> Result<String> {
    let version = Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}", "busybox-static"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|v| !v.is_empty());
    let key = match version {
        Some(v) if busybox == Path::new(DEFAULT_BUSYBOX) => v,
        _ => {
            let data = fs::read(busybox).map_err(|source| BusyboxError::Read {
                path: busybox.into(),
                source,
            })?;
            sha256_digest(&data)
                .trim_start_matches("sha256:")
                .chars()
                .take(16)
                .collect()
        }
    };
    Ok(key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect())
}

/// The default image's layout directory, built into the cache on first use:
/// `<cache_dir>/images/busybox-<version>`. Pass the result to
/// [`super::build_rootfs`] (it is a plain layout directory).
pub fn default_image(cache_dir: &Path, busybox: &Path) -> Result<PathBuf> {
    let images = cache_dir.join("images");
    let dest = images.join(format!("busybox-{}", version_key(busybox)?));
    if dest.join("index.json").is_file() {
        return Ok(dest);
    }
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BusyboxError::Io { path, source }
    };
    fs::create_dir_all(&images).map_err(io_err(&images))?;
    let tmp = tempfile::Builder::new()
        .prefix(".busybox-")
        .tempdir_in(&images)
        .map_err(io_err(&images))?;
    write_busybox_layout(tmp.path(), busybox)?;
    let built = tmp.keep();
    if let Err(e) = fs::rename(&built, &dest) {
        // Someone else finished first: theirs is identical.
        let _ = fs::remove_dir_all(&built);
        if !dest.join("index.json").is_file() {
            return Err(io_err(&dest)(e));
        }
    }
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::{Layout, Platform};

    #[test]
    fn an_image_of_the_same_busybox_gets_its_own_name_and_command() {
        let busybox = Path::new(DEFAULT_BUSYBOX);
        assert!(
            busybox.exists(),
            "no {DEFAULT_BUSYBOX}: install busybox-static (resources/lib.sh does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let cmd = vec!["sleep".to_string(), "2147483647".to_string()];
        write_busybox_image(dir.path(), busybox, &[], "husk.local/pause:1", cmd.clone()).unwrap();
        let layout = Layout::open(dir.path()).unwrap();
        let img = layout
            .resolve(Some("husk.local/pause:1"), &Platform::host())
            .unwrap();
        assert_eq!(img.config.cmd, cmd);
        assert!(layout.resolve(Some(REF), &Platform::host()).is_err());
    }

    #[test]
    fn busybox_layout_is_reproducible_and_complete() {
        let busybox = Path::new(DEFAULT_BUSYBOX);
        assert!(
            busybox.exists(),
            "no {DEFAULT_BUSYBOX}: install busybox-static (resources/lib.sh does)"
        );
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let da = write_busybox_layout(a.path(), busybox).unwrap();
        let db = write_busybox_layout(b.path(), busybox).unwrap();
        assert_eq!(da.digest, db.digest);
        let layout = Layout::open(a.path()).unwrap();
        let img = layout
            .resolve(Some("busybox:latest"), &Platform::host())
            .unwrap();
        assert_eq!(img.config.cmd, ["sh"]);
        assert!(img.config.env[0].starts_with("PATH="));
        let root = tempfile::tempdir().unwrap();
        crate::layers::unpack(&layout, &img.manifest.layers, root.path()).unwrap();
        let r = root.path();
        assert!(r.join("bin/busybox").is_file());
        assert_eq!(
            fs::read_link(r.join("bin/sh")).unwrap(),
            Path::new("/bin/busybox")
        );
        for d in ["tmp", "proc", "sys", "dev", "root", "home", "etc"] {
            assert!(r.join(d).is_dir(), "{d}");
        }
        assert!(fs::read_to_string(r.join("etc/passwd"))
            .unwrap()
            .starts_with("root:x:0:0:"));

        let cache = tempfile::tempdir().unwrap();
        let p1 = default_image(cache.path(), busybox).unwrap();
        let p2 = default_image(cache.path(), busybox).unwrap();
        assert_eq!(p1, p2);
        assert!(p1
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("busybox-"));
    }
}
