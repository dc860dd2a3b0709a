//! VM synthesis: overlay -> running VM, pipelined so that the network, the
//! CPU and the disk work at the same time.
//!
//! ```text
//!  fetch task ──segments──> bounded channel ──> apply thread (decode, verify, write)
//!       (HTTP range stream)                      ▲ Applier::new copies the base
//!                                                 │ while the first segments arrive
//!  then: device state -> QEMU -incoming -> resume -> identity -> app answers
//! ```

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cloudlet_api::{AppInfo, StageTiming};
use cloudlet_base::BaseVm;
use cloudlet_overlay::{Applier, ApplyConfig, ApplyOverlayError, LaunchPlan, Manifest};
use cloudlet_qemu::postcopy::PostcopyStats;
use cloudlet_qemu::{AgentError, DiskFormat, PortForward, RestoreVmError, Vm, VmSpec};

pub mod early;
pub mod fetch;
pub mod spares;

use self::early::synthesize_early;
use self::fetch::{FetchOverlayError, OverlaySource};

/// Segments in flight between the fetch task and the apply thread.
const PIPELINE_DEPTH: usize = 8;

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

/// Live counters a client can follow.
#[derive(Debug, Default)]
pub struct SynthProgress {
    pub stage: std::sync::Mutex<String>,
    pub bytes_fetched: AtomicU64,
    pub bytes_total: AtomicU64,
    pub segments_applied: AtomicU32,
    pub segments_total: AtomicU32,
    pub rate_bps: AtomicU64,
    pub iteration: AtomicU64,
    pub remaining_bytes: AtomicU64,
}

impl SynthProgress {
    pub fn set_stage(&self, s: &str) {
        if let Ok(mut g) = self.stage.lock() {
            *g = s.to_string();
        }
    }
    pub fn snapshot(&self) -> cloudlet_api::Progress {
        cloudlet_api::Progress {
            stage: self.stage.lock().map(|s| s.clone()).unwrap_or_default(),
            bytes_fetched: self.bytes_fetched.load(Ordering::Relaxed),
            bytes_total: self.bytes_total.load(Ordering::Relaxed),
            segments_applied: self.segments_applied.load(Ordering::Relaxed),
            segments_total: self.segments_total.load(Ordering::Relaxed),
            rate_bps: self.rate_bps.load(Ordering::Relaxed),
            iteration: self.iteration.load(Ordering::Relaxed),
            remaining_bytes: self.remaining_bytes.load(Ordering::Relaxed),
        }
    }
}

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
    pub app: &'a AppInfo,
    /// Ready copies of the base disks (early start takes one if there is).
    pub spares: Option<&'a spares::Spares>,
}

