//! What is measured: each overlay's synthesis (ours) and a bulk GET of it
//! (the link) in each TLS mode, and once per run the naive way; the runs
//! interleaved mode by mode.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use cloudlet_api::StageTiming;
use cloudlet_bench::tls::TlsMode;
use cloudlet_wan::Wan;

use crate::edge::Edge;
use crate::naive::{naive, run};
use crate::{Args, Dirs};

/// One row of a table: one overlay, one run, one mode.
pub struct Row {
    pub name: String,
    /// Which run of this overlay at this rate (1, 2, ...).
    pub run: usize,
    pub mode: TlsMode,
    pub overlay_bytes: u64,
    pub bulk: Option<(u64, Duration)>,
    pub ours: Option<Ours>,
    pub naive: Option<Naive>,
    pub errors: Vec<String>,
}

pub struct Ours {
    pub total: Duration,
    pub api: Duration,
    pub timings: Vec<StageTiming>,
}

impl Ours {
    pub fn stage(&self, name: &str) -> Option<Duration> {
        self.timings
            .iter()
            .find(|t| t.stage == name)
            .map(|t| Duration::from_millis(t.ms))
    }
    /// The fetch before the restore: all of the overlay, applied
    /// (`fetch_apply`), or with the early start up to its device state
    /// (`device_state`; the rest streams in after the resume).
    pub fn fetch(&self) -> Option<Duration> {
        self.stage("fetch_apply")
            .or_else(|| self.stage("device_state"))
    }

    /// restore + identity + app_ready: what follows the last byte.
    pub fn restore_part(&self) -> Duration {
        ["restore", "identity", "app_ready"]
            .iter()
            .filter_map(|s| self.stage(s))
            .sum()
    }
}

#[derive(Clone)]
pub struct Naive {
    pub zst_bytes: u64,
    pub transfer: Duration,
    pub decompress: Duration,
    pub boot: Duration,
}

impl Naive {
    pub fn total(&self) -> Duration {
        self.transfer + self.decompress + self.boot
    }
}

pub struct Prepared {
    pub name: String,
    pub overlay: PathBuf,
    pub overlay_bytes: u64,
    pub health: String,
    /// The compressed launch disk and how long `zstd -3` took.
    pub zst: Option<(PathBuf, Duration)>,
}

/// The measurements of one mode at one rate, a row per overlay and run.
pub struct Table {
    pub mode: TlsMode,
    pub rate: f64,
    pub rows: Vec<Row>,
}

/// The overlays of `args`, and the naive way's compressed disks (made once,
/// timed); notes on those skipped.
pub fn prepare(args: &Args, dirs: &Dirs, notes: &mut Vec<String>) -> anyhow::Result<Vec<Prepared>> {
    let mut prepared = Vec::new();
    for name in &args.overlays {
        let overlay = dirs.overlays.join(format!("{name}.overlay"));
        let launch = dirs.overlays.join("launch").join(name);
        let Ok(meta) = std::fs::metadata(&overlay) else {
            notes.push(format!("{name}: skipped, {} missing", overlay.display()));
            continue;
        };
        let health = std::fs::read(launch.join("app.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["health_path"].as_str().map(str::to_string))
            .unwrap_or_else(|| "/health".into());
        let mut zst = None;
        if !args.no_naive {
            let disk = launch.join("disk.raw");
            if disk.is_file() {
                let out = dirs.work.join(format!("{name}.disk.zst"));
                eprintln!("compressing {} (zstd -3) ...", disk.display());
                let t = Instant::now();
                run(Command::new("zstd")
                    .args(["-3", "-q", "-f"])
                    .arg(&disk)
                    .arg("-o")
                    .arg(&out))?;
                zst = Some((out, t.elapsed()));
            } else {
                notes.push(format!(
                    "{name}: no launch image at {}, reference (b) not measured",
                    launch.display()
                ));
            }
        }
        prepared.push(Prepared {
            name: name.clone(),
            overlay,
            overlay_bytes: meta.len(),
            health,
            zst,
        });
    }
    Ok(prepared)
}

/// Every rate, every run, every overlay, each mode in turn (off, on, off,
/// on, ...: the machine's noise falls on all modes alike); the naive way
/// once per run, after the modes. A table per mode and rate.
pub fn measure_all(
    args: &Args,
    wan: &Wan,
    edges: &[Edge],
    prepared: &[Prepared],
    dirs: &Dirs,
) -> anyhow::Result<Vec<Table>> {
    let mut tables = Vec::new();
    for (i, &rate) in args.rates.iter().enumerate() {
        if i > 0 {
            wan.set_rate(rate)?;
        }
        let first = tables.len();
        for edge in edges {
            tables.push(Table {
                mode: edge.mode,
                rate,
                rows: Vec::new(),
            });
        }
        for run in 1..=args.runs {
            for p in prepared {
                let mut rows = Vec::new();
                for edge in edges {
                    eprintln!(
                        "== {} at {rate} Mbit/s, run {run}/{}, {}",
                        p.name,
                        args.runs,
                        edge.mode.label()
                    );
                    rows.push(measure(edge, p, run as usize));
                }
                if let Some((zst, _)) = &p.zst {
                    eprintln!("== {} at {rate} Mbit/s, run {run}: the naive way", p.name);
                    settle();
                    let n = naive(wan, &args.home, &args.base, p, zst, dirs);
                    for r in &mut rows {
                        match &n {
                            Ok(n) => r.naive = Some(n.clone()),
                            Err(e) => r.errors.push(format!("naive: {e:#}")),
                        }
                    }
                }
                for (t, r) in tables[first..].iter_mut().zip(rows) {
                    t.rows.push(r);
                }
            }
        }
    }
    Ok(tables)
}

/// One overlay at the current rate in `edge`'s mode: bulk download, ours.
fn measure(edge: &Edge, p: &Prepared, run: usize) -> Row {
    let mut row = Row {
        name: p.name.clone(),
        run,
        mode: edge.mode,
        overlay_bytes: p.overlay_bytes,
        bulk: None,
        ours: None,
        naive: None,
        errors: Vec::new(),
    };
    let url = format!("{}/v1/overlays/{}", edge.registry_url, p.name);
    settle();
    match edge.bulk_get(&url) {
        Ok(b) => row.bulk = Some(b),
        Err(e) => row.errors.push(format!("bulk download: {e:#}")),
    }
    settle();
    match edge.synthesize(&url, &p.name, &p.health) {
        Ok(o) => row.ours = Some(o),
        Err(e) => row.errors.push(format!("ours: {e:#}")),
    }
    row
}

/// Before each measured run: write back what earlier runs left dirty (the
/// naive way writes a 2 GiB disk, the preparation three compressed ones),
/// so that no run pays for the writeback of another.
fn settle() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::thread::sleep(Duration::from_millis(500));
}
