//! Follow me: a device's session with its back end. The session finds the
//! best cloudlet through the directory, synthesizes the app there, and
//! then keeps measuring its round trip to the cloudlet it uses and to the
//! candidates; when one is better by the policy's margin for the policy's
//! hold, it asks the current cloudlet to hand the VM over, with the VM's
//! own session credential (not an operator's token), and tells the app the
//! new endpoint ([`Session::endpoints`], and [`crate::forward`] for an app
//! that keeps one local address).
//!
//! The policy ([`Policy`], a pure state machine in [`Decider`]):
//! - a candidate is *better* when its RTT is below the current one by at
//!   least `margin_ratio` (30%) and by at least `margin_ms` (5 ms);
//! - a move needs the same better candidate in `hold` consecutive probe
//!   rounds (3) and at least `min_interval` since the last move (30 s);
//! - consent: `Never` (report only), `Ask` (a yes from the device for
//!   each move), `Automatic`.
//!
//! ETSI MEC 021 moves on a zone change, Follow-Me Cloud on a distance
//! threshold; this decides on the RTT the device measures, with
//! hysteresis, among the cloudlets the directory says can take the VM.

use std::time::{Duration, Instant};

use cloudlet_api::directory::SearchQuery;
use cloudlet_api::{CreateVmRequest, HandoffReport, PortMapping};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use crate::directory::{probe_rtt, DirectoryClient, ProbeOptions};
use crate::{Client, ClientError};

/// Whether the session may move the VM by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Consent {
    /// Never move (the decisions are still reported).
    Never,
    /// Ask the device before each move.
    Ask,
    /// Move without asking.
    Automatic,
}

/// When the session moves the VM (see the module's documentation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    pub probe_every: Duration,
    pub margin_ratio: f64,
    pub margin_ms: f64,
    pub hold: usize,
    pub min_interval: Duration,
    pub consent: Consent,
    /// Timed samples per probe (median).
    pub samples: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            probe_every: Duration::from_secs(2),
            margin_ratio: 0.30,
            margin_ms: 5.0,
            hold: 3,
            min_interval: Duration::from_secs(30),
            consent: Consent::Automatic,
            samples: 3,
        }
    }
}

/// The move decision, round by round.
#[derive(Debug, Clone)]
pub struct Decider {
    policy: Policy,
    streak: Option<(String, usize)>,
    last_move: Option<Instant>,
}

impl Decider {
    pub fn new(policy: Policy) -> Self {
        Decider {
            policy,
            streak: None,
            last_move: None,
        }
    }

    /// One probe round: the current cloudlet's RTT and the candidates'
    /// (ms); the cloudlet to move to, when the policy says so now.
    pub fn observe(
        &mut self,
        current_ms: f64,
        candidates: &[(String, f64)],
        now: Instant,
    ) -> Option<String> {
        let p = &self.policy;
        let better = self.better(current_ms, candidates);
        let Some(name) = better.first() else {
            self.streak = None;
            return None;
        };
        let count = match &self.streak {
            Some((n, c)) if n == name => c + 1,
            _ => 1,
        };
        self.streak = Some((name.clone(), count));
        let rested = self
            .last_move
            .is_none_or(|t| now.duration_since(t) >= p.min_interval);
        if count >= p.hold && rested {
            self.streak = None;
            return Some(name.clone());
        }
        None
    }

    /// The candidates better than the current cloudlet by the margin,
    /// lowest RTT first (where a refused move tries next).
    pub fn better(&self, current_ms: f64, candidates: &[(String, f64)]) -> Vec<String> {
        let p = &self.policy;
        let mut b: Vec<&(String, f64)> = candidates
            .iter()
            .filter(|(_, r)| {
                *r <= current_ms * (1.0 - p.margin_ratio) && current_ms - *r >= p.margin_ms
            })
            .collect();
        b.sort_by(|x, y| x.1.total_cmp(&y.1));
        b.into_iter().map(|(n, _)| n.clone()).collect()
    }

    /// A move was made at `now` (the interval counts from it).
    pub fn moved(&mut self, now: Instant) {
        self.last_move = Some(now);
        self.streak = None;
    }
}

/// What a device keeps to re-attach to its session (e.g. after it was
/// offline): where the VM runs and its credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionState {
    pub vm_id: String,
    pub session_token: String,
    /// The cloudlet the VM runs on: its name and API URL.
    pub cloudlet: String,
    pub api_url: String,
    pub base_id: String,
    pub overlay: String,
}

