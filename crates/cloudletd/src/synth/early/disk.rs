//! The guest's disk in an early start: served by an NBD server
//! ([`cloudlet_nbd`]) that holds each request until the segments of its
//! range are applied; once all are, QEMU switches to the file itself.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use cloudlet_nbd::{Export, Server, StartServerError};
use cloudlet_overlay::LaunchPlan;
use cloudlet_qemu::{QmpClient, VmSpec};

use super::apply::Applied;
use crate::synth::fetch::DemandHandle;
use crate::synth::SynthesizeError;

/// The launch disk as the overlay is applied: the NBD server's gate.
pub(super) struct EarlyDisk {
    pub plan: Arc<LaunchPlan>,
    pub st: Arc<Applied>,
    pub demand: DemandHandle,
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

/// Serves the launch disk `path` (`size` bytes) on `sock`, gated.
pub(super) fn start_disk_server(
    sock: &Path,
    path: PathBuf,
    size: u64,
    gate: EarlyDisk,
) -> Result<Server, StartServerError> {
    Server::start(
        sock,
        Export {
            name: cloudlet_qemu::spec::LAZY_DISK_EXPORT.into(),
            path,
            size,
            gate: Arc::new(gate),
        },
    )
}

/// Once every segment is applied: QEMU uses the disk file directly and the
/// NBD server stops.
pub(super) async fn switch_disk_to_file(
    qmp: &QmpClient,
    spec: &VmSpec,
    disk_server: Server,
) -> Result<(), SynthesizeError> {
    cloudlet_qemu::vm::pivot_disk_to_file(qmp, spec)
        .await
        .map_err(|e| SynthesizeError::EarlyStart(format!("switching the disk to its file: {e}")))?;
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
    Ok(())
}
