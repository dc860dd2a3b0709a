//! App packaging: what a developer runs to turn an app into a VM overlay.
//!
//! [`package_app`] restores a base VM, copies the app's directory into the
//! guest at `/opt/app`, runs the install commands, starts the app (and lists
//! it in the guest's autostart file, so that a cold boot starts it too),
//! waits until its port answers, scrubs the guest (trims the disk's free
//! blocks, drops clean caches, zeroes free memory: [`scrub`], unless
//! [`PackageConfig::scrub`] is off), pauses the VM in that *launch state*, saves
//! its device state and writes an overlay against the base, carrying the
//! app's [`AppInfo`] as metadata.
//!
//! [`package_images`] is the low-level form: it takes a launch disk (raw, or
//! a qcow2 top over the base disk), RAM file and device state directly.
//!
//! Both clean up their work directory and QEMU process on success and on
//! failure, and report what took the space ([`PackageReport::contributors`]).

mod guest;
mod report;
pub mod scrub;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cloudlet_api::AppInfo;
use cloudlet_base::{BaseError, BaseStore, BaseVm, RestoreFromBaseError};
use cloudlet_overlay::{Codec, CreateConfig, CreateOverlayError, OverlayStats};
use cloudlet_qemu::image::{self, ImageError};
use cloudlet_qemu::{AgentError, SaveVmError};
use serde::Serialize;

pub use report::{contributors, Contributor};
pub use scrub::ScrubReport;

/// Where the app is copied in the guest, and the working directory of its
/// commands.
pub const APP_DIR: &str = "/opt/app";
/// Where the app's output goes in the guest.
pub const APP_LOG: &str = "/tmp/app.log";

/// What to package.
#[derive(Debug, Clone)]
pub struct PackageConfig {
    /// Name of the base VM in the store.
    pub base: String,
    /// App name (stored in the overlay's metadata).
    pub app_name: String,
    /// App version (stored in the overlay's metadata, when given).
    pub app_version: Option<String>,
    /// Host directory copied recursively to [`APP_DIR`] (modes kept).
    pub install_dir: Option<PathBuf>,
    /// Shell commands run in the guest, in [`APP_DIR`], one after the other.
    pub install_commands: Vec<String>,
    /// Time limit of each install command.
    pub install_timeout: Duration,
    /// The app's shell command, started in the background in [`APP_DIR`].
    pub run_command: String,
    /// Guest TCP ports the app serves; the first one is waited for.
    pub ports: Vec<u16>,
    /// HTTP path that answers when the app is ready.
    pub health_path: Option<String>,
    /// How long the app may take to answer.
    pub ready_timeout: Duration,
    /// Shell commands run in the guest once the app answers, before the
    /// launch state is saved (e.g. to warm a cache or load data).
    pub warmup_commands: Vec<String>,
    /// Pause between the app's first answer (and the warm-up) and the
    /// scrub and save.
    pub settle: Duration,
    /// Scrub the guest before the save (see [`scrub`]): trim the disk,
    /// drop clean caches, zero free memory. On by default.
    pub scrub: bool,
    /// Overlay codec (default XOR + zstd level 9: packaging is rare, the
    /// overlay is fetched many times).
    pub codec: Codec,
    /// Payload segment size (None: the engine's default).
    pub segment_size: Option<u32>,
    /// The overlay file to write.
    pub output: PathBuf,
    /// Where the temporary VM files go (a subdirectory is created and
    /// removed).
    pub work_dir: PathBuf,
    /// Keep the launch images (`disk.raw`, `memory.ram`, `state`,
    /// `app.json`) in this directory, e.g. for benchmarks.
    pub keep_launch: Option<PathBuf>,
}

impl PackageConfig {
    /// A configuration with default timeouts and codec.
    pub fn new(
        base: impl Into<String>,
        app_name: impl Into<String>,
        run_command: impl Into<String>,
        port: u16,
        output: impl Into<PathBuf>,
    ) -> PackageConfig {
        PackageConfig {
            base: base.into(),
            app_name: app_name.into(),
            app_version: None,
            install_dir: None,
            install_commands: Vec::new(),
            install_timeout: Duration::from_secs(30 * 60),
            run_command: run_command.into(),
            ports: vec![port],
            health_path: None,
            ready_timeout: Duration::from_secs(300),
            warmup_commands: Vec::new(),
            settle: Duration::from_secs(1),
            scrub: true,
            codec: Codec::XorZstd { level: 9 },
            segment_size: None,
            output: output.into(),
            work_dir: std::env::temp_dir(),
            keep_launch: None,
        }
    }

