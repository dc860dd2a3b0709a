//! Cloudlets join the directory: real `cloudletd` processes, a real
//! directory over HTTP (in-process, embedded store), a real kvstore VM on
//! QEMU. What a cloudlet tells follows its VMs; a handoff finds its
//! destination by name and its token through the directory; a cloudlet
//! killed with SIGKILL leaves the answers within its lease and is
//! back within one after a restart, its VM accounted; SIGTERM
//! deregisters; a directory that goes away does not stop the cloudlet.

mod common;
#[path = "directory/wan.rs"]
mod wan;

use std::time::{Duration, Instant};

use cloudlet_api::directory::{Registration, SearchAnswer, SearchQuery};
use cloudlet_api::CreateVmRequest;
use cloudlet_client::DirectoryClient;
use cloudlet_directory::{Background, DirectoryConfig, Serving};
use common::{kvstore_overlay, qemu_running, Daemon};

const HEARTBEAT: Duration = Duration::from_millis(1000);
/// Three heartbeats: a cloudlet whose heartbeat is held up by a busy
/// machine (two guests migrating on two cores) keeps its entry.
const LEASE: Duration = Duration::from_millis(3000);

struct Dir {
    url: String,
    bg: Background,
}

async fn directory(listen: &str, store: &std::path::Path) -> Dir {
    let bg = Serving::bind(DirectoryConfig {
        listen: listen.parse().unwrap(),
        store: store.to_path_buf(),
        heartbeat_ms: HEARTBEAT.as_millis() as u64,
        lease_ms: LEASE.as_millis() as u64,
        ..DirectoryConfig::default()
    })
    .await
    .unwrap()
    .spawn();
    Dir { url: bg.url(), bg }
}

impl Dir {
    async fn stop(self) {
        self.bg.stop().await.unwrap();
    }

    fn client(&self) -> DirectoryClient {
        DirectoryClient::new(std::slice::from_ref(&self.url), None)
    }

    async fn search(&self, q: SearchQuery) -> SearchAnswer {
        self.client().search(&q).await.unwrap()
    }

    /// The live entry of `name`.
    async fn entry(&self, name: &str) -> Option<Registration> {
        let reg = reqwest::get(format!("{}/v1/cloudlets/{name}", self.url))
            .await
            .unwrap();
        if reg.status() == 404 {
            return None;
        }
        Some(reg.json().await.unwrap())
    }

    /// Wait until `ok` holds of `name`'s entry; how long it took.
    async fn until(
        &self,
        name: &str,
        within: Duration,
        what: &str,
        ok: impl Fn(Option<&Registration>) -> bool,
    ) -> Duration {
        self.until_told(name, within, what, ok, String::new).await
    }

