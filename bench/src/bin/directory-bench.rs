//! The cloud tier's directory (`cloudlet-directory`) under load: a
//! directory served in this process on 127.0.0.1 (`Serving::bind`, the
//! same server `cloudlet directory serve` runs), driven over real HTTP
//! by clients in this process.
//!
//! 1. **Search latency**, p50/p99, with 1,000 and 10,000 registered
//!    cloudlets (embedded redb store): registrations spread over a region
//!    (most around a dozen metro areas), one to three base VMs each out of
//!    five, served networks, flavors, random free resources (some full);
//!    queries `lat&lon&base&flavor&n=5` from devices spread the same way,
//!    sequential on one kept-alive connection (and with several clients
//!    at once). Baselines measured in the same run: `GET /v1/health` (the
//!    HTTP cost) and `Directory::search` called in-process (the ranking
//!    without HTTP or JSON).
//! 2. **Heartbeats per second held**: many connections sending
//!    `PUT /v1/cloudlets/{name}` in a closed loop for a fixed time, with
//!    the registration unchanged and with its free resources changed on
//!    every heartbeat; embedded store, and etcd (one member the bench
//!    starts with `cloudlet_testkit::etcd`). Successes per second, p50/p99,
//!    and the CPU each side used (client, server and etcd share the
//!    machine's cores).
//! 3. **Death to removal**: cloudlets heartbeat on schedule, then stop at
//!    a random point of their heartbeat period; search is polled every
//!    50 ms until each is gone from the answers. The time from its last
//!    heartbeat and from its first missed heartbeat, in seconds and in
//!    heartbeats, for the directory's defaults (5 s / 12 s) and a short
//!    setting (1 s / 2.5 s), embedded and etcd; beside them the published
//!    rules of Elijah, Sinfonia and Kubernetes (not measured here).
//!
//! For the search and heartbeat phases, leases are one hour, so that no
//! entry expires while it is measured (a lease's length changes nothing in
//! what a search or a heartbeat costs).
//!
//! Usage: `cargo run --release -p cloudlet-bench --bin directory-bench`
//! (about 1.5 minutes; `-- --help` for sizes and durations, `--no-etcd`,
//! `--skip-default-lease` to skip the 12 s lease case).

use std::net::IpAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Parser;
use cloudlet_api::directory::{HeldBase, Registration, SearchAnswer, SearchQuery};
use cloudlet_api::{Flavor, Location, Resources};
use cloudlet_directory::{Directory, DirectoryConfig, Serving};
use cloudlet_testkit::etcd::Etcd;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::runtime::Handle;
use tokio::sync::{oneshot, Barrier};

