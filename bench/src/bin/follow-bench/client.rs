//! What runs on the device (in the hub): the app's client writing to
//! kvstore through the local forwarder, the read-back of what it wrote,
//! and the reference probe of every site's RTT.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cloudlet_api::PortMapping;
use tokio::sync::{oneshot, watch};

use crate::http::Conn;

/// One pace of the writer.
pub const WRITE_EVERY: Duration = Duration::from_millis(50);
/// Every this often, the reference probe of the sites' RTTs.
pub const PING_EVERY: Duration = Duration::from_secs(1);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// One acknowledged write, in seconds since the run's start.
#[derive(Debug, Clone, Copy)]
pub struct Write {
    pub key: u64,
    /// Sent first (a write that failed is sent again, same key).
    pub sent: f64,
    pub acked: f64,
    /// Attempts it took (1: no error).
    pub attempts: u32,
}

impl Write {
    /// What the app waited for this write, ms (its retries included).
    pub fn ms(&self) -> f64 {
        (self.acked - self.sent) * 1e3
    }
}

#[derive(Debug, Default)]
pub struct Written {
    pub writes: Vec<Write>,
    /// Attempts that got no acknowledgement (error, closed, timeout).
    pub failed_attempts: u64,
}

fn since(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64()
}

/// `PUT /kv/k{i}` every [`WRITE_EVERY`] on one kept-alive connection to
/// 127.0.0.1:`port` (the forwarder) until `until`; on an error or a
/// closed connection, connect again and send the same key again.
pub async fn write_loop(port: u16, t0: Instant, until: Instant) -> Written {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut out = Written::default();
    let mut conn: Option<Conn> = None;
    let mut next = Instant::now();
    let mut key = 0u64;
    while Instant::now() < until {
        tokio::time::sleep_until(next.into()).await;
        next = (next + WRITE_EVERY).max(Instant::now());
        let sent = since(t0);
        let mut attempts = 0;
        loop {
            if Instant::now() >= until + REQUEST_TIMEOUT * 2 {
                return out;
            }
            let ok = match conn.as_mut() {
                Some(c) => {
                    attempts += 1;
                    c.request(
                        "PUT",
                        &format!("/kv/k{key}"),
                        format!("v{key}").as_bytes(),
                        REQUEST_TIMEOUT,
                    )
                    .await
                    .is_ok_and(|s| s == 201 || s == 204)
                }
                None => false,
            };
            if ok {
                out.writes.push(Write {
                    key,
                    sent,
                    acked: since(t0),
                    attempts,
                });
                key += 1;
                if !conn.as_ref().is_some_and(Conn::is_open) {
                    conn = None;
                }
                break;
            }
            if conn.is_some() {
                out.failed_attempts += 1;
            }
            // Connect again (the forwarder closed it at a move, or the
            // request failed), after a short pause so that a connection
            // the forwarder cannot join to the VM does not spin.
            if conn.is_some() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            conn = Conn::connect(addr, REQUEST_TIMEOUT).await.ok();
            if conn.is_none() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    out
}

/// Read back every key in `keys` through 127.0.0.1:`port`, on
/// [`READERS`] connections at once: the keys the VM does not give back
/// (status not 200) with the last status seen. A read with no answer is
/// asked again (up to 3 times) before it counts.
pub async fn read_back(port: u16, keys: Vec<u64>) -> Vec<(u64, Option<u16>)> {
    let mut tasks = tokio::task::JoinSet::new();
    let per = keys.len().div_ceil(READERS).max(1);
    for chunk in keys.chunks(per) {
        tasks.spawn(read_keys(port, chunk.to_vec()));
    }
    let mut missing = Vec::new();
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(m) => missing.extend(m),
            Err(e) => eprintln!("a reader failed: {e}"),
        }
    }
    missing.sort();
    missing
}

/// Connections the read-back uses at once.
const READERS: usize = 4;

