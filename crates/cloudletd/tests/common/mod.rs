//! A real `cloudletd` process, a real registry, a real kvstore overlay.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cloudlet_client::Client;
use cloudlet_testkit::{free_port, tiny_base};

pub const TOKEN: &str = "test-token-0123456789";

/// The kvstore app packaged on the tiny base, built once and cached.
pub async fn kvstore_overlay() -> PathBuf {
    kvstore_overlay_with(None).await
}

/// kvstore packaged with payload segments of `segment_size` raw bytes
/// (`None`: the default), built once per size and cached.
pub async fn kvstore_overlay_with(segment_size: Option<u32>) -> PathBuf {
    cloudlet_testkit::packaged_kvstore(segment_size).await
}

/// A registry on a free port serving `dir`.
pub async fn start_registry(dir: &Path) -> String {
    cloudlet_testkit::local_registry(dir, TOKEN).await
}

/// A registry over `dir` with the kvstore overlay pushed as `kvstore`:
/// the registry's URL and the overlay's.
pub async fn registry_with_kvstore(dir: &Path) -> (String, String) {
    let overlay = kvstore_overlay().await;
    let registry = start_registry(dir).await;
    cloudlet_registry::push_overlay(&registry, TOKEN, "kvstore", &overlay)
        .await
        .unwrap();
    let url = format!("{registry}/v1/overlays/kvstore");
    (registry, url)
}

/// A `cloudletd` process with its own home (sharing the test bases).
pub struct Daemon {
    pub home: PathBuf,
    pub vm_dir: PathBuf,
    pub addr: SocketAddr,
    pub config: PathBuf,
    /// The fleet CA, when the daemon serves TLS (its config's `[tls]`).
    pub ca: Option<PathBuf>,
    child: Option<Child>,
    _dir: tempfile::TempDir,
    _run: tempfile::TempDir,
}

impl Daemon {
    pub async fn start(extra_config: &str) -> Daemon {
        Daemon::start_named("test-cloudlet", extra_config).await
    }

    /// A daemon named `name` (a directory tells cloudlets apart by name).
    pub async fn start_named(name: &str, extra_config: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        // RAM files on a tmpfs, as the daemon's default: synthesis then
        // takes the early start path (postcopy needs shared memory).
        let run = tempfile::tempdir_in("/dev/shm").unwrap();
        let vm_dir = run.path().join("run");
        std::fs::create_dir_all(&home).unwrap();
        let (store, _) = tiny_base().await;
        std::os::unix::fs::symlink(store.bases_dir(), home.join("bases")).unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        // Each test daemon hands out its own range of host ports.
        let (first, last) = cloudlet_testkit::port_block();
        let config = dir.path().join("cloudletd.toml");
        // On unless the test sets it (in `extra_config`).
        let verify = if extra_config.contains("verify_memory") {
            ""
        } else {
            "verify_memory = true\n"
        };
        cloudlet_testkit::write_private(
            &config,
            format!(
                "name = \"{name}\"\nlisten = \"{addr}\"\nhome = \"{}\"\nvm_dir = \"{}\"\ntokens = [\"{TOKEN}\"]\n{verify}host_ports = [{first}, {}]\n{extra_config}",
                home.display(),
                vm_dir.display(),
                last
            ),
        )
        .unwrap();
        let ca = extra_config
            .lines()
            .find_map(|l| l.trim().strip_prefix("ca = \""))
            .map(|v| PathBuf::from(v.trim_end_matches('"')));
        let mut d = Daemon {
            home,
            vm_dir,
            addr,
            config,
            ca,
            child: None,
            _dir: dir,
            _run: run,
        };
        d.spawn().await;
        d
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.home.join("daemon.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_cloudletd"))
            .arg("--config")
            .arg(&self.config)
            .env("CLOUDLET_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start cloudletd");
        self.child = Some(child);
        let start = Instant::now();
        while self.client().info().await.is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "cloudletd did not come up: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL the daemon (its VMs keep running), then start it again.
    pub async fn crash_and_restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            // It may have exited by itself (a test hook).
            let _ = c.kill();
            c.wait().unwrap();
        }
        self.spawn().await;
    }

    /// SIGKILL the daemon (its VMs keep running); [`Daemon::restart`]
    /// starts it again.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            c.wait().unwrap();
        }
    }

    /// SIGTERM the daemon (an orderly shutdown) and wait for it to exit;
    /// its exit code.
    pub async fn terminate(&mut self) -> Option<i32> {
        let pid = self.child.as_ref()?.id() as i32;
        // SAFETY: a signal to our own child, still running (not reaped).
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let code = self.wait_exit(Duration::from_secs(10)).await;
        self.child = None;
        code
    }

    /// Start the daemon again after [`Daemon::kill`] or [`Daemon::terminate`].
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "the daemon still runs");
        self.spawn().await;
    }

    /// Wait until the daemon exits by itself; its exit code.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(status) = self.child.as_mut()?.try_wait().unwrap() {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Remove a line from the daemon's config (used at its next start).
    pub fn drop_config_line(&self, line: &str) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        std::fs::write(&self.config, text.replace(&format!("{line}\n"), "")).unwrap();
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    pub fn client(&self) -> Client {
        match &self.ca {
            None => Client::new(&self.url(), Some(TOKEN.into())),
            Some(ca) => Client::with_http(&self.url(), Some(TOKEN.into()), trusting(ca)),
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.ca.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.home.join("daemon.log")).unwrap_or_default()
    }

    /// Files left in the VM directories.
    pub fn vm_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for d in [self.home.join("vms"), self.vm_dir.clone()] {
            if let Ok(rd) = std::fs::read_dir(&d) {
                out.extend(rd.flatten().map(|e| e.path()));
            }
        }
        out
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Kill the daemon and every QEMU it started (they outlive it by design).
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        cloudlet_testkit::kill_processes_with(&self.vm_dir.display().to_string());
    }
}

