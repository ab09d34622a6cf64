//! The `mvm` command line, run as a user would: exit statuses, JSON output, and interop of keys
//! and envelopes with openssl.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::Engine as _;
use serde_json::Value;

mod support;

struct Mvm {
    home: tempfile::TempDir,
}

impl Mvm {
    fn new() -> Self {
        Self {
            home: tempfile::tempdir().unwrap(),
        }
    }

    fn dir(&self) -> &Path {
        self.home.path()
    }

    fn run(&self, args: &[&str]) -> Output {
        support::mvm(&self.dir().join("state"), args)
    }

    /// Runs with `--json`, asserts the exit status, and parses stdout.
    fn json(&self, args: &[&str], status: i32) -> Value {
        support::mvm_json(&self.dir().join("state"), args, status)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir().join(name)
    }

    /// Signs the example plan with key `key` and returns the envelope's path.
    fn signed_plan(&self, key: &str, extra: &[&str]) -> PathBuf {
        let out = self.path(&format!(
            "plan-{}.dsse.json",
            fs::read_dir(self.dir()).unwrap().count()
        ));
        let input = example("plan/plan.json");
        let mut args = vec![
            "plan",
            "sign",
            "--key",
            key,
            input.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--valid-for",
            "1h",
        ];
        args.extend_from_slice(extra);
        self.json(&args, 0);
        out
    }
}

fn example(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(rel)
}

fn code(doc: &Value) -> &str {
    doc["error"]["code"].as_str().unwrap_or_default()
}

#[test]
fn ir_commands() {
    let mvm = Mvm::new();
    let json_doc = example("hello/workload.json");
    let toml_doc = example("hello/mvm.toml");
    let valid = mvm.json(&["ir", "validate", json_doc.to_str().unwrap()], 0);
    assert_eq!(valid["ok"], true);
    assert_eq!(valid["issues"][0]["code"], "IR101");
    let a = mvm.json(&["ir", "digest", json_doc.to_str().unwrap()], 0);
    let b = mvm.json(&["ir", "digest", toml_doc.to_str().unwrap()], 0);
    assert_eq!(a["ir_digest"], b["ir_digest"]);
    assert_eq!(a["ir_digest"], valid["ir_digest"]);

    let bad = mvm.path("bad.json");
    fs::write(&bad, r#"{"schema_version":"9","id":"Bad","apps":[]}"#).unwrap();
    let refused = mvm.json(&["ir", "validate", bad.to_str().unwrap()], 65);
    assert_eq!(code(&refused), "IR000");
    let codes: Vec<&str> = refused["error"]["details"]["issues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["code"].as_str().unwrap())
        .collect();
    assert_eq!(codes, ["IR001", "IR002", "IR003"]);

    fs::write(&bad, vec![b' '; 2 * 1024 * 1024]).unwrap();
    assert_eq!(
        code(&mvm.json(&["ir", "validate", bad.to_str().unwrap()], 65)),
        "INPUT001"
    );
    fs::write(&bad, b"{\"schema_version\": \"0\", \xff}").unwrap();
    assert_eq!(
        code(&mvm.json(&["ir", "validate", bad.to_str().unwrap()], 65)),
        "INPUT003"
    );
    assert_eq!(
        code(&mvm.json(&["ir", "validate", "/nonexistent/w.json"], 74)),
        "IO001"
    );

    let schema = mvm.run(&["ir", "schema"]);
    let published: Value =
        serde_json::from_str(include_str!("../ir/schema/workload-v0.schema.json")).unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&schema.stdout).unwrap(),
        published
    );
}

#[test]
fn usage_errors_exit_2() {
    let mvm = Mvm::new();
    assert_eq!(mvm.run(&["plan", "frobnicate"]).status.code(), Some(2));
    assert_eq!(mvm.run(&["ir", "validate"]).status.code(), Some(2));
    assert_eq!(
        mvm.run(&["plan", "sign", "x", "-o", "y", "--valid-for", "soon"])
            .status
            .code(),
        Some(2)
    );
}

