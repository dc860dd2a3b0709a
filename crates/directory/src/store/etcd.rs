//! The etcd store: a fleet of directory instances sharing one view.
//!
//! Keys (every key under the configured prefix `P`; values format
//! [`cloudlet_api::directory::REGISTRATION_FORMAT`]):
//! - `P/cloudlets/NAME` -> the registration, JSON, attached to an etcd
//!   lease of the directory's lease time: etcd deletes the key when the
//!   cloudlet stops heartbeating. An empty value is a deregistration's
//!   tombstone (written just before the key is deleted, so that every
//!   instance's watchers can tell a deregistration from an expiry);
//! - `P/credentials/NAME` -> BLAKE3 hex of the cloudlet's credential, bound
//!   by a transaction that writes it only if the key does not exist yet.
//!
//! A heartbeat renews the entry's lease (one keep-alive); a heartbeat that
//! changes the registration also writes the key (with the same lease); a
//! heartbeat for an entry whose lease is gone grants a new lease and
//! writes it again. The instance that handled the heartbeat updates its
//! index at once (with etcd's revision); the others, and this one again,
//! learn it from a watch of `P/cloudlets/`.
//!
//! The `etcd-client` crate does not reconnect or resume watches by itself,
//! so this store does both: every call is retried (with backoff, a new
//! connection after repeated failures) until [`RETRY_FOR`] has passed; the
//! watch keeps the last revision it applied and resumes after it on a new
//! stream; when etcd has compacted that revision away, the store re-reads
//! every key and replaces its index. Revisions in the index, and so in the
//! directory's watch API, are etcd's: a dashboard may resume on another
//! instance.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use cloudlet_api::directory::{Registration, WatchKind};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, PutOptions, Txn,
    TxnOp, TxnOpResponse, WatchOptions,
};

use super::{Bind, StoreError};
use crate::index::{Entry, Index, Upsert};

/// How long a call is retried before it fails.
pub const RETRY_FOR: Duration = Duration::from_secs(8);
/// Each request's own timeout (a dead member fails fast, the retry goes on).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

struct Shared {
    endpoints: Vec<String>,
    prefix: String,
    client: RwLock<Client>,
    index: Index,
    /// The watch is running (false while it reconnects).
    watching: AtomicBool,
}

pub struct Etcd {
    shared: Arc<Shared>,
    watcher: tokio::task::JoinHandle<()>,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

fn options() -> ConnectOptions {
    ConnectOptions::new()
        .with_timeout(REQUEST_TIMEOUT)
        .with_connect_timeout(Duration::from_secs(1))
        .with_keep_alive(Duration::from_secs(1), Duration::from_secs(2))
        .with_keep_alive_while_idle(true)
        .with_require_leader(true)
}

/// Worth retrying: the member is down, there is no leader yet, the
/// connection broke. Not: a bad request.
fn transient(e: &etcd_client::Error) -> bool {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Unknown
                | tonic::Code::Internal
                | tonic::Code::Aborted
                | tonic::Code::Cancelled
                | tonic::Code::ResourceExhausted
        ),
        E::TransportError(_) | E::IoError(_) | E::WatchError(_) | E::Internal(_) => true,
        _ => false,
    }
}

fn lease_gone(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("not found"),
        etcd_client::Error::GRpcStatus(s) => s.code() == tonic::Code::NotFound,
        _ => false,
    }
}

impl Shared {
    fn err(&self, detail: impl std::fmt::Display) -> StoreError {
        StoreError::Etcd {
            endpoints: self.endpoints.join(","),
            detail: detail.to_string(),
        }
    }

    fn key(&self, table: &str, name: &str) -> String {
        format!("{}/{table}/{name}", self.prefix)
    }

