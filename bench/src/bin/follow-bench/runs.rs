//! One run of the walk: a VM for kvstore (through a session, or created
//! on the cloud site directly), the device's forwarder to it, the writer
//! and the reference probe in the hub while the links follow the walk's
//! schedule; then the read-back, and the VM deleted.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cloudlet_api::CreateVmRequest;
use cloudlet_client::session::{Consent, Policy, Session, SessionEvent};
use cloudlet_client::{Client, DirectoryClient};
use cloudlet_wan::{Side, Wan};
use tokio::sync::{mpsc, oneshot, watch};

use crate::client::{forward_until, ping_loop, read_back, wait_app, write_loop, Ping, Written};
use crate::topology::{World, APP_PORT, TOKEN};
use crate::walk::{drive, Walk};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A session through the directory, the default policy, consent
    /// automatic.
    Follow,
    /// The same session with consent never: it probes, never moves.
    Stay,
    /// The VM on the far cloud site, no session.
    Cloud,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Follow => "follow",
            Kind::Stay => "stay",
            Kind::Cloud => "cloud",
        }
    }
}

/// What one run measured; times in seconds since its start.
pub struct Run {
    pub kind: Kind,
    pub started_on: String,
    /// From asking for the VM to the app's first answer, s.
    pub ready_s: f64,
    pub written: Written,
    /// Acknowledged keys the VM did not give back, with the status seen.
    pub missing: Vec<(u64, Option<u16>)>,
    pub pings: Vec<Ping>,
    pub events: Vec<(f64, SessionEvent)>,
}

/// How the device reaches the VM during a run, and how the run ends.
struct Backend {
    started_on: String,
    ports: watch::Receiver<Vec<cloudlet_api::PortMapping>>,
    /// Keeps the cloud run's port mappings open (a dropped sender would
    /// close every forwarded connection).
    _ports_tx: Option<watch::Sender<Vec<cloudlet_api::PortMapping>>>,
    go: Option<oneshot::Sender<()>>,
    stop: Option<oneshot::Sender<()>>,
    session: Option<cloudlet_wan::NsJoinHandle<Option<(String, String)>>>,
    /// The cloud VM: its API and id.
    direct: Option<(String, String)>,
    events: Option<mpsc::UnboundedReceiver<(Instant, SessionEvent)>>,
}

pub async fn run(world: &World, kind: Kind, walk: &Walk) -> anyhow::Result<Run> {
    let schedule = walk.schedule();
    let links: Vec<&Wan> = world.sites.iter().map(|s| &s.link).collect();
    for (l, ms) in links.iter().zip(schedule[0].1) {
        l.set_delay(Duration::from_secs_f64(ms / 1e3))?;
    }
    let asked = Instant::now();
    let mut b = match kind {
        Kind::Follow | Kind::Stay => start_session(world, kind).await?,
        Kind::Cloud => start_direct(world).await?,
    };
    eprintln!("  {}: the VM runs on {}", kind.name(), b.started_on);
    let hub = world.hub();
    let (bound_tx, bound_rx) = oneshot::channel();
    let (fstop_tx, fstop_rx) = oneshot::channel();
    let forwarder = hub.run_in(
        Side::A,
        forward_until(APP_PORT, b.ports.clone(), bound_tx, fstop_rx),
    )?;
    let port = bound_rx.await.context("The forwarder did not start")?;
    let up = world
        .in_hub(wait_app(port, Duration::from_secs(240)))
        .await?;
    if !up {
        bail!("kvstore did not answer through the forwarder within 240 s");
    }
    let ready_s = asked.elapsed().as_secs_f64();
    eprintln!(
        "  {}: kvstore answers after {ready_s:.1} s; walking for {} s ...",
        kind.name(),
        walk.len().as_secs()
    );

    let t0 = Instant::now();
    let until = t0 + walk.len();
    if let Some(go) = b.go.take() {
        let _ = go.send(());
    }
    let writer = hub.run_in(Side::A, write_loop(port, t0, until))?;
    let apis = world.sites.iter().map(|s| s.api).collect();
    let pinger = hub.run_in(Side::A, ping_loop(apis, t0, until))?;
    drive(&links, &schedule, t0).await;
    tokio::time::sleep_until(until.into()).await;
    let written = writer.await?;
    let pings = pinger.await?;
    eprintln!(
        "  {}: {} writes acknowledged; reading them back ...",
        kind.name(),
        written.writes.len()
    );
    let keys = written.writes.iter().map(|w| w.key).collect();
    let missing = world.in_hub(read_back(port, keys)).await?;

    // The end: the session stops, the VM is deleted where it runs.
    if let Some(stop) = b.stop.take() {
        let _ = stop.send(());
    }
    let placed = match (b.session.take(), b.direct.take()) {
        (Some(s), _) => s.await?,
        (None, direct) => direct,
    };
    if let Some((api, id)) = placed {
        let deleted = world
            .in_hub(async move { Client::new(&api, Some(TOKEN.into())).delete_vm(&id).await })
            .await?;
        if let Err(e) = deleted {
            eprintln!("  {}: deleting the VM: {e}", kind.name());
        }
    }
    let _ = fstop_tx.send(());
    let _ = forwarder.await;
    // The session's events of the walk (not those of the read-back).
    let mut events = Vec::new();
    if let Some(mut rx) = b.events.take() {
        while let Ok((at, e)) = rx.try_recv() {
            if at > until {
                continue;
            }
            let t = if at >= t0 {
                (at - t0).as_secs_f64()
            } else {
                -(t0 - at).as_secs_f64()
            };
            events.push((t, e));
        }
    }
    Ok(Run {
        kind,
        started_on: b.started_on,
        ready_s,
        written,
        missing,
        pings,
        events,
    })
}

