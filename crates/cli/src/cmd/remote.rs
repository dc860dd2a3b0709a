//! Commands that talk to a cloudlet over its REST API: `synthesize`, `vm`,
//! `info`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, Subcommand};
use cloudlet_api::events::{CloudletEvent, Operation};
use cloudlet_api::{CreateVmRequest, VmInfo};
use cloudlet_client::Client;
use cloudlet_trust::secrets::credential_from;

use crate::Output;

/// Where the cloudlet is and how to authenticate.
#[derive(Args, Clone)]
pub struct Target {
    /// The cloudlet's API address.
    #[arg(
        long = "cloudlet",
        global = true,
        env = "CLOUDLET_URL",
        default_value = "http://127.0.0.1:7450"
    )]
    pub url: String,
    /// A file (mode 0600) whose first line is the bearer token (default:
    /// $CLOUDLET_TOKEN, else the local daemon's token file). Never the
    /// token itself: a command line is visible to every user (`ps`).
    #[arg(long, global = true)]
    pub token_file: Option<PathBuf>,
}

impl Target {
    pub fn client(&self, home: &std::path::Path) -> anyhow::Result<Client> {
        Ok(Client::new(&self.url, self.client_token(home)?))
    }

    /// The token: from `--token-file`, else `$CLOUDLET_TOKEN`, else the
    /// local daemon's token file.
    pub fn client_token(&self, home: &std::path::Path) -> anyhow::Result<Option<String>> {
        let given = credential_from(self.token_file.as_deref(), "CLOUDLET_TOKEN")?;
        Ok(given.or_else(|| {
            std::fs::read_to_string(home.join("token"))
                .ok()
                .map(|t| t.trim().to_string())
        }))
    }
}

#[derive(Args)]
pub struct SynthesizeArgs {
    /// `http(s)://` address of the overlay, or a local overlay file to upload.
    pub overlay: String,
    /// VM name (default: generated).
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long)]
    pub flavor: Option<String>,
    /// Find the cloudlet through the directory (instead of `--cloudlet`):
    /// the nearest one that holds the overlay's base and has room.
    #[command(flatten)]
    pub find: super::discover::FindArgs,
}

#[derive(Subcommand)]
pub enum VmCommand {
    /// List VMs on the cloudlet.
    List,
    /// Show one VM.
    Show { id: String },
    /// Stop and delete a VM.
    Delete { id: String },
}

