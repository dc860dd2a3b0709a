//! The OpenAPI 3 document of the API.
//!
//! The handlers' annotations say what each operation takes and answers;
//! [`Complete`] then adds what holds for all of them alike, so that no
//! operation can forget it: every path parameter of a path's template, the
//! credential every operation but [`PUBLIC`] needs and its 401, the 403 of
//! the [`OPERATOR_ONLY`] ones, the 404 of every operation on one VM
//! (another tenant's VM is not found), and the links from the
//! answer that creates a resource to the operations on it (what a client
//! generator, or schemathesis' stateful phase, follows).

use cloudlet_api::{ApiError, BaseVmInfo, BearerAuth, CloudletInfo, CreateVmRequest, VmInfo};
use utoipa::openapi::link::LinkBuilder;
use utoipa::openapi::path::{Operation, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, Required, ResponseBuilder};

use super::{bases, cloudlet, handoff, history, vms};
use utoipa::OpenApi;

/// The OpenAPI 3 document of this API (served at `/openapi.json`).
#[derive(OpenApi)]
#[openapi(
    info(title = "cloudlet", description = "Cloudlet REST API: base VMs, VM synthesis, handoff"),
    paths(cloudlet::cloudlet_info, cloudlet::ping, bases::list_bases, bases::import_base, bases::delete_base, vms::list_vms, vms::create_vm, vms::get_vm, vms::events, vms::delete_vm, cloudlet::metrics, cloudlet::drain, cloudlet::resume, vms::handoff_vm, handoff::handoff_prepare, handoff::handoff_stream, handoff::handoff_commit, handoff::handoff_abort, handoff::handoff_arrival, history::list_handoffs, history::get_handoff),
    components(schemas(
        CloudletInfo, BaseVmInfo, VmInfo, CreateVmRequest, ApiError,
        cloudlet_api::Location, cloudlet_api::Resources, cloudlet_api::Flavor, cloudlet_api::VmState,
        cloudlet_api::PortMapping, cloudlet_api::Progress, cloudlet_api::StageTiming,
        cloudlet_api::HandoffRequest, cloudlet_api::HandoffReport, cloudlet_api::HandoffOffer,
        cloudlet_api::HandoffPrepared, cloudlet_api::HandoffLoaded, cloudlet_api::HandoffCommitted,
        cloudlet_api::AppInfo, cloudlet_api::MemoryDifference, cloudlet_api::DifferingChunk,
        cloudlet_api::directory::Membership, cloudlet_api::DrainReport, cloudlet_api::DrainedVm,
        cloudlet_api::VmEvent, cloudlet_api::Mobility, cloudlet_api::HostLoad,
        cloudlet_api::events::ProgressEvent, cloudlet_api::events::Operation,
        cloudlet_api::events::HandoffRecord, cloudlet_api::events::HandoffSample,
        cloudlet_api::events::HandoffOutcome
    )),
    modifiers(&BearerAuth, &Complete)
)]
pub struct ApiDoc;

/// The OpenAPI document as pretty JSON (what `docs/openapi.json` holds),
/// with what utoipa 5 writes wrong put right (see [`put_right`]).
pub fn openapi_json() -> String {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    put_right(&mut doc);
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}

/// Properties of Rust type `u16` (`schema`, `property`): utoipa documents
/// them as int32 with no maximum, so that 70000 would look valid.
const U16_PROPERTIES: &[(&str, &str)] = &[
    ("PortMapping", "guest"),
    ("PortMapping", "host"),
    ("AppInfo", "ports"),
];

/// Two things utoipa 5 writes wrong: a link's `operationId` (it writes
/// `operation_id`, which no client reads) and the range of `u16`.
fn put_right(doc: &mut serde_json::Value) {
    use serde_json::Value;
    if let Some(paths) = doc["paths"].as_object_mut() {
        for op in paths.values_mut().filter_map(Value::as_object_mut) {
            for op in op.values_mut() {
                let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut) else {
                    continue;
                };
                for r in responses.values_mut() {
                    let Some(links) = r.get_mut("links").and_then(Value::as_object_mut) else {
                        continue;
                    };
                    for link in links.values_mut().filter_map(Value::as_object_mut) {
                        if let Some(id) = link.remove("operation_id") {
                            link.insert("operationId".into(), id);
                        }
                    }
                }
            }
        }
    }
    for (schema, property) in U16_PROPERTIES {
        let p = &mut doc["components"]["schemas"][schema]["properties"][property];
        let p = if p["type"] == "array" {
            &mut p["items"]
        } else {
            p
        };
        if p.is_object() {
            p["maximum"] = 65535.into();
        }
    }
}

