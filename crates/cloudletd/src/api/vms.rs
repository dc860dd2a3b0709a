//! VMs: `/v1/vms` (synthesis, delete) and `POST /v1/vms/{id}/handoff`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::{Extension, Json};
use cloudlet_api::{ApiError, CreateVmRequest, VmInfo};
use serde::Deserialize;

use super::error::{ApiFailure, ApiResult};
use super::{spool, AppState};
use crate::commands::{Caller, CloudletOps};
use crate::synth::fetch::OverlaySource;

#[utoipa::path(get, path = "/v1/vms", responses((status = 200, body = Vec<VmInfo>)))]
pub(super) async fn list_vms<C: CloudletOps>(
    State(st): State<Arc<AppState<C>>>,
    Extension(caller): Extension<Caller>,
) -> Json<Vec<VmInfo>> {
    Json(st.ops.list_vms(&caller))
}

#[utoipa::path(get, path = "/v1/vms/{id}", responses((status = 200, body = VmInfo), (status = 404, body = ApiError)))]
pub(super) async fn get_vm<C: CloudletOps>(
    State(st): State<Arc<AppState<C>>>,
    Extension(caller): Extension<Caller>,
    super::error::PathParam(id): super::error::PathParam<String>,
) -> ApiResult<Json<VmInfo>> {
    Ok(Json(st.ops.get_vm(&caller, &id)?))
}

#[derive(Debug, Deserialize)]
pub(super) struct UploadParams {
    name: Option<String>,
    flavor: Option<String>,
}

/// Synthesize a VM. JSON body [`CreateVmRequest`] with an overlay URL, or
/// the overlay itself as an `application/octet-stream` body (with `name`
/// and `flavor` as query parameters). Answers when the app is running;
/// while it runs, `GET /v1/vms` shows its progress.
#[utoipa::path(post, path = "/v1/vms", request_body = CreateVmRequest, security(("bearer" = [])),
    params(("name" = Option<String>, Query, description = "VM name, for uploads"), ("flavor" = Option<String>, Query, description = "Flavor, for uploads")),
    responses((status = 201, body = VmInfo), (status = 400, body = ApiError), (status = 401, body = ApiError),
        (status = 409, body = ApiError), (status = 413, body = ApiError), (status = 422, body = ApiError), (status = 502, body = ApiError), (status = 503, body = ApiError)))]
pub(super) async fn create_vm<C: CloudletOps>(
    State(st): State<Arc<AppState<C>>>,
    Extension(caller): Extension<Caller>,
    super::error::QueryParams(params): super::error::QueryParams<UploadParams>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, Json<VmInfo>)> {
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let (req, source, upload) = if ctype.starts_with("application/octet-stream") {
        let file = spool(&st.spool, body).await?;
        let req = CreateVmRequest {
            overlay: "upload".into(),
            name: params.name,
            flavor: params.flavor,
        };
        (req, OverlaySource::File(file.clone()), Some(file))
    } else {
        const LIMIT: usize = 1 << 20;
        let bytes = axum::body::to_bytes(body, LIMIT)
            .await
            .map_err(|e| super::error::body_read_failure(e, LIMIT))?;
        let req: CreateVmRequest = serde_json::from_slice(&bytes).map_err(|e| {
            use serde_json::error::Category;
            let (status, kind) = match e.classify() {
                Category::Data => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
                _ => (StatusCode::BAD_REQUEST, "invalid_json"),
            };
            ApiFailure::new(status, kind, format!("Invalid JSON body: {e}"))
        })?;
        let source = OverlaySource::Url(req.overlay.clone());
        (req, source, None)
    };
    let r = st.ops.create_vm(&caller, req, source).await;
    if let Some(f) = upload {
        let _ = std::fs::remove_file(f);
    }
    Ok((StatusCode::CREATED, Json(r?)))
}

#[utoipa::path(delete, path = "/v1/vms/{id}", security(("bearer" = [])),
    responses((status = 204), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub(super) async fn delete_vm<C: CloudletOps>(
    State(st): State<Arc<AppState<C>>>,
    Extension(caller): Extension<Caller>,
    super::error::PathParam(id): super::error::PathParam<String>,
) -> ApiResult<StatusCode> {
    st.ops.delete_vm(&caller, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Move a running VM to another cloudlet; answers when it runs there.
#[utoipa::path(post, path = "/v1/vms/{id}/handoff", request_body = cloudlet_api::HandoffRequest, security(("bearer" = [])),
    responses((status = 200, body = cloudlet_api::HandoffReport), (status = 404, body = ApiError), (status = 409, body = ApiError),
        (status = 400, body = ApiError), (status = 413, body = ApiError), (status = 415, body = ApiError), (status = 422, body = ApiError),
        (status = 502, body = ApiError)))]
pub(super) async fn handoff_vm<C: CloudletOps>(
    State(st): State<Arc<AppState<C>>>,
    Extension(caller): Extension<Caller>,
    super::error::PathParam(id): super::error::PathParam<String>,
    super::error::JsonBody(req): super::error::JsonBody<cloudlet_api::HandoffRequest>,
) -> ApiResult<Json<cloudlet_api::HandoffReport>> {
    Ok(Json(st.ops.handoff_vm(&caller, &id, req).await?))
}

/// What happens on this cloudlet, from the moment of the call, as
/// server-sent events: every change of a VM's state (no `event:` name,
/// `data:` one `VmEvent` as JSON), the progress of every synthesis and
/// handoff out (`event: progress`, one `ProgressEvent`), `event: lagged`
/// when this watcher fell behind (`data:` the events it missed).
#[utoipa::path(get, path = "/v1/events",
    responses((status = 200, description = "text/event-stream: VmEvent (default event), ProgressEvent (event: progress), lagged (event: lagged, data: a count)",
        content_type = "text/event-stream", body = cloudlet_api::VmEvent)))]
pub(super) async fn events<C: CloudletOps + Clone>(
    State(st): State<Arc<AppState<C>>>,
    Extension(caller): Extension<Caller>,
) -> axum::response::sse::Sse<
    impl futures::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use cloudlet_api::events::CloudletEvent;
    let rx = st.ops.events();
    let ops = st.ops.clone();
    let stream = futures::stream::unfold((rx, ops, caller), |(mut rx, ops, caller)| async move {
        let ev = loop {
            let ev = match rx.recv().await {
                Ok(e) => e,
                // A watcher that fell behind is told, and goes on.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    CloudletEvent::Lagged(n)
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            };
            // A tenant watches its own VMs alone.
            let seen = match (&ev, &caller) {
                (_, Caller::Operator) | (CloudletEvent::Lagged(_), _) => true,
                (CloudletEvent::Vm(e), Caller::Tenant(t)) => {
                    e.tenant.as_deref() == Some(t.as_str())
                }
                (CloudletEvent::Vm(e), Caller::Session(v)) => e.vm_id == *v,
                (CloudletEvent::Progress(p), c) => ops.sees(c, &p.vm_id),
            };
            if seen {
                break ev;
            }
        };
        let sse = Event::default().data(ev.data());
        let sse = match ev.sse_name() {
            Some(name) => sse.event(name),
            None => sse,
        };
        Some((Ok(sse), (rx, ops, caller)))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
