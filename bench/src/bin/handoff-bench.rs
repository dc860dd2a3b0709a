//! Live VM handoff across an emulated WAN vs QEMU's own live migration.
//!
//! A 1 GiB `debian` VM running kvstore (synthesized by a real `cloudletd` from
//! the kvstore overlay) is handed off from a cloudletd in namespace A to one in
//! namespace B, joined only by the emulated link (25 ms one way), while
//! kvstore rewrites 8 MiB/s (moderate) or 16 MiB/s (heavy) of its memory.
//! At 25 Mbit/s the same VM is also moved by QEMU's own migration over the
//! same link (default precopy, xbzrle, multifd + zstd), from the source QEMU
//! in A to a QEMU listening in B.
//!
//! Real downtime is the source QEMU's STOP event to the destination QEMU's
//! RESUME event (QMP event timestamps, same host clock).
//!
//! Usage (as root; kvstore's churn rewrites its default 64 MiB buffer):
//! ```text
//! export CLOUDLET_HOME=/tmp/clhome
//! cloudlet base build debian --name debian-1g --memory-mib 1024
//! cloudlet overlay create --base debian-1g --install DIR_WITH_KVSTORE --name kvstore \
//!     --port 8080 --health /health --run "./kvstore --port 8080" -o /tmp/kvstore-1g.overlay
//! target/release/handoff-bench [--rates 10,25,50] [--qemu-cap-s 480]
//! ```
//! It also reports, per run, the information the move needed: the unique
//! pages of the final memory that differ from the base, after zstd -19.
//! While a move runs, its progress comes from the source's `/v1/events`;
//! after it, its plot (`cloudlet_plot::handoff`, from the source's history)
//! goes to `--plots DIR` (`handoff-RATEmbit-CHURNmibs.svg`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use cloudlet_api::HandoffReport;
use cloudlet_client::Client;
use cloudlet_qemu::QmpClient;
use cloudlet_testkit::http;
use cloudlet_wan::{Side, Wan, WanConfig};

const TOKEN: &str = "bench-token-0123456789";
const API_PORT: u16 = 7450;
const QEMU_MIGRATE_PORT: u16 = 4444;

#[derive(Parser)]
struct Args {
    /// The kvstore overlay on the 1 GiB debian base.
    #[arg(long, default_value = "/tmp/kvstore-1g.overlay")]
    overlay: PathBuf,
    /// Cloudlet home holding the base VMs (its `bases` directory is shared).
    #[arg(long, env = "CLOUDLET_HOME", default_value = "/tmp/clhome")]
    home: PathBuf,
    /// The cloudletd binary (default: next to this program).
    #[arg(long)]
    cloudletd: Option<PathBuf>,
    /// Link rates for our handoff, Mbit/s (0: skip ours).
    #[arg(long, value_delimiter = ',', default_values_t = vec![10.0, 25.0, 50.0])]
    rates: Vec<f64>,
    /// Churn rates of the workloads, MiB/s (moderate, heavy).
    #[arg(long, value_delimiter = ',', default_values_t = vec![8, 16])]
    workloads: Vec<u32>,
    /// One-way delay, ms.
    #[arg(long, default_value_t = 25)]
    delay_ms: u64,
    /// Rate at which QEMU's own migration is compared, Mbit/s.
    #[arg(long, default_value_t = 25.0)]
    qemu_rate: f64,
    /// Give up on a QEMU migration after this many seconds.
    #[arg(long, default_value_t = 120)]
    qemu_cap_s: u64,
    /// QEMU modes to run (default, xbzrle, multifd-zstd); empty to skip.
    #[arg(long, value_delimiter = ',', default_values_t = vec!["default".to_string(), "xbzrle".to_string(), "multifd-zstd".to_string()])]
    qemu_modes: Vec<String>,
    /// Where each of our handoffs' plot goes (`handoff-RATEmbit-CHURNmibs.svg`).
    #[arg(long, default_value = "target/handoff-bench")]
    plots: PathBuf,
    /// Seconds of churn before the move starts.
    #[arg(long, default_value_t = 10)]
    warmup_s: u64,
    /// Turn off what the daemons do by default: digest the moved memory and
    /// resume only an identical copy, repairing a few differing pages
    /// (`verify_memory = false`; the rate cap needs it, so it goes too).
    #[arg(long)]
    no_verify_memory: bool,
    /// Turn off the daemons' rate cap (`handoff_rate_cap = false`): QEMU's
    /// own switchover decision, made from a rate that counts pages equal to
    /// the base, decides when to stop.
    #[arg(long)]
    no_rate_cap: bool,
    /// Where VM RAM files go.
    #[arg(long, default_value = "/dev/shm")]
    workdir: PathBuf,
}

