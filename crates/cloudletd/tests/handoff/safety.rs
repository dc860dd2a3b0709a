//! The ways a handoff could make a VM run twice or never come back, on two
//! real `cloudletd` processes and real QEMU: a destination that dies right
//! after it stored the commit, a VM that moves back and forth (its
//! generation checked at each end), a stale offer, and a peer of another
//! protocol version.

use std::time::Duration;

use crate::common::{kvstore_overlay, qemu_running, Daemon, TOKEN};
use cloudlet_api::{AppInfo, HandoffOffer, VmState, HANDOFF_PROTOCOL};
use cloudlet_testkit::http;

fn port_of(endpoint: &str) -> u16 {
    endpoint.rsplit(':').next().unwrap().parse().unwrap()
}

const EXIT_AFTER_COMMIT: &str = "handoff_test_exit_after_commit = true";

/// The destination stores the commit, then dies before the VM resumes and
/// before the source has its answer. The source must not take the silence
/// (or the restarted destination's answer) for a refusal: the VM runs on
/// exactly one cloudlet, the destination, and the source stays stopped.
#[tokio::test(flavor = "multi_thread")]
async fn a_destination_dying_right_after_it_stored_the_commit_runs_the_vm_alone() {
    let overlay = kvstore_overlay().await;
    let a = Daemon::start("").await;
    let mut b = Daemon::start(&format!("{EXIT_AFTER_COMMIT}\n")).await;
    let vm = a
        .client()
        .create_vm_upload(&overlay, Some("once"), None)
        .await
        .unwrap();
    let port = vm.ports[0].host;
    http(port, "PUT", "/kv/k", Some(b"before".to_vec()))
        .await
        .unwrap();

    let handoff = {
        let (client, dest) = (a.client(), b.url());
        tokio::spawn(async move { client.handoff("once", &dest, Some(TOKEN)).await })
    };
    let code = b.wait_exit(Duration::from_secs(240)).await;
    assert_eq!(
        code,
        Some(70),
        "the destination did not exit at its commit: {}",
        b.log()
    );
    // Dead destination, source waiting for an answer: nothing runs the
    // guest now, and the source must not resume it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let src = a.client().get_vm("once").await.unwrap();
    assert_eq!(src.state, VmState::Moved, "{src:?}\n{}", a.log());
    assert!(
        http(port, "GET", "/kv/k", None).await.is_err(),
        "the source VM must stay stopped while the commit is unanswered"
    );

    b.drop_config_line(EXIT_AFTER_COMMIT);
    b.crash_and_restart().await;
    let report = handoff.await.unwrap().unwrap_or_else(|e| {
        panic!(
            "handoff: {e}\n--- source\n{}\n--- destination\n{}",
            a.log(),
            b.log()
        )
    });
    assert_eq!(report.vm.generation, 2);
    assert!(
        a.log().contains("no definite answer to the commit yet"),
        "{}",
        a.log()
    );

    // The destination re-adopted the VM it had committed and resumed it.
    let dst = b.client().get_vm("once").await.unwrap();
    assert_eq!(dst.state, VmState::Running, "{dst:?}\n{}", b.log());
    assert_eq!(dst.generation, 2);
    let new_port = port_of(&dst.ports[0].endpoint);
    let mut answer = None;
    for _ in 0..100 {
        if let Ok(r) = http(new_port, "GET", "/kv/k", None).await {
            answer = Some(r.text());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(answer.as_deref(), Some("before"), "{}", b.log());
    assert!(
        b.log().contains("re-adopted VM was paused: resumed"),
        "{}",
        b.log()
    );

    // Exactly one copy runs.
    let src = a.client().get_vm("once").await.unwrap();
    assert_eq!(src.state, VmState::Moved);
    assert_eq!(src.generation, 2);
    assert!(!qemu_running(&a, &vm.id), "the source's QEMU still runs");
    assert!(qemu_running(&b, &vm.id));
}

/// A user who goes home gets their VM back: A -> B -> A -> B, the
/// generation going up by one at each move and checked at each end; an
/// offer of a generation already seen is refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_vm_moves_back_and_forth_and_a_stale_generation_is_refused() {
    let overlay = kvstore_overlay().await;
    let a = Daemon::start("").await;
    let b = Daemon::start("").await;
    let vm = a
        .client()
        .create_vm_upload(&overlay, Some("commuter"), None)
        .await
        .unwrap();
    assert_eq!(vm.generation, 1);
    http(vm.ports[0].host, "PUT", "/kv/home", Some(b"1".to_vec()))
        .await
        .unwrap();

    let mut at = (&a, &b);
    for generation in 2..=4u64 {
        let (from, to) = at;
        let report = from
            .client()
            .handoff("commuter", &to.url(), Some(TOKEN))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "move to generation {generation}: {e}\n--- from\n{}\n--- to\n{}",
                    from.log(),
                    to.log()
                )
            });
        assert_eq!(report.vm.generation, generation);
        let there = to.client().get_vm("commuter").await.unwrap();
        assert_eq!(
            (there.state, there.generation),
            (VmState::Running, generation)
        );
        let left = from.client().get_vm("commuter").await.unwrap();
        assert_eq!((left.state, left.generation), (VmState::Moved, generation));
        assert!(!qemu_running(from, &vm.id));
        // The app kept its state through every move.
        let port = port_of(&there.ports[0].endpoint);
        let key = format!("/kv/g{generation}");
        http(port, "PUT", &key, Some(b"x".to_vec())).await.unwrap();
        assert_eq!(
            http(port, "GET", "/kv/home", None).await.unwrap().text(),
            "1"
        );
        at = (to, from);
    }
    // Now at B (generation 4); A holds a moved record of generation 4.
    let b_vm = b.client().get_vm("commuter").await.unwrap();
    let port = port_of(&b_vm.ports[0].endpoint);
    for g in 2..=4 {
        assert_eq!(
            http(port, "GET", &format!("/kv/g{g}"), None)
                .await
                .unwrap()
                .status,
            200
        );
    }

    let offer = |generation: u64| HandoffOffer {
        protocol: HANDOFF_PROTOCOL,
        handoff_id: format!("stale{generation}"),
        vm_id: vm.id.clone(),
        name: "commuter".into(),
        generation,
        base_id: vm.base_id.clone(),
        flavor: vm.flavor.clone(),
        app: AppInfo::default(),
        overlay: vm.overlay.clone(),
        source: "http://old-copy".into(),
        session_hash: None,
        tenant: None,
    };
    let prepare = |url: String, offer: HandoffOffer| async move {
        let r = reqwest::Client::new()
            .post(format!("{url}/v1/handoff/prepare"))
            .bearer_auth(TOKEN)
            .json(&offer)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body: serde_json::Value = r.json().await.unwrap();
        (status, body)
    };
    // An old copy (generation 2, arriving as 3) offered to A, which saw 4.
    let (status, body) = prepare(a.url(), offer(2)).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["kind"], "stale_generation", "{body}");
    // Its own generation again: stale too (4 is what A recorded).
    let (status, body) = prepare(a.url(), offer(3)).await;
    assert_eq!(
        (status, body["kind"].as_str()),
        (409, Some("stale_generation")),
        "{body}"
    );
    // B runs it: a newer generation offered there is not a second copy.
    let (status, body) = prepare(b.url(), offer(9)).await;
    assert_eq!(
        (status, body["kind"].as_str()),
        (409, Some("exists")),
        "{body}"
    );
    // Nothing changed.
    assert_eq!(
        a.client().get_vm("commuter").await.unwrap().state,
        VmState::Moved
    );
    let b_vm = b.client().get_vm("commuter").await.unwrap();
    assert_eq!((b_vm.state, b_vm.generation), (VmState::Running, 4));
    assert_eq!(
        http(port, "GET", "/kv/home", None).await.unwrap().text(),
        "1"
    );
}

