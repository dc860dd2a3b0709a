//! Domain commands: what the REST API may ask ([`CloudletOps`]), carried
//! out on the cloudlet's core ([`crate::core`]), its synthesis
//! ([`crate::synth`]) and its handoffs ([`crate::handoff`]). The flow is one
//! way: `api` -> `commands` -> core, synthesis, handoff -> QEMU.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use cloudlet_api::{AppInfo, BaseVmInfo, CloudletInfo, CreateVmRequest, VmInfo, VmState};

use crate::core::cloudlet::{
    base_info, holds_resources, key_of, valid_name, BaseOpError, Cloudlet, CreateVmError, Entry,
    VmOpError,
};
use crate::core::lifecycle::VmLifecycle;
use crate::core::store::{NewVmRecord, VmRecord};
pub use crate::core::tenants::Caller;
use crate::core::{kill_pid, qemu_alive};
use crate::drain::DrainError;
use crate::handoff::destination::{self, Arrivals};
use crate::handoff::{HandoffError, ReceiveHandoffError};
use crate::metrics::{HandoffFailure, HandoffSide};
use crate::synth::fetch::OverlaySource;
use crate::synth::{app_info, synthesize, SynthRequest, Synthesized};
use tracing::Instrument;

/// A request body as the domain sees it (no framework type).
pub type ByteStream = futures::stream::BoxStream<'static, Result<Bytes, std::io::Error>>;

/// What the HTTP layer may ask of a cloudlet: domain types only (the API
/// layer is tested against a fake of it).
pub trait CloudletOps: Send + Sync + 'static {
    fn info(&self) -> CloudletInfo;
    fn list_bases(&self) -> Result<Vec<BaseVmInfo>, BaseOpError>;
    fn import_base(
        &self,
        file: PathBuf,
    ) -> impl Future<Output = Result<BaseVmInfo, BaseOpError>> + Send;
    fn delete_base(&self, name: &str) -> Result<(), BaseOpError>;
    /// The VMs `caller` sees (a tenant: its own).
    fn list_vms(&self, caller: &Caller) -> Vec<VmInfo>;
    /// One VM `caller` sees (another tenant's is not found).
    fn get_vm(&self, caller: &Caller, id: &str) -> Result<VmInfo, VmOpError>;
    /// Synthesize a VM that belongs to `caller`'s tenant.
    fn create_vm(
        &self,
        caller: &Caller,
        req: CreateVmRequest,
        source: OverlaySource,
    ) -> impl Future<Output = Result<VmInfo, CreateVmError>> + Send;
    fn delete_vm(
        &self,
        caller: &Caller,
        id: &str,
    ) -> impl Future<Output = Result<(), VmOpError>> + Send;
    fn metrics(&self) -> String;
    fn handoff_vm(
        &self,
        caller: &Caller,
        id: &str,
        req: cloudlet_api::HandoffRequest,
    ) -> impl Future<Output = Result<cloudlet_api::HandoffReport, HandoffError>> + Send;
    fn prepare_incoming(
        &self,
        offer: cloudlet_api::HandoffOffer,
    ) -> impl Future<Output = Result<cloudlet_api::HandoffPrepared, ReceiveHandoffError>> + Send;
    fn receive_stream(
        &self,
        hid: &str,
        body: ByteStream,
    ) -> impl Future<Output = Result<cloudlet_api::HandoffLoaded, ReceiveHandoffError>> + Send;
    fn commit_incoming(
        &self,
        hid: &str,
    ) -> impl Future<Output = Result<cloudlet_api::HandoffCommitted, ReceiveHandoffError>> + Send;
    fn incoming_arrival(
        &self,
        hid: &str,
    ) -> Result<cloudlet_api::HandoffArrival, ReceiveHandoffError>;
    fn abort_incoming(
        &self,
        hid: &str,
    ) -> impl Future<Output = Result<(), ReceiveHandoffError>> + Send;
    /// Every change of a VM's state and the progress of what runs, from
    /// now on (`GET /v1/events`).
    fn events(&self) -> tokio::sync::broadcast::Receiver<cloudlet_api::events::CloudletEvent>;
    /// Does `caller` see the VM `vm_id` (its events)?
    fn sees(&self, caller: &Caller, vm_id: &str) -> bool;
    /// The handoffs out of here of VMs `caller` sees, the newest first, at
    /// most `limit`.
    fn handoffs(&self, caller: &Caller, limit: usize) -> Vec<cloudlet_api::events::HandoffRecord>;
    /// One handoff out of here.
    fn handoff(
        &self,
        caller: &Caller,
        handoff_id: &str,
    ) -> Option<cloudlet_api::events::HandoffRecord>;
    /// The id of the VM `id` (id or name) whose session `token` opens.
    fn session_opens(&self, id: &str, token: &str) -> Option<String>;
    /// Maintenance: no new work, every VM handed to a neighbour.
    fn drain(&self) -> impl Future<Output = Result<cloudlet_api::DrainReport, DrainError>> + Send;
    /// End the maintenance.
    fn resume(&self) -> Result<(), DrainError>;
}

