//! QEMU's own live migration of the same VM over the same link (precopy,
//! xbzrle, multifd + zstd): the reference.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cloudlet_bench::tls::TlsMode;
use cloudlet_qemu::QmpClient;
use cloudlet_wan::Side;

use crate::daemon::{setup, Setup};
use crate::{Args, Bench};

/// Where the destination QEMU listens, on B's address.
const QEMU_MIGRATE_PORT: u16 = 4444;

pub enum QemuOutcome {
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

pub struct QemuRun {
    pub mode: String,
    pub churn: u32,
    pub outcome: QemuOutcome,
}

/// QEMU's own migration of the daemon-synthesized VM: the source daemon is
/// stopped (its QEMU keeps running) so that we drive QMP; the destination
/// QEMU runs in B with the same arguments and an identical copy of the disk.
/// The source's cloudletd serves in TLS mode `tls` (it only synthesizes
/// the VM); QEMU's own stream is plain TCP in every mode.
pub async fn run_qemu(
    bench: &Bench,
    mode: &str,
    churn: u32,
    tls: TlsMode,
) -> anyhow::Result<QemuRun> {
    let args = &bench.args;
    eprintln!(
        "qemu {mode}: {} Mbit/s, churn {churn} MiB/s",
        args.qemu_rate
    );
    let mut s = setup(bench, args.qemu_rate, churn, tls, false).await?;
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
    outcome.tell();
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

impl QemuOutcome {
    /// On stderr, as the run ends.
    fn tell(&self) {
        match self {
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
    }
}
