//! A small blocking HTTP/1.1 client for tests: one request per connection
//! (`Connection: close`), the response head parsed by `httparse`. Bodies framed by
//! `Content-Length`, `Transfer-Encoding: chunked` or the end of the connection.
//! Not a general-purpose client: no redirects, no TLS, no connection reuse.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use httparse::Status;

/// Most header fields and largest head accepted in a response.
const MAX_HEADERS: usize = 64;
const MAX_HEAD: usize = 64 * 1024;

/// A response as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientResponse {
    pub status: u16,
    /// Header fields in order, names as sent.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl ClientResponse {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn eof(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, msg.to_string())
}

/// Sends one request with `Connection: close` and reads the whole response.
/// `timeout` bounds the connect and every read and write. A `Content-Length` header
/// is sent whenever `body` is `Some`.
pub fn request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> io::Result<ClientResponse> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(body) = body {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    if let Some(body) = body {
        stream.write_all(body)?;
    }
    stream.flush()?;
    read_response(&mut BufReader::new(stream), method == "HEAD")
}

/// Reads one response, skipping interim 1xx responses. With `head_only` (the answer
/// to a `HEAD`), no body is read whatever the headers say.
pub fn read_response<R: BufRead>(r: &mut R, head_only: bool) -> io::Result<ClientResponse> {
    loop {
        let (status, headers) = read_head(r)?;
        if (100..200).contains(&status) {
            continue;
        }
        let mut resp = ClientResponse {
            status,
            headers,
            body: Vec::new(),
        };
        let chunked = resp
            .header("transfer-encoding")
            .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
        if head_only || status == 204 || status == 304 {
            return Ok(resp);
        }
        if chunked {
            read_chunked(r, &mut resp.body)?;
        } else if let Some(len) = resp.header("content-length") {
            let len: u64 = len
                .parse()
                .map_err(|_| invalid(format!("Bad Content-Length {len:?}")))?;
            r.take(len).read_to_end(&mut resp.body)?;
            if resp.body.len() as u64 != len {
                return Err(eof("Response body truncated"));
            }
        } else {
            r.read_to_end(&mut resp.body)?;
        }
        return Ok(resp);
    }
}

/// Reads a status line and header fields, consuming nothing past them.
fn read_head<R: BufRead>(r: &mut R) -> io::Result<(u16, Vec<(String, String)>)> {
    let mut buf = Vec::new();
    loop {
        let available = r.fill_buf()?;
        if available.is_empty() {
            return Err(eof(if buf.is_empty() {
                "Connection closed before the response"
            } else {
                "Connection closed in the response head"
            }));
        }
        let (old, taken) = (buf.len(), available.len());
        buf.extend_from_slice(available);
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut fields);
        match resp
            .parse(&buf)
            .map_err(|e| invalid(format!("Bad response head: {e}")))?
        {
            Status::Complete(n) => {
                let rest = n
                    .checked_sub(old)
                    .ok_or_else(|| invalid("Bad response head"))?;
                let status = resp.code.ok_or_else(|| invalid("No status code"))?;
                let headers = resp
                    .headers
                    .iter()
                    .map(|h| {
                        let value = String::from_utf8_lossy(h.value).trim().to_string();
                        (h.name.to_string(), value)
                    })
                    .collect();
                r.consume(rest);
                return Ok((status, headers));
            }
            Status::Partial if buf.len() > MAX_HEAD => {
                return Err(invalid("Response head too large"))
            }
            Status::Partial => r.consume(taken),
        }
    }
}

/// Reads a line of at most `max` bytes, with its terminator.
fn read_line<R: BufRead>(r: &mut R, line: &mut Vec<u8>, max: u64) -> io::Result<()> {
    line.clear();
    r.take(max).read_until(b'\n', line)?;
    match line.last() {
        Some(b'\n') => Ok(()),
        _ if line.len() as u64 >= max => Err(invalid("Line too long in chunked body")),
        _ => Err(eof("Connection closed in chunked body")),
    }
}

