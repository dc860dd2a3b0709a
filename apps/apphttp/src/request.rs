//! HTTP/1.1 request parsing (RFC 9112 subset).
//!
//! Parsing is split in two steps so the server can answer `Expect: 100-continue`
//! and reject oversized bodies before reading them:
//! [`read_head`] reads the request line and headers, [`Head::body_framing`] decides how
//! the body is delimited, and [`read_body`] reads it.
//!
//! Supported: `Content-Length` and `Transfer-Encoding: chunked` bodies, CRLF or bare LF
//! line endings, HTTP/1.0 and HTTP/1.1. Rejected: obsolete line folding, conflicting
//! framing headers, other transfer codings, absolute-form and asterisk-form targets.

use std::fmt;
use std::io::{self, BufRead, Read};

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
#[derive(Debug)]
pub enum ReadRequestError {
    /// The peer closed the connection before sending any byte of a new request.
    /// This is the normal end of a keep-alive connection, not an error to report.
    Closed,
    /// The socket failed or timed out, or the peer closed mid-request.
    Io(io::Error),
    /// Syntax error in the request line, headers or chunked framing.
    BadRequest(&'static str),
    /// Request line longer than [`Limits::max_request_line`].
    UriTooLong,
    /// Head larger than [`Limits::max_head`] or more than [`Limits::max_headers`] fields.
    HeadTooLarge,
    /// Body larger than [`Limits::max_body`].
    BodyTooLarge { limit: usize },
    /// A PUT or PATCH came without `Content-Length` or `Transfer-Encoding`.
    LengthRequired,
    /// A transfer coding other than `chunked`.
    UnsupportedTransferEncoding,
    /// `HTTP/x.y` with a major version other than 1.
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

impl fmt::Display for ReadRequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadRequestError::Closed => write!(f, "Connection closed by peer"),
            ReadRequestError::Io(e) => write!(f, "I/O error: {e}"),
            ReadRequestError::BadRequest(why) => write!(f, "Bad request: {why}"),
            ReadRequestError::UriTooLong => write!(f, "Request line too long"),
            ReadRequestError::HeadTooLarge => write!(f, "Request head too large"),
            ReadRequestError::BodyTooLarge { limit } => {
                write!(f, "Request body larger than {limit} bytes")
            }
            ReadRequestError::LengthRequired => write!(f, "Content-Length required"),
            ReadRequestError::UnsupportedTransferEncoding => {
                write!(f, "Unsupported transfer coding")
            }
            ReadRequestError::VersionNotSupported => write!(f, "HTTP version not supported"),
        }
    }
}

impl std::error::Error for ReadRequestError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ReadRequestError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for ReadRequestError {
    fn from(e: io::Error) -> Self {
        ReadRequestError::Io(e)
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

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Reads one line (up to and including `\n`) into `buf`, reading at most `limit + 2`
/// bytes. Returns `Ok(None)` at EOF before any byte, `Ok(Some(line))` with the line
/// terminator stripped, or `Err(too_long)` when the line does not fit in `limit`.
fn read_line<R: BufRead>(
    r: &mut R,
    buf: &mut Vec<u8>,
    limit: usize,
    too_long: ReadRequestError,
) -> Result<Option<usize>, ReadRequestError> {
    buf.clear();
    let n = r.by_ref().take(limit as u64 + 2).read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        if n >= limit + 2 {
            return Err(too_long);
        }
        return Err(ReadRequestError::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed mid-line",
        )));
    }
    buf.pop();
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    if buf.len() > limit {
        return Err(too_long);
    }
    Ok(Some(n))
}

/// Reads the request line and header fields.
pub fn read_head<R: BufRead>(r: &mut R, limits: &Limits) -> Result<Head, ReadRequestError> {
    let mut line = Vec::with_capacity(256);

    // RFC 9112 section 2.2: ignore at least one empty line before the request line.
    let mut consumed = 0usize;
    let mut saw_any = false;
    loop {
        match read_line(
            r,
            &mut line,
            limits.max_request_line,
            ReadRequestError::UriTooLong,
        )? {
            None if saw_any => {
                return Err(ReadRequestError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed before request line",
                )))
            }
            None => return Err(ReadRequestError::Closed),
            Some(n) => {
                saw_any = true;
                consumed += n;
                if !line.is_empty() {
                    break;
                }
                if consumed > 8 {
                    return Err(ReadRequestError::BadRequest("empty request line"));
                }
            }
        }
    }
    let (method, target, version) = parse_request_line(&line)?;

    let mut headers = Vec::new();
    loop {
        let remaining = limits.max_head.saturating_sub(consumed);
        let n = match read_line(r, &mut line, remaining, ReadRequestError::HeadTooLarge)? {
            Some(n) => n,
            None => {
                return Err(ReadRequestError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed in request head",
                )))
            }
        };
        consumed += n;
        if consumed > limits.max_head {
            return Err(ReadRequestError::HeadTooLarge);
        }
        if line.is_empty() {
            break;
        }
        if headers.len() >= limits.max_headers {
            return Err(ReadRequestError::HeadTooLarge);
        }
        headers.push(parse_header_line(&line)?);
    }

    Ok(Head {
        method,
        target,
        version,
        headers,
    })
}

