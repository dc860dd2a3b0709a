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

mod cpu;
mod death;
mod fleet;
mod http;
mod load;
mod report;
mod serve;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use cloudlet_api::directory::SearchQuery;
use cloudlet_directory::DirectoryConfig;
use cloudlet_testkit::etcd::Etcd;
use tokio::runtime::Handle;

use crate::cpu::pid_with_arg;
use crate::death::{death_scenario, DeathRow};
use crate::fleet::{fleet, queries, Cloudlet};
use crate::load::{heartbeat_load, register, search_rows, Burst, HbRow, SearchRow, Searching};
use crate::serve::{config, etcd_config, serve, Served};

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

// ---------------------------------------------------------------- run

/// What the phases share.
struct Bench {
    args: Args,
    rt: Handle,
    tmp: tempfile::TempDir,
    fleet: Arc<Vec<Cloudlet>>,
    qs: Vec<(String, SearchQuery)>,
    /// The largest of --sizes.
    max: usize,
    /// Cloudlets registered on etcd.
    etcd_n: usize,
    hb_dur: Duration,
    conns: usize,
}

/// Everything measured, for the report.
#[derive(Default)]
struct Measured {
    registrations: Vec<Burst>,
    reopened: Option<(Duration, usize)>,
    search: Vec<SearchRow>,
    hbs: Vec<HbRow>,
    deaths: Vec<DeathRow>,
}

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
    let b = Bench {
        args,
        rt,
        tmp,
        fleet,
        qs,
        max,
        etcd_n,
        hb_dur,
        conns,
    };
    let mut m = Measured::default();

    // 1 and 2, embedded: one directory, grown size by size.
    eprintln!("embedded store in {}", b.tmp.path().display());
    let d = serve(
        &b.rt,
        config(&b.tmp.path().join("bench.redb"), 5000, LONG_LEASE_MS),
    )
    .await?;
    embedded_search(&b, &d, &sizes, &mut m).await?;
    embedded_heartbeats(&b, &d, &mut m).await?;
    d.stop().await?;
    restart(&b, &mut m).await?;

    // 2, etcd.
    let etcd = if b.args.no_etcd {
        None
    } else {
        Some(etcd_heartbeats(&b, &mut m).await?)
    };

    // 3.
    m.deaths = death_phase(&b, etcd.as_ref()).await?;
    drop(etcd);

    report::print_report(&b.args, cpus, loadavg.trim(), &workdir, &m, b.conns);
    Ok(())
}

/// 0 and 1, embedded: register up to each size in turn, and search there.
async fn embedded_search(
    b: &Bench,
    d: &Served,
    sizes: &[usize],
    m: &mut Measured,
) -> anyhow::Result<()> {
    let mut have = 0;
    for &size in sizes {
        eprintln!("registering {} cloudlets (embedded) ...", size - have);
        m.registrations.push(
            register(
                "embedded",
                "registration",
                &d.url,
                &b.fleet,
                have..size,
                b.conns,
                None,
            )
            .await?,
        );
        have = size;
        eprintln!("searching with {size} registered ...");
        m.search.extend(search_rows(d, size, &b.qs, &b.args).await?);
    }
    Ok(())
}

/// 2, embedded: heartbeats unchanged and changed, then unchanged with
/// clients searching.
async fn embedded_heartbeats(b: &Bench, d: &Served, m: &mut Measured) -> anyhow::Result<()> {
    let (args, fleet, max, conns, hb_dur) = (&b.args, &b.fleet, b.max, b.conns, b.hb_dur);
    for changed in [false, true] {
        eprintln!("heartbeats, embedded, changed={changed} ...");
        m.hbs.push(
            heartbeat_load(
                "embedded", &d.url, fleet, max, conns, hb_dur, changed, None, None,
            )
            .await?,
        );
    }
    if args.search_clients > 0 {
        eprintln!(
            "heartbeats, embedded, with {} clients searching ...",
            args.search_clients
        );
        let paths = Arc::new(b.qs.iter().map(|q| q.0.clone()).collect::<Vec<_>>());
        let searching = Searching {
            clients: args.search_clients,
            paths,
        };
        m.hbs.push(
            heartbeat_load(
                "embedded",
                &d.url,
                fleet,
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
    Ok(())
}

/// A restart on the same file: the entries are loaded, and each
/// cloudlet's next heartbeat has its credential checked in the store.
async fn restart(b: &Bench, m: &mut Measured) -> anyhow::Result<()> {
    if b.args.restart_cloudlets == 0 {
        return Ok(());
    }
    eprintln!("restarting the embedded directory on its file ...");
    let t = Instant::now();
    let d = serve(
        &b.rt,
        config(&b.tmp.path().join("bench.redb"), 5000, LONG_LEASE_MS),
    )
    .await?;
    m.reopened = Some((t.elapsed(), d.directory.store.index().len()));
    let n = b.args.restart_cloudlets.min(b.max);
    m.registrations.push(
        register(
            "embedded",
            "first heartbeat after a restart",
            &d.url,
            &b.fleet,
            0..n,
            b.conns,
            None,
        )
        .await?,
    );
    d.stop().await?;
    Ok(())
}

/// 0 and 2 on etcd (one member, started here and returned for the
/// deaths): registrations, then heartbeats unchanged and changed.
async fn etcd_heartbeats(b: &Bench, m: &mut Measured) -> anyhow::Result<Etcd> {
    let edir = b.tmp.path().join("etcd");
    eprintln!("starting etcd in {} ...", edir.display());
    let e = tokio::task::spawn_blocking({
        let edir = edir.clone();
        move || Etcd::start(1, &edir)
    })
    .await?;
    let etcd_pid = pid_with_arg(&edir.join("m0").display().to_string());
    let eps = e.endpoints();
    let d = serve(&b.rt, etcd_config(&eps, "/bench", 5000, LONG_LEASE_MS)).await?;
    let etcd_n = b.etcd_n;
    eprintln!("registering {etcd_n} cloudlets (etcd) ...");
    m.registrations.push(
        register(
            "etcd",
            "registration",
            &d.url,
            &b.fleet,
            0..etcd_n,
            b.conns,
            etcd_pid,
        )
        .await?,
    );
    for changed in [false, true] {
        eprintln!("heartbeats, etcd, changed={changed} ...");
        m.hbs.push(
            heartbeat_load(
                "etcd", &d.url, &b.fleet, etcd_n, b.conns, b.hb_dur, changed, etcd_pid, None,
            )
            .await?,
        );
    }
    d.stop().await?;
    Ok(e)
}

/// 3: every scenario at once (each its own directory; they sleep most
/// of the time), for the short setting and the default one, embedded and
/// on etcd.
async fn death_phase(b: &Bench, etcd: Option<&Etcd>) -> anyhow::Result<Vec<DeathRow>> {
    let args = &b.args;
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
            config(
                &b.tmp.path().join(format!("death-{i}.redb")),
                hb_ms,
                lease_ms,
            ),
        )];
        if let Some(e) = etcd {
            stores.push((
                "etcd",
                etcd_config(&e.endpoints(), &format!("/death-{i}"), hb_ms, lease_ms),
            ));
        }
        for (j, (store, cfg)) in stores.into_iter().enumerate() {
            let d = serve(&b.rt, cfg).await?;
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
    Ok(deaths.into_iter().map(|d| d.2).collect())
}
