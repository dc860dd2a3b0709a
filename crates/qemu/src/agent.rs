//! The host side of the guest agent protocol (`cloudlet-agent-proto`),
//! over the virtio-serial port's host socket.

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use cloudlet_agent_proto::{Op, Reply, Request, Response, ResponseResult, PUT_CHUNK};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("Cannot connect to the agent socket {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("Guest agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("Agent connection closed")]
    Closed,
    #[error("Agent I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("Agent refused {op}: {message}")]
    Refused { op: &'static str, message: String },
    #[error("Unexpected agent reply to {op}: {reply:?}")]
    Unexpected { op: &'static str, reply: Box<Reply> },
    #[error("Cannot read {path}: {source}")]
    ReadLocal {
        path: String,
        source: std::io::Error,
    },
}

/// A connected agent session. One request at a time.
pub struct AgentClient {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    next_id: u64,
}

/// Result of a finished command in the guest.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecOutput {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl AgentClient {
    /// Connect and synchronise: keep pinging until the agent answers, for at
    /// most `timeout` (the guest may still be booting).
    pub async fn connect(socket: &Path, timeout: Duration) -> Result<Self, AgentError> {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|source| AgentError::Connect {
                path: socket.display().to_string(),
                source,
            })?;
        let (r, w) = stream.into_split();
        let mut c = AgentClient {
            reader: BufReader::new(r),
            writer: w,
            next_id: rand::random::<u32>() as u64 * 1000,
        };
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(AgentError::Timeout(timeout));
            }
            match c
                .call_with_timeout(Op::Ping {}, left.min(Duration::from_millis(500)))
                .await
            {
                Ok(_) => return Ok(c),
                Err(AgentError::Timeout(_)) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Send one request and wait for its reply.
    pub async fn call_with_timeout(
        &mut self,
        op: Op,
        timeout: Duration,
    ) -> Result<Reply, AgentError> {
        self.next_id += 1;
        let id = self.next_id;
        let mut line = serde_json::to_vec(&Request { id, op }).map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.writer.write_all(&line).await?;
        let read = async {
            let mut buf = String::new();
            loop {
                buf.clear();
                if self.reader.read_line(&mut buf).await? == 0 {
                    return Err(AgentError::Closed);
                }
                // Lines from earlier requests (or sessions) are skipped.
                if let Ok(resp) = serde_json::from_str::<Response>(&buf) {
                    if resp.id == id {
                        return Ok(resp.result);
                    }
                }
            }
        };
        match tokio::time::timeout(timeout, read).await {
            Ok(Ok(ResponseResult::Ok(r))) => Ok(r),
            Ok(Ok(ResponseResult::Err(message))) => Err(AgentError::Refused {
                op: "request",
                message,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(AgentError::Timeout(timeout)),
        }
    }

    async fn call(&mut self, op: Op, timeout: Duration) -> Result<Reply, AgentError> {
        let name = op_name(&op);
        self.call_with_timeout(op, timeout)
            .await
            .map_err(|e| match e {
                AgentError::Refused { message, .. } => AgentError::Refused { op: name, message },
                e => e,
            })
    }

    pub async fn ping(&mut self) -> Result<Reply, AgentError> {
        self.call(Op::Ping {}, Duration::from_secs(5)).await
    }

    /// Run a command to completion.
    pub async fn exec(
        &mut self,
        argv: &[&str],
        timeout: Duration,
    ) -> Result<ExecOutput, AgentError> {
        let op = Op::Exec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec![],
            cwd: None,
            background: false,
            log: None,
            timeout_ms: timeout.as_millis() as u64,
        };
        match self.call(op, timeout + Duration::from_secs(5)).await? {
            Reply::Exited {
                code,
                stdout,
                stderr,
                ..
            } => Ok(ExecOutput {
                code,
                stdout,
                stderr,
            }),
            other => Err(AgentError::Unexpected {
                op: "exec",
                reply: Box::new(other),
            }),
        }
    }

    /// Start a long-running command in the background; returns its pid.
    pub async fn spawn(&mut self, argv: &[&str], log: Option<&str>) -> Result<u32, AgentError> {
        let op = Op::Exec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec![],
            cwd: None,
            background: true,
            log: log.map(str::to_string),
            timeout_ms: 0,
        };
        match self.call(op, Duration::from_secs(10)).await? {
            Reply::Started { pid } => Ok(pid),
            other => Err(AgentError::Unexpected {
                op: "spawn",
                reply: Box::new(other),
            }),
        }
    }

    /// Copy a host file into the guest.
    pub async fn put_file(
        &mut self,
        local: &Path,
        guest_path: &str,
        mode: u32,
    ) -> Result<u64, AgentError> {
        let data = tokio::fs::read(local)
            .await
            .map_err(|source| AgentError::ReadLocal {
                path: local.display().to_string(),
                source,
            })?;
        self.put_bytes(&data, guest_path, mode).await
    }

    pub async fn put_bytes(
        &mut self,
        data: &[u8],
        guest_path: &str,
        mode: u32,
    ) -> Result<u64, AgentError> {
        let mut offset = 0usize;
        loop {
            let end = (offset + PUT_CHUNK).min(data.len());
            let op = Op::PutFile {
                path: guest_path.to_string(),
                offset: offset as u64,
                data: base64::engine::general_purpose::STANDARD.encode(&data[offset..end]),
                mode,
            };
            self.call(op, Duration::from_secs(60)).await?;
            offset = end;
            if offset >= data.len() {
                return Ok(data.len() as u64);
            }
        }
    }

    /// Wait until the guest port answers (an HTTP GET of `http_path` if set).
    pub async fn wait_port(
        &mut self,
        port: u16,
        http_path: Option<&str>,
        timeout: Duration,
    ) -> Result<Duration, AgentError> {
        let op = Op::WaitPort {
            port,
            http_path: http_path.map(str::to_string),
            timeout_ms: timeout.as_millis() as u64,
        };
        match self.call(op, timeout + Duration::from_secs(5)).await? {
            Reply::PortReady { waited_ms } => Ok(Duration::from_millis(waited_ms)),
            other => Err(AgentError::Unexpected {
                op: "wait_port",
                reply: Box::new(other),
            }),
        }
    }

    /// Give a restored guest its own identity and fresh entropy.
    pub async fn set_identity(&mut self, vm_id: &str, hostname: &str) -> Result<Reply, AgentError> {
        let seed: [u8; 32] = rand::random();
        let op = Op::SetIdentity {
            vm_id: vm_id.to_string(),
            hostname: hostname.to_string(),
            seed: hex::encode(seed),
        };
        self.call(op, Duration::from_secs(10)).await
    }

    pub async fn sync(&mut self, drop_caches: bool, fstrim: bool) -> Result<(), AgentError> {
        self.call(
            Op::Sync {
                drop_caches,
                fstrim,
            },
            Duration::from_secs(60),
        )
        .await
        .map(|_| ())
    }

    /// Set the guest's wall clock to the host's, if the agent knows how
    /// (an agent older than `set_clock` is left alone: `Ok(None)`). Returns
    /// how far behind the guest was, in ms.
    pub async fn set_clock(&mut self) -> Result<Option<i64>, AgentError> {
        let knows = match self.ping().await? {
            Reply::Pong { ops, .. } => ops.iter().any(|o| o == "set_clock"),
            _ => false,
        };
        if !knows {
            return Ok(None);
        }
        let unix_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        match self
            .call(Op::SetClock { unix_ns }, Duration::from_secs(5))
            .await?
        {
            Reply::ClockSet { behind_ms } => Ok(Some(behind_ms)),
            other => Err(AgentError::Unexpected {
                op: "set_clock",
                reply: Box::new(other),
            }),
        }
    }

    pub async fn poweroff(&mut self) -> Result<(), AgentError> {
        self.call(Op::Poweroff {}, Duration::from_secs(5))
            .await
            .map(|_| ())
    }
}

fn op_name(op: &Op) -> &'static str {
    op.name()
}
