//! The destination side of a handoff: the VMs arriving here
//! ([`Arrivals`]), each an explicit state machine ([`Stage`]):
//!
//! ```text
//!  prepare ──> Prepared ──stream──> Streaming ──loaded──> Ready ──commit──> Committing ──> (runs here)
//!                                       │                  ^
//!                                       └─memory differs─> Differs ──repair──> Repairing
//! ```
//!
//! - [`prepare`]: `POST /v1/handoff/prepare`: protocol, generation and base
//!   checked, the VM recorded `receiving`, QEMU started waiting for the
//!   stream;
//! - [`receive`]: `POST /v1/handoff/{id}/stream`: the session read, the
//!   disk written, QEMU fed; then [`verify`]: its memory compared with the
//!   source's digest;
//! - [`repair`]: a second session of the source's pages where it differed;
//! - [`commit`]: `POST /v1/handoff/{id}/commit`: stored, then resumed;
//! - [`Arrivals::abort`]: the arrival discarded (any failure before the
//!   commit, or the source's `abort`): QEMU killed, files removed, the
//!   record the VM had here before put back.

mod commit;
mod prepare;
mod receive;
mod repair;
mod verify;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use cloudlet_api::{HandoffArrival, HandoffCommitted};
use cloudlet_handoff::memcheck::{DiffReport, MemoryDigest};
use cloudlet_qemu::Vm;
use tokio::sync::watch;

pub use commit::commit_incoming;
pub use prepare::prepare_incoming;
pub use receive::receive_stream;

use super::ReceiveHandoffError;
use crate::core::cloudlet::Cloudlet;
use crate::core::store::VmRecord;
use crate::synth::VmPaths;

/// How long a destination waits for the next bytes of a session.
const STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a commit that came before the end of the stream waits for the
/// VM to load (the source waits 60 s for the answer).
const COMMIT_WAITS_FOR_LOAD: Duration = Duration::from_secs(50);
/// Commit answers kept for repeated commits (also stored with the VM).
const ANSWERS_KEPT: usize = 64;

/// Where an arriving VM stands. Every change goes through
/// [`Arrivals::advance`], which allows only the arrows of the module's
/// diagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stage {
    /// QEMU waits for the stream.
    Prepared,
    /// The session is being read.
    Streaming,
    /// Loaded, and its memory equals the source's (or is not verified): a
    /// commit may resume it.
    Ready,
    /// Loaded, but its memory differs from the source's: a commit is
    /// refused with this report, and the source may repair.
    Differs(DiffReport),
    /// The source's repair session is being read.
    Repairing,
    /// A commit is resuming it.
    Committing,
}

impl Stage {
    pub fn name(&self) -> &'static str {
        match self {
            Stage::Prepared => "prepared",
            Stage::Streaming => "streaming",
            Stage::Ready => "ready",
            Stage::Differs(_) => "differs",
            Stage::Repairing => "repairing",
            Stage::Committing => "committing",
        }
    }

    /// The arrows of the state machine.
    pub fn can_become(&self, next: &Stage) -> bool {
        use Stage as S;
        matches!(
            (self, next),
            (S::Prepared, S::Streaming)
                | (S::Streaming, S::Ready | S::Differs(_))
                | (S::Differs(_), S::Repairing)
                | (S::Repairing, S::Ready)
                | (S::Ready, S::Committing)
        )
    }

    /// Loaded, as `GET /v1/handoff/{id}` says.
    fn loaded(&self) -> bool {
        matches!(self, Stage::Ready | Stage::Committing)
    }
}

/// A VM arriving here.
struct Incoming {
    vm_id: String,
    vm: Arc<Vm>,
    paths: VmPaths,
    /// Session bytes read so far (`GET /v1/handoff/{id}`).
    received: Arc<AtomicU64>,
    /// Where it stands; a commit that came first waits on it (and sees the
    /// sender dropped when the arrival is discarded).
    stage: watch::Sender<Stage>,
    /// The source's memory digest and ours, kept while a repair may come.
    memory: Option<(Vec<u128>, MemoryDigest)>,
    /// The record this VM had here before (it moved away and now comes
    /// back), put back if the arrival is discarded.
    previous: Option<VmRecord>,
}

