//! Waiting on QEMU's migration: its MIGRATION events (capability `events`,
//! set by both sides) wake us at once; the status is still read with
//! `query-migrate`, so a lost event costs at most a poll.

use std::time::Duration;

use cloudlet_qemu::QmpEvent;
use serde_json::Value;
use tokio::sync::broadcast;

/// Wait up to `tick`, or until QEMU reports a migration state that needs an
/// answer now (`pre-switchover`, `completed`, `failed`, `cancelled`: the
/// `events` capability), remembering STOP events as `drain_stops` does. The
/// control loop no longer sleeps through the start of the downtime.
pub(super) async fn wait_tick(
    events: &mut broadcast::Receiver<QmpEvent>,
    stop_us: &mut i64,
    tick: Duration,
) {
    use broadcast::error::RecvError;
    let deadline = tokio::time::Instant::now() + tick;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) | Ok(Err(RecvError::Closed)) => return,
            Ok(Err(RecvError::Lagged(_))) => {}
            Ok(Ok(ev)) if ev.event == "STOP" => *stop_us = ev.timestamp.as_micros(),
            Ok(Ok(ev)) if ev.event == "MIGRATION" => {
                if matches!(
                    ev.data.get("status").and_then(Value::as_str),
                    Some("pre-switchover" | "completed" | "failed" | "cancelled")
                ) {
                    return;
                }
            }
            Ok(Ok(_)) => {}
        }
    }
}

/// Remember the last STOP event: with throttling the VM stops many times;
/// the downtime starts at the last stop before the switchover.
pub(super) fn drain_stops(events: &mut broadcast::Receiver<QmpEvent>, stop_us: &mut i64) {
    use broadcast::error::TryRecvError;
    loop {
        match events.try_recv() {
            Ok(ev) if ev.event == "STOP" => *stop_us = ev.timestamp.as_micros(),
            Ok(_) | Err(TryRecvError::Lagged(_)) => {}
            Err(_) => return,
        }
    }
}
