//! End-to-end tests of the emulated link: RTT, throughput, cut/restore, teardown, and
//! a hub with several links.
//!
//! They need root (namespaces, TUN, tc) and are skipped with a message otherwise. They
//! run one at a time (a process-wide lock) because the throughput checks would
//! otherwise compete for the CPU with each other.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cloudlet_wan::{cleanup_stale, list_ours, NsName, Side, Wan, WanConfig, A_ADDR, B_ADDR};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

static SERIAL: Mutex<()> = Mutex::new(());

/// The lock that serialises the tests, or `None` when not root.
fn setup() -> Option<MutexGuard<'static, ()>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root for network namespaces");
        return None;
    }
    Some(SERIAL.lock().unwrap_or_else(|e| e.into_inner()))
}

fn netns_list() -> String {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts an echo server in B on `port`; returns once it listens.
fn echo_server(wan: &Wan, port: u16) {
    let addr = SocketAddr::from((wan.b_addr(), port));
    let (tx, rx) = std::sync::mpsc::channel();
    // Detached: it ends with the namespace thread when the test process exits.
    let _server = wan
        .run_in(Side::B, async move {
            let listener = TcpListener::bind(addr).await.unwrap();
            tx.send(()).unwrap();
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let (mut r, mut w) = sock.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        })
        .unwrap();
    rx.recv().unwrap();
}

/// Times `warmup + n` small request/response round trips on `sock` and returns the
/// last `n`.
async fn round_trips(sock: &mut TcpStream, warmup: usize, n: usize) -> Vec<Duration> {
    let mut buf = [0u8; 64];
    let mut samples = Vec::new();
    for i in 0..warmup + n {
        let t = Instant::now();
        sock.write_all(&[i as u8; 64]).await.unwrap();
        sock.read_exact(&mut buf).await.unwrap();
        if i >= warmup {
            samples.push(t.elapsed());
        }
    }
    samples
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// Median of `n` small request/response round trips over one TCP connection.
fn tcp_rtt(wan: &Wan, port: u16, n: usize) -> Duration {
    let addr = SocketAddr::from((wan.b_addr(), port));
    wan.run_in(Side::A, async move {
        let mut sock = TcpStream::connect(addr).await.unwrap();
        sock.set_nodelay(true).unwrap();
        // The first two warm up the connection.
        median(round_trips(&mut sock, 2, n).await)
    })
    .unwrap()
    .join()
    .unwrap()
}

/// Sends from A to B for `duration` and returns B's receive rate in Mbit/s, measured
/// from `skip` after the first byte (past slow start) to the end.
fn bulk_mbit(wan: &Wan, port: u16, duration: Duration, skip: Duration) -> f64 {
    let addr = SocketAddr::from((wan.b_addr(), port));
    let (tx, rx) = std::sync::mpsc::channel();
    let server = wan
        .run_in(Side::B, async move {
            let listener = TcpListener::bind(addr).await.unwrap();
            tx.send(()).unwrap();
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 1 << 16];
            let mut start: Option<Instant> = None;
            let mut window: Option<(Instant, u64)> = None;
            let mut total = 0u64;
            let mut last = Instant::now();
            loop {
                let n = sock.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                last = Instant::now();
                let s = *start.get_or_insert(last);
                if window.is_none() && last - s >= skip {
                    window = Some((last, total));
                }
                total += n as u64;
            }
            let (w_start, w_bytes) = window.expect("transfer shorter than skip");
            (total - w_bytes) as f64 * 8.0 / (last - w_start).as_secs_f64() / 1e6
        })
        .unwrap();
    rx.recv().unwrap();
    wan.run_in(Side::A, async move {
        let mut sock = TcpStream::connect(addr).await.unwrap();
        let chunk = vec![0x5au8; 1 << 16];
        let end = Instant::now() + duration;
        while Instant::now() < end {
            sock.write_all(&chunk).await.unwrap();
        }
        sock.shutdown().await.unwrap();
    })
    .unwrap()
    .join()
    .unwrap();
    server.join().unwrap()
}

fn assert_within(what: &str, measured: f64, expected: f64, tolerance: f64) {
    // A loaded 2-core machine adds scheduling delay of a few ms: allow that
    // much on top of the relative tolerance (matters for small delays).
    let slack = if what.contains("RTT") { 0.012 } else { 0.0 };
    let err = ((measured - expected).abs() - slack).max(0.0) / expected;
    assert!(
        err <= tolerance,
        "{what}: measured {measured:.2}, expected {expected:.2} +-{:.0}%",
        tolerance * 100.0
    );
}

#[test]
fn rtt_is_twice_the_one_way_delay_and_follows_set_delay() {
    let Some(_serial) = setup() else { return };
    let wan = Wan::create(WanConfig::new("trtt", 20.0, Duration::from_millis(25))).unwrap();
    echo_server(&wan, 7001);
    let rtt = tcp_rtt(&wan, 7001, 20);
    eprintln!("20 Mbit/s, 25 ms one way: RTT {rtt:?}");
    assert_within("RTT at 25 ms", rtt.as_secs_f64(), 0.050, 0.3);

    wan.set_delay(Duration::from_millis(5)).unwrap();
    let rtt = tcp_rtt(&wan, 7001, 20);
    eprintln!("20 Mbit/s, 5 ms one way: RTT {rtt:?}");
    assert_within("RTT at 5 ms", rtt.as_secs_f64(), 0.010, 0.3);
    wan.teardown().unwrap();
}

#[test]
fn bulk_throughput_matches_rate_at_20_and_50_mbit() {
    let Some(_serial) = setup() else { return };
    let wan = Wan::create(WanConfig::new("tbulk", 20.0, Duration::from_millis(20))).unwrap();
    let run = Duration::from_millis(3500);
    let skip = Duration::from_millis(1000);

    let mbit = bulk_mbit(&wan, 7010, run, skip);
    eprintln!("rate 20 Mbit/s, 20 ms one way: {mbit:.2} Mbit/s");
    assert_within("throughput at 20 Mbit/s", mbit, 20.0, 0.2);

    wan.set_rate(50.0).unwrap();
    let mbit = bulk_mbit(&wan, 7011, run, skip);
    eprintln!("rate 50 Mbit/s, 20 ms one way: {mbit:.2} Mbit/s");
    assert_within("throughput at 50 Mbit/s", mbit, 50.0, 0.2);

    let stats = wan.stats();
    eprintln!("{stats:?}");
    assert!(stats.a_to_b.bytes > 20_000_000, "{stats:?}");
    assert!(stats.b_to_a.packets > 0, "acks flow back: {stats:?}");
    wan.teardown().unwrap();
}

#[test]
fn cut_stalls_connections_and_restore_brings_them_back() {
    let Some(_serial) = setup() else { return };
    let wan = Wan::create(WanConfig::new("tcut", 20.0, Duration::from_millis(10))).unwrap();
    echo_server(&wan, 7020);
    let addr = SocketAddr::from((wan.b_addr(), 7020));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(1);
    let (cut_tx, mut cut_rx) = tokio::sync::mpsc::channel::<()>(1);
    let client = wan
        .run_in(Side::A, async move {
            let mut sock = TcpStream::connect(addr).await.unwrap();
            let mut buf = [0u8; 5];
            sock.write_all(b"hello").await.unwrap();
            sock.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"hello");
            ready_tx.send(()).await.unwrap();
            cut_rx.recv().await.unwrap(); // link is cut now

            sock.write_all(b"stall").await.unwrap();
            let stalled = tokio::time::timeout(Duration::from_millis(1500), async {
                sock.read_exact(&mut buf).await
            })
            .await;
            assert!(stalled.is_err(), "echo came back over a cut link");
            let connect =
                tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await;
            assert!(!matches!(connect, Ok(Ok(_))), "connected over a cut link");
            ready_tx.send(()).await.unwrap();
            cut_rx.recv().await.unwrap(); // link is restored now

            let t = Instant::now();
            tokio::time::timeout(Duration::from_secs(10), sock.read_exact(&mut buf))
                .await
                .expect("no recovery within 10 s after restore")
                .unwrap();
            assert_eq!(&buf, b"stall");
            let recovered = t.elapsed();
            let mut fresh = TcpStream::connect(addr).await.unwrap();
            fresh.write_all(b"again").await.unwrap();
            fresh.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"again");
            recovered
        })
        .unwrap();
    ready_rx.blocking_recv().unwrap();
    wan.cut();
    assert!(wan.is_cut());
    cut_tx.blocking_send(()).unwrap();
    ready_rx.blocking_recv().unwrap();
    wan.restore();
    cut_tx.blocking_send(()).unwrap();
    let recovered = client.join().unwrap();
    eprintln!("stalled connection recovered {recovered:?} after restore");
    let stats = wan.stats();
    assert!(stats.a_to_b.dropped_cut > 0, "{stats:?}");
    wan.teardown().unwrap();
}