#[derive(Parser)]
#[command(about = "The directory under load: search latency, heartbeats held, death to removal")]
struct Args {
    /// Registered cloudlets for the search measurements (embedded store).
    #[arg(long, value_delimiter = ',', default_values_t = vec![1000usize, 10000])]
    sizes: Vec<usize>,
    /// Searches per size and per client.
    #[arg(long, default_value_t = 1000)]
    searches: usize,
    /// Also search with this many clients at once (1: sequential only),
    /// and with this many searching during a heartbeat load (0: none).
    #[arg(long, default_value_t = 2)]
    search_clients: usize,
    /// Concurrent connections sending heartbeats (and registering).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// How long each heartbeat load runs, seconds.
    #[arg(long, default_value_t = 5.0)]
    heartbeat_secs: f64,
    /// Cloudlets registered on etcd for its heartbeat load (default: the
    /// largest of --sizes).
    #[arg(long)]
    etcd_cloudlets: Option<usize>,
    /// Deaths measured per store and setting.
    #[arg(long, default_value_t = 5)]
    deaths: usize,
    /// The short setting: heartbeat, ms.
    #[arg(long, default_value_t = 1000)]
    short_heartbeat_ms: u64,
    /// The short setting: lease, ms (etcd rounds it up to whole seconds).
    #[arg(long, default_value_t = 2500)]
    short_lease_ms: u64,
    /// Skip the directory's default setting (5 s heartbeat, 12 s lease),
    /// which takes about 30 s.
    #[arg(long)]
    skip_default_lease: bool,
    /// Skip everything on etcd.
    #[arg(long)]
    no_etcd: bool,
    /// Cloudlets that heartbeat once after a restart of the embedded
    /// directory on its file (0: no restart).
    #[arg(long, default_value_t = 2000)]
    restart_cloudlets: usize,
    /// Where the redb files and etcd's data go (default: the temp dir).
    #[arg(long)]
    workdir: Option<PathBuf>,
    /// Seed of the generated fleet, queries and death points.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// Leases of the search and heartbeat phases: nothing expires meanwhile.
const LONG_LEASE_MS: u64 = 3_600_000;
/// How often the death phase polls search.
const POLL: Duration = Duration::from_millis(50);

/// Base VMs, with the share of cloudlets that hold each (and of queries
/// that ask for it).
const BASES: [(&str, f64); 5] = [
    ("ubuntu-22.04", 0.55),
    ("debian-12", 0.45),
    ("alpine-3.19", 0.30),
    ("android-x86-9", 0.15),
    ("windows-10", 0.10),
];
/// Flavors: name, vCPUs, MiB, share of cloudlets offering it, share of
/// queries asking for it.
const FLAVORS: [(&str, u32, u64, f64, f64); 4] = [
    ("small", 1, 512, 1.0, 0.4),
    ("medium", 2, 2048, 0.8, 0.3),
    ("large", 4, 8192, 0.5, 0.2),
    ("xlarge", 8, 16384, 0.2, 0.1),
];
/// The region: US north-east, from Columbus to Boston.
const METROS: [(&str, f64, f64); 12] = [
    ("Pittsburgh", 40.44, -79.99),
    ("Cleveland", 41.50, -81.69),
    ("Columbus", 39.96, -83.00),
    ("Buffalo", 42.89, -78.88),
    ("Rochester", 43.16, -77.61),
    ("Harrisburg", 40.27, -76.88),
    ("Philadelphia", 39.95, -75.17),
    ("Baltimore", 39.29, -76.61),
    ("Washington", 38.91, -77.04),
    ("New York", 40.71, -74.01),
    ("Albany", 42.65, -73.75),
    ("Boston", 42.36, -71.06),
];
const REGION_LAT: Range<f64> = 38.5..43.5;
const REGION_LON: Range<f64> = -84.0..-70.5;
const OVERLAYS: usize = 30;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Two runtimes, so that the CPU of each side can be told apart (by
    // thread name); both share the machine's cores.
    let server = tokio::runtime::Builder::new_multi_thread()
        .thread_name("dir-server")
        .enable_all()
        .build()?;
    let client = tokio::runtime::Builder::new_multi_thread()
        .thread_name("bench-client")
        .enable_all()
        .build()?;
    let handle = server.handle().clone();
    let result = client.block_on(run(args, handle));
    client.shutdown_timeout(Duration::from_secs(2));
    server.shutdown_timeout(Duration::from_secs(2));
    result
}

// ---------------------------------------------------------------- fleet

/// One cloudlet of the generated fleet, with its heartbeat bodies.
struct Cloudlet {
    reg: Registration,
    auth: String,
    path: String,
    /// The registration as registered.
    body: Vec<u8>,
    /// The same with other free resources.
    changed: Vec<u8>,
}

impl Cloudlet {
    fn new(reg: Registration, rng: &mut StdRng) -> Self {
        let mut other = reg.clone();
        let (f, c) = (&mut other.free, reg.capacity);
        f.vcpus = if f.vcpus < c.vcpus {
            f.vcpus + 1
        } else {
            f.vcpus - 1
        };
        f.memory_mib = if f.memory_mib >= 1024 {
            f.memory_mib - 512
        } else {
            f.memory_mib + 512
        };
        let token: u64 = rng.gen();
        Cloudlet {
            auth: format!("Bearer bench-credential-{}-{token:016x}", reg.name),
            path: format!("/v1/cloudlets/{}", reg.name),
            body: serde_json::to_vec(&reg).expect("json"),
            changed: serde_json::to_vec(&other).expect("json"),
            reg,
        }
    }
}

/// A standard normal sample (Box-Muller).
fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A place in the region: most near a metro area, the rest anywhere.
fn place(rng: &mut StdRng, near_metro: f64) -> (f64, f64, String) {
    if rng.gen_bool(near_metro) {
        let (m, lat, lon) = METROS[rng.gen_range(0..METROS.len())];
        (
            (lat + 0.15 * normal(rng)).clamp(-90.0, 90.0),
            (lon + 0.20 * normal(rng)).clamp(-180.0, 180.0),
            m.to_string(),
        )
    } else {
        (
            rng.gen_range(REGION_LAT),
            rng.gen_range(REGION_LON),
            "rural".into(),
        )
    }
}

fn base_id(name: &str) -> String {
    blake3::hash(name.as_bytes()).to_hex().to_string()
}

fn registration(i: usize, rng: &mut StdRng) -> Registration {
    let name = format!("edge-{i:05}");
    let (lat, lon, label) = place(rng, 0.75);
    let held_n = rng.gen_range(1..=3);
    let mut held: Vec<&str> = Vec::new();
    while held.len() < held_n {
        let b = BASES.choose_weighted(rng, |b| b.1).expect("bases").0;
        if !held.contains(&b) {
            held.push(b);
        }
    }
    let obtainable: Vec<String> = if rng.gen_bool(0.2) {
        BASES
            .iter()
            .map(|b| b.0)
            .filter(|b| !held.contains(b))
            .take(1)
            .map(String::from)
            .collect()
    } else {
        vec![]
    };
    let flavors = FLAVORS
        .iter()
        .filter(|f| rng.gen_bool(f.3))
        .map(|f| Flavor {
            name: f.0.into(),
            vcpus: f.1,
            memory_mib: f.2,
        })
        .collect();
    let vcpus = *[8u32, 16, 32, 64].choose(rng).expect("sizes");
    let capacity = Resources {
        vcpus,
        memory_mib: vcpus as u64 * 4096,
        vms: vcpus,
    };
    // About one in six has no room (no vCPU, too little memory, or no VM
    // slot left); the others have some of everything.
    let free = if rng.gen_bool(0.15) {
        let mut f = Resources {
            vcpus: rng.gen_range(0..=capacity.vcpus),
            memory_mib: rng.gen_range(0..=capacity.memory_mib),
            vms: rng.gen_range(0..=capacity.vms),
        };
        match rng.gen_range(0..3) {
            0 => f.vcpus = 0,
            1 => f.memory_mib = rng.gen_range(0..512),
            _ => f.vms = 0,
        }
        f
    } else {
        Resources {
            vcpus: rng.gen_range(1..=capacity.vcpus),
            memory_mib: rng.gen_range(1024..=capacity.memory_mib),
            vms: rng.gen_range(1..=capacity.vms),
        }
    };
    let mut networks = vec![format!("10.{}.{}.0/24", (i >> 8) & 255, i & 255)];
    if rng.gen_bool(0.3) {
        networks.push(format!(
            "100.{}.{}.0/22",
            64 + ((i >> 6) & 63),
            (i & 63) << 2
        ));
    }
    let cached_n = rng.gen_range(0..=4);
    let overlays_cached = (0..cached_n)
        .map(|_| {
            format!(
                "https://apps.example/v1/overlays/app-{}",
                rng.gen_range(0..OVERLAYS)
            )
        })
        .collect();
    Registration {
        format: 1,
        api_url: format!("https://{name}.edge.example:7450"),
        public_host: format!("{name}.edge.example"),
        location: Location {
            label,
            latitude: lat,
            longitude: lon,
        },
        networks,
        base_vms: held
            .iter()
            .map(|b| HeldBase {
                name: b.to_string(),
                id: base_id(b),
            })
            .collect(),
        obtainable_bases: obtainable,
        overlays_cached,
        flavors,
        capacity,
        free,
        load: rng.gen_range(0.0..1.5),
        accel: if rng.gen_bool(0.9) { "kvm" } else { "tcg" }.into(),
        release: "0.1.0".into(),
        handoff_protocol: 1,
        peer_token: Some(format!("peer-{:032x}", rng.gen::<u128>())),
        name,
    }
}

fn fleet(n: usize, seed: u64) -> Arc<Vec<Cloudlet>> {
    let mut rng = StdRng::seed_from_u64(seed);
    Arc::new(
        (0..n)
            .map(|i| {
                let r = registration(i, &mut rng);
                Cloudlet::new(r, &mut rng)
            })
            .collect(),
    )
}

/// Device queries: a place, a base, a flavor, n=5.
fn queries(n: usize, seed: u64) -> Vec<(String, SearchQuery)> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5ea4c4);
    (0..n)
        .map(|_| {
            let (lat, lon, _) = place(&mut rng, 0.8);
            let base = BASES.choose_weighted(&mut rng, |b| b.1).expect("bases").0;
            let flavor = FLAVORS
                .choose_weighted(&mut rng, |f| f.4)
                .expect("flavors")
                .0;
            let path =
                format!("/v1/cloudlets?lat={lat:.5}&lon={lon:.5}&base={base}&flavor={flavor}&n=5");
            let q = SearchQuery {
                lat: Some((lat * 1e5).round() / 1e5),
                lon: Some((lon * 1e5).round() / 1e5),
                base: Some(base.into()),
                flavor: Some(flavor.into()),
                n: Some(5),
                ..SearchQuery::default()
            };
            (path, q)
        })
        .collect()
}

