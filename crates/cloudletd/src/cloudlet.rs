//! The cloudlet: VM registry, capacity, synthesis and lifecycle. HTTP
//! handlers call this (through [`CloudletOps`]); it never sees HTTP.

use std::collections::HashMap;
use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cloudlet_api::{
    AppInfo, BaseVmInfo, CloudletInfo, CreateVmRequest, PortMapping, Resources, VmInfo, VmState,
};
use cloudlet_base::{BaseStore, BaseVm};
use cloudlet_qemu::{PortForward, Vm, VmExit};

use crate::config::CloudletConfig;
use crate::fetch::{FetchOverlayError, OverlaySource};
use crate::handoff::ReceiveHandoffError;
use crate::lifecycle::VmLifecycle;
use crate::metrics::Metrics;
use crate::store::{NewVmRecord, Store, StoreError, VmRecord};
use crate::synth::{
    app_info, synthesize, SynthProgress, SynthRequest, SynthesizeError, Synthesized, VmPaths,
};

/// Why a VM could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateVmError {
    #[error("Unknown flavor {0:?}")]
    UnknownFlavor(String),
    #[error("Invalid VM name {0:?}: use 1-63 letters, digits, '-' or '_'")]
    BadName(String),
    #[error("A VM named {0:?} exists already")]
    NameTaken(String),
    #[error("Cannot use the overlay: {0}")]
    Overlay(#[from] FetchOverlayError),
    #[error("Overlay metadata: {0}")]
    Metadata(String),
    #[error("This cloudlet does not hold the overlay's base VM {base_id}")]
    BaseNotHeld { base_id: String },
    #[error("Flavor {flavor} has {flavor_mib} MiB, the base VM needs {base_mib} MiB")]
    FlavorTooSmall {
        flavor: String,
        flavor_mib: u64,
        base_mib: u64,
    },
    #[error("Over capacity: {detail}")]
    OverCapacity { detail: String },
    #[error("No free host port in {0}-{1}")]
    NoPorts(u16, u16),
    #[error("Synthesis failed: {0}")]
    Synthesis(#[from] SynthesizeError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, thiserror::Error)]
pub enum VmOpError {
    #[error("No VM {0}")]
    NotFound(String),
    #[error("VM {id} is {state:?}: {what} is not possible now")]
    Busy {
        id: String,
        state: VmState,
        what: &'static str,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, thiserror::Error)]
pub enum BaseOpError {
    #[error(transparent)]
    Base(#[from] cloudlet_base::BaseError),
    #[error(transparent)]
    Archive(#[from] cloudlet_base::ArchiveError),
    #[error("Base VM {name} is used by {count} VM(s)")]
    InUse { name: String, count: usize },
}

/// What the HTTP layer may ask of a cloudlet.
pub trait CloudletOps: Send + Sync + 'static {
    fn info(&self) -> CloudletInfo;
    fn list_bases(&self) -> Result<Vec<BaseVmInfo>, BaseOpError>;
    fn import_base(
        &self,
        file: PathBuf,
    ) -> impl Future<Output = Result<BaseVmInfo, BaseOpError>> + Send;
    fn delete_base(&self, name: &str) -> Result<(), BaseOpError>;
    fn list_vms(&self) -> Vec<VmInfo>;
    fn get_vm(&self, id: &str) -> Result<VmInfo, VmOpError>;
    fn create_vm(
        &self,
        req: CreateVmRequest,
        source: OverlaySource,
    ) -> impl Future<Output = Result<VmInfo, CreateVmError>> + Send;
    fn delete_vm(&self, id: &str) -> impl Future<Output = Result<(), VmOpError>> + Send;
    fn metrics(&self) -> String;
    fn handoff_vm(
        &self,
        id: &str,
        req: cloudlet_api::HandoffRequest,
    ) -> impl Future<Output = Result<cloudlet_api::HandoffReport, crate::handoff::HandoffError>> + Send;
    fn prepare_incoming(
        &self,
        offer: cloudlet_api::HandoffOffer,
    ) -> impl Future<Output = Result<cloudlet_api::HandoffPrepared, ReceiveHandoffError>> + Send;
    fn receive_stream(
        &self,
        hid: &str,
        body: axum::body::BodyDataStream,
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
}

pub(crate) struct Entry {
    pub(crate) record: VmRecord,
    pub(crate) vm: Option<Arc<Vm>>,
    pub(crate) progress: Arc<SynthProgress>,
}

/// One cloudlet's daemon state.
pub struct Cloudlet {
    pub config: CloudletConfig,
    pub(crate) bases: BaseStore,
    pub(crate) store: Store,
    pub(crate) vms: Mutex<HashMap<String, Entry>>,
    pub metrics: Metrics,
    accel: String,
    /// Handoffs arriving here, by handoff id.
    pub(crate) incoming: Mutex<HashMap<String, crate::handoff::Incoming>>,
    /// Ready copies of the base disks, for early-start synthesis.
    pub(crate) spares: Arc<crate::spares::Spares>,
}

fn base_info(m: &cloudlet_base::BaseManifest) -> BaseVmInfo {
    BaseVmInfo {
        name: m.name.clone(),
        id: m.id.clone(),
        memory_mib: m.machine.memory_mib,
        disk_size: m.disk_size,
        accel: m.accel.as_str().into(),
        recipe: m.recipe.clone(),
    }
}

/// States that hold resources on this cloudlet.
pub(crate) fn holds_resources(s: VmState) -> bool {
    s.holds_resources()
}

impl Cloudlet {
    /// Open the store and take over what a previous daemon left running.
    pub async fn open(config: CloudletConfig) -> anyhow::Result<Arc<Self>> {
        std::fs::create_dir_all(&config.home)?;
        std::fs::create_dir_all(&config.vm_dir)?;
        let store = Store::open(&config.home.join("cloudletd.redb"))?;
        let bases = BaseStore::new(&config.home);
        let home = config.home.clone();
        let accel = bases
            .list()
            .ok()
            .and_then(|l| l.first().map(|m| m.accel.as_str().to_string()))
            .unwrap_or_else(|| "tcg".into());
        let c = Arc::new(Cloudlet {
            config,
            bases,
            store,
            vms: Mutex::new(HashMap::new()),
            metrics: Metrics::default(),
            accel,
            incoming: Mutex::new(HashMap::new()),
            spares: Arc::new(crate::spares::Spares::new(&home)),
        });
        c.recover().await?;
        // Keep the bases in the page cache: synthesis copies its base in
        // the first second, and a base pushed out by other work costs
        // seconds to read back (measured: 4.5 s instead of 1 s for kvstore).
        // And a spare copy of each base disk (see `spares`).
        let (bases, spares) = (c.bases.clone(), c.spares.clone());
        tokio::spawn(async move {
            loop {
                let (b, sp) = (bases.clone(), spares.clone());
                let _ = tokio::task::spawn_blocking(move || {
                    warm_bases(&b);
                    sp.refill(&b);
                })
                .await;
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        });
        Ok(c)
    }

    /// The handoff protocol this cloudlet speaks
    /// ([`cloudlet_api::HANDOFF_PROTOCOL`], unless a test says otherwise).
    pub(crate) fn handoff_protocol(&self) -> u32 {
        self.config
            .handoff_test_protocol
            .unwrap_or(cloudlet_api::HANDOFF_PROTOCOL)
    }

    /// Replaces a spare disk a synthesis took, in the background.
    fn refill_spares(&self) {
        let (b, sp) = (self.bases.clone(), self.spares.clone());
        tokio::task::spawn_blocking(move || sp.refill(&b));
    }

    /// Re-adopt QEMU processes still running; mark dead ones; clean up
    /// work that was cut short by a crash.
    async fn recover(self: &Arc<Self>) -> anyhow::Result<()> {
        for mut rec in self.store.list()? {
            let id = rec.id.clone();
            let paths = self.paths(&id);
            match rec.state {
                VmState::Synthesizing => {
                    // QEMU may already run (restore, or an early start
                    // waiting for its memory): its pid is only in its pid
                    // file, not yet in the record.
                    kill_pid(qemu_in(&paths.run_dir()));
                    paths.remove();
                    rec.set_state_or_log(VmState::Failed);
                    rec.error = Some("The daemon restarted during synthesis".into());
                    rec.ports.clear();
                    self.store.put(&rec)?;
                }
                VmState::Receiving => {
                    // An arrival that was not committed: the source keeps it.
                    if let Some(spec) = &rec.spec {
                        kill_pid(rec.pid.filter(|p| qemu_alive(*p, spec)));
                    }
                    paths.remove();
                    self.store.delete(&id)?;
                    continue;
                }
                VmState::Moved => {
                    if let Some(spec) = &rec.spec {
                        kill_pid(rec.pid.filter(|p| qemu_alive(*p, spec)));
                    }
                    paths.remove();
                }
                VmState::Deleting => {
                    kill_pid(rec.pid);
                    paths.remove();
                    self.store.delete(&id)?;
                    continue;
                }
                VmState::Running | VmState::HandingOff => {
                    let mut adopted = match (&rec.spec, rec.pid) {
                        (Some(spec), Some(pid)) if qemu_alive(pid, spec) => {
                            match Vm::adopt(spec.clone(), pid).await {
                                Ok(vm) => Some(vm),
                                Err(e) => {
                                    // Alive but unmanageable (an early start
                                    // whose main loop waits on a page the
                                    // dead daemon had does not answer QMP):
                                    // it must not run on unrecorded.
                                    tracing::warn!(vm_id = %id, pid, error = %e, "QEMU runs but does not answer on QMP: stopping it");
                                    kill_pid(Some(pid));
                                    None
                                }
                            }
                        }
                        _ => None,
                    };
                    // An early start whose memory was still streaming from
                    // the daemon that died: the guest waits on pages nobody
                    // will send. It cannot be saved; stop it.
                    if let Some(vm) = &adopted {
                        if incoming_unfinished(vm).await {
                            tracing::warn!(vm_id = %id, "VM was still receiving its memory (early start) when the daemon stopped: stopping it");
                            vm.kill().await;
                            adopted = None;
                        }
                    }
                    match adopted {
                        Some(vm) => {
                            resume_adopted(&id, &vm).await;
                            tracing::info!(vm_id = %id, pid = vm.pid(), "re-adopted running VM");
                            let vm = Arc::new(vm);
                            rec.set_state_or_log(VmState::Running);
                            self.store.put(&rec)?;
                            self.insert(rec, Some(vm.clone()));
                            self.watch(id, vm);
                            continue;
                        }
                        None => {
                            tracing::warn!(vm_id = %id, "VM died while the daemon was away");
                            rec.set_state_or_log(VmState::Dead);
                            rec.error = Some("QEMU exited while the daemon was not running".into());
                            self.store.put(&rec)?;
                        }
                    }
                }
                _ => {}
            }
            self.insert(rec, None);
        }
        Ok(())
    }

    pub(crate) fn insert(&self, record: VmRecord, vm: Option<Arc<Vm>>) {
        if let Ok(mut m) = self.vms.lock() {
            m.insert(
                record.id.clone(),
                Entry {
                    record,
                    vm,
                    progress: Arc::default(),
                },
            );
        }
    }

    pub(crate) fn paths(&self, id: &str) -> VmPaths {
        VmPaths {
            dir: self.config.home.join("vms").join(id),
            run: self.config.vm_dir.join(id),
        }
    }

    /// Notice a VM's QEMU dying and record it.
    pub(crate) fn watch(self: &Arc<Self>, id: String, vm: Arc<Vm>) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let exit = vm.wait_exit().await;
            let rec = {
                let Ok(mut m) = me.vms.lock() else { return };
                let Some(e) = m.get_mut(&id) else { return };
                if !e.record.state().can_die() {
                    return; // deleted or moved on purpose
                }
                e.record.set_state_or_log(VmState::Dead);
                e.record.error = Some(match exit {
                    VmExit::Exited { code } => format!("QEMU exited unexpectedly (code {code:?})"),
                    VmExit::Vanished => "QEMU vanished".into(),
                });
                e.vm = None;
                e.record.clone()
            };
            tracing::error!(vm_id = %id, "VM died: {:?}", rec.error);
            me.metrics.vm_died();
            if let Err(e) = me.store.put(&rec) {
                tracing::error!(vm_id = %id, "cannot record VM death: {e}");
            }
        });
    }

    fn used(&self) -> Resources {
        let m = match self.vms.lock() {
            Ok(m) => m,
            Err(_) => return Resources::default(),
        };
        let mut r = Resources::default();
        for e in m.values().filter(|e| holds_resources(e.record.state)) {
            r.vcpus += e.record.vcpus;
            r.memory_mib += e.record.memory_mib;
            r.vms += 1;
        }
        r
    }

    /// Host ports for `guest` ports, none used by another VM. Called with
    /// the registry locked, so two creations never get the same port.
    pub(crate) fn allocate_ports(
        &self,
        m: &HashMap<String, Entry>,
        guest: &[u16],
    ) -> Result<Vec<PortForward>, CreateVmError> {
        let taken: Vec<u16> = m
            .values()
            .filter(|e| holds_resources(e.record.state))
            .flat_map(|e| e.record.ports.iter().map(|p| p.host))
            .collect();
        let [lo, hi] = self.config.host_ports;
        let mut out = Vec::new();
        let mut next = lo;
        for &g in guest {
            let port = (next..=hi)
                .find(|p| !taken.contains(p) && TcpListener::bind(("0.0.0.0", *p)).is_ok())
                .ok_or(CreateVmError::NoPorts(lo, hi))?;
            out.push(PortForward {
                guest: g,
                host: port,
            });
            next = port.saturating_add(1);
        }
        Ok(out)
    }

    /// Reserve resources and a record, atomically with the capacity check.
    pub(crate) fn reserve(
        &self,
        mut rec: VmRecord,
    ) -> Result<(Arc<SynthProgress>, Vec<PortForward>), CreateVmError> {
        let mut m = self.vms.lock().map_err(|_| CreateVmError::OverCapacity {
            detail: "internal lock poisoned".into(),
        })?;
        let mut used = Resources::default();
        for e in m.values().filter(|e| holds_resources(e.record.state)) {
            used.vcpus += e.record.vcpus;
            used.memory_mib += e.record.memory_mib;
            used.vms += 1;
            if e.record.name == rec.name {
                return Err(CreateVmError::NameTaken(rec.name.clone()));
            }
        }
        let cap = self.config.capacity;
        let detail = if used.vms + 1 > cap.vms {
            Some(format!("{} of {} VMs in use", used.vms, cap.vms))
        } else if used.vcpus + rec.vcpus > cap.vcpus {
            Some(format!(
                "{} of {} vCPUs in use, {} more asked",
                used.vcpus, cap.vcpus, rec.vcpus
            ))
        } else if used.memory_mib + rec.memory_mib > cap.memory_mib {
            Some(format!(
                "{} of {} MiB in use, {} more asked",
                used.memory_mib, cap.memory_mib, rec.memory_mib
            ))
        } else {
            None
        };
        if let Some(detail) = detail {
            return Err(CreateVmError::OverCapacity { detail });
        }
        let ports = self.allocate_ports(&m, &rec.app.ports)?;
        rec.ports = ports
            .iter()
            .map(|p| PortMapping {
                guest: p.guest,
                host: p.host,
                endpoint: format!("{}:{}", self.config.public_host, p.host),
            })
            .collect();
        self.store.put(&rec)?;
        let progress = Arc::new(SynthProgress::default());
        progress.set_stage("queued");
        m.insert(
            rec.id.clone(),
            Entry {
                record: rec,
                vm: None,
                progress: progress.clone(),
            },
        );
        Ok((progress, ports))
    }

    pub(crate) fn update(&self, id: &str, f: impl FnOnce(&mut Entry)) -> Option<VmRecord> {
        let mut m = self.vms.lock().ok()?;
        let e = m.get_mut(id)?;
        f(e);
        Some(e.record.clone())
    }

    pub(crate) fn view(e: &Entry) -> VmInfo {
        let mut info = e.record.info();
        if matches!(
            info.state,
            VmState::Synthesizing | VmState::HandingOff | VmState::Receiving
        ) {
            info.progress = e.progress.snapshot();
        }
        info
    }

    pub(crate) fn resolve(&self, base_id: &str) -> Result<BaseVm, CreateVmError> {
        self.bases
            .get_by_id(base_id)
            .map_err(|_| CreateVmError::BaseNotHeld {
                base_id: base_id.to_string(),
            })
    }
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// The id of the VM named by `id_or_name`.
pub(crate) fn key_of(m: &HashMap<String, Entry>, id_or_name: &str) -> Option<String> {
    if m.contains_key(id_or_name) {
        return Some(id_or_name.to_string());
    }
    // Names are unique among live VMs; records of moved or failed ones may
    // share a name with a live one, which wins.
    let named = || m.iter().filter(|(_, e)| e.record.name == id_or_name);
    named()
        .find(|(_, e)| holds_resources(e.record.state))
        .or_else(|| named().max_by_key(|(_, e)| e.record.created_unix))
        .map(|(k, _)| k.clone())
}

pub(crate) fn kill_pid(pid: Option<u32>) {
    if let Some(pid) = pid {
        // SAFETY: signalling a pid we recorded as our QEMU.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
}

/// The QEMU whose run directory is `run_dir`, from its pid file, if it
/// still runs (checked on its command line: pids get reused).
fn qemu_in(run_dir: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(run_dir.join("qemu.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let c = String::from_utf8_lossy(&cmdline);
    (c.contains("qemu-system") && c.contains(&run_dir.display().to_string())).then_some(pid)
}

/// Whether `pid` is still the QEMU that runs `spec` (pids get reused).
pub(crate) fn qemu_alive(pid: u32, spec: &cloudlet_qemu::VmSpec) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let c = String::from_utf8_lossy(&c);
            c.contains("qemu-system") && c.contains(&spec.qmp_socket().display().to_string())
        })
        .unwrap_or(false)
}

impl CloudletOps for Arc<Cloudlet> {
    fn info(&self) -> CloudletInfo {
        let used = self.used();
        let cap = self.config.capacity;
        CloudletInfo {
            name: self.config.name.clone(),
            location: self.config.location.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            capacity: cap,
            free: Resources {
                vcpus: cap.vcpus.saturating_sub(used.vcpus),
                memory_mib: cap.memory_mib.saturating_sub(used.memory_mib),
                vms: cap.vms.saturating_sub(used.vms),
            },
            base_vms: self.list_bases().unwrap_or_default(),
            flavors: self.config.flavors.clone(),
            accel: self.accel.clone(),
            handoff_protocol: self.handoff_protocol(),
        }
    }

    fn list_bases(&self) -> Result<Vec<BaseVmInfo>, BaseOpError> {
        Ok(self.bases.list()?.iter().map(base_info).collect())
    }

    async fn import_base(&self, file: PathBuf) -> Result<BaseVmInfo, BaseOpError> {
        let bases = self.bases.clone();
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
        let base = self.bases.get(name)?;
        let count = self
            .vms
            .lock()
            .map(|m| {
                m.values()
                    .filter(|e| {
                        holds_resources(e.record.state) && e.record.base_id == base.manifest.id
                    })
                    .count()
            })
            .unwrap_or(0);
        if count > 0 {
            return Err(BaseOpError::InUse {
                name: name.into(),
                count,
            });
        }
        Ok(self.bases.delete(name)?)
    }

    fn list_vms(&self) -> Vec<VmInfo> {
        let mut v: Vec<VmInfo> = self
            .vms
            .lock()
            .map(|m| m.values().map(Cloudlet::view).collect())
            .unwrap_or_default();
        v.sort_by(|a, b| a.created_unix.cmp(&b.created_unix).then(a.id.cmp(&b.id)));
        v
    }

    fn get_vm(&self, id: &str) -> Result<VmInfo, VmOpError> {
        let m = self
            .vms
            .lock()
            .map_err(|_| VmOpError::NotFound(id.into()))?;
        key_of(&m, id)
            .and_then(|k| m.get(&k))
            .map(Cloudlet::view)
            .ok_or_else(|| VmOpError::NotFound(id.into()))
    }

    async fn create_vm(
        &self,
        req: CreateVmRequest,
        source: OverlaySource,
    ) -> Result<VmInfo, CreateVmError> {
        let flavor_name = req
            .flavor
            .clone()
            .unwrap_or(self.config.default_flavor.clone());
        let flavor = self
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
        let (header, manifest, _) = source.manifest().await?;
        let app: AppInfo =
            app_info(&manifest).map_err(|e| CreateVmError::Metadata(e.to_string()))?;
        let base = self.resolve(&manifest.base_id)?;
        if flavor.memory_mib < base.manifest.machine.memory_mib {
            return Err(CreateVmError::FlavorTooSmall {
                flavor: flavor.name,
                flavor_mib: flavor.memory_mib,
                base_mib: base.manifest.machine.memory_mib,
            });
        }
        let id = hex::encode(rand::random::<[u8; 6]>());
        let name = req.name.clone().unwrap_or_else(|| format!("vm-{id}"));
        let paths = self.paths(&id);
        let rec = VmRecord::new(NewVmRecord {
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
        let (progress, ports) = self.reserve(rec)?;
        self.metrics.synthesis_started();
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
                spares: Some(&self.spares),
            },
            &progress,
            self.config.early_start,
        )
        .await;
        self.refill_spares();
        match result {
            Ok(Synthesized { vm, timings, tail }) => {
                let vm = Arc::new(vm);
                if let Some(tail) = tail {
                    // Early start: the memory still streams in. If that
                    // fails, the guest cannot be trusted: stop it (the exit
                    // watch records it).
                    progress.set_stage(crate::synth::STAGE_STREAMING);
                    let (vm, id, progress) = (vm.clone(), id.clone(), progress.clone());
                    tokio::spawn(async move {
                        match tail.await {
                            Ok(Ok(stats)) => {
                                progress.set_stage("ready");
                                tracing::info!(vm_id = %id, ?stats, "early start: memory complete")
                            }
                            Ok(Err(e)) => {
                                tracing::error!(vm_id = %id, "early start failed after the VM started, stopping it: {e}");
                                vm.kill().await;
                            }
                            Err(e) => {
                                tracing::error!(vm_id = %id, "early start task: {e}");
                                vm.kill().await;
                            }
                        }
                    });
                }
                let total = timings
                    .iter()
                    .find(|t| t.stage == "total")
                    .map_or(0, |t| t.ms);
                self.metrics.record_synthesis(&timings);
                let rec = self
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
                if let Err(e) = self.store.put(&rec) {
                    vm.kill().await;
                    paths.remove();
                    return Err(e.into());
                }
                self.watch(id.clone(), vm);
                tracing::info!(vm_id = %id, ms = total, "VM running");
                Ok(Cloudlet::view(&Entry {
                    record: rec,
                    vm: None,
                    progress,
                }))
            }
            Err(e) => {
                self.metrics.synthesis_failed();
                tracing::warn!(vm_id = %id, "synthesis failed: {e}");
                paths.remove();
                if let Some(rec) = self.update(&id, |en| {
                    en.record.set_state_or_log(VmState::Failed);
                    en.record.error = Some(e.to_string());
                    en.record.progress = en.progress.snapshot();
                    en.record.progress.stage = "failed".into();
                    en.record.ports.clear();
                }) {
                    let _ = self.store.put(&rec);
                }
                Err(e.into())
            }
        }
    }

    async fn delete_vm(&self, id: &str) -> Result<(), VmOpError> {
        let (id, vm, rec) = {
            let mut m = self
                .vms
                .lock()
                .map_err(|_| VmOpError::NotFound(id.into()))?;
            let key = key_of(&m, id).ok_or_else(|| VmOpError::NotFound(id.into()))?;
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
        self.store.put(&rec)?;
        match vm {
            Some(vm) => vm.kill().await,
            None => kill_pid(
                rec.pid
                    .filter(|p| rec.spec.as_ref().is_some_and(|s| qemu_alive(*p, s))),
            ),
        }
        self.paths(&id).remove();
        self.store.delete(&id)?;
        if let Ok(mut m) = self.vms.lock() {
            m.remove(&id);
        }
        tracing::info!(vm_id = %id, "VM deleted");
        Ok(())
    }

    async fn handoff_vm(
        &self,
        id: &str,
        req: cloudlet_api::HandoffRequest,
    ) -> Result<cloudlet_api::HandoffReport, crate::handoff::HandoffError> {
        use crate::handoff::HandoffError as E;
        use crate::metrics::{HandoffFailure, HandoffSide};
        let result = crate::handoff::handoff_vm(self, id, req).await;
        match &result {
            Ok(report) => self.metrics.record_handoff(report),
            Err(e) => self.metrics.handoff_failed(
                HandoffSide::Source,
                match e {
                    E::NotFound(_)
                    | E::NotRunning { .. }
                    | E::StillStarting(_)
                    | E::NoToken(_)
                    | E::Refused { .. } => HandoffFailure::Refused,
                    _ => HandoffFailure::Failed,
                },
            ),
        }
        result
    }

    async fn prepare_incoming(
        &self,
        offer: cloudlet_api::HandoffOffer,
    ) -> Result<cloudlet_api::HandoffPrepared, ReceiveHandoffError> {
        crate::handoff::prepare_incoming(self, offer).await
    }

    async fn receive_stream(
        &self,
        hid: &str,
        body: axum::body::BodyDataStream,
    ) -> Result<cloudlet_api::HandoffLoaded, ReceiveHandoffError> {
        crate::handoff::receive_stream(self, hid, body).await
    }

    async fn commit_incoming(
        &self,
        hid: &str,
    ) -> Result<cloudlet_api::HandoffCommitted, ReceiveHandoffError> {
        crate::handoff::commit_incoming(self, hid).await
    }

    async fn abort_incoming(&self, hid: &str) -> Result<(), ReceiveHandoffError> {
        crate::handoff::abort_incoming(self, hid).await
    }

    fn incoming_arrival(
        &self,
        hid: &str,
    ) -> Result<cloudlet_api::HandoffArrival, ReceiveHandoffError> {
        crate::handoff::incoming_arrival(self, hid)
    }

    fn metrics(&self) -> String {
        let used = self.used();
        let running = self
            .vms
            .lock()
            .map(|m| {
                m.values()
                    .filter(|e| e.record.state == VmState::Running)
                    .count()
            })
            .unwrap_or(0);
        self.metrics.render(running, used, self.config.capacity)
    }
}

/// Ask the kernel to read every base's images back into the page cache
/// (asynchronous readahead; pages still cached cost nothing).
fn warm_bases(bases: &BaseStore) {
    use std::os::fd::AsRawFd;
    for m in bases.list().unwrap_or_default() {
        let Ok(b) = bases.get(&m.name) else { continue };
        for p in [b.memory_path(), b.disk_path()] {
            if let Ok(f) = std::fs::File::open(&p) {
                // SAFETY: an advisory call on a descriptor we own.
                unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED) };
            }
        }
    }
}

/// Whether an adopted QEMU was still being synthesized by early start: in a
/// postcopy migration (only early starts use postcopy: handoffs are
/// precopy), or with its disk still on the daemon's NBD server.
/// A re-adopted VM its record calls running (or leaving) that QEMU holds
/// paused runs again: a destination that died between storing its commit
/// and resuming the VM, or a source that died while it throttled its guest
/// or waited at the switchover (a move not yet committed: a committed one
/// is recorded moved, and never comes here).
async fn resume_adopted(id: &str, vm: &Vm) {
    let state = match vm.qmp().run_state().await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(vm_id = %id, "reading the re-adopted VM's run state: {e}");
            return;
        }
    };
    if state == "running" {
        return;
    }
    let _ = vm.qmp().cancel_migration().await;
    match vm.resume().await {
        Ok(()) => tracing::info!(vm_id = %id, was = %state, "re-adopted VM was paused: resumed"),
        Err(e) => {
            tracing::error!(vm_id = %id, was = %state, "cannot resume the re-adopted VM: {e}")
        }
    }
}

async fn incoming_unfinished(vm: &Vm) -> bool {
    let postcopy = vm
        .qmp()
        .query_migrate()
        .await
        .is_ok_and(|i| i.status.is_postcopy());
    let lazy_disk = vm
        .qmp()
        .find_block_node(cloudlet_qemu::spec::LAZY_DISK_NODE)
        .await
        .is_ok_and(|n| n.is_some());
    postcopy || lazy_disk
}