/// A session in the hub: it starts (through the directory, nearest
/// first), waits for the go and then follows with the default policy
/// (consent never for [`Kind::Stay`]) until the stop; it ends with where
/// the VM runs (API URL and id).
async fn start_session(world: &World, kind: Kind) -> anyhow::Result<Backend> {
    let (dir_url, overlay, base_id) = (
        world.dir_url.clone(),
        world.overlay_url.clone(),
        world.base_id.clone(),
    );
    let (started_tx, started_rx) = oneshot::channel();
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let consent = match kind {
        Kind::Stay => Consent::Never,
        _ => Consent::Automatic,
    };
    let session = world.hub().run_in(Side::A, async move {
        let directory = DirectoryClient::new(&[dir_url], None);
        let mut s =
            match Session::start(directory, Some(TOKEN.into()), &overlay, &base_id, None).await {
                Ok(s) => s,
                Err(e) => {
                    let _ = started_tx.send(Err(format!("{e}")));
                    return None;
                }
            };
        let mut events = s.events();
        tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                match events.recv().await {
                    Ok(e) => {
                        let _ = ev_tx.send((Instant::now(), e));
                    }
                    Err(RecvError::Lagged(n)) => eprintln!("  lost {n} session events"),
                    Err(RecvError::Closed) => break,
                }
            }
        });
        let _ = started_tx.send(Ok((s.state().cloudlet.clone(), s.endpoints())));
        if go_rx.await.is_ok() {
            let policy = Policy {
                consent,
                ..Policy::default()
            };
            s.follow(policy, |_| async { true }, async {
                let _ = stop_rx.await;
            })
            .await;
        }
        Some((s.state().api_url.clone(), s.state().vm_id.clone()))
    })?;
    let (started_on, ports) = match started_rx.await {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => bail!("The session did not start: {e}"),
        Err(_) => bail!("The session's task ended before it started"),
    };
    Ok(Backend {
        started_on,
        ports,
        _ports_tx: None,
        go: Some(go_tx),
        stop: Some(stop_tx),
        session: Some(session),
        direct: None,
        events: Some(ev_rx),
    })
}

/// The VM created on the cloud site with the operator's token; its port
/// mappings never change.
async fn start_direct(world: &World) -> anyhow::Result<Backend> {
    let cloud = world.cloud();
    let (api, overlay) = (cloud.url.clone(), world.overlay_url.clone());
    let vm = world
        .in_hub({
            let api = api.clone();
            async move {
                Client::new(&api, Some(TOKEN.into()))
                    .create_vm(&CreateVmRequest {
                        overlay,
                        name: Some("follow-bench-cloud".into()),
                        flavor: None,
                    })
                    .await
            }
        })
        .await?
        .context("Create the VM on the cloud site")?;
    let (tx, rx) = watch::channel(vm.ports.clone());
    Ok(Backend {
        started_on: cloud.name.clone(),
        ports: rx,
        _ports_tx: Some(tx),
        go: None,
        stop: None,
        session: None,
        direct: Some((api, vm.id)),
        events: None,
    })
}
