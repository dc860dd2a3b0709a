//! HTTP handlers: parse and check the request, then talk to the object store.
//! The API is documented in the crate docs.

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;

use axum::body::{Body, BodyDataStream, Bytes};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectMeta, ObjectStore, WriteMultipart};
use tokio::net::TcpListener;

use crate::api::{ErrorBody, OverlayEntry, PushReceipt};
use crate::error::RegistryError;
use crate::range::parse_range;
use crate::storage::{OpenStorageError, StorageLocation};
use crate::validate::{push_check, DEFAULT_MAX_PREFIX_LEN};
use cloudlet_overlay::signature::SignaturePolicy;
use cloudlet_overlay::ValidOverlay;

/// What an operator gives to run a registry (`cloudlet registry serve`).
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Address to listen on, e.g. `0.0.0.0:7400`.
    pub listen: SocketAddr,
    /// Where overlays are stored.
    pub storage: StorageLocation,
    /// Bearer tokens allowed to push and delete. Empty: the registry is
    /// read-only.
    pub push_tokens: Vec<String>,
    /// What a push must carry of a signature (default: a signed overlay
    /// must verify and be unexpired; unsigned ones are taken).
    pub signatures: SignaturePolicy,
    /// Serve HTTPS only, with these files (`cloudlet pki issue`).
    pub tls: Option<cloudlet_trust::tls::TlsConfig>,
    /// Without `tls`, serve plain HTTP on an address other than loopback
    /// anyway (refused otherwise).
    pub plain_http: bool,
}

impl RegistryConfig {
    /// A configuration without push tokens (read-only).
    pub fn new(listen: SocketAddr, storage: StorageLocation) -> RegistryConfig {
        RegistryConfig {
            listen,
            storage,
            push_tokens: Vec::new(),
            signatures: SignaturePolicy::default(),
            tls: None,
            plain_http: false,
        }
    }
}

/// The state shared by the handlers: the store and the push tokens.
#[derive(Clone)]
pub struct RegistryState {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn ObjectStore>,
    /// Directory of the overlays in the store.
    dir: ObjectPath,
    /// Hashes of the push tokens (compared in constant time).
    push_tokens: Vec<blake3::Hash>,
    max_prefix_len: u64,
    signatures: SignaturePolicy,
}

impl std::fmt::Debug for RegistryState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryState")
            .field("store", &self.inner.store.to_string())
            .field("dir", &self.inner.dir)
            .field("push_tokens", &self.inner.push_tokens.len())
            .finish()
    }
}

/// Size of one part of a multipart upload (S3 needs at least 5 MiB).
const PART_SIZE: usize = 8 << 20;
/// Parts uploaded at the same time, per push.
const PARTS_IN_FLIGHT: usize = 2;

impl RegistryState {
    /// State over an open store; overlays live under `prefix/overlays/`.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        prefix: ObjectPath,
        push_tokens: &[String],
    ) -> RegistryState {
        RegistryState {
            inner: Arc::new(Inner {
                store,
                dir: prefix.child("overlays"),
                push_tokens: push_tokens
                    .iter()
                    .map(|t| blake3::hash(t.as_bytes()))
                    .collect(),
                max_prefix_len: DEFAULT_MAX_PREFIX_LEN,
                signatures: SignaturePolicy::default(),
            }),
        }
    }

    /// Pushes must pass `policy` (see [`RegistryConfig::signatures`]).
    pub fn with_signatures(mut self, policy: SignaturePolicy) -> RegistryState {
        Arc::get_mut(&mut self.inner)
            .expect("set before the state is shared")
            .signatures = policy;
        self
    }

    /// Opens the storage of a configuration.
    pub fn open(config: &RegistryConfig) -> Result<RegistryState, OpenStorageError> {
        let (store, prefix) = config.storage.open()?;
        Ok(RegistryState::new(store, prefix, &config.push_tokens)
            .with_signatures(config.signatures.clone()))
    }

    fn location(&self, name: &str) -> ObjectPath {
        self.inner.dir.child(name)
    }

    fn store(&self) -> &dyn ObjectStore {
        self.inner.store.as_ref()
    }

    fn authorize(&self, headers: &HeaderMap) -> Result<(), RegistryError> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| blake3::hash(token.trim().as_bytes()))
            .ok_or(RegistryError::Unauthorized)?;
        // blake3::Hash compares in constant time.
        let mut ok = false;
        for t in &self.inner.push_tokens {
            ok |= *t == token;
        }
        if ok {
            Ok(())
        } else {
            Err(RegistryError::Unauthorized)
        }
    }
}

