//! Where the directory keeps its entries and credentials: the embedded
//! store (redb, in-process, the default) or etcd (a fleet of directory
//! instances sharing one view). Both keep the [`Index`] that searches read.
//!
//! The contract, for both:
//! - `heartbeat` stores a registration bound to a lease of `lease`; an
//!   entry whose lease runs out leaves the index (the embedded store
//!   expires it itself, etcd deletes the key and the watch removes it);
//! - `bind_credential` binds a cloudlet name to the hash of its credential
//!   atomically: the first binding wins, a later one with another hash is
//!   refused (a name cannot be taken over);
//! - what a call answered is stored: a restart (or, with etcd, a leader
//!   change) loses no registration and no binding.

pub mod embedded;
pub mod etcd;
mod journal;

use std::time::Duration;

use cloudlet_api::directory::Registration;

use crate::index::{Index, Upsert};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the embedded store at {path}: {detail}")]
    Embedded { path: String, detail: String },
    #[error("etcd ({endpoints}): {detail}")]
    Etcd { endpoints: String, detail: String },
    #[error("a stored record of {name} does not decode: {detail}")]
    Decode { name: String, detail: String },
}

/// What binding a credential found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bind {
    /// The name is bound to this hash (now or before).
    Bound,
    /// The name is bound to another credential.
    Taken,
}

/// The directory's store.
pub enum Store {
    Embedded(embedded::Embedded),
    Etcd(etcd::Etcd),
}

impl Store {
    /// `embedded` or `etcd`.
    pub fn kind(&self) -> &'static str {
        match self {
            Store::Embedded(_) => "embedded",
            Store::Etcd(_) => "etcd",
        }
    }

    /// The store is in reach (always, for the embedded one; with etcd,
    /// while its watch runs).
    pub fn connected(&self) -> bool {
        match self {
            Store::Embedded(_) => true,
            Store::Etcd(s) => s.connected(),
        }
    }

    pub fn index(&self) -> &Index {
        match self {
            Store::Embedded(s) => s.index(),
            Store::Etcd(s) => s.index(),
        }
    }

    pub async fn bind_credential(&self, name: &str, hash: &str) -> Result<Bind, StoreError> {
        match self {
            Store::Embedded(s) => s.bind_credential(name, hash).await,
            Store::Etcd(s) => s.bind_credential(name, hash).await,
        }
    }

    pub async fn heartbeat(
        &self,
        reg: Registration,
        lease: Duration,
    ) -> Result<Upsert, StoreError> {
        match self {
            Store::Embedded(s) => s.heartbeat(reg, lease).await,
            Store::Etcd(s) => s.heartbeat(reg, lease).await,
        }
    }

    /// True if the entry was there.
    pub async fn deregister(&self, name: &str) -> Result<bool, StoreError> {
        match self {
            Store::Embedded(s) => s.deregister(name).await,
            Store::Etcd(s) => s.deregister(name).await,
        }
    }

    /// Write what is still in memory only (the embedded store's batched
    /// heartbeats) before the process exits.
    pub async fn flush(&self) -> Result<(), StoreError> {
        match self {
            Store::Embedded(s) => s.flush().await,
            Store::Etcd(_) => Ok(()),
        }
    }
}
