//! Reading an OCI image layout: a directory (`oci-layout`, `index.json`,
//! `blobs/sha256/...`) or a tar archive of one, plain or gzip-compressed, as
//! `skopeo copy ... oci-archive:`, `umoci` and `ctr images export` write them.
//! [`Layout::open`] finds the files, [`Layout::resolve`] walks `index.json`
//! (nested indexes too) to one image manifest, picked by ref-name annotation
//! and platform, and reads its config. Every blob is checked against its
//! descriptor's size and sha256 digest: small JSON blobs when read, layers
//! as they stream through [`VerifiedBlob`].
//!
//! The JSON types are our own few serde structs rather than the `oci-spec`
//! crate: we need five structs and a handful of fields, and oci-spec brings a
//! builder/getter API and several proc-macro crates for them.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Media types we read.
pub mod media {
    /// OCI image index.
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    /// OCI image manifest.
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    /// OCI image config.
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    /// OCI layer, uncompressed tar.
    pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
    /// OCI layer, gzip-compressed tar.
    pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    /// Docker schema 2 manifest list (what `ctr images export` may write).
    pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    /// Docker schema 2 manifest.
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
}

/// The annotation that names an image inside a layout (`PATH:REF`).
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Largest JSON blob (index, manifest, config) we read into memory.
const MAX_JSON: u64 = 4 << 20;
/// Deepest nesting of indexes we follow.
const MAX_INDEX_DEPTH: usize = 4;

/// Errors reading an OCI layout.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// I/O on a file of the layout failed.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The path has no `oci-layout` file (directory) or entry (archive).
    #[error("{0} is not an OCI image layout (no oci-layout file)")]
    NotALayout(PathBuf),
    /// `oci-layout` names a version we do not read.
    #[error("unsupported imageLayoutVersion {0:?} (want 1.x)")]
    LayoutVersion(String),
    /// A JSON document does not parse.
    #[error("invalid {what}")]
    Json {
        /// Which document.
        what: String,
        /// The cause.
        source: serde_json::Error,
    },
    /// A digest string is malformed.
    #[error("malformed digest {0:?}")]
    BadDigest(String),
    /// A digest uses an algorithm other than sha256.
    #[error("unsupported digest algorithm in {0:?} (only sha256)")]
    UnsupportedDigest(String),
    /// A descriptor points at a blob the layout does not hold.
    #[error("blob {0} is missing from the layout")]
    MissingBlob(String),
    /// A JSON blob is larger than we read into memory.
    #[error("blob {digest} is {size} bytes, more than the {limit}-byte limit for JSON")]
    BlobTooLarge {
        /// The blob.
        digest: String,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A blob's content does not match its descriptor.
    #[error("blob {digest} does not match its descriptor: {detail}")]
    DigestMismatch {
        /// The descriptor's digest.
        digest: String,
        /// What differs.
        detail: String,
    },
    /// No manifest in the index has the requested ref name.
    #[error("no image named {wanted:?} in the layout (names: {available})")]
    RefNotFound {
        /// The requested name.
        wanted: String,
        /// The names present.
        available: String,
    },
    /// `index.json` lists nothing.
    #[error("the layout's index.json lists no images")]
    EmptyIndex,
    /// No manifest matches the platform.
    #[error("no image for platform {0} in the layout")]
    NoPlatformMatch(String),
    /// More than one image matches and the user named none.
    #[error("the layout holds several images ({0}); name one as PATH:REF")]
    Ambiguous(String),
    /// Indexes nest deeper than we follow.
    #[error("image indexes nest more than {MAX_INDEX_DEPTH} deep")]
    TooDeep,
    /// The platform string is not OS/ARCH[/VARIANT].
    #[error("bad platform {0:?} (want OS/ARCH[/VARIANT], e.g. linux/amd64)")]
    BadPlatform(String),
}

type Result<T> = std::result::Result<T, OciError>;

/// An OCI content descriptor.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// What the blob is.
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// Platform of a manifest in an index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Annotations (the ref name among them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