fn read_chunked<R: BufRead>(r: &mut R, body: &mut Vec<u8>) -> io::Result<()> {
    let mut line = Vec::new();
    loop {
        read_line(r, &mut line, 4096)?;
        let size = match httparse::parse_chunk_size(&line) {
            Ok(Status::Complete((_, size))) => size,
            _ => return Err(invalid("Bad chunk size")),
        };
        if size == 0 {
            break;
        }
        let before = body.len() as u64;
        r.take(size).read_to_end(body)?;
        if body.len() as u64 - before != size {
            return Err(eof("Connection closed in chunked body"));
        }
        read_line(r, &mut line, 2)?;
    }
    // Trailer fields, discarded.
    loop {
        read_line(r, &mut line, 8192)?;
        if line == b"\r\n" || line == b"\n" {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::thread::JoinHandle;

    /// A one-connection server: reads the request head (and a body of
    /// `Content-Length` bytes), hands the raw request to the test through the join
    /// handle and answers `response`.
    fn serve_once(response: &'static [u8]) -> (SocketAddr, JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut r = BufReader::new(stream.try_clone().unwrap());
            let mut raw = Vec::new();
            let mut length = 0;
            loop {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                raw.extend_from_slice(line.as_bytes());
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; length];
            r.read_exact(&mut body).unwrap();
            raw.extend_from_slice(&body);
            (&stream).write_all(response).unwrap();
            raw
        });
        (addr, server)
    }

    const TIMEOUT: Duration = Duration::from_secs(5);

    #[test]
    fn sends_request_and_reads_length_framed_response() {
        let (addr, server) =
            serve_once(b"HTTP/1.1 201 Created\r\nX-A: b \r\nContent-Length: 2\r\n\r\nokEXTRA");
        let resp = request(addr, "PUT", "/kv/a%20b?x=1", Some(b"value"), TIMEOUT).unwrap();
        assert_eq!(resp.status, 201);
        assert_eq!(resp.header("x-a"), Some("b"));
        assert_eq!(resp.text(), "ok");
        let sent = String::from_utf8(server.join().unwrap()).unwrap();
        assert_eq!(
            sent,
            format!(
                "PUT /kv/a%20b?x=1 HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
                 Content-Length: 5\r\n\r\nvalue"
            )
        );
    }

    #[test]
    fn reads_chunked_and_close_delimited_bodies() {
        let (addr, _) = serve_once(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
              5;x=y\r\nhello\r\n7\r\n, world\r\n0\r\nT: 1\r\n\r\n",
        );
        let resp = request(addr, "GET", "/", None, TIMEOUT).unwrap();
        assert_eq!(resp.text(), "hello, world");

        let (addr, _) = serve_once(b"HTTP/1.0 200 OK\r\n\r\nuntil the end");
        assert_eq!(
            request(addr, "GET", "/", None, TIMEOUT).unwrap().text(),
            "until the end"
        );
    }

    #[test]
    fn head_and_no_content_have_no_body() {
        let (addr, _) = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n");
        let resp = request(addr, "HEAD", "/", None, TIMEOUT).unwrap();
        assert_eq!(resp.header("content-length"), Some("10"));
        assert!(resp.body.is_empty());

        let (addr, _) = serve_once(b"HTTP/1.1 204 No Content\r\n\r\n");
        assert_eq!(
            request(addr, "DELETE", "/", None, TIMEOUT).unwrap().status,
            204
        );
    }

    #[test]
    fn skips_interim_responses() {
        let raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 413 Content Too Large\r\n\
                    Content-Length: 2\r\n\r\nno";
        let resp = read_response(&mut &raw[..], false).unwrap();
        assert_eq!((resp.status, resp.text().as_str()), (413, "no"));
    }

    #[test]
    fn bad_responses_are_errors() {
        for raw in [
            &b""[..],
            b"SMTP ready\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\nab",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
            b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX: y",
        ] {
            assert!(
                read_response(&mut &raw[..], false).is_err(),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
        // A head that never ends is refused, not buffered forever.
        let endless = (&b"HTTP/1.1 200 OK\r\nX: "[..]).chain(io::repeat(b'y'));
        let err = read_response(&mut BufReader::new(endless), false).unwrap_err();
        assert_eq!(err.to_string(), "Response head too large");
    }

    #[test]
    fn reads_a_head_split_across_reads() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc";
        for capacity in 1..raw.len() {
            let mut r = BufReader::with_capacity(capacity, &raw[..]);
            assert_eq!(read_response(&mut r, false).unwrap().text(), "abc");
        }
    }

    #[test]
    fn times_out_on_a_silent_server() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let started = std::time::Instant::now();
        let err = request(addr, "GET", "/", None, Duration::from_millis(200)).unwrap_err();
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(3));
        drop(listener);
    }
}
