//! The directory on real etcd (Debian's etcd-server, started by the
//! tests): several directory instances serve one view; a leader change of
//! etcd and the loss of a directory instance lose no registration; etcd
//! expires a dead cloudlet's lease.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use cloudlet_directory::DirectoryConfig;
use cloudlet_testkit::etcd::Etcd;
use futures::StreamExt;

mod common;
use common::{names, put, reg, search, serve, Running};

async fn directory(etcd: &[String], prefix: &str, heartbeat_ms: u64, lease_ms: u64) -> Running {
    serve(DirectoryConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        etcd: etcd.to_vec(),
        etcd_prefix: prefix.into(),
        heartbeat_ms,
        lease_ms,
        ..DirectoryConfig::default()
    })
    .await
}

/// Poll `url`'s search until `ok` holds of the names; how long it took.
async fn until(url: &str, within: Duration, ok: impl Fn(&[&str]) -> bool) -> Duration {
    let start = Instant::now();
    loop {
        let a = search(url, "n=100").await;
        if ok(&names(&a)) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "not within {within:?}: {:?}",
            names(&a)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn two_instances_on_one_etcd_serve_one_view() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = tokio::task::spawn_blocking({
        let d = dir.path().join("etcd");
        move || Etcd::start(1, &d)
    })
    .await
    .unwrap();
    let eps = etcd.endpoints();
    let a = directory(&eps, "/t1", 500, 2000).await;
    let b = directory(&eps, "/t1", 500, 2000).await;
    let watch = reqwest::get(format!("{}/v1/watch", b.url)).await.unwrap();
    let mut events = watch.bytes_stream();

    // Registered at A: B answers with it, from its watch of etcd.
    let one = reg("one", 40.0, -80.0, &["ubuntu"], 2);
    let resp = put(&a.url, "credential-of-one", &one).await;
    assert_eq!(resp.status(), 200);
    let seen = until(&b.url, Duration::from_secs(3), |n| n == ["one"]).await;
    println!("registered at A, seen by B after {seen:?}");
    // The name is bound fleet-wide: B refuses another credential.
    assert_eq!(put(&b.url, "not-the-credential", &one).await.status(), 403);
    // A heartbeat at B (same credential) renews; a change shows at A.
    let mut changed = one.clone();
    changed.load = 0.9;
    let resp = put(&b.url, "credential-of-one", &changed).await;
    assert_eq!(resp.status(), 200);
    let start = Instant::now();
    loop {
        let ans = search(&a.url, "").await;
        if ans.candidates.first().is_some_and(|c| c.load > 0.8) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "A never saw the change"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A directory restarted reads the view back from etcd.
    a.stop().await;
    let a = directory(&eps, "/t1", 500, 2000).await;
    assert_eq!(names(&search(&a.url, "").await), ["one"]);

    // Silent for its lease (2 s): etcd expires it, both instances drop it.
    let silent_since = Instant::now();
    until(&a.url, Duration::from_secs(5), |n| n.is_empty()).await;
    until(&b.url, Duration::from_secs(1), |n| n.is_empty()).await;
    let gone = silent_since.elapsed();
    println!("lease 2 s: gone from both instances after {gone:?}");
    assert!(
        gone >= Duration::from_millis(1000),
        "left too early: {gone:?}"
    );

    // Registered again, deregistered at A: B's watchers see `deregistered`.
    assert_eq!(put(&b.url, "credential-of-one", &one).await.status(), 200);
    until(&a.url, Duration::from_secs(3), |n| n == ["one"]).await;
    let resp = reqwest::Client::new()
        .delete(format!("{}/v1/cloudlets/one", a.url))
        .bearer_auth("credential-of-one")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    until(&b.url, Duration::from_secs(3), |n| n.is_empty()).await;
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    while !text.contains("\"deregistered\"") && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(1), events.next()).await {
            Ok(Some(Ok(b))) => text.push_str(&String::from_utf8_lossy(&b)),
            _ => break,
        }
    }
    for kind in ["registered", "updated", "expired", "deregistered"] {
        assert!(text.contains(&format!("\"{kind}\"")), "no {kind}: {text}");
    }
    drop(events);

    // etcd gone: the health says so, and searches are still answered
    // (from the last view) instead of failing.
    let health = |url: String| async move {
        reqwest::get(format!("{url}/v1/health"))
            .await
            .unwrap()
            .json::<cloudlet_api::directory::DirectoryHealth>()
            .await
            .unwrap()
    };
    assert!(health(b.url.clone()).await.store_connected);
    let mut etcd = etcd;
    etcd.members[0].kill();
    let start = Instant::now();
    while health(b.url.clone()).await.store_connected {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "health still says connected {:?} after etcd was killed",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "etcd killed: health says disconnected after {:?}",
        start.elapsed()
    );
    assert_eq!(
        reqwest::get(format!("{}/v1/cloudlets", b.url))
            .await
            .unwrap()
            .status(),
        200
    );
    a.stop().await;
    b.stop().await;
}

