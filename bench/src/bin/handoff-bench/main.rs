//! Live VM handoff across an emulated WAN vs QEMU's own live migration.
//!
//! A 1 GiB `debian` VM running kvstore (synthesized by a real `cloudletd` from
//! the kvstore overlay) is handed off from a cloudletd in namespace A to one in
//! namespace B, joined only by the emulated link (25 ms one way), while
//! kvstore rewrites 8 MiB/s (moderate) or 16 MiB/s (heavy) of its memory.
//! At 25 Mbit/s the same VM is also moved by QEMU's own migration over the
//! same link (default precopy, xbzrle, multifd + zstd), from the source QEMU
//! in A to a QEMU listening in B.
//!
//! Every handoff of ours runs in each TLS mode of `--tls off,on` (default
//! `on`, the product's default): `off` serves both daemons on plain HTTP;
//! `on` makes one fleet CA for the run (`cloudlet_bench::tls`), each daemon
//! serves HTTPS with a certificate of it for its WAN address, and the
//! handoff goes over mutual TLS. Each run has a fresh link and fresh
//! daemons; the modes take turns run by run (off, on, off, on, ... for each
//! workload and rate: `--runs` of each), so that the machine's noise falls
//! on both alike, and a last table compares the modes' medians. QEMU's own
//! migration runs once per workload (its stream is plain TCP whatever the
//! mode).
//!
//! Real downtime is the source QEMU's STOP event to the destination QEMU's
//! RESUME event (QMP event timestamps, same host clock).
//!
//! Usage (as root; kvstore's churn rewrites its default 64 MiB buffer):
//! ```text
//! export CLOUDLET_HOME=/tmp/clhome
//! cloudlet base build debian --name debian-1g --memory-mib 1024
//! cloudlet overlay create --base debian-1g --install DIR_WITH_KVSTORE --name kvstore \
//!     --port 8080 --health /health --run "./kvstore --port 8080" -o /tmp/kvstore-1g.overlay
//! target/release/handoff-bench [--rates 10,25,50] [--qemu-cap-s 480] [--tls off,on --runs 2]
//! ```
//! It also reports, per run, the information the move needed: the unique
//! pages of the final memory that differ from the base, after zstd -19.
//! While a move runs, its progress comes from the source's `/v1/events`;
//! after it, its plot (`cloudlet_plot::handoff`, from the source's history)
//! goes to `--plots DIR` (`handoff-RATEmbit-CHURNmibs-tls-MODE-RUN.svg`).
//!
//! Modules: [`daemon`] (a run's link and daemons), [`ours`] (our handoff),
//! [`qemu`] (QEMU's), [`report`] (the tables).

mod daemon;
mod ours;
mod qemu;
mod report;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use cloudlet_bench::tls::{distinct_modes, Fleet, TlsMode};

use crate::ours::{run_ours, Case};
use crate::qemu::{run_qemu, QemuOutcome, QemuRun};

/// The daemons' token (operator).
const TOKEN: &str = "bench-token-0123456789";