// ---------------------------------------------------------------- serving

/// A directory served on the server runtime.
struct Served {
    url: String,
    directory: Arc<Directory>,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<Result<(), cloudlet_directory::ServeError>>,
}

async fn serve(rt: &Handle, config: DirectoryConfig) -> anyhow::Result<Served> {
    let (ready_tx, ready_rx) = oneshot::channel();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let done = rt.spawn(async move {
        let serving = match Serving::bind(config).await {
            Ok(s) => s,
            Err(e) => {
                let _ = ready_tx.send(Err(e.to_string()));
                return Ok(());
            }
        };
        let _ = ready_tx.send(Ok((serving.addr, serving.directory.clone())));
        serving
            .run(async {
                let _ = stop_rx.await;
            })
            .await
    });
    let (addr, directory) = ready_rx
        .await
        .context("the directory task ended")?
        .map_err(|e| anyhow!("the directory did not start: {e}"))?;
    Ok(Served {
        url: format!("http://{addr}"),
        directory,
        stop: Some(stop_tx),
        done,
    })
}

impl Served {
    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match tokio::time::timeout(Duration::from_secs(10), &mut self.done).await {
            Ok(r) => r??,
            Err(_) => {
                self.done.abort();
                eprintln!("  (the directory did not stop within 10 s: aborted)");
            }
        }
        Ok(())
    }
}

fn config(store: &Path, heartbeat_ms: u64, lease_ms: u64) -> DirectoryConfig {
    DirectoryConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        store: store.to_path_buf(),
        heartbeat_ms,
        lease_ms,
        ..DirectoryConfig::default()
    }
}

fn etcd_config(
    endpoints: &[String],
    prefix: &str,
    heartbeat_ms: u64,
    lease_ms: u64,
) -> DirectoryConfig {
    DirectoryConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        etcd: endpoints.to_vec(),
        etcd_prefix: prefix.into(),
        heartbeat_ms,
        lease_ms,
        ..DirectoryConfig::default()
    }
}

// ---------------------------------------------------------------- HTTP

/// A client that keeps one connection alive (each task has its own).
fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(1)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(20))
        .build()
        .expect("http client")
}

async fn get(c: &reqwest::Client, url: &str) -> anyhow::Result<(u16, Vec<u8>)> {
    let r = c.get(url).send().await?;
    let status = r.status().as_u16();
    Ok((status, r.bytes().await?.to_vec()))
}

async fn put(c: &reqwest::Client, url: &str, auth: &str, body: &[u8]) -> anyhow::Result<u16> {
    let r = c
        .put(url)
        .header(reqwest::header::AUTHORIZATION, auth)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_vec())
        .send()
        .await?;
    let status = r.status().as_u16();
    let text = r.bytes().await?;
    if status != 200 {
        bail!("{status}: {}", String::from_utf8_lossy(&text));
    }
    Ok(status)
}

/// One PUT per cloudlet of a range, over many connections: first
/// registrations, or first heartbeats after a restart.
struct Burst {
    store: &'static str,
    what: &'static str,
    n: usize,
    took: Duration,
    lat: Vec<Duration>,
    cpu: Cores,
    /// `GET /v1/health` every 20 ms meanwhile, from another connection.
    health: Vec<Duration>,
}

/// PUT each of `fleet[range]` once, over `conns` connections.
async fn register(
    store: &'static str,
    what: &'static str,
    url: &str,
    fleet: &Arc<Vec<Cloudlet>>,
    range: Range<usize>,
    conns: usize,
    etcd_pid: Option<u32>,
) -> anyhow::Result<Burst> {
    let n = range.len();
    let c0 = cpu_now(etcd_pid);
    let start = Instant::now();
    let next = Arc::new(AtomicUsize::new(range.start));
    let done = Arc::new(AtomicBool::new(false));
    let probe = {
        let (u, done) = (format!("{url}/v1/health"), done.clone());
        tokio::spawn(async move {
            let c = http_client();
            let mut lat = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let t = Instant::now();
                if get(&c, &u).await.is_ok() {
                    lat.push(t.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            lat
        })
    };
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..conns.max(1) {
        let (url, fleet, next, end) = (url.to_string(), fleet.clone(), next.clone(), range.end);
        tasks.spawn(async move {
            let c = http_client();
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= end {
                    return Ok::<_, anyhow::Error>(lat);
                }
                let cl = &fleet[i];
                let t = Instant::now();
                put(&c, &format!("{url}{}", cl.path), &cl.auth, &cl.body)
                    .await
                    .with_context(|| format!("registering {}", cl.reg.name))?;
                lat.push(t.elapsed());
            }
        });
    }
    let mut lat = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        lat.extend(r??);
    }
    let took = start.elapsed();
    done.store(true, Ordering::Relaxed);
    let mut health = probe.await?;
    health.sort();
    lat.sort();
    Ok(Burst {
        health,
        store,
        what,
        n,
        took,
        lat,
        cpu: cores(c0, cpu_now(etcd_pid), took),
    })
}

// ---------------------------------------------------------------- CPU

/// CPU seconds used so far: by the directory's threads, by this whole
/// process, by etcd, by the whole machine.
#[derive(Clone, Copy, Default)]
struct Cpu {
    server: f64,
    process: f64,
    etcd: f64,
    machine: f64,
}

/// Cores used over a measurement: by the directory, by the bench's
/// clients, by etcd, by everything else on the machine (other work).
#[derive(Clone, Copy, Default)]
struct Cores {
    dir: f64,
    client: f64,
    etcd: f64,
    other: f64,
    /// Too short a window for the kernel's tick to say anything.
    short: bool,
}

impl Cores {
    fn show(&self, etcd: bool) -> String {
        if self.short {
            return "(too short)".into();
        }
        let e = if etcd {
            format!("{:.2}", self.etcd)
        } else {
            "-".into()
        };
        format!("{:.2}/{:.2}/{e}/{:.2}", self.dir, self.client, self.other)
    }
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime of a `/proc/.../stat` line, seconds.
fn stat_cpu(stat: &str) -> f64 {
    let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0.0;
    };
    let f: Vec<&str> = after.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / clock_ticks()
}

/// Busy time of every core (`/proc/stat`: all but idle and iowait), s.
fn machine_busy() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is in user).
    let busy: f64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|i| v.get(*i)).sum();
    busy / clock_ticks()
}

fn cpu_now(etcd_pid: Option<u32>) -> Cpu {
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let mut server = 0.0;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for t in tasks.flatten() {
            if read(&t.path().join("comm")).starts_with("dir-server") {
                server += stat_cpu(&read(&t.path().join("stat")));
            }
        }
    }
    Cpu {
        server,
        process: stat_cpu(&read(Path::new("/proc/self/stat"))),
        etcd: etcd_pid.map_or(0.0, |p| {
            stat_cpu(&read(&PathBuf::from(format!("/proc/{p}/stat"))))
        }),
        machine: machine_busy(),
    }
}