/// The session's mobility events (what an app and a dashboard follow).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum SessionEvent {
    /// The VM runs at `cloudlet` (after the start or a re-attach).
    Started {
        cloudlet: String,
        ports: Vec<PortMapping>,
    },
    /// A probe round: RTTs in ms.
    Probed {
        current: String,
        current_ms: f64,
        candidates: Vec<(String, f64)>,
    },
    /// The policy chose `to`; with `Ask`, waiting for the device's yes.
    MoveTriggered { from: String, to: String },
    /// The device said no (consent `Ask`), or consent is `Never`.
    MoveDeclined { to: String },
    MoveCompleted {
        from: String,
        to: String,
        ports: Vec<PortMapping>,
        downtime_ms: i64,
        total_ms: u64,
    },
    /// `to` said no before anything moved (no room, draining, no base):
    /// the VM still runs at `from`; the next better candidate is asked.
    MoveRefused {
        from: String,
        to: String,
        reason: String,
    },
    MoveFailed {
        from: String,
        to: String,
        error: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("the directory: {0}")]
    Directory(ClientError),
    #[error(
        "no cloudlet fits this app (the directory knows none that holds its base and has room)"
    )]
    NoCloudlet,
    #[error("the cloudlet {cloudlet}: {error}")]
    Cloudlet {
        cloudlet: String,
        error: ClientError,
    },
}

/// A device's session: see the module's documentation.
pub struct Session {
    directory: DirectoryClient,
    state: SessionState,
    ports: watch::Sender<Vec<PortMapping>>,
    events: broadcast::Sender<SessionEvent>,
}

impl Session {
    /// Find the best cloudlet for `overlay` (whose base is `base_id`),
    /// synthesize it there (with `token`, the cloudlet's credential for
    /// creating VMs) and start the session.
    pub async fn start(
        directory: DirectoryClient,
        token: Option<String>,
        overlay: &str,
        base_id: &str,
        near: Option<(f64, f64)>,
    ) -> Result<Session, SessionError> {
        let q = query(base_id, overlay, near);
        let d = directory
            .discover(&q, &ProbeOptions::default())
            .await
            .map_err(SessionError::Directory)?;
        let c = d.chosen.ok_or(SessionError::NoCloudlet)?.candidate;
        let client = Client::new(&c.api_url, token);
        let vm = client
            .create_vm(&CreateVmRequest {
                overlay: overlay.to_string(),
                name: None,
                flavor: None,
            })
            .await
            .map_err(|error| SessionError::Cloudlet {
                cloudlet: c.name.clone(),
                error,
            })?;
        let state = SessionState {
            vm_id: vm.id.clone(),
            session_token: vm.session_token.clone().unwrap_or_default(),
            cloudlet: c.name.clone(),
            api_url: c.api_url.clone(),
            base_id: base_id.to_string(),
            overlay: overlay.to_string(),
        };
        Ok(Session::with(directory, state, vm.ports))
    }

    /// Re-attach to a session by its state (the VM keeps running while
    /// the device is away): asks the cloudlet where it is now.
    pub async fn attach(
        directory: DirectoryClient,
        state: SessionState,
    ) -> Result<Session, SessionError> {
        let mut state = state;
        // (The session's own credential reads its VM, wherever it runs.)
        let token = state.session_token.clone();
        let get = |url: String, id: String| {
            let token = token.clone();
            async move { Client::new(&url, Some(token)).get_vm(&id).await }
        };
        let mut vm = get(state.api_url.clone(), state.vm_id.clone())
            .await
            .map_err(|error| SessionError::Cloudlet {
                cloudlet: state.cloudlet.clone(),
                error,
            })?;
        // Moved while the device was away (a drain): follow the record.
        if let Some(to) = vm.moved_to.clone() {
            let there = match directory.get(&to).await {
                Ok(r) => (r.name, r.api_url),
                Err(_) => (to.clone(), to.clone()),
            };
            vm = get(there.1.clone(), state.vm_id.clone())
                .await
                .map_err(|error| SessionError::Cloudlet {
                    cloudlet: there.0.clone(),
                    error,
                })?;
            (state.cloudlet, state.api_url) = there;
        }
        Ok(Session::with(directory, state, vm.ports))
    }

    fn with(directory: DirectoryClient, state: SessionState, ports: Vec<PortMapping>) -> Self {
        let (events, _) = broadcast::channel(256);
        let (ports_tx, _) = watch::channel(ports.clone());
        let s = Session {
            directory,
            state,
            ports: ports_tx,
            events,
        };
        s.emit(SessionEvent::Started {
            cloudlet: s.state.cloudlet.clone(),
            ports,
        });
        s
    }

    pub fn state(&self) -> &SessionState {
        &self.state
    }

