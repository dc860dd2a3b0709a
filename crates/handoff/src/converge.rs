//! Convergence: how much of the time the source VM may run while its memory
//! crosses a link that is slower than the rate at which the guest dirties it.
//!
//! Precopy only ends when one pass leaves so little dirty memory that it can
//! be sent within the downtime budget. Each pass takes `S / L` seconds (dirty
//! set over link rate) and leaves `d * D * S / L` bytes for the next one,
//! where `D` is the guest's dirty rate and `d` the fraction of time it runs:
//! passes shrink by `q = d * D / L`. When `D > L` (8 MiB/s of fresh pages over
//! a 25 Mbit/s link), nothing converges unless `d` is lowered.
//!
//! QEMU's own auto-converge lowers the vCPUs' share of the host CPU, which
//! does not slow an app paced by the clock (a cache that writes what arrives
//! from the network, a game that updates at 60 Hz): under TCG here it never
//! made a 1 GiB VM with 8 MiB/s of churn converge. We pause the whole VM for
//! part of every short period instead (QMP `stop`/`cont`): the guest's clocks
//! stop with it, so its dirty rate in wall time falls exactly with `d`.
//!
//! [`Convergence`] picks `d` from what it has measured: the wire rate the link
//! drains, the compression of the pages that cross it, and the guest's dirty
//! rate (from QEMU's dirty-page count per bitmap sync, corrected for the duty
//! it ran at meanwhile, or a sample taken before the migration started). It
//! aims at passes that shrink by [`ConvergeConfig::shrink`] (a few passes to
//! converge) and never pauses the guest for longer than `1 - min_duty` of a
//! period. It is pure: the daemon feeds it measurements and applies the duty.

use std::time::Duration;

/// Tuning of [`Convergence`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConvergeConfig {
    /// Wanted ratio of one pass's dirty set to the previous one's.
    pub shrink: f64,
    /// Smallest share of time the guest runs (it must keep making progress).
    pub min_duty: f64,
    /// Weight of a new link-rate sample in the running average.
    pub link_smoothing: f64,
    /// Downtime aimed at: the switchover starts when what is left would
    /// cross the link in this time.
    pub downtime: Duration,
    /// After this long in precopy the allowed downtime doubles every
    /// `relax_every` (a guest that cannot be slowed enough still moves).
    pub relax_after: Duration,
    pub relax_every: Duration,
}

impl Default for ConvergeConfig {
    fn default() -> Self {
        ConvergeConfig {
            shrink: 0.25,
            min_duty: 0.02,
            link_smoothing: 0.3,
            downtime: Duration::from_millis(150),
            relax_after: Duration::from_secs(90),
            relax_every: Duration::from_secs(30),
        }
    }
}

/// The duty-cycle controller (see the module documentation).
#[derive(Debug, Clone)]
pub struct Convergence {
    config: ConvergeConfig,
    /// Wire bytes per second the link drains (running average), over
    /// windows when the sender was backed up (the link was the limit), and
    /// over all windows.
    link_rate: Option<f64>,
    link_any: Option<f64>,
    /// Wire bytes per raw byte of the pages that cross the link (<= 1 when
    /// they compress; 1 until measured, i.e. assume incompressible).
    wire_per_raw: f64,
    /// The guest's dirty rate when it runs all the time, raw bytes/s.
    dirty_rate: Option<f64>,
    /// The rate sampled before the migration: QEMU's per-sync figure counts
    /// each page once per pass, so it underestimates a writer that rewrites
    /// its working set more than once a pass; the sample does not.
    sampled: Option<f64>,
    /// Last bitmap sync seen, and the duty integral since then.
    last_sync: u64,
    /// Once QEMU's measurements steer the duty, the open-loop estimate
    /// (sample and link rate) no longer overrides it.
    corrected: bool,
    run_time: f64,
    wall_time: f64,
    duty: f64,
    /// Lowest duty applied so far, and for how long the guest was throttled.
    min_applied: f64,
    throttled: Duration,
}

impl Convergence {
    pub fn new(config: ConvergeConfig) -> Self {
        Convergence {
            config,
            link_rate: None,
            link_any: None,
            wire_per_raw: 1.0,
            dirty_rate: None,
            sampled: None,
            last_sync: 0,
            corrected: false,
            run_time: 0.0,
            wall_time: 0.0,
            duty: 1.0,
            min_applied: 1.0,
            throttled: Duration::ZERO,
        }
    }

