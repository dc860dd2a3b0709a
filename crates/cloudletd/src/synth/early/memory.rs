//! The guest's memory in an early start: served by postcopy
//! ([`cloudlet_qemu::postcopy`]) from the launch memory as it is applied,
//! pages the guest faults on pulled ahead.

use std::io;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cloudlet_overlay::LaunchPlan;
use cloudlet_qemu::postcopy::{
    self, PageSource, PostcopyError, PostcopyProgress, PostcopyStats, SavedState, PAGE,
};
use cloudlet_qemu::{QmpClient, Vm};
use tokio::task::JoinHandle;

use super::apply::Applied;
use crate::synth::fetch::DemandHandle;

/// The RAM block of our VMs' guest memory (the memory backend's id).
pub(super) const MAIN_BLOCK: &str = "mem";

/// Pages of the launch memory as the overlay is applied.
pub(super) struct EarlyPages {
    pub plan: Arc<LaunchPlan>,
    pub st: Arc<Applied>,
    pub demand: DemandHandle,
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

/// The postcopy stream into a starting guest.
pub(super) struct MemoryStream {
    /// The page server: its statistics once every page is in the guest.
    pub serve: JoinHandle<Result<PostcopyStats, PostcopyError>>,
    /// Set to stop the page server.
    pub cancel: Arc<AtomicBool>,
    pub progress: Arc<PostcopyProgress>,
}

/// Streams the guest's memory into `vm` over `stream` (QEMU's incoming
/// socket) on a blocking thread: the device state, RUN once the base is
/// copied, then the pages.
pub(super) fn stream_memory(
    vm: &Vm,
    stream: UnixStream,
    saved: SavedState,
    pages: EarlyPages,
) -> MemoryStream {
    let started = Arc::new(AtomicBool::new(false));
    let cancel = Arc::new(AtomicBool::new(false));
    let pc_progress = Arc::new(PostcopyProgress::default());
    let serve = {
        let (st, started, cancel, pc_progress) = (
            pages.st.clone(),
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
    mark_started_when_running(vm.qmp().clone(), started);
    MemoryStream {
        serve,
        cancel,
        progress: pc_progress,
    }
}

/// Sets `started` once QEMU reports the guest running: the page server
/// must not end its stream before (see [`postcopy::serve`]).
fn mark_started_when_running(qmp: QmpClient, started: Arc<AtomicBool>) {
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
