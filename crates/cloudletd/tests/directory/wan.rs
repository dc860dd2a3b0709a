//! End to end: a device finds its cloudlet through the directory, over an
//! emulated WAN, on real QEMU.
//!
//! A hub namespace plays the device (and hosts the cloud tier: the
//! directory and the overlay registry); three cloudlets each sit behind
//! their own link from it (`cloudlet_wan::Wan::attach`): `near` at 2 ms
//! one way, `mid` at 10 ms, `far` at 40 ms. `near` lacks the base VM; `far`
//! is geographically nearest to where the device says it is (so the
//! directory ranks it above `mid`); `mid` has room for one VM only. The
//! device runs the real `cloudlet synthesize --directory`: the first lands
//! on `mid` (the lowest RTT among those that fit, against the directory's
//! own order), the second on `far` (`mid` is now full), and each answer
//! explains the choice and what was left out.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{cloudlet_bin, in_ns, kvstore_overlay, TOKEN};
use cloudlet_client::{Client, DirectoryClient};
use cloudlet_testkit::tiny_base;
use cloudlet_wan::{Side, Wan, WanConfig};

const API_PORT: u16 = 7450;
const DIR_PORT: u16 = 7470;
const REG_PORT: u16 = 7460;
/// The device's position (CMU, Pittsburgh).
const DEVICE: (f64, f64) = (40.4442, -79.9420);

/// Processes killed when the test ends (cloudletd's QEMUs included).
type Procs = cloudlet_testkit::Reaper;

fn log_file(path: &std::path::Path) -> (Stdio, Stdio) {
    let f = std::fs::File::create(path).unwrap();
    (f.try_clone().unwrap().into(), f.into())
}

struct Cloudlet {
    name: &'static str,
    url: String,
    log: PathBuf,
}

