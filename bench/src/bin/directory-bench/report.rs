//! The report: one table per phase, on stdout.

use std::path::Path;
use std::time::Duration;

use crate::death::{Death, DeathRow, POLL};
use crate::load::{Burst, HbRow, SearchRow};
use crate::{Args, Measured};

/// The report on stdout: the machine, then one table per phase.
pub fn print_report(
    args: &Args,
    cpus: usize,
    loadavg: &str,
    workdir: &Path,
    m: &Measured,
    conns: usize,
) {
    print_header(cpus, loadavg, workdir);
    println!();
    print_registrations(&m.registrations, m.reopened, conns);
    println!();
    print_search(args, &m.search);
    println!();
    print_heartbeats(args, cpus, &m.hbs, conns);
    println!();
    print_deaths(&m.deaths);
}

/// What ran where, and what the CPU columns mean.
fn print_header(cpus: usize, loadavg: &str, workdir: &Path) {
    println!();
    println!("directory-bench: cloudlet-directory served in-process on 127.0.0.1, real HTTP (axum/hyper server, reqwest clients in the same process)");
    println!(
        "machine: {cpus} cores shared by the clients, the directory and etcd (and any other work: load average at start {loadavg}); files in {}",
        workdir.display()
    );
    println!("CPU columns: cores used during the measurement by the directory's threads / the bench's clients / etcd / everything else on the machine (other work)");
}

/// 0: the registrations, and the first heartbeats after a restart.
fn print_registrations(registrations: &[Burst], reopened: Option<(Duration, usize)>, conns: usize) {
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
}

/// 1: search latency, and its target.
fn print_search(args: &Args, search: &[SearchRow]) {
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
}

/// 2: heartbeats held, and their target.
fn print_heartbeats(args: &Args, cpus: usize, hbs: &[HbRow], conns: usize) {
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
}

/// 3: death to removal, measured rows then the published ones.
fn print_deaths(deaths: &[DeathRow]) {
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
        print_death_row(d);
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

/// One measured row of table 3.
fn print_death_row(d: &DeathRow) {
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

fn fmt_secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if (s - s.round()).abs() < 1e-9 {
        format!("{s:.0}")
    } else {
        format!("{s}")
    }
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
