//! The operations of the agent protocol, as the guest carries them out.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine;
use cloudlet_agent_proto::{Op, Reply, ResponseResult, AUTOSTART_PATH, OPS, PROTOCOL_VERSION};

/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`, force the kernel CRNG to reseed.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
const VM_ID_PATH: &str = "/run/cloudlet/vm-id";

/// Mounts PID 1 needs if the initramfs did not leave them in place.
pub fn prepare_system() {
    for (src, target, fstype) in [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
        ("tmpfs", "/run", "tmpfs"),
        ("tmpfs", "/tmp", "tmpfs"),
    ] {
        let _ = std::fs::create_dir_all(target);
        if is_mountpoint(target) {
            continue;
        }
        let c = |s: &str| std::ffi::CString::new(s).unwrap_or_default();
        let (s, t, f) = (c(src), c(target), c(fstype));
        // SAFETY: valid NUL-terminated strings, null data.
        unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), 0, std::ptr::null()) };
    }
    std::env::set_var(
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    );
}

/// Start the commands listed in [`AUTOSTART_PATH`], logging to
/// `/tmp/autostart.log`.
pub fn autostart() {
    let Ok(text) = std::fs::read_to_string(AUTOSTART_PATH) else {
        return;
    };
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let r = exec(
            vec!["/bin/sh".into(), "-c".into(), line.to_string()],
            vec![],
            Some("/".into()),
            true,
            Some("/tmp/autostart.log".into()),
            0,
        );
        if let Err(e) = r {
            eprintln!("cloudlet-agent: autostart {line:?}: {e}");
        }
    }
}

fn set_clock(unix_ns: u64) -> Result<Reply, String> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a pointer to a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut now) };
    let guest_ns = now.tv_sec as i128 * 1_000_000_000 + now.tv_nsec as i128;
    let want = libc::timespec {
        tv_sec: (unix_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (unix_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: as above; the agent runs as root (PID 1).
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &want) } != 0 {
        return Err(format!(
            "clock_settime: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(Reply::ClockSet {
        behind_ms: ((unix_ns as i128 - guest_ns) / 1_000_000) as i64,
    })
}

fn is_mountpoint(path: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| m.lines().any(|l| l.split(' ').nth(1) == Some(path)))
        .unwrap_or(false)
}

/// Carry out one operation.
pub fn handle(op: Op, started: Instant) -> Result<Reply, String> {
    match op {
        Op::Ping {} => Ok(Reply::Pong {
            protocol: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_ms: started.elapsed().as_millis() as u64,
            hostname: hostname(),
            vm_id: std::fs::read_to_string(VM_ID_PATH)
                .ok()
                .map(|s| s.trim().to_string()),
            ops: OPS.iter().map(|s| s.to_string()).collect(),
        }),
        Op::Exec {
            argv,
            env,
            cwd,
            background,
            log,
            timeout_ms,
        } => exec(argv, env, cwd, background, log, timeout_ms),
        Op::PutFile {
            path,
            offset,
            data,
            mode,
        } => put_file(&path, offset, &data, mode),
        Op::WaitPort {
            port,
            http_path,
            timeout_ms,
        } => wait_port(port, http_path.as_deref(), timeout_ms),
        Op::SetIdentity {
            vm_id,
            hostname,
            seed,
        } => set_identity(&vm_id, &hostname, &seed),
        Op::Sync {
            drop_caches,
            fstrim,
        } => {
            // SAFETY: no arguments.
            unsafe { libc::sync() };
            if fstrim {
                let _ = Command::new("fstrim").arg("-a").status();
            }
            if drop_caches {
                let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
            }
            Ok(Reply::Synced {})
        }
        Op::ZeroFreeMemory {
            reserve_bytes,
            chunk_bytes,
            max_bytes,
        } => crate::zero::zero_free_memory(reserve_bytes, chunk_bytes, max_bytes),
        Op::SetClock { unix_ns } => set_clock(unix_ns),
        Op::Poweroff {} => Ok(Reply::PoweringOff {}),
    }
}

/// Work that must happen after the reply has been written.
pub fn after_reply(result: &ResponseResult) -> Option<Box<dyn FnOnce()>> {
    match result {
        ResponseResult::Ok(Reply::PoweringOff {}) => Some(Box::new(|| {
            std::thread::sleep(Duration::from_millis(100));
            // SAFETY: plain syscalls.
            unsafe {
                libc::sync();
                libc::reboot(libc::RB_POWER_OFF);
            }
        })),
        _ => None,
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn exec(
    argv: Vec<String>,
    env: Vec<(String, String)>,
    cwd: Option<String>,
    background: bool,
    log: Option<String>,
    timeout_ms: u64,
) -> Result<Reply, String> {
    let (prog, args) = argv.split_first().ok_or("Empty argv")?;
    let mut cmd = Command::new(prog);
    cmd.args(args).envs(env).stdin(Stdio::null());
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    if background {
        let (out, err) = match log {
            Some(path) => {
                let f = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(|e| format!("Cannot open log {path}: {e}"))?;
                let g = f.try_clone().map_err(|e| e.to_string())?;
                (Stdio::from(f), Stdio::from(g))
            }
            None => (Stdio::null(), Stdio::null()),
        };
        cmd.stdout(out).stderr(err);
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| format!("Cannot run {prog}: {e}"))?;
        let pid = child.id();
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        return Ok(Reply::Started { pid });
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().map_err(|e| format!("Cannot run {prog}: {e}"))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_millis(timeout_ms)) {
        Ok(Ok(out)) => Ok(Reply::Exited {
            code: out.status.code(),
            signal: out.status.signal(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }),
        Ok(Err(e)) => Err(format!("Waiting for {prog}: {e}")),
        Err(_) => {
            // SAFETY: signalling a child we started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            Err(format!(
                "{prog} timed out after {timeout_ms} ms and was killed"
            ))
        }
    }
}

fn put_file(path: &str, offset: u64, data: &str, mode: u32) -> Result<Reply, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|e| format!("Bad base64 for {path}: {e}"))?;
    if let Some(parent) = std::path::Path::new(path).parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("Cannot create {parent:?}: {e}"))?;
    }
    let mut f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(offset == 0)
        .open(path)
        .map_err(|e| format!("Cannot open {path}: {e}"))?;
    f.seek(SeekFrom::Start(offset))
        .and_then(|_| f.write_all(&bytes))
        .map_err(|e| format!("Cannot write {path}: {e}"))?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("Cannot chmod {path}: {e}"))?;
    Ok(Reply::Written {
        bytes: bytes.len() as u64,
    })
}

fn wait_port(port: u16, http_path: Option<&str>, timeout_ms: u64) -> Result<Reply, String> {
    let start = Instant::now();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    loop {
        if probe(addr, http_path) {
            return Ok(Reply::PortReady {
                waited_ms: start.elapsed().as_millis() as u64,
            });
        }
        if start.elapsed() > Duration::from_millis(timeout_ms) {
            return Err(format!(
                "Nothing answered on port {port} within {timeout_ms} ms"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn probe(addr: SocketAddr, http_path: Option<&str>) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let Some(path) = http_path else {
        return true;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    if s.read_exact(&mut head).is_err() {
        return false;
    }
    // "HTTP/1.1 200"
    std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|c| c.parse::<u16>().ok())
        .is_some_and(|c| c < 500)
}

fn set_identity(vm_id: &str, name: &str, seed_hex: &str) -> Result<Reply, String> {
    let seed = decode_hex(seed_hex).ok_or("Seed is not hex")?;
    if seed.len() < 32 {
        return Err("Seed must be at least 32 bytes".into());
    }
    let hw = read_hwrng(64, Duration::from_secs(2));
    let mut pool = OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| format!("Cannot open /dev/urandom: {e}"))?;
    pool.write_all(&seed)
        .and_then(|_| pool.write_all(&hw))
        .map_err(|e| format!("Cannot mix into the entropy pool: {e}"))?;
    // SAFETY: ioctl without argument on an open random device.
    let reseeded = unsafe { libc::ioctl(pool.as_raw_fd(), RNDRESEEDCRNG as _) } == 0;

    let c = std::ffi::CString::new(name).map_err(|_| "Hostname contains NUL")?;
    // SAFETY: valid pointer and length.
    if unsafe { libc::sethostname(c.as_ptr(), name.len()) } != 0 {
        return Err(format!(
            "Cannot set hostname: {}",
            std::io::Error::last_os_error()
        ));
    }
    let _ = std::fs::write("/etc/hostname", format!("{name}\n"));
    std::fs::create_dir_all("/run/cloudlet")
        .and_then(|_| std::fs::write(VM_ID_PATH, format!("{vm_id}\n")))
        .map_err(|e| format!("Cannot write {VM_ID_PATH}: {e}"))?;
    Ok(Reply::IdentitySet {
        hwrng_bytes: hw.len(),
        reseeded,
    })
}

/// Up to `n` bytes from virtio-rng; empty if there is none or it is slow.
fn read_hwrng(n: usize, timeout: Duration) -> Vec<u8> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; n];
        let got = std::fs::File::open("/dev/hwrng")
            .and_then(|mut f| f.read(&mut buf))
            .unwrap_or(0);
        buf.truncate(got);
        let _ = tx.send(buf);
    });
    rx.recv_timeout(timeout).unwrap_or_default()
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_decoding_rejects_garbage() {
        assert_eq!(decode_hex("00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(decode_hex("0"), None);
        assert_eq!(decode_hex("zz"), None);
    }

    #[test]
    fn exec_captures_output_and_status() {
        let r = exec(
            vec!["sh".into(), "-c".into(), "echo hi; exit 3".into()],
            vec![],
            None,
            false,
            None,
            5000,
        )
        .unwrap();
        assert_eq!(
            r,
            Reply::Exited {
                code: Some(3),
                signal: None,
                stdout: "hi\n".into(),
                stderr: String::new()
            }
        );
    }

    #[test]
    fn exec_times_out() {
        let e = exec(
            vec!["sleep".into(), "5".into()],
            vec![],
            None,
            false,
            None,
            100,
        )
        .unwrap_err();
        assert!(e.contains("timed out"), "{e}");
    }

    #[test]
    fn put_file_writes_chunks_at_offsets() {
        let dir = std::env::temp_dir().join(format!("agent-test-{}", std::process::id()));
        let path = dir.join("sub/f");
        let p = path.to_str().unwrap();
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        put_file(p, 0, &b64(b"hello "), 0o755).unwrap();
        put_file(p, 6, &b64(b"world"), 0o755).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"hello world");
        assert!(put_file(p, 0, "!!", 0o644).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn wait_port_sees_a_listener_and_times_out_without_one() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(matches!(
            wait_port(port, None, 1000),
            Ok(Reply::PortReady { .. })
        ));
        drop(l);
        assert!(wait_port(port, None, 100).is_err());
    }
}
