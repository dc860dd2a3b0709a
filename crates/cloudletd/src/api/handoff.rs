//! Cloudlet to cloudlet: `/v1/handoff/...`, the destination's side of a
//! handoff.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use cloudlet_api::ApiError;
use futures::StreamExt;

use super::error::ApiResult;
use super::AppState;
use crate::commands::CloudletOps;

/// Cloudlet to cloudlet: offer a VM; the destination prepares to receive it.
#[utoipa::path(post, path = "/v1/handoff/prepare", request_body = cloudlet_api::HandoffOffer, security(("bearer" = [])),
    responses((status = 403, description = "With TLS: the caller showed no certificate of the fleet CA (mutual TLS)", body = ApiError), (status = 201, body = cloudlet_api::HandoffPrepared), (status = 400, body = ApiError), (status = 409, body = ApiError),
        (status = 413, body = ApiError), (status = 415, body = ApiError), (status = 422, body = ApiError), (status = 503, body = ApiError)))]
pub(super) async fn handoff_prepare<C: CloudletOps>(
    State(st): State<Arc<AppState<C>>>,
    super::error::JsonBody(offer): super::error::JsonBody<cloudlet_api::HandoffOffer>,
) -> ApiResult<(StatusCode, Json<cloudlet_api::HandoffPrepared>)> {
    Ok((
        StatusCode::CREATED,
        Json(st.ops.prepare_incoming(offer).await?),
    ))
}

/// Cloudlet to cloudlet: the session stream (disk chunks, migration stream).
#[utoipa::path(post, path = "/v1/handoff/{hid}/stream", request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    security(("bearer" = [])), responses((status = 403, description = "With TLS: the caller showed no certificate of the fleet CA (mutual TLS)", body = ApiError), (status = 200, body = cloudlet_api::HandoffLoaded), (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub(super) async fn handoff_stream<C: CloudletOps>(
    State(st): State<Arc<AppState<C>>>,
    super::error::PathParam(hid): super::error::PathParam<String>,
    body: Body,
) -> ApiResult<Json<cloudlet_api::HandoffLoaded>> {
    Ok(Json(
        st.ops
            .receive_stream(
                &hid,
                body.into_data_stream()
                    .map(|r| r.map_err(std::io::Error::other))
                    .boxed(),
            )
            .await?,
    ))
}

/// Cloudlet to cloudlet: the source has stopped for good; run the VM here.
/// Repeating it repeats the answer (after a restart of the destination
/// too). A 4xx is a definite no: the VM did not and will not resume here
/// (404 unknown handoff, 409 `memory_differs` with the repair report or
/// `not_committed`); a 5xx or no answer says nothing.
#[utoipa::path(post, path = "/v1/handoff/{hid}/commit", security(("bearer" = [])),
    responses((status = 403, description = "With TLS: the caller showed no certificate of the fleet CA (mutual TLS)", body = ApiError), (status = 200, body = cloudlet_api::HandoffCommitted), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub(super) async fn handoff_commit<C: CloudletOps>(
    State(st): State<Arc<AppState<C>>>,
    super::error::PathParam(hid): super::error::PathParam<String>,
) -> ApiResult<Json<cloudlet_api::HandoffCommitted>> {
    Ok(Json(st.ops.commit_incoming(&hid).await?))
}

/// Cloudlet to cloudlet: how much of the session stream has arrived.
#[utoipa::path(get, path = "/v1/handoff/{hid}", security(("bearer" = [])),
    responses((status = 403, description = "With TLS: the caller showed no certificate of the fleet CA (mutual TLS)", body = ApiError), (status = 200, body = cloudlet_api::HandoffArrival), (status = 404, body = ApiError)))]
pub(super) async fn handoff_arrival<C: CloudletOps>(
    State(st): State<Arc<AppState<C>>>,
    super::error::PathParam(hid): super::error::PathParam<String>,
) -> ApiResult<Json<cloudlet_api::HandoffArrival>> {
    Ok(Json(st.ops.incoming_arrival(&hid)?))
}

/// Cloudlet to cloudlet: discard an arrival that was not committed.
#[utoipa::path(post, path = "/v1/handoff/{hid}/abort", security(("bearer" = [])),
    responses((status = 403, description = "With TLS: the caller showed no certificate of the fleet CA (mutual TLS)", body = ApiError), (status = 204), (status = 404, body = ApiError)))]
pub(super) async fn handoff_abort<C: CloudletOps>(
    State(st): State<Arc<AppState<C>>>,
    super::error::PathParam(hid): super::error::PathParam<String>,
) -> ApiResult<StatusCode> {
    st.ops.abort_incoming(&hid).await?;
    Ok(StatusCode::NO_CONTENT)
}
