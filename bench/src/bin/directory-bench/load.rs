//! The load: registrations (one PUT per cloudlet), searches over HTTP and
//! in-process, and heartbeats in a closed loop (alone or with searches).

use std::net::IpAddr;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cloudlet_api::directory::{SearchAnswer, SearchQuery};
use tokio::sync::Barrier;

use crate::cpu::{cores, cpu_now, Cores};
use crate::fleet::Cloudlet;
use crate::http::{get, http_client, put};
use crate::serve::Served;
use crate::Args;

// ---------------------------------------------------------------- registration

/// One PUT per cloudlet of a range, over many connections: first
/// registrations, or first heartbeats after a restart.
pub struct Burst {
    pub store: &'static str,
    pub what: &'static str,
    pub n: usize,
    pub took: Duration,
    pub lat: Vec<Duration>,
    pub cpu: Cores,
    /// `GET /v1/health` every 20 ms meanwhile, from another connection.
    pub health: Vec<Duration>,
}

/// PUT each of `fleet[range]` once, over `conns` connections.
pub async fn register(
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

// ---------------------------------------------------------------- search

pub struct Latencies {
    pub lat: Vec<Duration>,
    pub wall: Duration,
    pub bytes: usize,
    bodies: Vec<Vec<u8>>,
    pub cpu: Cores,
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

pub struct SearchRow {
    pub size: usize,
    pub what: String,
    pub clients: usize,
    pub l: Latencies,
    pub note: String,
}

/// The search rows for the directory as it is now (`size` registered).
pub async fn search_rows(
    d: &Served,
    size: usize,
    qs: &[(String, SearchQuery)],
    args: &Args,
) -> anyhow::Result<Vec<SearchRow>> {
    let mut rows = http_rows(d, size, qs, args).await?;
    rows.extend(in_process_rows(d, size, qs, args)?);
    Ok(rows)
}

/// The HTTP rows: `GET /v1/health` (the baseline), then the devices'
/// searches with one client and with `--search-clients`.
async fn http_rows(
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
        let note = check_answers(&mut l, size)?;
        rows.push(SearchRow {
            size,
            what: "search lat,lon,base,flavor,n=5".into(),
            clients,
            l,
            note,
        });
    }
    Ok(rows)
}

/// Checked after the clock stopped: real answers, of this size. The
/// bodies are dropped; the note says how many answers were full.
fn check_answers(l: &mut Latencies, size: usize) -> anyhow::Result<String> {
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
    Ok(format!(
        "{:.0}% of answers have 5 candidates",
        100.0 * full as f64 / l.lat.len().max(1) as f64
    ))
}

/// The ranking alone: no HTTP, no JSON; the devices' queries, then the
/// same places with no filter (every entry fits but the full ones) and
/// with a base no cloudlet holds (every entry is excluded, with its
/// reason).
fn in_process_rows(
    d: &Served,
    size: usize,
    qs: &[(String, SearchQuery)],
    args: &Args,
) -> anyhow::Result<Vec<SearchRow>> {
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
    let mut rows = Vec::new();
    for (what, note, shape, count) in shapes {
        let shaped: Vec<SearchQuery> = qs.iter().map(|q| shape(&q.1)).collect();
        rows.push(SearchRow {
            size,
            what: what.into(),
            clients: 1,
            l: in_process(d, &shaped, count)?,
            note: note.into(),
        });
    }
    Ok(rows)
}

/// `count` calls of `Directory::search`, cycling through `shaped`.
fn in_process(d: &Served, shaped: &[SearchQuery], count: usize) -> anyhow::Result<Latencies> {
    let peer = Some(IpAddr::from([127, 0, 0, 1]));
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
    Ok(Latencies {
        lat,
        wall,
        bytes: 0,
        bodies: vec![],
        cpu,
    })
}

// ---------------------------------------------------------------- heartbeats

pub struct HbRow {
    pub store: &'static str,
    pub body: String,
    pub cloudlets: usize,
    pub ok: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub lat: Vec<Duration>,
    pub wall: Duration,
    pub cpu: Cores,
    /// Searches sent meanwhile, by other clients (mixed load).
    pub searches: Vec<Duration>,
}

/// Clients that search (one query after the other, each on its
/// connection) while heartbeats come in.
pub struct Searching {
    pub clients: usize,
    pub paths: Arc<Vec<String>>,
}

/// `conns` connections, each heartbeating its share of `fleet[..count]`
/// in turn, as fast as answers come, for `dur`.
#[allow(clippy::too_many_arguments)]
pub async fn heartbeat_load(
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
            let offset = k * paths.len() / searchers.max(1);
            search_tasks.spawn(searcher(url, paths, offset, dur, barrier));
        }
    }
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..conns {
        let (url, fleet, barrier) = (url.to_string(), fleet.clone(), barrier.clone());
        let mine: Vec<usize> = (k..count).step_by(conns).collect();
        tasks.spawn(heartbeater(url, fleet, mine, dur, changed, barrier));
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

/// One searching client of a heartbeat load: from `offset` in `paths`,
/// one search after the other for `dur` after the barrier.
async fn searcher(
    url: String,
    paths: Arc<Vec<String>>,
    offset: usize,
    dur: Duration,
    barrier: Arc<Barrier>,
) -> anyhow::Result<Vec<Duration>> {
    let c = http_client();
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
}

/// What one heartbeating connection did: successes, errors, the first
/// error, the latencies of the successes.
type Heartbeats = (u64, u64, Option<String>, Vec<Duration>);

/// One heartbeating connection: the cloudlets `mine` of `fleet` in turn,
/// as fast as answers come, for `dur` after the barrier (with `changed`,
/// every other heartbeat of a cloudlet has other free resources).
async fn heartbeater(
    url: String,
    fleet: Arc<Vec<Cloudlet>>,
    mine: Vec<usize>,
    dur: Duration,
    changed: bool,
    barrier: Arc<Barrier>,
) -> Heartbeats {
    let c = http_client();
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
}
