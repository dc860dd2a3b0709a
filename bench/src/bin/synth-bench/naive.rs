//! Reference (b), the naive way: the launch VM's whole disk, compressed
//! with `zstd -3`, fetched over the same link from a plain HTTP file server
//! in A (in every TLS mode: another way of provisioning, not the product's
//! path), decompressed in B and cold-booted.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use cloudlet_base::BaseStore;
use cloudlet_qemu::spec::DiskFormat;
use cloudlet_qemu::{PortForward, Vm};
use cloudlet_wan::{Side, Wan};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::http::{download, first_ok};
use crate::measure::{Naive, Prepared};
use crate::Dirs;

/// Ports inside the namespaces (nothing else listens there; kept clear of the demo's).
const FILES_PORT: u16 = 17462;
const COLD_BOOT_PORT: u16 = 17480;

/// Reference (b): fetch the compressed disk over the link, decompress, cold boot.
pub fn naive(
    wan: &Wan,
    home: &Path,
    base: &str,
    p: &Prepared,
    zst: &Path,
    dirs: &Dirs,
) -> anyhow::Result<Naive> {
    let (work, shm) = (&dirs.work, &dirs.shm);
    let dir = work.join(format!("naive-{}", p.name));
    std::fs::create_dir_all(&dir)?;
    let _cleanup = RemoveDir(dir.clone());
    let ram_dir = shm.join(format!("naive-{}", p.name));
    std::fs::create_dir_all(&ram_dir)?;
    let _cleanup_ram = RemoveDir(ram_dir.clone());

    // Transfer: a file server in A, a download in B (to a file on disk).
    let got = dir.join("disk.zst");
    let server = FileServer::start(wan, zst.to_path_buf())?;
    let url = format!("http://{}:{}/disk.zst", wan.a_addr(), FILES_PORT);
    let out = got.clone();
    let transfer = wan
        .run_in(Side::B, async move { download(&url, Some(&out)).await })?
        .join()??
        .1;
    drop(server);
    let zst_bytes = std::fs::metadata(&got)?.len();

    // Decompress.
    let disk = dir.join("disk.raw");
    let t = Instant::now();
    run(Command::new("zstd")
        .args(["-d", "-q", "-f", "--sparse"])
        .arg(&got)
        .arg("-o")
        .arg(&disk))?;
    let decompress = t.elapsed();
    let _ = std::fs::remove_file(&got);

    // Cold boot in B, polled from B.
    let base = BaseStore::new(home).get(base)?;
    let mut spec = base.spec(
        &format!("sb-cold-{}", p.name),
        &ram_dir.join("ram"),
        &disk,
        &dir.join("run"),
        vec![PortForward {
            guest: 8080,
            host: COLD_BOOT_PORT,
            bind: None,
        }],
    );
    spec.disk_format = DiskFormat::Raw;
    let health = p.health.clone();
    let boot = wan
        .run_in(Side::B, async move {
            let start = Instant::now();
            let vm = Vm::boot(spec).await?;
            let _guard = PidGuard(vm.pid());
            let r = first_ok(
                SocketAddr::from((Ipv4Addr::LOCALHOST, COLD_BOOT_PORT)),
                &health,
                start,
                Duration::from_secs(300),
            )
            .await;
            vm.kill().await;
            r
        })?
        .join()??;
    Ok(Naive {
        zst_bytes,
        transfer,
        decompress,
        boot,
    })
}

/// A QEMU this run booted; SIGKILLed on drop if still there (also on panic).
struct PidGuard(u32);

impl Drop for PidGuard {
    fn drop(&mut self) {
        if self.0 != 0 && Path::new(&format!("/proc/{}", self.0)).exists() {
            // SAFETY: signalling a QEMU this run started.
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        }
    }
}

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A one-file HTTP server in A, for the naive way; stops on drop.
struct FileServer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<cloudlet_wan::NsJoinHandle<anyhow::Result<()>>>,
}

impl FileServer {
    fn start(wan: &Wan, file: PathBuf) -> anyhow::Result<FileServer> {
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let addr = SocketAddr::from((wan.a_addr(), FILES_PORT));
        let handle = wan.run_in(Side::A, async move {
            let listener = tokio::net::TcpListener::bind(addr).await;
            let listener = match listener {
                Ok(l) => {
                    let _ = ready_tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return Ok(());
                }
            };
            loop {
                tokio::select! {
                    _ = &mut stopped => return Ok(()),
                    acc = listener.accept() => {
                        let (sock, _) = acc?;
                        let file = file.clone();
                        tokio::spawn(async move {
                            if let Err(e) = serve_file(sock, &file).await {
                                eprintln!("file server: {e}");
                            }
                        });
                    }
                }
            }
        })?;
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|e| anyhow!("file server did not start: {e}"))?
            .map_err(|e| anyhow!("file server: {e}"))?;
        Ok(FileServer {
            stop: Some(stop),
            handle: Some(handle),
        })
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

async fn serve_file(mut sock: tokio::net::TcpStream, file: &Path) -> anyhow::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = sock.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > 16 * 1024 {
            bail!("request head too long");
        }
    }
    let mut f = tokio::fs::File::open(file).await?;
    let len = f.metadata().await?.len();
    sock.write_all(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/zstd\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    tokio::io::copy(&mut f, &mut sock).await?;
    sock.shutdown().await?;
    Ok(())
}

pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