#[test]
fn namespaces_are_isolated_and_reachable_by_processes() {
    let Some(_serial) = setup() else { return };
    let wan = Wan::create(WanConfig::new("tproc", 50.0, Duration::from_millis(1))).unwrap();
    // Only loopback and the link, with our address, exist in A.
    let mut cmd = Command::new("ip");
    cmd.args(["-o", "-4", "addr", "show"])
        .stdout(Stdio::piped());
    let out = wan
        .spawn_in(Side::A, cmd)
        .unwrap()
        .wait_with_output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let addrs: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .collect();
    assert_eq!(addrs, ["127.0.0.1/8", "10.251.0.1"], "{text}");
    // Routes: only the peer, no default route out of the namespace.
    let out = wan
        .command_in(Side::B, "ip")
        .args(["-4", "route", "show"])
        .output()
        .unwrap();
    let routes = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        routes.trim(),
        "10.251.0.1 dev wan0 proto kernel scope link src 10.251.0.2"
    );
    // Loopback is up inside the namespace.
    let lo = wan
        .run_in(Side::B, async {
            let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 7030))
                .await
                .unwrap();
            let c = TcpStream::connect((Ipv4Addr::LOCALHOST, 7030)).await;
            drop(l);
            c.is_ok()
        })
        .unwrap()
        .join()
        .unwrap();
    assert!(lo);
    wan.teardown().unwrap();
}