/// The handoffs arriving at this cloudlet, by handoff id, and the answers
/// to the commits it carried out.
#[derive(Default)]
pub struct Arrivals {
    incoming: Mutex<HashMap<String, Incoming>>,
    /// A source whose commit reached us but whose answer was lost retries:
    /// it must hear "committed" again (also found in the store, see
    /// `commit::committed_before`).
    answered: Mutex<VecDeque<(String, HandoffCommitted)>>,
}

/// What a phase needs of an arrival.
#[derive(Clone)]
struct Parts {
    vm_id: String,
    vm: Arc<Vm>,
    paths: VmPaths,
    received: Arc<AtomicU64>,
}

impl Arrivals {
    fn map(&self) -> MutexGuard<'_, HashMap<String, Incoming>> {
        self.incoming.lock().unwrap_or_else(|p| {
            tracing::error!("the arrivals' lock was poisoned (a panic while held): going on");
            p.into_inner()
        })
    }

    fn insert(&self, hid: String, incoming: Incoming) {
        self.map().insert(hid, incoming);
    }

    fn parts(&self, hid: &str) -> Result<Parts, ReceiveHandoffError> {
        self.map()
            .get(hid)
            .map(|i| Parts {
                vm_id: i.vm_id.clone(),
                vm: i.vm.clone(),
                paths: i.paths.clone(),
                received: i.received.clone(),
            })
            .ok_or_else(|| ReceiveHandoffError::UnknownHandoff(hid.into()))
    }

    /// The VM an arrival brings.
    pub fn vm_id(&self, hid: &str) -> Option<String> {
        self.map().get(hid).map(|i| i.vm_id.clone())
    }

    fn stage(&self, hid: &str) -> Result<Stage, ReceiveHandoffError> {
        self.map()
            .get(hid)
            .map(|i| i.stage.borrow().clone())
            .ok_or_else(|| ReceiveHandoffError::UnknownHandoff(hid.into()))
    }

    fn subscribe(&self, hid: &str) -> Result<watch::Receiver<Stage>, ReceiveHandoffError> {
        self.map()
            .get(hid)
            .map(|i| i.stage.subscribe())
            .ok_or_else(|| ReceiveHandoffError::UnknownHandoff(hid.into()))
    }

    /// Move an arrival along an arrow of the state machine (`what`: the
    /// call that wants it, for the refusal).
    fn advance(
        &self,
        hid: &str,
        what: &'static str,
        next: Stage,
    ) -> Result<(), ReceiveHandoffError> {
        let m = self.map();
        let i = m
            .get(hid)
            .ok_or_else(|| ReceiveHandoffError::UnknownHandoff(hid.into()))?;
        let now = i.stage.borrow().clone();
        if !now.can_become(&next) {
            return Err(ReceiveHandoffError::WrongStage {
                hid: hid.into(),
                stage: now.name(),
                what,
            });
        }
        i.stage.send_replace(next);
        Ok(())
    }

    /// Keep (or take back) the digests a repair needs.
    fn set_memory(&self, hid: &str, memory: Option<(Vec<u128>, MemoryDigest)>) {
        if let Some(i) = self.map().get_mut(hid) {
            i.memory = memory;
        }
    }

    fn take_memory(&self, hid: &str) -> Option<(Vec<u128>, MemoryDigest)> {
        self.map().get_mut(hid).and_then(|i| i.memory.take())
    }

    fn answered(&self, hid: &str) -> Option<HandoffCommitted> {
        let a = self.answered.lock().unwrap_or_else(|p| p.into_inner());
        a.iter().find(|(h, _)| h == hid).map(|(_, d)| d.clone())
    }

    /// The commit was carried out: its answer is kept, the arrival ends.
    fn committed(&self, hid: &str, answer: &HandoffCommitted) {
        {
            let mut a = self.answered.lock().unwrap_or_else(|p| p.into_inner());
            a.push_back((hid.to_string(), answer.clone()));
            while a.len() > ANSWERS_KEPT {
                a.pop_front();
            }
        }
        self.map().remove(hid);
    }

    /// `GET /v1/handoff/{id}`.
    pub fn arrival(&self, hid: &str) -> Result<HandoffArrival, ReceiveHandoffError> {
        self.map()
            .get(hid)
            .map(|i| HandoffArrival {
                received_bytes: i.received.load(Ordering::Relaxed),
                loaded: i.stage.borrow().loaded(),
            })
            .ok_or_else(|| ReceiveHandoffError::UnknownHandoff(hid.into()))
    }

    /// Discard an arrival (never after its commit was stored): QEMU killed,
    /// files removed, the earlier record put back.
    pub async fn abort(&self, c: &Cloudlet, hid: &str) -> Result<(), ReceiveHandoffError> {
        let inc = self
            .map()
            .remove(hid)
            .ok_or_else(|| ReceiveHandoffError::UnknownHandoff(hid.into()))?;
        inc.vm.kill().await;
        inc.paths.remove();
        forget_arrival(c, &inc.vm_id, inc.previous);
        tracing::info!(vm_id = %inc.vm_id, handoff = hid, "handoff discarded");
        Ok(())
    }
}