/// Cores used between two readings.
fn cores(a: Cpu, b: Cpu, wall: Duration) -> Cores {
    let w = wall.as_secs_f64().max(1e-9);
    let dir = (b.server - a.server) / w;
    let process = (b.process - a.process) / w;
    let etcd = (b.etcd - a.etcd) / w;
    Cores {
        dir,
        client: (process - dir).max(0.0),
        etcd,
        other: ((b.machine - a.machine) / w - process - etcd).max(0.0),
        short: wall < Duration::from_millis(500),
    }
}

/// The pid of the process whose command line holds `needle` (etcd, by
/// its data directory).
fn pid_with_arg(needle: &str) -> Option<u32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if cmd.windows(needle.len()).any(|w| w == needle.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

// ---------------------------------------------------------------- stats

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

fn s1(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

// ---------------------------------------------------------------- search

struct Latencies {
    lat: Vec<Duration>,
    wall: Duration,
    bytes: usize,
    bodies: Vec<Vec<u8>>,
    cpu: Cores,
}

/// `clients` clients at once, each sending `per_client` GETs of `paths`
/// one after the other on its kept-alive connection (after a warm-up).
async fn get_load(
    url: &str,
    paths: Arc<Vec<String>>,
    clients: usize,
    per_client: usize,
) -> anyhow::Result<Latencies> {
    let barrier = Arc::new(Barrier::new(clients + 1));
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..clients {
        let (url, paths, barrier) = (url.to_string(), paths.clone(), barrier.clone());
        tasks.spawn(async move {
            let c = http_client();
            let offset = k * paths.len() / clients.max(1);
            for i in 0..20.min(paths.len()) {
                let (st, _) =
                    get(&c, &format!("{url}{}", paths[(offset + i) % paths.len()])).await?;
                if st != 200 {
                    bail!("warm-up: {st}");
                }
            }
            barrier.wait().await;
            let mut lat = Vec::with_capacity(per_client);
            let mut bodies = Vec::with_capacity(per_client);
            for i in 0..per_client {
                let u = format!("{url}{}", paths[(offset + i) % paths.len()]);
                let t = Instant::now();
                let (st, body) = get(&c, &u).await?;
                lat.push(t.elapsed());
                if st != 200 {
                    bail!("{u}: {st} {}", String::from_utf8_lossy(&body));
                }
                bodies.push(body);
            }
            Ok((lat, bodies))
        });
    }
    barrier.wait().await;
    let c0 = cpu_now(None);
    let start = Instant::now();
    let mut lat = Vec::new();
    let mut bodies = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let (l, b) = r??;
        lat.extend(l);
        bodies.extend(b);
    }
    let wall = start.elapsed();
    let cpu = cores(c0, cpu_now(None), wall);
    lat.sort();
    Ok(Latencies {
        lat,
        wall,
        bytes: bodies.iter().map(Vec::len).sum(),
        bodies,
        cpu,
    })
}

/// A query made from a device's query (the in-process rows).
type Shape = fn(&SearchQuery) -> SearchQuery;

struct SearchRow {
    size: usize,
    what: String,
    clients: usize,
    l: Latencies,
    note: String,
}

/// The search rows for the directory as it is now (`size` registered).
async fn search_rows(
    d: &Served,
    size: usize,
    qs: &[(String, SearchQuery)],
    args: &Args,
) -> anyhow::Result<Vec<SearchRow>> {
    let mut rows = Vec::new();
    let health = Arc::new(vec!["/v1/health".to_string()]);
    let l = get_load(&d.url, health, 1, args.searches).await?;
    rows.push(SearchRow {
        size,
        what: "GET /v1/health (baseline)".into(),
        clients: 1,
        l,
        note: String::new(),
    });
    let paths = Arc::new(qs.iter().map(|q| q.0.clone()).collect::<Vec<_>>());
    let mut client_counts = vec![1];
    if args.search_clients > 1 {
        client_counts.push(args.search_clients);
    }
    for clients in client_counts {
        let mut l = get_load(&d.url, paths.clone(), clients, args.searches).await?;
        // Checked after the clock stopped: real answers, of this size.
        let mut full = 0;
        let mut sizes_seen = std::collections::BTreeSet::new();
        for b in &l.bodies {
            let a: SearchAnswer = serde_json::from_slice(b).context("a search answer")?;
            if a.candidates.len() == 5 {
                full += 1;
            }
            sizes_seen.insert(a.registered);
        }
        l.bodies.clear();
        if sizes_seen.iter().any(|s| *s != size) {
            bail!("answers counted {sizes_seen:?} registered, not {size}");
        }
        let note = format!(
            "{:.0}% of answers have 5 candidates",
            100.0 * full as f64 / l.lat.len().max(1) as f64
        );
        rows.push(SearchRow {
            size,
            what: "search lat,lon,base,flavor,n=5".into(),
            clients,
            l,
            note,
        });
    }
    // The ranking alone: no HTTP, no JSON; the devices' queries, then the
    // same places with no filter (every entry fits but the full ones) and
    // with a base no cloudlet holds (every entry is excluded, with its
    // reason).
    let shapes: [(&str, &str, Shape, usize); 3] = [
        (
            "Directory::search in-process",
            "the ranking alone (no HTTP, no JSON)",
            |q| q.clone(),
            args.searches,
        ),
        (
            "  same, lat/lon only (no filter)",
            "every cloudlet with room fits",
            |q| SearchQuery {
                lat: q.lat,
                lon: q.lon,
                n: Some(5),
                ..SearchQuery::default()
            },
            (args.searches / 4).max(20),
        ),
        (
            "  same, a base no one holds",
            "every cloudlet excluded, each with its reason",
            |q| SearchQuery {
                base: Some("no-such-base".into()),
                ..q.clone()
            },
            (args.searches / 4).max(20),
        ),
    ];
    let peer = Some(IpAddr::from([127, 0, 0, 1]));
    for (what, note, shape, count) in shapes {
        let shaped: Vec<SearchQuery> = qs.iter().map(|q| shape(&q.1)).collect();
        let mut lat = Vec::with_capacity(count);
        let c0 = cpu_now(None);
        let start = Instant::now();
        for i in 0..count {
            let q = &shaped[i % shaped.len()];
            let t = Instant::now();
            let a = d.directory.search(None, q, peer)?;
            lat.push(t.elapsed());
            std::hint::black_box(a);
        }
        let wall = start.elapsed();
        let cpu = cores(c0, cpu_now(None), wall);
        lat.sort();
        rows.push(SearchRow {
            size,
            what: what.into(),
            clients: 1,
            l: Latencies {
                lat,
                wall,
                bytes: 0,
                bodies: vec![],
                cpu,
            },
            note: note.into(),
        });
    }
    Ok(rows)
}

// ---------------------------------------------------------------- heartbeats

struct HbRow {
    store: &'static str,
    body: String,
    cloudlets: usize,
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    lat: Vec<Duration>,
    wall: Duration,
    cpu: Cores,
    /// Searches sent meanwhile, by other clients (mixed load).
    searches: Vec<Duration>,
}

/// Clients that search (one query after the other, each on its
/// connection) while heartbeats come in.
struct Searching {
    clients: usize,
    paths: Arc<Vec<String>>,
}

/// `conns` connections, each heartbeating its share of `fleet[..count]`
/// in turn, as fast as answers come, for `dur`.
#[allow(clippy::too_many_arguments)]
async fn heartbeat_load(
    store: &'static str,
    url: &str,
    fleet: &Arc<Vec<Cloudlet>>,
    count: usize,
    conns: usize,
    dur: Duration,
    changed: bool,
    etcd_pid: Option<u32>,
    searching: Option<Searching>,
) -> anyhow::Result<HbRow> {
    let searchers = searching.as_ref().map_or(0, |s| s.clients);
    let barrier = Arc::new(Barrier::new(conns + searchers + 1));
    let mut search_tasks = tokio::task::JoinSet::new();
    if let Some(s) = &searching {
        for k in 0..s.clients {
            let (url, paths, barrier) = (url.to_string(), s.paths.clone(), barrier.clone());
            search_tasks.spawn(async move {
                let c = http_client();
                let offset = k * paths.len() / searchers.max(1);
                let _ = get(&c, &format!("{url}{}", paths[offset % paths.len()])).await;
                barrier.wait().await;
                let deadline = Instant::now() + dur;
                let mut lat = Vec::new();
                let mut i = offset;
                while Instant::now() < deadline {
                    let u = format!("{url}{}", paths[i % paths.len()]);
                    let t = Instant::now();
                    let (st, _) = get(&c, &u).await?;
                    if st != 200 {
                        bail!("{u}: {st}");
                    }
                    lat.push(t.elapsed());
                    i += 1;
                }
                Ok(lat)
            });
        }
    }
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..conns {
        let (url, fleet, barrier) = (url.to_string(), fleet.clone(), barrier.clone());
        tasks.spawn(async move {
            let c = http_client();
            let mine: Vec<usize> = (k..count).step_by(conns).collect();
            let urls: Vec<String> = mine
                .iter()
                .map(|i| format!("{url}{}", fleet[*i].path))
                .collect();
            // The connection opened (not counted).
            if let Some(i) = mine.first() {
                let _ = put(&c, &urls[0], &fleet[*i].auth, &fleet[*i].body).await;
            }
            let mut flipped = vec![false; mine.len()];
            let (mut ok, mut errors, mut first_error) = (0u64, 0u64, None::<String>);
            let mut lat = Vec::new();
            barrier.wait().await;
            let deadline = Instant::now() + dur;
            let mut j = 0;
            while !mine.is_empty() && Instant::now() < deadline {
                let cl = &fleet[mine[j]];
                let body = if changed {
                    flipped[j] = !flipped[j];
                    if flipped[j] {
                        &cl.changed
                    } else {
                        &cl.body
                    }
                } else {
                    &cl.body
                };
                let t = Instant::now();
                match put(&c, &urls[j], &cl.auth, body).await {
                    Ok(_) => {
                        lat.push(t.elapsed());
                        ok += 1;
                    }
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| e.to_string());
                    }
                }
                j = (j + 1) % mine.len();
            }
            (ok, errors, first_error, lat)
        });
    }
    barrier.wait().await;
    let c0 = cpu_now(etcd_pid);
    let start = Instant::now();
    let mut row = HbRow {
        store,
        body: match (changed, searchers) {
            (true, _) => "free resources changed".into(),
            (false, 0) => "unchanged".into(),
            (false, n) => format!("unchanged, {n} searching"),
        },
        cloudlets: count,
        ok: 0,
        errors: 0,
        first_error: None,
        lat: vec![],
        wall: Duration::ZERO,
        cpu: Cores::default(),
        searches: vec![],
    };
    while let Some(r) = tasks.join_next().await {
        let (ok, errors, first, lat) = r?;
        row.ok += ok;
        row.errors += errors;
        if row.first_error.is_none() {
            row.first_error = first;
        }
        row.lat.extend(lat);
    }
    while let Some(r) = search_tasks.join_next().await {
        row.searches.extend(r??);
    }
    row.wall = start.elapsed();
    row.cpu = cores(c0, cpu_now(etcd_pid), row.wall);
    row.lat.sort();
    row.searches.sort();
    Ok(row)
}

