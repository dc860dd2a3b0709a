//! HTTP/1.1 request reading (RFC 9112 subset) on top of the `httparse` crate.
//!
//! httparse parses the request line, header fields, chunk-size lines and trailer
//! fields; this module feeds it from a socket within [`Limits`], decides how the body
//! is framed and reads it. Reading is split in steps so the server can answer
//! `Expect: 100-continue` and reject oversized bodies before reading them:
//! [`read_head`] reads the request line and headers, [`Head::body_framing`] decides how
//! the body is delimited, and [`read_body`] reads it.
//!
//! Supported: `Content-Length` and `Transfer-Encoding: chunked` bodies, CRLF or bare LF
//! line endings, empty lines before the request line, HTTP/1.0 and HTTP/1.1, any
//! number of requests in a row on one connection (keep-alive and pipelining: nothing
//! past the current request is consumed). Rejected: obsolete line folding, conflicting
//! framing headers, other transfer codings, absolute-form and asterisk-form targets,
//! non-ASCII targets.

use std::io::{self, BufRead, Read};

use httparse::Status;

use crate::url;

/// Size limits applied while reading a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest request line accepted, in bytes (414 beyond it).
    pub max_request_line: usize,
    /// Largest request head (request line plus headers), in bytes (431 beyond it).
    pub max_head: usize,
    /// Most header fields accepted (431 beyond it).
    pub max_headers: usize,
    /// Largest body accepted, in bytes (413 beyond it).
    pub max_body: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_line: 8 * 1024,
            max_head: 32 * 1024,
            max_headers: 100,
            max_body: 1024 * 1024,
        }
    }
}

/// HTTP protocol version of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

/// Why a request could not be read. [`ReadRequestError::status`] gives the HTTP status
/// to answer with, if any.
#[derive(Debug, thiserror::Error)]
pub enum ReadRequestError {
    /// The peer closed the connection before sending any byte of a new request.
    /// This is the normal end of a keep-alive connection, not an error to report.
    #[error("Connection closed by peer")]
    Closed,
    /// The socket failed or timed out, or the peer closed mid-request.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// Syntax error in the request line, headers or chunked framing (as found by httparse).
    #[error("Bad request: {0}")]
    BadRequest(&'static str),
    /// Request line longer than [`Limits::max_request_line`].
    #[error("Request line too long")]
    UriTooLong,
    /// Head larger than [`Limits::max_head`] or more than [`Limits::max_headers`] fields.
    #[error("Request head too large")]
    HeadTooLarge,
    /// Body larger than [`Limits::max_body`].
    #[error("Request body larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    /// A PUT or PATCH came without `Content-Length` or `Transfer-Encoding`.
    #[error("Content-Length required")]
    LengthRequired,
    /// A transfer coding other than `chunked`.
    #[error("Unsupported transfer coding")]
    UnsupportedTransferEncoding,
    /// `HTTP/x.y` with a major version other than 1.
    #[error("HTTP version not supported")]
    VersionNotSupported,
}

impl ReadRequestError {
    /// Status code to send before closing the connection, or `None` if nothing
    /// should be sent (the peer is gone or the socket is broken).
    pub fn status(&self) -> Option<u16> {
        match self {
            ReadRequestError::Closed | ReadRequestError::Io(_) => None,
            ReadRequestError::BadRequest(_) => Some(400),
            ReadRequestError::LengthRequired => Some(411),
            ReadRequestError::BodyTooLarge { .. } => Some(413),
            ReadRequestError::UriTooLong => Some(414),
            ReadRequestError::HeadTooLarge => Some(431),
            ReadRequestError::UnsupportedTransferEncoding => Some(501),
            ReadRequestError::VersionNotSupported => Some(505),
        }
    }
}

/// Request line and header fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Method as sent (case-sensitive, e.g. `GET`).
    pub method: String,
    /// Raw request target, e.g. `/kv/a%20b?x=1`.
    pub target: String,
    pub version: Version,
    /// Header fields in order; names as sent, values trimmed of surrounding whitespace.
    pub headers: Vec<(String, String)>,
}

/// How the request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body (or an empty one).
    None,
    /// Exactly this many bytes follow the head.
    Length(usize),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

impl Head {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether a comma-separated header (e.g. `Connection`) lists `token`.
    pub fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// Whether the client asks the connection to stay open after the response.
    pub fn wants_keep_alive(&self) -> bool {
        match self.version {
            Version::Http11 => !self.header_has_token("connection", "close"),
            Version::Http10 => self.header_has_token("connection", "keep-alive"),
        }
    }

