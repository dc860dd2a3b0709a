//! Scrubbing on real QEMU guests (the `tiny` base): the agent's
//! `zero_free_memory` really turns stale free memory into zeros, and a
//! scrubbed package does not carry the blocks of a deleted file.

use std::path::Path;
use std::time::Duration;

use cloudlet_agent_proto::{Op, Reply};
use cloudlet_package::{package_app, PackageConfig, PackageReport};
use cloudlet_qemu::image::create_top;
use cloudlet_qemu::Vm;
use cloudlet_testkit::{guest_bin, tiny_base};

const MIB: u64 = 1 << 20;

/// Pages of the RAM file that are not all zeros.
fn nonzero_pages(ram: &Path) -> u64 {
    let data = std::fs::read(ram).expect("read the RAM file");
    data.chunks(4096)
        .filter(|p| p.iter().any(|&b| b != 0))
        .count() as u64
}

async fn sh(agent: &mut cloudlet_qemu::AgentClient, cmd: &str) {
    let out = agent
        .exec(&["/bin/sh", "-c", cmd], Duration::from_secs(120))
        .await
        .expect("exec");
    assert_eq!(out.code, Some(0), "{cmd}: {out:?}");
}

/// A cold boot of `tiny` *without* `init_on_free` (which the bases turn on,
/// and which would zero freed pages by itself): random data written to a
/// tmpfs file and deleted stays in free memory until `zero_free_memory`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_free_memory_clears_stale_free_pages() {
    let (_store, base) = tiny_base().await;
    let tmp = tempfile::tempdir().unwrap();
    let (ram, top) = (tmp.path().join("memory.ram"), tmp.path().join("disk.qcow2"));
    create_top(&base.disk_path(), &top).unwrap();
    let mut spec = base.spec("zero-free", &ram, &top, &tmp.path().join("run"), vec![]);
    spec.machine.cmdline = spec
        .machine
        .cmdline
        .replace("init_on_free=1", "init_on_free=0");
    assert!(!spec.machine.cmdline.contains("init_on_free=1"));
    let vm = Vm::boot(spec).await.expect("boot tiny");
    let result = async {
        let mut agent = vm.agent(Duration::from_secs(300)).await.expect("agent");
        match agent.ping().await.expect("ping") {
            Reply::Pong { ops, .. } => assert!(
                ops.iter().any(|o| o == "zero_free_memory"),
                "the tiny base's agent is too old: {ops:?}"
            ),
            other => panic!("unexpected {other:?}"),
        }
        let before = nonzero_pages(&ram);
        sh(
            &mut agent,
            "head -c 48m /dev/urandom > /tmp/junk && sync && rm /tmp/junk",
        )
        .await;
        let garbage = nonzero_pages(&ram);
        let reply = agent
            .call_with_timeout(
                Op::ZeroFreeMemory {
                    reserve_bytes: 32 * MIB,
                    chunk_bytes: 4 * MIB,
                    max_bytes: 0,
                },
                Duration::from_secs(300),
            )
            .await
            .expect("zero_free_memory");
        let after = nonzero_pages(&ram);
        // The app-side view: the guest still works afterwards.
        sh(
            &mut agent,
            "echo still alive > /tmp/alive && cat /tmp/alive",
        )
        .await;
        (before, garbage, after, reply)
    }
    .await;
    vm.kill().await;
    let (before, garbage, after, reply) = result;
    let mib = |pages: u64| pages * 4096 / MIB;
    eprintln!(
        "non-zero RAM: {} MiB at boot, {} MiB with the deleted file, {} MiB after zeroing; {reply:?}",
        mib(before),
        mib(garbage),
        mib(after)
    );
    // The premise: the deleted file left stale pages (some land on pages
    // that boot had already dirtied and freed, hence not all 48 MiB).
    assert!(
        garbage >= before + 16 * MIB / 4096,
        "no stale pages to clear"
    );
    // What zeroing did: the file's pages, and boot's freed ones, are zero.
    assert!(
        after + 40 * MIB / 4096 <= garbage,
        "stale pages left: {} MiB non-zero after zeroing, {} MiB before",
        mib(after),
        mib(garbage)
    );
    match reply {
        Reply::FreeMemoryZeroed {
            zeroed_bytes,
            mem_free_bytes,
            stopped,
            ..
        } => {
            assert!(zeroed_bytes >= 48 * MIB, "{zeroed_bytes}");
            assert!(zeroed_bytes + 32 * MIB <= mem_free_bytes, "reserve kept");
            assert_eq!(stopped, "reserve");
        }
        other => panic!("unexpected {other:?}"),
    }
}