// ---------------------------------------------------------------- deaths

struct Death {
    from_death: Duration,
    from_last: Duration,
    from_missed: Duration,
}

struct DeathRow {
    store: &'static str,
    hb: Duration,
    lease: Duration,
    /// etcd's lease TTL (whole seconds).
    ttl: Option<u64>,
    deaths: Vec<Death>,
    survivor_polls: usize,
    survivor_misses: usize,
}

fn small_reg(name: &str, base: &str) -> Registration {
    Registration {
        format: 1,
        name: name.into(),
        api_url: format!("https://{name}.edge.example:7450"),
        public_host: format!("{name}.edge.example"),
        location: Location {
            label: "Pittsburgh".into(),
            latitude: 40.44,
            longitude: -79.99,
        },
        networks: vec!["10.200.0.0/24".into()],
        base_vms: vec![HeldBase {
            name: base.into(),
            id: base_id(base),
        }],
        obtainable_bases: vec![],
        overlays_cached: vec![],
        flavors: vec![Flavor {
            name: "small".into(),
            vcpus: 1,
            memory_mib: 512,
        }],
        capacity: Resources {
            vcpus: 8,
            memory_mib: 8192,
            vms: 8,
        },
        free: Resources {
            vcpus: 4,
            memory_mib: 4096,
            vms: 4,
        },
        load: 0.2,
        accel: "kvm".into(),
        release: "0.1.0".into(),
        handoff_protocol: 1,
        peer_token: None,
    }
}

async fn present(c: &reqwest::Client, url: &str, name: &str) -> anyhow::Result<bool> {
    let (st, body) = get(c, url).await?;
    if st != 200 {
        bail!("search: {st} {}", String::from_utf8_lossy(&body));
    }
    let a: SearchAnswer = serde_json::from_slice(&body)?;
    Ok(a.candidates.iter().any(|c| c.name == name))
}