    /// [`Dir::until`], telling `log()` (the cloudlet's side) if not.
    async fn until_told(
        &self,
        name: &str,
        within: Duration,
        what: &str,
        ok: impl Fn(Option<&Registration>) -> bool,
        log: impl Fn() -> String,
    ) -> Duration {
        let start = Instant::now();
        loop {
            let e = self.entry(name).await;
            if ok(e.as_ref()) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < within,
                "{name}: not {what} within {within:?}: {e:?}\n{}",
                log()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// The last `n` lines of `log`.
fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn joined(url: &str, lat: f64) -> String {
    format!(
        "directory = [\"{url}\"]\nnetworks = [\"10.99.0.0/16\"]\n[location]\nlabel = \"x\"\nlatitude = {lat}\nlongitude = -79.9\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn cloudlets_join_move_through_and_leave_the_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, overlay_url) = common::registry_with_kvstore(tmp.path()).await;
    let store = tmp.path().join("directory.redb");
    let dir = directory("127.0.0.1:0", &store).await;

    let mut a = Daemon::start_named("edge-a", &joined(&dir.url, 40.44)).await;
    let mut b = Daemon::start_named("edge-b", &joined(&dir.url, 40.45)).await;
    for (d, name) in [(&a, "edge-a"), (&b, "edge-b")] {
        let t = dir
            .until(name, Duration::from_secs(5), "registered", |e| e.is_some())
            .await;
        println!("{name} registered {t:?} after its API answered");
        let e = dir.entry(name).await.unwrap();
        assert_eq!(e.api_url, d.url());
        assert_eq!(e.base_vms.len(), 1, "{e:?}");
        assert_eq!(e.networks, ["10.99.0.0/16"]);
        assert_eq!(e.peer_token, None, "a peer token is not for everyone");
    }
    let cap = dir.entry("edge-a").await.unwrap().capacity;
    let base = dir.entry("edge-a").await.unwrap().base_vms[0].id.clone();

    // Each learns the other as a handoff peer (with its token).
    let start = Instant::now();
    loop {
        let info = a.client().info().await.unwrap();
        let m = info.directory.expect("membership shown");
        if m.registered && m.peers == ["edge-b"] {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{m:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A VM on A: its free resources and cached overlay follow at once,
    // and a search for that overlay ranks A first.
    let vm = a
        .client()
        .create_vm(&CreateVmRequest {
            overlay: overlay_url.clone(),
            name: Some("follower".into()),
            flavor: None,
        })
        .await
        .unwrap();
    let t = dir
        .until("edge-a", Duration::from_secs(2), "updated", |e| {
            e.is_some_and(|e| {
                e.free.vms == cap.vms - 1 && e.overlays_cached == [overlay_url.clone()]
            })
        })
        .await;
    println!("edge-a's VM seen by the directory {t:?} after it ran");
    let ans = dir
        .search(SearchQuery {
            base: Some(base.clone()),
            overlay: Some(overlay_url.clone()),
            lat: Some(40.45),
            lon: Some(-79.9),
            ..SearchQuery::default()
        })
        .await;
    assert_eq!(ans.candidates[0].name, "edge-a", "{ans:?}");
    assert!(ans.candidates[0].overlay_cached);
    assert!(
        ans.candidates[0]
            .reasons
            .iter()
            .any(|r| r.contains("cached")),
        "{:?}",
        ans.candidates[0].reasons
    );

    // A handoff to "edge-b" by name (no static peer, no peer token
    // given), asked with the VM's own session credential: what a device's
    // session holds, not an operator token.
    let session = vm
        .session_token
        .clone()
        .expect("the creator gets the VM's credential");
    let as_device = |url: String| cloudlet_client::Client::new(&url, Some(session.clone()));
    let refused = as_device(a.url())
        .create_vm(&CreateVmRequest {
            overlay: overlay_url.clone(),
            name: None,
            flavor: None,
        })
        .await
        .unwrap_err();
    assert_eq!(
        refused.status(),
        Some(401),
        "a session credential creates nothing: {refused}"
    );
    assert_eq!(
        a.client().get_vm(&vm.id).await.unwrap().session_token,
        None,
        "the credential is not shown again"
    );
    // Both cloudlets' event streams, followed through the move.
    let follow = |url: String| {
        tokio::spawn(async move {
            let mut events = cloudlet_client::Client::new(&url, Some(common::TOKEN.into()))
                .events()
                .await
                .unwrap();
            let mut seen: Vec<cloudlet_api::VmEvent> = Vec::new();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, events.next()).await {
                let Ok(cloudlet_api::events::CloudletEvent::Vm(e)) = ev else {
                    continue;
                };
                // The end of a move: out (moved) or in (running again).
                use cloudlet_api::VmState as S;
                let done = matches!(
                    (e.from, e.state),
                    (_, Some(S::Moved)) | (Some(S::Receiving), Some(S::Running))
                );
                seen.push(e);
                if done {
                    break;
                }
            }
            seen
        })
    };
    let (events_a, events_b) = (follow(a.url()), follow(b.url()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let report = as_device(a.url())
        .handoff(&vm.id, "edge-b", None)
        .await
        .expect("handoff through the directory");
    let (ea, eb) = (events_a.await.unwrap(), events_b.await.unwrap());
    let states = |v: &[cloudlet_api::VmEvent]| {
        v.iter()
            .filter(|e| e.vm_id == vm.id)
            .map(|e| e.state)
            .collect::<Vec<_>>()
    };
    use cloudlet_api::VmState as S;
    assert_eq!(states(&ea), [Some(S::HandingOff), Some(S::Moved)], "{ea:?}");
    assert!(ea.last().unwrap().moved_to.is_some(), "{ea:?}");
    let mobility = |v: &[cloudlet_api::VmEvent]| {
        v.iter()
            .filter(|e| e.vm_id == vm.id)
            .map(|e| e.mobility)
            .collect::<Vec<_>>()
    };
    use cloudlet_api::Mobility as M;
    assert_eq!(mobility(&ea), [Some(M::Triggered), Some(M::Completed)]);
    assert_eq!(mobility(&eb), [None, Some(M::Arrived)]);
    assert_eq!(
        states(&eb),
        [Some(S::Receiving), Some(S::Running)],
        "{eb:?}"
    );
    assert_eq!(
        eb.last().unwrap().ports,
        report.vm.ports,
        "the arrival's event has the new endpoint"
    );
    assert_eq!(report.vm.generation, 2);
    assert!(qemu_running(&b, &vm.id));
    dir.until("edge-b", Duration::from_secs(2), "holding the VM", |e| {
        e.is_some_and(|e| e.free.vms == cap.vms - 1)
    })
    .await;
    dir.until("edge-a", Duration::from_secs(2), "free again", |e| {
        e.is_some_and(|e| e.free.vms == cap.vms && e.overlays_cached.is_empty())
    })
    .await;
    fleet_view_shows_the_move(&dir, (&a, &b), &vm.id, &report).await;

    // The credential followed the VM: at B it moves it again (here: the
    // other way is A, which is fine) and deletes nothing else.
    let wrong = cloudlet_client::Client::new(&b.url(), Some("not-the-session".into()))
        .handoff(&vm.id, "edge-a", None)
        .await
        .unwrap_err();
    assert_eq!(wrong.status(), Some(401), "{wrong}");

    // SIGKILL: B leaves every answer within its lease.
    b.kill();
    let gone = dir
        .until("edge-b", LEASE + Duration::from_millis(500), "gone", |e| {
            e.is_none()
        })
        .await;
    println!("edge-b killed: gone from the directory after {gone:?} (lease {LEASE:?})");
    assert!(gone <= LEASE + Duration::from_millis(100), "{gone:?}");
    let ans = dir.search(SearchQuery::default()).await;
    assert!(ans.candidates.iter().all(|c| c.name != "edge-b"));
    // Restarted: back within one heartbeat of its API answering, with the
    // VM it kept (QEMU outlived the daemon) accounted.
    assert!(qemu_running(&b, &vm.id), "the VM outlives its daemon");
    b.restart().await;
    let back = dir
        .until("edge-b", HEARTBEAT, "back", |e| {
            e.is_some_and(|e| e.free.vms == cap.vms - 1)
        })
        .await;
    println!("edge-b restarted: back in the directory {back:?} after its API answered");

    // SIGTERM: A deregisters at once (not a lease later).
    assert_eq!(a.terminate().await, Some(0), "{}", a.log());
    let t = dir
        .until("edge-a", Duration::from_millis(300), "deregistered", |e| {
            e.is_none()
        })
        .await;
    println!("edge-a terminated: gone {t:?} after it exited");
    assert!(
        a.log().contains("deregistered from the directory"),
        "{}",
        a.log()
    );

    // The directory goes away: B serves on; it comes back: B is back.
    let listen = dir.url.trim_start_matches("http://").to_string();
    dir.stop().await;
    tokio::time::sleep(2 * HEARTBEAT).await;
    let info = b
        .client()
        .info()
        .await
        .expect("serving without a directory");
    let m = info.directory.unwrap();
    assert!(m.last_error.is_some(), "{m:?}");
    let vm_now = b.client().get_vm(&vm.id).await.unwrap();
    assert_eq!(vm_now.state, cloudlet_api::VmState::Running);
    assert_eq!(
        b.log().matches("directory: heartbeat failed").count(),
        1,
        "one line per outage: {}",
        b.log()
    );
    let dir = directory(&listen, &store).await;
    let start = Instant::now();
    loop {
        let m = b.client().info().await.unwrap().directory.unwrap();
        if m.last_error.is_none() && m.last_heartbeat_ms_ago.is_some_and(|t| t < 1000) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(3), "{m:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "directory restarted: edge-b heartbeats again after {:?}",
        start.elapsed()
    );
    assert!(dir.entry("edge-b").await.is_some());
    dir.stop().await;
}

/// `cloudlet drain`: every VM goes to the best neighbour that can take it
/// (the nearest one is full: the next), the drained cloudlet refuses new
/// VMs and moves in (and the directory leaves it out), stays drained
/// across a restart, and takes work again when the maintenance ends.
#[tokio::test(flavor = "multi_thread")]
async fn drain_hands_every_vm_to_a_neighbour_and_takes_no_new_work() {
    let overlay = kvstore_overlay().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = directory("127.0.0.1:0", &tmp.path().join("directory.redb")).await;
    let mut a = Daemon::start_named("drain-a", &joined(&dir.url, 40.44)).await;
    let b = Daemon::start_named("drain-b", &joined(&dir.url, 40.60)).await;
    let full = format!(
        "{}[capacity]\nvcpus = 4\nmemory_mib = 4096\nvms = 0\n",
        joined(&dir.url, 40.441)
    );
    let _c = Daemon::start_named("drain-c", &full).await;
    for name in ["drain-a", "drain-b", "drain-c"] {
        dir.until(name, Duration::from_secs(5), "registered", |e| e.is_some())
            .await;
    }
    // A learns its peers after its next heartbeat.
    tokio::time::sleep(HEARTBEAT + Duration::from_millis(500)).await;
    let mut vms = Vec::new();
    for name in ["one", "two"] {
        vms.push(
            a.client()
                .create_vm_upload(&overlay, Some(name), None)
                .await
                .unwrap(),
        );
    }

    let report = a.client().drain().await.expect("drain");
    println!("{report:#?}");
    assert!(report.drained, "{report:?}");
    assert_eq!(report.vms.len(), 2);
    for v in &report.vms {
        assert_eq!(v.moved_to.as_deref(), Some("drain-b"), "{v:?}");
        assert!(
            v.refusals.iter().any(|r| r.starts_with("drain-c: no room")),
            "the nearest (full) neighbour is passed over, with why: {v:?}"
        );
    }
    // Every VM serves at B.
    for vm in &vms {
        let there = b.client().get_vm(&vm.id).await.unwrap();
        assert_eq!(there.state, cloudlet_api::VmState::Running);
        let port: u16 = there.ports[0]
            .endpoint
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let r = cloudlet_testkit::http(port, "GET", "/health", None)
            .await
            .unwrap();
        assert_eq!(r.status, 200);
    }
    // A takes no new work: no VM, no move in; the directory leaves it out.
    let refused_vm = |d: &Daemon| {
        let (c, o) = (d.client(), overlay.clone());
        async move {
            let err = c
                .create_vm_upload(&o, Some("three"), None)
                .await
                .unwrap_err();
            assert_eq!(err.status(), Some(503), "{err}");
            err
        }
    };
    let err = refused_vm(&a).await;
    assert!(err.to_string().contains("draining"), "{err}");
    let back = b
        .client()
        .handoff("one", "drain-a", None)
        .await
        .unwrap_err();
    println!("a move into the drained cloudlet: {back}");
    assert!(back.to_string().contains("draining"), "{back}");
    assert_eq!(
        b.client().get_vm(&vms[0].id).await.unwrap().state,
        cloudlet_api::VmState::Running,
        "the refused move leaves the VM serving where it is"
    );
    let a_log = || tail(&a.log(), 30);
    dir.until_told(
        "drain-a",
        LEASE + HEARTBEAT,
        "not accepting",
        |e| e.is_some_and(|e| !e.accepting),
        a_log,
    )
    .await;
    let ans = dir.search(SearchQuery::default()).await;
    let left = ans.excluded.iter().find(|e| e.name == "drain-a").unwrap();
    assert!(left.why.contains("draining"), "{left:?}");

    // Still draining after a restart; then the maintenance ends.
    a.kill();
    a.restart().await;
    refused_vm(&a).await;
    a.client().resume().await.unwrap();
    dir.until_told(
        "drain-a",
        LEASE + HEARTBEAT,
        "accepting",
        |e| e.is_some_and(|e| e.accepting),
        || tail(&a.log(), 30),
    )
    .await;

    // A device's session moves its VM among the candidates it measured
    // best: the first (full) refuses, the move passes to the next.
    let state = cloudlet_client::session::SessionState {
        vm_id: vms[0].id.clone(),
        session_token: vms[0].session_token.clone().expect("a session credential"),
        cloudlet: "drain-b".into(),
        api_url: b.url(),
        base_id: String::new(),
        overlay: String::new(),
    };
    let directory = cloudlet_client::DirectoryClient::new(std::slice::from_ref(&dir.url), None);
    let mut session = cloudlet_client::session::Session::attach(directory, state)
        .await
        .unwrap();
    let mut events = session.events();
    let report = session
        .move_among(&["drain-c".to_string(), "drain-a".to_string()])
        .await
        .expect("the second candidate takes the VM");
    assert_eq!(report.vm.generation, 3, "moved back once the drain ended");
    assert_eq!(session.state().cloudlet, "drain-a");
    assert_eq!(session.state().api_url, a.url());
    use cloudlet_client::session::SessionEvent as E;
    let mut seen = Vec::new();
    while let Ok(e) = events.try_recv() {
        seen.push(e);
    }
    assert!(
        matches!(&seen[..], [E::MoveRefused { to, reason, .. }, E::MoveCompleted { to: t2, .. }]
            if to == "drain-c" && reason.contains("Over capacity") && t2 == "drain-a"),
        "{seen:?}"
    );
    let left = b.client().get_vm(&vms[0].id).await.unwrap();
    assert_eq!(left.state, cloudlet_api::VmState::Moved);
    assert!(qemu_running(&a, &vms[0].id));
}

/// The directory's fleet view (`/ui`) in headless Chromium, after VM `vm`
/// moved from A to B: both cloudlets on the map and in the table with
/// their free capacity and leases, the move as an arc from A to B and in
/// the list of moves. A screenshot is kept in
/// `$CLOUDLET_TEST_HOME/screenshots/fleet.png`.
async fn fleet_view_shows_the_move(
    dir: &Dir,
    (a, b): (&Daemon, &Daemon),
    vm: &str,
    report: &cloudlet_api::HandoffReport,
) {
    // What the source tells the directory of its moves.
    dir.until("edge-a", Duration::from_secs(3), "its move told", |e| {
        e.is_some_and(|e| {
            e.recent_moves.first().is_some_and(|m| {
                m.vm_id == vm
                    && m.moved
                    && m.to == b.url()
                    && m.downtime_ms == Some(report.downtime_ms())
            })
        })
    })
    .await;
    let fleet: cloudlet_api::directory::Fleet = reqwest::get(format!("{}/v1/fleet", dir.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<_> = fleet
        .cloudlets
        .iter()
        .map(|c| c.registration.name.as_str())
        .collect();
    assert_eq!(names, ["edge-a", "edge-b"]);
    assert!(fleet
        .cloudlets
        .iter()
        .all(|c| c.registration.peer_token.is_none()
            && c.lease_left_ms
                .is_some_and(|l| l <= LEASE.as_millis() as u64)));

    let mut page = cloudlet_testkit::browser::Browser::launch(1400, 1100)
        .expect("chromium (make deps installs it)");
    page.open(&format!("{}/ui", dir.url)).unwrap();
    let limit = Duration::from_secs(10);
    for site in ["edge-a", "edge-b"] {
        page.wait_for(
            &format!("document.querySelector('[data-site=\"{site}\"] circle') !== null"),
            limit,
        )
        .unwrap();
    }
    let cap = fleet.cloudlets[1].registration.capacity.vms;
    let free_b = page
        .wait_for(
            "document.querySelector('#fleet tr[data-cloudlet=\"edge-b\"] .free-vms')?.textContent",
            limit,
        )
        .unwrap();
    assert_eq!(
        free_b,
        format!("{} / {cap}", cap - 1),
        "edge-b holds the VM"
    );
    let arc = page
        .wait_for(
            &format!("(() => {{ const p = document.querySelector('path.move[data-move=\"{vm}\"]'); return p && [p.dataset.from, p.dataset.to]; }})()"),
            limit,
        )
        .unwrap();
    assert_eq!(
        arc,
        serde_json::json!(["edge-a", "edge-b"]),
        "the move on the map"
    );
    let row = page
        .eval(&format!("(() => {{ const r = document.querySelector('#moves tr[data-vm=\"{vm}\"]'); return r && [r.dataset.from, r.dataset.to]; }})()"))
        .unwrap();
    assert_eq!(
        row,
        serde_json::json!(["edge-a", "edge-b"]),
        "the move in the list"
    );
    let shots = cloudlet_testkit::test_home().join("screenshots");
    page.screenshot(&shots.join("fleet.png")).unwrap();
    let _ = a;
}