    /// A dirty rate measured before the migration (raw bytes/s, guest
    /// running all the time), e.g. QEMU's `calc-dirty-rate`.
    pub fn observe_sampled_dirty_rate(&mut self, bytes_per_sec: f64) {
        if bytes_per_sec.is_finite() && bytes_per_sec >= 0.0 {
            self.sampled = Some(bytes_per_sec);
            self.dirty_rate = Some(self.dirty_rate.unwrap_or(0.0).max(bytes_per_sec));
            self.decide();
        }
    }

    /// Wire bytes the link drained over `elapsed`; `backed_up` when the
    /// sender had data waiting all along (so this is the link's capacity,
    /// not just what there was to send).
    pub fn observe_link(&mut self, wire_bytes: u64, elapsed: Duration, backed_up: bool) {
        let secs = elapsed.as_secs_f64();
        if secs <= 0.0 {
            return;
        }
        let rate = wire_bytes as f64 / secs;
        let a = self.config.link_smoothing;
        let avg = |old: Option<f64>| Some(old.map_or(rate, |o| o * (1.0 - a) + rate * a));
        self.link_any = avg(self.link_any);
        if backed_up {
            self.link_rate = avg(self.link_rate);
            self.decide();
        }
    }

    /// The link's capacity as measured, wire bytes/s.
    fn capacity(&self) -> Option<f64> {
        self.link_rate.or(self.link_any)
    }

    /// Whether `remaining` raw bytes of dirty memory can cross the link
    /// within the downtime aimed at (relaxed after a long precopy), so that
    /// the switchover may start. True when the link was never measured.
    pub fn ready_to_switch(&self, remaining: u64, precopy: Duration) -> bool {
        let Some(link) = self.capacity() else {
            return true;
        };
        let mut allowed = self.config.downtime.as_secs_f64();
        if let Some(over) = precopy.checked_sub(self.config.relax_after) {
            let steps = over.as_secs_f64() / self.config.relax_every.as_secs_f64().max(1e-3);
            allowed *= 2f64.powf(steps.floor() + 1.0);
        }
        remaining as f64 * self.wire_per_raw / link <= allowed
    }

    /// Compression of the pages that cross the link: wire bytes per raw
    /// byte, from the encoder's counters for pages sent in full.
    pub fn observe_compression(&mut self, wire_per_raw: f64) {
        if wire_per_raw.is_finite() && wire_per_raw > 0.0 {
            self.wire_per_raw = wire_per_raw.min(1.0);
            self.decide();
        }
    }

    /// QEMU's counters after a poll: `sync_count` (`dirty-sync-count`) and
    /// the dirty rate it computed at its last sync (raw bytes/s in wall
    /// time: what the guest really dirtied at the duty it ran at).
    ///
    /// This is the feedback: passes shrink by `q = rate / link`; the duty
    /// is scaled by `shrink / q` (at most 4x down or 2x up per sync), so
    /// that the sample's error or a change of the app's pace is corrected.
    pub fn observe_qemu(&mut self, sync_count: u64, dirty_bytes_per_sec: f64) {
        if sync_count <= self.last_sync {
            return;
        }
        let first = self.last_sync == 0;
        self.last_sync = sync_count;
        // QEMU recomputes its rate at most once a second; a shorter pass
        // repeats the previous figure, which must not be acted on twice.
        if !first && self.wall_time < 1.0 {
            return;
        }
        let ran = if self.wall_time > 0.0 {
            self.run_time / self.wall_time
        } else {
            self.duty
        };
        self.run_time = 0.0;
        self.wall_time = 0.0;
        // QEMU's first sync is at the start; its rate means nothing yet.
        if first || sync_count < 2 || !dirty_bytes_per_sec.is_finite() {
            return;
        }
        // The guest's own pace, for reporting and for the first decision
        // when nothing was sampled.
        let own = dirty_bytes_per_sec / ran.max(self.config.min_duty);
        let Some(link) = self.capacity() else {
            self.dirty_rate = Some(own);
            return;
        };
        let link_raw = link / self.wire_per_raw;
        if self.dirty_rate.is_none() {
            self.dirty_rate = Some(own);
            self.decide();
            return;
        }
        self.dirty_rate = Some(own);
        self.corrected = true;
        let q = dirty_bytes_per_sec / link_raw;
        let wanted = if q <= 0.0 {
            1.0
        } else {
            ran * self.config.shrink / q
        };
        self.set_duty(wanted.clamp(ran * 0.25, (ran * 2.0).max(self.config.min_duty)));
    }

