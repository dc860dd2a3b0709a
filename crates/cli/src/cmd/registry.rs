//! `cloudlet registry ...`: the overlay registry of the cloud tier.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Subcommand;
use cloudlet_registry::{RegistryConfig, StorageLocation};

use crate::Output;

#[derive(Subcommand)]
pub enum RegistryCommand {
    /// Serve overlays from a directory (or `s3://bucket/prefix`) over HTTP.
    Serve {
        storage: String,
        #[arg(long, default_value = "127.0.0.1:7460")]
        listen: SocketAddr,
        /// Token that allows pushing (repeatable).
        #[arg(long = "push-token", env = "CLOUDLET_REGISTRY_TOKEN")]
        tokens: Vec<String>,
    },
    /// Push an overlay file to a registry.
    Push {
        file: PathBuf,
        #[arg(
            long,
            env = "CLOUDLET_REGISTRY",
            default_value = "http://127.0.0.1:7460"
        )]
        registry: String,
        /// Name in the registry (default: the file name without extension).
        #[arg(long)]
        name: Option<String>,
        #[arg(
            long = "registry-token",
            env = "CLOUDLET_REGISTRY_TOKEN",
            hide_env_values = true
        )]
        token: String,
    },
    /// List the overlays a registry holds.
    List {
        #[arg(
            long,
            env = "CLOUDLET_REGISTRY",
            default_value = "http://127.0.0.1:7460"
        )]
        registry: String,
    },
}

pub async fn run(cmd: RegistryCommand, output: Output) -> anyhow::Result<()> {
    match cmd {
        RegistryCommand::Serve {
            storage,
            listen,
            tokens,
        } => {
            let storage: StorageLocation = storage.parse()?;
            let mut config = RegistryConfig::new(listen, storage);
            config.push_tokens = tokens;
            cloudlet_registry::serve(config).await?;
        }
        RegistryCommand::Push {
            file,
            registry,
            name,
            token,
        } => {
            let name = name.unwrap_or_else(|| {
                file.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "overlay".into())
            });
            let r = cloudlet_registry::push_overlay(&registry, &token, &name, &file).await?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&r)?),
                Output::Text => println!(
                    "pushed {} ({} bytes) -> {}/v1/overlays/{}",
                    r.name,
                    r.size,
                    registry.trim_end_matches('/'),
                    r.name
                ),
            }
        }
        RegistryCommand::List { registry } => {
            let l = cloudlet_registry::list_overlays(&registry).await?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&l)?),
                Output::Text => {
                    for e in l {
                        println!("{:<32} {:>12}", e.name, e.size);
                    }
                }
            }
        }
    }
    Ok(())
}
