//! Full synthesis: the whole overlay is applied before the VM resumes,
//! pipelined so that the network, the CPU and the disk work at the same
//! time.
//!
//! ```text
//!  fetch task ──segments──> bounded channel ──> apply thread (verify, decode, write;
//!                                                 a damaged segment fetched again: heal)
//!       (HTTP range stream)                      ▲ Applier::new copies the base
//!                                                 │ while the first segments arrive
//!  then: device state -> QEMU -incoming -> resume -> identity -> app answers
//! ```

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cloudlet_api::StageTiming;
use cloudlet_overlay::{Applier, ApplyConfig, ApplyOutput, ApplyOverlayError, Manifest};
use cloudlet_qemu::Vm;

use crate::progress::{Ending, LiveProgress};
use crate::synth::fetch::{FetchOverlayError, OverlaySource};
use crate::synth::heal::Healer;
use crate::synth::{app_ready, io_error, stage, vm_spec, SynthRequest, SynthesizeError};

/// Segments in flight between the fetch task and the apply thread.
const PIPELINE_DEPTH: usize = 8;

/// Synthesis that applies the whole overlay before the VM resumes.
pub(crate) async fn synthesize_full(
    req: SynthRequest<'_>,
    progress: &LiveProgress,
) -> Result<(Vm, Vec<StageTiming>), SynthesizeError> {
    let mut timings = Vec::new();
    let start = Instant::now();
    req.paths.create()?;
    let spec = vm_spec(&req);

    // Fetch -> apply, overlapped.
    progress.set_stage("fetching");
    let mut config = ApplyConfig::new(
        req.base.disk_path(),
        req.base.memory_path(),
        req.paths.disk(),
        req.paths.ram(),
    );
    // Every payload chunk, every base reference and every segment is checked
    // against its hash as it is applied, and the base was matched by its
    // content id (checked when it was built or imported): the extra pass that
    // rehashes the whole launch state (about 1 s for a 512 MiB VM) proves
    // nothing more here.
    config.verify_launch_state = false;
    let healer = Healer::new(req.source, &req.manifest, req.vm_id);
    let output = fetch_and_apply(
        req.manifest,
        req.source,
        req.file_len,
        config,
        healer,
        progress,
    )
    .await?;
    timings.push(stage("fetch_apply", start));
    let state = req.paths.state();
    std::fs::write(&state, &output.device_state).map_err(|e| io_error(&state, e))?;

    // Restore and hand the guest its identity.
    progress.set_stage("restoring");
    let t = Instant::now();
    let vm = Vm::restore(spec, &req.paths.state()).await?;
    timings.push(stage("restore", t));
    if let Err(e) = app_ready(&vm, (req.vm_id, req.name, req.app), &mut timings).await {
        vm.kill().await;
        return Err(e);
    }
    timings.push(stage("total", start));
    progress.finish("ready", Ending::default());
    Ok((vm, timings))
}

/// Fetches the segments of the overlay (`file_len` bytes at `source`) and
/// applies them as they arrive, reporting both in `progress`.
async fn fetch_and_apply(
    manifest: Manifest,
    source: &OverlaySource,
    file_len: u64,
    config: ApplyConfig,
    healer: Healer,
    progress: &LiveProgress,
) -> Result<ApplyOutput, SynthesizeError> {
    let data_offset = manifest.data_offset;
    let segments: Vec<(u64, u64)> = manifest
        .segments
        .iter()
        .map(|s| (s.offset, s.stored_len))
        .collect();
    progress
        .segments_total
        .store(segments.len() as u32, Ordering::Relaxed);
    progress.bytes_total.store(file_len, Ordering::Relaxed);
    progress.bytes_fetched.store(data_offset, Ordering::Relaxed);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(u32, Vec<u8>)>(PIPELINE_DEPTH);
    let mut stream = source.segments(data_offset, file_len).await?;
    let fetch = async move {
        let mut pos = 0u64;
        for (i, (off, len)) in segments.iter().enumerate() {
            if *off > pos {
                stream.read_exact(off - pos).await?; // gap: not expected, skipped
            }
            let bytes = stream.read_exact(*len).await?;
            pos = off + len;
            if tx.send((i as u32, bytes)).await.is_err() {
                break; // the apply side failed; its error wins
            }
        }
        Ok::<_, FetchOverlayError>(())
    };
    let shared = Arc::new((AtomicU64::new(data_offset), AtomicU32::new(0)));
    let shared2 = shared.clone();
    let apply = tokio::task::spawn_blocking(move || {
        let applier = Applier::new(manifest, &config)?;
        while let Some((i, bytes)) = rx.blocking_recv() {
            shared2.0.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            // A damaged segment is fetched again; one that stays bad ends
            // the apply, which stops the fetch (its channel closes).
            healer.apply(&applier, i, bytes)?;
            shared2.1.fetch_add(1, Ordering::Relaxed);
        }
        Ok::<_, SynthesizeError>(applier.finish()?)
    });
    let watcher = async {
        loop {
            progress
                .bytes_fetched
                .store(shared.0.load(Ordering::Relaxed), Ordering::Relaxed);
            let n = shared.1.load(Ordering::Relaxed);
            progress.segments_applied.store(n, Ordering::Relaxed);
            if n > 0 {
                progress.set_stage("applying");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let (fetched, applied) = tokio::select! {
        r = async { tokio::join!(fetch, apply) } => r,
        _ = watcher => unreachable!("the watcher never ends"),
    };
    progress
        .bytes_fetched
        .store(shared.0.load(Ordering::Relaxed), Ordering::Relaxed);
    progress
        .segments_applied
        .store(shared.1.load(Ordering::Relaxed), Ordering::Relaxed);
    let applied = applied.map_err(|_| SynthesizeError::Cancelled)?;
    // An apply error explains a fetch that stopped early; report it first.
    match (applied, fetched) {
        (Err(SynthesizeError::Apply(ApplyOverlayError::MissingSegments { .. })), Err(f)) => {
            Err(f.into())
        }
        (Err(e), _) => Err(e),
        (Ok(_), Err(e)) => Err(e.into()),
        (Ok(o), Ok(())) => Ok(o),
    }
}
