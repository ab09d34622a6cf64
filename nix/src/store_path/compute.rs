//! Where a store path comes from: Nix's `makeStorePath` and the fingerprints built on it.
//!
//! Every store path is `compress_hash::<20>(sha256("<type>:sha256:<hex of inner hash>:/nix/store:<name>"))`.
//! The type and inner hash say what kind of object the path holds:
//!
//! | object | type | inner hash |
//! |---|---|---|
//! | text (a `.drv`, `builtins.toFile`) | `text:<ref>:<ref>…` | sha256 of the contents |
//! | tree added recursively with sha256 (`nix-store --add`) | `source` | sha256 of its NAR |
//! | any other fixed output | `output:out` | sha256 of `fixed:out:<r:?><algo>:<hex>:` |
//! | input-addressed derivation output | `output:<output name>` | the derivation's modulo hash |

use std::collections::BTreeSet;

use super::{StorePath, STORE_DIR};
use crate::error::NixError;
use crate::hash::{compress_hash, sha256, FixedOutputHash, HashAlgo, IngestionMethod};

/// Nix's `makeStorePath`: the path named `name` whose fingerprint has type `kind` and inner
/// hash `inner`.
pub fn make_store_path(kind: &str, inner: &[u8; 32], name: &str) -> Result<StorePath, NixError> {
    let fingerprint = format!("{kind}:sha256:{}:{STORE_DIR}:{name}", hex::encode(inner));
    StorePath::new(&compress_hash(&sha256(fingerprint.as_bytes())), name)
}

/// The path of a text object (a `.drv` file) with these contents and references.
pub fn make_text_path(
    name: &str,
    contents: &[u8],
    references: &BTreeSet<StorePath>,
) -> Result<StorePath, NixError> {
    let mut kind = String::from("text");
    for reference in references {
        kind.push(':');
        kind.push_str(&reference.to_string());
    }
    make_store_path(&kind, &sha256(contents), name)
}

/// The path of a fixed-output object with no references: a tree added with `nix-store --add`,
/// or the output of a fixed-output derivation.
pub fn make_fixed_output_path(name: &str, hash: &FixedOutputHash) -> Result<StorePath, NixError> {
    if hash.method() == IngestionMethod::Recursive && hash.algo() == HashAlgo::Sha256 {
        let mut nar_hash = [0u8; 32];
        nar_hash.copy_from_slice(hash.digest());
        return make_store_path("source", &nar_hash, name);
    }
    let inner = format!("fixed:out:{}:{}:", hash.method_algo(), hash.hex());
    make_store_path("output:out", &sha256(inner.as_bytes()), name)
}

/// The path `nix-store --add` gives a tree whose NAR has sha256 `nar_hash`.
pub fn make_source_path(name: &str, nar_hash: [u8; 32]) -> Result<StorePath, NixError> {
    let hash = FixedOutputHash::new(
        IngestionMethod::Recursive,
        HashAlgo::Sha256,
        nar_hash.into(),
    )?;
    make_fixed_output_path(name, &hash)
}

/// The path of output `output` of an input-addressed derivation named `drv_name` whose
/// modulo hash is `drv_hash`.
pub fn make_output_path(
    output: &str,
    drv_hash: &[u8; 32],
    drv_name: &str,
) -> Result<StorePath, NixError> {
    make_store_path(
        &format!("output:{output}"),
        drv_hash,
        &output_path_name(drv_name, output),
    )
}

/// The name of a derivation's output path: the derivation's name, with `-<output>` unless the
/// output is `out`.
pub fn output_path_name(drv_name: &str, output: &str) -> String {
    if output == "out" {
        drv_name.to_string()
    } else {
        format!("{drv_name}-{output}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `hello` derivation of the crate's integration tests, as Nix 2.8 computed it.
    #[test]
    fn text_path_of_a_drv_matches_nix() {
        let drv = concat!(
            r#"Derive([("out","/nix/store/mjs27ix6ig2bkbi3s3sm470vrv4lf7ic-hello","","")],"#,
            r#"[],[],"x86_64-linux","/bin/sh",["-c","echo hi > $out"],"#,
            r#"[("builder","/bin/sh"),("name","hello"),"#,
            r#"("out","/nix/store/mjs27ix6ig2bkbi3s3sm470vrv4lf7ic-hello"),("system","x86_64-linux")])"#
        );
        let path = make_text_path("hello.drv", drv.as_bytes(), &BTreeSet::new()).unwrap();
        assert_eq!(
            path.to_string(),
            "/nix/store/76w21n1f03fs5kw8fnffphx7qrqffw6r-hello.drv"
        );
    }

    #[test]
    fn output_names_get_a_suffix_except_out() {
        assert_eq!(output_path_name("hello", "out"), "hello");
        assert_eq!(output_path_name("hello", "dev"), "hello-dev");
    }

    #[test]
    fn names_too_long_for_a_path_are_refused() {
        let long = "a".repeat(210);
        assert_eq!(
            make_output_path("dev", &[0; 32], &long).unwrap_err().code(),
            "NIX002"
        );
    }
}
