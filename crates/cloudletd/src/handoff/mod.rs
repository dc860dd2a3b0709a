//! Live VM handoff between cloudlets. The wire protocol (session frames) is
//! documented in `cloudlet_handoff::session`; its version is
//! [`cloudlet_api::HANDOFF_PROTOCOL`], sent in the offer and checked by the
//! destination before anything starts. The layout, and the two state
//! machines below, are drawn in `docs/design/001-daemon-lifecycle-and-handoff.md`.
//!
//! - [`source`]: `POST /v1/vms/{id}/handoff`, a [`source::Source`] with one
//!   method per phase;
//! - [`destination`]: the `/v1/handoff/...` calls of an arriving VM, an
//!   explicit state machine ([`destination::Stage`]);
//! - [`peer`]: the source's HTTP client for the destination (the only
//!   place of the handoff that speaks HTTP);
//! - [`events`]: waiting on QEMU's migration events.
//!
//! Source, phase by phase (`source/`):
//!
//! ```text
//!  offer ──> disk (live) ──> memory (QEMU -> encoder -> session) ──> precopy
//!    │         steer: throttle the guest, cap QEMU, drain the link, release
//!    v
//!  switchover (QEMU paused: digest the RAM, disk writes made meanwhile,
//!    │         continue) ──> stream end ──> record Moved (generation + 1)
//!    v
//!  commit (until a definite answer; a memory difference is repaired first)
//!    ├─ committed ──────────> VM killed here, files removed
//!    ├─ definite refusal ───> rollback: record Running, QEMU resumed,
//!    │                        destination told to abort
//!    └─ no definite answer ─> stays stopped here (`commit_unknown`)
//! ```
//!
//! Any failure before the commit was sent resumes the source; after it was
//! sent, only a definite refusal (a 4xx with the API's error body) does.
//!
//! Destination ([`destination::Stage`]):
//!
//! ```text
//!  prepare ──> Prepared ──stream──> Streaming ──loaded──> Ready ──commit──> Committing ──> (Running)
//!                                        │                  ^
//!                                        └──memory differs──> Differs ──repair──> Repairing
//!  abort, a bad stream, a failed load or repair: discarded (the earlier record put back)
//! ```
//!
//! The destination stores its commit (record Running, `committed_handoff`)
//! before the VM resumes, and answers a repeated commit from the store,
//! after a restart too.

pub mod destination;
mod error;
mod events;
pub mod peer;
pub mod source;

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use cloudlet_api::StageTiming;
use cloudlet_handoff::memcheck::MemoryDigest;
use cloudlet_handoff::BaseMemory;

pub use destination::Arrivals;
pub use error::{HandoffError, ReceiveHandoffError};

/// A phase's timing, for the report.
fn phase(name: &str, since: Instant) -> StageTiming {
    StageTiming {
        stage: name.into(),
        ms: since.elapsed().as_millis() as u64,
    }
}

/// A task that ends with its owner.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn read_full(f: &std::fs::File, buf: &mut [u8], off: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = f.read_at(&mut buf[done..], off + done as u64)?;
        if n == 0 {
            buf[done..].fill(0);
            break;
        }
        done += n;
    }
    Ok(())
}

/// How a memory digest is named in answers and logs.
fn digest_name(d: &MemoryDigest) -> String {
    format!("xxh3-128:{:032x}", d.root())
}

/// Drop after the switchover: the codec holds the base's memory (1 GiB
/// here). Freeing it takes ~70 ms and holds the process's memory map lock
/// meanwhile, which stalled the daemon's other threads (the waiting commit
/// woke 58 ms late) even when it ran on a blocking thread.
fn drop_later<T: Send + 'static>(x: T) {
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(5)).await;
        // Detached: the blocking pool frees it.
        drop(tokio::task::spawn_blocking(move || drop(x)));
    });
}

/// A timestamp on the way through the switchover (host clock, µs), so that
/// the downtime can be split into phases from both daemons' logs (the
/// events with message "downtime mark"; `handoff-bench` reads them from the
/// daemons' JSON logs).
fn mark(vm_id: &str, what: &str) {
    mark_at(vm_id, what, now_us());
}

fn mark_at(vm_id: &str, what: &str, at_us: i64) {
    tracing::info!(vm_id = %vm_id, at_us, what, "downtime mark");
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// The base VM's memory as the codec's dedup source (block `mem`).
fn base_memory(base: &cloudlet_base::BaseVm) -> std::io::Result<BaseMemory> {
    let data = std::fs::read(base.memory_path())?;
    let id = BaseMemory::content_id(&data);
    Ok(BaseMemory::new(data, "mem", id))
}
