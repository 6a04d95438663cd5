//! Writing OCI image layouts: [`LayerBuilder`] makes a reproducible layer
//! tar (fixed mtime, uid/gid 0 unless told, entries in the order given),
//! [`write_layout`] stores layers, config, manifest and `index.json` as
//! content-addressed blobs. The bundled busybox image ([`super::busybox`])
//! and the tests build their images with it.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use flate2::{Compression, GzBuilder};

use super::oci::{
    media, sha256_digest, ConfigFile, Descriptor, ExecConfig, Index, Manifest, Platform, RootFs,
    REF_NAME,
};

/// Errors writing a layout.
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    /// Writing a file of the layout failed.
    #[error("cannot write {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Building a layer tar failed.
    #[error("cannot build layer entry {path}")]
    Tar {
        /// The entry.
        path: String,
        /// The cause.
        source: io::Error,
    },
}

type Result<T> = std::result::Result<T, WriterError>;

/// The mtime every entry gets unless told otherwise (2000-01-01).
pub const FIXED_MTIME: u64 = 946_684_800;

/// A layer tar under construction.
pub struct LayerBuilder {
    tar: tar::Builder<Vec<u8>>,
    /// uid/gid of entries added from now on.
    owner: (u64, u64),
    mtime: u64,
    /// The mode of each regular file written, for hard links to it.
    modes: std::collections::HashMap<String, u32>,
}

impl Default for LayerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerBuilder {
    /// An empty layer.
    pub fn new() -> LayerBuilder {
        LayerBuilder {
            tar: tar::Builder::new(Vec::new()),
            owner: (0, 0),
            mtime: FIXED_MTIME,
            modes: std::collections::HashMap::new(),
        }
    }

    /// Owner of the entries added next.
    #[cfg_attr(not(test), allow(dead_code))] // multi-layer test images
    pub fn owner(&mut self, uid: u64, gid: u64) -> &mut Self {
        self.owner = (uid, gid);
        self
    }

    /// mtime of the entries added next.
    #[cfg_attr(not(test), allow(dead_code))] // multi-layer test images
    pub fn mtime(&mut self, mtime: u64) -> &mut Self {
        self.mtime = mtime;
        self
    }

    fn header(&self, kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(self.owner.0);
        h.set_gid(self.owner.1);
        h.set_mtime(self.mtime);
        h.set_size(size);
        h
    }

    fn append(&mut self, mut h: tar::Header, path: &str, data: &[u8]) -> Result<&mut Self> {
        let err = |source| WriterError::Tar {
            path: path.into(),
            source,
        };
        self.tar.append_data(&mut h, path, data).map_err(err)?;
        Ok(self)
    }

    fn append_link(&mut self, mut h: tar::Header, path: &str, target: &str) -> Result<&mut Self> {
        let err = |source| WriterError::Tar {
            path: path.into(),
            source,
        };
        self.tar.append_link(&mut h, path, target).map_err(err)?;
        Ok(self)
    }

    /// An extended attribute for the next entry (a PAX `SCHILY.xattr.NAME`
    /// record, as GNU tar and containers' tools write them).
    #[cfg_attr(not(test), allow(dead_code))] // multi-layer test images
    pub fn xattr(&mut self, name: &str, value: &[u8]) -> Result<&mut Self> {
        let key = format!("SCHILY.xattr.{name}");
        self.tar
            .append_pax_extensions([(key.as_str(), value)])
            .map_err(|source| WriterError::Tar {
                path: key.clone(),
                source,
            })?;
        Ok(self)
    }

    /// A directory.
    pub fn dir(&mut self, path: &str, mode: u32) -> Result<&mut Self> {
        let h = self.header(tar::EntryType::Directory, mode, 0);
        self.append(h, path, &[])
    }

    /// A regular file.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<&mut Self> {
        let h = self.header(tar::EntryType::Regular, mode, data.len() as u64);
        self.modes.insert(path.to_string(), mode);
        self.append(h, path, data)
    }

    /// A symlink.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<&mut Self> {
        let h = self.header(tar::EntryType::Symlink, 0o777, 0);
        self.append_link(h, path, target)
    }

    /// A hard link to an earlier entry. Its header carries the target's
    /// mode: containerd's applier chmods the linked file to the header's
    /// mode, so a 0644 link would take the execute bits off a program.
    pub fn hardlink(&mut self, path: &str, target: &str) -> Result<&mut Self> {
        let mode = self.modes.get(target).copied().unwrap_or(0o644);
        let h = self.header(tar::EntryType::Link, mode, 0);
        self.append_link(h, path, target)
    }

    /// A character device.
    #[cfg_attr(not(test), allow(dead_code))] // multi-layer test images
    pub fn char_device(
        &mut self,
        path: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> Result<&mut Self> {
        let mut h = self.header(tar::EntryType::Char, mode, 0);
        let err = |source| WriterError::Tar {
            path: path.into(),
            source,
        };
        h.set_device_major(major).map_err(err)?;
        h.set_device_minor(minor).map_err(err)?;
        self.append(h, path, &[])
    }

    /// A whiteout deleting `path` from the layers below.
    #[cfg_attr(not(test), allow(dead_code))] // multi-layer test images
    pub fn whiteout(&mut self, path: &str) -> Result<&mut Self> {
        let (dir, name) = match path.rsplit_once('/') {
            Some((d, n)) => (format!("{d}/"), n),
            None => (String::new(), path),
        };
        let h = self.header(tar::EntryType::Regular, 0o644, 0);
        self.append(h, &format!("{dir}.wh.{name}"), &[])
    }

    /// An opaque marker: `dir`'s contents from lower layers disappear.
    #[cfg_attr(not(test), allow(dead_code))] // multi-layer test images
    pub fn opaque(&mut self, dir: &str) -> Result<&mut Self> {
        let h = self.header(tar::EntryType::Regular, 0o644, 0);
        self.append(
            h,
            &format!("{}/.wh..wh..opq", dir.trim_end_matches('/')),
            &[],
        )
    }

    /// The uncompressed tar.
    pub fn finish(self) -> Result<Vec<u8>> {
        self.tar.into_inner().map_err(|source| WriterError::Tar {
            path: "<end>".into(),
            source,
        })
    }
}