#[derive(Parser)]
pub struct Args {
    /// The kvstore overlay on the 1 GiB debian base.
    #[arg(long, default_value = "/tmp/kvstore-1g.overlay")]
    pub overlay: PathBuf,
    /// Cloudlet home holding the base VMs (its `bases` directory is shared).
    #[arg(long, env = "CLOUDLET_HOME", default_value = "/tmp/clhome")]
    pub home: PathBuf,
    /// The cloudletd binary (default: next to this program).
    #[arg(long)]
    pub cloudletd: Option<PathBuf>,
    /// Link rates for our handoff, Mbit/s (0: skip ours).
    #[arg(long, value_delimiter = ',', default_values_t = vec![10.0, 25.0, 50.0])]
    pub rates: Vec<f64>,
    /// Churn rates of the workloads, MiB/s (moderate, heavy).
    #[arg(long, value_delimiter = ',', default_values_t = vec![8, 16])]
    pub workloads: Vec<u32>,
    /// One-way delay, ms.
    #[arg(long, default_value_t = 25)]
    pub delay_ms: u64,
    /// Rate at which QEMU's own migration is compared, Mbit/s.
    #[arg(long, default_value_t = 25.0)]
    pub qemu_rate: f64,
    /// Give up on a QEMU migration after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub qemu_cap_s: u64,
    /// QEMU modes to run (default, xbzrle, multifd-zstd); empty to skip.
    #[arg(long, value_delimiter = ',', default_values_t = vec!["default".to_string(), "xbzrle".to_string(), "multifd-zstd".to_string()])]
    pub qemu_modes: Vec<String>,
    /// Where each of our handoffs' plot goes (`handoff-RATEmbit-CHURNmibs-tls-MODE-RUN.svg`).
    #[arg(long, default_value = "target/handoff-bench")]
    pub plots: PathBuf,
    /// Seconds of churn before the move starts.
    #[arg(long, default_value_t = 10)]
    pub warmup_s: u64,
    /// Turn off what the daemons do by default: digest the moved memory and
    /// resume only an identical copy, repairing a few differing pages
    /// (`verify_memory = false`; the rate cap needs it, so it goes too).
    #[arg(long)]
    pub no_verify_memory: bool,
    /// Turn off the daemons' rate cap (`handoff_rate_cap = false`): QEMU's
    /// own switchover decision, made from a rate that counts pages equal to
    /// the base, decides when to stop.
    #[arg(long)]
    pub no_rate_cap: bool,
    /// Where VM RAM files go.
    #[arg(long, default_value = "/dev/shm")]
    pub workdir: PathBuf,
    /// Runs of each of our handoffs (workload, rate), in each mode; the
    /// comparison takes their medians.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub runs: u64,
    /// TLS modes, taking turns run by run: off (plain HTTP), on (HTTPS,
    /// mutual TLS between the cloudlets, a fleet CA made for the run: the
    /// product's default).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = vec![TlsMode::On])]
    pub tls: Vec<TlsMode>,
}

/// What every run shares.
pub struct Bench {
    pub args: Args,
    pub cloudletd: PathBuf,
    /// The run's fleet CA, when a mode is `on` (trusted by this process).
    pub fleet: Option<Fleet>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    args.tls = distinct_modes(&args.tls);
    let cloudletd = match &args.cloudletd {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no parent")?
            .join("cloudletd"),
    };
    if !cloudletd.is_file() {
        bail!(
            "{} missing: cargo build --release -p cloudletd",
            cloudletd.display()
        );
    }
    if !args.overlay.is_file() {
        bail!("{} missing (see the usage)", args.overlay.display());
    }
    // Before any client: they all trust it. Kept for the whole run.
    let pki = tempfile::Builder::new()
        .prefix("handoff-bench-pki-")
        .tempdir()?;
    let fleet = Fleet::for_modes(&args.tls, pki.path())?;
    let bench = Bench {
        args,
        cloudletd,
        fleet,
    };
    let args = &bench.args;
    let t0 = Instant::now();
    let mut ours = Vec::new();
    let mut qemu = Vec::new();
    for &churn in &args.workloads {
        for &rate in args.rates.iter().filter(|r| **r > 0.0) {
            for run in 1..=args.runs {
                for &mode in &args.tls {
                    let case = Case {
                        rate,
                        churn,
                        mode,
                        run,
                    };
                    match run_ours(&bench, case).await {
                        Ok(r) => ours.push(r),
                        Err(e) => eprintln!("ours {case:?}: setup failed: {e:#}"),
                    }
                }
            }
        }
        for mode in args.qemu_modes.iter().filter(|m| !m.is_empty()) {
            match run_qemu(&bench, mode, churn, args.tls[0]).await {
                Ok(r) => qemu.push(r),
                Err(e) => qemu.push(QemuRun {
                    mode: mode.clone(),
                    churn,
                    outcome: QemuOutcome::Failed(format!("{e:#}")),
                }),
            }
        }
    }
    report::print_report(args, &ours, &qemu);
    eprintln!("bench finished in {:.0} s", t0.elapsed().as_secs_f64());
    Ok(())
}
