//! VM synthesis: an overlay becomes a running VM.
//!
//! [`synthesize`] takes one of two ways:
//!
//! ```text
//!            ┌─ full ─── fetch -> apply (all) -> restore from the device state ──────┐
//!  request ──┤                                                                       ├─> identity, clock -> app answers
//!            └─ early ── fetch -> apply (device state, base copy) -> QEMU -incoming ─┘   (early: memory, disk still
//!                        RUN; memory by postcopy, disk by NBD, gated on what is applied)    streaming in: the "tail")
//! ```
//!
//! - [`full`]: the whole overlay is applied, then the VM is restored; the
//!   fetch and the apply run at the same time.
//! - [`early`] (early start, when the overlay and the VM directory allow
//!   it): the guest resumes once its device state and the base copy are
//!   there; its memory and disk stream in behind it.
//! - [`fetch`]: reading the overlay (HTTP range requests or an uploaded
//!   file), segments in any order, single segments on demand.
//! - [`heal`]: a segment that arrives damaged is fetched again (a bounded
//!   number of times); one that stays bad ends the synthesis at once.
//! - [`spares`]: a ready copy of each base disk, which early start takes
//!   instead of copying the base while the user waits.
//!
//! This module holds what both ways share: the request ([`SynthRequest`]),
//! the VM's files ([`VmPaths`]), the
//! stages ([`stage`], [`STAGE_STREAMING`]), the guest's identity and app
//! check ([`app_ready`]) and the errors. `full` and `early` depend on it and
//! on `fetch`, never on each other.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cloudlet_api::{AppInfo, StageTiming};

use crate::progress::LiveProgress;
use cloudlet_base::BaseVm;
use cloudlet_overlay::{ApplyOverlayError, LaunchPlan, Manifest};
use cloudlet_qemu::postcopy::PostcopyStats;
use cloudlet_qemu::{AgentError, DiskFormat, PortForward, RestoreVmError, Vm, VmSpec};

pub mod early;
pub mod fetch;
pub mod full;
pub mod heal;
pub mod spares;

use self::early::synthesize_early;
use self::fetch::{FetchOverlayError, OverlaySource};
use self::full::synthesize_full;

#[derive(Debug, thiserror::Error)]
pub enum SynthesizeError {
    #[error(transparent)]
    Fetch(#[from] FetchOverlayError),
    #[error("Overlay rejected: {0}")]
    Apply(#[from] ApplyOverlayError),
    #[error("Overlay metadata is not valid app info: {0}")]
    Metadata(String),
    #[error("Cannot write {path}: {detail}")]
    Io { path: PathBuf, detail: String },
    #[error("Restoring the VM failed: {0}")]
    Restore(#[from] RestoreVmError),
    #[error("The guest agent did not answer: {0}")]
    Agent(AgentError),
    #[error("The app did not answer on guest port {port}: {detail}")]
    AppNotReady { port: u16, detail: String },
    #[error("Synthesis was cancelled")]
    Cancelled,
    #[error("Early start failed: {0}")]
    EarlyStart(String),
}

/// The synthesis stage of a VM whose memory still streams in (early start).
pub const STAGE_STREAMING: &str = "ready, memory streaming in";

/// The app metadata an overlay carries (empty if none).
pub fn app_info(manifest: &Manifest) -> Result<AppInfo, SynthesizeError> {
    if manifest.metadata.is_empty() {
        return Ok(AppInfo::default());
    }
    serde_json::from_slice(&manifest.metadata).map_err(|e| SynthesizeError::Metadata(e.to_string()))
}

/// Paths of one VM's files.
#[derive(Debug, Clone)]
pub struct VmPaths {
    /// Persistent: disk image and device state.
    pub dir: PathBuf,
    /// RAM file (a tmpfs is best) and sockets.
    pub run: PathBuf,
}

impl VmPaths {
    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk.raw")
    }
    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }
    pub fn ram(&self) -> PathBuf {
        self.run.join("ram")
    }
    pub fn run_dir(&self) -> PathBuf {
        self.run.join("run")
    }
    /// Creates this VM's directories.
    pub(crate) fn create(&self) -> Result<(), SynthesizeError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| io_error(&self.dir, e))?;
        std::fs::create_dir_all(&self.run).map_err(|e| io_error(&self.run, e))
    }
    /// Remove every file of this VM.
    pub fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir_all(&self.run);
    }
}

pub struct SynthRequest<'a> {
    pub vm_id: &'a str,
    pub name: &'a str,
    pub source: &'a OverlaySource,
    pub manifest: Manifest,
    pub file_len: u64,
    pub base: &'a BaseVm,
    pub paths: &'a VmPaths,
    pub ports: Vec<PortForward>,
    /// How its QEMU is confined (none: unconfined).
    pub confine: Option<cloudlet_qemu::confine::Confinement>,
    pub app: &'a AppInfo,
    /// Ready copies of the base disks (early start takes one if there is).
    pub spares: Option<&'a spares::Spares>,
}

