//! The directory's operations, free of HTTP: who may do what, what a
//! registration must hold, and the calls into the store and the ranking.
//! One error enum per operation; `api` maps them to status codes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use cloudlet_api::directory::{
    DirectoryHealth, Fleet, FleetEntry, Lease, PeerList, Registration, SearchAnswer, SearchQuery,
    REGISTRATION_FORMAT,
};

use crate::config::DirectoryConfig;
use crate::index::{parse_networks, public, Upsert};
use crate::rank::{self, Search, SearchError};
use crate::store::{Bind, Store, StoreError};

/// BLAKE3 of a credential, hex: what the store keeps.
pub fn credential_hash(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("this call needs a credential (Authorization: Bearer ...)")]
    Missing,
    #[error("{0}")]
    Forbidden(String),
}

#[derive(Debug, thiserror::Error)]
pub enum HeartbeatError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("invalid registration: {0}")]
    Invalid(String),
    #[error("the directory cannot store it: {0}")]
    Store(#[from] StoreError),
}

#[derive(Debug, thiserror::Error)]
pub enum DeregisterError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("no cloudlet {0} is registered")]
    NotFound(String),
    #[error("the directory cannot store it: {0}")]
    Store(#[from] StoreError),
}

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("invalid query: {0}")]
    Invalid(#[from] SearchError),
    #[error("no cloudlet {0} is registered")]
    NotFound(String),
}

/// The directory: its settings, its store, the credentials it knows.
pub struct Directory {
    pub config: DirectoryConfig,
    pub store: Store,
    /// Name -> credential hash: those configured, and those bound (cached
    /// from the store once checked).
    bound: RwLock<HashMap<String, String>>,
    device_hashes: Vec<String>,
}

/// Names: what a DNS label allows.
fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

