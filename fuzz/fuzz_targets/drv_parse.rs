//! Any bytes as a `.drv` file: the ATerm parser returns, never panics; whatever it accepts it
//! writes back byte for byte, and the paths computed from it return too. The bytes are also
//! spliced into a real derivation, so the run reaches the deep parts of the grammar without a
//! corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mvm_nix::derivation::hashing::{DrvHasher, DrvSource};
use mvm_nix::{Derivation, NixError, StorePath};

/// A derivation as Nix 2.8 wrote it, with an input derivation, a source and a fixed output's
/// fields nearby in the grammar.
const SEED: &[u8] = br#"Derive([("out","/nix/store/mjs27ix6ig2bkbi3s3sm470vrv4lf7ic-hello","","")],[("/nix/store/76w21n1f03fs5kw8fnffphx7qrqffw6r-hello.drv",["out"])],["/nix/store/gbxp0h9va9n4ss7qf6lz1vzn3my8lp8d-tree"],"x86_64-linux","/bin/sh",["-c","echo \"hi\"\n > $out"],[("builder","/bin/sh"),("name","hello"),("out","/nix/store/mjs27ix6ig2bkbi3s3sm470vrv4lf7ic-hello"),("system","x86_64-linux")])"#;

/// Input derivations are not available: hashing a derivation that has some must fail cleanly.
struct NoInputs;

impl DrvSource for NoInputs {
    fn load(&mut self, path: &StorePath) -> Result<Derivation, NixError> {
        Err(NixError::InputDrv {
            path: path.to_string(),
            reason: "not available while fuzzing".into(),
        })
    }
}

fn check(bytes: &[u8]) {
    if let Ok(drv) = Derivation::parse("hello", bytes) {
        assert_eq!(
            drv.to_aterm().as_bytes(),
            bytes,
            "parse and write must be inverses"
        );
        let _ = drv.drv_path();
        let _ = DrvHasher::new(NoInputs).verified_output_paths(&drv);
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if let Some((&at, rest)) = data.split_first() {
        let at = usize::from(at) * SEED.len() / 256;
        let spliced = [&SEED[..at], rest].concat();
        check(&spliced);
        check(&[spliced.as_slice(), &SEED[at..]].concat());
    }
});
