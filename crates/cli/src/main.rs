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
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        match cli.command {
            Command::Base(c) => cmd::base::run(c, &home, cli.output).await,
        }
    })
}
