//! HTTP responses and their serialization.

use std::io::{self, Write};
use std::sync::Arc;

use serde::Serialize;

/// A response body, owned or shared with a store (so a large value can be sent
/// without copying it out of the store under a lock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Bytes(Vec<u8>),
    Shared(Arc<Vec<u8>>),
}

impl Body {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Body::Bytes(b) => b,
            Body::Shared(b) => b,
        }
    }
}

/// An HTTP response. `Content-Length` and `Connection` are added when it is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Body,
}

impl Response {
    /// A response with no body and no headers.
    pub fn empty(status: u16) -> Self {
        Response {
            status,
            headers: Vec::new(),
            body: Body::Bytes(Vec::new()),
        }
    }

    /// A response with `body` of type `content_type`.
    pub fn with_body(status: u16, content_type: &str, body: Body) -> Self {
        Response::empty(status)
            .header("Content-Type", content_type)
            .body(body)
    }

    /// `text/plain; charset=utf-8`.
    pub fn text(status: u16, text: impl Into<String>) -> Self {
        Response::with_body(
            status,
            "text/plain; charset=utf-8",
            Body::Bytes(text.into().into_bytes()),
        )
    }

    /// `application/json`: `value` serialized by serde_json (a 500 in the unlikely
    /// case that it cannot be, e.g. a map with non-string keys).
    pub fn json<T: Serialize + ?Sized>(status: u16, value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(json) => Response::with_body(status, "application/json", Body::Bytes(json)),
            Err(e) => Response::error(500, &format!("Cannot serialize the response: {e}")),
        }
    }

    /// `application/octet-stream`.
    pub fn bytes(status: u16, body: Body) -> Self {
        Response::with_body(status, "application/octet-stream", body)
    }

    /// A JSON error document `{"error": message}`; every error response uses this shape.
    pub fn error(status: u16, message: &str) -> Self {
        let json = serde_json::json!({ "error": message }).to_string();
        Response::with_body(status, "application/json", Body::Bytes(json.into_bytes()))
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Replaces the body.
    pub fn body(mut self, body: Body) -> Self {
        self.body = body;
        self
    }

    /// Writes status line, headers and (unless `head_only`) the body.
    pub fn write_to<W: Write>(
        &self,
        w: &mut W,
        head_only: bool,
        keep_alive: bool,
    ) -> io::Result<()> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\n",
            self.status,
            reason_phrase(self.status)
        );
        for (name, value) in &self.headers {
            head.push_str(name);
            head.push_str(": ");
            head.push_str(value);
            head.push_str("\r\n");
        }
        // RFC 9110 section 8.6: no Content-Length in 1xx and 204 responses.
        let bodyless = self.status < 200 || self.status == 204 || self.status == 304;
        if !bodyless {
            head.push_str(&format!(
                "Content-Length: {}\r\n",
                self.body.as_slice().len()
            ));
        }
        head.push_str(if keep_alive {
            "Connection: keep-alive\r\n\r\n"
        } else {
            "Connection: close\r\n\r\n"
        });
        w.write_all(head.as_bytes())?;
        if !head_only && !bodyless {
            w.write_all(self.body.as_slice())?;
        }
        w.flush()
    }
}

/// Standard reason phrase for `status` (empty for unknown codes, which is allowed).
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        304 => "Not Modified",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(r: &Response, head_only: bool, keep_alive: bool) -> String {
        let mut out = Vec::new();
        r.write_to(&mut out, head_only, keep_alive).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn writes_status_headers_and_body() {
        let r = Response::text(200, "ok");
        assert_eq!(
            written(&r, false, false),
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: 2\r\nConnection: close\r\n\r\nok"
        );
        assert!(written(&r, true, true)
            .ends_with("Content-Length: 2\r\nConnection: keep-alive\r\n\r\n"));
    }

    #[test]
    fn no_content_has_no_length_or_body() {
        let r = Response::empty(204).body(Body::Bytes(b"ignored".to_vec()));
        assert_eq!(
            written(&r, false, false),
            "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn error_is_json() {
        let r = Response::error(404, "No \"such\" key\n");
        assert_eq!(r.body.as_slice(), br#"{"error":"No \"such\" key\n"}"#);
        assert_eq!(r.headers[0].1, "application/json");
    }

    #[test]
    fn json_keeps_field_order() {
        #[derive(Serialize)]
        struct Doc<'a> {
            b: u32,
            a: Option<&'a str>,
            list: &'a [&'a str],
        }
        let r = Response::json(
            200,
            &Doc {
                b: 1,
                a: None,
                list: &["x"],
            },
        );
        assert_eq!(r.body.as_slice(), br#"{"b":1,"a":null,"list":["x"]}"#);
    }
}
