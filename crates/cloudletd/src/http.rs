//! The REST API: parse and validate, call [`CloudletOps`], map errors to
//! status codes in one place ([`ApiFailure`]). Calls that change something
//! need `Authorization: Bearer <token>`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use cloudlet_api::{ApiError, BaseVmInfo, CloudletInfo, CreateVmRequest, VmInfo};
use futures::StreamExt;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use utoipa::OpenApi;

use crate::cloudlet::{BaseOpError, CreateVmError, VmOpError};
use crate::commands::CloudletOps;
use crate::handoff::{HandoffError, ReceiveHandoffError};
use crate::synth::fetch::{FetchOverlayError, OverlaySource};

/// Shared state of the HTTP layer.
pub struct AppState<C> {
    pub ops: C,
    pub tokens: Vec<String>,
    pub http: reqwest::Client,
    /// Where uploads are spooled.
    pub spool: std::path::PathBuf,
}

/// Every error the API answers with: one place for status codes.
#[derive(Debug)]
pub struct ApiFailure {
    status: StatusCode,
    kind: &'static str,
    message: String,
    memory_differs: Option<cloudlet_api::MemoryDifference>,
}

impl ApiFailure {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            memory_differs: None,
        }
    }
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        let body = ApiError {
            error: self.message,
            kind: self.kind.into(),
            memory_differs: self.memory_differs,
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<CreateVmError> for ApiFailure {
    fn from(e: CreateVmError) -> Self {
        let (status, kind) = create_vm_status(&e);
        ApiFailure::new(status, kind, crate::error_chain(&e))
    }
}

fn create_vm_status(e: &CreateVmError) -> (StatusCode, &'static str) {
    use CreateVmError as E;
    {
        match e {
            E::UnknownFlavor(_) | E::BadName(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            E::NameTaken(_) => (StatusCode::CONFLICT, "name_taken"),
            E::Overlay(FetchOverlayError::Status { status: 404, .. }) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "overlay_not_found")
            }
            E::Overlay(FetchOverlayError::Scheme { .. }) => {
                (StatusCode::BAD_REQUEST, "invalid_request")
            }
            E::Overlay(FetchOverlayError::Connect { .. })
            | E::Overlay(FetchOverlayError::Status { .. }) => {
                (StatusCode::BAD_GATEWAY, "overlay_unreachable")
            }
            E::Overlay(_) | E::Metadata(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_overlay"),
            E::BaseNotHeld { .. } => (StatusCode::CONFLICT, "base_not_held"),
            E::FlavorTooSmall { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "flavor_too_small"),
            E::OverCapacity { .. } | E::NoPorts(..) => {
                (StatusCode::SERVICE_UNAVAILABLE, "over_capacity")
            }
            E::Synthesis(s) => match s {
                crate::synth::SynthesizeError::Apply(_)
                | crate::synth::SynthesizeError::Fetch(FetchOverlayError::Format(_))
                | crate::synth::SynthesizeError::Fetch(FetchOverlayError::Truncated { .. }) => {
                    (StatusCode::UNPROCESSABLE_ENTITY, "invalid_overlay")
                }
                crate::synth::SynthesizeError::Fetch(_) => {
                    (StatusCode::BAD_GATEWAY, "overlay_unreachable")
                }
                _ => (StatusCode::INTERNAL_SERVER_ERROR, "synthesis_failed"),
            },
            E::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "store"),
        }
    }
}

impl From<VmOpError> for ApiFailure {
    fn from(e: VmOpError) -> Self {
        let (status, kind) = match &e {
            VmOpError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            // Never 404 for a VM that exists but is busy (mid-handoff): a
            // caller could conclude it may start it elsewhere.
            VmOpError::Busy { .. } => (StatusCode::CONFLICT, "busy"),
            VmOpError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "store"),
        };
        ApiFailure::new(status, kind, crate::error_chain(&e))
    }
}

impl From<BaseOpError> for ApiFailure {
    fn from(e: BaseOpError) -> Self {
        use cloudlet_base::BaseError as B;
        let (status, kind) = match &e {
            BaseOpError::Base(B::NotFound(_)) => (StatusCode::NOT_FOUND, "not_found"),
            BaseOpError::InUse { .. } => (StatusCode::CONFLICT, "busy"),
            BaseOpError::Archive(cloudlet_base::ArchiveError::Corrupt { .. }) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "invalid_base")
            }
            BaseOpError::Archive(cloudlet_base::ArchiveError::Exists(_)) => {
                (StatusCode::CONFLICT, "exists")
            }
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "base_store"),
        };
        ApiFailure::new(status, kind, crate::error_chain(&e))
    }
}

