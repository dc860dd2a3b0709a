//! Adaptive choice of the compression mode while a handoff runs.
//!
//! The goal is the rate at which raw VM state crosses the link. A mode (codec
//! x level x delta) with compression ratio `r` (wire bytes / raw bytes) and
//! CPU throughput `c` (raw bytes per second of compression) moves raw state
//! at `min(c, link / r)`: a slow link wants the best ratio the CPU can keep
//! up with; a fast link wants the cheapest codec. The encoder measures every
//! candidate mode on a sample of recent novel pages from time to time (the
//! first cloudlet handoff sampled 108 modes every 5 s), the caller reports the
//! link rate as the socket drains, and every `decide_every` (or
//! `decide_every_bytes`) the policy switches to the best mode, with a little
//! hysteresis so measurement noise does not make it flap.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::codec::Mode;
use crate::wire::Codec;

/// How the policy behaves.
#[derive(Debug, Clone)]
pub struct PolicyConfig {
    /// Decide at most this often...
    pub decide_every: Duration,
    /// ...or after this many raw bytes, whichever comes first.
    pub decide_every_bytes: u64,
    /// Re-measure every candidate this often.
    pub sample_every: Duration,
    /// Codecs to consider; each with and without delta.
    pub candidates: Vec<Codec>,
    /// The mode before anything is measured (or the link rate is known).
    pub initial: Mode,
    /// Always use this mode (no sampling, no switching).
    pub fixed: Option<Mode>,
    /// A new mode must beat the current one by this factor to be chosen.
    pub hysteresis: f64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            decide_every: Duration::from_millis(500),
            decide_every_bytes: 32 << 20,
            sample_every: Duration::from_secs(5),
            candidates: vec![
                Codec::None,
                Codec::Lz4,
                Codec::Zstd(1),
                Codec::Zstd(2),
                Codec::Zstd(3),
                Codec::Zstd(5),
                Codec::Zstd(7),
                Codec::Zstd(9),
                Codec::Zstd(12),
                Codec::Zstd(15),
                Codec::Zstd(19),
            ],
            initial: Mode::new(Codec::Zstd(3), true),
            fixed: None,
            hysteresis: 1.05,
        }
    }
}

impl PolicyConfig {
    /// A policy that always uses `mode`.
    pub fn fixed(mode: Mode) -> Self {
        PolicyConfig {
            initial: mode,
            fixed: Some(mode),
            ..PolicyConfig::default()
        }
    }
}

/// What is known about one mode.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModeMeasure {
    /// Wire bytes per raw byte (smaller is better).
    pub ratio: f64,
    /// Raw bytes compressed per second of CPU.
    pub cpu_rate: f64,
    pub samples: u64,
}

/// The mode chooser. Pure bookkeeping: the encoder feeds it measurements.
#[derive(Debug, Clone)]
pub struct AdaptivePolicy {
    config: PolicyConfig,
    measures: HashMap<Mode, ModeMeasure>,
    link_rate: Option<f64>,
    current: Mode,
    switches: u64,
    last_decision: Option<Instant>,
    bytes_since_decision: u64,
    last_sample: Option<Instant>,
}

const EWMA: f64 = 0.5;

impl AdaptivePolicy {
    pub fn new(config: PolicyConfig) -> Self {
        let current = config.fixed.unwrap_or(config.initial);
        AdaptivePolicy {
            config,
            measures: HashMap::new(),
            link_rate: None,
            current,
            switches: 0,
            last_decision: None,
            bytes_since_decision: 0,
            last_sample: None,
        }
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.config
    }

    /// The mode in use.
    pub fn mode(&self) -> Mode {
        self.current
    }

    /// How many times the mode changed.
    pub fn switches(&self) -> u64 {
        self.switches
    }

    /// Every mode the policy considers.
    pub fn candidates(&self) -> Vec<Mode> {
        if let Some(m) = self.config.fixed {
            return vec![m];
        }
        let mut v = Vec::new();
        for &c in &self.config.candidates {
            v.push(Mode::new(c, false));
            v.push(Mode::new(c, true));
        }
        v
    }

    /// The link rate, bytes per second, as last reported.
    pub fn link_rate(&self) -> Option<f64> {
        self.link_rate
    }

    /// Report the link rate (bytes/s), e.g. as measured while the socket drains.
    pub fn report_link_rate(&mut self, bytes_per_sec: f64) {
        if !(bytes_per_sec.is_finite() && bytes_per_sec > 0.0) {
            return;
        }
        self.link_rate = Some(match self.link_rate {
            Some(r) => r * (1.0 - EWMA) + bytes_per_sec * EWMA,
            None => bytes_per_sec,
        });
    }

    /// Report that `bytes` left through the socket in `elapsed`.
    pub fn report_drained(&mut self, bytes: u64, elapsed: Duration) {
        let s = elapsed.as_secs_f64();
        if s > 0.0 {
            self.report_link_rate(bytes as f64 / s);
        }
    }

