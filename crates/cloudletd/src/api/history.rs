//! The handoff history: `GET /v1/handoffs`, `GET /v1/handoffs/{handoff_id}`
//! (kept by `core::handoffs`).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use cloudlet_api::events::HandoffRecord;
use cloudlet_api::ApiError;
use serde::Deserialize;

use super::error::{ApiFailure, ApiResult, PathParam, QueryParams};
use super::AppState;
use crate::commands::{Caller, CloudletOps};

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct HistoryParams {
    /// At most this many (default and most: 100).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<u32>,
}

/// The handoffs out of this cloudlet, moved or failed, the newest first:
/// what moved where, its downtime, phases and course over time.
#[utoipa::path(get, path = "/v1/handoffs", params(HistoryParams),
    responses((status = 200, body = Vec<HandoffRecord>), (status = 400, body = ApiError)))]
pub(super) async fn list_handoffs<C: CloudletOps>(
    State(st): State<Arc<AppState<C>>>,
    Extension(caller): Extension<Caller>,
    QueryParams(p): QueryParams<HistoryParams>,
) -> ApiResult<Json<Vec<HandoffRecord>>> {
    let limit = p.limit.unwrap_or(100);
    if !(1..=100).contains(&limit) {
        return Err(ApiFailure::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("limit {limit}: from 1 to 100"),
        ));
    }
    Ok(Json(st.ops.handoffs(&caller, limit as usize)))
}

/// One handoff out of this cloudlet.
#[utoipa::path(get, path = "/v1/handoffs/{handoff_id}",
    responses((status = 200, body = HandoffRecord), (status = 404, body = ApiError)))]
pub(super) async fn get_handoff<C: CloudletOps>(
    State(st): State<Arc<AppState<C>>>,
    Extension(caller): Extension<Caller>,
    PathParam(id): PathParam<String>,
) -> ApiResult<Json<HandoffRecord>> {
    st.ops.handoff(&caller, &id).map(Json).ok_or_else(|| {
        ApiFailure::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("No handoff {id} in this cloudlet's history"),
        )
    })
}