#[test]
fn random_loss_drops_about_the_configured_share() {
    let Some(_serial) = setup() else { return };
    let mut config = WanConfig::new("tloss", 50.0, Duration::from_millis(2));
    config.loss = 0.2;
    let wan = Wan::create(config).unwrap();
    let b = SocketAddr::from((wan.b_addr(), 7040));
    let (tx, rx) = std::sync::mpsc::channel();
    let receiver = wan
        .run_in(Side::B, async move {
            let sock = tokio::net::UdpSocket::bind(b).await.unwrap();
            tx.send(()).unwrap();
            let mut buf = [0u8; 256];
            let mut got = 0u32;
            while let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_millis(500), sock.recv(&mut buf)).await
            {
                got += 1;
            }
            got
        })
        .unwrap();
    rx.recv().unwrap();
    wan.run_in(Side::A, async move {
        let sock = tokio::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
            .await
            .unwrap();
        for _ in 0..2000 {
            sock.send_to(&[7u8; 100], b).await.unwrap();
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
    })
    .unwrap()
    .join()
    .unwrap();
    let got = receiver.join().unwrap();
    let stats = wan.stats();
    eprintln!("loss 0.2: {got} of 2000 datagrams arrived; {stats:?}");
    assert!((1450..=1750).contains(&got), "{got} of 2000 arrived");
    assert_eq!(
        stats.a_to_b.dropped_loss + u64::from(got),
        2000,
        "{stats:?}"
    );
    wan.teardown().unwrap();
}

