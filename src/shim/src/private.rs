//! Files that hold a pod's data (disk images with copies of its Secret
//! volumes, writable layers, husk's log of its console) and the
//! directories they live in: 0600 and 0700, whatever the umask, so no
//! other user of the node reads them.

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// A pod file's mode.
pub const FILE_MODE: u32 = 0o600;
/// A pod directory's mode.
pub const DIR_MODE: u32 = 0o700;

/// Creates `path` (and missing parents) 0700; an existing `path` is made
/// 0700 too (parents that already exist keep their mode).
pub fn dir(path: &Path) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)?;
    std::fs::set_permissions(path, Permissions::from_mode(DIR_MODE))
}

/// Creates or truncates `path`, 0600 even if it existed with another mode.
pub fn file(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(path)?;
    f.set_permissions(Permissions::from_mode(FILE_MODE))?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn pod_files_and_directories_are_the_owners_alone() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("state/ns/pod");
        dir(&d).unwrap();
        for p in [t.path().join("state"), t.path().join("state/ns"), d.clone()] {
            assert_eq!(mode(&p), DIR_MODE, "{}", p.display());
        }
        // An existing directory (an older shim's, a umask's) is narrowed.
        std::fs::set_permissions(&d, Permissions::from_mode(0o755)).unwrap();
        dir(&d).unwrap();
        assert_eq!(mode(&d), DIR_MODE);
        let f = d.join("disk.ext4");
        std::fs::write(&f, b"old").unwrap();
        std::fs::set_permissions(&f, Permissions::from_mode(0o644)).unwrap();
        file(&f).unwrap();
        assert_eq!(mode(&f), FILE_MODE);
        assert_eq!(std::fs::metadata(&f).unwrap().len(), 0);
        file(&d.join("new.log")).unwrap();
        assert_eq!(mode(&d.join("new.log")), FILE_MODE);
    }
}
