//! The tables: our handoffs (one table per TLS mode), QEMU's migrations,
//! the distance from the physical limit, the targets, and the modes side
//! by side.

use std::time::Duration;

use cloudlet_api::HandoffReport;
use cloudlet_bench::tls::{comparison_title, mode_columns, TlsMode};
use cloudlet_bench::{median, median_u64, percent_more};

use crate::ours::OurRun;
use crate::qemu::{QemuOutcome, QemuRun};
use crate::Args;

fn mb(b: u64) -> String {
    format!("{:.1} MB", b as f64 / 1e6)
}

fn workload_name(churn: u32, args: &Args) -> String {
    let kind = if Some(&churn) == args.workloads.first() {
        "moderate"
    } else if Some(&churn) == args.workloads.get(1) {
        "heavy"
    } else {
        "other"
    };
    format!("{kind} ({churn} MiB/s)")
}

fn downtime(r: &HandoffReport) -> Duration {
    Duration::from_micros((r.destination_resume_us - r.source_stop_us).max(0) as u64)
}

fn total(r: &HandoffReport) -> Duration {
    Duration::from_millis(r.total_ms)
}

/// Everything, on stdout.
pub fn print_report(args: &Args, ours: &[OurRun], qemu: &[QemuRun]) {
    println!();
    println!(
        "Handoff of a 1 GiB debian VM running kvstore, emulated WAN with {} ms one-way delay (TCG guests, {} s of churn before the move)",
        args.delay_ms, args.warmup_s
    );
    for &mode in &args.tls {
        print_ours(args, mode, ours);
    }
    print_qemu(args, qemu);
    print_distance(args, ours);
    for &mode in &args.tls {
        print_targets(args, mode, ours, qemu);
    }
    if args.tls.len() > 1 {
        print_comparison(args, ours);
    }
}

fn header(first: &str) {
    println!(
        "{:<20} {:<22} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10}  {first}",
        "workload", "method", "link", "total", "downtime", "QEMU says", "wire", "link bytes"
    );
}

