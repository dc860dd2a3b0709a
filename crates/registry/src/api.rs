//! JSON bodies of the registry API, shared by the server and the client.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One stored overlay, as listed by `GET /v1/overlays`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OverlayEntry {
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// RFC 3339 time of the last push.
    pub last_modified: String,
    /// Entity tag, quoted as in the `ETag` header.
    pub etag: Option<String>,
}

/// What the registry answers to an accepted push (`201`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PushReceipt {
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Identifier of the base VM the overlay applies to.
    pub base_id: String,
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Human-readable message.
    pub error: String,
    /// Stable machine-readable kind (see the crate docs).
    pub kind: String,
}
