//! The walk: the one-way delay of each link over time. Three segments of
//! equal length (the device near `c1`, then `c2`, then `c3`), the `cloud`
//! link fixed at 40 ms; on every link, all the time, noise: the delay is
//! drawn again every 3 s as its nominal value plus a uniform offset in
//! ±`noise_ms` (default 1.5 ms), from a seeded generator (the same
//! schedule in every run).

use std::time::{Duration, Instant};

use cloudlet_wan::Wan;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sites in link order (see `topology::World::sites`).
pub const SITES: [&str; 4] = ["c1", "c2", "c3", "cloud"];
/// Nominal one-way delays of `c1`..`c3` per segment, ms.
const SEGMENTS: [[f64; 3]; 3] = [[2.0, 15.0, 30.0], [15.0, 2.0, 15.0], [30.0, 15.0, 2.0]];
pub const CLOUD_MS: f64 = 40.0;
/// The default noise, ms either way.
pub const NOISE_MS: f64 = 1.5;
pub const NOISE_EVERY: Duration = Duration::from_secs(3);
/// No link goes below this (a delay line of zero is a different link).
const MIN_MS: f64 = 0.1;

#[derive(Debug, Clone, Copy)]
pub struct Walk {
    pub segment: Duration,
    pub seed: u64,
    /// The noise's bound, ms either way.
    pub noise_ms: f64,
}

impl Walk {
    pub fn len(&self) -> Duration {
        self.segment * SEGMENTS.len() as u32
    }

    /// The nominal one-way delays of every site in segment `seg`, ms.
    pub fn nominal(&self, seg: usize) -> [f64; 4] {
        let s = SEGMENTS[seg.min(SEGMENTS.len() - 1)];
        [s[0], s[1], s[2], CLOUD_MS]
    }

    /// The cloudlet (`c1`..`c3`) nearest in segment `seg`.
    pub fn nearest(&self, seg: usize) -> &'static str {
        let s = self.nominal(seg);
        let i = (0..3)
            .min_by(|a, b| s[*a].total_cmp(&s[*b]))
            .expect("three cloudlets");
        SITES[i]
    }

    /// The segment at `t` seconds into the run.
    pub fn segment_at(&self, t: f64) -> usize {
        ((t / self.segment.as_secs_f64()).max(0.0) as usize).min(SEGMENTS.len() - 1)
    }

    /// When the user steps from one segment to the next, seconds.
    pub fn steps(&self) -> Vec<f64> {
        (1..SEGMENTS.len())
            .map(|k| k as f64 * self.segment.as_secs_f64())
            .collect()
    }

    /// Every change of the links' delays: from the start, the delays
    /// (ms, per site) that hold until the next entry.
    pub fn schedule(&self) -> Vec<(Duration, [f64; 4])> {
        let mut rng = StdRng::seed_from_u64(self.seed);
        let mut times: Vec<Duration> = (0..)
            .map(|k| NOISE_EVERY * k)
            .take_while(|t| *t < self.len())
            .collect();
        times.extend(self.steps().iter().map(|s| Duration::from_secs_f64(*s)));
        times.sort();
        times.dedup();
        let mut offsets = [0.0; 4];
        times
            .into_iter()
            .map(|t| {
                if (t.as_nanos() % NOISE_EVERY.as_nanos()) == 0 {
                    for o in &mut offsets {
                        *o = rng.gen_range(-self.noise_ms..=self.noise_ms);
                    }
                }
                let nominal = self.nominal(self.segment_at(t.as_secs_f64()));
                let mut d = [0.0; 4];
                for i in 0..4 {
                    d[i] = (nominal[i] + offsets[i]).max(MIN_MS);
                }
                (t, d)
            })
            .collect()
    }
}

/// Apply `schedule` to `links` (in site order) from `t0`, until its end.
pub async fn drive(links: &[&Wan], schedule: &[(Duration, [f64; 4])], t0: Instant) {
    for (t, delays) in schedule {
        tokio::time::sleep_until((t0 + *t).into()).await;
        for (link, ms) in links.iter().zip(delays) {
            if let Err(e) = link.set_delay(Duration::from_secs_f64(ms / 1e3)) {
                eprintln!("setting a delay of {ms:.2} ms: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn walk(segment_s: u64) -> Walk {
        Walk {
            noise_ms: NOISE_MS,
            segment: Duration::from_secs(segment_s),
            seed: 7,
        }
    }

    #[test]
    fn the_schedule_is_the_nominal_walk_plus_bounded_noise() {
        let w = walk(60);
        let s = w.schedule();
        assert_eq!(
            s.len(),
            60,
            "every 3 s for 180 s (the steps fall on the grid)"
        );
        for (t, d) in &s {
            let n = w.nominal(w.segment_at(t.as_secs_f64()));
            for i in 0..4 {
                assert!((d[i] - n[i]).abs() <= NOISE_MS + 1e-9, "{t:?} {d:?}");
            }
        }
        assert_eq!(w.nearest(0), "c1");
        assert_eq!(w.nearest(1), "c2");
        assert_eq!(w.nearest(2), "c3");
        // The same seed, the same schedule; another seed, other noise.
        assert_eq!(s, w.schedule());
        assert_ne!(s, Walk { seed: 8, ..w }.schedule());
    }

    #[test]
    fn a_step_off_the_noise_grid_is_its_own_entry() {
        let w = walk(20);
        let s = w.schedule();
        let at20 = s.iter().find(|e| e.0 == Duration::from_secs(20)).unwrap();
        assert!(
            (at20.1[1] - 2.0).abs() <= NOISE_MS,
            "c2 near from 20 s: {at20:?}"
        );
        assert!(s.windows(2).all(|p| p[0].0 < p[1].0));
    }
}
