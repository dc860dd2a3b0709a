//! Capturing real QEMU 7.2 migration streams for tests and measurements.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use cloudlet_base::BaseVm;
use cloudlet_handoff::BaseMemory;

/// Restore `base` into a fresh VM, let it run `run_for`, then migrate it into
/// a file (the whole RAM unless `ignore_shared`). Returns the stream's path.
pub async fn capture_stream(
    base: &BaseVm,
    dir: &Path,
    run_for: Duration,
    ignore_shared: bool,
) -> PathBuf {
    let vm = base
        .restore(
            "handoff-capture",
            &dir.join("ram"),
            &dir.join("disk.qcow2"),
            &dir.join("run"),
            vec![],
        )
        .await
        .expect("restore from base");
    tokio::time::sleep(run_for).await;
    let q = vm.qmp();
    // Restoring set x-ignore-shared for the incoming side; the handoff case
    // sends every RAM page.
    q.set_migration_capabilities(&[("x-ignore-shared", ignore_shared)])
        .await
        .expect("capabilities");
    q.set_migration_parameters(&cloudlet_qemu::MigrationParameters {
        max_bandwidth: Some(8u64 << 30),
        ..Default::default()
    })
    .await
    .expect("bandwidth");
    let path = dir.join("stream");
    q.migrate(&format!("exec:cat > {}", path.display()))
        .await
        .expect("migrate");
    q.wait_migration(Duration::from_secs(120))
        .await
        .expect("migration");
    vm.kill().await;
    let _ = std::fs::remove_file(dir.join("ram"));
    path
}

/// The base's memory image (mmapped), named by the base's content id.
pub fn base_memory(base: &BaseVm) -> BaseMemory {
    let f = std::fs::File::open(base.memory_path()).expect("base memory");
    // SAFETY: the base store's files are never modified in place.
    let map = unsafe { memmap2::Mmap::map(&f) }.expect("mmap base memory");
    BaseMemory::new(map, "mem", id_bytes(&base.manifest.id))
}

fn id_bytes(hex: &str) -> [u8; 32] {
    let mut id = [0u8; 32];
    for (i, b) in id.iter_mut().enumerate() {
        *b = hex
            .get(2 * i..2 * i + 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .unwrap_or(0);
    }
    id
}
