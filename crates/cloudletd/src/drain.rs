//! Maintenance: `POST /v1/drain` empties this cloudlet onto its
//! neighbours and keeps it empty.
//!
//! The cloudlet first stops taking work (no new VMs, no moves in; the
//! directory is told within [`crate::directory::POLL`], so searches leave
//! it out), then hands every running VM, one at a time, to the best
//! neighbour that can take it: from the directory's peers, those that take
//! work, hold the VM's base, speak this handoff protocol and have room for
//! its resources, the nearest first (then the one with the most room);
//! then the static `peers`. A neighbour that refuses (full since, or
//! draining) is followed by the next; a VM no one takes keeps running here
//! and the report says why. `DELETE /v1/drain` ends the maintenance.

use std::sync::Arc;

use cloudlet_api::directory::Registration;
use cloudlet_api::{DrainReport, DrainedVm, HandoffRequest, VmState};
use cloudlet_client::DirectoryClient;

use crate::core::cloudlet::Cloudlet;
use crate::core::store::VmRecord;

#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error("Cannot mark the cloudlet as draining: {0}")]
    Mark(#[from] std::io::Error),
}

/// Enter maintenance and move every running VM away.
pub async fn drain(c: &Arc<Cloudlet>) -> Result<DrainReport, DrainError> {
    c.set_draining(true)?;
    tracing::info!("draining: no new VMs or moves in; handing every VM to a neighbour");
    let running: Vec<VmRecord> = c
        .registry()
        .values()
        .filter(|e| e.record.state() == VmState::Running)
        .map(|e| e.record.clone())
        .collect();
    let mut vms = Vec::new();
    for rec in running {
        vms.push(move_away(c, &rec).await);
    }
    let drained = vms.iter().all(|v| v.moved_to.is_some());
    Ok(DrainReport { vms, drained })
}

/// End the maintenance.
pub fn resume(c: &Cloudlet) -> Result<(), DrainError> {
    c.set_draining(false)?;
    tracing::info!("drain ended: taking new VMs and moves in again");
    Ok(())
}

async fn move_away(c: &Arc<Cloudlet>, rec: &VmRecord) -> DrainedVm {
    let (targets, mut refusals) = neighbours(c, rec).await;
    if targets.is_empty() && refusals.is_empty() {
        refusals.push("no neighbour known (no directory, no static peers)".into());
    }
    for target in targets {
        let req = HandoffRequest {
            destination: target.clone(),
            token: None,
        };
        match crate::handoff::source::handoff_vm_recorded(c, &rec.id, req).await {
            Ok(report) => {
                let downtime = (report.destination_resume_us - report.source_stop_us) / 1000;
                tracing::info!(vm_id = %rec.id, to = %target, downtime_ms = downtime, "drained");
                return DrainedVm {
                    id: rec.id.clone(),
                    name: rec.name.clone(),
                    moved_to: Some(target),
                    downtime_ms: u64::try_from(downtime).ok(),
                    refusals,
                };
            }
            Err(e) => {
                tracing::warn!(vm_id = %rec.id, to = %target, "drain: not moved there: {e}");
                refusals.push(format!("{target}: {e}"));
            }
        }
    }
    DrainedVm {
        id: rec.id.clone(),
        name: rec.name.clone(),
        moved_to: None,
        downtime_ms: None,
        refusals,
    }
}

/// Where `rec` could go, best first (names from the directory, then the
/// static peers' URLs), and why the other known cloudlets cannot take it.
async fn neighbours(c: &Arc<Cloudlet>, rec: &VmRecord) -> (Vec<String>, Vec<String>) {
    let mut refusals = Vec::new();
    let mut fit: Vec<Registration> = Vec::new();
    if !c.config.directory.is_empty() {
        match crate::directory::credential(c) {
            Ok(token) => {
                let client = DirectoryClient::new(&c.config.directory, Some(token));
                match client.peers(&c.config.name).await {
                    Ok(list) => {
                        for r in list.peers {
                            match unfit(c, rec, &r) {
                                Some(why) => refusals.push(format!("{}: {why}", r.name)),
                                None => fit.push(r),
                            }
                        }
                    }
                    Err(e) => refusals.push(format!("the directory: {e}")),
                }
            }
            Err(e) => refusals.push(format!("the directory credential: {e}")),
        }
    }
    let here = &c.config.location;
    fit.sort_by(|a, b| {
        here.distance_km(&a.location)
            .total_cmp(&here.distance_km(&b.location))
            .then(b.free.vms.cmp(&a.free.vms))
    });
    let mut targets: Vec<String> = fit.iter().map(|r| r.name.clone()).collect();
    for p in &c.config.peers {
        let url = p.url.trim_end_matches('/');
        if !fit.iter().any(|r| r.api_url.trim_end_matches('/') == url) {
            targets.push(url.to_string());
        }
    }
    (targets, refusals)
}

/// Why the cloudlet registered as `r` cannot take `rec`, if it cannot.
fn unfit(c: &Cloudlet, rec: &VmRecord, r: &Registration) -> Option<String> {
    if !r.accepting {
        return Some("draining".into());
    }
    if r.handoff_protocol != c.handoff_protocol() {
        return Some(format!(
            "speaks handoff protocol {}, this cloudlet {}",
            r.handoff_protocol,
            c.handoff_protocol()
        ));
    }
    let holds =
        r.base_vms.iter().any(|b| b.id == rec.base_id) || r.obtainable_bases.contains(&rec.base_id);
    if !holds {
        return Some(format!("does not hold base {}", rec.base_id));
    }
    let f = &r.free;
    if f.vms == 0 || f.vcpus < rec.vcpus || f.memory_mib < rec.memory_mib {
        return Some(format!(
            "no room for {} vCPU / {} MiB (free {} vCPU, {} MiB, {} VM slots)",
            rec.vcpus, rec.memory_mib, f.vcpus, f.memory_mib, f.vms
        ));
    }
    None
}
