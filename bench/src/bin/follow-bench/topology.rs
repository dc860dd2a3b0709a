//! The emulated world: a hub namespace (the device and the cloud tier:
//! directory and registry), three cloudlets `c1`..`c3` that join the
//! directory, and a `cloud` site that does not (so no session picks it),
//! each behind its own link from the hub. Everything started here is
//! stopped when [`World`] drops: daemons killed, QEMUs under the run's
//! directories killed, namespaces removed, work directories deleted.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cloudlet_client::DirectoryClient;
use cloudlet_package::{package_app, PackageConfig};
use cloudlet_testkit::{guest_bin, test_home, tiny_base};
use cloudlet_wan::{Side, Wan, WanConfig};

pub const TOKEN: &str = "follow-bench-token-0123456789";
pub const API_PORT: u16 = 7550;
pub const REG_PORT: u16 = 7560;
pub const DIR_PORT: u16 = 7570;
/// The kvstore app's port in the guest.
pub const APP_PORT: u16 = 8080;
/// Rate of every link, Mbit/s.
const RATE_MBIT: f64 = 200.0;

/// One site behind a link from the hub.
pub struct Site {
    pub name: String,
    pub link: Wan,
    /// Its API, as the hub reaches it.
    pub url: String,
    pub api: SocketAddr,
    pub log: PathBuf,
}

pub struct World {
    /// `c1`, `c2`, `c3`, then `cloud`; `sites[0].link` made the hub.
    pub sites: Vec<Site>,
    pub dir_url: String,
    pub overlay_url: String,
    pub base_id: String,
    procs: cloudlet_testkit::Reaper,
    pub work: tempfile::TempDir,
    _shm: tempfile::TempDir,
}

/// The binaries the world runs.
pub struct Bins {
    pub cloudletd: PathBuf,
    pub cloudlet: PathBuf,
}

impl World {
    /// The hub's side of the first link (any link's A is the hub).
    pub fn hub(&self) -> &Wan {
        &self.sites[0].link
    }

    pub fn cloud(&self) -> &Site {
        &self.sites[3]
    }

    /// Run `fut` in the hub (the device's namespace) and wait for it.
    pub async fn in_hub<T, F>(&self, fut: F) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: Future<Output = T> + Send + 'static,
    {
        in_ns(self.hub(), fut).await
    }

    /// Build it: links at the first segment's delays, the cloud tier in
    /// the hub with the kvstore overlay pushed, the four daemons up and
    /// the three cloudlets registered.
    pub async fn build(bins: &Bins, delays_ms: [f64; 4]) -> anyhow::Result<World> {
        let overlay = kvstore_overlay().await?;
        let (store, base) = tiny_base().await;
        let work = tempfile::Builder::new().prefix("follow-bench-").tempdir()?;
        // VM RAM files on a tmpfs (the daemon's default place).
        let shm = tempfile::Builder::new()
            .prefix("follow-bench-")
            .tempdir_in("/dev/shm")?;
        let cfg = |ms: f64| WanConfig::new("fbench", RATE_MBIT, Duration::from_secs_f64(ms / 1e3));
        let names = ["c1", "c2", "c3", "cloud"];
        let first = Wan::create(cfg(delays_ms[0])).context("Create the hub and c1's link")?;
        let mut links = vec![first];
        for (i, ms) in delays_ms.iter().enumerate().skip(1) {
            let l = Wan::attach(&links[0], cfg(*ms))
                .with_context(|| format!("Attach {}'s link", names[i]))?;
            links.push(l);
        }
        for l in &links {
            // The leaves reach the hub's every address and each other
            // (a handoff from c1 to c2 crosses both links).
            l.route_via_hub().context("Route a leaf through the hub")?;
        }
        let sites = links
            .into_iter()
            .zip(names)
            .map(|(link, name)| {
                let api = SocketAddr::from((link.addr(Side::B), API_PORT));
                Site {
                    name: name.to_string(),
                    url: format!("http://{api}"),
                    api,
                    log: work.path().join(name).join("daemon.log"),
                    link,
                }
            })
            .collect();
        let mut w = World {
            sites,
            dir_url: String::new(),
            overlay_url: String::new(),
            base_id: base.manifest.id.clone(),
            procs: Default::default(),
            work,
            _shm: shm,
        };
        w.cloud_tier(bins, &overlay).await?;
        for i in 0..w.sites.len() {
            w.start_cloudlet(bins, i, &store.bases_dir())?;
        }
        w.wait_registered().await?;
        Ok(w)
    }

