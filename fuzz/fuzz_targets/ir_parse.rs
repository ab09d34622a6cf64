//! Any bytes as a workload declaration (JSON and TOML): parsing, validation, canonical JSON and
//! the digest must return, never panic, and a parsed workload must survive a round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mvm_ir::load::{ir_digest, parse_workload, Syntax};
use mvm_ir::validate::validate;

fuzz_target!(|data: &[u8]| {
    for syntax in [Syntax::Json, Syntax::Toml] {
        if let Ok(workload) = parse_workload(data, syntax) {
            let _ = validate(&workload);
            let digest = ir_digest(&workload).expect("a parsed workload has a digest");
            let canonical = mvm_ir::canonical::to_vec(&workload).expect("canonical form");
            let again = parse_workload(&canonical, Syntax::Json).expect("canonical form parses");
            assert_eq!(again, workload);
            assert_eq!(ir_digest(&again).unwrap(), digest);
        }
    }
    let _ = mvm_ir::canonical::canonicalize(data);
});
