//! Images from OCI registries: `husk run REGISTRY/NAME:TAG` and `husk pull`.
//! [`reference`] tells a registry reference from a local layout path and
//! decides HTTP or HTTPS, [`credentials`] finds the login (`--creds`, the
//! Docker config), [`store`] is the content-addressed cache the pull writes
//! into (blobs shared by digest across images, temporaries renamed into
//! place), `pull` fetches with the `oci-client` crate: the manifest (an
//! index resolved to the platform), then the config and every layer not
//! already cached, each verified against its descriptor's size and digest,
//! and `error` says what went wrong. This module decides when to pull.
//! The image is then read from the cache like any local layout, so
//! [`crate::rootfs`] turns it into the guest's root filesystem unchanged.
//!
//! The client is async (tokio); a pull runs on a current-thread runtime of
//! its own, so callers stay synchronous.

pub mod credentials;
mod error;
mod pull;
pub mod reference;
pub mod store;

use std::path::PathBuf;

use crate::oci::{media, Descriptor, Index, Layout, OciError, Platform, ResolvedImage};
use crate::rootfs::{Rootfs, RootfsOptions};

pub use credentials::{Credentials, Login};
pub use error::RegistryError;
pub use reference::{ImageRef, ImageSource};
pub use store::Store;

/// Largest manifest or index we accept (as for local layouts).
pub(crate) const MAX_MANIFEST: usize = 4 << 20;
/// Deepest nesting of indexes we follow.
pub(crate) const MAX_DEPTH: usize = 4;
/// Tags named in a "no such tag" error.
pub(crate) const MAX_TAGS_SHOWN: usize = 10;
/// Manifest media types we ask for.
pub(crate) const ACCEPT: &[&str] = &[
    media::OCI_MANIFEST,
    media::OCI_INDEX,
    media::DOCKER_MANIFEST,
    media::DOCKER_LIST,
];

pub(crate) type Result<T> = std::result::Result<T, RegistryError>;

/// When `husk run` contacts the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PullPolicy {
    /// Every time: the tag is resolved again (blobs already cached are not
    /// fetched again).
    Always,
    /// Only when the reference is not in the cache (the default, as
    /// `docker run`): a cached tag is not checked again.
    #[default]
    Missing,
    /// Never: the image must be in the cache.
    Never,
}

impl std::str::FromStr for PullPolicy {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "always" => Ok(PullPolicy::Always),
            "missing" => Ok(PullPolicy::Missing),
            "never" => Ok(PullPolicy::Never),
            other => Err(format!("{other:?}: want always, missing or never")),
        }
    }
}

/// What a pull is doing, for a progress display.
#[derive(Debug, Clone, Copy)]
pub enum Progress<'a> {
    /// A blob's download starts.
    Start {
        /// Its digest.
        digest: &'a str,
        /// Its size.
        size: u64,
    },
    /// Bytes of a blob arrived.
    Bytes {
        /// Its digest.
        digest: &'a str,
        /// Bytes so far.
        done: u64,
        /// Its size.
        size: u64,
    },
    /// A blob is in the cache (downloaded and verified, or already there).
    Done {
        /// Its digest.
        digest: &'a str,
        /// Its size.
        size: u64,
        /// It was there already.
        reused: bool,
    },
}

/// Receives [`Progress`] events.
pub type ProgressFn = Box<dyn FnMut(Progress<'_>) + Send>;

/// How to reach registries and where to cache.
pub struct RegistryOptions {
    /// The platform an index is resolved to.
    pub platform: Platform,
    /// Cache root (`<cache_dir>/registry/v1`).
    pub cache_dir: PathBuf,
    /// `--creds`, for every registry of this run.
    pub creds: Option<Credentials>,
    /// Registries spoken to over plain HTTP besides loopback ones.
    pub insecure: Vec<String>,
    /// The Docker config to read logins from (None: none).
    pub docker_config: Option<PathBuf>,
    /// Progress events, if wanted.
    pub progress: Option<ProgressFn>,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            platform: Platform::host(),
            cache_dir: crate::rootfs::cache_dir(),
            creds: None,
            insecure: Vec::new(),
            docker_config: credentials::docker_config_path(),
            progress: None,
        }
    }
}

