//! A VM that answers while its memory still streams in (early start): the
//! end of that stream, recorded.
//!
//! - Complete: the record's progress says so (stage "ready", every segment
//!   applied), stored.
//! - Failed (a segment that stayed bad, a fetch that failed for good): the
//!   guest runs on memory that cannot be trusted. The record becomes
//!   `Failed` with the cause as its error (an event on `GET /v1/events`)
//!   *before* QEMU is killed, so that the exit watch does not take the kill
//!   for a death; then QEMU is killed and the VM's files (RAM file, disk,
//!   device state) are removed. The record stays, for the operator, until
//!   deleted.

use std::sync::Arc;

use cloudlet_api::VmState;
use cloudlet_qemu::Vm;
use tokio::task::JoinHandle;

use crate::core::cloudlet::Cloudlet;
use crate::core::lifecycle::VmLifecycle;
use crate::synth::{EarlyStats, SynthesizeError};

/// What the tail of an early start ended with.
pub(crate) type TailResult = Result<EarlyStats, SynthesizeError>;

impl Cloudlet {
    /// Follows the tail of VM `id`'s early start (see the module doc). Call
    /// once the VM is recorded `Running`.
    pub(crate) fn follow_tail(
        self: &Arc<Self>,
        id: String,
        vm: Arc<Vm>,
        tail: JoinHandle<TailResult>,
    ) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let outcome = tail.await.unwrap_or_else(|e| {
                Err(SynthesizeError::EarlyStart(format!(
                    "the task streaming the memory in stopped: {e}"
                )))
            });
            match outcome {
                Ok(stats) => me.tail_complete(&id, &stats),
                Err(e) => me.tail_failed(&id, &vm, &e).await,
            }
        });
    }

    /// The memory is complete: the record's progress says so.
    fn tail_complete(&self, id: &str, stats: &EarlyStats) {
        tracing::info!(vm_id = %id, ?stats, "early start: memory complete");
        let rec = self.update(id, |e| e.record.progress = e.progress.snapshot());
        if let Some(rec) = rec {
            if let Err(e) = self.store.put(&rec) {
                tracing::warn!(vm_id = %id, "cannot record the end of the memory stream: {e}");
            }
        }
    }

    /// The memory stream failed: the VM is recorded failed with `cause`,
    /// then stopped and its files removed.
    async fn tail_failed(&self, id: &str, vm: &Vm, cause: &SynthesizeError) {
        let why = format!("Early start failed after the VM answered: {cause}");
        let rec = {
            let mut m = self.registry();
            match m.get_mut(id) {
                Some(e) if e.record.state().can_become(VmState::Failed) => {
                    e.record.set_state_or_log(VmState::Failed);
                    e.record.error = Some(why.clone());
                    e.record.progress = e.progress.snapshot();
                    e.record.progress.stage = "failed".into();
                    e.record.ports.clear();
                    e.record.pid = None;
                    e.vm = None;
                    Some(e.record.clone())
                }
                Some(e) if e.record.state() == VmState::Dead => {
                    // QEMU was gone first: keep the death, add the cause.
                    let died = e.record.error.take().unwrap_or_default();
                    e.record.error = Some(format!("{died}; {why}"));
                    Some(e.record.clone())
                }
                // Deleted (or being deleted) meanwhile: nothing to record.
                _ => None,
            }
        };
        let Some(rec) = rec else {
            tracing::info!(vm_id = %id, "early start ended after the VM was deleted: {cause}");
            return;
        };
        tracing::error!(vm_id = %id, "{why}: stopping the VM, removing its files");
        self.metrics.synthesis_failed();
        if let Err(e) = self.store.put(&rec) {
            tracing::error!(vm_id = %id, "cannot record the failure: {e}");
        }
        vm.kill().await;
        self.paths(id).remove();
    }
}
