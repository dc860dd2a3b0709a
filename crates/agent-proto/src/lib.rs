//! The guest agent protocol, version 1.
//!
//! The host and the agent inside a guest talk over a virtio-serial port named
//! [`PORT_NAME`]. Each message is one line of JSON terminated by `\n`.
//!
//! ```text
//!  host                                   guest agent
//!   | -- {"id":7,"op":{"ping":{}}}\n -------> |
//!   | <------ {"id":7,"ok":{"pong":{..}}}\n -- |
//! ```
//!
//! The host picks the ids. A host that connects to a port that an earlier host
//! used may find a half-written line from that session in the pipe: it sends a
//! `ping` with a fresh id and discards every line until the matching reply
//! (the same idea as qemu-ga's `guest-sync`).
//!
//! Compatibility rule: fields are only ever added, with `#[serde(default)]`;
//! an agent answers an operation it does not know with an error, never by
//! closing the port. [`PROTOCOL_VERSION`] rises when a change is not additive.
//!
//! Operations added within a version are listed in [`Reply::Pong`]'s `ops`
//! (empty from agents that predate the list): a host checks it before it
//! sends a newer operation, instead of waiting for an error. Added so far:
//! [`Op::ZeroFreeMemory`] (`"zero_free_memory"`), [`Op::SetClock`]
//! (`"set_clock"`).

use serde::{Deserialize, Serialize};

/// Version of this protocol. Reported by the agent in [`Reply::Pong`].
pub const PROTOCOL_VERSION: u32 = 1;

/// Name of the virtio-serial port the agent listens on.
pub const PORT_NAME: &str = "org.cloudlet.agent.0";

/// Longest line either side accepts (file chunks are sent base64-encoded).
pub const MAX_LINE: usize = 4 * 1024 * 1024;

/// In the guest: each line is a shell command the agent starts in the
/// background when it boots as init (how an app comes up after a cold boot).
pub const AUTOSTART_PATH: &str = "/etc/cloudlet/autostart";

/// Largest payload of a single [`Op::PutFile`] chunk, before base64.
pub const PUT_CHUNK: usize = 1024 * 1024;

/// A request from the host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Request {
    pub id: u64,
    pub op: Op,
}

/// What the host asks the agent to do.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Liveness check; also used to resynchronise the line stream.
    Ping {},
    /// Run a command. With `background`, the agent starts it in its own
    /// session and answers with its pid at once; otherwise it waits (at most
    /// `timeout_ms`) and answers with the exit status and captured output.
    Exec {
        argv: Vec<String>,
        #[serde(default)]
        env: Vec<(String, String)>,
        #[serde(default)]
        cwd: Option<String>,
        #[serde(default)]
        background: bool,
        /// For background commands: file that receives stdout and stderr.
        #[serde(default)]
        log: Option<String>,
        #[serde(default = "default_exec_timeout")]
        timeout_ms: u64,
    },
    /// Write a chunk of a file. `offset == 0` creates or truncates it.
    PutFile {
        path: String,
        offset: u64,
        /// Base64 (standard alphabet, padded).
        data: String,
        #[serde(default = "default_mode")]
        mode: u32,
    },
    /// Answer once something accepts TCP connections on `127.0.0.1:port`
    /// (and, if `http_path` is set, answers an HTTP GET for it with a status
    /// below 500), or fail after `timeout_ms`.
    WaitPort {
        port: u16,
        #[serde(default)]
        http_path: Option<String>,
        timeout_ms: u64,
    },
    /// Take on a new identity after a restore: mix `seed` and bytes from the
    /// hardware RNG (virtio-rng) into the kernel's pool and force a reseed of
    /// its CRNG, set the hostname, and write `vm_id` to
    /// `/run/cloudlet/vm-id`.
    SetIdentity {
        vm_id: String,
        hostname: String,
        /// Hex, at least 32 bytes, fresh from the host's CSPRNG.
        seed: String,
    },
    /// Flush filesystems and drop clean caches (before a snapshot).
    Sync {
        #[serde(default)]
        drop_caches: bool,
        #[serde(default)]
        fstrim: bool,
    },
    /// Zero the guest's free memory: map anonymous memory in chunks of
    /// `chunk_bytes` (the kernel hands out zero-filled pages) while
    /// `MemFree` stays above `reserve_bytes` plus a chunk (and at most
    /// `max_bytes` in all, when not 0), then unmap it all. The freed pages
    /// stay zero, so a snapshot taken soon after holds zeros there instead
    /// of stale data. Stops at the first failed mapping; the mapping is done
    /// by a child process that the OOM killer picks first.
    ZeroFreeMemory {
        #[serde(default = "default_zero_reserve")]
        reserve_bytes: u64,
        #[serde(default = "default_zero_chunk")]
        chunk_bytes: u64,
        #[serde(default)]
        max_bytes: u64,
    },
    /// Set the guest's wall clock. A VM resumed from a snapshot (synthesis)
    /// or after a move (its clocks stop while it is paused) is behind.
    SetClock {
        /// Nanoseconds since the Unix epoch, read on the host just before.
        unix_ns: u64,
    },
    /// Power the guest off.
    Poweroff {},
}