/// Run `fut` inside a namespace and wait for it.
async fn in_ns<T, F>(wan: &Wan, side: Side, fut: F) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: std::future::Future<Output = T> + Send + 'static,
{
    Ok(wan.run_in(side, fut)?.await?)
}

/// A cloudletd process inside a namespace.
struct NsDaemon {
    url: String,
    vm_dir: PathBuf,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl NsDaemon {
    async fn start(
        wan: &Wan,
        side: Side,
        args: &Args,
        bin: &Path,
        tag: &str,
    ) -> anyhow::Result<NsDaemon> {
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
                "name = \"bench-{side:?}\"\nlisten = \"{addr}\"\nhome = \"{}\"\nvm_dir = \"{}\"\ntokens = [\"{TOKEN}\"]\nhost_ports = [21000, 21099]\nadvertise_url = \"http://{addr}\"\nplain_http = true\nverify_memory = {}\nhandoff_rate_cap = {}\n",
                home.display(),
                vm_dir.display(),
                !args.no_verify_memory,
                !args.no_verify_memory && !args.no_rate_cap,
            ),
        )?;
        // Kept after the run (the last run of each side), for a look at
        // what the daemons decided: CLOUDLET_LOG=info for more. JSON lines
        // (`jq` reads them): the handoff's timestamps through the
        // switchover ("downtime mark") are always logged, and the
        // downtime's breakdown is read from them.
        let log_path = std::env::temp_dir().join(format!("handoff-bench-{side:?}.log"));
        let log = std::fs::File::create(&log_path)?;
        let mut cmd = Command::new(bin);
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
            url: format!("http://{addr}"),
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

    fn client(&self) -> Client {
        Client::new(&self.url, Some(TOKEN.into()))
    }

