//! A handoff that failed. Before the commit was sent the VM is ours: QEMU's
//! migration is cancelled, the VM resumed, the destination told to discard
//! its copy. Once the commit was sent, only a definite refusal gives it
//! back; anything else leaves it stopped here (it may run there).

use std::time::Duration;

use cloudlet_api::VmState;
use cloudlet_qemu::{MigrationStatus, Vm};

use super::disk::DIRTY_BITMAP;
use super::Source;
use crate::handoff::HandoffError;

impl Source {
    pub(super) async fn rollback(
        self,
        err: HandoffError,
    ) -> Result<cloudlet_api::HandoffReport, HandoffError> {
        let c = &self.c;
        let id = &self.id;
        if let HandoffError::CommitUnknown { .. } = &err {
            // Never resumed without a definite refusal: it may run there.
            tracing::error!(vm_id = %id, "handoff outcome unknown, the VM stays stopped here: {err}");
            return Err(err);
        }
        // Recorded moved: the commit was sent (a timeout cut it short), so
        // the VM may run there: never resumed here.
        let moved = c
            .registry()
            .get(id)
            .is_none_or(|e| e.record.state() == VmState::Moved);
        if moved {
            tracing::error!(vm_id = %id, "handoff cut short after its commit was sent, the VM stays stopped here: {err}");
            if let Some(rec) = c.update(id, |e| {
                e.record.error = Some(format!(
                    "The handoff was cut short after its commit was sent: the VM is stopped here and may run there ({err})"
                ));
            }) {
                let _ = c.store.put(&rec);
            }
            return Err(HandoffError::CommitUnknown {
                url: self.peer.url().to_string(),
                detail: err.to_string(),
            });
        }
        tracing::warn!(vm_id = %id, "handoff failed, the VM stays here: {err}");
        recover_source(&self.vm).await;
        if let Some(rec) = c.update(id, |e| {
            e.record.set_state_or_log(VmState::Running);
            e.record.error = Some(format!("Last handoff failed: {err}"));
        }) {
            let _ = c.store.put(&rec);
        }
        self.peer.abort_in_background();
        Err(err)
    }
}

/// Put the source VM back to running after a failed handoff.
async fn recover_source(vm: &Vm) {
    use MigrationStatus as M;
    let q = vm.qmp();
    let _ = q.cancel_migration().await;
    for _ in 0..50 {
        let st = q.query_migrate().await.ok().map(|i| i.status);
        if !matches!(
            st,
            Some(M::Active | M::PreSwitchover | M::Device | M::Cancelling)
        ) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = q.remove_dirty_bitmap("disk0", DIRTY_BITMAP).await;
    if let Ok(s) = q.run_state().await {
        if s != "running" {
            let _ = q.cont().await;
        }
    }
}
