//! The one map from domain errors to HTTP status codes and kinds.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use cloudlet_api::ApiError;

use crate::core::cloudlet::{BaseOpError, CreateVmError, VmOpError};
use crate::handoff::{HandoffError, ReceiveHandoffError};
use crate::synth::fetch::FetchOverlayError;

/// Every error the API answers with: one place for status codes.
#[derive(Debug)]
pub struct ApiFailure {
    status: StatusCode,
    kind: &'static str,
    message: String,
    memory_differs: Option<cloudlet_api::MemoryDifference>,
}

impl ApiFailure {
    pub(crate) fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
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

/// A JSON request body, its rejections in the API's own error body:
/// 415 `unsupported_media_type` (not `application/json`), 400
/// `invalid_json` (not JSON), 422 `invalid_request` (JSON of the wrong
/// shape), 413 `too_large` (over the limit).
pub struct JsonBody<T>(pub T);

impl<T, S> axum::extract::FromRequest<S> for JsonBody<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiFailure;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiFailure> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(JsonBody(v)),
            Err(r) => {
                let status = r.status();
                let kind = match status {
                    StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
                    StatusCode::PAYLOAD_TOO_LARGE => "too_large",
                    StatusCode::UNPROCESSABLE_ENTITY => "invalid_request",
                    _ => "invalid_json",
                };
                Err(ApiFailure::new(status, kind, r.body_text()))
            }
        }
    }
}

/// Path parameters, their rejections (a segment that is not UTF-8 once
/// percent-decoded, say) in the API's own error body.
pub struct PathParam<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for PathParam<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiFailure;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiFailure> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| PathParam(p.0))
            .map_err(|r| ApiFailure::new(r.status(), "invalid_request", r.body_text()))
    }
}

/// Query parameters, their rejections in the API's own error body.
pub struct QueryParams<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for QueryParams<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiFailure;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiFailure> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| QueryParams(q.0))
            .map_err(|r| ApiFailure::new(r.status(), "invalid_request", r.body_text()))
    }
}

/// A body read whole that passed its limit (413) or broke off (400).
pub(crate) fn body_read_failure(e: axum::Error, limit: usize) -> ApiFailure {
    let too_large = std::iter::successors(Some(&e as &(dyn std::error::Error + 'static)), |e| {
        e.source()
    })
    .any(|e| e.is::<http_body_util::LengthLimitError>());
    if too_large {
        ApiFailure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("The request body is over {limit} bytes"),
        )
    } else {
        ApiFailure::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("Cannot read the body: {e}"),
        )
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
            // A flavor is a name of this cloudlet's config: well-formed
            // (the schema's), yet unknown here.
            E::UnknownFlavor(_) => (StatusCode::UNPROCESSABLE_ENTITY, "unknown_flavor"),
            E::BadName(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
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
            // Well formed, but not signed as this cloudlet requires.
            E::Overlay(FetchOverlayError::Invalid(
                cloudlet_overlay::InvalidOverlay::Signature(_),
            )) => (StatusCode::UNPROCESSABLE_ENTITY, "untrusted_overlay"),
            E::Overlay(_) | E::Metadata(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_overlay"),
            E::BaseNotHeld { .. } => (StatusCode::CONFLICT, "base_not_held"),
            E::FlavorTooSmall { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "flavor_too_small"),
            E::OverCapacity { .. } | E::NoPorts(..) => {
                (StatusCode::SERVICE_UNAVAILABLE, "over_capacity")
            }
            E::Draining => (StatusCode::SERVICE_UNAVAILABLE, "draining"),
            // The tenant's own limit, not the cloudlet's: the same call
            // fails until it frees something (Kubernetes' quotas: 403).
            E::OverQuota { .. } => (StatusCode::FORBIDDEN, "quota_exceeded"),
            E::UnknownTenant(_) => (StatusCode::FORBIDDEN, "unknown_tenant"),
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
            BaseOpError::Base(B::Shared { .. }) => (StatusCode::CONFLICT, "shared"),
            BaseOpError::InUse { .. } => (StatusCode::CONFLICT, "busy"),
            // Said without the path the daemon spooled the upload to.
            BaseOpError::Archive(cloudlet_base::ArchiveError::Corrupt { detail, .. }) => {
                return ApiFailure::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_base",
                    format!("The upload is not an intact base VM export: {detail}"),
                );
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
            // A destination this cloudlet has no credential for.
            H::NoToken(_) => (StatusCode::UNPROCESSABLE_ENTITY, "no_token"),
            // A definite no from the destination (no room, draining, no
            // base, ...): the VM runs here still, another may take it.
            H::Refused { .. } => (StatusCode::CONFLICT, "destination_refused"),
            H::Unreachable { .. }
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

pub(crate) type ApiResult<T> = Result<T, ApiFailure>;

impl From<crate::drain::DrainError> for ApiFailure {
    fn from(e: crate::drain::DrainError) -> Self {
        ApiFailure::new(StatusCode::INTERNAL_SERVER_ERROR, "drain", e.to_string())
    }
}
