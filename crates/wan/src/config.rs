//! What a user asks for: [`WanConfig`], and the derived tbf and queue parameters.

use std::time::Duration;

use crate::WanError;

/// Longest accepted `name_prefix`. Namespace names are `clw-<prefix>-<pid>-<seq>-<a|b>`.
pub const MAX_PREFIX_LEN: usize = 24;

/// How long the bottleneck (tbf) may queue a packet before it drops: the bottleneck
/// buffer is `rate x BOTTLENECK_BUFFER`, like a router buffer sized for ~150 ms.
pub const BOTTLENECK_BUFFER: Duration = Duration::from_millis(150);

/// The emulated link, the same in both directions.
#[derive(Debug, Clone, PartialEq)]
pub struct WanConfig {
    /// Part of every namespace name (`[a-z0-9_]`, 1..=24 chars), so leftovers of a
    /// crashed run can be recognised. Several links may share a prefix.
    pub name_prefix: String,
    /// Bottleneck rate in Mbit/s (10^6 bit/s), each direction.
    pub rate_mbit: f64,
    /// One-way propagation delay; the round-trip time is twice this.
    pub one_way_delay: Duration,
    /// Random loss probability per packet, each direction (0.0..1.0).
    pub loss: f64,
    /// MTU of the link devices.
    pub mtu: u32,
}

impl WanConfig {
    /// A link with the given rate and one-way delay, no loss and a 1500-byte MTU.
    pub fn new(name_prefix: &str, rate_mbit: f64, one_way_delay: Duration) -> Self {
        WanConfig {
            name_prefix: name_prefix.to_string(),
            rate_mbit,
            one_way_delay,
            loss: 0.0,
            mtu: 1500,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), WanError> {
        let p = &self.name_prefix;
        if p.is_empty()
            || p.len() > MAX_PREFIX_LEN
            || !p
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(WanError::InvalidConfig(format!(
                "Prefix {p:?} must be 1..={MAX_PREFIX_LEN} chars of [a-z0-9_]"
            )));
        }
        validate_rate(self.rate_mbit)?;
        validate_delay(self.one_way_delay)?;
        validate_loss(self.loss)?;
        if !(576..=9000).contains(&self.mtu) {
            return Err(WanError::InvalidConfig(format!(
                "MTU {} must be in 576..=9000",
                self.mtu
            )));
        }
        Ok(())
    }
}

pub(crate) fn validate_rate(rate_mbit: f64) -> Result<(), WanError> {
    if !(rate_mbit.is_finite() && (0.01..=10_000.0).contains(&rate_mbit)) {
        return Err(WanError::InvalidConfig(format!(
            "Rate {rate_mbit} Mbit/s must be in 0.01..=10000"
        )));
    }
    Ok(())
}

pub(crate) fn validate_delay(delay: Duration) -> Result<(), WanError> {
    if delay > Duration::from_secs(10) {
        return Err(WanError::InvalidConfig(format!(
            "One-way delay {delay:?} must be at most 10 s"
        )));
    }
    Ok(())
}

pub(crate) fn validate_loss(loss: f64) -> Result<(), WanError> {
    if !(loss.is_finite() && (0.0..1.0).contains(&loss)) {
        return Err(WanError::InvalidConfig(format!(
            "Loss {loss} must be in 0.0..1.0"
        )));
    }
    Ok(())
}

/// Bytes per second for a rate in Mbit/s.
pub(crate) fn rate_bytes_per_sec(rate_mbit: f64) -> f64 {
    rate_mbit * 1e6 / 8.0
}

/// Arguments for `tc qdisc replace dev wan0 root tbf ...`.
///
/// The burst is about 4 ms worth of tokens (at least 4 MTUs and 16 KiB): enough for
/// tbf to keep the rate with the kernel's timer granularity, small enough not to
/// show up in a one-second throughput measurement.
pub(crate) fn tbf_args(rate_mbit: f64, mtu: u32) -> Vec<String> {
    let rate_kbit = (rate_mbit * 1000.0).round().max(1.0) as u64;
    let burst = (rate_bytes_per_sec(rate_mbit) * 0.004)
        .max(4.0 * mtu as f64)
        .max(16384.0) as u64;
    vec![
        "tbf".into(),
        "rate".into(),
        format!("{rate_kbit}kbit"),
        "burst".into(),
        burst.to_string(),
        "latency".into(),
        format!("{}ms", BOTTLENECK_BUFFER.as_millis()),
    ]
}

/// Bound of the delay line's FIFO in bytes: everything the bottleneck can emit during
/// the delay plus the bottleneck buffer, plus slack. Packets over it are dropped.
pub(crate) fn delay_queue_cap(rate_mbit: f64, delay: Duration) -> u64 {
    let secs = delay.as_secs_f64() + BOTTLENECK_BUFFER.as_secs_f64();
    (rate_bytes_per_sec(rate_mbit) * secs) as u64 + 256 * 1024
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_prefix_rate_loss_mtu() {
        let ok = WanConfig::new("t1", 20.0, Duration::from_millis(20));
        ok.validate().unwrap();
        for bad in ["", "Upper", "has-dash", "way_too_long_prefix_for_a_ns"] {
            let c = WanConfig {
                name_prefix: bad.into(),
                ..ok.clone()
            };
            assert!(c.validate().is_err(), "{bad:?}");
        }
        for rate in [0.0, -1.0, f64::NAN, 1e9] {
            let c = WanConfig {
                rate_mbit: rate,
                ..ok.clone()
            };
            assert!(c.validate().is_err(), "{rate}");
        }
        for loss in [-0.1, 1.0, f64::NAN] {
            let c = WanConfig { loss, ..ok.clone() };
            assert!(c.validate().is_err(), "{loss}");
        }
        let c = WanConfig {
            mtu: 100,
            ..ok.clone()
        };
        assert!(c.validate().is_err());
    }

    #[test]
    fn tbf_parameters() {
        assert_eq!(
            tbf_args(20.0, 1500),
            [
                "tbf",
                "rate",
                "20000kbit",
                "burst",
                "16384",
                "latency",
                "150ms"
            ]
        );
        // 100 Mbit/s: 4 ms of tokens is 50 kB.
        assert_eq!(tbf_args(100.0, 1500)[4], "50000");
        // 20 Mbit/s, 25 ms: 2.5 MB/s * 0.175 s = 437.5 kB, plus 256 KiB slack.
        assert_eq!(
            delay_queue_cap(20.0, Duration::from_millis(25)),
            437_500 + 262_144
        );
    }
}
