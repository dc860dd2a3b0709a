//! The fetch and the apply of an early start: the overlay's segments
//! (memory first) come in on the fetch task and are applied on a blocking
//! thread; [`Applied`] tells the page server and the disk server which of
//! them are done, and [`Parts`] owns the two tasks.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use cloudlet_overlay::{Applier, ApplyConfig, LaunchPlan, Manifest};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::synth::fetch::{
    DemandHandle, FetchConfig, FetchCounters, FetchOverlayError, FetchTask, SegmentFetcher,
};
use crate::synth::heal::Healer;
use crate::synth::{SynthRequest, SynthesizeError};

/// What the apply thread has done so far, shared with the page server.
pub(super) struct Applied {
    applier: Mutex<Option<Arc<Applier>>>,
    done: Vec<AtomicBool>,
    failed: Mutex<Option<String>>,
    lock: Mutex<()>,
    changed: Condvar,
}

impl Applied {
    fn new(segments: usize) -> Applied {
        Applied {
            applier: Mutex::new(None),
            done: (0..segments).map(|_| AtomicBool::new(false)).collect(),
            failed: Mutex::new(None),
            lock: Mutex::new(()),
            changed: Condvar::new(),
        }
    }
    pub(super) fn applier(&self) -> Option<Arc<Applier>> {
        self.applier.lock().ok().and_then(|a| a.clone())
    }
    fn notify(&self) {
        let _g = self.lock.lock();
        self.changed.notify_all();
    }
    pub(super) fn fail(&self, why: String) {
        if let Ok(mut f) = self.failed.lock() {
            f.get_or_insert(why);
        }
        self.notify();
    }
    pub(super) fn failure(&self) -> Option<String> {
        self.failed.lock().ok().and_then(|f| f.clone())
    }
    pub(super) fn is_done(&self, seg: u32) -> bool {
        self.done
            .get(seg as usize)
            .is_some_and(|d| d.load(Ordering::Acquire))
    }
    /// How many segments are applied (a progress figure: relaxed).
    pub(super) fn applied_count(&self) -> usize {
        self.done
            .iter()
            .filter(|d| d.load(Ordering::Relaxed))
            .count()
    }
    /// Whether every segment is applied.
    pub(super) fn all_done(&self) -> bool {
        self.done.iter().all(|d| d.load(Ordering::Acquire))
    }
    pub(super) fn wait(&self, timeout: Duration) {
        if let Ok(g) = self.lock.lock() {
            let _ = self.changed.wait_timeout(g, timeout);
        }
    }
}

/// The fetch and apply of one early start, running.
pub(super) struct Background {
    pub parts: Parts,
    pub st: Arc<Applied>,
    /// Pulls a segment ahead of the fetch order (a page or disk range the
    /// guest waits for).
    pub demand: DemandHandle,
    pub counters: Arc<FetchCounters>,
    /// The launch memory as it is applied (on the tmpfs).
    pub staging: PathBuf,
}

/// Starts fetching the overlay (memory first) and applying it.
pub(super) fn start_fetch_and_apply(
    req: &SynthRequest<'_>,
    plan: &LaunchPlan,
) -> Result<Background, SynthesizeError> {
    // The disk is served lazily: the guest's memory matters first.
    let fetcher = SegmentFetcher::start(
        req.source.clone(),
        &req.manifest,
        &plan.memory_first_order(),
        &FetchConfig::default(),
    )?;
    let SegmentFetcher {
        segments,
        demand,
        counters,
        task,
    } = fetcher;
    let staging = req.paths.run.join("launch-ram");
    let config = apply_config(req, &staging);
    let st = Arc::new(Applied::new(req.manifest.segments.len()));
    let healer = Healer::new(req.source, &req.manifest, req.vm_id);
    let apply = spawn_apply(req.manifest.clone(), config, healer, segments, st.clone());
    let fetch = spawn_fetch_wait(task, st.clone());
    let parts = Parts {
        apply,
        fetch,
        st: st.clone(),
    };
    Ok(Background {
        parts,
        st,
        demand,
        counters,
        staging,
    })
}

