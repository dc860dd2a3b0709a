//! The typed QMP API on a real QEMU 7.2 guest (the `tiny` base, restored):
//! migration status and parameters, the dirty rate, a dirty bitmap on the
//! disk from add to export to remove, named block nodes; a migration that
//! pauses before its switchover, continues and completes.

use std::time::Duration;

use cloudlet_qemu::{
    DirtyExportConfig, MigrationCapability, MigrationCapabilityState, MigrationParameters,
    MigrationStatus, MultifdCompression,
};
use cloudlet_testkit::tiny_base;

#[tokio::test(flavor = "multi_thread")]
async fn typed_migration_and_dirty_tracking_on_a_running_guest() {
    let (_store, base) = tiny_base().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let vm = base
        .restore(
            "qmp-typed",
            &d.join("ram"),
            &d.join("disk.qcow2"),
            &d.join("run"),
            vec![],
        )
        .await
        .expect("restore from base");
    let q = vm.qmp();

    // No outgoing migration: the restore's incoming one, if shown, is over.
    let info = q.query_migrate().await.expect("query-migrate");
    assert!(
        matches!(
            info.status,
            MigrationStatus::None | MigrationStatus::Completed
        ),
        "{info:?}"
    );
    assert!(!info.status.is_running());

    // Parameters: what we set is what QEMU reports.
    let set = MigrationParameters {
        max_bandwidth: Some(123 << 20),
        downtime_limit: Some(42),
        multifd_channels: Some(3),
        multifd_compression: Some(MultifdCompression::Zstd),
    };
    q.set_migration_parameters(&set).await.expect("set params");
    let got = q.query_migration_parameters().await.expect("get params");
    assert_eq!(got, set);
    // Only the members that are set change.
    q.set_migration_parameters(&MigrationParameters {
        downtime_limit: Some(300),
        ..Default::default()
    })
    .await
    .expect("set downtime");
    let got = q.query_migration_parameters().await.expect("get params");
    assert_eq!(got.downtime_limit, Some(300));
    assert_eq!(got.max_bandwidth, Some(123 << 20));

    // Capabilities, typed.
    q.set_migration_capability_states(&[MigrationCapabilityState {
        capability: MigrationCapability::Events,
        state: true,
    }])
    .await
    .expect("set capabilities");
    let caps = q
        .query_migration_capabilities()
        .await
        .expect("capabilities");
    assert!(caps
        .iter()
        .any(|c| c.capability == MigrationCapability::Events && c.state));
    assert!(caps
        .iter()
        .all(|c| c.capability != MigrationCapability::Unknown));

    // The dirty rate: a one-second sample, then measured.
    q.calc_dirty_rate(1, Some(512))
        .await
        .expect("calc-dirty-rate");
    let mut rate = None;
    for _ in 0..100 {
        rate = q.measured_dirty_rate().await.expect("query-dirty-rate");
        if rate.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rate = rate.expect("measured within 10 s");
    assert!(rate >= 0.0);

    // A dirty bitmap on disk0: empty, then the guest writes 1 MiB.
    let nodes = q.query_named_block_nodes().await.expect("nodes");
    assert!(nodes
        .iter()
        .any(|n| n.node_name.as_deref() == Some("disk0")));
    let disk0 = q.find_block_node("disk0").await.unwrap().expect("disk0");
    assert!(disk0.image.expect("image").virtual_size > 0);
    assert!(q.find_block_node("no-such-node").await.unwrap().is_none());

    q.add_dirty_bitmap("disk0", "t").await.expect("add bitmap");
    assert_eq!(q.dirty_bitmap_count("disk0", "t").await.unwrap(), Some(0));
    let mut agent = vm.agent(Duration::from_secs(60)).await.expect("agent");
    let out = agent
        .exec(
            &[
                "sh",
                "-c",
                "dd if=/dev/urandom of=/root/dirty bs=64k count=16 2>/dev/null && sync",
            ],
            Duration::from_secs(60),
        )
        .await
        .expect("write in the guest");
    assert_eq!(out.code, Some(0), "{out:?}");
    let count = q
        .dirty_bitmap_count("disk0", "t")
        .await
        .unwrap()
        .expect("bitmap");
    assert!(count >= 1 << 20, "dirty bytes {count}");

    // The export, with the VM stopped as in a handoff.
    q.stop().await.expect("stop");
    let extents = q
        .export_dirty_extents(&DirtyExportConfig {
            node: "disk0".into(),
            bitmap: "t".into(),
            scratch: d.join("dirty.qcow2"),
            timeout: Duration::from_secs(60),
            owner: None,
        })
        .await
        .expect("export dirty extents");
    let bytes: u64 = extents.iter().map(|(a, b)| b - a).sum();
    assert!(
        bytes >= 1 << 20 && bytes <= count,
        "{bytes} of {count}: {extents:?}"
    );
    assert!(!d.join("dirty.qcow2").exists(), "scratch image removed");
    assert!(q
        .find_block_node(cloudlet_qemu::dirty::EXPORT_NODE)
        .await
        .unwrap()
        .is_none());
    // The copy cleared the bitmap.
    assert_eq!(q.dirty_bitmap_count("disk0", "t").await.unwrap(), Some(0));
    q.cont().await.expect("cont");
    assert_eq!(q.run_state().await.unwrap(), "running");

    q.remove_dirty_bitmap("disk0", "t").await.expect("remove");
    assert_eq!(q.dirty_bitmap_count("disk0", "t").await.unwrap(), None);
    assert!(q.remove_dirty_bitmap("disk0", "t").await.is_err());
    vm.kill().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_typed_migration_pauses_before_the_switchover_and_completes() {
    let (_store, base) = tiny_base().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let vm = base
        .restore(
            "qmp-typed-migrate",
            &d.join("ram"),
            &d.join("disk.qcow2"),
            &d.join("run"),
            vec![],
        )
        .await
        .expect("restore from base");
    let q = vm.qmp();
    let cap = |capability, state| MigrationCapabilityState { capability, state };
    // The RAM is the shared file: only the device state goes into the stream.
    q.set_migration_capability_states(&[
        cap(MigrationCapability::XIgnoreShared, true),
        cap(MigrationCapability::PauseBeforeSwitchover, true),
        cap(MigrationCapability::Events, true),
    ])
    .await
    .expect("capabilities");
    let out = d.join("state");
    q.migrate(&format!("exec:cat > {}", out.display()))
        .await
        .expect("migrate");
    let mut seen = Vec::new();
    let paused = loop {
        let info = q.query_migrate().await.expect("query-migrate");
        if seen.last() != Some(&info.status) {
            seen.push(info.status);
        }
        assert!(!info.status.is_finished(), "{seen:?}: {info:?}");
        if info.status == MigrationStatus::PreSwitchover {
            break info;
        }
        assert!(
            info.status.is_running() || info.status == MigrationStatus::None,
            "{seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(paused.ram.is_some(), "{paused:?}");
    assert_ne!(q.run_state().await.unwrap(), "running");
    q.continue_migration(MigrationStatus::PreSwitchover)
        .await
        .expect("migrate-continue");
    let done = q
        .wait_migration_info(Duration::from_secs(60), Duration::from_millis(20))
        .await
        .expect("migration completes");
    assert_eq!(done.status, MigrationStatus::Completed);
    assert!(done.downtime.is_some(), "{done:?}");
    assert!(std::fs::metadata(&out).unwrap().len() > 0);
    // The source stays paused after a completed migration; it can run on.
    q.cont().await.expect("cont");
    assert_eq!(q.run_state().await.unwrap(), "running");
    vm.kill().await;
}