    /// Time passed at the current duty.
    pub fn tick(&mut self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        self.run_time += secs * self.duty;
        self.wall_time += secs;
        if self.duty < 1.0 {
            self.throttled += elapsed;
        }
    }

    fn decide(&mut self) {
        if self.corrected {
            return;
        }
        let (Some(link), Some(dirty)) = (self.link_rate, self.dirty_rate) else {
            return;
        };
        if dirty <= 0.0 {
            self.duty = 1.0;
            return;
        }
        // Raw bytes per second the link carries.
        let link_raw = link / self.wire_per_raw;
        self.set_duty(self.config.shrink * link_raw / dirty);
    }

    fn set_duty(&mut self, duty: f64) {
        let duty = duty.clamp(self.config.min_duty, 1.0);
        self.duty = duty;
        self.min_applied = self.min_applied.min(duty);
    }

    /// Share of time the guest should run now (1.0: no throttling).
    pub fn duty(&self) -> f64 {
        self.duty
    }

    /// The dirty rate the controller believes, raw bytes/s unthrottled.
    pub fn dirty_rate(&self) -> Option<f64> {
        self.dirty_rate
    }

    /// The link rate it believes, wire bytes/s.
    pub fn link_rate(&self) -> Option<f64> {
        self.capacity()
    }

    /// Lowest duty decided so far.
    pub fn min_duty_applied(&self) -> f64 {
        self.min_applied
    }

    /// How long the guest ran throttled.
    pub fn throttled(&self) -> Duration {
        self.throttled
    }
}