fn parse_request_line(line: &[u8]) -> Result<(String, String, Version), ReadRequestError> {
    let bad = ReadRequestError::BadRequest;
    let line = std::str::from_utf8(line).map_err(|_| bad("request line is not UTF-8"))?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("request line must be 'METHOD TARGET VERSION'"));
    };
    if method.is_empty() || !method.bytes().all(is_tchar) {
        return Err(bad("invalid method"));
    }
    if !target.starts_with('/') {
        return Err(bad("request target must be in origin form"));
    }
    if target
        .bytes()
        .any(|b| b <= b' ' || b == 0x7f || !b.is_ascii())
    {
        return Err(bad("invalid character in request target"));
    }
    let version = match version {
        "HTTP/1.1" => Version::Http11,
        "HTTP/1.0" => Version::Http10,
        v => {
            let digits = v.strip_prefix("HTTP/").map(str::as_bytes);
            return match digits {
                Some([major, b'.', minor]) if major.is_ascii_digit() && minor.is_ascii_digit() => {
                    Err(ReadRequestError::VersionNotSupported)
                }
                Some([major]) if major.is_ascii_digit() => {
                    Err(ReadRequestError::VersionNotSupported)
                }
                _ => Err(bad("invalid HTTP version")),
            };
        }
    };
    Ok((method.to_string(), target.to_string(), version))
}

fn parse_header_line(line: &[u8]) -> Result<(String, String), ReadRequestError> {
    let bad = ReadRequestError::BadRequest;
    if matches!(line.first(), Some(b' ' | b'\t')) {
        return Err(bad("obsolete header line folding"));
    }
    let colon = line
        .iter()
        .position(|&b| b == b':')
        .ok_or(bad("header line without ':'"))?;
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
        return Err(bad("invalid header name"));
    }
    if value.iter().any(|&b| (b < b' ' && b != b'\t') || b == 0x7f) {
        return Err(bad("control character in header value"));
    }
    // Names are tchars (ASCII), so this cannot fail; values may carry obs-text.
    let name = String::from_utf8_lossy(name).into_owned();
    let value = String::from_utf8_lossy(value)
        .trim_matches([' ', '\t'])
        .to_string();
    Ok((name, value))
}

/// Reads a body framed as `framing`, refusing more than `max_body` bytes.
pub fn read_body<R: BufRead>(
    r: &mut R,
    framing: BodyFraming,
    max_body: usize,
) -> Result<Vec<u8>, ReadRequestError> {
    match framing {
        BodyFraming::None => Ok(Vec::new()),
        BodyFraming::Length(n) => {
            if n > max_body {
                return Err(ReadRequestError::BodyTooLarge { limit: max_body });
            }
            read_exact_vec(r, n)
        }
        BodyFraming::Chunked => read_chunked(r, max_body),
    }
}

/// Reads exactly `n` bytes, growing the buffer as data arrives rather than trusting
/// the announced length for one large allocation.
fn read_exact_vec<R: Read>(r: &mut R, n: usize) -> Result<Vec<u8>, ReadRequestError> {
    let mut body = Vec::with_capacity(n.min(64 * 1024));
    let got = r.by_ref().take(n as u64).read_to_end(&mut body)?;
    if got != n {
        return Err(ReadRequestError::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("body ended after {got} of {n} bytes"),
        )));
    }
    Ok(body)
}

