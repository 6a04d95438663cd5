//! What `husk run`'s templates and the shim's pod templates share: a
//! template is a snapshot of a guest booted to its agent, cached in a
//! directory named by a key, the hash of a text that names every input
//! (one per line; the text is kept in the directory as `inputs.txt`).
//! A template whose kernel, agent or husk has changed at the same path
//! since is stale: the next template made removes it.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use sha2::{Digest, Sha256};

/// The file of a template's inputs.
pub const INPUTS_FILE: &str = "inputs.txt";
/// A template's VM state file.
pub const STATE_FILE: &str = "vm.state";
/// A template's guest memory file.
pub const MEM_FILE: &str = "vm.mem";

/// A line naming a file and which version of it is there: its real path,
/// size, modification time and inode (`what PATH size=… mtime=… ino=…`).
pub fn file_identity(what: &str, path: &Path) -> std::io::Result<String> {
    let real = std::fs::canonicalize(path)?;
    let m = std::fs::metadata(&real)?;
    Ok(format!(
        "{what} {} size={} mtime={}.{:09} ino={}",
        real.display(),
        m.len(),
        m.mtime(),
        m.mtime_nsec(),
        m.ino()
    ))
}

/// The key of an inputs text: 32 hex digits of its SHA-256.
pub fn key(inputs: &str) -> String {
    Sha256::digest(inputs.as_bytes())[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether a template's inputs text names a file of `current` (lines from
/// [`file_identity`]) by the same path in another version.
pub fn is_superseded(inputs: &str, current: &[String]) -> bool {
    inputs.lines().any(|line| {
        current.iter().any(|cur| {
            let path_part = |l: &str| l.split(" size=").next().map(str::to_string);
            line != cur && path_part(line).is_some() && path_part(line) == path_part(cur)
        })
    })
}

/// Removes the templates under `root` (but `keep`) made from another
/// version of one of `files` (`(what, path)`, as [`file_identity`] names
/// them); returns how many went. Entries that are not templates (no
/// inputs file) are left alone.
pub fn prune_superseded(root: &Path, keep: &str, files: &[(&str, &Path)]) -> usize {
    let current: Vec<String> = files
        .iter()
        .filter_map(|(what, path)| file_identity(what, path).ok())
        .collect();
    let Ok(entries) = std::fs::read_dir(root) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name.to_string_lossy() == keep {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(entry.path().join(INPUTS_FILE)) else {
            continue;
        };
        if is_superseded(&text, &current) && std::fs::remove_dir_all(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_hex_and_differ_by_input() {
        assert_eq!(key("a\n"), key("a\n"));
        assert_ne!(key("a\n"), key("b\n"));
        assert_eq!(key("a\n").len(), 32);
        assert!(key("x").chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn a_changed_file_at_the_same_path_supersedes_and_nothing_else_does() {
        let tmp = std::env::temp_dir().join(format!("husk-template-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).unwrap();
        let kernel = tmp.join("vmlinux");
        std::fs::write(&kernel, b"one").unwrap();
        let old = file_identity("kernel", &kernel).unwrap();
        std::fs::write(&kernel, b"newer").unwrap();
        let new = file_identity("kernel", &kernel).unwrap();
        assert_ne!(old, new);
        let root = tmp.join("templates");
        for (name, text) in [
            ("old", format!("{old}\nvcpus 1\n")),
            ("current", format!("{new}\nvcpus 1\n")),
            (
                "elsewhere",
                "kernel /other/vmlinux size=1 mtime=1.0 ino=1\n".to_string(),
            ),
        ] {
            std::fs::create_dir_all(root.join(name)).unwrap();
            std::fs::write(root.join(name).join(INPUTS_FILE), text).unwrap();
        }
        std::fs::create_dir_all(root.join("not-a-template")).unwrap();
        assert!(new.contains("size=5"));
        assert_eq!(
            prune_superseded(&root, "new-one", &[("kernel", &kernel)]),
            1
        );
        assert!(!root.join("old").exists());
        for kept in ["current", "elsewhere", "not-a-template"] {
            assert!(root.join(kept).exists(), "{kept}");
        }
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
