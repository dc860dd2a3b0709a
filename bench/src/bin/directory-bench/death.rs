//! Death to removal: cloudlets heartbeat on schedule, then stop at a
//! random point of their period; search is polled until each is gone,
//! while two survivors heartbeat throughout.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use cloudlet_api::directory::{HeldBase, Registration, SearchAnswer};
use cloudlet_api::{Flavor, Location, Resources};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::fleet::{base_id, Cloudlet};
use crate::http::{get, http_client, put};

/// How often the death phase polls search.
pub const POLL: Duration = Duration::from_millis(50);

pub struct Death {
    pub from_death: Duration,
    pub from_last: Duration,
    pub from_missed: Duration,
}

pub struct DeathRow {
    pub store: &'static str,
    pub hb: Duration,
    pub lease: Duration,
    /// etcd's lease TTL (whole seconds).
    pub ttl: Option<u64>,
    pub deaths: Vec<Death>,
    pub survivor_polls: usize,
    pub survivor_misses: usize,
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
        accepting: true,
        peer_token: None,
        recent_moves: Vec::new(),
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
pub async fn death_scenario(
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
        side.spawn(survivor(c, url, hb, stop));
    }
    side.spawn(survivor_poll(url.clone(), stop.clone(), tag.clone()));
    let mut mortals = tokio::task::JoinSet::new();
    for k in 0..n {
        let base = format!("mortal-{tag}-{k}");
        let c = Cloudlet::new(small_reg(&base, &base), &mut rng);
        let phase = hb.mul_f64(rng.gen_range(0.0..1.0));
        let death_point = rng.gen_range(0.02..0.98);
        let u = format!("{url}{}", c.path);
        let q = format!("{url}/v1/cloudlets?base={base}&n=5");
        mortals.spawn(mortal(c, u, q, hb, lease, phase, death_point));
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

/// A survivor: heartbeats every `hb` until `stop` (no polls, no misses).
async fn survivor(
    c: Cloudlet,
    url: String,
    hb: Duration,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<(usize, usize)> {
    let client = http_client();
    let u = format!("{url}{}", c.path);
    let mut tick = tokio::time::interval(hb);
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        put(&client, &u, &c.auth, &c.body).await?;
    }
    Ok((0, 0))
}

/// Polls search every [`POLL`] until `stop`: the polls, and those that
/// missed a survivor.
async fn survivor_poll(
    url: String,
    stop: Arc<AtomicBool>,
    tag: String,
) -> anyhow::Result<(usize, usize)> {
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
}

/// A mortal: registers at `u` after `phase`, heartbeats once more after
/// `hb`, dies `death_point` of a period later, and is polled (search `q`)
/// until it is gone.
async fn mortal(
    c: Cloudlet,
    u: String,
    q: String,
    hb: Duration,
    lease: Duration,
    phase: Duration,
    death_point: f64,
) -> anyhow::Result<Death> {
    let client = http_client();
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
}
