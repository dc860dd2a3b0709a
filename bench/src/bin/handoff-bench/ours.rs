//! Our handoff: a run of it, what it needed at the least (the unique
//! changed pages of the final memory), its progress and downtime marks.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use cloudlet_api::HandoffReport;
use cloudlet_bench::tls::TlsMode;
use cloudlet_client::Client;
use cloudlet_wan::Side;

use crate::daemon::{setup, Setup};
use crate::{Bench, TOKEN};

/// Which of our handoffs: the link's rate, the workload, the TLS mode,
/// the run (1, 2, ...).
#[derive(Clone, Copy, Debug)]
pub struct Case {
    pub rate: f64,
    pub churn: u32,
    pub mode: TlsMode,
    pub run: u64,
}

pub struct OurRun {
    pub case: Case,
    pub result: anyhow::Result<HandoffReport>,
    pub link_bytes: u64,
    /// The information the move needed, measured offline on the memory the
    /// destination holds right after it: (unique changed bytes, zstd -19).
    pub needed: Option<(u64, u64)>,
}

/// Pages of `ram` that differ from `base` (and are not zero), deduplicated,
/// then compressed with zstd -19 and long-distance matching: what a perfect
/// one-shot transfer of the final memory would have to send.
fn needed_memory(ram: &Path, base: &Path) -> anyhow::Result<(u64, u64)> {
    const PAGE: usize = 4096;
    let ram = std::fs::read(ram)?;
    let base = std::fs::read(base)?;
    let mut seen = std::collections::HashSet::new();
    let mut unique = Vec::new();
    for (i, page) in ram.chunks(PAGE).enumerate() {
        let b = base.get(i * PAGE..(i + 1) * PAGE);
        if Some(page) == b || page.iter().all(|&x| x == 0) {
            continue;
        }
        if seen.insert(*blake3::hash(page).as_bytes()) {
            unique.extend_from_slice(page);
        }
    }
    let mut enc = zstd::stream::Encoder::new(Vec::new(), 19)?;
    enc.long_distance_matching(true)?;
    enc.window_log(27)?;
    std::io::Write::write_all(&mut enc, &unique)?;
    let out = enc.finish()?;
    Ok((unique.len() as u64, out.len() as u64))
}

/// The handoff's timestamps through the switchover, from both daemons'
/// JSON logs ("downtime mark" events: `at_us`, host clock), in ms after
/// `stop_us`.
fn downtime_marks(stop_us: i64) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for side in ["A", "B"] {
        let path = std::env::temp_dir().join(format!("handoff-bench-{side}.log"));
        let text = std::fs::read_to_string(path).unwrap_or_default();
        for (what, at) in text.lines().filter_map(parse_mark) {
            // Earlier handoffs of the same daemons are not this one.
            if at >= stop_us - 1_000_000 {
                out.push((what, (at - stop_us) as f64 / 1e3));
            }
        }
    }
    out.sort_by(|a, b| a.1.total_cmp(&b.1));
    out
}

/// A "downtime mark" event of a daemon's JSON log line (`cloudletd
/// --log-format json`): its `what` and `at_us`; None for any other line.
fn parse_mark(line: &str) -> Option<(String, i64)> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = v.get("fields")?;
    if fields.get("message")?.as_str()? != "downtime mark" {
        return None;
    }
    let what = fields.get("what")?.as_str()?.to_string();
    Some((what, fields.get("at_us")?.as_i64()?))
}

