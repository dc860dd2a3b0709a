//! Base VMs: `/v1/base-vms`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use cloudlet_api::{ApiError, BaseVmInfo};

use super::error::ApiResult;
use super::{spool, AppState};
use crate::commands::CloudletOps;

#[utoipa::path(get, path = "/v1/base-vms", responses((status = 200, body = Vec<BaseVmInfo>)))]
pub(super) async fn list_bases<C: CloudletOps>(
    State(st): State<Arc<AppState<C>>>,
) -> ApiResult<Json<Vec<BaseVmInfo>>> {
    Ok(Json(st.ops.list_bases()?))
}

/// Import a base VM: the body is a file written by `cloudlet base export`.
#[utoipa::path(post, path = "/v1/base-vms", request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    security(("bearer" = [])),
    responses((status = 201, body = BaseVmInfo), (status = 422, body = ApiError), (status = 409, body = ApiError)))]
pub(super) async fn import_base<C: CloudletOps>(
    State(st): State<Arc<AppState<C>>>,
    body: Body,
) -> ApiResult<(StatusCode, Json<BaseVmInfo>)> {
    let file = spool(&st.spool, body).await?;
    let r = st.ops.import_base(file.clone()).await;
    let _ = std::fs::remove_file(&file);
    Ok((StatusCode::CREATED, Json(r?)))
}

#[utoipa::path(delete, path = "/v1/base-vms/{name}", security(("bearer" = [])),
    responses((status = 204), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub(super) async fn delete_base<C: CloudletOps>(
    State(st): State<Arc<AppState<C>>>,
    super::error::PathParam(name): super::error::PathParam<String>,
) -> ApiResult<StatusCode> {
    st.ops.delete_base(&name)?;
    Ok(StatusCode::NO_CONTENT)
}
