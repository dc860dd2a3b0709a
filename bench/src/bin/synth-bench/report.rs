//! The tables: one per mode and rate, the comparison of the modes, the
//! legend, and the plot of every synthesis' stages.

use std::time::Duration;

use cloudlet_bench::tls::{comparison_title, mode_columns, TlsMode};
use cloudlet_bench::{median, percent_more};

use crate::measure::{Prepared, Row, Table};

/// Every measured synthesis as a row of its stages (the daemon's
/// `timings`), each beside the naive way's transfer, decompression and boot.
pub fn timeline(tables: &[Table], delay_ms: u64) -> cloudlet_plot::Timeline {
    let mut t = cloudlet_plot::Timeline::new(&format!(
        "VM synthesis: request to the app's first answer ({delay_ms} ms one way)"
    ));
    let first_mode = tables.first().map(|t| t.mode);
    for table in tables {
        let rate = table.rate;
        for r in &table.rows {
            let label = format!("{} #{} {rate} Mbit/s", r.name, r.run);
            if let Some(o) = &r.ours {
                let stages: Vec<(String, f64)> = o
                    .timings
                    .iter()
                    .filter(|s| s.stage != "total")
                    .map(|s| (s.stage.clone(), s.ms as f64))
                    .collect();
                t.sequence(&format!("{label} {}: ours", r.mode.label()), &stages);
            }
            // The naive way is measured once a run, whatever the mode.
            if let Some(n) = r.naive.as_ref().filter(|_| Some(table.mode) == first_mode) {
                let ms = |d: Duration| d.as_secs_f64() * 1000.0;
                t.sequence(
                    &format!("{label}: naive"),
                    &[
                        ("naive: transfer".into(), ms(n.transfer)),
                        ("naive: zstd -d".into(), ms(n.decompress)),
                        ("naive: boot".into(), ms(n.boot)),
                    ],
                );
            }
        }
    }
    t
}

/// One mode's table at one rate: a row per overlay and run.
pub fn print_table(table: &Table, prepared: &[Prepared], runs: usize) {
    println!();
    println!("link {} Mbit/s, {}", table.rate, table.mode.label());
    println!(
        "{:<14} {:>8} {:>8}  {:<27} {:>8} {:>7} {:>8}  {:>8} {:>25} {:>8}  {:<6} {:<6} {:<6} {:>8}",
        "overlay",
        "MB",
        "ours s",
        "fetch/rest/id/app s",
        "link Mb",
        "(a) s",
        "ours/a",
        "(b) s",
        "xfer+dec+boot s",
        "b/ours",
        "1.3x a",
        "5x b",
        "10 s",
        "zstd s"
    );
    for r in &table.rows {
        print_row(table.rate, r, prepared, runs);
    }
}

fn print_row(rate: f64, r: &Row, prepared: &[Prepared], runs: usize) {
    let name = match runs {
        1 => r.name.clone(),
        _ => format!("{} #{}", r.name, r.run),
    };
    let mb = r.overlay_bytes as f64 / 1e6;
    let s = |d: Duration| format!("{:.2}", d.as_secs_f64());
    let link = link_mbit(r);
    let (ours_s, stages) = match &r.ours {
        Some(o) => (
            s(o.total),
            [
                o.fetch(),
                o.stage("restore"),
                o.stage("identity"),
                o.stage("app_ready"),
            ]
            .iter()
            .map(|d| d.map_or("-".into(), s))
            .collect::<Vec<_>>()
            .join("/"),
        ),
        None => ("ERR".into(), "-".into()),
    };
    let a = match (&r.ours, link) {
        (Some(o), Some(l)) => Some(
            Duration::from_secs_f64(r.overlay_bytes as f64 * 8.0 / (l * 1e6)) + o.restore_part(),
        ),
        _ => None,
    };
    let ours_over_a = match (&r.ours, a) {
        (Some(o), Some(a)) => Some(o.total.as_secs_f64() / a.as_secs_f64()),
        _ => None,
    };
    let b_over_ours = match (&r.ours, &r.naive) {
        (Some(o), Some(n)) => Some(n.total().as_secs_f64() / o.total.as_secs_f64()),
        _ => None,
    };
    let verdict = |v: Option<bool>| match v {
        Some(true) => "PASS",
        Some(false) => "FAIL",
        None => "n/a",
    };
    let t13 = verdict(ours_over_a.map(|x| x <= 1.3));
    let t5 = verdict(b_over_ours.map(|x| x >= 5.0));
    let t10 = if (rate - 38.0).abs() < 0.5 {
        verdict(Some(
            r.ours
                .as_ref()
                .is_some_and(|o| o.total <= Duration::from_secs(10)),
        ))
    } else {
        "-"
    };
    let zstd = prepared
        .iter()
        .find(|p| p.name == r.name)
        .and_then(|p| p.zst.as_ref())
        .map_or("-".into(), |(_, d)| s(*d));
    println!(
        "{:<14} {:>8.1} {:>8}  {:<27} {:>8} {:>7} {:>8}  {:>8} {:>25} {:>8}  {:<6} {:<6} {:<6} {:>8}",
        name,
        mb,
        ours_s,
        stages,
        link.map_or("-".into(), |l| format!("{l:.1}")),
        a.map_or("-".into(), s),
        ours_over_a.map_or("-".into(), |x| format!("{x:.2}x")),
        r.naive.as_ref().map_or("-".into(), |n| s(n.total())),
        r.naive.as_ref().map_or("-".into(), |n| format!(
            "{:.1}+{:.1}+{:.1} ({:.0} MB)",
            n.transfer.as_secs_f64(),
            n.decompress.as_secs_f64(),
            n.boot.as_secs_f64(),
            n.zst_bytes as f64 / 1e6
        )),
        b_over_ours.map_or("-".into(), |x| format!("{x:.1}x")),
        t13,
        t5,
        t10,
        zstd
    );
    if let Some(o) = &r.ours {
        println!(
            "{:<14} (POST answered after {:.2} s; first answer polled from B {:.2} s after that)",
            "",
            o.api.as_secs_f64(),
            (o.total - o.api).as_secs_f64()
        );
    }
    for e in &r.errors {
        println!("{:<14} error: {e}", "");
    }
}

