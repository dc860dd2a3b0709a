//! `cloudlet registry ...`: the overlay registry of the cloud tier.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Subcommand;
use cloudlet_registry::{RegistryConfig, StorageLocation};

use cloudlet_trust::secrets::{credential_from, read_credential};

use crate::Output;

/// The environment variable that may hold the registry's push token.
const REGISTRY_TOKEN: &str = "CLOUDLET_REGISTRY_TOKEN";

#[derive(Subcommand)]
pub enum RegistryCommand {
    /// Serve overlays from a directory (or `s3://bucket/prefix`) over HTTP.
    Serve {
        storage: String,
        #[arg(long, default_value = "127.0.0.1:7460")]
        listen: SocketAddr,
        /// A file (mode 0600) holding a token that allows pushing
        /// (repeatable; or $CLOUDLET_REGISTRY_TOKEN).
        #[arg(long = "push-token-file")]
        token_files: Vec<PathBuf>,
        /// A public key file (`.pub` of `cloudlet overlay keygen`) whose
        /// signatures pushes may carry (repeatable); given any, an overlay
        /// signed by another key is refused.
        #[arg(long = "trusted-key")]
        trusted_keys: Vec<PathBuf>,
        /// Refuse unsigned pushes (needs --trusted-key).
        #[arg(long, requires = "trusted_keys")]
        require_signed: bool,
        #[command(flatten)]
        tls: super::pki::TlsArgs,
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
        /// A file (mode 0600) holding a token the registry accepts for
        /// pushes (default: $CLOUDLET_REGISTRY_TOKEN).
        #[arg(long = "registry-token-file")]
        token_file: Option<PathBuf>,
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
            token_files,
            trusted_keys,
            require_signed,
            tls,
        } => {
            let storage: StorageLocation = storage.parse()?;
            let mut config = RegistryConfig::new(listen, storage);
            for f in &token_files {
                config.push_tokens.push(read_credential(f)?);
            }
            if token_files.is_empty() {
                config
                    .push_tokens
                    .extend(credential_from(None, REGISTRY_TOKEN)?);
            }
            config.signatures.required = require_signed;
            config.tls = tls.config();
            config.plain_http = tls.plain_http;
            for f in &trusted_keys {
                let line = std::fs::read_to_string(f)
                    .map_err(|e| anyhow::anyhow!("Cannot read {}: {e}", f.display()))?;
                let key = line
                    .trim()
                    .parse()
                    .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
                config.signatures.trusted.push(key);
            }
            cloudlet_registry::serve(config).await?;
        }
        RegistryCommand::Push {
            file,
            registry,
            name,
            token_file,
        } => {
            let token = credential_from(token_file.as_deref(), REGISTRY_TOKEN)?.ok_or_else(|| {
                anyhow::anyhow!(
                    "a push needs the registry's token: --registry-token-file FILE (or ${REGISTRY_TOKEN})"
                )
            })?;
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
