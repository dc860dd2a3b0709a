//! `cloudletd`: the daemon of one cloudlet (thin: see the library).
//!
//! Logs go to stdout: `CLOUDLET_LOG` filters them (`tracing` directives,
//! default `info`), `--log-format`/`CLOUDLET_LOG_FORMAT` picks their form:
//! `text` for a person, `json` for a program (one JSON object a line, the
//! event's fields under `fields`, its message as `fields.message`, e.g.
//! the handoff's `downtime mark` lines that `handoff-bench` reads).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use cloudletd::{Cloudlet, CloudletConfig};

#[derive(Parser)]
#[command(
    name = "cloudletd",
    version,
    about = "The cloudlet daemon: REST API for base VMs, synthesis and handoff"
)]
struct Args {
    /// TOML config file; without one, the embedded defaults apply.
    #[arg(long, env = "CLOUDLETD_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address (overrides the config).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// State directory (overrides the config; the config's default is
    /// $CLOUDLET_HOME, else /var/lib/cloudlet as root).
    #[arg(long)]
    home: Option<PathBuf>,
    /// The host name or address clients reach this cloudlet's VMs (and,
    /// with a wildcard listen address, its API) at (overrides the config).
    #[arg(long)]
    public_host: Option<String>,
    /// Where VM RAM files go (overrides the config).
    #[arg(long)]
    vm_dir: Option<PathBuf>,
    /// Cloudlet name (overrides the config).
    #[arg(long)]
    name: Option<String>,
    /// A file whose first line is a bearer token for changes (added to the
    /// config's; the file must be mode 0600). Or `$CLOUDLET_TOKEN`. Never
    /// the token itself: a command line is visible to every user (`ps`).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Where this cloudlet stands, `LAT,LON[,LABEL]` (overrides the
    /// config; the directory ranks by it).
    #[arg(long, value_parser = parse_location, allow_hyphen_values = true)]
    location: Option<cloudlet_api::Location>,
    /// Join this directory: its instances' URLs, comma-separated (added to
    /// the config's `directory`).
    #[arg(long, env = "CLOUDLET_DIRECTORY", value_delimiter = ',')]
    directory: Vec<String>,
    /// Form of the log lines (stdout): text, or JSON (one object a line,
    /// for programs that read the log).
    #[arg(long, env = "CLOUDLET_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Print the OpenAPI document and exit.
    #[arg(long)]
    openapi: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.openapi {
        println!("{}", cloudletd::api::openapi_json());
        return Ok(());
    }
    let filter = tracing_subscriber::EnvFilter::try_from_env("CLOUDLET_LOG")
        .unwrap_or_else(|_| "info".into());
    match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
    }
    let mut config = match &args.config {
        Some(p) => CloudletConfig::load(p)?,
        None => CloudletConfig::default(),
    };
    if let Some(l) = args.listen {
        config.listen = l;
    }
    if let Some(h) = args.home {
        config.home = h;
    }
    if let Some(h) = args.public_host {
        config.public_host = h;
    }
    if let Some(d) = args.vm_dir {
        config.vm_dir = d;
    }
    if let Some(n) = args.name {
        config.name = n;
    }
    config.directory.extend(args.directory);
    if let Some(l) = args.location {
        config.location = l;
    }
    if let Some(t) =
        cloudlet_trust::secrets::credential_from(args.token_file.as_deref(), "CLOUDLET_TOKEN")?
    {
        config.tokens.push(t);
    }
    if config.tokens.is_empty() {
        let path = config.home.join("token");
        let token = match cloudlet_trust::secrets::read_own(&path) {
            Ok(t) => t.trim().to_string(),
            Err(_) => {
                let t = hex::encode(rand::random::<[u8; 16]>());
                std::fs::create_dir_all(&config.home)?;
                cloudlet_trust::secrets::write_private(&path, &t)
                    .with_context(|| format!("Writing {}", path.display()))?;
                t
            }
        };
        tracing::info!("no token configured: using the one in {}", path.display());
        config.tokens.push(token);
    }
    config
        .check_transport(config.listen)
        .context("Refusing to start")?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("Cannot listen on {}", config.listen))?;
    let cloudlet = Cloudlet::open(config)
        .await
        .context("Opening the cloudlet")?;
    tracing::info!(
        name = %cloudlet.config.name,
        listen = %listener.local_addr()?,
        "cloudletd ready"
    );
    let confine = &cloudlet.config.confine;
    if confine.active()
        && (!cloudletd::config::unprivileged_userfaultfd()
            || cloudlet_qemu::confine::Cgroups::host().is_none())
    {
        tracing::warn!("QEMU confinement {}", confine.describe());
    } else {
        tracing::info!("QEMU confinement {}", confine.describe());
    }
    tokio::select! {
        r = cloudletd::serve(cloudlet.clone(), listener) => r,
        sig = shutdown_signal() => {
            // VMs keep running (their QEMUs are their own processes): the
            // next cloudletd takes them over.
            tracing::info!("{sig}: shutting down, VMs keep running");
            cloudletd::directory::leave(&cloudlet, std::time::Duration::from_secs(2)).await;
            Ok(())
        }
    }
}

fn parse_location(s: &str) -> Result<cloudlet_api::Location, String> {
    let mut parts = s.splitn(3, ',');
    let num = |p: Option<&str>, what: &str| {
        p.and_then(|v| v.trim().parse::<f64>().ok())
            .ok_or_else(|| format!("{s:?}: expected LAT,LON[,LABEL] ({what})"))
    };
    let latitude = num(parts.next(), "latitude")?;
    let longitude = num(parts.next(), "longitude")?;
    if !(-90.0..=90.0).contains(&latitude) || !(-180.0..=180.0).contains(&longitude) {
        return Err(format!("{s:?}: latitude -90..90, longitude -180..180"));
    }
    Ok(cloudlet_api::Location {
        label: parts.next().unwrap_or_default().trim().to_string(),
        latitude,
        longitude,
    })
}

/// SIGTERM or SIGINT, by name.
async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}
