//! Helpers for integration tests that boot real QEMU guests.
//!
//! The `tiny` base is built once per checkout into `target/test-home` (or
//! `$CLOUDLET_TEST_HOME`) and shared by every test binary; a file lock keeps
//! parallel test binaries from building it twice.
//!
//! [`request`] and [`http`] talk HTTP/1.1 to guest apps (and anything else) with a
//! small blocking client of this crate's own ([`client`]). [`damage`] makes
//! the corruption matrix of damaged overlays.

pub mod browser;
pub mod client;
pub mod damage;
pub mod etcd;

use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cloudlet_base::{build_base, BaseStore, BaseVm, BuildOptions, Recipe};

pub use client::{read_response, request, ClientResponse};

/// The workspace's `target` directory.
pub fn target_dir() -> PathBuf {
    let t = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target");
    std::fs::canonicalize(&t).unwrap_or(t)
}

/// Home of the shared test store.
pub fn test_home() -> PathBuf {
    std::env::var_os("CLOUDLET_TEST_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("test-home"))
}

/// A static binary built for the guest by `make guest` (in
/// `$CLOUDLET_GUEST_DIR` when set, e.g. a private target dir's).
pub fn guest_bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("CLOUDLET_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("guest/x86_64-unknown-linux-gnu/release"));
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{} is missing: run `make guest` first",
        p.display()
    );
    p
}

/// The `tiny` base in the shared test store, built on first use.
pub async fn tiny_base() -> (BaseStore, BaseVm) {
    let home = test_home();
    std::fs::create_dir_all(&home).expect("create test home");
    let store = BaseStore::new(&home);
    let lock = lock_exclusive(&home.join(".build.lock"))
        .await
        .expect("lock file");
    let opts = BuildOptions {
        name: None,
        memory_mib: None,
        force: false,
        cache_dir: home.join("cache"),
        agent: Some(guest_bin("cloudlet-agent")),
    };
    build_base(&store, Recipe::Tiny, &opts)
        .await
        .expect("build the tiny base");
    drop(lock);
    let base = store.get("tiny").expect("tiny base");
    (store, base)
}

/// A real overlay registry over the directory `dir`, on a free loopback
/// port, taking pushes with `token`: its URL.
pub async fn local_registry(dir: &Path, token: &str) -> String {
    use cloudlet_registry::{RegistryConfig, RegistryState, StorageLocation};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the registry");
    let addr = listener.local_addr().expect("registry address");
    let mut cfg = RegistryConfig::new(addr, StorageLocation::Dir(dir.to_path_buf()));
    cfg.push_tokens = vec![token.into()];
    let state = RegistryState::open(&cfg).expect("open the registry's storage");
    tokio::spawn(cloudlet_registry::serve_listener(listener, state));
    format!("http://{addr}")
}

/// The kvstore guest app packaged on the tiny base as an overlay with
/// payload segments of `segment_size` raw bytes (`None`: the default),
/// built once per size into the shared test home and cached.
pub async fn packaged_kvstore(segment_size: Option<u32>) -> PathBuf {
    use cloudlet_package::{package_app, PackageConfig};
    let (store, base) = tiny_base().await;
    let dir = test_home().join("overlays");
    std::fs::create_dir_all(&dir).expect("create the overlay cache");
    let suffix = segment_size.map(|s| format!("-seg{s}")).unwrap_or_default();
    let out = dir.join(format!(
        "kvstore-{}{suffix}.overlay",
        &base.manifest.id[..12]
    ));
    let lock = lock_exclusive(&dir.join(".lock")).await.expect("lock file");
    if !out.exists() {
        let app = tempfile::tempdir().expect("temp dir");
        std::fs::copy(guest_bin("kvstore"), app.path().join("kvstore")).expect("copy kvstore");
        let mut cfg = PackageConfig::new("tiny", "kvstore", "./kvstore --port 8080", 8080, &out);
        cfg.install_dir = Some(app.path().to_path_buf());
        cfg.health_path = Some("/health".into());
        cfg.work_dir = test_home().join("work");
        cfg.segment_size = segment_size;
        package_app(&store, &cfg, |_| {})
            .await
            .expect("package kvstore");
    }
    drop(lock);
    out
}

/// An exclusive lock on `path` (created if missing), held until the file
/// drops: what builds a shared cached artifact once across the test
/// processes (and benchmarks) that want it at the same time.
pub async fn lock_exclusive(path: &Path) -> std::io::Result<std::fs::File> {
    let lock = std::fs::File::create(path)?;
    let fd = lock.as_raw_fd();
    tokio::task::spawn_blocking(move || {
        // SAFETY: flock on an open fd; released when the file is closed.
        unsafe { libc::flock(fd, libc::LOCK_EX) };
    })
    .await
    .map_err(std::io::Error::other)?;
    Ok(lock)
}