/// Checks an overlay name: `[A-Za-z0-9._-]{1,128}`, not starting with a dot.
pub fn validate_name(name: &str) -> Result<(), RegistryError> {
    let bad = |reason| {
        Err(RegistryError::InvalidName {
            name: name.chars().take(200).collect(),
            reason,
        })
    };
    if name.is_empty() || name.len() > 128 {
        return bad("must be 1 to 128 characters long");
    }
    if name.starts_with('.') {
        return bad("must not start with a dot");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return bad("only letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

/// The registry's routes over `state`.
pub fn router(state: RegistryState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/overlays", get(list_handler))
        .route(
            "/v1/overlays/{name}",
            get(get_handler)
                .head(head_handler)
                .put(put_handler)
                .delete(delete_handler),
        )
        .route(
            "/openapi.json",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "application/json")],
                    crate::openapi::openapi_json(),
                )
            }),
        )
        .fallback(|| async { RegistryError::NoRoute })
        .method_not_allowed_fallback(|method: axum::http::Method| async move {
            RegistryError::MethodNotAllowed(method.to_string())
        })
        // Pushes are streamed and checked, never buffered whole.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// Runs a registry until Ctrl-C.
pub async fn serve(config: RegistryConfig) -> anyhow::Result<()> {
    use anyhow::Context;
    cloudlet_trust::tls::check_plain_http(config.listen, config.tls.is_some(), config.plain_http)?;
    let state = RegistryState::open(&config)
        .with_context(|| format!("Cannot open the storage {}", config.storage))?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("Cannot listen on {}", config.listen))?;
    if config.push_tokens.is_empty() {
        tracing::warn!("No push token configured: the registry is read-only");
    }
    tracing::info!(
        listen = %listener.local_addr()?,
        storage = %config.storage,
        tls = config.tls.is_some(),
        "Overlay registry listening"
    );
    let tls = match &config.tls {
        Some(t) => Some(cloudlet_trust::tls::server_config(t)?),
        None => None,
    };
    let listener = cloudlet_trust::tls::ServeListener::new(listener, tls)?;
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("Registry server failed")
}

/// Serves the registry on an already bound listener, forever (tests and
/// embedding; port 0 is fine).
pub async fn serve_listener(listener: TcpListener, state: RegistryState) -> std::io::Result<()> {
    axum::serve(listener, router(state)).await
}

#[utoipa::path(get, path = "/health", responses((status = 200, description = "`{\"status\": \"ok\"}`", body = Object)))]
pub(crate) async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

fn storage_error(name: &str, e: object_store::Error) -> RegistryError {
    match e {
        object_store::Error::NotFound { .. } => RegistryError::NotFound(name.into()),
        e => RegistryError::Storage(e),
    }
}

/// The `ETag` header form of a store's entity tag (always quoted).
fn quoted_etag(meta: &ObjectMeta) -> Option<String> {
    let e = meta.e_tag.as_deref()?;
    if e.starts_with('"') || e.starts_with("W/") {
        Some(e.to_string())
    } else {
        Some(format!("\"{e}\""))
    }
}

fn http_date(meta: &ObjectMeta) -> String {
    meta.last_modified
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string()
}

fn overlay_entry(name: String, meta: &ObjectMeta) -> OverlayEntry {
    OverlayEntry {
        name,
        size: meta.size,
        last_modified: meta.last_modified.to_rfc3339(),
        etag: quoted_etag(meta),
    }
}

