//! What the runs measured, as the table per minute, the summary against
//! the targets, and the plot.

use std::fmt::Write as _;

use cloudlet_client::session::SessionEvent;
use cloudlet_plot::{LineChart, Scale};

use crate::client::{Ping, Write};
use crate::runs::{Kind, Run};
use crate::walk::Walk;

/// The targets of the issue.
const RATIO_TARGET: f64 = 1.5;
const INTERRUPTION_TARGET_S: f64 = 1.0;
/// Requests are left out of "outside the moves" until this long after a
/// move completed.
const SETTLE_S: f64 = 1.0;

/// `p` in 0..=100 of `v` (nearest rank); none when empty.
pub fn percentile(v: &[f64], p: f64) -> Option<f64> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    Some(s[rank.clamp(1, s.len()) - 1])
}

/// The nearest cloudlet's RTT (`c1`..`c3`, the first three sites) of one
/// probe round.
fn nearest_ms(p: &Ping) -> Option<f64> {
    p.ms.iter()
        .take(3)
        .flatten()
        .copied()
        .min_by(f64::total_cmp)
}

/// One move the session made (or tried), seconds since the start.
#[derive(Debug, Clone)]
pub struct Move {
    pub from: String,
    pub to: String,
    pub triggered: f64,
    /// Completed (time, handoff total ms, downtime ms), or why not.
    pub outcome: Result<(f64, u64, i64), String>,
    /// A step of the walk it answers (index into `Walk::steps`), or none:
    /// caused by noise.
    pub step: Option<usize>,
}

/// The moves of a run and the declined triggers (consent never), each
/// told apart: a trigger answers the walk when it comes after step `k`,
/// before the next, from a cloudlet that is not the segment's nearest
/// towards the one that is; anything else was caused by noise.
pub fn moves(run: &Run, walk: &Walk) -> (Vec<Move>, Vec<Move>) {
    let classify = |t: f64, from: &str, to: &str| -> Option<usize> {
        let seg = walk.segment_at(t);
        (seg >= 1 && to == walk.nearest(seg) && from != walk.nearest(seg)).then(|| seg - 1)
    };
    let (mut made, mut declined) = (Vec::new(), Vec::new());
    let mut pending: Option<Move> = None;
    for (t, e) in &run.events {
        match e {
            SessionEvent::MoveTriggered { from, to } => {
                pending = Some(Move {
                    from: from.clone(),
                    to: to.clone(),
                    triggered: *t,
                    outcome: Err("no outcome seen".into()),
                    step: classify(*t, from, to),
                });
            }
            SessionEvent::MoveDeclined { .. } => declined.extend(pending.take()),
            SessionEvent::MoveCompleted {
                to,
                total_ms,
                downtime_ms,
                ..
            } => {
                if let Some(mut m) = pending.take() {
                    m.to = to.clone();
                    m.outcome = Ok((*t, *total_ms, *downtime_ms));
                    made.push(m);
                }
            }
            SessionEvent::MoveFailed { error, .. } => {
                if let Some(mut m) = pending.take() {
                    m.outcome = Err(error.clone());
                    made.push(m);
                }
            }
            SessionEvent::MoveRefused { reason, .. } => {
                if let Some(m) = pending.as_mut() {
                    m.outcome = Err(format!("refused: {reason}"));
                }
            }
            _ => {}
        }
    }
    made.extend(pending);
    (made, declined)
}

/// The windows left out of "outside the moves": from each walk step to
/// 1 s after the move that answered it completed (to the segment's end
/// when none did).
pub fn move_windows(made: &[Move], walk: &Walk) -> Vec<(f64, f64)> {
    let seg = walk.segment.as_secs_f64();
    walk.steps()
        .iter()
        .enumerate()
        .map(|(k, &s)| {
            let end = made
                .iter()
                .filter(|m| m.step == Some(k))
                .find_map(|m| m.outcome.as_ref().ok().map(|o| o.0 + SETTLE_S))
                .unwrap_or(s + seg);
            (s, end)
        })
        .collect()
}

fn outside(w: &Write, windows: &[(f64, f64)]) -> bool {
    !windows.iter().any(|(a, b)| w.acked >= *a && w.sent <= *b)
}

