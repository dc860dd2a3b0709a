//! Overlay size and speed on realistic app launch states, against two
//! baselines measured in the same run on the same input.
//!
//! Input: the launch images that `scripts/make-overlays.sh` keeps in
//! `target/overlays/launch/APP/` (disk.raw, memory.ram, state, app.json), and
//! the base they were made on. For each app:
//! - ours: `create_overlay` (time, size), then `apply_overlay` to fresh
//!   outputs (page cache warm for the base);
//! - (a) `zstd -19 --long=31 --patch-from=BASE` of the disk and of the memory
//!   image (sizes and times summed);
//! - (b) `xz -6` of the changed 4 KiB chunks of disk + memory, concatenated.
//!
//! Targets (issue 3): overlay <= 0.7x (a); create >= 5x faster than (a);
//! apply >= 500 MB/s of launch state (disk + memory size / apply time).
//!
//! Usage: `cargo run --release -p cloudlet-bench --bin overlay-bench --
//! [--overlays target/overlays] [--apps kvstore,translator,numpy]`

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use cloudlet_base::{default_home, BaseStore};
use cloudlet_overlay::{apply_overlay, create_overlay, ApplyConfig, Codec, CreateConfig};

#[derive(Parser)]
struct Args {
    /// Where make-overlays.sh put its output (launch images in launch/APP).
    #[arg(long, default_value = "target/overlays")]
    overlays: PathBuf,
    /// Apps to measure.
    #[arg(long, value_delimiter = ',', default_values_t = vec!["kvstore".to_string(), "numpy".to_string(), "translator".to_string()])]
    apps: Vec<String>,
    /// Base VM the overlays were made on.
    #[arg(long, default_value = "debian")]
    base: String,
    /// Scratch directory for outputs (on the same file system as a cloudlet's
    /// VM files would be).
    #[arg(long, default_value = "/var/tmp/cloudlet-overlay-bench")]
    work: PathBuf,
    /// zstd level of our overlay.
    #[arg(long, default_value_t = 9)]
    level: i32,
    /// Skip baseline (a) (slow).
    #[arg(long)]
    no_zstd: bool,
}

struct Row {
    app: String,
    launch_bytes: u64,
    changed_bytes: u64,
    overlay_bytes: u64,
    create: Duration,
    apply: Duration,
    zstd_bytes: Option<u64>,
    zstd_time: Option<Duration>,
    xz_bytes: u64,
    xz_time: Duration,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let store =
        BaseStore::new(std::env::var_os("CLOUDLET_HOME").map_or_else(default_home, PathBuf::from));
    let base = store
        .get(&args.base)
        .with_context(|| format!("Base {} (build it, or set CLOUDLET_HOME)", args.base))?;
    for tool in ["zstd", "xz"] {
        if Command::new(tool).arg("--version").output().is_err() {
            bail!("{tool} is missing: apt-get install zstd xz-utils (scripts/install-deps.sh)");
        }
    }
    std::fs::create_dir_all(&args.work)?;
    let mut rows = Vec::new();
    for app in &args.apps {
        let dir = args.overlays.join("launch").join(app);
        if !dir.join("state").is_file() {
            eprintln!(
                "skipping {app}: no launch images in {} (scripts/make-overlays.sh)",
                dir.display()
            );
            continue;
        }
        eprintln!("measuring {app} ...");
        let row = measure(app, &dir, &base.disk_path(), &base.memory_path(), &args)?;
        // Each row as soon as it is measured: the baselines are slow.
        print_table(std::slice::from_ref(&row), &args);
        rows.push(row);
    }
    let _ = std::fs::remove_dir_all(&args.work);
    println!("\n=== all apps");
    print_table(&rows, &args);
    Ok(())
}

fn mb(b: u64) -> String {
    format!("{:.1}", b as f64 / 1e6)
}