/// The daemon's domain: the cloudlet and the handoffs arriving at it.
#[derive(Clone)]
pub struct Daemon {
    pub cloudlet: Arc<Cloudlet>,
    pub arrivals: Arc<Arrivals>,
}

impl Daemon {
    pub fn new(cloudlet: Arc<Cloudlet>) -> Self {
        Self {
            cloudlet,
            arrivals: Arc::default(),
        }
    }

    /// A destination call's phase time, or its failure (a refusal is a
    /// definite no, see `ReceiveHandoffError::is_refusal`).
    fn arrival_metrics<T>(&self, phase: &str, t: Instant, r: &Result<T, ReceiveHandoffError>) {
        let m = &self.cloudlet.metrics;
        match r {
            Ok(_) => m.handoff_phase(HandoffSide::Destination, phase, t.elapsed()),
            Err(e) => {
                m.handoff_failed(HandoffSide::Destination, HandoffFailure::of(e.is_refusal()))
            }
        }
    }

    /// The span of a call about an arriving VM: its handoff id and VM id
    /// on every line logged under it.
    fn destination_span(&self, hid: &str) -> tracing::Span {
        let vm_id = self.arrivals.vm_id(hid).unwrap_or_default();
        tracing::info_span!("handoff", side = "destination", vm_id = %vm_id, handoff_id = %hid)
    }
}

impl CloudletOps for Daemon {
    fn info(&self) -> CloudletInfo {
        CloudletInfo {
            name: self.cloudlet.config.name.clone(),
            location: self.cloudlet.config.location.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            capacity: self.cloudlet.config.capacity,
            free: self.cloudlet.free(),
            base_vms: self.list_bases().unwrap_or_default(),
            flavors: self.cloudlet.config.flavors.clone(),
            accel: self.cloudlet.accel.clone(),
            handoff_protocol: self.cloudlet.handoff_protocol(),
            directory: self
                .cloudlet
                .directory
                .status(&self.cloudlet.config.directory),
            load: crate::core::cloudlet::host_load(),
        }
    }

    fn list_bases(&self) -> Result<Vec<BaseVmInfo>, BaseOpError> {
        let spares = &self.cloudlet.spares;
        Ok(self
            .cloudlet
            .bases
            .list()?
            .iter()
            .map(|m| BaseVmInfo {
                spare_disk: spares.ready(&m.id),
                ..base_info(m)
            })
            .collect())
    }

    async fn import_base(&self, file: PathBuf) -> Result<BaseVmInfo, BaseOpError> {
        let bases = self.cloudlet.bases.clone();
        let r =
            tokio::task::spawn_blocking(move || cloudlet_base::import_base(&bases, &file, None))
                .await
                .map_err(|e| cloudlet_base::BaseError::Damaged {
                    name: "import".into(),
                    detail: e.to_string(),
                })?;
        Ok(base_info(&r?))
    }

