//! `cloudlet`: the command line of the cloudlet platform.

mod cmd;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "cloudlet",
    version,
    about = "Edge computing: VM synthesis and handoff"
)]
struct Cli {
    /// Where base VMs and state live (default: $CLOUDLET_HOME, /var/lib/cloudlet as root).
    #[arg(long, global = true, env = "CLOUDLET_HOME")]
    home: Option<std::path::PathBuf>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// The fleet CA's certificate (`ca.pem` of `cloudlet pki init`): the
    /// only one trusted for `https://` cloudlets (or $CLOUDLET_CA).
    #[arg(long, global = true)]
    ca: Option<std::path::PathBuf>,
    #[command(flatten)]
    target: cmd::remote::Target,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Base VMs: build, list, show, export, import, delete.
    #[command(subcommand)]
    Base(cmd::base::BaseCommand),
    /// VM overlays: package an app (create), inspect, verify, apply.
    #[command(subcommand)]
    Overlay(cmd::overlay::OverlayCommand),
    /// Ask a cloudlet to run an app from its overlay (VM synthesis).
    Synthesize(cmd::remote::SynthesizeArgs),
    /// VMs on a cloudlet: list, show, delete.
    #[command(subcommand)]
    Vm(cmd::remote::VmCommand),
    /// What a cloudlet is and what it has free.
    Info,
    /// Move a running VM to another cloudlet, live.
    Handoff(cmd::remote::HandoffArgs),
    /// Maintenance: the cloudlet takes no new work and hands every VM to
    /// its best neighbour (`--cancel` ends the maintenance).
    Drain(cmd::remote::DrainArgs),
    /// The overlay registry of the cloud tier: serve, push, list.
    #[command(subcommand)]
    Registry(cmd::registry::RegistryCommand),
    /// Find the best cloudlet for an app through the directory: its
    /// ranking, then the RTT measured from here.
    Discover(cmd::discover::DiscoverArgs),
    /// Play the device of a follow-me session: the app's VM follows this
    /// device from cloudlet to cloudlet as the RTTs change.
    Follow(cmd::follow::FollowArgs),
    /// The directory of the cloud tier: cloudlets register, devices search.
    #[command(subcommand)]
    Directory(cmd::directory::DirectoryCommand),
    /// The fleet's certificate authority: TLS for every service, mutual
    /// TLS between cloudlets.
    #[command(subcommand)]
    Pki(cmd::pki::PkiCommand),
    /// What this machine has for cloudlet and what it lacks, each with what
    /// to do about it; exits non-zero when the main job cannot run.
    Doctor(cmd::doctor::DoctorArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CLOUDLET_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let home = cli.home.unwrap_or_else(cloudlet_base::default_home);
    if let Some(ca) = &cli.ca {
        // Every client of this run trusts it (and no other CA).
        cloudlet_trust::tls::trust_fleet_ca(ca)?;
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        match cli.command {
            Command::Base(c) => cmd::base::run(c, &home, cli.output).await,
            Command::Overlay(c) => cmd::overlay::run(c, &home, cli.output).await,
            Command::Synthesize(a) => {
                cmd::remote::synthesize(&cli.target.client(&home)?, a, cli.output).await
            }
            Command::Vm(c) => cmd::remote::vm(&cli.target.client(&home)?, c, cli.output).await,
            Command::Info => cmd::remote::info(&cli.target.client(&home)?, cli.output).await,
            Command::Handoff(a) => {
                cmd::remote::handoff(&cli.target.client(&home)?, a, cli.output).await
            }
            Command::Drain(a) => {
                cmd::remote::drain(&cli.target.client(&home)?, a, cli.output).await
            }
            Command::Registry(c) => cmd::registry::run(c, cli.output).await,
            Command::Follow(a) => {
                let token = cli.target.client_token(&home)?;
                cmd::follow::follow(a, token, cli.output).await
            }
            Command::Discover(a) => cmd::discover::discover(a, cli.output).await,
            Command::Directory(c) => cmd::directory::run(c, &home, cli.output).await,
            Command::Pki(c) => cmd::pki::run(c, cli.output),
            Command::Doctor(a) => {
                let code = cmd::doctor::run(a, &home, cli.output).await?;
                std::process::exit(code)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn command_line_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