/// `n` cloudlets register at random phases, heartbeat once more on
/// schedule, and die at a random point of the next period; two others
/// heartbeat throughout (and must never leave the answers).
async fn death_scenario(
    store: &'static str,
    url: String,
    hb: Duration,
    lease: Duration,
    n: usize,
    seed: u64,
) -> anyhow::Result<DeathRow> {
    let mut rng = StdRng::seed_from_u64(seed);
    let tag = format!("{store}-{}", hb.as_millis());
    let stop = Arc::new(AtomicBool::new(false));
    let mut side = tokio::task::JoinSet::new();
    for k in 0..2 {
        let c = Cloudlet::new(
            small_reg(&format!("survivor-{tag}-{k}"), "survivor"),
            &mut rng,
        );
        let (url, stop) = (url.clone(), stop.clone());
        side.spawn(async move {
            let client = http_client();
            let u = format!("{url}{}", c.path);
            let mut tick = tokio::time::interval(hb);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                put(&client, &u, &c.auth, &c.body).await?;
            }
            Ok::<(usize, usize), anyhow::Error>((0, 0))
        });
    }
    {
        let (url, stop, tag) = (url.clone(), stop.clone(), tag.clone());
        side.spawn(async move {
            let client = http_client();
            let u = format!("{url}/v1/cloudlets?base=survivor&n=10");
            tokio::time::sleep(Duration::from_millis(300)).await;
            let (mut polls, mut misses) = (0, 0);
            while !stop.load(Ordering::Relaxed) {
                let (st, body) = get(&client, &u).await?;
                if st != 200 {
                    bail!("search: {st}");
                }
                let a: SearchAnswer = serde_json::from_slice(&body)?;
                polls += 1;
                if (0..2).any(|k| {
                    let name = format!("survivor-{tag}-{k}");
                    !a.candidates.iter().any(|c| c.name == name)
                }) {
                    misses += 1;
                }
                tokio::time::sleep(POLL).await;
            }
            Ok((polls, misses))
        });
    }
    let mut mortals = tokio::task::JoinSet::new();
    for k in 0..n {
        let base = format!("mortal-{tag}-{k}");
        let c = Cloudlet::new(small_reg(&base, &base), &mut rng);
        let phase = hb.mul_f64(rng.gen_range(0.0..1.0));
        let death_point = rng.gen_range(0.02..0.98);
        let url = url.clone();
        mortals.spawn(async move {
            let client = http_client();
            let u = format!("{url}{}", c.path);
            let q = format!("{url}/v1/cloudlets?base={base}&n=5");
            tokio::time::sleep(phase).await;
            let registered = Instant::now();
            put(&client, &u, &c.auth, &c.body).await?;
            tokio::time::sleep_until((registered + hb).into()).await;
            let last = Instant::now();
            put(&client, &u, &c.auth, &c.body).await?;
            let died = last + hb.mul_f64(death_point);
            tokio::time::sleep_until(died.into()).await;
            // Dead: nothing more is sent. Poll until it is gone.
            let mut polls = 0;
            loop {
                let t = Instant::now();
                if !present(&client, &q, &c.reg.name).await? {
                    if polls == 0 {
                        bail!("{} was gone at the first poll after its death", c.reg.name);
                    }
                    return Ok(Death {
                        from_death: t - died,
                        from_last: t - last,
                        from_missed: t.saturating_duration_since(last + hb),
                    });
                }
                polls += 1;
                if t - last > lease * 3 + Duration::from_secs(10) {
                    bail!(
                        "{} still answered {:?} after its last heartbeat",
                        c.reg.name,
                        t - last
                    );
                }
                tokio::time::sleep_until((t + POLL).into()).await;
            }
        });
    }
    let mut deaths = Vec::new();
    while let Some(r) = mortals.join_next().await {
        deaths.push(r??);
    }
    stop.store(true, Ordering::Relaxed);
    let (mut survivor_polls, mut survivor_misses) = (0, 0);
    while let Some(r) = side.join_next().await {
        let (p, m) = r??;
        survivor_polls += p;
        survivor_misses += m;
    }
    deaths.sort_by_key(|d| d.from_last);
    Ok(DeathRow {
        store,
        hb,
        lease,
        ttl: None,
        deaths,
        survivor_polls,
        survivor_misses,
    })
}

// ---------------------------------------------------------------- run