    /// Whether the client sent `Expect: 100-continue`.
    pub fn expects_continue(&self) -> bool {
        self.header("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
    }

    /// Decides how the body is framed and checks it against `limits`.
    pub fn body_framing(&self, limits: &Limits) -> Result<BodyFraming, ReadRequestError> {
        let te: Vec<&str> = self
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding"))
            .flat_map(|(_, v)| v.split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .collect();
        let mut lengths = self
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .flat_map(|(_, v)| v.split(','))
            .map(str::trim);

        if !te.is_empty() {
            if lengths.next().is_some() {
                return Err(ReadRequestError::BadRequest(
                    "both Transfer-Encoding and Content-Length",
                ));
            }
            if self.version == Version::Http10 {
                return Err(ReadRequestError::BadRequest(
                    "Transfer-Encoding in an HTTP/1.0 request",
                ));
            }
            return match te.as_slice() {
                [only] if only.eq_ignore_ascii_case("chunked") => Ok(BodyFraming::Chunked),
                _ => Err(ReadRequestError::UnsupportedTransferEncoding),
            };
        }

        let mut length: Option<u64> = None;
        for value in lengths {
            let parsed = parse_decimal(value)
                .ok_or(ReadRequestError::BadRequest("invalid Content-Length"))?;
            match length {
                Some(prev) if prev != parsed => {
                    return Err(ReadRequestError::BadRequest("conflicting Content-Length"))
                }
                _ => length = Some(parsed),
            }
        }
        match length {
            Some(0) => Ok(BodyFraming::None),
            Some(n) => match usize::try_from(n) {
                Ok(n) if n <= limits.max_body => Ok(BodyFraming::Length(n)),
                _ => Err(ReadRequestError::BodyTooLarge {
                    limit: limits.max_body,
                }),
            },
            None if method_requires_body(&self.method) => Err(ReadRequestError::LengthRequired),
            None => Ok(BodyFraming::None),
        }
    }
}

/// RFC 9112 section 6.3 says a request without framing headers has an empty body.
/// For PUT and PATCH, whose body is the new resource state, an empty body is almost
/// always a client that meant "read until close", so they get 411 instead. A bare
/// POST (e.g. `curl -X POST URL?params`) is accepted with an empty body.
fn method_requires_body(method: &str) -> bool {
    matches!(method, "PUT" | "PATCH")
}

/// Parses a non-empty string of ASCII digits (no sign, no spaces) without overflow.
fn parse_decimal(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Longest chunk-size line and largest trailer section of a chunked body.
const MAX_CHUNK_LINE: usize = 1024;
const MAX_TRAILERS: usize = 8 * 1024;

/// Copies bytes from `r` into `buf` until `scan` finds a complete block at the start
/// of `buf` and returns its length; exactly that many bytes are consumed from `r`, so
/// whatever follows (a body, the next pipelined request) stays in `r`. At most `max`
/// bytes are buffered: a block that does not fit gives `too_large()`.
/// Returns `Ok(false)` if `r` is at end of input before any byte.
fn read_block<R: BufRead>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
    too_large: impl Fn() -> ReadRequestError,
    mut scan: impl FnMut(&[u8]) -> Result<Option<usize>, ReadRequestError>,
) -> Result<bool, ReadRequestError> {
    buf.clear();
    loop {
        let available = r.fill_buf()?;
        if available.is_empty() {
            return match buf.is_empty() {
                true => Ok(false),
                false => Err(eof("connection closed mid-request")),
            };
        }
        let old = buf.len();
        let take = available.len().min(max.saturating_sub(old));
        buf.extend_from_slice(&available[..take]);
        match scan(buf)? {
            // The first `old` bytes are consumed already (they were not a whole block).
            Some(n) if (old..=buf.len()).contains(&n) => {
                r.consume(n - old);
                buf.truncate(n);
                return Ok(true);
            }
            Some(_) => return Err(ReadRequestError::BadRequest("inconsistent framing")),
            None if buf.len() >= max => return Err(too_large()),
            None => r.consume(take),
        }
    }
}

fn eof(what: &'static str) -> ReadRequestError {
    ReadRequestError::Io(io::Error::new(io::ErrorKind::UnexpectedEof, what))
}

fn status<T>(parsed: Status<T>) -> Option<T> {
    match parsed {
        Status::Complete(t) => Some(t),
        Status::Partial => None,
    }
}

/// The first line of `head` after any empty lines, without its terminator, and
/// whether it is complete.
fn first_line(head: &[u8]) -> (&[u8], bool) {
    let start = head
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(head.len());
    let line = &head[start..];
    match line.iter().position(|&b| b == b'\n') {
        Some(end) => (
            line[..end].strip_suffix(b"\r").unwrap_or(&line[..end]),
            true,
        ),
        None => (line, false),
    }
}

/// Maps a parse error to the status to answer with. A well-formed `HTTP/x.y` other
/// than 1.0 and 1.1 is 505, anything else 400.
fn parse_error(e: httparse::Error, head: &[u8]) -> ReadRequestError {
    use httparse::Error as E;
    let bad = ReadRequestError::BadRequest;
    match e {
        E::TooManyHeaders => ReadRequestError::HeadTooLarge,
        E::Version if names_http_version(first_line(head).0) => {
            ReadRequestError::VersionNotSupported
        }
        E::Version => bad("invalid HTTP version"),
        E::HeaderName => bad("invalid header name"),
        E::HeaderValue => bad("invalid header value"),
        E::NewLine => bad("invalid line ending"),
        E::Token | E::Status => bad("request line must be 'METHOD TARGET VERSION'"),
    }
}

fn names_http_version(request_line: &[u8]) -> bool {
    let version = request_line
        .rsplit(|&b| b == b' ')
        .next()
        .unwrap_or_default();
    match version.strip_prefix(b"HTTP/") {
        Some([major]) => major.is_ascii_digit(),
        Some([major, b'.', minor]) => major.is_ascii_digit() && minor.is_ascii_digit(),
        _ => false,
    }
}

/// Parses a request head, complete or not; `Ok(Some(length))` once it is complete.
/// httparse has no limit of its own on the request line, so it is checked here.
fn parse_head<'h, 'b>(
    head: &'b [u8],
    limits: &Limits,
    fields: &'h mut [httparse::Header<'b>],
) -> Result<(Option<usize>, httparse::Request<'h, 'b>), ReadRequestError> {
    let (line, complete) = first_line(head);
    // An incomplete line may still end in the `\r` of its terminator.
    if line.len() > limits.max_request_line + usize::from(!complete) {
        return Err(ReadRequestError::UriTooLong);
    }
    let mut req = httparse::Request::new(fields);
    let parsed = req.parse(head).map_err(|e| parse_error(e, head))?;
    Ok((status(parsed), req))
}

/// Reads the request line and header fields.
pub fn read_head<R: BufRead>(r: &mut R, limits: &Limits) -> Result<Head, ReadRequestError> {
    let mut buf = Vec::with_capacity(1024);
    // httparse ties the header array to the bytes, so each attempt gets its own.
    let new_fields = || vec![httparse::EMPTY_HEADER; limits.max_headers];
    let found = read_block(
        r,
        &mut buf,
        limits.max_head,
        || ReadRequestError::HeadTooLarge,
        |head| Ok(parse_head(head, limits, &mut new_fields())?.0),
    )?;
    if !found {
        return Err(ReadRequestError::Closed);
    }
    let mut fields = new_fields();
    let (_, req) = parse_head(&buf, limits, &mut fields)?;
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(ReadRequestError::BadRequest("incomplete request head"));
    };
    if !target.starts_with('/') {
        return Err(ReadRequestError::BadRequest(
            "request target must be in origin form",
        ));
    }
    // httparse lets bytes above 0x7f through; the apps' paths are percent-encoded.
    if !target.is_ascii() {
        return Err(ReadRequestError::BadRequest(
            "invalid character in request target",
        ));
    }
    let headers = req
        .headers
        .iter()
        .map(|h| {
            let value = String::from_utf8_lossy(h.value);
            (
                h.name.to_string(),
                value.trim_matches([' ', '\t']).to_string(),
            )
        })
        .collect();
    Ok(Head {
        method: method.to_string(),
        target: target.to_string(),
        version: if version == 0 {
            Version::Http10
        } else {
            Version::Http11
        },
        headers,
    })
}