/// How an early start applies: in place, the launch memory into `staging`,
/// the base disk from a spare if there is one (taken here).
fn apply_config(req: &SynthRequest<'_>, staging: &Path) -> ApplyConfig {
    let mut config = ApplyConfig::new(
        req.base.disk_path(),
        req.base.memory_path(),
        req.paths.disk(),
        staging,
    );
    // As in full synthesis: every chunk is checked as it is applied.
    config.verify_launch_state = false;
    config.in_place = true;
    // The page server reads unchanged pages from the base itself: no copy
    // of the base memory before the guest can start.
    config.copy_base_memory = false;
    // And the disk: a copy made ahead of time, if there is one.
    config.disk_holds_base = req
        .spares
        .is_some_and(|s| s.take(req.base, &req.paths.disk()));
    config
}

/// The apply thread: the base copy, then each segment as it arrives (a
/// damaged one fetched again, see [`Healer`]). Its failure is told to the
/// servers and the start at once ([`Applied::fail`]).
fn spawn_apply(
    manifest: Manifest,
    config: ApplyConfig,
    healer: Healer,
    mut rx: mpsc::Receiver<(u32, Vec<u8>)>,
    st: Arc<Applied>,
) -> JoinHandle<Result<Arc<Applier>, SynthesizeError>> {
    tokio::task::spawn_blocking(move || {
        let r = (|| {
            let applier = Arc::new(Applier::new(manifest, &config)?);
            if let Ok(mut a) = st.applier.lock() {
                *a = Some(applier.clone());
            }
            st.notify();
            while let Some((i, bytes)) = rx.blocking_recv() {
                healer.apply(&applier, i, bytes)?;
                st.done[i as usize].store(true, Ordering::Release);
                st.notify();
            }
            Ok::<_, SynthesizeError>(applier)
        })();
        if let Err(e) = &r {
            st.fail(e.to_string());
        }
        r
    })
}

/// Waits for the fetch task's outcome; a failure stops the servers.
fn spawn_fetch_wait(
    task: FetchTask,
    st: Arc<Applied>,
) -> JoinHandle<Result<(), FetchOverlayError>> {
    tokio::spawn(async move {
        let r = task.wait().await;
        if let Err(e) = &r {
            st.fail(e.to_string());
        }
        r
    })
}

/// The background tasks of one early start.
pub(super) struct Parts {
    apply: JoinHandle<Result<Arc<Applier>, SynthesizeError>>,
    fetch: JoinHandle<Result<(), FetchOverlayError>>,
    st: Arc<Applied>,
}

impl Parts {
    pub(super) fn abort(&self) {
        self.fetch.abort();
        self.st.fail("synthesis stopped".into());
    }

    /// [`Parts::abort`], then `e`.
    pub(super) fn abort_with(&self, e: SynthesizeError) -> SynthesizeError {
        self.abort();
        e
    }

    /// The error that stopped the apply or the fetch (an apply error
    /// explains a fetch that stopped early, so it wins).
    pub(super) async fn failed(self) -> SynthesizeError {
        self.fetch.abort();
        let apply = self.apply.await;
        let fetch = self.fetch.await;
        match (apply, fetch) {
            (Ok(Err(e)), _) => e,
            (_, Ok(Err(e))) => e.into(),
            _ => SynthesizeError::EarlyStart(self.st.failure().unwrap_or_else(|| "stopped".into())),
        }
    }

    /// Stops after `e`: the error of the apply or the fetch if one failed
    /// (it explains `e`), else `e`.
    pub(super) async fn stop(self, e: SynthesizeError) -> SynthesizeError {
        match self.st.failure() {
            Some(_) => self.failed().await,
            None => self.abort_with(e),
        }
    }

    /// The applier once every segment has been applied.
    pub(super) async fn applier(self) -> Result<Applier, SynthesizeError> {
        let fetched = self.fetch.await;
        let applied = self.apply.await;
        let applier = match (applied, fetched) {
            (Ok(Err(e)), _) => return Err(e),
            (_, Ok(Err(e))) => return Err(e.into()),
            (Ok(Ok(a)), Ok(Ok(()))) => a,
            _ => return Err(SynthesizeError::Cancelled),
        };
        // The page server is done: ours are the last references.
        if let Ok(mut a) = self.st.applier.lock() {
            a.take();
        }
        Arc::try_unwrap(applier)
            .map_err(|_| SynthesizeError::EarlyStart("the applier is still shared".into()))
    }
}