    fn delete_base(&self, name: &str) -> Result<(), BaseOpError> {
        let base = self.cloudlet.bases.get(name)?;
        let mut vms: Vec<String> = self
            .cloudlet
            .registry()
            .values()
            .filter(|e| holds_resources(e.record.state) && e.record.base_id == base.manifest.id)
            .map(|e| format!("{} ({})", e.record.name, e.record.id))
            .collect();
        if !vms.is_empty() {
            vms.sort();
            return Err(BaseOpError::InUse {
                name: name.into(),
                vms,
            });
        }
        self.cloudlet.bases.delete(name)?;
        self.cloudlet.spares.discard(&base.manifest.id);
        self.cloudlet.refill_spares();
        tracing::info!(base = %name, id = %base.manifest.id, "base VM deleted");
        Ok(())
    }

    fn list_vms(&self, caller: &Caller) -> Vec<VmInfo> {
        let mut v: Vec<VmInfo> = self
            .cloudlet
            .registry()
            .values()
            .filter(|e| caller.sees(&e.record))
            .map(Cloudlet::view)
            .collect();
        v.sort_by(|a, b| a.created_unix.cmp(&b.created_unix).then(a.id.cmp(&b.id)));
        v
    }

    fn get_vm(&self, caller: &Caller, id: &str) -> Result<VmInfo, VmOpError> {
        let m = self.cloudlet.registry();
        visible(&m, caller, id)
            .and_then(|k| m.get(&k))
            .map(Cloudlet::view)
            .ok_or_else(|| VmOpError::NotFound(id.into()))
    }

    async fn create_vm(
        &self,
        caller: &Caller,
        req: CreateVmRequest,
        source: OverlaySource,
    ) -> Result<VmInfo, CreateVmError> {
        let flavor_name = req
            .flavor
            .clone()
            .unwrap_or(self.cloudlet.config.default_flavor.clone());
        let flavor = self
            .cloudlet
            .config
            .flavor(&flavor_name)
            .cloned()
            .ok_or(CreateVmError::UnknownFlavor(flavor_name.clone()))?;
        if let Some(n) = &req.name {
            if !valid_name(n) {
                return Err(CreateVmError::BadName(n.clone()));
            }
        }
        // Everything that can be refused is refused before anything starts.
        let policy = self.cloudlet.config.signature_policy();
        let (header, manifest, _) = source.manifest(&policy).await?;
        let app: AppInfo =
            app_info(&manifest).map_err(|e| CreateVmError::Metadata(e.to_string()))?;
        let base = self.cloudlet.resolve(&manifest.base_id)?;
        if flavor.memory_mib < base.manifest.machine.memory_mib {
            return Err(CreateVmError::FlavorTooSmall {
                flavor: flavor.name,
                flavor_mib: flavor.memory_mib,
                base_mib: base.manifest.machine.memory_mib,
            });
        }
        let id = hex::encode(rand::random::<[u8; 6]>());
        let name = req.name.clone().unwrap_or_else(|| format!("vm-{id}"));
        let paths = self.cloudlet.paths(&id);
        // The VM's own credential, for the device's session: only its
        // digest is kept; the token is in this answer alone.
        let session_token = hex::encode(rand::random::<[u8; 24]>());
        let mut rec = VmRecord::new(NewVmRecord {
            id: id.clone(),
            name: name.clone(),
            state: VmState::Synthesizing,
            generation: 1,
            base_id: base.manifest.id.clone(),
            overlay: source.describe(),
            flavor: &flavor,
            dir: paths.dir.clone(),
            app: app.clone(),
        });
        rec.session_hash = Some(crate::core::store::session_hash(&session_token));
        rec.tenant = caller.tenant().map(str::to_string);
        let (progress, ports) = self.cloudlet.reserve(rec)?;
        self.cloudlet.metrics.synthesis_started();
        tracing::info!(vm_id = %id, overlay = %source.describe(), "synthesis started");
        let result = synthesize(
            SynthRequest {
                vm_id: &id,
                name: &name,
                source: &source,
                manifest,
                file_len: header.file_len,
                base: &base,
                paths: &paths,
                ports,
                app: &app,
                spares: Some(&self.cloudlet.spares),
                confine: self.cloudlet.config.confine.for_flavor(&flavor),
            },
            &progress,
            self.cloudlet.config.early_start,
        )
        .await;
        self.cloudlet.refill_spares();
        match result {
            Ok(Synthesized { vm, timings, tail }) => {
                let vm = Arc::new(vm);
                let total = timings
                    .iter()
                    .find(|t| t.stage == "total")
                    .map_or(0, |t| t.ms);
                self.cloudlet.metrics.record_synthesis(&timings);
                let rec = self
                    .cloudlet
                    .update(&id, |e| {
                        e.record.set_state_or_log(VmState::Running);
                        e.record.timings = timings;
                        e.record.progress = e.progress.snapshot();
                        e.record.spec = Some(vm.spec().clone());
                        e.record.pid = Some(vm.pid());
                        e.vm = Some(vm.clone());
                    })
                    .ok_or_else(|| VmOpError::NotFound(id.clone()))
                    .map_err(|e| CreateVmError::OverCapacity {
                        detail: e.to_string(),
                    })?;
                if let Err(e) = self.cloudlet.store.put(&rec) {
                    vm.kill().await;
                    paths.remove();
                    return Err(e.into());
                }
                // Early start: the memory still streams in (the tail). If
                // that fails, the guest cannot be trusted: it is recorded
                // failed with the cause, stopped and removed.
                if let Some(tail) = tail {
                    self.cloudlet.follow_tail(id.clone(), vm.clone(), tail);
                }
                self.cloudlet.watch(id.clone(), vm);
                tracing::info!(vm_id = %id, ms = total, "VM running");
                let mut info = Cloudlet::view(&Entry {
                    record: rec,
                    vm: None,
                    progress,
                });
                info.session_token = Some(session_token);
                Ok(info)
            }
            Err(e) => {
                self.cloudlet.metrics.synthesis_failed();
                tracing::warn!(vm_id = %id, "synthesis failed: {e}");
                progress.finish(
                    "failed",
                    crate::progress::Ending {
                        error: Some(e.to_string()),
                        ..Default::default()
                    },
                );
                paths.remove();
                if let Some(rec) = self.cloudlet.update(&id, |en| {
                    en.record.set_state_or_log(VmState::Failed);
                    en.record.error = Some(e.to_string());
                    en.record.progress = en.progress.snapshot();
                    en.record.progress.stage = "failed".into();
                    en.record.ports.clear();
                }) {
                    let _ = self.cloudlet.store.put(&rec);
                }
                Err(e.into())
            }
        }
    }