impl From<HandoffError> for ApiFailure {
    fn from(e: HandoffError) -> Self {
        use HandoffError as H;
        let (status, kind) = match &e {
            H::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            H::NotRunning { .. } | H::StillStarting(_) => (StatusCode::CONFLICT, "busy"),
            H::NoToken(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            H::Refused { .. }
            | H::Unreachable { .. }
            | H::MemoryDiffers { .. }
            | H::NotRepaired { .. }
            | H::BadAnswer { .. }
            | H::StoppedReading { .. } => (StatusCode::BAD_GATEWAY, "destination_failed"),
            H::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            H::CommitUnknown { .. } => (StatusCode::GATEWAY_TIMEOUT, "commit_unknown"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "handoff_failed"),
        };
        ApiFailure::new(status, kind, crate::error_chain(&e))
    }
}

impl From<ReceiveHandoffError> for ApiFailure {
    fn from(e: ReceiveHandoffError) -> Self {
        use ReceiveHandoffError as R;
        let (status, kind) = match &e {
            R::BaseNotHeld(_) => (StatusCode::CONFLICT, "base_not_held"),
            R::UnknownHandoff(_) => (StatusCode::NOT_FOUND, "not_found"),
            R::Exists(_) => (StatusCode::CONFLICT, "exists"),
            R::Protocol { .. } => (StatusCode::CONFLICT, "protocol_mismatch"),
            R::StaleGeneration { .. } => (StatusCode::CONFLICT, "stale_generation"),
            // Definite refusals of a commit (the source may resume its VM).
            R::NotCommitted(_) => (StatusCode::CONFLICT, "not_committed"),
            R::WrongStage { .. } => (StatusCode::CONFLICT, "wrong_stage"),
            R::MemoryDiffers(report) => {
                let mut f = ApiFailure::new(
                    StatusCode::CONFLICT,
                    "memory_differs",
                    crate::error_chain(&e),
                );
                f.memory_differs = Some(crate::handoff::peer::memory_difference(report));
                return f;
            }
            R::Create(c) => create_vm_status(c),
            R::Session(_)
            | R::Decode(_)
            | R::Truncated
            | R::MigrationIncomplete
            | R::Idle(_)
            | R::Body(_)
            | R::UnexpectedFrame { .. }
            | R::RepairOutside { .. }
            | R::DigestChunk { .. }
            | R::MemorySize { .. } => (StatusCode::BAD_REQUEST, "invalid_stream"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "handoff_failed"),
        };
        ApiFailure::new(status, kind, crate::error_chain(&e))
    }
}

type ApiResult<T> = Result<T, ApiFailure>;

/// The OpenAPI 3 document of this API (served at `/openapi.json`).
#[derive(OpenApi)]
#[openapi(
    info(title = "cloudlet", description = "Cloudlet REST API: base VMs, VM synthesis, handoff"),
    paths(cloudlet_info, list_bases, import_base, delete_base, list_vms, create_vm, get_vm, delete_vm, metrics,
        handoff_vm, handoff_prepare, handoff_stream, handoff_commit, handoff_abort, handoff_arrival),
    components(schemas(
        CloudletInfo, BaseVmInfo, VmInfo, CreateVmRequest, ApiError,
        cloudlet_api::Location, cloudlet_api::Resources, cloudlet_api::Flavor, cloudlet_api::VmState,
        cloudlet_api::PortMapping, cloudlet_api::Progress, cloudlet_api::StageTiming,
        cloudlet_api::HandoffRequest, cloudlet_api::HandoffReport, cloudlet_api::HandoffOffer,
        cloudlet_api::HandoffPrepared, cloudlet_api::HandoffLoaded, cloudlet_api::HandoffCommitted,
        cloudlet_api::AppInfo, cloudlet_api::MemoryDifference, cloudlet_api::DifferingChunk
    )),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;
impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let c = openapi.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The OpenAPI document as pretty JSON (what `docs/openapi.json` holds).
pub fn openapi_json() -> String {
    ApiDoc::openapi().to_pretty_json().unwrap_or_default()
}

pub fn router<C: CloudletOps + Clone>(state: Arc<AppState<C>>) -> Router {
    let protected = Router::new()
        .route("/v1/base-vms", axum::routing::post(import_base::<C>))
        .route(
            "/v1/base-vms/{name}",
            axum::routing::delete(delete_base::<C>),
        )
        .route("/v1/vms", axum::routing::post(create_vm::<C>))
        .route("/v1/vms/{id}", axum::routing::delete(delete_vm::<C>))
        .route("/v1/vms/{id}/handoff", axum::routing::post(handoff_vm::<C>))
        .route(
            "/v1/handoff/prepare",
            axum::routing::post(handoff_prepare::<C>),
        )
        .route(
            "/v1/handoff/{hid}/stream",
            axum::routing::post(handoff_stream::<C>),
        )
        .route(
            "/v1/handoff/{hid}/commit",
            axum::routing::post(handoff_commit::<C>),
        )
        .route(
            "/v1/handoff/{hid}/abort",
            axum::routing::post(handoff_abort::<C>),
        )
        .route(
            "/v1/handoff/{hid}",
            axum::routing::get(handoff_arrival::<C>),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token::<C>,
        ));
    Router::new()
        .route("/v1/cloudlet", get(cloudlet_info::<C>))
        .route("/v1/base-vms", get(list_bases::<C>))
        .route("/v1/vms", get(list_vms::<C>))
        .route("/v1/vms/{id}", get(get_vm::<C>))
        .route("/metrics", get(metrics::<C>))
        .route(
            "/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], openapi_json()) }),
        )
        .route("/health", get(|| async { "ok" }))
        .merge(protected)
        .fallback(|| async {
            ApiFailure::new(StatusCode::NOT_FOUND, "not_found", "No such endpoint")
        })
        .with_state(state)
}