#[test]
fn teardown_drop_and_cleanup_leave_no_namespace() {
    let Some(_serial) = setup() else { return };
    let wan = Wan::create(WanConfig::new("tdown", 10.0, Duration::from_millis(5))).unwrap();
    let names = [
        wan.ns_name(Side::A).to_string(),
        wan.ns_name(Side::B).to_string(),
    ];
    assert!(names.iter().all(|n| netns_list().contains(n.as_str())));
    wan.teardown().unwrap();
    let list = netns_list();
    assert!(names.iter().all(|n| !list.contains(n.as_str())), "{list}");

    let wan = Wan::create(WanConfig::new("tdrop", 10.0, Duration::from_millis(5))).unwrap();
    let name = wan.ns_name(Side::B).to_string();
    drop(wan);
    assert!(!netns_list().contains(&name));

    // A namespace left by a process that no longer exists is stale.
    let mut child = Command::new("true").spawn().unwrap();
    let dead_pid = child.id();
    child.wait().unwrap();
    let stale = format!("clw-tstale-{dead_pid}-0-a");
    let ok = Command::new("ip")
        .args(["netns", "add", &stale])
        .status()
        .unwrap();
    assert!(ok.success());
    let removed = cleanup_stale().unwrap();
    assert!(removed.contains(&stale), "{removed:?}");
    assert!(!netns_list().contains(&stale));
}

/// From inside the hub (namespace A of `from`), the median of `n` round trips to each
/// of `leaves`, in order, over one kept-alive connection per leaf: all connect and
/// warm up first, then each of `n` rounds visits every leaf in turn (so that a load
/// spike on the machine hits all alike).
fn hub_rtts(from: &Wan, leaves: &[SocketAddr], n: usize) -> Vec<Duration> {
    let leaves = leaves.to_vec();
    from.run_in(Side::A, async move {
        let mut socks = Vec::new();
        for addr in &leaves {
            let mut sock = TcpStream::connect(addr).await.unwrap();
            sock.set_nodelay(true).unwrap();
            round_trips(&mut sock, 2, 0).await;
            socks.push(sock);
        }
        let mut samples = vec![Vec::new(); socks.len()];
        for _ in 0..n {
            for (sock, s) in socks.iter_mut().zip(&mut samples) {
                s.extend(round_trips(sock, 0, 1).await);
            }
        }
        samples.into_iter().map(median).collect()
    })
    .unwrap()
    .join()
    .unwrap()
}

/// Each RTT is within [2d, 2d + 15 ms] of its link's one-way delay `d`, and longer
/// links have longer RTTs.
fn assert_rtts_follow_delays(what: &str, rtts: &[Duration], delays_ms: &[u64]) {
    eprintln!("{what}: one-way delays {delays_ms:?} ms, RTTs {rtts:?}");
    for (rtt, d) in rtts.iter().zip(delays_ms) {
        let low = Duration::from_millis(2 * d);
        let high = low + Duration::from_millis(15);
        assert!(
            (low..=high).contains(rtt),
            "{what}: RTT {rtt:?} over a {d} ms link, expected {low:?}..={high:?}"
        );
    }
    for (i, j) in [(0, 1), (1, 2), (0, 2)] {
        if i < rtts.len().min(delays_ms.len()) && j < rtts.len().min(delays_ms.len()) {
            assert_eq!(
                rtts[i] < rtts[j],
                delays_ms[i] < delays_ms[j],
                "{what}: RTTs {rtts:?} not ordered like delays {delays_ms:?}"
            );
        }
    }
}