/// When in a period of `period` the guest runs and when it is paused.
pub fn duty_split(duty: f64, period: Duration) -> (Duration, Duration) {
    let duty = duty.clamp(0.0, 1.0);
    let run = period.mul_f64(duty);
    (run, period.saturating_sub(run))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: f64 = 1024.0 * 1024.0;

    /// A guest dirtying `dirty` bytes/s (when running) out of a working set
    /// of `ws` bytes, migrated over `link` bytes/s: returns the number of
    /// passes until one fits the downtime budget, or None after `max`.
    fn simulate(
        dirty: f64,
        ws: f64,
        link: f64,
        throttle: bool,
        sample: bool,
        max: usize,
    ) -> Option<(usize, f64)> {
        let mut c = Convergence::new(ConvergeConfig::default());
        if sample {
            c.observe_sampled_dirty_rate(dirty);
        }
        let budget = link * 0.3;
        let mut set = ws; // first pass: the whole working set
        let mut total = 0.0;
        let mut sync = 1;
        c.observe_qemu(sync, 0.0);
        for pass in 1..=max {
            let secs = set / link;
            total += secs;
            // Feed link samples and ticks through the pass.
            let steps = (secs / 0.5).ceil().max(1.0) as usize;
            let mut ran = 0.0;
            for _ in 0..steps {
                let dt = secs / steps as f64;
                c.observe_link((link * dt) as u64, Duration::from_secs_f64(dt), true);
                let d = if throttle { c.duty() } else { 1.0 };
                ran += d * dt;
                c.tick(Duration::from_secs_f64(dt));
            }
            let dirtied = (dirty * ran).min(ws);
            sync += 1;
            c.observe_qemu(sync, dirtied / secs);
            if dirtied <= budget {
                return Some((pass, total));
            }
            set = dirtied;
        }
        None
    }

    #[test]
    fn without_throttling_a_fast_writer_never_converges() {
        assert_eq!(
            simulate(8.0 * MIB, 64.0 * MIB, 3.1e6, false, true, 50),
            None
        );
    }

    #[test]
    fn throttling_converges_fast_and_heavy_writers() {
        for (dirty, link) in [(8.0, 3.1e6), (16.0, 3.1e6), (16.0, 1.25e6), (8.0, 6.25e6)] {
            // The working set must cross once; with a sampled rate the rest
            // is a geometric tail with ratio about 1/4.
            let floor = 64.0 * MIB / link;
            let (passes, secs) = simulate(dirty * MIB, 64.0 * MIB, link, true, true, 50)
                .unwrap_or_else(|| panic!("{dirty} MiB/s over {link} B/s did not converge"));
            assert!(passes <= 6, "{dirty} MiB/s over {link}: {passes} passes");
            assert!(secs < floor * 1.6, "{secs} s vs {floor} s");
            // From QEMU's per-pass counts alone it converges too, later.
            let (passes, secs) = simulate(dirty * MIB, 64.0 * MIB, link, true, false, 50)
                .unwrap_or_else(|| {
                    panic!("{dirty} MiB/s over {link} B/s: no convergence unsampled")
                });
            assert!(
                passes <= 12,
                "{dirty} MiB/s over {link}: {passes} passes unsampled"
            );
            assert!(secs < floor * 5.0, "{secs} s vs {floor} s unsampled");
        }
    }

    #[test]
    fn a_fast_link_is_left_alone() {
        let mut c = Convergence::new(ConvergeConfig::default());
        c.observe_sampled_dirty_rate(8.0 * MIB);
        c.observe_link(1_000_000_000, Duration::from_secs(1), true);
        assert_eq!(c.duty(), 1.0);
        assert_eq!(c.min_duty_applied(), 1.0);
    }

    #[test]
    fn duty_follows_link_and_dirty_rate() {
        let mut c = Convergence::new(ConvergeConfig::default());
        assert_eq!(c.duty(), 1.0, "nothing known: no throttling");
        c.observe_link(3_000_000, Duration::from_secs(1), true);
        assert_eq!(c.duty(), 1.0, "no dirty rate yet");
        c.observe_sampled_dirty_rate(12e6);
        // 0.25 * 3e6 / 12e6
        assert!((c.duty() - 0.0625).abs() < 1e-9, "{}", c.duty());
        // Pages that compress 2:1 let twice as much state cross.
        c.observe_compression(0.5);
        assert!((c.duty() - 0.125).abs() < 1e-9, "{}", c.duty());
        // Never below the floor.
        c.observe_sampled_dirty_rate(1e12);
        assert_eq!(c.duty(), ConvergeConfig::default().min_duty);
    }

    #[test]
    fn qemu_rates_are_corrected_for_the_duty() {
        let mut c = Convergence::new(ConvergeConfig::default());
        c.observe_link(4_000_000, Duration::from_secs(1), true);
        c.observe_qemu(1, 0.0);
        c.observe_sampled_dirty_rate(16e6); // duty 0.0625
        c.tick(Duration::from_secs(10));
        // The guest ran 1/16 of the time: QEMU saw 1e6 B/s in wall time,
        // the guest's own rate is still 16e6.
        c.observe_qemu(2, 1e6);
        let d = c.dirty_rate().unwrap();
        assert!((d - 16e6).abs() < 1.0, "{d}");
        assert!(c.throttled() >= Duration::from_secs(10));
        // A stale count changes nothing.
        c.observe_qemu(2, 5e9);
        assert!((c.dirty_rate().unwrap() - 16e6).abs() < 1.0);
    }

    #[test]
    fn switchover_waits_for_a_small_remainder() {
        let mut c = Convergence::new(ConvergeConfig::default());
        assert!(c.ready_to_switch(1 << 30, Duration::ZERO), "no link known");
        // An idle link (nothing to send) is not its capacity...
        c.observe_link(10_000, Duration::from_secs(1), false);
        assert!(!c.ready_to_switch(10_000, Duration::ZERO));
        // ...a backed-up one is: 3 MB/s, 150 ms -> 450 kB.
        c.observe_link(3_000_000, Duration::from_secs(1), true);
        assert!(c.ready_to_switch(400_000, Duration::ZERO));
        assert!(!c.ready_to_switch(44_000_000, Duration::ZERO));
        assert!(!c.ready_to_switch(1_000_000, Duration::from_secs(60)));
        // After 90 s the allowance doubles, then doubles every 30 s.
        assert!(c.ready_to_switch(800_000, Duration::from_secs(95)));
        assert!(!c.ready_to_switch(1_500_000, Duration::from_secs(95)));
        assert!(c.ready_to_switch(1_500_000, Duration::from_secs(125)));
    }

    #[test]
    fn an_idle_link_does_not_set_the_duty() {
        let mut c = Convergence::new(ConvergeConfig::default());
        c.observe_sampled_dirty_rate(8.0 * MIB);
        c.observe_link(100_000, Duration::from_secs(1), false);
        assert_eq!(c.duty(), 1.0);
    }

    #[test]
    fn split_of_a_period() {
        let (run, pause) = duty_split(0.25, Duration::from_millis(200));
        assert_eq!(run, Duration::from_millis(50));
        assert_eq!(pause, Duration::from_millis(150));
        assert_eq!(
            duty_split(1.5, Duration::from_millis(200)).1,
            Duration::ZERO
        );
    }
}
