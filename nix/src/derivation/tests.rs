//! Unit tests of the derivation format; `tests/against_nix.rs` checks the same against Nix.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::hashing::{DrvHasher, DrvSource, ModuloHash};
use super::*;
use crate::hash::FixedOutputHash;

/// `derivation { name = "hello"; system = "x86_64-linux"; builder = "/bin/sh";
/// args = ["-c" "echo hi > $out"]; }` as Nix 2.8 wrote it, at
/// `/nix/store/76w21n1f03fs5kw8fnffphx7qrqffw6r-hello.drv`.
const HELLO: &str = concat!(
    r#"Derive([("out","/nix/store/mjs27ix6ig2bkbi3s3sm470vrv4lf7ic-hello","","")],"#,
    r#"[],[],"x86_64-linux","/bin/sh",["-c","echo hi > $out"],"#,
    r#"[("builder","/bin/sh"),("name","hello"),"#,
    r#"("out","/nix/store/mjs27ix6ig2bkbi3s3sm470vrv4lf7ic-hello"),("system","x86_64-linux")])"#
);

/// No input derivations: any lookup is a bug in the test.
struct NoInputs;

impl DrvSource for NoInputs {
    fn load(&mut self, path: &StorePath) -> Result<Derivation, NixError> {
        Err(NixError::Invalid(format!("unexpected load of {path}")))
    }
}

/// Input derivations kept in memory, by path.
struct InMemory(BTreeMap<StorePath, Derivation>);

impl DrvSource for InMemory {
    fn load(&mut self, path: &StorePath) -> Result<Derivation, NixError> {
        self.0
            .get(path)
            .cloned()
            .ok_or_else(|| NixError::Invalid(format!("no {path}")))
    }
}

fn hello() -> Derivation {
    Derivation::parse("hello", HELLO.as_bytes()).unwrap()
}

#[test]
fn parses_what_nix_wrote_and_writes_it_back() {
    let drv = hello();
    assert_eq!(drv.system, "x86_64-linux");
    assert_eq!(drv.args, ["-c", "echo hi > $out"]);
    assert_eq!(drv.env["name"], "hello");
    assert_eq!(drv.to_aterm(), HELLO);
}

#[test]
fn computes_the_paths_nix_computed() {
    let drv = hello();
    assert_eq!(
        drv.drv_path().unwrap().to_string(),
        "/nix/store/76w21n1f03fs5kw8fnffphx7qrqffw6r-hello.drv"
    );
    let outputs = DrvHasher::new(NoInputs)
        .verified_output_paths(&drv)
        .unwrap();
    assert_eq!(
        outputs["out"].to_string(),
        "/nix/store/mjs27ix6ig2bkbi3s3sm470vrv4lf7ic-hello"
    );
}

