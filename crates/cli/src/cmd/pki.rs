//! `cloudlet pki ...`: a fleet's own certificate authority.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use cloudlet_trust::pki;

use crate::Output;

#[derive(Subcommand)]
pub enum PkiCommand {
    /// Make the fleet's CA in DIR: ca.pem (give it to every cloudlet,
    /// registry, directory and client) and ca.key (mode 0600, keep it
    /// where certificates are issued).
    Init {
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        /// The fleet's name (in the CA's subject).
        #[arg(long, default_value = "cloudlet")]
        name: String,
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue NAME.pem and NAME.key (0600) for a service of the fleet,
    /// good as its server certificate and as its client certificate to
    /// peers (mutual TLS in a handoff).
    Issue {
        name: String,
        /// A host name or IP address it is reached at (repeatable;
        /// default: NAME).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// The CA's directory.
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        /// Where the files go (default: the CA's directory).
        #[arg(short = 'o', long = "out")]
        out: Option<PathBuf>,
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

pub fn run(cmd: PkiCommand, output: Output) -> anyhow::Result<()> {
    match cmd {
        PkiCommand::Init { dir, name, days } => {
            let ca = pki::init(&dir, &name, days)?;
            match output {
                Output::Json => println!("{}", serde_json::json!({ "ca": ca })),
                Output::Text => println!(
                    "fleet CA {} (its key {}, keep it private)",
                    ca.display(),
                    dir.join("ca.key").display()
                ),
            }
        }
        PkiCommand::Issue {
            name,
            hosts,
            dir,
            out,
            days,
        } => {
            let out = out.unwrap_or_else(|| dir.clone());
            let issued = pki::issue(&dir, &name, &hosts, &out, days)?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&issued)?),
                Output::Text => println!(
                    "certificate {} and key {} for {}",
                    issued.cert.display(),
                    issued.key.display(),
                    issued.hosts.join(", ")
                ),
            }
        }
    }
    Ok(())
}

/// A service's TLS files (all three, or none: plain HTTP).
#[derive(Args, Clone, Default)]
pub struct TlsArgs {
    /// Serve HTTPS with this certificate (`cloudlet pki issue`).
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// Its private key (mode 0600).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The fleet CA (client certificates are checked against it).
    #[arg(long, requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// Without TLS, serve plain HTTP on an address other than loopback
    /// anyway (refused otherwise: credentials and overlays would cross the
    /// network in the clear).
    #[arg(long, conflicts_with = "tls_cert")]
    pub plain_http: bool,
}

impl TlsArgs {
    pub fn config(&self) -> Option<cloudlet_trust::tls::TlsConfig> {
        Some(cloudlet_trust::tls::TlsConfig {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            ca: self.tls_ca.clone()?,
        })
    }
}
