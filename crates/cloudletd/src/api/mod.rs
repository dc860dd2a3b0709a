//! The REST API: parse and validate, call [`CloudletOps`], map errors to
//! status codes in one place ([`error::ApiFailure`]). Every call but the
//! liveness probes (`/health`, `/v1/ping`), the OpenAPI document and the
//! dashboard's page needs `Authorization: Bearer <token>`, and the caller
//! it names ([`Caller`]) decides what it sees: an operator's token every
//! VM and every call; a tenant's token its own VMs (another tenant's VM is
//! a 404) and no call that changes the cloudlet (403); a VM's session
//! credential (given in the answer that created it) reads, moves and
//! deletes that VM only.
//!
//! - this module: the router, authentication, uploads spooled to files;
//! - one module per resource: [`cloudlet`] (info, metrics), [`bases`],
//!   [`vms`], [`handoff`] (cloudlet to cloudlet);
//! - [`error`]: the one error -> status map; [`openapi`]: the document.

pub mod bases;
pub mod cloudlet;
pub mod error;
pub mod handoff;
pub mod history;
pub mod openapi;
mod ui;
pub mod vms;

pub use error::ApiFailure;
use error::ApiResult;
pub use openapi::{openapi_json, ApiDoc};

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use crate::commands::{Caller, CloudletOps};

/// Shared state of the HTTP layer.
pub struct AppState<C> {
    pub ops: C,
    /// The operator's tokens.
    pub tokens: Vec<String>,
    /// Each tenant's tokens: `(tenant, token)`.
    pub tenant_tokens: Vec<(String, String)>,
    /// Where uploads are spooled.
    pub spool: std::path::PathBuf,
    /// The handoff endpoints take only callers that showed a certificate
    /// of the fleet CA (the API serves TLS).
    pub fleet_only_handoffs: bool,
}

pub fn router<C: CloudletOps + Clone>(state: Arc<AppState<C>>) -> Router {
    use axum::routing::{delete, post, MethodRouter};
    // The credential is checked on the protected methods alone (a layer
    // on each), so that a method no route has is a 405 for everyone, not a
    // 401 (the public methods of a path are added after the layer).
    let auth = axum::middleware::from_fn_with_state(state.clone(), authenticate::<C>);
    let guard = |m: MethodRouter<Arc<AppState<C>>>| m.route_layer(auth.clone());
    // Calls that change the cloudlet itself: an operator's (checked after
    // the credential).
    let operator = |m: MethodRouter<Arc<AppState<C>>>| {
        guard(m.route_layer(axum::middleware::from_fn(operator_only)))
    };
    // A handoff's calls: an operator's credential (a peer's), and (with
    // TLS) a fleet member's certificate (checked first).
    let fleet = axum::middleware::from_fn_with_state(state.clone(), require_fleet_member::<C>);
    let peer = |m: MethodRouter<Arc<AppState<C>>>| operator(m).route_layer(fleet.clone());
    Router::new()
        .route("/v1/cloudlet", guard(get(cloudlet::cloudlet_info::<C>)))
        .route("/v1/ping", get(cloudlet::ping))
        .route(
            "/v1/base-vms",
            operator(post(bases::import_base::<C>)).merge(guard(get(bases::list_bases::<C>))),
        )
        .route(
            "/v1/base-vms/{name}",
            operator(delete(bases::delete_base::<C>)),
        )
        .route(
            "/v1/drain",
            operator(post(cloudlet::drain::<C>).delete(cloudlet::resume::<C>)),
        )
        .route(
            "/v1/vms",
            guard(post(vms::create_vm::<C>).get(vms::list_vms::<C>)),
        )
        .route(
            "/v1/vms/{id}",
            guard(delete(vms::delete_vm::<C>).get(vms::get_vm::<C>)),
        )
        .route("/v1/vms/{id}/handoff", guard(post(vms::handoff_vm::<C>)))
        .route(
            "/v1/handoff/prepare",
            peer(post(handoff::handoff_prepare::<C>)),
        )
        .route(
            "/v1/handoff/{hid}/stream",
            peer(post(handoff::handoff_stream::<C>)),
        )
        .route(
            "/v1/handoff/{hid}/commit",
            peer(post(handoff::handoff_commit::<C>)),
        )
        .route(
            "/v1/handoff/{hid}/abort",
            peer(post(handoff::handoff_abort::<C>)),
        )
        .route(
            "/v1/handoff/{hid}",
            peer(get(handoff::handoff_arrival::<C>)),
        )
        .route("/v1/events", guard(get(vms::events::<C>)))
        .route("/v1/handoffs", guard(get(history::list_handoffs::<C>)))
        .route(
            "/v1/handoffs/{handoff_id}",
            guard(get(history::get_handoff::<C>)),
        )
        .route("/metrics", operator(get(cloudlet::metrics::<C>)))
        .route(
            "/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], openapi_json()) }),
        )
        .route("/health", get(|| async { "ok" }))
        .route("/ui", get(ui::index))
        .route("/ui/", get(ui::index))
        .route("/ui/app.js", get(ui::script))
        .route("/ui/common.js", get(ui::common))
        .route("/ui/style.css", get(ui::style))
        .fallback(|| async {
            ApiFailure::new(StatusCode::NOT_FOUND, "not_found", "No such endpoint")
        })
        .method_not_allowed_fallback(|method: axum::http::Method| async move {
            ApiFailure::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{method} is not a method of this endpoint (see the Allow header)"),
            )
        })
        .with_state(state)
}