#[utoipa::path(get, path = "/v1/overlays", responses((status = 200, body = Vec<OverlayEntry>), (status = 500, body = ErrorBody)))]
pub(crate) async fn list_handler(
    State(state): State<RegistryState>,
) -> Result<Json<Vec<OverlayEntry>>, RegistryError> {
    let dir = &state.inner.dir;
    let mut objects = state.store().list(Some(dir));
    let mut entries = Vec::new();
    while let Some(meta) = objects.next().await {
        let meta = meta.map_err(RegistryError::Storage)?;
        let Some(parts) = meta.location.prefix_match(dir) else {
            continue;
        };
        let parts: Vec<_> = parts.collect();
        if let [name] = parts.as_slice() {
            if validate_name(name.as_ref()).is_ok() {
                entries.push(overlay_entry(name.as_ref().to_string(), &meta));
            }
        }
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(entries))
}

/// Does an `If-Match` value match the current version?
fn if_match_ok(value: &str, etag: Option<&str>) -> bool {
    let value = value.trim();
    if value == "*" {
        return true;
    }
    let Some(etag) = etag.filter(|e| !e.starts_with("W/")) else {
        return false;
    };
    value.split(',').any(|v| v.trim() == etag)
}

/// Should the `Range` be honoured, given `If-Range`?
fn if_range_ok(value: &str, meta: &ObjectMeta) -> bool {
    let value = value.trim();
    if value.starts_with('"') {
        quoted_etag(meta).as_deref() == Some(value)
    } else {
        value == http_date(meta)
    }
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn check_if_match(headers: &HeaderMap, name: &str, meta: &ObjectMeta) -> Result<(), RegistryError> {
    match header_str(headers, header::IF_MATCH) {
        Some(v) if !if_match_ok(v, quoted_etag(meta).as_deref()) => {
            Err(RegistryError::PreconditionFailed(name.into()))
        }
        _ => Ok(()),
    }
}

fn base_headers(meta: &ObjectMeta) -> Vec<(header::HeaderName, HeaderValue)> {
    let mut h = vec![
        (header::ACCEPT_RANGES, HeaderValue::from_static("bytes")),
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        ),
    ];
    if let Some(v) = quoted_etag(meta).and_then(|e| HeaderValue::from_str(&e).ok()) {
        h.push((header::ETAG, v));
    }
    if let Ok(v) = HeaderValue::from_str(&http_date(meta)) {
        h.push((header::LAST_MODIFIED, v));
    }
    h
}

#[utoipa::path(head, path = "/v1/overlays/{name}", params(("name" = String, Path, description = "The overlay's name: `[A-Za-z0-9._-]{1,128}`, not starting with a dot", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")),
    responses((status = 200, description = "Size, `ETag`, `Last-Modified`, `Accept-Ranges`"), (status = 400), (status = 404), (status = 412)))]
pub(crate) async fn head_handler(
    State(state): State<RegistryState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, RegistryError> {
    validate_name(&name)?;
    let meta = state
        .store()
        .head(&state.location(&name))
        .await
        .map_err(|e| storage_error(&name, e))?;
    check_if_match(&headers, &name, &meta)?;
    let mut response = Response::new(Body::empty());
    let h = response.headers_mut();
    h.extend(base_headers(&meta));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(meta.size));
    Ok(response)
}

#[utoipa::path(get, path = "/v1/overlays/{name}", params(("name" = String, Path, description = "The overlay's name: `[A-Za-z0-9._-]{1,128}`, not starting with a dot", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")),
    responses((status = 200, description = "The whole overlay", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 206, description = "One range (`Range: bytes=...`)", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 412, body = ErrorBody),
        (status = 416, body = ErrorBody), (status = 500, body = ErrorBody)))]
