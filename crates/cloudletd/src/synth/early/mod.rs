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
//! the background ("tail"). A damaged segment is fetched again
//! ([`crate::synth::heal`]); one that stays bad, or a fetch that fails,
//! ends the synthesis at once:
//!
//! - before the app answered: the wait for the guest is given up (it may
//!   wait on the bad segment's pages forever) and the request fails with
//!   the cause;
//! - after: the tail ends with the cause, and the VM is recorded failed,
//!   killed and removed (`Cloudlet::follow_tail`): its launch state cannot
//!   be trusted.
//!
//! If the whole overlay has arrived by the time the app answers, the tail
//! is awaited before synthesis answers, so a corrupted overlay that arrives
//! quickly is still refused by the request. The progress is current all
//! along: "ready, memory streaming in" while the tail runs, then "ready"
//! with every segment applied.
//!
//! [`synthesize_early`] runs the phases in order; each has a file:
//!
//! - [`apply`]: fetch and apply the overlay on background tasks
//!   ([`apply::Applied`] tells the servers what is done);
//! - [`memory`]: the postcopy stream of the guest's memory;
//! - [`disk`]: the NBD server of the guest's disk, and the switch to the
//!   file;
//! - [`tail`]: after synthesis answered, the rest of the memory, the
//!   overlay checked whole, the disk switched.

mod apply;
mod disk;
mod memory;
mod tail;

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cloudlet_api::StageTiming;
use cloudlet_overlay::LaunchPlan;
use cloudlet_qemu::postcopy::SavedState;
use cloudlet_qemu::Vm;
use tokio::task::JoinHandle;

use self::apply::{start_fetch_and_apply, Applied, Background, Parts};
use self::disk::{start_disk_server, EarlyDisk};
use self::memory::{stream_memory, EarlyPages, MAIN_BLOCK};
use self::tail::Tail;
use crate::progress::LiveProgress;
use crate::synth::fetch::FetchCounters;
use crate::synth::{
    app_ready, io_error, stage, vm_spec, EarlyStats, SynthRequest, SynthesizeError, Synthesized,
    STAGE_STREAMING,
};

/// Synthesis with early start (see the module doc); `plan` says which
/// segments the memory and the disk wait on.
pub(crate) async fn synthesize_early(
    req: SynthRequest<'_>,
    progress: &Arc<LiveProgress>,
    plan: LaunchPlan,
) -> Result<Synthesized, SynthesizeError> {
    let start = Instant::now();
    let mut timings = Vec::new();
    req.paths.create()?;
    progress.set_stage("fetching");
    progress
        .segments_total
        .store(req.manifest.segments.len() as u32, Ordering::Relaxed);
    progress.bytes_total.store(req.file_len, Ordering::Relaxed);
    let plan = Arc::new(plan);
    let Background {
        parts,
        st,
        demand,
        counters,
        staging,
    } = start_fetch_and_apply(&req, &plan)?;

    // 1. The device state.
    let Some(device_state) = wait_device_state(&st).await else {
        return Err(parts.failed().await);
    };
    timings.push(stage("device_state", start));
    let saved = SavedState::parse(&device_state, MAIN_BLOCK).map_err(|e| {
        parts.abort_with(SynthesizeError::EarlyStart(format!(
            "the overlay's device state: {e}"
        )))
    })?;
    let state = req.paths.state();
    std::fs::write(&state, &device_state).map_err(|e| io_error(&state, e))?;

    // 2. The disk server, QEMU, and the postcopy stream into it.
    progress.set_stage("restoring");
    let t = Instant::now();
    let disk_sock = req.paths.run.join("disk.sock");
    let gate = EarlyDisk {
        plan: plan.clone(),
        st: st.clone(),
        demand: demand.clone(),
    };
    let disk_server = start_disk_server(&disk_sock, req.paths.disk(), req.manifest.disk_size, gate)
        .map_err(|e| parts.abort_with(SynthesizeError::EarlyStart(e.to_string())))?;
    let (vm, stream) = start_incoming(&req, disk_sock, &parts).await?;
    let pages = EarlyPages {
        plan: plan.clone(),
        st: st.clone(),
        demand,
    };
    let memory = stream_memory(&vm, stream, saved, pages);
    timings.push(stage("restore", t));

    // 3. Identity, clock, the app: while the memory streams in. A segment
    // that stays bad (or a fetch that fails) meanwhile ends this at once:
    // the guest may wait on its pages forever.
    if let Err(e) = app_ready_reporting(&vm, &req, progress, &st, &counters, &mut timings).await {
        memory.cancel.store(true, Ordering::Relaxed);
        vm.kill().await;
        return Err(parts.stop(e).await);
    }
    timings.push(stage("total", start));
    tracing::info!(
        vm_id = req.vm_id,
        ms = start.elapsed().as_millis() as u64,
        pages_pushed = memory.progress.pages_sent.load(Ordering::Relaxed),
        requests = memory.progress.requests.load(Ordering::Relaxed),
        "early start: the app answers while memory streams in"
    );

    // 4. The rest of the memory, in the background: the tail sets the
    // stage when it ends, so it is set here, before the tail exists.
    progress.set_stage(STAGE_STREAMING);
    let tail = Tail {
        serve: memory.serve,
        parts,
        st: st.clone(),
        staging,
        counters: counters.clone(),
        qmp: vm.qmp().clone(),
        spec: vm.spec().clone(),
        disk_server,
        start,
        progress: progress.clone(),
        data_offset: req.manifest.data_offset,
    }
    .spawn();
    settle_if_complete(req.vm_id, vm, timings, tail, &st).await
}

