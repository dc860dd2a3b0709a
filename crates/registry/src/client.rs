//! Client side of the registry, used by `cloudlet overlay push` and by
//! anything that lists overlays.

use std::path::{Path, PathBuf};

use reqwest::header;

use crate::api::{ErrorBody, OverlayEntry, PushReceipt};
use crate::server::validate_name;

/// Why a push failed.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("Invalid overlay name {0:?}: [A-Za-z0-9._-]{{1,128}}, not starting with a dot")]
    InvalidName(String),
    #[error("Cannot read {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot push to {url}")]
    Request {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("Registry refused the push with {status} ({kind}): {message}")]
    Refused {
        status: u16,
        kind: String,
        message: String,
    },
    #[error("Unexpected answer from {url}")]
    Response {
        url: String,
        #[source]
        source: reqwest::Error,
    },
}

/// Why listing failed.
#[derive(Debug, thiserror::Error)]
pub enum ListOverlaysError {
    #[error("Cannot reach {url}")]
    Request {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("Registry refused the listing with {status} ({kind}): {message}")]
    Refused {
        status: u16,
        kind: String,
        message: String,
    },
    #[error("Unexpected answer from {url}")]
    Response {
        url: String,
        #[source]
        source: reqwest::Error,
    },
}

fn overlays_url(registry_url: &str) -> String {
    format!("{}/v1/overlays", registry_url.trim_end_matches('/'))
}

/// Status, kind and message of an error response.
async fn refusal(response: reqwest::Response) -> (u16, String, String) {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    match serde_json::from_str::<ErrorBody>(&text) {
        Ok(body) => (status, body.kind, body.error),
        Err(_) => (status, "unknown".into(), text.chars().take(1000).collect()),
    }
}

/// Pushes the overlay `file` to the registry at `registry_url` (e.g.
/// `http://registry:7400`) as `name`, streaming it (the file is never held
/// in memory). The registry checks the overlay before it stores it and
/// replaces any overlay of the same name.
pub async fn push_overlay(
    registry_url: &str,
    token: &str,
    name: &str,
    file: &Path,
) -> Result<PushReceipt, PushError> {
    if validate_name(name).is_err() {
        return Err(PushError::InvalidName(name.into()));
    }
    let open_error = |source| PushError::Open {
        path: file.to_path_buf(),
        source,
    };
    let f = tokio::fs::File::open(file).await.map_err(open_error)?;
    let len = f.metadata().await.map_err(open_error)?.len();
    let body =
        reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(f, 256 << 10));
    let url = format!("{}/{name}", overlays_url(registry_url));
    let response = cloudlet_trust::tls::client_builder()
        .build()
        .unwrap_or_default()
        .put(&url)
        .bearer_auth(token)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, len)
        .body(body)
        .send()
        .await
        .map_err(|source| PushError::Request {
            url: url.clone(),
            source,
        })?;
    if !response.status().is_success() {
        let (status, kind, message) = refusal(response).await;
        return Err(PushError::Refused {
            status,
            kind,
            message,
        });
    }
    response
        .json()
        .await
        .map_err(|source| PushError::Response { url, source })
}

/// Lists the overlays of the registry at `registry_url`, sorted by name.
pub async fn list_overlays(registry_url: &str) -> Result<Vec<OverlayEntry>, ListOverlaysError> {
    let url = overlays_url(registry_url);
    let response = cloudlet_trust::tls::client_builder()
        .build()
        .unwrap_or_default()
        .get(&url)
        .send()
        .await
        .map_err(|source| ListOverlaysError::Request {
            url: url.clone(),
            source,
        })?;
    if !response.status().is_success() {
        let (status, kind, message) = refusal(response).await;
        return Err(ListOverlaysError::Refused {
            status,
            kind,
            message,
        });
    }
    response
        .json()
        .await
        .map_err(|source| ListOverlaysError::Response { url, source })
}
