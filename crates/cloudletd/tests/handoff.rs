//! Live handoff between two real `cloudletd` processes, on real QEMU.

mod common;
#[path = "handoff/dashboard.rs"]
mod dashboard;
#[path = "handoff/events.rs"]
mod events;
#[path = "handoff/safety.rs"]
mod safety;
#[path = "handoff/tenants.rs"]
mod tenants;
#[path = "handoff/tls.rs"]
mod tls;
#[path = "handoff/wan.rs"]
mod wan;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cloudlet_api::VmState;
use cloudlet_testkit::http;
use common::{kvstore_overlay, qemu_running, Daemon, TOKEN};

fn port_of(endpoint: &str) -> u16 {
    endpoint.rsplit(':').next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn kvstore_moves_with_every_key_and_keeps_running() {
    moves_with_every_key(true).await
}

/// Without verification the source commits as soon as its QEMU completed
/// and the destination resumes once it has loaded (the commit waits there).
#[tokio::test(flavor = "multi_thread")]
async fn kvstore_moves_with_a_pipelined_commit() {
    moves_with_every_key(false).await
}

async fn moves_with_every_key(verify: bool) {
    let overlay = kvstore_overlay().await;
    let config = format!("verify_memory = {verify}\n");
    let a = Daemon::start(&config).await;
    let b = Daemon::start(&config).await;
    let vm = a
        .client()
        .create_vm_upload(&overlay, Some("mover"), None)
        .await
        .unwrap();
    let port = vm.ports[0].host;
    for i in 0..50 {
        http(
            port,
            "PUT",
            &format!("/kv/before{i}"),
            Some(vec![b'x'; 4096]),
        )
        .await
        .unwrap();
    }
    let stats = |s: String| serde_json::from_str::<serde_json::Value>(&s).unwrap();
    let before = stats(http(port, "GET", "/stats", None).await.unwrap().text());

    // Keep writing while the VM moves; remember what was acknowledged.
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, stop) = (acked.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("during{i}");
                if let Ok(r) =
                    http(port, "PUT", &format!("/kv/{key}"), Some(vec![b'y'; 4096])).await
                {
                    if r.status == 201 {
                        acked.lock().unwrap().push(key);
                    }
                }
                i += 1;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
    };
    let report = a
        .client()
        .handoff("mover", &b.url(), Some(TOKEN))
        .await
        .expect("handoff");
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();

    let new_port = port_of(&report.vm.ports[0].endpoint);
    assert_eq!(report.vm.generation, 2);
    assert!(
        report.source_stop_us > 0 && report.destination_resume_us >= report.source_stop_us,
        "{report:?}"
    );
    assert!(
        report.wire_bytes < report.raw_bytes / 5,
        "dedup against the base: {report:?}"
    );
    for i in 0..50 {
        let r = http(new_port, "GET", &format!("/kv/before{i}"), None)
            .await
            .unwrap_or_else(|e| {
                let console = std::fs::read_to_string(
                    b.vm_dir.join(&vm.id).join("run").join("console.log"),
                )
                .unwrap_or_default();
                panic!(
                    "before{i} at the new endpoint {}: {e}\nreport: {report:?}\n--- source\n{}\n--- destination\n{}\n--- destination console (tail)\n{}",
                    report.vm.ports[0].endpoint,
                    a.log(),
                    b.log(),
                    &console[console.len().saturating_sub(3000)..]
                )
            });
        assert_eq!(r.status, 200, "before{i}");
    }
    let acked = acked.lock().unwrap().clone();
    assert!(!acked.is_empty());
    for k in &acked {
        let r = http(new_port, "GET", &format!("/kv/{k}"), None)
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{k} was acknowledged before the move");
    }
    let after = stats(http(new_port, "GET", "/stats", None).await.unwrap().text());
    assert_eq!(before["pid"], after["pid"], "same process: no reboot");
    assert!(after["uptime_s"].as_u64() >= before["uptime_s"].as_u64());

    if verify {
        // The moved memory was compared with the source's before the commit.
        assert!(a.log().contains("moved memory verified"), "{}", a.log());
    } else {
        assert!(
            a.log().contains("destination loaded and resumed the VM"),
            "{}",
            a.log()
        );
    }
    // The disk's dirty bitmap was read at the switchover (not guessed).
    let log = a.log();
    let line = log
        .lines()
        .find(|l| l.contains("disk writes during the handoff"))
        .expect("logged");
    assert!(!line.contains(&u64::MAX.to_string()), "{line}");

    // Both sides recorded the outcome.
    let src = a.client().get_vm("mover").await.unwrap();
    assert_eq!(src.state, VmState::Moved);
    assert_eq!(src.generation, 2);
    assert!(!qemu_running(&a, &vm.id));
    let dst = b.client().get_vm("mover").await.unwrap();
    assert_eq!(dst.state, VmState::Running);
    assert_eq!(dst.generation, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_or_unreachable_destination_leaves_the_vm_running_here() {
    let overlay = kvstore_overlay().await;
    let a = Daemon::start("").await;
    let b = Daemon::start("").await;
    let vm = a
        .client()
        .create_vm_upload(&overlay, Some("stayer"), None)
        .await
        .unwrap();
    let port = vm.ports[0].host;
    http(port, "PUT", "/kv/k", Some(b"v".to_vec()))
        .await
        .unwrap();

    // Wrong token at the destination.
    let err = a
        .client()
        .handoff("stayer", &b.url(), Some("wrong"))
        .await
        .unwrap_err();
    // A definite no from the destination: 409, the VM still runs here.
    assert_eq!(err.status(), Some(409), "{err}");
    assert!(err.to_string().contains("401"), "{err}");
    assert!(err.to_string().contains("destination_refused"), "{err}");
    // A destination that is not there.
    let err = a
        .client()
        .handoff("stayer", "http://127.0.0.1:1", Some(TOKEN))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(502), "{err}");

    let v = a.client().get_vm("stayer").await.unwrap();
    assert_eq!(v.state, VmState::Running);
    assert_eq!(v.generation, 1);
    assert_eq!(http(port, "GET", "/kv/k", None).await.unwrap().text(), "v");
    assert!(b.client().list_vms().await.unwrap().is_empty());
    assert!(b.vm_files().is_empty(), "{:?}", b.vm_files());
}

/// Disk writes made while the VM moves reach the destination's disk, and
/// only the blocks QEMU's dirty bitmap recorded are re-read at the
/// switchover: after the move the guest drops its page cache and reads back
/// what it synced on the source.
#[tokio::test(flavor = "multi_thread")]
async fn disk_writes_made_during_the_move_arrive() {
    use cloudlet_qemu::AgentClient;
    use std::time::Duration;
    let overlay = kvstore_overlay().await;
    let a = Daemon::start("").await;
    let b = Daemon::start("").await;
    let vm = a
        .client()
        .create_vm_upload(&overlay, Some("diskw"), None)
        .await
        .unwrap();
    let sock = |d: &Daemon| d.vm_dir.join(&vm.id).join("run").join("agent.sock");
    let mut agent = AgentClient::connect(&sock(&a), Duration::from_secs(30))
        .await
        .expect("source agent");
    // Replace a file and sync, 20 times a second, until killed.
    let script = "mkdir -p /cltest; echo $$ > /cltest/pid; i=0; \
                  while :; do i=$((i+1)); echo $i > /cltest/n.tmp; mv /cltest/n.tmp /cltest/n; sync; sleep 0.05; done";
    agent.spawn(&["sh", "-c", script], None).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(agent);

    a.client()
        .handoff("diskw", &b.url(), Some(TOKEN))
        .await
        .expect("handoff");
    // The log may be coloured: drop ANSI escapes.
    let mut log = String::new();
    let mut esc = false;
    for c in a.log().chars() {
        match (esc, c) {
            (false, '\x1b') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            (false, c) => log.push(c),
        }
    }
    let line = log
        .lines()
        .find(|l| l.contains("dirty disk extents"))
        .unwrap_or_else(|| panic!("no dirty extents read at the switchover:\n{log}"));
    let bytes: u64 = line
        .split("bytes=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.trim_matches(|c: char| !c.is_ascii_digit()).parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(
        bytes > 0 && bytes < 16 << 20,
        "the switchover re-read {bytes} bytes, not just the written blocks: {line}"
    );

    let mut agent = AgentClient::connect(&sock(&b), Duration::from_secs(30))
        .await
        .expect("destination agent");
    let sh = |cmd: &'static str| ["sh", "-c", cmd];
    let out = agent
        .exec(
            &sh("kill $(cat /cltest/pid); cat /cltest/n"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let cached: u64 = out
        .stdout
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{out:?}"));
    let out = agent
        .exec(
            &sh("sync; echo 3 > /proc/sys/vm/drop_caches; cat /cltest/n"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let on_disk: u64 = out
        .stdout
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{out:?}"));
    assert!(cached > 1, "the writer ran: {cached}");
    assert_eq!(
        cached, on_disk,
        "the destination's disk has what the guest wrote"
    );
}

/// A difference in the moved memory never resumes silently. The
/// destination alters pages of the memory its QEMU loaded (what a page lost
/// in QEMU's dirty tracking looks like, `handoff_test_corrupt_pages`):
/// without repair the move is refused and the VM keeps running here with
/// its data; the destination is left clean.
#[tokio::test(flavor = "multi_thread")]
async fn a_memory_difference_without_repair_keeps_the_vm_here() {
    let overlay = kvstore_overlay().await;
    let a = Daemon::start("handoff_repair_memory = false\n").await;
    let b = Daemon::start("handoff_test_corrupt_pages = 3\n").await;
    let vm = a
        .client()
        .create_vm_upload(&overlay, Some("differ"), None)
        .await
        .unwrap();
    let port = vm.ports[0].host;
    http(port, "PUT", "/kv/k", Some(b"v".to_vec()))
        .await
        .unwrap();
    let err = a
        .client()
        .handoff("differ", &b.url(), Some(TOKEN))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("differs"), "{err}");
    // The destination said so in its log (read until it is there: the
    // answer may reach the source before the line reaches the file).
    let mut said = false;
    for _ in 0..50 {
        if b.log()
            .contains("the moved memory differs from the source's")
        {
            said = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        said,
        "{err}\n--- source\n{}\n--- destination\n{}",
        a.log(),
        b.log()
    );
    let v = a.client().get_vm("differ").await.unwrap();
    assert_eq!(v.state, VmState::Running, "{v:?}");
    assert_eq!(v.generation, 1);
    assert!(qemu_running(&a, &vm.id));
    assert_eq!(http(port, "GET", "/kv/k", None).await.unwrap().text(), "v");
    // The destination discards its copy (the abort comes in the background).
    let mut clean = false;
    for _ in 0..100 {
        if b.client().list_vms().await.unwrap().is_empty() && b.vm_files().is_empty() {
            clean = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(clean, "{:?}", b.vm_files());
}

/// The same difference, repaired: the source sends its pages that differ,
/// the destination writes them into the paused VM's RAM, finds its memory
/// equal to the source's and only then resumes it.
#[tokio::test(flavor = "multi_thread")]
async fn a_memory_difference_is_repaired_before_the_vm_resumes() {
    let overlay = kvstore_overlay().await;
    let a = Daemon::start("").await;
    let b = Daemon::start("handoff_test_corrupt_pages = 3\n").await;
    let vm = a
        .client()
        .create_vm_upload(&overlay, Some("repaired"), None)
        .await
        .unwrap();
    let port = vm.ports[0].host;
    for i in 0..20 {
        http(port, "PUT", &format!("/kv/k{i}"), Some(vec![b'r'; 4096]))
            .await
            .unwrap();
    }
    let stats = |s: String| serde_json::from_str::<serde_json::Value>(&s).unwrap();
    let before = stats(http(port, "GET", "/stats", None).await.unwrap().text());
    let report = a
        .client()
        .handoff("repaired", &b.url(), Some(TOKEN))
        .await
        .unwrap_or_else(|e| panic!("{e}\n--- source\n{}\n--- destination\n{}", a.log(), b.log()));
    let (alog, blog) = (a.log(), b.log());
    assert!(
        blog.contains("the moved memory differs from the source's"),
        "{blog}"
    );
    // Exactly the altered pages were sent back.
    let repaired = alog
        .lines()
        .find(|l| l.contains("pages repaired at the destination"))
        .unwrap_or_else(|| panic!("{alog}"));
    let plain = without_colours(repaired);
    assert!(plain.contains("pages=3"), "{plain}");
    // ...and they were the ones whose bytes differed.
    let fixed = blog
        .lines()
        .find(|l| l.contains("moved memory repaired and verified"))
        .unwrap_or_else(|| panic!("{blog}"));
    assert!(without_colours(fixed).contains("changed=3"), "{fixed}");
    assert!(alog.contains("moved memory verified"), "{alog}");
    let new_port = port_of(&report.vm.ports[0].endpoint);
    for i in 0..20 {
        let r = http(new_port, "GET", &format!("/kv/k{i}"), None)
            .await
            .unwrap();
        assert_eq!(r.status, 200, "k{i}");
    }
    let after = stats(http(new_port, "GET", "/stats", None).await.unwrap().text());
    assert_eq!(before["pid"], after["pid"], "same process: no reboot");
    assert_eq!(
        a.client().get_vm("repaired").await.unwrap().state,
        VmState::Moved
    );
    let dst = b.client().get_vm("repaired").await.unwrap();
    assert_eq!(dst.state, VmState::Running);
    assert_eq!(dst.generation, 2);
}

/// A log line without its ANSI colours.
fn without_colours(line: &str) -> String {
    let mut out = String::new();
    let mut esc = false;
    for c in line.chars() {
        match (esc, c) {
            (false, '\x1b') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            (false, c) => out.push(c),
        }
    }
    out
}