/// The longest time between two acknowledged writes (from the first),
/// s, and when it ended.
pub fn longest_interruption(writes: &[Write]) -> (f64, f64) {
    writes
        .windows(2)
        .map(|p| (p[1].acked - p[0].acked, p[1].acked))
        .fold((0.0, 0.0), |a, b| if b.0 > a.0 { b } else { a })
}

fn ms_in(writes: &[Write], from: f64, to: f64, keep: impl Fn(&Write) -> bool) -> Vec<f64> {
    writes
        .iter()
        .filter(|w| w.sent >= from && w.sent < to && keep(w))
        .map(Write::ms)
        .collect()
}

fn cell(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{x:.1}"))
}

/// The whole report: the table per `row_s` seconds, the summary, the
/// targets. `runs` in the order follow, stay, cloud (any may be missing).
pub fn render(runs: &[Run], walk: &Walk, row_s: f64) -> String {
    let get = |k: Kind| runs.iter().find(|r| r.kind == k);
    let follow = get(Kind::Follow);
    let (made, _) = follow.map(|r| moves(r, walk)).unwrap_or_default();
    let windows = move_windows(&made, walk);
    let total = walk.len().as_secs_f64();
    let rows = (total / row_s).ceil() as usize;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "client RTT in ms: PUT /kv/k{{i}} every 50 ms on one kept-alive connection through the local forwarder, \
         acknowledged writes (a write's retries count in its time); nearest: GET /v1/ping to the nearest of c1..c3, every 1 s (follow run)\n"
    );
    let _ = writeln!(
        out,
        "{:>6} {:>8} | {:>7} {:>7} {:>9} {:>6} | {:>7} {:>7} | {:>7} {:>7}",
        "minute",
        "nearest",
        "follow",
        "follow",
        "follow",
        "ratio",
        "stay",
        "stay",
        "cloud",
        "cloud"
    );
    let _ = writeln!(
        out,
        "{:>6} {:>8} | {:>7} {:>7} {:>9} {:>6} | {:>7} {:>7} | {:>7} {:>7}",
        "", "p50", "p50", "p99", "p99 out", "", "p50", "p99", "p50", "p99"
    );
    let mut ratios = Vec::new();
    for i in 0..rows {
        let (a, b) = (i as f64 * row_s, ((i + 1) as f64 * row_s).min(total));
        let nearest: Vec<f64> = follow
            .map(|r| {
                r.pings
                    .iter()
                    .filter(|p| p.t >= a && p.t < b)
                    .filter_map(nearest_ms)
                    .collect()
            })
            .unwrap_or_default();
        let near50 = percentile(&nearest, 50.0);
        let stats = |k: Kind, keep: &dyn Fn(&Write) -> bool| {
            let v = get(k)
                .map(|r| ms_in(&r.written.writes, a, b, keep))
                .unwrap_or_default();
            (percentile(&v, 50.0), percentile(&v, 99.0))
        };
        let all = |_: &Write| true;
        let (f50, f99) = stats(Kind::Follow, &all);
        let (_, f99_out) = stats(Kind::Follow, &|w| outside(w, &windows));
        let (s50, s99) = stats(Kind::Stay, &all);
        let (c50, c99) = stats(Kind::Cloud, &all);
        let ratio = f99_out.zip(near50).map(|(x, n)| x / n);
        if let Some(r) = ratio {
            ratios.push((i + 1, r));
        }
        let _ = writeln!(
            out,
            "{:>6} {:>8} | {:>7} {:>7} {:>9} {:>6} | {:>7} {:>7} | {:>7} {:>7}",
            i + 1,
            cell(near50),
            cell(f50),
            cell(f99),
            cell(f99_out),
            ratio.map_or("-".into(), |r| format!("{r:.2}x")),
            cell(s50),
            cell(s99),
            cell(c50),
            cell(c99),
        );
    }
    out.push('\n');
    summary(&mut out, runs, walk, &made, &windows, &ratios);
    out
}

