//! Shared pieces of cloudlet's benchmarks.

use std::time::{Duration, Instant};

use cloudlet_testkit::http;

pub mod tls;

/// Poll `GET path` on `127.0.0.1:port` until it answers 200; the time from
/// `start` to that answer.
pub async fn first_response(
    port: u16,
    path: &str,
    start: Instant,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    loop {
        if let Ok(r) = http(port, "GET", path, None).await {
            if r.status == 200 {
                return Ok(start.elapsed());
            }
        }
        if start.elapsed() > timeout {
            anyhow::bail!("no answer on port {port} within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Log lines to stderr (the table goes to stdout), at `$CLOUDLET_LOG` or
/// warnings.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CLOUDLET_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// The middle of a non-empty list (of an even count, `mean` of the two in
/// the middle: with two runs, not the slower one).
fn middle<T: Ord + Copy>(mut v: Vec<T>, mean: impl Fn(T, T) -> T) -> T {
    v.sort_unstable();
    let n = v.len();
    match n % 2 {
        1 => v[n / 2],
        _ => mean(v[n / 2 - 1], v[n / 2]),
    }
}

/// Median of a non-empty list of durations.
pub fn median(v: Vec<Duration>) -> Duration {
    middle(v, |a, b| (a + b) / 2)
}

/// [`median`] of a non-empty list of counts.
pub fn median_u64(v: Vec<u64>) -> u64 {
    middle(v, |a, b| (a + b) / 2)
}

pub fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// How much longer `new` took than `base`, in percent ("+3.1 %").
pub fn percent_more(base: Duration, new: Duration) -> String {
    let base = base.as_secs_f64();
    if base <= 0.0 {
        return "-".into();
    }
    format!("{:+.1} %", (new.as_secs_f64() / base - 1.0) * 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        let s = Duration::from_secs;
        assert_eq!(median(vec![s(3), s(1), s(2)]), s(2));
        assert_eq!(median(vec![s(4), s(2)]), s(3));
        assert_eq!(median_u64(vec![7]), 7);
        assert_eq!(median_u64(vec![1, 2, 10, 4]), 3);
    }
}
