//! The actuator of [`cloudlet_handoff::converge`]: pauses the source VM for
//! part of every short period with QMP `stop`/`cont`, so that its memory
//! converges over a link slower than the guest dirties it.
//!
//! Safety with respect to the switchover: QEMU refuses `cont` while it
//! completes a migration (runstate `finish-migrate`, "Migration is not
//! finalized yet"), and the handoff stops this task (and waits for it) before
//! it lets QEMU finish (`migrate-continue`) or resumes a source after a
//! failure, so no `cont` of ours can ever follow either. Commands are never
//! cancelled half-written: the task only stops between commands.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cloudlet_handoff::converge::duty_split;
use cloudlet_qemu::QmpClient;
use tokio::sync::watch;

/// One run + pause cycle: short, because a pause of ours that QEMU's
/// switchover stop falls into counts as downtime (up to one period).
pub const PERIOD: Duration = Duration::from_millis(50);

/// A running duty cycle (1.0 = the VM runs all the time).
pub struct DutyCycle {
    duty: watch::Sender<f64>,
    task: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    cycles: Arc<AtomicU64>,
}

impl DutyCycle {
    /// Starts idle (duty 1.0: no command is sent until the duty drops).
    pub fn start(q: QmpClient) -> Self {
        let (tx, rx) = watch::channel(1.0f64);
        let cycles = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(run(q, rx, cycles.clone()));
        DutyCycle {
            duty: tx,
            task: tokio::sync::Mutex::new(Some(task)),
            cycles,
        }
    }

    /// Share of each period the VM runs, in (0, 1].
    pub fn set(&self, duty: f64) {
        let duty = duty.clamp(0.001, 1.0);
        self.duty.send_if_modified(|d| {
            let changed = (*d - duty).abs() > 0.005;
            if changed {
                *d = duty;
            }
            changed
        });
    }

    /// Pause cycles done so far.
    pub fn cycles(&self) -> u64 {
        self.cycles.load(Ordering::Relaxed)
    }

    /// Stops the cycling and waits until no command of ours is in flight.
    /// The VM is left as the last command left it (paused or running): the
    /// caller decides what comes next. Idempotent.
    pub async fn stop(&self) {
        self.duty.send_replace(f64::NAN);
        if let Some(task) = self.task.lock().await.take() {
            let _ = task.await;
        }
    }
}

impl Drop for DutyCycle {
    fn drop(&mut self) {
        // The task ends at its next check; it never leaves a command half
        // written.
        self.duty.send_replace(f64::NAN);
    }
}

async fn run(q: QmpClient, mut rx: watch::Receiver<f64>, cycles: Arc<AtomicU64>) {
    let mut paused = false;
    loop {
        let duty = *rx.borrow_and_update();
        if duty.is_nan() {
            return;
        }
        if paused {
            // Refused once QEMU is completing the migration: stop cycling.
            if q.cont().await.is_err() {
                return;
            }
            paused = false;
        }
        if duty >= 0.999 {
            if rx.changed().await.is_err() {
                return;
            }
            continue;
        }
        let (run_for, pause_for) = duty_split(duty, PERIOD);
        tokio::select! {
            _ = tokio::time::sleep(run_for) => {}
            r = rx.changed() => { if r.is_err() { return; } continue; }
        }
        if rx.borrow().is_nan() {
            return;
        }
        if q.stop().await.is_err() {
            return;
        }
        paused = true;
        cycles.fetch_add(1, Ordering::Relaxed);
        tokio::select! {
            _ = tokio::time::sleep(pause_for) => {}
            r = rx.changed() => { if r.is_err() { return; } }
        }
    }
}