    async fn delete_vm(&self, caller: &Caller, id: &str) -> Result<(), VmOpError> {
        let (id, vm, rec) = {
            let mut m = self.cloudlet.registry();
            let key = visible(&m, caller, id).ok_or_else(|| VmOpError::NotFound(id.into()))?;
            let e = m
                .get_mut(&key)
                .ok_or_else(|| VmOpError::NotFound(id.into()))?;
            if !e.record.state().can_delete() {
                return Err(VmOpError::Busy {
                    id: key,
                    state: e.record.state(),
                    what: "delete",
                });
            }
            e.record.set_state_or_log(VmState::Deleting);
            (key, e.vm.take(), e.record.clone())
        };
        self.cloudlet.store.put(&rec)?;
        match vm {
            Some(vm) => vm.kill().await,
            None => kill_pid(
                rec.pid
                    .filter(|p| rec.spec.as_ref().is_some_and(|s| qemu_alive(*p, s))),
            ),
        }
        self.cloudlet.paths(&id).remove();
        self.cloudlet.store.delete(&id)?;
        self.cloudlet.registry().remove(&id);
        tracing::info!(vm_id = %id, "VM deleted");
        Ok(())
    }

    async fn handoff_vm(
        &self,
        caller: &Caller,
        id: &str,
        req: cloudlet_api::HandoffRequest,
    ) -> Result<cloudlet_api::HandoffReport, HandoffError> {
        let key = visible(&self.cloudlet.registry(), caller, id)
            .ok_or_else(|| HandoffError::NotFound(id.into()))?;
        crate::handoff::source::handoff_vm_recorded(&self.cloudlet, &key, req).await
    }

