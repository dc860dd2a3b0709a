//! The etcd store (being written: see the directory issue).

use std::time::Duration;

use cloudlet_api::directory::Registration;

use super::{Bind, StoreError};
use crate::index::{Index, Upsert};

pub struct Etcd {
    index: Index,
    endpoints: String,
}

impl Etcd {
    pub async fn connect(endpoints: &[String], _prefix: &str) -> Result<Self, StoreError> {
        Err(StoreError::Etcd {
            endpoints: endpoints.join(","),
            detail: "the etcd store is not built yet".into(),
        })
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    fn unbuilt(&self) -> StoreError {
        StoreError::Etcd {
            endpoints: self.endpoints.clone(),
            detail: "the etcd store is not built yet".into(),
        }
    }

    pub async fn bind_credential(&self, _name: &str, _hash: &str) -> Result<Bind, StoreError> {
        Err(self.unbuilt())
    }

    pub async fn heartbeat(
        &self,
        _reg: Registration,
        _lease: Duration,
    ) -> Result<Upsert, StoreError> {
        Err(self.unbuilt())
    }

    pub async fn deregister(&self, _name: &str) -> Result<bool, StoreError> {
        Err(self.unbuilt())
    }
}
