//! `cloudlet overlay ...`: package an app into an overlay, inspect, verify,
//! apply.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use cloudlet_base::BaseStore;
use cloudlet_overlay::{apply_overlay, inspect, verify, ApplyConfig, BaseImages, Codec};
use cloudlet_package::{
    package_app, package_images, PackageConfig, PackageEvent, PackageImagesConfig, PackageReport,
};

use crate::Output;

#[derive(Subcommand)]
pub enum OverlayCommand {
    /// Package an app: restore the base, copy DIR in, install, start CMD,
    /// wait for its port, save the launch state as an overlay.
    Create(Box<CreateArgs>),
    /// An overlay from launch images given directly (disk raw or qcow2 top
    /// over the base disk, RAM file, device state).
    CreateRaw(CreateRawArgs),
    /// Check an overlay without its base (header, manifest, app metadata,
    /// length, every segment's hash) and explain it: sizes by chunk kind,
    /// codec, dedup sources, base id, app metadata.
    Inspect { file: PathBuf },
    /// Check an overlay against a base: what inspect checks, that it is for
    /// this base (id and images), every chunk; nothing written.
    Verify {
        file: PathBuf,
        #[arg(long)]
        base: String,
    },
    /// Rebuild the launch disk (raw), RAM file and device state.
    Apply {
        file: PathBuf,
        #[arg(long)]
        base: String,
        #[arg(long)]
        disk: PathBuf,
        #[arg(long)]
        memory: PathBuf,
        #[arg(long)]
        state: PathBuf,
    },
    /// Make a signing key for overlays: FILE (mode 0600, keep it secret)
    /// and FILE.pub (the line a cloudlet or registry trusts, for its
    /// `trusted_keys`).
    Keygen {
        /// Who signs: 1 to 128 letters, digits, '.', '_', '-' or '@'.
        #[arg(long)]
        signer: String,
        #[arg(short = 'o', long = "out", value_name = "FILE")]
        out: PathBuf,
    },
    /// Sign an overlay (checked whole first): who made it and until when
    /// it may be used, over its manifest (base, app and version, every
    /// segment). Rewrites the file, or writes OUT.
    Sign {
        file: PathBuf,
        /// The signing key file (from `overlay keygen`, mode 0600).
        #[arg(long)]
        key: PathBuf,
        /// How long the signature holds: N followed by d, h, m or s.
        #[arg(long, default_value = "90d", value_parser = parse_valid_for)]
        valid_for: u64,
        #[arg(short = 'o', long = "out", value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

/// `90d`, `12h`, `30m`, `45s`: in seconds.
fn parse_valid_for(s: &str) -> Result<u64, String> {
    let (n, unit) = s.split_at(s.len().saturating_sub(1));
    let per = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" => 1,
        _ => return Err(format!("{s:?}: N followed by d, h, m or s (e.g. 90d)")),
    };
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: N followed by d, h, m or s (e.g. 90d)"))?;
    n.checked_mul(per)
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("{s:?}: more than zero, less than forever"))
}

#[derive(Clone, Copy, ValueEnum)]
pub enum CodecName {
    /// XOR with the base chunk where that pays, then zstd.
    XorZstd,
    Zstd,
    Store,
}

#[derive(Args)]
pub struct CodecArgs {
    /// Chunk codec.
    #[arg(long, value_enum, default_value_t = CodecName::XorZstd)]
    codec: CodecName,
    /// zstd level.
    #[arg(long, default_value_t = 9)]
    level: i32,
    /// Payload segment size in MiB (default: the engine's).
    #[arg(long)]
    segment_mib: Option<u32>,
}

impl CodecArgs {
    fn codec(&self) -> Codec {
        match self.codec {
            CodecName::XorZstd => Codec::XorZstd { level: self.level },
            CodecName::Zstd => Codec::Zstd { level: self.level },
            CodecName::Store => Codec::Store,
        }
    }
}