async fn read_keys(port: u16, keys: Vec<u64>) -> Vec<(u64, Option<u16>)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut conn: Option<Conn> = None;
    let mut missing = Vec::new();
    for k in keys {
        let mut status = None;
        for _ in 0..3 {
            if conn.is_none() {
                conn = Conn::connect(addr, Duration::from_secs(5)).await.ok();
            }
            let Some(c) = conn.as_mut() else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            match c
                .request("GET", &format!("/kv/k{k}"), b"", Duration::from_secs(5))
                .await
            {
                Ok(s) => {
                    status = Some(s);
                    if !c.is_open() {
                        conn = None;
                    }
                    break;
                }
                Err(_) => conn = None,
            }
        }
        if status != Some(200) {
            missing.push((k, status));
        }
    }
    missing
}

/// Until kvstore answers `GET /health` through the forwarder (the VM is
/// up), at most `within`.
pub async fn wait_app(port: u16, within: Duration) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let start = Instant::now();
    while start.elapsed() < within {
        if let Ok(mut c) = Conn::connect(addr, Duration::from_secs(2)).await {
            if c.request("GET", "/health", b"", Duration::from_secs(2))
                .await
                .is_ok_and(|s| s == 200)
            {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// One round of the reference probe: seconds since the start, and each
/// site's RTT in ms (none: no answer this round).
#[derive(Debug, Clone)]
pub struct Ping {
    pub t: f64,
    pub ms: Vec<Option<f64>>,
}

/// Every [`PING_EVERY`], `GET /v1/ping` to each of `apis` at once, each on
/// its own kept-alive connection (opened by an untimed request), until
/// `until`.
pub async fn ping_loop(apis: Vec<SocketAddr>, t0: Instant, until: Instant) -> Vec<Ping> {
    let mut conns: Vec<Option<Conn>> = apis.iter().map(|_| None).collect();
    let mut out = Vec::new();
    let mut next = Instant::now();
    while Instant::now() < until {
        tokio::time::sleep_until(next.into()).await;
        next += PING_EVERY;
        let t = since(t0);
        let mut tasks = tokio::task::JoinSet::new();
        for (i, (addr, conn)) in apis.iter().zip(conns.iter_mut()).enumerate() {
            let (addr, mut conn) = (*addr, conn.take());
            tasks.spawn(async move {
                let timeout = Duration::from_secs(1);
                if conn.is_none() {
                    conn = Conn::connect(addr, timeout).await.ok();
                    if let Some(c) = conn.as_mut() {
                        if c.request("GET", "/v1/ping", b"", timeout).await.is_err() {
                            conn = None;
                        }
                    }
                }
                let mut ms = None;
                if let Some(c) = conn.as_mut() {
                    let start = Instant::now();
                    match c.request("GET", "/v1/ping", b"", timeout).await {
                        Ok(_) => ms = Some(start.elapsed().as_secs_f64() * 1e3),
                        Err(_) => conn = None,
                    }
                }
                (i, conn.filter(Conn::is_open), ms)
            });
        }
        let mut round = vec![None; apis.len()];
        while let Some(Ok((i, conn, ms))) = tasks.join_next().await {
            conns[i] = conn;
            round[i] = ms;
        }
        out.push(Ping { t, ms: round });
    }
    out
}

/// The local forwarder (`cloudlet_client::forward`) on 127.0.0.1 of the
/// caller's namespace, to guest port `guest` in `ports`: its port (sent
/// on `bound`), serving until `stop`.
pub async fn forward_until(
    guest: u16,
    ports: watch::Receiver<Vec<PortMapping>>,
    bound: oneshot::Sender<u16>,
    stop: oneshot::Receiver<()>,
) {
    let Ok(listener) = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await else {
        return;
    };
    let Ok(addr) = listener.local_addr() else {
        return;
    };
    let _ = bound.send(addr.port());
    tokio::select! {
        r = cloudlet_client::forward::forward(listener, guest, ports) => {
            if let Err(e) = r {
                eprintln!("the forwarder stopped: {e}");
            }
        }
        _ = stop => {}
    }
}
