//! Images from OCI registries: `husk run REGISTRY/NAME:TAG` and `husk pull`.
//! [`reference`] tells a registry reference from a local layout path and
//! decides HTTP or HTTPS, [`credentials`] finds the login (`--creds`, the
//! Docker config), [`store`] is the content-addressed cache the pull writes
//! into (blobs shared by digest across images, temporaries renamed into
//! place), and this module pulls with the `oci-client` crate: the manifest
//! (an index resolved to the platform), then the config and every layer not
//! already cached, each verified against its descriptor's size and digest.
//! The image is then read from the cache like any local layout, so
//! [`crate::rootfs`] turns it into the guest's root filesystem unchanged.
//!
//! The client is async (tokio); a pull runs on a current-thread runtime of
//! its own, so callers stay synchronous.

pub mod credentials;
pub mod reference;
pub mod store;

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use futures_util::StreamExt as _;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::Client;
use sha2::{Digest as _, Sha256};

use crate::oci::{self, media, Descriptor, Index, Layout, Manifest, OciError, Platform};
use crate::oci::{sha256_digest, ResolvedImage};
use crate::rootfs::{Rootfs, RootfsError, RootfsOptions};

pub use credentials::{Credentials, Login};
pub use reference::{ImageRef, ImageSource};
pub use store::Store;

/// Largest manifest or index we accept (as for local layouts).
const MAX_MANIFEST: usize = 4 << 20;
/// Deepest nesting of indexes we follow.
const MAX_DEPTH: usize = 4;
/// Tags named in a "no such tag" error.
const MAX_TAGS_SHOWN: usize = 10;
/// Manifest media types we ask for.
const ACCEPT: &[&str] = &[
    media::OCI_MANIFEST,
    media::OCI_INDEX,
    media::DOCKER_MANIFEST,
    media::DOCKER_LIST,
];