impl Descriptor {
    fn ref_name(&self) -> Option<&str> {
        self.annotations.as_ref()?.get(REF_NAME).map(String::as_str)
    }
}

/// An OS/architecture pair, as in an index's descriptors and `--platform`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Platform {
    /// e.g. `amd64`.
    pub architecture: String,
    /// e.g. `linux`.
    pub os: String,
    /// e.g. `v8` for arm64; ignored unless the user asks for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// The platform this build runs on, as OCI names it.
    pub fn host() -> Platform {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        Platform {
            architecture: architecture.into(),
            os: "linux".into(),
            variant: None,
        }
    }

    /// Parses `OS/ARCH[/VARIANT]`.
    pub fn parse(s: &str) -> Result<Platform> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] if !os.is_empty() && !arch.is_empty() => Ok(Platform {
                os: (*os).into(),
                architecture: (*arch).into(),
                variant: None,
            }),
            [os, arch, v] if !os.is_empty() && !arch.is_empty() && !v.is_empty() => Ok(Platform {
                os: (*os).into(),
                architecture: (*arch).into(),
                variant: Some((*v).into()),
            }),
            _ => Err(OciError::BadPlatform(s.into())),
        }
    }

    pub(crate) fn matches(&self, other: &Platform) -> bool {
        self.os == other.os
            && self.architecture == other.architecture
            && (self.variant.is_none() || self.variant == other.variant)
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// `index.json` and nested indexes.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    /// Always 2.
    pub schema_version: u32,
    /// Optional in an index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// Manifests or nested indexes.
    pub manifests: Vec<Descriptor>,
}

/// An image manifest.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Always 2.
    pub schema_version: u32,
    /// The manifest's own media type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The image config blob.
    pub config: Descriptor,
    /// Layers, bottom first.
    pub layers: Vec<Descriptor>,
}

/// The image config blob (the parts we use).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ConfigFile {
    /// e.g. `amd64`.
    #[serde(default)]
    pub architecture: String,
    /// e.g. `linux`.
    #[serde(default)]
    pub os: String,
    /// How to run the image.
    #[serde(default)]
    pub config: Option<ExecConfig>,
    /// Layer diff ids (written by our writer; not checked on read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<RootFs>,
}

/// `rootfs` of a config: the uncompressed layers' digests.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct RootFs {
    /// Always `layers`.
    #[serde(rename = "type")]
    pub kind: String,
    /// sha256 of each uncompressed layer tar.
    pub diff_ids: Vec<String>,
}

/// `config` of an image config: what the image runs by default.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ExecConfig {
    /// `user`, `uid`, `user:group` or `uid:gid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// `NAME=value` strings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    /// Prefix of the command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// Default arguments (or command).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// Working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
}

/// What `husk run` needs from an image's config, with defaults filled in.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// Entrypoint (may be empty).
    pub entrypoint: Vec<String>,
    /// Cmd (may be empty).
    pub cmd: Vec<String>,
    /// `NAME=value` strings.
    pub env: Vec<String>,
    /// Working directory; `/` when the image names none.
    pub working_dir: String,
    /// User; empty means root.
    pub user: String,
}

impl From<ExecConfig> for ImageConfig {
    fn from(c: ExecConfig) -> Self {
        ImageConfig {
            entrypoint: c.entrypoint.unwrap_or_default(),
            cmd: c.cmd.unwrap_or_default(),
            env: c.env.unwrap_or_default(),
            working_dir: c
                .working_dir
                .filter(|d| !d.is_empty())
                .unwrap_or_else(|| "/".into()),
            user: c.user.unwrap_or_default(),
        }
    }
}

impl ImageConfig {
    /// The process to run, as `docker run IMAGE ARGS...` builds it: the
    /// entrypoint, then `args` if any were given, else the image's Cmd.
    /// Empty when the image names no command and none was given.
    #[allow(dead_code)] // for `husk run`
    pub fn argv(&self, args: &[String]) -> Vec<String> {
        let tail = if args.is_empty() { &self.cmd } else { args };
        self.entrypoint.iter().chain(tail).cloned().collect()
    }
}