async fn run(args: Args, rt: Handle) -> anyhow::Result<()> {
    let workdir = args.workdir.clone().unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::tempdir_in(&workdir)?;
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut sizes = args.sizes.clone();
    sizes.sort_unstable();
    sizes.dedup();
    let max = *sizes.last().context("--sizes is empty")?;
    let etcd_n = args.etcd_cloudlets.unwrap_or(max);
    let fleet = fleet(max.max(etcd_n), args.seed);
    let qs = queries(args.searches.max(1), args.seed);
    let hb_dur = Duration::from_secs_f64(args.heartbeat_secs);
    let conns = args.connections.max(1);

    // 1 and 2, embedded: one directory, grown size by size.
    eprintln!("embedded store in {}", tmp.path().display());
    let d = serve(
        &rt,
        config(&tmp.path().join("bench.redb"), 5000, LONG_LEASE_MS),
    )
    .await?;
    let mut search = Vec::new();
    let mut registrations = Vec::new();
    let mut have = 0;
    for &size in &sizes {
        eprintln!("registering {} cloudlets (embedded) ...", size - have);
        registrations.push(
            register(
                "embedded",
                "registration",
                &d.url,
                &fleet,
                have..size,
                conns,
                None,
            )
            .await?,
        );
        have = size;
        eprintln!("searching with {size} registered ...");
        search.extend(search_rows(&d, size, &qs, &args).await?);
    }
    let mut hbs = Vec::new();
    for changed in [false, true] {
        eprintln!("heartbeats, embedded, changed={changed} ...");
        hbs.push(
            heartbeat_load(
                "embedded", &d.url, &fleet, max, conns, hb_dur, changed, None, None,
            )
            .await?,
        );
    }
    if args.search_clients > 0 {
        eprintln!(
            "heartbeats, embedded, with {} clients searching ...",
            args.search_clients
        );
        let paths = Arc::new(qs.iter().map(|q| q.0.clone()).collect::<Vec<_>>());
        let searching = Searching {
            clients: args.search_clients,
            paths,
        };
        hbs.push(
            heartbeat_load(
                "embedded",
                &d.url,
                &fleet,
                max,
                conns,
                hb_dur,
                false,
                None,
                Some(searching),
            )
            .await?,
        );
    }
    d.stop().await?;
    // A restart on the same file: the entries are loaded, and each
    // cloudlet's next heartbeat has its credential checked in the store.
    let mut reopened = None;
    if args.restart_cloudlets > 0 {
        eprintln!("restarting the embedded directory on its file ...");
        let t = Instant::now();
        let d = serve(
            &rt,
            config(&tmp.path().join("bench.redb"), 5000, LONG_LEASE_MS),
        )
        .await?;
        reopened = Some((t.elapsed(), d.directory.store.index().len()));
        let n = args.restart_cloudlets.min(max);
        registrations.push(
            register(
                "embedded",
                "first heartbeat after a restart",
                &d.url,
                &fleet,
                0..n,
                conns,
                None,
            )
            .await?,
        );
        d.stop().await?;
    }

    // 2, etcd.
    let mut etcd = None;
    if !args.no_etcd {
        let edir = tmp.path().join("etcd");
        eprintln!("starting etcd in {} ...", edir.display());
        let e = tokio::task::spawn_blocking({
            let edir = edir.clone();
            move || Etcd::start(1, &edir)
        })
        .await?;
        let etcd_pid = pid_with_arg(&edir.join("m0").display().to_string());
        let eps = e.endpoints();
        etcd = Some(e);
        let d = serve(&rt, etcd_config(&eps, "/bench", 5000, LONG_LEASE_MS)).await?;
        eprintln!("registering {etcd_n} cloudlets (etcd) ...");
        registrations.push(
            register(
                "etcd",
                "registration",
                &d.url,
                &fleet,
                0..etcd_n,
                conns,
                etcd_pid,
            )
            .await?,
        );
        for changed in [false, true] {
            eprintln!("heartbeats, etcd, changed={changed} ...");
            hbs.push(
                heartbeat_load(
                    "etcd", &d.url, &fleet, etcd_n, conns, hb_dur, changed, etcd_pid, None,
                )
                .await?,
            );
        }
        d.stop().await?;
    }

    // 3: every scenario at once (each its own directory; they sleep most
    // of the time).
    let mut settings = vec![(args.short_heartbeat_ms, args.short_lease_ms)];
    if !args.skip_default_lease {
        let def = DirectoryConfig::default();
        settings.push((def.heartbeat_ms, def.lease_ms));
    }
    eprintln!("deaths ({} per store and setting) ...", args.deaths);
    let mut servers = Vec::new();
    let mut scenarios = tokio::task::JoinSet::new();
    for (i, &(hb_ms, lease_ms)) in settings.iter().enumerate() {
        let (hb, lease) = (
            Duration::from_millis(hb_ms),
            Duration::from_millis(lease_ms),
        );
        let mut stores: Vec<(&'static str, DirectoryConfig)> = vec![(
            "embedded",
            config(&tmp.path().join(format!("death-{i}.redb")), hb_ms, lease_ms),
        )];
        if let Some(e) = &etcd {
            stores.push((
                "etcd",
                etcd_config(&e.endpoints(), &format!("/death-{i}"), hb_ms, lease_ms),
            ));
        }
        for (j, (store, cfg)) in stores.into_iter().enumerate() {
            let d = serve(&rt, cfg).await?;
            let seed = args.seed.wrapping_mul(1000) + (i * 10 + j) as u64;
            let (url, n) = (d.url.clone(), args.deaths);
            scenarios.spawn(async move {
                let mut row = death_scenario(store, url, hb, lease, n, seed).await?;
                if store == "etcd" {
                    row.ttl = Some(lease_ms.div_ceil(1000));
                }
                Ok::<_, anyhow::Error>((i, j, row))
            });
            servers.push(d);
        }
    }
    let mut deaths = Vec::new();
    while let Some(r) = scenarios.join_next().await {
        deaths.push(r??);
    }
    deaths.sort_by_key(|(i, j, _)| (*i, *j));
    for d in servers {
        d.stop().await?;
    }
    drop(etcd);

    print_report(
        &args,
        cpus,
        loadavg.trim(),
        &workdir,
        &registrations,
        reopened,
        &search,
        &hbs,
        &deaths.into_iter().map(|d| d.2).collect::<Vec<_>>(),
        conns,
    );
    Ok(())
}

// ---------------------------------------------------------------- report