pub(crate) async fn get_handler(
    State(state): State<RegistryState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, RegistryError> {
    validate_name(&name)?;
    let location = state.location(&name);
    let range = header_str(&headers, header::RANGE).and_then(parse_range);
    let Some(range) = range else {
        // Whole file: one request, the metadata comes with the stream.
        let result = state
            .store()
            .get_opts(&location, GetOptions::default())
            .await
            .map_err(|e| storage_error(&name, e))?;
        check_if_match(&headers, &name, &result.meta)?;
        let meta = result.meta.clone();
        return Ok(stream_response(&meta, None, result.into_stream()));
    };
    // A range needs the size first. The read is tied to the version the
    // size came from; if the overlay is replaced in between, start over.
    let mut attempt = 0;
    loop {
        attempt += 1;
        let meta = state
            .store()
            .head(&location)
            .await
            .map_err(|e| storage_error(&name, e))?;
        check_if_match(&headers, &name, &meta)?;
        let honour = match header_str(&headers, header::IF_RANGE) {
            Some(v) => if_range_ok(v, &meta),
            None => true,
        };
        let wanted = if honour {
            Some(
                range
                    .resolve(meta.size)
                    .ok_or(RegistryError::RangeNotSatisfiable { size: meta.size })?,
            )
        } else {
            None
        };
        let options = GetOptions {
            if_match: meta.e_tag.clone(),
            range: wanted.clone().map(GetRange::Bounded),
            ..GetOptions::default()
        };
        match state.store().get_opts(&location, options).await {
            Ok(result) => {
                let meta = result.meta.clone();
                let sent = wanted.map(|_| result.range.clone());
                return Ok(stream_response(&meta, sent, result.into_stream()));
            }
            Err(object_store::Error::Precondition { .. }) if attempt < 3 => continue,
            Err(e) => return Err(storage_error(&name, e)),
        }
    }
}

fn stream_response(
    meta: &ObjectMeta,
    range: Option<Range<u64>>,
    stream: futures::stream::BoxStream<'static, object_store::Result<Bytes>>,
) -> Response {
    let mut response = Response::new(Body::from_stream(stream));
    let h = response.headers_mut();
    h.extend(base_headers(meta));
    match range {
        None => {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(meta.size));
        }
        Some(r) => {
            *response.status_mut() = StatusCode::PARTIAL_CONTENT;
            let h = response.headers_mut();
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(r.end - r.start));
            let content_range = format!("bytes {}-{}/{}", r.start, r.end - 1, meta.size);
            if let Ok(v) = HeaderValue::from_str(&content_range) {
                h.insert(header::CONTENT_RANGE, v);
            }
        }
    }
    response
}

/// A multipart upload that is aborted unless it completes, even when the
/// handler is dropped halfway (the client went away).
struct Upload(Option<WriteMultipart>);

impl Upload {
    fn writer(&mut self) -> &mut WriteMultipart {
        self.0.as_mut().expect("upload already finished")
    }

    async fn finish(mut self) -> object_store::Result<()> {
        let w = self.0.take().expect("upload already finished");
        w.finish().await.map(|_| ())
    }

    async fn abort(mut self) {
        if let Some(w) = self.0.take() {
            if let Err(e) = w.abort().await {
                tracing::warn!("Cannot abort a refused upload: {e}");
            }
        }
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if let Some(w) = self.0.take() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    if let Err(e) = w.abort().await {
                        tracing::warn!("Cannot abort a refused upload: {e}");
                    }
                });
            }
        }
    }
}

#[utoipa::path(put, path = "/v1/overlays/{name}", params(("name" = String, Path, description = "The overlay's name: `[A-Za-z0-9._-]{1,128}`, not starting with a dot", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")), security(("bearer" = [])),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The overlay file, checked whole as it streams in"),
    responses((status = 201, body = PushReceipt), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 412, body = ErrorBody), (status = 500, body = ErrorBody)))]
pub(crate) async fn put_handler(
    State(state): State<RegistryState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<PushReceipt>), RegistryError> {
    let mut stream = body.into_data_stream();
    let result = put_overlay(&state, name, &headers, &mut stream).await;
    if result.is_err() {
        drain(&mut stream).await;
    }
    result
}

/// Most of a refused body the registry reads, and for how long, so that the
/// client (still sending) gets the answer rather than a broken pipe.
const DRAIN_LIMIT: usize = 64 << 20;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(10);

async fn drain(stream: &mut BodyDataStream) {
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        let mut read = 0;
        while let Some(Ok(chunk)) = stream.next().await {
            read += chunk.len();
            if read > DRAIN_LIMIT {
                break;
            }
        }
    })
    .await;
}

