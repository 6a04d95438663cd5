//! Helpers for the image module's tests: multi-layer layouts written with
//! our writer, and a listing of a tree to compare unpack results.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::oci::{Descriptor, ExecConfig};
use super::writer::{write_layout, Layer, LayerBuilder};

/// Writes a layout from layer builders (`true`: gzip the layer).
pub fn write_image(dir: &Path, layers: Vec<(LayerBuilder, bool)>) -> Descriptor {
    let layers: Vec<Layer> = layers
        .into_iter()
        .map(|(b, gzip)| Layer {
            tar: b.finish().expect("layer tar"),
            gzip,
        })
        .collect();
    let exec = ExecConfig {
        cmd: Some(vec!["sh".into()]),
        ..ExecConfig::default()
    };
    write_layout(dir, &layers, exec, Some("test:latest")).expect("write layout")
}

/// One line per entry below `root`, sorted: path, type, mode, size, and
/// the content of small files or the target of symlinks.
pub fn listing(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).expect("read_dir") {
            let p = e.expect("entry").path();
            let m = fs::symlink_metadata(&p).expect("lstat");
            let rel = p
                .strip_prefix(root)
                .expect("under root")
                .display()
                .to_string();
            let what = if m.is_dir() {
                stack.push(p.clone());
                "dir".to_string()
            } else if m.file_type().is_symlink() {
                format!("-> {}", fs::read_link(&p).expect("readlink").display())
            } else if m.is_file() {
                format!(
                    "file {:?}",
                    String::from_utf8_lossy(&fs::read(&p).expect("read"))
                )
            } else {
                "other".to_string()
            };
            out.push(format!("{rel} {:o} {} {what}", m.mode(), m.mtime()));
        }
    }
    out.sort();
    out
}
