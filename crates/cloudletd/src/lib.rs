//! `cloudletd`, the daemon of one cloudlet.
//!
//! - [`config`]: what an operator sets (TOML, embedded defaults);
//! - [`store`]: VM records in an embedded database, written atomically;
//! - [`lifecycle`]: which VM state may follow which (every change goes
//!   through it);
//! - [`cloudlet`]: the domain: VM registry, capacity, synthesis, recovery;
//! - [`synth`]: the synthesis pipeline, overlay -> running VM (full, or
//!   early start: the VM resumes while its memory still arrives);
//! - [`http`]: the REST API and its OpenAPI document;
//! - [`handoff`] and [`throttle`]: live handoff to another cloudlet;
//! - [`metrics`]: Prometheus metrics.

pub mod cloudlet;
pub mod commands;
pub mod config;
pub mod handoff;
pub mod http;
pub mod lifecycle;
pub mod metrics;
pub mod retry;
pub mod store;
pub mod synth;
pub mod throttle;

use std::sync::Arc;

pub use cloudlet::Cloudlet;
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
    let state = Arc::new(http::AppState {
        tokens: cloudlet.config.tokens.clone(),
        spool: cloudlet.config.home.join("spool"),
        http: reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .build()?,
        ops: Daemon::new(cloudlet),
    });
    use axum::serve::ListenerExt;
    // Small answers (a handoff's "loaded", a commit) must not wait for
    // Nagle: they sit inside a VM's downtime.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY on an accepted connection: {e}");
        }
    });
    axum::serve(listener, http::router(state)).await?;
    Ok(())
}
