//! Memory churn: a background thread that rewrites a preallocated buffer at a fixed
//! rate, so benchmarks can emulate a guest workload that dirties memory at a known
//! number of MiB per second (what live migration and handoff have to keep up with).
//!
//! The buffer is allocated on the first start and kept for the life of the process,
//! so after the first pass the resident size stays constant and only the dirtying
//! rate changes. Every 4 KiB page written gets fresh pseudo-random content, so it is
//! neither zero, nor a duplicate, nor compressible.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

pub const PAGE_SIZE: usize = 4096;
const MIB: f64 = 1024.0 * 1024.0;
/// Highest rate accepted, in MiB/s.
pub const MAX_MIB_PER_S: f64 = 65536.0;

/// What a caller asks for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChurnConfig {
    pub mib_per_s: f64,
    /// Stop by itself after this long; `None` runs until stopped.
    pub seconds: Option<f64>,
}

/// Why a churn could not start.
#[derive(Debug, Clone, PartialEq)]
pub enum StartChurnError {
    InvalidRate(f64),
    InvalidDuration(f64),
    CannotSpawn(String),
}

impl std::fmt::Display for StartChurnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartChurnError::InvalidRate(r) => {
                write!(f, "Rate {r} MiB/s is not in (0, {MAX_MIB_PER_S}]")
            }
            StartChurnError::InvalidDuration(s) => {
                write!(f, "Duration {s} s is not a positive number")
            }
            StartChurnError::CannotSpawn(e) => write!(f, "Cannot start churn thread: {e}"),
        }
    }
}

/// A snapshot of the churn state, as `/churn` answers it in JSON.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ChurnStatus {
    pub running: bool,
    /// Rate of the current or last run (0 if none yet).
    pub mib_per_s: f64,
    pub seconds: Option<f64>,
    /// How long the current run has been going, or how long the last run lasted.
    #[serde(serialize_with = "millisecond_precision")]
    pub elapsed_s: f64,
    /// Bytes written by the current or last run.
    pub bytes_written: u64,
    pub buffer_bytes: usize,
    /// Whether the buffer has been allocated (it is, from the first start on).
    pub buffer_allocated: bool,
}

fn millisecond_precision<S: serde::Serializer>(s: &f64, to: S) -> Result<S::Ok, S::Error> {
    to.serialize_f64((s * 1000.0).round() / 1000.0)
}

struct Run {
    config: ChurnConfig,
    started: Instant,
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    /// Run time in nanoseconds once the thread has ended, 0 before.
    ended_after_ns: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Run {
    fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                eprintln!("kvstore: churn thread panicked");
            }
        }
    }
}

/// Owns the buffer and at most one churn thread.
pub struct Churner {
    buffer_bytes: usize,
    buffer: Mutex<Option<Arc<Mutex<Vec<u8>>>>>,
    run: Mutex<Option<Run>>,
}

impl Churner {
    /// `buffer_bytes` is rounded up to whole pages (at least one).
    pub fn new(buffer_bytes: usize) -> Self {
        Churner {
            buffer_bytes: buffer_bytes.div_ceil(PAGE_SIZE).max(1) * PAGE_SIZE,
            buffer: Mutex::new(None),
            run: Mutex::new(None),
        }
    }

    fn buffer(&self) -> Arc<Mutex<Vec<u8>>> {
        let mut slot = self.buffer.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(slot.get_or_insert_with(|| Arc::new(Mutex::new(vec![0u8; self.buffer_bytes]))))
    }

    /// Starts churning with `config`, replacing any run in progress.
    pub fn start(&self, config: ChurnConfig) -> Result<ChurnStatus, StartChurnError> {
        if !(config.mib_per_s.is_finite()
            && config.mib_per_s > 0.0
            && config.mib_per_s <= MAX_MIB_PER_S)
        {
            return Err(StartChurnError::InvalidRate(config.mib_per_s));
        }
        if let Some(s) = config.seconds {
            if !(s.is_finite() && s > 0.0 && s < 1e9) {
                return Err(StartChurnError::InvalidDuration(s));
            }
        }
        let mut run = self.run.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(old) = run.as_mut() {
            old.stop_and_join();
        }
        let buffer = self.buffer();
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let ended_after_ns = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let thread = {
            let (stop, written) = (Arc::clone(&stop), Arc::clone(&written));
            let ended = Arc::clone(&ended_after_ns);
            std::thread::Builder::new()
                .name("kvstore-churn".into())
                .spawn(move || {
                    let mut buf = buffer.lock().unwrap_or_else(PoisonError::into_inner);
                    churn(&mut buf, config, started, &stop, &written);
                    let ns = started.elapsed().as_nanos().clamp(1, u64::MAX.into()) as u64;
                    ended.store(ns, Ordering::Release);
                })
                .map_err(|e| StartChurnError::CannotSpawn(e.to_string()))?
        };
        *run = Some(Run {
            config,
            started,
            stop,
            written,
            ended_after_ns,
            thread: Some(thread),
        });
        Ok(status_of(run.as_ref(), self.buffer_bytes, true))
    }

    /// Stops the run in progress, if any, and returns the final status of the last run.
    pub fn stop(&self) -> ChurnStatus {
        let mut run = self.run.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(r) = run.as_mut() {
            r.stop_and_join();
        }
        status_of(run.as_ref(), self.buffer_bytes, self.buffer_allocated())
    }

    pub fn status(&self) -> ChurnStatus {
        let run = self.run.lock().unwrap_or_else(PoisonError::into_inner);
        status_of(run.as_ref(), self.buffer_bytes, self.buffer_allocated())
    }

    fn buffer_allocated(&self) -> bool {
        self.buffer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }
}