impl Op {
    /// The operation's name on the wire (the key of its JSON object).
    pub fn name(&self) -> &'static str {
        match self {
            Op::Ping {} => "ping",
            Op::Exec { .. } => "exec",
            Op::PutFile { .. } => "put_file",
            Op::WaitPort { .. } => "wait_port",
            Op::SetIdentity { .. } => "set_identity",
            Op::Sync { .. } => "sync",
            Op::ZeroFreeMemory { .. } => "zero_free_memory",
            Op::SetClock { .. } => "set_clock",
            Op::Poweroff {} => "poweroff",
        }
    }
}

/// Every operation this version of the protocol defines, by wire name.
pub const OPS: &[&str] = &[
    "ping",
    "exec",
    "put_file",
    "wait_port",
    "set_identity",
    "sync",
    "zero_free_memory",
    "set_clock",
    "poweroff",
];

/// Default [`Op::ZeroFreeMemory`] reserve: 48 MiB left free.
pub const ZERO_RESERVE_DEFAULT: u64 = 48 << 20;
/// Default [`Op::ZeroFreeMemory`] chunk: 4 MiB per mapping.
pub const ZERO_CHUNK_DEFAULT: u64 = 4 << 20;

fn default_zero_reserve() -> u64 {
    ZERO_RESERVE_DEFAULT
}
fn default_zero_chunk() -> u64 {
    ZERO_CHUNK_DEFAULT
}

fn default_exec_timeout() -> u64 {
    60_000
}
fn default_mode() -> u32 {
    0o644
}

/// The agent's answer to one [`Request`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Response {
    pub id: u64,
    #[serde(flatten)]
    pub result: ResponseResult,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum ResponseResult {
    Ok(Reply),
    Err(String),
}

/// Successful replies, one shape per operation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Pong {
        protocol: u32,
        agent_version: String,
        uptime_ms: u64,
        hostname: String,
        vm_id: Option<String>,
        /// Operations the agent knows (see the module docs); empty from
        /// agents that predate the list.
        #[serde(default)]
        ops: Vec<String>,
    },
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
        stdout: String,
        stderr: String,
    },
    Started {
        pid: u32,
    },
    Written {
        bytes: u64,
    },
    PortReady {
        waited_ms: u64,
    },
    IdentitySet {
        /// Bytes mixed in from the hardware RNG.
        hwrng_bytes: usize,
        /// Whether the kernel accepted the forced CRNG reseed.
        reseeded: bool,
    },
    Synced {},
    FreeMemoryZeroed {
        /// Bytes mapped, zero-filled and unmapped again.
        zeroed_bytes: u64,
        /// `MemFree` and `MemAvailable` before, in bytes.
        mem_free_bytes: u64,
        mem_available_bytes: u64,
        /// Why it stopped: `reserve`, `max`, or the mapping error.
        stopped: String,
    },
    ClockSet {
        /// How far the guest's clock was behind (negative: ahead), ms.
        behind_ms: i64,
    },
    PoweringOff {},
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_through_json() {
        let r = Request {
            id: 3,
            op: Op::Exec {
                argv: vec!["/bin/true".into()],
                env: vec![],
                cwd: None,
                background: true,
                log: Some("/tmp/x".into()),
                timeout_ms: 5,
            },
        };
        let line = serde_json::to_string(&r).unwrap();
        assert!(!line.contains('\n'));
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), r);
    }

    #[test]
    fn response_shape_is_stable() {
        let r = Response {
            id: 1,
            result: ResponseResult::Ok(Reply::Started { pid: 42 }),
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(s, r#"{"id":1,"ok":{"started":{"pid":42}}}"#);
        let e = Response {
            id: 2,
            result: ResponseResult::Err("No such file".into()),
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"id":2,"err":"No such file"}"#
        );
    }

    #[test]
    fn op_names_match_the_wire_and_the_list() {
        let ops = [
            Op::Ping {},
            Op::Sync {
                drop_caches: true,
                fstrim: false,
            },
            Op::ZeroFreeMemory {
                reserve_bytes: 1,
                chunk_bytes: 2,
                max_bytes: 3,
            },
            Op::Poweroff {},
        ];
        for op in ops {
            let v = serde_json::to_value(&op).unwrap();
            let key = v.as_object().unwrap().keys().next().unwrap().clone();
            assert_eq!(key, op.name());
            assert!(OPS.contains(&op.name()));
        }
    }

    #[test]
    fn zero_free_memory_defaults_and_old_pongs() {
        let r: Request = serde_json::from_str(r#"{"id":1,"op":{"zero_free_memory":{}}}"#).unwrap();
        assert_eq!(
            r.op,
            Op::ZeroFreeMemory {
                reserve_bytes: ZERO_RESERVE_DEFAULT,
                chunk_bytes: ZERO_CHUNK_DEFAULT,
                max_bytes: 0
            }
        );
        // A pong from an agent that predates `ops`.
        let old = r#"{"id":1,"ok":{"pong":{"protocol":1,"agent_version":"0.1.0",
            "uptime_ms":5,"hostname":"h","vm_id":null}}}"#;
        match serde_json::from_str::<Response>(old).unwrap().result {
            ResponseResult::Ok(Reply::Pong { ops, .. }) => assert!(ops.is_empty()),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn defaults_fill_missing_fields() {
        let r: Request = serde_json::from_str(r#"{"id":9,"op":{"exec":{"argv":["ls"]}}}"#).unwrap();
        match r.op {
            Op::Exec {
                timeout_ms,
                background,
                ..
            } => {
                assert_eq!(timeout_ms, 60_000);
                assert!(!background);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
