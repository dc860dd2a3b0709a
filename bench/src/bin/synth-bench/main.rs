//! VM synthesis over an emulated WAN, to the app's first response, against two
//! references measured in the same run.
//!
//! The cloud (the overlay registry, and a plain file server for the naive way) runs
//! in namespace A; the edge (`cloudletd`, its VMs and the client) in namespace B; the
//! link between them is a `cloudlet-wan` link (tbf rate, user-space delay line).
//! For each overlay and each link rate:
//!
//! * **ours**: the client in B asks `cloudletd` in B to synthesize from
//!   `http(s)://A/v1/overlays/NAME`; time from the request to the first `200` of the
//!   app's health path on the VM's endpoint, polled from B. The VM is deleted after.
//! * **(a) the physical limit**: overlay bytes / the rate of a plain bulk `GET` of the
//!   whole overlay over the same link, plus restore + identity + app_ready of ours.
//! * **(b) the naive way**: the launch VM's full disk image compressed with `zstd -3`
//!   (once, timed, *not* counted in the sum: a naive deployer does it ahead of time,
//!   as we create overlays ahead of time), fetched over the same link from a file
//!   server in A, decompressed in B, cold-booted (base kernel + initramfs, the disk
//!   raw; the app autostarts) and polled from B until it answers.
//!
//! Each of it in every TLS mode of `--tls off,on` (default `on`, the
//! product's default): `off` runs the registry and cloudletd on plain HTTP;
//! `on` makes a fleet CA for the run (`cloudlet_bench::tls`) and serves
//! both on HTTPS with certificates of it, and the link's bulk `GET` is
//! HTTPS too (so that the limit stays comparable). Both modes' services
//! run side by side on the one link, and the runs take turns (`--runs`
//! of each overlay at each rate: off, on, off, on, ...), so that the
//! machine's noise falls on both alike; after the per-mode tables, a table
//! compares the modes' medians.
//!
//! Modules: [`measure`] (what is measured, in which order), [`edge`] (a
//! mode's registry and cloudletd), [`naive`] (reference (b)), [`http`] (the
//! bench's own downloads and polls), [`report`] (the tables and the plot).
//!
//! Usage (as root, from the repository root):
//! `cargo run --release -p cloudlet-bench --bin synth-bench [-- --rates 38,100 --tls off,on]`
//!
//! Needs `target/release/{cloudletd,cloudlet}`, the `debian` base in
//! `$CLOUDLET_HOME` (default here `/tmp/clhome`), the overlays and their launch images
//! from `scripts/make-overlays.sh` (`target/overlays/NAME.overlay`,
//! `target/overlays/launch/NAME/`), `zstd`, `ip` and `tc`.
//!
//! Everything it starts is stopped on the way out, error or not: VMs deleted through
//! the API, any QEMU still running under this run's directories killed, the daemons
//! killed, the namespaces removed, the work directories deleted.

mod edge;
mod http;
mod measure;
mod naive;
mod report;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use cloudlet_base::BaseStore;
use cloudlet_bench::tls::{distinct_modes, Fleet, TlsMode};
use cloudlet_wan::{Wan, WanConfig};

use crate::edge::Edge;
use crate::measure::{measure_all, prepare};

#[derive(Parser)]
#[command(about = "VM synthesis over an emulated WAN vs the physical limit and the naive way")]
pub struct Args {
    /// Link rates in Mbit/s, one table each.
    #[arg(long, value_delimiter = ',', default_values_t = vec![38.0, 100.0])]
    pub rates: Vec<f64>,
    /// One-way delay of the link in ms.
    #[arg(long, default_value_t = 10)]
    pub delay_ms: u64,
    /// Overlays to measure (`OVERLAY_DIR/NAME.overlay`, launch image in
    /// `OVERLAY_DIR/launch/NAME`); missing ones are reported and skipped.
    #[arg(long, value_delimiter = ',', default_values_t = vec!["kvstore".to_string(), "translator".to_string(), "numpy".to_string()])]
    pub overlays: Vec<String>,
    /// Default: target/overlays of the workspace.
    #[arg(long)]
    pub overlay_dir: Option<PathBuf>,
    /// Where `cloudletd` and `cloudlet` are (default: target/release of the workspace).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// The base store (holds `debian`).
    #[arg(long, env = "CLOUDLET_HOME", default_value = "/tmp/clhome")]
    pub home: PathBuf,
    /// Base of the launch images (for the naive way's cold boot).
    #[arg(long, default_value = "debian")]
    pub base: String,
    /// Disk-backed scratch space (registry storage, daemon state, VM disks).
    #[arg(long, default_value = "/var/tmp")]
    pub workdir: PathBuf,
    /// tmpfs for VM RAM files.
    #[arg(long, default_value = "/dev/shm")]
    pub shm: PathBuf,
    /// Skip reference (b).
    #[arg(long)]
    pub no_naive: bool,
    /// Runs of each overlay at each rate, in each mode; the comparison
    /// takes their medians.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub runs: u64,
    /// TLS modes, taking turns run by run: off (plain HTTP), on (HTTPS
    /// under a fleet CA made for the run: the product's default).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = vec![TlsMode::On])]
    pub tls: Vec<TlsMode>,
}