/// Output of `program args` run in `side` of `wan`.
fn output_in(wan: &Wan, side: Side, program: &str, args: &[&str]) -> String {
    let out = wan.command_in(side, program).args(args).output().unwrap();
    assert!(out.status.success(), "{program} {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The IPv4 addresses in `side` of `wan`, as `ip -o -4 addr show` lists them.
fn addrs_in(wan: &Wan, side: Side) -> Vec<String> {
    output_in(wan, side, "ip", &["-o", "-4", "addr", "show"])
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3).map(str::to_string))
        .collect()
}

/// Names of this process's namespaces that still exist.
fn our_namespaces() -> Vec<String> {
    list_ours()
        .into_iter()
        .filter(|n| n.pid == std::process::id())
        .map(|n| n.render())
        .collect()
}

const HUB_PORT: u16 = 7200;

fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

#[test]
fn hub_links_have_their_own_addresses_delays_and_knobs() {
    let Some(_serial) = setup() else { return };
    let delays = [2, 10, 40];
    let hub = Wan::create(WanConfig::new("thub", 50.0, ms(delays[0]))).unwrap();
    let link1 = Wan::attach(&hub, WanConfig::new("thub", 50.0, ms(delays[1]))).unwrap();
    // Any link of the hub can be attached to: they share A and the link counter.
    let link2 = Wan::attach(&link1, WanConfig::new("thub", 50.0, ms(delays[2]))).unwrap();
    let links = [&hub, &link1, &link2];
    for (k, link) in links.iter().enumerate() {
        let dev = format!("wan{k}");
        assert_eq!(link.link_index(), k as u8);
        assert_eq!(link.a_addr(), Ipv4Addr::new(10, 251, k as u8, 1));
        assert_eq!(link.b_addr(), Ipv4Addr::new(10, 251, k as u8, 2));
        assert_eq!(link.addr(Side::B), link.b_addr());
        assert_eq!((link.device(Side::A), link.device(Side::B)), (&*dev, &*dev));
        assert_eq!(link.ns_name(Side::A), hub.ns_name(Side::A));
        // Each leaf has its own namespace, named like any other, with its own seq.
        let b = NsName::parse(link.ns_name(Side::B)).unwrap();
        assert_eq!(
            (b.prefix.as_str(), b.pid, b.side),
            ("thub", std::process::id(), 'b')
        );
        assert_eq!(
            addrs_in(link, Side::B),
            ["127.0.0.1/8", &*link.b_addr().to_string()]
        );
        let routes = output_in(link, Side::B, "ip", &["-4", "route", "show"]);
        assert_eq!(
            routes.trim(),
            format!(
                "{} dev {dev} proto kernel scope link src {}",
                link.a_addr(),
                link.b_addr()
            )
        );
    }
    assert_eq!((hub.a_addr(), hub.b_addr()), (A_ADDR, B_ADDR));
    let seqs: Vec<u32> = links
        .iter()
        .map(|l| NsName::parse(l.ns_name(Side::B)).unwrap().seq)
        .collect();
    assert!(seqs[0] < seqs[1] && seqs[1] < seqs[2], "{seqs:?}");
    assert_eq!(
        addrs_in(&hub, Side::A),
        ["127.0.0.1/8", "10.251.0.1", "10.251.1.1", "10.251.2.1"]
    );

    for link in links {
        echo_server(link, HUB_PORT);
    }
    let leaves: Vec<SocketAddr> = links
        .iter()
        .map(|l| (l.b_addr(), HUB_PORT).into())
        .collect();
    let rtts = hub_rtts(&link2, &leaves, 5);
    assert_rtts_follow_delays("hub, three links", &rtts, &delays);

    // Knobs act on their own link only.
    link1.set_delay(ms(20)).unwrap();
    let rtts = hub_rtts(&hub, &leaves, 5);
    assert_rtts_follow_delays("link 1 at 20 ms", &rtts, &[2, 20, 40]);
    link2.set_rate(5.0).unwrap();
    let qdisc = |dev: &str| output_in(&hub, Side::A, "tc", &["qdisc", "show", "dev", dev]);
    assert!(qdisc("wan2").contains("rate 5Mbit"), "{}", qdisc("wan2"));
    assert!(qdisc("wan0").contains("rate 50Mbit"), "{}", qdisc("wan0"));
    let leaf_qdisc = output_in(&link2, Side::B, "tc", &["qdisc", "show", "dev", "wan2"]);
    assert!(leaf_qdisc.contains("rate 5Mbit"), "{leaf_qdisc}");

    link1.cut();
    let others = [leaves[0], leaves[2]];
    let rtts = hub_rtts(&hub, &others, 5);
    assert_rtts_follow_delays("link 1 cut", &rtts, &[2, 40]);
    let to_cut = leaves[1];
    let connected = hub
        .run_in(Side::A, async move {
            let connect = TcpStream::connect(to_cut);
            matches!(tokio::time::timeout(ms(500), connect).await, Ok(Ok(_)))
        })
        .unwrap()
        .join()
        .unwrap();
    assert!(!connected, "connected over a cut link");
    assert!(link1.is_cut() && !hub.is_cut() && !link2.is_cut());
    link1.restore();
    let rtts = hub_rtts(&hub, &leaves, 5);
    assert_rtts_follow_delays("link 1 restored", &rtts, &[2, 20, 40]);
    let stats = links.map(|l| l.stats());
    eprintln!("{stats:?}");
    assert!(stats[1].a_to_b.dropped_cut > 0, "{stats:?}");
    assert_eq!(stats[0].a_to_b.dropped_cut + stats[2].a_to_b.dropped_cut, 0);
    assert!(stats.iter().all(|s| s.b_to_a.packets > 0), "{stats:?}");

    link1.teardown().unwrap();
    link2.teardown().unwrap();
    hub.teardown().unwrap();
    assert_eq!(our_namespaces(), Vec::<String>::new());
}