/// What every operation of the document says alike (see the module doc).
pub struct Complete;

/// The operations anyone may call (liveness): every other one needs a
/// credential.
pub const PUBLIC: &[&str] = &["ping"];

/// The operations only an operator's credential may call: the cloudlet's
/// own state and the handoffs from peers.
pub const OPERATOR_ONLY: &[&str] = &[
    "import_base",
    "delete_base",
    "drain",
    "resume",
    "metrics",
    "handoff_prepare",
    "handoff_stream",
    "handoff_commit",
    "handoff_abort",
    "handoff_arrival",
];

/// What each path parameter names.
fn parameter_doc(name: &str) -> &'static str {
    match name {
        "id" => "The VM's id, or its name",
        "hid" => "The handoff's id (from `POST /v1/handoff/prepare`)",
        "name" => "The base VM's name",
        _ => "",
    }
}

/// A link to `(operation id, its parameter, the runtime expression)`.
type LinkTo = (&'static str, &'static str, &'static str);

/// The links out of the answer of each creating operation.
const LINKS: &[(&str, &[LinkTo])] = &[
    (
        "create_vm",
        &[
            ("get_vm", "id", "$response.body#/id"),
            ("delete_vm", "id", "$response.body#/id"),
            ("handoff_vm", "id", "$response.body#/id"),
        ],
    ),
    (
        "handoff_prepare",
        &[
            ("handoff_stream", "hid", "$response.body#/handoff_id"),
            ("handoff_commit", "hid", "$response.body#/handoff_id"),
            ("handoff_abort", "hid", "$response.body#/handoff_id"),
            ("handoff_arrival", "hid", "$response.body#/handoff_id"),
        ],
    ),
    (
        "import_base",
        &[("delete_base", "name", "$response.body#/name")],
    ),
];

impl utoipa::Modify for Complete {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for (path, item) in openapi.paths.paths.iter_mut() {
            let params: Vec<&str> = path
                .split('{')
                .skip(1)
                .filter_map(|s| s.split_once('}').map(|(p, _)| p))
                .collect();
            let ops = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for op in ops.into_iter().flatten() {
                declare_path_parameters(op, &params);
                let id = op.operation_id.clone().unwrap_or_default();
                if !PUBLIC.contains(&id.as_str()) && op.security.is_none() {
                    op.security = Some(vec![utoipa::openapi::security::SecurityRequirement::new(
                        "bearer",
                        Vec::<String>::new(),
                    )]);
                }
                if op.security.is_some() {
                    op.responses
                        .responses
                        .entry("401".into())
                        .or_insert_with(|| error_response("No credential, or a wrong one"));
                }
                if OPERATOR_ONLY.contains(&id.as_str()) {
                    let said = "Not an operator's credential (a tenant's or a VM's session)";
                    match op.responses.responses.get_mut("403") {
                        Some(RefOr::T(r)) => r.description = format!("{said}; {}", r.description),
                        _ => {
                            op.responses
                                .responses
                                .insert("403".into(), error_response(said));
                        }
                    }
                }
                if params.contains(&"id") {
                    op.responses.responses.insert(
                        "404".into(),
                        error_response("No such VM here, or another tenant's (not told apart)"),
                    );
                }
                add_links(op);
            }
        }
    }
}

fn declare_path_parameters(op: &mut Operation, names: &[&str]) {
    let declared = op.parameters.get_or_insert_with(Vec::new);
    for name in names {
        if declared.iter().any(|p| p.name == *name) {
            continue;
        }
        let schema = ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(1));
        declared.push(
            ParameterBuilder::new()
                .name(*name)
                .parameter_in(ParameterIn::Path)
                .required(Required::True)
                .description(Some(parameter_doc(name)))
                .schema(Some(schema))
                .build(),
        );
    }
}

fn error_response(description: &str) -> RefOr<utoipa::openapi::Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ApiError")))
                    .build(),
            )
            .build(),
    )
}

fn add_links(op: &mut Operation) {
    let Some((_, links)) = LINKS
        .iter()
        .find(|(id, _)| op.operation_id.as_deref() == Some(*id))
    else {
        return;
    };
    for (status, resp) in op.responses.responses.iter_mut() {
        let RefOr::T(resp) = resp else { continue };
        if !status.starts_with('2') {
            continue;
        }
        for (target, param, expr) in links.iter() {
            let link = LinkBuilder::new()
                .operation_id(*target)
                .parameter(*param, *expr)
                .build();
            resp.links.insert((*target).to_string(), RefOr::T(link));
        }
    }
}