    fn kill_daemon(&mut self) {
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

/// A fresh WAN, a source cloudletd in A with the kvstore VM churning.
struct Setup {
    a: NsDaemon,
    b: Option<NsDaemon>,
    wan: Wan,
    vm_id: String,
}

async fn setup(
    args: &Args,
    bin: &Path,
    rate: f64,
    churn: u32,
    with_b: bool,
) -> anyhow::Result<Setup> {
    let _ = cloudlet_wan::cleanup_stale();
    let wan = Wan::create(WanConfig::new(
        "hbench",
        rate,
        Duration::from_millis(args.delay_ms),
    ))?;
    let a = NsDaemon::start(&wan, Side::A, args, bin, "a").await?;
    let b = if with_b {
        Some(NsDaemon::start(&wan, Side::B, args, bin, "b").await?)
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

struct OurRun {
    rate: f64,
    churn: u32,
    result: anyhow::Result<HandoffReport>,
    link_bytes: u64,
    /// The information the move needed, measured offline on the memory the
    /// destination holds right after it: (unique changed bytes, zstd -19).
    needed: Option<(u64, u64)>,
}

/// Pages of `ram` that differ from `base` (and are not zero), deduplicated,
/// then compressed with zstd -19 and long-distance matching: what a perfect
/// one-shot transfer of the final memory would have to send.
fn needed_memory(ram: &Path, base: &Path) -> anyhow::Result<(u64, u64)> {
    const PAGE: usize = 4096;
    let ram = std::fs::read(ram)?;
    let base = std::fs::read(base)?;
    let mut seen = std::collections::HashSet::new();
    let mut unique = Vec::new();
    for (i, page) in ram.chunks(PAGE).enumerate() {
        let b = base.get(i * PAGE..(i + 1) * PAGE);
        if Some(page) == b || page.iter().all(|&x| x == 0) {
            continue;
        }
        if seen.insert(*blake3::hash(page).as_bytes()) {
            unique.extend_from_slice(page);
        }
    }
    let mut enc = zstd::stream::Encoder::new(Vec::new(), 19)?;
    enc.long_distance_matching(true)?;
    enc.window_log(27)?;
    std::io::Write::write_all(&mut enc, &unique)?;
    let out = enc.finish()?;
    Ok((unique.len() as u64, out.len() as u64))
}

/// The handoff's timestamps through the switchover, from both daemons'
/// JSON logs ("downtime mark" events: `at_us`, host clock), in ms after
/// `stop_us`.
fn downtime_marks(stop_us: i64) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for side in ["A", "B"] {
        let path = std::env::temp_dir().join(format!("handoff-bench-{side}.log"));
        let text = std::fs::read_to_string(path).unwrap_or_default();
        for (what, at) in text.lines().filter_map(parse_mark) {
            // Earlier handoffs of the same daemons are not this one.
            if at >= stop_us - 1_000_000 {
                out.push((what, (at - stop_us) as f64 / 1e3));
            }
        }
    }
    out.sort_by(|a, b| a.1.total_cmp(&b.1));
    out
}

/// A "downtime mark" event of a daemon's JSON log line (`cloudletd
/// --log-format json`): its `what` and `at_us`; None for any other line.
fn parse_mark(line: &str) -> Option<(String, i64)> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = v.get("fields")?;
    if fields.get("message")?.as_str()? != "downtime mark" {
        return None;
    }
    let what = fields.get("what")?.as_str()?.to_string();
    Some((what, fields.get("at_us")?.as_i64()?))
}

async fn run_ours(args: &Args, bin: &Path, rate: f64, churn: u32) -> anyhow::Result<OurRun> {
    eprintln!("ours: {rate} Mbit/s, churn {churn} MiB/s");
    let s = setup(args, bin, rate, churn, true).await?;
    let before = s.wan.stats().a_to_b.bytes;
    let (client, id, dest) = (
        s.a.client(),
        s.vm_id.clone(),
        s.b.as_ref().unwrap().url.clone(),
    );
    // Progress on stderr, as the source tells it on /v1/events (followed
    // from before the handoff starts until its last event).
    let watcher = {
        let client = s.a.client();
        s.wan.run_in(Side::A, follow_progress(client))?
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let handle = s.wan.run_in(Side::A, async move {
        client.handoff(&id, &dest, Some(TOKEN)).await
    })?;
    let result = handle.await?.map_err(anyhow::Error::from);
    let _ = tokio::time::timeout(Duration::from_secs(5), watcher).await;
    let link_bytes = s.wan.stats().a_to_b.bytes - before;
    match &result {
        Ok(r) => {
            // Its course, from the source's history (what /v1/events told).
            let (client, hid) = (s.a.client(), r.handoff_id.clone());
            let record = s
                .wan
                .run_in(Side::A, async move { client.get_handoff(&hid).await })?
                .await;
            let plot = args
                .plots
                .join(format!("handoff-{rate}mbit-{churn}mibs.svg"));
            match record {
                Ok(Ok(rec)) => {
                    std::fs::create_dir_all(&args.plots)?;
                    std::fs::write(&plot, cloudlet_plot::handoff(&rec))?;
                    eprintln!("  plot: {}", plot.display());
                }
                Ok(Err(e)) => eprintln!("  no plot: {e}"),
                Err(e) => eprintln!("  no plot: {e}"),
            }
            eprintln!(
                "  done: total {:.1} s, downtime {:.3} s, wire {:.1} MB",
                r.total_ms as f64 / 1e3,
                (r.destination_resume_us - r.source_stop_us) as f64 / 1e6,
                r.wire_bytes as f64 / 1e6
            );
            let marks = downtime_marks(r.source_stop_us);
            if !marks.is_empty() {
                eprintln!("  downtime, ms after the source's STOP (src: source daemon, dst: destination):");
                for (what, ms) in marks {
                    eprintln!("    {ms:8.1}  {what}");
                }
            }
        }
        Err(e) => eprintln!("  FAILED: {e}"),
    }
    let mut needed = None;
    if let (Ok(r), Some(b)) = (&result, &s.b) {
        let ram = b.vm_dir.join(&r.vm.id).join("ram");
        let base = cloudlet_base::BaseStore::new(args.home.clone())
            .get_by_id(&r.vm.base_id)
            .map(|b| b.memory_path());
        if let Ok(base) = base {
            match tokio::task::spawn_blocking(move || needed_memory(&ram, &base)).await? {
                Ok(n) => {
                    eprintln!(
                        "  information needed: {:.1} MB of unique changed pages, {:.1} MB after zstd -19",
                        n.0 as f64 / 1e6,
                        n.1 as f64 / 1e6
                    );
                    needed = Some(n);
                }
                Err(e) => eprintln!("  information needed: not measured: {e:#}"),
            }
        }
    }
    Ok(OurRun {
        rate,
        churn,
        result,
        link_bytes,
        needed,
    })
}

/// The source's handoff progress events, one line on stderr at each stage
/// and at most every 5 s within one, until the handoff's last event.
async fn follow_progress(client: Client) {
    use cloudlet_api::events::{CloudletEvent, Operation};
    let Ok(mut events) = client.events().await else {
        eprintln!("  (no progress: GET /v1/events failed)");
        return;
    };
    let (mut stage, mut told) = (String::new(), Instant::now());
    while let Some(Ok(ev)) = events.next().await {
        let CloudletEvent::Progress(p) = ev else {
            continue;
        };
        if p.operation != Operation::HandoffOut {
            continue;
        }
        if p.stage != stage || told.elapsed() >= Duration::from_secs(5) || p.done {
            let c = &p.progress;
            eprintln!(
                "  {:>6.1} s  {:<11} sent {:>7.1} MB  link {:>6.1} Mbit/s  dirty {:>6.1} Mbit/s  memory left {:>7.1} MB  pass {}",
                p.elapsed_ms as f64 / 1e3,
                p.stage,
                c.bytes_fetched as f64 / 1e6,
                c.rate_bps as f64 / 1e6,
                c.dirty_rate_bps as f64 * 8.0 / 1e6,
                c.remaining_bytes as f64 / 1e6,
                c.iteration
            );
            stage = p.stage.clone();
            told = Instant::now();
        }
        if p.done {
            return;
        }
    }
}

enum QemuOutcome {
    Done {
        total: Duration,
        downtime_us: i64,
        qemu_downtime_ms: u64,
        transferred: u64,
        link_bytes: u64,
    },
    DidNotConverge {
        after: Duration,
        transferred: u64,
        link_bytes: u64,
    },
    Failed(String),
}

struct QemuRun {
    mode: String,
    churn: u32,
    outcome: QemuOutcome,
}

/// QEMU's own migration of the daemon-synthesized VM: the source daemon is
/// stopped (its QEMU keeps running) so that we drive QMP; the destination
/// QEMU runs in B with the same arguments and an identical copy of the disk.
async fn run_qemu(args: &Args, bin: &Path, mode: &str, churn: u32) -> anyhow::Result<QemuRun> {
    eprintln!(
        "qemu {mode}: {} Mbit/s, churn {churn} MiB/s",
        args.qemu_rate
    );
    let mut s = setup(args, bin, args.qemu_rate, churn, false).await?;
    s.a.kill_daemon();
    let src_dir = s.a.vm_dir.join(&s.vm_id);
    let needle = src_dir.display().to_string();
    let pids = cloudlet_testkit::pids_with(&needle);
    let Some(&src_pid) = pids.first() else {
        bail!("no source QEMU found");
    };
    let argv: Vec<String> = std::fs::read(format!("/proc/{src_pid}/cmdline"))?
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    // cloudletd keeps a VM's sockets in `VM_DIR/ID/run`.
    let src_qmp = QmpClient::connect(&src_dir.join("run").join("qmp.sock")).await?;

    // The destination: the same machine, its own files, waiting on the WAN.
    let dst_dir = args.workdir.join("hbq");
    let _ = std::fs::remove_dir_all(&dst_dir);
    std::fs::create_dir_all(dst_dir.join("run"))?;
    // An early-started VM reached its disk through the daemon's NBD server
    // until it was complete, then switched to the file (node `disk0-file`);
    // its arguments still name the server.
    let switched_disk = match argv.iter().any(|a| a.contains("file.driver=nbd")) {
        false => None,
        true => {
            let file = src_qmp
                .find_block_node(cloudlet_qemu::spec::DISK_FILE_NODE)
                .await?
                .map(|n| n.file);
            Some(file.context("the source's disk is still on the daemon's NBD server")?)
        }
    };
    let mut dst_args: Vec<String> = Vec::new();
    let mut src_disk = None;
    for a in &argv[1..] {
        let mut a = a.replace(&needle, &dst_dir.display().to_string());
        if let (Some(i), Some(path)) = (a.find("file.driver=nbd"), &switched_disk) {
            let dst = dst_dir.join("disk.copy");
            a = format!(
                "{}file.driver=file,file.filename={}",
                &a[..i],
                dst.display()
            );
            src_disk = Some((PathBuf::from(path), dst));
            dst_args.push(a);
            continue;
        }
        // The disk lives in the daemon's home: copy it next to the RAM.
        if let Some(i) = a.find("file.filename=") {
            let path = a[i + "file.filename=".len()..]
                .split(',')
                .next()
                .unwrap_or_default()
                .to_string();
            let dst = dst_dir.join("disk.copy");
            a = a.replace(&path, &dst.display().to_string());
            src_disk = Some((PathBuf::from(path), dst));
        }
        dst_args.push(a);
    }
    let Some((src_disk, dst_disk)) = src_disk else {
        bail!("no disk in the source QEMU's arguments");
    };
    let ram_len = std::fs::metadata(src_dir.join("ram"))
        .or_else(|_| {
            // The RAM file's name: find it in the arguments.
            argv.iter()
                .find_map(|a| a.split("mem-path=").nth(1))
                .map(|p| p.split(',').next().unwrap_or_default().to_string())
                .map(std::fs::metadata)
                .unwrap_or_else(|| Err(std::io::Error::other("no mem-path")))
        })?
        .len();
    let dst_ram = dst_args
        .iter()
        .find_map(|a| a.split("mem-path=").nth(1))
        .map(|p| PathBuf::from(p.split(',').next().unwrap_or_default()))
        .context("no mem-path")?;
    std::fs::File::create(&dst_ram)?.set_len(ram_len)?;
    {
        let (s, d) = (src_disk.clone(), dst_disk.clone());
        tokio::task::spawn_blocking(move || cloudlet_qemu::files::copy_sparse(&s, &d)).await??;
    }
    // No `-S`: the destination runs as soon as the migration completes.
    dst_args.retain(|a| a != "-S");
    if let Some(i) = dst_args.iter().position(|a| a == "-incoming") {
        dst_args.drain(i..i + 2);
    }
    dst_args.extend(["-incoming".to_string(), "defer".to_string()]);
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&dst_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dst_dir.join("stderr.log"))?);
    let mut dst_child = s.wan.spawn_in(Side::B, cmd)?;
    let dst_qmp_path = dst_dir.join("run").join("qmp.sock");
    let mut dst_qmp = None;
    for _ in 0..300 {
        if let Ok(q) = QmpClient::connect(&dst_qmp_path).await {
            dst_qmp = Some(q);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let Some(dst_qmp) = dst_qmp else {
        let _ = dst_child.kill();
        bail!(
            "destination QEMU did not start: {}",
            std::fs::read_to_string(dst_dir.join("stderr.log")).unwrap_or_default()
        );
    };

    let outcome = qemu_migrate(args, &s, &src_qmp, &dst_qmp, mode)
        .await
        .map_err(|e| {
            let log = std::fs::read_to_string(dst_dir.join("stderr.log")).unwrap_or_default();
            e.context(format!("destination QEMU said: {}", log.trim()))
        });
    let _ = dst_child.kill();
    let _ = dst_child.wait();
    cloudlet_testkit::kill_processes_with(&needle);
    let _ = std::fs::remove_dir_all(&dst_dir);
    drop(s);
    let outcome = outcome.unwrap_or_else(|e| QemuOutcome::Failed(format!("{e:#}")));
    match &outcome {
        QemuOutcome::Done {
            total, downtime_us, ..
        } => eprintln!(
            "  done: total {:.1} s, downtime {:.3} s",
            total.as_secs_f64(),
            *downtime_us as f64 / 1e6
        ),
        QemuOutcome::DidNotConverge { after, .. } => {
            eprintln!("  did not converge in {after:?}")
        }
        QemuOutcome::Failed(e) => eprintln!("  FAILED: {e}"),
    }
    Ok(QemuRun {
        mode: mode.into(),
        churn,
        outcome,
    })
}

async fn qemu_migrate(
    args: &Args,
    s: &Setup,
    src: &QmpClient,
    dst: &QmpClient,
    mode: &str,
) -> anyhow::Result<QemuOutcome> {
    // The daemon restored the source with x-ignore-shared (RAM in a shared
    // file is not sent): here all of it must cross.
    let mut caps: Vec<(&str, bool)> = vec![("x-ignore-shared", false)];
    match mode {
        "default" => {}
        "xbzrle" => caps.push(("xbzrle", true)),
        "multifd-zstd" => caps.push(("multifd", true)),
        other => bail!("unknown QEMU mode {other}"),
    };
    for q in [src, dst] {
        q.set_migration_capabilities(&caps).await?;
        if mode == "multifd-zstd" {
            q.set_migration_parameters(&cloudlet_qemu::MigrationParameters {
                multifd_channels: Some(4),
                multifd_compression: Some(cloudlet_qemu::MultifdCompression::Zstd),
                ..Default::default()
            })
            .await?;
        }
    }
    let mut src_events = src.events();
    let mut dst_events = dst.events();
    dst.migrate_incoming(&format!("tcp:{}:{QEMU_MIGRATE_PORT}", s.wan.b_addr()))
        .await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = s.wan.stats().a_to_b.bytes;
    let start = Instant::now();
    src.migrate(&format!("tcp:{}:{QEMU_MIGRATE_PORT}", s.wan.b_addr()))
        .await?;
    let cap = Duration::from_secs(args.qemu_cap_s);
    let mut last_print = Instant::now();
    let final_v = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let v = src.query_migrate().await?;
        let status = v.status;
        let ram = v.ram_or_default();
        if last_print.elapsed() > Duration::from_secs(10) {
            last_print = Instant::now();
            eprintln!(
                "  {:>5.1} s: {status}, transferred {:.1} MB, remaining {:.1} MB, pass {}",
                start.elapsed().as_secs_f64(),
                ram.transferred as f64 / 1e6,
                ram.remaining as f64 / 1e6,
                ram.dirty_sync_count
            );
        }
        match status {
            cloudlet_qemu::MigrationStatus::Completed => break v,
            cloudlet_qemu::MigrationStatus::Failed | cloudlet_qemu::MigrationStatus::Cancelled => {
                bail!(
                    "migration {status}: {}",
                    v.error_desc.as_deref().unwrap_or("")
                )
            }
            _ => {}
        }
        if start.elapsed() > cap {
            let transferred = ram.transferred;
            let _ = src.cancel_migration().await;
            return Ok(QemuOutcome::DidNotConverge {
                after: start.elapsed(),
                transferred,
                link_bytes: s.wan.stats().a_to_b.bytes - before,
            });
        }
    };
    // The destination resumes by itself when the stream is loaded.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut resume_us = 0;
    while resume_us == 0 && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(200), dst_events.recv()).await {
            Ok(Ok(ev)) if ev.event == "RESUME" => resume_us = ev.timestamp.as_micros(),
            Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => break,
            _ => {}
        }
    }
    let total = start.elapsed();
    let mut stop_us = 0;
    while let Ok(ev) = src_events.try_recv() {
        if ev.event == "STOP" && stop_us == 0 {
            stop_us = ev.timestamp.as_micros();
        }
    }
    if resume_us == 0 || stop_us == 0 {
        bail!("no STOP ({stop_us}) or RESUME ({resume_us}) event");
    }
    let transferred = final_v.ram_or_default().transferred;
    let qemu_downtime_ms = final_v.downtime.unwrap_or(0);
    // Total: from `migrate` to the destination's RESUME.
    let resume_wall = std::time::SystemTime::UNIX_EPOCH + Duration::from_micros(resume_us as u64);
    let now_wall = std::time::SystemTime::now();
    let total = total.saturating_sub(now_wall.duration_since(resume_wall).unwrap_or_default());
    Ok(QemuOutcome::Done {
        total,
        downtime_us: resume_us - stop_us,
        qemu_downtime_ms,
        transferred,
        link_bytes: s.wan.stats().a_to_b.bytes - before,
    })
}

