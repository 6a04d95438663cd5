//! Opening the host files the API or the command line names (the kernel,
//! the initrd, drives' backing files) without ever blocking, and only when
//! they are of a type the VM can use.
//!
//! A path can name anything. A FIFO's `open` waits for a writer, so the
//! VMM thread (and with it every API request) would hang; a socket cannot
//! be opened at all; opening a character device can have effects of its own
//! (a terminal, a watchdog); a directory is no disk. Each is refused with
//! an error that says what the path is. The type is checked twice: with
//! `stat` before anything is opened, so a device node is not even opened,
//! and with `fstat` on what `open` returned, so a file swapped in between
//! is refused too. The open itself is non-blocking (`O_NONBLOCK`, dropped
//! again once the type is known), so that swap cannot hang the VMM either.

use std::fs::{File, FileType, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Connects to the unix socket at `path` without blocking: a full backlog
/// (a server that stopped accepting) is an error, not a wait. The stream
/// returned is non-blocking.
pub fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket() takes no pointers; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket nobody else owns; the stream closes it.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: addr is a valid sockaddr_un that outlives the call, and len
    // does not exceed its size (checked above).
    let rc = unsafe {
        libc::connect(
            fd,
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

/// The file types a use of a path accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accept {
    /// A regular file only (kernel, initrd).
    RegularFile,
    /// A regular file or a block device (a drive's backing).
    FileOrBlockDevice,
}

impl Accept {
    fn wanted(self) -> &'static str {
        match self {
            Accept::RegularFile => "a regular file",
            Accept::FileOrBlockDevice => "a regular file or a block device",
        }
    }
}

/// A path that names something of a type its use does not accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("it is {found}, not {wanted}")]
pub struct WrongFileType {
    /// What the path names ("a FIFO").
    pub found: &'static str,
    /// What its use accepts ("a regular file").
    pub wanted: &'static str,
}

fn describe(t: FileType) -> &'static str {
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_file() {
        "a regular file"
    } else {
        "a special file"
    }
}

/// Ok when `t` is of a type `accept` takes; else the [`WrongFileType`], as
/// an `InvalidInput` I/O error.
pub fn check_type(t: FileType, accept: Accept) -> io::Result<()> {
    let ok = t.is_file() || (accept == Accept::FileOrBlockDevice && t.is_block_device());
    if ok {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        WrongFileType {
            found: describe(t),
            wanted: accept.wanted(),
        },
    ))
}

fn set_nonblocking(file: &File, on: bool) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL on a descriptor this function's caller owns; no
    // memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = if on {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    // SAFETY: as above, F_SETFL with an integer argument.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Opens `path` for reading (and writing with `write`) if it names
/// something `accept` takes (symbolic links are followed); never blocks.
/// The file returned is in blocking mode.
pub fn open(path: &Path, write: bool, accept: Accept) -> io::Result<File> {
    check_type(std::fs::metadata(path)?.file_type(), accept)?;
    let file = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)?;
    check_type(file.metadata()?.file_type(), accept)?;
    set_nonblocking(&file, false)?;
    Ok(file)
}

/// Opens (creating it if missing) `path` to append to, as the serial
/// console's file: any type is accepted (a FIFO, a terminal, /dev/null are
/// fine consoles), but the open does not wait for a FIFO's reader: with
/// none it fails (ENXIO) instead of hanging. Writes then block as usual.
pub fn open_append(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)?;
    set_nonblocking(&file, false)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::path::PathBuf;
    use std::time::Duration;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("husk-hostfile-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn mkfifo(path: &Path) {
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: c is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    /// Runs `f` on a thread; panics if it does not return within 10 s (a
    /// blocked open).
    fn within_10s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the open blocked")
    }

    fn message(r: io::Result<File>) -> String {
        let e = r.expect_err("refused");
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        e.to_string()
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let d = scratch("fifo");
        let fifo = d.join("fifo");
        mkfifo(&fifo);
        let p = fifo.clone();
        let r = within_10s(move || open(&p, false, Accept::FileOrBlockDevice));
        assert_eq!(
            message(r),
            "it is a FIFO, not a regular file or a block device"
        );
        // Through a symbolic link too.
        std::os::unix::fs::symlink(&fifo, d.join("link")).unwrap();
        let p = d.join("link");
        let r = within_10s(move || open(&p, true, Accept::RegularFile));
        assert_eq!(message(r), "it is a FIFO, not a regular file");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn sockets_character_devices_and_directories_are_refused() {
        let d = scratch("types");
        let sock = d.join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        assert_eq!(
            message(open(&sock, false, Accept::RegularFile)),
            "it is a socket, not a regular file"
        );
        assert_eq!(
            message(open(
                Path::new("/dev/null"),
                false,
                Accept::FileOrBlockDevice
            )),
            "it is a character device, not a regular file or a block device"
        );
        assert_eq!(
            message(open(&d, false, Accept::RegularFile)),
            "it is a directory, not a regular file"
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn regular_files_open_in_blocking_mode() {
        let d = scratch("file");
        let f = d.join("f");
        std::fs::write(&f, b"data").unwrap();
        for accept in [Accept::RegularFile, Accept::FileOrBlockDevice] {
            let file = open(&f, true, accept).unwrap();
            // SAFETY: F_GETFL on an open descriptor.
            let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
            assert_eq!(flags & libc::O_NONBLOCK, 0);
            assert_eq!(flags & libc::O_ACCMODE, libc::O_RDWR);
        }
        assert_eq!(
            open(&d.join("missing"), false, Accept::RegularFile)
                .unwrap_err()
                .kind(),
            io::ErrorKind::NotFound
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_console_fifo_without_a_reader_fails_instead_of_hanging() {
        let d = scratch("console");
        let fifo = d.join("fifo");
        mkfifo(&fifo);
        let p = fifo.clone();
        let e = within_10s(move || open_append(&p)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENXIO));
        // A regular file is created and appended to.
        let f = d.join("console.log");
        std::io::Write::write_all(&mut open_append(&f).unwrap(), b"x").unwrap();
        std::io::Write::write_all(&mut open_append(&f).unwrap(), b"y").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"xy");
        let _ = std::fs::remove_dir_all(&d);
    }
}
