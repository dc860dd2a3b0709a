//! `cloudletd`, the daemon of one cloudlet.
//!
//! The flow is one way: [`api`] (REST) -> [`commands`] (the domain's
//! narrow trait, [`CloudletOps`]) -> [`core`], [`synth`], [`handoff`] ->
//! QEMU (`cloudlet_qemu`, the only place that speaks QMP).
//!
//! - [`config`]: what an operator sets (TOML, embedded defaults);
//! - [`core`]: the VM registry and capacity, the lifecycle (every state
//!   change goes through it), the store (records written atomically),
//!   recovery after a restart;
//! - [`commands`]: what the API may ask, carried out;
//! - [`synth`]: the synthesis pipeline, overlay -> running VM (full, or
//!   early start: the VM resumes while its memory still arrives);
//! - [`api`]: the REST API and its OpenAPI document;
//! - [`handoff`] and [`throttle`]: live handoff to another cloudlet;
//! - [`directory`]: joining the cloud tier's directory (register,
//!   heartbeat, peers, deregister); [`drain`]: maintenance, every VM
//!   handed to a neighbour;
//! - [`metrics`]: Prometheus metrics.

pub mod api;
pub mod commands;
pub mod config;
pub mod core;
pub mod directory;
pub mod drain;
pub mod handoff;
pub mod metrics;
pub mod progress;
pub mod retry;
pub mod synth;
pub mod throttle;

use std::sync::Arc;

pub use self::core::cloudlet::Cloudlet;
pub use commands::{CloudletOps, Daemon};
pub use config::CloudletConfig;

/// An error with its causes ("a: b: c", each cause once): the top-level
/// message of many errors (reqwest's, for one) hides what went wrong.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// Run a cloudlet on `listener` until the process ends.
pub async fn serve(
    cloudlet: Arc<Cloudlet>,
    listener: tokio::net::TcpListener,
) -> anyhow::Result<()> {
    // The fleet's trust first: every client made from here on (the
    // directory's, the overlay fetch, the peers') trusts only its CA.
    let tls = match &cloudlet.config.tls {
        Some(t) => {
            handoff::peer::use_fleet_tls(t)?;
            Some(cloudlet_trust::tls::server_config(t)?)
        }
        None => None,
    };
    if !cloudlet.config.directory.is_empty() {
        let url = cloudlet.config.api_url(listener.local_addr()?);
        tokio::spawn(directory::run(cloudlet.clone(), url));
    }
    let state = Arc::new(api::AppState {
        tokens: cloudlet.config.tokens.clone(),
        tenant_tokens: cloudlet
            .config
            .tenants
            .iter()
            .flat_map(|t| t.tokens.iter().map(|k| (t.name.clone(), k.clone())))
            .collect(),
        spool: cloudlet.config.home.join("spool"),
        fleet_only_handoffs: tls.is_some(),
        ops: Daemon::new(cloudlet),
    });
    // (TCP_NODELAY on every connection: small answers, a handoff's
    // "loaded", a commit, sit inside a VM's downtime.)
    let listener = cloudlet_trust::tls::ServeListener::new(listener, tls)?;
    axum::serve(
        listener,
        api::router(state).into_make_service_with_connect_info::<cloudlet_trust::tls::PeerAddr>(),
    )
    .await?;
    Ok(())
}
