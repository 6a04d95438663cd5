//! Registry images on the command line: `husk pull REF` (pull into the
//! cache, print the resolved digest), the flags `husk run` and
//! `husk image rootfs` share for registry references (`--pull`, `--creds`,
//! `--insecure-registry`), and the per-layer progress display on stderr,
//! shown only when stderr is a terminal.

use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;

use husk_image::oci::Platform;
use husk_image::registry::{
    self, Credentials, ImageSource, Progress, ProgressFn, PullPolicy, RegistryOptions,
};
use husk_image::rootfs::Rootfs;
use husk_image::RootfsOptions;

/// How to reach registries (shared by `husk pull`, `husk run` and
/// `husk image rootfs`).
#[derive(Args, Debug, Clone, Default)]
pub struct RegistryArgs {
    /// Log in to the registry as USER:PASSWORD (default: the registry's
    /// entry in $DOCKER_CONFIG/config.json or ~/.docker/config.json, else
    /// anonymous). $HUSK_REGISTRY_CREDS keeps it off the command line.
    #[arg(
        long,
        value_name = "USER:PASSWORD",
        env = "HUSK_REGISTRY_CREDS",
        hide_env_values = true
    )]
    creds: Option<String>,
    /// Speak plain HTTP to this registry (HOST: any port of HOST;
    /// HOST:PORT: that one). Repeatable. Loopback registries (localhost,
    /// 127.0.0.0/8) use plain HTTP, or HTTPS when they answer that they
    /// speak only that; all others HTTPS.
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    insecure: Vec<String>,
}

impl RegistryArgs {
    fn options(&self, platform: Platform, cache_dir: PathBuf) -> anyhow::Result<RegistryOptions> {
        let creds = self.creds.as_deref().map(Credentials::parse).transpose()?;
        Ok(RegistryOptions {
            platform,
            cache_dir,
            creds,
            insecure: self.insecure.clone(),
            progress: progress_display(),
            ..RegistryOptions::default()
        })
    }
}

/// Flags of `husk pull`.
#[derive(Args, Debug)]
pub struct PullArgs {
    #[command(flatten)]
    registry: RegistryArgs,
    /// Which image of a multi-platform index (OS/ARCH[/VARIANT]; default:
    /// this host's).
    #[arg(long)]
    platform: Option<String>,
    /// Cache directory (default $HUSK_CACHE_DIR or /var/cache/husk).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// [REGISTRY/]NAME[:TAG][@sha256:DIGEST]; without REGISTRY, Docker Hub.
    reference: String,
}

/// Runs `husk pull`: pulls (re-resolving a tag) and prints the digest the
/// reference resolved to.
pub fn run(args: PullArgs) -> anyhow::Result<u8> {
    let reference = registry::ImageRef::parse(&args.reference)?;
    let platform = match &args.platform {
        Some(p) => Platform::parse(p)?,
        None => Platform::host(),
    };
    let cache = args.cache_dir.unwrap_or_else(husk_image::rootfs::cache_dir);
    let mut opts = args.registry.options(platform, cache)?;
    let t0 = Instant::now();
    let pulled = registry::pull(&reference, &mut opts)
        .with_context(|| format!("cannot pull {reference}"))?;
    tracing::info!(
        reference = %pulled.reference,
        manifest = %pulled.manifest_digest,
        fetched = pulled.blobs_fetched,
        reused = pulled.blobs_reused,
        bytes = pulled.bytes_fetched,
        ms = t0.elapsed().as_millis() as u64,
        "pulled"
    );
    println!("{}", pulled.digest);
    Ok(0)
}

/// The root filesystem of IMAGE for `husk run` and `husk image rootfs`: a
/// local layout (or the bundled busybox image without IMAGE), or a
/// registry reference, pulled as `policy` says.
pub fn rootfs_for(
    image: Option<&str>,
    policy: PullPolicy,
    registry_args: &RegistryArgs,
    opts: &RootfsOptions,
) -> anyhow::Result<Rootfs> {
    let what = image.unwrap_or("(bundled busybox)");
    let source = image.map(ImageSource::parse).transpose()?;
    match source {
        Some(ImageSource::Registry(reference)) => {
            let mut reg = registry_args.options(opts.platform.clone(), opts.cache_dir.clone())?;
            let (rootfs, pulled) =
                registry::rootfs_for_reference(&reference, policy, &mut reg, opts)
                    .with_context(|| format!("image {reference}"))?;
            tracing::debug!(?pulled, "registry image");
            Ok(rootfs)
        }
        _ => husk_image::rootfs_for(image, opts).with_context(|| format!("image {what}")),
    }
}

/// A progress display on stderr when it is a terminal: one line per blob,
/// its bytes so far, then its size once verified. None (quiet) otherwise.
fn progress_display() -> Option<ProgressFn> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let mut last = Instant::now();
    Some(Box::new(move |event: Progress<'_>| {
        let mut err = std::io::stderr().lock();
        let short = |d: &str| d.get(..19).unwrap_or(d).to_string();
        // Errors writing to the terminal are not the pull's concern.
        let _ = match event {
            Progress::Start { digest, size } => {
                last = Instant::now();
                write!(err, "{}: downloading {}", short(digest), human(size))
            }
            Progress::Bytes { digest, done, size } => {
                if last.elapsed() < Duration::from_millis(100) && done < size {
                    return;
                }
                last = Instant::now();
                write!(
                    err,
                    "\r\x1b[K{}: {} / {}",
                    short(digest),
                    human(done),
                    human(size)
                )
            }
            Progress::Done {
                digest,
                size,
                reused,
            } => {
                let how = if reused { "already cached" } else { "done" };
                writeln!(err, "\r\x1b[K{}: {} {how}", short(digest), human(size))
            }
        };
        let _ = err.flush();
    }))
}

/// Bytes as B, KiB, MiB or GiB with one decimal.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(3 << 20), "3.0 MiB");
        assert_eq!(human(5 << 30), "5.0 GiB");
    }
}
