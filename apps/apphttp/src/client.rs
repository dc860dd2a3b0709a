//! A minimal blocking HTTP/1.1 client (one request per connection), for tests and
//! probes of the example apps. Not a general-purpose client: no redirects, no TLS.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// A response as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientResponse {
    pub status: u16,
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

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// Sends one request with `Connection: close` and reads the whole response.
/// A `Content-Length` header is sent whenever `body` is `Some`.
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

/// Reads one response, skipping interim 1xx responses.
pub fn read_response<R: BufRead>(r: &mut R, head_only: bool) -> io::Result<ClientResponse> {
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before response",
            ));
        }
        let mut parts = line.trim_end().splitn(3, ' ');
        let version = parts.next().unwrap_or_default();
        if !version.starts_with("HTTP/1.") {
            return Err(invalid("bad status line"));
        }
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| invalid("bad status code"))?;
        let mut headers = Vec::new();
        loop {
            line.clear();
            if r.read_line(&mut line)? == 0 {
                return Err(invalid("connection closed in response head"));
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (n, v) = l.split_once(':').ok_or_else(|| invalid("bad header"))?;
            headers.push((n.trim().to_string(), v.trim().to_string()));
        }
        if (100..200).contains(&status) {
            continue;
        }
        let mut resp = ClientResponse {
            status,
            headers,
            body: Vec::new(),
        };
        if head_only || status == 204 || status == 304 {
            return Ok(resp);
        }
        match resp.header("content-length") {
            Some(len) => {
                let len: u64 = len.parse().map_err(|_| invalid("bad Content-Length"))?;
                r.take(len).read_to_end(&mut resp.body)?;
                if resp.body.len() as u64 != len {
                    return Err(invalid("response body truncated"));
                }
            }
            None => {
                r.read_to_end(&mut resp.body)?;
            }
        }
        return Ok(resp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_response_skipping_continue() {
        let raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\nX: y\r\n\r\nokEXTRA";
        let resp = read_response(&mut &raw[..], false).unwrap();
        assert_eq!(resp.status, 201);
        assert_eq!(resp.header("x"), Some("y"));
        assert_eq!(resp.body, b"ok");
    }

    #[test]
    fn rejects_garbage() {
        assert!(read_response(&mut &b"SMTP ready\r\n"[..], false).is_err());
        assert!(read_response(
            &mut &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab"[..],
            false
        )
        .is_err());
    }
}
