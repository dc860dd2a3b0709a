//! Live progress of what a VM is going through (a synthesis, a handoff
//! out), and its `progress` events on `GET /v1/events`.
//!
//! The pipelines bump counters ([`LiveProgress`]'s atomics) and set stages;
//! a watched progress tells every stage at once and, every
//! [`PROGRESS_EVERY_MS`], its counters when they changed, each as a
//! [`ProgressEvent`] on the cloudlet's event channel, and keeps those
//! points as the operation's course ([`HandoffSample`]s, for the handoff
//! history and its plots). A progress nobody watches (a VM taken over
//! after a restart) only answers [`LiveProgress::snapshot`].

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use cloudlet_api::events::{
    CloudletEvent, HandoffSample, Operation, ProgressEvent, PROGRESS_EVERY_MS,
};
use cloudlet_api::Progress;
use tokio::sync::broadcast;

/// At most this many points of one operation's course are kept (about
/// 17 min at one point every 250 ms); later ones are dropped.
const MAX_SAMPLES: usize = 4096;

/// Live counters a client can follow.
#[derive(Debug, Default)]
pub struct LiveProgress {
    pub stage: Mutex<String>,
    pub bytes_fetched: AtomicU64,
    pub bytes_total: AtomicU64,
    pub segments_applied: AtomicU32,
    pub segments_total: AtomicU32,
    pub rate_bps: AtomicU64,
    pub dirty_rate_bps: AtomicU64,
    pub iteration: AtomicU64,
    pub remaining_bytes: AtomicU64,
    watch: Option<Watch>,
}

/// Who is told, about what.
#[derive(Debug)]
pub struct Watch {
    vm_id: String,
    name: String,
    operation: Operation,
    handoff_id: Option<String>,
    destination: Option<String>,
    start: Instant,
    tx: broadcast::Sender<CloudletEvent>,
    /// The counters last told, to tell only changes.
    last: Mutex<Option<Progress>>,
    samples: Mutex<Vec<HandoffSample>>,
    done: AtomicBool,
}

impl Watch {
    /// A synthesis of VM `vm_id` (`name`).
    pub fn synthesis(vm_id: &str, name: &str, tx: broadcast::Sender<CloudletEvent>) -> Watch {
        Watch::new(vm_id, name, Operation::Synthesis, None, None, tx)
    }

    /// Handoff `handoff_id` of VM `vm_id` to `destination`.
    pub fn handoff_out(
        (vm_id, name): (&str, &str),
        handoff_id: &str,
        destination: &str,
        tx: broadcast::Sender<CloudletEvent>,
    ) -> Watch {
        Watch::new(
            vm_id,
            name,
            Operation::HandoffOut,
            Some(handoff_id.to_string()),
            Some(destination.to_string()),
            tx,
        )
    }

    fn new(
        vm_id: &str,
        name: &str,
        operation: Operation,
        handoff_id: Option<String>,
        destination: Option<String>,
        tx: broadcast::Sender<CloudletEvent>,
    ) -> Watch {
        Watch {
            vm_id: vm_id.to_string(),
            name: name.to_string(),
            operation,
            handoff_id,
            destination,
            start: Instant::now(),
            tx,
            last: Mutex::new(None),
            samples: Mutex::new(Vec::new()),
            done: AtomicBool::new(false),
        }
    }
}

/// How an operation ended, for its last event.
#[derive(Debug, Default)]
pub struct Ending {
    pub downtime_ms: Option<u64>,
    pub destination: Option<String>,
    pub error: Option<String>,
}

