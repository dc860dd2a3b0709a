//! Group commit for the embedded store: what must be on disk before a call
//! is answered (a credential binding, a new entry, a deregistration) is
//! queued; one writer at a time commits everything queued in one redb
//! transaction (one fsync), off the async threads, and answers each call.
//! A thousand cloudlets registering at once cost a few commits, not a
//! thousand, and a commit never holds up a search or a health check.

use std::sync::{Arc, Mutex};

use redb::{Database, ReadableTable};
use tokio::sync::oneshot;

use super::embedded::{CREDENTIALS, META, REGISTRATIONS};
use super::Bind;
use crate::index::Index;

/// One durable change.
pub enum Op {
    /// Bind `name` to `hash` unless it is bound (answers how it is bound).
    Bind {
        name: String,
        hash: String,
    },
    /// Store a registration record.
    Put {
        name: String,
        value: Vec<u8>,
    },
    Remove {
        name: String,
    },
}

type Waiter = oneshot::Sender<Result<Option<Bind>, String>>;

#[derive(Default)]
struct Queue {
    ops: Vec<(Op, Waiter)>,
    /// A writer is draining the queue.
    writing: bool,
}

pub struct Journal {
    db: Arc<Database>,
    index: Index,
    queue: Arc<Mutex<Queue>>,
}

impl Journal {
    pub fn new(db: Arc<Database>, index: Index) -> Self {
        Journal {
            db,
            index,
            queue: Arc::default(),
        }
    }

    /// Queue `op` and wait until it is committed: a `Bind` answers how the
    /// name is bound.
    pub async fn commit(&self, op: Op) -> Result<Option<Bind>, String> {
        let (tx, rx) = oneshot::channel();
        let lead = {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.ops.push((op, tx));
            !std::mem::replace(&mut q.writing, true)
        };
        if lead {
            let (db, index, queue) = (self.db.clone(), self.index.clone(), self.queue.clone());
            tokio::spawn(drain(db, index, queue));
        }
        rx.await
            .map_err(|_| "the store's writer stopped".to_string())?
    }
}

/// Commit batches until the queue is empty.
async fn drain(db: Arc<Database>, index: Index, queue: Arc<Mutex<Queue>>) {
    loop {
        let batch = {
            let mut q = queue.lock().unwrap_or_else(|p| p.into_inner());
            if q.ops.is_empty() {
                q.writing = false;
                return;
            }
            std::mem::take(&mut q.ops)
        };
        let (ops, waiters): (Vec<Op>, Vec<Waiter>) = batch.into_iter().unzip();
        let (db2, revision) = (db.clone(), index.revision());
        let done = tokio::task::spawn_blocking(move || write(&db2, &ops, revision)).await;
        let results = match done {
            Ok(Ok(r)) => r.into_iter().map(Ok).collect(),
            Ok(Err(e)) => vec![Err(e); waiters.len()],
            Err(e) => vec![Err(e.to_string()); waiters.len()],
        };
        for (w, r) in waiters.into_iter().zip(results) {
            let _ = w.send(r);
        }
    }
}

/// One transaction for `ops`, in order (a second binding of a name in the
/// batch sees the first).
fn write(db: &Database, ops: &[Op], revision: u64) -> Result<Vec<Option<Bind>>, String> {
    let s = |e: &dyn std::fmt::Display| e.to_string();
    let tx = db.begin_write().map_err(|e| s(&e))?;
    let mut out = Vec::with_capacity(ops.len());
    {
        let mut creds = tx.open_table(CREDENTIALS).map_err(|e| s(&e))?;
        let mut regs = tx.open_table(REGISTRATIONS).map_err(|e| s(&e))?;
        for op in ops {
            out.push(match op {
                Op::Bind { name, hash } => {
                    let existing = creds
                        .get(name.as_str())
                        .map_err(|e| s(&e))?
                        .map(|v| v.value().to_string());
                    Some(match existing {
                        Some(h) if &h == hash => Bind::Bound,
                        Some(_) => Bind::Taken,
                        None => {
                            creds
                                .insert(name.as_str(), hash.as_str())
                                .map_err(|e| s(&e))?;
                            Bind::Bound
                        }
                    })
                }
                Op::Put { name, value } => {
                    regs.insert(name.as_str(), value.as_slice())
                        .map_err(|e| s(&e))?;
                    None
                }
                Op::Remove { name } => {
                    regs.remove(name.as_str()).map_err(|e| s(&e))?;
                    None
                }
            });
        }
        let mut meta = tx.open_table(META).map_err(|e| s(&e))?;
        meta.insert("revision", revision).map_err(|e| s(&e))?;
    }
    tx.commit().map_err(|e| s(&e))?;
    Ok(out)
}