    /// The app metadata stored in the overlay.
    pub fn app_info(&self) -> AppInfo {
        AppInfo {
            name: self.app_name.clone(),
            ports: self.ports.clone(),
            health_path: self.health_path.clone(),
            command: Some(self.run_command.clone()),
            version: self.app_version.clone(),
        }
    }
}

/// The low-level form: launch images given directly.
#[derive(Debug, Clone)]
pub struct PackageImagesConfig {
    pub base: String,
    /// The launch disk: raw, or a qcow2 top whose backing file is the base
    /// disk (flattened first).
    pub disk: PathBuf,
    /// The launch RAM file (as large as the base's).
    pub memory: PathBuf,
    /// The launch device state (QEMU migration stream without RAM).
    pub state: PathBuf,
    /// App metadata stored in the overlay, if any.
    pub app: Option<AppInfo>,
    pub codec: Codec,
    /// Payload segment size (None: the engine's default).
    pub segment_size: Option<u32>,
    pub output: PathBuf,
    pub work_dir: PathBuf,
}

/// A long step of packaging, reported as it starts or progresses.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum PackageEvent {
    Restoring {
        base: String,
    },
    Copying {
        files_done: u64,
        files_total: u64,
        bytes_done: u64,
        bytes_total: u64,
    },
    Installing {
        index: usize,
        total: usize,
        command: String,
    },
    Syncing,
    Starting {
        command: String,
    },
    WaitingForPort {
        port: u16,
        health_path: Option<String>,
    },
    WarmingUp {
        index: usize,
        total: usize,
        command: String,
    },
    /// Trimming the disk, dropping caches, zeroing free memory.
    Scrubbing,
    Saving,
    Flattening,
    CreatingOverlay {
        /// Percent done, when known.
        percent: Option<f64>,
    },
    Done {
        overlay_bytes: u64,
    },
}

/// Time spent in one step.
#[derive(Debug, Clone, Serialize)]
pub struct StepTime {
    pub step: &'static str,
    pub seconds: f64,
}

/// What packaging produced.
#[derive(Debug, Clone, Serialize)]
pub struct PackageReport {
    pub overlay: PathBuf,
    pub app: Option<AppInfo>,
    pub base: String,
    pub base_id: String,
    /// Bytes of the launch state (disk + memory image sizes).
    pub launch_bytes: u64,
    pub stats: OverlayStats,
    /// What took the space, biggest first (by stored bytes).
    pub contributors: Vec<Contributor>,
    /// What scrubbing did (None: not scrubbed).
    pub scrub: Option<ScrubReport>,
    pub steps: Vec<StepTime>,
    pub total_seconds: f64,
}