/// The image one manifest describes.
#[derive(Debug)]
pub struct ResolvedImage {
    /// The manifest's descriptor digest (`sha256:...`): the cache key.
    pub manifest_digest: String,
    /// The manifest.
    pub manifest: Manifest,
    /// Its config.
    pub config: ImageConfig,
}

/// Splits `PATH[:REF]`: the whole string if it exists as a path, else at
/// the first `:` whose left side exists (so `dir:busybox:latest` names
/// `busybox:latest` in `dir`), else at the last `:`.
pub fn split_image_arg(arg: &str) -> (PathBuf, Option<String>) {
    if Path::new(arg).exists() {
        return (PathBuf::from(arg), None);
    }
    let split = arg
        .match_indices(':')
        .map(|(i, _)| i)
        .find(|&i| Path::new(&arg[..i]).exists())
        .or_else(|| arg.rfind(':'));
    match split {
        Some(i) if i > 0 && i + 1 < arg.len() => {
            (PathBuf::from(&arg[..i]), Some(arg[i + 1..].to_string()))
        }
        _ => (PathBuf::from(arg), None),
    }
}

/// Checks `sha256:<64 lowercase hex>` and returns the hex part.
pub fn digest_hex(digest: &str) -> Result<&str> {
    let (algo, hex) = digest
        .split_once(':')
        .ok_or_else(|| OciError::BadDigest(digest.into()))?;
    if algo != "sha256" {
        return Err(OciError::UnsupportedDigest(digest.into()));
    }
    if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(OciError::BadDigest(digest.into()));
    }
    Ok(hex)
}

/// `sha256:<hex>` of some bytes.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(data)))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

enum Storage {
    Dir(PathBuf),
    Archive {
        /// The (decompressed) tar file.
        path: PathBuf,
        /// Regular files: normalized name -> (data offset, size).
        entries: HashMap<String, (u64, u64)>,
        /// Keeps a decompressed copy alive.
        _temp: Option<tempfile::NamedTempFile>,
    },
}

/// An opened OCI layout.
pub struct Layout {
    origin: PathBuf,
    storage: Storage,
}

impl std::fmt::Debug for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Layout")
            .field("origin", &self.origin)
            .finish()
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> OciError + '_ {
    move |source| OciError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Normalizes a name inside an archive (`./blobs/x` -> `blobs/x`); `None` for
/// names with `..` (we never read those).
fn normalize_entry(path: &Path) -> Option<String> {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n.to_str()?),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out.join("/"))
}

impl Layout {
    /// Opens a layout directory or a (gzip-compressed or plain) tar archive
    /// of one, and checks its `oci-layout` version.
    pub fn open(path: &Path) -> Result<Layout> {
        let meta = std::fs::metadata(path).map_err(io_err(path))?;
        let storage = if meta.is_dir() {
            Storage::Dir(path.to_path_buf())
        } else {
            Self::index_archive(path)?
        };
        let layout = Layout {
            origin: path.to_path_buf(),
            storage,
        };
        let raw = layout
            .read_file("oci-layout", MAX_JSON)?
            .ok_or_else(|| OciError::NotALayout(path.to_path_buf()))?;
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct OciLayout {
            image_layout_version: String,
        }
        let v: OciLayout = parse_json(&raw, "oci-layout")?;
        if v.image_layout_version.split('.').next() != Some("1") {
            return Err(OciError::LayoutVersion(v.image_layout_version));
        }
        Ok(layout)
    }

