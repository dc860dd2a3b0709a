//! The ranking: which live cloudlets can take a device's app, best first,
//! and why (a pure function of the index and the query, so it is tested
//! without a server).
//!
//! 1. **Filter**: a candidate is not draining, holds the asked base VM (by name or id) or
//!    says it can get it, offers the asked flavor, and has room for one
//!    more VM of it (vCPUs, memory, VM slots). The rest are "excluded",
//!    with the reason, the nearest first.
//! 2. **Rank**, key by key:
//!    1. network distance: the device's address in one of the cloudlet's
//!       served networks first (the longest prefix first);
//!    2. geographic distance, in bands (`< 10 km`, `< 50 km`, `< 200 km`,
//!       `< 1000 km`, `< 5000 km`, farther): within a band, the next keys
//!       decide, so that a cloudlet 3 km farther but with the overlay
//!       cached and idle wins;
//!    3. the overlay already cached;
//!    4. free capacity: how many more VMs of the flavor fit;
//!    5. load (lower first);
//!    6. exact distance, then name (a stable order).
//!
//! Elijah ranked by geographic distance alone; Sinfonia by network, then
//! geographic distance (neither by cache, room or load).

use std::cmp::Ordering;
use std::net::IpAddr;

use cloudlet_api::directory::{Candidate, Excluded, SearchAnswer, SearchQuery};
use cloudlet_api::{distance_km, Flavor};

use ipnet::IpNet;

use crate::index::Entry;

pub const DEFAULT_N: usize = 5;
pub const MAX_N: usize = 100;

/// Upper bounds of the distance bands, km.
const BANDS_KM: [f64; 5] = [10.0, 50.0, 200.0, 1000.0, 5000.0];

pub const RANKING: &str = "holds the base (or can get it) and has room for the flavor; then: \
    in the device's network (longest prefix), distance band, overlay cached, \
    more room for the flavor, lower load, distance, name";

/// A query, checked.
#[derive(Debug, Clone)]
pub struct Search {
    pub near: Option<(f64, f64)>,
    pub base: Option<String>,
    pub overlay: Option<String>,
    pub flavor: Option<String>,
    pub n: usize,
    pub client: Option<IpAddr>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SearchError {
    #[error("lat and lon go together (got only one)")]
    HalfLocation,
    #[error("lat must be within [-90, 90] and lon within [-180, 180]")]
    LocationRange,
    #[error("n must be 1..={MAX_N}")]
    BadCount,
    #[error("addr {0:?} is not an IP address")]
    BadAddr(String),
}

impl Search {
    /// From the query; `peer` is the address the call came from.
    pub fn from_query(q: &SearchQuery, peer: Option<IpAddr>) -> Result<Self, SearchError> {
        let near = match (q.lat, q.lon) {
            (Some(lat), Some(lon)) => {
                if !(-90.0..=90.0).contains(&lat) || !(-180.0..=180.0).contains(&lon) {
                    return Err(SearchError::LocationRange);
                }
                Some((lat, lon))
            }
            (None, None) => None,
            _ => return Err(SearchError::HalfLocation),
        };
        let n = q.n.unwrap_or(DEFAULT_N);
        if n == 0 || n > MAX_N {
            return Err(SearchError::BadCount);
        }
        let client = match &q.addr {
            Some(a) => Some(
                a.parse::<IpAddr>()
                    .map_err(|_| SearchError::BadAddr(a.clone()))?,
            ),
            None => peer.map(canonical),
        };
        let nonempty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
        Ok(Search {
            near,
            base: nonempty(&q.base),
            overlay: nonempty(&q.overlay),
            flavor: nonempty(&q.flavor),
            n,
            client,
        })
    }
}

/// `::ffff:10.0.0.1` is `10.0.0.1`.
fn canonical(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, IpAddr::V4),
        v4 => v4,
    }
}

fn band(km: f64) -> usize {
    BANDS_KM
        .iter()
        .position(|b| km < *b)
        .unwrap_or(BANDS_KM.len())
}

fn band_label(b: usize) -> String {
    match BANDS_KM.get(b) {
        Some(km) => format!("< {km} km"),
        None => format!(">= {} km", BANDS_KM[BANDS_KM.len() - 1]),
    }
}

/// What one entry scores for one search.
struct Scored<'a> {
    e: &'a Entry,
    /// The device's network at this cloudlet (the longest prefix).
    net: Option<&'a IpNet>,
    km: Option<f64>,
    band: usize,
    cached: bool,
    fits: u32,
}

