//! The HTTP underneath both clients: one base URL, an optional bearer
//! token, refusals decoded from the API's `ApiError` body.

use std::time::Duration;

use cloudlet_api::ApiError;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;

use crate::ClientError;

#[derive(Debug, Clone)]
pub(crate) struct Http {
    pub(crate) base: String,
    token: Option<String>,
    pub(crate) http: reqwest::Client,
}

/// An error with its causes, "a: b: c" (reqwest's own message hides them).
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl Http {
    pub(crate) fn new(base_url: &str, token: Option<String>, http: reqwest::Client) -> Self {
        Http {
            base: base_url.trim_end_matches('/').to_string(),
            token,
            http,
        }
    }

    pub(crate) fn rebased(&self, base_url: &str) -> Self {
        Http::new(base_url, self.token.clone(), self.http.clone())
    }

    /// A reqwest client with the connect timeout every call uses; it
    /// trusts the fleet CA only, when one is set
    /// (`cloudlet_trust::tls::fleet_ca`: `--ca`, `$CLOUDLET_CA`).
    pub(crate) fn default_client() -> reqwest::Client {
        cloudlet_trust::tls::client_builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_default()
    }

    pub(crate) fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(t) = &self.token {
            r = r.bearer_auth(t);
        }
        r
    }

    pub(crate) async fn send(
        &self,
        r: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ClientError> {
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

    pub(crate) async fn json<T: DeserializeOwned>(
        &self,
        r: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        self.send(r)
            .await?
            .json()
            .await
            .map_err(|e| ClientError::Decode(chain(&e)))
    }
}
