//! `POST /v1/handoff/prepare`: whether this cloudlet takes the VM (the
//! protocol first, then the base, the generation, the flavor, capacity),
//! then its record (`receiving`) and a QEMU that waits for the stream.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use cloudlet_api::{HandoffOffer, HandoffPrepared, VmState};
use cloudlet_qemu::{DiskFormat, Vm};
use tokio::sync::watch;

use super::{forget_arrival, Arrivals, Incoming, Stage};
use crate::core::cloudlet::Cloudlet;
use crate::core::lifecycle::VmLifecycle;
use crate::core::store::{NewVmRecord, VmRecord};
use crate::handoff::ReceiveHandoffError;
use crate::synth::VmPaths;

/// Destination: `POST /v1/handoff/prepare`.
pub async fn prepare_incoming(
    c: &Arc<Cloudlet>,
    arrivals: &Arrivals,
    offer: HandoffOffer,
) -> Result<HandoffPrepared, ReceiveHandoffError> {
    // Before anything else: a peer of another protocol gets a refusal, not
    // a QEMU that cannot read what it sends.
    let ours = c.handoff_protocol();
    if offer.protocol != ours {
        return Err(ReceiveHandoffError::Protocol {
            ours,
            theirs: offer.protocol,
        });
    }
    let base = c
        .bases
        .get_by_id(&offer.base_id)
        .map_err(|_| ReceiveHandoffError::BaseNotHeld(offer.base_id.clone()))?;
    let previous = known_here(c, &offer)?;
    let flavor = c
        .config
        .flavor(&offer.flavor)
        .or_else(|| c.config.flavor(&c.config.default_flavor))
        .cloned()
        .ok_or_else(|| crate::core::cloudlet::CreateVmError::UnknownFlavor(offer.flavor.clone()))?;
    let paths = c.paths(&offer.vm_id);
    let rec = VmRecord::new(NewVmRecord {
        id: offer.vm_id.clone(),
        name: offer.name.clone(),
        state: VmState::Receiving,
        generation: offer.generation + 1,
        base_id: offer.base_id.clone(),
        overlay: offer.overlay.clone(),
        flavor: &flavor,
        dir: paths.dir.clone(),
        app: offer.app.clone(),
    });
    let mut rec = rec;
    rec.session_hash = offer.session_hash.clone();
    // The tenant's VM here too, within its quota here.
    rec.tenant = offer.tenant.clone();
    // Over the earlier record, if any (a refusal here leaves it as it was).
    let (_progress, ports) = c.reserve(rec)?;
    let confine = c.config.confine.for_flavor(&flavor);
    let started = start_incoming(&base, &offer.vm_id, &paths, ports, confine).await;
    let vm = match started {
        Ok(vm) => Arc::new(vm),
        Err(e) => {
            paths.remove();
            forget_arrival(c, &offer.vm_id, previous);
            return Err(e);
        }
    };
    if let Some(rec) = c.update(&offer.vm_id, |e| {
        e.record.spec = Some(vm.spec().clone());
        e.record.pid = Some(vm.pid());
    }) {
        c.store.put(&rec)?;
    }
    let ports = c
        .registry()
        .get(&offer.vm_id)
        .map(|e| e.record.ports.clone());
    arrivals.insert(
        offer.handoff_id.clone(),
        Incoming {
            vm_id: offer.vm_id.clone(),
            vm,
            paths,
            received: Arc::new(AtomicU64::new(0)),
            stage: watch::Sender::new(Stage::Prepared),
            memory: None,
            previous,
        },
    );
    tracing::info!(vm_id = %offer.vm_id, handoff = %offer.handoff_id, from = %offer.source, "handoff offered");
    Ok(HandoffPrepared {
        handoff_id: offer.handoff_id,
        ports: ports.unwrap_or_default(),
    })
}

/// What this cloudlet knows of the offered VM: nothing (`None`), or a
/// record of it having moved away at a lower generation than the one
/// arriving (it comes back: the record is returned, to be put back if the
/// arrival fails). Anything else is refused: a copy that runs or is busy
/// here, or a generation not above the one recorded (a stale offer).
fn known_here(c: &Cloudlet, offer: &HandoffOffer) -> Result<Option<VmRecord>, ReceiveHandoffError> {
    let arriving = offer.generation + 1;
    let m = c.registry();
    let Some(e) = m.get(&offer.vm_id) else {
        return Ok(None);
    };
    let known = e.record.generation;
    if known >= arriving {
        return Err(ReceiveHandoffError::StaleGeneration {
            id: offer.vm_id.clone(),
            known,
            offered: arriving,
        });
    }
    if e.record.state().can_be_replaced_by_arrival() {
        Ok(Some(e.record.clone()))
    } else {
        Err(ReceiveHandoffError::Exists(offer.vm_id.clone()))
    }
}

/// A copy of the base's disk, an empty RAM file, and QEMU waiting for the
/// migration stream on a Unix socket (`migrate-in.sock`).
async fn start_incoming(
    base: &cloudlet_base::BaseVm,
    vm_id: &str,
    paths: &VmPaths,
    ports: Vec<cloudlet_qemu::PortForward>,
    confine: Option<cloudlet_qemu::confine::Confinement>,
) -> Result<Vm, ReceiveHandoffError> {
    std::fs::create_dir_all(&paths.dir)?;
    std::fs::create_dir_all(&paths.run)?;
    let (bd, dd) = (base.disk_path(), paths.disk());
    tokio::task::spawn_blocking(move || cloudlet_qemu::files::copy_sparse(&bd, &dd)).await??;
    let ram = std::fs::File::create(paths.ram())?;
    ram.set_len(base.manifest.memory_bytes())?;
    drop(ram);
    let mut spec = base.spec(vm_id, &paths.ram(), &paths.disk(), &paths.run_dir(), ports);
    spec.disk_format = DiskFormat::Raw;
    spec.confine = confine;
    let vm = Vm::start_incoming(spec).await?;
    let sock = vm.spec().socket_dir().join("migrate-in.sock");
    vm.qmp()
        .set_migration_capabilities(&[("x-ignore-shared", false), ("events", true)])
        .await?;
    vm.qmp()
        .migrate_incoming(&format!("unix:{}", sock.display()))
        .await?;
    Ok(vm)
}