/// A synthesized VM. With early start, `tail` still streams memory into the
/// running guest: await it (on failure the VM cannot be trusted: it must be
/// killed, see `Cloudlet::follow_tail`). The tail keeps the progress
/// current and sets its stage when it ends ("ready" or "failed").
pub struct Synthesized {
    pub vm: Vm,
    pub timings: Vec<StageTiming>,
    pub tail: Option<tokio::task::JoinHandle<Result<EarlyStats, SynthesizeError>>>,
}

/// What the background part of an early start did.
#[derive(Debug)]
pub struct EarlyStats {
    pub postcopy: PostcopyStats,
    /// From the request to the last page in the guest.
    pub memory_complete_ms: u64,
    pub demand_fetches: u32,
}

/// Fetch + apply + restore; returns the running VM and stage timings.
///
/// With `early_start` (and an overlay and VM directory that allow it: 4 KiB
/// chunks, the RAM file on a tmpfs), the guest resumes as soon as the device
/// state and the disk's segments have arrived; its memory streams in behind
/// it by postcopy ([`cloudlet_qemu::postcopy`]), pages the guest touches
/// first fetched first.
pub async fn synthesize(
    req: SynthRequest<'_>,
    progress: &Arc<LiveProgress>,
    early_start: bool,
) -> Result<Synthesized, SynthesizeError> {
    // QEMU 7.2 asks for a userfaultfd without UFFD_USER_MODE_ONLY: an
    // unprivileged (confined) QEMU gets one only where the host allows it.
    let uffd = req.confine.is_none() || crate::config::unprivileged_userfaultfd();
    if early_start && !uffd {
        tracing::info!(
            vm_id = req.vm_id,
            "no early start: a confined QEMU cannot use userfaultfd (vm.unprivileged_userfaultfd = 0)"
        );
    }
    if early_start && uffd && on_tmpfs(&req.paths.run) {
        match LaunchPlan::new(&req.manifest) {
            Ok(plan) => return synthesize_early(req, progress, plan).await,
            Err(e) => tracing::info!(vm_id = req.vm_id, "no early start: {e}"),
        }
    }
    synthesize_full(req, progress)
        .await
        .map(|(vm, timings)| Synthesized {
            vm,
            timings,
            tail: None,
        })
}

fn on_tmpfs(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    let _ = std::fs::create_dir_all(dir);
    // SAFETY: statfs fills the struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type == libc::TMPFS_MAGIC }
}

/// The new VM's QEMU spec: the base's machine on this VM's files.
pub(crate) fn vm_spec(req: &SynthRequest<'_>) -> VmSpec {
    let paths = req.paths;
    let mut spec = req.base.spec(
        req.vm_id,
        &paths.ram(),
        &paths.disk(),
        &paths.run_dir(),
        req.ports.clone(),
    );
    spec.disk_format = DiskFormat::Raw;
    spec.confine = req.confine.clone();
    spec
}

/// Hand the guest its identity and clock, then wait until the app answers.
pub(crate) async fn app_ready(
    vm: &Vm,
    (vm_id, name, app): (&str, &str, &AppInfo),
    timings: &mut Vec<StageTiming>,
) -> Result<(), SynthesizeError> {
    let t = Instant::now();
    let mut agent = vm
        .agent(Duration::from_secs(30))
        .await
        .map_err(SynthesizeError::Agent)?;
    agent
        .set_identity(vm_id, name)
        .await
        .map_err(SynthesizeError::Agent)?;
    // The snapshot's clock is the packaging time: bring it to now.
    match agent.set_clock().await {
        Ok(Some(ms)) => tracing::debug!(behind_ms = ms, "guest clock set"),
        Ok(None) => tracing::debug!("the base's agent cannot set the clock"),
        Err(e) => tracing::warn!("setting the guest clock: {e}"),
    }
    timings.push(stage("identity", t));
    if let Some(&port) = app.ports.first() {
        let t = Instant::now();
        agent
            .wait_port(port, app.health_path.as_deref(), Duration::from_secs(60))
            .await
            .map_err(|e| SynthesizeError::AppNotReady {
                port,
                detail: e.to_string(),
            })?;
        timings.push(stage("app_ready", t));
    }
    Ok(())
}

/// [`SynthesizeError::Io`] for `path`.
pub(crate) fn io_error(path: &Path, e: std::io::Error) -> SynthesizeError {
    SynthesizeError::Io {
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

/// The timing of stage `name`, begun at `since`.
pub(crate) fn stage(name: &str, since: Instant) -> StageTiming {
    StageTiming {
        stage: name.into(),
        ms: since.elapsed().as_millis() as u64,
    }
}
