//! Admission refuses before anything starts: each bad artifact with its own code, and a
//! single-use plan refused for an artifact is not used up.

use std::fs;

use mvm_ir::admission::NonceLedger;
use mvm_ir::dsse::Envelope;
use mvm_ir::keys::{Signer, TrustStore};
use mvm_ir::plan::{fresh_nonce, PAYLOAD_TYPE};
use serde_json::{json, Value};

use super::*;

struct Bundle {
    dir: tempfile::TempDir,
    ledger: tempfile::TempDir,
    signer: Signer,
}

const BLOCK: usize = 4096;

impl Bundle {
    /// A bundle with small stand-in artifacts and a plan pinning them; `single_use` as asked.
    fn new(single_use: bool) -> Self {
        Self::with_cmdline(single_use, |verity| {
            format!(
                "console=ttyS0 quiet mvm.root_hash={} mvm.salt={} mvm.data_blocks={} mvm.hash_offset={} mvm.block_size={}",
                verity["root_hash"].as_str().unwrap(),
                verity["salt"].as_str().unwrap(),
                verity["data_blocks"],
                verity["hash_offset"],
                verity["data_block_size"],
            )
        })
    }

    /// A bundle whose kernel command line is made from the plan's verity pin by `cmdline`.
    fn with_cmdline(single_use: bool, cmdline: impl Fn(&Value) -> String) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let files: [(&str, Vec<u8>); 4] = [
            ("vmlinuz", b"kernel bytes".to_vec()),
            ("initramfs", b"initramfs bytes".to_vec()),
            ("rootfs.erofs", vec![7u8; 3 * BLOCK]),
            ("rootfs.verity", vec![0u8; 2 * BLOCK]),
        ];
        for (name, bytes) in &files {
            fs::write(dir.path().join(name), bytes).unwrap();
        }
        let mut plan: Value =
            serde_json::from_str(include_str!("../../../examples/plan/plan.json")).unwrap();
        plan["kernel"]["digest"] = json!(sha256_prefixed(&files[0].1));
        plan["initramfs"]["digest"] = json!(sha256_prefixed(&files[1].1));
        plan["rootfs"]["digest"] = json!(sha256_prefixed(&files[2].1));
        plan["rootfs"]["verity"]["digest"] = json!(sha256_prefixed(&files[3].1));
        plan["rootfs"]["verity"]["data_blocks"] = json!(3);
        plan["nonce"] = json!(fresh_nonce().unwrap());
        plan["single_use"] = json!(single_use);
        // The plan's grants, as the builder words them (the plan's own rule).
        let cmdline = format!(
            "{} mvm.policy=standard,host_copy",
            cmdline(&plan["rootfs"]["verity"])
        );
        plan["kernel"]["cmdline"] = json!(cmdline);
        let bundle = Self {
            dir,
            ledger: tempfile::tempdir().unwrap(),
            signer: Signer::generate().unwrap(),
        };
        let payload = mvm_ir::canonical::to_vec(&plan).unwrap();
        let envelope = Envelope::sign(PAYLOAD_TYPE, &payload, &bundle.signer);
        fs::write(bundle.envelope(), envelope.to_json()).unwrap();
        bundle
    }

    fn envelope(&self) -> PathBuf {
        self.dir.path().join("plan.dsse.json")
    }

    fn admission(&self) -> PlanAdmission {
        let mut trust = TrustStore::default();
        trust.insert(self.signer.verifying_key());
        PlanAdmission::new(trust, NonceLedger::at(self.ledger.path()))
    }

    fn admit(&self) -> Result<Admitted, AdmissionError> {
        self.admit_then(|_| Ok(())).map(|(admitted, ())| admitted)
    }

    fn admit_then<T>(
        &self,
        prepare: impl FnOnce(&VerifiedPlan) -> Result<T, AdmissionError>,
    ) -> Result<(Admitted, T), AdmissionError> {
        let now = OffsetDateTime::parse(
            "2026-06-01T00:00:00Z",
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
        admit_bundle(&self.envelope(), &self.admission(), now, None, prepare)
    }
}

#[test]
fn a_good_bundle_is_admitted_with_its_artifacts_in_memory() {
    let bundle = Bundle::new(false);
    let admitted = bundle.admit().unwrap();
    assert_eq!(admitted.artifacts.kernel, b"kernel bytes");
    assert_eq!(admitted.artifacts.initramfs, b"initramfs bytes");
    assert_eq!(
        admitted.artifacts.rootfs,
        bundle.dir.path().join("rootfs.erofs")
    );
    // A reusable plan is admitted again and again.
    bundle.admit().unwrap();
}

/// Something done to a bundle's files.
type Breakage = fn(&Path);

