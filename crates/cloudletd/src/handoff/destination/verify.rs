//! Verification of the moved memory (`cloudlet_handoff::memcheck`): the
//! destination resumes only a copy whose memory equals the source's at its
//! switchover. The memory is digested while the stream arrives and once
//! QEMU has loaded the VM; the verdict compares it with the source's
//! digest. A few differing MiB may be repaired by the source (`repair`).

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cloudlet_handoff::memcheck::{self, IncrementalDigest, MemoryDigest, RamFile};
use cloudlet_qemu::{QmpEvent, Vm};
use tokio::sync::broadcast;

use super::Stage;
use crate::core::cloudlet::Cloudlet;
use crate::handoff::{digest_name, mark, read_full, ReceiveHandoffError};

/// The source's digest of its memory at the switchover, as its frame said.
pub(super) struct SourceDigest {
    pub(super) ram_len: u64,
    pub(super) chunk_bytes: u32,
    pub(super) chunks: Vec<u128>,
}

/// What the destination found: the arrival's next stage, the digests a
/// repair needs (when it differs), and our digest's name (when equal).
pub(super) struct Verdict {
    pub(super) stage: Stage,
    pub(super) memory: Option<(Vec<u128>, MemoryDigest)>,
    pub(super) digest: Option<String>,
}

/// Compare our memory with the source's digest (`ours`: digested during
/// the load, or `None` when that did not run: digested now).
pub(super) async fn verdict(
    c: &Cloudlet,
    vm: &Vm,
    vm_id: &str,
    theirs: Option<SourceDigest>,
    ours: Option<MemoryDigest>,
) -> Result<Verdict, ReceiveHandoffError> {
    let Some(theirs) = theirs else {
        if c.config.verify_memory {
            return Err(ReceiveHandoffError::Unverified);
        }
        return Ok(Verdict {
            stage: Stage::Ready,
            memory: None,
            digest: None,
        });
    };
    if theirs.chunk_bytes as usize != memcheck::CHUNK {
        return Err(ReceiveHandoffError::DigestChunk {
            got: theirs.chunk_bytes,
            expected: memcheck::CHUNK,
        });
    }
    let ours = match ours {
        Some(d) => d,
        None => {
            let path = vm.spec().ram_path.clone();
            let d = tokio::task::spawn_blocking(move || {
                RamFile::open(&path)?.digest(memcheck::threads())
            })
            .await?
            .map_err(ReceiveHandoffError::Digest)?;
            mark(vm_id, "dst_digest_done");
            d
        }
    };
    if ours.ram_len != theirs.ram_len {
        return Err(ReceiveHandoffError::MemorySize {
            theirs: theirs.ram_len,
            ours: ours.ram_len,
        });
    }
    let diff = ours.differing_chunks(&theirs.chunks);
    if diff.is_empty() {
        tracing::info!(vm_id = %vm_id, digest = %digest_name(&ours), "moved memory verified");
        return Ok(Verdict {
            stage: Stage::Ready,
            memory: None,
            digest: Some(digest_name(&ours)),
        });
    }
    if diff.len() > memcheck::MAX_REPAIR_CHUNKS {
        return Err(ReceiveHandoffError::TooDifferent(diff.len()));
    }
    tracing::warn!(vm_id = %vm_id, chunks = ?diff, "the moved memory differs from the source's");
    Ok(Verdict {
        stage: Stage::Differs(ours.report(&diff)),
        memory: Some((theirs.chunks, ours)),
        digest: None,
    })
}

/// Bytes written into a Unix socket that its reader has not read yet
/// (`SIOCOUTQ`; counts buffer overhead too, so it errs high).
pub(super) fn socket_unread(s: &tokio::net::UnixStream) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) on our own open socket writes one int.
    let r = unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    (r == 0 && n >= 0).then_some(n as u64)
}

/// Stops a background digest when dropped (an arrival given up).
pub(super) struct StopDigestOnDrop(pub(super) std::sync::Weak<IncrementalDigest>);

impl Drop for StopDigestOnDrop {
    fn drop(&mut self) {
        if let Some(d) = self.0.upgrade() {
            d.stop();
        }
    }
}

/// Destination, once QEMU has its whole stream: wait until it has loaded
/// it (its VM stays paused until the commit), then digest its memory when
/// verifying (`ram`: the mapping kept populated meanwhile).
pub(super) async fn load_and_digest(
    c: Arc<Cloudlet>,
    vm: Arc<Vm>,
    mut events: broadcast::Receiver<QmpEvent>,
    vm_id: String,
    digest: Option<(
        Arc<IncrementalDigest>,
        tokio::task::JoinHandle<memcheck::DigestProgress>,
    )>,
) -> Result<Option<MemoryDigest>, ReceiveHandoffError> {
    vm.qmp()
        .wait_migration_woken(&mut events, Duration::from_secs(60))
        .await?;
    mark(&vm_id, "dst_qemu_loaded");
    let Some((inc, background)) = digest else {
        return Ok(None);
    };
    // QEMU has applied the whole stream: what the background digest did
    // not see is digested now.
    let t = Instant::now();
    inc.stop();
    let progress = background.await?;
    let stop_ms = t.elapsed().as_millis() as u64;
    let ahead_mib = progress.bytes >> 20;
    if c.config.handoff_test_corrupt_pages > 0 {
        // As if the stream had carried other bytes for these pages.
        let at = corrupt_pages(&vm.spec().ram_path, c.config.handoff_test_corrupt_pages)?;
        inc.touched(
            &at.iter()
                .map(|o| o / memcheck::PAGE as u64)
                .collect::<Vec<_>>(),
            u64::MAX,
        );
        tracing::warn!(vm_id = %vm_id, ?at, "test: pages of the moved memory altered");
    }
    let (d, stats) = tokio::task::spawn_blocking(move || inc.finish(progress, memcheck::threads()))
        .await?
        .map_err(ReceiveHandoffError::Digest)?;
    mark(&vm_id, "dst_digest_done");
    tracing::info!(
        vm_id = %vm_id,
        ahead_mib,
        after_load_mib = stats.chunks,
        pages_us = stats.pages_us,
        chunks_us = stats.chunks_us,
        stop_ms,
        finish_ms = t.elapsed().as_millis() as u64 - stop_ms,
        "memory digested"
    );
    Ok(Some(d))
}

/// Tests only (`handoff_test_corrupt_pages`): alter `n` pages that hold
/// data in a loaded VM's RAM file, spread over its first chunks holding
/// data (what pages QEMU lost would look like).
fn corrupt_pages(path: &Path, n: u32) -> std::io::Result<Vec<u64>> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let len = f.metadata()?.len();
    let mut done = Vec::new();
    let mut page = vec![0u8; memcheck::PAGE];
    let mut off = 0u64;
    while off < len && done.len() < n as usize {
        read_full(&f, &mut page, off)?;
        if page.iter().any(|b| *b != 0) {
            page[100] ^= 0x5a;
            f.write_all_at(&page, off)?;
            done.push(off);
            // The next in another chunk, two pages further on there.
            off = (off / memcheck::CHUNK as u64 + 1) * memcheck::CHUNK as u64
                + 2 * memcheck::PAGE as u64;
        } else {
            off += memcheck::PAGE as u64;
        }
    }
    Ok(done)
}
