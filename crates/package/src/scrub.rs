//! Scrubbing the guest right before its launch state is saved, so that the
//! overlay does not ship garbage:
//!
//! 1. disk: `sync`, then `fstrim -v /`. The disk is attached with
//!    `discard=unmap` (`cloudlet_qemu::spec`), so trimmed clusters of the
//!    qcow2 top read back as zeros, and the overlay stores them as zero
//!    chunks (or not at all, where the base is zero too);
//! 2. memory: `sync` and `drop_caches=3` (clean, unmapped page cache only:
//!    the app's mapped files stay), then the agent's `zero_free_memory`
//!    leaves the free pages zero-filled.
//!
//! Each step that the guest cannot do (no `fstrim`, an agent that predates
//! `zero_free_memory`) is skipped with a note in the [`ScrubReport`]; a
//! broken agent connection is an error.

use std::time::Duration;

use cloudlet_agent_proto::{Op, Reply, ZERO_CHUNK_DEFAULT, ZERO_RESERVE_DEFAULT};
use cloudlet_qemu::{AgentClient, AgentError};
use serde::Serialize;

use crate::{PackageAppError, Result};

/// How long `fstrim` and the memory zeroing may take (TCG is slow).
const SCRUB_TIMEOUT: Duration = Duration::from_secs(300);

/// What scrubbing did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ScrubReport {
    /// Bytes `fstrim -v /` reported trimmed: the free space of the block
    /// groups that changed since their last trim (None: not trimmed, see
    /// `notes`).
    pub trimmed_bytes: Option<u64>,
    /// Whether the clean page cache was dropped.
    pub caches_dropped: bool,
    /// Bytes of free memory zero-filled (None: not zeroed, see `notes`).
    pub zeroed_bytes: Option<u64>,
    /// The guest's `MemFree` before the zeroing.
    pub mem_free_bytes: Option<u64>,
    /// Steps skipped and why.
    pub notes: Vec<String>,
}

fn agent_err(step: &'static str) -> impl FnOnce(AgentError) -> PackageAppError {
    move |source| PackageAppError::Agent { step, source }
}

/// Trims the guest's disk, drops its clean caches and zeroes its free
/// memory.
pub(crate) async fn scrub_guest(agent: &mut AgentClient) -> Result<ScrubReport> {
    let mut report = ScrubReport::default();
    agent
        .sync(false, false)
        .await
        .map_err(agent_err("syncing before fstrim"))?;

    match agent.exec(&["fstrim", "-v", "/"], SCRUB_TIMEOUT).await {
        Ok(out) if out.code == Some(0) => match parse_fstrim(&out.stdout) {
            Some(n) => report.trimmed_bytes = Some(n),
            None => report.notes.push(format!(
                "fstrim ran but its output was not understood: {:?}",
                out.stdout.trim()
            )),
        },
        Ok(out) => report.notes.push(format!(
            "fstrim -v / failed ({}): {}; the disk was not trimmed",
            out.code
                .map(|c| format!("exit status {c}"))
                .unwrap_or_else(|| "killed".into()),
            format!("{} {}", out.stdout.trim(), out.stderr.trim()).trim()
        )),
        // The agent could not start it (no fstrim in the guest) or killed
        // it at the time limit.
        Err(AgentError::Refused { message, .. }) => report.notes.push(format!(
            "fstrim could not run in the guest ({message}); the disk was not trimmed"
        )),
        Err(e) => return Err(agent_err("running fstrim")(e)),
    }

    agent
        .sync(true, false)
        .await
        .map_err(agent_err("dropping caches"))?;
    report.caches_dropped = true;

    let ops = match agent.ping().await.map_err(agent_err("asking for ops"))? {
        Reply::Pong { ops, .. } => ops,
        _ => Vec::new(),
    };
    if ops.iter().any(|o| o == "zero_free_memory") {
        let op = Op::ZeroFreeMemory {
            reserve_bytes: ZERO_RESERVE_DEFAULT,
            chunk_bytes: ZERO_CHUNK_DEFAULT,
            max_bytes: 0,
        };
        match agent
            .call_with_timeout(op, SCRUB_TIMEOUT)
            .await
            .map_err(agent_err("zeroing free memory"))?
        {
            Reply::FreeMemoryZeroed {
                zeroed_bytes,
                mem_free_bytes,
                stopped,
                ..
            } => {
                tracing::debug!(zeroed_bytes, mem_free_bytes, %stopped, "free memory zeroed");
                report.zeroed_bytes = Some(zeroed_bytes);
                report.mem_free_bytes = Some(mem_free_bytes);
            }
            other => {
                return Err(PackageAppError::Agent {
                    step: "zeroing free memory",
                    source: AgentError::Unexpected {
                        op: "zero_free_memory",
                        reply: Box::new(other),
                    },
                })
            }
        }
    } else {
        report.notes.push(
            "the base's guest agent predates zero_free_memory (rebuild the base); \
             free memory was not zeroed"
                .into(),
        );
    }
    for note in &report.notes {
        tracing::warn!("scrub: {note}");
    }
    Ok(report)
}

/// The byte count of `fstrim -v` output: util-linux prints
/// `/: 1.2 GiB (1288490188 bytes) trimmed`, busybox `/: 1288490188 bytes
/// trimmed`.
fn parse_fstrim(stdout: &str) -> Option<u64> {
    let words: Vec<&str> = stdout.split_whitespace().collect();
    words.windows(2).find_map(|w| {
        if w[1].trim_end_matches(')') == "bytes" {
            w[0].trim_start_matches('(').parse().ok()
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fstrim_output_of_util_linux_and_busybox() {
        assert_eq!(
            parse_fstrim("/: 1.2 GiB (1288490188 bytes) trimmed\n"),
            Some(1288490188)
        );
        assert_eq!(parse_fstrim("/: 0 B (0 bytes) trimmed\n"), Some(0));
        assert_eq!(parse_fstrim("/: 52428800 bytes trimmed\n"), Some(52428800));
        assert_eq!(parse_fstrim(""), None);
        assert_eq!(parse_fstrim("/: lots of bytes trimmed"), None);
    }
}
