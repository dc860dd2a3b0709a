//! The registry's OpenAPI document kept in the repo matches the code, and
//! the served one is the same (`make openapi` rewrites the kept one).

#[test]
fn docs_registry_openapi_json_matches_the_code() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/registry-openapi.json"
    );
    let served = cloudlet_registry::openapi::openapi_json();
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
