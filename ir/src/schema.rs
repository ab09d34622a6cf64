//! JSON Schemas published from the Rust types, so editors and other tools can check documents
//! without mvm. The checked-in copies under `ir/schema/` are compared with these by a test.

use serde_json::Value;

use crate::plan::LaunchPlan;
use crate::workload::Workload;

/// The JSON Schema of Workload IR v0.
pub fn workload_schema() -> Value {
    serde_json::to_value(schemars::schema_for!(Workload)).expect("a schema is plain JSON")
}

/// The JSON Schema of launch plan v1 (the DSSE payload).
pub fn plan_schema() -> Value {
    serde_json::to_value(schemars::schema_for!(LaunchPlan)).expect("a schema is plain JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(published: &str, generated: Value, file: &str) {
        let published: Value = serde_json::from_str(published).unwrap();
        assert!(
            published == generated,
            "ir/schema/{file} drifted from the Rust types; regenerate it with `mvm ir schema{}> ir/schema/{file}`",
            if file.starts_with("plan") { " --plan " } else { " " }
        );
    }

    #[test]
    fn published_schemas_match_the_types() {
        check(
            include_str!("../schema/workload-v0.schema.json"),
            workload_schema(),
            "workload-v0.schema.json",
        );
        check(
            include_str!("../schema/plan-v1.schema.json"),
            plan_schema(),
            "plan-v1.schema.json",
        );
    }
}
