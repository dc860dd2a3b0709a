//! `cloudlet doctor`: what this machine has for cloudlet, and what to do
//! about what it lacks. Exits non-zero when the job asked about cannot run.

use std::path::{Path, PathBuf};

use clap::Args;
use cloudlet_host::{examine, DoctorConfig, Level, Purpose, DEMO_PORTS};

use crate::Output;

#[derive(Args)]
pub struct DoctorArgs {
    /// Check for the test suite (`make test`) instead of the main job: the
    /// test-only programs are needed too; the demo's ports need not be free.
    #[arg(long)]
    tests: bool,
    /// Where VMs' RAM files live (the daemon's `vm_dir`).
    #[arg(long, default_value_os_t = cloudlet_base::default_vm_dir())]
    vm_dir: PathBuf,
    /// Ports the main job listens on, comma separated (default: make demo's).
    #[arg(long, value_delimiter = ',', default_values_t = DEMO_PORTS.to_vec())]
    ports: Vec<u16>,
    /// Skip the probe boot under KVM (up to 10 s where /dev/kvm opens but
    /// cannot run a guest).
    #[arg(long)]
    no_probe: bool,
}

/// The exit status: 0 when the job can run.
pub async fn run(args: DoctorArgs, home: &Path, output: Output) -> anyhow::Result<i32> {
    let purpose = if args.tests {
        Purpose::Test
    } else {
        Purpose::Run
    };
    let cfg = DoctorConfig {
        purpose,
        home: home.to_path_buf(),
        vm_dir: args.vm_dir,
        ports: args.ports,
        probe_accel: !args.no_probe,
        path: None,
    };
    let report = examine(&cfg).await;
    let job = match purpose {
        Purpose::Run => "the main job (make demo)",
        Purpose::Test => "the tests (make test)",
    };
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let width = report
            .findings
            .iter()
            .map(|f| f.check.len())
            .max()
            .unwrap_or(0);
        for f in &report.findings {
            let tag = match f.level {
                Level::Ok => "ok  ",
                Level::Warn => "warn",
                Level::Fail => "FAIL",
            };
            println!("{tag}  {:width$}  {}", f.check, f.detail);
            if let Some(fix) = &f.fix {
                println!("      {:width$}  -> {fix}", "");
            }
        }
        let failures: Vec<&str> = report.failures().map(|f| f.check.as_str()).collect();
        if failures.is_empty() {
            println!("{job} can run here");
        } else {
            println!(
                "{job} cannot run here: {} problem(s): {}",
                failures.len(),
                failures.join(", ")
            );
        }
    }
    Ok(if report.ready() { 0 } else { 1 })
}
