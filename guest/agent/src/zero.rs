//! `zero_free_memory`: leave the guest's free pages zero-filled before a
//! snapshot, so that an overlay sees zeros there instead of stale data.
//!
//! The kernel hands a process zero-filled pages. A child process (this
//! binary, run with [`CHILD_FLAG`]) maps anonymous memory in chunks with
//! `MAP_POPULATE` while `MemFree` stays above a reserve, then unmaps it all:
//! the pages go back to the free lists, still zero. The child makes itself
//! the OOM killer's first choice, so that if memory runs out anyway (another
//! process allocating at the same time) it is the one that dies, not the app
//! or the agent. It stops at the first failed mapping. Staying above the
//! reserve also keeps the kernel from reclaiming the page cache (the app's
//! mapped files stay resident).

use std::process::Command;

use cloudlet_agent_proto::Reply;

/// The child's command-line flag: `--zero-free-memory RESERVE CHUNK MAX`.
pub const CHILD_FLAG: &str = "--zero-free-memory";

/// Largest chunk accepted (one mapping).
const MAX_CHUNK: u64 = 256 << 20;

/// Runs the zeroing in a child process and returns its report.
pub fn zero_free_memory(reserve: u64, chunk: u64, max: u64) -> Result<Reply, String> {
    let exe = std::env::current_exe().map_err(|e| format!("Cannot find the agent binary: {e}"))?;
    let out = Command::new(&exe)
        .args([
            CHILD_FLAG,
            &reserve.to_string(),
            &chunk.to_string(),
            &max.to_string(),
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("Cannot start the zeroing process: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "The zeroing process failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "Bad report from the zeroing process ({e}): {}",
            String::from_utf8_lossy(&out.stdout).trim()
        )
    })
}

/// The child's `main`: returns the exit code.
pub fn run_child(args: &[String]) -> i32 {
    let num = |i: usize| args.get(i).and_then(|s| s.parse::<u64>().ok());
    let (Some(reserve), Some(chunk), Some(max)) = (num(0), num(1), num(2)) else {
        eprintln!("usage: cloudlet-agent {CHILD_FLAG} RESERVE CHUNK MAX");
        return 2;
    };
    // The OOM killer's first choice (best effort: it is only a safety net).
    let _ = std::fs::write("/proc/self/oom_score_adj", "1000");
    match zero_free(reserve, chunk, max, read_meminfo) {
        Ok(reply) => match serde_json::to_string(&reply) {
            Ok(s) => {
                println!("{s}");
                0
            }
            Err(e) => {
                eprintln!("{e}");
                1
            }
        },
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

/// `MemFree` and `MemAvailable` in bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemInfo {
    pub free: u64,
    pub available: u64,
}

pub fn parse_meminfo(text: &str) -> Option<MemInfo> {
    let field = |name: &str| {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(':')?;
            let kib: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
            Some(kib * 1024)
        })
    };
    Some(MemInfo {
        free: field("MemFree")?,
        available: field("MemAvailable")?,
    })
}

fn read_meminfo() -> Result<MemInfo, String> {
    let text = std::fs::read_to_string("/proc/meminfo")
        .map_err(|e| format!("Cannot read /proc/meminfo: {e}"))?;
    parse_meminfo(&text).ok_or_else(|| "Cannot parse /proc/meminfo".to_string())
}

/// Anonymous mappings, unmapped when dropped.
struct Mappings(Vec<(*mut libc::c_void, usize)>);

impl Drop for Mappings {
    fn drop(&mut self) {
        for (p, len) in self.0.drain(..) {
            // SAFETY: each (p, len) is a mapping this process made and has
            // not unmapped; nothing refers to it.
            unsafe { libc::munmap(p, len) };
        }
    }
}

/// The zeroing itself, in the calling process: map chunks of zero-filled
/// pages while `MemFree` (as `meminfo` reports it before each chunk) stays
/// above `reserve` plus the chunk, and at most `max` bytes (0: no limit);
/// then unmap them.
pub fn zero_free(
    reserve: u64,
    chunk: u64,
    max: u64,
    mut meminfo: impl FnMut() -> Result<MemInfo, String>,
) -> Result<Reply, String> {
    // SAFETY: sysconf has no preconditions.
    let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as u64,
        _ => 4096,
    };
    let chunk = chunk.clamp(page, MAX_CHUNK).div_ceil(page) * page;
    let before = meminfo()?;
    let mut maps = Mappings(Vec::new());
    let mut zeroed = 0u64;
    let stopped = loop {
        if max != 0 && zeroed + chunk > max {
            break "max".to_string();
        }
        let now = if zeroed == 0 { before } else { meminfo()? };
        if now.free < reserve.saturating_add(chunk) {
            break "reserve".to_string();
        }
        // SAFETY: a fresh private anonymous mapping; MAP_POPULATE faults its
        // pages in (writable private mapping: real, zero-filled pages).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                chunk as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            break format!("mmap: {}", std::io::Error::last_os_error());
        }
        maps.0.push((p, chunk as usize));
        zeroed += chunk;
    };
    drop(maps);
    Ok(Reply::FreeMemoryZeroed {
        zeroed_bytes: zeroed,
        mem_free_bytes: before.free,
        mem_available_bytes: before.available,
        stopped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:         498208 kB\n\
        MemFree:          301000 kB\n\
        MemAvailable:     350000 kB\n\
        Buffers:            1000 kB\n";

    #[test]
    fn meminfo_is_parsed_in_bytes() {
        assert_eq!(
            parse_meminfo(MEMINFO),
            Some(MemInfo {
                free: 301000 * 1024,
                available: 350000 * 1024
            })
        );
        assert_eq!(parse_meminfo("MemFree: 12 kB\n"), None);
        assert_eq!(parse_meminfo("MemFree: x kB\nMemAvailable: 1 kB\n"), None);
    }

    fn zeroed(r: &Reply) -> (u64, &str) {
        match r {
            Reply::FreeMemoryZeroed {
                zeroed_bytes,
                stopped,
                ..
            } => (*zeroed_bytes, stopped.as_str()),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn stops_at_the_reserve() {
        // MemFree falls by what was mapped; 100 MiB free, 48 MiB reserve,
        // 4 MiB chunks: 13 chunks fit (52 MiB, leaving 48).
        let mapped = std::cell::Cell::new(0u64);
        let free0 = 100u64 << 20;
        let mut calls = 0;
        let r = zero_free(48 << 20, 4 << 20, 0, || {
            calls += 1;
            let free = free0 - mapped.get();
            mapped.set(mapped.get() + (4 << 20));
            Ok(MemInfo {
                free,
                available: free,
            })
        })
        .unwrap();
        assert_eq!(zeroed(&r), (52 << 20, "reserve"));
        assert!(calls >= 13);
    }

    #[test]
    fn nothing_when_free_memory_is_below_the_reserve() {
        let r = zero_free(48 << 20, 4 << 20, 0, || {
            Ok(MemInfo {
                free: 40 << 20,
                available: 60 << 20,
            })
        })
        .unwrap();
        assert_eq!(zeroed(&r), (0, "reserve"));
    }

    #[test]
    fn really_maps_up_to_the_limit() {
        // Real mappings in this process, capped at 8 MiB.
        let r = zero_free(0, 1 << 20, 8 << 20, read_meminfo).unwrap();
        assert_eq!(zeroed(&r), (8 << 20, "max"));
    }
}
