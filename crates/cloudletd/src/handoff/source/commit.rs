//! The commit: QEMU has completed, so the source VM is stopped for good.
//! The move is recorded (generation + 1) and the commit sent at once, while
//! the stream's tail (and the memory digest) still cross the link. The
//! destination resumes as soon as it has loaded the VM and, when
//! verifying, found its memory equal to ours (the commit waits there for
//! that), so the downtime holds no round trip of ours. A destination that
//! fails to load, or whose memory differs, refuses the commit; a few
//! differing MiB are repaired (our pages sent again) and the commit sent
//! again.

use std::time::{Duration, Instant};

use cloudlet_api::{HandoffCommitted, HandoffLoaded, HandoffReport, VmState};
use cloudlet_handoff::memcheck::{self, DiffReport, MemoryDigest, RamFile};
use cloudlet_handoff::session::{self, SESSION_MAGIC};

use super::{Moving, Source};
use crate::handoff::{digest_name, mark, phase, HandoffError};

impl Source {
    /// Record the move, commit, and on "committed" end the VM here.
    pub(super) async fn commit(
        &mut self,
        m: &mut Moving,
        raw_bytes: u64,
    ) -> Result<HandoffReport, HandoffError> {
        self.phases.push(phase("memory", m.t_memory));
        self.progress.set_stage("committing");
        let t = Instant::now();
        self.record_moved()?;
        let (r, repaired) = self.commit_and_repair(m).await;
        // The flow window's poller ran on until here: the stream's tail may
        // have waited for room in the window.
        m.session.stop_polling();
        let r = match r {
            Ok(v) => {
                tracing::info!(vm_id = %self.id, after_switch_ms = self.since_switch_ms(), "destination loaded and resumed the VM");
                self.check_digest(m, repaired).await;
                Ok(v)
            }
            Err(e @ HandoffError::CommitUnknown { .. }) => Err(e),
            // The destination's answer to the stream usually says why.
            Err(e) => match m.session.answer(Duration::from_secs(2)).await {
                Some(Err(loading)) => Err(loading),
                _ => Err(e),
            },
        };
        mark(&self.id, "src_commit_answered");
        let committed = match r {
            Ok(v) => v,
            Err(e) => return Err(self.not_committed(e)),
        };
        self.phases.push(phase("commit", t));
        if committed.vm.generation != self.rec.generation + 1 {
            tracing::warn!(vm_id = %self.id, theirs = committed.vm.generation, ours = self.rec.generation, "the destination committed another generation than the one sent");
        }
        Ok(self.complete(m, committed, raw_bytes).await)
    }

    /// Moved, generation + 1, stored before the commit goes out. Not
    /// stored: no commit goes out, the VM stays ours.
    fn record_moved(&self) -> Result<(), HandoffError> {
        let c = &self.c;
        let moved = c
            .update(&self.id, |e| {
                e.record.set_state_or_log(VmState::Moved);
                e.record.generation += 1;
                e.record.moved_to = Some(self.peer.url().to_string());
                e.record.ports.clear();
                e.record.progress = e.progress.snapshot();
            })
            .ok_or_else(|| HandoffError::NotFound(self.id.clone()))?;
        if let Err(e) = c.store.put(&moved) {
            self.unrecord_moved();
            return Err(e.into());
        }
        mark(&self.id, "src_moved_recorded");
        Ok(())
    }

    /// The move did not happen (a definite refusal): the VM is ours again,
    /// at the generation it had (in memory; the caller stores it).
    fn unrecord_moved(&self) -> Option<crate::core::store::VmRecord> {
        self.c.update(&self.id, |e| {
            if e.record.state == VmState::Moved {
                e.record.set_state_or_log(VmState::HandingOff);
                e.record.generation -= 1;
                e.record.moved_to = None;
                e.record.ports = self.rec.ports.clone();
            }
        })
    }

    /// The commit, and when the moved memory differs, the repair and the
    /// commit again. Also returns the repair's answer.
    async fn commit_and_repair(
        &self,
        m: &Moving,
    ) -> (
        Result<HandoffCommitted, HandoffError>,
        Option<HandoffLoaded>,
    ) {
        let r = self.peer.commit().await;
        let Err(HandoffError::MemoryDiffers { report, .. }) = &r else {
            return (r, None);
        };
        let (Some(ram), Some(ours)) = (m.digest.ram(), m.digest.digest.get()) else {
            return (r, None);
        };
        if !self.c.config.handoff_repair_memory {
            return (
                Err(HandoffError::NotRepaired {
                    chunks: report.chunks.len(),
                    why: "repairs are off here",
                }),
                None,
            );
        }
        match self.repair_memory(report, ours, ram).await {
            Ok((pages, answer)) => {
                tracing::warn!(
                    vm_id = %self.id,
                    chunks = report.chunks.len(),
                    pages,
                    "the moved memory differed from ours: pages repaired at the destination"
                );
                (self.peer.commit().await, Some(answer))
            }
            Err(e) => (Err(e), None),
        }
    }