/// A cloudlet's view of a fleet: it heartbeats to the first directory
/// that answers (within 1.5 s: an instance stuck on an etcd leader
/// election is passed over for the next).
async fn heartbeat_any(
    urls: &[String],
    token: &str,
    r: &cloudlet_api::directory::Registration,
) -> bool {
    for u in urls {
        let sent = reqwest::Client::new()
            .put(format!("{u}/v1/cloudlets/{}", r.name))
            .bearer_auth(token)
            .timeout(Duration::from_millis(1500))
            .json(r)
            .send()
            .await;
        if sent.is_ok_and(|s| s.status() == 200) {
            return true;
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_survives_the_loss_of_the_etcd_leader_and_of_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = tokio::task::spawn_blocking({
        let d = dir.path().join("etcd");
        move || Etcd::start(3, &d)
    })
    .await
    .unwrap();
    let eps = etcd.endpoints();
    let a = directory(&eps, "/fleet", 500, 4000).await;
    let b = directory(&eps, "/fleet", 500, 4000).await;
    let urls = vec![a.url.clone(), b.url.clone()];
    let b_url = b.url.clone();

    // 12 cloudlets heartbeat every 500 ms through the fleet; one of them,
    // `doomed`, stops after the faults.
    const N: usize = 12;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let doomed_stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut beats = Vec::new();
    for i in 0..N {
        let name = if i == 0 {
            "doomed".to_string()
        } else {
            format!("c{i:02}")
        };
        let r = reg(&name, 40.0 + i as f64 * 0.1, -80.0, &["ubuntu"], 2);
        let (urls, stop, doomed_stop) = (urls.clone(), stop.clone(), doomed_stop.clone());
        beats.push(tokio::spawn(async move {
            let token = format!("credential-of-{name}");
            let mut longest_gap = Duration::ZERO;
            let mut last_ok = Instant::now();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if i == 0 && doomed_stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                if heartbeat_any(&urls, &token, &r).await {
                    longest_gap = longest_gap.max(last_ok.elapsed());
                    last_ok = Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            (name, longest_gap)
        }));
    }
    let all: BTreeSet<String> = std::iter::once("doomed".to_string())
        .chain((1..N).map(|i| format!("c{i:02}")))
        .collect();
    let all_names = all.clone();
    until(&b_url, Duration::from_secs(10), move |n| {
        n.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>() == all_names
    })
    .await;

    // A stream of searches to whichever instance answers; every answer
    // must hold every cloudlet that is heartbeating.
    let searching = tokio::spawn({
        let (urls, stop, all) = (urls.clone(), stop.clone(), all.clone());
        async move {
            let (mut answered, mut by_b, mut short) = (0u32, 0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for (k, u) in urls.iter().enumerate() {
                    let got = reqwest::Client::new()
                        .get(format!("{u}/v1/cloudlets?n=100"))
                        .timeout(Duration::from_secs(2))
                        .send()
                        .await;
                    let Ok(resp) = got else { continue };
                    let Ok(ans) = resp.json::<cloudlet_api::directory::SearchAnswer>().await else {
                        continue;
                    };
                    answered += 1;
                    by_b += u32::from(k == 1);
                    let have: BTreeSet<String> =
                        ans.candidates.iter().map(|c| c.name.clone()).collect();
                    let missing: Vec<&String> = all
                        .iter()
                        .filter(|n| *n != "doomed" && !have.contains(*n))
                        .collect();
                    if !missing.is_empty() {
                        short.push(format!("{u}: missing {missing:?}"));
                    }
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (answered, by_b, short)
        }
    });

    // Faults: the etcd leader is killed, then directory A.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let leader = tokio::task::block_in_place(|| etcd.wait_leader(Duration::from_secs(10)));
    println!("killing etcd leader {}", etcd.members[leader].name);
    etcd.members[leader].kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!("crashing directory A");
    a.crash().await;
    let next = tokio::task::block_in_place(|| etcd.wait_leader(Duration::from_secs(15)));
    println!("etcd leader now {}", etcd.members[next].name);
    tokio::time::sleep(Duration::from_secs(3)).await;

    // `doomed` dies: its lease expires in etcd, B drops it.
    doomed_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let died = Instant::now();
    until(&b_url, Duration::from_secs(10), |n| !n.contains(&"doomed")).await;
    println!(
        "doomed gone from B {:?} after its last heartbeat (lease 4 s)",
        died.elapsed()
    );
    // ...and from etcd itself: its key is gone.
    let mut client = etcd_client::Client::connect(&eps[next..=next], None)
        .await
        .unwrap();
    let got = client.get("/fleet/cloudlets/doomed", None).await.unwrap();
    assert!(
        got.kvs().is_empty(),
        "the dead cloudlet's key is still in etcd"
    );
    let got = client
        .get(
            "/fleet/cloudlets/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    assert_eq!(got.kvs().len(), N - 1);

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (answered, by_b, short) = searching.await.unwrap();
    println!("searches answered: {answered} ({by_b} by B)");
    assert!(short.is_empty(), "answers lost registrations: {short:?}");
    assert!(by_b > 0, "B answered no search");
    for h in beats {
        let (name, gap) = h.await.unwrap();
        println!("{name}: longest gap between successful heartbeats {gap:?}");
        // What counts is above: no heartbeating cloudlet left an answer
        // and none lost its key. A gap can pass the lease by a little (two
        // instances tried at 1.5 s each, then the 500 ms pause) without a
        // loss, since etcd renews every lease when a new leader is elected;
        // a failover that did not work would show gaps of many leases.
        assert!(
            gap < Duration::from_secs(8),
            "{name} went {gap:?} without a heartbeat landing (lease 4 s)"
        );
    }
    b.stop().await;
}
