//! `cloudlet directory ...`: the cloud tier's directory of cloudlets.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Subcommand;
use cloudlet_directory::{DirectoryConfig, Serving};

use crate::Output;

#[derive(Subcommand)]
pub enum DirectoryCommand {
    /// Serve the directory: cloudlets register, devices search.
    Serve {
        /// A TOML file of settings (every one has a default).
        #[arg(long, env = "CLOUDLET_DIRECTORY_CONFIG")]
        config: Option<PathBuf>,
        /// Where the REST API listens (default 127.0.0.1:7470).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// The embedded store's file (default $CLOUDLET_HOME/directory.redb).
        #[arg(long)]
        store: Option<PathBuf>,
        /// Keep the directory in etcd (its members' URLs, comma-separated)
        /// instead of the embedded store: any number of directory
        /// instances on one etcd serve one view.
        #[arg(long, value_delimiter = ',')]
        etcd: Vec<String>,
        /// The prefix of this directory's etcd keys (default /cloudlet/directory).
        #[arg(long)]
        etcd_prefix: Option<String>,
        /// How often cloudlets heartbeat, ms (default 5000).
        #[arg(long)]
        heartbeat_ms: Option<u64>,
        /// How long an entry lives after a heartbeat, ms (default 12000).
        #[arg(long)]
        lease_ms: Option<u64>,
        #[command(flatten)]
        tls: super::pki::TlsArgs,
    },
}

pub async fn run(
    cmd: DirectoryCommand,
    home: &std::path::Path,
    _output: Output,
) -> anyhow::Result<()> {
    match cmd {
        DirectoryCommand::Serve {
            config,
            listen,
            store,
            etcd,
            etcd_prefix,
            heartbeat_ms,
            lease_ms,
            tls,
        } => {
            let mut c = match &config {
                Some(p) => DirectoryConfig::load(p)?,
                None => DirectoryConfig {
                    store: home.join("directory.redb"),
                    ..DirectoryConfig::default()
                },
            };
            if let Some(l) = listen {
                c.listen = l;
            }
            if let Some(s) = store {
                c.store = s;
            }
            if !etcd.is_empty() {
                c.etcd = etcd;
            }
            if let Some(p) = etcd_prefix {
                c.etcd_prefix = p;
            }
            if let Some(h) = heartbeat_ms {
                c.heartbeat_ms = h;
            }
            if let Some(l) = lease_ms {
                c.lease_ms = l;
            }
            if let Some(t) = tls.config() {
                c.tls = Some(t);
            }
            c.plain_http |= tls.plain_http;
            let serving = Serving::bind(c).await?;
            println!("directory listening on http://{}", serving.addr);
            serving
                .run(async {
                    let mut term =
                        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                            .ok();
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
                    }
                })
                .await?;
            Ok(())
        }
    }
}
