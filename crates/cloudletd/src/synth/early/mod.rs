//! Early start: the synthesized VM resumes before its overlay has arrived.
//!
//! ```text
//!  fetch (plan order: device state, segments memory pages wait on, the
//!    │     rest; a page or disk range the guest waits for pulls its segment
//!    │     ahead by a range request)
//!    ▼
//!  apply thread ── writes the launch disk in place and the launch memory
//!    │              into a staging file on the tmpfs; marks segments done
//!    ├──────────────────────────────────────────────┐
//!    ▼                                              ▼
//!  postcopy source (cloudlet_qemu::postcopy)     NBD server (cloudlet_nbd)
//!    device state + RUN as soon as the base        the disk: a request waits
//!    copy is done; then the pages the guest        until the segments of its
//!    faults on first, the others as their          range are applied
//!    segments are applied
//!                         ▼
//!                  QEMU -incoming; once every segment is applied the disk
//!                  switches to the file itself (blockdev-reopen) and the
//!                  NBD server stops
//! ```
//!
//! Synthesis answers once the app answers; the memory keeps streaming in
//! the background ("tail"). A segment that fails its hash after the guest
//! started ends the tail with an error: the VM is then killed (its launch
//! state cannot be trusted). If the whole overlay has arrived by the time
//! the app answers, the tail is awaited before synthesis answers, so a
//! corrupted overlay that arrives quickly is still refused by the request.

use std::io;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use cloudlet_overlay::{Applier, ApplyConfig, ApplyOverlayError, LaunchPlan};
use cloudlet_qemu::postcopy::{self, PageSource, PostcopyProgress, SavedState, PAGE};
use cloudlet_qemu::Vm;

use crate::synth::fetch::{FetchConfig, FetchOverlayError, SegmentFetcher};
use crate::synth::{
    app_ready, stage, vm_spec, EarlyStats, SynthProgress, SynthRequest, SynthesizeError,
    Synthesized,
};

/// The RAM block of our VMs' guest memory (the memory backend's id).
const MAIN_BLOCK: &str = "mem";

/// What the apply thread has done so far, shared with the page server.
struct Applied {
    applier: Mutex<Option<Arc<Applier>>>,
    done: Vec<AtomicBool>,
    failed: Mutex<Option<String>>,
    lock: Mutex<()>,
    changed: Condvar,
}

impl Applied {
    fn applier(&self) -> Option<Arc<Applier>> {
        self.applier.lock().ok().and_then(|a| a.clone())
    }
    fn notify(&self) {
        let _g = self.lock.lock();
        self.changed.notify_all();
    }
    fn fail(&self, why: String) {
        if let Ok(mut f) = self.failed.lock() {
            f.get_or_insert(why);
        }
        self.notify();
    }
    fn failure(&self) -> Option<String> {
        self.failed.lock().ok().and_then(|f| f.clone())
    }
    fn is_done(&self, seg: u32) -> bool {
        self.done
            .get(seg as usize)
            .is_some_and(|d| d.load(Ordering::Acquire))
    }
    fn wait(&self, timeout: Duration) {
        if let Ok(g) = self.lock.lock() {
            let _ = self.changed.wait_timeout(g, timeout);
        }
    }
}

/// Pages of the launch memory as the overlay is applied.
struct EarlyPages {
    plan: Arc<LaunchPlan>,
    st: Arc<Applied>,
    demand: crate::synth::fetch::DemandHandle,
}

impl PageSource for EarlyPages {
    fn read_page(&self, page: u64, buf: &mut [u8; PAGE]) -> io::Result<bool> {
        if let Some(why) = self.st.failure() {
            return Err(io::Error::other(why));
        }
        let Some(a) = self.st.applier() else {
            return Ok(false);
        };
        if let Some(seg) = self.plan.page_segment(page) {
            if !self.st.is_done(seg) {
                return Ok(false);
            }
        }
        a.read_memory(page * PAGE as u64, buf)?;
        Ok(true)
    }
    fn demand(&self, page: u64) {
        if let Some(seg) = self.plan.page_segment(page) {
            if !self.st.is_done(seg) {
                self.demand.demand(seg);
            }
        }
    }
}

/// The launch disk as the overlay is applied: the NBD server's gate.
struct EarlyDisk {
    plan: Arc<LaunchPlan>,
    st: Arc<Applied>,
    demand: crate::synth::fetch::DemandHandle,
}

