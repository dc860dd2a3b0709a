//! End to end through the HTTP API, on real QEMU: a `cloudletd` process, a
//! registry, kvstore packaged on the tiny base.

mod common;

use cloudlet_api::{CreateVmRequest, VmState};
use cloudlet_testkit::http;
use common::{
    kvstore_overlay, kvstore_overlay_with, qemu_running, range_server, start_registry, Daemon,
    TOKEN,
};

/// The IPv4 addresses a TCP socket listens on at `port` (`/proc/net/tcp`).
fn listeners(port: u16) -> Vec<String> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (addr, p) = f.get(1)?.split_once(':')?;
            // State 0A: LISTEN. The address is little-endian hex.
            (f.get(3) == Some(&"0A") && u16::from_str_radix(p, 16).ok()? == port).then(|| {
                let a = u32::from_str_radix(addr, 16).unwrap_or(0);
                std::net::Ipv4Addr::from(a.swap_bytes()).to_string()
            })
        })
        .collect()
}

/// The spare base disk of daemon `d`, once it is ready.
async fn wait_for_spare(d: &Daemon) -> std::path::PathBuf {
    let dir = d.home.join("spares");
    let start = std::time::Instant::now();
    loop {
        let ready = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .find(|e| {
                let n = e.file_name().to_string_lossy().to_string();
                n.ends_with(".disk") && !n.starts_with('.')
            });
        if let Some(e) = ready {
            return e.path();
        }
        assert!(
            start.elapsed().as_secs() < 60,
            "no spare disk in {}",
            dir.display()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

fn host_port(vm: &cloudlet_api::VmInfo) -> u16 {
    vm.ports[0].host
}

#[tokio::test(flavor = "multi_thread")]
async fn synthesize_use_and_delete_kvstore_from_a_registry() {
    let overlay = kvstore_overlay().await;
    let reg_dir = tempfile::tempdir().unwrap();
    let registry = start_registry(reg_dir.path()).await;
    cloudlet_registry::push_overlay(&registry, TOKEN, "kvstore", &overlay)
        .await
        .unwrap();
    let d = Daemon::start("").await;
    let c = d.client();
    // The daemon prepares a spare copy of the base disk; synthesis takes it
    // (a rename: the VM's disk is that very file).
    let spare = wait_for_spare(&d).await;
    let spare_inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&spare).unwrap());
    let vm = c
        .create_vm(&CreateVmRequest {
            overlay: format!("{registry}/v1/overlays/kvstore"),
            name: Some("kv1".into()),
            flavor: None,
        })
        .await
        .expect("synthesis");
    // Its port listens where its endpoint says (the default public host,
    // 127.0.0.1), not on every address of the host.
    assert_eq!(
        vm.ports[0].endpoint,
        format!("127.0.0.1:{}", vm.ports[0].host)
    );
    assert_eq!(
        listeners(vm.ports[0].host),
        ["127.0.0.1"],
        "the VM's port forward listens on the endpoint's address only"
    );
    let disk = d.home.join("vms").join(&vm.id).join("disk.raw");
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&disk).unwrap()),
        spare_inode,
        "the VM's disk is the spare"
    );
    // And a new spare is made for the next one.
    let next = wait_for_spare(&d).await;
    assert_ne!(
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&next).unwrap()),
        spare_inode
    );
    assert_eq!(vm.state, VmState::Running);
    assert_eq!(vm.ports[0].guest, 8080);
    assert!(
        vm.timings.iter().any(|t| t.stage == "restore"),
        "{:?}",
        vm.timings
    );
    // VM files on a tmpfs: the early start path (device state first, the
    // memory by postcopy), not the full apply.
    assert!(
        vm.timings.iter().any(|t| t.stage == "device_state"),
        "early start: {:?}",
        vm.timings
    );
    let port = host_port(&vm);
    let r = http(port, "PUT", "/kv/hello", Some(b"world".to_vec()))
        .await
        .unwrap();
    assert_eq!(r.status, 201);
    assert_eq!(
        http(port, "GET", "/kv/hello", None).await.unwrap().text(),
        "world"
    );
    let id = http(port, "GET", "/id", None).await.unwrap().text();
    assert!(id.contains(&vm.id), "the guest took its VM id: {id}");

    let listed = c.list_vms().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(qemu_running(&d, &vm.id));
    let metrics = c.metrics().await.unwrap();
    assert!(metrics.contains("cloudlet_vms_running 1"), "{metrics}");

    // The base of a running VM is not deleted; the refusal names the VM.
    let busy = c.delete_base("tiny").await.unwrap_err();
    assert_eq!(busy.status(), Some(409), "{busy}");
    assert!(
        busy.to_string().contains(&format!("kv1 ({})", vm.id)),
        "{busy}"
    );

    c.delete_vm("kv1").await.unwrap();
    assert!(c.list_vms().await.unwrap().is_empty());
    // Nor, once free, through the link that shares the test bases with
    // other daemons: they would lose it too.
    let shared = c.delete_base("tiny").await.unwrap_err();
    assert!(
        matches!(&shared, cloudlet_client::ClientError::Api { status: 409, kind, message }
            if kind == "shared" && message.contains("delete it where it lives")),
        "{shared}"
    );
    assert!(d.home.join("bases/tiny/manifest.json").is_file());
    assert!(!qemu_running(&d, &vm.id));
    assert!(d.vm_files().is_empty(), "{:?}", d.vm_files());
    assert!(
        http(port, "GET", "/health", None).await.is_err()
            || http(port, "GET", "/health", None).await.unwrap().status != 200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_overlay_twice_at_once_gives_two_independent_vms() {
    let overlay = kvstore_overlay().await;
    let d = Daemon::start("").await;
    let (c1, c2) = (d.client(), d.client());
    let (o1, o2) = (overlay.clone(), overlay.clone());
    let (a, b) = tokio::join!(
        async move { c1.create_vm_upload(&o1, Some("a"), None).await },
        async move { c2.create_vm_upload(&o2, Some("b"), None).await },
    );
    let (a, b) = (a.expect("vm a"), b.expect("vm b"));
    assert_ne!(a.id, b.id);
    assert_ne!(host_port(&a), host_port(&b));
    http(host_port(&a), "PUT", "/kv/who", Some(b"a".to_vec()))
        .await
        .unwrap();
    http(host_port(&b), "PUT", "/kv/who", Some(b"b".to_vec()))
        .await
        .unwrap();
    assert_eq!(
        http(host_port(&a), "GET", "/kv/who", None)
            .await
            .unwrap()
            .text(),
        "a"
    );
    assert_eq!(
        http(host_port(&b), "GET", "/kv/who", None)
            .await
            .unwrap()
            .text(),
        "b"
    );
    let ra = http(host_port(&a), "GET", "/random", None)
        .await
        .unwrap()
        .text();
    let rb = http(host_port(&b), "GET", "/random", None)
        .await
        .unwrap()
        .text();
    assert_ne!(ra, rb);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_restart_keeps_managing_its_running_vm() {
    let overlay = kvstore_overlay().await;
    let mut d = Daemon::start("").await;
    let vm = d
        .client()
        .create_vm_upload(&overlay, Some("survivor"), None)
        .await
        .unwrap();
    let port = host_port(&vm);
    http(port, "PUT", "/kv/k", Some(b"v".to_vec()))
        .await
        .unwrap();

    d.crash_and_restart().await;
    let again = d.client().get_vm("survivor").await.unwrap();
    assert_eq!(again.state, VmState::Running);
    assert_eq!(again.id, vm.id);
    assert_eq!(http(port, "GET", "/kv/k", None).await.unwrap().text(), "v");
    assert!(d.log().contains("re-adopted running VM"), "{}", d.log());

    // A VM that dies while the daemon is down is reported dead.
    let vm2 = d
        .client()
        .create_vm_upload(&overlay, Some("victim"), None)
        .await
        .unwrap();
    let pid_file = d.vm_dir.join(&vm2.id).join("run/qemu.pid");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    d.crash_and_restart().await;
    let _ = pid; // still alive: re-adopted
    assert_eq!(
        d.client().get_vm("victim").await.unwrap().state,
        VmState::Running
    );
    // SAFETY: killing the QEMU of the VM under test.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let start = std::time::Instant::now();
    loop {
        let s = d.client().get_vm("victim").await.unwrap().state;
        if s == VmState::Dead {
            break;
        }
        assert!(start.elapsed().as_secs() < 10, "death not noticed: {s:?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // And the survivor can still be deleted through the restarted daemon.
    d.client().delete_vm("survivor").await.unwrap();
    assert!(!qemu_running(&d, &vm.id));
}

/// An HTTP server with range support that sends the overlay's bytes up to
/// `stall_at` and then stops sending (the connection stays open): a link
/// that dies in the middle of a synthesis. Requests that start before
/// `whole_below` (the header and manifest fetch) are served whole.
async fn stalling_server(data: Vec<u8>, whole_below: u64, stall_at: u64) -> String {
    range_server(data, move |mut sock, data, start, end| async move {
        use tokio::io::AsyncWriteExt;
        let upto = if start < whole_below {
            end
        } else {
            end.min(stall_at.max(start))
        };
        let _ = sock.write_all(&data[start as usize..upto as usize]).await;
        if upto < end {
            // Hold the connection, send nothing more.
            tokio::time::sleep(std::time::Duration::from_secs(600)).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_crash_during_an_early_start_leaves_nothing_running() {
    let overlay = kvstore_overlay().await;
    let bytes = std::fs::read(&overlay).unwrap();
    let (_, m) = cloudlet_overlay::format::parse_prefix(&bytes).unwrap();
    // Everything up to the end of the device state segment; nothing after:
    // QEMU starts (early start) and the guest waits for pages that never
    // come. The restarted daemon stops any QEMU it finds in a synthesis'
    // run directory, records the VM failed and removes its files.
    let ds = &m.segments[m.device_state_segment as usize];
    let stall_at = m.data_offset + ds.offset + ds.stored_len;
    let url = stalling_server(bytes, m.data_offset, stall_at).await;
    let mut d = Daemon::start("").await;
    let client = d.client();
    let create = tokio::spawn(async move {
        client
            .create_vm(&CreateVmRequest {
                overlay: format!("{url}/overlay"),
                name: Some("stuck".into()),
                flavor: None,
            })
            .await
    });
    // Wait until QEMU of the synthesis runs, then kill the daemon.
    let start = std::time::Instant::now();
    let id = loop {
        let vms = d.client().list_vms().await.unwrap();
        if let Some(v) = vms.iter().find(|v| qemu_running(&d, &v.id)) {
            break v.id.clone();
        }
        assert!(
            start.elapsed().as_secs() < 60,
            "QEMU never started: {vms:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(
        d.client().get_vm(&id).await.unwrap().state,
        VmState::Synthesizing
    );
    d.crash_and_restart().await;
    create.abort();
    let vm = d.client().get_vm(&id).await.unwrap();
    assert_eq!(vm.state, VmState::Failed, "{vm:?}");
    assert!(!qemu_running(&d, &id), "the early start's QEMU was stopped");
    assert!(d.vm_files().is_empty(), "{:?}", d.vm_files());
}

/// An HTTP server with range support for an overlay whose payload segments
/// are `segments` (absolute byte ranges): a request for exactly one segment
/// (a demand fetch: the guest waits for it) and requests that start before
/// `whole_below` are served at once; all others (the sequential stream)
/// trickle at about 40 KB/s. Counts the payload bytes it has sent.
async fn trickle_server(
    data: Vec<u8>,
    whole_below: u64,
    segments: Vec<(u64, u64)>,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let sent = std::sync::Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    let segments = std::sync::Arc::new(segments);
    let url = range_server(data, move |mut sock, data, start, end| {
        let (segments, sent) = (segments.clone(), sent.clone());
        async move {
            use tokio::io::AsyncWriteExt;
            let fast = start < whole_below || segments.contains(&(start, end));
            let step = if fast { 1 << 20 } else { 4096 };
            let mut at = start;
            while at < end {
                let upto = (at + step).min(end);
                if sock
                    .write_all(&data[at as usize..upto as usize])
                    .await
                    .is_err()
                {
                    return;
                }
                if start >= whole_below {
                    sent.fetch_add(upto - at, Ordering::Relaxed);
                }
                at = upto;
                if !fast {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    })
    .await;
    (url, counter)
}

/// kvstore with small segments (the guest's first pages come by demand
/// fetches while the rest trickles in behind): its bytes, manifest and the
/// byte range of each segment in the file.
async fn trickled_kvstore() -> (Vec<u8>, cloudlet_overlay::Manifest, Vec<(u64, u64)>) {
    let overlay = kvstore_overlay_with(Some(128 << 10)).await;
    let bytes = std::fs::read(&overlay).unwrap();
    let (_, m) = cloudlet_overlay::format::parse_prefix(&bytes).unwrap();
    let segments = m
        .segments
        .iter()
        .map(|s| {
            (
                m.data_offset + s.offset,
                m.data_offset + s.offset + s.stored_len,
            )
        })
        .collect();
    (bytes, m, segments)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_crash_while_memory_still_streams_stops_the_vm_and_keeps_its_record() {
    let (bytes, m, segments) = trickled_kvstore().await;
    assert!(segments.len() > 8, "{} segments", segments.len());
    let payload = bytes.len() as u64 - m.data_offset;
    let (url, sent) = trickle_server(bytes, m.data_offset, segments).await;
    let mut d = Daemon::start("").await;
    let vm = d
        .client()
        .create_vm(&CreateVmRequest {
            overlay: format!("{url}/overlay"),
            name: Some("streaming".into()),
            flavor: None,
        })
        .await
        .expect("synthesis answers before the whole overlay has arrived");
    assert_eq!(vm.state, VmState::Running);
    let port = host_port(&vm);
    let r = http(port, "PUT", "/kv/k", Some(b"v".to_vec()))
        .await
        .unwrap();
    assert_eq!(r.status, 201);
    let got = sent.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        got < payload,
        "the whole overlay ({payload} bytes) had arrived; the test needs a tail"
    );
    // The daemon dies while the memory still streams in: the guest would
    // wait forever on pages only the dead daemon had. The restarted daemon
    // stops it and records it dead, with a reason; nothing is left running.
    d.crash_and_restart().await;
    let after = d.client().get_vm(&vm.id).await.unwrap();
    assert_eq!(after.state, VmState::Dead, "{after:?}");
    assert!(after.error.is_some(), "{after:?}");
    assert!(
        !qemu_running(&d, &vm.id),
        "the half-streamed VM was stopped"
    );
    // The record can be deleted, and its files go with it.
    d.client().delete_vm(&vm.id).await.unwrap();
    assert!(d.vm_files().is_empty(), "{:?}", d.vm_files());
    // And the restarted daemon still synthesizes.
    let overlay = kvstore_overlay().await;
    let reg_dir = tempfile::tempdir().unwrap();
    let registry = start_registry(reg_dir.path()).await;
    cloudlet_registry::push_overlay(&registry, TOKEN, "kvstore", &overlay)
        .await
        .unwrap();
    let vm2 = d
        .client()
        .create_vm(&CreateVmRequest {
            overlay: format!("{registry}/v1/overlays/kvstore"),
            name: Some("after".into()),
            flavor: None,
        })
        .await
        .unwrap();
    assert_eq!(vm2.state, VmState::Running);
    d.client().delete_vm(&vm2.id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_vms_whose_memory_still_streams_keeps_the_daemon_serving() {
    let (bytes, m, segments) = trickled_kvstore().await;
    let (url, _) = trickle_server(bytes, m.data_offset, segments).await;
    let d = Daemon::start("").await;
    // More deletions than the daemon has worker threads: a deletion that
    // blocked one (it did: the disk server's stop waited on a socket the
    // deletion had removed) would hang the daemon.
    for i in 0..3 {
        let vm = d
            .client()
            .create_vm(&CreateVmRequest {
                overlay: format!("{url}/overlay"),
                name: Some(format!("gone{i}")),
                flavor: None,
            })
            .await
            .unwrap();
        d.client().delete_vm(&vm.id).await.unwrap();
        assert!(!qemu_running(&d, &vm.id));
    }
    let listed = tokio::time::timeout(std::time::Duration::from_secs(10), d.client().list_vms())
        .await
        .expect("the daemon still answers")
        .unwrap();
    assert!(listed.is_empty(), "{listed:?}");
    // No file of the deleted VMs stays open in the daemon (their threads
    // end on their own, shortly).
    let pid = d.pid();
    let start = std::time::Instant::now();
    loop {
        let open: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .filter(|p| p.to_string_lossy().contains("disk.raw"))
            .collect();
        if open.is_empty() {
            break;
        }
        assert!(start.elapsed().as_secs() < 10, "still open: {open:?}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// A base this daemon holds itself (not through the shared link) is
/// deleted with its spare disk: nothing of it is left to be taken by the
/// next synthesis.
#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_base_takes_its_spare_disk_along() {
    let d = Daemon::start("").await;
    let spare = wait_for_spare(&d).await;
    // The daemon's own copy of the base, in place of the shared link.
    let bases = d.home.join("bases");
    let shared = std::fs::read_link(&bases).expect("the test bases are linked");
    std::fs::remove_file(&bases).unwrap();
    std::fs::create_dir(&bases).unwrap();
    let copied = std::process::Command::new("cp")
        .args(["-a", "--sparse=always"])
        .arg(shared.join("tiny"))
        .arg(&bases)
        .status()
        .unwrap();
    assert!(copied.success());
    let c = d.client();
    c.delete_base("tiny").await.expect("the daemon's own base");
    assert!(!bases.join("tiny").exists());
    assert!(!spare.exists(), "{} left behind", spare.display());
    assert!(c.list_bases().await.unwrap().is_empty());
    // The shared store is untouched.
    assert!(shared.join("tiny/manifest.json").is_file());
}
