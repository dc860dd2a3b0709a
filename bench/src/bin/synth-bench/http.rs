//! The bench's own HTTP: bulk downloads (over the link, in the mode's
//! scheme) and polling an app until it answers.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A client that trusts the run's fleet CA (if any) for `https://`.
pub fn http_client() -> anyhow::Result<reqwest::Client> {
    Ok(cloudlet_trust::tls::client_builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(10))
        .build()?)
}

/// GET `url` to the end (into `out` if given): (bytes, time from request to last byte).
pub async fn download(url: &str, out: Option<&Path>) -> anyhow::Result<(u64, Duration)> {
    let http = http_client()?;
    let mut file = match out {
        Some(p) => Some(std::io::BufWriter::with_capacity(
            1 << 20,
            std::fs::File::create(p)?,
        )),
        None => None,
    };
    let start = Instant::now();
    let mut resp = http.get(url).send().await?.error_for_status()?;
    let mut n = 0u64;
    while let Some(chunk) = resp.chunk().await? {
        n += chunk.len() as u64;
        if let Some(f) = file.as_mut() {
            f.write_all(&chunk)?;
        }
    }
    if let Some(mut f) = file {
        f.flush()?;
    }
    Ok((n, start.elapsed()))
}

/// Poll `GET path` on `addr` until it answers 200: the time since `start`.
pub async fn first_ok(
    addr: SocketAddr,
    path: &str,
    start: Instant,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    loop {
        if let Ok(Ok(200)) =
            tokio::time::timeout(Duration::from_secs(5), get_status(addr, path)).await
        {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!("no 200 from {addr}{path} within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One `GET` with HTTP/1.0: the status code.
async fn get_status(addr: SocketAddr, path: &str) -> anyhow::Result<u16> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let line = String::from_utf8_lossy(&buf);
    let code = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("no HTTP status in the answer"))?;
    Ok(code)
}