    fn client(&self) -> Client {
        self.client
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn reconnect(&self) {
        match Client::connect(&self.endpoints, Some(options())).await {
            Ok(c) => *self.client.write().unwrap_or_else(|p| p.into_inner()) = c,
            Err(e) => {
                tracing::warn!(endpoints = %self.endpoints.join(","), "cannot reconnect to etcd: {e}")
            }
        }
    }

    /// Run `call` until it succeeds, fails for good, or [`RETRY_FOR`] has
    /// passed; a new connection after every third failure.
    async fn retry<T, F, Fut>(&self, what: &str, mut call: F) -> Result<T, etcd_client::Error>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let start = tokio::time::Instant::now();
        let mut wait = Duration::from_millis(20);
        let mut failures = 0u32;
        loop {
            match call(self.client()).await {
                Ok(v) => return Ok(v),
                Err(e) if transient(&e) && start.elapsed() < RETRY_FOR => {
                    failures += 1;
                    tracing::debug!("etcd {what}: {e} (try {failures})");
                    if failures.is_multiple_of(3) {
                        self.reconnect().await;
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_millis(500));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// An entry from a key's value, or `None` for a tombstone.
fn decode(kv: &KeyValue) -> Result<Option<Entry>, StoreError> {
    if kv.value().is_empty() {
        return Ok(None);
    }
    let reg: Registration = serde_json::from_slice(kv.value()).map_err(|e| StoreError::Decode {
        name: String::from_utf8_lossy(kv.key()).into_owned(),
        detail: e.to_string(),
    })?;
    let mut e = Entry::new(reg, None);
    e.lease_id = kv.lease();
    e.mod_revision = kv.mod_revision() as u64;
    Ok(Some(e))
}

impl Etcd {
    /// Connect, read every entry, and start the watch.
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Self, StoreError> {
        let endpoints_joined = endpoints.join(",");
        let err = |e: &dyn std::fmt::Display| StoreError::Etcd {
            endpoints: endpoints_joined.clone(),
            detail: e.to_string(),
        };
        let client = Client::connect(endpoints, Some(options()))
            .await
            .map_err(|e| err(&e))?;
        let shared = Arc::new(Shared {
            endpoints: endpoints.to_vec(),
            prefix: prefix.trim_end_matches('/').to_string(),
            client: RwLock::new(client),
            index: Index::new(),
            watching: AtomicBool::new(false),
        });
        // The first read must succeed: a directory that cannot reach etcd
        // at start says so instead of serving an empty view.
        let revision = reread(&shared).await?;
        let watcher = tokio::spawn(watch(shared.clone(), revision));
        Ok(Etcd { shared, watcher })
    }

    pub fn index(&self) -> &Index {
        &self.shared.index
    }

    /// The watch of etcd is running.
    pub fn connected(&self) -> bool {
        self.shared.watching.load(Ordering::Relaxed)
    }

    pub async fn bind_credential(&self, name: &str, hash: &str) -> Result<Bind, StoreError> {
        let s = &self.shared;
        let key = s.key("credentials", name);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), hash, None)])
            .or_else([TxnOp::get(key.clone(), None)]);
        let resp = s
            .retry("bind", |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await
            .map_err(|e| s.err(e))?;
        if resp.succeeded() {
            return Ok(Bind::Bound);
        }
        let held = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.value().to_vec()),
            _ => None,
        });
        Ok(match held {
            Some(h) if h == hash.as_bytes() => Bind::Bound,
            _ => Bind::Taken,
        })
    }

    pub async fn heartbeat(
        &self,
        reg: Registration,
        lease: Duration,
    ) -> Result<Upsert, StoreError> {
        let s = &self.shared;
        let key = s.key("cloudlets", &reg.name);
        let prior = s.index.get(&reg.name);
        // Renew the lease the entry has, if it still has one.
        let mut lease_id = match &prior {
            Some(e) if e.lease_id != 0 => {
                let id = e.lease_id;
                let renewed = s
                    .retry("keep-alive", |mut c| async move {
                        c.lease_keep_alive(id).await.map(drop)
                    })
                    .await;
                match renewed {
                    Ok(()) => Some(id),
                    Err(e) if lease_gone(&e) => None,
                    Err(e) => return Err(s.err(e)),
                }
            }
            _ => None,
        };
        let outcome = match &prior {
            None => Upsert::Created,
            Some(e) if e.reg == reg && lease_id.is_some() => return Ok(Upsert::Renewed),
            Some(_) => Upsert::Changed,
        };
        if lease_id.is_none() {
            let ttl = lease.as_millis().div_ceil(1000).max(1) as i64;
            let granted = s
                .retry(
                    "grant",
                    |mut c| async move { c.lease_grant(ttl, None).await },
                )
                .await
                .map_err(|e| s.err(e))?;
            lease_id = Some(granted.id());
        }
        let id = lease_id.unwrap_or_default();
        let value = serde_json::to_vec(&reg).map_err(|e| s.err(e))?;
        let put = s
            .retry("put", |mut c| {
                let (key, value) = (key.clone(), value.clone());
                async move {
                    c.put(key, value, Some(PutOptions::new().with_lease(id)))
                        .await
                }
            })
            .await
            .map_err(|e| s.err(e))?;
        let revision = put.header().map_or(0, |h| h.revision()) as u64;
        let mut entry = Entry::new(reg, None);
        entry.lease_id = id;
        // The watch may have applied this revision already (then Stale).
        s.index.upsert(entry, Some(revision));
        Ok(outcome)
    }

    /// Write the tombstone, then delete the key and revoke its lease.
    pub async fn deregister(&self, name: &str) -> Result<bool, StoreError> {
        let s = &self.shared;
        let key = s.key("cloudlets", name);
        let lease = s.index.get(name).map_or(0, |e| e.lease_id);
        let marked = s
            .retry("deregister", |mut c| {
                let key = key.clone();
                async move {
                    let txn = Txn::new()
                        .when([Compare::version(key.clone(), CompareOp::Greater, 0)])
                        .and_then([TxnOp::put(
                            key.clone(),
                            "",
                            Some(PutOptions::new().with_ignore_lease()),
                        )]);
                    c.txn(txn).await
                }
            })
            .await
            .map_err(|e| s.err(e))?;
        let deleted = s
            .retry("delete", |mut c| {
                let key = key.clone();
                async move { c.delete(key, None).await }
            })
            .await
            .map_err(|e| s.err(e))?;
        let revision = deleted.header().map_or(0, |h| h.revision()) as u64;
        s.index
            .remove(name, WatchKind::Deregistered, Some(revision));
        if lease != 0 {
            // Best effort: the lease holds nothing now and runs out anyway.
            let _ = s.client().lease_revoke(lease).await;
        }
        Ok(marked.succeeded())
    }
}

