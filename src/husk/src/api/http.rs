//! The HTTP/1.1 subset the API speaks: one request at a time per
//! connection, bodies with Content-Length (no chunked encoding), keep-alive
//! by default, `Expect: 100-continue` honoured. Requests are parsed from a
//! connection's buffered bytes with `httparse`; every size is capped so a
//! client cannot make the VMM allocate without bound.

/// Request line and headers may take this many bytes at most.
pub const MAX_HEADER_BYTES: usize = 8 * 1024;
/// Bodies may take this many bytes at most (Firecracker's limit).
pub const MAX_BODY_BYTES: usize = 51_200;
const MAX_HEADERS: usize = 32;

/// One parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// GET, PUT, PATCH, ...
    pub method: String,
    /// The path, without any query string.
    pub path: String,
    /// The body (empty when there is none).
    pub body: Vec<u8>,
    /// False when the client asked to close after this response.
    pub keep_alive: bool,
}

/// A response to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// A JSON body, if any.
    pub body: Option<Vec<u8>>,
    /// Extra headers (name, value).
    pub headers: Vec<(&'static str, String)>,
}

impl Response {
    /// 204 No Content.
    pub fn no_content() -> Self {
        Response {
            status: 204,
            body: None,
            headers: Vec::new(),
        }
    }

    /// 200 with a JSON document.
    pub fn json(value: &serde_json::Value) -> Self {
        Response {
            status: 200,
            body: Some(value.to_string().into_bytes()),
            headers: Vec::new(),
        }
    }

    /// An error status with `{"fault_message": ...}`.
    pub fn fault(status: u16, message: impl Into<String>) -> Self {
        Response {
            status,
            body: Some(
                serde_json::json!({ "fault_message": message.into() })
                    .to_string()
                    .into_bytes(),
            ),
            headers: Vec::new(),
        }
    }

    /// The bytes on the wire.
    pub fn to_bytes(&self, keep_alive: bool) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nServer: husk API\r\nConnection: {}\r\n",
            self.status,
            reason(self.status),
            if keep_alive { "keep-alive" } else { "close" }
        );
        for (name, value) in &self.headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        match &self.body {
            Some(body) => out.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )),
            None if self.status == 204 => out.push_str("\r\n"),
            None => out.push_str("Content-Length: 0\r\n\r\n"),
        }
        let mut bytes = out.into_bytes();
        if let Some(body) = &self.body {
            bytes.extend_from_slice(body);
        }
        bytes
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// The result of looking at a connection's buffered bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole request yet. `expects_continue` is true when the headers
    /// are complete and ask for a `100 Continue` before the body.
    Incomplete {
        /// Answer `100 Continue` now.
        expects_continue: bool,
    },
    /// A request, and how many bytes of the buffer it used.
    Done(Request, usize),
    /// Not a request husk accepts; answer and close.
    Invalid(Response),
}