#[derive(Args)]
pub struct CreateArgs {
    /// Base VM to build on.
    #[arg(long)]
    base: String,
    /// Host directory copied to /opt/app in the guest (modes kept).
    #[arg(long)]
    install: Option<PathBuf>,
    /// Shell command run in the guest in /opt/app before the app starts
    /// (repeatable), e.g. "apt-get install -y python3-numpy".
    #[arg(long = "install-cmd")]
    install_cmd: Vec<String>,
    /// The app's command, started in /opt/app (and at every cold boot).
    #[arg(long)]
    run: String,
    /// Guest port the app serves (repeatable; the first is waited for).
    #[arg(long = "port", required = true)]
    ports: Vec<u16>,
    /// HTTP path that answers when the app is ready.
    #[arg(long)]
    health: Option<String>,
    /// App name (default: the install directory's name, else "app").
    #[arg(long)]
    name: Option<String>,
    /// App version (kept in the overlay; a signature covers it).
    #[arg(long)]
    app_version: Option<String>,
    /// Shell command run once the app answers, before the save (repeatable).
    #[arg(long = "warmup-cmd")]
    warmup_cmd: Vec<String>,
    /// Do not scrub the guest before the save (by default its disk is
    /// trimmed, clean caches dropped and free memory zeroed, so that the
    /// overlay does not carry deleted files' blocks and stale memory).
    #[arg(long)]
    no_scrub: bool,
    /// Seconds each install command may take.
    #[arg(long, default_value_t = 1800)]
    install_timeout: u64,
    /// Seconds the app may take to answer.
    #[arg(long, default_value_t = 300)]
    ready_timeout: u64,
    #[command(flatten)]
    codec: CodecArgs,
    /// Where temporary VM files go.
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    work_dir: PathBuf,
    /// Keep the launch images (disk.raw, memory.ram, state, app.json) here.
    #[arg(long)]
    keep_launch: Option<PathBuf>,
    /// The overlay file to write.
    #[arg(short = 'o', long = "out", value_name = "FILE")]
    out: PathBuf,
}

#[derive(Args)]
pub struct CreateRawArgs {
    #[arg(long)]
    base: String,
    #[arg(long)]
    disk: PathBuf,
    #[arg(long)]
    memory: PathBuf,
    #[arg(long)]
    state: PathBuf,
    /// App metadata: a JSON file of the app's AppInfo.
    #[arg(long)]
    app_json: Option<PathBuf>,
    #[command(flatten)]
    codec: CodecArgs,
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    work_dir: PathBuf,
    #[arg(short = 'o', long = "out", value_name = "FILE")]
    out: PathBuf,
}

