//! The directory with its embedded store, over real HTTP: registration and
//! credentials, the ranking and its reasons, lease expiry, restart, watch.

use std::time::{Duration, Instant};

use cloudlet_api::directory::Lease;
use futures::StreamExt;

mod common;
use common::{names, put, reg, search, start};

#[tokio::test]
async fn ranking_filters_and_explains() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(&dir.path().join("d.redb"), 5000, 12000).await;
    // Pittsburgh: near (no base), near (full), 40 km, 300 km; one far in network.
    let near_nobase = reg("near-nobase", 40.44, -79.99, &[], 4);
    let near_full = reg("near-full", 40.45, -79.98, &["ubuntu"], 0);
    let mid = reg("mid", 40.80, -79.99, &["ubuntu"], 4);
    let far = reg("far", 42.0, -82.0, &["ubuntu"], 4);
    let mut in_net = reg("in-net", 45.0, -75.0, &["ubuntu"], 1);
    in_net.networks = vec!["10.9.0.0/16".into()];
    for r in [&near_nobase, &near_full, &mid, &far, &in_net] {
        let resp = put(&d.url, &format!("credential-of-{}", r.name), r).await;
        assert_eq!(resp.status(), 200);
        let lease: Lease = resp.json().await.unwrap();
        assert!(lease.created);
        assert_eq!(lease.lease_ms, 12000);
    }

    let a = search(&d.url, "lat=40.44&lon=-79.99&base=ubuntu&flavor=small").await;
    assert_eq!(names(&a), ["mid", "far", "in-net"]);
    assert_eq!(a.registered, 5);
    let why: Vec<(&str, &str)> = a
        .excluded
        .iter()
        .map(|e| (e.name.as_str(), e.why.as_str()))
        .collect();
    assert_eq!(why[0].0, "near-nobase");
    assert!(why[0].1.contains("does not hold base ubuntu"), "{why:?}");
    assert_eq!(why[1].0, "near-full");
    assert!(why[1].1.contains("full"), "{why:?}");
    assert!(a.candidates[0]
        .reasons
        .iter()
        .any(|r| r.contains("band < 50 km")));

    // A device inside in-net's network gets it first, whatever the distance.
    let a = search(&d.url, "lat=40.44&lon=-79.99&base=id-ubuntu&addr=10.9.3.4").await;
    assert_eq!(names(&a)[0], "in-net");
    assert_eq!(a.candidates[0].network.as_deref(), Some("10.9.0.0/16"));
    // Peer tokens never reach devices.
    let text = reqwest::get(format!("{}/v1/cloudlets/mid", d.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!text.contains("peer-mid"), "{text}");

    // Within a band, a cached overlay wins over more room.
    let mut mid2 = reg("mid2", 40.81, -79.99, &["ubuntu"], 1);
    mid2.overlays_cached = vec!["http://r/v1/overlays/app".into()];
    assert_eq!(put(&d.url, "credential-of-mid2", &mid2).await.status(), 200);
    let a = search(
        &d.url,
        "lat=40.44&lon=-79.99&base=ubuntu&overlay=http://r/v1/overlays/app&n=2",
    )
    .await;
    assert_eq!(names(&a), ["mid2", "mid"]);
    assert!(a.candidates[0].overlay_cached);

    // Bad queries are refused with the reason.
    let resp = reqwest::get(format!("{}/v1/cloudlets?lat=1", d.url))
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let resp = reqwest::get(format!("{}/v1/cloudlets?n=0", d.url))
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    d.stop().await;
}

#[tokio::test]
async fn a_name_is_bound_to_its_credential_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.redb");
    let d = start(&path, 5000, 12000).await;
    let r = reg("edge-a", 1.0, 1.0, &["b"], 2);
    assert_eq!(put(&d.url, "the-credential-of-a", &r).await.status(), 200);
    assert_eq!(put(&d.url, "someone-else-entirely", &r).await.status(), 403);
    let resp = reqwest::Client::new()
        .put(format!("{}/v1/cloudlets/edge-a", d.url))
        .json(&r)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    // A body that names another cloudlet than the path: refused.
    let mut other = r.clone();
    other.name = "edge-b".into();
    let resp = reqwest::Client::new()
        .put(format!("{}/v1/cloudlets/edge-a", d.url))
        .bearer_auth("the-credential-of-a")
        .json(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    d.stop().await;

    // Restarted on the same file: the entry and the binding are there.
    let d = start(&path, 5000, 12000).await;
    assert_eq!(names(&search(&d.url, "").await), ["edge-a"]);
    assert_eq!(put(&d.url, "someone-else-entirely", &r).await.status(), 403);
    let lease: Lease = put(&d.url, "the-credential-of-a", &r)
        .await
        .json()
        .await
        .unwrap();
    assert!(!lease.created);
    // Peers: only for a registered cloudlet, with the tokens.
    let b = reg("edge-b", 1.0, 1.1, &["b"], 2);
    assert_eq!(put(&d.url, "the-credential-of-b", &b).await.status(), 200);
    let peers: cloudlet_api::directory::PeerList = reqwest::Client::new()
        .get(format!("{}/v1/cloudlets/edge-a/peers", d.url))
        .bearer_auth("the-credential-of-a")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(peers.peers.len(), 1);
    assert_eq!(peers.peers[0].peer_token.as_deref(), Some("peer-edge-b"));
    let resp = reqwest::Client::new()
        .get(format!("{}/v1/cloudlets/edge-a/peers", d.url))
        .bearer_auth("the-credential-of-b")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    // Deregistered: gone from answers and from the store.
    let resp = reqwest::Client::new()
        .delete(format!("{}/v1/cloudlets/edge-a", d.url))
        .bearer_auth("the-credential-of-a")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(names(&search(&d.url, "").await), ["edge-b"]);
    d.stop().await;
    let d = start(&path, 5000, 12000).await;
    assert_eq!(names(&search(&d.url, "").await), ["edge-b"]);
    d.stop().await;
}

