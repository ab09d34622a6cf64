//! The agent tool contract's JSON Schemas are checked in (`docs/mcp/tool-request.schema.json`,
//! `docs/mcp/tool-response.schema.json`) for harnesses that validate against them: they are
//! the ones generated from the types. Regenerate with `mvm tool schema [--response]` (or
//! `MVM_BLESS=1 cargo test -p mvm-mcp --test contract_schema`) and review the difference.

use std::path::Path;

use mvm_mcp::contract::{ToolRequest, ToolResponse};

fn check(name: &str, schema: schemars::Schema) {
    let generated = serde_json::to_string_pretty(&schema).unwrap() + "\n";
    let file = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs/mcp")
        .join(name);
    if std::env::var_os("MVM_BLESS").is_some() {
        std::fs::write(&file, &generated).unwrap();
    }
    let checked_in = std::fs::read_to_string(&file).unwrap_or_default();
    assert!(
        checked_in == generated,
        "docs/mcp/{name} differs from the contract's types: regenerate it with `mvm tool \
         schema` and review the change"
    );
}

#[test]
fn the_checked_in_schemas_are_the_ones_generated_from_the_types() {
    check(
        "tool-request.schema.json",
        schemars::schema_for!(ToolRequest),
    );
    check(
        "tool-response.schema.json",
        schemars::schema_for!(ToolResponse),
    );
}

/// The request's schema refuses what the server refuses: unknown fields, and a language or
/// retention it does not know.
#[test]
fn the_request_schema_is_strict() {
    let schema = serde_json::to_value(schemars::schema_for!(ToolRequest)).unwrap();
    assert_eq!(schema["additionalProperties"], false);
    assert_eq!(schema["required"], serde_json::json!(["language"]));
    for bad in [
        r#"{"language": "shell", "command": ["true"], "extra": 1}"#,
        r#"{"language": "cobol"}"#,
        r#"{"language": "shell", "state": {"retention": "forever"}}"#,
        r#"{"language": "shell", "network": {"mode": "open"}}"#,
    ] {
        assert!(serde_json::from_str::<ToolRequest>(bad).is_err(), "{bad}");
    }
}