/// One of our handoffs, on a fresh link with fresh daemons in the case's
/// TLS mode; its plot, progress and downtime marks on the way.
pub async fn run_ours(bench: &Bench, case: Case) -> anyhow::Result<OurRun> {
    let Case {
        rate, churn, mode, ..
    } = case;
    eprintln!(
        "ours: {rate} Mbit/s, churn {churn} MiB/s, {}, run {}",
        mode.label(),
        case.run
    );
    let s = setup(bench, rate, churn, mode, true).await?;
    let before = s.wan.stats().a_to_b.bytes;
    let dest = s.b.as_ref().context("no destination")?.url.clone();
    let (client, id) = (s.a.client(), s.vm_id.clone());
    // Progress on stderr, as the source tells it on /v1/events (followed
    // from before the handoff starts until its last event).
    let watcher = {
        let client = s.a.client();
        s.wan.run_in(Side::A, follow_progress(client))?
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let handle = s.wan.run_in(Side::A, async move {
        client.handoff(&id, &dest, Some(TOKEN)).await
    })?;
    let result = handle.await?.map_err(anyhow::Error::from);
    let _ = tokio::time::timeout(Duration::from_secs(5), watcher).await;
    let link_bytes = s.wan.stats().a_to_b.bytes - before;
    match &result {
        Ok(r) => tell(bench, &s, case, r).await?,
        Err(e) => eprintln!("  FAILED: {e}"),
    }
    let mut needed = None;
    if let (Ok(r), Some(b)) = (&result, &s.b) {
        let ram = b.vm_dir.join(&r.vm.id).join("ram");
        let base = cloudlet_base::BaseStore::new(bench.args.home.clone())
            .get_by_id(&r.vm.base_id)
            .map(|b| b.memory_path());
        if let Ok(base) = base {
            match tokio::task::spawn_blocking(move || needed_memory(&ram, &base)).await? {
                Ok(n) => {
                    eprintln!(
                        "  information needed: {:.1} MB of unique changed pages, {:.1} MB after zstd -19",
                        n.0 as f64 / 1e6,
                        n.1 as f64 / 1e6
                    );
                    needed = Some(n);
                }
                Err(e) => eprintln!("  information needed: not measured: {e:#}"),
            }
        }
    }
    Ok(OurRun {
        case,
        result,
        link_bytes,
        needed,
    })
}

/// A completed handoff on stderr: its plot (from the source's history,
/// what /v1/events told), its numbers, its downtime marks.
async fn tell(bench: &Bench, s: &Setup, case: Case, r: &HandoffReport) -> anyhow::Result<()> {
    let plots = &bench.args.plots;
    let (client, hid) = (s.a.client(), r.handoff_id.clone());
    let record = s
        .wan
        .run_in(Side::A, async move { client.get_handoff(&hid).await })?
        .await;
    let plot = plots.join(format!(
        "handoff-{}mbit-{}mibs-tls-{}-{}.svg",
        case.rate,
        case.churn,
        case.mode.word(),
        case.run
    ));
    match record {
        Ok(Ok(rec)) => {
            std::fs::create_dir_all(plots)?;
            std::fs::write(&plot, cloudlet_plot::handoff(&rec))?;
            eprintln!("  plot: {}", plot.display());
        }
        Ok(Err(e)) => eprintln!("  no plot: {e}"),
        Err(e) => eprintln!("  no plot: {e}"),
    }
    eprintln!(
        "  done: total {:.1} s, downtime {:.3} s, wire {:.1} MB",
        r.total_ms as f64 / 1e3,
        (r.destination_resume_us - r.source_stop_us) as f64 / 1e6,
        r.wire_bytes as f64 / 1e6
    );
    let marks = downtime_marks(r.source_stop_us);
    if !marks.is_empty() {
        eprintln!("  downtime, ms after the source's STOP (src: source daemon, dst: destination):");
        for (what, ms) in marks {
            eprintln!("    {ms:8.1}  {what}");
        }
    }
    Ok(())
}

/// The source's handoff progress events, one line on stderr at each stage
/// and at most every 5 s within one, until the handoff's last event.
async fn follow_progress(client: Client) {
    use cloudlet_api::events::{CloudletEvent, Operation};
    let Ok(mut events) = client.events().await else {
        eprintln!("  (no progress: GET /v1/events failed)");
        return;
    };
    let (mut stage, mut told) = (String::new(), Instant::now());
    while let Some(Ok(ev)) = events.next().await {
        let CloudletEvent::Progress(p) = ev else {
            continue;
        };
        if p.operation != Operation::HandoffOut {
            continue;
        }
        if p.stage != stage || told.elapsed() >= Duration::from_secs(5) || p.done {
            let c = &p.progress;
            eprintln!(
                "  {:>6.1} s  {:<11} sent {:>7.1} MB  link {:>6.1} Mbit/s  dirty {:>6.1} Mbit/s  memory left {:>7.1} MB  pass {}",
                p.elapsed_ms as f64 / 1e3,
                p.stage,
                c.bytes_fetched as f64 / 1e6,
                c.rate_bps as f64 / 1e6,
                c.dirty_rate_bps as f64 * 8.0 / 1e6,
                c.remaining_bytes as f64 / 1e6,
                c.iteration
            );
            stage = p.stage.clone();
            told = Instant::now();
        }
        if p.done {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// What `tracing_subscriber::fmt().json()` writes, collected.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn reads_the_marks_of_a_json_log() {
        let lines = Lines::default();
        let sink = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_writer(move || sink.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            // As cloudletd's handoff logs them.
            let vm_id = "0a1b2c3d4e5f";
            tracing::info!(vm_id = %vm_id, at_us = 1_700_000_000_123_456i64, what = "src_stop", "downtime mark");
            tracing::info!(vm_id = %vm_id, at_us = 5i64, "something else");
            tracing::warn!(what = "not a mark", at_us = 7i64, "downtime marks are info");
            tracing::info!(vm_id = %vm_id, at_us = 1_700_000_000_200_000i64, what = "dst_resume_event", "downtime mark");
        });
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        let marks: Vec<_> = text.lines().filter_map(parse_mark).collect();
        assert_eq!(
            marks,
            vec![
                ("src_stop".to_string(), 1_700_000_000_123_456),
                ("dst_resume_event".to_string(), 1_700_000_000_200_000),
            ],
            "{text}"
        );
        // Text lines (an old daemon's log) and garbage are no marks.
        assert_eq!(parse_mark("INFO downtime mark at_us=5 what=x"), None);
        assert_eq!(parse_mark("{"), None);
    }
}
