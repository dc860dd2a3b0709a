//! The delay line: one thread that moves packets between the two TUN devices.
//!
//! Each direction is a bounded FIFO. A packet read from the source TUN (already shaped
//! by tbf on that device's egress) is stamped `release = arrival + delay` and queued;
//! when its time comes it is written to the other TUN, which injects it into the other
//! namespace's stack. The FIFO never reorders: after a delay decrease, younger packets
//! wait behind older ones.
//!
//! Drops: a full FIFO (tail drop), random loss, and everything while the link is cut
//! (both on arrival and on release, so packets already in flight are lost too).
//!
//! The thread sleeps in `ppoll` with a nanosecond timeout until the next release or the
//! next readable packet, and at most [`IDLE_WAKE`] so that it notices teardown. An idle
//! link costs 20 wake-ups a second.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest sleep of the delay line thread, to notice [`LinkControl::stop`].
const IDLE_WAKE: Duration = Duration::from_millis(50);

/// Biggest packet we read: a TUN never hands out more than 64 KiB.
const MAX_PACKET: usize = 65536;

/// Counters of one direction.
#[derive(Debug, Default)]
pub(crate) struct DirCounters {
    packets: AtomicU64,
    bytes: AtomicU64,
    dropped_full: AtomicU64,
    dropped_cut: AtomicU64,
    dropped_loss: AtomicU64,
}

/// What one direction of the link has done since creation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirectionStats {
    /// Packets delivered to the far side.
    pub packets: u64,
    /// IP bytes delivered to the far side.
    pub bytes: u64,
    /// Packets dropped because the delay line's FIFO was full.
    pub dropped_full: u64,
    /// Packets dropped because the link was cut.
    pub dropped_cut: u64,
    /// Packets dropped by random loss.
    pub dropped_loss: u64,
}

impl DirCounters {
    fn snapshot(&self) -> DirectionStats {
        DirectionStats {
            packets: self.packets.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            dropped_full: self.dropped_full.load(Ordering::Relaxed),
            dropped_cut: self.dropped_cut.load(Ordering::Relaxed),
            dropped_loss: self.dropped_loss.load(Ordering::Relaxed),
        }
    }
}

/// Knobs and counters shared between [`crate::Wan`] and the delay line thread.
#[derive(Debug, Default)]
pub(crate) struct LinkControl {
    pub delay_ns: AtomicU64,
    pub cap_bytes: AtomicU64,
    /// Loss probability scaled to `u64::MAX`.
    pub loss_threshold: AtomicU64,
    pub cut: AtomicBool,
    pub stop: AtomicBool,
    /// Index 0: A to B, 1: B to A.
    pub counters: [DirCounters; 2],
}

impl LinkControl {
    pub fn stats(&self, dir: usize) -> DirectionStats {
        self.counters[dir].snapshot()
    }

    pub fn set_loss(&self, loss: f64) {
        let t = (loss * u64::MAX as f64) as u64;
        self.loss_threshold.store(t, Ordering::Relaxed);
    }
}

struct Direction {
    queue: VecDeque<(Instant, Vec<u8>)>,
    queued_bytes: u64,
}

/// Runs until `ctl.stop` is set. `fds[0]` is A's TUN, `fds[1]` B's; direction `i`
/// reads `fds[i]` and writes `fds[1 - i]`.
pub(crate) fn run(fds: [Arc<OwnedFd>; 2], ctl: Arc<LinkControl>) {
    let mut dirs = [
        Direction {
            queue: VecDeque::new(),
            queued_bytes: 0,
        },
        Direction {
            queue: VecDeque::new(),
            queued_bytes: 0,
        },
    ];
    let mut buf = vec![0u8; MAX_PACKET];
    let mut rng = XorShift::seeded();
    while !ctl.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let mut timeout = IDLE_WAKE;
        for d in &dirs {
            if let Some((release, _)) = d.queue.front() {
                timeout = timeout.min(release.saturating_duration_since(now));
            }
        }
        let mut pfds = [
            libc::pollfd {
                fd: fds[0].as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: fds[1].as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        if !timeout.is_zero() {
            let ts = libc::timespec {
                tv_sec: timeout.as_secs() as libc::time_t,
                tv_nsec: timeout.subsec_nanos() as libc::c_long,
            };
            // SAFETY: pfds and ts are valid for the duration of the call.
            let r = unsafe { libc::ppoll(pfds.as_mut_ptr(), 2, &ts, std::ptr::null()) };
            if r < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::Interrupted {
                    tracing::error!(%err, "wan: delay line poll failed, link stops");
                    return;
                }
                continue;
            }
        }
        let cut = ctl.cut.load(Ordering::Relaxed);
        let delay = Duration::from_nanos(ctl.delay_ns.load(Ordering::Relaxed));
        let cap = ctl.cap_bytes.load(Ordering::Relaxed);
        let loss = ctl.loss_threshold.load(Ordering::Relaxed);
        for i in 0..2 {
            // Read everything that is ready: the TUN ring is small (txqueuelen).
            loop {
                // SAFETY: buf is valid for MAX_PACKET bytes.
                let n =
                    unsafe { libc::read(fds[i].as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    break;
                }
                let n = n as usize;
                let c = &ctl.counters[i];
                if cut {
                    c.dropped_cut.fetch_add(1, Ordering::Relaxed);
                } else if loss > 0 && rng.next() < loss {
                    c.dropped_loss.fetch_add(1, Ordering::Relaxed);
                } else if dirs[i].queued_bytes + n as u64 > cap {
                    c.dropped_full.fetch_add(1, Ordering::Relaxed);
                } else {
                    let arrival = Instant::now();
                    dirs[i].queued_bytes += n as u64;
                    dirs[i]
                        .queue
                        .push_back((arrival + delay, buf[..n].to_vec()));
                }
            }
        }
        let now = Instant::now();
        for (i, d) in dirs.iter_mut().enumerate() {
            let out = fds[1 - i].as_raw_fd();
            let c = &ctl.counters[i];
            while d.queue.front().is_some_and(|(release, _)| *release <= now) {
                let Some((_, pkt)) = d.queue.pop_front() else {
                    break;
                };
                d.queued_bytes -= pkt.len() as u64;
                if ctl.cut.load(Ordering::Relaxed) {
                    c.dropped_cut.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                // SAFETY: pkt is a valid buffer of pkt.len() bytes.
                let n = unsafe { libc::write(out, pkt.as_ptr().cast(), pkt.len()) };
                if n == pkt.len() as isize {
                    c.packets.fetch_add(1, Ordering::Relaxed);
                    c.bytes.fetch_add(pkt.len() as u64, Ordering::Relaxed);
                } else {
                    // The far stack refused it (e.g. its backlog is full): a drop.
                    c.dropped_full.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Small non-cryptographic generator for random loss.
struct XorShift(u64);

impl XorShift {
    fn seeded() -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15);
        XorShift(t | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xorshift_is_roughly_uniform() {
        let mut r = XorShift(12345);
        let below = (0..100_000).filter(|_| r.next() < u64::MAX / 10).count();
        assert!((9_000..11_000).contains(&below), "{below}");
    }
}
