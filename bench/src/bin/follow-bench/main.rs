//! Follow me along a walk: a device's back end (kvstore in a VM) follows
//! it across three cloudlets, over an emulated WAN, on real QEMU; beside
//! it two references run the same way: staying on the first cloudlet,
//! and a far "cloud" site.
//!
//! The world ([`topology`]): a hub namespace holds the device and the
//! cloud tier (the directory, heartbeat 1 s and lease 2.5 s, and the
//! registry with the kvstore overlay); four leaves behind 200 Mbit/s
//! links: the cloudlets `c1`, `c2`, `c3` (each a `cloudletd` in the
//! directory) and `cloud` at 40 ms one way (a `cloudletd` that does not
//! join the directory, so no session picks it).
//!
//! The walk ([`walk`]), one-way delays in ms, each segment `--segment-s`
//! long: c1/c2/c3 at 2/15/30, then 15/2/15, then 30/15/2. On every link
//! all the time, noise: the delay drawn again every 3 s as nominal ±1.5
//! ms (seeded: the same in every run). Only the two steps should move the
//! VM.
//!
//! Three runs, one after the other, the same schedule ([`runs`]):
//! 1. **follow**: `Session::start` through the directory (lands on c1),
//!    `Policy::default()` (the documented one), consent automatic;
//! 2. **stay**: the same with consent never (it probes, never moves);
//! 3. **cloud**: the VM created on `cloud` directly, no session.
//!
//! In each, the device's client ([`client`]) writes `PUT /kv/k{i}` every
//! 50 ms on one kept-alive connection through the local forwarder
//! (`cloudlet_client::forward`), connecting again and sending the same
//! key again when the forwarder closes it at a move; at the end every
//! acknowledged key is read back. Every second the hub also measures its
//! RTT to each cloudlet (`GET /v1/ping`, kept alive): the reference
//! "nearest cloudlet RTT".
//!
//! The report ([`report`]): per minute, the nearest RTT's p50, the
//! client's p50/p99 for each run, the follow run's p99 outside the moves
//! (from each walk step to 1 s after its move completed) and its ratio to
//! the nearest RTT (target 1.5x); the moves and their timing; moves
//! caused by noise (target none); the longest interruption (target under
//! 1 s); writes acknowledged and lost. And an SVG plot (`--plot`).
//!
//! Usage (as root; `CLOUDLET_TEST_HOME` and `CLOUDLET_GUEST_DIR` as for
//! the integration tests, the tiny base and kvstore overlay are reused
//! from there or built):
//! `cargo build --release -p cloudlet-bench -p cloudletd -p cloudlet-cli &&
//! target/release/follow-bench` (about 17 minutes; `--segment-s 20` for a
//! short one).

mod client;
mod http;
mod report;
mod runs;
mod topology;
mod walk;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;

use crate::runs::Kind;
use crate::topology::{Bins, World};
use crate::walk::Walk;

#[derive(Parser)]
#[command(about = "Follow me along a walk across three cloudlets, against staying and a far cloud")]
struct Args {
    /// Length of each of the walk's three segments, seconds.
    #[arg(long, default_value_t = 60)]
    segment_s: u64,
    /// Seed of the delay noise (the same in the three runs).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The delay noise on every link, ms either way (redrawn every 3 s).
    #[arg(long, default_value_t = walk::NOISE_MS)]
    noise_ms: f64,
    /// Rows of the table, seconds each.
    #[arg(long, default_value_t = 60)]
    row_s: u64,
    /// Where the SVG plot goes (default: target/follow-bench.svg of the
    /// workspace).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// The `cloudletd` binary (default: next to this program).
    #[arg(long)]
    cloudletd: Option<PathBuf>,
    /// The `cloudlet` binary (default: next to this program).
    #[arg(long)]
    cloudlet: Option<PathBuf>,
    /// Runs to make, in order (follow, stay, cloud).
    #[arg(long, value_delimiter = ',', default_values_t = vec!["follow".to_string(), "stay".to_string(), "cloud".to_string()])]
    runs: Vec<String>,
}

fn bin(given: &Option<PathBuf>, name: &str) -> anyhow::Result<PathBuf> {
    let p = match given {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .context("Find this program's path")?
            .with_file_name(name),
    };
    if !p.is_file() {
        bail!(
            "{} is missing: cargo build --release -p cloudletd -p cloudlet-cli (or pass --{name})",
            p.display()
        );
    }
    Ok(p)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    cloudlet_bench::init_logging();
    let args = Args::parse();
    let bins = Bins {
        cloudletd: bin(&args.cloudletd, "cloudletd")?,
        cloudlet: bin(&args.cloudlet, "cloudlet")?,
    };
    let kinds = args
        .runs
        .iter()
        .map(|r| match r.as_str() {
            "follow" => Ok(Kind::Follow),
            "stay" => Ok(Kind::Stay),
            "cloud" => Ok(Kind::Cloud),
            other => bail!("Unknown run {other:?} (follow, stay, cloud)"),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if args.segment_s < 10 || args.row_s == 0 {
        bail!("--segment-s must be at least 10 and --row-s above 0");
    }
    let walk = Walk {
        segment: Duration::from_secs(args.segment_s),
        seed: args.seed,
        noise_ms: args.noise_ms.abs(),
    };
    let plot = args.plot.clone().unwrap_or_else(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        std::fs::canonicalize(&root)
            .unwrap_or(root)
            .join("target/follow-bench.svg")
    });
    if let Ok(removed) = cloudlet_wan::cleanup_stale() {
        if !removed.is_empty() {
            eprintln!("removed {} stale namespaces", removed.len());
        }
    }
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!(
        "follow-bench: 3 segments of {} s, seed {}; load average {}",
        args.segment_s,
        args.seed,
        loadavg.trim()
    );

    // The world lives until the end of this function, whatever happens:
    // its drop stops everything it started.
    eprintln!("building the world (hub, c1, c2, c3, cloud) ...");
    let world = World::build(&bins, walk.nominal(0)).await?;
    eprintln!("world up in {}", world.work.path().display());
    let measure = async {
        let mut done = Vec::new();
        for kind in kinds {
            eprintln!("run {} ...", kind.name());
            let r = runs::run(&world, kind, &walk)
                .await
                .with_context(|| format!("The {} run", kind.name()))?;
            done.push(r);
        }
        anyhow::Ok(done)
    };
    let done = tokio::select! {
        r = measure => r?,
        _ = tokio::signal::ctrl_c() => bail!("Interrupted"),
    };
    drop(world);

    println!(
        "follow-bench: {} cores, load average at the start {}\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg.split(' ').take(3).collect::<Vec<_>>().join(" ")
    );
    print!("{}", report::render(&done, &walk, args.row_s as f64));
    if let Some(dir) = plot.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&plot, report::plot(&done, &walk))
        .with_context(|| format!("Write {}", plot.display()))?;
    println!("\nplot: {}", plot.display());
    Ok(())
}