/// Read every entry and replace the index with them; the revision read at.
async fn reread(s: &Shared) -> Result<i64, StoreError> {
    let prefix = format!("{}/cloudlets/", s.prefix);
    let resp = s
        .retry("read", |mut c| {
            let prefix = prefix.clone();
            async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
        })
        .await
        .map_err(|e| s.err(e))?;
    let revision = resp.header().map_or(0, |h| h.revision());
    let mut entries = Vec::new();
    for kv in resp.kvs() {
        match decode(kv) {
            Ok(Some(e)) => entries.push(e),
            Ok(None) => {}
            Err(e) => tracing::warn!("skipped: {e}"),
        }
    }
    s.index.replace_all(entries, revision as u64);
    Ok(revision)
}

/// Follow `P/cloudlets/` from `revision` on, forever: resume after the
/// last applied revision on a new stream when one breaks, re-read
/// everything when etcd has compacted that revision.
async fn watch(s: Arc<Shared>, mut revision: i64) {
    let prefix = format!("{}/cloudlets/", s.prefix);
    let mut wait = Duration::from_millis(50);
    loop {
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let stream = s.client().watch(prefix.clone(), Some(opts)).await;
        let mut compacted = false;
        match stream {
            Err(e) => tracing::warn!("etcd watch: cannot start: {e}"),
            Ok(mut stream) => loop {
                match stream.message().await {
                    Ok(Some(resp)) => {
                        s.watching.store(true, Ordering::Relaxed);
                        wait = Duration::from_millis(50);
                        if resp.compact_revision() > 0 {
                            compacted = true;
                            break;
                        }
                        if resp.canceled() {
                            tracing::warn!("etcd watch canceled: {}", resp.cancel_reason());
                            break;
                        }
                        for ev in resp.events() {
                            let Some(kv) = ev.kv() else { continue };
                            revision = revision.max(kv.mod_revision());
                            apply(&s, ev.event_type(), kv, &prefix);
                        }
                        if let Some(h) = resp.header() {
                            // Watch headers carry the store's revision: do
                            // not skip past events not yet received.
                            if resp.events().is_empty() && !resp.created() {
                                revision = revision.max(h.revision());
                            }
                        }
                    }
                    Ok(None) => {
                        tracing::warn!("etcd watch ended: resuming after revision {revision}");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(
                            "etcd watch broke ({e}): resuming after revision {revision}"
                        );
                        break;
                    }
                }
            },
        }
        s.watching.store(false, Ordering::Relaxed);
        if compacted {
            tracing::warn!("etcd compacted past revision {revision}: re-reading every entry");
            match reread(&s).await {
                Ok(r) => revision = r,
                Err(e) => tracing::warn!("etcd re-read failed: {e}"),
            }
            continue;
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(1));
        if wait >= Duration::from_millis(400) {
            s.reconnect().await;
        }
    }
}

fn apply(s: &Shared, kind: EventType, kv: &KeyValue, prefix: &str) {
    let Some(name) = kv
        .key_str()
        .ok()
        .and_then(|k| k.strip_prefix(prefix))
        .map(str::to_string)
    else {
        return;
    };
    let rev = kv.mod_revision() as u64;
    match kind {
        EventType::Put => match decode(kv) {
            Ok(Some(e)) => {
                s.index.upsert(e, Some(rev));
            }
            Ok(None) => {
                s.index.remove(&name, WatchKind::Deregistered, Some(rev));
            }
            Err(e) => tracing::warn!("skipped: {e}"),
        },
        EventType::Delete => {
            s.index.remove(&name, WatchKind::Expired, Some(rev));
        }
    }
}