#[allow(clippy::too_many_arguments)]
fn print_report(
    args: &Args,
    cpus: usize,
    loadavg: &str,
    workdir: &Path,
    registrations: &[Burst],
    reopened: Option<(Duration, usize)>,
    search: &[SearchRow],
    hbs: &[HbRow],
    deaths: &[DeathRow],
    conns: usize,
) {
    println!();
    println!("directory-bench: cloudlet-directory served in-process on 127.0.0.1, real HTTP (axum/hyper server, reqwest clients in the same process)");
    println!(
        "machine: {cpus} cores shared by the clients, the directory and etcd (and any other work: load average at start {loadavg}); files in {}",
        workdir.display()
    );
    println!("CPU columns: cores used during the measurement by the directory's threads / the bench's clients / etcd / everything else on the machine (other work)");

    println!();
    println!("0. registering (each cloudlet one PUT, {conns} connections; open enrollment: a new name's credential is bound in the store, then its entry written)");
    println!(
        "{:<9} {:<32} {:>9} {:>8} {:>8} {:>8} {:>8}  {:>21}  {:>26}",
        "store",
        "what",
        "cloudlets",
        "took s",
        "per s",
        "p50 ms",
        "p99 ms",
        "CPU dir/cli/etcd/oth",
        "GET /v1/health meanwhile"
    );
    for b in registrations {
        println!(
            "{:<9} {:<32} {:>9} {:>8} {:>8.0} {:>8} {:>8}  {:>21}  {:>26}",
            b.store,
            b.what,
            b.n,
            s1(b.took),
            b.n as f64 / b.took.as_secs_f64().max(1e-9),
            ms(pct(&b.lat, 0.5)),
            ms(pct(&b.lat, 0.99)),
            b.cpu.show(b.store == "etcd"),
            format!(
                "p50 {} p99 {} ms",
                ms(pct(&b.health, 0.5)),
                ms(pct(&b.health, 0.99))
            )
        );
    }
    if let Some((took, n)) = reopened {
        println!(
            "restart of the embedded directory on its file: {n} entries loaded, serving after {} s",
            s1(took)
        );
    }

    println!();
    println!("1. search latency (embedded store; each client sequential on one kept-alive connection; {} requests per client)", args.searches);
    println!(
        "{:>9}  {:<32} {:>7} {:>8} {:>8} {:>8} {:>8} {:>8}  {:>21}  notes",
        "cloudlets",
        "request",
        "clients",
        "p50 ms",
        "p99 ms",
        "max ms",
        "req/s",
        "bytes",
        "CPU dir/cli/etcd/oth"
    );
    for r in search {
        let l = &r.l;
        println!(
            "{:>9}  {:<32} {:>7} {:>8} {:>8} {:>8} {:>8.0} {:>8}  {:>21}  {}",
            r.size,
            r.what,
            r.clients,
            ms(pct(&l.lat, 0.50)),
            ms(pct(&l.lat, 0.99)),
            ms(pct(&l.lat, 1.0)),
            l.lat.len() as f64 / l.wall.as_secs_f64().max(1e-9),
            if l.bytes > 0 {
                (l.bytes / l.lat.len().max(1)).to_string()
            } else {
                "-".into()
            },
            l.cpu.show(false),
            r.note
        );
    }
    let max = search.iter().map(|r| r.size).max().unwrap_or(0);
    if let Some(r) = search
        .iter()
        .find(|r| r.size == max && r.clients == 1 && r.what.starts_with("search"))
    {
        let p99 = pct(&r.l.lat, 0.99);
        let verdict = if max < 10_000 {
            "not measured (no size of 10,000)"
        } else if p99 < Duration::from_millis(10) {
            "met"
        } else {
            "MISSED"
        };
        println!(
            "target: search p99 under 10 ms at 10,000 cloudlets (embedded): {verdict} (p99 {} ms at {max}, one client)",
            ms(p99)
        );
    }

    println!();
    println!(
        "2. heartbeats held (PUT /v1/cloudlets/{{name}}, {conns} connections in a closed loop for {} s, each cycling through its share of the registered cloudlets)",
        args.heartbeat_secs
    );
    println!(
        "{:<9} {:<23} {:>9} {:>9} {:>7} {:>9} {:>8} {:>8} {:>8}  {:>21}",
        "store",
        "body",
        "cloudlets",
        "ok",
        "errors",
        "hb/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "CPU dir/cli/etcd/oth"
    );
    for h in hbs {
        println!(
            "{:<9} {:<23} {:>9} {:>9} {:>7} {:>9.0} {:>8} {:>8} {:>8}  {:>21}",
            h.store,
            h.body,
            h.cloudlets,
            h.ok,
            h.errors,
            h.ok as f64 / h.wall.as_secs_f64().max(1e-9),
            ms(pct(&h.lat, 0.50)),
            ms(pct(&h.lat, 0.99)),
            ms(pct(&h.lat, 1.0)),
            h.cpu.show(h.store == "etcd")
        );
        if let Some(e) = &h.first_error {
            println!("          first error: {e}");
        }
        if !h.searches.is_empty() {
            println!(
                "          meanwhile {} searches ({:.0}/s): p50 {} ms, p99 {} ms, max {} ms",
                h.searches.len(),
                h.searches.len() as f64 / h.wall.as_secs_f64().max(1e-9),
                ms(pct(&h.searches, 0.5)),
                ms(pct(&h.searches, 0.99)),
                ms(pct(&h.searches, 1.0))
            );
        }
    }
    if let Some(h) = hbs
        .iter()
        .find(|h| h.store == "embedded" && h.body == "unchanged")
    {
        let rate = h.ok as f64 / h.wall.as_secs_f64().max(1e-9);
        println!(
            "target: at least 5,000 heartbeats/s on the embedded store: {} ({rate:.0}/s unchanged)",
            if rate >= 5000.0 { "met" } else { "MISSED" }
        );
    }
    println!("note: the clients run in this process and share the {cpus} cores with the directory (and etcd): the rate is what one machine does for both sides, not the directory's alone");

    println!();
    println!(
        "3. from a cloudlet's death to its removal from search answers (it heartbeats on schedule, stops at a random point of its period; search polled every {} ms)",
        POLL.as_millis()
    );
    println!(
        "{:<20} {:>9} {:<22} {:>6} {:>17} {:>24} {:>24} {:>12}  each, from last heartbeat (s)",
        "store",
        "heartbeat",
        "lease / expiry",
        "deaths",
        "from death s",
        "from last heartbeat",
        "from first missed",
        "survivors"
    );
    for d in deaths {
        let h = d.hb.as_secs_f64();
        let stat = |f: fn(&Death) -> Duration| {
            let mut v: Vec<Duration> = d.deaths.iter().map(f).collect();
            v.sort();
            (
                pct(&v, 0.5),
                v.first().copied().unwrap_or_default(),
                v.last().copied().unwrap_or_default(),
            )
        };
        let (dm, dmin, dmax) = stat(|x| x.from_death);
        let (lm, lmin, lmax) = stat(|x| x.from_last);
        let (mm, mmin, mmax) = stat(|x| x.from_missed);
        let hbs_of = |x: Duration| x.as_secs_f64() / h;
        let lease = match d.ttl {
            Some(t) => format!("{} s (etcd TTL {t} s)", fmt_secs(d.lease)),
            None => format!("{} s", fmt_secs(d.lease)),
        };
        println!(
            "{:<20} {:>7} s {:<22} {:>6} {:>17} {:>24} {:>24} {:>12}  {}",
            format!("{} (measured)", d.store),
            fmt_secs(d.hb),
            lease,
            d.deaths.len(),
            format!("{} ({}-{})", s1(dm), s1(dmin), s1(dmax)),
            format!(
                "{} ({:.1} hb) {}-{}",
                s1(lm),
                hbs_of(lm),
                s1(lmin),
                s1(lmax)
            ),
            format!(
                "{} ({:.1} hb) {}-{}",
                s1(mm),
                hbs_of(mm),
                s1(mmin),
                s1(mmax)
            ),
            format!("{} dropped", d.survivor_misses),
            d.deaths
                .iter()
                .map(|x| s1(x.from_last))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    let published: [(&str, &str, &str, &str, &str); 3] = [
        (
            "Elijah (published)",
            "60 s",
            "never expired",
            "never",
            "never",
        ),
        (
            "Sinfonia (published)",
            "15 s",
            "dropped after 5 min",
            "300 s (20 hb)",
            "285 s (19 hb)",
        ),
        (
            "Kubernetes (publ.)",
            "10 s",
            "NotReady after 40 s",
            "40 s (4 hb)",
            "30 s (3 hb)",
        ),
    ];
    for (who, hb, rule, last, missed) in published {
        println!(
            "{:<20} {:>9} {:<22} {:>6} {:>17} {:>24} {:>24} {:>12}",
            who, hb, rule, "-", "-", last, missed, "-"
        );
    }
    println!("medians, (min-max); \"hb\": in heartbeat periods of that row; published rows are not measured here (Elijah: dead entries never expired; Sinfonia, CMU 2024: 15 s reports, dropped after 5 minutes; Kubernetes: 10 s node lease renewals, NotReady after 40 s)");
    let total = deaths.iter().map(|d| d.survivor_polls).sum::<usize>();
    println!("survivors: two cloudlets per row heartbeating throughout, checked on every poll ({total} polls in all): \"dropped\" counts polls that missed one");
}

fn fmt_secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if (s - s.round()).abs() < 1e-9 {
        format!("{s:.0}")
    } else {
        format!("{s}")
    }
}