fn read_chunked<R: BufRead>(r: &mut R, max_body: usize) -> Result<Vec<u8>, ReadRequestError> {
    const MAX_CHUNK_LINE: usize = 1024;
    let bad = ReadRequestError::BadRequest;
    let eof = || {
        ReadRequestError::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed in chunked body",
        ))
    };
    let mut body = Vec::new();
    let mut line = Vec::new();
    loop {
        read_line(
            r,
            &mut line,
            MAX_CHUNK_LINE,
            bad("chunk size line too long"),
        )?
        .ok_or_else(eof)?;
        let size_field = line.split(|&b| b == b';').next().unwrap_or_default();
        let size_str = std::str::from_utf8(size_field)
            .map_err(|_| bad("invalid chunk size"))?
            .trim_matches([' ', '\t']);
        if size_str.is_empty() || !size_str.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad("invalid chunk size"));
        }
        let size = u64::from_str_radix(size_str, 16).map_err(|_| bad("chunk size overflow"))?;
        if size == 0 {
            break;
        }
        let remaining = (max_body - body.len()) as u64;
        if size > remaining {
            return Err(ReadRequestError::BodyTooLarge { limit: max_body });
        }
        // size <= remaining <= max_body, so it fits in usize.
        let size = size as usize;
        let got = r.by_ref().take(size as u64).read_to_end(&mut body)?;
        if got != size {
            return Err(eof());
        }
        read_line(r, &mut line, 0, bad("missing CRLF after chunk data"))?.ok_or_else(eof)?;
    }
    // Trailer fields: read and discard, bounded.
    let mut trailer_bytes = 0usize;
    loop {
        let n = read_line(r, &mut line, MAX_CHUNK_LINE, bad("trailer line too long"))?
            .ok_or_else(eof)?;
        if line.is_empty() {
            break;
        }
        trailer_bytes += n;
        if trailer_bytes > 8 * MAX_CHUNK_LINE {
            return Err(bad("trailer section too large"));
        }
    }
    Ok(body)
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
    fn accepts_bare_lf_and_leading_empty_line() {
        let req = parse(b"\r\nGET / HTTP/1.0\nA:  b \n\n").unwrap();
        assert_eq!(req.head.headers, vec![("A".to_string(), "b".to_string())]);
        assert!(!req.head.wants_keep_alive());
    }

    #[test]
    fn reads_content_length_body_and_leaves_the_rest() {
        let raw = b"PUT /kv/k HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\n\r\n";
        let mut r = io::BufReader::new(&raw[..]);
        let req = read_request(&mut r, &Limits::default()).unwrap();
        assert_eq!(req.body, b"hello");
        let next = read_request(&mut r, &Limits::default()).unwrap();
        assert_eq!(next.path(), "/");
        assert!(matches!(
            read_request(&mut r, &Limits::default()),
            Err(ReadRequestError::Closed)
        ));
    }

    #[test]
    fn bad_request_lines_give_400() {
        for raw in [
            &b"GARBAGE\r\n\r\n"[..],
            b"GET /\r\n\r\n",
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1 extra\r\n\r\n",
            b"GET http://x/ HTTP/1.1\r\n\r\n",
            b"GET * HTTP/1.1\r\n\r\n",
            b"G(T / HTTP/1.1\r\n\r\n",
            b"GET / HTTX/1.1\r\n\r\n",
            b"GET /\x01 HTTP/1.1\r\n\r\n",
            b"GET /\xff HTTP/1.1\r\n\r\n",
            b"\r\n\r\n\r\n\r\n\r\n\r\n",
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
        ] {
            assert_eq!(
                status_of(raw),
                Some(400),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
        let truncated = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab";
        assert!(matches!(parse(truncated), Err(ReadRequestError::Io(_))));
    }

    #[test]
    fn truncated_inputs_are_io_errors_not_panics() {
        assert!(matches!(parse(b""), Err(ReadRequestError::Closed)));
        for raw in [
            &b"GET / HTTP/1.1"[..],
            b"GET / HTTP/1.1\r\nHost: x",
            b"GET / HTTP/1.1\r\nHost: x\r\n",
            b"PUT / HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort",
        ] {
            assert!(
                matches!(parse(raw), Err(ReadRequestError::Io(_))),
                "{raw:?}"
            );
        }
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

    #[test]
    fn arbitrary_bytes_never_panic() {
        // Cheap deterministic fuzzing over mutations of a valid request.
        let base = b"PUT /kv/x?a=1 HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n";
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let limits = Limits {
            max_body: 16,
            ..Limits::default()
        };
        for _ in 0..5000 {
            let mut raw = base.to_vec();
            for _ in 0..(next() % 4 + 1) {
                let i = (next() as usize) % raw.len();
                match next() % 3 {
                    0 => raw[i] = next() as u8,
                    1 => {
                        raw.remove(i);
                    }
                    _ => raw.truncate(i),
                }
                if raw.is_empty() {
                    break;
                }
            }
            let _ = parse_with(&raw, &limits);
        }
    }
}
