//! The tail of an early start: after synthesis answered, the rest of the
//! memory streams in; then the overlay is checked whole, the disk switches
//! to its file and the migration capabilities are reset. Its progress is
//! kept current all along: the segments as they are applied, then "ready"
//! (or "failed") the moment it ends.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cloudlet_nbd::Server;
use cloudlet_overlay::Applier;
use cloudlet_qemu::postcopy::{PostcopyError, PostcopyStats};
use cloudlet_qemu::{QmpClient, VmSpec};
use tokio::task::JoinHandle;

use super::apply::{Applied, Parts};
use super::disk::switch_disk_to_file;
use super::report_progress;
use crate::progress::{Ending, LiveProgress};
use crate::synth::fetch::FetchCounters;
use crate::synth::{EarlyStats, SynthesizeError};

/// What the tail takes over from the start.
pub(super) struct Tail {
    /// The page server.
    pub serve: JoinHandle<Result<PostcopyStats, PostcopyError>>,
    pub parts: Parts,
    pub st: Arc<Applied>,
    pub staging: PathBuf,
    pub counters: Arc<FetchCounters>,
    pub qmp: QmpClient,
    pub spec: VmSpec,
    pub disk_server: Server,
    /// When the synthesis request came.
    pub start: Instant,
    /// The VM's progress, kept current.
    pub progress: Arc<LiveProgress>,
    /// Where the overlay's segments begin (progress counts the whole file).
    pub data_offset: u64,
}

impl Tail {
    /// Runs the tail on a task of its own; on error the VM must be killed.
    pub(super) fn spawn(self) -> JoinHandle<Result<EarlyStats, SynthesizeError>> {
        let Tail {
            serve,
            parts,
            st,
            staging,
            counters: demand_fetches,
            qmp,
            spec: vm_spec_now,
            disk_server,
            start,
            progress,
            data_offset,
        } = self;
        let (st2, counters) = (st.clone(), demand_fetches.clone());
        let work = async move {
            let served = serve
                .await
                .map_err(|_| SynthesizeError::Cancelled)?
                .map_err(|e| SynthesizeError::EarlyStart(e.to_string()));
            let (applier, stats) = match served {
                Ok(stats) if st.failure().is_none() => (parts.applier().await, Some(stats)),
                Ok(_) => (Err(parts.failed().await), None),
                Err(e) => (Err(parts.stop(e).await), None),
            };
            let result = finish(applier, &qmp, &vm_spec_now, disk_server).await;
            let _ = std::fs::remove_file(&staging);
            result?;
            Ok(EarlyStats {
                postcopy: stats.unwrap_or_default(),
                memory_complete_ms: start.elapsed().as_millis() as u64,
                demand_fetches: demand_fetches.demand_fetches.load(Ordering::Relaxed),
            })
        };
        tokio::spawn(async move {
            let watcher = async {
                loop {
                    report_progress(&progress, &st2, &counters, data_offset);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            };
            let r = tokio::select! {
                r = work => r,
                _ = watcher => unreachable!("the watcher never ends"),
            };
            report_progress(&progress, &st2, &counters, data_offset);
            let error = r.as_ref().err().map(|e: &SynthesizeError| e.to_string());
            let stage = if error.is_none() { "ready" } else { "failed" };
            progress.finish(
                stage,
                Ending {
                    error,
                    ..Ending::default()
                },
            );
            r
        })
    }
}

/// Once the last page is in the guest: the whole overlay checked, the disk
/// on its file, postcopy off.
async fn finish(
    applier: Result<Applier, SynthesizeError>,
    qmp: &QmpClient,
    vm_spec_now: &VmSpec,
    disk_server: Server,
) -> Result<(), SynthesizeError> {
    let applier = applier?;
    // Every segment applied and checked; the launch hash too.
    applier.finish()?;
    // The disk file is complete: QEMU uses it directly now.
    switch_disk_to_file(qmp, vm_spec_now, disk_server).await?;
    qmp.wait_migration(Duration::from_secs(60))
        .await
        .map_err(|e| SynthesizeError::EarlyStart(e.to_string()))?;
    // Capabilities stay set: a later handoff of this VM must not
    // announce postcopy to a destination that does not expect it.
    qmp.set_migration_capabilities(&[("postcopy-ram", false)])
        .await
        .map_err(|e| SynthesizeError::EarlyStart(e.to_string()))?;
    Ok(())
}
