//! The OpenAPI 3 document of the registry's HTTP API (served at
//! `/openapi.json`, kept in `docs/registry-openapi.json`); the crate docs
//! say the same in prose.

use utoipa::OpenApi;

use crate::api::{ErrorBody, OverlayEntry, PushReceipt};
use crate::server;

/// The registry's OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    info(title = "cloudlet registry", description = "Overlay registry of the cloud tier: push, list, fetch by ranges, delete"),
    paths(server::health, server::list_handler, server::head_handler, server::get_handler, server::put_handler, server::delete_handler),
    components(schemas(OverlayEntry, PushReceipt, ErrorBody)),
    modifiers(&Bearer)
)]
pub struct RegistryDoc;

struct Bearer;

impl utoipa::Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
    }
}

/// The document as pretty JSON.
pub fn openapi_json() -> String {
    RegistryDoc::openapi().to_pretty_json().unwrap_or_default()
}
