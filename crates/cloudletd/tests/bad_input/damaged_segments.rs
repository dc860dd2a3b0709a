//! A damaged segment during synthesis, on real QEMU: a real `cloudletd`,
//! kvstore packaged on the tiny base, served by an HTTP server written here
//! that damages one segment (on its first transfer only: an error in
//! transit; or on every transfer: damage at rest), can hold it back, and can
//! trickle (a slow link) until the VM has answered.
//!
//! - in transit: healed by a new fetch, the VM lives;
//! - at rest, the request still open: the answer names the segment within
//!   1 s of its arrival (not after the guest agent's 30 s timeout);
//! - at rest, after the VM answered (early start on a slow link): the
//!   record becomes failed with the cause (and an event says so), QEMU is
//!   gone, no file is left, the daemon keeps serving;
//! - healthy, on a slow link: the progress reaches complete.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{kvstore_overlay_with, qemu_running, range_server, Daemon};
use cloudlet_api::{CreateVmRequest, VmEvent, VmInfo, VmState};
use cloudlet_overlay::{LaunchPlan, Manifest};
use cloudlet_testkit::http;
use cloudletd::synth::heal::SEGMENT_REFETCHES;
use tokio::io::AsyncWriteExt;

/// kvstore with small segments (128 KiB: many of them, most not needed
/// before the app answers): its bytes and manifest.
async fn small_segment_kvstore() -> (Vec<u8>, Manifest) {
    let overlay = kvstore_overlay_with(Some(128 << 10)).await;
    let bytes = std::fs::read(&overlay).unwrap();
    let (_, m) = cloudlet_overlay::format::parse_prefix(&bytes).unwrap();
    (bytes, m)
}

/// Byte range of segment `s` in the overlay file.
fn file_range(m: &Manifest, s: u32) -> (u64, u64) {
    let r = m.segment_range(s).unwrap();
    (r.start, r.end)
}

/// How the server damages, holds and paces.
struct Plan {
    /// The segment it damages (one byte flipped in its middle), its range.
    bad: Option<(u64, u64)>,
    /// Damage it on every transfer (at rest), else on the first only.
    at_rest: bool,
    /// While set, holds back: every payload byte outside `free` (all
    /// held), or only the bad segment's.
    hold: AtomicBool,
    hold_all: bool,
    /// Never held (the device state segment: QEMU starts).
    free: (u64, u64),
    /// While set, payload requests that are not one whole segment (the
    /// sequential stream; a demand fetch is one) trickle at ~40 KB/s.
    trickle: AtomicBool,
}

/// What the server saw.
#[derive(Default)]
struct Seen {
    /// Transfers that carried the whole bad segment (to its last byte).
    bad_transfers: AtomicU32,
    /// Requests for exactly the bad segment (it fetched again, or asked
    /// for on demand).
    bad_alone: AtomicU32,
    /// The bad segment was sent damaged once.
    damaged_once: AtomicBool,
    /// When the first of them had sent the segment's last byte.
    bad_arrived: Mutex<Option<Instant>>,
    /// Payload bytes sent, and when the last of them went out.
    sent: AtomicU64,
    last_sent: Mutex<Option<Instant>>,
}

