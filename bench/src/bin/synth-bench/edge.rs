//! One mode's services on the run's link: the registry in A and cloudletd
//! in B, both plain HTTP or both HTTPS under the run's fleet CA.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use cloudlet_api::CreateVmRequest;
use cloudlet_bench::tls::{Fleet, ServiceTls, TlsMode};
use cloudlet_client::Client;
use cloudlet_wan::{Side, Wan};

use crate::http::{download, first_ok, http_client};
use crate::measure::Ours;
use crate::Dirs;

/// The ports of a mode's registry (in A) and cloudletd (in B), and the
/// range of its VMs' host ports: the modes' services run side by side
/// (nothing else listens in the namespaces; kept clear of the demo's).
fn ports(mode: TlsMode) -> (u16, u16, [u16; 2]) {
    match mode {
        TlsMode::Off => (17461, 17451, [21100, 21199]),
        TlsMode::On => (17463, 17453, [21200, 21299]),
    }
}

/// One mode's registry in A and cloudletd in B on the run's link. Dropping
/// it deletes the VMs left and kills the daemons and any QEMU of theirs.
pub struct Edge<'w> {
    wan: &'w Wan,
    pub mode: TlsMode,
    registry: Option<ChildGuard>,
    daemon: Option<ChildGuard>,
    api: String,
    token: String,
    pub registry_url: String,
    registry_tls: ServiceTls,
    push_token: String,
    /// Directories whose QEMU processes belong to this edge.
    owned_dirs: Vec<PathBuf>,
}

