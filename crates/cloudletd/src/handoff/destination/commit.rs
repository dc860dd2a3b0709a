//! `POST /v1/handoff/{id}/commit`: the source has stopped for good; run the
//! VM here. The decision is stored (record `running`, `committed_handoff`)
//! before QEMU resumes, so that a repeated commit gets "committed" again,
//! also after a restart of this daemon (which re-adopts the paused VM and
//! resumes it).
//!
//! Every refusal is definite (a 4xx: the VM did not and will not resume
//! here, the source may resume its own); a 5xx or no answer is not.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cloudlet_api::{HandoffCommitted, VmState};
use cloudlet_qemu::Vm;

use super::{Arrivals, Stage, COMMIT_WAITS_FOR_LOAD};
use crate::core::cloudlet::{Cloudlet, Entry};
use crate::handoff::{mark, mark_at, ReceiveHandoffError};

/// Destination: `POST /v1/handoff/{id}/commit`.
pub async fn commit_incoming(
    c: &Arc<Cloudlet>,
    arrivals: &Arrivals,
    hid: &str,
) -> Result<HandoffCommitted, ReceiveHandoffError> {
    if let Some(done) = arrivals.answered(hid).or_else(|| committed_before(c, hid)) {
        return Ok(done);
    }
    if let Ok(p) = arrivals.parts(hid) {
        mark(&p.vm_id, "dst_commit_arrived");
    }
    if let Some(done) = wait_until_loaded(c, arrivals, hid).await? {
        return Ok(done);
    }
    let p = arrivals.parts(hid)?;
    mark(&p.vm_id, "dst_commit_received");
    leave_incoming_state(&p.vm).await;
    // The decision, stored before the VM resumes: from here on this
    // cloudlet answers "committed" to this handoff, after a crash too.
    if let Err(e) = store_commit(c, hid, &p.vm_id, &p.vm) {
        let _ = arrivals.abort(c, hid).await;
        return Err(ReceiveHandoffError::NotCommitted(format!(
            "storing the commit failed: {e}"
        )));
    }
    if c.config.handoff_test_exit_after_commit {
        tracing::warn!(vm_id = %p.vm_id, "test: exiting right after storing the commit");
        std::process::exit(70);
    }
    let resume_us = match resume(&p.vm_id, &p.vm).await {
        Ok(us) => us,
        Err(e) => {
            // Not resumed: say a definite no, so that the source resumes
            // its own.
            let _ = arrivals.abort(c, hid).await;
            return Err(e);
        }
    };
    let rec = c
        .update(&p.vm_id, |e: &mut Entry| {
            e.record.set_state_or_log(VmState::Running);
            e.vm = Some(p.vm.clone());
        })
        .ok_or_else(|| ReceiveHandoffError::UnknownHandoff(hid.into()))?;
    let answer = HandoffCommitted {
        vm: rec.info(),
        resume_us,
    };
    arrivals.committed(hid, &answer);
    // The VM runs here now, whatever the store says: the answer must be
    // "committed" (an error would make the source resume its copy).
    if let Err(e) = c.store.put(&rec) {
        tracing::error!(vm_id = %p.vm_id, "recording the arrival: {e}");
    }
    set_clock_later(&p.vm_id, &p.vm);
    c.watch(p.vm_id.clone(), p.vm);
    tracing::info!(vm_id = %p.vm_id, "handoff committed: VM runs here");
    Ok(answer)
}

