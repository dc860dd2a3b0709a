//! The overlay registry of the cloud tier.
//!
//! The registry stores VM overlays (see [`cloudlet_overlay::format`]) in
//! object storage and serves them to cloudlets over HTTP. A cloudlet fetches
//! an overlay with range requests (header and manifest first, then segment
//! by segment), so it can start applying before the whole file has arrived.
//!
//! - [`serve`] runs a registry from a [`RegistryConfig`]; [`router`] gives the
//!   [`axum::Router`] of a [`RegistryState`] for embedding and tests.
//! - [`push_overlay`] and [`list_overlays`] are the client side used by the
//!   `cloudlet` CLI.
//!
//! # Storage
//!
//! Storage is an [`object_store::ObjectStore`]: by default a local directory
//! ([`StorageLocation::Dir`]), or an S3-compatible bucket
//! ([`StorageLocation::S3`], from a URL `s3://bucket/prefix`; endpoint, region
//! and credentials come from the standard `AWS_*` environment variables).
//! An overlay named `NAME` is the object `PREFIX/overlays/NAME`. Uploads go
//! through a multipart upload that becomes visible only when it completes, so
//! an overlay is never visible half-written; a refused upload is aborted and
//! leaves nothing behind.
//!
//! # HTTP API, version 1
//!
//! Every error is JSON `{"error": "<message>", "kind": "<kind>"}` with one of
//! these kinds:
//!
//! | kind | status | when |
//! |---|---|---|
//! | `invalid_name` | 400 | the overlay name is not `[A-Za-z0-9._-]{1,128}` or starts with a dot |
//! | `invalid_overlay` | 400 | a pushed body is not a complete, intact overlay |
//! | `untrusted_overlay` | 400 | a pushed overlay's signature is bad or expired, or not by a trusted key, or missing where the registry requires one (`RegistryConfig::signatures`) |
//! | `bad_request` | 400 | the request body could not be read |
//! | `unauthorized` | 401 | a push or delete without a valid bearer token |
//! | `not_found` | 404 | no overlay of that name |
//! | `precondition_failed` | 412 | `If-Match` names another version |
//! | `method_not_allowed` | 405 | a method the path has not (the `Allow` header lists those it has) |
//! | `range_not_satisfiable` | 416 | also carries `Content-Range: bytes */SIZE` |
//! | `storage` | 500 | the object store failed |
//! | `internal` | 500 | a bug in the registry |
//!
//! Unknown paths are `404` with kind `not_found`.
//!
//! ## `GET /openapi.json`
//!
//! This API as an OpenAPI 3 document ([`openapi`]; `docs/registry-openapi.json`).
//!
//! ## `GET /health`
//!
//! `200` with `{"status": "ok"}`.
//!
//! ## `GET /v1/overlays`
//!
//! `200` with a JSON array of [`OverlayEntry`], sorted by name:
//! `[{"name": "translator", "size": 123456, "last_modified":
//! "2026-01-01T00:00:00+00:00", "etag": "\"...\""}]`.
//!
//! ## `GET /v1/overlays/{name}`
//!
//! The overlay bytes (`Content-Type: application/octet-stream`), streamed from
//! storage. Every response carries `Accept-Ranges: bytes`, `ETag` and
//! `Last-Modified`.
//!
//! - No `Range`: `200` with the whole file.
//! - `Range: bytes=A-B`, `bytes=A-` or `bytes=-N` (one range): `206` with
//!   `Content-Range: bytes FIRST-LAST/SIZE` and those bytes. An end past the
//!   end of the file is clamped; a suffix longer than the file is the whole
//!   file.
//! - A range that starts at or after the end of the file, or `bytes=-0`: `416`
//!   with `Content-Range: bytes */SIZE`.
//! - A `Range` that is not one well-formed byte range (another unit, several
//!   ranges, `A > B`) is ignored, as RFC 9110 allows: `200`.
//! - `If-Range: "ETAG"` (or the `Last-Modified` date): the range is honoured
//!   only if the overlay is still that version, otherwise `200` with the
//!   whole new version. A cloudlet that fetches an overlay piece by piece
//!   sends the `ETag` of its first response so that it never mixes versions.
//! - `If-Match: "ETAG"`: `412` if the overlay is not that version.
//!
//! ## `HEAD /v1/overlays/{name}`
//!
//! The headers of a `GET` without body: `Content-Length` (the size), `ETag`,
//! `Last-Modified`, `Accept-Ranges: bytes`.
//!
//! ## `PUT /v1/overlays/{name}`
//!
//! Needs `Authorization: Bearer TOKEN` with one of the configured push tokens
//! (`401` otherwise; a registry without tokens refuses every push). The body
//! is the overlay file, streamed. The registry checks it while it streams,
//! with the validation every tool uses (`cloudlet_overlay::Validation`, full
//! level, any base id): the header, manifest and app metadata must be valid,
//! every segment must match its hash, and the body must end exactly at the
//! file length the header announces.
//! Anything else is `400` (`invalid_overlay`, with the reason) and nothing is
//! stored. On success `201` with a [`PushReceipt`]
//! `{"name", "size", "base_id"}`. A push to an existing name replaces it
//! atomically (the `ETag` changes). Before it answers a refused push, the
//! registry reads and discards up to 64 MiB (10 s) of the rest of the body,
//! so that a client still sending gets the error rather than a broken pipe;
//! past that it closes the connection. Clients that send `Content-Length`
//! let the registry refuse a body that disagrees with the header early.
//!
//! ## `DELETE /v1/overlays/{name}`
//!
//! Needs a push token. `204` if the overlay was deleted, `404` if there was
//! none.
//!
//! # Compatibility
//!
//! Paths are versioned (`/v1`). Fields may be added to JSON bodies; clients
//! ignore fields they do not know. Removing or changing a field or a status
//! code needs `/v2`.

mod api;
mod client;
mod error;
pub mod openapi;
mod range;
mod server;
mod storage;
#[cfg(test)]
mod testutil;
mod validate;

pub use api::{ErrorBody, OverlayEntry, PushReceipt};
pub use client::{list_overlays, push_overlay, ListOverlaysError, PushError};
pub use cloudlet_overlay::InvalidOverlay;
pub use error::RegistryError;
pub use range::{parse_range, ByteRange};
pub use server::{router, serve, serve_listener, validate_name, RegistryConfig, RegistryState};
pub use storage::{OpenStorageError, StorageLocation};