async fn require_fleet_member<C: CloudletOps>(
    State(st): State<Arc<AppState<C>>>,
    req: Request,
    next: Next,
) -> Response {
    if st.fleet_only_handoffs {
        let member = req
            .extensions()
            .get::<axum::extract::ConnectInfo<cloudlet_trust::tls::PeerAddr>>()
            .is_some_and(|c| c.0.fleet_member);
        if !member {
            return ApiFailure::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "A handoff comes only from a cloudlet of this fleet: its client certificate from the fleet CA (mutual TLS)",
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// Who calls ([`Caller`], put in the request's extensions for the
/// handlers): an operator's token, a tenant's, or the session credential
/// of the VM the request is about; else 401.
async fn authenticate<C: CloudletOps>(
    State(st): State<Arc<AppState<C>>>,
    headers: HeaderMap,
    mut req: Request,
    next: Next,
) -> Response {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer);
    let is = |k: &str, t: &str| constant_time_eq(k.as_bytes(), t.as_bytes());
    let caller = match given {
        None => {
            return ApiFailure::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Missing bearer token",
            )
            .into_response()
        }
        Some(t) if st.tokens.iter().any(|k| is(k, t)) => Caller::Operator,
        Some(t) if st.tenant_tokens.iter().any(|(_, k)| is(k, t)) => {
            let (tenant, _) = st.tenant_tokens.iter().find(|(_, k)| is(k, t)).unwrap();
            Caller::Tenant(tenant.clone())
        }
        // A VM's session credential: reads, moves and deletes that VM only.
        Some(t) => match session_vm(&req).and_then(|id| st.ops.session_opens(id, t)) {
            Some(vm) => Caller::Session(vm),
            None => {
                tracing::warn!(method = %req.method(), path = %req.uri().path(), "refused: wrong bearer token");
                return ApiFailure::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "Wrong bearer token",
                )
                .into_response();
            }
        },
    };
    // Every change is logged with who made it, and how it ended (reads at
    // debug: the dashboards poll).
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let who = caller.describe();
    req.extensions_mut().insert(caller);
    let resp = next.run(req).await;
    if method == axum::http::Method::GET {
        tracing::debug!(%method, %path, by = %who, status = resp.status().as_u16(), "api call");
    } else {
        tracing::info!(%method, %path, by = %who, status = resp.status().as_u16(), "api call");
    }
    resp
}

/// Calls that change the cloudlet itself (base VMs, maintenance, metrics,
/// handoffs from peers) are an operator's: a tenant's token is a 403.
async fn operator_only(req: Request, next: Next) -> Response {
    match req.extensions().get::<Caller>() {
        Some(Caller::Operator) => next.run(req).await,
        _ => ApiFailure::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "Only an operator's token may do this (a tenant's or a VM's credential may not)",
        )
        .into_response(),
    }
}

/// The credential of an `Authorization: Bearer ...` header (the scheme is
/// case-insensitive, RFC 7235).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start())
        .filter(|t| !t.is_empty())
}

/// The VM a session credential may act on in this request:
/// `POST /v1/vms/{id}/handoff`, `GET` and `DELETE /v1/vms/{id}`.
fn session_vm(req: &Request) -> Option<&str> {
    let rest = req.uri().path().strip_prefix("/v1/vms/")?;
    match (req.method().as_str(), rest.split_once('/')) {
        ("POST", Some((id, "handoff"))) => Some(id),
        ("DELETE" | "GET", None) if !rest.is_empty() => Some(rest),
        _ => None,
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Stream a request body into a new file under `dir`.
pub(super) async fn spool(dir: &std::path::Path, body: Body) -> ApiResult<std::path::PathBuf> {
    let io = |e: std::io::Error| {
        ApiFailure::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "spool",
            format!("Cannot spool the upload: {e}"),
        )
    };
    tokio::fs::create_dir_all(dir).await.map_err(io)?;
    let path = dir.join(format!("upload-{}", hex::encode(rand::random::<[u8; 8]>())));
    let mut f = tokio::fs::File::create(&path).await.map_err(io)?;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                let _ = tokio::fs::remove_file(&path).await;
                return Err(ApiFailure::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    format!("Upload interrupted: {e}"),
                ));
            }
        };
        if let Err(e) = f.write_all(&chunk).await {
            let _ = tokio::fs::remove_file(&path).await;
            return Err(io(e));
        }
    }
    f.flush().await.map_err(io)?;
    Ok(path)
}