/// Whether a QEMU process of the VM with `id` runs.
pub fn qemu_running(d: &Daemon, id: &str) -> bool {
    cloudlet_testkit::process_running_with(&d.vm_dir.join(id).display().to_string())
}

/// A request head read by the small HTTP servers of the tests.
pub struct RangeRequest {
    /// The request line and headers, lowercased.
    pub text: String,
    /// The byte range asked for, `[start, end)`, clamped to the file (the
    /// whole file without a Range header).
    pub start: u64,
    pub end: u64,
}

/// Reads one request head from `sock` for a file of `len` bytes; `None` if
/// the peer closed first.
pub async fn read_range_request(
    sock: &mut tokio::net::TcpStream,
    len: u64,
) -> Option<RangeRequest> {
    use tokio::io::AsyncReadExt;
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match sock.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&req).to_lowercase();
    let (start, end) = text
        .lines()
        .find_map(|l| l.strip_prefix("range: bytes="))
        .and_then(|r| {
            let (a, b) = r.trim().split_once('-')?;
            let a: u64 = a.parse().ok()?;
            let b: u64 = if b.is_empty() {
                len.saturating_sub(1)
            } else {
                b.parse().ok()?
            };
            Some((a, b.min(len.saturating_sub(1)) + 1))
        })
        .unwrap_or((0, len));
    Some(RangeRequest { text, start, end })
}

/// The head of a 206 answer for `[start, end)` of `len` bytes.
pub fn partial_content_head(start: u64, end: u64, len: u64) -> String {
    format!(
        "HTTP/1.1 206 Partial Content\r\ncontent-range: bytes {start}-{}/{len}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        end - 1,
        end - start
    )
}

/// A small HTTP server with range support for `data`, on a free port: each
/// request gets a 206 head, then `body(socket, data, start, end)` sends the
/// range its own way (whole, throttled, cut short). Returns its URL.
pub async fn range_server<F, Fut>(data: Vec<u8>, body: F) -> String
where
    F: Fn(tokio::net::TcpStream, std::sync::Arc<Vec<u8>>, u64, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let data = std::sync::Arc::new(data);
    let body = std::sync::Arc::new(body);
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let (data, body) = (data.clone(), body.clone());
            tokio::spawn(async move {
                let len = data.len() as u64;
                let Some(RangeRequest { start, end, .. }) =
                    read_range_request(&mut sock, len).await
                else {
                    return;
                };
                let head = partial_content_head(start, end, len);
                if sock.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                body(sock, data, start, end).await;
            });
        }
    });
    format!("http://{addr}")
}

/// Run `fut` inside the namespace of `side` of an emulated WAN and wait
/// for it.
pub async fn in_ns<T, F>(wan: &cloudlet_wan::Wan, side: cloudlet_wan::Side, fut: F) -> T
where
    T: Send + 'static,
    F: std::future::Future<Output = T> + Send + 'static,
{
    wan.run_in(side, fut)
        .expect("enter the namespace")
        .await
        .expect("task in the namespace")
}

/// The `cloudlet` binary of this build (built with the workspace).
pub fn cloudlet_bin() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_cloudletd")).with_file_name("cloudlet");
    assert!(
        p.is_file(),
        "{} is missing: build it first (cargo build -p cloudlet-cli; `make test` does)",
        p.display()
    );
    p
}

/// A client that trusts only the CA in PEM file `ca`.
pub fn trusting(ca: &Path) -> reqwest::Client {
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap())
        .build()
        .unwrap()
}