#[test]
fn hub_links_tear_down_independently() {
    let Some(_serial) = setup() else { return };
    let hub = Wan::create(WanConfig::new("thubdown", 50.0, ms(2))).unwrap();
    let link1 = Wan::attach(&hub, WanConfig::new("thubdown", 50.0, ms(10))).unwrap();
    let link2 = Wan::attach(&hub, WanConfig::new("thubdown", 50.0, ms(40))).unwrap();
    for link in [&hub, &link1, &link2] {
        echo_server(link, HUB_PORT);
    }
    let leaf = |l: &Wan| SocketAddr::from((l.b_addr(), HUB_PORT));

    // Tearing down an attached link removes its leaf and its device in the hub only.
    let (hub_a, leaf1) = (
        hub.ns_name(Side::A).to_string(),
        link1.ns_name(Side::B).to_string(),
    );
    link1.teardown().unwrap();
    let list = netns_list();
    assert!(list.contains(&hub_a) && !list.contains(&leaf1), "{list}");
    assert_eq!(
        addrs_in(&hub, Side::A),
        ["127.0.0.1/8", "10.251.0.1", "10.251.2.1"]
    );
    let rtts = hub_rtts(&hub, &[leaf(&hub), leaf(&link2)], 5);
    assert_rtts_follow_delays("link 1 torn down", &rtts, &[2, 40]);

    // Link numbers are not reused.
    let link3 = Wan::attach(&link2, WanConfig::new("thubdown", 50.0, ms(5))).unwrap();
    assert_eq!((link3.link_index(), link3.device(Side::A)), (3, "wan3"));
    echo_server(&link3, HUB_PORT);
    let rtts = hub_rtts(&link3, &[leaf(&hub), leaf(&link3), leaf(&link2)], 5);
    assert_rtts_follow_delays("link 3 added", &rtts, &[2, 5, 40]);

    // The hub's own link goes first: A loses its name, the attached links keep working.
    drop(hub);
    assert!(!netns_list().contains(&hub_a));
    let rtts = hub_rtts(&link2, &[leaf(&link3), leaf(&link2)], 5);
    assert_rtts_follow_delays("hub's own link dropped", &rtts, &[5, 40]);
    link2.set_rate(20.0).unwrap();
    link3.teardown().unwrap();
    link2.teardown().unwrap();
    assert_eq!(our_namespaces(), Vec::<String>::new());
}