async fn require_token<C: CloudletOps>(
    State(st): State<Arc<AppState<C>>>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        None => ApiFailure::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Missing bearer token",
        )
        .into_response(),
        Some(t)
            if st
                .tokens
                .iter()
                .any(|k| constant_time_eq(k.as_bytes(), t.as_bytes())) =>
        {
            next.run(req).await
        }
        Some(_) => ApiFailure::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Wrong bearer token",
        )
        .into_response(),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[utoipa::path(get, path = "/v1/cloudlet", responses((status = 200, body = CloudletInfo)))]
async fn cloudlet_info<C: CloudletOps>(State(st): State<Arc<AppState<C>>>) -> Json<CloudletInfo> {
    Json(st.ops.info())
}

#[utoipa::path(get, path = "/v1/base-vms", responses((status = 200, body = Vec<BaseVmInfo>)))]
async fn list_bases<C: CloudletOps>(
    State(st): State<Arc<AppState<C>>>,
) -> ApiResult<Json<Vec<BaseVmInfo>>> {
    Ok(Json(st.ops.list_bases()?))
}

/// Import a base VM: the body is a file written by `cloudlet base export`.
#[utoipa::path(post, path = "/v1/base-vms", request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    security(("bearer" = [])),
    responses((status = 201, body = BaseVmInfo), (status = 422, body = ApiError), (status = 409, body = ApiError)))]
async fn import_base<C: CloudletOps>(
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
async fn delete_base<C: CloudletOps>(
    State(st): State<Arc<AppState<C>>>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    st.ops.delete_base(&name)?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/vms", responses((status = 200, body = Vec<VmInfo>)))]
async fn list_vms<C: CloudletOps>(State(st): State<Arc<AppState<C>>>) -> Json<Vec<VmInfo>> {
    Json(st.ops.list_vms())
}

#[utoipa::path(get, path = "/v1/vms/{id}", responses((status = 200, body = VmInfo), (status = 404, body = ApiError)))]
async fn get_vm<C: CloudletOps>(
    State(st): State<Arc<AppState<C>>>,
    Path(id): Path<String>,
) -> ApiResult<Json<VmInfo>> {
    Ok(Json(st.ops.get_vm(&id)?))
}

#[derive(Debug, Deserialize)]
struct UploadParams {
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
        (status = 409, body = ApiError), (status = 422, body = ApiError), (status = 502, body = ApiError), (status = 503, body = ApiError)))]
