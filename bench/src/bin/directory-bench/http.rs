//! The bench's HTTP clients: one kept-alive connection each, GET and PUT.

use std::time::Duration;

use anyhow::bail;

/// A client that keeps one connection alive (each task has its own).
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(1)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(20))
        .build()
        .expect("http client")
}

pub async fn get(c: &reqwest::Client, url: &str) -> anyhow::Result<(u16, Vec<u8>)> {
    let r = c.get(url).send().await?;
    let status = r.status().as_u16();
    Ok((status, r.bytes().await?.to_vec()))
}

pub async fn put(c: &reqwest::Client, url: &str, auth: &str, body: &[u8]) -> anyhow::Result<u16> {
    let r = c
        .put(url)
        .header(reqwest::header::AUTHORIZATION, auth)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_vec())
        .send()
        .await?;
    let status = r.status().as_u16();
    let text = r.bytes().await?;
    if status != 200 {
        bail!("{status}: {}", String::from_utf8_lossy(&text));
    }
    Ok(status)
}