/// Routed through the hub, a leaf reaches the hub's every address and the
/// other routed leaves, across both links (a cloud tier in the hub,
/// cloudlets handing VMs to each other); an unrouted leaf reaches only its
/// own peer.
#[test]
fn leaves_routed_via_the_hub_reach_each_other_across_both_links() {
    let Some(_serial) = setup() else { return };
    let hub = Wan::create(WanConfig::new("throute", 50.0, ms(2))).unwrap();
    let link1 = Wan::attach(&hub, WanConfig::new("throute", 50.0, ms(10))).unwrap();
    let link2 = Wan::attach(&hub, WanConfig::new("throute", 50.0, ms(20))).unwrap();
    echo_server(&link2, 7101);
    let leaf2 = SocketAddr::from((link2.b_addr(), 7101));
    // Not routed yet: link 1's leaf cannot reach link 2's.
    let unrouted = link1
        .run_in(Side::B, async move {
            tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(leaf2)).await
        })
        .unwrap()
        .join()
        .unwrap();
    assert!(!matches!(unrouted, Ok(Ok(_))), "reached without a route");
    for l in [&hub, &link1, &link2] {
        l.route_via_hub().unwrap();
    }
    let rtt = link1
        .run_in(Side::B, async move {
            let mut sock = TcpStream::connect(leaf2).await.unwrap();
            sock.set_nodelay(true).unwrap();
            median(round_trips(&mut sock, 2, 5).await)
        })
        .unwrap()
        .join()
        .unwrap();
    eprintln!("leaf 1 -> leaf 2 through the hub: {rtt:?} (2 x (10 + 20) ms)");
    assert_rtts_follow_delays("leaf to leaf", &[rtt], &[30]);
    // A leaf reaches the hub's address on another link (link 0's).
    echo_server_in_hub(&hub, 7102);
    let hub0 = SocketAddr::from((hub.a_addr(), 7102));
    let rtt = link2
        .run_in(Side::B, async move {
            let mut sock = TcpStream::connect(hub0).await.unwrap();
            median(round_trips(&mut sock, 2, 5).await)
        })
        .unwrap()
        .join()
        .unwrap();
    assert_rtts_follow_delays("leaf 2 to the hub's link-0 address", &[rtt], &[20]);
    link1.teardown().unwrap();
    link2.teardown().unwrap();
    hub.teardown().unwrap();
    assert_eq!(our_namespaces(), Vec::<String>::new());
}