    /// Start `cmd` in the namespace of `side` of site `site`'s link,
    /// its output to `log`; killed when the world drops.
    fn spawn_logged(
        &mut self,
        site: usize,
        side: Side,
        mut cmd: Command,
        log: &Path,
    ) -> anyhow::Result<()> {
        let f = std::fs::File::create(log).with_context(|| format!("Create {}", log.display()))?;
        cmd.stdin(Stdio::null()).stdout(f.try_clone()?).stderr(f);
        let child = self.sites[site]
            .link
            .spawn_in(side, cmd)
            .with_context(|| format!("Start the program logging to {}", log.display()))?;
        self.procs.children.push(child);
        Ok(())
    }

    /// The directory (heartbeat 1 s, lease 2.5 s) and the registry in the
    /// hub, the overlay pushed.
    async fn cloud_tier(&mut self, bins: &Bins, overlay: &Path) -> anyhow::Result<()> {
        let work = self.work.path().to_path_buf();
        let mut c = Command::new(&bins.cloudlet);
        c.args(["directory", "serve", "--listen"])
            .arg(format!("0.0.0.0:{DIR_PORT}"))
            .arg("--store")
            .arg(work.join("directory.redb"))
            .args([
                "--heartbeat-ms",
                "1000",
                "--lease-ms",
                "2500",
                "--plain-http",
            ]);
        self.spawn_logged(0, Side::A, c, &work.join("directory.log"))?;
        let mut c = Command::new(&bins.cloudlet);
        c.args(["registry", "serve"])
            .arg(work.join("registry"))
            .arg("--listen")
            .arg(format!("0.0.0.0:{REG_PORT}"))
            .arg("--plain-http")
            .env("CLOUDLET_REGISTRY_TOKEN", TOKEN);
        self.spawn_logged(0, Side::A, c, &work.join("registry.log"))?;
        let hub_ip = cloudlet_wan::A_ADDR;
        self.dir_url = format!("http://{hub_ip}:{DIR_PORT}");
        let reg_url = format!("http://{hub_ip}:{REG_PORT}");
        let health = [
            format!("{}/v1/health", self.dir_url),
            format!("{reg_url}/health"),
        ];
        let up = self
            .in_hub(async move {
                cloudlet_testkit::until_healthy(&health, Duration::from_secs(20)).await
            })
            .await?;
        if !up {
            bail!(
                "The directory or the registry did not come up (logs in {})",
                work.display()
            );
        }
        let out = self
            .hub()
            .spawn_in(Side::A, {
                let mut c = Command::new(&bins.cloudlet);
                c.args(["registry", "push"])
                    .arg(overlay)
                    .args(["--registry", &reg_url, "--name", "kvstore"])
                    .env("CLOUDLET_REGISTRY_TOKEN", TOKEN)
                    .env("CLOUDLET_LOG", "warn")
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                c
            })
            .context("Run cloudlet registry push")?
            .wait_with_output()?;
        if !out.status.success() {
            bail!(
                "cloudlet registry push failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.overlay_url = format!("{reg_url}/v1/overlays/kvstore");
        Ok(())
    }

    /// `cloudletd` in site `i`'s leaf, sharing the tiny base; all but
    /// `cloud` join the directory.
    fn start_cloudlet(&mut self, bins: &Bins, i: usize, bases: &Path) -> anyhow::Result<()> {
        let name = self.sites[i].name.clone();
        let dir = self.work.path().join(&name);
        let home = dir.join("home");
        let vm_dir = self._shm.path().join(&name);
        std::fs::create_dir_all(&home)?;
        std::os::unix::fs::symlink(bases, home.join("bases"))?;
        let leaf = self.sites[i].link.addr(Side::B);
        let first = 20000 + i as u16 * 1000;
        let directory = if name == "cloud" {
            String::new()
        } else {
            format!("directory = [\"{}\"]\n", self.dir_url)
        };
        // Nearby points (the device passes no position: RTT decides).
        let location = format!(
            "[location]\nlabel = \"{name}\"\nlatitude = {}\nlongitude = -79.94\n",
            40.44 + 0.01 * i as f64
        );
        let config = dir.join("cloudletd.toml");
        cloudlet_testkit::write_private(
            &config,
            format!(
                "name = \"{name}\"\nlisten = \"{leaf}:{API_PORT}\"\npublic_host = \"{leaf}\"\nhome = \"{}\"\nvm_dir = \"{}\"\ntokens = [\"{TOKEN}\"]\nhost_ports = [{first}, {}]\nplain_http = true\n{directory}{location}",
                home.display(),
                vm_dir.display(),
                first + 99,
            ),
        )?;
        let mut cmd = Command::new(&bins.cloudletd);
        cmd.arg("--config").arg(&config).env("CLOUDLET_LOG", "info");
        let log = self.sites[i].log.clone();
        self.spawn_logged(i, Side::B, cmd, &log)?;
        self.procs.vm_dirs.push(vm_dir);
        Ok(())
    }

    /// Until the directory lists `c1`..`c3` and `cloud`'s API answers.
    async fn wait_registered(&self) -> anyhow::Result<()> {
        let d = self.dir_url.clone();
        let cloud = self.cloud().url.clone();
        let ok = self
            .in_hub(async move {
                let client = DirectoryClient::new(&[d], None);
                let start = Instant::now();
                while start.elapsed() < Duration::from_secs(60) {
                    let registered = client.health().await.is_ok_and(|h| h.registered == 3);
                    let cloud_up = cloudlet_client::Client::new(&cloud, Some(TOKEN.into()))
                        .info()
                        .await
                        .is_ok();
                    if registered && cloud_up {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                false
            })
            .await?;
        if !ok {
            let logs: String = self
                .sites
                .iter()
                .map(|s| {
                    let text = std::fs::read_to_string(&s.log).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(5).collect();
                    format!(
                        "--- {} ({})\n{}\n",
                        s.name,
                        s.log.display(),
                        tail.join("\n")
                    )
                })
                .collect();
            bail!("The cloudlets did not all come up within 60 s:\n{logs}");
        }
        Ok(())
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // The daemons, then the QEMUs of this run's dirs (they outlive
        // their daemon by design), before the links go.
        self.procs.reap();
        // Leaves first, then the hub's own link (which owns its name).
        while let Some(site) = self.sites.pop() {
            if let Err(e) = site.link.teardown() {
                eprintln!("removing {}'s link: {e}", site.name);
            }
        }
    }
}

/// Run `fut` in the hub of `link` and wait for it.
pub async fn in_ns<T, F>(link: &Wan, fut: F) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: Future<Output = T> + Send + 'static,
{
    link.run_in(Side::A, fut)
        .context("Enter the hub's namespace")?
        .await
        .context("A task in the hub")
}

/// The kvstore app packaged on the tiny base, as the integration tests
/// make it (`crates/cloudletd/tests/common`): cached in the test home's
/// `overlays/`, built there on first use.
async fn kvstore_overlay() -> anyhow::Result<PathBuf> {
    let (store, base) = tiny_base().await;
    let dir = test_home().join("overlays");
    std::fs::create_dir_all(&dir)?;
    let out = dir.join(format!("kvstore-{}.overlay", &base.manifest.id[..12]));
    let lock = cloudlet_testkit::lock_exclusive(&dir.join(".lock")).await?;
    if !out.exists() {
        eprintln!(
            "packaging kvstore on the tiny base into {} ...",
            out.display()
        );
        let app = tempfile::tempdir()?;
        std::fs::copy(guest_bin("kvstore"), app.path().join("kvstore"))?;
        let mut cfg =
            PackageConfig::new("tiny", "kvstore", "./kvstore --port 8080", APP_PORT, &out);
        cfg.install_dir = Some(app.path().to_path_buf());
        cfg.health_path = Some("/health".into());
        cfg.work_dir = test_home().join("work");
        package_app(&store, &cfg, |_| {})
            .await
            .context("Package kvstore")?;
    }
    drop(lock);
    Ok(out)
}