pub async fn synthesize(
    client: &Client,
    args: SynthesizeArgs,
    output: Output,
) -> anyhow::Result<()> {
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| format!("vm-{}", hex::encode(rand::random::<[u8; 3]>())));
    let start = Instant::now();
    let is_url = args.overlay.starts_with("http://") || args.overlay.starts_with("https://");
    let chosen;
    let client = if args.find.directory.is_empty() {
        client
    } else {
        let base = super::discover::overlay_base_id(&args.overlay).await?;
        let d = super::discover::find(
            &args.find,
            Some(base),
            is_url.then(|| args.overlay.clone()),
            args.flavor.clone(),
            5,
        )
        .await?;
        if output == Output::Text {
            print!("{}", d.explain());
        }
        let Some(c) = d.chosen else {
            anyhow::bail!("the directory knows no cloudlet that fits this overlay");
        };
        chosen = client.at(&c.candidate.api_url);
        &chosen
    };
    // Opened before the request, so that its first stage is seen.
    let events = client.events().await.ok();
    let create = {
        let client = client.clone();
        let name = name.clone();
        let overlay = args.overlay.clone();
        let flavor = args.flavor.clone();
        tokio::spawn(async move {
            if is_url {
                client
                    .create_vm(&CreateVmRequest {
                        overlay,
                        name: Some(name),
                        flavor,
                    })
                    .await
            } else {
                client
                    .create_vm_upload(&PathBuf::from(overlay), Some(&name), flavor.as_deref())
                    .await
            }
        })
    };
    let vm = follow(
        events,
        (&name, Operation::Synthesis),
        create,
        output,
        |p, secs| {
            format!(
                "{secs:>6.1}s  {:<10} {:>7.1}/{:.1} MB  segments {}/{}",
                p.stage,
                p.bytes_fetched as f64 / 1e6,
                p.bytes_total as f64 / 1e6,
                p.segments_applied,
                p.segments_total
            )
        },
    )
    .await
    .0?;
    print_vm(&vm, output)?;
    if output == Output::Text {
        println!(
            "synthesized in {:.2} s (request to running app)",
            start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct HandoffArgs {
    /// The VM (id or name).
    pub vm: String,
    /// The destination: its API address, or its name in the directory the
    /// source cloudlet joined (which then gives the token too).
    #[arg(long = "to")]
    pub to: String,
    /// A file (mode 0600) holding the token the destination accepts
    /// (default: $CLOUDLET_DEST_TOKEN, else the source's peer token for it).
    #[arg(long)]
    pub dest_token_file: Option<PathBuf>,
    /// Write the handoff's course as an SVG plot to this file: bytes sent,
    /// the link's rate and the guest's dirty rate over time, the stages
    /// and the switchover marked.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

/// The plot of handoff `hid` (from the source's history) to `path`.
async fn write_plot(
    client: &Client,
    hid: &str,
    path: &std::path::Path,
    output: Output,
) -> anyhow::Result<()> {
    let record = client.get_handoff(hid).await?;
    std::fs::write(path, cloudlet_plot::handoff(&record))
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    if output == Output::Text {
        println!("plot: {}", path.display());
    }
    Ok(())
}

pub async fn handoff(client: &Client, args: HandoffArgs, output: Output) -> anyhow::Result<()> {
    let events = client.events().await.ok();
    let task = {
        let (c, vm, to, tok) = (
            client.clone(),
            args.vm.clone(),
            args.to.clone(),
            credential_from(args.dest_token_file.as_deref(), "CLOUDLET_DEST_TOKEN")?,
        );
        tokio::spawn(async move { c.handoff(&vm, &to, tok.as_deref()).await })
    };
    let line = |p: &cloudlet_api::Progress, secs: f64| {
        format!(
            "{secs:>6.1}s  {:<11} sent {:>8.1} MB  {:>6.1} Mbit/s  dirty {:>6.1} Mbit/s  iteration {}  remaining {:.1} MB",
            p.stage,
            p.bytes_fetched as f64 / 1e6,
            p.rate_bps as f64 / 1e6,
            p.dirty_rate_bps as f64 * 8.0 / 1e6,
            p.iteration,
            p.remaining_bytes as f64 / 1e6,
        )
    };
    let (report, hid) = follow(
        events,
        (&args.vm, Operation::HandoffOut),
        task,
        output,
        line,
    )
    .await;
    // The plot, of a failed handoff too (its id from its events).
    if let Some(path) = &args.plot {
        let hid = match &report {
            Ok(r) if !r.handoff_id.is_empty() => Some(r.handoff_id.clone()),
            _ => hid,
        };
        match hid {
            Some(hid) => write_plot(client, &hid, path, output).await?,
            None => eprintln!("no plot: the cloudlet told no handoff id"),
        }
    }
    let report = report?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Text => {
            let downtime = (report.destination_resume_us - report.source_stop_us) as f64 / 1000.0;
            println!(
                "moved {} to {} in {:.2} s: downtime {:.0} ms, {:.1} MB on the wire for {:.1} MB of state",
                report.vm.name,
                args.to,
                report.total_ms as f64 / 1000.0,
                downtime,
                report.wire_bytes as f64 / 1e6,
                report.raw_bytes as f64 / 1e6
            );
            for p in &report.vm.ports {
                println!("  port {} -> {}", p.guest, p.endpoint);
            }
            println!(
                "  phases: {}",
                report
                    .phases
                    .iter()
                    .map(|t| format!("{} {} ms", t.stage, t.ms))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    Ok(())
}

/// Wait for `task` (a long API call about VM `vm`, its id or name),
/// showing on a terminal line what the cloudlet tells of its `op` on its
/// event stream (`events`, opened before the call). Beside the task's
/// answer: the handoff's id its events carried (a failed one's too).
async fn follow<T>(
    mut events: Option<cloudlet_client::Events>,
    (vm, op): (&str, Operation),
    mut task: tokio::task::JoinHandle<Result<T, cloudlet_client::ClientError>>,
    output: Output,
    line: impl Fn(&cloudlet_api::Progress, f64) -> String,
) -> (anyhow::Result<T>, Option<String>) {
    let show = output == Output::Text && std::io::stderr().is_terminal();
    let (mut last, mut handoff_id) = (String::new(), None);
    let result = loop {
        let next = async {
            match events.as_mut() {
                Some(e) => e.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = &mut task => break r,
            ev = next => match ev {
                Some(Ok(CloudletEvent::Progress(p)))
                    if p.operation == op && (p.vm_id == vm || p.name == vm) =>
                {
                    handoff_id = p.handoff_id.clone().or(handoff_id);
                    let l = line(&p.progress, p.elapsed_ms as f64 / 1000.0);
                    if show && l != last {
                        eprint!("\r{l}");
                        let _ = std::io::stderr().flush();
                        last = l;
                    }
                }
                Some(_) => {}
                // The stream ended: wait for the answer alone.
                None => events = None,
            },
        }
    };
    if !last.is_empty() {
        eprintln!();
    }
    let result = match result {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.into()),
        Err(e) => Err(e.into()),
    };
    (result, handoff_id)
}

pub async fn vm(client: &Client, cmd: VmCommand, output: Output) -> anyhow::Result<()> {
    match cmd {
        VmCommand::List => {
            let vms = client.list_vms().await?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&vms)?),
                Output::Text => {
                    println!(
                        "{:<14} {:<20} {:<13} {:>4}  ENDPOINTS",
                        "ID", "NAME", "STATE", "GEN"
                    );
                    for v in vms {
                        println!(
                            "{:<14} {:<20} {:<13} {:>4}  {}",
                            v.id,
                            v.name,
                            format!("{:?}", v.state).to_lowercase(),
                            v.generation,
                            v.ports
                                .iter()
                                .map(|p| format!("{}->{}", p.endpoint, p.guest))
                                .collect::<Vec<_>>()
                                .join(" ")
                        );
                    }
                }
            }
        }
        VmCommand::Show { id } => print_vm(&client.get_vm(&id).await?, output)?,
        VmCommand::Delete { id } => {
            client.delete_vm(&id).await?;
            if output == Output::Text {
                println!("deleted {id}");
            }
        }
    }
    Ok(())
}

pub async fn info(client: &Client, output: Output) -> anyhow::Result<()> {
    let i = client.info().await?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&i)?),
        Output::Text => {
            println!("cloudlet {} ({}), accel {}", i.name, i.version, i.accel);
            println!(
                "  location  {} ({}, {})",
                i.location.label, i.location.latitude, i.location.longitude
            );
            println!(
                "  free      {}/{} vCPUs, {}/{} MiB, {}/{} VMs",
                i.free.vcpus,
                i.capacity.vcpus,
                i.free.memory_mib,
                i.capacity.memory_mib,
                i.free.vms,
                i.capacity.vms
            );
            for b in &i.base_vms {
                println!(
                    "  base      {:<10} {} ({} MiB)",
                    b.name,
                    &b.id[..16.min(b.id.len())],
                    b.memory_mib
                );
            }
        }
    }
    Ok(())
}