#[tokio::test]
async fn a_silent_cloudlet_leaves_within_its_lease_and_watchers_see_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(&dir.path().join("d.redb"), 200, 500).await;
    let watch = reqwest::get(format!("{}/v1/watch", d.url)).await.unwrap();
    assert_eq!(watch.status(), 200);
    let mut events = watch.bytes_stream();
    let alive = reg("alive", 1.0, 1.0, &[], 2);
    let silent = reg("silent", 1.0, 1.0, &[], 2);
    put(&d.url, "credential-alive-1", &alive).await;
    put(&d.url, "credential-silent-1", &silent).await;
    let last = Instant::now();
    // `alive` heartbeats every 200 ms; `silent` stops.
    let mut gone_after = None;
    while last.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        put(&d.url, "credential-alive-1", &alive).await;
        let a = search(&d.url, "").await;
        if gone_after.is_none() && !names(&a).contains(&"silent") {
            gone_after = Some(last.elapsed());
        }
        assert!(names(&a).contains(&"alive"));
    }
    let gone = gone_after.expect("the silent cloudlet stayed");
    assert!(
        gone >= Duration::from_millis(400) && gone < Duration::from_millis(900),
        "left after {gone:?} with a 500 ms lease"
    );
    // The watch told: snapshot, two registrations, the expiry.
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    while !text.contains("\"expired\"") && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(1), events.next()).await {
            Ok(Some(Ok(b))) => text.push_str(&String::from_utf8_lossy(&b)),
            _ => break,
        }
    }
    assert!(text.contains("\"snapshot\""), "{text}");
    assert!(text.contains("\"registered\""), "{text}");
    assert!(
        text.contains("\"expired\"") && text.contains("silent"),
        "{text}"
    );
    // The server's graceful stop waits for open streams.
    drop(events);
    d.stop().await;
}

/// Many registrations at once go through the group commit: each is on
/// disk before its answer (a crash right after keeps it), and of several
/// claims of one name at once exactly one wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_registrations_are_committed_and_a_name_has_one_owner() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.redb");
    let d = start(&path, 5000, 12000).await;
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..200 {
        let url = d.url.clone();
        calls.spawn(async move {
            let r = reg(&format!("edge-{i}"), 1.0, 1.0, &["b"], 2);
            put(&url, &format!("credential-of-edge-{i}"), &r)
                .await
                .status()
                .as_u16()
        });
    }
    for i in 0..10 {
        let url = d.url.clone();
        calls.spawn(async move {
            let r = reg("contested", 1.0, 1.0, &["b"], 2);
            1000 + put(&url, &format!("claimant-number-{i}"), &r)
                .await
                .status()
                .as_u16()
        });
    }
    let mut codes = Vec::new();
    while let Some(c) = calls.join_next().await {
        codes.push(c.unwrap());
    }
    assert_eq!(
        codes.iter().filter(|c| **c == 200).count(),
        200,
        "{codes:?}"
    );
    assert_eq!(codes.iter().filter(|c| **c == 1200).count(), 1, "{codes:?}");
    assert_eq!(codes.iter().filter(|c| **c == 1403).count(), 9, "{codes:?}");
    // Crashed (nothing flushed): every answered registration is on disk.
    // (The file is free once the crashed server's last connection task
    // ended: a process that died would have released it at once.)
    d.crash().await;
    let mut tries = 0;
    let d = loop {
        let config = cloudlet_directory::DirectoryConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            store: path.clone(),
            ..cloudlet_directory::DirectoryConfig::default()
        };
        match cloudlet_directory::Serving::bind(config).await {
            Ok(s) => break common::Running::from(s.spawn()),
            Err(e) => {
                tries += 1;
                assert!(tries < 100, "the store stays locked: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    };
    let all = search(&d.url, "n=100").await;
    assert_eq!(all.registered, 201);
    let winners = {
        let mut w = 0;
        for i in 0..10 {
            let r = reg("contested", 1.0, 1.0, &["b"], 2);
            if put(&d.url, &format!("claimant-number-{i}"), &r)
                .await
                .status()
                == 200
            {
                w += 1;
            }
        }
        w
    };
    assert_eq!(
        winners, 1,
        "the name is bound to one claimant after a restart"
    );
    d.stop().await;
}
