//! The embedded store: the index in memory is the truth, leases are
//! `Instant`s swept every 100 ms, and redb on disk keeps what a restart
//! must not lose.
//!
//! On disk (one redb file, tables documented here; format
//! [`cloudlet_api::directory::REGISTRATION_FORMAT`] for the values):
//! - `registrations`: name -> the registration, JSON, and the Unix time in
//!   ms of the heartbeat that wrote it (`{"seen_ms":..,"reg":{..}}`);
//! - `credentials`: name -> BLAKE3 hex of the cloudlet's credential;
//! - `meta`: `revision` -> the last revision, big-endian u64.
//!
//! Writes: a new entry and a binding are committed before the call is
//! answered; a heartbeat that only changes the free resources, load or
//! caches marks the entry dirty, and the dirty entries are committed
//! together every second (one fsync for thousands of heartbeats). A
//! heartbeat that changes nothing writes nothing. After a restart, every
//! stored entry is live again for one lease from the restart: a cloudlet
//! that heartbeats keeps it, a dead one leaves after that lease.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cloudlet_api::directory::{Registration, WatchKind};
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::journal::{Journal, Op};
use super::{Bind, StoreError};
use crate::index::{Entry, Index, Upsert};

pub(super) const REGISTRATIONS: TableDefinition<&str, &[u8]> =
    TableDefinition::new("registrations");
pub(super) const CREDENTIALS: TableDefinition<&str, &str> = TableDefinition::new("credentials");
pub(super) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// How often leases are checked.
pub const SWEEP: Duration = Duration::from_millis(100);
/// How often dirty entries are committed.
pub const FLUSH: Duration = Duration::from_secs(1);

#[derive(Serialize, Deserialize)]
struct Stored {
    seen_ms: u64,
    reg: Registration,
}

pub struct Embedded {
    db: Arc<Database>,
    path: PathBuf,
    index: Index,
    /// What is committed before a call is answered (group commit).
    journal: Journal,
    /// Names whose entry changed (or left) since the last commit.
    dirty: Arc<Mutex<HashSet<String>>>,
    /// The sweeper and the writer: stopped with the store, so that the
    /// file is closed when the store is dropped (and can be opened again).
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Drop for Embedded {
    fn drop(&mut self) {
        for t in self
            .tasks
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Embedded {
    /// Open (or create) the store at `path`, load what it holds into a new
    /// index (each entry live for `lease` from now), and start the lease
    /// sweeper and the batched writer.
    pub fn open(path: &Path, lease: Duration) -> Result<Self, StoreError> {
        let err = |e: &dyn std::fmt::Display| StoreError::Embedded {
            path: path.display().to_string(),
            detail: e.to_string(),
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| err(&e))?;
        }
        let db = Database::create(path).map_err(|e| err(&e))?;
        let index = Index::new();
        {
            let tx = db.begin_write().map_err(|e| err(&e))?;
            tx.open_table(REGISTRATIONS).map_err(|e| err(&e))?;
            tx.open_table(CREDENTIALS).map_err(|e| err(&e))?;
            tx.open_table(META).map_err(|e| err(&e))?;
            tx.commit().map_err(|e| err(&e))?;
        }
        let rtx = db.begin_read().map_err(|e| err(&e))?;
        let regs = rtx.open_table(REGISTRATIONS).map_err(|e| err(&e))?;
        let expires = Instant::now() + lease;
        let mut loaded = Vec::new();
        for row in regs.iter().map_err(|e| err(&e))? {
            let (k, v) = row.map_err(|e| err(&e))?;
            let stored: Stored =
                serde_json::from_slice(v.value()).map_err(|e| StoreError::Decode {
                    name: k.value().to_string(),
                    detail: e.to_string(),
                })?;
            loaded.push(Entry::new(stored.reg, Some(expires)));
        }
        let meta = rtx.open_table(META).map_err(|e| err(&e))?;
        let revision = meta
            .get("revision")
            .map_err(|e| err(&e))?
            .map_or(0, |v| v.value());
        drop((regs, meta, rtx));
        index.replace_all(loaded, revision);
        let db = Arc::new(db);
        let store = Embedded {
            journal: Journal::new(db.clone(), index.clone()),
            db,
            path: path.to_path_buf(),
            index,
            dirty: Arc::default(),
            tasks: Mutex::default(),
        };
        store.start();
        Ok(store)
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Embedded {
            path: self.path.display().to_string(),
            detail: e.to_string(),
        }
    }

    fn start(&self) {
        let index = self.index.clone();
        let dirty = self.dirty.clone();
        let sweeper = tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP);
            loop {
                tick.tick().await;
                let gone = index.expire_due(Instant::now());
                if !gone.is_empty() {
                    tracing::info!(cloudlets = ?gone, "lease expired: left the directory");
                    dirty.lock().unwrap_or_else(|p| p.into_inner()).extend(gone);
                }
            }
        });
        // The writer holds the file only while it writes.
        let (db, index, dirty, path) = (
            Arc::downgrade(&self.db),
            self.index.clone(),
            self.dirty.clone(),
            self.path.clone(),
        );
        let writer = tokio::spawn(async move {
            let mut tick = tokio::time::interval(FLUSH);
            loop {
                tick.tick().await;
                let Some(db) = db.upgrade() else { return };
                let (index, dirty) = (index.clone(), dirty.clone());
                let done =
                    tokio::task::spawn_blocking(move || write_dirty(&db, &index, &dirty)).await;
                if let Ok(Err(e)) = done {
                    tracing::error!(path = %path.display(), "cannot write the directory's entries: {e}");
                }
            }
        });
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend([sweeper, writer]);
    }

    pub async fn bind_credential(&self, name: &str, hash: &str) -> Result<Bind, StoreError> {
        // Bound already (every heartbeat after a restart): a read, no commit.
        let bound = (|| -> Result<Option<String>, String> {
            let s = |e: &dyn std::fmt::Display| e.to_string();
            let rtx = self.db.begin_read().map_err(|e| s(&e))?;
            let t = rtx.open_table(CREDENTIALS).map_err(|e| s(&e))?;
            let v = t.get(name).map_err(|e| s(&e))?;
            Ok(v.map(|v| v.value().to_string()))
        })()
        .map_err(|e| self.err(e))?;
        match bound {
            Some(h) if h == hash => return Ok(Bind::Bound),
            Some(_) => return Ok(Bind::Taken),
            None => {}
        }
        let op = Op::Bind {
            name: name.to_string(),
            hash: hash.to_string(),
        };
        match self.journal.commit(op).await.map_err(|e| self.err(e))? {
            Some(b) => Ok(b),
            None => Err(self.err("a binding came back without its answer")),
        }
    }

    pub async fn heartbeat(
        &self,
        reg: Registration,
        lease: Duration,
    ) -> Result<Upsert, StoreError> {
        let name = reg.name.clone();
        let entry = Entry::new(reg.clone(), Some(Instant::now() + lease));
        let outcome = self.index.upsert(entry, None);
        match outcome {
            Upsert::Created => {
                // Stored before the answer: a restart right after keeps it.
                let value = serde_json::to_vec(&Stored {
                    seen_ms: now_ms(),
                    reg,
                })
                .map_err(|e| self.err(e))?;
                self.journal
                    .commit(Op::Put { name, value })
                    .await
                    .map_err(|e| self.err(e))?;
            }
            Upsert::Changed => {
                self.dirty
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name);
            }
            Upsert::Renewed | Upsert::Stale => {}
        }
        Ok(outcome)
    }

    pub async fn deregister(&self, name: &str) -> Result<bool, StoreError> {
        let was = self.index.remove(name, WatchKind::Deregistered, None);
        self.journal
            .commit(Op::Remove {
                name: name.to_string(),
            })
            .await
            .map_err(|e| self.err(e))?;
        Ok(was)
    }

    pub async fn flush(&self) -> Result<(), StoreError> {
        let (db, index, dirty) = (self.db.clone(), self.index.clone(), self.dirty.clone());
        tokio::task::spawn_blocking(move || write_dirty(&db, &index, &dirty))
            .await
            .map_err(|e| self.err(e))?
            .map_err(|e| self.err(e))
    }
}

