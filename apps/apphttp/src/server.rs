//! Thread-per-connection HTTP/1.1 server over `std::net`.
//!
//! Each accepted connection gets its own thread, up to
//! [`ServerConfig::max_connections`]; beyond that new connections get a 503 and are
//! closed. Connections are kept alive when the client asks for it. After a request
//! that could not be read (bad syntax, body too large), the server answers with the
//! matching status and closes the connection, draining unread input for a short
//! while first so the client sees the answer instead of a reset.
//!
//! `HEAD` requests reach the handler as `GET`; the server drops the body.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::request::{read_body, read_head, Limits, ReadRequestError, Request};
use crate::response::Response;

/// Handles one request. Implemented for `Fn(&Request) -> Response` closures.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, req: &Request) -> Response;
}

impl<F> Handler for F
where
    F: Fn(&Request) -> Response + Send + Sync + 'static,
{
    fn handle(&self, req: &Request) -> Response {
        self(req)
    }
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub limits: Limits,
    /// Connections served at once; more get a 503.
    pub max_connections: usize,
    /// How long a read or write may block (also the keep-alive idle timeout).
    pub io_timeout: Duration,
    /// Print one line per request to stderr.
    pub access_log: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            limits: Limits::default(),
            max_connections: 256,
            io_timeout: Duration::from_secs(30),
            access_log: false,
        }
    }
}

/// Accepts connections on `listener` forever, one thread per connection.
pub fn serve<H: Handler>(listener: TcpListener, handler: Arc<H>, config: ServerConfig) -> ! {
    let config = Arc::new(config);
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("apphttp: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::AcqRel) >= config.max_connections {
            active.fetch_sub(1, Ordering::AcqRel);
            reject_overloaded(stream);
            continue;
        }
        let guard = ActiveGuard(Arc::clone(&active));
        let handler = Arc::clone(&handler);
        let config = Arc::clone(&config);
        let spawned = std::thread::Builder::new()
            .name("apphttp-conn".into())
            .spawn(move || {
                let _guard = guard;
                serve_connection(stream, &*handler, &config);
            });
        if let Err(e) = spawned {
            eprintln!("apphttp: cannot spawn connection thread: {e}");
        }
    }
}

struct ActiveGuard(Arc<AtomicUsize>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn reject_overloaded(mut stream: TcpStream) {
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = Response::error(503, "Too many connections").write_to(&mut stream, false, false);
}

/// Serves requests on one TCP connection until it is closed.
pub fn serve_connection<H: Handler + ?Sized>(
    stream: TcpStream,
    handler: &H,
    config: &ServerConfig,
) {
    let _ = stream.set_read_timeout(Some(config.io_timeout));
    let _ = stream.set_write_timeout(Some(config.io_timeout));
    let _ = stream.set_nodelay(true);
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    let write_half = match stream.try_clone() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("apphttp: {peer}: cannot clone socket: {e}");
            return;
        }
    };
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    let mut writer = io::BufWriter::with_capacity(64 * 1024, write_half);
    let end = run_connection(&mut reader, &mut writer, handler, config, &peer);
    let _ = writer.flush();
    if end == ConnectionEnd::UnreadInput {
        if let Ok(stream) = writer.into_inner() {
            linger_close(stream, reader);
        }
    }
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionEnd {
    /// Clean end: the peer closed, or a response said `Connection: close`.
    Done,
    /// The socket failed.
    Broken,
    /// An error response was sent while request bytes may still be unread.
    UnreadInput,
}

/// Reads requests from `r` and writes responses to `w` until the connection should
/// close. Transport-independent, so it can be driven from memory in tests.
pub fn run_connection<R: BufRead, W: Write, H: Handler + ?Sized>(
    r: &mut R,
    w: &mut W,
    handler: &H,
    config: &ServerConfig,
    peer: &str,
) -> ConnectionEnd {
    loop {
        let head = match read_head(r, &config.limits) {
            Ok(head) => head,
            Err(e) => return answer_read_error(w, e, peer),
        };
        let framing = match head.body_framing(&config.limits) {
            Ok(f) => f,
            Err(e) => return answer_read_error(w, e, peer),
        };
        if head.expects_continue() && framing != crate::BodyFraming::None {
            let sent = w
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .and_then(|()| w.flush());
            if sent.is_err() {
                return ConnectionEnd::Broken;
            }
        }
        let body = match read_body(r, framing, config.limits.max_body) {
            Ok(b) => b,
            Err(e) => return answer_read_error(w, e, peer),
        };
        let keep_alive = head.wants_keep_alive();
        let head_only = head.method == "HEAD";
        let mut req = Request { head, body };
        if head_only {
            req.head.method = "GET".to_string();
        }
        let started = Instant::now();
        let resp = handler.handle(&req);
        if config.access_log {
            eprintln!(
                "apphttp: {peer} \"{} {}\" {} {}B {:.1}ms",
                if head_only { "HEAD" } else { req.method() },
                req.head.target,
                resp.status,
                resp.body.as_slice().len(),
                started.elapsed().as_secs_f64() * 1e3
            );
        }
        if resp.write_to(w, head_only, keep_alive).is_err() {
            return ConnectionEnd::Broken;
        }
        if !keep_alive {
            return ConnectionEnd::Done;
        }
    }
}