    /// The VM's port mappings now, and every change (at each move).
    pub fn endpoints(&self) -> watch::Receiver<Vec<PortMapping>> {
        self.ports.subscribe()
    }

    /// The session's events from now on.
    pub fn events(&self) -> broadcast::Receiver<SessionEvent> {
        self.events.subscribe()
    }

    /// Where the events are sent: each [`broadcast::Sender::subscribe`]
    /// gets them from then on (e.g. one per client of an events endpoint).
    pub fn events_sender(&self) -> broadcast::Sender<SessionEvent> {
        self.events.clone()
    }

    fn emit(&self, e: SessionEvent) {
        let _ = self.events.send(e);
    }

    /// One probe round: the current cloudlet's RTT and the candidates'
    /// (those the directory says can take the VM, but the current one).
    pub async fn probe(&self, samples: usize) -> Result<(f64, Vec<(String, f64)>), ClientError> {
        let timeout = Duration::from_secs(2);
        let q = query(&self.state.base_id, &self.state.overlay, None);
        let answer = self.directory.search(&q).await?;
        let mut tasks = tokio::task::JoinSet::new();
        for c in answer
            .candidates
            .into_iter()
            .filter(|c| c.name != self.state.cloudlet)
        {
            tasks.spawn(async move {
                let got = probe_rtt(&c.api_url, samples, timeout).await;
                (c.name, got)
            });
        }
        let current = probe_rtt(&self.state.api_url, samples, timeout)
            .await
            .map(|s| median_ms(&s))
            .unwrap_or(f64::INFINITY);
        let mut candidates = Vec::new();
        while let Some(Ok((name, got))) = tasks.join_next().await {
            if let Ok(s) = got {
                candidates.push((name, median_ms(&s)));
            }
        }
        candidates.sort_by(|a, b| a.0.cmp(&b.0));
        self.emit(SessionEvent::Probed {
            current: self.state.cloudlet.clone(),
            current_ms: current,
            candidates: candidates.clone(),
        });
        Ok((current, candidates))
    }

    /// Ask the current cloudlet to hand the VM to `to` (a name in the
    /// directory), with the session's credential.
    pub async fn move_to(&mut self, to: &str) -> Result<HandoffReport, ClientError> {
        let from = self.state.cloudlet.clone();
        let client = Client::new(&self.state.api_url, Some(self.state.session_token.clone()));
        match client.handoff(&self.state.vm_id, to, None).await {
            Ok(report) => {
                self.state.cloudlet = to.to_string();
                // The source says where it handed the VM; a source of an
                // earlier release does not: then the directory.
                if !report.destination_url.is_empty() {
                    self.state.api_url = report.destination_url.clone();
                } else if let Ok(r) = self.directory.get(to).await {
                    self.state.api_url = r.api_url;
                }
                let _ = self.ports.send(report.vm.ports.clone());
                self.emit(SessionEvent::MoveCompleted {
                    from,
                    to: to.to_string(),
                    ports: report.vm.ports.clone(),
                    downtime_ms: (report.destination_resume_us - report.source_stop_us) / 1000,
                    total_ms: report.total_ms,
                });
                Ok(report)
            }
            Err(e) => {
                self.emit(if is_refusal(&e) {
                    SessionEvent::MoveRefused {
                        from,
                        to: to.to_string(),
                        reason: e.to_string(),
                    }
                } else {
                    SessionEvent::MoveFailed {
                        from,
                        to: to.to_string(),
                        error: e.to_string(),
                    }
                });
                Err(e)
            }
        }
    }

    /// Move to the first of `order` that takes the VM: a candidate that
    /// refuses (it filled up or began a drain since the directory said
    /// otherwise) passes the move to the next. The last error when none
    /// took it, or at once on a failure that is not a refusal.
    pub async fn move_among(&mut self, order: &[String]) -> Result<HandoffReport, ClientError> {
        let mut last = None;
        for to in order {
            match self.move_to(to).await {
                Ok(r) => return Ok(r),
                Err(e) if is_refusal(&e) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| ClientError::Decode("no cloudlet to move to".into())))
    }