/// The rate of the row's bulk GET, Mbit/s of TCP payload.
fn link_mbit(r: &Row) -> Option<f64> {
    r.bulk
        .map(|(bytes, d)| bytes as f64 * 8.0 / d.as_secs_f64() / 1e6)
}

/// The modes side by side: per rate and overlay, the median over the runs
/// of ours (total, and its fetch stage, `Ours::fetch`) and of the link's rate.
pub fn print_comparison(tables: &[Table], modes: &[TlsMode]) {
    let Some(&base) = modes.first() else {
        return;
    };
    println!();
    println!("{}", comparison_title(modes));
    println!(
        "{:<9} {:<11}{}{}{}",
        "link",
        "overlay",
        mode_columns("total s", modes, 14, true),
        mode_columns("f+a s", modes, 9, false),
        mode_columns("link Mb", modes, 11, false)
    );
    let mut keys: Vec<(f64, &str)> = Vec::new();
    for t in tables {
        for r in &t.rows {
            if !keys.contains(&(t.rate, r.name.as_str())) {
                keys.push((t.rate, &r.name));
            }
        }
    }
    for (rate, name) in keys {
        let rows = |m: TlsMode| {
            tables
                .iter()
                .filter(move |t| t.rate == rate && t.mode == m)
                .flat_map(|t| &t.rows)
                .filter(move |r| r.name == name)
        };
        let med = |v: Vec<Duration>| (!v.is_empty()).then(|| (v.len(), median(v)));
        let totals = |m| {
            med(rows(m)
                .filter_map(|r| r.ours.as_ref())
                .map(|o| o.total)
                .collect())
        };
        let fetch = |m| med(rows(m).filter_map(|r| r.ours.as_ref()?.fetch()).collect());
        let link = |m| {
            let mut v: Vec<f64> = rows(m).filter_map(link_mbit).collect();
            v.sort_by(f64::total_cmp);
            let n = v.len();
            match n {
                0 => None,
                _ if n % 2 == 1 => Some(v[n / 2]),
                _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
            }
        };
        let mut line = format!("{:<9} {name:<11}", format!("{rate} Mb"));
        for &m in modes {
            line += &format!(
                " {:>14}",
                totals(m).map_or("-".into(), |(n, d)| format!(
                    "{:.2} (n={n})",
                    d.as_secs_f64()
                ))
            );
        }
        for &m in &modes[1..] {
            let diff = match (totals(base), totals(m)) {
                (Some((_, b)), Some((_, d))) => percent_more(b, d),
                _ => "-".into(),
            };
            line += &format!(" {diff:>9}");
        }
        for &m in modes {
            line += &format!(
                " {:>9}",
                fetch(m).map_or("-".into(), |(_, d)| format!("{:.2}", d.as_secs_f64()))
            );
        }
        for &m in modes {
            line += &format!(" {:>11}", link(m).map_or("-".into(), |l| format!("{l:.1}")));
        }
        println!("{line}");
    }
}

/// What the columns mean.
pub fn print_legend(modes: &[TlsMode]) {
    println!();
    println!("ours    = POST /v1/vms (cloudletd fetches the overlay from the registry across the link) -> app answers on its endpoint");
    println!("stages  = cloudletd's VmInfo.timings: fetch+apply (pipelined; with the early start: the fetch to the device state, the rest streams after the resume) / restore / identity / app_ready, seconds (f+a in the comparison)");
    println!("link    = rate of a plain GET of the whole overlay from the registry over the same link (TCP payload), in the mode's scheme (HTTPS with TLS on)");
    println!("(a)     = overlay bytes / link + restore + identity + app_ready (ours)");
    println!("(b)     = launch disk (zstd -3) transfer + zstd -d + cold boot to first answer; the compression itself is excluded (done ahead of time; its time is in the last column)");
    println!("          (b) is another way of provisioning: its file server is plain HTTP in every mode, measured once a run (after the modes' turns) and shown in each mode's table");
    println!("targets = ours <= 1.3x (a); (b) >= 5x ours; ours <= 10 s at 38 Mbit/s");
    println!(
        "modes   = {}: TLS off = plain HTTP (plain_http = true, --plain-http); TLS on = HTTPS under a fleet CA made for the run (registry and cloudletd with certificates of it); runs interleaved mode by mode",
        modes.iter().map(|m| m.word()).collect::<Vec<_>>().join(",")
    );
}