fn s(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

/// Reads a file once so that it sits in the page cache.
fn warm(path: &Path) -> anyhow::Result<()> {
    let f = File::open(path)?;
    let len = f.metadata()?.len();
    let mut buf = vec![0u8; 8 << 20];
    let mut pos = 0;
    while pos < len {
        let n = f.read_at(&mut buf, pos)?;
        if n == 0 {
            break;
        }
        pos += n as u64;
    }
    Ok(())
}

fn measure(
    app: &str,
    dir: &Path,
    base_disk: &Path,
    base_mem: &Path,
    args: &Args,
) -> anyhow::Result<Row> {
    let (disk, mem, state) = (
        dir.join("disk.raw"),
        dir.join("memory.ram"),
        dir.join("state"),
    );
    for p in [base_disk, base_mem, &disk, &mem] {
        warm(p)?;
    }
    let work = args.work.join(app);
    std::fs::create_dir_all(&work)?;

    // Ours: create.
    let mut config = CreateConfig::new(
        base_disk,
        base_mem,
        &disk,
        &mem,
        std::fs::read(&state)?,
        "bench",
    );
    config.codec = Codec::XorZstd { level: args.level };
    config.metadata = std::fs::read(dir.join("app.json")).unwrap_or_default();
    let overlay = work.join("app.overlay");
    let stats = create_overlay(&config, &overlay)?;

    // Ours: apply to fresh outputs.
    let (out_disk, out_mem) = (work.join("out.disk"), work.join("out.mem"));
    let started = Instant::now();
    apply_overlay(
        &overlay,
        &ApplyConfig::new(base_disk, base_mem, &out_disk, &out_mem),
    )?;
    let apply = started.elapsed();
    let launch_bytes = std::fs::metadata(&disk)?.len() + std::fs::metadata(&mem)?.len();
    for p in [&out_disk, &out_mem] {
        std::fs::remove_file(p)?;
    }

    // (b) xz -6 of the changed chunks.
    let changed = work.join("changed.bin");
    let changed_bytes = write_changed_chunks(base_disk, &disk, &changed)?
        + write_changed_chunks(base_mem, &mem, &changed)?;
    let xz_out = work.join("changed.xz");
    let (xz_bytes, xz_time) = run_tool(
        Command::new("xz")
            .args(["-6", "-T1", "-k", "-c"])
            .arg(&changed),
        &xz_out,
    )?;
    std::fs::remove_file(&changed)?;

    // (a) zstd -19 --long=31 --patch-from=BASE, disk and memory.
    let (mut zstd_bytes, mut zstd_time) = (None, None);
    if !args.no_zstd {
        let (mut bytes, mut time) = (0, Duration::ZERO);
        for (b, l) in [(base_disk, &disk), (base_mem, &mem)] {
            let out = work.join("patch.zst");
            let (n, t) = run_tool(
                Command::new("zstd")
                    .args(["-q", "-19", "--long=31", "-c"])
                    .arg(format!("--patch-from={}", b.display()))
                    .arg(l),
                &out,
            )?;
            bytes += n;
            time += t;
        }
        zstd_bytes = Some(bytes);
        zstd_time = Some(time);
    }
    std::fs::remove_dir_all(&work)?;
    Ok(Row {
        app: app.to_string(),
        launch_bytes,
        changed_bytes,
        overlay_bytes: stats.overlay_bytes,
        create: stats.create_time,
        apply,
        zstd_bytes,
        zstd_time,
        xz_bytes,
        xz_time,
    })
}

/// Runs a compressor writing to stdout into `out`; its output size and time.
fn run_tool(cmd: &mut Command, out: &Path) -> anyhow::Result<(u64, Duration)> {
    let file = File::create(out)?;
    let started = Instant::now();
    let status = cmd
        .stdout(file)
        .status()
        .with_context(|| format!("Running {cmd:?}"))?;
    let t = started.elapsed();
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    let n = std::fs::metadata(out)?.len();
    std::fs::remove_file(out)?;
    Ok((n, t))
}

/// Appends the 4 KiB chunks of `launch` that differ from `base` (seen as
/// extended with zeros) to `out`; the number of bytes appended.
fn write_changed_chunks(base: &Path, launch: &Path, out: &Path) -> anyhow::Result<u64> {
    use std::io::Write;
    const CS: usize = 4096;
    const BLOCK: usize = 4 << 20;
    let (b, l) = (File::open(base)?, File::open(launch)?);
    let (blen, llen) = (b.metadata()?.len(), l.metadata()?.len());
    let mut w = std::io::BufWriter::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(out)?,
    );
    let (mut bb, mut lb) = (vec![0u8; BLOCK], vec![0u8; BLOCK]);
    let mut pos = 0u64;
    let mut written = 0u64;
    while pos < llen {
        let n = ((llen - pos) as usize).min(BLOCK);
        l.read_exact_at(&mut lb[..n], pos)?;
        let bn = (blen.saturating_sub(pos) as usize).min(n);
        bb[..n].fill(0);
        b.read_exact_at(&mut bb[..bn], pos)?;
        for (lc, bc) in lb[..n].chunks(CS).zip(bb[..n].chunks(CS)) {
            if lc != bc {
                w.write_all(lc)?;
                written += lc.len() as u64;
            }
        }
        pos += n as u64;
    }
    w.flush()?;
    Ok(written)
}

