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

#[cfg(test)]
mod tests {
    /// The document kept in the repo matches the code, and the served one is
    /// the same (`make openapi` rewrites the kept one).
    #[test]
    fn docs_registry_openapi_json_matches_the_code() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../docs/registry-openapi.json"
        );
        let served = super::openapi_json();
        if std::env::var_os("UPDATE_OPENAPI").is_some() {
            std::fs::write(path, format!("{}\n", served.trim())).unwrap();
        }
        let kept = std::fs::read_to_string(path).expect("docs/registry-openapi.json exists");
        assert!(
            kept.trim() == served.trim(),
            "docs/registry-openapi.json is out of date: run `make openapi` and commit it"
        );
        let v: serde_json::Value = serde_json::from_str(&served).unwrap();
        for (path, method) in [
            ("/v1/overlays", "get"),
            ("/v1/overlays/{name}", "get"),
            ("/v1/overlays/{name}", "head"),
            ("/v1/overlays/{name}", "put"),
            ("/v1/overlays/{name}", "delete"),
        ] {
            assert!(
                v["paths"][path][method].is_object(),
                "{method} {path} documented"
            );
        }
    }
}
