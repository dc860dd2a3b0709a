//! Live handoff across an emulated WAN: the source `cloudletd` runs in
//! namespace A, the destination in namespace B, joined only by the emulated
//! link (`cloudlet-wan`). Every client call is made from inside a namespace
//! (the daemons, their QEMUs and the QEMU port forwards live there).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{in_ns, kvstore_overlay, TOKEN};
use cloudlet_api::{AppInfo, HandoffOffer, HandoffReport, VmInfo, VmState};
use cloudlet_client::{Client, ClientError};
use cloudlet_testkit::{http, tiny_base};
use cloudlet_wan::{Side, Wan, WanConfig};

/// Port every daemon listens on, inside its own namespace.
const API_PORT: u16 = 7450;

/// A `cloudletd` process inside one namespace of the WAN.
struct NsDaemon {
    side: Side,
    ns: String,
    home: PathBuf,
    vm_dir: PathBuf,
    url: String,
    config: PathBuf,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl NsDaemon {
    async fn start(wan: &Wan, side: Side, extra_config: &str) -> NsDaemon {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let vm_dir = dir.path().join("run");
        std::fs::create_dir_all(&home).unwrap();
        let (store, _) = tiny_base().await;
        std::os::unix::fs::symlink(store.bases_dir(), home.join("bases")).unwrap();
        let addr = format!("{}:{API_PORT}", wan.addr(side));
        let (first, last) = cloudlet_testkit::port_block();
        let config = dir.path().join("cloudletd.toml");
        cloudlet_testkit::write_private(
            &config,
            format!(
                "name = \"wan-{side:?}\"\nlisten = \"{addr}\"\nhome = \"{}\"\nvm_dir = \"{}\"\ntokens = [\"{TOKEN}\"]\nverify_memory = true\nhost_ports = [{first}, {}]\nadvertise_url = \"http://{addr}\"\nplain_http = true\n{extra_config}",
                home.display(),
                vm_dir.display(),
                last
            ),
        )
        .unwrap();
        let mut d = NsDaemon {
            side,
            ns: wan.ns_name(side).to_string(),
            home,
            vm_dir,
            url: format!("http://{addr}"),
            config,
            child: None,
            _dir: dir,
        };
        d.spawn(wan).await;
        d
    }

    async fn spawn(&mut self, wan: &Wan) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.home.join("daemon.log"))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cloudletd"));
        cmd.arg("--config")
            .arg(&self.config)
            .env("CLOUDLET_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.child = Some(wan.spawn_in(self.side, cmd).expect("start cloudletd"));
        let client = self.client();
        let up = in_ns(wan, self.side, async move {
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(30) {
                if client.info().await.is_ok() {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            false
        })
        .await;
        assert!(
            up,
            "cloudletd did not come up in {}: {}",
            self.ns,
            self.log()
        );
    }

    /// SIGKILL the daemon (its QEMUs keep running, by design).
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    fn client(&self) -> Client {
        Client::new(&self.url, Some(TOKEN.into()))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.home.join("daemon.log")).unwrap_or_default()
    }

    /// Files left in the VM directories.
    fn vm_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for d in [self.home.join("vms"), self.vm_dir.clone()] {
            if let Ok(rd) = std::fs::read_dir(&d) {
                out.extend(rd.flatten().map(|e| e.path()));
            }
        }
        out
    }

    /// Whether any QEMU this daemon started still runs.
    fn any_qemu(&self) -> bool {
        cloudlet_testkit::process_running_with(&self.vm_dir.display().to_string())
    }

    fn qemu_running(&self, id: &str) -> bool {
        cloudlet_testkit::process_running_with(&self.vm_dir.join(id).display().to_string())
    }
}

impl Drop for NsDaemon {
    fn drop(&mut self) {
        // Kill the daemon and every QEMU it started (they outlive it by design).
        self.kill_quietly();
        cloudlet_testkit::kill_processes_with(&self.vm_dir.display().to_string());
    }
}

