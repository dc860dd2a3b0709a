//! The runtime on real QEMU guests: cold boot of the `tiny` base, an app
//! whose state survives save -> kill -> restore, fresh identity and entropy
//! for every restore of one snapshot.

use std::path::Path;
use std::time::Duration;

use cloudlet_qemu::image::create_top;
use cloudlet_qemu::{restore_snapshot, save_snapshot, PortForward, RestoreTarget, Vm};
use cloudlet_testkit::{free_port, guest_bin, http, tiny_base};

const KV_PORT: u16 = 8080;

/// Copy kvstore into the guest, start it and wait until it answers.
async fn start_kvstore(vm: &Vm) {
    let mut agent = vm.agent(Duration::from_secs(60)).await.expect("agent");
    agent
        .put_file(&guest_bin("kvstore"), "/opt/apps/kvstore", 0o755)
        .await
        .expect("put kvstore");
    agent
        .spawn(
            &["/opt/apps/kvstore", "--port", "8080"],
            Some("/tmp/kvstore.log"),
        )
        .await
        .expect("spawn kvstore");
    agent
        .wait_port(KV_PORT, Some("/health"), Duration::from_secs(30))
        .await
        .expect("kvstore answers");
}

fn target(dir: &Path, name: &str, host_port: u16) -> RestoreTarget {
    RestoreTarget {
        name: name.into(),
        ram_path: dir.join(name).join("ram"),
        disk_path: dir.join(name).join("disk.qcow2"),
        run_dir: dir.join(name).join("run"),
        ports: vec![PortForward {
            guest: KV_PORT,
            host: host_port,
            bind: None,
        }],
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cold_boot_then_state_survives_save_kill_restore() {
    let (_store, base) = tiny_base().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // Cold boot: a fresh disk top over the base disk, a fresh RAM file.
    let disk = dir.path().join("boot.qcow2");
    create_top(&base.disk_path(), &disk).unwrap();
    let spec = base.spec(
        "cold",
        &dir.path().join("boot.ram"),
        &disk,
        &dir.path().join("boot-run"),
        vec![PortForward {
            guest: KV_PORT,
            host: port,
            bind: None,
        }],
    );
    let vm = Vm::boot(spec).await.expect("cold boot");
    start_kvstore(&vm).await;
    for i in 0..20 {
        let r = http(
            port,
            "PUT",
            &format!("/kv/key{i}"),
            Some(format!("value-{i}").into_bytes()),
        )
        .await
        .unwrap();
        assert!(
            r.status == 201 || r.status == 204,
            "PUT status {}",
            r.status
        );
    }
    let before = http(port, "GET", "/stats", None).await.unwrap().text();

    let snap = dir.path().join("snap");
    save_snapshot(&vm, &snap).await.expect("save");
    vm.kill().await;
    assert!(vm.exited().is_some(), "QEMU was killed");

    let port2 = free_port();
    let restored = restore_snapshot(&snap, target(dir.path(), "restored", port2))
        .await
        .expect("restore");
    assert_ne!(restored.pid(), vm.pid(), "a new QEMU process");
    for i in 0..20 {
        let r = http(port2, "GET", &format!("/kv/key{i}"), None)
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), format!("value-{i}"));
    }
    let after = http(port2, "GET", "/stats", None).await.unwrap().text();
    let pid = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap()["pid"].clone();
    assert_eq!(
        pid(&before),
        pid(&after),
        "the same app process, not a restart"
    );
    // The restored VM is fully alive: it takes new writes.
    let r = http(port2, "PUT", "/kv/new", Some(b"x".to_vec()))
        .await
        .unwrap();
    assert_eq!(r.status, 201);
    restored.kill().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_restores_of_one_snapshot_differ_in_entropy_and_identity() {
    let (_store, base) = tiny_base().await;
    let dir = tempfile::tempdir().unwrap();
    let t = target(dir.path(), "origin", free_port());
    let vm = base
        .restore(
            "origin",
            &t.ram_path,
            &t.disk_path,
            &t.run_dir,
            t.ports.clone(),
        )
        .await
        .expect("restore from base");
    start_kvstore(&vm).await;
    let snap = dir.path().join("snap");
    save_snapshot(&vm, &snap).await.expect("save");
    vm.kill().await;

    let mut seen = Vec::new();
    for name in ["vm-a", "vm-b"] {
        let port = free_port();
        let vm = restore_snapshot(&snap, target(dir.path(), name, port))
            .await
            .expect("restore");
        let mut agent = vm.agent(Duration::from_secs(30)).await.expect("agent");
        let reply = agent.set_identity(name, name).await.expect("identity");
        let reply = format!("{reply:?}");
        assert!(reply.contains("reseeded: true"), "{reply}");
        let random = http(port, "GET", "/random", None).await.unwrap().text();
        let id = http(port, "GET", "/id", None).await.unwrap().text();
        assert!(id.contains(name), "{id}");
        seen.push((random, id));
        vm.kill().await;
    }
    assert_ne!(seen[0].0, seen[1].0, "random numbers differ");
    assert_ne!(seen[0].1, seen[1].1, "ids differ");
}

/// A paused VM's clocks stop (so does a VM restored from an old snapshot):
/// the agent brings the guest's wall clock back to the host's.
#[tokio::test(flavor = "multi_thread")]
async fn the_agent_sets_a_lagging_guest_clock() {
    let (_store, base) = tiny_base().await;
    let dir = tempfile::tempdir().unwrap();
    let t = target(dir.path(), "clock", free_port());
    let vm = base
        .restore("clock", &t.ram_path, &t.disk_path, &t.run_dir, vec![])
        .await
        .expect("restore from base");
    let mut agent = vm.agent(Duration::from_secs(30)).await.expect("agent");
    let behind = |out: String| {
        let guest: i64 = out.trim().parse().expect("date +%s");
        let host = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        host - guest
    };
    // Set it once so the test does not depend on the base's age.
    agent
        .set_clock()
        .await
        .expect("set_clock")
        .expect("agent knows set_clock");
    vm.pause().await.unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    vm.resume().await.unwrap();
    let out = agent
        .exec(&["date", "+%s"], Duration::from_secs(10))
        .await
        .unwrap();
    let lag = behind(out.stdout);
    assert!(
        lag >= 4,
        "the guest clock kept running while paused ({lag} s behind)"
    );
    let ms = agent.set_clock().await.unwrap().unwrap();
    assert!(ms >= 4000, "reported {ms} ms behind");
    let out = agent
        .exec(&["date", "+%s"], Duration::from_secs(10))
        .await
        .unwrap();
    assert!(behind(out.stdout).abs() <= 2, "clock not set");
    vm.kill().await;
}