/// Reads a body framed as `framing`, refusing more than `max_body` bytes.
pub fn read_body<R: BufRead>(
    r: &mut R,
    framing: BodyFraming,
    max_body: usize,
) -> Result<Vec<u8>, ReadRequestError> {
    let mut body = Vec::new();
    match framing {
        BodyFraming::None => {}
        BodyFraming::Length(n) if n > max_body => {
            return Err(ReadRequestError::BodyTooLarge { limit: max_body })
        }
        BodyFraming::Length(n) => read_exact_into(r, n, &mut body)?,
        BodyFraming::Chunked => read_chunked(r, max_body, &mut body)?,
    }
    Ok(body)
}

/// Appends exactly `n` bytes to `body`, growing it as data arrives rather than
/// trusting an announced length for one large allocation.
fn read_exact_into<R: Read>(
    r: &mut R,
    n: usize,
    body: &mut Vec<u8>,
) -> Result<(), ReadRequestError> {
    body.reserve(n.min(64 * 1024));
    let got = r.by_ref().take(n as u64).read_to_end(body)?;
    match got == n {
        true => Ok(()),
        false => Err(eof("connection closed in request body")),
    }
}

fn read_chunked<R: BufRead>(
    r: &mut R,
    max_body: usize,
    body: &mut Vec<u8>,
) -> Result<(), ReadRequestError> {
    let bad = ReadRequestError::BadRequest;
    let mut line = Vec::new();
    loop {
        let mut size = 0u64;
        let scan_size = |b: &[u8]| match httparse::parse_chunk_size(b) {
            Ok(parsed) => Ok(status(parsed).map(|(n, s)| {
                size = s;
                n
            })),
            Err(_) => Err(bad("invalid chunk size")),
        };
        if !read_block(
            r,
            &mut line,
            MAX_CHUNK_LINE,
            || bad("chunk size line too long"),
            scan_size,
        )? {
            return Err(eof("connection closed in chunked body"));
        }
        if size == 0 {
            break;
        }
        let remaining = max_body.saturating_sub(body.len());
        let size = match usize::try_from(size) {
            Ok(size) if size <= remaining => size,
            _ => return Err(ReadRequestError::BodyTooLarge { limit: max_body }),
        };
        read_exact_into(r, size, body)?;
        let scan_crlf = |b: &[u8]| match b {
            [b'\n', ..] => Ok(Some(1)),
            [b'\r', b'\n', ..] => Ok(Some(2)),
            [] | [b'\r'] => Ok(None),
            _ => Err(bad("missing CRLF after chunk data")),
        };
        if !read_block(
            r,
            &mut line,
            2,
            || bad("missing CRLF after chunk data"),
            scan_crlf,
        )? {
            return Err(eof("connection closed in chunked body"));
        }
    }
    // Trailer fields: parsed by httparse and discarded, bounded.
    let scan_trailers =
        |b: &[u8]| match httparse::parse_headers(b, &mut [httparse::EMPTY_HEADER; 32]) {
            Ok(parsed) => Ok(status(parsed).map(|(n, _)| n)),
            Err(_) => Err(bad("invalid trailer section")),
        };
    if !read_block(
        r,
        &mut line,
        MAX_TRAILERS,
        || bad("trailer section too large"),
        scan_trailers,
    )? {
        return Err(eof("connection closed in chunked body"));
    }
    Ok(())
}

