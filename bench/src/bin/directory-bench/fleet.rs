//! The synthetic fleet: registrations spread over a region (most around a
//! dozen metro areas), with their heartbeat bodies, and the devices'
//! search queries.

use std::ops::Range;
use std::sync::Arc;

use cloudlet_api::directory::{HeldBase, Registration, SearchQuery};
use cloudlet_api::{Flavor, Location, Resources};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

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

/// One cloudlet of the generated fleet, with its heartbeat bodies.
pub struct Cloudlet {
    pub reg: Registration,
    pub auth: String,
    pub path: String,
    /// The registration as registered.
    pub body: Vec<u8>,
    /// The same with other free resources.
    pub changed: Vec<u8>,
}

impl Cloudlet {
    pub fn new(reg: Registration, rng: &mut StdRng) -> Self {
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

pub fn base_id(name: &str) -> String {
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
    let free = free(capacity, rng);
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
        accepting: true,
        peer_token: Some(format!("peer-{:032x}", rng.gen::<u128>())),
        recent_moves: Vec::new(),
        name,
    }
}

/// Free resources out of `capacity`: about one in six has no room (no
/// vCPU, too little memory, or no VM slot left); the others have some of
/// everything.
fn free(capacity: Resources, rng: &mut StdRng) -> Resources {
    if rng.gen_bool(0.15) {
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
    }
}

pub fn fleet(n: usize, seed: u64) -> Arc<Vec<Cloudlet>> {
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
pub fn queries(n: usize, seed: u64) -> Vec<(String, SearchQuery)> {
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
