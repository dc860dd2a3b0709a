//! The cloudlet: VM registry, capacity, synthesis and lifecycle. HTTP
//! handlers call this (through [`CloudletOps`]); it never sees HTTP.

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use cloudlet_api::{BaseVmInfo, PortMapping, Resources, VmInfo, VmState};
use cloudlet_base::{BaseStore, BaseVm};
use cloudlet_qemu::{PortForward, Vm, VmExit};

use crate::config::CloudletConfig;
use crate::core::lifecycle::VmLifecycle;
use crate::core::store::{Store, StoreError, VmRecord};
use crate::metrics::Metrics;
use crate::progress::{LiveProgress, Watch};
use crate::synth::fetch::FetchOverlayError;
use crate::synth::{SynthesizeError, VmPaths, STAGE_STREAMING};

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
    #[error("Over the quota of tenant {tenant}: {detail}")]
    OverQuota { tenant: String, detail: String },
    #[error("Tenant {0} is not a tenant of this cloudlet")]
    UnknownTenant(String),
    #[error("This cloudlet is draining (maintenance): it takes no new VMs and no moves in")]
    Draining,
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
    #[error("Base VM {name} is used by {} VM(s): {}", .vms.len(), .vms.join(", "))]
    InUse {
        name: String,
        /// The VMs that use it, `NAME (ID)` each.
        vms: Vec<String>,
    },
}

pub(crate) struct Entry {
    pub(crate) record: VmRecord,
    pub(crate) vm: Option<Arc<Vm>>,
    pub(crate) progress: Arc<LiveProgress>,
}

/// The file that marks a cloudlet in maintenance.
const DRAINING: &str = "draining";

/// One cloudlet's daemon state.
pub struct Cloudlet {
    pub config: CloudletConfig,
    pub(crate) bases: BaseStore,
    pub(crate) store: Store,
    pub(crate) vms: Mutex<HashMap<String, Entry>>,
    pub metrics: Metrics,
    pub(crate) accel: String,
    /// Ready copies of the base disks, for early-start synthesis.
    pub(crate) spares: Arc<crate::synth::spares::Spares>,
    /// Its membership of the directory, and the peers learned there.
    pub(crate) directory: crate::core::membership::Membership,
    /// The handoffs out of here (`GET /v1/handoffs`).
    pub(crate) handoffs: crate::core::handoffs::HandoffHistory,
    /// In maintenance (`POST /v1/drain`): no new VMs, no moves in. Kept as
    /// the file `home/draining` across restarts.
    draining: std::sync::atomic::AtomicBool,
}