#[test]
fn bad_artifacts_are_refused_each_with_its_code() {
    let cases: [(&str, Breakage, &str); 6] = [
        (
            "kernel byte flipped",
            |d| fs::write(d.join("vmlinuz"), b"kernel bytez").unwrap(),
            "RUN002",
        ),
        (
            "initramfs replaced",
            |d| fs::write(d.join("initramfs"), b"other").unwrap(),
            "RUN002",
        ),
        (
            "kernel missing",
            |d| fs::remove_file(d.join("vmlinuz")).unwrap(),
            "RUN001",
        ),
        (
            "kernel is a directory",
            |d| {
                fs::remove_file(d.join("vmlinuz")).unwrap();
                fs::create_dir(d.join("vmlinuz")).unwrap();
            },
            "RUN001",
        ),
        (
            "rootfs shorter than its data blocks",
            |d| fs::write(d.join("rootfs.erofs"), vec![7u8; 2 * BLOCK]).unwrap(),
            "RUN003",
        ),
        (
            "verity tree truncated",
            |d| fs::write(d.join("rootfs.verity"), vec![0u8; 100]).unwrap(),
            "RUN003",
        ),
    ];
    for (what, break_it, code) in cases {
        let bundle = Bundle::new(false);
        break_it(bundle.dir.path());
        let err = bundle.admit().expect_err(what);
        assert_eq!(err.code(), code, "{what}: {err}");
    }
}

#[test]
fn a_single_use_plan_refused_for_an_artifact_is_not_used_up() {
    let bundle = Bundle::new(true);
    let kernel = bundle.dir.path().join("vmlinuz");
    fs::write(&kernel, b"tampered").unwrap();
    assert_eq!(bundle.admit().unwrap_err().code(), "RUN002");
    fs::write(&kernel, b"kernel bytes").unwrap();
    bundle.admit().unwrap();
    assert_eq!(
        bundle.admit().unwrap_err().code(),
        "PLAN009",
        "admitted once"
    );
}

#[test]
fn plan_refusals_come_first() {
    let bundle = Bundle::new(false);
    let mut envelope: Value =
        serde_json::from_slice(&fs::read(bundle.envelope()).unwrap()).unwrap();
    envelope["signatures"][0]["keyid"] = json!("0".repeat(64));
    fs::write(bundle.envelope(), serde_json::to_vec(&envelope).unwrap()).unwrap();
    // Even with every artifact gone, the untrusted signer is what is reported.
    fs::remove_file(bundle.dir.path().join("vmlinuz")).unwrap();
    assert_eq!(bundle.admit().unwrap_err().code(), "PLAN002");
}

/// A kernel command line made from a plan's verity pin.
type CmdlineFrom = fn(&Value) -> String;

#[test]
fn a_cmdline_that_is_not_the_plans_verity_pin_is_refused() {
    let cases: [(&str, CmdlineFrom); 4] = [
        ("no verity parameters", |_| "console=ttyS0".into()),
        ("another root hash", |v| {
            format!(
                "mvm.root_hash={} mvm.salt={} mvm.data_blocks={} mvm.hash_offset={} mvm.block_size=4096",
                "ab".repeat(32),
                v["salt"].as_str().unwrap(),
                v["data_blocks"],
                v["hash_offset"]
            )
        }),
        ("fewer data blocks", |v| {
            format!(
                "mvm.root_hash={} mvm.salt={} mvm.data_blocks=1 mvm.hash_offset={} mvm.block_size=4096",
                v["root_hash"].as_str().unwrap(),
                v["salt"].as_str().unwrap(),
                v["hash_offset"]
            )
        }),
        ("another init", |v| {
            format!(
                "rdinit=/bin/sh mvm.root_hash={} mvm.salt={} mvm.data_blocks={} mvm.hash_offset={} mvm.block_size=4096",
                v["root_hash"].as_str().unwrap(),
                v["salt"].as_str().unwrap(),
                v["data_blocks"],
                v["hash_offset"]
            )
        }),
    ];
    for (what, cmdline) in cases {
        let bundle = Bundle::with_cmdline(true, cmdline);
        assert_eq!(bundle.admit().unwrap_err().code(), "RUN004", "{what}");
    }
}

#[test]
fn a_plan_that_cannot_run_here_is_not_used_up() {
    let bundle = Bundle::new(true);
    let refusal = bundle
        .admit_then(|_| {
            Err::<(), _>(AdmissionError::NotRunnable {
                code: "RUN029".into(),
                reason: "no command".into(),
            })
        })
        .unwrap_err();
    assert_eq!(refusal.code(), "RUN029");
    bundle.admit().unwrap();
    assert_eq!(bundle.admit().unwrap_err().code(), "PLAN009");
}
