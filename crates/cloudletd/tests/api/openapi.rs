//! The OpenAPI document kept in the repo matches what the code serves.

#[test]
fn docs_openapi_json_matches_the_code() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json");
    let kept = std::fs::read_to_string(path).expect("docs/openapi.json exists");
    let served = cloudletd::api::openapi_json();
    assert!(
        kept.trim() == served.trim(),
        "docs/openapi.json is out of date: run `make openapi` and commit it"
    );
    let v: serde_json::Value = serde_json::from_str(&served).unwrap();
    assert!(v["openapi"].as_str().unwrap().starts_with("3."));
    for p in [
        "/v1/vms",
        "/v1/vms/{id}",
        "/v1/base-vms",
        "/v1/cloudlet",
        "/metrics",
    ] {
        assert!(v["paths"].get(p).is_some(), "{p} documented");
    }
}
