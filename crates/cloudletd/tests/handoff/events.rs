//! `GET /v1/events` followed through a synthesis and a handoff (real
//! daemons, a real kvstore VM): every stage of each, in order, with its
//! counters and its end; the handoff then in the source's history
//! (`GET /v1/handoffs`) with its course over time.

use std::time::Duration;

use cloudlet_api::events::{CloudletEvent, HandoffOutcome, Operation, ProgressEvent};
use cloudlet_api::{VmEvent, VmState};
use cloudlet_client::Client;

use crate::common::{kvstore_overlay, Daemon, TOKEN};

/// The events of `client`'s cloudlet until `last` holds for one (or
/// 300 s pass).
fn collect(
    client: Client,
    last: impl Fn(&CloudletEvent) -> bool + Send + 'static,
) -> tokio::task::JoinHandle<Vec<CloudletEvent>> {
    tokio::spawn(async move {
        let mut events = client.events().await.expect("GET /v1/events");
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
        while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, events.next()).await {
            let ev = ev.expect("an event this release reads");
            let end = last(&ev);
            seen.push(ev);
            if end {
                break;
            }
        }
        seen
    })
}

fn progress(seen: &[CloudletEvent], op: Operation) -> Vec<&ProgressEvent> {
    seen.iter()
        .filter_map(|e| match e {
            CloudletEvent::Progress(p) if p.operation == op => Some(p),
            _ => None,
        })
        .collect()
}

fn states(seen: &[CloudletEvent]) -> Vec<(Option<VmState>, Option<VmState>)> {
    seen.iter()
        .filter_map(|e| match e {
            CloudletEvent::Vm(VmEvent { from, state, .. }) => Some((*from, *state)),
            _ => None,
        })
        .collect()
}

/// The stages, each once (counters are told many times within one).
fn stages(p: &[&ProgressEvent]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for e in p {
        if out.last() != Some(&e.stage) {
            out.push(e.stage.clone());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn events_follow_a_synthesis_and_a_handoff_stage_by_stage() {
    use VmState as S;
    let overlay = kvstore_overlay().await;
    let a = Daemon::start("").await;
    let b = Daemon::start("").await;
    let on_a = collect(
        a.client(),
        |e| matches!(e, CloudletEvent::Progress(p) if p.operation == Operation::HandoffOut && p.done),
    );
    let on_b = collect(
        b.client(),
        |e| matches!(e, CloudletEvent::Vm(v) if v.from == Some(S::Receiving) && v.state == Some(S::Running)),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let vm = a
        .client()
        .create_vm_upload(&overlay, Some("watched"), None)
        .await
        .unwrap();
    let report = a
        .client()
        .handoff("watched", &b.url(), Some(TOKEN))
        .await
        .expect("handoff");
    let seen = on_a.await.unwrap();
    let arrived = on_b.await.unwrap();
    let log = || format!("events: {seen:#?}\n--- source\n{}", a.log());

    assert!(
        seen.iter().all(|e| e.vm_id() == Some(vm.id.as_str())),
        "{}",
        log()
    );
    // The record's course, as stored.
    assert_eq!(
        states(&seen),
        [
            (None, Some(S::Synthesizing)),
            (Some(S::Synthesizing), Some(S::Running)),
            (Some(S::Running), Some(S::HandingOff)),
            (Some(S::HandingOff), Some(S::Moved)),
        ],
        "{}",
        log()
    );
    assert_eq!(
        states(&arrived).last(),
        Some(&(Some(S::Receiving), Some(S::Running)))
    );

    // The synthesis, stage by stage, one end.
    let synth = progress(&seen, Operation::Synthesis);
    let full = ["queued", "fetching", "applying", "restoring", "ready"];
    let early = [
        "queued",
        "fetching",
        "restoring",
        "ready, memory streaming in",
        "ready",
    ];
    let got = stages(&synth);
    assert!(
        got == full || got == early,
        "synthesis stages {got:?}\n{}",
        log()
    );
    assert_eq!(synth.iter().filter(|p| p.done).count(), 1);
    assert!(synth.last().unwrap().done && synth.last().unwrap().error.is_none());
    assert!(synth.iter().all(|p| p.handoff_id.is_none()));
    let fetched = synth.last().unwrap().progress.bytes_fetched;
    assert!(fetched > 0, "{}", log());

    // The handoff, stage by stage, its counters rising, one end.
    let out = progress(&seen, Operation::HandoffOut);
    assert_eq!(
        stages(&out),
        [
            "preparing",
            "disk",
            "memory",
            "switchover",
            "committing",
            "moved"
        ],
        "{}",
        log()
    );
    let hid = out[0].handoff_id.clone().expect("a handoff id");
    assert!(out
        .iter()
        .all(|p| p.handoff_id.as_deref() == Some(hid.as_str())));
    let sent: Vec<u64> = out.iter().map(|p| p.progress.bytes_fetched).collect();
    assert!(
        sent.windows(2).all(|w| w[0] <= w[1]),
        "bytes sent never fall: {sent:?}"
    );
    assert!(
        out.iter()
            .any(|p| p.stage == "memory" && p.progress.bytes_fetched > 0),
        "progress told during the memory stage: {}",
        log()
    );
    let elapsed: Vec<u64> = out.iter().map(|p| p.elapsed_ms).collect();
    assert!(elapsed.windows(2).all(|w| w[0] <= w[1]), "{elapsed:?}");
    let end = out.last().unwrap();
    assert!(end.done);
    assert_eq!(end.downtime_ms, Some(report.downtime_ms()));
    assert_eq!(
        end.destination.as_deref(),
        Some(report.destination_url.as_str())
    );
    assert!(end.progress.bytes_fetched <= report.wire_bytes);
    // Nothing after the end of either.
    assert!(matches!(seen.last(), Some(CloudletEvent::Progress(p)) if p.done));

    // The source's history has it, with its course.
    let history = a.client().handoffs().await.unwrap();
    assert_eq!(history.len(), 1);
    let h = a.client().get_handoff(&hid).await.unwrap();
    assert_eq!(h, history[0]);
    assert_eq!(h.outcome, HandoffOutcome::Moved);
    assert_eq!(
        (h.vm_id.as_str(), h.name.as_str()),
        (vm.id.as_str(), "watched")
    );
    assert_eq!(h.downtime_ms, Some(report.downtime_ms()));
    assert_eq!(h.wire_bytes, report.wire_bytes);
    assert_eq!(h.phases, report.phases);
    let switch = h.switchover_ms.expect("the switchover's time");
    assert!(switch <= h.total_ms);
    assert!(h.samples.len() >= 3, "{:?}", h.samples);
    assert_eq!(h.samples.first().unwrap().stage, "preparing");
    assert_eq!(h.samples.last().unwrap().stage, "moved");
    let unknown = a.client().get_handoff("0000").await.unwrap_err();
    assert_eq!(unknown.status(), Some(404));
    // The destination's history holds only what moved out of it.
    assert!(b.client().handoffs().await.unwrap().is_empty());
}
