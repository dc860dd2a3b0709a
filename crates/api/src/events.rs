//! What `GET /v1/events` tells, and the handoff history (`GET /v1/handoffs`).
//!
//! The events are server-sent events, one JSON object per `data:` line;
//! the SSE `event:` field names its kind ([`CloudletEvent::parse`]):
//!
//! - none (SSE's default `message`): a [`VmEvent`], a change of a VM's
//!   state as it is stored;
//! - `progress`: a [`ProgressEvent`], what a synthesis or a handoff out of
//!   this cloudlet is doing: one at every stage, and one every
//!   [`PROGRESS_EVERY_MS`] while its counters change; the last one of an
//!   operation has `done` set;
//! - `lagged`: this watcher fell behind; `data` is how many events it
//!   missed (the stream goes on).
//!
//! Within `/v1` these kinds and their fields are only ever added to (the
//! crate's compatibility rule): a watcher skips kinds it does not know.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{Progress, StageTiming, VmEvent};

/// How often a running operation's counters are told, at most.
pub const PROGRESS_EVERY_MS: u64 = 250;

/// The SSE event name of a [`ProgressEvent`].
pub const PROGRESS_EVENT: &str = "progress";
/// The SSE event name of a watcher's missed-events count.
pub const LAGGED_EVENT: &str = "lagged";

/// What a [`ProgressEvent`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// A VM synthesized here from its overlay (`POST /v1/vms`).
    Synthesis,
    /// A VM this cloudlet hands to another (`POST /v1/vms/{id}/handoff`).
    HandoffOut,
}

/// `event: progress` on `GET /v1/events`.
///
/// Stages, in order. A synthesis: `queued`, `fetching`, `applying` (the
/// overlay applied as it arrives), `restoring`, then `ready`; an early
/// start goes `queued`, `fetching`, `restoring`, `ready, memory streaming
/// in` (the VM answers) and `ready` once all its memory is in; `failed`
/// ends one that did not make it. A handoff out: `preparing` (the
/// destination accepts the offer), `disk` (the disk crosses while the VM
/// runs), `memory` (QEMU's precopy; `progress.iteration` is its pass),
/// `switchover` (the VM is stopped for the last pages), `committing`, and
/// `moved` (`downtime_ms` and `destination` set) or `failed` (`error` set;
/// the VM runs here again).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ProgressEvent {
    pub vm_id: String,
    pub name: String,
    pub operation: Operation,
    /// The handoff's id (both cloudlets' logs carry it); none for a
    /// synthesis.
    #[serde(default)]
    pub handoff_id: Option<String>,
    pub stage: String,
    /// The operation's last event.
    #[serde(default)]
    pub done: bool,
    /// The counters. A synthesis: `bytes_fetched` of `bytes_total`,
    /// segments. A handoff: `bytes_fetched` is the bytes sent so far,
    /// `rate_bps` the link's recent rate, `dirty_rate_bps` how fast the
    /// guest dirties its memory, `remaining_bytes` QEMU's estimate of the
    /// memory left to send.
    pub progress: Progress,
    /// Since the operation began.
    pub elapsed_ms: u64,
    /// When, ms since the Unix epoch.
    pub unix_ms: u64,
    /// A handoff that moved the VM: from the source's stop to the
    /// destination's resume.
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// A handoff: the cloudlet the VM goes to (its API URL).
    #[serde(default)]
    pub destination: Option<String>,
    /// Why it failed.
    #[serde(default)]
    pub error: Option<String>,
}

/// One point of a handoff's course, every [`PROGRESS_EVERY_MS`] or so.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HandoffSample {
    /// Since the handoff began.
    pub t_ms: u64,
    pub stage: String,
    /// Bytes sent to the destination so far.
    pub bytes_sent: u64,
    /// The link's recent rate, bits per second.
    pub rate_bps: u64,
    /// The guest's dirty rate, bytes per second (QEMU's, during `memory`).
    pub dirty_rate_bps: u64,
    /// QEMU's estimate of the memory left to send, bytes.
    pub remaining_bytes: u64,
    /// QEMU's precopy pass.
    pub iteration: u64,
}

/// How a handoff out ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HandoffOutcome {
    /// The VM runs at the destination.
    Moved,
    /// It runs here again (`error` says why).
    Failed,
}