/// Commit the dirty entries (those gone are removed) in one transaction.
fn write_dirty(db: &Database, index: &Index, dirty: &Mutex<HashSet<String>>) -> Result<(), String> {
    let names: Vec<String> = std::mem::take(&mut *dirty.lock().unwrap_or_else(|p| p.into_inner()))
        .into_iter()
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    let seen = now_ms();
    // The entries under the lock (cheap: shared pointers), the JSON after.
    let current: Vec<Option<Arc<Entry>>> = {
        let st = index.read();
        names.iter().map(|n| st.entries.get(n).cloned()).collect()
    };
    let rows: Vec<(String, Option<Vec<u8>>)> = names
        .iter()
        .zip(current)
        .map(|(n, e)| {
            let v = e.map(|e| {
                serde_json::to_vec(&Stored {
                    seen_ms: seen,
                    reg: e.reg.clone(),
                })
                .unwrap_or_default()
            });
            (n.clone(), v)
        })
        .collect();
    let result = (|| -> Result<(), Box<redb::Error>> {
        let b = |e: redb::Error| Box::new(e);
        let tx = db.begin_write().map_err(|e| b(e.into()))?;
        {
            let mut t = tx.open_table(REGISTRATIONS).map_err(|e| b(e.into()))?;
            for (n, v) in &rows {
                match v {
                    Some(v) => t.insert(n.as_str(), v.as_slice()).map(drop),
                    None => t.remove(n.as_str()).map(drop),
                }
                .map_err(|e| b(e.into()))?;
            }
            let mut m = tx.open_table(META).map_err(|e| b(e.into()))?;
            m.insert("revision", index.revision())
                .map_err(|e| b(e.into()))?;
        }
        tx.commit().map_err(|e| b(e.into()))?;
        Ok(())
    })();
    if let Err(e) = result {
        // Not written: try again at the next flush.
        dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(names);
        return Err(e.to_string());
    }
    Ok(())
}
