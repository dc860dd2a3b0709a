//! VM synthesis over an emulated WAN, to the app's first response, against two
//! references measured in the same run.
//!
//! The cloud (the overlay registry, and a plain file server for the naive way) runs
//! in namespace A; the edge (`cloudletd`, its VMs and the client) in namespace B; the
//! link between them is a `cloudlet-wan` link (tbf rate, user-space delay line).
//! For each overlay and each link rate:
//!
//! * **ours**: the client in B asks `cloudletd` in B to synthesize from
//!   `http://A/v1/overlays/NAME`; time from the request to the first `200` of the
//!   app's health path on the VM's endpoint, polled from B. The VM is deleted after.
//! * **(a) the physical limit**: overlay bytes / the rate of a plain bulk `GET` of the
//!   whole overlay over the same link, plus restore + identity + app_ready of ours.
//! * **(b) the naive way**: the launch VM's full disk image compressed with `zstd -3`
//!   (once, timed, *not* counted in the sum: a naive deployer does it ahead of time,
//!   as we create overlays ahead of time), fetched over the same link from a file
//!   server in A, decompressed in B, cold-booted (base kernel + initramfs, the disk
//!   raw; the app autostarts) and polled from B until it answers.
//!
//! Usage (as root, from the repository root):
//! `cargo run --release -p cloudlet-bench --bin synth-bench [-- --rates 38,100]`
//!
//! Needs `target/release/{cloudletd,cloudlet}`, the `debian` base in
//! `$CLOUDLET_HOME` (default here `/tmp/clhome`), the overlays and their launch images
//! from `scripts/make-overlays.sh` (`target/overlays/NAME.overlay`,
//! `target/overlays/launch/NAME/`), `zstd`, `ip` and `tc`.
//!
//! Everything it starts is stopped on the way out, error or not: VMs deleted through
//! the API, any QEMU still running under this run's directories killed, the daemons
//! killed, the namespaces removed, the work directories deleted.