/// A fully read request, as handed to a [`crate::Handler`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub head: Head,
    pub body: Vec<u8>,
}

impl Request {
    pub fn method(&self) -> &str {
        &self.head.method
    }

    /// Path part of the target, still percent-encoded (e.g. `/kv/a%20b`).
    pub fn path(&self) -> &str {
        self.head
            .target
            .split_once('?')
            .map_or(self.head.target.as_str(), |(p, _)| p)
    }

    /// Raw query string after `?`, if any.
    pub fn query(&self) -> Option<&str> {
        self.head.target.split_once('?').map(|(_, q)| q)
    }

    /// First value of query parameter `name`, percent- and `+`-decoded.
    /// `None` if absent or not valid UTF-8 after decoding.
    pub fn query_param(&self, name: &str) -> Option<String> {
        url::query_param(self.query()?, name)
    }

    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.header(name)
    }
}

/// Reads a whole request (head and body) without `100-continue` handling.
/// Convenient for tests and simple callers; the server uses the split API.
pub fn read_request<R: BufRead>(r: &mut R, limits: &Limits) -> Result<Request, ReadRequestError> {
    let head = read_head(r, limits)?;
    let framing = head.body_framing(limits)?;
    let body = read_body(r, framing, limits.max_body)?;
    Ok(Request { head, body })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(raw: &[u8]) -> Result<Request, ReadRequestError> {
        parse_with(raw, &Limits::default())
    }

    fn parse_with(raw: &[u8], limits: &Limits) -> Result<Request, ReadRequestError> {
        let mut r = io::BufReader::new(raw);
        read_request(&mut r, limits)
    }

    fn status_of(raw: &[u8]) -> Option<u16> {
        parse(raw).err().and_then(|e| e.status())
    }

    /// Every request in `raw`, read through a buffer of `capacity` bytes, so that
    /// heads and bodies arrive split at every possible point.
    fn parse_all(raw: &[u8], capacity: usize, limits: &Limits) -> Vec<Request> {
        let mut r = io::BufReader::with_capacity(capacity, raw);
        let mut out = Vec::new();
        loop {
            match read_request(&mut r, limits) {
                Ok(req) => out.push(req),
                Err(ReadRequestError::Closed) => return out,
                Err(e) => panic!("capacity {capacity}: {e}"),
            }
        }
    }

    #[test]
    fn parses_simple_get() {
        let req = parse(b"GET /kv/a%20b?x=1&y=two+words HTTP/1.1\r\nHost: h\r\n\r\n").unwrap();
        assert_eq!(req.method(), "GET");
        assert_eq!(req.path(), "/kv/a%20b");
        assert_eq!(req.query(), Some("x=1&y=two+words"));
        assert_eq!(req.query_param("y").as_deref(), Some("two words"));
        assert_eq!(req.header("HOST"), Some("h"));
        assert_eq!(req.head.version, Version::Http11);
        assert!(req.body.is_empty());
        assert!(req.head.wants_keep_alive());
    }

    #[test]
    fn accepts_bare_lf_and_leading_empty_lines() {
        let req = parse(b"\r\n\nGET / HTTP/1.0\nA:  b \n\n").unwrap();
        assert_eq!(req.head.headers, vec![("A".to_string(), "b".to_string())]);
        assert!(!req.head.wants_keep_alive());
    }

    #[test]
    fn pipelined_requests_split_anywhere() {
        let raw: &[u8] = b"PUT /kv/k HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello\
            POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nT: 1\r\n\r\n\
            GET /last HTTP/1.1\r\n\r\n";
        for capacity in 1..=raw.len() {
            let reqs = parse_all(raw, capacity, &Limits::default());
            let summary: Vec<_> = reqs.iter().map(|r| (r.path(), &r.body[..])).collect();
            assert_eq!(
                summary,
                [("/kv/k", &b"hello"[..]), ("/c", b"abc"), ("/last", b"")],
                "capacity {capacity}"
            );
        }
    }

    #[test]
    fn bad_request_lines_give_400() {
        for raw in [
            &b"GARBAGE\r\n\r\n"[..],
            b"NONSENSE\r\n\r\n",
            b"GET /\r\n\r\n",
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1 extra\r\n\r\n",
            b"GET http://x/ HTTP/1.1\r\n\r\n",
            b"GET * HTTP/1.1\r\n\r\n",
            b"G(T / HTTP/1.1\r\n\r\n",
            b"GET / HTTX/1.1\r\n\r\n",
            b"GET /\x01 HTTP/1.1\r\n\r\n",
            b"GET /\xff HTTP/1.1\r\n\r\n",
            b"GET /\xc3\xa9 HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(
                status_of(raw),
                Some(400),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn bad_headers_give_400() {
        for raw in [
            &b"GET / HTTP/1.1\r\nNoColon\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            b"GET / HTTP/1.1\r\n: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n",
            b"GET / HTTP/1.1\r\nA: b\x00c\r\n\r\n",
            b"PUT / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"PUT / HTTP/1.1\r\nContent-Length: 1x\r\n\r\n",
            b"PUT / HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
            b"PUT / HTTP/1.1\r\nContent-Length: \r\n\r\n",
            b"PUT / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"PUT / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert_eq!(
                status_of(raw),
                Some(400),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn repeated_equal_content_length_is_accepted() {
        let req = parse(b"PUT / HTTP/1.1\r\nContent-Length: 2, 2\r\nContent-Length: 2\r\n\r\nab")
            .unwrap();
        assert_eq!(req.body, b"ab");
    }

    #[test]
    fn unsupported_version_gives_505() {
        assert_eq!(status_of(b"GET / HTTP/2.0\r\n\r\n"), Some(505));
        assert_eq!(status_of(b"GET / HTTP/1.2\r\n\r\n"), Some(505));
        assert_eq!(status_of(b"GET / HTTP/2\r\n\r\n"), Some(505));
    }

    #[test]
    fn body_too_large_gives_413_without_reading_it() {
        let limits = Limits {
            max_body: 4,
            ..Limits::default()
        };
        let err =
            parse_with(b"PUT / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", &limits).unwrap_err();
        assert_eq!(err.status(), Some(413));
        let ok = parse_with(b"PUT / HTTP/1.1\r\nContent-Length: 4\r\n\r\nhell", &limits).unwrap();
        assert_eq!(ok.body, b"hell");
        let chunked =
            b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(
            parse_with(chunked, &limits).unwrap_err().status(),
            Some(413)
        );
    }

    #[test]
    fn missing_length_for_put_gives_411() {
        assert_eq!(status_of(b"PUT /kv/a HTTP/1.1\r\n\r\nvalue"), Some(411));
        assert_eq!(status_of(b"PATCH /kv/a HTTP/1.1\r\n\r\n"), Some(411));
        // POST, GET and DELETE without a length have an empty body.
        assert!(parse(b"POST /churn HTTP/1.1\r\n\r\n")
            .unwrap()
            .body
            .is_empty());
        assert!(parse(b"DELETE /kv/a HTTP/1.1\r\n\r\n")
            .unwrap()
            .body
            .is_empty());
    }

    #[test]
    fn explicit_zero_length_put_is_empty_body() {
        assert!(parse(b"PUT /kv/a HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
            .unwrap()
            .body
            .is_empty());
    }

    #[test]
    fn unknown_transfer_coding_gives_501() {
        assert_eq!(
            status_of(b"PUT / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            Some(501)
        );
    }

    #[test]
    fn decodes_chunked_body_with_extensions_and_trailers() {
        let raw = b"POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n\
                    5;ext=1\r\nhello\r\nA\r\n, world!!!\r\n0\r\nX-Trailer: t\r\n\r\n";
        assert_eq!(parse(raw).unwrap().body, b"hello, world!!!");
    }

    #[test]
    fn malformed_chunked_body_gives_400_or_io_error() {
        for raw in [
            &b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nBad Trailer\r\n\r\n",
        ] {
            assert_eq!(
                status_of(raw),
                Some(400),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
        let long_size = format!(
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1;{}\r\n",
            "e".repeat(MAX_CHUNK_LINE)
        );
        assert_eq!(status_of(long_size.as_bytes()), Some(400));
        let truncated = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab";
        assert!(matches!(parse(truncated), Err(ReadRequestError::Io(_))));
    }

    #[test]
    fn truncated_inputs_are_io_errors_not_panics() {
        assert!(matches!(parse(b""), Err(ReadRequestError::Closed)));
        let full: &[u8] = b"PUT /kv/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello";
        for end in 1..full.len() {
            assert!(
                matches!(parse(&full[..end]), Err(ReadRequestError::Io(_))),
                "{:?}",
                String::from_utf8_lossy(&full[..end])
            );
        }
        assert!(parse(full).is_ok());
    }

    #[test]
    fn oversized_heads_give_414_and_431() {
        let limits = Limits {
            max_request_line: 32,
            max_head: 128,
            max_headers: 3,
            ..Limits::default()
        };
        let long_target = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(64));
        assert_eq!(
            parse_with(long_target.as_bytes(), &limits)
                .unwrap_err()
                .status(),
            Some(414)
        );
        // Also while the line is still arriving.
        let unterminated = format!("GET /{}", "a".repeat(64));
        assert_eq!(
            parse_with(unterminated.as_bytes(), &limits)
                .unwrap_err()
                .status(),
            Some(414)
        );
        let fits = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(32 - 14));
        assert!(parse_with(fits.as_bytes(), &limits).is_ok());
        let big_header = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "v".repeat(200));
        assert_eq!(
            parse_with(big_header.as_bytes(), &limits)
                .unwrap_err()
                .status(),
            Some(431)
        );
        let many = "GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n";
        assert_eq!(
            parse_with(many.as_bytes(), &limits).unwrap_err().status(),
            Some(431)
        );
        let three = "GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n";
        assert!(parse_with(three.as_bytes(), &limits).is_ok());
        // Empty lines before the request line count towards the head.
        assert_eq!(
            parse_with("\r\n".repeat(100).as_bytes(), &limits)
                .unwrap_err()
                .status(),
            Some(431)
        );
    }

    #[test]
    fn connection_header_tokens() {
        let req = parse(b"GET / HTTP/1.1\r\nConnection: Upgrade, Close\r\n\r\n").unwrap();
        assert!(!req.head.wants_keep_alive());
        let req = parse(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").unwrap();
        assert!(req.head.wants_keep_alive());
        let req =
            parse(b"PUT / HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: 0\r\n\r\n").unwrap();
        assert!(req.head.expects_continue());
    }

    /// A request that error handling must survive: either a status to answer with, or
    /// an I/O error (truncated input), never a panic.
    fn check_never_panics(raw: &[u8], capacity: usize) {
        let limits = Limits {
            max_request_line: 64,
            max_head: 256,
            max_headers: 4,
            max_body: 16,
        };
        let mut r = io::BufReader::with_capacity(capacity, raw);
        for _ in 0..raw.len() + 1 {
            match read_request(&mut r, &limits) {
                Ok(req) => assert!(req.body.len() <= limits.max_body),
                Err(ReadRequestError::Closed | ReadRequestError::Io(_)) => return,
                Err(e) => {
                    let status = e.status().unwrap();
                    assert!((400..506).contains(&status), "{e}: {status}");
                    return;
                }
            }
        }
        panic!("more requests than bytes");
    }

    const VALID: &[u8] = b"PUT /kv/x?a=1 HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n\
        4\r\nabcd\r\n0\r\n\r\nGET / HTTP/1.1\r\nContent-Length: 2\r\n\r\nok";

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(
            raw in proptest::collection::vec(any::<u8>(), 0..512),
            capacity in 1usize..64,
        ) {
            check_never_panics(&raw, capacity);
        }

        #[test]
        fn mutated_requests_never_panic(
            edits in proptest::collection::vec((any::<usize>(), any::<u8>(), 0u8..3), 1..6),
            capacity in 1usize..64,
        ) {
            let mut raw = VALID.to_vec();
            for (i, byte, op) in edits {
                if raw.is_empty() {
                    break;
                }
                let i = i % raw.len();
                match op {
                    0 => raw[i] = byte,
                    1 => { raw.remove(i); }
                    _ => raw.insert(i, byte),
                }
            }
            check_never_panics(&raw, capacity);
        }

        #[test]
        fn valid_requests_roundtrip(
            method in "[A-Z]{1,8}",
            path in "/[a-zA-Z0-9%/._~-]{0,40}",
            headers in proptest::collection::vec(("[A-Za-z][A-Za-z0-9-]{0,15}", "[ -~]{0,30}"), 0..5),
            body in proptest::collection::vec(any::<u8>(), 0..64),
            chunk in 1usize..20,
            chunked in any::<bool>(),
            capacity in 1usize..100,
        ) {
            // Framing headers are this test's to choose.
            let headers: Vec<(String, String)> = headers
                .into_iter()
                .filter(|(n, _)| !n.eq_ignore_ascii_case("content-length")
                    && !n.eq_ignore_ascii_case("transfer-encoding"))
                .map(|(n, v)| (n, v.trim().to_string()))
                .collect();
            let mut raw = format!("{method} {path} HTTP/1.1\r\n");
            for (n, v) in &headers {
                raw.push_str(&format!("{n}: {v}\r\n"));
            }
            let mut raw = raw.into_bytes();
            if chunked {
                raw.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                for part in body.chunks(chunk) {
                    raw.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
                    raw.extend_from_slice(part);
                    raw.extend_from_slice(b"\r\n");
                }
                raw.extend_from_slice(b"0\r\n\r\n");
            } else {
                raw.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
                raw.extend_from_slice(&body);
            }
            let twice = [raw.clone(), raw].concat();
            let reqs = parse_all(&twice, capacity, &Limits::default());
            prop_assert_eq!(reqs.len(), 2);
            for req in reqs {
                prop_assert_eq!(req.method(), method.as_str());
                prop_assert_eq!(&req.head.target, &path);
                prop_assert_eq!(&req.head.headers[..headers.len()], &headers[..]);
                prop_assert_eq!(&req.body, &body);
            }
        }
    }
}