fn answer_read_error<W: Write>(w: &mut W, e: ReadRequestError, peer: &str) -> ConnectionEnd {
    let Some(status) = e.status() else {
        return match e {
            ReadRequestError::Closed => ConnectionEnd::Done,
            _ => ConnectionEnd::Broken,
        };
    };
    eprintln!("apphttp: {peer}: {e} (answered {status})");
    if Response::error(status, &e.to_string())
        .write_to(w, false, false)
        .is_err()
    {
        return ConnectionEnd::Broken;
    }
    ConnectionEnd::UnreadInput
}

/// Half-closes the socket and discards input for a bounded time, so that a client
/// still sending a rejected body receives the error response rather than a reset.
fn linger_close<R: Read>(stream: TcpStream, mut reader: R) {
    const MAX_LINGER: Duration = Duration::from_secs(2);
    const MAX_DRAIN: usize = 64 * 1024 * 1024;
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(250)));
    let started = Instant::now();
    let mut drained = 0usize;
    let mut buf = [0u8; 16 * 1024];
    while started.elapsed() < MAX_LINGER && drained < MAX_DRAIN {
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::response::Body;

    fn echo(req: &Request) -> Response {
        Response::bytes(200, Body::Bytes(req.body.clone()))
            .header("X-Method", req.method())
            .header("X-Path", req.path())
    }

    fn run(input: &[u8], limits: Limits) -> (String, ConnectionEnd) {
        let config = ServerConfig {
            limits,
            ..ServerConfig::default()
        };
        let mut r = BufReader::new(input);
        let mut out = Vec::new();
        let end = run_connection(&mut r, &mut out, &echo, &config, "test");
        (String::from_utf8_lossy(&out).into_owned(), end)
    }

    #[test]
    fn serves_pipelined_keep_alive_requests() {
        let (out, end) = run(
            b"PUT /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /b HTTP/1.1\r\n\r\n",
            Limits::default(),
        );
        assert_eq!(end, ConnectionEnd::Done);
        assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 2, "{out}");
        assert!(out.contains("X-Path: /a\r\n"));
        assert!(out.contains("\r\n\r\nabcHTTP/1.1 200 OK"));
        assert!(out.contains("X-Path: /b\r\n"));
    }

    #[test]
    fn connection_close_stops_after_one_response() {
        let (out, end) = run(
            b"GET /a HTTP/1.1\r\nConnection: close\r\n\r\nGET /b HTTP/1.1\r\n\r\n",
            Limits::default(),
        );
        assert_eq!(end, ConnectionEnd::Done);
        assert_eq!(out.matches("HTTP/1.1 200").count(), 1);
        assert!(out.contains("Connection: close"));
    }

    #[test]
    fn head_gets_headers_only() {
        let (out, _) = run(
            b"HEAD /x HTTP/1.1\r\nConnection: close\r\n\r\n",
            Limits::default(),
        );
        assert!(out.contains("X-Method: GET"));
        assert!(out.ends_with("Connection: close\r\n\r\n"), "{out}");
    }

    #[test]
    fn errors_get_status_and_close() {
        let (out, end) = run(b"BAD\r\n\r\n", Limits::default());
        assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{out}");
        assert!(out.contains("Connection: close"));
        assert_eq!(end, ConnectionEnd::UnreadInput);

        let small = Limits {
            max_body: 2,
            ..Limits::default()
        };
        let (out, _) = run(b"PUT /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", small);
        assert!(out.starts_with("HTTP/1.1 413 "), "{out}");

        let (out, _) = run(b"PUT /a HTTP/1.1\r\n\r\nabc", Limits::default());
        assert!(out.starts_with("HTTP/1.1 411 "), "{out}");
    }

    #[test]
    fn expect_continue_gets_interim_response() {
        let (out, _) = run(
            b"PUT /a HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\nConnection: close\r\n\r\nz",
            Limits::default(),
        );
        assert!(
            out.starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"),
            "{out}"
        );
    }

    #[test]
    fn serves_over_tcp_and_rejects_over_capacity() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let config = ServerConfig {
            max_connections: 1,
            ..ServerConfig::default()
        };
        std::thread::spawn(move || serve(listener, Arc::new(echo), config));

        // The first connection stays open (keep-alive) and occupies the only slot.
        let mut first = TcpStream::connect(addr).unwrap();
        first
            .write_all(b"PUT /t HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi")
            .unwrap();
        let mut buf = [0u8; 512];
        let n = first.read(&mut buf).unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(
            text.starts_with("HTTP/1.1 200 OK") && text.ends_with("hi"),
            "{text}"
        );

        let mut second = TcpStream::connect(addr).unwrap();
        let mut out = String::new();
        second.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 503 "), "{out}");
    }
}
