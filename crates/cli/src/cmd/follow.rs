//! `cloudlet follow`: play the device of a follow-me session. It finds
//! the best cloudlet through the directory, synthesizes the app there,
//! forwards a local address to the VM wherever it runs, and moves the VM
//! as the RTTs it measures change (`cloudlet_client::session`). Events are
//! printed a line each (JSON lines with `--output json`); Ctrl-C (or
//! SIGTERM) ends the session on this side (the VM keeps running; `--attach FILE` resumes).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use cloudlet_client::session::{Consent, Policy, Session, SessionEvent, SessionState};
use cloudlet_client::DirectoryClient;

use super::discover::FindArgs;
use crate::Output;

#[derive(Clone, Copy, ValueEnum)]
pub enum ConsentArg {
    Never,
    Ask,
    Auto,
}

#[derive(Args)]
pub struct FollowArgs {
    /// The app's overlay (`http(s)://` URL; the cloudlets fetch it).
    pub overlay: Option<String>,
    #[command(flatten)]
    pub find: FindArgs,
    /// `LOCAL_ADDR:PORT:GUEST_PORT`: the app connects to the local address,
    /// which reaches the guest port wherever the VM runs.
    #[arg(long, value_parser = parse_forward)]
    pub forward: Option<(SocketAddr, u16)>,
    /// Who decides a move: never (report only), ask (a yes on stdin per
    /// move), auto.
    #[arg(long, value_enum, default_value_t = ConsentArg::Auto)]
    pub consent: ConsentArg,
    /// Probe every this many ms.
    #[arg(long, default_value_t = 2000)]
    pub probe_every_ms: u64,
    /// A candidate is better by at least this share of the current RTT...
    #[arg(long, default_value_t = 30.0)]
    pub margin_pct: f64,
    /// ...and by at least this many ms.
    #[arg(long, default_value_t = 5.0)]
    pub margin_ms: f64,
    /// For this many probe rounds in a row.
    #[arg(long, default_value_t = 3)]
    pub hold: usize,
    /// At most one move in this many seconds.
    #[arg(long, default_value_t = 30)]
    pub min_interval_s: u64,
    /// Keep the session's state (VM, cloudlet, credential) in this file.
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Serve the session's events on this local address: `GET /events`
    /// (server-sent events, one `SessionEvent` as JSON a `data:` line) and
    /// `GET /session` (where the VM runs now), for an app or a dashboard
    /// on the device that follows the moves.
    #[arg(long)]
    pub events: Option<SocketAddr>,
    /// Re-attach to the session kept in this file (instead of starting one).
    #[arg(long, conflicts_with = "overlay")]
    pub attach: Option<PathBuf>,
}

fn parse_forward(s: &str) -> Result<(SocketAddr, u16), String> {
    let (addr, guest) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?}: expected LOCAL_ADDR:PORT:GUEST_PORT"))?;
    let addr: SocketAddr = addr
        .parse()
        .map_err(|_| format!("{addr:?}: expected ADDR:PORT, e.g. 127.0.0.1:8080"))?;
    let guest: u16 = guest
        .parse()
        .map_err(|_| format!("{guest:?}: expected a guest port"))?;
    Ok((addr, guest))
}

pub async fn follow(args: FollowArgs, token: Option<String>, output: Output) -> anyhow::Result<()> {
    if args.find.directory.is_empty() {
        anyhow::bail!("no directory: give --directory URL (or set CLOUDLET_DIRECTORY)");
    }
    let directory = DirectoryClient::new(&args.find.directory, args.find.device_token()?);
    let mut session = match (&args.attach, &args.overlay) {
        (Some(file), _) => {
            let state: SessionState = serde_json::from_slice(&std::fs::read(file)?)?;
            Session::attach(directory, state).await?
        }
        (None, Some(overlay)) => {
            let base = super::discover::overlay_base_id(overlay).await?;
            Session::start(directory, token, overlay, &base, args.find.near).await?
        }
        (None, None) => anyhow::bail!("give an overlay URL, or --attach FILE"),
    };
    let keep = |s: &SessionState| -> anyhow::Result<()> {
        if let Some(f) = &args.state {
            std::fs::write(f, serde_json::to_vec_pretty(s)?)?;
        }
        Ok(())
    };
    keep(session.state())?;
    print_event(
        &SessionEvent::Started {
            cloudlet: session.state().cloudlet.clone(),
            ports: session.endpoints().borrow().clone(),
        },
        output,
    )?;
    if let Some((addr, guest)) = args.forward {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        eprintln!("forwarding {addr} to guest port {guest}, wherever the VM runs");
        tokio::spawn(cloudlet_client::forward::forward(
            listener,
            guest,
            session.endpoints(),
        ));
    }
    if let Some(addr) = args.events {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        eprintln!("session events at http://{addr}/events");
        tokio::spawn(serve_events(
            listener,
            session.events_sender(),
            session.endpoints(),
        ));
    }
    let mut events = session.events();
    let state_file = args.state.clone();
    let printer = tokio::spawn(async move {
        while let Ok(e) = events.recv().await {
            let _ = print_event(&e, output);
        }
    });
    let policy = Policy {
        probe_every: Duration::from_millis(args.probe_every_ms.max(100)),
        margin_ratio: args.margin_pct / 100.0,
        margin_ms: args.margin_ms,
        hold: args.hold.max(1),
        min_interval: Duration::from_secs(args.min_interval_s),
        consent: match args.consent {
            ConsentArg::Never => Consent::Never,
            ConsentArg::Ask => Consent::Ask,
            ConsentArg::Auto => Consent::Automatic,
        },
        samples: 3,
    };
    session
        .follow(policy, |to: &str| ask(to.to_string()), stopped()?)
        .await;
    printer.abort();
    if let Some(f) = state_file {
        std::fs::write(&f, serde_json::to_vec_pretty(session.state())?)?;
        eprintln!("session kept in {} (resume with --attach)", f.display());
    }
    Ok(())
}

