//! Cold boot vs restore, to the app's first response.
//!
//! For each base (`tiny`, `debian` if built), it prepares a launch state:
//! the base restored, `kvstore` installed on the disk and listed to start at
//! boot, started, then saved. Then, alternately, it measures from the
//! request to start until kvstore answers `GET /health` from the host:
//! - restore: copy the RAM file and disk top, load device state, resume;
//! - cold boot: the same disk, booted from the kernel (the app autostarts).
//!
//! Usage: `cargo run --release -p cloudlet-bench --bin restore-bench [-- --runs 3]`

use std::path::Path;
use std::time::{Duration, Instant};

use clap::Parser;
use cloudlet_agent_proto::AUTOSTART_PATH;
use cloudlet_base::{default_home, BaseStore, BaseVm};
use cloudlet_bench::{first_response, median, secs};
use cloudlet_qemu::files::copy_sparse;
use cloudlet_qemu::{restore_snapshot, save_snapshot, PortForward, RestoreTarget, Vm};
use cloudlet_testkit::{free_port, guest_bin};

#[derive(Parser)]
struct Args {
    /// Measurements of each kind per base.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Bases to measure (those not built are skipped).
    #[arg(long, default_values_t = vec!["tiny".to_string(), "debian".to_string()])]
    bases: Vec<String>,
    /// Where VM files go (a tmpfs such as /dev/shm makes restore faster).
    #[arg(long, default_value = "/dev/shm")]
    workdir: std::path::PathBuf,
}

struct Row {
    base: String,
    memory_mib: u64,
    cold: Vec<Duration>,
    restore: Vec<Duration>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let store = BaseStore::new(default_home());
    let mut rows = Vec::new();
    for name in &args.bases {
        let Ok(base) = store.get(name) else {
            eprintln!("skipping {name}: not built (cloudlet base build {name})");
            continue;
        };
        eprintln!("measuring {name} ...");
        rows.push(measure(&base, &args).await?);
    }
    println!();
    println!("restore vs cold boot, to kvstore's first HTTP answer from the host (median of {} runs, accel {})", args.runs,
        store.list()?.first().map(|m| m.accel.as_str()).unwrap_or("?"));
    println!(
        "{:<8} {:>7} {:>16} {:>16} {:>9}   runs (restore)",
        "base", "memory", "cold boot", "restore", "speedup"
    );
    for r in &rows {
        let (c, s) = (median(r.cold.clone()), median(r.restore.clone()));
        println!(
            "{:<8} {:>5}Mi {:>16} {:>16} {:>8.1}x   {}",
            r.base,
            r.memory_mib,
            secs(c),
            secs(s),
            c.as_secs_f64() / s.as_secs_f64(),
            r.restore
                .iter()
                .map(|d| format!("{:.2}", d.as_secs_f64()))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    println!("targets: debian restore under 1 s and at least 10x faster than its cold boot");
    Ok(())
}

async fn measure(base: &BaseVm, args: &Args) -> anyhow::Result<Row> {
    let dir = tempfile::tempdir_in(&args.workdir)?;
    let snap = dir.path().join("launch");
    prepare_launch_state(base, dir.path(), &snap).await?;
    let mut row = Row {
        base: base.manifest.name.clone(),
        memory_mib: base.manifest.machine.memory_mib,
        cold: vec![],
        restore: vec![],
    };
    for i in 0..args.runs {
        // Restore.
        let port = free_port();
        let t = target(dir.path(), &format!("restore{i}"), port);
        let start = Instant::now();
        let vm = restore_snapshot(&snap, t.clone()).await?;
        row.restore
            .push(first_response(port, "/health", start, Duration::from_secs(60)).await?);
        vm.kill().await;
        let _ = std::fs::remove_dir_all(dir.path().join(format!("restore{i}")));

        // Cold boot of the same disk.
        let port = free_port();
        let t = target(dir.path(), &format!("cold{i}"), port);
        std::fs::create_dir_all(t.run_dir.parent().unwrap_or(dir.path()))?;
        copy_sparse(&snap.join("disk"), &t.disk_path)?;
        let spec = base.spec(
            &t.name,
            &t.ram_path,
            &t.disk_path,
            &t.run_dir,
            t.ports.clone(),
        );
        let start = Instant::now();
        let vm = Vm::boot(spec).await?;
        row.cold
            .push(first_response(port, "/health", start, Duration::from_secs(300)).await?);
        vm.kill().await;
        let _ = std::fs::remove_dir_all(dir.path().join(format!("cold{i}")));
    }
    Ok(row)
}

fn target(dir: &Path, name: &str, port: u16) -> RestoreTarget {
    RestoreTarget {
        name: name.into(),
        ram_path: dir.join(name).join("ram"),
        disk_path: dir.join(name).join("disk.qcow2"),
        run_dir: dir.join(name).join("run"),
        ports: vec![PortForward {
            guest: 8080,
            host: port,
            bind: None,
        }],
    }
}

/// Base + kvstore installed, autostarted at boot, running: saved to `snap`.
async fn prepare_launch_state(base: &BaseVm, dir: &Path, snap: &Path) -> anyhow::Result<()> {
    let t = target(dir, "prep", free_port());
    let vm = base
        .restore(
            "prep",
            &t.ram_path,
            &t.disk_path,
            &t.run_dir,
            t.ports.clone(),
        )
        .await?;
    let mut agent = vm.agent(Duration::from_secs(60)).await?;
    agent
        .put_file(&guest_bin("kvstore"), "/opt/apps/kvstore", 0o755)
        .await?;
    agent
        .put_bytes(b"/opt/apps/kvstore --port 8080\n", AUTOSTART_PATH, 0o644)
        .await?;
    agent.sync(false, false).await?;
    agent
        .spawn(
            &["/opt/apps/kvstore", "--port", "8080"],
            Some("/tmp/kvstore.log"),
        )
        .await?;
    agent
        .wait_port(8080, Some("/health"), Duration::from_secs(30))
        .await?;
    save_snapshot(&vm, snap).await?;
    vm.kill().await;
    Ok(())
}
