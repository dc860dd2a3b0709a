//! The cloud tier's directory: cloudlets register with their resources and
//! caches and renew a lease by heartbeat; devices find the best cloudlet
//! for their app (`GET /v1/cloudlets`), with why each candidate is where
//! it is; dashboards watch the changes.
//!
//! - [`api`]: the REST API and its OpenAPI document;
//! - [`service`]: the operations (auth, checks), one error enum each;
//! - [`rank`]: the ranking, a pure function;
//! - [`index`]: the live view in memory, with a revisioned event log;
//! - [`store`]: the embedded store (redb) and etcd;
//! - [`config`]: the settings, with embedded defaults.

pub mod api;
pub mod config;
pub mod index;
pub mod rank;
pub mod service;
pub mod store;
mod ui;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

pub use config::DirectoryConfig;
pub use service::Directory;
use store::{Store, StoreError};

/// The store the config names.
pub async fn open_store(config: &DirectoryConfig) -> Result<Store, StoreError> {
    if config.etcd.is_empty() {
        Ok(Store::Embedded(store::embedded::Embedded::open(
            &config.store,
            std::time::Duration::from_millis(config.lease_ms),
        )?))
    } else {
        Ok(Store::Etcd(
            store::etcd::Etcd::connect(&config.etcd, &config.etcd_prefix).await?,
        ))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {detail}")]
    Listen { addr: SocketAddr, detail: String },
    #[error("the server failed: {0}")]
    Serve(String),
}

/// A directory listening (what `cloudlet directory serve` and the tests run).
pub struct Serving {
    pub addr: SocketAddr,
    pub directory: Arc<Directory>,
    listener: tokio::net::TcpListener,
}

impl Serving {
    /// Open the store and bind the listener.
    pub async fn bind(config: DirectoryConfig) -> Result<Self, ServeError> {
        config.check()?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| ServeError::Listen {
                addr: config.listen,
                detail: e.to_string(),
            })?;
        let addr = listener.local_addr().map_err(|e| ServeError::Listen {
            addr: config.listen,
            detail: e.to_string(),
        })?;
        let store = open_store(&config).await?;
        if config.open_enrollment && !addr.ip().is_loopback() {
            tracing::warn!(
                "open enrollment on {addr}: any cloudlet may claim a free name (list cloudlets and set open_enrollment = false to close it)"
            );
        }
        Ok(Serving {
            addr,
            directory: Directory::new(config, store),
            listener,
        })
    }

    /// Serve until `shutdown` resolves, then write what is still in memory.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let app = api::router(self.directory.clone())
            .into_make_service_with_connect_info::<cloudlet_trust::tls::PeerAddr>();
        let tls = match &self.directory.config.tls {
            Some(t) => Some(
                cloudlet_trust::tls::server_config(t)
                    .map_err(|e| ServeError::Serve(e.to_string()))?,
            ),
            None => None,
        };
        tracing::info!(addr = %self.addr, store = self.directory.store.kind(), tls = tls.is_some(), "directory serving");
        let listener = cloudlet_trust::tls::ServeListener::new(self.listener, tls)
            .map_err(|e| ServeError::Serve(e.to_string()))?;
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(|e| ServeError::Serve(e.to_string()));
        self.directory.store.flush().await?;
        served
    }
}

/// A directory serving in the background ([`Serving::spawn`]): for tests,
/// benchmarks and programs that embed one.
pub struct Background {
    pub addr: SocketAddr,
    pub directory: Arc<Directory>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<Result<(), ServeError>>,
}

impl Serving {
    /// Serve on a task of the current runtime until [`Background::stop`].
    pub fn spawn(self) -> Background {
        let (addr, directory) = (self.addr, self.directory.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let done = tokio::spawn(self.run(async {
            let _ = rx.await;
        }));
        Background {
            addr,
            directory,
            stop: Some(tx),
            done,
        }
    }
}

impl Background {
    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stop serving and write what is still in memory (as on SIGTERM).
    pub async fn stop(mut self) -> Result<(), ServeError> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        (&mut self.done)
            .await
            .map_err(|e| ServeError::Serve(e.to_string()))?
    }

    /// Gone at once, as in a crash: the task is aborted (its connections
    /// drop), nothing is flushed.
    pub async fn crash(self) {
        self.done.abort();
        let _ = self.done.await;
    }
}
