//! The OpenAPI 3 document of the API.

use cloudlet_api::{ApiError, BaseVmInfo, BearerAuth, CloudletInfo, CreateVmRequest, VmInfo};

use super::{bases, cloudlet, handoff, vms};
use utoipa::OpenApi;

/// The OpenAPI 3 document of this API (served at `/openapi.json`).
#[derive(OpenApi)]
#[openapi(
    info(title = "cloudlet", description = "Cloudlet REST API: base VMs, VM synthesis, handoff"),
    paths(cloudlet::cloudlet_info, cloudlet::ping, bases::list_bases, bases::import_base, bases::delete_base, vms::list_vms, vms::create_vm, vms::get_vm, vms::events, vms::delete_vm, cloudlet::metrics, cloudlet::drain, cloudlet::resume, vms::handoff_vm, handoff::handoff_prepare, handoff::handoff_stream, handoff::handoff_commit, handoff::handoff_abort, handoff::handoff_arrival),
    components(schemas(
        CloudletInfo, BaseVmInfo, VmInfo, CreateVmRequest, ApiError,
        cloudlet_api::Location, cloudlet_api::Resources, cloudlet_api::Flavor, cloudlet_api::VmState,
        cloudlet_api::PortMapping, cloudlet_api::Progress, cloudlet_api::StageTiming,
        cloudlet_api::HandoffRequest, cloudlet_api::HandoffReport, cloudlet_api::HandoffOffer,
        cloudlet_api::HandoffPrepared, cloudlet_api::HandoffLoaded, cloudlet_api::HandoffCommitted,
        cloudlet_api::AppInfo, cloudlet_api::MemoryDifference, cloudlet_api::DifferingChunk,
        cloudlet_api::directory::Membership, cloudlet_api::DrainReport, cloudlet_api::DrainedVm,
        cloudlet_api::VmEvent, cloudlet_api::Mobility
    )),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

/// The OpenAPI document as pretty JSON (what `docs/openapi.json` holds).
pub fn openapi_json() -> String {
    ApiDoc::openapi().to_pretty_json().unwrap_or_default()
}
