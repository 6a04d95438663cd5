//! husk-pty: runs a command on a new pseudo-terminal of a given size and
//! copies what it writes there to stdout, for tests of terminal handling
//! (`ctr run -t` wants its stdin to be a terminal; the node VM has no
//! `script`). Exits with the command's status (128 + N for signal N).
//!
//! ```text
//! husk-pty ROWSxCOLS CMD [ARGS...]
//! ```

use std::ffi::CString;
use std::io::Write;

fn fail(what: &str) -> ! {
    eprintln!("husk-pty: {what}: {}", std::io::Error::last_os_error());
    std::process::exit(125)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let size = args.first().and_then(|s| {
        let (r, c) = s.split_once('x')?;
        Some((r.parse::<u16>().ok()?, c.parse::<u16>().ok()?))
    });
    let (Some((rows, cols)), true) = (size, args.len() >= 2) else {
        eprintln!("usage: husk-pty ROWSxCOLS CMD [ARGS...]");
        std::process::exit(2);
    };
    let Ok(cargs) = args[1..]
        .iter()
        .map(|a| CString::new(a.as_str()))
        .collect::<Result<Vec<_>, _>>()
    else {
        eprintln!("husk-pty: an argument holds a NUL byte");
        std::process::exit(2);
    };
    let mut argv: Vec<*const libc::c_char> = cargs.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());

    let mut master: libc::c_int = -1;
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: forkpty with a valid out-pointer and window size; the child
    // only calls execvp (async-signal-safe) and _exit.
    let pid = unsafe { libc::forkpty(&mut master, std::ptr::null_mut(), std::ptr::null(), &ws) };
    if pid < 0 {
        fail("forkpty");
    }
    if pid == 0 {
        // SAFETY: argv is a NULL-terminated array of valid C strings.
        unsafe {
            libc::execvp(argv[0], argv.as_ptr());
            libc::_exit(127);
        }
    }
    let mut out = std::io::stdout();
    let mut buf = [0u8; 4096];
    let mut status = 0;
    let mut exited = false;
    loop {
        let mut pfd = libc::pollfd {
            fd: master,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd we own.
        let ready = unsafe { libc::poll(&mut pfd, 1, 100) };
        if ready > 0 {
            // SAFETY: reading into a buffer we own, within its length.
            let n = unsafe { libc::read(master, buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                // Whatever the terminal's line discipline made of it (\r\n).
                let _ = out.write_all(&buf[..n as usize]);
                let _ = out.flush();
                continue;
            }
            // EIO: every slave side closed.
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        if ready == 0 && exited {
            // The command ended and nothing more came for 100 ms: done,
            // even if something it left behind still holds the terminal.
            break;
        }
        if !exited {
            // SAFETY: polling our own child.
            let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if r < 0 {
                fail("waitpid");
            }
            exited = r == pid;
        }
    }
    // SAFETY: waiting for our own child.
    if !exited && unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
        fail("waitpid");
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    };
    std::process::exit(code);
}