    fn index_archive(path: &Path) -> Result<Storage> {
        let mut file = File::open(path).map_err(io_err(path))?;
        let mut magic = [0u8; 2];
        let n = file.read(&mut magic).map_err(io_err(path))?;
        file.seek(SeekFrom::Start(0)).map_err(io_err(path))?;
        let (tar_path, temp) = if n == 2 && magic == [0x1f, 0x8b] {
            // A compressed archive cannot be read at offsets: inflate it once.
            let mut temp = tempfile::NamedTempFile::new().map_err(io_err(path))?;
            io::copy(&mut flate2::read::GzDecoder::new(file), temp.as_file_mut())
                .map_err(io_err(path))?;
            (temp.path().to_path_buf(), Some(temp))
        } else {
            (path.to_path_buf(), None)
        };
        let file = File::open(&tar_path).map_err(io_err(path))?;
        let mut archive = tar::Archive::new(file);
        let mut entries = HashMap::new();
        for entry in archive.entries().map_err(io_err(path))? {
            let entry = entry.map_err(io_err(path))?;
            if !matches!(
                entry.header().entry_type(),
                tar::EntryType::Regular | tar::EntryType::Continuous
            ) {
                continue;
            }
            let name = entry.path().map_err(io_err(path))?;
            if let Some(name) = normalize_entry(&name) {
                entries.insert(name, (entry.raw_file_position(), entry.size()));
            }
        }
        Ok(Storage::Archive {
            path: tar_path,
            entries,
            _temp: temp,
        })
    }

    /// Opens a file of the layout for reading, with its size.
    fn open_file(&self, name: &str) -> Result<Option<(Box<dyn Read + Send>, u64)>> {
        match &self.storage {
            Storage::Dir(dir) => {
                let path = dir.join(name);
                // Never follow a symlink planted in the layout.
                match std::fs::symlink_metadata(&path) {
                    Ok(m) if m.is_file() => {}
                    Ok(_) => return Ok(None),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(io_err(&path)(e)),
                }
                let f = File::open(&path).map_err(io_err(&path))?;
                let size = f.metadata().map_err(io_err(&path))?.len();
                Ok(Some((Box::new(f), size)))
            }
            Storage::Archive { path, entries, .. } => {
                let Some(&(offset, size)) = entries.get(name) else {
                    return Ok(None);
                };
                let mut f = File::open(path).map_err(io_err(path))?;
                f.seek(SeekFrom::Start(offset)).map_err(io_err(path))?;
                Ok(Some((Box::new(f.take(size)), size)))
            }
        }
    }

    fn read_file(&self, name: &str, limit: u64) -> Result<Option<Vec<u8>>> {
        let Some((r, size)) = self.open_file(name)? else {
            return Ok(None);
        };
        if size > limit {
            return Err(OciError::BlobTooLarge {
                digest: name.into(),
                size,
                limit,
            });
        }
        let mut buf = Vec::new();
        r.take(limit)
            .read_to_end(&mut buf)
            .map_err(io_err(&self.origin.join(name)))?;
        Ok(Some(buf))
    }

    /// A reader over a blob that checks its size and digest as it goes and
    /// fails at the end on a mismatch (call [`VerifiedBlob::finish`]).
    pub fn blob(&self, desc: &Descriptor) -> Result<VerifiedBlob> {
        let hex = digest_hex(&desc.digest)?;
        let name = format!("blobs/sha256/{hex}");
        let (reader, _) = self
            .open_file(&name)?
            .ok_or_else(|| OciError::MissingBlob(desc.digest.clone()))?;
        Ok(VerifiedBlob {
            inner: reader,
            hasher: Sha256::new(),
            digest: desc.digest.clone(),
            size: desc.size,
            read: 0,
        })
    }

    /// Reads a whole (JSON) blob, verified.
    pub fn read_blob(&self, desc: &Descriptor) -> Result<Vec<u8>> {
        if desc.size > MAX_JSON {
            return Err(OciError::BlobTooLarge {
                digest: desc.digest.clone(),
                size: desc.size,
                limit: MAX_JSON,
            });
        }
        let mut blob = self.blob(desc)?;
        let mut buf = Vec::new();
        match blob.read_to_end(&mut buf) {
            Ok(_) => {}
            Err(e) => return Err(blob.error_from(e)),
        }
        blob.finish()?;
        Ok(buf)
    }