fn print_table(rows: &[Row], args: &Args) {
    println!();
    println!(
        "overlay vs baselines on launch states of the {} base (ours: XOR + zstd -{}; sizes MB, times s)",
        args.base, args.level
    );
    println!(
        "{:<11} {:>7} {:>8} | {:>8} {:>7} {:>7} {:>8} | {:>9} {:>8} | {:>8} {:>7}",
        "app",
        "launch",
        "changed",
        "overlay",
        "create",
        "apply",
        "apply/s",
        "(a) zstd",
        "(a) time",
        "(b) xz",
        "(b) t"
    );
    for r in rows {
        let na = "-".to_string();
        println!(
            "{:<11} {:>7} {:>8} | {:>8} {:>7} {:>7} {:>8} | {:>9} {:>8} | {:>8} {:>7}",
            r.app,
            mb(r.launch_bytes),
            mb(r.changed_bytes),
            mb(r.overlay_bytes),
            s(r.create),
            s(r.apply),
            format!(
                "{:.0}MB/s",
                r.launch_bytes as f64 / 1e6 / r.apply.as_secs_f64()
            ),
            r.zstd_bytes.map(mb).unwrap_or_else(|| na.clone()),
            r.zstd_time.map(s).unwrap_or_else(|| na.clone()),
            mb(r.xz_bytes),
            s(r.xz_time),
        );
    }
    println!();
    println!("targets: overlay <= 0.7x (a) size; create >= 5x faster than (a); apply >= 500 MB/s of launch state");
    println!(
        "{:<11} {:>16} {:>18} {:>16} {:>14}",
        "app", "size vs (a)", "create speedup (a)", "apply MB/s", "size vs (b)"
    );
    for r in rows {
        let ok = |b: bool| if b { "ok" } else { "MISSED" };
        let size = r.zstd_bytes.map(|z| r.overlay_bytes as f64 / z as f64);
        let speed = r
            .zstd_time
            .map(|t| t.as_secs_f64() / r.create.as_secs_f64());
        let rate = r.launch_bytes as f64 / 1e6 / r.apply.as_secs_f64();
        println!(
            "{:<11} {:>16} {:>18} {:>16} {:>14}",
            r.app,
            size.map(|x| format!("{x:.2}x {}", ok(x <= 0.7)))
                .unwrap_or_else(|| "-".into()),
            speed
                .map(|x| format!("{x:.1}x {}", ok(x >= 5.0)))
                .unwrap_or_else(|| "-".into()),
            format!("{rate:.0} {}", ok(rate >= 500.0)),
            format!("{:.2}x", r.overlay_bytes as f64 / r.xz_bytes as f64),
        );
    }
}