    async fn prepare_incoming(
        &self,
        offer: cloudlet_api::HandoffOffer,
    ) -> Result<cloudlet_api::HandoffPrepared, ReceiveHandoffError> {
        let span = tracing::info_span!("handoff", side = "destination", vm_id = %offer.vm_id, handoff_id = %offer.handoff_id);
        let t = Instant::now();
        let r = destination::prepare_incoming(&self.cloudlet, &self.arrivals, offer)
            .instrument(span)
            .await;
        self.arrival_metrics("prepare", t, &r);
        r
    }

    async fn receive_stream(
        &self,
        hid: &str,
        body: ByteStream,
    ) -> Result<cloudlet_api::HandoffLoaded, ReceiveHandoffError> {
        let t = Instant::now();
        let r = destination::receive_stream(&self.cloudlet, &self.arrivals, hid, body)
            .instrument(self.destination_span(hid))
            .await;
        self.arrival_metrics("receive", t, &r);
        r
    }

    async fn commit_incoming(
        &self,
        hid: &str,
    ) -> Result<cloudlet_api::HandoffCommitted, ReceiveHandoffError> {
        let t = Instant::now();
        let r = destination::commit_incoming(&self.cloudlet, &self.arrivals, hid)
            .instrument(self.destination_span(hid))
            .await;
        self.arrival_metrics("commit", t, &r);
        if r.is_ok() {
            self.cloudlet.metrics.handoff_arrived();
        }
        r
    }

    async fn abort_incoming(&self, hid: &str) -> Result<(), ReceiveHandoffError> {
        self.arrivals.abort(&self.cloudlet, hid).await
    }

    fn events(&self) -> tokio::sync::broadcast::Receiver<cloudlet_api::events::CloudletEvent> {
        self.cloudlet.store.events()
    }

    fn sees(&self, caller: &Caller, vm_id: &str) -> bool {
        visible(&self.cloudlet.registry(), caller, vm_id).is_some()
    }

    fn handoffs(&self, caller: &Caller, limit: usize) -> Vec<cloudlet_api::events::HandoffRecord> {
        let mut all = self.cloudlet.handoffs.list(usize::MAX);
        all.retain(|r| history_seen_by(caller, r));
        all.truncate(limit);
        all
    }

    fn handoff(
        &self,
        caller: &Caller,
        handoff_id: &str,
    ) -> Option<cloudlet_api::events::HandoffRecord> {
        self.cloudlet
            .handoffs
            .get(handoff_id)
            .filter(|r| history_seen_by(caller, r))
    }

    fn session_opens(&self, id: &str, token: &str) -> Option<String> {
        let m = self.cloudlet.registry();
        key_of(&m, id, |r| r.session_opens(token))
    }

    async fn drain(&self) -> Result<cloudlet_api::DrainReport, DrainError> {
        crate::drain::drain(&self.cloudlet).await
    }

    fn resume(&self) -> Result<(), DrainError> {
        crate::drain::resume(&self.cloudlet)
    }

    fn incoming_arrival(
        &self,
        hid: &str,
    ) -> Result<cloudlet_api::HandoffArrival, ReceiveHandoffError> {
        self.arrivals.arrival(hid)
    }

    fn metrics(&self) -> String {
        let used = self.cloudlet.used();
        let running = self
            .cloudlet
            .registry()
            .values()
            .filter(|e| e.record.state == VmState::Running)
            .count();
        self.cloudlet
            .metrics
            .render(running, used, self.cloudlet.config.capacity)
    }
}

/// The id of the VM named by `id` (id or name) among those `caller` sees:
/// a VM it does not see is not there for it, and its name is free for
/// another tenant.
fn visible(
    m: &std::collections::HashMap<String, Entry>,
    caller: &Caller,
    id: &str,
) -> Option<String> {
    key_of(m, id, |r| caller.sees(r))
}

/// A handoff in the history is seen by the operator, and by the tenant
/// whose VM moved (not by a session: its VM's history is the VM's record).
fn history_seen_by(caller: &Caller, r: &cloudlet_api::events::HandoffRecord) -> bool {
    match caller {
        Caller::Operator => true,
        Caller::Tenant(t) => r.tenant.as_deref() == Some(t.as_str()),
        Caller::Session(_) => false,
    }
}
