//! CPU accounting from /proc: the directory's threads (by name), the
//! bench's clients (the rest of this process), etcd (by pid), and the
//! rest of the machine.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// CPU seconds used so far: by the directory's threads, by this whole
/// process, by etcd, by the whole machine.
#[derive(Clone, Copy, Default)]
pub struct Cpu {
    server: f64,
    process: f64,
    etcd: f64,
    machine: f64,
}

/// Cores used over a measurement: by the directory, by the bench's
/// clients, by etcd, by everything else on the machine (other work).
#[derive(Clone, Copy, Default)]
pub struct Cores {
    dir: f64,
    client: f64,
    etcd: f64,
    other: f64,
    /// Too short a window for the kernel's tick to say anything.
    short: bool,
}

impl Cores {
    pub fn show(&self, etcd: bool) -> String {
        if self.short {
            return "(too short)".into();
        }
        let e = if etcd {
            format!("{:.2}", self.etcd)
        } else {
            "-".into()
        };
        format!("{:.2}/{:.2}/{e}/{:.2}", self.dir, self.client, self.other)
    }
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime of a `/proc/.../stat` line, seconds.
fn stat_cpu(stat: &str) -> f64 {
    let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0.0;
    };
    let f: Vec<&str> = after.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / clock_ticks()
}

/// Busy time of every core (`/proc/stat`: all but idle and iowait), s.
fn machine_busy() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is in user).
    let busy: f64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|i| v.get(*i)).sum();
    busy / clock_ticks()
}

pub fn cpu_now(etcd_pid: Option<u32>) -> Cpu {
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let mut server = 0.0;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for t in tasks.flatten() {
            if read(&t.path().join("comm")).starts_with("dir-server") {
                server += stat_cpu(&read(&t.path().join("stat")));
            }
        }
    }
    Cpu {
        server,
        process: stat_cpu(&read(Path::new("/proc/self/stat"))),
        etcd: etcd_pid.map_or(0.0, |p| {
            stat_cpu(&read(&PathBuf::from(format!("/proc/{p}/stat"))))
        }),
        machine: machine_busy(),
    }
}

/// Cores used between two readings.
pub fn cores(a: Cpu, b: Cpu, wall: Duration) -> Cores {
    let w = wall.as_secs_f64().max(1e-9);
    let dir = (b.server - a.server) / w;
    let process = (b.process - a.process) / w;
    let etcd = (b.etcd - a.etcd) / w;
    Cores {
        dir,
        client: (process - dir).max(0.0),
        etcd,
        other: ((b.machine - a.machine) / w - process - etcd).max(0.0),
        short: wall < Duration::from_millis(500),
    }
}

/// The pid of the process whose command line holds `needle` (etcd, by
/// its data directory).
pub fn pid_with_arg(needle: &str) -> Option<u32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if cmd.windows(needle.len()).any(|w| w == needle.as_bytes()) {
            return Some(pid);
        }
    }
    None
}