    /// Follow the device until `stop` resolves: probe every
    /// `policy.probe_every`, move when the policy says so (asking `ask`
    /// first with consent `Ask`).
    pub async fn follow<A, F>(
        &mut self,
        policy: Policy,
        mut ask: A,
        stop: impl std::future::Future<Output = ()>,
    ) where
        A: FnMut(&str) -> F,
        F: std::future::Future<Output = bool>,
    {
        let mut decider = Decider::new(policy.clone());
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(policy.probe_every) => {}
            }
            let Ok((current, candidates)) = self.probe(policy.samples).await else {
                continue;
            };
            let Some(to) = decider.observe(current, &candidates, Instant::now()) else {
                continue;
            };
            let mut order = vec![to.clone()];
            order.extend(
                decider
                    .better(current, &candidates)
                    .into_iter()
                    .filter(|n| *n != to),
            );
            let from = self.state.cloudlet.clone();
            self.emit(SessionEvent::MoveTriggered {
                from,
                to: to.clone(),
            });
            let yes = match policy.consent {
                Consent::Never => false,
                Consent::Automatic => true,
                Consent::Ask => ask(&to).await,
            };
            if !yes {
                self.emit(SessionEvent::MoveDeclined { to });
                decider.moved(Instant::now());
                continue;
            }
            // A refusal (the candidate filled up since) passes to the next
            // better one; a failure is reported and the next rounds pick
            // again.
            let _ = self.move_among(&order).await;
            decider.moved(Instant::now());
        }
    }
}

/// The destination said no before anything moved (the source answers
/// 409 `destination_refused`; the VM still runs there).
fn is_refusal(e: &ClientError) -> bool {
    matches!(e, ClientError::Api { kind, .. } if kind == "destination_refused")
}

fn query(base_id: &str, overlay: &str, near: Option<(f64, f64)>) -> SearchQuery {
    SearchQuery {
        lat: near.map(|n| n.0),
        lon: near.map(|n| n.1),
        base: Some(base_id.to_string()).filter(|b| !b.is_empty()),
        overlay: Some(overlay.to_string()).filter(|o| !o.is_empty()),
        flavor: None,
        n: Some(10),
        addr: None,
    }
}

fn median_ms(samples: &[Duration]) -> f64 {
    let mut s = samples.to_vec();
    s.sort();
    s.get(s.len() / 2)
        .map_or(f64::INFINITY, |d| d.as_secs_f64() * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            min_interval: Duration::from_secs(30),
            ..Policy::default()
        }
    }

    fn c(name: &str, ms: f64) -> Vec<(String, f64)> {
        vec![(name.to_string(), ms)]
    }

    #[test]
    fn a_better_candidate_wins_after_the_hold() {
        let mut d = Decider::new(policy());
        let t = Instant::now();
        assert_eq!(d.observe(60.0, &c("b", 4.0), t), None);
        assert_eq!(d.observe(60.0, &c("b", 4.0), t), None);
        assert_eq!(d.observe(60.0, &c("b", 4.0), t), Some("b".into()));
    }

    #[test]
    fn a_refused_move_passes_to_the_next_better_candidate() {
        let d = Decider::new(policy());
        let round = vec![
            ("far".to_string(), 58.0),
            ("b".to_string(), 9.0),
            ("c".to_string(), 4.0),
            ("d".to_string(), 30.0),
        ];
        // Lowest RTT first; far is inside the margin, not a candidate.
        assert_eq!(d.better(60.0, &round), ["c", "b", "d"]);
        assert!(d.better(3.0, &round).is_empty());
    }

    #[test]
    fn noise_inside_the_margin_never_moves() {
        let mut d = Decider::new(policy());
        let t = Instant::now();
        // 30% better but under 5 ms, or 5 ms better but under 30%.
        for i in 0..100 {
            let (cur, cand) = if i % 2 == 0 {
                (10.0, 6.0)
            } else {
                (40.0, 33.0)
            };
            assert_eq!(d.observe(cur, &c("b", cand), t), None, "round {i}");
        }
    }

    #[test]
    fn a_streak_breaks_and_moves_keep_their_interval() {
        let mut d = Decider::new(policy());
        let t = Instant::now();
        d.observe(60.0, &c("b", 4.0), t);
        d.observe(60.0, &c("b", 4.0), t);
        // One round where b is not better: the streak starts again.
        assert_eq!(d.observe(60.0, &c("b", 59.0), t), None);
        assert_eq!(d.observe(60.0, &c("b", 4.0), t), None);
        assert_eq!(d.observe(60.0, &c("b", 4.0), t), None);
        assert_eq!(d.observe(60.0, &c("b", 4.0), t), Some("b".into()));
        d.moved(t);
        // Better again at once: not before the interval.
        for _ in 0..5 {
            assert_eq!(
                d.observe(60.0, &c("a", 4.0), t + Duration::from_secs(10)),
                None
            );
        }
        assert_eq!(
            d.observe(60.0, &c("a", 4.0), t + Duration::from_secs(31)),
            Some("a".into())
        );
    }
}