pub async fn run(cmd: OverlayCommand, home: &Path, output: Output) -> anyhow::Result<()> {
    let store = BaseStore::new(home);
    match cmd {
        OverlayCommand::Create(a) => {
            let name = a.name.clone().unwrap_or_else(|| {
                a.install
                    .as_ref()
                    .and_then(|d| d.canonicalize().ok())
                    .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
                    .unwrap_or_else(|| "app".into())
            });
            let mut cfg = PackageConfig::new(&a.base, name, &a.run, a.ports[0], &a.out);
            cfg.ports = a.ports.clone();
            cfg.app_version = a.app_version.clone();
            cfg.install_dir = a.install.clone();
            cfg.install_commands = a.install_cmd.clone();
            cfg.warmup_commands = a.warmup_cmd.clone();
            cfg.health_path = a.health.clone();
            cfg.install_timeout = std::time::Duration::from_secs(a.install_timeout);
            cfg.ready_timeout = std::time::Duration::from_secs(a.ready_timeout);
            cfg.codec = a.codec.codec();
            cfg.segment_size = a.codec.segment_mib.map(|m| m.saturating_mul(1 << 20));
            cfg.work_dir = a.work_dir.clone();
            cfg.keep_launch = a.keep_launch.clone();
            cfg.scrub = !a.no_scrub;
            let display = Progress::new();
            let report = package_app(&store, &cfg, |e| display.event(&e)).await;
            display.clear();
            let report = report.with_context(|| format!("Packaging {}", a.out.display()))?;
            print_report(&report, output)
        }
        OverlayCommand::CreateRaw(a) => {
            let app = match &a.app_json {
                Some(p) => Some(
                    serde_json::from_slice(
                        &std::fs::read(p).with_context(|| format!("Reading {}", p.display()))?,
                    )
                    .with_context(|| format!("Parsing {}", p.display()))?,
                ),
                None => None,
            };
            let cfg = PackageImagesConfig {
                base: a.base.clone(),
                disk: a.disk.clone(),
                memory: a.memory.clone(),
                state: a.state.clone(),
                app,
                codec: a.codec.codec(),
                segment_size: a.codec.segment_mib.map(|m| m.saturating_mul(1 << 20)),
                output: a.out.clone(),
                work_dir: a.work_dir.clone(),
            };
            let display = Progress::new();
            let report = package_images(&store, &cfg, |e| display.event(&e)).await;
            display.clear();
            let report = report.with_context(|| format!("Creating {}", a.out.display()))?;
            print_report(&report, output)
        }
        OverlayCommand::Keygen { signer, out } => {
            let k = cloudlet_trust::keys::generate(&signer, &out)?;
            let public = cloudlet_trust::keys::public_path(&out);
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({
                        "signer": signer,
                        "key": out,
                        "public_key_file": public,
                        "public_key": k.public().to_string(),
                    })
                ),
                Output::Text => println!(
                    "signing key {} (keep it secret), public key {}:\n{}",
                    out.display(),
                    public.display(),
                    k.public()
                ),
            }
            Ok(())
        }
        OverlayCommand::Sign {
            file,
            key,
            valid_for,
            out,
        } => {
            let k = cloudlet_trust::keys::load(&key)?;
            let now = cloudlet_overlay::signature::unix_now();
            let dest = out.unwrap_or_else(|| file.clone());
            let sig = tokio::task::spawn_blocking({
                let (file, dest) = (file.clone(), dest.clone());
                move || {
                    cloudlet_overlay::signature::sign_file(
                        &file,
                        &dest,
                        &k.key,
                        &k.signer,
                        now,
                        now + valid_for,
                    )
                }
            })
            .await?
            .with_context(|| format!("Signing {}", file.display()))?;
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({
                        "overlay": dest,
                        "signer": sig.signer,
                        "fingerprint": sig.fingerprint(),
                        "signed_at": sig.signed_at,
                        "expires_at": sig.expires_at,
                    })
                ),
                Output::Text => println!(
                    "signed {} as {} (key {}), valid for {} days",
                    dest.display(),
                    sig.signer,
                    sig.fingerprint(),
                    valid_for / 86_400
                ),
            }
            Ok(())
        }
        OverlayCommand::Inspect { file } => {
            let info = inspect(&file).with_context(|| format!("Inspecting {}", file.display()))?;
            match output {
                Output::Json => {
                    let mut v = serde_json::to_value(&info)?;
                    // App metadata as JSON when it is JSON.
                    if let Ok(app) = serde_json::from_slice::<serde_json::Value>(&info.metadata) {
                        v["app"] = app;
                    }
                    println!("{}", serde_json::to_string_pretty(&v)?);
                }
                Output::Text => print!("{info}"),
            }
            Ok(())
        }
        OverlayCommand::Verify { file, base } => {
            let b = store.get(&base)?;
            let start = Instant::now();
            let images = BaseImages {
                id: Some(b.manifest.id.clone()),
                disk: b.disk_path(),
                mem: b.memory_path(),
            };
            let info = tokio::task::spawn_blocking(move || verify(&file, &images))
                .await?
                .with_context(|| format!("Verifying against base {base}"))?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&info)?),
                Output::Text => println!(
                    "overlay OK against base {base} ({} bytes, launch hash {}, {:.1} s)",
                    info.file_len,
                    &info.launch_hash[..16],
                    start.elapsed().as_secs_f64()
                ),
            }
            Ok(())
        }
        OverlayCommand::Apply {
            file,
            base,
            disk,
            memory,
            state,
        } => {
            let b = store.get(&base)?;
            let cfg = ApplyConfig::new(b.disk_path(), b.memory_path(), &disk, &memory);
            let f = file.clone();
            let out = tokio::task::spawn_blocking(move || apply_overlay(&f, &cfg))
                .await?
                .with_context(|| format!("Applying {} to base {base}", file.display()))?;
            cloudlet_qemu::files::write_atomic(&state, &out.device_state)
                .with_context(|| format!("Writing {}", state.display()))?;
            let launch = std::fs::metadata(&disk)?.len() + std::fs::metadata(&memory)?.len();
            let secs = out.apply_time.as_secs_f64();
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({
                        "disk": disk, "memory": memory, "state": state,
                        "launch_hash": hex_encode(&out.launch_hash),
                        "apply_seconds": secs,
                        "launch_bytes": launch,
                    })
                ),
                Output::Text => println!(
                    "applied in {secs:.2} s ({:.0} MB/s of launch state): {}, {}, {}",
                    launch as f64 / 1e6 / secs.max(1e-9),
                    disk.display(),
                    memory.display(),
                    state.display()
                ),
            }
            Ok(())
        }
    }
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn mb(b: u64) -> String {
    if b >= 10_000_000 {
        format!("{:.0} MB", b as f64 / 1e6)
    } else {
        format!("{:.2} MB", b as f64 / 1e6)
    }
}