/// The overlay's device state, once the apply thread has it; None when the
/// apply or the fetch failed first.
async fn wait_device_state(st: &Applied) -> Option<Vec<u8>> {
    loop {
        if st.failure().is_some() {
            return None;
        }
        if let Some(ds) = st.applier().and_then(|a| a.device_state()) {
            return Some(ds);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// QEMU waiting for the postcopy stream (its disk on the NBD server at
/// `disk_sock`), and the stream's socket connected.
async fn start_incoming(
    req: &SynthRequest<'_>,
    disk_sock: PathBuf,
    parts: &Parts,
) -> Result<(Vm, UnixStream), SynthesizeError> {
    let mut spec = vm_spec(req);
    spec.lazy_disk = Some(disk_sock);
    let sock = req.paths.run.join("postcopy.sock");
    let vm = match Vm::start_postcopy(spec, &sock).await {
        Ok(vm) => vm,
        Err(e) => return Err(parts.abort_with(e.into())),
    };
    match connect(&sock).await {
        Ok(stream) => Ok((vm, stream)),
        Err(e) => {
            vm.kill().await;
            Err(parts.abort_with(SynthesizeError::EarlyStart(format!(
                "connecting to QEMU's incoming socket: {e}"
            ))))
        }
    }
}

/// [`app_ready`], with the fetch and apply progress reported meanwhile;
/// given up as soon as the fetch or the apply failed (the caller then
/// reports their error: [`Parts::stop`]).
async fn app_ready_reporting(
    vm: &Vm,
    req: &SynthRequest<'_>,
    progress: &LiveProgress,
    st: &Applied,
    counters: &FetchCounters,
    timings: &mut Vec<StageTiming>,
) -> Result<(), SynthesizeError> {
    let data_offset = req.manifest.data_offset;
    let watcher = async {
        loop {
            report_progress(progress, st, counters, data_offset);
            if let Some(why) = st.failure() {
                return why;
            }
            // Short: a failure ends the wait for the guest this soon.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::select! {
        r = app_ready(vm, (req.vm_id, req.name, req.app), timings) => r,
        why = watcher => {
            tracing::info!(vm_id = req.vm_id, "early start stopped before the app answered: {why}");
            Err(SynthesizeError::EarlyStart(why))
        }
    }
}

/// The fetch and apply figures of an early start into `progress`.
fn report_progress(
    progress: &LiveProgress,
    st: &Applied,
    counters: &FetchCounters,
    data_offset: u64,
) {
    let bytes = data_offset + counters.bytes.load(Ordering::Relaxed);
    progress.bytes_fetched.store(bytes, Ordering::Relaxed);
    progress
        .segments_applied
        .store(st.applied_count() as u32, Ordering::Relaxed);
}

/// The synthesized VM. If the whole overlay is already here (or failed),
/// the tail is awaited first, so that a bad overlay fails this request
/// rather than a running VM.
async fn settle_if_complete(
    vm_id: &str,
    vm: Vm,
    timings: Vec<StageTiming>,
    tail: JoinHandle<Result<EarlyStats, SynthesizeError>>,
    st: &Applied,
) -> Result<Synthesized, SynthesizeError> {
    if !(st.all_done() || st.failure().is_some()) {
        return Ok(Synthesized {
            vm,
            timings,
            tail: Some(tail),
        });
    }
    match tail.await {
        Ok(Ok(stats)) => {
            tracing::info!(vm_id, ?stats, "early start: memory complete");
            Ok(Synthesized {
                vm,
                timings,
                tail: None,
            })
        }
        Ok(Err(e)) => {
            vm.kill().await;
            Err(e)
        }
        Err(_) => {
            vm.kill().await;
            Err(SynthesizeError::Cancelled)
        }
    }
}

/// Connects to QEMU's incoming socket, which appears once QEMU is up.
async fn connect(sock: &Path) -> io::Result<UnixStream> {
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