/// A TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The first and last port of a block of [`PORT_BLOCK`] host ports for a
/// test daemon's VMs (`host_ports`), this process's own until it exits.
///
/// Blocks lie below the kernel's ephemeral range (32768 and up, where
/// [`free_port`] and every outgoing connection take theirs), and each is
/// held by a file lock under the test home, so no two test processes (nor
/// two daemons of one) hand the same ports to their QEMUs: a port that the
/// daemon's bind check found free and another test's QEMU took a moment
/// later failed a synthesis ("Could not set up host forwarding rule").
pub fn port_block() -> (u16, u16) {
    static HELD: std::sync::Mutex<Vec<std::fs::File>> = std::sync::Mutex::new(Vec::new());
    const FIRST: u16 = 20000;
    const BLOCKS: u16 = (32700 - FIRST) / PORT_BLOCK;
    let dir = test_home().join("port-blocks");
    std::fs::create_dir_all(&dir).expect("create the port-block dir");
    let start = rand::random::<u16>() % BLOCKS;
    for k in 0..BLOCKS {
        let block = (start + k) % BLOCKS;
        let file = std::fs::File::create(dir.join(format!("{block}.lock"))).expect("lock file");
        // SAFETY: flock on an open fd; released when the file is closed,
        // i.e. when this process exits.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            HELD.lock().unwrap_or_else(|e| e.into_inner()).push(file);
            let first = FIRST + block * PORT_BLOCK;
            return (first, first + PORT_BLOCK - 1);
        }
    }
    panic!("every test port block is taken");
}

/// Ports in a [`port_block`].
pub const PORT_BLOCK: u16 = 100;

pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// One HTTP request to `127.0.0.1:port`, off the async runtime.
pub async fn http(
    port: u16,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> std::io::Result<ClientResponse> {
    let (method, path) = (method.to_string(), path.to_string());
    tokio::task::spawn_blocking(move || {
        request(
            local(port),
            &method,
            &path,
            body.as_deref(),
            Duration::from_secs(10),
        )
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Poll every URL until each answers a 2xx, for at most `within`; whether
/// they all did. Async on the caller's runtime, so that it runs in the
/// network namespace of the caller's thread (e.g. inside
/// `cloudlet_wan::Wan::run_in`).
pub async fn until_healthy(urls: &[String], within: Duration) -> bool {
    let start = std::time::Instant::now();
    let client = reqwest::Client::new();
    while start.elapsed() < within {
        let mut all = true;
        for u in urls {
            let ok = client
                .get(u)
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if !ok {
                all = false;
                break;
            }
        }
        if all {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Child processes killed when this drops (or at [`Reaper::reap`]), and
/// then every process still running under one of `vm_dirs` (a daemon's
/// QEMUs outlive it by design).
#[derive(Default)]
pub struct Reaper {
    pub children: Vec<std::process::Child>,
    pub vm_dirs: Vec<PathBuf>,
}

impl Reaper {
    pub fn reap(&mut self) {
        for mut c in self.children.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        for d in self.vm_dirs.drain(..) {
            kill_processes_with(&d.display().to_string());
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.reap();
    }
}

/// Processes (other than this one) with `needle` on their command line.
pub fn pids_with(needle: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    rd.flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().parse::<i32>().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            (pid != me
                && String::from_utf8_lossy(&cmd)
                    .replace('\0', " ")
                    .contains(needle))
            .then_some(pid)
        })
        .collect()
}

/// Whether any process has `needle` on its command line.
pub fn process_running_with(needle: &str) -> bool {
    !pids_with(needle).is_empty()
}

/// SIGKILL every process with `needle` on its command line (QEMUs a test
/// started under its own directory: they outlive their daemon by design).
pub fn kill_processes_with(needle: &str) {
    for pid in pids_with(needle) {
        // SAFETY: signalling processes that name this test's own directory.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Write a file that holds credentials (a daemon's config with tokens):
/// mode 0600, as `cloudletd` requires of such a file.
pub fn write_private(path: impl AsRef<Path>, contents: impl AsRef<[u8]>) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let path = path.as_ref();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(contents.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[tokio::test]
    async fn http_talks_to_a_local_port() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.ends_with(b"\r\n\r\nbody") {
                let n = stream.read(&mut buf).unwrap();
                assert!(n > 0, "{}", String::from_utf8_lossy(&request));
                request.extend_from_slice(&buf[..n]);
            }
            stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .unwrap();
            String::from_utf8(request).unwrap()
        });
        let resp = http(port, "POST", "/x", Some(b"body".to_vec()))
            .await
            .unwrap();
        assert_eq!((resp.status, resp.text().as_str()), (200, "ok"));
        assert!(server.join().unwrap().starts_with("POST /x HTTP/1.1\r\n"));
    }
}