    /// Picks one image: by ref name (`PATH:REF`) if given, then by platform;
    /// reads and verifies its manifest and config.
    pub fn resolve(&self, wanted: Option<&str>, platform: &Platform) -> Result<ResolvedImage> {
        let raw = self
            .read_file("index.json", MAX_JSON)?
            .ok_or_else(|| OciError::NotALayout(self.origin.clone()))?;
        let index: Index = parse_json(&raw, "index.json")?;
        let mut top = index.manifests;
        if top.is_empty() {
            return Err(OciError::EmptyIndex);
        }
        if let Some(wanted) = wanted {
            let names: Vec<String> = top
                .iter()
                .filter_map(|d| d.ref_name().map(str::to_string))
                .collect();
            top.retain(|d| d.ref_name().is_some_and(|n| ref_matches(n, wanted)));
            if top.is_empty() {
                return Err(OciError::RefNotFound {
                    wanted: wanted.into(),
                    available: if names.is_empty() {
                        "none".into()
                    } else {
                        names.join(", ")
                    },
                });
            }
        }
        self.resolve_among(top, platform)
    }

    /// Picks the image for `platform` that `top` (an image manifest or an
    /// index, as a registry's tag or digest names it) describes, without
    /// reading `index.json`: the registry cache's layout has none.
    pub fn resolve_descriptor(
        &self,
        top: &Descriptor,
        platform: &Platform,
    ) -> Result<ResolvedImage> {
        self.resolve_among(vec![top.clone()], platform)
    }

    fn resolve_among(&self, top: Vec<Descriptor>, platform: &Platform) -> Result<ResolvedImage> {
        let mut found = Vec::new();
        self.collect_manifests(top, platform, 0, &mut found)?;
        found.dedup_by(|a, b| a.digest == b.digest);
        let desc = match found.len() {
            0 => return Err(OciError::NoPlatformMatch(platform.to_string())),
            1 => found.remove(0),
            _ => {
                let names: Vec<String> = found
                    .iter()
                    .map(|d| d.ref_name().unwrap_or(&d.digest).to_string())
                    .collect();
                return Err(OciError::Ambiguous(names.join(", ")));
            }
        };
        let manifest: Manifest = parse_json(&self.read_blob(&desc)?, "image manifest")?;
        let config_file: ConfigFile =
            parse_json(&self.read_blob(&manifest.config)?, "image config")?;
        if !config_file.os.is_empty()
            && !config_file.architecture.is_empty()
            && (config_file.os != platform.os || config_file.architecture != platform.architecture)
        {
            return Err(OciError::NoPlatformMatch(format!(
                "{platform} (the image is {}/{})",
                config_file.os, config_file.architecture
            )));
        }
        Ok(ResolvedImage {
            manifest_digest: desc.digest,
            manifest,
            config: config_file.config.unwrap_or_default().into(),
        })
    }

    fn collect_manifests(
        &self,
        descs: Vec<Descriptor>,
        platform: &Platform,
        depth: usize,
        found: &mut Vec<Descriptor>,
    ) -> Result<()> {
        if depth > MAX_INDEX_DEPTH {
            return Err(OciError::TooDeep);
        }
        for d in descs {
            if d.platform.as_ref().is_some_and(|p| !platform.matches(p)) {
                continue;
            }
            match d.media_type.as_str() {
                media::OCI_MANIFEST | media::DOCKER_MANIFEST => found.push(d),
                media::OCI_INDEX | media::DOCKER_LIST => {
                    let nested: Index = parse_json(&self.read_blob(&d)?, "nested index")?;
                    self.collect_manifests(nested.manifests, platform, depth + 1, found)?;
                }
                // Attestations, signatures and other artifacts: not images.
                _ => {}
            }
        }
        Ok(())
    }
}

