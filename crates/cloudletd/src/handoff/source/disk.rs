//! The disk's side of a handoff: the chunks that differ from the base,
//! sent while the VM runs, and at the switchover the writes QEMU's dirty
//! bitmap recorded meanwhile.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cloudlet_handoff::session;
use cloudlet_qemu::dirty::DirtyExportConfig;
use cloudlet_qemu::{QmpClient, Vm};

use super::flow::FrameSender;
use crate::handoff::{read_full, HandoffError};

/// The dirty bitmap on the VM's disk (node `disk0`) that records the
/// guest's writes while it moves.
pub(super) const DIRTY_BITMAP: &str = "handoff";
/// Disk is compared with the base in chunks of this size.
const DISK_CHUNK: usize = 64 * 1024;

/// Chunks of `vm_disk` that differ from `base_disk` at the same offset,
/// considering only ranges where either holds data. `skip` gives chunks
/// already sent with the hash they had.
/// `only`: look at these byte ranges only (the writes QEMU's dirty bitmap
/// recorded) instead of every range that holds data.
fn changed_disk_chunks(
    vm_disk: &Path,
    base_disk: &Path,
    sent: &HashMap<u64, [u8; 32]>,
    only: Option<Vec<(u64, u64)>>,
) -> std::io::Result<Vec<(u64, Vec<u8>)>> {
    let vm = std::fs::File::open(vm_disk)?;
    let base = std::fs::File::open(base_disk)?;
    let len = vm.metadata()?.len();
    let mut extents = match only {
        Some(e) => e,
        None => {
            let mut e = cloudlet_sparse::data_extents(&vm, 0..len)?;
            e.extend(cloudlet_sparse::data_extents(&base, 0..len)?);
            e
        }
    };
    extents.sort();
    let mut out = Vec::new();
    let mut a = vec![0u8; DISK_CHUNK];
    let mut b = vec![0u8; DISK_CHUNK];
    let mut next = 0u64;
    for (start, end) in extents {
        let mut off = (start / DISK_CHUNK as u64) * DISK_CHUNK as u64;
        off = off.max(next);
        while off < end.min(len) {
            let n = (DISK_CHUNK as u64).min(len - off) as usize;
            read_full(&vm, &mut a[..n], off)?;
            read_full(&base, &mut b[..n], off)?;
            let h = *blake3::hash(&a[..n]).as_bytes();
            let same_as_base = a[..n] == b[..n];
            let prev = sent.get(&off);
            // Send what the destination (a copy of the base plus what we
            // sent) does not have yet.
            let dest_has = match prev {
                Some(p) => *p == h,
                None => same_as_base,
            };
            if !dest_has {
                out.push((off, a[..n].to_vec()));
            }
            off += n as u64;
        }
        next = next.max(off);
    }
    Ok(out)
}

/// The disk's side of a handoff: what differs from the base, once live and
/// again at the switchover for what was written meanwhile.
pub(super) struct DiskSync {
    vm_disk: PathBuf,
    base_disk: PathBuf,
    /// Offset -> hash of what the destination got.
    sent: HashMap<u64, [u8; 32]>,
    /// Disk bytes sent.
    pub(super) bytes: u64,
}

impl DiskSync {
    pub(super) fn new(vm_disk: PathBuf, base_disk: PathBuf) -> Self {
        Self {
            vm_disk,
            base_disk,
            sent: HashMap::new(),
            bytes: 0,
        }
    }

    /// Send what differs from what the destination has (`only`: in these
    /// byte ranges; `None`: wherever either disk holds data).
    pub(super) async fn send_changes(
        &mut self,
        frames: &FrameSender,
        only: Option<Vec<(u64, u64)>>,
    ) -> Result<(), HandoffError> {
        let (vd, bd, sent) = (
            self.vm_disk.clone(),
            self.base_disk.clone(),
            self.sent.clone(),
        );
        let chunks =
            tokio::task::spawn_blocking(move || changed_disk_chunks(&vd, &bd, &sent, only))
                .await??;
        for (off, data) in chunks {
            self.sent.insert(off, *blake3::hash(&data).as_bytes());
            self.bytes += data.len() as u64;
            frames.send(session::disk_frame(off, &data)).await?;
        }
        Ok(())
    }
}

/// The byte ranges written since the handoff began: QEMU copies the
/// clusters its dirty bitmap marks into a scratch qcow2 (`blockdev-backup
/// sync=incremental`), whose allocation map is then the answer. Runs while
/// the VM is stopped.
pub(super) async fn dirty_extents(q: &QmpClient, vm: &Vm) -> Result<Vec<(u64, u64)>, String> {
    q.export_dirty_extents(&DirtyExportConfig {
        node: "disk0".into(),
        bitmap: DIRTY_BITMAP.into(),
        scratch: vm.spec().socket_dir().join("handoff-dirty.qcow2"),
        timeout: Duration::from_secs(30),
        owner: vm.spec().confine.as_ref().and_then(|c| c.uid),
    })
    .await
    .map_err(|e| crate::error_chain(&e))
}

/// Bytes written to the disk since the handoff began (QEMU's dirty bitmap);
/// `u64::MAX` when that cannot be read, so the caller rescans rather than
/// risk losing a write.
pub(super) async fn dirty_count(q: &QmpClient) -> u64 {
    match q.dirty_bitmap_count("disk0", DIRTY_BITMAP).await {
        Ok(Some(n)) => n,
        _ => u64::MAX,
    }
}