impl std::fmt::Debug for RegistryOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryOptions")
            .field("platform", &self.platform)
            .field("cache_dir", &self.cache_dir)
            .field("creds", &self.creds)
            .field("insecure", &self.insecure)
            .field("docker_config", &self.docker_config)
            .finish_non_exhaustive()
    }
}

/// What a pull (or a cache hit) gave.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Pulled {
    /// The reference as given, normalized.
    pub reference: String,
    /// Digest of what the reference names (an index or a manifest).
    pub digest: String,
    /// Digest of the platform's image manifest.
    pub manifest_digest: String,
    /// Whether the registry was contacted.
    pub pulled: bool,
    /// Blobs (config and layers) downloaded.
    pub blobs_fetched: usize,
    /// Blobs (config and layers) already in the cache.
    pub blobs_reused: usize,
    /// Bytes downloaded (config and layers).
    pub bytes_fetched: u64,
}

/// The image `reference` names, from the cache or the registry as `policy`
/// says, resolved to the platform; with the cache it can be read from.
pub fn image(
    reference: &ImageRef,
    policy: PullPolicy,
    opts: &mut RegistryOptions,
) -> Result<(Layout, ResolvedImage, Pulled)> {
    let store = Store::open(&opts.cache_dir)?;
    if policy != PullPolicy::Always {
        if let Some(top) = store.record(reference)? {
            let layout = store.layout()?;
            match resolve_cached(&layout, &top, &opts.platform, 0) {
                Ok(resolved) => {
                    tracing::debug!(%reference, digest = %top.digest, "image cache hit");
                    let pulled = Pulled {
                        reference: reference.to_string(),
                        digest: top.digest.clone(),
                        manifest_digest: resolved.manifest_digest.clone(),
                        pulled: false,
                        blobs_fetched: 0,
                        blobs_reused: resolved.manifest.layers.len() + 1,
                        bytes_fetched: 0,
                    };
                    return Ok((layout, resolved, pulled));
                }
                // Pulled for another platform, or a blob was deleted.
                Err(OciError::MissingBlob(d)) if policy == PullPolicy::Missing => {
                    tracing::debug!(%reference, missing = %d, "cached image incomplete: pulling");
                }
                Err(e) => return Err(e.into()),
            }
        }
        if policy == PullPolicy::Never {
            return Err(RegistryError::NotCached {
                reference: reference.to_string(),
                cache: store.root().to_path_buf(),
            });
        }
    }
    let pulled = pull::pull_into(&store, reference, opts)?;
    let layout = store.layout()?;
    let top = store
        .record(reference)?
        .ok_or_else(|| RegistryError::Cache {
            path: store.root().to_path_buf(),
            source: std::io::Error::other("the pull's record vanished"),
        })?;
    let resolved = resolve_cached(&layout, &top, &opts.platform, 0)?;
    Ok((layout, resolved, pulled))
}

/// Pulls `reference` (always contacting the registry) into the cache.
pub fn pull(reference: &ImageRef, opts: &mut RegistryOptions) -> Result<Pulled> {
    image(reference, PullPolicy::Always, opts).map(|(_, _, p)| p)
}

/// The root filesystem of a registry image: [`image`], then
/// [`crate::rootfs::rootfs_of`] on the cache.
pub fn rootfs_for_reference(
    reference: &ImageRef,
    policy: PullPolicy,
    opts: &mut RegistryOptions,
    rootfs: &RootfsOptions,
) -> Result<(Rootfs, Pulled)> {
    let (layout, resolved, pulled) = image(reference, policy, opts)?;
    let built = crate::rootfs::rootfs_of(&layout, resolved, rootfs).map_err(Box::new)?;
    Ok((built, pulled))
}