impl NsDaemon {
    fn kill_quietly(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Two cloudlets joined by an emulated WAN. Fields drop in order: the
/// daemons (and their QEMUs) first, then the link and its namespaces.
struct Rig {
    a: NsDaemon,
    b: NsDaemon,
    wan: Wan,
}

impl Rig {
    async fn new(prefix: &str, rate_mbit: f64) -> Rig {
        Rig::with_config(prefix, rate_mbit, "").await
    }

    /// With `extra_config` in both daemons' configuration.
    async fn with_config(prefix: &str, rate_mbit: f64, extra_config: &str) -> Rig {
        let _ = cloudlet_wan::cleanup_stale();
        let wan = Wan::create(WanConfig::new(prefix, rate_mbit, Duration::from_millis(10)))
            .expect("create the WAN");
        let a = NsDaemon::start(&wan, Side::A, extra_config).await;
        let b = NsDaemon::start(&wan, Side::B, extra_config).await;
        Rig { a, b, wan }
    }

    /// A kvstore VM on the source, with `keys` keys written; its host port.
    async fn kvstore_on_a(&self, name: &str, keys: usize) -> (VmInfo, u16) {
        let overlay = kvstore_overlay().await;
        let client = self.a.client();
        let name = name.to_string();
        let vm = in_ns(&self.wan, Side::A, async move {
            let vm = client
                .create_vm_upload(&overlay, Some(&name), None)
                .await
                .expect("create the VM");
            let port = vm.ports[0].host;
            for i in 0..keys {
                let r = http(port, "PUT", &format!("/kv/k{i}"), Some(vec![b'x'; 4096]))
                    .await
                    .unwrap();
                assert_eq!(r.status, 201);
            }
            vm
        })
        .await;
        let port = vm.ports[0].host;
        (vm, port)
    }

    /// Start a handoff of `vm` from A to B with `token` (runs in A).
    fn start_handoff(
        &self,
        vm: &str,
        token: &str,
    ) -> cloudlet_wan::NsJoinHandle<Result<HandoffReport, ClientError>> {
        let (client, vm, dest, token) = (
            self.a.client(),
            vm.to_string(),
            self.b.url.clone(),
            token.to_string(),
        );
        self.wan
            .run_in(Side::A, async move {
                client.handoff(&vm, &dest, Some(&token)).await
            })
            .expect("enter namespace A")
    }

    /// Wait until the source streams memory: its progress says so, or (the
    /// daemon shows live progress only while synthesizing, see the report)
    /// the destination's QEMU waits and the session has carried over 1 MB.
    async fn wait_streaming(&self, vm: &str) {
        let start = Instant::now();
        let bytes0 = self.wan.stats().a_to_b.bytes;
        while start.elapsed() < Duration::from_secs(60) {
            let (client, id) = (self.a.client(), vm.to_string());
            let v = in_ns(&self.wan, Side::A, async move { client.get_vm(&id).await }).await;
            if let Ok(v) = v {
                let sent = self.wan.stats().a_to_b.bytes - bytes0;
                if v.state == VmState::HandingOff
                    && (v.progress.stage == "memory" || (self.b.any_qemu() && sent > 1_000_000))
                {
                    eprintln!(
                        "streaming after {:?}: {sent} B on the link, progress {:?}",
                        start.elapsed(),
                        v.progress
                    );
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the handoff never started streaming");
    }

    /// The VM still runs on the source, generation 1, with its keys.
    async fn assert_source_keeps(&self, vm: &VmInfo, port: u16, keys: usize) {
        let (client, id) = (self.a.client(), vm.id.clone());
        let (info, missing) = in_ns(&self.wan, Side::A, async move {
            // The source resumes its VM right after the failure.
            let start = Instant::now();
            let mut info = client.get_vm(&id).await.unwrap();
            while info.state != VmState::Running && start.elapsed() < Duration::from_secs(30) {
                tokio::time::sleep(Duration::from_millis(100)).await;
                info = client.get_vm(&id).await.unwrap();
            }
            let mut missing = Vec::new();
            for i in 0..keys {
                match http(port, "GET", &format!("/kv/k{i}"), None).await {
                    Ok(r) if r.status == 200 && r.body == vec![b'x'; 4096] => {}
                    other => missing.push(format!("k{i}: {:?}", other.map(|r| r.status))),
                }
            }
            (info, missing)
        })
        .await;
        assert_eq!(info.state, VmState::Running, "{info:?}\n{}", self.a.log());
        assert_eq!(info.generation, 1);
        assert!(info.moved_to.is_none());
        assert!(missing.is_empty(), "lost at the source: {missing:?}");
        assert!(self.a.qemu_running(&vm.id));
    }

    /// The destination holds nothing: no VM listed, no files, no QEMU.
    async fn assert_destination_clean(&self) {
        let client = self.b.client();
        // An abort from the source may still be on its way: allow a moment.
        let start = Instant::now();
        loop {
            let c = client.clone();
            let vms = in_ns(&self.wan, Side::B, async move { c.list_vms().await }).await;
            let vms = vms.expect("list the destination's VMs");
            let files = self.b.vm_files();
            let qemu = self.b.any_qemu();
            if vms.is_empty() && files.is_empty() && !qemu {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "destination not clean: vms {vms:?}, files {files:?}, qemu {qemu}\n{}",
                self.b.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn port_of(endpoint: &str) -> u16 {
    endpoint.rsplit(':').next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn kvstore_crosses_the_wan_with_every_key_and_keeps_running() {
    let rig = Rig::new("hwok", 50.0).await;
    let (vm, port) = rig.kvstore_on_a("mover", 50).await;
    let before = in_ns(&rig.wan, Side::A, async move {
        http(port, "GET", "/stats", None).await.unwrap().text()
    })
    .await;
    let before: serde_json::Value = serde_json::from_str(&before).unwrap();

    // Keep writing while the VM moves; remember what the source acknowledged.
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, stop) = (acked.clone(), stop.clone());
        rig.wan
            .run_in(Side::A, async move {
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
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .unwrap()
    };
    let report = rig
        .start_handoff("mover", TOKEN)
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("handoff: {e}\n{}\n{}", rig.a.log(), rig.b.log()));
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    eprintln!(
        "handoff over the WAN: total {} ms, downtime {} us, wire {} B, raw {} B, phases {:?}",
        report.total_ms,
        report.destination_resume_us - report.source_stop_us,
        report.wire_bytes,
        report.raw_bytes,
        report.phases
    );

    assert_eq!(report.vm.generation, 2);
    assert!(
        report.source_stop_us > 0 && report.destination_resume_us >= report.source_stop_us,
        "{report:?}"
    );
    let stats = rig.wan.stats();
    assert!(
        stats.a_to_b.bytes >= report.wire_bytes,
        "the session crossed the emulated link: {stats:?} {report:?}"
    );
    let acked = acked.lock().unwrap().clone();
    assert!(
        !acked.is_empty(),
        "no write was acknowledged during the move"
    );
    let new_port = port_of(&report.vm.ports[0].endpoint);
    let (missing, after) = in_ns(&rig.wan, Side::B, async move {
        let mut missing = Vec::new();
        for i in 0..50 {
            let r = http(new_port, "GET", &format!("/kv/k{i}"), None).await;
            if !matches!(&r, Ok(r) if r.status == 200 && r.body == vec![b'x'; 4096]) {
                missing.push(format!("k{i}"));
            }
        }
        for k in &acked {
            let r = http(new_port, "GET", &format!("/kv/{k}"), None).await;
            if !matches!(&r, Ok(r) if r.status == 200 && r.body == vec![b'y'; 4096]) {
                missing.push(k.clone());
            }
        }
        let after = http(new_port, "GET", "/stats", None).await.unwrap().text();
        (missing, after)
    })
    .await;
    assert!(missing.is_empty(), "acknowledged, then lost: {missing:?}");
    let after: serde_json::Value = serde_json::from_str(&after).unwrap();
    assert_eq!(before["pid"], after["pid"], "same process: no reboot");
    assert!(
        after["uptime_s"].as_u64() >= before["uptime_s"].as_u64(),
        "{before} -> {after}"
    );

    // Both sides recorded the outcome; the source QEMU is gone.
    let (ca, cb) = (rig.a.client(), rig.b.client());
    let src = in_ns(&rig.wan, Side::A, async move { ca.get_vm("mover").await })
        .await
        .unwrap();
    assert_eq!(src.state, VmState::Moved);
    assert_eq!(src.generation, 2);
    assert!(!rig.a.qemu_running(&vm.id));
    let dst = in_ns(&rig.wan, Side::B, async move { cb.get_vm("mover").await })
        .await
        .unwrap();
    assert_eq!(dst.state, VmState::Running);
    assert_eq!(dst.generation, 2);
    assert!(rig.b.qemu_running(&vm.id));
}

/// A guest that dirties memory three times faster than the link carries it
/// (4 MiB/s of incompressible pages over 10 Mbit/s) never converges with
/// plain precopy; the source throttles it and still moves it, keys intact,
/// with a short downtime. Without the rate cap: QEMU's own switchover.
#[tokio::test(flavor = "multi_thread")]
async fn a_guest_dirtying_faster_than_the_link_still_moves() {
    dirtying_faster_than_the_link(
        Rig::with_config("hwfast", 10.0, "handoff_rate_cap = false\n").await,
    )
    .await
}

/// The same under the rate cap (`handoff_rate_cap`, the default), where QEMU 7.2 (TCG)
/// lost pages in 3 moves of 3 in session 3 (verification failed them):
/// with the repair of differing pages the VM moves, its memory verified.
#[tokio::test(flavor = "multi_thread")]
async fn a_guest_dirtying_faster_than_the_link_moves_under_the_rate_cap() {
    let rig = Rig::with_config("hwcap", 10.0, "handoff_rate_cap = true\n").await;
    dirtying_faster_than_the_link(rig).await;
}

async fn dirtying_faster_than_the_link(rig: Rig) {
    let (_vm, port) = rig.kvstore_on_a("writer", 20).await;
    let churn = in_ns(&rig.wan, Side::A, async move {
        let r = http(port, "POST", "/churn?mib_per_s=4", None)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        (
            r.status,
            http(port, "GET", "/churn", None).await.unwrap().text(),
        )
    })
    .await;
    assert_eq!(churn.0, 202, "{churn:?}");
    let start = Instant::now();
    let report = tokio::time::timeout(Duration::from_secs(150), rig.start_handoff("writer", TOKEN))
        .await
        .unwrap_or_else(|_| panic!("no convergence in 150 s\n{}", rig.a.log()))
        .unwrap()
        .unwrap_or_else(|e| panic!("handoff: {e}\n{}\n{}", rig.a.log(), rig.b.log()));
    let downtime_ms = (report.destination_resume_us - report.source_stop_us) / 1000;
    let log = rig.a.log();
    let repaired = log.lines().find(|l| l.contains("pages repaired")).map(|l| {
        l.split("pages repaired")
            .last()
            .unwrap_or("")
            .replace('\x1b', "")
    });
    eprintln!("memory repaired: {repaired:?}");
    eprintln!(
        "churning guest over 10 Mbit/s: total {:?}, downtime {downtime_ms} ms, wire {} B, phases {:?}",
        start.elapsed(),
        report.wire_bytes,
        report.phases
    );
    // The target (0.5 s) is measured by the benchmark on a quiet machine;
    // this bound catches a switchover with the link full or a slow pass.
    assert!(downtime_ms < 5000, "downtime {downtime_ms} ms: {report:?}");
    let new_port = port_of(&report.vm.ports[0].endpoint);
    let (missing, churn) = in_ns(&rig.wan, Side::B, async move {
        let mut missing = Vec::new();
        for i in 0..20 {
            let r = http(new_port, "GET", &format!("/kv/k{i}"), None).await;
            if !matches!(&r, Ok(r) if r.status == 200 && r.body == vec![b'x'; 4096]) {
                missing.push(format!("k{i}"));
            }
        }
        let churn = http(new_port, "GET", "/churn", None).await.unwrap().text();
        (missing, churn)
    })
    .await;
    assert!(missing.is_empty(), "lost: {missing:?}");
    assert!(
        rig.a.log().contains("moved memory verified"),
        "{}",
        rig.a.log()
    );
    let churn: serde_json::Value = serde_json::from_str(&churn).unwrap();
    assert_eq!(churn["running"], true, "the app kept running: {churn}");
    // Its clocks stopped while it was throttled: the destination sets them.
    let start = Instant::now();
    while !rig.b.log().contains("guest clock set") {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the destination did not set the guest clock:\n{}",
            rig.b.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Cut the link while the memory streams; the source must give up in
/// bounded time and keep its VM.
async fn cut_midway(prefix: &str) -> Rig {
    let rig = Rig::new(prefix, 10.0).await;
    let (vm, port) = rig.kvstore_on_a("cut", 20).await;
    let handoff = rig.start_handoff("cut", TOKEN);
    rig.wait_streaming("cut").await;
    rig.wan.cut();
    let t = Instant::now();
    let bound = Duration::from_secs(90);
    let outcome = tokio::time::timeout(bound, handoff).await;
    let waited = t.elapsed();
    rig.wan.restore();
    let result = match outcome {
        Ok(r) => r.unwrap(),
        Err(_) => panic!(
            "the handoff hung for {waited:?} on a dead link\n{}",
            rig.a.log()
        ),
    };
    let err = result.expect_err("a handoff over a cut link cannot succeed");
    eprintln!("link cut: the handoff failed after {waited:?}: {err}");
    for l in rig.a.log().lines().filter(|l| l.contains("handoff")) {
        eprintln!("  source: {l}");
    }
    rig.assert_source_keeps(&vm, port, 20).await;
    rig
}

#[tokio::test(flavor = "multi_thread")]
async fn a_link_cut_midway_fails_in_bounded_time_and_the_source_keeps_the_vm() {
    let mut rig = cut_midway("hwcut").await;
    // The destination never hears of the failure (the source's abort went
    // out while the link was cut, and its stream read has no timeout): a
    // restart discards the arrival. See the ignored test below.
    let Rig { b, wan, .. } = &mut rig;
    b.kill();
    b.spawn(wan).await;
    rig.assert_destination_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_link_cut_midway_leaves_the_destination_clean_without_a_restart() {
    let rig = cut_midway("hwcut2").await;
    rig.assert_destination_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_destination_leaves_the_source_running_and_restarts_clean() {
    let mut rig = Rig::new("hwkill", 10.0).await;
    let (vm, port) = rig.kvstore_on_a("victim", 20).await;
    let handoff = rig.start_handoff("victim", TOKEN);
    rig.wait_streaming("victim").await;
    rig.b.kill();
    let t = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(60), handoff)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the handoff hung after the destination died\n{}",
                rig.a.log()
            )
        })
        .unwrap();
    let err = result.expect_err("the destination died");
    eprintln!(
        "destination killed: the handoff failed after {:?}: {err}",
        t.elapsed()
    );
    rig.assert_source_keeps(&vm, port, 20).await;
    // The destination comes back and discards the arrival it never committed.
    let Rig { b, wan, .. } = &mut rig;
    b.spawn(wan).await;
    rig.assert_destination_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_and_wrong_tokens_are_refused_and_leave_nothing_behind() {
    let rig = Rig::new("hwbad", 50.0).await;
    let (vm, port) = rig.kvstore_on_a("stayer", 10).await;

    // A wrong token at the destination: refused, the VM stays.
    let err = rig
        .start_handoff("stayer", "wrong-token")
        .await
        .unwrap()
        .expect_err("a wrong token must be refused");
    assert_eq!(err.status(), Some(409), "{err}");
    assert!(err.to_string().contains("401"), "{err}");
    rig.assert_source_keeps(&vm, port, 10).await;
    rig.assert_destination_clean().await;

    // Nobody can push a VM without a token.
    let (_, base) = tiny_base().await;
    let offer = HandoffOffer {
        protocol: cloudlet_api::HANDOFF_PROTOCOL,
        handoff_id: hex_id(),
        vm_id: format!("intruder{}", hex_id()),
        name: "intruder".into(),
        generation: 1,
        base_id: base.manifest.id.clone(),
        flavor: "small".into(),
        app: AppInfo {
            name: "kvstore".into(),
            ports: vec![8080],
            health_path: Some("/health".into()),
            command: None,
            version: None,
        },
        overlay: "none".into(),
        source: "http://nowhere".into(),
        session_hash: None,
        tenant: None,
    };
    let dest = rig.b.url.clone();
    let statuses = {
        let (dest, offer) = (dest.clone(), offer.clone());
        in_ns(&rig.wan, Side::A, async move {
            let http = reqwest::Client::new();
            let no_token = http
                .post(format!("{dest}/v1/handoff/prepare"))
                .json(&offer)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16();
            let bad_token = http
                .post(format!("{dest}/v1/handoff/{}/stream", offer.handoff_id))
                .bearer_auth("wrong-token")
                .body(vec![0u8; 1000])
                .send()
                .await
                .unwrap()
                .status()
                .as_u16();
            // Garbage to a stream nobody prepared.
            let unknown = http
                .post(format!("{dest}/v1/handoff/{}/stream", hex_id()))
                .bearer_auth(TOKEN)
                .header("content-type", "application/octet-stream")
                .body(garbage(64 * 1024))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16();
            (no_token, bad_token, unknown)
        })
        .await
    };
    assert_eq!(statuses.0, 401, "prepare without a token");
    assert_eq!(statuses.1, 401, "stream with a wrong token");
    assert!(
        (400..500).contains(&statuses.2),
        "garbage to an unknown handoff: {}",
        statuses.2
    );
    rig.assert_destination_clean().await;

    // A prepared arrival fed garbage (random bytes; then a valid session
    // header followed by nonsense; then a session cut short) is discarded.
    let mut magic_then_junk = cloudlet_handoff::session::SESSION_MAGIC.to_vec();
    magic_then_junk.extend(garbage(256 * 1024));
    let bodies = vec![
        ("random bytes", garbage(256 * 1024)),
        ("session header, then junk", magic_then_junk),
        (
            "session header only",
            cloudlet_handoff::session::SESSION_MAGIC.to_vec(),
        ),
    ];
    for (what, body) in bodies {
        let mut offer = offer.clone();
        offer.handoff_id = hex_id();
        let dest = dest.clone();
        let (prepared, streamed) = in_ns(&rig.wan, Side::A, async move {
            let http = reqwest::Client::new();
            let prepared = http
                .post(format!("{dest}/v1/handoff/prepare"))
                .bearer_auth(TOKEN)
                .json(&offer)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16();
            let streamed = http
                .post(format!("{dest}/v1/handoff/{}/stream", offer.handoff_id))
                .bearer_auth(TOKEN)
                .header("content-type", "application/octet-stream")
                .body(body)
                .timeout(Duration::from_secs(60))
                .send()
                .await
                .map(|r| r.status().as_u16());
            (prepared, streamed)
        })
        .await;
        assert_eq!(prepared, 201, "{what}: prepare\n{}", rig.b.log());
        let streamed = streamed.unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            (400..500).contains(&streamed),
            "{what}: the garbage stream answered {streamed}"
        );
        rig.assert_destination_clean().await;
    }
    rig.assert_source_keeps(&vm, port, 10).await;
}

fn hex_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

fn garbage(n: usize) -> Vec<u8> {
    (0..n).map(|_| rand::random::<u8>()).collect()
}