impl Directory {
    pub fn new(config: DirectoryConfig, store: Store) -> Arc<Self> {
        let bound = config
            .cloudlets
            .iter()
            .map(|c| (c.name.clone(), credential_hash(&c.token)))
            .collect();
        let device_hashes = config
            .device_tokens
            .iter()
            .map(|t| credential_hash(t))
            .collect();
        Arc::new(Directory {
            config,
            store,
            bound: RwLock::new(bound),
            device_hashes,
        })
    }

    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.config.lease_ms)
    }

    /// May `token` act as cloudlet `name`? Binds the name on first use
    /// under open enrollment.
    pub async fn authorize_cloudlet(
        &self,
        name: &str,
        token: Option<&str>,
    ) -> Result<(), AuthError> {
        let token = token.ok_or(AuthError::Missing)?;
        let hash = credential_hash(token);
        let known = self
            .bound
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned();
        match known {
            Some(h) if h == hash => return Ok(()),
            Some(_) => {
                return Err(AuthError::Forbidden(format!(
                    "cloudlet {name} is registered with another credential"
                )))
            }
            None if !self.config.open_enrollment => {
                return Err(AuthError::Forbidden(format!(
                    "cloudlet {name} is not allowed to register here (not in the directory's cloudlets, and enrollment is closed)"
                )))
            }
            None => {}
        }
        match self.store.bind_credential(name, &hash).await {
            Ok(Bind::Bound) => {
                self.bound
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name.to_string(), hash);
                Ok(())
            }
            Ok(Bind::Taken) => Err(AuthError::Forbidden(format!(
                "cloudlet {name} is registered with another credential"
            ))),
            Err(e) => Err(AuthError::Forbidden(format!(
                "cannot check the credential of {name}: {e}"
            ))),
        }
    }

    /// May this caller search and watch?
    pub fn authorize_device(&self, token: Option<&str>) -> Result<(), AuthError> {
        let Some(t) = token else {
            return if self.config.anonymous_search {
                Ok(())
            } else {
                Err(AuthError::Missing)
            };
        };
        let h = credential_hash(t);
        let known = self.device_hashes.contains(&h)
            || self
                .bound
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .any(|b| *b == h);
        if known || self.config.anonymous_search {
            Ok(())
        } else {
            Err(AuthError::Forbidden("unknown device credential".into()))
        }
    }

    /// Register or heartbeat: the same call.
    pub async fn heartbeat(
        &self,
        name: &str,
        token: Option<&str>,
        mut reg: Registration,
    ) -> Result<Lease, HeartbeatError> {
        check_registration(name, &reg)?;
        self.authorize_cloudlet(name, token).await?;
        reg.format = REGISTRATION_FORMAT;
        let outcome = self.store.heartbeat(reg, self.lease()).await?;
        if outcome == Upsert::Created {
            tracing::info!(cloudlet = name, "registered");
        }
        Ok(Lease {
            name: name.to_string(),
            lease_ms: self.config.lease_ms,
            heartbeat_ms: self.config.heartbeat_ms,
            created: outcome == Upsert::Created,
        })
    }

    pub async fn deregister(&self, name: &str, token: Option<&str>) -> Result<(), DeregisterError> {
        self.authorize_cloudlet(name, token).await?;
        if self.store.deregister(name).await? {
            tracing::info!(cloudlet = name, "deregistered");
            Ok(())
        } else {
            Err(DeregisterError::NotFound(name.to_string()))
        }
    }

    pub fn search(
        &self,
        token: Option<&str>,
        q: &SearchQuery,
        peer: Option<IpAddr>,
    ) -> Result<SearchAnswer, QueryError> {
        self.authorize_device(token)?;
        let s = Search::from_query(q, peer)?;
        // Ranked on a snapshot: heartbeats do not wait for a search.
        let live = self.store.index().live();
        Ok(rank::search(live.iter().map(|e| &**e), &s))
    }

    /// One entry, as devices see it.
    pub fn get(&self, token: Option<&str>, name: &str) -> Result<Registration, QueryError> {
        self.authorize_device(token)?;
        self.store
            .index()
            .get(name)
            .map(|e| public(&e.reg))
            .ok_or_else(|| QueryError::NotFound(name.to_string()))
    }

    /// Every other live cloudlet, with their peer tokens, for cloudlet
    /// `name` (authenticated as itself).
    pub async fn peers(&self, name: &str, token: Option<&str>) -> Result<PeerList, QueryError> {
        self.authorize_cloudlet(name, token).await?;
        let mut peers: Vec<Registration> = self
            .store
            .index()
            .live()
            .iter()
            .filter(|e| e.reg.name != name)
            .map(|e| e.reg.clone())
            .collect();
        peers.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(PeerList { peers })
    }

    /// Every live cloudlet, by name, as devices see them, with how long
    /// each one's lease still runs (the fleet view).
    pub fn fleet(&self, token: Option<&str>) -> Result<Fleet, QueryError> {
        self.authorize_device(token)?;
        let now = std::time::Instant::now();
        let mut cloudlets: Vec<FleetEntry> = self
            .store
            .index()
            .live()
            .iter()
            .map(|e| FleetEntry {
                registration: public(&e.reg),
                lease_left_ms: e
                    .expires
                    .map(|x| x.saturating_duration_since(now).as_millis() as u64),
            })
            .collect();
        cloudlets.sort_by(|a, b| a.registration.name.cmp(&b.registration.name));
        Ok(Fleet {
            cloudlets,
            lease_ms: self.config.lease_ms,
            heartbeat_ms: self.config.heartbeat_ms,
        })
    }

    pub fn health(&self) -> DirectoryHealth {
        let index = self.store.index();
        DirectoryHealth {
            store: self.store.kind().into(),
            store_connected: self.store.connected(),
            registered: index.len(),
            revision: index.revision(),
            heartbeat_ms: self.config.heartbeat_ms,
            lease_ms: self.config.lease_ms,
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }
}

/// What a registration must hold.
pub fn check_registration(path_name: &str, r: &Registration) -> Result<(), HeartbeatError> {
    let bad = |m: String| Err(HeartbeatError::Invalid(m));
    if !valid_name(path_name) {
        return bad(format!(
            "name {path_name:?}: 1 to 63 letters, digits, '-', '_' or '.'"
        ));
    }
    if r.name != path_name {
        return bad(format!(
            "the body names {:?}, the path {path_name:?}",
            r.name
        ));
    }
    if r.format > REGISTRATION_FORMAT {
        return bad(format!(
            "registration format {} is newer than this directory's ({REGISTRATION_FORMAT})",
            r.format
        ));
    }
    if !(r.api_url.starts_with("http://") || r.api_url.starts_with("https://")) {
        return bad(format!("api_url {:?} is not an http(s) URL", r.api_url));
    }
    if r.public_host.is_empty() {
        return bad("public_host is empty".into());
    }
    let (lat, lon) = (r.location.latitude, r.location.longitude);
    if !(-90.0..=90.0).contains(&lat) || !(-180.0..=180.0).contains(&lon) {
        return bad(format!("location ({lat}, {lon}) is not on Earth"));
    }
    if let Err(c) = parse_networks(&r.networks) {
        return bad(format!("network {c:?} is not a CIDR"));
    }
    let (f, c) = (r.free, r.capacity);
    if f.vcpus > c.vcpus || f.memory_mib > c.memory_mib || f.vms > c.vms {
        return bad(format!("free {f:?} is more than the capacity {c:?}"));
    }
    if !r.load.is_finite() || r.load < 0.0 {
        return bad(format!("load {} is not a number >= 0", r.load));
    }
    Ok(())
}
