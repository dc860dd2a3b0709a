//! `GET /v1/cloudlet`, `GET /v1/ping`, `GET /metrics` and the
//! maintenance (`POST`/`DELETE /v1/drain`).

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use cloudlet_api::CloudletInfo;

use super::error::ApiResult;
use super::AppState;
use crate::commands::CloudletOps;

#[utoipa::path(get, path = "/v1/cloudlet", responses((status = 200, body = CloudletInfo)))]
pub(super) async fn cloudlet_info<C: CloudletOps>(
    State(st): State<Arc<AppState<C>>>,
) -> Json<CloudletInfo> {
    Json(st.ops.info())
}

#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format", body = String)))]
pub(super) async fn metrics<C: CloudletOps>(
    State(st): State<Arc<AppState<C>>>,
) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.ops.metrics(),
    )
}

/// A device's round-trip probe (`cloudlet discover`): answered at once,
/// anonymous, a few bytes.
#[utoipa::path(get, path = "/v1/ping", responses((status = 200, description = "`pong`", body = String)))]
pub(super) async fn ping() -> &'static str {
    "pong"
}

/// Maintenance: take no new VMs and no moves in, and hand every running VM
/// to its best neighbour (the directory's, then the static peers); answers
/// when done, with where each VM went or why it stayed.
#[utoipa::path(post, path = "/v1/drain", security(("bearer" = [])),
    responses((status = 200, body = cloudlet_api::DrainReport), (status = 500, body = cloudlet_api::ApiError)))]
pub(super) async fn drain<C: CloudletOps>(
    State(st): State<Arc<AppState<C>>>,
) -> ApiResult<Json<cloudlet_api::DrainReport>> {
    Ok(Json(st.ops.drain().await?))
}

/// End the maintenance: new VMs and moves in are taken again.
#[utoipa::path(delete, path = "/v1/drain", security(("bearer" = [])),
    responses((status = 204), (status = 500, body = cloudlet_api::ApiError)))]
pub(super) async fn resume<C: CloudletOps>(
    State(st): State<Arc<AppState<C>>>,
) -> ApiResult<axum::http::StatusCode> {
    st.ops.resume()?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}