fn summary(
    out: &mut String,
    runs: &[Run],
    walk: &Walk,
    made: &[Move],
    windows: &[(f64, f64)],
    ratios: &[(usize, f64)],
) {
    let steps = walk.steps();
    let _ = writeln!(
        out,
        "walk: segments of {} s (c1/c2/c3 one way: {:?} ms, then {:?}, then {:?}; cloud {} ms), noise +-{} ms redrawn every {} s, seed {}",
        walk.segment.as_secs(),
        &walk.nominal(0)[..3],
        &walk.nominal(1)[..3],
        &walk.nominal(2)[..3],
        crate::walk::CLOUD_MS,
        walk.noise_ms,
        crate::walk::NOISE_EVERY.as_secs(),
        walk.seed
    );
    for r in runs {
        let _ = writeln!(
            out,
            "{}: the VM started on {} (kvstore answered {:.1} s after the request)",
            r.kind.name(),
            r.started_on,
            r.ready_s
        );
    }
    let _ = writeln!(out, "\nmoves (follow):");
    if made.is_empty() {
        let _ = writeln!(out, "  none");
    }
    for m in made {
        let after = m
            .step
            .map_or("not after a walk step: noise".to_string(), |k| {
                format!(
                    "{:+.1} s after the walk step at {:.0} s",
                    m.triggered - steps[k],
                    steps[k]
                )
            });
        match &m.outcome {
            Ok((t, total, down)) => {
                let window = m
                    .step
                    .and_then(|k| windows.get(k))
                    .map_or(String::new(), |(a, b)| {
                        format!("; left out of \"outside the moves\": {:.1} s", b - a)
                    });
                let _ = writeln!(
                    out,
                    "  {} -> {}: triggered at {:.1} s ({after}), completed at {t:.1} s, handoff {total} ms, downtime {down} ms{window}",
                    m.from, m.to, m.triggered
                );
            }
            Err(e) => {
                let _ = writeln!(
                    out,
                    "  {} -> {}: triggered at {:.1} s ({after}), did not complete: {e}",
                    m.from, m.to, m.triggered
                );
            }
        }
    }
    let noise_moves = made.iter().filter(|m| m.step.is_none()).count();
    let _ = writeln!(out, "moves caused by noise (follow): {noise_moves}");
    if let Some(stay) = runs.iter().find(|r| r.kind == Kind::Stay) {
        let (_, declined) = moves(stay, walk);
        let noise = declined.iter().filter(|m| m.step.is_none()).count();
        let list: Vec<String> = declined
            .iter()
            .map(|m| format!("{}->{} at {:.0} s", m.from, m.to, m.triggered))
            .collect();
        let _ = writeln!(
            out,
            "stay (consent never): {} moves the policy asked for and were declined [{}], {noise} caused by noise",
            declined.len(),
            list.join(", ")
        );
    }
    let _ = writeln!(out, "\nper run:");
    for r in runs {
        let (gap, at) = longest_interruption(&r.written.writes);
        let acked = r.written.writes.len();
        let retried = r.written.writes.iter().filter(|w| w.attempts > 1).count();
        let _ = writeln!(
            out,
            "  {:<6} longest interruption {:.3} s (ending at {at:.1} s); writes acknowledged {acked}, lost {} on the read-back, {retried} needed a retry ({} failed attempts)",
            r.kind.name(),
            gap,
            r.missing.len(),
            r.written.failed_attempts
        );
        for (k, status) in r.missing.iter().take(5) {
            let _ = writeln!(out, "         lost k{k}: read back {status:?}");
        }
    }
    // What the client pays above the network: its p50 outside the moves
    // against the nearest RTT, in the follow run.
    if let Some(f) = runs.iter().find(|r| r.kind == Kind::Follow) {
        let out_ms: Vec<f64> = f
            .written
            .writes
            .iter()
            .filter(|w| outside(w, windows))
            .map(Write::ms)
            .collect();
        let near: Vec<f64> = f.pings.iter().filter_map(nearest_ms).collect();
        if let (Some(p50), Some(p99), Some(n50), Some(n99)) = (
            percentile(&out_ms, 50.0),
            percentile(&out_ms, 99.0),
            percentile(&near, 50.0),
            percentile(&near, 99.0),
        ) {
            let _ = writeln!(
                out,
                "\nfollow, outside the moves, whole run: client p50 {p50:.1} ms, p99 {p99:.1} ms; nearest RTT p50 {n50:.1} ms, p99 {n99:.1} ms \
                 (the noise alone puts the nearest's own p99 at {:.2}x its p50; the client's p99 is {:.2}x the nearest's p99; \
                 its p50 is {:.1} ms above the nearest's: the forwarder, the VM's port forward and the guest's own service time)",
                n99 / n50,
                p99 / n99,
                p50 - n50
            );
        }
    }
    targets(out, runs, made, ratios);
}

