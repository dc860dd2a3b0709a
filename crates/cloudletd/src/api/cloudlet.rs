//! `GET /v1/cloudlet`, `GET /v1/ping` and `GET /metrics`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use cloudlet_api::CloudletInfo;

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