async fn put_overlay(
    state: &RegistryState,
    name: String,
    headers: &HeaderMap,
    stream: &mut BodyDataStream,
) -> Result<(StatusCode, Json<PushReceipt>), RegistryError> {
    state.authorize(headers)?;
    validate_name(&name)?;
    let mut upload = None;
    let announced = header_str(headers, header::CONTENT_LENGTH).and_then(|v| v.parse().ok());
    let received = receive_overlay(state, &name, announced, stream, &mut upload).await;
    let overlay = match (received, upload) {
        (Ok(overlay), Some(upload)) => {
            upload.finish().await.map_err(RegistryError::Storage)?;
            overlay
        }
        (Ok(_), None) => return Err(RegistryError::Internal("accepted overlay without upload")),
        (Err(e), upload) => {
            if let Some(upload) = upload {
                upload.abort().await;
            }
            return Err(e);
        }
    };
    let receipt = PushReceipt {
        name,
        size: overlay.size(),
        base_id: overlay.manifest.base_id.clone(),
    };
    tracing::info!(
        name = receipt.name,
        size = receipt.size,
        base_id = receipt.base_id,
        "Overlay stored"
    );
    Ok((StatusCode::CREATED, Json(receipt)))
}

/// Streams a pushed body into a multipart upload while checking it. The
/// upload is opened only once the header and manifest are good, so garbage
/// never reaches the store.
async fn receive_overlay(
    state: &RegistryState,
    name: &str,
    announced: Option<u64>,
    stream: &mut BodyDataStream,
    upload: &mut Option<Upload>,
) -> Result<ValidOverlay, RegistryError> {
    // With a Content-Length, a body of the wrong length is refused as soon
    // as the header and manifest have passed.
    let mut validator = push_check(
        state.inner.max_prefix_len,
        announced,
        &state.inner.signatures,
    );
    let mut pending: Vec<Bytes> = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(RegistryError::Body)?;
        validator
            .feed(&chunk)
            .map_err(RegistryError::InvalidOverlay)?;
        match upload.as_mut() {
            Some(u) => {
                u.writer()
                    .wait_for_capacity(PARTS_IN_FLIGHT)
                    .await
                    .map_err(RegistryError::Storage)?;
                u.writer().put(chunk);
            }
            None => {
                pending.push(chunk);
                if validator.header().is_some() {
                    let multipart = state
                        .store()
                        .put_multipart(&state.location(name))
                        .await
                        .map_err(RegistryError::Storage)?;
                    let u = upload.insert(Upload(Some(WriteMultipart::new_with_chunk_size(
                        multipart, PART_SIZE,
                    ))));
                    for b in pending.drain(..) {
                        u.writer().put(b);
                    }
                }
            }
        }
    }
    validator.finish().map_err(RegistryError::InvalidOverlay)
}

#[utoipa::path(delete, path = "/v1/overlays/{name}", params(("name" = String, Path, description = "The overlay's name: `[A-Za-z0-9._-]{1,128}`, not starting with a dot", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")), security(("bearer" = [])),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 412, body = ErrorBody), (status = 500, body = ErrorBody)))]
pub(crate) async fn delete_handler(
    State(state): State<RegistryState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, RegistryError> {
    state.authorize(&headers)?;
    validate_name(&name)?;
    let location = state.location(&name);
    // Stores (S3) report success for deleting a missing object: look first.
    state
        .store()
        .head(&location)
        .await
        .map_err(|e| storage_error(&name, e))?;
    state
        .store()
        .delete(&location)
        .await
        .map_err(|e| storage_error(&name, e))?;
    tracing::info!(name, "Overlay deleted");
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "translator-v2.ovl", "A_B", &"x".repeat(128)] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a b",
            "a#1",
            "café",
            "a\0",
            &"x".repeat(129),
        ] {
            assert!(
                matches!(validate_name(bad), Err(RegistryError::InvalidName { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn preconditions() {
        assert!(if_match_ok("*", None));
        assert!(if_match_ok("\"a\", \"b\"", Some("\"b\"")));
        assert!(!if_match_ok("\"a\"", Some("\"b\"")));
        assert!(!if_match_ok("W/\"a\"", Some("W/\"a\"")));
        assert!(!if_match_ok("\"a\"", None));
    }
}
