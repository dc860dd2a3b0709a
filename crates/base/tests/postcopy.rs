//! Early start on a real QEMU guest: a saved VM comes back through our
//! postcopy source while its memory is still "arriving" (pages become ready
//! over a few seconds; the ones the guest touches are demanded).

use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cloudlet_qemu::image::create_top;
use cloudlet_qemu::postcopy::{self, PageSource, PostcopyProgress, SavedState, PAGE};
use cloudlet_qemu::{save_snapshot, PortForward, Vm, VmSpec};
use cloudlet_testkit::{free_port, guest_bin, http, tiny_base};

const KV_PORT: u16 = 8080;

/// A RAM image whose pages "arrive" in address order over `spread`; a
/// demanded page arrives at once.
struct Arriving {
    file: std::fs::File,
    start: Instant,
    spread: Duration,
    pages: u64,
    demanded: Mutex<Vec<bool>>,
    demands: AtomicU64,
}

impl PageSource for Arriving {
    fn read_page(&self, page: u64, buf: &mut [u8; PAGE]) -> std::io::Result<bool> {
        let due = self.spread.mul_f64(page as f64 / self.pages as f64);
        let ready = self.start.elapsed() >= due || self.demanded.lock().unwrap()[page as usize];
        if !ready {
            return Ok(false);
        }
        self.file.read_exact_at(buf, page * PAGE as u64)?;
        Ok(true)
    }
    fn demand(&self, page: u64) {
        let mut d = self.demanded.lock().unwrap();
        if !d[page as usize] {
            d[page as usize] = true;
            self.demands.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn put(port: u16, key: &str, value: &str) {
    let r = http(
        port,
        "PUT",
        &format!("/kv/{key}"),
        Some(value.as_bytes().to_vec()),
    )
    .await
    .unwrap();
    assert!(r.status == 201 || r.status == 204, "PUT {}", r.status);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_saved_vm_runs_before_its_memory_has_arrived() {
    let (_store, base) = tiny_base().await;
    // Postcopy needs the RAM file on shared memory (userfaultfd on shmem).
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let port = free_port();
    let disk = dir.path().join("boot.qcow2");
    create_top(&base.disk_path(), &disk).unwrap();
    let fwd = |host| {
        vec![PortForward {
            guest: KV_PORT,
            host,
            bind: None,
        }]
    };
    let spec = base.spec(
        "orig",
        &dir.path().join("orig.ram"),
        &disk,
        &dir.path().join("orig-run"),
        fwd(port),
    );
    let vm = Vm::boot(spec).await.expect("boot");
    let mut agent = vm.agent(Duration::from_secs(60)).await.expect("agent");
    agent
        .put_file(&guest_bin("kvstore"), "/opt/apps/kvstore", 0o755)
        .await
        .unwrap();
    agent
        .spawn(
            &["/opt/apps/kvstore", "--port", "8080"],
            Some("/tmp/kv.log"),
        )
        .await
        .unwrap();
    agent
        .wait_port(KV_PORT, Some("/health"), Duration::from_secs(30))
        .await
        .unwrap();
    // A file in the guest's RAM-backed root: its bytes live only in memory.
    let payload: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    agent.put_bytes(&payload, "/tmp/blob", 0o644).await.unwrap();
    for i in 0..50 {
        put(port, &format!("k{i}"), &format!("v{i}")).await;
    }
    let stats_before = http(port, "GET", "/stats", None).await.unwrap().text();
    drop(agent);
    let snap = dir.path().join("snap");
    save_snapshot(&vm, &snap).await.expect("save");
    vm.kill().await;

    // Early start from the snapshot.
    let state = std::fs::read(snap.join("state")).unwrap();
    let saved = SavedState::parse(&state, "mem").expect("saved state parses");
    let port2 = free_port();
    let disk2 = dir.path().join("new.qcow2");
    std::fs::copy(snap.join("disk"), &disk2).unwrap();
    let mut spec2: VmSpec = vm.spec().clone();
    spec2.name = "early".into();
    spec2.ram_path = dir.path().join("new.ram");
    spec2.disk_path = disk2;
    spec2.run_dir = dir.path().join("new-run");
    spec2.ports = fwd(port2);
    let sock = dir.path().join("postcopy.sock");
    let t0 = Instant::now();
    let vm2 = Vm::start_postcopy(spec2, &sock)
        .await
        .expect("start postcopy");
    let npages = saved.main_len() / PAGE as u64;
    let pages = Arc::new(Arriving {
        file: std::fs::File::open(snap.join("ram")).unwrap(),
        start: Instant::now(),
        spread: Duration::from_secs(10),
        pages: npages,
        demanded: Mutex::new(vec![false; npages as usize]),
        demands: AtomicU64::new(0),
    });
    let stream = connect(&sock).await;
    let progress = Arc::new(PostcopyProgress::default());
    let cancel = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicBool::new(false));
    let server = {
        let (pages, progress, cancel, started) = (
            pages.clone(),
            progress.clone(),
            cancel.clone(),
            started.clone(),
        );
        tokio::task::spawn_blocking(move || {
            postcopy::serve(
                stream,
                &saved,
                &*pages,
                || Ok(()),
                &started,
                &progress,
                &cancel,
            )
        })
    };
    {
        let (qmp, started) = (vm2.qmp().clone(), started.clone());
        tokio::spawn(async move {
            while qmp.run_state().await.ok().as_deref() != Some("running") {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            started.store(true, Ordering::Release);
        });
    }
    // The app answers while pages are still arriving.
    let mut first = None;
    for i in 0..600 {
        if i % 20 == 0 {
            eprintln!(
                "{:?}: sent {} requests {} started {}",
                t0.elapsed(),
                progress.pages_sent.load(Ordering::Relaxed),
                progress.requests.load(Ordering::Relaxed),
                started.load(Ordering::Relaxed)
            );
            if server.is_finished() {
                break;
            }
        }
        // Short tries: a connection made before the guest runs may hang.
        let r = tokio::time::timeout(
            Duration::from_millis(500),
            http(port2, "GET", "/kv/k7", None),
        )
        .await;
        if let Ok(Ok(r)) = r {
            if r.status == 200 {
                first = Some((t0.elapsed(), r.text()));
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (first_at, v) = first.expect("the app answers during postcopy");
    assert_eq!(v, "v7");
    let served_before_done = progress.pages_sent.load(Ordering::Relaxed) < npages;
    let stats = server.await.unwrap().expect("postcopy completes");
    vm2.qmp()
        .wait_migration(Duration::from_secs(60))
        .await
        .expect("QEMU completes the incoming migration");
    eprintln!(
        "first answer after {first_at:?}; all pages after {} ms; {stats:?}; demands {}",
        stats.done_ms,
        pages.demands.load(Ordering::Relaxed)
    );
    assert!(
        stats.requests > 0,
        "the guest faulted on pages not sent yet"
    );
    assert!(
        served_before_done,
        "the app answered before the last page was pushed"
    );
    // Everything came back: keys, the same process, the RAM-only file.
    for i in 0..50 {
        let r = http(port2, "GET", &format!("/kv/k{i}"), None)
            .await
            .unwrap();
        assert_eq!(r.text(), format!("v{i}"));
    }
    let stats_after = http(port2, "GET", "/stats", None).await.unwrap().text();
    let pid = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap()["pid"].clone();
    assert_eq!(pid(&stats_before), pid(&stats_after));
    let mut agent = vm2
        .agent(Duration::from_secs(30))
        .await
        .expect("agent after");
    let out = agent
        .exec(&["sha256sum", "/tmp/blob"], Duration::from_secs(30))
        .await
        .expect("exec");
    let want = sha256_hex(&payload);
    assert!(
        out.stdout.starts_with(&want),
        "the file in guest RAM is intact: {}",
        out.stdout
    );
    put(port2, "after", "yes").await;
    vm2.kill().await;
}

async fn connect(sock: &Path) -> UnixStream {
    for _ in 0..200 {
        if let Ok(s) = UnixStream::connect(sock) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("QEMU never listened on {}", sock.display());
}

fn sha256_hex(data: &[u8]) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)[..64].to_string()
}