/// Parses the first request in `buf`.
pub fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_HEADER_BYTES {
                return Parsed::Invalid(Response::fault(431, "request headers are too large"));
            }
            return Parsed::Incomplete {
                expects_continue: false,
            };
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Invalid(Response::fault(431, "too many request headers"))
        }
        Err(e) => {
            return Parsed::Invalid(Response::fault(400, format!("malformed HTTP request: {e}")))
        }
    };
    if head_len > MAX_HEADER_BYTES {
        return Parsed::Invalid(Response::fault(431, "request headers are too large"));
    }
    let method = req.method.unwrap_or_default().to_string();
    let target = req.path.unwrap_or_default();
    let version = req.version.unwrap_or(1);
    let mut content_length: Option<usize> = None;
    let mut keep_alive = version >= 1;
    let mut expect_continue = false;
    for h in req.headers.iter() {
        let value = String::from_utf8_lossy(h.value);
        let value = value.trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            match value.parse::<usize>() {
                Ok(n) if content_length.is_none_or(|old| old == n) => content_length = Some(n),
                _ => return Parsed::Invalid(Response::fault(400, "invalid Content-Length")),
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Parsed::Invalid(Response::fault(
                501,
                "Transfer-Encoding is not supported; send a Content-Length",
            ));
        } else if h.name.eq_ignore_ascii_case("connection") {
            if value.eq_ignore_ascii_case("close") {
                keep_alive = false;
            } else if value.eq_ignore_ascii_case("keep-alive") {
                keep_alive = true;
            }
        } else if h.name.eq_ignore_ascii_case("expect")
            && value.eq_ignore_ascii_case("100-continue")
        {
            expect_continue = true;
        }
    }
    let body_len = content_length.unwrap_or(0);
    if body_len > MAX_BODY_BYTES {
        return Parsed::Invalid(Response::fault(
            413,
            format!("request body of {body_len} bytes exceeds the limit of {MAX_BODY_BYTES}"),
        ));
    }
    let Some(total) = head_len.checked_add(body_len) else {
        return Parsed::Invalid(Response::fault(413, "request body too large"));
    };
    if buf.len() < total {
        return Parsed::Incomplete {
            expects_continue: expect_continue && buf.len() == head_len,
        };
    }
    let path = target
        .split(['?', '#'])
        .next()
        .unwrap_or_default()
        .to_string();
    Parsed::Done(
        Request {
            method,
            path,
            body: buf[head_len..total].to_vec(),
            keep_alive,
        },
        total,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_with_a_body() {
        let raw = b"PUT /machine-config?x=1 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}GET";
        let Parsed::Done(req, used) = parse(raw) else {
            panic!("{:?}", parse(raw))
        };
        assert_eq!(req.method, "PUT");
        assert_eq!(req.path, "/machine-config");
        assert_eq!(req.body, b"{}");
        assert!(req.keep_alive);
        assert_eq!(used, raw.len() - 3);
    }

    #[test]
    fn partial_requests_wait() {
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\nHost: x\r\n"),
            Parsed::Incomplete {
                expects_continue: false
            }
        );
        assert_eq!(
            parse(b"PUT /x HTTP/1.1\r\nContent-Length: 5\r\n\r\n{}"),
            Parsed::Incomplete {
                expects_continue: false
            }
        );
        assert_eq!(
            parse(b"PUT /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"),
            Parsed::Incomplete {
                expects_continue: true
            }
        );
    }

    fn status(p: Parsed) -> u16 {
        match p {
            Parsed::Invalid(r) => r.status,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn limits_and_garbage() {
        assert_eq!(status(parse(b"\x00\x01garbage\r\n\r\n")), 400);
        assert_eq!(
            status(parse(b"PUT /x HTTP/1.1\r\nContent-Length: 999999\r\n\r\n")),
            413
        );
        assert_eq!(
            status(parse(b"PUT /x HTTP/1.1\r\nContent-Length: abc\r\n\r\n")),
            400
        );
        assert_eq!(
            status(parse(
                b"PUT /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
            )),
            400
        );
        assert_eq!(
            status(parse(
                b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            )),
            501
        );
        let mut huge = b"GET / HTTP/1.1\r\nX: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', MAX_HEADER_BYTES + 1));
        assert_eq!(status(parse(&huge)), 431);
    }

    #[test]
    fn connection_close_and_http_1_0() {
        let Parsed::Done(r, _) = parse(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n") else {
            panic!()
        };
        assert!(!r.keep_alive);
        let Parsed::Done(r, _) = parse(b"GET / HTTP/1.0\r\n\r\n") else {
            panic!()
        };
        assert!(!r.keep_alive);
    }

    #[test]
    fn response_bytes() {
        let r = Response::fault(400, "bad").to_bytes(true);
        let text = String::from_utf8(r).unwrap();
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        assert!(text.ends_with("\r\n\r\n{\"fault_message\":\"bad\"}"));
        assert!(text.contains("Content-Length: 23\r\n"));
        let text = String::from_utf8(Response::no_content().to_bytes(false)).unwrap();
        assert_eq!(
            text,
            "HTTP/1.1 204 No Content\r\nServer: husk API\r\nConnection: close\r\n\r\n"
        );
    }
}