impl Scored<'_> {
    fn order(&self, o: &Self) -> Ordering {
        let net = |s: &Self| s.net.map_or(-1, |n| n.prefix_len() as i32);
        net(o)
            .cmp(&net(self))
            .then(self.band.cmp(&o.band))
            .then(o.cached.cmp(&self.cached))
            .then(o.fits.cmp(&self.fits))
            .then(self.e.reg.load.total_cmp(&o.e.reg.load))
            .then(self.km.unwrap_or(0.0).total_cmp(&o.km.unwrap_or(0.0)))
            .then(self.e.reg.name.cmp(&o.e.reg.name))
    }

    /// Nearest first, for the excluded list.
    fn nearness(&self, o: &Self) -> Ordering {
        let net = |s: &Self| s.net.map_or(-1, |n| n.prefix_len() as i32);
        net(o)
            .cmp(&net(self))
            .then(self.km.unwrap_or(0.0).total_cmp(&o.km.unwrap_or(0.0)))
            .then(self.e.reg.name.cmp(&o.e.reg.name))
    }
}

/// Why an entry cannot take the app (rendered for the excluded that are
/// shown only: a search of 10,000 formats at most `n` of these).
#[derive(Debug, Clone, Copy)]
enum Unfit {
    Draining,
    NoBase,
    NoFlavor,
    Full,
}

impl Unfit {
    fn why(self, e: &Entry, s: &Search) -> String {
        let r = &e.reg;
        let none = String::new();
        match self {
            Unfit::Draining => "draining (maintenance): takes no new VMs".into(),
            Unfit::NoBase => format!("does not hold base {}", s.base.as_ref().unwrap_or(&none)),
            Unfit::NoFlavor => {
                format!(
                    "does not offer flavor {}",
                    s.flavor.as_ref().unwrap_or(&none)
                )
            }
            Unfit::Full => match &s.flavor {
                Some(f) => format!(
                    "full: no room for flavor {f} (free {} vCPU, {} MiB, {} VM slots)",
                    r.free.vcpus, r.free.memory_mib, r.free.vms
                ),
                None => format!(
                    "full (free {} vCPU, {} MiB, {} VM slots)",
                    r.free.vcpus, r.free.memory_mib, r.free.vms
                ),
            },
        }
    }
}

/// Why `e` cannot take the app, if it cannot; else how many VMs fit.
fn fit(e: &Entry, s: &Search) -> Result<u32, Unfit> {
    let r = &e.reg;
    if !r.accepting {
        return Err(Unfit::Draining);
    }
    if let Some(base) = &s.base {
        let held = r.base_vms.iter().any(|b| &b.name == base || &b.id == base);
        if !held && !r.obtainable_bases.iter().any(|b| b == base) {
            return Err(Unfit::NoBase);
        }
    }
    let fits_flavor = |f: &Flavor| {
        let by_cpu = r.free.vcpus.checked_div(f.vcpus.max(1)).unwrap_or(0);
        let by_mem = r
            .free
            .memory_mib
            .checked_div(f.memory_mib.max(1))
            .unwrap_or(0);
        by_cpu
            .min(by_mem.min(u32::MAX as u64) as u32)
            .min(r.free.vms)
    };
    let fits = match &s.flavor {
        Some(name) => {
            let Some(f) = r.flavors.iter().find(|f| &f.name == name) else {
                return Err(Unfit::NoFlavor);
            };
            fits_flavor(f)
        }
        None => r
            .flavors
            .iter()
            .map(fits_flavor)
            .max()
            .unwrap_or(r.free.vms),
    };
    if fits == 0 {
        return Err(Unfit::Full);
    }
    Ok(fits)
}

fn network_of(e: &Entry, client: Option<IpAddr>) -> Option<&IpNet> {
    let c = client?;
    e.networks
        .iter()
        .filter(|n| n.contains(&c))
        .max_by_key(|n| n.prefix_len())
}

fn cached(e: &Entry, overlay: &Option<String>) -> bool {
    overlay
        .as_ref()
        .is_some_and(|o| e.reg.overlays_cached.iter().any(|c| c == o))
}