fn print_vm(v: &VmInfo, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(v)?),
        Output::Text => {
            println!(
                "vm {} ({}) {:?}, generation {}",
                v.name, v.id, v.state, v.generation
            );
            for p in &v.ports {
                println!("  port {} -> {}", p.guest, p.endpoint);
            }
            if !v.timings.is_empty() {
                println!(
                    "  stages: {}",
                    v.timings
                        .iter()
                        .map(|t| format!("{} {} ms", t.stage, t.ms))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            if let Some(e) = &v.error {
                println!("  error: {e}");
            }
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct DrainArgs {
    /// End the maintenance instead (new VMs and moves in are taken again).
    #[arg(long)]
    pub cancel: bool,
}

pub async fn drain(client: &Client, args: DrainArgs, output: Output) -> anyhow::Result<()> {
    if args.cancel {
        client.resume().await?;
        if output == Output::Text {
            println!("maintenance ended: taking new VMs and moves in");
        }
        return Ok(());
    }
    let report = client.drain().await?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Text => {
            println!("draining: no new VMs or moves in");
            for v in &report.vms {
                match &v.moved_to {
                    Some(to) => println!(
                        "  {} ({}) -> {to}, downtime {} ms",
                        v.name,
                        v.id,
                        v.downtime_ms.unwrap_or_default()
                    ),
                    None => println!("  {} ({}) stays: no neighbour took it", v.name, v.id),
                }
                for r in &v.refusals {
                    println!("      {r}");
                }
            }
        }
    }
    if !report.drained {
        anyhow::bail!("not every VM moved: they keep running here");
    }
    Ok(())
}