/// A peer that speaks another handoff protocol is refused at the offer,
/// before it starts a QEMU; the VM keeps serving at the source.
#[tokio::test(flavor = "multi_thread")]
async fn a_peer_of_another_protocol_version_is_refused_before_qemu_starts() {
    let overlay = kvstore_overlay().await;
    let a = Daemon::start("").await;
    let b = Daemon::start(&format!(
        "handoff_test_protocol = {}\n",
        HANDOFF_PROTOCOL + 1
    ))
    .await;
    assert_eq!(
        a.client().info().await.unwrap().handoff_protocol,
        HANDOFF_PROTOCOL
    );
    assert_eq!(
        b.client().info().await.unwrap().handoff_protocol,
        HANDOFF_PROTOCOL + 1
    );
    let vm = a
        .client()
        .create_vm_upload(&overlay, Some("homebody"), None)
        .await
        .unwrap();
    let port = vm.ports[0].host;
    http(port, "PUT", "/kv/k", Some(b"v".to_vec()))
        .await
        .unwrap();

    let err = a
        .client()
        .handoff("homebody", &b.url(), Some(TOKEN))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("destination_refused") && text.contains("protocol"),
        "{text}"
    );

    let v = a.client().get_vm("homebody").await.unwrap();
    assert_eq!((v.state, v.generation), (VmState::Running, 1));
    assert_eq!(http(port, "GET", "/kv/k", None).await.unwrap().text(), "v");
    assert!(b.client().list_vms().await.unwrap().is_empty());
    assert!(b.vm_files().is_empty(), "{:?}", b.vm_files());
    assert!(!qemu_running(&b, &vm.id));
}