/// Picks the image manifest for `platform` under `top` in the cache.
fn resolve_cached(
    layout: &Layout,
    top: &Descriptor,
    platform: &Platform,
    depth: usize,
) -> std::result::Result<ResolvedImage, OciError> {
    if depth > MAX_DEPTH {
        return Err(OciError::TooDeep);
    }
    match top.media_type.as_str() {
        media::OCI_INDEX | media::DOCKER_LIST => {
            let raw = layout.read_blob(top)?;
            let index: Index = serde_json::from_slice(&raw).map_err(|source| OciError::Json {
                what: "image index".into(),
                source,
            })?;
            let pick = pick_manifest(&index, platform)
                .ok_or_else(|| OciError::NoPlatformMatch(platform.to_string()))?;
            resolve_cached(layout, &pick, platform, depth + 1)
        }
        _ => layout.resolve_descriptor(top, platform),
    }
}

/// The first entry of an index for `platform` that is an image manifest or
/// a nested index (what `docker pull` takes; attestations are skipped).
pub(crate) fn pick_manifest(index: &Index, platform: &Platform) -> Option<Descriptor> {
    index
        .manifests
        .iter()
        .filter(|d| {
            matches!(
                d.media_type.as_str(),
                media::OCI_MANIFEST
                    | media::DOCKER_MANIFEST
                    | media::OCI_INDEX
                    | media::DOCKER_LIST
            )
        })
        .find(|d| d.platform.as_ref().is_none_or(|p| platform.matches(p)))
        .cloned()
}

/// The media type of a manifest or index from its JSON: its `mediaType`,
/// else an index if it has `manifests`, else an OCI manifest.
pub(crate) fn sniff_media_type(raw: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        #[serde(default)]
        media_type: Option<String>,
        #[serde(default)]
        manifests: Option<serde_json::Value>,
    }
    let p: Probe = serde_json::from_slice(raw).ok()?;
    Some(match (p.media_type, p.manifests) {
        (Some(m), _) => m,
        (None, Some(_)) => media::OCI_INDEX.into(),
        (None, None) => media::OCI_MANIFEST.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(media_type: &str, digest: char, arch: Option<&str>) -> Descriptor {
        Descriptor {
            media_type: media_type.into(),
            digest: format!("sha256:{}", digest.to_string().repeat(64)),
            size: 1,
            platform: arch.map(|a| Platform {
                os: "linux".into(),
                architecture: a.into(),
                variant: None,
            }),
            annotations: None,
        }
    }

    #[test]
    fn an_index_resolves_to_the_first_image_for_the_platform() {
        let index = Index {
            schema_version: 2,
            media_type: Some(media::OCI_INDEX.into()),
            manifests: vec![
                entry(media::OCI_MANIFEST, 'a', Some("arm64")),
                // An attestation manifest has no platform of its own.
                entry("application/vnd.in-toto+json", 'b', None),
                entry(media::DOCKER_MANIFEST, 'c', Some("amd64")),
                entry(media::OCI_MANIFEST, 'd', Some("amd64")),
            ],
        };
        let amd64 = Platform::parse("linux/amd64").unwrap();
        assert_eq!(
            pick_manifest(&index, &amd64).unwrap().digest,
            entry("", 'c', None).digest
        );
        let arm = Platform::parse("linux/arm64").unwrap();
        assert_eq!(
            pick_manifest(&index, &arm).unwrap().digest,
            entry("", 'a', None).digest
        );
        let riscv = Platform::parse("linux/riscv64").unwrap();
        assert!(pick_manifest(&index, &riscv).is_none());
    }

    #[test]
    fn manifest_media_types_from_their_json() {
        let sniff = |json: &str| sniff_media_type(json.as_bytes());
        assert_eq!(
            sniff(r#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json","manifests":[]}"#).as_deref(),
            Some(media::DOCKER_LIST)
        );
        assert_eq!(
            sniff(r#"{"schemaVersion":2,"manifests":[]}"#).as_deref(),
            Some(media::OCI_INDEX)
        );
        assert_eq!(
            sniff(r#"{"schemaVersion":2,"config":{},"layers":[]}"#).as_deref(),
            Some(media::OCI_MANIFEST)
        );
        assert_eq!(sniff("not json"), None);
        assert_eq!("never".parse::<PullPolicy>(), Ok(PullPolicy::Never));
        assert!("sometimes".parse::<PullPolicy>().is_err());
    }
}