    /// Record one measurement of `mode`: `raw` bytes became `wire` bytes in `elapsed`.
    pub fn record(&mut self, mode: Mode, raw: usize, wire: usize, elapsed: Duration) {
        if raw == 0 {
            return;
        }
        let ratio = wire as f64 / raw as f64;
        let cpu_rate = raw as f64 / elapsed.as_secs_f64().max(1e-7);
        let m = self.measures.entry(mode).or_insert(ModeMeasure {
            ratio,
            cpu_rate,
            samples: 0,
        });
        m.ratio = m.ratio * (1.0 - EWMA) + ratio * EWMA;
        m.cpu_rate = m.cpu_rate * (1.0 - EWMA) + cpu_rate * EWMA;
        m.samples += 1;
    }

    pub fn measure(&self, mode: Mode) -> Option<ModeMeasure> {
        self.measures.get(&mode).copied()
    }

    /// `min(cpu_rate, link_rate / ratio)`, raw bytes per second; without a
    /// link rate, the CPU rate alone.
    pub fn effective_rate(&self, mode: Mode) -> Option<f64> {
        let m = self.measures.get(&mode)?;
        let link = self.link_rate.unwrap_or(f64::INFINITY);
        Some(m.cpu_rate.min(link / m.ratio.max(1e-6)))
    }

    /// Whether the encoder should measure the candidates now.
    pub fn wants_sample(&self, now: Instant) -> bool {
        self.config.fixed.is_none()
            && match self.last_sample {
                None => true,
                Some(t) => now.duration_since(t) >= self.config.sample_every,
            }
    }

    pub fn sampled(&mut self, now: Instant) {
        self.last_sample = Some(now);
    }

    /// Count raw bytes processed (for `decide_every_bytes`).
    pub fn account(&mut self, raw: u64) {
        self.bytes_since_decision += raw;
    }

    /// Decide if it is time; return the new mode if it changed.
    pub fn maybe_decide(&mut self, now: Instant) -> Option<Mode> {
        let due = match self.last_decision {
            None => true,
            Some(t) => now.duration_since(t) >= self.config.decide_every,
        } || self.bytes_since_decision >= self.config.decide_every_bytes;
        if !due {
            return None;
        }
        self.last_decision = Some(now);
        self.bytes_since_decision = 0;
        let before = self.current;
        self.decide();
        (self.current != before).then_some(self.current)
    }

    /// Pick the best measured mode now (needs a link rate; otherwise keeps
    /// the current mode).
    pub fn decide(&mut self) -> Mode {
        if self.config.fixed.is_some() || self.link_rate.is_none() {
            return self.current;
        }
        let mut best: Option<(Mode, f64)> = None;
        for mode in self.candidates() {
            if let Some(r) = self.effective_rate(mode) {
                if best.map_or(true, |(_, b)| r > b) {
                    best = Some((mode, r));
                }
            }
        }
        if let Some((mode, rate)) = best {
            let cur = self.effective_rate(self.current).unwrap_or(0.0);
            if mode != self.current && rate > cur * self.config.hysteresis {
                self.current = mode;
                self.switches += 1;
            }
        }
        self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn policy() -> AdaptivePolicy {
        let mut p = AdaptivePolicy::new(PolicyConfig::default());
        // 1 MB: none is free, lz4 fast, zstd-19 small but slow.
        p.record(Mode::new(Codec::None, false), 1_000_000, 1_000_000, ms(1));
        p.record(Mode::new(Codec::Lz4, false), 1_000_000, 500_000, ms(2));
        p.record(Mode::new(Codec::Zstd(3), true), 1_000_000, 300_000, ms(5));
        p.record(
            Mode::new(Codec::Zstd(19), true),
            1_000_000,
            200_000,
            ms(400),
        );
        p
    }

    #[test]
    fn slow_link_picks_the_best_ratio_the_cpu_sustains() {
        let mut p = policy();
        p.report_link_rate(3e6); // ~25 Mbit/s
        assert_eq!(p.decide(), Mode::new(Codec::Zstd(3), true));
        // zstd-19: min(2.5 MB/s, 15 MB/s) = 2.5 < zstd-3: min(200, 10) = 10.
        assert_eq!(p.switches(), 0, "zstd-3+delta was already in use");
    }

    #[test]
    fn fast_link_picks_the_cheapest() {
        let mut p = policy();
        p.report_link_rate(1e10);
        assert_eq!(p.decide(), Mode::new(Codec::None, false));
    }

    #[test]
    fn very_slow_link_and_plenty_of_cpu_picks_the_smallest() {
        let mut p = policy();
        p.report_link_rate(100_000.0);
        assert_eq!(p.decide(), Mode::new(Codec::Zstd(19), true));
    }

    #[test]
    fn no_link_rate_keeps_the_initial_mode_and_fixed_never_moves() {
        let mut p = policy();
        assert_eq!(p.decide(), PolicyConfig::default().initial);
        let mut f = AdaptivePolicy::new(PolicyConfig::fixed(Mode::new(Codec::Lz4, false)));
        f.report_link_rate(1.0);
        assert_eq!(f.decide(), Mode::new(Codec::Lz4, false));
        assert!(!f.wants_sample(Instant::now()));
    }

    #[test]
    fn decisions_are_paced() {
        let mut p = policy();
        p.report_link_rate(1e10);
        let t = Instant::now();
        assert!(p.maybe_decide(t).is_some());
        for _ in 0..64 {
            p.report_link_rate(1e3);
        }
        assert!(p.maybe_decide(t + ms(100)).is_none(), "too early");
        assert!(p.maybe_decide(t + ms(600)).is_some());
    }
}