/// Where things are and go.
pub struct Dirs {
    /// `cloudletd` and `cloudlet`.
    pub bin: PathBuf,
    pub overlays: PathBuf,
    /// Disk-backed scratch of this run (deleted at the end).
    pub work: PathBuf,
    /// tmpfs scratch of this run, for VM RAM (deleted at the end).
    pub shm: PathBuf,
    /// The daemons' logs (kept).
    pub logs: PathBuf,
}

fn main() -> anyhow::Result<()> {
    cloudlet_bench::init_logging();
    let mut args = Args::parse();
    args.tls = distinct_modes(&args.tls);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = args
        .bin_dir
        .clone()
        .unwrap_or_else(|| root.join("target/release"));
    for b in ["cloudletd", "cloudlet"] {
        if !bin.join(b).is_file() {
            bail!(
                "{} missing: cargo build --release -p cloudletd -p cloudlet-cli",
                bin.join(b).display()
            );
        }
    }
    BaseStore::new(&args.home)
        .get(&args.base)
        .with_context(|| {
            format!(
                "base {} not in {} (cloudlet base build {})",
                args.base,
                args.home.display(),
                args.base
            )
        })?;

    let work = tempfile::Builder::new()
        .prefix("synth-bench-")
        .tempdir_in(&args.workdir)?;
    let shm = tempfile::Builder::new()
        .prefix("synth-bench-")
        .tempdir_in(&args.shm)?;
    let dirs = Dirs {
        bin,
        overlays: args
            .overlay_dir
            .clone()
            .unwrap_or_else(|| root.join("target/overlays")),
        work: work.path().to_path_buf(),
        shm: shm.path().to_path_buf(),
        // Daemon logs outlive the run (the work directories do not).
        logs: root.join("target/synth-bench-logs"),
    };
    std::fs::create_dir_all(&dirs.logs)?;
    // Before any client: they all trust it.
    let fleet = Fleet::for_modes(&args.tls, &dirs.work.join("pki"))?;
    let mut notes = Vec::new();
    let prepared = prepare(&args, &dirs, &mut notes)?;
    if prepared.is_empty() {
        bail!("no overlay to measure in {}", dirs.overlays.display());
    }

    let wan = Wan::create(WanConfig::new(
        "synth",
        args.rates[0],
        Duration::from_millis(args.delay_ms),
    ))?;
    let tables = {
        let mut edges = Vec::new();
        for &mode in &args.tls {
            let edge = Edge::start(&wan, mode, fleet.as_ref(), &dirs, &args.home)?;
            for p in &prepared {
                edge.push(&dirs.bin, &args.home, &p.overlay, &p.name)?;
            }
            edges.push(edge);
        }
        measure_all(&args, &wan, &edges, &prepared, &dirs)?
        // The edges go first (they delete their VMs through the link).
    };
    if let Err(e) = wan.teardown() {
        eprintln!("cleanup: tearing down the link: {e}");
    }

    println!();
    println!(
        "VM synthesis over an emulated WAN ({} ms one way): request -> first 200 of the app's health path, from the edge namespace",
        args.delay_ms
    );
    for t in &tables {
        report::print_table(t, &prepared, args.runs as usize);
    }
    if args.tls.len() > 1 {
        report::print_comparison(&tables, &args.tls);
    }
    report::print_legend(&args.tls);
    for n in &notes {
        println!("note: {n}");
    }
    let plot = root.join("target/synth-bench.svg");
    std::fs::write(&plot, report::timeline(&tables, args.delay_ms).render())?;
    println!(
        "plot: {} (each synthesis' stages, beside the naive way's)",
        plot.display()
    );
    Ok(())
}