fn mb(b: u64) -> String {
    format!("{:.1} MB", b as f64 / 1e6)
}

fn workload_name(churn: u32, args: &Args) -> String {
    let kind = if Some(&churn) == args.workloads.first() {
        "moderate"
    } else if Some(&churn) == args.workloads.get(1) {
        "heavy"
    } else {
        "other"
    };
    format!("{kind} ({churn} MiB/s)")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin = match &args.cloudletd {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no parent")?
            .join("cloudletd"),
    };
    if !bin.is_file() {
        bail!(
            "{} missing: cargo build --release -p cloudletd",
            bin.display()
        );
    }
    if !args.overlay.is_file() {
        bail!("{} missing (see the usage)", args.overlay.display());
    }
    let t0 = Instant::now();
    let mut ours = Vec::new();
    let mut qemu = Vec::new();
    for &churn in &args.workloads {
        for &rate in args.rates.iter().filter(|r| **r > 0.0) {
            match run_ours(&args, &bin, rate, churn).await {
                Ok(r) => ours.push(r),
                Err(e) => eprintln!("ours {rate} Mbit/s churn {churn}: setup failed: {e:#}"),
            }
        }
        for mode in args.qemu_modes.iter().filter(|m| !m.is_empty()) {
            match run_qemu(&args, &bin, mode, churn).await {
                Ok(r) => qemu.push(r),
                Err(e) => qemu.push(QemuRun {
                    mode: mode.clone(),
                    churn,
                    outcome: QemuOutcome::Failed(format!("{e:#}")),
                }),
            }
        }
    }

    println!();
    println!(
        "Handoff of a 1 GiB debian VM running kvstore, emulated WAN with {} ms one-way delay (TCG guests, {} s of churn before the move)",
        args.delay_ms, args.warmup_s
    );
    println!(
        "{:<20} {:<22} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10}  phases",
        "workload", "method", "link", "total", "downtime", "QEMU says", "wire", "link bytes"
    );
    for r in &ours {
        let w = workload_name(r.churn, &args);
        match &r.result {
            Ok(rep) => println!(
                "{:<20} {:<22} {:>4} Mbit {:>8.1} s {:>8.3} s {:>10} {:>10} {:>10}  {}",
                w,
                "cloudlet handoff",
                r.rate,
                rep.total_ms as f64 / 1e3,
                (rep.destination_resume_us - rep.source_stop_us) as f64 / 1e6,
                "-",
                mb(rep.wire_bytes),
                mb(r.link_bytes),
                rep.phases
                    .iter()
                    .map(|p| format!("{} {:.1}s", p.stage, p.ms as f64 / 1e3))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Err(e) => println!(
                "{:<20} {:<22} {:>4} Mbit  FAILED: {e:#}",
                w, "cloudlet handoff", r.rate
            ),
        }
    }
    for r in &qemu {
        let w = workload_name(r.churn, &args);
        let m = format!("QEMU {}", r.mode);
        match &r.outcome {
            QemuOutcome::Done {
                total,
                downtime_us,
                qemu_downtime_ms,
                transferred,
                link_bytes,
            } => println!(
                "{:<20} {:<22} {:>4} Mbit {:>8.1} s {:>8.3} s {:>8} ms {:>10} {:>10}  (RAM transferred; disk: identical copies on both sides)",
                w,
                m,
                args.qemu_rate,
                total.as_secs_f64(),
                *downtime_us as f64 / 1e6,
                qemu_downtime_ms,
                mb(*transferred),
                mb(*link_bytes)
            ),
            QemuOutcome::DidNotConverge {
                after,
                transferred,
                link_bytes,
            } => println!(
                "{:<20} {:<22} {:>4} Mbit  did not converge (cancelled at {:.0} s) {:>10} {:>10}",
                w,
                m,
                args.qemu_rate,
                after.as_secs_f64(),
                mb(*transferred),
                mb(*link_bytes)
            ),
            QemuOutcome::Failed(e) => println!(
                "{:<20} {:<22} {:>4} Mbit  FAILED: {e}",
                w, m, args.qemu_rate
            ),
        }
    }

    println!();
    println!("Distance from the physical limit (memory: wire bytes / unique changed pages of the final memory after zstd -19; the disk adds its few MB to both):");
    for r in &ours {
        if let (Ok(rep), Some((unique, best))) = (&r.result, r.needed) {
            println!(
                "  {:<20} {:>4} Mbit: wire {}, needed {} ({} unique) -> {:.2}x",
                workload_name(r.churn, &args),
                r.rate,
                mb(rep.wire_bytes),
                mb(best),
                mb(unique),
                rep.wire_bytes as f64 / best.max(1) as f64
            );
        }
    }

    println!();
    println!("Targets at {} Mbit/s:", args.qemu_rate);
    for &churn in &args.workloads {
        let w = workload_name(churn, &args);
        let our = ours
            .iter()
            .find(|r| r.churn == churn && r.rate == args.qemu_rate)
            .and_then(|r| r.result.as_ref().ok());
        let Some(our) = our else {
            println!("  {w}: our handoff did not complete: heavy/moderate target missed");
            continue;
        };
        let ours_s = our.total_ms as f64 / 1e3;
        let qemu_time = |mode: &str| {
            qemu.iter()
                .find(|q| q.churn == churn && q.mode == mode)
                .and_then(|q| match &q.outcome {
                    QemuOutcome::Done { total, .. } => Some(Some(total.as_secs_f64())),
                    QemuOutcome::DidNotConverge { .. } => Some(None),
                    // A failed reference run shows nothing either way.
                    QemuOutcome::Failed(_) => None,
                })
        };
        let describe = |t: Option<Option<f64>>, target: f64| {
            match t {
            None => "not run or failed: nothing shown".to_string(),
            Some(None) => format!(
                "QEMU did not converge (>= {} s): ours {:.1} s, ratio >= {:.1}x (target {target}x) {}",
                args.qemu_cap_s,
                ours_s,
                args.qemu_cap_s as f64 / ours_s,
                if args.qemu_cap_s as f64 / ours_s >= target { "MET" } else { "not shown" }
            ),
            Some(Some(q)) => format!(
                "{q:.1} s vs ours {ours_s:.1} s = {:.1}x (target {target}x) {}",
                q / ours_s,
                if q / ours_s >= target { "MET" } else { "MISSED" }
            ),
        }
        };
        println!(
            "  {w}: vs QEMU default: {}",
            describe(qemu_time("default"), 10.0)
        );
        let best = ["xbzrle", "multifd-zstd"]
            .iter()
            .filter_map(|m| qemu_time(m).map(|t| (m, t)))
            .min_by(|a, b| {
                let k = |t: &Option<f64>| t.unwrap_or(f64::INFINITY);
                k(&a.1).total_cmp(&k(&b.1))
            });
        match best {
            Some((m, t)) => println!(
                "  {w}: vs QEMU's best option ({m}): {}",
                describe(Some(t), 3.0)
            ),
            None => println!("  {w}: vs QEMU's best option: not run"),
        }
        let down = (our.destination_resume_us - our.source_stop_us) as f64 / 1e6;
        if Some(&churn) == args.workloads.first() {
            println!(
                "  {w}: real downtime {down:.3} s (target < 0.5 s) {}",
                if down < 0.5 { "MET" } else { "MISSED" }
            );
        } else {
            println!("  {w}: converged (target: converges) MET; real downtime {down:.3} s");
        }
    }
    eprintln!("bench finished in {:.0} s", t0.elapsed().as_secs_f64());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// What `tracing_subscriber::fmt().json()` writes, collected.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn reads_the_marks_of_a_json_log() {
        let lines = Lines::default();
        let sink = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_writer(move || sink.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            // As cloudletd's handoff logs them.
            let vm_id = "0a1b2c3d4e5f";
            tracing::info!(vm_id = %vm_id, at_us = 1_700_000_000_123_456i64, what = "src_stop", "downtime mark");
            tracing::info!(vm_id = %vm_id, at_us = 5i64, "something else");
            tracing::warn!(what = "not a mark", at_us = 7i64, "downtime marks are info");
            tracing::info!(vm_id = %vm_id, at_us = 1_700_000_000_200_000i64, what = "dst_resume_event", "downtime mark");
        });
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        let marks: Vec<_> = text.lines().filter_map(parse_mark).collect();
        assert_eq!(
            marks,
            vec![
                ("src_stop".to_string(), 1_700_000_000_123_456),
                ("dst_resume_event".to_string(), 1_700_000_000_200_000),
            ],
            "{text}"
        );
        // Text lines (an old daemon's log) and garbage are no marks.
        assert_eq!(parse_mark("INFO downtime mark at_us=5 what=x"), None);
        assert_eq!(parse_mark("{"), None);
    }
}