/// Why packaging failed.
#[derive(Debug, thiserror::Error)]
pub enum PackageAppError {
    #[error("Invalid configuration: {0}")]
    InvalidConfig(String),
    #[error(transparent)]
    Base(#[from] BaseError),
    #[error("Cannot create the work directory {}", path.display())]
    WorkDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot restore base {base}")]
    Restore {
        base: String,
        #[source]
        source: RestoreFromBaseError,
    },
    #[error("Cannot read the install directory {}", path.display())]
    ReadInstallDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Guest agent failed while {step}")]
    Agent {
        step: &'static str,
        #[source]
        source: AgentError,
    },
    #[error("Install command {command:?} failed with {status}: {output}")]
    InstallFailed {
        command: String,
        status: String,
        output: String,
    },
    #[error("Warm-up command {command:?} failed with {status}: {output}")]
    WarmupFailed {
        command: String,
        status: String,
        output: String,
    },
    #[error("App did not answer on guest port {port}{} within {waited:?}; its log ends with: {log}", health.as_deref().map(|h| format!(" (GET {h})")).unwrap_or_default())]
    NotReady {
        port: u16,
        health: Option<String>,
        waited: Duration,
        log: String,
    },
    #[error("Cannot save the launch state")]
    Save(#[source] SaveVmError),
    #[error("Cannot flatten the launch disk")]
    Flatten(#[source] ImageError),
    #[error("Cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot keep the launch images in {}", path.display())]
    KeepLaunch {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot create the overlay {}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: CreateOverlayError,
    },
    #[error("A packaging task failed: {0}")]
    Task(String),
}

type Result<T, E = PackageAppError> = std::result::Result<T, E>;

/// A work directory removed when dropped.
struct WorkDir(PathBuf);

impl WorkDir {
    fn create(parent: &Path, app: &str) -> Result<WorkDir> {
        let safe: String = app
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(32)
            .collect();
        let path = parent.join(format!(
            "cloudlet-package-{safe}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&path).map_err(|source| PackageAppError::WorkDir {
            path: path.clone(),
            source,
        })?;
        Ok(WorkDir(path))
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            tracing::warn!(path = %self.0.display(), "cannot remove the work directory: {e}");
        }
    }
}

/// Times the steps of a run.
struct Steps {
    started: Instant,
    last: Instant,
    done: Vec<StepTime>,
}

impl Steps {
    fn new() -> Steps {
        let now = Instant::now();
        Steps {
            started: now,
            last: now,
            done: Vec::new(),
        }
    }
    fn finish(&mut self, step: &'static str) {
        let now = Instant::now();
        self.done.push(StepTime {
            step,
            seconds: (now - self.last).as_secs_f64(),
        });
        self.last = now;
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| PackageAppError::Task(e.to_string()))?
}

/// Packages an app: restore the base, install, start, wait, save, overlay.
pub async fn package_app(
    store: &BaseStore,
    cfg: &PackageConfig,
    progress: impl Fn(PackageEvent),
) -> Result<PackageReport, PackageAppError> {
    if cfg.ports.is_empty() {
        return Err(PackageAppError::InvalidConfig("no port to wait for".into()));
    }
    if cfg.run_command.trim().is_empty() {
        return Err(PackageAppError::InvalidConfig("empty run command".into()));
    }
    if cfg.run_command.contains('\n') {
        return Err(PackageAppError::InvalidConfig(
            "the run command must be one line (it goes to the autostart file)".into(),
        ));
    }
    if let Some(dir) = &cfg.install_dir {
        if !dir.is_dir() {
            return Err(PackageAppError::ReadInstallDir {
                path: dir.clone(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "not a directory"),
            });
        }
    }
    let base = store.get(&cfg.base)?;
    let work = WorkDir::create(&cfg.work_dir, &cfg.app_name)?;
    let mut steps = Steps::new();

    progress(PackageEvent::Restoring {
        base: cfg.base.clone(),
    });
    let vm = base
        .restore(
            &format!("package-{}", cfg.app_name),
            &work.path("memory.ram"),
            &work.path("disk.qcow2"),
            &work.path("run"),
            Vec::new(),
        )
        .await
        .map_err(|source| PackageAppError::Restore {
            base: cfg.base.clone(),
            source,
        })?;
    steps.finish("restore");
    let prepared = guest::prepare_launch(&vm, cfg, &work, &mut steps, &progress).await;
    vm.kill().await;
    let scrubbed = prepared?;

    progress(PackageEvent::Flattening);
    let (top, flat) = (work.path("disk.qcow2"), work.path("disk.raw"));
    blocking(move || image::convert_to_raw(&top, &flat).map_err(PackageAppError::Flatten)).await?;
    let _ = std::fs::remove_file(work.path("disk.qcow2"));
    steps.finish("flatten");

    let app = cfg.app_info();
    let mut report = create(
        &base,
        &work.path("disk.raw"),
        &work.path("memory.ram"),
        &work.path("state"),
        Some(&app),
        (cfg.codec, cfg.segment_size),
        &cfg.output,
        &progress,
    )
    .await?;
    report.scrub = scrubbed;
    steps.finish("create overlay");

    if let Some(keep) = &cfg.keep_launch {
        keep_launch(&work, keep, &app)?;
        steps.finish("keep launch images");
    }
    report.steps = steps.done;
    report.total_seconds = steps.started.elapsed().as_secs_f64();
    progress(PackageEvent::Done {
        overlay_bytes: report.stats.overlay_bytes,
    });
    Ok(report)
}

/// The low-level form: an overlay from launch images given directly.
pub async fn package_images(
    store: &BaseStore,
    cfg: &PackageImagesConfig,
    progress: impl Fn(PackageEvent),
) -> Result<PackageReport, PackageAppError> {
    let base = store.get(&cfg.base)?;
    let mut steps = Steps::new();
    let work = WorkDir::create(&cfg.work_dir, "images")?;
    let disk = if is_qcow2(&cfg.disk)? {
        progress(PackageEvent::Flattening);
        let (top, flat) = (cfg.disk.clone(), work.path("disk.raw"));
        blocking(move || image::convert_to_raw(&top, &flat).map_err(PackageAppError::Flatten))
            .await?;
        steps.finish("flatten");
        work.path("disk.raw")
    } else {
        cfg.disk.clone()
    };
    let mut report = create(
        &base,
        &disk,
        &cfg.memory,
        &cfg.state,
        cfg.app.as_ref(),
        (cfg.codec, cfg.segment_size),
        &cfg.output,
        &progress,
    )
    .await?;
    steps.finish("create overlay");
    report.steps = steps.done;
    report.total_seconds = steps.started.elapsed().as_secs_f64();
    progress(PackageEvent::Done {
        overlay_bytes: report.stats.overlay_bytes,
    });
    Ok(report)
}

fn is_qcow2(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let read = std::fs::File::open(path).and_then(|mut f| f.read(&mut magic));
    match read {
        Ok(n) => Ok(n == 4 && magic == *b"QFI\xfb"),
        Err(source) => Err(PackageAppError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[allow(clippy::too_many_arguments)]
async fn create(
    base: &BaseVm,
    disk: &Path,
    memory: &Path,
    state: &Path,
    app: Option<&AppInfo>,
    (codec, segment_size): (Codec, Option<u32>),
    output: &Path,
    progress: &impl Fn(PackageEvent),
) -> Result<PackageReport> {
    let device_state = std::fs::read(state).map_err(|source| PackageAppError::Read {
        path: state.to_path_buf(),
        source,
    })?;
    let mut config = CreateConfig::new(
        base.disk_path(),
        base.memory_path(),
        disk,
        memory,
        device_state,
        base.manifest.id.clone(),
    );
    config.codec = codec;
    if let Some(size) = segment_size {
        config.segment_size = size;
    }
    if let Some(app) = app {
        config.metadata = serde_json::to_vec(app).unwrap_or_default();
    }
    progress(PackageEvent::CreatingOverlay { percent: None });
    let out = output.to_path_buf();
    let stats = blocking(move || {
        cloudlet_overlay::create_overlay(&config, &out)
            .map_err(|source| PackageAppError::Create { path: out, source })
    })
    .await?;
    let (_, manifest) = std::fs::File::open(output)
        .and_then(|f| {
            cloudlet_overlay::read_manifest(&mut std::io::BufReader::new(f))
                .map_err(std::io::Error::other)
        })
        .map_err(|source| PackageAppError::Read {
            path: output.to_path_buf(),
            source,
        })?;
    Ok(PackageReport {
        overlay: output.to_path_buf(),
        app: app.cloned(),
        base: base.manifest.name.clone(),
        base_id: base.manifest.id.clone(),
        launch_bytes: manifest.disk_size + manifest.mem_size,
        contributors: contributors(&manifest),
        scrub: None,
        stats,
        steps: Vec::new(),
        total_seconds: 0.0,
    })
}

/// Moves the launch images into `keep` (copies across file systems).
fn keep_launch(work: &WorkDir, keep: &Path, app: &AppInfo) -> Result<()> {
    let err = |source| PackageAppError::KeepLaunch {
        path: keep.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(keep).map_err(err)?;
    for name in ["disk.raw", "memory.ram", "state"] {
        let (from, to) = (work.path(name), keep.join(name));
        if std::fs::rename(&from, &to).is_err() {
            cloudlet_qemu::files::copy_sparse(&from, &to).map_err(err)?;
        }
    }
    let json = serde_json::to_vec_pretty(app).map_err(|e| err(e.into()))?;
    cloudlet_qemu::files::write_atomic(&keep.join("app.json"), &json).map_err(err)
}
