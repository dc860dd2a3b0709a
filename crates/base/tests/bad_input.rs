//! Bad input is refused with a clear error and leaves no process or file.

use std::path::PathBuf;

use cloudlet_base::{export_base, import_base, ArchiveError, BaseStore};
use cloudlet_qemu::image::create_top;
use cloudlet_qemu::{
    restore_snapshot, PortForward, RestoreTarget, SnapshotError, StartVmError, Vm,
};
use cloudlet_testkit::{free_port, process_running_with, tiny_base};

fn leftovers(dir: &std::path::Path) -> Vec<PathBuf> {
    walk(dir)
}
fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            out.push(e.path());
            out.extend(walk(&e.path()));
        }
    }
    out
}

#[tokio::test]
async fn missing_kernel_is_refused_before_qemu_starts() {
    let (_store, base) = tiny_base().await;
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.qcow2");
    create_top(&base.disk_path(), &disk).unwrap();
    let run = dir.path().join("run");
    let mut spec = base.spec("nokernel", &dir.path().join("ram"), &disk, &run, vec![]);
    spec.machine.kernel = dir.path().join("no-such-vmlinuz");
    let err = Vm::boot(spec).await.err().expect("must fail");
    assert!(matches!(err, StartVmError::MissingKernel(_)), "{err}");
    assert!(err.to_string().contains("no-such-vmlinuz"), "{err}");
    assert!(!run.exists());
    assert!(!dir.path().join("ram").exists());
}

#[tokio::test]
async fn qemu_exiting_at_start_is_reported_with_its_words() {
    let (_store, base) = tiny_base().await;
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.qcow2");
    create_top(&base.disk_path(), &disk).unwrap();
    let run = dir.path().join("run");
    let mut spec = base.spec("badmachine", &dir.path().join("ram"), &disk, &run, vec![]);
    spec.machine.machine = "no-such-machine-type".into();
    let err = Vm::boot(spec).await.err().expect("must fail");
    match &err {
        StartVmError::Exited { log, .. } => {
            assert!(log.contains("unsupported machine type"), "{log}")
        }
        other => panic!("unexpected {other}"),
    }
    assert!(!run.exists(), "run directory removed");
    assert!(!dir.path().join("ram").exists(), "RAM file removed");
    assert!(!process_running_with("no-such-machine-type"));
}

#[tokio::test]
async fn ram_file_of_the_wrong_size_is_refused() {
    let (_store, base) = tiny_base().await;
    let dir = tempfile::tempdir().unwrap();
    // A snapshot made of the base's own files, with a truncated RAM file.
    let snap = dir.path().join("snap");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::copy(base.state_path(), snap.join("state")).unwrap();
    create_top(&base.disk_path(), &snap.join("disk")).unwrap();
    let ram = std::fs::File::create(snap.join("ram")).unwrap();
    ram.set_len(base.manifest.memory_bytes() / 2).unwrap();
    let state = cloudlet_qemu::SnapshotState {
        format: cloudlet_qemu::snapshot::SNAPSHOT_FORMAT,
        machine: base.machine(),
        accel: base.manifest.accel,
        disk_format: cloudlet_qemu::spec::DiskFormat::Qcow2,
    };
    std::fs::write(
        snap.join("snapshot.json"),
        serde_json::to_vec(&state).unwrap(),
    )
    .unwrap();
    let out = dir.path().join("vm");
    let target = RestoreTarget {
        name: "wrongram".into(),
        ram_path: out.join("ram"),
        disk_path: out.join("disk.qcow2"),
        run_dir: out.join("run"),
        ports: vec![PortForward {
            guest: 8080,
            host: free_port(),
            bind: None,
        }],
    };
    let err = restore_snapshot(&snap, target)
        .await
        .err()
        .expect("must fail");
    let msg = err.to_string();
    assert!(matches!(err, SnapshotError::Restore(_)), "{msg}");
    assert!(msg.contains("RAM file") && msg.contains("bytes"), "{msg}");
    assert!(leftovers(&out).is_empty(), "{:?}", leftovers(&out));
}

#[tokio::test]
async fn corrupt_base_export_is_refused_and_leaves_nothing() {
    let (store, _base) = tiny_base().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tiny.base");
    export_base(&store, "tiny", &file).unwrap();

    // A good export imports into another store and verifies.
    let other = BaseStore::new(dir.path().join("other"));
    let m = import_base(&other, &file, None).expect("import");
    other.get(&m.name).unwrap().verify().expect("verify");

    // Flip one byte in the middle: refused, no base, no temp directory.
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    let bad = dir.path().join("bad.base");
    std::fs::write(&bad, &bytes).unwrap();
    let third = BaseStore::new(dir.path().join("third"));
    let err = import_base(&third, &bad, None).expect_err("must fail");
    assert!(matches!(err, ArchiveError::Corrupt { .. }), "{err}");
    assert!(third.list().unwrap().is_empty());
    assert!(
        leftovers(&third.bases_dir()).is_empty(),
        "{:?}",
        leftovers(&third.bases_dir())
    );

    // A truncated export too.
    let short = dir.path().join("short.base");
    std::fs::write(&short, &bytes[..mid]).unwrap();
    assert!(import_base(&third, &short, None).is_err());
    assert!(leftovers(&third.bases_dir()).is_empty());
}