/// `busybox:latest` matches `busybox:latest`, `latest`, and
/// `docker.io/library/busybox:latest` (what `ctr` writes).
fn ref_matches(name: &str, wanted: &str) -> bool {
    name == wanted
        || name.rsplit_once(':').is_some_and(|(repo, tag)| {
            tag == wanted
                || repo.rsplit('/').next().map(|r| format!("{r}:{tag}")) == Some(wanted.into())
        })
}

fn parse_json<T: for<'de> Deserialize<'de>>(raw: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(raw).map_err(|source| OciError::Json {
        what: what.into(),
        source,
    })
}

/// A blob being read; hashes what passes and checks size and digest.
pub struct VerifiedBlob {
    inner: Box<dyn Read + Send>,
    hasher: Sha256,
    digest: String,
    size: u64,
    read: u64,
}

impl VerifiedBlob {
    fn mismatch(&self, detail: String) -> OciError {
        OciError::DigestMismatch {
            digest: self.digest.clone(),
            detail,
        }
    }

    /// Turns an I/O error from reading into the blob's error.
    pub fn error_from(&self, e: io::Error) -> OciError {
        if self.read > self.size {
            self.mismatch(format!("longer than its {} bytes", self.size))
        } else {
            OciError::Io {
                path: PathBuf::from(&self.digest),
                source: e,
            }
        }
    }

    /// Reads what is left and checks size and digest.
    pub fn finish(mut self) -> Result<()> {
        if let Err(e) = io::copy(&mut self, &mut io::sink()) {
            return Err(self.error_from(e));
        }
        if self.read != self.size {
            return Err(self.mismatch(format!("{} bytes, want {}", self.read, self.size)));
        }
        let got = format!("sha256:{}", hex(&self.hasher.clone().finalize()));
        if got != self.digest {
            return Err(self.mismatch(format!("content hashes to {got}")));
        }
        Ok(())
    }
}