/// A synthesized VM. With early start, `tail` still streams memory into the
/// running guest: await it (on failure the VM must be killed).
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
    progress: &SynthProgress,
    early_start: bool,
) -> Result<Synthesized, SynthesizeError> {
    if early_start && on_tmpfs(&req.paths.run) {
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

/// Synthesis that applies the whole overlay before the VM resumes.
async fn synthesize_full(
    req: SynthRequest<'_>,
    progress: &SynthProgress,
) -> Result<(Vm, Vec<StageTiming>), SynthesizeError> {
    let mut timings = Vec::new();
    let start = Instant::now();
    let io = |path: &Path, e: std::io::Error| SynthesizeError::Io {
        path: path.to_path_buf(),
        detail: e.to_string(),
    };
    std::fs::create_dir_all(&req.paths.dir).map_err(|e| io(&req.paths.dir, e))?;
    std::fs::create_dir_all(&req.paths.run).map_err(|e| io(&req.paths.run, e))?;

    // Fetch -> apply, overlapped.
    progress.set_stage("fetching");
    let manifest = req.manifest;
    let data_offset = manifest.data_offset;
    let segments: Vec<(u64, u64)> = manifest
        .segments
        .iter()
        .map(|s| (s.offset, s.stored_len))
        .collect();
    progress
        .segments_total
        .store(segments.len() as u32, Ordering::Relaxed);
    progress.bytes_total.store(req.file_len, Ordering::Relaxed);
    progress.bytes_fetched.store(data_offset, Ordering::Relaxed);
    let mut config = ApplyConfig::new(
        req.base.disk_path(),
        req.base.memory_path(),
        req.paths.disk(),
        req.paths.ram(),
    );
    // Every payload chunk, every base reference and every segment is checked
    // against its hash as it is applied, and the base was matched by its
    // content id (checked when it was built or imported): the extra pass that
    // rehashes the whole launch state (about 1 s for a 512 MiB VM) proves
    // nothing more here.
    config.verify_launch_state = false;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(u32, Vec<u8>)>(PIPELINE_DEPTH);
    let mut stream = req.source.segments(data_offset, req.file_len).await?;
    let fetch = async move {
        let mut pos = 0u64;
        for (i, (off, len)) in segments.iter().enumerate() {
            if *off > pos {
                stream.read_exact(off - pos).await?; // gap: not expected, skipped
            }
            let bytes = stream.read_exact(*len).await?;
            pos = off + len;
            if tx.send((i as u32, bytes)).await.is_err() {
                break; // the apply side failed; its error wins
            }
        }
        Ok::<_, FetchOverlayError>(())
    };
    let shared = Arc::new((AtomicU64::new(data_offset), AtomicU32::new(0)));
    let shared2 = shared.clone();
    let apply = tokio::task::spawn_blocking(move || {
        let applier = Applier::new(manifest, &config)?;
        while let Some((i, bytes)) = rx.blocking_recv() {
            shared2.0.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            applier.apply_segment(i, &bytes)?;
            shared2.1.fetch_add(1, Ordering::Relaxed);
        }
        applier.finish()
    });
    let watcher = async {
        loop {
            progress
                .bytes_fetched
                .store(shared.0.load(Ordering::Relaxed), Ordering::Relaxed);
            let n = shared.1.load(Ordering::Relaxed);
            progress.segments_applied.store(n, Ordering::Relaxed);
            if n > 0 {
                progress.set_stage("applying");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let (fetched, applied) = tokio::select! {
        r = async { tokio::join!(fetch, apply) } => r,
        _ = watcher => unreachable!("the watcher never ends"),
    };
    progress
        .bytes_fetched
        .store(shared.0.load(Ordering::Relaxed), Ordering::Relaxed);
    progress
        .segments_applied
        .store(shared.1.load(Ordering::Relaxed), Ordering::Relaxed);
    let applied = applied.map_err(|_| SynthesizeError::Cancelled)?;
    // An apply error explains a fetch that stopped early; report it first.
    let output = match (applied, fetched) {
        (Err(ApplyOverlayError::MissingSegments { .. }), Err(f)) => return Err(f.into()),
        (Err(e), _) => return Err(e.into()),
        (Ok(_), Err(e)) => return Err(e.into()),
        (Ok(o), Ok(())) => o,
    };
    timings.push(stage("fetch_apply", start));
    std::fs::write(req.paths.state(), &output.device_state)
        .map_err(|e| io(&req.paths.state(), e))?;

    // Restore and hand the guest its identity.
    progress.set_stage("restoring");
    let t = Instant::now();
    let vm = Vm::restore(
        vm_spec(req.vm_id, req.base, req.paths, req.ports.clone()),
        &req.paths.state(),
    )
    .await?;
    timings.push(stage("restore", t));
    if let Err(e) = app_ready(&vm, (req.vm_id, req.name, req.app), &mut timings).await {
        vm.kill().await;
        return Err(e);
    }
    timings.push(stage("total", start));
    progress.set_stage("ready");
    Ok((vm, timings))
}

/// The new VM's QEMU spec: the base's machine on this VM's files.
pub(crate) fn vm_spec(
    vm_id: &str,
    base: &BaseVm,
    paths: &VmPaths,
    ports: Vec<PortForward>,
) -> VmSpec {
    let mut spec = base.spec(vm_id, &paths.ram(), &paths.disk(), &paths.run_dir(), ports);
    spec.disk_format = DiskFormat::Raw;
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

pub(crate) fn stage(name: &str, since: Instant) -> StageTiming {
    StageTiming {
        stage: name.into(),
        ms: since.elapsed().as_millis() as u64,
    }
}
