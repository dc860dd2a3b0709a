//! A directory served on the server runtime (`Serving::bind`, the same
//! server `cloudlet directory serve` runs), and its configurations.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use cloudlet_directory::{Directory, DirectoryConfig, Serving};
use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// A directory served on the server runtime.
pub struct Served {
    pub url: String,
    pub directory: Arc<Directory>,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<Result<(), cloudlet_directory::ServeError>>,
}

pub async fn serve(rt: &Handle, config: DirectoryConfig) -> anyhow::Result<Served> {
    let (ready_tx, ready_rx) = oneshot::channel();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let done = rt.spawn(async move {
        let serving = match Serving::bind(config).await {
            Ok(s) => s,
            Err(e) => {
                let _ = ready_tx.send(Err(e.to_string()));
                return Ok(());
            }
        };
        let _ = ready_tx.send(Ok((serving.addr, serving.directory.clone())));
        serving
            .run(async {
                let _ = stop_rx.await;
            })
            .await
    });
    let (addr, directory) = ready_rx
        .await
        .context("the directory task ended")?
        .map_err(|e| anyhow!("the directory did not start: {e}"))?;
    Ok(Served {
        url: format!("http://{addr}"),
        directory,
        stop: Some(stop_tx),
        done,
    })
}

impl Served {
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match tokio::time::timeout(Duration::from_secs(10), &mut self.done).await {
            Ok(r) => r??,
            Err(_) => {
                self.done.abort();
                eprintln!("  (the directory did not stop within 10 s: aborted)");
            }
        }
        Ok(())
    }
}

pub fn config(store: &Path, heartbeat_ms: u64, lease_ms: u64) -> DirectoryConfig {
    DirectoryConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        store: store.to_path_buf(),
        heartbeat_ms,
        lease_ms,
        ..DirectoryConfig::default()
    }
}

pub fn etcd_config(
    endpoints: &[String],
    prefix: &str,
    heartbeat_ms: u64,
    lease_ms: u64,
) -> DirectoryConfig {
    DirectoryConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        etcd: endpoints.to_vec(),
        etcd_prefix: prefix.into(),
        heartbeat_ms,
        lease_ms,
        ..DirectoryConfig::default()
    }
}