/// The source commits as soon as its QEMU has completed (stopped for good,
/// the move recorded): the stream's tail may still be on its way. Resume
/// only a VM that loaded (`Ready`, then claimed: `Committing`); an arrival
/// discarded meanwhile (a bad stream, a failed load) drops the sender: no.
/// Its memory differing from the source's: no, with the report that lets
/// the source repair it. A second commit while one runs waits for its
/// answer (returned).
async fn wait_until_loaded(
    c: &Cloudlet,
    arrivals: &Arrivals,
    hid: &str,
) -> Result<Option<HandoffCommitted>, ReceiveHandoffError> {
    let deadline = tokio::time::Instant::now() + COMMIT_WAITS_FOR_LOAD;
    let mut stage = arrivals.subscribe(hid)?;
    loop {
        let seen = tokio::time::timeout_at(
            deadline,
            stage.wait_for(|s| matches!(s, Stage::Ready | Stage::Differs(_))),
        )
        .await
        .ok()
        .and_then(|r| r.ok().map(|s| (*s).clone()));
        match seen {
            Some(Stage::Ready) => match arrivals.advance(hid, "a commit", Stage::Committing) {
                Ok(()) => return Ok(None),
                // Another commit took it first: wait for its outcome.
                Err(ReceiveHandoffError::WrongStage { .. }) => continue,
                Err(e) => return Err(e),
            },
            Some(Stage::Differs(report)) => return Err(ReceiveHandoffError::MemoryDiffers(report)),
            _ => {
                return match arrivals.answered(hid).or_else(|| committed_before(c, hid)) {
                    Some(done) => Ok(Some(done)),
                    None => Err(ReceiveHandoffError::UnknownHandoff(hid.into())),
                }
            }
        }
    }
}

/// "completed" is what the load waited for; `cont` only once QEMU has also
/// left the incoming state (its completion runs in a bottom half: a `cont`
/// before that would only set autostart, but we do not depend on that
/// ordering).
async fn leave_incoming_state(vm: &Vm) {
    for _ in 0..1000 {
        match vm.qmp().run_state().await {
            Ok(s) if s == "inmigrate" => tokio::time::sleep(Duration::from_millis(1)).await,
            _ => break,
        }
    }
}

fn store_commit(
    c: &Cloudlet,
    hid: &str,
    vm_id: &str,
    vm: &Arc<Vm>,
) -> Result<(), ReceiveHandoffError> {
    let rec = c
        .update(vm_id, |e: &mut Entry| {
            e.record.set_state_or_log(VmState::Running);
            e.record.committed_handoff = Some(hid.to_string());
            e.vm = Some(vm.clone());
        })
        .ok_or_else(|| ReceiveHandoffError::UnknownHandoff(hid.into()))?;
    c.store.put(&rec)?;
    Ok(())
}

/// `cont`, then QEMU's RESUME event (its time, µs since the epoch; 0 if
/// it does not come within 5 s).
async fn resume(vm_id: &str, vm: &Vm) -> Result<i64, ReceiveHandoffError> {
    let mut events = vm.qmp().events();
    vm.qmp()
        .cont()
        .await
        .map_err(|e| ReceiveHandoffError::NotCommitted(format!("QEMU did not resume: {e}")))?;
    mark(vm_id, "dst_cont_answered");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Ok(ev)) = tokio::time::timeout(Duration::from_millis(100), events.recv()).await {
            if ev.event == "RESUME" {
                let at = ev.timestamp.as_micros();
                mark_at(vm_id, "dst_resume_event", at);
                return Ok(at);
            }
        }
    }
    Ok(0)
}

/// Its clocks stopped while it was paused (and throttled): catch up, after
/// the answer (not part of the downtime).
fn set_clock_later(vm_id: &str, vm: &Arc<Vm>) {
    let (vm, vm_id) = (vm.clone(), vm_id.to_string());
    tokio::spawn(async move {
        let r = match vm.agent(Duration::from_secs(10)).await {
            Ok(mut a) => a.set_clock().await,
            Err(e) => Err(e),
        };
        match r {
            Ok(Some(ms)) => tracing::info!(vm_id = %vm_id, behind_ms = ms, "guest clock set"),
            Ok(None) => {}
            Err(e) => tracing::warn!(vm_id = %vm_id, "setting the guest clock: {e}"),
        }
    });
}

/// The answer to a commit this cloudlet stored before (it has restarted
/// since, or the answer left its memory).
fn committed_before(c: &Cloudlet, hid: &str) -> Option<HandoffCommitted> {
    let m = c.registry();
    let e = m
        .values()
        .find(|e| e.record.committed_handoff.as_deref() == Some(hid))?;
    Some(HandoffCommitted {
        vm: e.record.info(),
        resume_us: 0,
    })
}
