//! The OpenAPI document covers every route and `docs/openapi.json` is up to date.

use cdp_ingest::http::ROUTES;
use cdp_ingest::openapi::document;

#[test]
fn every_route_is_documented_and_docs_openapi_json_is_current() {
    let doc = document();
    for r in ROUTES {
        assert!(
            doc["paths"][r.path]["post"]["responses"]["503"].is_object(),
            "{} undocumented",
            r.path
        );
    }
    let rendered = serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n";
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
    if std::env::var_os("CDP_UPDATE_DOCS").is_some() {
        std::fs::write(&path, &rendered).unwrap_or_else(|e| panic!("{e}"));
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == rendered,
        "docs/openapi.json is stale: run the tests with CDP_UPDATE_DOCS=1"
    );
}
