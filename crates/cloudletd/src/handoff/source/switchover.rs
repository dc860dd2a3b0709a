//! The switchover: QEMU has paused the VM before its last pass
//! (`pause-before-switchover`). The memory is final: it is digested while
//! QEMU sends the last pass; disk writes made during the handoff are sent;
//! then QEMU goes on, and the stream is read to its end.

use std::time::{Duration, Instant};

use cloudlet_qemu::{MigrationStatus, RamStats};

use super::disk::{dirty_count, dirty_extents};
use super::precopy::UNCAPPED;
use super::{Moving, Source};
use crate::handoff::events::drain_stops;
use crate::handoff::{mark, now_us, phase, HandoffError};
use crate::throttle::DutyCycle;

impl Source {
    /// QEMU paused before the switchover: from here on no pause or resume
    /// of ours may come.
    pub(super) async fn switchover(
        &mut self,
        m: &mut Moving,
        duty: &DutyCycle,
        ram: &RamStats,
        capped: bool,
    ) -> Result<(), HandoffError> {
        duty.stop().await;
        drain_stops(&mut self.events, &mut self.stop_us);
        m.digest.at_switchover(&self.id);
        self.progress.set_stage("switchover");
        self.phases.push(phase("memory_precopy", m.t_memory));
        self.switch_at = Some(Instant::now());
        tracing::info!(
            vm_id = %self.id,
            stop_us = self.stop_us,
            since_stop_ms = (now_us() - self.stop_us) / 1000,
            qemu_mbps = ram.mbps,
            remaining = ram.remaining,
            sent = m.session.sent(),
            "QEMU paused before the switchover"
        );
        mark(&self.id, "src_pre_switchover_seen");
        let q = self.vm.qmp();
        if capped {
            // QEMU lifts its limit for the last pass; so do we.
            let _ = q
                .set_migration_parameters(&super::precopy::bandwidth(UNCAPPED))
                .await;
        }
        self.carry_disk_writes(m).await?;
        q.continue_migration(MigrationStatus::PreSwitchover).await?;
        mark(&self.id, "src_migrate_continue");
        // QEMU writes its last pass now; the reader ends with it (a failure
        // shows in `end_stream`).
        Ok(())
    }

    /// The VM is stopped: send the disk writes it made during the handoff,
    /// only what the dirty bitmap recorded, or the whole disk if that
    /// cannot be read (never risk losing a write).
    async fn carry_disk_writes(&self, m: &mut Moving) -> Result<(), HandoffError> {
        let q = self.vm.qmp();
        let dirty = dirty_count(q).await;
        mark(&self.id, "src_disk_count");
        tracing::info!(vm_id = %self.id, dirty, "disk writes during the handoff");
        if dirty == 0 {
            return Ok(());
        }
        let only = match dirty_extents(q, &self.vm).await {
            Ok(e) => {
                let bytes: u64 = e.iter().map(|(a, b)| b - a).sum();
                tracing::info!(vm_id = %self.id, extents = e.len(), bytes, "dirty disk extents");
                Some(e)
            }
            Err(e) => {
                tracing::warn!(vm_id = %self.id, "dirty extents unknown, rescanning the disk: {e}");
                None
            }
        };
        mark(&self.id, "src_disk_extents");
        m.disk.send_changes(&m.session.frames()?, only).await?;
        mark(&self.id, "src_disk_queued");
        Ok(())
    }

    /// The stream read to its end and QEMU completed (the source VM is
    /// stopped for good). Returns QEMU's bytes.
    pub(super) async fn end_stream(
        &mut self,
        m: &mut Moving,
        switched: bool,
        duty: &DutyCycle,
    ) -> Result<u64, HandoffError> {
        m.session.finish_sending();
        let reader = m.reader.take().ok_or(HandoffError::NeverPaused)?;
        let raw_bytes = reader.await??;
        tracing::info!(vm_id = %self.id, after_switch_ms = self.since_switch_ms(), "stream read to the end");
        mark(&self.id, "src_reader_joined");
        self.vm
            .qmp()
            .wait_migration_woken(&mut self.events, Duration::from_secs(30))
            .await?;
        mark(&self.id, "src_qemu_completed");
        if !switched {
            return Err(HandoffError::NeverPaused);
        }
        let conv = &m.conv;
        if conv.min_duty_applied() < 1.0 {
            tracing::info!(
                vm_id = %self.id,
                throttled_ms = conv.throttled().as_millis() as u64,
                min_duty = conv.min_duty_applied(),
                pauses = duty.cycles(),
                dirty_mib_per_s = conv.dirty_rate().unwrap_or(0.0) / 1048576.0,
                link_mbit = conv.link_rate().unwrap_or(0.0) * 8e-6,
                "the guest was throttled so that its memory converged"
            );
        }
        Ok(raw_bytes)
    }

    pub(super) fn since_switch_ms(&self) -> u64 {
        self.switch_at.map_or(0, |i| i.elapsed().as_millis() as u64)
    }
}