fn print_report(r: &PackageReport, output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    let s = &r.stats;
    println!(
        "overlay {} written: {} ({:.1}% of {} changed, {:.2}% of the {} launch state)",
        r.overlay.display(),
        mb(s.overlay_bytes),
        100.0 * s.overlay_bytes as f64 / s.changed_bytes.max(1) as f64,
        mb(s.changed_bytes),
        100.0 * s.overlay_bytes as f64 / r.launch_bytes.max(1) as f64,
        mb(r.launch_bytes),
    );
    println!(
        "base {} ({}), total {:.1} s: {}",
        r.base,
        &r.base_id[..16.min(r.base_id.len())],
        r.total_seconds,
        r.steps
            .iter()
            .map(|t| format!("{} {:.1} s", t.step, t.seconds))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(sc) = &r.scrub {
        let trimmed = sc
            .trimmed_bytes
            .map(|b| format!("fstrim trimmed {}", mb(b)))
            .unwrap_or_else(|| "disk not trimmed".into());
        let zeroed = match (sc.zeroed_bytes, sc.mem_free_bytes) {
            (Some(z), Some(f)) => format!("zeroed {} of {} free memory", mb(z), mb(f)),
            (Some(z), None) => format!("zeroed {} of free memory", mb(z)),
            _ => "free memory not zeroed".into(),
        };
        let dropped = if sc.caches_dropped {
            ", clean caches dropped"
        } else {
            ""
        };
        println!("scrub: {trimmed}{dropped}, {zeroed}");
        for note in &sc.notes {
            println!("  note: {note}");
        }
    }
    println!("top contributors (by bytes in the overlay):");
    println!(
        "  {:<13} {:<16} {:>9} {:>11} {:>11}",
        "image", "kind", "chunks", "changed", "in overlay"
    );
    for c in r.contributors.iter().take(8) {
        println!(
            "  {:<13} {:<16} {:>9} {:>11} {:>11}",
            c.image,
            c.kind,
            c.chunks,
            mb(c.bytes),
            mb(c.stored_bytes)
        );
    }
    Ok(())
}

/// A one-line progress display on stderr (plain lines when not a terminal).
struct Progress {
    tty: bool,
    start: Instant,
    /// The kind of the last event shown (a new kind starts a new line).
    last: std::sync::Mutex<Option<std::mem::Discriminant<PackageEvent>>>,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            tty: std::io::stderr().is_terminal(),
            start: Instant::now(),
            last: std::sync::Mutex::new(None),
        }
    }

    fn event(&self, e: &PackageEvent) {
        let line = match e {
            PackageEvent::Restoring { base } => format!("restoring base {base}"),
            PackageEvent::Copying {
                files_done,
                files_total,
                bytes_done,
                bytes_total,
            } => format!(
                "copying files {files_done}/{files_total} ({} of {})",
                mb(*bytes_done),
                mb(*bytes_total)
            ),
            PackageEvent::Installing {
                index,
                total,
                command,
            } => format!("installing [{index}/{total}] {command}"),
            PackageEvent::Syncing => "syncing the guest's disk (fstrim)".into(),
            PackageEvent::Starting { command } => format!("starting {command}"),
            PackageEvent::WaitingForPort { port, health_path } => format!(
                "waiting for guest port {port}{}",
                health_path
                    .as_deref()
                    .map(|h| format!(" (GET {h})"))
                    .unwrap_or_default()
            ),
            PackageEvent::WarmingUp {
                index,
                total,
                command,
            } => format!("warming up [{index}/{total}] {command}"),
            PackageEvent::Scrubbing => {
                "scrubbing: fstrim, dropping caches, zeroing free memory".into()
            }
            PackageEvent::Saving => "pausing and saving the launch state".into(),
            PackageEvent::Flattening => "flattening the launch disk".into(),
            PackageEvent::CreatingOverlay { percent } => match percent {
                Some(p) => format!("creating the overlay {p:.0}%"),
                None => "creating the overlay".into(),
            },
            PackageEvent::Done { overlay_bytes } => format!("done: {}", mb(*overlay_bytes)),
        };
        let line = format!("[{:>6.1} s] {line}", self.start.elapsed().as_secs_f64());
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let mut err = std::io::stderr().lock();
        if self.tty {
            if last.is_some_and(|k| k != std::mem::discriminant(e)) {
                let _ = writeln!(err);
            }
            let _ = write!(err, "\r\x1b[2K{}", truncate(&line, 120));
        } else {
            // Copy progress only every few files on a log.
            if matches!(e, PackageEvent::Copying { files_done, files_total, .. }
                if *files_done != *files_total && files_done % 50 != 0)
            {
                return;
            }
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
        *last = Some(std::mem::discriminant(e));
    }

    fn clear(&self) {
        if self.tty && self.last.lock().map(|l| l.is_some()).unwrap_or(false) {
            let _ = writeln!(std::io::stderr());
        }
    }
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}
