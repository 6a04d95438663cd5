//! `husk image ...`: the image tools on the command line. `rootfs` turns an
//! OCI image into a cached ext4 root filesystem and prints one JSON object
//! describing it; `build-busybox` writes the bundled busybox image.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use husk_image::{busybox, oci::Platform, rootfs, RootfsOptions};

/// Flags of `husk image`.
#[derive(Args, Debug)]
pub struct ImageArgs {
    #[command(subcommand)]
    command: ImageCommand,
}

#[derive(Subcommand, Debug)]
enum ImageCommand {
    /// Build (or find in the cache) the ext4 root filesystem of an OCI image
    /// and print {"rootfs", "manifest_digest", "config", "size_bytes",
    /// "cached"} as JSON.
    Rootfs {
        /// PATH or PATH:REF; PATH is an OCI layout directory or a tar of one
        /// (plain or gzip). REF matches the org.opencontainers.image.ref.name
        /// annotation. Or a registry reference,
        /// [REGISTRY/]NAME[:TAG][@sha256:DIGEST], pulled as --pull says.
        /// Without IMAGE: the bundled busybox image.
        image: Option<String>,
        /// When to contact the registry for a registry IMAGE (always,
        /// missing, never; as husk run).
        #[arg(long, default_value = "missing")]
        pull: husk_image::registry::PullPolicy,
        #[command(flatten)]
        registry: crate::pull_cmd::RegistryArgs,
        /// Copy the image here (a private, writable copy) instead of
        /// pointing at the shared cached file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Which image of a multi-platform index (OS/ARCH[/VARIANT]).
        #[arg(long)]
        platform: Option<String>,
        /// Cache directory (default $HUSK_CACHE_DIR or /var/cache/husk).
        #[arg(long)]
        cache_dir: Option<PathBuf>,
    },
    /// Write the bundled busybox OCI image. With OUT_DIR, into OUT_DIR;
    /// without, into the cache (keyed by the busybox version), and print
    /// the layout's path. With OUT_DIR, `--ref` and a command after `--`
    /// make other images of the same busybox, for example the pod sandbox
    /// ("pause") image containerd's CRI plugin wants where no registry is
    /// reachable: `build-busybox DIR --ref husk.local/pause:1 -- sleep 2147483647`.
    BuildBusybox {
        /// Where to write the OCI layout.
        out_dir: Option<PathBuf>,
        /// The image's name (its org.opencontainers.image.ref.name).
        #[arg(long, requires = "out_dir", default_value = busybox::REF)]
        r#ref: String,
        /// The image's default command (default: sh).
        #[arg(last = true, requires = "out_dir")]
        cmd: Vec<String>,
        /// The busybox binary to package (a dynamically linked one brings
        /// its libraries, and its applets become hard links).
        #[arg(long, default_value = busybox::DEFAULT_BUSYBOX)]
        busybox: PathBuf,
        /// Another program of this host to put in /usr/bin, with its
        /// libraries (repeatable; with OUT_DIR).
        #[arg(long = "add", requires = "out_dir")]
        add: Vec<PathBuf>,
        /// Cache directory (default $HUSK_CACHE_DIR or /var/cache/husk).
        #[arg(long)]
        cache_dir: Option<PathBuf>,
    },
}

/// Runs `husk image ...`; returns the exit status.
pub fn run(args: ImageArgs) -> anyhow::Result<u8> {
    match args.command {
        ImageCommand::Rootfs {
            image,
            pull,
            registry,
            out,
            platform,
            cache_dir,
        } => {
            let mut opts = RootfsOptions {
                out,
                ..RootfsOptions::default()
            };
            if let Some(p) = platform {
                opts.platform = Platform::parse(&p)?;
            }
            if let Some(d) = cache_dir {
                opts.cache_dir = d;
            }
            let built = crate::pull_cmd::rootfs_for(image.as_deref(), pull, &registry, &opts)
                .context("cannot build the root filesystem")?;
            println!("{}", serde_json::to_string(&built)?);
        }
        ImageCommand::BuildBusybox {
            out_dir,
            r#ref,
            cmd,
            busybox: bin,
            add,
            cache_dir,
        } => {
            let path = match out_dir {
                Some(dir) => {
                    let cmd = if cmd.is_empty() {
                        vec!["sh".into()]
                    } else {
                        cmd
                    };
                    busybox::write_busybox_image(&dir, &bin, &add, &r#ref, cmd)?;
                    dir
                }
                None => busybox::default_image(&cache_dir.unwrap_or_else(rootfs::cache_dir), &bin)?,
            };
            println!("{}", path.display());
        }
    }
    Ok(0)
}