impl<'w> Edge<'w> {
    pub fn start(
        wan: &'w Wan,
        mode: TlsMode,
        fleet: Option<&Fleet>,
        dirs: &Dirs,
        home: &Path,
    ) -> anyhow::Result<Edge<'w>> {
        let (registry_port, daemon_port, host_ports) = ports(mode);
        let (work, shm) = (dirs.work.join(mode.word()), dirs.shm.join(mode.word()));
        std::fs::create_dir_all(&work)?;
        std::fs::create_dir_all(&shm)?;
        let registry_addr = SocketAddr::from((wan.a_addr(), registry_port));
        let api_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, daemon_port));
        let registry_tls = mode.service(fleet, "registry", registry_addr.ip())?;
        let daemon_tls = mode.service(fleet, "cloudletd", api_addr.ip())?;
        let token = format!("synth-bench-{}-{}", std::process::id(), mode.word());
        let mut edge = Edge {
            wan,
            mode,
            registry_url: registry_tls.url(registry_addr),
            api: daemon_tls.url(api_addr),
            registry_tls,
            registry: None,
            daemon: None,
            push_token: format!("{token}-push"),
            token,
            owned_dirs: vec![work.clone(), shm.clone()],
        };
        let log_of = |what: &str| {
            std::fs::File::create(dirs.logs.join(format!("{what}-tls-{}.log", mode.word())))
        };

        // The cloud: the registry in A.
        let storage = work.join("registry");
        std::fs::create_dir_all(&storage)?;
        let log = log_of("registry")?;
        let mut cmd = Command::new(dirs.bin.join("cloudlet"));
        cmd.args(["registry", "serve"])
            .arg(&storage)
            .arg("--listen")
            .arg(registry_addr.to_string())
            .args(edge.registry_tls.serve_args())
            .env("CLOUDLET_REGISTRY_TOKEN", &edge.push_token)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        edge.registry = Some(ChildGuard::spawn(wan, Side::A, cmd, "registry")?);

        // The edge: cloudletd in B, with its own state and the shared base store.
        let state = work.join("home");
        std::fs::create_dir_all(&state)?;
        std::os::unix::fs::symlink(
            std::fs::canonicalize(home.join("bases"))?,
            state.join("bases"),
        )?;
        let _ = std::fs::copy(home.join("accel-probe"), state.join("accel-probe"));
        let config = work.join("cloudletd.toml");
        cloudlet_testkit::write_private(
            &config,
            format!(
                "host_ports = [{}, {}]
{}",
                host_ports[0],
                host_ports[1],
                daemon_tls.daemon_toml(api_addr)
            ),
        )?;
        let log = log_of("cloudletd")?;
        let mut cmd = Command::new(dirs.bin.join("cloudletd"));
        cmd.arg("--config")
            .arg(&config)
            .arg("--listen")
            .arg(api_addr.to_string())
            .arg("--home")
            .arg(&state)
            .arg("--vm-dir")
            .arg(shm.join("vms"))
            .arg("--name")
            .arg(format!("synth-bench-{}", mode.word()))
            .env("CLOUDLET_TOKEN", &edge.token)
            .env_remove("CLOUDLETD_CONFIG")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        edge.daemon = Some(ChildGuard::spawn(wan, Side::B, cmd, "cloudletd")?);
        edge.wait_up()
            .with_context(|| format!("see the logs in {}", dirs.logs.display()))?;
        Ok(edge)
    }

    /// Wait for both daemons to answer, from B.
    fn wait_up(&self) -> anyhow::Result<()> {
        let (c, reg) = (self.client(), self.registry_url.clone());
        self.wan
            .run_in(Side::B, async move {
                let deadline = Instant::now() + Duration::from_secs(60);
                let http = http_client()?;
                loop {
                    let d = c.info().await;
                    let r = http.get(format!("{reg}/v1/overlays")).send().await;
                    if d.is_ok() && r.is_ok() {
                        return Ok(());
                    }
                    if Instant::now() > deadline {
                        bail!("daemons not up after 60 s: cloudletd {d:?}, registry {r:?}");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })?
            .join()?
    }

    fn client(&self) -> Client {
        Client::new(&self.api, Some(self.token.clone()))
    }

    /// Push an overlay to the registry from inside A (does not cross the link).
    pub fn push(&self, bin_dir: &Path, home: &Path, file: &Path, name: &str) -> anyhow::Result<()> {
        let mut cmd = Command::new(bin_dir.join("cloudlet"));
        cmd.args(self.registry_tls.client_args())
            .args(["registry", "push"])
            .arg(file)
            .arg("--registry")
            .arg(&self.registry_url)
            .arg("--name")
            .arg(name)
            .env("CLOUDLET_REGISTRY_TOKEN", &self.push_token)
            .arg("--home")
            .arg(home)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let out = self.wan.spawn_in(Side::A, cmd)?.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "pushing {name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// A plain GET of `url` from B: (bytes, time).
    pub fn bulk_get(&self, url: &str) -> anyhow::Result<(u64, Duration)> {
        let url = url.to_string();
        self.wan
            .run_in(Side::B, async move { download(&url, None).await })?
            .join()?
    }

    /// Ours: synthesize from `url` through the API, from B, to the first answer.
    pub fn synthesize(&self, url: &str, name: &str, health: &str) -> anyhow::Result<Ours> {
        let c = self.client();
        let req = CreateVmRequest {
            overlay: url.to_string(),
            name: Some(format!("sb-{name}")),
            flavor: None,
        };
        let health = health.to_string();
        self.wan
            .run_in(Side::B, async move {
                let start = Instant::now();
                let vm = c.create_vm(&req).await?;
                let api = start.elapsed();
                let r = async {
                    let ep = vm
                        .ports
                        .first()
                        .ok_or_else(|| anyhow!("the VM has no port"))?
                        .endpoint
                        .parse::<SocketAddr>()?;
                    let total = first_ok(ep, &health, start, Duration::from_secs(120)).await?;
                    anyhow::Ok(Ours {
                        total,
                        api,
                        timings: vm.timings.clone(),
                    })
                }
                .await;
                c.delete_vm(&vm.id)
                    .await
                    .with_context(|| format!("deleting VM {}", vm.id))?;
                r
            })?
            .join()?
    }
}

impl Drop for Edge<'_> {
    fn drop(&mut self) {
        if self.daemon.is_some() {
            let c = self.client();
            if let Ok(h) = self.wan.run_in(Side::B, async move {
                let _ = tokio::time::timeout(Duration::from_secs(60), async {
                    if let Ok(vms) = c.list_vms().await {
                        for vm in vms {
                            if let Err(e) = c.delete_vm(&vm.id).await {
                                eprintln!("cleanup: deleting VM {}: {e}", vm.id);
                            }
                        }
                    }
                })
                .await;
            }) {
                let _ = h.join();
            }
        }
        self.daemon.take();
        self.registry.take();
        kill_qemu_under(&self.owned_dirs);
    }
}

/// A process this run started; killed and reaped on drop.
struct ChildGuard {
    child: Child,
    what: &'static str,
}

impl ChildGuard {
    fn spawn(wan: &Wan, side: Side, cmd: Command, what: &'static str) -> anyhow::Result<Self> {
        let child = wan
            .spawn_in(side, cmd)
            .with_context(|| format!("starting {what}"))?;
        Ok(ChildGuard { child, what })
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Err(e) = self.child.kill() {
            eprintln!("cleanup: killing {}: {e}", self.what);
        }
        let _ = self.child.wait();
    }
}

/// Kill QEMU processes whose command line names a file under one of `dirs`
/// (VMs of this run that outlived their daemon: QEMU runs in its own process group).
pub fn kill_qemu_under(dirs: &[PathBuf]) {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains("qemu-system")
            && dirs
                .iter()
                .any(|d| cmdline.contains(d.to_string_lossy().as_ref()))
        {
            eprintln!("cleanup: killing leftover QEMU {pid}");
            // SAFETY: signalling a QEMU of this run (its files are in our directories).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}
