//! Shared pieces of cloudlet's benchmarks.

use std::time::{Duration, Instant};

use cloudlet_testkit::http;

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

/// Median of a non-empty list of durations.
pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

pub fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}
