//! Joining the cloud tier's directory (config `directory`).
//!
//! [`run`] keeps this cloudlet's entry current: it registers at start,
//! heartbeats every `heartbeat_ms` the directory asks for, and at once
//! (within [`POLL`]) when what it tells changes: free resources as VMs
//! come and go, base VMs, the overlays of its VMs. After each heartbeat
//! that lands it reads its peers (`GET /v1/cloudlets/{name}/peers`, with
//! their peer tokens), which a handoff uses after the static `peers`
//! (`Cloudlet::peer_for`, with the state in `core::membership`). While the directory cannot be reached it logs
//! once, keeps serving its VMs and retries every [`POLL`]; [`leave`]
//! deregisters on shutdown.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cloudlet_api::directory::{HeldBase, Registration};
use cloudlet_client::DirectoryClient;

use crate::core::cloudlet::{holds_resources, Cloudlet};
use crate::core::membership::LearnedPeer;
use crate::core::store::VmRecord;

/// How often what the cloudlet would tell is compared with what it told.
pub const POLL: Duration = Duration::from_millis(500);

/// The credential this cloudlet registers with: the configured one, else
/// one made at the first start and kept in `home/directory-credential`
/// (the directory binds the name to the first credential it sees, so it
/// must survive restarts).
pub fn credential(c: &Cloudlet) -> std::io::Result<String> {
    if let Some(t) = &c.config.directory_token {
        return Ok(t.clone());
    }
    let path = c.config.home.join("directory-credential");
    match cloudlet_trust::secrets::read_own(&path) {
        Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
        _ => {
            let t = hex::encode(rand::random::<[u8; 24]>());
            cloudlet_trust::secrets::write_private(&path, &t)?;
            Ok(t)
        }
    }
}

/// What this cloudlet tells the directory now.
pub fn registration(c: &Cloudlet, api_url: &str) -> Registration {
    let cfg = &c.config;
    let base_vms = c
        .bases
        .list()
        .map(|l| {
            l.iter()
                .map(|m| HeldBase {
                    name: m.name.clone(),
                    id: m.id.clone(),
                })
                .collect()
        })
        .unwrap_or_default();
    let mut overlays: Vec<String> = c
        .registry()
        .values()
        .filter(|e| holds_resources(e.record.state))
        .map(|e| overlay_of(&e.record))
        .filter(|o| !o.is_empty())
        .collect();
    overlays.sort();
    overlays.dedup();
    Registration {
        format: cloudlet_api::directory::REGISTRATION_FORMAT,
        name: cfg.name.clone(),
        api_url: api_url.to_string(),
        public_host: cfg.public_host.clone(),
        location: cfg.location.clone(),
        networks: cfg.networks.clone(),
        base_vms,
        obtainable_bases: cfg.obtainable_bases.clone(),
        overlays_cached: overlays,
        flavors: cfg.flavors.clone(),
        capacity: cfg.capacity,
        free: c.free(),
        load: crate::core::cloudlet::host_load().map_or(0.0, |l| {
            (l.load1 / f64::from(l.cpus) * 100.0).round() / 100.0
        }),
        accel: c.accel.clone(),
        release: env!("CARGO_PKG_VERSION").into(),
        handoff_protocol: c.handoff_protocol(),
        accepting: !c.draining(),
        peer_token: cfg.tokens.first().cloned(),
        recent_moves: c
            .handoffs
            .list(cloudlet_api::directory::RECENT_MOVES)
            .into_iter()
            .map(|h| cloudlet_api::directory::FleetMove {
                vm_id: h.vm_id,
                vm_name: h.name,
                to: h.destination,
                started_unix_ms: h.started_unix_ms,
                moved: h.outcome == cloudlet_api::events::HandoffOutcome::Moved,
                downtime_ms: h.downtime_ms,
            })
            .collect(),
    }
}

/// The overlay a VM came from, as devices name it (its URL; an uploaded
/// one has none worth telling).
fn overlay_of(r: &VmRecord) -> String {
    if r.overlay.starts_with("http://") || r.overlay.starts_with("https://") {
        r.overlay.clone()
    } else {
        String::new()
    }
}

/// Heartbeats that matter: load moves all the time and goes with the
/// periodic heartbeat only.
fn same_but_load(a: &Registration, b: &Registration) -> bool {
    let mut b = b.clone();
    b.load = a.load;
    *a == b
}

/// Keep this cloudlet's entry current, forever (spawned by `serve` when
/// a directory is configured; `api_url` as devices and peers reach it).
pub async fn run(c: Arc<Cloudlet>, api_url: String) {
    let token = match credential(&c) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!("directory: cannot keep a credential in the home: {e}: not joining");
            return;
        }
    };
    let client = DirectoryClient::new(&c.config.directory, Some(token));
    let mut told: Option<Registration> = None;
    let mut next = Instant::now();
    let mut failing = false;
    loop {
        let reg = {
            let c = c.clone();
            let url = api_url.clone();
            tokio::task::spawn_blocking(move || registration(&c, &url))
                .await
                .ok()
        };
        let Some(reg) = reg else {
            tokio::time::sleep(POLL).await;
            continue;
        };
        let changed = told.as_ref().is_none_or(|t| !same_but_load(t, &reg));
        if changed || Instant::now() >= next {
            match client.heartbeat(&reg).await {
                Ok(lease) => {
                    let heartbeat = Duration::from_millis(lease.heartbeat_ms.max(100));
                    next = Instant::now() + heartbeat;
                    c.directory
                        .landed(Duration::from_millis(lease.lease_ms), heartbeat);
                    if failing || lease.created {
                        tracing::info!(
                            directory = ?client.urls(),
                            lease_ms = lease.lease_ms,
                            heartbeat_ms = lease.heartbeat_ms,
                            "registered in the directory"
                        );
                    }
                    failing = false;
                    told = Some(reg);
                    learn_peers(&c, &client).await;
                }
                Err(e) => {
                    let msg = e.to_string();
                    if !failing {
                        tracing::warn!(
                            "directory: heartbeat failed ({msg}); serving on, retrying every {POLL:?}"
                        );
                    }
                    failing = true;
                    c.directory.failed(msg);
                    // Refused (e.g. a name taken): not every 0.5 s.
                    if e.status().is_some_and(|s| s < 500) {
                        next = Instant::now() + Duration::from_secs(5);
                        told = Some(reg);
                    }
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn learn_peers(c: &Cloudlet, client: &DirectoryClient) {
    match client.peers(&c.config.name).await {
        Ok(list) => c.directory.set_peers(
            list.peers
                .into_iter()
                .map(|r| LearnedPeer {
                    name: r.name,
                    api_url: r.api_url.trim_end_matches('/').to_string(),
                    token: r.peer_token,
                })
                .collect(),
        ),
        Err(e) => tracing::debug!("directory: peers: {e}"),
    }
}

/// Deregister (on shutdown), waiting at most `within`.
pub async fn leave(c: &Cloudlet, within: Duration) {
    if c.config.directory.is_empty() {
        return;
    }
    let Ok(token) = credential(c) else { return };
    let client = DirectoryClient::new(&c.config.directory, Some(token));
    match tokio::time::timeout(within, client.deregister(&c.config.name)).await {
        Ok(Ok(())) => tracing::info!("deregistered from the directory"),
        Ok(Err(e)) => tracing::warn!("directory: deregistering failed: {e}"),
        Err(_) => tracing::warn!("directory: deregistering took over {within:?}: gave up"),
    }
}