impl EarlyDisk {
    /// The first segment `[offset, offset + len)` still waits on, if any.
    fn missing(&self, offset: u64, len: u64) -> Option<u32> {
        self.plan
            .disk_range_segments(offset, len)
            .find(|&s| !self.st.is_done(s))
    }
}

impl cloudlet_nbd::Gate for EarlyDisk {
    fn is_ready(&self, offset: u64, len: u64) -> bool {
        self.st.failure().is_none()
            && self.st.applier().is_some()
            && self.missing(offset, len).is_none()
    }
    fn wait_ready(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut demanded = Vec::new();
        loop {
            if let Some(why) = self.st.failure() {
                return Err(io::Error::other(why));
            }
            if self.st.applier().is_some() {
                match self.missing(offset, len) {
                    None => return Ok(()),
                    Some(seg) => {
                        if !demanded.contains(&seg) {
                            demanded.push(seg);
                            self.demand.demand(seg);
                        }
                    }
                }
            }
            self.st.wait(Duration::from_millis(5));
        }
    }
}

pub(crate) async fn synthesize_early(
    req: SynthRequest<'_>,
    progress: &SynthProgress,
    plan: LaunchPlan,
) -> Result<Synthesized, SynthesizeError> {
    let start = Instant::now();
    let mut timings = Vec::new();
    let io = |path: &std::path::Path, e: io::Error| SynthesizeError::Io {
        path: path.to_path_buf(),
        detail: e.to_string(),
    };
    std::fs::create_dir_all(&req.paths.dir).map_err(|e| io(&req.paths.dir, e))?;
    std::fs::create_dir_all(&req.paths.run).map_err(|e| io(&req.paths.run, e))?;
    progress.set_stage("fetching");
    let nseg = req.manifest.segments.len();
    progress
        .segments_total
        .store(nseg as u32, Ordering::Relaxed);
    progress.bytes_total.store(req.file_len, Ordering::Relaxed);
    let data_offset = req.manifest.data_offset;
    let plan = Arc::new(plan);
    // The disk is served lazily: the guest's memory matters first.
    let fetcher = SegmentFetcher::start(
        req.source.clone(),
        &req.manifest,
        &plan.memory_first_order(),
        &FetchConfig::default(),
    )?;
    let SegmentFetcher {
        segments: mut rx,
        demand,
        counters,
        task,
    } = fetcher;
    let staging = req.paths.run.join("launch-ram");
    let mut config = ApplyConfig::new(
        req.base.disk_path(),
        req.base.memory_path(),
        req.paths.disk(),
        &staging,
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
    let st = Arc::new(Applied {
        applier: Mutex::new(None),
        done: (0..nseg).map(|_| AtomicBool::new(false)).collect(),
        failed: Mutex::new(None),
        lock: Mutex::new(()),
        changed: Condvar::new(),
    });
    let manifest = req.manifest.clone();
    let apply = {
        let st = st.clone();
        tokio::task::spawn_blocking(move || {
            let r = (|| {
                let applier = Arc::new(Applier::new(manifest, &config)?);
                if let Ok(mut a) = st.applier.lock() {
                    *a = Some(applier.clone());
                }
                st.notify();
                while let Some((i, bytes)) = rx.blocking_recv() {
                    applier.apply_segment(i, &bytes)?;
                    st.done[i as usize].store(true, Ordering::Release);
                    st.notify();
                }
                Ok::<_, ApplyOverlayError>(applier)
            })();
            if let Err(e) = &r {
                st.fail(format!("overlay rejected: {e}"));
            }
            r
        })
    };
    let fetch = {
        let st = st.clone();
        tokio::spawn(async move {
            let r = task.wait().await;
            if let Err(e) = &r {
                st.fail(e.to_string());
            }
            r
        })
    };
    let parts = Parts {
        apply,
        fetch,
        st: st.clone(),
    };

    // 1. The device state.
    let device_state = loop {
        if st.failure().is_some() {
            return Err(parts.failed().await);
        }
        if let Some(ds) = st.applier().and_then(|a| a.device_state()) {
            break ds;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    timings.push(stage("device_state", start));
    let saved = match SavedState::parse(&device_state, MAIN_BLOCK) {
        Ok(s) => s,
        Err(e) => {
            parts.abort();
            return Err(SynthesizeError::EarlyStart(format!(
                "the overlay's device state: {e}"
            )));
        }
    };
    std::fs::write(req.paths.state(), &device_state).map_err(|e| io(&req.paths.state(), e))?;

    // 2. The disk server, QEMU, and the postcopy stream into it.
    progress.set_stage("restoring");
    let t = Instant::now();
    let disk_sock = req.paths.run.join("disk.sock");
    let disk_server = match cloudlet_nbd::Server::start(
        &disk_sock,
        cloudlet_nbd::Export {
            name: cloudlet_qemu::spec::LAZY_DISK_EXPORT.into(),
            path: req.paths.disk(),
            size: req.manifest.disk_size,
            gate: Arc::new(EarlyDisk {
                plan: plan.clone(),
                st: st.clone(),
                demand: demand.clone(),
            }),
        },
    ) {
        Ok(s) => s,
        Err(e) => {
            parts.abort();
            return Err(SynthesizeError::EarlyStart(e.to_string()));
        }
    };
    let mut spec = vm_spec(req.vm_id, req.base, req.paths, req.ports.clone());
    spec.lazy_disk = Some(disk_sock);
    let sock = req.paths.run.join("postcopy.sock");
    let vm = match Vm::start_postcopy(spec, &sock).await {
        Ok(vm) => vm,
        Err(e) => {
            parts.abort();
            return Err(e.into());
        }
    };
    let stream = match connect(&sock).await {
        Ok(s) => s,
        Err(e) => {
            vm.kill().await;
            parts.abort();
            return Err(SynthesizeError::EarlyStart(format!(
                "connecting to QEMU's incoming socket: {e}"
            )));
        }
    };
    let started = Arc::new(AtomicBool::new(false));
    let cancel = Arc::new(AtomicBool::new(false));
    let pc_progress = Arc::new(PostcopyProgress::default());
    let serve = {
        let pages = EarlyPages {
            plan: plan.clone(),
            st: st.clone(),
            demand,
        };
        let (st, started, cancel, pc_progress) = (
            st.clone(),
            started.clone(),
            cancel.clone(),
            pc_progress.clone(),
        );
        tokio::task::spawn_blocking(move || {
            // The guest starts once the base is copied to the outputs: its
            // disk waits per range (NBD), its memory per page.
            let base_copied = || loop {
                if let Some(why) = st.failure() {
                    return Err(why);
                }
                if st.applier().is_some() {
                    return Ok(());
                }
                st.wait(Duration::from_millis(5));
            };
            postcopy::serve(
                stream,
                &saved,
                &pages,
                base_copied,
                &started,
                &pc_progress,
                &cancel,
            )
        })
    };
    {
        let (qmp, started) = (vm.qmp().clone(), started.clone());
        tokio::spawn(async move {
            loop {
                match qmp.run_state().await.as_deref() {
                    Ok("running") => break,
                    Err(_) if qmp.is_closed() => return,
                    _ => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
            started.store(true, Ordering::Release);
        });
    }
    timings.push(stage("restore", t));

    // 3. Identity, clock, the app: while the memory streams in.
    let watcher = async {
        loop {
            let bytes = data_offset + counters.bytes.load(Ordering::Relaxed);
            progress.bytes_fetched.store(bytes, Ordering::Relaxed);
            let done = st.done.iter().filter(|d| d.load(Ordering::Relaxed)).count();
            progress
                .segments_applied
                .store(done as u32, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let ready = tokio::select! {
        r = app_ready(&vm, (req.vm_id, req.name, req.app), &mut timings) => r,
        _ = watcher => unreachable!("the watcher never ends"),
    };
    if let Err(e) = ready {
        cancel.store(true, Ordering::Relaxed);
        vm.kill().await;
        let e = match st.failure() {
            Some(_) => parts.failed().await,
            None => {
                parts.abort();
                e
            }
        };
        return Err(e);
    }
    timings.push(stage("total", start));
    tracing::info!(
        vm_id = req.vm_id,
        ms = start.elapsed().as_millis() as u64,
        pages_pushed = pc_progress.pages_sent.load(Ordering::Relaxed),
        requests = pc_progress.requests.load(Ordering::Relaxed),
        "early start: the app answers while memory streams in"
    );

    // 4. The rest of the memory, in the background.
    let qmp = vm.qmp().clone();
    let vm_spec_now = vm.spec().clone();
    let tail = {
        let staging = staging.clone();
        let st = st.clone();
        let demand_fetches = counters.clone();
        tokio::spawn(async move {
            let served = serve
                .await
                .map_err(|_| SynthesizeError::Cancelled)?
                .map_err(|e| SynthesizeError::EarlyStart(e.to_string()));
            let (applier, stats) = match served {
                Ok(stats) if st.failure().is_none() => (parts.applier().await, Some(stats)),
                Ok(_) => (Err(parts.failed().await), None),
                Err(e) => match st.failure() {
                    Some(_) => (Err(parts.failed().await), None),
                    None => {
                        parts.abort();
                        (Err(e), None)
                    }
                },
            };
            let result = async {
                let applier = applier?;
                // Every segment applied and checked; the launch hash too.
                applier.finish()?;
                // The disk file is complete: QEMU uses it directly now.
                cloudlet_qemu::vm::pivot_disk_to_file(&qmp, &vm_spec_now)
                    .await
                    .map_err(|e| {
                        SynthesizeError::EarlyStart(format!("switching the disk to its file: {e}"))
                    })?;
                let nbd = (
                    disk_server.stats().reads.load(Ordering::Relaxed),
                    disk_server.stats().writes.load(Ordering::Relaxed),
                    disk_server.stats().waited.load(Ordering::Relaxed),
                );
                disk_server.stop();
                tracing::debug!(
                    reads = nbd.0,
                    writes = nbd.1,
                    waited = nbd.2,
                    "early start: disk switched to its file"
                );
                qmp.wait_migration(Duration::from_secs(60))
                    .await
                    .map_err(|e| SynthesizeError::EarlyStart(e.to_string()))?;
                // Capabilities stay set: a later handoff of this VM must not
                // announce postcopy to a destination that does not expect it.
                qmp.set_migration_capabilities(&[("postcopy-ram", false)])
                    .await
                    .map_err(|e| SynthesizeError::EarlyStart(e.to_string()))?;
                Ok::<_, SynthesizeError>(())
            }
            .await;
            let _ = std::fs::remove_file(&staging);
            result?;
            Ok(EarlyStats {
                postcopy: stats.unwrap_or_default(),
                memory_complete_ms: start.elapsed().as_millis() as u64,
                demand_fetches: demand_fetches.demand_fetches.load(Ordering::Relaxed),
            })
        })
    };
    progress.set_stage("ready");
    // Everything already here: settle it now, so that a bad overlay fails
    // this request rather than a running VM.
    if st.done.iter().all(|d| d.load(Ordering::Acquire)) || st.failure().is_some() {
        match tail.await {
            Ok(Ok(stats)) => {
                tracing::info!(vm_id = req.vm_id, ?stats, "early start: memory complete");
                return Ok(Synthesized {
                    vm,
                    timings,
                    tail: None,
                });
            }
            Ok(Err(e)) => {
                vm.kill().await;
                return Err(e);
            }
            Err(_) => {
                vm.kill().await;
                return Err(SynthesizeError::Cancelled);
            }
        }
    }
    Ok(Synthesized {
        vm,
        timings,
        tail: Some(tail),
    })
}

/// The background tasks of one early start.
struct Parts {
    apply: tokio::task::JoinHandle<Result<Arc<Applier>, ApplyOverlayError>>,
    fetch: tokio::task::JoinHandle<Result<(), FetchOverlayError>>,
    st: Arc<Applied>,
}

impl Parts {
    fn abort(&self) {
        self.fetch.abort();
        self.st.fail("synthesis stopped".into());
    }

    /// The error that stopped the apply or the fetch (an apply error
    /// explains a fetch that stopped early, so it wins).
    async fn failed(self) -> SynthesizeError {
        self.fetch.abort();
        let apply = self.apply.await;
        let fetch = self.fetch.await;
        match (apply, fetch) {
            (Ok(Err(e)), _) => e.into(),
            (_, Ok(Err(e))) => e.into(),
            _ => SynthesizeError::EarlyStart(self.st.failure().unwrap_or_else(|| "stopped".into())),
        }
    }

    /// The applier once every segment has been applied.
    async fn applier(self) -> Result<Applier, SynthesizeError> {
        let fetched = self.fetch.await;
        let applied = self.apply.await;
        let applier = match (applied, fetched) {
            (Ok(Err(e)), _) => return Err(e.into()),
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

async fn connect(sock: &std::path::Path) -> io::Result<UnixStream> {
    let mut last = None;
    for _ in 0..500 {
        match UnixStream::connect(sock) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(last.unwrap_or_else(|| io::Error::other("no socket")))
}