/// `--events`: the session's events as server-sent events, and the VM's
/// endpoints now.
async fn serve_events(
    listener: tokio::net::TcpListener,
    events: tokio::sync::broadcast::Sender<SessionEvent>,
    ports: tokio::sync::watch::Receiver<Vec<cloudlet_api::PortMapping>>,
) -> std::io::Result<()> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use axum::routing::get;
    let stream = move || {
        let rx = events.subscribe();
        let s = futures::stream::unfold(rx, |mut rx| async move {
            use tokio::sync::broadcast::error::RecvError;
            let ev = match rx.recv().await {
                Ok(e) => Event::default().data(serde_json::to_string(&e).unwrap_or_default()),
                Err(RecvError::Lagged(n)) => Event::default().event("lagged").data(n.to_string()),
                Err(RecvError::Closed) => return None,
            };
            Some((Ok::<_, std::convert::Infallible>(ev), rx))
        });
        async move { Sse::new(s).keep_alive(KeepAlive::default()) }
    };
    let now = move || {
        let p = ports.borrow().clone();
        async move { axum::Json(p) }
    };
    let app = axum::Router::new()
        .route("/events", get(stream))
        .route("/session", get(now));
    axum::serve(listener, app).await
}

/// Resolves at SIGINT (Ctrl-C) or SIGTERM: the session ends on this side.
fn stopped() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut int, mut term) = (
        signal(SignalKind::interrupt())?,
        signal(SignalKind::terminate())?,
    );
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

/// Consent `ask`: a yes on stdin.
async fn ask(to: String) -> bool {
    tokio::task::spawn_blocking(move || {
        eprint!("move the app to {to}? [y/N] ");
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).is_ok() && line.trim().eq_ignore_ascii_case("y")
    })
    .await
    .unwrap_or(false)
}

fn print_event(e: &SessionEvent, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string(e)?),
        Output::Text => println!("{}", describe(e)),
    }
    Ok(())
}

fn describe(e: &SessionEvent) -> String {
    let ports = |p: &[cloudlet_api::PortMapping]| {
        p.iter()
            .map(|p| format!("{} -> {}", p.guest, p.endpoint))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match e {
        SessionEvent::Started { cloudlet, ports: p } => {
            format!("running at {cloudlet}: {}", ports(p))
        }
        SessionEvent::Probed {
            current,
            current_ms,
            candidates,
        } => {
            let c: Vec<String> = candidates
                .iter()
                .map(|(n, r)| format!("{n} {r:.1} ms"))
                .collect();
            format!("rtt {current} {current_ms:.1} ms; {}", c.join(", "))
        }
        SessionEvent::MoveTriggered { from, to } => format!("move triggered: {from} -> {to}"),
        SessionEvent::MoveDeclined { to } => format!("move to {to} declined"),
        SessionEvent::MoveCompleted {
            from,
            to,
            ports: p,
            downtime_ms,
            total_ms,
        } => format!(
            "moved {from} -> {to} in {total_ms} ms (downtime {downtime_ms} ms): {}",
            ports(p)
        ),
        SessionEvent::MoveRefused { from, to, reason } => {
            format!("{to} refused the move (the VM stays at {from}, the next candidate is asked): {reason}")
        }
        SessionEvent::MoveFailed { from, to, error } => {
            format!("move {from} -> {to} failed (the VM stays): {error}")
        }
    }
}

#[cfg(test)]
mod tests {
    use cloudlet_client::session::SessionEvent;

    #[tokio::test]
    async fn the_events_endpoint_streams_the_session_and_says_where_it_runs() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, _) = tokio::sync::broadcast::channel(16);
        let port = |endpoint: &str| cloudlet_api::PortMapping {
            guest: 8080,
            host: 20000,
            endpoint: endpoint.into(),
        };
        let (ports_tx, ports_rx) = tokio::sync::watch::channel(vec![port("10.0.0.1:20000")]);
        tokio::spawn(super::serve_events(listener, tx.clone(), ports_rx));
        let mut resp = reqwest::get(format!("http://{addr}/events")).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        let moved = SessionEvent::MoveCompleted {
            from: "a".into(),
            to: "b".into(),
            ports: vec![port("10.0.0.2:20000")],
            downtime_ms: 300,
            total_ms: 3000,
        };
        tx.send(moved.clone()).unwrap();
        let _ = ports_tx.send(vec![port("10.0.0.2:20000")]);
        let mut text = String::new();
        while !text.contains("\n\n") {
            let chunk = tokio::time::timeout(std::time::Duration::from_secs(5), resp.chunk())
                .await
                .expect("an event within 5 s")
                .unwrap()
                .expect("the stream goes on");
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        let data = text
            .lines()
            .find_map(|l| l.strip_prefix("data:"))
            .expect("a data line");
        let got: SessionEvent = serde_json::from_str(data.trim()).unwrap();
        assert_eq!(got, moved);
        let now: Vec<cloudlet_api::PortMapping> = reqwest::get(format!("http://{addr}/session"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(now[0].endpoint, "10.0.0.2:20000");
    }

    #[test]
    fn forward_is_local_address_then_guest_port() {
        let (a, g) = super::parse_forward("127.0.0.1:9000:8080").unwrap();
        assert_eq!((a.port(), g), (9000, 8080));
        assert!(super::parse_forward("9000:8080").is_err());
    }
}
