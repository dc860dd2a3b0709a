//! The daemons of a run: a fresh link, a cloudletd on each side in the
//! run's TLS mode, the kvstore VM synthesized at the source and churning.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::bail;
use cloudlet_bench::tls::{ServiceTls, TlsMode};
use cloudlet_client::Client;
use cloudlet_testkit::http;
use cloudlet_wan::{Side, Wan, WanConfig};

use crate::{Bench, TOKEN};

/// The daemons' API port, on each side's address.
const API_PORT: u16 = 7450;

/// Run `fut` inside a namespace and wait for it.
pub async fn in_ns<T, F>(wan: &Wan, side: Side, fut: F) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: std::future::Future<Output = T> + Send + 'static,
{
    Ok(wan.run_in(side, fut)?.await?)
}

/// A cloudletd process inside a namespace.
pub struct NsDaemon {
    pub url: String,
    pub vm_dir: PathBuf,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl NsDaemon {
    async fn start(
        wan: &Wan,
        side: Side,
        bench: &Bench,
        tag: &str,
        tls: &ServiceTls,
    ) -> anyhow::Result<NsDaemon> {
        let args = &bench.args;
        let dir = tempfile::tempdir()?;
        let home = dir.path().join("home");
        std::fs::create_dir_all(&home)?;
        std::os::unix::fs::symlink(args.home.join("bases"), home.join("bases"))?;
        // Short, so that QEMU's sockets stay in the run directory.
        let vm_dir = args.workdir.join(format!("hb{tag}"));
        let _ = std::fs::remove_dir_all(&vm_dir);
        let addr = format!("{}:{API_PORT}", wan.addr(side));
        let config = dir.path().join("cloudletd.toml");
        cloudlet_testkit::write_private(
            &config,
            format!(
                "name = \"bench-{side:?}\"\nlisten = \"{addr}\"\nhome = \"{}\"\nvm_dir = \"{}\"\ntokens = [\"{TOKEN}\"]\nhost_ports = [21000, 21099]\nverify_memory = {}\nhandoff_rate_cap = {}\n{}",
                home.display(),
                vm_dir.display(),
                !args.no_verify_memory,
                !args.no_verify_memory && !args.no_rate_cap,
                tls.daemon_toml(&addr),
            ),
        )?;
        // Kept after the run (the last run of each side), for a look at
        // what the daemons decided: CLOUDLET_LOG=info for more. JSON lines
        // (`jq` reads them): the handoff's timestamps through the
        // switchover ("downtime mark") are always logged, and the
        // downtime's breakdown is read from them.
        let log_path = std::env::temp_dir().join(format!("handoff-bench-{side:?}.log"));
        let log = std::fs::File::create(&log_path)?;
        let mut cmd = Command::new(&bench.cloudletd);
        cmd.arg("--config")
            .arg(&config)
            .env(
                "CLOUDLET_LOG",
                std::env::var("CLOUDLET_LOG")
                    .unwrap_or_else(|_| "warn,cloudletd::handoff=info".into()),
            )
            .env("CLOUDLET_LOG_FORMAT", "json")
            .env_remove("CLOUDLET_HOME")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = wan.spawn_in(side, cmd)?;
        let d = NsDaemon {
            url: tls.url(&addr),
            vm_dir,
            child: Some(child),
            _dir: dir,
        };
        let client = d.client();
        let up = in_ns(wan, side, async move {
            for _ in 0..600 {
                if client.info().await.is_ok() {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            false
        })
        .await?;
        if !up {
            bail!("cloudletd did not come up in {side:?}");
        }
        Ok(d)
    }

    pub fn client(&self) -> Client {
        Client::new(&self.url, Some(TOKEN.into()))
    }

    pub fn kill_daemon(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NsDaemon {
    fn drop(&mut self) {
        self.kill_daemon();
        cloudlet_testkit::kill_processes_with(&self.vm_dir.display().to_string());
        let _ = std::fs::remove_dir_all(&self.vm_dir);
    }
}

/// A fresh WAN, a source cloudletd in A with the kvstore VM churning (and
/// a destination in B), both in one TLS mode.
pub struct Setup {
    pub a: NsDaemon,
    pub b: Option<NsDaemon>,
    pub wan: Wan,
    pub vm_id: String,
}

pub async fn setup(
    bench: &Bench,
    rate: f64,
    churn: u32,
    mode: TlsMode,
    with_b: bool,
) -> anyhow::Result<Setup> {
    let args = &bench.args;
    let _ = cloudlet_wan::cleanup_stale();
    let wan = Wan::create(WanConfig::new(
        "hbench",
        rate,
        Duration::from_millis(args.delay_ms),
    ))?;
    let tls_of = |side: Side| {
        let name = format!("bench-{side:?}");
        mode.service(bench.fleet.as_ref(), &name, wan.addr(side).into())
    };
    let a = NsDaemon::start(&wan, Side::A, bench, "a", &tls_of(Side::A)?).await?;
    let b = if with_b {
        Some(NsDaemon::start(&wan, Side::B, bench, "b", &tls_of(Side::B)?).await?)
    } else {
        None
    };
    let (client, overlay) = (a.client(), args.overlay.clone());
    let t = Instant::now();
    let vm = in_ns(&wan, Side::A, async move {
        client
            .create_vm_upload(&overlay, Some("kv"), Some("large"))
            .await
    })
    .await??;
    eprintln!(
        "  VM {} up in {:.1} s ({} MiB?), churn {churn} MiB/s",
        vm.id,
        t.elapsed().as_secs_f64(),
        1024
    );
    let port = vm.ports[0].host;
    let status = in_ns(&wan, Side::A, async move {
        http(port, "POST", &format!("/churn?mib_per_s={churn}"), None)
            .await
            .map(|r| (r.status, r.text()))
    })
    .await??;
    if status.0 >= 300 {
        bail!("churn refused: {status:?}");
    }
    tokio::time::sleep(Duration::from_secs(args.warmup_s)).await;
    let st = in_ns(&wan, Side::A, async move {
        http(port, "GET", "/churn", None).await.map(|r| r.text())
    })
    .await??;
    eprintln!("  churn status: {st}");
    Ok(Setup {
        a,
        b,
        wan,
        vm_id: vm.id,
    })
}