fn status_of(run: Option<&Run>, buffer_bytes: usize, buffer_allocated: bool) -> ChurnStatus {
    match run {
        None => ChurnStatus {
            running: false,
            mib_per_s: 0.0,
            seconds: None,
            elapsed_s: 0.0,
            bytes_written: 0,
            buffer_bytes,
            buffer_allocated,
        },
        Some(r) => ChurnStatus {
            running: r.is_running(),
            mib_per_s: r.config.mib_per_s,
            seconds: r.config.seconds,
            elapsed_s: match r.ended_after_ns.load(Ordering::Acquire) {
                0 => r.started.elapsed().as_secs_f64(),
                ns => Duration::from_nanos(ns).as_secs_f64(),
            },
            bytes_written: r.written.load(Ordering::Acquire),
            buffer_bytes,
            buffer_allocated,
        },
    }
}

/// The churn loop: writes whole pages, round robin through `buf`, keeping the total
/// written at `rate * elapsed`. A backlog (after the thread was descheduled) is caught
/// up for at most one second's worth, so the rate stays bounded.
fn churn(
    buf: &mut [u8],
    config: ChurnConfig,
    started: Instant,
    stop: &AtomicBool,
    written: &AtomicU64,
) {
    let rate = config.mib_per_s * MIB;
    let deadline = config.seconds.map(Duration::from_secs_f64);
    let pages = buf.len() / PAGE_SIZE;
    let mut page = 0usize;
    let mut done: u64 = 0;
    let mut rng = Xorshift::seeded(started.elapsed().as_nanos() as u64 ^ buf.as_ptr() as u64);
    while !stop.load(Ordering::Acquire) {
        let elapsed = started.elapsed();
        if deadline.is_some_and(|d| elapsed >= d) {
            break;
        }
        let target = (rate * elapsed.as_secs_f64()) as u64;
        done = done.max(target.saturating_sub(rate as u64));
        let mut since_check = 0u32;
        while done < target {
            let start = page * PAGE_SIZE;
            rng.fill(&mut buf[start..start + PAGE_SIZE]);
            page = (page + 1) % pages;
            done += PAGE_SIZE as u64;
            written.fetch_add(PAGE_SIZE as u64, Ordering::AcqRel);
            since_check += 1;
            if since_check == 256 {
                since_check = 0;
                if stop.load(Ordering::Acquire) {
                    return;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// xorshift64*: fast, non-cryptographic, plenty for incompressible filler.
struct Xorshift(u64);

impl Xorshift {
    fn seeded(seed: u64) -> Self {
        Xorshift(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn fill(&mut self, out: &mut [u8]) {
        for word in out.chunks_exact_mut(8) {
            word.copy_from_slice(&self.next().to_le_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_parameters() {
        let c = Churner::new(PAGE_SIZE);
        for rate in [0.0, -1.0, f64::NAN, f64::INFINITY, MAX_MIB_PER_S * 2.0] {
            let cfg = ChurnConfig {
                mib_per_s: rate,
                seconds: None,
            };
            assert!(matches!(c.start(cfg), Err(StartChurnError::InvalidRate(_))));
        }
        let cfg = ChurnConfig {
            mib_per_s: 1.0,
            seconds: Some(-1.0),
        };
        assert!(matches!(
            c.start(cfg),
            Err(StartChurnError::InvalidDuration(_))
        ));
        assert!(!c.status().buffer_allocated);
    }

    #[test]
    fn writes_at_about_the_requested_rate_and_stops() {
        let c = Churner::new(1024 * 1024);
        let status = c
            .start(ChurnConfig {
                mib_per_s: 64.0,
                seconds: None,
            })
            .unwrap();
        assert!(status.running && status.buffer_allocated);
        std::thread::sleep(Duration::from_millis(300));
        let stopped = c.stop();
        assert!(!stopped.running);
        let expected = 64.0 * MIB * stopped.elapsed_s;
        let written = stopped.bytes_written as f64;
        assert!(
            written > expected * 0.5 && written < expected * 1.5,
            "wrote {written} bytes, expected about {expected}"
        );
        // Stopping again is harmless; the count does not move.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(c.stop().bytes_written, stopped.bytes_written);
    }

    #[test]
    fn timed_run_ends_by_itself_and_restart_replaces_it() {
        let c = Churner::new(64 * 1024);
        c.start(ChurnConfig {
            mib_per_s: 1.0,
            seconds: Some(0.05),
        })
        .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let ended = c.status();
        assert!(!ended.running);
        assert!(
            ended.elapsed_s >= 0.05 && ended.elapsed_s < 0.15,
            "{ended:?}"
        );
        let s = c
            .start(ChurnConfig {
                mib_per_s: 2.0,
                seconds: None,
            })
            .unwrap();
        assert!(s.running);
        assert_eq!(s.mib_per_s, 2.0);
        assert!(!c.stop().running);
    }

    #[test]
    fn pages_get_fresh_nonzero_content() {
        let mut buf = vec![0u8; 4 * PAGE_SIZE];
        let stop = AtomicBool::new(false);
        let written = AtomicU64::new(0);
        let cfg = ChurnConfig {
            mib_per_s: 1000.0,
            seconds: Some(0.02),
        };
        churn(&mut buf, cfg, Instant::now(), &stop, &written);
        assert!(written.load(Ordering::Relaxed) >= 4 * PAGE_SIZE as u64);
        let pages: Vec<&[u8]> = buf.chunks(PAGE_SIZE).collect();
        assert!(pages.iter().all(|p| p.iter().any(|&b| b != 0)));
        assert_ne!(pages[0], pages[1]);
    }
}