#[test]
fn escapes_only_where_nix_does() {
    let mut drv = hello();
    drv.args = vec!["q\"b\\n\nr\rt\t".into()];
    drv.env.insert("k\"ey".into(), "tab\tnew\nline".into());
    let aterm = drv.to_aterm();
    assert!(aterm.contains(r#"["q\"b\\n\nr\rt\t"]"#), "{aterm}");
    assert!(aterm.contains(r#"("k\"ey","tab\tnew\nline")"#), "{aterm}");
    assert_eq!(Derivation::parse("hello", aterm.as_bytes()).unwrap(), drv);
}

#[test]
fn a_stated_path_that_differs_is_found() {
    let tampered = HELLO.replacen(
        "mjs27ix6ig2bkbi3s3sm470vrv4lf7ic",
        "00000000000000000000000000000000",
        1,
    );
    let drv = Derivation::parse("hello", tampered.as_bytes()).unwrap();
    let err = DrvHasher::new(NoInputs)
        .verified_output_paths(&drv)
        .unwrap_err();
    assert_eq!(err.code(), "NIX008", "{err}");
    assert!(err.to_string().contains("path"), "{err}");

    // The environment variable is blanked when hashing, so only its own check can find it.
    let mut drv = hello();
    drv.env.insert(
        "out".into(),
        "/nix/store/00000000000000000000000000000000-hello".into(),
    );
    let err = DrvHasher::new(NoInputs)
        .verified_output_paths(&drv)
        .unwrap_err();
    assert!(err.to_string().contains("environment variable"), "{err}");
}

/// Each mutation of `HELLO` and the code it must be refused with.
#[test]
fn refuses_what_nix_would_not_write() {
    let out = r#"("out","/nix/store/mjs27ix6ig2bkbi3s3sm470vrv4lf7ic-hello","","")"#;
    let cases: &[(&str, &str, &str)] = &[
        ("Derive(", "Derive (", "NIX004"),
        ("])", "]) ", "NIX004"),
        ("])", "]", "NIX004"),
        ("\"/bin/sh\",", "\"/bin/sh\" ,", "NIX004"),
        ("echo hi", "echo\\x hi", "NIX005"),
        ("echo hi", "echo\nhi", "NIX005"),
        (
            "x86_64-linux\",\"/bin",
            "x86\\\\64-linux\",\"/bin",
            "NIX005",
        ),
        (
            r#"("builder","/bin/sh"),("name","hello")"#,
            r#"("name","hello"),("builder","/bin/sh")"#,
            "NIX005",
        ),
        (
            r#"("builder","/bin/sh"),"#,
            r#"("builder","/bin/sh"),("builder","/bin/sh"),"#,
            "NIX005",
        ),
        (out, &out.replace("hello\"", "hello world\""), "NIX002"),
        (out, &out.replace("/nix/store/", "/gnu/store/"), "NIX002"),
        (out, &out.replace("\"out\",", "\"\","), "NIX006"),
        (out, r#"("out","","","")"#, "NIX007"),
        (
            out,
            &out.replace(",\"\",\"\")", ",\"r:sha256\",\"\")"),
            "NIX007",
        ),
        (out, &out.replace(",\"\",\"\")", ",\"\",\"00\")"), "NIX006"),
        (
            out,
            &out.replace(",\"\",\"\")", ",\"sha256\",\"00\")"),
            "NIX006",
        ),
        ("Derive([(", "Derive([", "NIX004"),
        ("[],[],", "[],[\"/nix/store/x\"],", "NIX002"),
        (
            "[],[],",
            "[(\"/nix/store/76w21n1f03fs5kw8fnffphx7qrqffw6r-dep\",[\"out\"])],[],",
            "NIX006",
        ),
        (
            "[],[],",
            "[(\"/nix/store/76w21n1f03fs5kw8fnffphx7qrqffw6r-d.drv\",[])],[],",
            "NIX006",
        ),
    ];
    for (from, to, code) in cases {
        assert!(HELLO.contains(from), "{from}");
        let bad = HELLO.replacen(from, to, 1);
        let err = Derivation::parse("hello", bad.as_bytes()).unwrap_err();
        assert_eq!(err.code(), *code, "{bad}\n{err}");
    }
    let (before, after) = HELLO.split_once("hi").unwrap();
    let bytes = [before.as_bytes(), &[0xff], after.as_bytes()].concat();
    assert_eq!(
        Derivation::parse("hello", &bytes).unwrap_err().code(),
        "NIX004"
    );
    assert_eq!(
        Derivation::parse("bad name", HELLO.as_bytes())
            .unwrap_err()
            .code(),
        "NIX002"
    );
}

#[test]
fn refuses_oversized_input_before_parsing() {
    let huge = vec![b' '; parse::MAX_DRV_SIZE + 1];
    assert_eq!(Derivation::parse("x", &huge).unwrap_err().code(), "NIX003");
}

#[test]
fn every_prefix_of_a_drv_is_refused_without_panic() {
    for end in 0..HELLO.len() {
        assert!(Derivation::parse("hello", &HELLO.as_bytes()[..end]).is_err());
    }
}

#[test]
fn a_fixed_output_hashes_to_its_promise_alone() {
    let hash = FixedOutputHash::from_drv_fields(
        "r:sha256",
        "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s",
    );
    assert!(hash.is_err(), "nix writes hex, not nixbase32, in a .drv");

    let digest = "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881";
    let fixed = |builder: &str| {
        let mut drv = hello();
        drv.builder = builder.into();
        let hash = FixedOutputHash::from_drv_fields("sha256", digest).unwrap();
        let out = crate::store_path::compute::make_fixed_output_path("hello", &hash).unwrap();
        drv.env.insert("out".into(), out.to_string());
        drv.outputs = BTreeMap::from([("out".into(), Output::Fixed { path: out, hash })]);
        drv
    };
    let mut hasher = DrvHasher::new(NoInputs);
    let (a, b) = (fixed("/bin/sh"), fixed("/bin/bash"));
    assert_ne!(a.drv_path().unwrap(), b.drv_path().unwrap());
    let hash_a = hasher.modulo_hash(&a).unwrap();
    assert!(matches!(hash_a, ModuloHash::Fixed(_)));
    assert_eq!(hash_a, hasher.modulo_hash(&b).unwrap());
    hasher.verified_output_paths(&a).unwrap();
}

#[test]
fn a_fixed_output_beside_another_is_invalid() {
    let mut drv = hello();
    let hash = FixedOutputHash::from_drv_fields("sha256", &"00".repeat(32)).unwrap();
    let path = drv.outputs["out"].path().clone();
    drv.outputs
        .insert("dev".into(), Output::Fixed { path, hash });
    assert_eq!(drv.validate().unwrap_err().code(), "NIX006");
}

#[test]
fn input_derivations_are_checked_and_hashed_through_the_source() {
    let dep = hello();
    let dep_path = dep.drv_path().unwrap();
    let mut user = hello();
    user.name = "user".into();
    user.input_drvs = BTreeMap::from([(dep_path.clone(), BTreeSet::from(["out".into()]))]);

    let mut hasher = DrvHasher::new(InMemory(BTreeMap::from([(dep_path.clone(), dep.clone())])));
    let paths = hasher.output_paths(&user).unwrap();
    assert_eq!(paths["out"].name(), "user");

    // An input whose contents are not those its path names is refused.
    let mut other = dep.clone();
    other.builder = "/bin/bash".into();
    let mut hasher = DrvHasher::new(InMemory(BTreeMap::from([(dep_path.clone(), other)])));
    assert_eq!(hasher.output_paths(&user).unwrap_err().code(), "NIX010");

    // So is a use of an output the input does not have.
    user.input_drvs = BTreeMap::from([(dep_path.clone(), BTreeSet::from(["dev".into()]))]);
    let mut hasher = DrvHasher::new(InMemory(BTreeMap::from([(dep_path, dep)])));
    assert_eq!(hasher.output_paths(&user).unwrap_err().code(), "NIX010");
}

/// A chain of `len` derivations, each using the one before; the last is returned with the
/// source that holds the others.
fn chain(len: usize) -> (Derivation, InMemory) {
    let mut source = InMemory(BTreeMap::new());
    let mut drv = hello();
    for _ in 1..len {
        let path = drv.drv_path().unwrap();
        source.0.insert(path.clone(), drv.clone());
        drv.input_drvs = BTreeMap::from([(path, BTreeSet::from(["out".into()]))]);
    }
    (drv, source)
}

#[test]
fn input_chains_are_followed_to_the_depth_limit_and_no_further() {
    // Within the limit, in a test thread's stack (2 MiB), in a debug build.
    let (top, source) = chain(hashing::MAX_INPUT_DEPTH + 1);
    DrvHasher::new(source).output_paths(&top).unwrap();

    let (top, source) = chain(hashing::MAX_INPUT_DEPTH + 2);
    let err = DrvHasher::new(source).output_paths(&top).unwrap_err();
    assert_eq!(err.code(), "NIX010", "{err}");
    assert!(err.to_string().contains("levels"), "{err}");
}

fn text() -> impl Strategy<Value = String> {
    // Quotes, backslashes and control characters are what the escaping must get right.
    proptest::string::string_regex("[a-z\"\\\\\n\r\t\u{1} é$]{0,12}").unwrap()
}

prop_compose! {
    fn derivation()(
        args in proptest::collection::vec(text(), 0..4),
        env in proptest::collection::btree_map(text(), text(), 0..6),
        builder in text(),
        system in "[a-z0-9_\n-]{0,12}",
        outputs in proptest::collection::btree_set("[a-z]{1,6}", 1..4),
    ) -> Derivation {
        let path = hello().outputs["out"].path().clone();
        Derivation {
            name: "gen".into(),
            outputs: outputs
                .into_iter()
                .map(|o| (o, Output::InputAddressed { path: path.clone() }))
                .collect(),
            input_drvs: BTreeMap::new(),
            input_srcs: BTreeSet::from([path]),
            system,
            builder,
            args,
            env,
        }
    }
}

proptest! {
    #[test]
    fn writing_then_parsing_gives_the_derivation_back(drv in derivation()) {
        let aterm = drv.to_aterm();
        prop_assert_eq!(Derivation::parse("gen", aterm.as_bytes()).unwrap(), drv);
    }

    #[test]
    fn whatever_parses_writes_back_identically(bytes in proptest::collection::vec(any::<u8>(), 0..64), at in 0usize..400) {
        let mut input = HELLO.as_bytes().to_vec();
        let at = at.min(input.len());
        input.splice(at..at, bytes);
        if let Ok(drv) = Derivation::parse("hello", &input) {
            prop_assert_eq!(drv.to_aterm().into_bytes(), input);
        }
    }
}
