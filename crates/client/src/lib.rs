//! A typed client of the cloudlet REST API (`/v1`).
//!
//! ```no_run
//! # async fn demo() -> Result<(), cloudlet_client::ClientError> {
//! let c = cloudlet_client::Client::new("http://127.0.0.1:7450", Some("token".into()));
//! let vm = c.create_vm(&cloudlet_api::CreateVmRequest {
//!     overlay: "http://registry:7460/v1/overlays/translator".into(),
//!     name: None,
//!     flavor: None,
//! }).await?;
//! println!("app at {}", vm.ports[0].endpoint);
//! # Ok(()) }
//! ```

use std::path::Path;

use cloudlet_api::events::HandoffRecord;
use cloudlet_api::{BaseVmInfo, CloudletInfo, CreateVmRequest, VmInfo};
use reqwest::Method;
use serde::de::DeserializeOwned;

pub mod directory;
pub mod events;
pub mod forward;
mod http;
pub mod session;

pub use directory::{Choice, DirectoryClient, Discovery, Probe, ProbeOptions};
pub use events::Events;
use http::{chain, Http};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("Cannot reach {url}: {detail}")]
    Connect { url: String, detail: String },
    /// The cloudlet (or directory) refused: its status and reason.
    #[error("{message} ({status}, {kind})")]
    Api {
        status: u16,
        kind: String,
        message: String,
    },
    #[error("Unexpected answer: {0}")]
    Decode(String),
    #[error("Cannot read {path}: {detail}")]
    File { path: String, detail: String },
}

impl ClientError {
    /// The HTTP status of an API refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A client of one cloudlet.
#[derive(Debug, Clone)]
pub struct Client {
    http: Http,
}

impl Client {
    pub fn new(base_url: &str, token: Option<String>) -> Self {
        Client {
            http: Http::new(base_url, token, Http::default_client()),
        }
    }

    /// A client over `http` (e.g. one that trusts a given CA).
    pub fn with_http(base_url: &str, token: Option<String>, http: reqwest::Client) -> Self {
        Client {
            http: Http::new(base_url, token, http),
        }
    }

    pub fn base_url(&self) -> &str {
        &self.http.base
    }

    /// The same credentials, another cloudlet (one the directory chose).
    pub fn at(&self, base_url: &str) -> Client {
        Client {
            http: self.http.rebased(base_url),
        }
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, path)
    }

    async fn send(&self, r: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        self.http.send(r).await
    }

    async fn json<T: DeserializeOwned>(
        &self,
        r: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        self.http.json(r).await
    }

    pub async fn info(&self) -> Result<CloudletInfo, ClientError> {
        self.json(self.request(Method::GET, "/v1/cloudlet")).await
    }

    pub async fn list_bases(&self) -> Result<Vec<BaseVmInfo>, ClientError> {
        self.json(self.request(Method::GET, "/v1/base-vms")).await
    }

    /// Upload a base VM export file.
    pub async fn import_base(&self, file: &Path) -> Result<BaseVmInfo, ClientError> {
        let body = file_body(file).await?;
        self.json(
            self.request(Method::POST, "/v1/base-vms")
                .header("content-type", "application/octet-stream")
                .body(body),
        )
        .await
    }

    pub async fn delete_base(&self, name: &str) -> Result<(), ClientError> {
        self.send(self.request(Method::DELETE, &format!("/v1/base-vms/{name}")))
            .await
            .map(|_| ())
    }

    pub async fn list_vms(&self) -> Result<Vec<VmInfo>, ClientError> {
        self.json(self.request(Method::GET, "/v1/vms")).await
    }

    pub async fn get_vm(&self, id: &str) -> Result<VmInfo, ClientError> {
        self.json(self.request(Method::GET, &format!("/v1/vms/{id}")))
            .await
    }

    /// Synthesize a VM from an overlay URL; answers when the app runs.
    pub async fn create_vm(&self, req: &CreateVmRequest) -> Result<VmInfo, ClientError> {
        self.json(self.request(Method::POST, "/v1/vms").json(req))
            .await
    }

    /// Synthesize a VM from an overlay file sent in the request.
    pub async fn create_vm_upload(
        &self,
        overlay: &Path,
        name: Option<&str>,
        flavor: Option<&str>,
    ) -> Result<VmInfo, ClientError> {
        let mut q = Vec::new();
        if let Some(n) = name {
            q.push(("name", n));
        }
        if let Some(f) = flavor {
            q.push(("flavor", f));
        }
        let body = file_body(overlay).await?;
        self.json(
            self.request(Method::POST, "/v1/vms")
                .query(&q)
                .header("content-type", "application/octet-stream")
                .body(body),
        )
        .await
    }

    pub async fn delete_vm(&self, id: &str) -> Result<(), ClientError> {
        self.send(self.request(Method::DELETE, &format!("/v1/vms/{id}")))
            .await
            .map(|_| ())
    }

    /// Move a running VM to another cloudlet; answers when it runs there.
    pub async fn handoff(
        &self,
        id: &str,
        destination: &str,
        destination_token: Option<&str>,
    ) -> Result<cloudlet_api::HandoffReport, ClientError> {
        let req = cloudlet_api::HandoffRequest {
            destination: destination.to_string(),
            token: destination_token.map(str::to_string),
        };
        self.json(
            self.request(Method::POST, &format!("/v1/vms/{id}/handoff"))
                .json(&req),
        )
        .await
    }

    /// Maintenance: no new work here, every VM handed to a neighbour;
    /// answers when done.
    pub async fn drain(&self) -> Result<cloudlet_api::DrainReport, ClientError> {
        self.json(self.request(Method::POST, "/v1/drain")).await
    }

    /// End the maintenance.
    pub async fn resume(&self) -> Result<(), ClientError> {
        self.send(self.request(Method::DELETE, "/v1/drain"))
            .await
            .map(|_| ())
    }

    /// What happens on the cloudlet from now on (`GET /v1/events`).
    pub async fn events(&self) -> Result<Events, ClientError> {
        let r = self.request(Method::GET, "/v1/events");
        Ok(Events::new(self.send(r).await?))
    }

    /// The handoffs out of the cloudlet, the newest first (`GET /v1/handoffs`).
    pub async fn handoffs(&self) -> Result<Vec<HandoffRecord>, ClientError> {
        self.json(self.request(Method::GET, "/v1/handoffs")).await
    }

    /// One handoff out of the cloudlet, with its course over time.
    pub async fn get_handoff(&self, handoff_id: &str) -> Result<HandoffRecord, ClientError> {
        self.json(self.request(Method::GET, &format!("/v1/handoffs/{handoff_id}")))
            .await
    }

    pub async fn metrics(&self) -> Result<String, ClientError> {
        self.send(self.request(Method::GET, "/metrics"))
            .await?
            .text()
            .await
            .map_err(|e| ClientError::Decode(chain(&e)))
    }
}

async fn file_body(path: &Path) -> Result<reqwest::Body, ClientError> {
    let f = tokio::fs::File::open(path)
        .await
        .map_err(|e| ClientError::File {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
    Ok(reqwest::Body::wrap_stream(
        tokio_util::io::ReaderStream::with_capacity(f, 1 << 20),
    ))
}