/// Rank `entries` (the live ones) for `s`.
pub fn search<'a>(entries: impl Iterator<Item = &'a Entry>, s: &Search) -> SearchAnswer {
    let mut fitting: Vec<Scored> = Vec::new();
    let mut left_out: Vec<(Scored, Unfit)> = Vec::new();
    for e in entries {
        let km = s
            .near
            .map(|p| distance_km(p, (e.reg.location.latitude, e.reg.location.longitude)));
        let scored = |fits| Scored {
            e,
            net: network_of(e, s.client),
            km,
            band: km.map_or(0, band),
            cached: cached(e, &s.overlay),
            fits,
        };
        match fit(e, s) {
            Ok(fits) => fitting.push(scored(fits)),
            Err(why) => left_out.push((scored(0), why)),
        }
    }
    let registered = fitting.len() + left_out.len();
    top(&mut fitting, s.n, Scored::order);
    let mut left_refs: Vec<&(Scored, Unfit)> = left_out.iter().collect();
    top(&mut left_refs, s.n, |a, b| a.0.nearness(&b.0));
    SearchAnswer {
        client_addr: s.client.map(|a| a.to_string()),
        candidates: fitting
            .iter()
            .enumerate()
            .map(|(i, c)| candidate(i + 1, c, s))
            .collect(),
        excluded: left_refs
            .iter()
            .map(|(c, why)| Excluded {
                name: c.e.reg.name.clone(),
                api_url: c.e.reg.api_url.clone(),
                distance_km: c.km.map(round1),
                network: c.net.map(|n| n.to_string()),
                why: why.why(c.e, s),
            })
            .collect(),
        registered,
        ranking: RANKING.into(),
    }
}

/// Keep the best `n` of `v`, sorted (a partial selection, then a sort of
/// only those: 10,000 entries cost one pass).
fn top<T>(v: &mut Vec<T>, n: usize, mut cmp: impl FnMut(&T, &T) -> Ordering) {
    if v.len() > n {
        v.select_nth_unstable_by(n - 1, &mut cmp);
        v.truncate(n);
    }
    v.sort_by(cmp);
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn candidate(rank: usize, c: &Scored, s: &Search) -> Candidate {
    let r = &c.e.reg;
    let mut reasons = Vec::new();
    match (&c.net, s.client) {
        (Some(n), Some(a)) => reasons.push(format!("in network: {a} is in {n}")),
        (None, Some(a)) => reasons.push(format!("not in network: {a} is in none of its networks")),
        _ => reasons.push("network: the device's address is not known".into()),
    }
    match c.km {
        Some(km) => reasons.push(format!(
            "distance {:.1} km (band {})",
            km,
            band_label(c.band)
        )),
        None => reasons.push("distance: the query gave no location".into()),
    }
    if let Some(o) = &s.overlay {
        reasons.push(if c.cached {
            format!("overlay cached: {o}")
        } else {
            "overlay not cached".into()
        });
    }
    reasons.push(format!(
        "room for {} more VM(s) of {} (free {} vCPU, {} MiB, {} slots)",
        c.fits,
        s.flavor.as_deref().unwrap_or("its largest flavor"),
        r.free.vcpus,
        r.free.memory_mib,
        r.free.vms
    ));
    reasons.push(format!("load {:.2}", r.load));
    if let Some(b) = &s.base {
        let held = r.base_vms.iter().any(|h| &h.name == b || &h.id == b);
        reasons.push(if held {
            format!("holds base {b}")
        } else {
            format!("can get base {b}")
        });
    }
    Candidate {
        rank,
        name: r.name.clone(),
        api_url: r.api_url.clone(),
        public_host: r.public_host.clone(),
        location: r.location.clone(),
        network: c.net.map(|n| n.to_string()),
        distance_km: c.km.map(round1),
        distance_band: c.km.map(|_| band_label(c.band)),
        overlay_cached: c.cached,
        fits: c.fits,
        free: r.free,
        load: r.load,
        accel: r.accel.clone(),
        release: r.release.clone(),
        handoff_protocol: r.handoff_protocol,
        reasons,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances_and_bands() {
        // Pittsburgh to New York: about 506 km.
        let d = distance_km((40.4406, -79.9959), (40.7128, -74.0060));
        assert!((d - 506.0).abs() < 5.0, "{d}");
        assert_eq!(distance_km((1.0, 2.0), (1.0, 2.0)), 0.0);
        assert_eq!(band(3.0), 0);
        assert_eq!(band(10.0), 1);
        assert_eq!(band(20_000.0), 5);
        assert_eq!(band_label(5), ">= 5000 km");
    }

    #[test]
    fn a_query_is_checked() {
        let q = |lat, lon, n| SearchQuery {
            lat,
            lon,
            n,
            ..SearchQuery::default()
        };
        assert_eq!(
            Search::from_query(&q(Some(1.0), None, None), None).unwrap_err(),
            SearchError::HalfLocation
        );
        assert_eq!(
            Search::from_query(&q(Some(91.0), Some(0.0), None), None).unwrap_err(),
            SearchError::LocationRange
        );
        assert_eq!(
            Search::from_query(&q(None, None, Some(101)), None).unwrap_err(),
            SearchError::BadCount
        );
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let s = Search::from_query(&q(None, None, None), Some(mapped)).unwrap();
        assert_eq!(s.client, Some("10.0.0.1".parse().unwrap()));
        assert_eq!(s.n, DEFAULT_N);
    }
}