/// A layer to store: its tar and whether to gzip it.
pub struct Layer {
    /// Uncompressed tar.
    pub tar: Vec<u8>,
    /// Store as `tar+gzip` rather than plain `tar`.
    pub gzip: bool,
}

/// Gzip with a fixed header (no name, mtime 0): the same input gives the
/// same bytes.
pub fn gzip(data: &[u8]) -> io::Result<Vec<u8>> {
    let mut enc = GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), Compression::best());
    enc.write_all(data)?;
    enc.finish()
}

fn write_blob(dir: &Path, media_type: &str, data: &[u8]) -> Result<Descriptor> {
    let digest = sha256_digest(data);
    let blobs = dir.join("blobs/sha256");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| WriterError::Io { path, source }
    };
    fs::create_dir_all(&blobs).map_err(io(&blobs))?;
    let path = blobs.join(digest.trim_start_matches("sha256:"));
    fs::write(&path, data).map_err(io(&path))?;
    Ok(Descriptor {
        media_type: media_type.into(),
        digest,
        size: data.len() as u64,
        platform: None,
        annotations: None,
    })
}

/// Writes an OCI layout holding one image to `dir` (created if missing; an
/// existing `index.json` is replaced). Returns the manifest's descriptor.
pub fn write_layout(
    dir: &Path,
    layers: &[Layer],
    exec: ExecConfig,
    ref_name: Option<&str>,
) -> Result<Descriptor> {
    let io = |path: PathBuf| move |source| WriterError::Io { path, source };
    fs::create_dir_all(dir).map_err(io(dir.to_path_buf()))?;
    let mut layer_descs = Vec::new();
    let mut diff_ids = Vec::new();
    for layer in layers {
        diff_ids.push(sha256_digest(&layer.tar));
        let desc = if layer.gzip {
            let data = gzip(&layer.tar).map_err(io(dir.to_path_buf()))?;
            write_blob(dir, media::OCI_LAYER_GZIP, &data)?
        } else {
            write_blob(dir, media::OCI_LAYER_TAR, &layer.tar)?
        };
        layer_descs.push(desc);
    }
    let host = Platform::host();
    let config = ConfigFile {
        architecture: host.architecture.clone(),
        os: host.os.clone(),
        config: Some(exec),
        rootfs: Some(RootFs {
            kind: "layers".into(),
            diff_ids,
        }),
    };
    let config = serde_json::to_vec(&config).map_err(|e| WriterError::Io {
        path: dir.to_path_buf(),
        source: e.into(),
    })?;
    let config_desc = write_blob(dir, media::OCI_CONFIG, &config)?;
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(media::OCI_MANIFEST.into()),
        config: config_desc,
        layers: layer_descs,
    };
    let manifest = serde_json::to_vec(&manifest).map_err(|e| WriterError::Io {
        path: dir.to_path_buf(),
        source: e.into(),
    })?;
    let mut desc = write_blob(dir, media::OCI_MANIFEST, &manifest)?;
    desc.platform = Some(host);
    if let Some(name) = ref_name {
        desc.annotations = Some([(REF_NAME.to_string(), name.to_string())].into());
    }
    let index = Index {
        schema_version: 2,
        media_type: Some(media::OCI_INDEX.into()),
        manifests: vec![desc.clone()],
    };
    let index = serde_json::to_vec(&index).map_err(|e| WriterError::Io {
        path: dir.to_path_buf(),
        source: e.into(),
    })?;
    fs::write(dir.join("index.json"), index).map_err(io(dir.join("index.json")))?;
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
        .map_err(io(dir.join("oci-layout")))?;
    Ok(desc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hard_link_carries_the_mode_of_the_file_it_names() {
        let mut l = LayerBuilder::new();
        l.file("bin/tool", 0o755, b"#!").unwrap();
        l.hardlink("bin/alias", "bin/tool").unwrap();
        let tar = l.finish().unwrap();
        let mut archive = tar::Archive::new(tar.as_slice());
        let modes: Vec<(String, u32)> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path().unwrap().display().to_string(),
                    e.header().mode().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            modes,
            [("bin/tool".into(), 0o755), ("bin/alias".into(), 0o755)]
        );
    }
}