/// The test server for `data` (overlay `m`) following `plan`. Requests that
/// start before the payload (header, manifest) are served whole, untouched.
async fn faulty_server(data: Vec<u8>, m: &Manifest, plan: Arc<Plan>) -> (String, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let data_offset = m.data_offset;
    let segments: Arc<Vec<(u64, u64)>> = Arc::new(
        (0..m.segments.len() as u32)
            .map(|s| file_range(m, s))
            .collect(),
    );
    let seen2 = seen.clone();
    let url = range_server(data, move |mut sock, data, start, end| {
        let (plan, seen, segments) = (plan.clone(), seen2.clone(), segments.clone());
        async move {
            if start < data_offset {
                let _ = sock.write_all(&data[start as usize..end as usize]).await;
                return;
            }
            let covers = plan.bad.is_some_and(|(a, b)| start <= a && b <= end);
            if plan.bad == Some((start, end)) {
                seen.bad_alone.fetch_add(1, Ordering::SeqCst);
            }
            let one_segment = segments.contains(&(start, end));
            let (bad_start, bad_end) = plan.bad.unwrap_or((u64::MAX, u64::MAX));
            let flip = bad_start + (bad_end - bad_start) / 2;
            let bounds = [bad_start, bad_end, plan.free.0, plan.free.1];
            let mut at = start;
            while at < end {
                let held = |at: u64| {
                    if plan.hold_all {
                        !(plan.free.0 <= at && at < plan.free.1)
                    } else {
                        bad_start <= at && at < bad_end
                    }
                };
                while plan.hold.load(Ordering::SeqCst) && held(at) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let slow = plan.trickle.load(Ordering::SeqCst) && !one_segment;
                let step = if slow { 4096 } else { 64 << 10 };
                let next_bound = bounds.iter().copied().filter(|&b| b > at).min();
                let upto = (at + step).min(end).min(next_bound.unwrap_or(u64::MAX));
                let mut piece = data[at as usize..upto as usize].to_vec();
                if covers && at <= flip && flip < upto {
                    let first = !seen.damaged_once.swap(true, Ordering::SeqCst);
                    if plan.at_rest || first {
                        piece[(flip - at) as usize] ^= 0x5a;
                    }
                }
                if sock.write_all(&piece).await.is_err() {
                    return;
                }
                if covers && at < bad_end && bad_end <= upto {
                    seen.bad_arrived
                        .lock()
                        .unwrap()
                        .get_or_insert(Instant::now());
                    seen.bad_transfers.fetch_add(1, Ordering::SeqCst);
                }
                seen.sent.fetch_add(upto - at, Ordering::SeqCst);
                *seen.last_sent.lock().unwrap() = Some(Instant::now());
                at = upto;
                if slow {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
    .await;
    (format!("{url}/overlay"), seen)
}

fn plan(bad: Option<u32>, at_rest: bool, m: &Manifest) -> Plan {
    Plan {
        bad: bad.map(|s| file_range(m, s)),
        at_rest,
        hold: AtomicBool::new(false),
        hold_all: false,
        free: file_range(m, m.device_state_segment),
        trickle: AtomicBool::new(false),
    }
}

fn create(url: &str, name: &str) -> CreateVmRequest {
    CreateVmRequest {
        overlay: url.to_string(),
        name: Some(name.into()),
        flavor: None,
    }
}

/// The VM's events from now on, collected until one puts `name` in
/// `until` (or 120 s pass).
fn follow_events(d: &Daemon, until: VmState) -> tokio::task::JoinHandle<Vec<VmEvent>> {
    let client = d.client();
    tokio::spawn(async move {
        let mut events = client.events().await.unwrap();
        let mut seen = Vec::<VmEvent>::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, events.next()).await {
            if let Ok(cloudlet_api::events::CloudletEvent::Vm(e)) = ev {
                let end = e.state == Some(until);
                seen.push(e);
                if end {
                    break;
                }
            }
        }
        seen
    })
}

/// Polls VM `id` until `done` holds (or `limit` passes: panics with the
/// daemon's log); the VM then and when.
async fn wait_vm(
    d: &Daemon,
    id: &str,
    limit: Duration,
    done: impl Fn(&VmInfo) -> bool,
) -> (VmInfo, Instant) {
    let start = Instant::now();
    loop {
        let vm = d.client().get_vm(id).await.unwrap();
        if done(&vm) {
            return (vm, Instant::now());
        }
        assert!(
            start.elapsed() < limit,
            "VM {id} never got there: {vm:?}\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits up to 5 s for `cond`.
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "not within 5 s: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The VM answers: kvstore stores and gives back a value.
async fn kvstore_answers(vm: &VmInfo) {
    let port = vm.ports[0].host;
    let r = http(port, "PUT", "/kv/k", Some(b"v".to_vec()))
        .await
        .unwrap();
    assert!(matches!(r.status, 201 | 204), "{}", r.status);
    assert_eq!(http(port, "GET", "/kv/k", None).await.unwrap().text(), "v");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_segment_damaged_in_transit_is_fetched_again_and_the_vm_lives() {
    let (bytes, m) = small_segment_kvstore().await;
    let order = LaunchPlan::new(&m).unwrap().memory_first_order();
    // A segment of the guest's memory, in the middle of the fetch order.
    let k = order[order.len() / 2];
    let (url, seen) = faulty_server(bytes, &m, Arc::new(plan(Some(k), false, &m))).await;
    let d = Daemon::start("").await;
    let vm = d
        .client()
        .create_vm(&create(&url, "healed"))
        .await
        .unwrap_or_else(|e| panic!("synthesis: {e}\n{}", d.log()));
    assert_eq!(vm.state, VmState::Running);
    kvstore_answers(&vm).await;
    // Its memory completes too, with every segment applied.
    let (done, _) = wait_vm(&d, &vm.id, Duration::from_secs(60), |v| {
        v.progress.stage == "ready"
    })
    .await;
    assert_eq!(done.state, VmState::Running, "{done:?}");
    assert_eq!(done.error, None);
    assert_eq!(done.progress.segments_applied, done.progress.segments_total);
    // Sent damaged, then whole (a stream reopened over it may carry it
    // once more, whole).
    assert!(seen.bad_transfers.load(Ordering::SeqCst) >= 2);
    // One new fetch of it healed it.
    assert_eq!(seen.bad_alone.load(Ordering::SeqCst), 1);
    let log = d.log();
    assert!(
        log.contains(&format!("Segment {k} hash mismatch: fetching it again"))
            && log.contains("damaged segment healed"),
        "{log}"
    );
    kvstore_answers(&vm).await;
    d.client().delete_vm(&vm.id).await.unwrap();
    assert!(d.vm_files().is_empty(), "{:?}", d.vm_files());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_segment_damaged_at_rest_fails_the_open_request_within_a_second() {
    let (bytes, m) = small_segment_kvstore().await;
    let order = LaunchPlan::new(&m).unwrap().memory_first_order();
    // The first segment after the device state; everything else held back
    // until QEMU runs and its guest waits for its memory.
    let k = order[1];
    let mut p = plan(Some(k), true, &m);
    p.hold = AtomicBool::new(true);
    p.hold_all = true;
    let p = Arc::new(p);
    let (url, seen) = faulty_server(bytes, &m, p.clone()).await;
    let d = Daemon::start("").await;
    let client = d.client();
    let request = tokio::spawn(async move {
        let r = client.create_vm(&create(&url, "rotten")).await;
        (r, Instant::now())
    });
    let start = Instant::now();
    let id = loop {
        let vms = d.client().list_vms().await.unwrap();
        if let Some(v) = vms.iter().find(|v| qemu_running(&d, &v.id)) {
            break v.id.clone();
        }
        assert!(
            start.elapsed().as_secs() < 60,
            "QEMU never started: {vms:?}\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    p.hold.store(false, Ordering::SeqCst);
    let (answer, answered) = tokio::time::timeout(Duration::from_secs(60), request)
        .await
        .expect("an answer")
        .unwrap();
    let arrived = seen
        .bad_arrived
        .lock()
        .unwrap()
        .expect("the bad segment was sent");
    let err = answer.expect_err("a damaged overlay is refused");
    let ms = answered.duration_since(arrived).as_millis();
    println!("segment {k} bad at rest: answer {ms} ms after its arrival ({err})");
    assert!(
        ms < 1000,
        "answered {ms} ms after the bad segment arrived: {err}"
    );
    assert_eq!(err.status(), Some(422), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&format!("Segment {k} hash mismatch")), "{msg}");
    // Fetched again the bounded number of times (by requests for exactly
    // it; the stream had it first), no more.
    assert_eq!(seen.bad_alone.load(Ordering::SeqCst), SEGMENT_REFETCHES);
    // Nothing left: QEMU gone, no file; the record says why.
    assert!(!qemu_running(&d, &id), "QEMU still runs");
    assert!(d.vm_files().is_empty(), "{:?}", d.vm_files());
    let rec = d.client().get_vm(&id).await.unwrap();
    assert_eq!(rec.state, VmState::Failed, "{rec:?}");
    assert!(
        rec.error
            .as_deref()
            .is_some_and(|e| e.contains(&format!("Segment {k} hash mismatch"))),
        "{rec:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_late_segment_bad_at_rest_fails_the_answering_vm_and_leaves_nothing() {
    let (bytes, m) = small_segment_kvstore().await;
    let order = LaunchPlan::new(&m).unwrap().memory_first_order();
    // The last segment to come, held back until the VM has answered.
    let k = *order.last().unwrap();
    let mut p = plan(Some(k), true, &m);
    p.hold = AtomicBool::new(true);
    p.trickle = AtomicBool::new(true);
    let p = Arc::new(p);
    let (url, seen) = faulty_server(bytes.clone(), &m, p.clone()).await;
    let d = Daemon::start("").await;
    let events = follow_events(&d, VmState::Failed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let vm = tokio::time::timeout(
        Duration::from_secs(120),
        d.client().create_vm(&create(&url, "late")),
    )
    .await
    .expect("the VM answers before the held segment")
    .unwrap_or_else(|e| panic!("synthesis: {e}\n{}", d.log()));
    assert_eq!(vm.state, VmState::Running);
    assert_eq!(vm.progress.stage, "ready, memory streaming in");
    kvstore_answers(&vm).await;
    assert!(seen.bad_arrived.lock().unwrap().is_none(), "held back");
    // Now the rest comes, fast; the held segment with it, damaged.
    p.trickle.store(false, Ordering::SeqCst);
    p.hold.store(false, Ordering::SeqCst);
    let (failed, at) = wait_vm(&d, &vm.id, Duration::from_secs(60), |v| {
        v.state != VmState::Running
    })
    .await;
    let arrived = seen
        .bad_arrived
        .lock()
        .unwrap()
        .expect("the bad segment was sent");
    let ms = at.duration_since(arrived).as_millis();
    println!(
        "late segment {k} bad at rest: VM failed {ms} ms after its arrival: {:?}",
        failed.error
    );
    assert_eq!(failed.state, VmState::Failed, "{failed:?}");
    let cause = format!("Segment {k} hash mismatch");
    assert!(
        failed.error.as_deref().is_some_and(|e| e.contains(&cause)),
        "{failed:?}"
    );
    assert!(ms < 1000, "recorded {ms} ms after the bad segment arrived");
    // Fetched again the bounded number of times (by requests for exactly
    // it; the stream had it first), no more.
    assert_eq!(seen.bad_alone.load(Ordering::SeqCst), SEGMENT_REFETCHES);
    assert!(failed.ports.is_empty(), "{failed:?}");
    // QEMU gone, no RAM file, disk or state left (the record says failed
    // first, then they go).
    eventually("QEMU gone and the files removed", || {
        !qemu_running(&d, &vm.id) && d.vm_files().is_empty()
    })
    .await;
    // The event stream told it, with the cause.
    let seen_events = events.await.unwrap();
    let ev = seen_events
        .iter()
        .find(|e| e.vm_id == vm.id && e.state == Some(VmState::Failed))
        .unwrap_or_else(|| panic!("no failed event: {seen_events:?}"));
    assert_eq!(ev.from, Some(VmState::Running));
    assert!(
        ev.error.as_deref().is_some_and(|e| e.contains(&cause)),
        "{ev:?}"
    );
    // Not taken for a death: the record stays failed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = d.client().get_vm(&vm.id).await.unwrap();
    assert_eq!(later.state, VmState::Failed, "{later:?}");
    // The daemon keeps serving: a new VM from an intact copy.
    let intact = range_server(bytes, |mut sock, data, start, end| async move {
        let _ = sock.write_all(&data[start as usize..end as usize]).await;
    })
    .await;
    let again = d
        .client()
        .create_vm(&create(&format!("{intact}/overlay"), "late-2"))
        .await
        .unwrap_or_else(|e| panic!("synthesis after the failure: {e}\n{}", d.log()));
    kvstore_answers(&again).await;
    d.client().delete_vm(&again.id).await.unwrap();
    d.client().delete_vm(&vm.id).await.unwrap();
    assert!(d.vm_files().is_empty(), "{:?}", d.vm_files());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_healthy_trickled_synthesis_reports_its_memory_complete() {
    let (bytes, m) = small_segment_kvstore().await;
    let payload = bytes.len() as u64 - m.data_offset;
    let p = plan(None, false, &m);
    p.trickle.store(true, Ordering::SeqCst);
    let p = Arc::new(p);
    let (url, seen) = faulty_server(bytes, &m, p.clone()).await;
    let d = Daemon::start("").await;
    let vm = d
        .client()
        .create_vm(&create(&url, "streams"))
        .await
        .unwrap_or_else(|e| panic!("synthesis: {e}\n{}", d.log()));
    assert_eq!(vm.progress.stage, "ready, memory streaming in", "{vm:?}");
    let first = vm.progress.segments_applied;
    assert!(first < vm.progress.segments_total, "{vm:?}");
    kvstore_answers(&vm).await;
    // The progress moves while the memory streams in.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mid = d.client().get_vm(&vm.id).await.unwrap();
    assert!(
        mid.progress.bytes_fetched > vm.progress.bytes_fetched,
        "frozen: {:?} then {:?}",
        vm.progress,
        mid.progress
    );
    // The rest, fast: the progress says complete soon after the last byte.
    p.trickle.store(false, Ordering::SeqCst);
    let (done, at) = wait_vm(&d, &vm.id, Duration::from_secs(60), |v| {
        v.progress.stage == "ready"
    })
    .await;
    assert!(seen.sent.load(Ordering::SeqCst) >= payload);
    let last = seen.last_sent.lock().unwrap().unwrap();
    let ms = at.duration_since(last).as_millis();
    println!(
        "memory complete: progress {:?} {ms} ms after the last byte left the server",
        done.progress
    );
    assert!(ms < 5000, "{ms} ms");
    assert_eq!(done.state, VmState::Running);
    assert_eq!(done.progress.segments_applied, done.progress.segments_total);
    assert!(done.progress.segments_applied > first);
    assert!(
        done.progress.bytes_fetched >= done.progress.bytes_total,
        "{:?}",
        done.progress
    );
    // And it stays so.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let later = d.client().get_vm(&vm.id).await.unwrap();
    assert_eq!(later.progress, done.progress);
    kvstore_answers(&vm).await;
    d.client().delete_vm(&vm.id).await.unwrap();
}