#[test]
fn keys_lifecycle_and_file_checks() {
    let mvm = Mvm::new();
    let generated = mvm.json(&["keys", "generate", "--name", "ci"], 0);
    let keyid = generated["keyid"].as_str().unwrap().to_string();
    assert_eq!(
        code(&mvm.json(&["keys", "generate", "--name", "ci"], 65)),
        "KEY003"
    );
    assert_eq!(
        code(&mvm.json(&["keys", "generate", "--name", "../evil"], 65)),
        "KEY002"
    );

    let private = mvm.dir().join("state/keys/ci.key");
    assert_eq!(
        fs::metadata(&private).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let listed = mvm.run(&["keys", "list"]);
    let exported = mvm.run(&["keys", "export", "ci"]);
    for out in [&listed, &exported] {
        assert!(!String::from_utf8_lossy(&out.stdout).contains("PRIVATE KEY"));
    }
    assert!(String::from_utf8_lossy(&exported.stdout).starts_with("-----BEGIN PUBLIC KEY-----"));

    let pem = mvm.path("ci.pem");
    mvm.json(&["keys", "export", "ci", "-o", pem.to_str().unwrap()], 0);
    mvm.json(&["keys", "untrust", &keyid], 0);
    let list = mvm.json(&["keys", "list"], 0);
    let ci = list["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["keyid"] == keyid.as_str())
        .unwrap();
    assert_eq!(ci["trusted"], false);
    assert_eq!(code(&mvm.json(&["keys", "untrust", &keyid], 65)), "KEY006");
    let trusted = mvm.json(&["keys", "trust", pem.to_str().unwrap()], 0);
    assert_eq!(trusted["keyid"], keyid.as_str());

    fs::set_permissions(&private, fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(code(&mvm.json(&["keys", "export", "ci"], 1)), "KEY004");
    fs::set_permissions(&private, fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(
        &private,
        "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    assert_eq!(code(&mvm.json(&["keys", "export", "ci"], 1)), "KEY005");
}

#[test]
fn plan_sign_verify_inspect_and_refusals() {
    let mvm = Mvm::new();
    mvm.json(&["keys", "generate", "--name", "ci"], 0);
    let plan = mvm.signed_plan("ci", &[]);
    let verified = mvm.json(&["plan", "verify", plan.to_str().unwrap()], 0);
    assert_eq!(verified["single_use"], false);
    // Verifying never consumes: a reusable or single-use plan verifies again and again.
    let single = mvm.signed_plan("ci", &["--single-use"]);
    for _ in 0..3 {
        mvm.json(&["plan", "verify", plan.to_str().unwrap()], 0);
        assert_eq!(
            mvm.json(&["plan", "verify", single.to_str().unwrap()], 0)["single_use"],
            true
        );
    }
    let inspected = mvm.json(&["plan", "inspect", plan.to_str().unwrap()], 0);
    assert_eq!(inspected["signatures"][0]["status"], "valid");
    assert_eq!(inspected["plan_digest"], verified["plan_digest"]);

    // A flipped payload byte.
    let mut envelope: Value = serde_json::from_slice(&fs::read(&plan).unwrap()).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut payload = b64.decode(envelope["payload"].as_str().unwrap()).unwrap();
    payload[10] ^= 1;
    envelope["payload"] = b64.encode(&payload).into();
    let tampered = mvm.path("tampered.dsse.json");
    fs::write(&tampered, serde_json::to_vec(&envelope).unwrap()).unwrap();
    assert_eq!(
        code(&mvm.json(&["plan", "verify", tampered.to_str().unwrap()], 1)),
        "PLAN003"
    );
    let inspected = mvm.json(&["plan", "inspect", tampered.to_str().unwrap()], 0);
    assert_eq!(inspected["signatures"][0]["status"], "invalid");

    // A key this host does not trust.
    let other = Mvm::new();
    other.json(&["keys", "generate", "--name", "stranger"], 0);
    let foreign = other.signed_plan("stranger", &[]);
    assert_eq!(
        code(&mvm.json(&["plan", "verify", foreign.to_str().unwrap()], 1)),
        "PLAN002"
    );

    // Malformed input.
    let junk = mvm.path("junk.json");
    fs::write(&junk, b"{\"payload\": 1}").unwrap();
    assert_eq!(
        code(&mvm.json(&["plan", "verify", junk.to_str().unwrap()], 65)),
        "PLAN001"
    );
    let bad_plan = mvm.path("bad-plan.json");
    fs::write(&bad_plan, br#"{"schema_version":"1","surprise":true}"#).unwrap();
    let refused = mvm.json(
        &[
            "plan",
            "sign",
            "--key",
            "ci",
            bad_plan.to_str().unwrap(),
            "-o",
            junk.to_str().unwrap(),
        ],
        65,
    );
    assert_eq!(code(&refused), "PLAN006");
    // The refused signing left the existing file alone.
    assert_eq!(fs::read(&junk).unwrap(), b"{\"payload\": 1}");

    // Every signing and verification left an intact audit trail.
    let audit = mvm.json(&["audit", "verify"], 0);
    assert!(audit["entries"].as_u64().unwrap() >= 12, "{audit}");
    let tail = mvm.json(&["audit", "tail", "-n", "2"], 0);
    let events: Vec<&str> = tail["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(events, ["plan.verify", "plan.verify"]);
    assert_eq!(tail["entries"][1]["fields"]["result"], "refused");
    assert_eq!(tail["entries"][1]["fields"]["code"], "PLAN001");
}

#[test]
fn audit_tampering_is_reported_with_exit_1() {
    let mvm = Mvm::new();
    for name in ["a", "b", "c"] {
        mvm.json(&["keys", "generate", "--name", name], 0);
    }
    mvm.json(&["audit", "verify"], 0);
    let log = mvm.dir().join("state/audit/audit.jsonl");
    let text = fs::read_to_string(&log).unwrap();
    fs::write(&log, text.replacen("\"name\":\"b\"", "\"name\":\"x\"", 1)).unwrap();
    let broken = mvm.json(&["audit", "verify"], 1);
    assert_eq!(code(&broken), "AUDIT002");
    assert_eq!(broken["error"]["details"]["break"]["line"], 2);
}

/// Standard tools verify mvm's envelopes with the exported key: the signature is plain ed25519
/// over the DSSE PAE, and the public key plain SubjectPublicKeyInfo PEM. The private key file is
/// PKCS#8 that openssl reads.
#[test]
fn openssl_verifies_our_envelopes() {
    let mvm = Mvm::new();
    mvm.json(&["keys", "generate", "--name", "ci"], 0);
    let plan = mvm.signed_plan("ci", &[]);
    let pem = mvm.path("ci.pem");
    mvm.json(&["keys", "export", "ci", "-o", pem.to_str().unwrap()], 0);

    let envelope: Value = serde_json::from_slice(&fs::read(&plan).unwrap()).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    let payload = b64.decode(envelope["payload"].as_str().unwrap()).unwrap();
    let payload_type = envelope["payloadType"].as_str().unwrap();
    let mut pae = format!(
        "DSSEv1 {} {payload_type} {} ",
        payload_type.len(),
        payload.len()
    )
    .into_bytes();
    pae.extend_from_slice(&payload);
    fs::write(mvm.path("pae.bin"), &pae).unwrap();
    let sig = b64
        .decode(envelope["signatures"][0]["sig"].as_str().unwrap())
        .unwrap();
    fs::write(mvm.path("sig.bin"), &sig).unwrap();

    let openssl = |args: &[&str]| {
        Command::new("openssl")
            .args(args)
            .current_dir(mvm.dir())
            .output()
            .expect("openssl must be installed (.ci/run installs it)")
    };
    let verify = [
        "pkeyutl", "-verify", "-pubin", "-inkey", "ci.pem", "-rawin", "-in", "pae.bin", "-sigfile",
        "sig.bin",
    ];
    let ok = openssl(&verify);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    pae[20] ^= 1;
    fs::write(mvm.path("pae.bin"), &pae).unwrap();
    assert!(
        !openssl(&verify).status.success(),
        "openssl accepted a tampered message"
    );

    let key = mvm.dir().join("state/keys/ci.key");
    let read = openssl(&["pkey", "-in", key.to_str().unwrap(), "-noout"]);
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
}

/// On a fresh host the default key is created on first use, so signing needs no set-up.
#[test]
fn signing_with_the_default_key_needs_no_setup() {
    let mvm = Mvm::new();
    let plan = mvm.signed_plan("default", &[]);
    mvm.json(&["plan", "verify", plan.to_str().unwrap()], 0);
    let keys = mvm.json(&["keys", "list"], 0);
    assert_eq!(keys["keys"][0]["name"], "default");
    assert_eq!(keys["keys"][0]["private"], true);
    // Any other key must exist first.
    let out = mvm.path("x.dsse.json");
    let input = example("plan/plan.json");
    let args = [
        "plan",
        "sign",
        "--key",
        "nope",
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    assert_eq!(code(&mvm.json(&args, 65)), "KEY001");
    assert!(!out.exists());
}