/// A handoff out of this cloudlet, as `GET /v1/handoffs` lists it (the
/// newest first): what it moved where, how long it took, its downtime,
/// its phases and its course over time.
///
/// Kept in `HOME/handoffs.jsonl`, one record a line (format version
/// [`HANDOFF_HISTORY_VERSION`] in `version`), so that the history
/// survives a restart of the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HandoffRecord {
    /// [`HANDOFF_HISTORY_VERSION`].
    pub version: u32,
    pub handoff_id: String,
    pub vm_id: String,
    pub name: String,
    /// The destination's API URL.
    pub destination: String,
    /// When it began, ms since the Unix epoch.
    pub started_unix_ms: u64,
    pub total_ms: u64,
    pub outcome: HandoffOutcome,
    #[serde(default)]
    pub error: Option<String>,
    /// From the source's stop to the destination's resume (a move only).
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    pub wire_bytes: u64,
    pub raw_bytes: u64,
    pub disk_bytes: u64,
    /// The phases and their durations, in order.
    pub phases: Vec<StageTiming>,
    /// Since when (`t_ms`) the VM was stopped for the switchover.
    #[serde(default)]
    pub switchover_ms: Option<u64>,
    pub samples: Vec<HandoffSample>,
    /// The tenant that owns the VM (none: the operator's): a tenant lists
    /// only its own VMs' handoffs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// Version of a [`HandoffRecord`] line in `handoffs.jsonl`.
///
/// - 1: the first (session 12). `tenant` added in session 14 (absent:
///   the operator's VM), still version 1.
pub const HANDOFF_HISTORY_VERSION: u32 = 1;

/// One event of `GET /v1/events`, as a watcher reads it.
#[derive(Debug, Clone, PartialEq)]
pub enum CloudletEvent {
    Vm(VmEvent),
    Progress(ProgressEvent),
    /// The watcher missed this many events.
    Lagged(u64),
}

impl CloudletEvent {
    /// The SSE event name it is sent under (none: the default `message`).
    pub fn sse_name(&self) -> Option<&'static str> {
        match self {
            CloudletEvent::Vm(_) => None,
            CloudletEvent::Progress(_) => Some(PROGRESS_EVENT),
            CloudletEvent::Lagged(_) => Some(LAGGED_EVENT),
        }
    }

    /// Its `data:` line.
    pub fn data(&self) -> String {
        match self {
            CloudletEvent::Vm(e) => serde_json::to_string(e).unwrap_or_default(),
            CloudletEvent::Progress(e) => serde_json::to_string(e).unwrap_or_default(),
            CloudletEvent::Lagged(n) => n.to_string(),
        }
    }

    /// An SSE event by its name (`event:`, none for the default) and its
    /// data. `Ok(None)`: a kind this release does not know (skip it).
    pub fn parse(name: Option<&str>, data: &str) -> Result<Option<Self>, serde_json::Error> {
        Ok(match name {
            None | Some("message") => Some(CloudletEvent::Vm(serde_json::from_str(data)?)),
            Some(PROGRESS_EVENT) => Some(CloudletEvent::Progress(serde_json::from_str(data)?)),
            Some(LAGGED_EVENT) => Some(CloudletEvent::Lagged(data.trim().parse().unwrap_or(0))),
            Some(_) => None,
        })
    }

    /// The VM it is about.
    pub fn vm_id(&self) -> Option<&str> {
        match self {
            CloudletEvent::Vm(e) => Some(&e.vm_id),
            CloudletEvent::Progress(e) => Some(&e.vm_id),
            CloudletEvent::Lagged(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_parses_back_under_its_name() {
        let p = CloudletEvent::Progress(ProgressEvent {
            vm_id: "a1".into(),
            name: "kv".into(),
            operation: Operation::HandoffOut,
            handoff_id: Some("h".into()),
            stage: "memory".into(),
            done: false,
            progress: Progress::default(),
            elapsed_ms: 5,
            unix_ms: 6,
            downtime_ms: None,
            destination: Some("http://b".into()),
            error: None,
        });
        let back = CloudletEvent::parse(p.sse_name(), &p.data()).unwrap();
        assert_eq!(back, Some(p));
        let l = CloudletEvent::Lagged(7);
        assert_eq!(
            CloudletEvent::parse(l.sse_name(), &l.data()).unwrap(),
            Some(l)
        );
        assert_eq!(CloudletEvent::parse(Some("later"), "{}").unwrap(), None);
        assert!(CloudletEvent::parse(Some(PROGRESS_EVENT), "{").is_err());
    }
}
