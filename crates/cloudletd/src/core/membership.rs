//! A cloudlet's membership of the directory, as the rest of the daemon
//! sees it: whether its heartbeats land (for `GET /v1/cloudlet`) and the
//! peers it learned there (for handoffs). `crate::directory` keeps it
//! current.

use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use cloudlet_api::directory::Membership as MembershipInfo;

/// A peer learned from the directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LearnedPeer {
    pub name: String,
    pub api_url: String,
    pub token: Option<String>,
}

/// The membership's state, shared with the API (`GET /v1/cloudlet`) and
/// the handoff (peers).
#[derive(Default)]
pub struct Membership {
    peers: RwLock<Vec<LearnedPeer>>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    last_ok: Option<Instant>,
    lease: Duration,
    heartbeat: Duration,
    error: Option<String>,
}

impl Membership {
    /// What `GET /v1/cloudlet` shows (none without a directory).
    pub fn status(&self, urls: &[String]) -> Option<MembershipInfo> {
        if urls.is_empty() {
            return None;
        }
        let s = self.state();
        let age = s.last_ok.map(|t| t.elapsed());
        Some(MembershipInfo {
            urls: urls.to_vec(),
            registered: age.is_some_and(|a| a < s.lease),
            last_heartbeat_ms_ago: age.map(|a| a.as_millis() as u64),
            heartbeat_ms: s.heartbeat.as_millis() as u64,
            lease_ms: s.lease.as_millis() as u64,
            last_error: s.error.clone(),
            peers: self.peers().into_iter().map(|p| p.name).collect(),
        })
    }

    pub fn peers(&self) -> Vec<LearnedPeer> {
        self.peers.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn set_peers(&self, peers: Vec<LearnedPeer>) {
        *self.peers.write().unwrap_or_else(|p| p.into_inner()) = peers;
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A heartbeat landed, with the directory's lease and heartbeat.
    pub(crate) fn landed(&self, lease: Duration, heartbeat: Duration) {
        let mut s = self.state();
        s.last_ok = Some(Instant::now());
        s.lease = lease;
        s.heartbeat = heartbeat;
        s.error = None;
    }

    /// A heartbeat failed: why.
    pub(crate) fn failed(&self, error: String) {
        self.state().error = Some(error);
    }
}
