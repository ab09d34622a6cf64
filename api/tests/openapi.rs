//! `docs/api/openapi.json` is the document the server serves: regenerate it with
//! `mvm serve --openapi > docs/api/openapi.json` (or `MVM_BLESS=1 cargo test -p mvm-api
//! --test openapi`) when the API changes, and review the difference.

use std::path::Path;

#[test]
fn the_checked_in_document_is_the_one_generated_from_the_types() {
    let generated = serde_json::to_string_pretty(&mvm_api::openapi::document()).unwrap() + "\n";
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/api/openapi.json");
    if std::env::var_os("MVM_BLESS").is_some() {
        std::fs::write(&file, &generated).unwrap();
    }
    let checked_in = std::fs::read_to_string(&file).unwrap_or_default();
    assert!(
        checked_in == generated,
        "docs/api/openapi.json differs from the API's types and routes: regenerate it with \
         `mvm serve --openapi > docs/api/openapi.json` and review the change"
    );
}