use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Parser;
use cloudlet_api::{CreateVmRequest, StageTiming};
use cloudlet_base::BaseStore;
use cloudlet_client::Client;
use cloudlet_qemu::spec::DiskFormat;
use cloudlet_qemu::{PortForward, Vm};
use cloudlet_wan::{Side, Wan, WanConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Ports inside the namespaces (nothing else listens there; kept clear of the demo's).
const REGISTRY_PORT: u16 = 17461;
const FILES_PORT: u16 = 17462;
const DAEMON_PORT: u16 = 17451;
const COLD_BOOT_PORT: u16 = 17480;

#[derive(Parser)]
#[command(about = "VM synthesis over an emulated WAN vs the physical limit and the naive way")]
struct Args {
    /// Link rates in Mbit/s, one table each.
    #[arg(long, value_delimiter = ',', default_values_t = vec![38.0, 100.0])]
    rates: Vec<f64>,
    /// One-way delay of the link in ms.
    #[arg(long, default_value_t = 10)]
    delay_ms: u64,
    /// Overlays to measure (`OVERLAY_DIR/NAME.overlay`, launch image in
    /// `OVERLAY_DIR/launch/NAME`); missing ones are reported and skipped.
    #[arg(long, value_delimiter = ',', default_values_t = vec!["kvstore".to_string(), "translator".to_string(), "numpy".to_string()])]
    overlays: Vec<String>,
    /// Default: target/overlays of the workspace.
    #[arg(long)]
    overlay_dir: Option<PathBuf>,
    /// Where `cloudletd` and `cloudlet` are (default: target/release of the workspace).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// The base store (holds `debian`).
    #[arg(long, env = "CLOUDLET_HOME", default_value = "/tmp/clhome")]
    home: PathBuf,
    /// Base of the launch images (for the naive way's cold boot).
    #[arg(long, default_value = "debian")]
    base: String,
    /// Disk-backed scratch space (registry storage, daemon state, VM disks).
    #[arg(long, default_value = "/var/tmp")]
    workdir: PathBuf,
    /// tmpfs for VM RAM files.
    #[arg(long, default_value = "/dev/shm")]
    shm: PathBuf,
    /// Skip reference (b).
    #[arg(long)]
    no_naive: bool,
}

/// One row of a table.
#[derive(Default)]
struct Row {
    name: String,
    overlay_bytes: u64,
    bulk: Option<(u64, Duration)>,
    ours: Option<Ours>,
    naive: Option<Naive>,
    errors: Vec<String>,
}

struct Ours {
    total: Duration,
    api: Duration,
    timings: Vec<StageTiming>,
}

impl Ours {
    fn stage(&self, name: &str) -> Option<Duration> {
        self.timings
            .iter()
            .find(|t| t.stage == name)
            .map(|t| Duration::from_millis(t.ms))
    }
    /// restore + identity + app_ready: what follows the last byte.
    fn restore_part(&self) -> Duration {
        ["restore", "identity", "app_ready"]
            .iter()
            .filter_map(|s| self.stage(s))
            .sum()
    }
}

struct Naive {
    zst_bytes: u64,
    transfer: Duration,
    decompress: Duration,
    boot: Duration,
}

impl Naive {
    fn total(&self) -> Duration {
        self.transfer + self.decompress + self.boot
    }
}

struct Prepared {
    name: String,
    overlay: PathBuf,
    overlay_bytes: u64,
    health: String,
    /// The compressed launch disk and how long `zstd -3` took.
    zst: Option<(PathBuf, Duration)>,
}

fn main() -> anyhow::Result<()> {
    cloudlet_bench::init_logging();
    let args = Args::parse();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let overlay_dir = args
        .overlay_dir
        .clone()
        .unwrap_or_else(|| root.join("target/overlays"));
    let bin_dir = args
        .bin_dir
        .clone()
        .unwrap_or_else(|| root.join("target/release"));
    for b in ["cloudletd", "cloudlet"] {
        if !bin_dir.join(b).is_file() {
            bail!(
                "{} missing: cargo build --release -p cloudletd -p cloudlet-cli",
                bin_dir.join(b).display()
            );
        }
    }
    let bases = BaseStore::new(&args.home);
    bases.get(&args.base).with_context(|| {
        format!(
            "base {} not in {} (cloudlet base build {})",
            args.base,
            args.home.display(),
            args.base
        )
    })?;

    let work = tempfile::Builder::new()
        .prefix("synth-bench-")
        .tempdir_in(&args.workdir)?;
    let shm = tempfile::Builder::new()
        .prefix("synth-bench-")
        .tempdir_in(&args.shm)?;
    let mut notes = Vec::new();

    // The overlays, and the naive way's compressed disks (made once, timed).
    let mut prepared = Vec::new();
    for name in &args.overlays {
        let overlay = overlay_dir.join(format!("{name}.overlay"));
        let launch = overlay_dir.join("launch").join(name);
        let Ok(meta) = std::fs::metadata(&overlay) else {
            notes.push(format!("{name}: skipped, {} missing", overlay.display()));
            continue;
        };
        let health = std::fs::read(launch.join("app.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["health_path"].as_str().map(str::to_string))
            .unwrap_or_else(|| "/health".into());
        let mut zst = None;
        if !args.no_naive {
            let disk = launch.join("disk.raw");
            if disk.is_file() {
                let out = work.path().join(format!("{name}.disk.zst"));
                eprintln!("compressing {} (zstd -3) ...", disk.display());
                let t = Instant::now();
                run(Command::new("zstd")
                    .args(["-3", "-q", "-f"])
                    .arg(&disk)
                    .arg("-o")
                    .arg(&out))?;
                zst = Some((out, t.elapsed()));
            } else {
                notes.push(format!(
                    "{name}: no launch image at {}, reference (b) not measured",
                    launch.display()
                ));
            }
        }
        prepared.push(Prepared {
            name: name.clone(),
            overlay,
            overlay_bytes: meta.len(),
            health,
            zst,
        });
    }
    if prepared.is_empty() {
        bail!("no overlay to measure in {}", overlay_dir.display());
    }

    // Daemon logs outlive the run (the work directories do not).
    let logs = root.join("target/synth-bench-logs");
    std::fs::create_dir_all(&logs)?;
    let edge = Edge::start(&args, &bin_dir, work.path(), shm.path(), &logs)?;
    for p in &prepared {
        edge.push(&bin_dir, &args.home, &p.overlay, &p.name)?;
    }

    let mut tables = Vec::new();
    for (i, &rate) in args.rates.iter().enumerate() {
        if i > 0 {
            edge.wan().set_rate(rate)?;
        }
        let mut rows = Vec::new();
        for p in &prepared {
            eprintln!("== {} at {rate} Mbit/s", p.name);
            rows.push(measure(&edge, &args, p, work.path(), shm.path()));
        }
        tables.push((rate, rows));
    }
    drop(edge);

    println!();
    println!(
        "VM synthesis over an emulated WAN ({} ms one way): request -> first 200 of the app's health path, from the edge namespace",
        args.delay_ms
    );
    for (rate, rows) in &tables {
        print_table(*rate, rows, &prepared);
    }
    println!();
    println!("ours    = POST /v1/vms (cloudletd fetches the overlay from the registry across the link) -> app answers on its endpoint");
    println!("stages  = cloudletd's VmInfo.timings: fetch+apply (pipelined) / restore / identity / app_ready, seconds");
    println!("link    = rate of a plain GET of the whole overlay from the registry over the same link (TCP payload)");
    println!("(a)     = overlay bytes / link + restore + identity + app_ready (ours)");
    println!("(b)     = launch disk (zstd -3) transfer + zstd -d + cold boot to first answer; the compression itself is excluded (done ahead of time; its time is in the last column)");
    println!("targets = ours <= 1.3x (a); (b) >= 5x ours; ours <= 10 s at 38 Mbit/s");
    for n in &notes {
        println!("note: {n}");
    }
    let plot = root.join("target/synth-bench.svg");
    std::fs::write(&plot, timeline(&tables, args.delay_ms).render())?;
    println!(
        "plot: {} (each synthesis' stages, beside the naive way's)",
        plot.display()
    );
    Ok(())
}

/// Every measured synthesis as a row of its stages (the daemon's
/// `timings`), each beside the naive way's transfer, decompression and boot.
fn timeline(tables: &[(f64, Vec<Row>)], delay_ms: u64) -> cloudlet_plot::Timeline {
    let mut t = cloudlet_plot::Timeline::new(&format!(
        "VM synthesis: request to the app's first answer ({delay_ms} ms one way)"
    ));
    for (rate, rows) in tables {
        for r in rows {
            if let Some(o) = &r.ours {
                let stages: Vec<(String, f64)> = o
                    .timings
                    .iter()
                    .filter(|s| s.stage != "total")
                    .map(|s| (s.stage.clone(), s.ms as f64))
                    .collect();
                t.sequence(&format!("{} {rate} Mbit/s: ours", r.name), &stages);
            }
            if let Some(n) = &r.naive {
                let ms = |d: Duration| d.as_secs_f64() * 1000.0;
                t.sequence(
                    &format!("{} {rate} Mbit/s: naive", r.name),
                    &[
                        ("naive: transfer".into(), ms(n.transfer)),
                        ("naive: zstd -d".into(), ms(n.decompress)),
                        ("naive: boot".into(), ms(n.boot)),
                    ],
                );
            }
        }
    }
    t
}

fn print_table(rate: f64, rows: &[Row], prepared: &[Prepared]) {
    println!();
    println!("link {rate} Mbit/s");
    println!(
        "{:<11} {:>8} {:>8}  {:<27} {:>8} {:>7} {:>8}  {:>8} {:>25} {:>8}  {:<6} {:<6} {:<6} {:>8}",
        "overlay",
        "MB",
        "ours s",
        "fetch+apply/rest/id/app s",
        "link Mb",
        "(a) s",
        "ours/a",
        "(b) s",
        "xfer+dec+boot s",
        "b/ours",
        "1.3x a",
        "5x b",
        "10 s",
        "zstd s"
    );
    for r in rows {
        let mb = r.overlay_bytes as f64 / 1e6;
        let s = |d: Duration| format!("{:.2}", d.as_secs_f64());
        let link = r
            .bulk
            .map(|(bytes, d)| bytes as f64 * 8.0 / d.as_secs_f64() / 1e6);
        let (ours_s, stages) = match &r.ours {
            Some(o) => (
                s(o.total),
                ["fetch_apply", "restore", "identity", "app_ready"]
                    .iter()
                    .map(|st| {
                        o.stage(st)
                            .map_or("-".into(), |d| format!("{:.2}", d.as_secs_f64()))
                    })
                    .collect::<Vec<_>>()
                    .join("/"),
            ),
            None => ("ERR".into(), "-".into()),
        };
        let a = match (&r.ours, link) {
            (Some(o), Some(l)) => Some(
                Duration::from_secs_f64(r.overlay_bytes as f64 * 8.0 / (l * 1e6))
                    + o.restore_part(),
            ),
            _ => None,
        };
        let ours_over_a = match (&r.ours, a) {
            (Some(o), Some(a)) => Some(o.total.as_secs_f64() / a.as_secs_f64()),
            _ => None,
        };
        let b_over_ours = match (&r.ours, &r.naive) {
            (Some(o), Some(n)) => Some(n.total().as_secs_f64() / o.total.as_secs_f64()),
            _ => None,
        };
        let verdict = |v: Option<bool>| match v {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None => "n/a",
        };
        let t13 = verdict(ours_over_a.map(|x| x <= 1.3));
        let t5 = verdict(b_over_ours.map(|x| x >= 5.0));
        let t10 = if (rate - 38.0).abs() < 0.5 {
            verdict(Some(
                r.ours
                    .as_ref()
                    .is_some_and(|o| o.total <= Duration::from_secs(10)),
            ))
        } else {
            "-"
        };
        let zstd = prepared
            .iter()
            .find(|p| p.name == r.name)
            .and_then(|p| p.zst.as_ref())
            .map_or("-".into(), |(_, d)| s(*d));
        println!(
            "{:<11} {:>8.1} {:>8}  {:<27} {:>8} {:>7} {:>8}  {:>8} {:>25} {:>8}  {:<6} {:<6} {:<6} {:>8}",
            r.name,
            mb,
            ours_s,
            stages,
            link.map_or("-".into(), |l| format!("{l:.1}")),
            a.map_or("-".into(), s),
            ours_over_a.map_or("-".into(), |x| format!("{x:.2}x")),
            r.naive.as_ref().map_or("-".into(), |n| s(n.total())),
            r.naive.as_ref().map_or("-".into(), |n| format!(
                "{:.1}+{:.1}+{:.1} ({:.0} MB)",
                n.transfer.as_secs_f64(),
                n.decompress.as_secs_f64(),
                n.boot.as_secs_f64(),
                n.zst_bytes as f64 / 1e6
            )),
            b_over_ours.map_or("-".into(), |x| format!("{x:.1}x")),
            t13,
            t5,
            t10,
            zstd
        );
        if let Some(o) = &r.ours {
            println!(
                "{:<11} (POST answered after {:.2} s; first answer polled from B {:.2} s after that)",
                "",
                o.api.as_secs_f64(),
                (o.total - o.api).as_secs_f64()
            );
        }
        for e in &r.errors {
            println!("{:<11} error: {e}", "");
        }
    }
}

/// One overlay at the current rate: bulk download, ours, naive.
fn measure(edge: &Edge, args: &Args, p: &Prepared, work: &Path, shm: &Path) -> Row {
    let mut row = Row {
        name: p.name.clone(),
        overlay_bytes: p.overlay_bytes,
        ..Row::default()
    };
    let url = format!("{}/v1/overlays/{}", edge.registry_url, p.name);
    match edge.bulk_get(&url) {
        Ok(b) => row.bulk = Some(b),
        Err(e) => row.errors.push(format!("bulk download: {e:#}")),
    }
    settle();
    match edge.synthesize(&url, &p.name, &p.health) {
        Ok(o) => row.ours = Some(o),
        Err(e) => row.errors.push(format!("ours: {e:#}")),
    }
    if let Some((zst, _)) = &p.zst {
        settle();
        match naive(edge, args, p, zst, work, shm) {
            Ok(n) => row.naive = Some(n),
            Err(e) => row.errors.push(format!("naive: {e:#}")),
        }
    }
    row
}

/// Before each measured run: write back what earlier runs left dirty (the
/// naive way writes a 2 GiB disk, the preparation three compressed ones),
/// so that no run pays for the writeback of another.
fn settle() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::thread::sleep(Duration::from_millis(500));
}

/// Reference (b): fetch the compressed disk over the link, decompress, cold boot.
fn naive(
    edge: &Edge,
    args: &Args,
    p: &Prepared,
    zst: &Path,
    work: &Path,
    shm: &Path,
) -> anyhow::Result<Naive> {
    let dir = work.join(format!("naive-{}", p.name));
    std::fs::create_dir_all(&dir)?;
    let _cleanup = RemoveDir(dir.clone());
    let ram_dir = shm.join(format!("naive-{}", p.name));
    std::fs::create_dir_all(&ram_dir)?;
    let _cleanup_ram = RemoveDir(ram_dir.clone());

    // Transfer: a file server in A, a download in B (to a file on disk).
    let got = dir.join("disk.zst");
    let server = FileServer::start(edge.wan(), zst.to_path_buf())?;
    let url = format!("http://{}:{}/disk.zst", edge.wan().a_addr(), FILES_PORT);
    let out = got.clone();
    let transfer = edge
        .wan()
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
    let base = BaseStore::new(&args.home).get(&args.base)?;
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
    let boot = edge
        .wan()
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

/// The link, the registry in A and cloudletd in B. Dropping it deletes the VMs
/// left, kills the daemons and any QEMU of this run, and removes the namespaces.
struct Edge {
    wan: Option<Wan>,
    registry: Option<ChildGuard>,
    daemon: Option<ChildGuard>,
    api: String,
    token: String,
    registry_url: String,
    push_token: String,
    /// Directories whose QEMU processes belong to this run.
    owned_dirs: Vec<PathBuf>,
}

impl Edge {
    fn start(
        args: &Args,
        bin_dir: &Path,
        work: &Path,
        shm: &Path,
        logs: &Path,
    ) -> anyhow::Result<Edge> {
        let wan = Wan::create(WanConfig::new(
            "synth",
            args.rates[0],
            Duration::from_millis(args.delay_ms),
        ))?;
        let token = format!("synth-bench-{}", std::process::id());
        let mut edge = Edge {
            registry_url: format!("http://{}:{}", wan.a_addr(), REGISTRY_PORT),
            api: format!("http://{}:{}", Ipv4Addr::LOCALHOST, DAEMON_PORT),
            wan: Some(wan),
            registry: None,
            daemon: None,
            push_token: format!("{token}-push"),
            token,
            owned_dirs: vec![work.to_path_buf(), shm.to_path_buf()],
        };

        // The cloud: the registry in A.
        let storage = work.join("registry");
        std::fs::create_dir_all(&storage)?;
        let log = std::fs::File::create(logs.join("registry.log"))?;
        let mut cmd = Command::new(bin_dir.join("cloudlet"));
        cmd.args(["registry", "serve"])
            .arg(&storage)
            .arg("--listen")
            .arg(format!("{}:{}", edge.wan().a_addr(), REGISTRY_PORT))
            .arg("--plain-http")
            .env("CLOUDLET_REGISTRY_TOKEN", &edge.push_token)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        edge.registry = Some(ChildGuard::spawn(edge.wan(), Side::A, cmd, "registry")?);

        // The edge: cloudletd in B, with its own state and the shared base store.
        let home = work.join("home");
        std::fs::create_dir_all(&home)?;
        std::os::unix::fs::symlink(
            std::fs::canonicalize(args.home.join("bases"))?,
            home.join("bases"),
        )?;
        let _ = std::fs::copy(args.home.join("accel-probe"), home.join("accel-probe"));
        let log = std::fs::File::create(logs.join("cloudletd.log"))?;
        let mut cmd = Command::new(bin_dir.join("cloudletd"));
        cmd.arg("--listen")
            .arg(format!("{}:{}", Ipv4Addr::LOCALHOST, DAEMON_PORT))
            .arg("--home")
            .arg(&home)
            .arg("--vm-dir")
            .arg(shm.join("vms"))
            .arg("--name")
            .arg("synth-bench")
            .env("CLOUDLET_TOKEN", &edge.token)
            .env_remove("CLOUDLETD_CONFIG")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        edge.daemon = Some(ChildGuard::spawn(edge.wan(), Side::B, cmd, "cloudletd")?);

        // Wait for both.
        let (api, token, reg) = (
            edge.api.clone(),
            edge.token.clone(),
            edge.registry_url.clone(),
        );
        edge.wan()
            .run_in(Side::B, async move {
                let deadline = Instant::now() + Duration::from_secs(60);
                let c = Client::new(&api, Some(token));
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
            .with_context(|| format!("see the logs in {}", logs.display()))?;
        Ok(edge)
    }

    fn wan(&self) -> &Wan {
        self.wan
            .as_ref()
            .expect("the link lives as long as the edge")
    }

    /// Push an overlay to the registry from inside A (does not cross the link).
    fn push(&self, bin_dir: &Path, home: &Path, file: &Path, name: &str) -> anyhow::Result<()> {
        let mut cmd = Command::new(bin_dir.join("cloudlet"));
        cmd.args(["registry", "push"])
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
        let out = self.wan().spawn_in(Side::A, cmd)?.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "pushing {name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// A plain GET of `url` from B: (bytes, time).
    fn bulk_get(&self, url: &str) -> anyhow::Result<(u64, Duration)> {
        let url = url.to_string();
        self.wan()
            .run_in(Side::B, async move { download(&url, None).await })?
            .join()?
    }

    /// Ours: synthesize from `url` through the API, from B, to the first answer.
    fn synthesize(&self, url: &str, name: &str, health: &str) -> anyhow::Result<Ours> {
        let c = Client::new(&self.api, Some(self.token.clone()));
        let req = CreateVmRequest {
            overlay: url.to_string(),
            name: Some(format!("sb-{name}")),
            flavor: None,
        };
        let health = health.to_string();
        self.wan()
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

impl Drop for Edge {
    fn drop(&mut self) {
        if let (Some(wan), Some(_)) = (&self.wan, &self.daemon) {
            let c = Client::new(&self.api, Some(self.token.clone()));
            if let Ok(h) = wan.run_in(Side::B, async move {
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
        if let Some(wan) = self.wan.take() {
            if let Err(e) = wan.teardown() {
                eprintln!("cleanup: tearing down the link: {e}");
            }
        }
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

/// Kill QEMU processes whose command line names a file under one of `dirs`
/// (VMs of this run that outlived their daemon: QEMU runs in its own process group).
fn kill_qemu_under(dirs: &[PathBuf]) {
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

fn http_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(10))
        .build()?)
}

/// GET `url` to the end (into `out` if given): (bytes, time from request to last byte).
async fn download(url: &str, out: Option<&Path>) -> anyhow::Result<(u64, Duration)> {
    let http = http_client()?;
    let mut file = match out {
        Some(p) => Some(std::io::BufWriter::with_capacity(
            1 << 20,
            std::fs::File::create(p)?,
        )),
        None => None,
    };
    let start = Instant::now();
    let mut resp = http.get(url).send().await?.error_for_status()?;
    let mut n = 0u64;
    while let Some(chunk) = resp.chunk().await? {
        n += chunk.len() as u64;
        if let Some(f) = file.as_mut() {
            f.write_all(&chunk)?;
        }
    }
    if let Some(mut f) = file {
        f.flush()?;
    }
    Ok((n, start.elapsed()))
}

/// Poll `GET path` on `addr` until it answers 200: the time since `start`.
async fn first_ok(
    addr: SocketAddr,
    path: &str,
    start: Instant,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    loop {
        if let Ok(Ok(200)) =
            tokio::time::timeout(Duration::from_secs(5), get_status(addr, path)).await
        {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!("no 200 from {addr}{path} within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One `GET` with HTTP/1.0: the status code.
async fn get_status(addr: SocketAddr, path: &str) -> anyhow::Result<u16> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let line = String::from_utf8_lossy(&buf);
    let code = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("no HTTP status in the answer"))?;
    Ok(code)
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
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