impl LiveProgress {
    /// A progress whose stages and counters are told on `watch.tx`, at
    /// `stage` now. Its counters are looked at every [`PROGRESS_EVERY_MS`]
    /// until it is [`finish`](Self::finish)ed or dropped.
    pub fn watched(watch: Watch, stage: &str) -> Arc<LiveProgress> {
        let p = Arc::new(LiveProgress {
            watch: Some(watch),
            ..Default::default()
        });
        p.set_stage(stage);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(tick(Arc::downgrade(&p)));
        }
        p
    }

    pub fn set_stage(&self, s: &str) {
        if let Ok(mut g) = self.stage.lock() {
            *g = s.to_string();
        }
        self.tell(None);
    }

    /// The operation's last stage (`ready`, `moved`, `failed`) and how it
    /// ended: told at once, nothing told after it.
    pub fn finish(&self, stage: &str, ending: Ending) {
        if let Ok(mut g) = self.stage.lock() {
            *g = stage.to_string();
        }
        self.tell(Some(ending));
    }

    pub fn snapshot(&self) -> Progress {
        Progress {
            stage: self.stage.lock().map(|s| s.clone()).unwrap_or_default(),
            bytes_fetched: self.bytes_fetched.load(Ordering::Relaxed),
            bytes_total: self.bytes_total.load(Ordering::Relaxed),
            segments_applied: self.segments_applied.load(Ordering::Relaxed),
            segments_total: self.segments_total.load(Ordering::Relaxed),
            rate_bps: self.rate_bps.load(Ordering::Relaxed),
            dirty_rate_bps: self.dirty_rate_bps.load(Ordering::Relaxed),
            iteration: self.iteration.load(Ordering::Relaxed),
            remaining_bytes: self.remaining_bytes.load(Ordering::Relaxed),
        }
    }

    /// The points of its course so far.
    pub fn samples(&self) -> Vec<HandoffSample> {
        self.watch
            .as_ref()
            .and_then(|w| w.samples.lock().ok().map(|s| s.clone()))
            .unwrap_or_default()
    }

    /// Tell the watchers: a stage (always), the counters (when they
    /// changed), the end (`ending`, once).
    fn tell(&self, ending: Option<Ending>) {
        let Some(w) = &self.watch else { return };
        if w.done.load(Ordering::Acquire) {
            return;
        }
        let now = self.snapshot();
        let mut last = w.last.lock().unwrap_or_else(|p| p.into_inner());
        let stage_changed = last.as_ref().is_none_or(|l| l.stage != now.stage);
        if ending.is_none() && last.as_ref() == Some(&now) {
            return;
        }
        *last = Some(now.clone());
        drop(last);
        let elapsed_ms = w.start.elapsed().as_millis() as u64;
        if let Ok(mut s) = w.samples.lock() {
            if s.len() < MAX_SAMPLES || stage_changed {
                s.push(HandoffSample {
                    t_ms: elapsed_ms,
                    stage: now.stage.clone(),
                    bytes_sent: now.bytes_fetched,
                    rate_bps: now.rate_bps,
                    dirty_rate_bps: now.dirty_rate_bps,
                    remaining_bytes: now.remaining_bytes,
                    iteration: now.iteration,
                });
            }
        }
        let done = ending.is_some();
        if done {
            w.done.store(true, Ordering::Release);
        }
        let ending = ending.unwrap_or_default();
        let _ = w.tx.send(CloudletEvent::Progress(ProgressEvent {
            vm_id: w.vm_id.clone(),
            name: w.name.clone(),
            operation: w.operation,
            handoff_id: w.handoff_id.clone(),
            stage: now.stage.clone(),
            done,
            progress: now,
            elapsed_ms,
            unix_ms: unix_ms(),
            downtime_ms: ending.downtime_ms,
            destination: ending.destination.or_else(|| w.destination.clone()),
            error: ending.error,
        }));
    }

    fn finished(&self) -> bool {
        self.watch
            .as_ref()
            .is_none_or(|w| w.done.load(Ordering::Acquire))
    }
}

/// Look at the counters every [`PROGRESS_EVERY_MS`] until the operation
/// ends (or nobody holds its progress any more).
async fn tick(p: Weak<LiveProgress>) {
    let mut every = tokio::time::interval(Duration::from_millis(PROGRESS_EVERY_MS));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(p) = p.upgrade() else { return };
        if p.finished() {
            return;
        }
        p.tell(None);
    }
}

/// Now, ms since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress_of(ev: CloudletEvent) -> ProgressEvent {
        match ev {
            CloudletEvent::Progress(p) => p,
            other => panic!("not progress: {other:?}"),
        }
    }

    #[tokio::test]
    async fn stages_are_told_at_once_counters_when_they_change_and_nothing_after_the_end() {
        let (tx, mut rx) = broadcast::channel(64);
        let p = LiveProgress::watched(
            Watch::handoff_out(("v1", "kv"), "h1", "http://b", tx),
            "preparing",
        );
        let first = progress_of(rx.recv().await.unwrap());
        assert_eq!((first.stage.as_str(), first.done), ("preparing", false));
        assert_eq!(first.handoff_id.as_deref(), Some("h1"));
        p.set_stage("memory");
        assert_eq!(progress_of(rx.try_recv().unwrap()).stage, "memory");
        // Unchanged counters: the ticks tell nothing.
        tokio::time::sleep(Duration::from_millis(PROGRESS_EVERY_MS * 3)).await;
        assert!(rx.try_recv().is_err());
        p.bytes_fetched.store(1000, Ordering::Relaxed);
        let t = tokio::time::timeout(Duration::from_secs(2), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(progress_of(t).progress.bytes_fetched, 1000);
        p.finish(
            "moved",
            Ending {
                downtime_ms: Some(250),
                ..Default::default()
            },
        );
        let end = progress_of(rx.try_recv().unwrap());
        assert!(end.done);
        assert_eq!(end.downtime_ms, Some(250));
        assert_eq!(end.destination.as_deref(), Some("http://b"));
        p.set_stage("late");
        p.bytes_fetched.store(2000, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(PROGRESS_EVERY_MS * 2)).await;
        assert!(rx.try_recv().is_err(), "nothing after the end");
        let stages: Vec<_> = p.samples().into_iter().map(|s| s.stage).collect();
        assert_eq!(stages, ["preparing", "memory", "memory", "moved"]);
    }

    #[test]
    fn an_unwatched_progress_only_answers_snapshots() {
        let p = LiveProgress::default();
        p.set_stage("queued");
        p.finish("ready", Ending::default());
        assert_eq!(p.snapshot().stage, "ready");
        assert!(p.samples().is_empty());
    }
}
