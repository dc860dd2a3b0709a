//! One kept-alive HTTP/1.1 connection, by hand: a request is written, the
//! answer's head and its `Content-Length` body read; the connection then
//! serves the next request. Enough for kvstore and cloudletd's `/v1/ping`
//! (both answer with a length), and exact about when a request starts
//! and ends.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

pub struct Conn {
    stream: BufReader<TcpStream>,
    /// The server said it closes the connection after its last answer.
    closed: bool,
}

impl Conn {
    pub async fn connect(addr: SocketAddr, within: Duration) -> std::io::Result<Conn> {
        let s = tokio::time::timeout(within, TcpStream::connect(addr))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect"))??;
        s.set_nodelay(true)?;
        Ok(Conn {
            stream: BufReader::new(s),
            closed: false,
        })
    }

    /// Whether the connection can take another request.
    pub fn is_open(&self) -> bool {
        !self.closed
    }

    /// One request; the answer's status. An error (the peer closed, no
    /// answer `within`) leaves the connection unusable.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
        within: Duration,
    ) -> std::io::Result<u16> {
        tokio::time::timeout(within, self.exchange(method, path, body))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))?
    }

    async fn exchange(&mut self, method: &str, path: &str, body: &[u8]) -> std::io::Result<u16> {
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        self.stream.get_mut().write_all(&req).await?;
        let bad =
            |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
        let mut line = String::new();
        if self.stream.read_line(&mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("status line"))?;
        let mut len = 0usize;
        let mut close = false;
        loop {
            line.clear();
            if self.stream.read_line(&mut line).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let Some((name, value)) = l.split_once(':') else {
                return Err(bad("header"));
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                len = value.parse().map_err(|_| bad("content-length"))?;
            } else if name.eq_ignore_ascii_case("connection") {
                close = value.eq_ignore_ascii_case("close");
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                return Err(bad("chunked answers are not read here"));
            }
        }
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body).await?;
        // The answer is whole; the next request needs a new connection.
        self.closed = close;
        Ok(status)
    }
}