/// Disk plus memory bytes of the overlay that are neither zero flags nor
/// references: what the chunk payloads cost, by image.
fn payload_bytes(r: &PackageReport, image: &str) -> u64 {
    r.contributors
        .iter()
        .filter(|c| c.image == image && (c.kind == "literal" || c.kind == "delta (xor)"))
        .map(|c| c.bytes)
        .sum()
}

async fn package(app_dir: &Path, tmp: &Path, name: &str, scrub: bool) -> PackageReport {
    let (store, _base) = tiny_base().await;
    let work = tmp.join(format!("work-{name}"));
    std::fs::create_dir_all(&work).unwrap();
    let out = tmp.join(format!("{name}.overlay"));
    let mut cfg = PackageConfig::new("tiny", name, "./kvstore --port 8080", 8080, &out);
    cfg.install_dir = Some(app_dir.to_path_buf());
    // A deleted file whose blocks stay on the disk: online discard off, the
    // data written out (sync) before the delete.
    cfg.install_commands = vec![concat!(
        "mount -o remount,nodiscard / && ",
        "head -c 12m /dev/urandom > junk && sync && rm junk && sync"
    )
    .into()];
    cfg.health_path = Some("/health".into());
    cfg.work_dir = work;
    cfg.scrub = scrub;
    package_app(&store, &cfg, |_| {})
        .await
        .unwrap_or_else(|e| panic!("package {name}: {e:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrubbed_overlay_leaves_out_a_deleted_file() {
    let tmp = tempfile::tempdir().unwrap();
    let app_dir = tmp.path().join("app");
    std::fs::create_dir_all(&app_dir).unwrap();
    std::fs::copy(guest_bin("kvstore"), app_dir.join("kvstore")).unwrap();

    let plain = package(&app_dir, tmp.path(), "plain", false).await;
    let scrubbed = package(&app_dir, tmp.path(), "scrubbed", true).await;
    eprintln!(
        "without scrub: {} bytes, disk payload {} bytes; with: {} bytes, disk payload {} bytes, {:?}",
        plain.stats.overlay_bytes,
        payload_bytes(&plain, "disk"),
        scrubbed.stats.overlay_bytes,
        payload_bytes(&scrubbed, "disk"),
        scrubbed.scrub
    );
    assert!(plain.scrub.is_none());
    // The premise: without scrubbing, the deleted file is in the overlay.
    assert!(
        payload_bytes(&plain, "disk") >= 12 * MIB,
        "{:?}",
        plain.contributors
    );
    let sc = scrubbed.scrub.as_ref().expect("scrub report");
    assert!(sc.notes.is_empty(), "{:?}", sc.notes);
    assert!(sc.caches_dropped);
    assert!(sc.trimmed_bytes.is_some_and(|t| t >= 12 * MIB), "{sc:?}");
    assert!(sc.zeroed_bytes.is_some_and(|z| z > 0), "{sc:?}");
    assert!(
        payload_bytes(&scrubbed, "disk") + 8 * MIB <= payload_bytes(&plain, "disk"),
        "{:?}",
        scrubbed.contributors
    );
    assert!(
        scrubbed.stats.overlay_bytes + 8 * MIB <= plain.stats.overlay_bytes,
        "scrubbed {} vs {}",
        scrubbed.stats.overlay_bytes,
        plain.stats.overlay_bytes
    );
}