    /// Send the destination our pages that differ from its copy
    /// (`memcheck::DiffReport`) as a second session: it writes them into
    /// the paused VM's RAM file, digests those chunks again and answers (an
    /// error if its memory still differs). The VM here is stopped for good:
    /// its memory is what `ours` digested. Returns the pages sent and the
    /// answer.
    async fn repair_memory(
        &self,
        report: &DiffReport,
        ours: &MemoryDigest,
        ram: &RamFile,
    ) -> Result<(usize, HandoffLoaded), HandoffError> {
        if report.chunks.len() > memcheck::MAX_REPAIR_CHUNKS {
            return Err(HandoffError::NotRepaired {
                chunks: report.chunks.len(),
                why: "too many to repair",
            });
        }
        let pages = report.pages_to_send(ours);
        let mut body = SESSION_MAGIC.to_vec();
        // Runs of consecutive pages, a frame each.
        let mut i = 0;
        while i < pages.len() {
            let mut j = i + 1;
            while j < pages.len() && pages[j] == pages[j - 1] + 1 && j - i < memcheck::CHUNK_PAGES {
                j += 1;
            }
            let mut data = Vec::with_capacity((j - i) * memcheck::PAGE);
            for p in &pages[i..j] {
                data.extend_from_slice(ram.page(*p));
            }
            body.extend(session::memory_pages_frame(
                (pages[i] * memcheck::PAGE) as u64,
                &data,
            ));
            i = j;
        }
        body.extend(session::end_frame(0));
        let answer = self.peer.repair(body).await?;
        Ok((pages.len(), answer))
    }

    /// The destination resumed only an equal copy; its answer to the
    /// stream (or to the repair) names what it found.
    async fn check_digest(&self, m: &mut Moving, repaired: Option<HandoffLoaded>) {
        let Some(ours) = m.digest.digest.get().cloned() else {
            return;
        };
        let theirs = match repaired {
            Some(a) => Some(a),
            None => m
                .session
                .answer(Duration::from_secs(5))
                .await
                .and_then(Result::ok),
        }
        .and_then(|a| a.memory_digest);
        if theirs.as_deref() == Some(digest_name(&ours).as_str()) {
            tracing::info!(vm_id = %self.id, digest = %digest_name(&ours), "moved memory verified");
        } else {
            tracing::warn!(vm_id = %self.id, ?theirs, ours = %digest_name(&ours), "the destination's answer does not confirm the memory digest");
        }
    }

    /// No commit: without a definite answer the VM may run there (it stays
    /// stopped and recorded moved here); after a definite refusal it is
    /// ours again (the rollback resumes it).
    fn not_committed(&self, e: HandoffError) -> HandoffError {
        let rec = if matches!(e, HandoffError::CommitUnknown { .. }) {
            self.c.update(&self.id, |e| {
                e.record.error = Some(
                    "The destination did not confirm the commit: the VM is stopped here and may run there".into(),
                );
            })
        } else {
            self.unrecord_moved()
        };
        if let Some(rec) = rec {
            let _ = self.c.store.put(&rec);
        }
        e
    }

    /// The VM runs there: end it here.
    async fn complete(
        &self,
        m: &Moving,
        committed: HandoffCommitted,
        raw_bytes: u64,
    ) -> HandoffReport {
        self.vm.kill().await;
        if let Some(e) = self.c.registry().get_mut(&self.id) {
            e.vm = None;
        }
        self.c.paths(&self.id).remove();
        let wire = m.session.sent();
        let raw = raw_bytes + m.disk.bytes;
        tracing::info!(vm_id = %self.id, dest = %self.peer.url(), wire, raw, "VM handed off");
        HandoffReport {
            vm: committed.vm,
            total_ms: self.start.elapsed().as_millis() as u64,
            source_stop_us: self.stop_us,
            destination_resume_us: committed.resume_us,
            wire_bytes: wire,
            raw_bytes: raw,
            disk_bytes: m.disk.bytes,
            phases: self.phases.clone(),
            destination_url: self.peer.url().to_string(),
            handoff_id: self.peer.hid().to_string(),
        }
    }
}
