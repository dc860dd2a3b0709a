//! Packaging on the real `tiny` base: the overlay rebuilds the launch state,
//! which resumes with the app's state; a failing app leaves nothing behind.

use std::time::Duration;

use cloudlet_api::AppInfo;
use cloudlet_overlay::{apply_overlay, inspect, ApplyConfig};
use cloudlet_package::{package_app, PackageAppError, PackageConfig, PackageEvent};
use cloudlet_qemu::{DiskFormat, PortForward, Vm};
use cloudlet_testkit::{free_port, guest_bin, http, process_running_with, tiny_base};

fn dir_is_empty(p: &std::path::Path) -> bool {
    std::fs::read_dir(p).unwrap().next().is_none()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packaged_kvstore_resumes_with_its_state() {
    let (store, base) = tiny_base().await;
    let tmp = tempfile::tempdir().unwrap();
    let app_dir = tmp.path().join("app");
    std::fs::create_dir_all(app_dir.join("data")).unwrap();
    std::fs::copy(guest_bin("kvstore"), app_dir.join("kvstore")).unwrap();
    std::fs::write(app_dir.join("data/readme.txt"), "hello from the host\n").unwrap();
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let out = tmp.path().join("kvstore.overlay");

    let mut cfg = PackageConfig::new("tiny", "kvstore", "./kvstore --port 8080", 8080, &out);
    cfg.install_dir = Some(app_dir);
    cfg.install_commands = vec!["test -x kvstore && cat data/readme.txt".into()];
    cfg.health_path = Some("/health".into());
    cfg.work_dir = work.clone();
    // State written before the save: it must be there after the restore.
    cfg.warmup_commands = vec![concat!(
        "printf 'PUT /kv/greeting HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: 5\\r\\n",
        "Connection: close\\r\\n\\r\\nhello' | nc 127.0.0.1 8080 | head -1 | grep -q ' 20'"
    )
    .into()];
    let events = std::sync::Mutex::new(Vec::new());
    let report = package_app(&store, &cfg, |e| events.lock().unwrap().push(e))
        .await
        .expect("package kvstore");
    let events = events.into_inner().unwrap();
    assert!(
        matches!(events[0], PackageEvent::Restoring { .. }),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| matches!(
            e,
            PackageEvent::Copying {
                files_done: 2,
                files_total: 2,
                ..
            }
        )),
        "{events:?}"
    );
    assert!(matches!(events.last(), Some(PackageEvent::Done { .. })));
    assert!(dir_is_empty(&work), "work files left behind");
    assert_eq!(report.base_id, base.manifest.id);
    assert!(report.stats.overlay_bytes > 0);
    assert!(!report.contributors.is_empty());
    assert_eq!(
        report.stats.overlay_bytes,
        std::fs::metadata(&out).unwrap().len()
    );

    // The metadata is the app's.
    let info = inspect(&out).unwrap();
    assert_eq!(info.base_id, base.manifest.id);
    let app: AppInfo = serde_json::from_slice(&info.metadata).unwrap();
    assert_eq!(app.name, "kvstore");
    assert_eq!(app.ports, vec![8080]);
    assert_eq!(app.health_path.as_deref(), Some("/health"));

    // Apply, restore from the raw disk, and find the state.
    let vmdir = tmp.path().join("vm");
    std::fs::create_dir_all(&vmdir).unwrap();
    let (disk, mem) = (vmdir.join("disk.raw"), vmdir.join("memory.ram"));
    let applied = apply_overlay(
        &out,
        &ApplyConfig::new(base.disk_path(), base.memory_path(), &disk, &mem),
    )
    .expect("apply");
    let state = vmdir.join("state");
    std::fs::write(&state, &applied.device_state).unwrap();
    let port = free_port();
    let mut spec = base.spec(
        "kvstore-restored",
        &mem,
        &disk,
        &vmdir.join("run"),
        vec![PortForward {
            guest: 8080,
            host: port,
            bind: None,
        }],
    );
    spec.disk_format = DiskFormat::Raw;
    let vm = Vm::restore(spec, &state).await.expect("restore");
    let mut answer = None;
    for _ in 0..100 {
        if let Ok(r) = http(port, "GET", "/kv/greeting", None).await {
            answer = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    vm.kill().await;
    let r = answer.expect("kvstore answers after the restore");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_that_never_answers_fails_and_leaves_nothing() {
    let (store, _base) = tiny_base().await;
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let out = tmp.path().join("never.overlay");
    let mut cfg = PackageConfig::new("tiny", "never", "echo starting; sleep 1000", 9999, &out);
    cfg.work_dir = work.clone();
    cfg.ready_timeout = Duration::from_secs(3);
    let err = package_app(&store, &cfg, |_| {}).await.unwrap_err();
    assert!(
        matches!(err, PackageAppError::NotReady { port: 9999, .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.starts_with("App did not answer on guest port 9999"),
        "{msg}"
    );
    assert!(msg.contains("starting"), "the app's log is quoted: {msg}");
    assert!(dir_is_empty(&work), "work files left behind");
    assert!(!out.exists());
    assert!(
        !process_running_with(&work.display().to_string()),
        "a QEMU process is still running"
    );
}