fn targets(out: &mut String, runs: &[Run], made: &[Move], ratios: &[(usize, f64)]) {
    let _ = writeln!(out, "\ntargets:");
    let worst = ratios.iter().copied().max_by(|a, b| a.1.total_cmp(&b.1));
    let list: Vec<String> = ratios
        .iter()
        .map(|(m, r)| format!("{m}: {r:.2}x"))
        .collect();
    let verdict = match worst {
        Some((_, r)) if r <= RATIO_TARGET => "met".to_string(),
        Some((m, r)) => format!("SHORTFALL (worst minute {m}: {r:.2}x)"),
        None => "not measured".to_string(),
    };
    let _ = writeln!(
        out,
        "  follow p99 outside the moves within {RATIO_TARGET}x of the nearest RTT: {verdict} [minutes {}]",
        list.join(", ")
    );
    if let Some(f) = runs.iter().find(|r| r.kind == Kind::Follow) {
        let (gap, _) = longest_interruption(&f.written.writes);
        let v = if gap < INTERRUPTION_TARGET_S {
            "met"
        } else {
            "SHORTFALL"
        };
        let _ = writeln!(
            out,
            "  longest interruption under {INTERRUPTION_TARGET_S} s: {v} ({gap:.3} s)"
        );
        let lost = f.missing.len();
        let _ = writeln!(
            out,
            "  no acknowledged write lost: {} ({lost} lost)",
            if lost == 0 { "met" } else { "SHORTFALL" }
        );
    }
    let noise = made.iter().filter(|m| m.step.is_none()).count();
    let walked = made
        .iter()
        .filter(|m| m.step.is_some() && m.outcome.is_ok())
        .count();
    let _ = writeln!(
        out,
        "  no move caused by noise: {} ({noise} by noise; {walked} of 2 walk steps answered by a completed move)",
        if noise == 0 { "met" } else { "SHORTFALL" }
    );
}

/// The plot: per-second p50 client RTT of each run and the nearest RTT
/// (follow run), log y; the walk steps and the moves marked.
pub fn plot(runs: &[Run], walk: &Walk) -> String {
    let mut c = LineChart::new(
        "follow-bench: client RTT along the walk (per-second p50)",
        "time since the run's start (s)",
        "RTT (ms, log scale)",
    );
    c.y_scale = Scale::Log;
    c.gap = Some(2.5);
    c.x_range = Some((0.0, walk.len().as_secs_f64()));
    for r in runs {
        let per_s = per_second(&r.written.writes, walk.len().as_secs_f64());
        c.series(&format!("{} (client p50)", r.kind.name()), per_s);
    }
    if let Some(f) = runs.iter().find(|r| r.kind == Kind::Follow) {
        let near: Vec<(f64, f64)> = f
            .pings
            .iter()
            .filter_map(|p| nearest_ms(p).map(|n| (p.t, n)))
            .collect();
        let s = c.series("nearest cloudlet (ping)", near);
        s.color = "#000000".into();
        s.dashed = true;
        let (made, _) = moves(f, walk);
        for m in &made {
            if let Ok((t, _, _)) = m.outcome {
                c.mark(t, &format!("{}->{}", m.from, m.to)).color = "#d55e00".into();
            }
        }
    }
    for s in walk.steps() {
        c.mark(s, "walk step");
    }
    c.render()
}

/// The p50 of the writes sent in each second, at the second's middle.
fn per_second(writes: &[Write], total: f64) -> Vec<(f64, f64)> {
    let n = total.ceil() as usize;
    let mut buckets: Vec<Vec<f64>> = vec![Vec::new(); n];
    for w in writes {
        if let Some(b) = buckets.get_mut(w.sent.max(0.0) as usize) {
            b.push(w.ms());
        }
    }
    buckets
        .iter()
        .enumerate()
        .filter_map(|(i, b)| percentile(b, 50.0).map(|p| (i as f64 + 0.5, p)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&[3.0], 99.0), Some(3.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn the_longest_interruption_is_between_two_acks() {
        let w = |acked: f64| Write {
            key: 0,
            sent: acked - 0.004,
            acked,
            attempts: 1,
        };
        let writes = [w(0.05), w(0.10), w(0.15), w(0.80), w(0.85)];
        let (gap, at) = longest_interruption(&writes);
        assert!((gap - 0.65).abs() < 1e-9 && (at - 0.80).abs() < 1e-9);
    }
}