/// An echo server in the hub, on all its addresses.
fn echo_server_in_hub(hub: &Wan, port: u16) {
    let (tx, rx) = std::sync::mpsc::channel();
    let _server = hub
        .run_in(Side::A, async move {
            let listener = TcpListener::bind(("0.0.0.0", port)).await.unwrap();
            tx.send(()).unwrap();
            while let Ok((mut sock, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = sock.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        })
        .unwrap();
    rx.recv().unwrap();
}

#[test]
fn invalid_config_is_rejected_without_leftovers() {
    let mut config = WanConfig::new("tbad", 0.0, Duration::from_millis(5));
    assert!(Wan::create(config.clone()).is_err());
    config.rate_mbit = 10.0;
    config.name_prefix = "Bad-Name".into();
    assert!(Wan::create(config).is_err());
    assert!(!netns_list().contains("clw-tbad-"));
}

/// CPU seconds used so far by this process's threads named `name`.
fn thread_cpu_secs(name: &str) -> f64 {
    let mut ticks = 0u64;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the ")" that ends the command name: utime is the 12th, stime the 13th.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = after.split_whitespace().collect();
        ticks += f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    }
    // SAFETY: sysconf has no preconditions.
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// The table in the crate docs: `cargo test -p cloudlet-wan --test wan -- --ignored
/// --nocapture measure_table`.
#[test]
#[ignore = "measurement, ~40 s"]
fn measure_table() {
    let Some(_serial) = setup() else { return };
    let settings = [
        (10.0, 25),
        (20.0, 20),
        (25.0, 25),
        (50.0, 10),
        (50.0, 50),
        (100.0, 5),
    ];
    let wan = Wan::create(WanConfig::new("tmeas", 10.0, Duration::from_millis(25))).unwrap();
    echo_server(&wan, 7100);
    println!(
        "| rate set | one-way delay | idle RTT | RTT under load | throughput | delay-line CPU |"
    );
    println!("|---|---|---|---|---|---|");
    for (i, (rate, delay_ms)) in settings.into_iter().enumerate() {
        wan.set_rate(rate).unwrap();
        wan.set_delay(Duration::from_millis(delay_ms)).unwrap();
        let idle = tcp_rtt(&wan, 7100, 20);
        let cpu0 = thread_cpu_secs("wan-tmeas");
        let t0 = Instant::now();
        let loaded = std::thread::scope(|s| {
            let w = &wan;
            let probe = s.spawn(move || {
                std::thread::sleep(Duration::from_millis(1500));
                tcp_rtt(w, 7100, 10)
            });
            let mbit = bulk_mbit(
                &wan,
                7101 + i as u16,
                Duration::from_secs(4),
                Duration::from_secs(1),
            );
            (mbit, probe.join().unwrap())
        });
        let cpu = (thread_cpu_secs("wan-tmeas") - cpu0) / t0.elapsed().as_secs_f64();
        println!(
            "| {rate} Mbit/s | {delay_ms} ms | {:.1} ms | {:.1} ms | {:.1} Mbit/s | {:.1}% |",
            idle.as_secs_f64() * 1e3,
            loaded.1.as_secs_f64() * 1e3,
            loaded.0,
            cpu * 100.0
        );
    }
    wan.teardown().unwrap();
}

#[test]
fn a_hub_is_changed_through_its_control_socket() {
    use cloudlet_wan::control;
    let Some(_serial) = setup() else { return };
    let hub = Wan::create(WanConfig::new("tctl", 50.0, Duration::from_millis(2))).unwrap();
    let leaf = Wan::attach(
        &hub,
        WanConfig::new("tctl", 50.0, Duration::from_millis(30)),
    )
    .unwrap();
    let links: control::Links = std::sync::Arc::new(std::sync::RwLock::new(vec![hub, leaf]));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tctl.sock");
    control::serve(&path, links.clone()).unwrap();

    assert_eq!(control::send(&path, "delay 1 7.5").unwrap(), Ok(()));
    assert_eq!(control::send(&path, "rate 0 20").unwrap(), Ok(()));
    assert_eq!(control::send(&path, "cut 0").unwrap(), Ok(()));
    {
        let l = links.read().unwrap();
        assert_eq!(l[1].delay(), Duration::from_micros(7500));
        assert_eq!(l[0].rate_mbit(), 20.0);
        assert!(l[0].is_cut());
    }
    assert_eq!(control::send(&path, "restore 0").unwrap(), Ok(()));
    for (bad, why) in [
        ("delay 2 5", "no link 2"),
        ("delay 1", "needs a value"),
        ("delay 1 -3", "not a delay"),
        ("jitter 1 3", "unknown request"),
        ("", "expected"),
    ] {
        let got = control::send(&path, bad).unwrap().unwrap_err();
        assert!(got.contains(why), "{bad:?}: {got}");
    }
    assert!(!links.read().unwrap()[0].is_cut());
    let all = std::mem::take(&mut *links.write().unwrap());
    for l in all.into_iter().rev() {
        l.teardown().unwrap();
    }
}
