//! The one place that maps registry errors to HTTP responses.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::api::ErrorBody;
use cloudlet_overlay::InvalidOverlay;

/// Why a registry request failed. Each variant has a stable
/// [`kind`](Self::kind) and one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("Invalid overlay name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("Overlay refused")]
    InvalidOverlay(#[source] InvalidOverlay),
    #[error("Cannot read the request body")]
    Body(#[source] axum::Error),
    #[error("Missing or invalid push token")]
    Unauthorized,
    #[error("No overlay named {0:?}")]
    NotFound(String),
    #[error("Overlay {0:?} is not the version named by If-Match")]
    PreconditionFailed(String),
    #[error("Range not satisfiable for an overlay of {size} bytes")]
    RangeNotSatisfiable { size: u64 },
    #[error("Storage failed")]
    Storage(#[source] object_store::Error),
    #[error("No such route")]
    NoRoute,
    #[error("{0} is not a method of this endpoint (see the Allow header)")]
    MethodNotAllowed(String),
    #[error("Internal error: {0}")]
    Internal(&'static str),
}

impl RegistryError {
    /// The stable machine-readable kind, the `kind` of the JSON error body.
    pub fn kind(&self) -> &'static str {
        match self {
            RegistryError::InvalidName { .. } => "invalid_name",
            RegistryError::InvalidOverlay(InvalidOverlay::Signature(_)) => "untrusted_overlay",
            RegistryError::InvalidOverlay(_) => "invalid_overlay",
            RegistryError::Body(_) => "bad_request",
            RegistryError::Unauthorized => "unauthorized",
            RegistryError::NotFound(_) => "not_found",
            RegistryError::PreconditionFailed(_) => "precondition_failed",
            RegistryError::RangeNotSatisfiable { .. } => "range_not_satisfiable",
            RegistryError::Storage(_) => "storage",
            RegistryError::NoRoute => "not_found",
            RegistryError::MethodNotAllowed(_) => "method_not_allowed",
            RegistryError::Internal(_) => "internal",
        }
    }

    /// The HTTP status of the error.
    pub fn status(&self) -> StatusCode {
        match self {
            RegistryError::InvalidName { .. }
            | RegistryError::InvalidOverlay(_)
            | RegistryError::Body(_) => StatusCode::BAD_REQUEST,
            RegistryError::Unauthorized => StatusCode::UNAUTHORIZED,
            RegistryError::NotFound(_) | RegistryError::NoRoute => StatusCode::NOT_FOUND,
            RegistryError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            RegistryError::PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
            RegistryError::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            RegistryError::Storage(_) | RegistryError::Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// The message with its whole chain of causes.
    pub fn message(&self) -> String {
        let mut msg = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(e) = source {
            msg.push_str(": ");
            msg.push_str(&e.to_string());
            source = e.source();
        }
        msg
    }
}

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = ErrorBody {
            error: self.message(),
            kind: self.kind().into(),
        };
        if status.is_server_error() {
            tracing::error!(kind = body.kind, "{}", body.error);
        } else {
            tracing::debug!(kind = body.kind, "{}", body.error);
        }
        let mut response = (status, Json(body)).into_response();
        let headers = response.headers_mut();
        match self {
            RegistryError::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            RegistryError::RangeNotSatisfiable { size } => {
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    headers.insert(header::CONTENT_RANGE, v);
                }
                headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
            }
            _ => {}
        }
        response
    }
}
