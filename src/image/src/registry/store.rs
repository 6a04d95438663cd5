//! The registry cache on disk, `$HUSK_CACHE_DIR/registry/v1/`: an OCI image
//! layout without an `index.json` whose `blobs/sha256/<hex>` hold every
//! manifest, index, config and layer pulled, shared by digest across
//! images, plus `refs/<registry>/<repository>/` records of what a tag (in
//! `_tags/<tag>`) or a digest (in `_digests/<hex>`) resolved to: the
//! descriptor of the top manifest or index. A record is written only once
//! every blob of the image for the pulled platform is present.
//!
//! Everything is written to a `.tmp-*` file in the same directory and
//! renamed into place, so a failure or a concurrent pull never leaves a
//! partial blob or record under its final name.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::oci::{digest_hex, Descriptor, Layout};

use super::reference::ImageRef;
use super::RegistryError;

/// Bumped when the layout of this directory changes.
const STORE_VERSION: &str = "v1";

/// The registry cache.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> RegistryError + '_ {
    move |source| RegistryError::Cache {
        path: path.to_path_buf(),
        source,
    }
}

impl Store {
    /// The store under `cache_dir` (made if missing).
    pub fn open(cache_dir: &Path) -> Result<Store, RegistryError> {
        let root = cache_dir.join("registry").join(STORE_VERSION);
        let blobs = root.join("blobs/sha256");
        fs::create_dir_all(&blobs).map_err(io_at(&blobs))?;
        let marker = root.join("oci-layout");
        if !marker.is_file() {
            write_atomic(&root, &marker, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        Ok(Store { root })
    }

    /// The directory (an OCI layout without index.json).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The store as a layout to read images from.
    pub fn layout(&self) -> Result<Layout, RegistryError> {
        Ok(Layout::open(&self.root)?)
    }

    /// Where the blob `digest` lives.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, RegistryError> {
        Ok(self.root.join("blobs/sha256").join(digest_hex(digest)?))
    }

    /// Whether the blob is present with the descriptor's size (its content
    /// was verified when it was written, and is again when it is read).
    pub fn has_blob(&self, desc: &Descriptor) -> Result<bool, RegistryError> {
        let path = self.blob_path(&desc.digest)?;
        Ok(fs::symlink_metadata(&path).is_ok_and(|m| m.is_file() && m.len() == desc.size))
    }

    /// A temporary file in the blob directory, to be renamed to its digest
    /// by [`Store::commit_blob`] once verified.
    pub fn temp_blob(&self) -> Result<tempfile::NamedTempFile, RegistryError> {
        let dir = self.root.join("blobs/sha256");
        tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(&dir)
            .map_err(io_at(&dir))
    }

    /// Moves a verified temporary file into place as blob `digest`.
    pub fn commit_blob(
        &self,
        temp: tempfile::NamedTempFile,
        digest: &str,
    ) -> Result<(), RegistryError> {
        let path = self.blob_path(digest)?;
        temp.as_file().sync_all().map_err(io_at(&path))?;
        temp.persist(&path).map_err(|e| RegistryError::Cache {
            path: path.clone(),
            source: e.error,
        })?;
        Ok(())
    }

    /// Writes verified bytes as blob `digest`.
    pub fn put_blob(&self, digest: &str, data: &[u8]) -> Result<(), RegistryError> {
        let path = self.blob_path(digest)?;
        write_atomic(&self.root.join("blobs/sha256"), &path, data)
    }

    fn record_path(&self, reference: &ImageRef) -> Result<PathBuf, RegistryError> {
        let repo = self
            .root
            .join("refs")
            .join(safe_component(reference.registry())?);
        let mut dir = repo;
        for part in reference.repository().split('/') {
            dir = dir.join(safe_component(part)?);
        }
        Ok(match (reference.digest(), reference.tag()) {
            (Some(d), _) => dir.join("_digests").join(digest_hex(d)?),
            (None, Some(tag)) => dir.join("_tags").join(safe_component(tag)?),
            (None, None) => dir.join("_tags/latest"),
        })
    }

    /// What `reference` resolved to when it was last pulled, if it was.
    pub fn record(&self, reference: &ImageRef) -> Result<Option<Descriptor>, RegistryError> {
        let path = self.record_path(reference)?;
        match fs::read(&path) {
            Ok(raw) => match serde_json::from_slice(&raw) {
                Ok(desc) => Ok(Some(desc)),
                Err(e) => {
                    // A record is written whole or not at all; one that does
                    // not parse was not written by us: pull again.
                    tracing::warn!(path = %path.display(), error = %e, "ignoring a bad cache record");
                    Ok(None)
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(RegistryError::Cache { path, source }),
        }
    }

    /// Records what `reference` resolved to.
    pub fn set_record(&self, reference: &ImageRef, top: &Descriptor) -> Result<(), RegistryError> {
        let path = self.record_path(reference)?;
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        let record = Descriptor {
            platform: None,
            annotations: None,
            ..top.clone()
        };
        let json = serde_json::to_vec(&record).map_err(|e| RegistryError::Cache {
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        write_atomic(&dir, &path, &json)
    }
}

/// A registry, repository or tag part as a file name: never empty, `.`,
/// `..`, or holding a `/` (the reference grammar already forbids these).
fn safe_component(part: &str) -> Result<&str, RegistryError> {
    if part.is_empty() || part == "." || part == ".." || part.contains(['/', '\0']) {
        return Err(RegistryError::BadReference {
            reference: part.to_string(),
            reason: "it cannot name a cache file".to_string(),
        });
    }
    Ok(part)
}

fn write_atomic(dir: &Path, path: &Path, data: &[u8]) -> Result<(), RegistryError> {
    use std::io::Write;
    let mut temp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(io_at(dir))?;
    temp.write_all(data).map_err(io_at(path))?;
    temp.persist(path).map_err(|e| RegistryError::Cache {
        path: path.to_path_buf(),
        source: e.error,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::sha256_digest;

    #[test]
    fn records_and_blobs_round_trip_without_temporaries() {
        let cache = tempfile::tempdir().unwrap();
        let store = Store::open(cache.path()).unwrap();
        store.layout().unwrap();
        let data = b"{}";
        let digest = sha256_digest(data);
        let desc = Descriptor {
            media_type: crate::oci::media::OCI_MANIFEST.into(),
            digest: digest.clone(),
            size: 2,
            platform: None,
            annotations: None,
        };
        assert!(!store.has_blob(&desc).unwrap());
        store.put_blob(&digest, data).unwrap();
        assert!(store.has_blob(&desc).unwrap());
        let tagged = ImageRef::parse("127.0.0.1:5000/team/app:v1").unwrap();
        assert_eq!(store.record(&tagged).unwrap(), None);
        store.set_record(&tagged, &desc).unwrap();
        assert_eq!(store.record(&tagged).unwrap(), Some(desc.clone()));
        assert!(store
            .root()
            .join("refs/127.0.0.1:5000/team/app/_tags/v1")
            .is_file());
        let pinned = tagged.with_digest(&digest);
        assert_eq!(store.record(&pinned).unwrap(), None);
        store.set_record(&pinned, &desc).unwrap();
        assert_eq!(store.record(&pinned).unwrap(), Some(desc));
        let temps: Vec<_> = walk(store.root())
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(".tmp-")
            })
            .collect();
        assert!(temps.is_empty(), "{temps:?}");
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
        out
    }
}