impl Read for VerifiedBlob {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let chunk = buf.get(..n).unwrap_or_default();
        self.hasher.update(chunk);
        self.read = self.read.saturating_add(n as u64);
        if self.read > self.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "blob {} is longer than its descriptor's {} bytes",
                    self.digest, self.size
                ),
            ));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::layers::unpack;
    use crate::test_utils::{listing, write_image};
    use crate::writer::LayerBuilder;

    fn two_layer_image(dir: &Path) -> Descriptor {
        let mut l1 = LayerBuilder::new();
        l1.dir("etc", 0o755).unwrap();
        l1.file("etc/a", 0o644, b"a").unwrap();
        l1.file("etc/b", 0o644, b"b").unwrap();
        let mut l2 = LayerBuilder::new();
        l2.whiteout("etc/a").unwrap();
        write_image(dir, vec![(l1, true), (l2, false)])
    }

    /// A tar of a layout directory, entries named `./x` as skopeo writes.
    fn tar_of(dir: &Path, gzip: bool) -> tempfile::NamedTempFile {
        let mut b = tar::Builder::new(Vec::new());
        b.append_dir_all(".", dir).unwrap();
        let mut data = b.into_inner().unwrap();
        if gzip {
            data = crate::writer::gzip(&data).unwrap();
        }
        let f = tempfile::NamedTempFile::new().unwrap();
        fs::write(f.path(), data).unwrap();
        f
    }

    fn unpacked(layout_path: &Path) -> (String, Vec<String>) {
        let layout = Layout::open(layout_path).unwrap();
        let img = layout
            .resolve(Some("test:latest"), &Platform::host())
            .unwrap();
        let root = tempfile::tempdir().unwrap();
        unpack(&layout, &img.manifest.layers, root.path()).unwrap();
        (img.manifest_digest, listing(root.path()))
    }

    #[test]
    fn archive_and_directory_give_the_same_image() {
        let dir = tempfile::tempdir().unwrap();
        let desc = two_layer_image(dir.path());
        let from_dir = unpacked(dir.path());
        assert_eq!(from_dir.0, desc.digest);
        assert_eq!(from_dir.1.len(), 2, "{:?}", from_dir.1);
        for gzip in [false, true] {
            let archive = tar_of(dir.path(), gzip);
            assert_eq!(unpacked(archive.path()), from_dir, "gzip={gzip}");
        }
    }

    #[test]
    fn config_fields_and_defaults() {
        let dir = tempfile::tempdir().unwrap();
        two_layer_image(dir.path());
        let img = Layout::open(dir.path())
            .unwrap()
            .resolve(None, &Platform::host())
            .unwrap();
        assert_eq!(
            img.config,
            ImageConfig {
                cmd: vec!["sh".into()],
                working_dir: "/".into(),
                ..ImageConfig::default()
            }
        );
        let full: ExecConfig = serde_json::from_str(
            r#"{"User":"1000:1000","Env":["A=b"],"Entrypoint":["/e"],"Cmd":null,"WorkingDir":"/w"}"#,
        )
        .unwrap();
        let c = ImageConfig::from(full);
        assert_eq!(c.user, "1000:1000");
        assert_eq!(c.entrypoint, ["/e"]);
        assert!(c.cmd.is_empty());
        assert_eq!(c.working_dir, "/w");
        assert_eq!(c.argv(&[]), ["/e"]);
        assert_eq!(c.argv(&["x".into()]), ["/e", "x"]);
        let sh = ImageConfig {
            cmd: vec!["sh".into()],
            ..ImageConfig::default()
        };
        assert_eq!(sh.argv(&[]), ["sh"]);
        assert_eq!(sh.argv(&["echo".into(), "hi".into()]), ["echo", "hi"]);
    }

    fn write_index(dir: &Path, manifests: Vec<Descriptor>) {
        let index = Index {
            schema_version: 2,
            media_type: Some(media::OCI_INDEX.into()),
            manifests,
        };
        fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    }

    fn named(mut d: Descriptor, name: &str, arch: Option<&str>) -> Descriptor {
        d.annotations = Some([(REF_NAME.to_string(), name.to_string())].into());
        d.platform = arch.map(|a| Platform {
            os: "linux".into(),
            architecture: a.into(),
            variant: None,
        });
        d
    }

    #[test]
    fn picks_by_ref_name_and_platform_through_nested_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let first = two_layer_image(dir.path());
        let mut l = LayerBuilder::new();
        l.file("other", 0o644, b"o").unwrap();
        let second = write_image(dir.path(), vec![(l, true)]);
        let host = Platform::host();
        // A nested, multi-platform index: `second` claims to be arm64.
        let nested = Index {
            schema_version: 2,
            media_type: Some(media::OCI_INDEX.into()),
            manifests: vec![
                named(second.clone(), "x", Some("arm64")),
                named(first.clone(), "x", Some(&host.architecture)),
            ],
        };
        let nested = serde_json::to_vec(&nested).unwrap();
        let nested_digest = sha256_digest(&nested);
        fs::write(
            dir.path().join("blobs/sha256").join(&nested_digest[7..]),
            &nested,
        )
        .unwrap();
        let nested_desc = Descriptor {
            media_type: media::OCI_INDEX.into(),
            digest: nested_digest,
            size: nested.len() as u64,
            platform: None,
            annotations: None,
        };
        write_index(
            dir.path(),
            vec![
                named(nested_desc, "multi:1", None),
                named(second.clone(), "docker.io/library/second:latest", None),
            ],
        );
        let layout = Layout::open(dir.path()).unwrap();
        let pick = |r: Option<&str>| layout.resolve(r, &host).map(|i| i.manifest_digest);
        assert_eq!(pick(Some("multi:1")).unwrap(), first.digest);
        assert_eq!(pick(Some("second:latest")).unwrap(), second.digest);
        assert_eq!(pick(Some("latest")).unwrap(), second.digest);
        assert!(matches!(pick(None), Err(OciError::Ambiguous(_))));
        let e = pick(Some("nope")).unwrap_err();
        assert!(e.to_string().contains("multi:1"), "{e}");
        let arm = Platform::parse("linux/arm64").unwrap();
        // The arm64 entry's config says amd64: refused, not silently used.
        assert!(matches!(
            layout.resolve(Some("multi:1"), &arm),
            Err(OciError::NoPlatformMatch(_))
        ));
        let riscv = Platform::parse("linux/riscv64").unwrap();
        assert!(matches!(
            layout.resolve(Some("multi:1"), &riscv),
            Err(OciError::NoPlatformMatch(_))
        ));
    }

    #[test]
    fn corrupt_json_blobs_and_layouts_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let desc = two_layer_image(dir.path());
        let manifest_path = dir.path().join("blobs/sha256").join(&desc.digest[7..]);
        let good = fs::read(&manifest_path).unwrap();
        let mut bad = good.clone();
        bad[0] = b' ';
        fs::write(&manifest_path, &bad).unwrap();
        let layout = Layout::open(dir.path()).unwrap();
        let r = layout.resolve(None, &Platform::host());
        assert!(matches!(r, Err(OciError::DigestMismatch { .. })), "{r:?}");
        fs::remove_file(&manifest_path).unwrap();
        let r = layout.resolve(None, &Platform::host());
        assert!(matches!(r, Err(OciError::MissingBlob(_))), "{r:?}");
        fs::write(&manifest_path, &good).unwrap();
        layout.resolve(None, &Platform::host()).unwrap();

        write_index(dir.path(), vec![]);
        let r = layout.resolve(None, &Platform::host());
        assert!(matches!(r, Err(OciError::EmptyIndex)), "{r:?}");
        fs::write(dir.path().join("index.json"), b"{not json").unwrap();
        let r = layout.resolve(None, &Platform::host());
        assert!(matches!(r, Err(OciError::Json { .. })), "{r:?}");

        fs::write(
            dir.path().join("oci-layout"),
            r#"{"imageLayoutVersion":"2.0.0"}"#,
        )
        .unwrap();
        assert!(matches!(
            Layout::open(dir.path()),
            Err(OciError::LayoutVersion(_))
        ));
        fs::remove_file(dir.path().join("oci-layout")).unwrap();
        assert!(matches!(
            Layout::open(dir.path()),
            Err(OciError::NotALayout(_))
        ));
        let not_tar = tempfile::NamedTempFile::new().unwrap();
        fs::write(not_tar.path(), b"hello").unwrap();
        assert!(Layout::open(not_tar.path()).is_err());
    }

    #[test]
    fn digests_platforms_and_image_args() {
        let hex64 = "a".repeat(64);
        assert_eq!(digest_hex(&format!("sha256:{hex64}")).unwrap(), hex64);
        for bad in [
            "sha256:../../etc/passwd",
            "sha256:ABC",
            "nocolon",
            &format!("sha256:{hex64}/x"),
        ] {
            assert!(
                matches!(digest_hex(bad), Err(OciError::BadDigest(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            digest_hex(&format!("sha512:{hex64}")),
            Err(OciError::UnsupportedDigest(_))
        ));
        assert_eq!(Platform::parse("linux/amd64").unwrap(), Platform::host());
        assert_eq!(
            Platform::parse("linux/arm64/v8").unwrap().to_string(),
            "linux/arm64/v8"
        );
        assert!(Platform::parse("linux").is_err());
        assert!(Platform::parse("linux/").is_err());

        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        assert_eq!(split_image_arg(&d), (dir.path().into(), None));
        assert_eq!(
            split_image_arg(&format!("{d}:busybox:latest")),
            (dir.path().into(), Some("busybox:latest".into()))
        );
        assert_eq!(
            split_image_arg("/nonexistent/img:tag"),
            ("/nonexistent/img".into(), Some("tag".into()))
        );
        assert_eq!(
            split_image_arg("/nonexistent/img"),
            ("/nonexistent/img".into(), None)
        );
    }
}