async fn create_vm<C: CloudletOps>(
    State(st): State<Arc<AppState<C>>>,
    Query(params): Query<UploadParams>,
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
        let bytes = axum::body::to_bytes(body, 1 << 20).await.map_err(|e| {
            ApiFailure::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("Cannot read body: {e}"),
            )
        })?;
        let req: CreateVmRequest = serde_json::from_slice(&bytes).map_err(|e| {
            ApiFailure::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("Invalid JSON body: {e}"),
            )
        })?;
        let source = OverlaySource::Url {
            client: st.http.clone(),
            url: req.overlay.clone(),
        };
        (req, source, None)
    };
    let r = st.ops.create_vm(req, source).await;
    if let Some(f) = upload {
        let _ = std::fs::remove_file(f);
    }
    Ok((StatusCode::CREATED, Json(r?)))
}

#[utoipa::path(delete, path = "/v1/vms/{id}", security(("bearer" = [])),
    responses((status = 204), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn delete_vm<C: CloudletOps>(
    State(st): State<Arc<AppState<C>>>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    st.ops.delete_vm(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Move a running VM to another cloudlet; answers when it runs there.
#[utoipa::path(post, path = "/v1/vms/{id}/handoff", request_body = cloudlet_api::HandoffRequest, security(("bearer" = [])),
    responses((status = 200, body = cloudlet_api::HandoffReport), (status = 404, body = ApiError), (status = 409, body = ApiError),
        (status = 502, body = ApiError)))]
async fn handoff_vm<C: CloudletOps>(
    State(st): State<Arc<AppState<C>>>,
    Path(id): Path<String>,
    Json(req): Json<cloudlet_api::HandoffRequest>,
) -> ApiResult<Json<cloudlet_api::HandoffReport>> {
    Ok(Json(st.ops.handoff_vm(&id, req).await?))
}

/// Cloudlet to cloudlet: offer a VM; the destination prepares to receive it.
#[utoipa::path(post, path = "/v1/handoff/prepare", request_body = cloudlet_api::HandoffOffer, security(("bearer" = [])),
    responses((status = 201, body = cloudlet_api::HandoffPrepared), (status = 409, body = ApiError), (status = 503, body = ApiError)))]
async fn handoff_prepare<C: CloudletOps>(
    State(st): State<Arc<AppState<C>>>,
    Json(offer): Json<cloudlet_api::HandoffOffer>,
) -> ApiResult<(StatusCode, Json<cloudlet_api::HandoffPrepared>)> {
    Ok((
        StatusCode::CREATED,
        Json(st.ops.prepare_incoming(offer).await?),
    ))
}

/// Cloudlet to cloudlet: the session stream (disk chunks, migration stream).
#[utoipa::path(post, path = "/v1/handoff/{hid}/stream", request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    security(("bearer" = [])), responses((status = 200, body = cloudlet_api::HandoffLoaded), (status = 400, body = ApiError)))]
async fn handoff_stream<C: CloudletOps>(
    State(st): State<Arc<AppState<C>>>,
    Path(hid): Path<String>,
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
    responses((status = 200, body = cloudlet_api::HandoffCommitted), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn handoff_commit<C: CloudletOps>(
    State(st): State<Arc<AppState<C>>>,
    Path(hid): Path<String>,
) -> ApiResult<Json<cloudlet_api::HandoffCommitted>> {
    Ok(Json(st.ops.commit_incoming(&hid).await?))
}

/// Cloudlet to cloudlet: how much of the session stream has arrived.
#[utoipa::path(get, path = "/v1/handoff/{hid}", security(("bearer" = [])),
    responses((status = 200, body = cloudlet_api::HandoffArrival), (status = 404, body = ApiError)))]
async fn handoff_arrival<C: CloudletOps>(
    State(st): State<Arc<AppState<C>>>,
    Path(hid): Path<String>,
) -> ApiResult<Json<cloudlet_api::HandoffArrival>> {
    Ok(Json(st.ops.incoming_arrival(&hid)?))
}

/// Cloudlet to cloudlet: discard an arrival that was not committed.
#[utoipa::path(post, path = "/v1/handoff/{hid}/abort", security(("bearer" = [])),
    responses((status = 204), (status = 404, body = ApiError)))]
async fn handoff_abort<C: CloudletOps>(
    State(st): State<Arc<AppState<C>>>,
    Path(hid): Path<String>,
) -> ApiResult<StatusCode> {
    st.ops.abort_incoming(&hid).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format", body = String)))]
async fn metrics<C: CloudletOps>(State(st): State<Arc<AppState<C>>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.ops.metrics(),
    )
}

/// Stream a request body into a new file under `dir`.
async fn spool(dir: &std::path::Path, body: Body) -> ApiResult<std::path::PathBuf> {
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