/// The next chunk of a session body; `None` at its end. A source behind a
/// cut link sends nothing, and nothing tells us: after a quiet spell of
/// [`STREAM_IDLE_TIMEOUT`] the session fails (and the arrival is
/// discarded).
async fn next_chunk<S, E>(body: &mut S) -> Result<Option<bytes::Bytes>, ReceiveHandoffError>
where
    S: futures::Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    use futures::StreamExt;
    let next = tokio::time::timeout(STREAM_IDLE_TIMEOUT, body.next())
        .await
        .map_err(|_| ReceiveHandoffError::Idle(STREAM_IDLE_TIMEOUT))?;
    next.transpose()
        .map_err(|e| ReceiveHandoffError::Body(e.to_string()))
}

/// An arrival that will not run here: its record goes, and the one the VM
/// had before it came back (if any) returns.
fn forget_arrival(c: &Cloudlet, vm_id: &str, previous: Option<VmRecord>) {
    match previous {
        Some(p) => {
            if let Err(e) = c.store.put(&p) {
                tracing::error!(vm_id, "restoring the VM's earlier record: {e}");
            }
            c.insert(p, None);
        }
        None => {
            let _ = c.store.delete(vm_id);
            c.registry().remove(vm_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Stage as S;

    #[test]
    fn an_arrival_moves_only_along_the_diagram() {
        let differs = S::Differs(Default::default());
        let all = [
            S::Prepared,
            S::Streaming,
            S::Ready,
            differs.clone(),
            S::Repairing,
            S::Committing,
        ];
        let allowed = [
            (S::Prepared, S::Streaming),
            (S::Streaming, S::Ready),
            (S::Streaming, differs.clone()),
            (differs.clone(), S::Repairing),
            (S::Repairing, S::Ready),
            (S::Ready, S::Committing),
        ];
        for a in &all {
            for b in &all {
                let want = allowed.iter().any(|(x, y)| x == a && y == b);
                assert_eq!(a.can_become(b), want, "{} -> {}", a.name(), b.name());
            }
        }
        // Nothing comes after a commit here: the VM runs.
        assert!(all.iter().all(|s| !S::Committing.can_become(s)));
        assert!(S::Ready.loaded() && S::Committing.loaded() && !differs.loaded());
    }
}
