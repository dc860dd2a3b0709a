//! An async client for the QEMU Machine Protocol.
//!
//! One reader task owns the socket's read half: replies go to the caller that
//! sent the matching `id`, events are broadcast to every [`QmpClient::events`]
//! subscriber with QEMU's own timestamp. Every command has a timeout.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot, watch};

/// Default timeout of a QMP command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("Cannot connect to QMP socket {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("QMP handshake failed: {0}")]
    Handshake(String),
    #[error("QMP connection closed (QEMU exited?)")]
    Closed,
    #[error("QMP command {command} timed out after {timeout:?}")]
    Timeout { command: String, timeout: Duration },
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("Unexpected QMP reply to {command}: {detail}")]
    Reply { command: String, detail: String },
    /// A migration ended without completing. `status` is QEMU's name of
    /// the final state (`failed`, `cancelled`), `desc` its reason.
    #[error("Migration {status}: {desc}")]
    MigrationFailed { status: String, desc: String },
}

/// An asynchronous event from QEMU.
#[derive(Debug, Clone, Deserialize)]
pub struct QmpEvent {
    pub event: String,
    #[serde(default)]
    pub data: Value,
    pub timestamp: QmpTimestamp,
}

#[derive(Debug, Clone, Copy, Deserialize)]
pub struct QmpTimestamp {
    pub seconds: i64,
    pub microseconds: i64,
}

impl QmpTimestamp {
    /// Microseconds since the Unix epoch (QEMU uses the host's real-time clock).
    pub fn as_micros(&self) -> i64 {
        self.seconds * 1_000_000 + self.microseconds
    }
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, (String, String)>>>>>;

/// A connected QMP session. Cheap to clone.
#[derive(Clone)]
pub struct QmpClient {
    writer: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    pending: Pending,
    next_id: Arc<AtomicU64>,
    events: broadcast::Sender<QmpEvent>,
    closed: watch::Receiver<bool>,
}

impl QmpClient {
    /// Connect to a QMP socket, read the greeting and leave negotiation mode.
    pub async fn connect(path: &Path) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        let (read, write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let greeting = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .map_err(|_| QmpError::Handshake("no greeting within 10 s".into()))??
            .ok_or(QmpError::Closed)?;
        let g: Value = serde_json::from_str(&greeting)
            .map_err(|e| QmpError::Handshake(format!("bad greeting: {e}")))?;
        if g.get("QMP").is_none() {
            return Err(QmpError::Handshake(format!(
                "unexpected greeting {greeting}"
            )));
        }
        let pending: Pending = Arc::default();
        let (events, _) = broadcast::channel(1024);
        let (closed_tx, closed) = watch::channel(false);
        let client = QmpClient {
            writer: Arc::new(tokio::sync::Mutex::new(write)),
            pending: pending.clone(),
            next_id: Arc::new(AtomicU64::new(1)),
            events: events.clone(),
            closed,
        };
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    tracing::warn!(%line, "unparsable QMP line");
                    continue;
                };
                if v.get("event").is_some() {
                    match serde_json::from_value::<QmpEvent>(v) {
                        Ok(ev) => {
                            tracing::debug!(event = %ev.event, "QMP event");
                            let _ = events.send(ev);
                        }
                        Err(e) => tracing::warn!("bad QMP event: {e}"),
                    }
                    continue;
                }
                let Some(id) = v.get("id").and_then(Value::as_u64) else {
                    continue;
                };
                let reply = if let Some(r) = v.get("return") {
                    Ok(r.clone())
                } else {
                    let err = v.get("error").cloned().unwrap_or_default();
                    let s = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                    Err((s("class"), s("desc")))
                };
                if let Some(tx) = pending.lock().ok().and_then(|mut p| p.remove(&id)) {
                    let _ = tx.send(reply);
                }
            }
            let _ = closed_tx.send(true);
            if let Ok(mut p) = pending.lock() {
                p.clear(); // wakes every waiter with Closed
            }
        });
        client.execute("qmp_capabilities", None).await?;
        Ok(client)
    }

    /// Run a command with the default timeout.
    pub async fn execute(&self, command: &str, args: Option<Value>) -> Result<Value, QmpError> {
        self.execute_with_timeout(command, args, COMMAND_TIMEOUT)
            .await
    }

    pub async fn execute_with_timeout(
        &self,
        command: &str,
        args: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        if *self.closed.borrow() {
            return Err(QmpError::Closed);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if let Ok(mut p) = self.pending.lock() {
            p.insert(id, tx);
        }
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        {
            let mut w = self.writer.lock().await;
            if let Err(e) = w.write_all(line.as_bytes()).await {
                self.forget(id);
                return Err(e.into());
            }
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err((class, desc)))) => Err(QmpError::Command {
                command: command.into(),
                class,
                desc,
            }),
            Ok(Err(_)) => Err(QmpError::Closed),
            Err(_) => {
                self.forget(id);
                Err(QmpError::Timeout {
                    command: command.into(),
                    timeout,
                })
            }
        }
    }

    fn forget(&self, id: u64) {
        if let Ok(mut p) = self.pending.lock() {
            p.remove(&id);
        }
    }

    /// Subscribe to events from now on.
    pub fn events(&self) -> broadcast::Receiver<QmpEvent> {
        self.events.subscribe()
    }

    /// Resolves when the connection closes (QEMU exited or closed it).
    pub async fn closed(&self) {
        let mut c = self.closed.clone();
        let _ = c.wait_for(|closed| *closed).await;
    }

    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// `query-status`'s `status` field (`running`, `paused`, `postmigrate`, ...).
    pub async fn run_state(&self) -> Result<String, QmpError> {
        let v = self.execute("query-status", None).await?;
        v.get("status")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| QmpError::Reply {
                command: "query-status".into(),
                detail: v.to_string(),
            })
    }
}