/// Our handoffs in one TLS mode, a row per run.
fn print_ours(args: &Args, mode: TlsMode, ours: &[OurRun]) {
    println!();
    println!(
        "Our handoff, {} ({})",
        mode.label(),
        match mode {
            TlsMode::Off => "plain HTTP between the cloudlets",
            TlsMode::On => "HTTPS, mutual TLS between the cloudlets, fleet CA made for the run",
        }
    );
    header("phases");
    for r in ours.iter().filter(|r| r.case.mode == mode) {
        let w = workload_name(r.case.churn, args);
        let method = format!("cloudlet handoff #{}", r.case.run);
        match &r.result {
            Ok(rep) => println!(
                "{:<20} {:<22} {:>4} Mbit {:>8.1} s {:>8.3} s {:>10} {:>10} {:>10}  {}",
                w,
                method,
                r.case.rate,
                total(rep).as_secs_f64(),
                downtime(rep).as_secs_f64(),
                "-",
                mb(rep.wire_bytes),
                mb(r.link_bytes),
                rep.phases
                    .iter()
                    .map(|p| format!("{} {:.1}s", p.stage, p.ms as f64 / 1e3))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Err(e) => println!(
                "{:<20} {:<22} {:>4} Mbit  FAILED: {e:#}",
                w, method, r.case.rate
            ),
        }
    }
}

/// QEMU's own migrations (their stream is plain TCP whatever the mode).
fn print_qemu(args: &Args, qemu: &[QemuRun]) {
    if qemu.is_empty() {
        return;
    }
    println!();
    println!(
        "QEMU's own migration (plain TCP in every mode; the VM synthesized by a cloudletd with {})",
        args.tls[0].label()
    );
    header("");
    for r in qemu {
        let w = workload_name(r.churn, args);
        let m = format!("QEMU {}", r.mode);
        match &r.outcome {
            QemuOutcome::Done {
                total,
                downtime_us,
                qemu_downtime_ms,
                transferred,
                link_bytes,
            } => println!(
                "{:<20} {:<22} {:>4} Mbit {:>8.1} s {:>8.3} s {:>8} ms {:>10} {:>10}  (RAM transferred; disk: identical copies on both sides)",
                w,
                m,
                args.qemu_rate,
                total.as_secs_f64(),
                *downtime_us as f64 / 1e6,
                qemu_downtime_ms,
                mb(*transferred),
                mb(*link_bytes)
            ),
            QemuOutcome::DidNotConverge {
                after,
                transferred,
                link_bytes,
            } => println!(
                "{:<20} {:<22} {:>4} Mbit  did not converge (cancelled at {:.0} s) {:>10} {:>10}",
                w,
                m,
                args.qemu_rate,
                after.as_secs_f64(),
                mb(*transferred),
                mb(*link_bytes)
            ),
            QemuOutcome::Failed(e) => println!(
                "{:<20} {:<22} {:>4} Mbit  FAILED: {e}",
                w, m, args.qemu_rate
            ),
        }
    }
}

fn print_distance(args: &Args, ours: &[OurRun]) {
    println!();
    println!("Distance from the physical limit (memory: wire bytes / unique changed pages of the final memory after zstd -19; the disk adds its few MB to both):");
    for r in ours {
        if let (Ok(rep), Some((unique, best))) = (&r.result, r.needed) {
            println!(
                "  {:<20} {:>4} Mbit {:<7} #{}: wire {}, needed {} ({} unique) -> {:.2}x",
                workload_name(r.case.churn, args),
                r.case.rate,
                r.case.mode.label(),
                r.case.run,
                mb(rep.wire_bytes),
                mb(best),
                mb(unique),
                rep.wire_bytes as f64 / best.max(1) as f64
            );
        }
    }
}

/// The completed handoffs of `mode` at `rate` with workload `churn`.
fn completed(ours: &[OurRun], mode: TlsMode, rate: f64, churn: u32) -> Vec<&HandoffReport> {
    ours.iter()
        .filter(|r| r.case.mode == mode && r.case.rate == rate && r.case.churn == churn)
        .filter_map(|r| r.result.as_ref().ok())
        .collect()
}

/// The targets at the QEMU rate, for `mode`'s run of median total time.
fn print_targets(args: &Args, mode: TlsMode, ours: &[OurRun], qemu: &[QemuRun]) {
    println!();
    println!(
        "Targets at {} Mbit/s, {} (our run of median total time):",
        args.qemu_rate,
        mode.label()
    );
    for &churn in &args.workloads {
        let w = workload_name(churn, args);
        let mut runs = completed(ours, mode, args.qemu_rate, churn);
        runs.sort_by_key(|r| r.total_ms);
        let Some(our) = runs.get(runs.len() / 2) else {
            println!("  {w}: our handoff did not complete: heavy/moderate target missed");
            continue;
        };
        let ours_s = total(our).as_secs_f64();
        let qemu_time = |mode: &str| {
            qemu.iter()
                .find(|q| q.churn == churn && q.mode == mode)
                .and_then(|q| match &q.outcome {
                    QemuOutcome::Done { total, .. } => Some(Some(total.as_secs_f64())),
                    QemuOutcome::DidNotConverge { .. } => Some(None),
                    // A failed reference run shows nothing either way.
                    QemuOutcome::Failed(_) => None,
                })
        };
        let describe = |t: Option<Option<f64>>, target: f64| match t {
            None => "not run or failed: nothing shown".to_string(),
            Some(None) => {
                let ratio = args.qemu_cap_s as f64 / ours_s;
                format!(
                    "QEMU did not converge (>= {} s): ours {ours_s:.1} s, ratio >= {ratio:.1}x (target {target}x) {}",
                    args.qemu_cap_s,
                    if ratio >= target { "MET" } else { "not shown" }
                )
            }
            Some(Some(q)) => format!(
                "{q:.1} s vs ours {ours_s:.1} s = {:.1}x (target {target}x) {}",
                q / ours_s,
                if q / ours_s >= target {
                    "MET"
                } else {
                    "MISSED"
                }
            ),
        };
        println!(
            "  {w}: vs QEMU default: {}",
            describe(qemu_time("default"), 10.0)
        );
        let best = ["xbzrle", "multifd-zstd"]
            .iter()
            .filter_map(|m| qemu_time(m).map(|t| (m, t)))
            .min_by(|a, b| {
                let k = |t: &Option<f64>| t.unwrap_or(f64::INFINITY);
                k(&a.1).total_cmp(&k(&b.1))
            });
        match best {
            Some((m, t)) => println!(
                "  {w}: vs QEMU's best option ({m}): {}",
                describe(Some(t), 3.0)
            ),
            None => println!("  {w}: vs QEMU's best option: not run"),
        }
        let down = downtime(our).as_secs_f64();
        if Some(&churn) == args.workloads.first() {
            println!(
                "  {w}: real downtime {down:.3} s (target < 0.5 s) {}",
                if down < 0.5 { "MET" } else { "MISSED" }
            );
        } else {
            println!("  {w}: converged (target: converges) MET; real downtime {down:.3} s");
        }
    }
}

/// The medians of completed runs.
struct Medians {
    n: usize,
    total: Duration,
    downtime: Duration,
    wire: u64,
}

/// One of the medians.
type Pick = fn(&Medians) -> Duration;

impl Medians {
    fn total(&self) -> Duration {
        self.total
    }

    fn downtime(&self) -> Duration {
        self.downtime
    }

    fn of(runs: &[&HandoffReport]) -> Option<Medians> {
        (!runs.is_empty()).then(|| Medians {
            n: runs.len(),
            total: median(runs.iter().map(|r| total(r)).collect()),
            downtime: median(runs.iter().map(|r| downtime(r)).collect()),
            wire: median_u64(runs.iter().map(|r| r.wire_bytes).collect()),
        })
    }
}

/// The modes side by side: per workload and rate, the medians of the
/// completed runs (n) of total time, downtime and wire bytes.
fn print_comparison(args: &Args, ours: &[OurRun]) {
    let modes = &args.tls;
    println!();
    println!("{}", comparison_title(modes));
    println!(
        "{:<20} {:>9}{}{}{}",
        "workload",
        "link",
        mode_columns("total s", modes, 15, true),
        mode_columns("downtime s", modes, 15, true),
        mode_columns("wire", modes, 11, false)
    );
    for &churn in &args.workloads {
        for &rate in args.rates.iter().filter(|r| **r > 0.0) {
            let meds: Vec<Option<Medians>> = modes
                .iter()
                .map(|&m| Medians::of(&completed(ours, m, rate, churn)))
                .collect();
            let mut line = format!(
                "{:<20} {:>9}",
                workload_name(churn, args),
                format!("{rate} Mbit")
            );
            for (get, digits) in [(Medians::total as Pick, 1), (Medians::downtime, 3)] {
                for m in &meds {
                    let cell = m.as_ref().map_or("-".into(), |m| {
                        format!("{:.digits$} (n={})", get(m).as_secs_f64(), m.n)
                    });
                    line += &format!(" {cell:>15}");
                }
                for m in &meds[1..] {
                    let diff = match (&meds[0], m) {
                        (Some(b), Some(m)) => percent_more(get(b), get(m)),
                        _ => "-".into(),
                    };
                    line += &format!(" {diff:>9}");
                }
            }
            for m in &meds {
                line += &format!(" {:>11}", m.as_ref().map_or("-".into(), |m| mb(m.wire)));
            }
            println!("{line}");
        }
    }
}