/// Errors pulling an image. Each says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The argument is neither a path nor a valid reference.
    #[error("{reference:?} is not a valid image reference ({reason}); want [REGISTRY/]NAME[:TAG][@sha256:HEX], or a path to a local OCI layout")]
    BadReference {
        /// The argument.
        reference: String,
        /// What is wrong.
        reason: String,
    },
    /// `--creds` is not `USER:PASSWORD`.
    #[error("--creds wants USER:PASSWORD")]
    BadCreds,
    /// The Docker config could not be read.
    #[error("cannot read the Docker config {path}")]
    DockerConfigRead {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The Docker config is not JSON of the expected shape.
    #[error("the Docker config {path} does not parse")]
    DockerConfigParse {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// The Docker config's entry for the registry cannot be used.
    #[error("the credentials for {registry} in {path} cannot be used: {reason}")]
    DockerConfigAuth {
        /// The registry.
        registry: String,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The Docker config hands the registry to a credential helper.
    #[error("{path} keeps the credentials for {registry} in the helper docker-credential-{helper}, which husk does not run; pass --creds USER:PASSWORD instead")]
    CredentialHelper {
        /// The registry.
        registry: String,
        /// The helper's name.
        helper: String,
        /// The file.
        path: PathBuf,
    },
    /// No connection to the registry.
    #[error("cannot reach the registry {registry} over {scheme}{hint}")]
    Unreachable {
        /// host[:port].
        registry: String,
        /// http or https.
        scheme: &'static str,
        /// A hint for HTTPS failures.
        hint: &'static str,
        /// The cause.
        source: OciDistributionError,
    },
    /// The registry has no repository of that name.
    #[error("the registry {registry} has no repository {repository} (check the name; some registries also say this for a repository you may not read)")]
    NameUnknown {
        /// host[:port].
        registry: String,
        /// The repository.
        repository: String,
    },
    /// The repository has no such tag or manifest.
    #[error("{repository} at {registry} has no {what}{known}")]
    ManifestUnknown {
        /// host[:port].
        registry: String,
        /// The repository.
        repository: String,
        /// `tag T` or `manifest sha256:...`.
        what: String,
        /// The tags it has, when the registry lists them.
        known: String,
    },
    /// The registry wants a login and none was given.
    #[error("the registry {registry} asks for a login: pass --creds USER:PASSWORD or add an \"auths\" entry for it to the Docker config ({config}){store_note}")]
    LoginRequired {
        /// host[:port].
        registry: String,
        /// The Docker config looked at.
        config: String,
        /// A note on a `credsStore` husk does not query.
        store_note: String,
    },
    /// The registry refused the credentials (401).
    #[error("the registry {registry} refused the login of user {user:?} (credentials from {source_name}); check them")]
    LoginRefused {
        /// host[:port].
        registry: String,
        /// The user.
        user: String,
        /// Where the credentials came from.
        source_name: String,
    },
    /// The registry denied access (403).
    #[error("the registry {registry} denies access to {repository} (403){who}")]
    Denied {
        /// host[:port].
        registry: String,
        /// The repository.
        repository: String,
        /// Whose access, for messages.
        who: String,
    },
    /// Content does not match its digest or size.
    #[error("{what} {digest} from {registry} does not match its digest: {detail}; the registry serves corrupt or tampered content")]
    DigestMismatch {
        /// host[:port].
        registry: String,
        /// manifest, config, layer.
        what: &'static str,
        /// The expected digest.
        digest: String,
        /// What differs.
        detail: String,
    },
    /// A manifest the registry sent is not one husk reads.
    #[error("{reference}: {detail}")]
    Unsupported {
        /// The reference.
        reference: String,
        /// What is not supported.
        detail: String,
    },
    /// The registry failed in another way.
    #[error("the registry {registry} failed to serve {what}")]
    Registry {
        /// host[:port].
        registry: String,
        /// What was asked for.
        what: String,
        /// The cause.
        source: OciDistributionError,
    },
    /// `--pull never` and the image is not cached.
    #[error("{reference} is not in the image cache ({cache}) and --pull never forbids pulling it; run `husk pull {reference}` first")]
    NotCached {
        /// The reference.
        reference: String,
        /// The cache directory.
        cache: PathBuf,
    },
    /// The cache could not be written or read.
    #[error("cannot write the image cache at {path}")]
    Cache {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The HTTP client or its runtime could not be set up.
    #[error("cannot set up the registry client")]
    Client(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Reading the pulled image from the cache failed.
    #[error(transparent)]
    Oci(#[from] OciError),
    /// Building the root filesystem failed.
    #[error(transparent)]
    Rootfs(#[from] Box<RootfsError>),
}

type Result<T> = std::result::Result<T, RegistryError>;

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
    let pulled = pull_into(&store, reference, opts)?;
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
fn pick_manifest(index: &Index, platform: &Platform) -> Option<Descriptor> {
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
fn sniff_media_type(raw: &[u8]) -> Option<String> {
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

/// One pull: a client for the reference's registry and what it fetched.
struct Puller<'a> {
    client: Client,
    auth: RegistryAuth,
    login: Login,
    reference: &'a ImageRef,
    store: &'a Store,
    opts: &'a mut RegistryOptions,
    scheme: &'static str,
    pulled: Pulled,
}

fn pull_into(store: &Store, reference: &ImageRef, opts: &mut RegistryOptions) -> Result<Pulled> {
    let login = credentials::login_for(
        reference.registry(),
        opts.creds.as_ref(),
        opts.docker_config.as_deref(),
    )?;
    let auth = match &login {
        Login::Anonymous { .. } => RegistryAuth::Anonymous,
        Login::Basic { credentials, .. } => {
            RegistryAuth::Basic(credentials.username.clone(), credentials.password.clone())
        }
    };
    let plain = reference.plain_http(&opts.insecure);
    let protocol = if plain {
        ClientProtocol::HttpsExcept(vec![reference.registry_address().to_string()])
    } else {
        ClientProtocol::Https
    };
    // reqwest is built without a crypto provider of its own: rustls' ring.
    // Installing fails only when one is installed already, which is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = Client::try_from(ClientConfig {
        protocol,
        platform_resolver: None,
        connect_timeout: Some(Duration::from_secs(10)),
        read_timeout: Some(Duration::from_secs(60)),
        ..ClientConfig::default()
    })
    .map_err(|e| RegistryError::Client(Box::new(e)))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| RegistryError::Client(Box::new(e)))?;
    tracing::debug!(%reference, http = plain, ?login, "pulling");
    let mut puller = Puller {
        client,
        auth,
        login,
        reference,
        store,
        opts,
        scheme: if plain { "http" } else { "https" },
        pulled: Pulled {
            reference: reference.to_string(),
            digest: String::new(),
            manifest_digest: String::new(),
            pulled: true,
            blobs_fetched: 0,
            blobs_reused: 0,
            bytes_fetched: 0,
        },
    };
    runtime.block_on(puller.run())?;
    Ok(puller.pulled)
}

impl Puller<'_> {
    async fn run(&mut self) -> Result<()> {
        let reference = self.reference;
        let raw = match self
            .client
            .pull_manifest_raw(reference.as_oci(), &self.auth, ACCEPT)
            .await
        {
            Ok((raw, _)) => raw,
            Err(e) => {
                let e = self.classify(e, "manifest", reference.digest());
                return Err(self.explain_missing(e).await);
            }
        };
        let digest = sha256_digest(&raw);
        if let Some(pinned) = reference.digest() {
            if pinned != digest {
                return Err(self.mismatch(
                    "manifest",
                    pinned,
                    format!("content hashes to {digest}"),
                ));
            }
        }
        let top = self.store_manifest(&raw, &digest)?;
        self.pulled.digest = digest;
        let manifest_desc = self.platform_manifest(top.clone(), 0).await?;
        self.pulled.manifest_digest = manifest_desc.digest.clone();
        let manifest: Manifest = serde_json::from_slice(
            &self.store.layout()?.read_blob(&manifest_desc)?,
        )
        .map_err(|source| OciError::Json {
            what: "image manifest".into(),
            source,
        })?;
        self.fetch_blob(&manifest.config, "config").await?;
        for layer in &manifest.layers {
            self.fetch_blob(layer, "layer").await?;
        }
        // Only now, with every blob in place, does the reference resolve.
        self.store.set_record(reference, &top)?;
        Ok(())
    }

    /// A registry may answer "manifest unknown" for a repository it does
    /// not have at all (distribution 2.8 does): the tag list tells a wrong
    /// name from a missing tag, and names the tags there are.
    async fn explain_missing(&self, e: RegistryError) -> RegistryError {
        let RegistryError::ManifestUnknown {
            registry,
            repository,
            what,
            ..
        } = e
        else {
            return e;
        };
        match self
            .client
            .list_tags(
                self.reference.as_oci(),
                &self.auth,
                Some(MAX_TAGS_SHOWN + 1),
                None,
            )
            .await
        {
            Ok(list) => {
                let mut tags = list.tags;
                let more = tags.len() > MAX_TAGS_SHOWN;
                tags.truncate(MAX_TAGS_SHOWN);
                let known = if tags.is_empty() {
                    "; it has no tags".to_string()
                } else {
                    format!(
                        "; its tags: {}{}",
                        tags.join(", "),
                        if more { ", ..." } else { "" }
                    )
                };
                RegistryError::ManifestUnknown {
                    registry,
                    repository,
                    what,
                    known,
                }
            }
            Err(list_error) => match self.classify(list_error, "tag list", None) {
                name @ RegistryError::NameUnknown { .. } => name,
                _ => RegistryError::ManifestUnknown {
                    registry,
                    repository,
                    what,
                    known: String::new(),
                },
            },
        }
    }

    /// Stores a fetched manifest or index (already hashed) and returns its
    /// descriptor.
    fn store_manifest(&self, raw: &[u8], digest: &str) -> Result<Descriptor> {
        if raw.len() > MAX_MANIFEST {
            return Err(RegistryError::Unsupported {
                reference: self.reference.to_string(),
                detail: format!(
                    "its manifest is {} bytes, more than the {MAX_MANIFEST}-byte limit",
                    raw.len()
                ),
            });
        }
        let media_type = sniff_media_type(raw).ok_or_else(|| RegistryError::Unsupported {
            reference: self.reference.to_string(),
            detail: "the registry sent a manifest that is not JSON".into(),
        })?;
        if !ACCEPT.contains(&media_type.as_str()) {
            return Err(RegistryError::Unsupported {
                reference: self.reference.to_string(),
                detail: format!("manifest type {media_type} is not an image (want an OCI or Docker schema 2 image or index)"),
            });
        }
        self.store.put_blob(digest, raw)?;
        Ok(Descriptor {
            media_type,
            digest: digest.to_string(),
            size: raw.len() as u64,
            platform: None,
            annotations: None,
        })
    }

    /// Follows indexes down to the platform's image manifest, fetching
    /// each manifest by digest and checking it against its descriptor.
    async fn platform_manifest(&mut self, desc: Descriptor, depth: usize) -> Result<Descriptor> {
        if depth > MAX_DEPTH {
            return Err(OciError::TooDeep.into());
        }
        if !matches!(
            desc.media_type.as_str(),
            media::OCI_INDEX | media::DOCKER_LIST
        ) {
            return Ok(desc);
        }
        let raw = self.store.layout()?.read_blob(&desc)?;
        let index: Index = serde_json::from_slice(&raw).map_err(|source| OciError::Json {
            what: "image index".into(),
            source,
        })?;
        let platform = &self.opts.platform;
        let pick = pick_manifest(&index, platform).ok_or_else(|| {
            let offered: Vec<String> = index
                .manifests
                .iter()
                .filter_map(|d| d.platform.as_ref().map(ToString::to_string))
                .collect();
            RegistryError::Unsupported {
                reference: self.reference.to_string(),
                detail: format!(
                    "no image for platform {platform} (the index offers: {})",
                    if offered.is_empty() {
                        "none".into()
                    } else {
                        offered.join(", ")
                    }
                ),
            }
        })?;
        if !self.store.has_blob(&pick)? {
            let by_digest = self.reference.with_digest(&pick.digest);
            let (raw, _) = self
                .client
                .pull_manifest_raw(by_digest.as_oci(), &self.auth, ACCEPT)
                .await
                .map_err(|e| self.classify(e, "manifest", Some(&pick.digest)))?;
            let got = sha256_digest(&raw);
            if got != pick.digest || raw.len() as u64 != pick.size {
                return Err(self.mismatch(
                    "manifest",
                    &pick.digest,
                    format!(
                        "{} bytes hashing to {got}, want {} bytes",
                        raw.len(),
                        pick.size
                    ),
                ));
            }
            self.store_manifest(&raw, &got)?;
        }
        Box::pin(self.platform_manifest(pick, depth + 1)).await
    }

    /// Downloads a config or layer blob into the cache unless it is there,
    /// checking size and digest as it streams.
    async fn fetch_blob(&mut self, desc: &Descriptor, what: &'static str) -> Result<()> {
        let digest = desc.digest.as_str();
        oci::digest_hex(digest)?;
        let size = desc.size;
        if self.store.has_blob(desc)? {
            self.pulled.blobs_reused += 1;
            self.report(Progress::Done {
                digest,
                size,
                reused: true,
            });
            return Ok(());
        }
        self.report(Progress::Start { digest, size });
        let mut stream = self
            .client
            .pull_blob_stream(self.reference.as_oci(), digest)
            .await
            .map_err(|e| self.classify(e, what, Some(digest)))?;
        let mut temp = self.store.temp_blob()?;
        let mut hasher = Sha256::new();
        let mut done: u64 = 0;
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                // oci-client checks the digest too, and says so at the end
                // of the stream: report what we saw ourselves.
                Err(_) if done == size => break,
                Err(e) => {
                    return Err(RegistryError::Registry {
                        registry: self.reference.registry().to_string(),
                        what: format!("{what} {digest}"),
                        source: OciDistributionError::IoError(e),
                    })
                }
            };
            done = done.saturating_add(chunk.len() as u64);
            if done > size {
                return Err(self.mismatch(what, digest, format!("longer than its {size} bytes")));
            }
            hasher.update(&chunk);
            temp.write_all(&chunk)
                .map_err(|source| RegistryError::Cache {
                    path: temp.path().to_path_buf(),
                    source,
                })?;
            self.report(Progress::Bytes { digest, done, size });
        }
        if done != size {
            return Err(self.mismatch(what, digest, format!("{done} bytes, want {size}")));
        }
        let got = format!("sha256:{}", oci::hex(&hasher.finalize()));
        if got != digest {
            return Err(self.mismatch(what, digest, format!("content hashes to {got}")));
        }
        self.store.commit_blob(temp, digest)?;
        self.pulled.blobs_fetched += 1;
        self.pulled.bytes_fetched += size;
        self.report(Progress::Done {
            digest,
            size,
            reused: false,
        });
        Ok(())
    }

    fn report(&mut self, event: Progress<'_>) {
        if let Some(p) = self.opts.progress.as_mut() {
            p(event);
        }
    }

    fn mismatch(&self, what: &'static str, digest: &str, detail: String) -> RegistryError {
        RegistryError::DigestMismatch {
            registry: self.reference.registry().to_string(),
            what,
            digest: digest.to_string(),
            detail,
        }
    }

    /// Turns the client's error into one that says what to do.
    fn classify(
        &self,
        e: OciDistributionError,
        what: &'static str,
        digest: Option<&str>,
    ) -> RegistryError {
        let registry = self.reference.registry().to_string();
        let repository = self.reference.repository().to_string();
        let refused = || match &self.login {
            Login::Basic {
                credentials,
                source,
            } => RegistryError::LoginRefused {
                registry: registry.clone(),
                user: credentials.username.clone(),
                source_name: source.clone(),
            },
            Login::Anonymous { creds_store } => RegistryError::LoginRequired {
                registry: registry.clone(),
                config: self
                    .opts
                    .docker_config
                    .as_deref()
                    .map_or_else(|| "none".into(), |p| p.display().to_string()),
                store_note: creds_store.as_ref().map_or_else(String::new, |s| {
                    format!("; its credsStore docker-credential-{s} is not queried by husk")
                }),
            },
        };
        let denied = || RegistryError::Denied {
            registry: registry.clone(),
            repository: repository.clone(),
            who: match &self.login {
                Login::Basic { credentials, .. } => format!(" for user {:?}", credentials.username),
                Login::Anonymous { .. } => " without a login".into(),
            },
        };
        let missing = || RegistryError::ManifestUnknown {
            registry: registry.clone(),
            repository: repository.clone(),
            what: match (digest, self.reference.tag()) {
                (Some(d), _) => format!("{what} {d}"),
                (None, Some(t)) => format!("tag {t:?}"),
                (None, None) => what.to_string(),
            },
            known: String::new(),
        };
        match e {
            OciDistributionError::UnauthorizedError { .. }
            | OciDistributionError::AuthenticationFailure(_) => refused(),
            OciDistributionError::RegistryError { ref envelope, .. } => {
                let code = envelope.errors.first().map(|c| &c.code);
                match code {
                    Some(OciErrorCode::NameUnknown) => RegistryError::NameUnknown {
                        registry,
                        repository,
                    },
                    Some(
                        OciErrorCode::ManifestUnknown
                        | OciErrorCode::BlobUnknown
                        | OciErrorCode::NotFound,
                    ) => missing(),
                    Some(OciErrorCode::Unauthorized) => refused(),
                    Some(OciErrorCode::Denied) => denied(),
                    _ => RegistryError::Registry {
                        registry,
                        what: format!("{what} of {}", self.reference),
                        source: e,
                    },
                }
            }
            OciDistributionError::ServerError { code: 401, .. } => refused(),
            OciDistributionError::ServerError { code: 403, .. } => denied(),
            OciDistributionError::ServerError { code: 404, .. } => missing(),
            OciDistributionError::DigestError(
                oci_client::errors::DigestError::VerificationError {
                    ref expected,
                    ref actual,
                },
            ) => self.mismatch(what, expected, format!("content hashes to {actual}")),
            OciDistributionError::RequestError(ref r)
                if r.is_connect() || r.is_timeout() || r.is_request() =>
            {
                RegistryError::Unreachable {
                    registry: self.reference.registry_address().to_string(),
                    scheme: self.scheme,
                    hint: if self.scheme == "https" {
                        " (if it serves plain HTTP, name it with --insecure-registry)"
                    } else {
                        ""
                    },
                    source: e,
                }
            }
            _ => RegistryError::Registry {
                registry,
                what: format!("{what} of {}", self.reference),
                source: e,
            },
        }
    }
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