/// Start `cloudletd` in the leaf of `link`.
fn start_cloudlet(
    link: &Wan,
    procs: &mut Procs,
    dir: &std::path::Path,
    name: &'static str,
    bases: Option<&std::path::Path>,
    extra: &str,
) -> Cloudlet {
    let home = dir.join(name).join("home");
    let vm_dir = dir.join(name).join("run");
    std::fs::create_dir_all(&home).unwrap();
    if let Some(b) = bases {
        std::os::unix::fs::symlink(b, home.join("bases")).unwrap();
    }
    let addr = format!("{}:{API_PORT}", link.addr(Side::B));
    let (first, last) = cloudlet_testkit::port_block();
    let config = dir.join(name).join("cloudletd.toml");
    cloudlet_testkit::write_private(
        &config,
        format!(
            "name = \"{name}\"\nlisten = \"{addr}\"\npublic_host = \"{}\"\nhome = \"{}\"\nvm_dir = \"{}\"\ntokens = [\"{TOKEN}\"]\nhost_ports = [{first}, {}]\ndirectory = [\"http://{}:{DIR_PORT}\"]\nplain_http = true\n{extra}",
            link.addr(Side::B),
            home.display(),
            vm_dir.display(),
            last,
            cloudlet_wan::A_ADDR,
        ),
    )
    .unwrap();
    let log = dir.join(name).join("daemon.log");
    let (out, err) = log_file(&log);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cloudletd"));
    cmd.arg("--config")
        .arg(&config)
        .env("CLOUDLET_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    procs
        .children
        .push(link.spawn_in(Side::B, cmd).expect("start cloudletd"));
    procs.vm_dirs.push(vm_dir);
    Cloudlet {
        name,
        url: format!("http://{addr}"),
        log,
    }
}

/// Run the `cloudlet` CLI in the device's namespace; its stdout.
fn cli(hub: &Wan, args: &[&str]) -> String {
    let out = hub
        .spawn_in(Side::A, {
            let mut c = Command::new(cloudlet_bin());
            c.args(args)
                .env("CLOUDLET_TOKEN", TOKEN)
                .env("CLOUDLET_LOG", "warn")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            c
        })
        .expect("run cloudlet")
        .wait_with_output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "cloudlet {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn location(lat: f64, lon: f64) -> String {
    format!("[location]\nlabel = \"\"\nlatitude = {lat}\nlongitude = {lon}\n")
}

/// The cloud tier in the hub (the device's namespace): the directory
/// (heartbeat 1 s, lease 2.5 s) and the registry holding `overlay`; their
/// URLs (the directory's, the overlay's).
async fn cloud_tier(
    hub: &Wan,
    procs: &mut Procs,
    dir: &std::path::Path,
    overlay: &std::path::Path,
) -> (String, String) {
    // The cloud tier, in the hub: the directory and the registry.
    let hub_ip = cloudlet_wan::A_ADDR;
    let token_file = dir.join("registry-token");
    cloudlet_testkit::write_private(&token_file, TOKEN).unwrap();
    let (out, err) = log_file(&dir.join("directory.log"));
    let mut c = Command::new(cloudlet_bin());
    c.args(["directory", "serve", "--listen"])
        .arg(format!("0.0.0.0:{DIR_PORT}"))
        .arg("--store")
        .arg(dir.join("directory.redb"))
        .args([
            "--heartbeat-ms",
            "1000",
            "--lease-ms",
            "2500",
            "--plain-http",
        ])
        .stdout(out)
        .stderr(err);
    procs.children.push(hub.spawn_in(Side::A, c).unwrap());
    let (out, err) = log_file(&dir.join("registry.log"));
    let mut c = Command::new(cloudlet_bin());
    c.args(["registry", "serve"])
        .arg(dir.join("registry"))
        .arg("--listen")
        .arg(format!("0.0.0.0:{REG_PORT}"))
        .arg("--plain-http")
        .arg("--push-token-file")
        .arg(&token_file)
        .stdout(out)
        .stderr(err);
    procs.children.push(hub.spawn_in(Side::A, c).unwrap());
    let dir_url = format!("http://{hub_ip}:{DIR_PORT}");
    let reg_url = format!("http://{hub_ip}:{REG_PORT}");
    let health = [format!("{dir_url}/v1/health"), format!("{reg_url}/health")];
    let up = in_ns(hub, Side::A, async move {
        cloudlet_testkit::until_healthy(&health, Duration::from_secs(20)).await
    })
    .await;
    assert!(up, "the directory or the registry did not come up");
    cli(
        hub,
        &[
            "registry",
            "push",
            overlay.to_str().unwrap(),
            "--registry",
            &reg_url,
            "--name",
            "kvstore",
            "--registry-token-file",
            token_file.to_str().unwrap(),
        ],
    );
    let overlay_url = format!("{reg_url}/v1/overlays/kvstore");
    (dir_url, overlay_url)
}

#[tokio::test(flavor = "multi_thread")]
async fn synthesis_lands_on_the_nearest_cloudlet_that_fits() {
    let overlay = kvstore_overlay().await;
    let (store, _) = tiny_base().await;
    let _ = cloudlet_wan::cleanup_stale();
    let link = |ms| WanConfig::new("dirwan", 200.0, Duration::from_millis(ms));
    let hub = Wan::create(link(2)).expect("the near link");
    let mid_link = Wan::attach(&hub, link(10)).expect("the mid link");
    let far_link = Wan::attach(&hub, link(40)).expect("the far link");
    // Each leaf reaches the hub's every address (the cloud tier listens on
    // link 0's) through its own link.
    for l in [&hub, &mid_link, &far_link] {
        l.route_via_hub().expect("route the leaf through the hub");
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut procs = Procs::default();

    let (dir_url, overlay_url) = cloud_tier(&hub, &mut procs, tmp.path(), &overlay).await;

    // Three cloudlets: near lacks the base; far is geographically nearest.
    let bases = store.bases_dir();
    let near = start_cloudlet(
        &hub,
        &mut procs,
        tmp.path(),
        "near",
        None,
        &location(40.4443, -79.9421),
    );
    let mid = start_cloudlet(
        &mid_link,
        &mut procs,
        tmp.path(),
        "mid",
        Some(&bases),
        &format!(
            "{}[capacity]\nvcpus = 4\nmemory_mib = 4096\nvms = 1\n",
            location(40.60, -79.90)
        ),
    );
    let far = start_cloudlet(
        &far_link,
        &mut procs,
        tmp.path(),
        "far",
        Some(&bases),
        &location(40.4450, -79.9430),
    );
    let registered = {
        let d = dir_url.clone();
        in_ns(&hub, Side::A, async move {
            let client = DirectoryClient::new(&[d], None);
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(40) {
                if client.health().await.is_ok_and(|h| h.registered == 3) {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            false
        })
        .await
    };
    let logs = || {
        [&near, &mid, &far]
            .iter()
            .map(|c| {
                format!(
                    "--- {}\n{}",
                    c.name,
                    std::fs::read_to_string(&c.log).unwrap_or_default()
                )
            })
            .collect::<String>()
    };
    assert!(registered, "not all three registered:\n{}", logs());

    let near_arg = format!("{},{}", DEVICE.0, DEVICE.1);
    let synthesize = |name: &str| {
        cli(
            &hub,
            &[
                "synthesize",
                &overlay_url,
                "--name",
                name,
                "--directory",
                &dir_url,
                "--near",
                &near_arg,
            ],
        )
    };
    let first = synthesize("first");
    println!("first synthesis:\n{first}");
    assert!(first.contains("chosen: mid (lowest RTT"), "{first}");
    assert!(
        first.contains("left out: near (does not hold base"),
        "{first}"
    );
    // The directory ranked far first: the device's RTT probes overrode it.
    assert!(first.contains("#1 far"), "{first}");
    let rtt = |text: &str, name: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.contains(&format!(" {name} http")))
            .unwrap_or_else(|| panic!("no line of {name}: {text}"));
        let after = line.split("rtt ").nth(1).unwrap();
        after.split(' ').next().unwrap().parse().unwrap()
    };
    let (mid_rtt, far_rtt) = (rtt(&first, "mid"), rtt(&first, "far"));
    assert!(
        (20.0..40.0).contains(&mid_rtt) && (80.0..110.0).contains(&far_rtt),
        "RTTs: mid {mid_rtt} ms, far {far_rtt} ms"
    );

    let on = |c: &Cloudlet| {
        let client = Client::new(&c.url, Some(TOKEN.into()));
        in_ns(&hub, Side::A, async move {
            client
                .list_vms()
                .await
                .unwrap()
                .into_iter()
                .map(|v| v.name)
                .collect::<Vec<_>>()
        })
    };
    assert_eq!(on(&mid).await, ["first"], "{}", logs());
    assert!(on(&far).await.is_empty());

    // mid is full now (one VM slot): the next lands on far.
    let start = Instant::now();
    loop {
        let d = dir_url.clone();
        let free = in_ns(&hub, Side::A, async move {
            reqwest::get(format!("{d}/v1/cloudlets/mid"))
                .await
                .unwrap()
                .json::<cloudlet_api::directory::Registration>()
                .await
                .unwrap()
                .free
                .vms
        })
        .await;
        if free == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "mid never told it is full"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let second = synthesize("second");
    println!("second synthesis:\n{second}");
    assert!(second.contains("chosen: far (lowest RTT"), "{second}");
    assert!(second.contains("left out: mid (full"), "{second}");
    assert_eq!(on(&far).await, ["second"]);
}

/// One HTTP/1.1 request to 127.0.0.1:`port` (in the caller's namespace),
/// the connection closed after: its status, or none within `within`.
async fn request(
    port: u16,
    method: &str,
    path: &str,
    body: &[u8],
    within: Duration,
) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let call = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.ok()?;
        s.write_all(body).await.ok()?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.ok()?;
        let text = String::from_utf8_lossy(&out);
        text.split(' ').nth(1)?.parse().ok()
    };
    tokio::time::timeout(within, call).await.ok().flatten()
}

/// Follow me: the device (the hub) starts near `a` (2 ms one way) and far
/// from `b` (30 ms); the delays swap (the user walks to `b`) and the VM
/// moves there by itself, then back when they swap again. A kvstore client
/// writes through the session's local forwarder the whole time: no
/// acknowledged write is lost, its RTT comes back to the near value. A
/// delay that wavers inside the policy's margin moves nothing. Consent is
/// "ask": a move waits for the device's yes, and a no keeps the VM where
/// it is until the next yes.
#[tokio::test(flavor = "multi_thread")]
async fn the_back_end_follows_the_device_by_itself() {
    use cloudlet_client::session::{Consent, Policy, Session, SessionEvent};
    let overlay = kvstore_overlay().await;
    let (store, base) = tiny_base().await;
    let _ = cloudlet_wan::cleanup_stale();
    let link = |ms| WanConfig::new("follow", 200.0, Duration::from_millis(ms));
    let a_link = Wan::create(link(2)).expect("link to a");
    let b_link = Wan::attach(&a_link, link(30)).expect("link to b");
    // The leaves reach the hub and each other through it (a handoff from
    // a to b crosses both links).
    for l in [&a_link, &b_link] {
        l.route_via_hub().unwrap();
    }
    let hub = &a_link;
    let tmp = tempfile::tempdir().unwrap();
    let mut procs = Procs::default();
    let (dir_url, overlay_url) = cloud_tier(hub, &mut procs, tmp.path(), &overlay).await;
    let bases = store.bases_dir();
    let a = start_cloudlet(
        &a_link,
        &mut procs,
        tmp.path(),
        "a",
        Some(&bases),
        &location(40.44, -79.94),
    );
    let b = start_cloudlet(
        &b_link,
        &mut procs,
        tmp.path(),
        "b",
        Some(&bases),
        &location(40.45, -79.95),
    );
    let _ = (&a, &b);

    // The device's side, in the hub: the session, its forwarder, a writer.
    let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel::<SessionEvent>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    // Consent "ask": each move waits for the device's answer (the test's).
    type Question = (String, tokio::sync::oneshot::Sender<bool>);
    let (ask_tx, mut ask_rx) = tokio::sync::mpsc::unbounded_channel::<Question>();
    let fwd_port = cloudlet_testkit::free_port();
    let base_id = base.manifest.id.clone();
    let d = dir_url.clone();
    let session = hub
        .run_in(Side::A, async move {
            let directory = cloudlet_client::DirectoryClient::new(&[d], None);
            // Every cloudlet must be registered before the first search.
            let start = Instant::now();
            while !directory.health().await.is_ok_and(|h| h.registered == 2) {
                assert!(start.elapsed() < Duration::from_secs(30), "not registered");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let mut s = Session::start(directory, Some(TOKEN.into()), &overlay_url, &base_id, None)
                .await
                .expect("start the session");
            let mut events = s.events();
            let tx = ev_tx.clone();
            tokio::spawn(async move {
                while let Ok(e) = events.recv().await {
                    let _ = tx.send(e);
                }
            });
            let _ = ev_tx.send(SessionEvent::Started {
                cloudlet: s.state().cloudlet.clone(),
                ports: s.endpoints().borrow().clone(),
            });
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", fwd_port))
                .await
                .unwrap();
            tokio::spawn(cloudlet_client::forward::forward(
                listener,
                8080,
                s.endpoints(),
            ));
            let policy = Policy {
                probe_every: Duration::from_secs(1),
                min_interval: Duration::from_secs(5),
                consent: Consent::Ask,
                ..Policy::default()
            };
            let ask = move |to: &str| {
                let (yes_tx, yes_rx) = tokio::sync::oneshot::channel();
                let _ = ask_tx.send((to.to_string(), yes_tx));
                async move { yes_rx.await.unwrap_or(false) }
            };
            s.follow(policy, ask, async {
                let _ = stop_rx.await;
            })
            .await;
            s.state().clone()
        })
        .unwrap();
    let started = loop {
        match tokio::time::timeout(Duration::from_secs(90), ev_rx.recv()).await {
            Ok(Some(SessionEvent::Started { cloudlet, .. })) => break cloudlet,
            Ok(Some(_)) => {}
            other => panic!("the session did not start: {other:?}"),
        }
    };
    assert_eq!(started, "a", "the nearest cloudlet first");

    // The writer: PUTs through the forwarder, one every 50 ms.
    let (wstop_tx, wstop_rx) = tokio::sync::watch::channel(false);
    let writer = hub
        .run_in(Side::A, async move {
            let mut acked = Vec::new();
            let (mut last_ok, mut longest) = (Instant::now(), Duration::ZERO);
            let mut i = 0;
            while !*wstop_rx.borrow() {
                let key = format!("k{i}");
                let got = request(
                    fwd_port,
                    "PUT",
                    &format!("/kv/{key}"),
                    b"value",
                    Duration::from_secs(2),
                )
                .await;
                if got == Some(201) {
                    acked.push(key);
                    longest = longest.max(last_ok.elapsed());
                    last_ok = Instant::now();
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (acked, longest)
        })
        .unwrap();

    // No flapping: a at 10 ms, b wavering 8-9 ms for 8 s: better every
    // round (RTT 16-18 ms against 20), never by 30% and 5 ms: no move.
    a_link.set_delay(Duration::from_millis(10)).unwrap();
    let wavering = Instant::now();
    let mut flip = false;
    while wavering.elapsed() < Duration::from_secs(8) {
        b_link
            .set_delay(Duration::from_millis(if flip { 8 } else { 9 }))
            .unwrap();
        flip = !flip;
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let mut rounds = 0;
    while let Ok(e) = ev_rx.try_recv() {
        match e {
            SessionEvent::Probed { .. } => rounds += 1,
            SessionEvent::MoveTriggered { to, .. } => {
                panic!("a move to {to} on a delay inside the margin")
            }
            _ => {}
        }
    }
    println!("wavering delays: {rounds} probe rounds, no move");
    assert!(rounds >= 5, "the session kept probing: {rounds} rounds");

    // The user walks to b, then back. Consent "ask": the first question
    // is left unanswered a while (nothing moves meanwhile), then a yes; on
    // the way back the first answer is no (the VM stays), the next yes.
    let mut moves = Vec::new();
    for (to, a_ms, b_ms) in [("b", 30, 2), ("a", 2, 30)] {
        a_link.set_delay(Duration::from_millis(a_ms)).unwrap();
        b_link.set_delay(Duration::from_millis(b_ms)).unwrap();
        let swapped = Instant::now();
        let mut triggered = None;
        let mut asked = 0;
        let rtt = loop {
            let e = tokio::select! {
                q = ask_rx.recv() => {
                    let (q_to, answer) = q.expect("the session ended");
                    assert_eq!(q_to, to, "asked to move elsewhere");
                    asked += 1;
                    // Unanswered for 3 s: the VM stays where it is.
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    while let Ok(e) = ev_rx.try_recv() {
                        match e {
                            SessionEvent::MoveTriggered { to: t, .. } if t == to => {
                                triggered.get_or_insert(swapped.elapsed());
                            }
                            SessionEvent::MoveCompleted { .. } => {
                                panic!("moved without the device's yes: {e:?}")
                            }
                            _ => {}
                        }
                    }
                    let no_first = to == "a" && asked == 1;
                    let _ = answer.send(!no_first);
                    continue;
                }
                e = tokio::time::timeout(Duration::from_secs(120), ev_rx.recv()) => e
                    .unwrap_or_else(|_| panic!("no move to {to} within 120 s"))
                    .expect("the session ended"),
            };
            match e {
                SessionEvent::MoveDeclined { to: t } => {
                    assert!(to == "a" && asked == 1, "declined unasked: {t}");
                    println!("the device said no to {t}: the VM stays");
                }
                SessionEvent::MoveTriggered { to: t, .. } if t == to => {
                    triggered.get_or_insert(swapped.elapsed());
                }
                SessionEvent::MoveCompleted {
                    to: t,
                    downtime_ms,
                    total_ms,
                    ..
                } if t == to => {
                    println!(
                        "moved to {to}: triggered {:?} after the swap, handoff {total_ms} ms, downtime {downtime_ms} ms",
                        triggered.unwrap()
                    );
                    moves.push((to, triggered.unwrap(), total_ms));
                }
                SessionEvent::MoveFailed { error, .. } => panic!("move failed: {error}"),
                SessionEvent::Probed {
                    current,
                    current_ms,
                    ..
                } if current == to && moves.last().is_some_and(|m| m.0 == to) => {
                    break current_ms;
                }
                _ => {}
            }
        };
        println!("RTT to {to} after the move: {rtt:.1} ms");
        assert_eq!(
            asked,
            if to == "a" { 2 } else { 1 },
            "questions on the way to {to}"
        );
        // Near is 2 ms each way, far 30 ms: the probe after the move is on
        // the near side when it is well under the far RTT (60 ms). Under
        // TCG with another VM test beside it a near probe took 11 ms once,
        // so no tighter bound than half the far RTT.
        assert!(rtt < 30.0, "the RTT came back to the near value: {rtt} ms");
        let t = moves.last().unwrap().1;
        assert!(
            t < Duration::from_secs(10),
            "triggered {t:?} after the swap"
        );
    }
    let _ = wstop_tx.send(true);
    let (acked, longest) = writer.await.unwrap();
    let written = acked.len();
    // Every acknowledged write is in the VM, read through the forwarder.
    // A read that gets no answer (a guest slowed down by a loaded host) is
    // asked again; what counts is the status the VM gives.
    let missing = hub
        .run_in(Side::A, async move {
            let mut missing = Vec::new();
            for k in acked {
                let mut status = None;
                for _ in 0..3 {
                    status = request(
                        fwd_port,
                        "GET",
                        &format!("/kv/{k}"),
                        b"",
                        Duration::from_secs(5),
                    )
                    .await;
                    if status.is_some() {
                        break;
                    }
                }
                if status != Some(200) {
                    missing.push((k, status));
                }
            }
            missing
        })
        .unwrap()
        .await
        .unwrap();
    assert!(missing.is_empty(), "acknowledged writes lost: {missing:?}");
    let _ = stop_tx.send(());
    let state = session.await.unwrap();
    assert_eq!(state.cloudlet, "a");
    println!("{written} writes acknowledged; the longest interruption the client saw: {longest:?}");
}