pub(crate) fn base_info(m: &cloudlet_base::BaseManifest) -> BaseVmInfo {
    BaseVmInfo {
        name: m.name.clone(),
        id: m.id.clone(),
        memory_mib: m.machine.memory_mib,
        disk_size: m.disk_size,
        accel: m.accel.as_str().into(),
        recipe: m.recipe.clone(),
        spare_disk: false,
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
            spares: Arc::new(crate::synth::spares::Spares::new(&home)),
            directory: crate::core::membership::Membership::default(),
            handoffs: crate::core::handoffs::HandoffHistory::open(&home),
            draining: std::sync::atomic::AtomicBool::new(home.join(DRAINING).exists()),
        });
        let bind = c.config.port_bind();
        if bind.is_unspecified() {
            tracing::warn!(public_host = %c.config.public_host, "VM ports listen on every address of this host (public_host is not an address; set vm_port_bind to where clients come from)");
        } else {
            tracing::info!(%bind, "VM ports listen on this address");
        }
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

    /// The VM registry. A panic while it was held (a bug) does not make
    /// VMs that exist look absent: that could let a caller start one
    /// elsewhere while it runs here.
    pub(crate) fn registry(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.vms.lock().unwrap_or_else(|p| {
            tracing::error!("the VM registry's lock was poisoned (a panic while held): going on");
            p.into_inner()
        })
    }

    /// The handoff protocol this cloudlet speaks
    /// ([`cloudlet_api::HANDOFF_PROTOCOL`], unless a test says otherwise).
    pub(crate) fn handoff_protocol(&self) -> u32 {
        self.config
            .handoff_test_protocol
            .unwrap_or(cloudlet_api::HANDOFF_PROTOCOL)
    }

    /// Replaces a spare disk a synthesis took, in the background.
    pub(crate) fn refill_spares(&self) {
        let (b, sp) = (self.bases.clone(), self.spares.clone());
        tokio::task::spawn_blocking(move || sp.refill(&b));
    }

    pub(crate) fn insert(&self, record: VmRecord, vm: Option<Arc<Vm>>) {
        self.registry().insert(
            record.id.clone(),
            Entry {
                record,
                vm,
                progress: Arc::default(),
            },
        );
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
                let mut m = me.registry();
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

    pub(crate) fn used(&self) -> Resources {
        let m = self.registry();
        let mut r = Resources::default();
        for e in m.values().filter(|e| holds_resources(e.record.state)) {
            r.vcpus += e.record.vcpus;
            r.memory_mib += e.record.memory_mib;
            r.vms += 1;
        }
        r
    }

    /// A handoff's destination (a URL, or a cloudlet's name as the
    /// directory knows it) and the token it accepts: from the static
    /// `peers` first, then from the directory.
    pub fn peer_for(&self, destination: &str) -> (String, Option<String>) {
        let dest = destination.trim_end_matches('/');
        let learned = self.directory.peers();
        let url = if dest.contains("://") {
            dest.to_string()
        } else {
            match learned.iter().find(|p| p.name == dest) {
                Some(p) => p.api_url.clone(),
                None => dest.to_string(),
            }
        };
        let token = self
            .config
            .peers
            .iter()
            .find(|p| p.url.trim_end_matches('/') == url)
            .map(|p| p.token.clone())
            .or_else(|| {
                learned
                    .iter()
                    .find(|p| p.api_url == url)
                    .and_then(|p| p.token.clone())
            });
        (url, token)
    }

    /// In maintenance: no new VMs, no moves in.
    pub fn draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Enter or leave maintenance (kept across restarts).
    pub(crate) fn set_draining(&self, on: bool) -> std::io::Result<()> {
        let path = self.config.home.join(DRAINING);
        if on {
            std::fs::write(&path, b"draining\n")?;
        } else if let Err(e) = std::fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(e);
            }
        }
        self.draining.store(on, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// What is not handed out yet.
    pub(crate) fn free(&self) -> Resources {
        let used = self.used();
        let cap = self.config.capacity;
        Resources {
            vcpus: cap.vcpus.saturating_sub(used.vcpus),
            memory_mib: cap.memory_mib.saturating_sub(used.memory_mib),
            vms: cap.vms.saturating_sub(used.vms),
        }
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
        let bind = self.config.port_bind();
        let mut out = Vec::new();
        let mut next = lo;
        for &g in guest {
            let port = (next..=hi)
                .find(|p| !taken.contains(p) && TcpListener::bind((bind, *p)).is_ok())
                .ok_or(CreateVmError::NoPorts(lo, hi))?;
            out.push(PortForward {
                guest: g,
                host: port,
                bind: Some(bind),
            });
            next = port.saturating_add(1);
        }
        Ok(out)
    }

    /// Reserve resources and a record, atomically with the capacity check.
    pub(crate) fn reserve(
        &self,
        mut rec: VmRecord,
    ) -> Result<(Arc<LiveProgress>, Vec<PortForward>), CreateVmError> {
        let quota = match &rec.tenant {
            Some(t) => Some(
                self.config
                    .tenant(t)
                    .ok_or_else(|| CreateVmError::UnknownTenant(t.clone()))?
                    .quota,
            ),
            None => None,
        };
        let mut m = self.registry();
        let mut used = Resources::default();
        let mut tenant_used = Resources::default();
        for e in m.values().filter(|e| holds_resources(e.record.state)) {
            used.vcpus += e.record.vcpus;
            used.memory_mib += e.record.memory_mib;
            used.vms += 1;
            if e.record.tenant.is_some() && e.record.tenant == rec.tenant {
                tenant_used.vcpus += e.record.vcpus;
                tenant_used.memory_mib += e.record.memory_mib;
                tenant_used.vms += 1;
            }
            if e.record.name == rec.name && e.record.tenant == rec.tenant {
                return Err(CreateVmError::NameTaken(rec.name.clone()));
            }
        }
        if self.draining() {
            return Err(CreateVmError::Draining);
        }
        let asked = Resources {
            vms: 1,
            vcpus: rec.vcpus,
            memory_mib: rec.memory_mib,
        };
        if let Some(detail) =
            quota.and_then(|q| crate::core::tenants::quota_left(&q, tenant_used, asked))
        {
            return Err(CreateVmError::OverQuota {
                tenant: rec.tenant.clone().unwrap_or_default(),
                detail,
            });
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
        self.release_name(&mut m, &rec.name, rec.tenant.as_deref())?;
        self.store.put(&rec)?;
        let progress = LiveProgress::watched(
            Watch::synthesis(&rec.id, &rec.name, self.store.event_sender()),
            "queued",
        );
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

    /// A new VM of `tenant` takes `name`: the records of that tenant's
    /// failed, dead or moved VMs that still bear it are renamed to their
    /// id's default name (`vm-ID`), so that a name always means one record
    /// of a tenant and `vm delete NAME` the new VM.
    pub(crate) fn release_name(
        &self,
        m: &mut HashMap<String, Entry>,
        name: &str,
        tenant: Option<&str>,
    ) -> Result<(), StoreError> {
        for e in m.values_mut() {
            let r = &mut e.record;
            if r.name == name && r.tenant.as_deref() == tenant && !holds_resources(r.state) {
                let renamed = format!("vm-{}", r.id);
                tracing::info!(vm_id = %r.id, state = ?r.state, from = %name, to = %renamed,
                    "record renamed: a new VM takes its name");
                r.name = renamed;
                self.store.put(r)?;
            }
        }
        Ok(())
    }

    pub(crate) fn update(&self, id: &str, f: impl FnOnce(&mut Entry)) -> Option<VmRecord> {
        let mut m = self.registry();
        let e = m.get_mut(id)?;
        f(e);
        Some(e.record.clone())
    }

    /// The REST model of a VM: its live progress while something is under
    /// way (a synthesis, a handoff, an early start's memory streaming in),
    /// else the recorded one.
    pub(crate) fn view(e: &Entry) -> VmInfo {
        let mut info = e.record.info();
        let live = e.progress.snapshot();
        // (A VM taken over after a restart has no live progress.)
        let streaming = info.state == VmState::Running
            && !live.stage.is_empty()
            && (live.stage == STAGE_STREAMING || info.progress.stage == STAGE_STREAMING);
        if streaming
            || matches!(
                info.state,
                VmState::Synthesizing | VmState::HandingOff | VmState::Receiving
            )
        {
            info.progress = live;
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

pub(crate) use crate::config::valid_name;

/// The id of the VM named by `id_or_name` among the records `among` takes.
///
/// Names are unique among one tenant's live VMs (the operator's own count
/// as one more tenant); records of its moved or failed ones may share a
/// name with a live one, which wins. Where the operator names a VM that
/// several tenants have live under that name, its own wins, else none
/// does (the operator then says the id).
pub(crate) fn key_of(
    m: &HashMap<String, Entry>,
    id_or_name: &str,
    among: impl Fn(&VmRecord) -> bool,
) -> Option<String> {
    if m.get(id_or_name).is_some_and(|e| among(&e.record)) {
        return Some(id_or_name.to_string());
    }
    let named = || {
        m.iter()
            .filter(|(_, e)| e.record.name == id_or_name && among(&e.record))
    };
    let live: Vec<_> = named()
        .filter(|(_, e)| holds_resources(e.record.state))
        .collect();
    match live.as_slice() {
        [(k, _)] => return Some((*k).clone()),
        [] => {}
        several => {
            let own = several.iter().find(|(_, e)| e.record.tenant.is_none());
            if own.is_none() {
                tracing::info!(name = %id_or_name, vms = several.len(),
                    "a name live for several tenants: say the VM's id");
            }
            return own.map(|(k, _)| (*k).clone());
        }
    }
    named()
        .max_by_key(|(_, e)| e.record.created_unix)
        .map(|(k, _)| k.clone())
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

/// The host's load averages (`/proc/loadavg`) and CPUs.
pub(crate) fn host_load() -> Option<cloudlet_api::HostLoad> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut f = text.split_whitespace().map(|v| v.parse::<f64>().ok());
    let (load1, load5, load15) = (f.next()??, f.next()??, f.next()??);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    Some(cloudlet_api::HostLoad {
        load1,
        load5,
        load15,
        cpus,
    })
}
