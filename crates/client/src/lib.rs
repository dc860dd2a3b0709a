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
use std::time::Duration;

use cloudlet_api::{ApiError, BaseVmInfo, CloudletInfo, CreateVmRequest, VmInfo};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("Cannot reach the cloudlet at {url}: {detail}")]
    Connect { url: String, detail: String },
    /// The cloudlet refused: its status and reason.
    #[error("{message} ({status}, {kind})")]
    Api {
        status: u16,
        kind: String,
        message: String,
    },
    #[error("Unexpected answer from the cloudlet: {0}")]
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
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl Client {
    pub fn new(base_url: &str, token: Option<String>) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_default();
        Client {
            base: base_url.trim_end_matches('/').to_string(),
            token,
            http,
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(t) = &self.token {
            r = r.bearer_auth(t);
        }
        r
    }

    async fn send(&self, r: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let resp = r.send().await.map_err(|e| ClientError::Connect {
            url: self.base.clone(),
            detail: chain(&e),
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        Err(match serde_json::from_str::<ApiError>(&text) {
            Ok(e) => ClientError::Api {
                status,
                kind: e.kind,
                message: e.error,
            },
            Err(_) => ClientError::Api {
                status,
                kind: "http".into(),
                message: if text.is_empty() {
                    StatusCode::from_u16(status)
                        .map(|s| s.to_string())
                        .unwrap_or_default()
                } else {
                    text
                },
            },
        })
    }

    async fn json<T: DeserializeOwned>(
        &self,
        r: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        self.send(r)
            .await?
            .json()
            .await
            .map_err(|e| ClientError::Decode(chain(&e)))
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
