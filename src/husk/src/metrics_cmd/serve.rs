//! The exporter's HTTP side: HTTP/1.1, one request per connection (each
//! answered with `Connection: close`), a thread per connection up to
//! [`MAX_CONNECTIONS`] (then 503 at once), `GET /metrics` scraping the
//! node and `GET /` pointing there. A client that stalls is cut off after
//! [`IO_TIMEOUT`].

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::render::CONTENT_TYPE;
use super::Exporter;

/// Connections served at once.
const MAX_CONNECTIONS: usize = 8;
/// How long a client may take to send its request or read the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest request head read.
const MAX_REQUEST: usize = 8192;

/// Why a request could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The connection failed or timed out.
    #[error("the connection failed")]
    Io(#[from] std::io::Error),
    /// The request head is larger than [`MAX_REQUEST`].
    #[error("the request head is over {MAX_REQUEST} bytes")]
    TooLarge,
    /// The request is not HTTP/1.x.
    #[error("not an HTTP request: {0}")]
    Malformed(#[from] httparse::Error),
    /// The client closed before its request was whole.
    #[error("the client closed before the request ended")]
    Closed,
}

/// Serves `listener` until accepting fails for good.
pub fn serve(listener: TcpListener, exporter: &Exporter) -> std::io::Result<()> {
    let active = AtomicUsize::new(0);
    std::thread::scope(|s| -> std::io::Result<()> {
        loop {
            let (mut conn, peer) = match listener.accept() {
                Ok(c) => c,
                // A client that gave up before the accept; out of fds.
                Err(e) if is_transient(&e) => {
                    tracing::warn!(error = %e, "cannot accept a connection");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                Err(e) => return Err(e),
            };
            if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                active.fetch_sub(1, Ordering::AcqRel);
                let _ = conn.set_write_timeout(Some(IO_TIMEOUT));
                let _ = respond(&mut conn, 503, "text/plain", b"too many scrapes at once\n");
                continue;
            }
            let active = &active;
            let spawned = std::thread::Builder::new()
                .name("husk-metrics-conn".into())
                .spawn_scoped(s, move || {
                    if let Err(e) = handle(&mut conn, exporter) {
                        tracing::debug!(%peer, error = %vmm::error::Chain(&e), "a scrape connection failed");
                    }
                    active.fetch_sub(1, Ordering::AcqRel);
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start a thread for a connection");
                active.fetch_sub(1, Ordering::AcqRel);
            }
        }
    })
}

fn is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::EINTR
                | libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
        )
    )
}

/// Reads one request and answers it.
fn handle(conn: &mut TcpStream, exporter: &Exporter) -> Result<(), ServeError> {
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let (method, path) = loop {
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            return Err(ServeError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                break (
                    req.method.unwrap_or_default().to_string(),
                    req.path.unwrap_or_default().to_string(),
                );
            }
            Ok(httparse::Status::Partial) if buf.len() <= MAX_REQUEST => {}
            Ok(httparse::Status::Partial) => {
                respond(conn, 431, "text/plain", b"request head too large\n")?;
                return Err(ServeError::TooLarge);
            }
            Err(e) => {
                respond(conn, 400, "text/plain", b"bad request\n")?;
                return Err(e.into());
            }
        }
    };
    let path = path.split('?').next().unwrap_or_default();
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return Ok(respond(conn, 405, "text/plain", b"only GET\n")?);
    }
    let (status, content_type, body) = match path {
        "/metrics" => (200, CONTENT_TYPE, exporter.scrape().into_bytes()),
        "/" => (
            200,
            "text/html; charset=utf-8",
            b"<html><body><a href=\"/metrics\">husk metrics</a></body></html>\n".to_vec(),
        ),
        _ => (404, "text/plain", b"not found: try /metrics\n".to_vec()),
    };
    let body = if head_only { &[][..] } else { &body[..] };
    Ok(respond(conn, status, content_type, body)?)
}

fn respond(
    conn: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if status == 405 {
        head.push_str("Allow: GET, HEAD\r\n");
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes())?;
    conn.write_all(body)?;
    conn.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    fn get(addr: std::net::SocketAddr, request: &str) -> String {
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(request.as_bytes()).unwrap();
        let mut out = Vec::new();
        // A server that closes on unread bytes resets the connection
        // after its answer: what came before the reset is the answer.
        let _ = c.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn metrics_are_served_and_other_requests_refused() {
        let dir = tempfile::tempdir().unwrap();
        let exporter = Box::leak(Box::new(Exporter {
            state_dir: dir.path().to_path_buf(),
            flush_timeout: Duration::from_millis(100),
            errors: Mutex::new(BTreeMap::new()),
        }));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || serve(listener, exporter));
        let ok = get(addr, "GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains("Content-Type: text/plain; version=0.0.4"),
            "{ok}"
        );
        assert!(ok.contains("\r\n\r\n# HELP husk_pods "), "{ok}");
        let head = get(addr, "HEAD /metrics HTTP/1.1\r\n\r\n");
        assert!(
            head.starts_with("HTTP/1.1 200") && head.ends_with("\r\n\r\n"),
            "{head}"
        );
        assert!(get(addr, "GET /nope HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        let post = get(addr, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert!(
            post.starts_with("HTTP/1.1 405") && post.contains("Allow: GET"),
            "{post}"
        );
        assert!(get(addr, "\u{1}\u{2}garbage\r\n\r\n").starts_with("HTTP/1.1 400"));
        let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n", "a".repeat(9000));
        assert!(get(addr, &huge).starts_with("HTTP/1.1 431"));
        // A client that sends half a request and goes does not stop others.
        let half = TcpStream::connect(addr).unwrap();
        drop(half);
        assert!(get(addr, "GET / HTTP/1.1\r\n\r\n").contains("/metrics"));
    }
}
