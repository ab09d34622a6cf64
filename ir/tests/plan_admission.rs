//! Plan admission end to end: a signed launch plan is admitted, and every way of tampering with
//! it, signing it wrongly, replaying it or corrupting the nonce ledger is refused with its own
//! stable error code.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::thread;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use mvm_ir::admission::{
    verify_plan, verify_signed_plan, NonceLedger, PlanAdmission, VerifiedPlan,
};
use mvm_ir::canonical;
use mvm_ir::digest::{sha256_hex, sha256_prefixed};
use mvm_ir::dsse::{Envelope, EnvelopeSignature};
use mvm_ir::keys::{Signer, TrustStore};
use mvm_ir::plan::{
    fresh_nonce, ArtifactPin, KernelPin, LaunchPlan, PlanEntrypoint, PlanResources, Profile,
    ResolvedPolicy, RootfsPin, SecretBinding, Timestamp, VerityPin, MAX_ENVELOPE_BYTES,
    PAYLOAD_TYPE, SCHEMA_VERSION,
};
use mvm_ir::workload::{EgressGrant, Mount, NetworkMode, PortForward};
use mvm_ir::Error;
use proptest::prelude::*;
use serde_json::{json, Value};
use time::{Duration, OffsetDateTime};

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

fn digest_of(label: &str) -> String {
    sha256_prefixed(label.as_bytes())
}

/// A plan with every field set, valid from a minute ago for an hour.
fn valid_plan(single_use: bool) -> LaunchPlan {
    let now = OffsetDateTime::now_utc();
    LaunchPlan {
        schema_version: SCHEMA_VERSION.into(),
        workload_id: "hello-world".into(),
        app: "web".into(),
        ir_digest: digest_of("workload ir"),
        kernel: KernelPin {
            path: "vmlinux".into(),
            digest: digest_of("kernel"),
            cmdline: "console=ttyS0 ro panic=-1 mvm.verity=on mvm.policy=standard,inet,host_copy"
                .into(),
        },
        initramfs: ArtifactPin {
            path: "initramfs.cpio.zst".into(),
            digest: digest_of("initramfs"),
        },
        rootfs: RootfsPin {
            path: "rootfs.erofs".into(),
            digest: digest_of("rootfs"),
            verity: VerityPin {
                path: "rootfs.verity".into(),
                digest: digest_of("verity tree"),
                root_hash: sha256_hex(b"verity root"),
                salt: sha256_hex(b"salt"),
                hash_algorithm: "sha256".into(),
                data_block_size: 4096,
                hash_block_size: 4096,
                data_blocks: 2048,
                hash_offset: 0,
            },
        },
        resources: PlanResources {
            cpu_cores: 2,
            memory_mb: 512,
        },
        policy: ResolvedPolicy {
            profile: Profile::Standard,
            grants: Profile::Standard.grants(true),
            network: NetworkMode::Allowlist,
            egress: vec![EgressGrant {
                host: "api.example.com".into(),
                port: 443,
            }],
            ports: vec![PortForward {
                guest: 8080,
                host: Some(18080),
            }],
            env: BTreeMap::from([
                ("LANG".to_string(), "C.UTF-8".to_string()),
                ("GREETING".to_string(), "héllo wörld ✓".to_string()),
            ]),
            secrets: vec![SecretBinding {
                env: "API_TOKEN".into(),
                name: "api-token".into(),
                optional: false,
            }],
            mounts: vec![Mount {
                volume: "data".into(),
                target: "/data".into(),
                read_only: true,
            }],
        },
        entrypoint: PlanEntrypoint {
            command: vec!["/bin/hello".into(), "--port".into(), "8080".into()],
            cwd: Some("/srv".into()),
            user: None,
        },
        services: vec![],
        health_check: None,
        valid_from: Timestamp(now - Duration::minutes(1)),
        valid_until: Timestamp(now + Duration::hours(1)),
        nonce: fresh_nonce().unwrap(),
        single_use,
    }
}

/// The canonical payload bytes of a plan.
fn payload(plan: &LaunchPlan) -> Vec<u8> {
    canonical::to_vec(plan).unwrap()
}

/// A correctly signed envelope of any payload, as the bytes mvm writes.
fn sign_bytes(payload_type: &str, payload: &[u8], signer: &Signer) -> Vec<u8> {
    Envelope::sign(payload_type, payload, signer).to_json()
}

/// A correctly signed plan envelope.
fn sign_plan(plan: &LaunchPlan, signer: &Signer) -> Vec<u8> {
    sign_bytes(PAYLOAD_TYPE, &payload(plan), signer)
}

/// A correctly signed plan whose payload JSON was edited by `edit` after serialization.
fn sign_edited(plan: &LaunchPlan, signer: &Signer, edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut value = serde_json::to_value(plan).unwrap();
    edit(&mut value);
    sign_bytes(
        PAYLOAD_TYPE,
        &canonical::value_to_vec(&value).unwrap(),
        signer,
    )
}

fn trust_of(signers: &[&Signer]) -> TrustStore {
    let mut trust = TrustStore::default();
    for signer in signers {
        trust.insert(signer.verifying_key());
    }
    trust
}

fn parse_envelope(bytes: &[u8]) -> Envelope {
    Envelope::parse(bytes).unwrap()
}

/// A host: one trusted signing key and a ledger directory.
struct Host {
    signer: Signer,
    trust: TrustStore,
    dir: tempfile::TempDir,
}

impl Host {
    fn new() -> Self {
        let signer = Signer::generate().unwrap();
        let trust = trust_of(&[&signer]);
        Self {
            signer,
            trust,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn ledger_dir(&self) -> &Path {
        self.dir.path()
    }

    fn ledger(&self) -> NonceLedger {
        NonceLedger::at(self.ledger_dir())
    }

    fn ledger_file(&self) -> PathBuf {
        self.ledger_dir().join("nonces.json")
    }

    fn admission(&self) -> PlanAdmission {
        PlanAdmission::new(self.trust.clone(), self.ledger())
    }

    fn sign(&self, plan: &LaunchPlan) -> Vec<u8> {
        sign_plan(plan, &self.signer)
    }

    fn verify(&self, bytes: &[u8], now: OffsetDateTime) -> Result<VerifiedPlan, Error> {
        verify_plan(bytes, &self.trust, &self.ledger(), now)
    }

    /// The nonces recorded in the ledger file, with their expiry.
    fn recorded(&self) -> BTreeMap<String, String> {
        let text = match fs::read(self.ledger_file()) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return BTreeMap::new(),
            Err(e) => panic!("reading the ledger: {e}"),
        };
        let value: Value = serde_json::from_slice(&text).unwrap();
        assert_eq!(value["version"], json!(1), "ledger file: {value}");
        value["nonces"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect()
    }
}

fn code<T: std::fmt::Debug>(result: Result<T, Error>) -> &'static str {
    match result {
        Ok(v) => panic!("expected a refusal, got Ok({v:?})"),
        Err(e) => e.code(),
    }
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

// ---------------------------------------------------------------------------------------------
// The good path
// ---------------------------------------------------------------------------------------------

#[test]
fn a_valid_signed_plan_is_admitted_and_reports_its_identity() {
    let host = Host::new();
    let plan = valid_plan(true);
    let bytes = host.sign(&plan);

    let verified = host.verify(&bytes, now()).unwrap();
    assert_eq!(verified.plan, plan);
    assert_eq!(verified.keyid, host.signer.keyid());
    assert_eq!(verified.digest, sha256_prefixed(&payload(&plan)));
    // Verification consumed nothing.
    assert!(!host.ledger_file().exists());

    let admitted = host.admission().admit(&bytes, now()).unwrap();
    assert_eq!(admitted, verified);
    assert_eq!(
        host.recorded().keys().cloned().collect::<Vec<_>>(),
        vec![plan.nonce.clone()]
    );
    assert_eq!(
        host.recorded()[&plan.nonce],
        plan.valid_until.to_string(),
        "the nonce is kept until its plan expires"
    );
}

#[test]
fn the_validity_window_is_half_open() {
    let host = Host::new();
    let plan = valid_plan(false);
    let bytes = host.sign(&plan);
    // valid_from itself is inside the window, valid_until itself is outside.
    host.verify(&bytes, plan.valid_from.0).unwrap();
    host.verify(&bytes, plan.valid_until.0 - Duration::nanoseconds(1))
        .unwrap();
    assert_eq!(code(host.verify(&bytes, plan.valid_until.0)), "PLAN008");
    assert_eq!(
        code(host.verify(&bytes, plan.valid_from.0 - Duration::nanoseconds(1))),
        "PLAN007"
    );
}

#[test]
fn an_envelope_at_the_size_limit_is_read_and_one_byte_more_is_refused() {
    let host = Host::new();
    let plan = valid_plan(false);
    let mut bytes = host.sign(&plan);
    // Trailing white space keeps the JSON valid, so only the size decides.
    bytes.resize(MAX_ENVELOPE_BYTES as usize, b' ');
    host.verify(&bytes, now()).unwrap();
    bytes.push(b' ');
    assert_eq!(code(host.verify(&bytes, now())), "INPUT001");
    assert_eq!(code(host.admission().admit(&bytes, now())), "INPUT001");
}

#[test]
fn a_second_signature_by_an_untrusted_key_does_not_matter() {
    let host = Host::new();
    let stranger = Signer::generate().unwrap();
    let plan = valid_plan(false);
    let body = payload(&plan);
    let mut envelope = Envelope::sign(PAYLOAD_TYPE, &body, &stranger);
    envelope
        .signatures
        .extend(Envelope::sign(PAYLOAD_TYPE, &body, &host.signer).signatures);
    let verified = host.verify(&envelope.to_json(), now()).unwrap();
    assert_eq!(verified.keyid, host.signer.keyid());
    assert_eq!(verified.plan, plan);
}

// ---------------------------------------------------------------------------------------------
// The refusal table
// ---------------------------------------------------------------------------------------------

/// An edit of a plan's JSON before it is signed.
type JsonEdit = Box<dyn FnOnce(&mut Value)>;
/// An edit of a plan before it is signed.
type PlanEdit = Box<dyn Fn(&mut LaunchPlan)>;

/// Every mutation of a good single-use plan envelope, with the code that must refuse it.
fn mutations(host: &Host, plan: &LaunchPlan) -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let good = host.sign(plan);
    let envelope = parse_envelope(&good);
    let body = payload(plan);
    let stranger = Signer::generate().unwrap();
    let mut table: Vec<(&'static str, Vec<u8>, &'static str)> = Vec::new();

    // --- signatures (PLAN003) ---
    for (name, at) in [
        ("payload first byte flipped", 0),
        ("payload middle byte flipped", body.len() / 2),
        ("payload last byte flipped", body.len() - 1),
    ] {
        let mut flipped = body.clone();
        flipped[at] ^= 0x01;
        let mut e = envelope.clone();
        e.payload = STANDARD.encode(&flipped);
        table.push((name, e.to_json(), "PLAN003"));
    }
    {
        // A payload with the nonce changed is still a valid plan: only the signature catches it.
        let mut other = plan.clone();
        other.nonce = fresh_nonce().unwrap();
        let mut e = envelope.clone();
        e.payload = STANDARD.encode(payload(&other));
        table.push((
            "payload swapped for another valid plan",
            e.to_json(),
            "PLAN003",
        ));
    }
    for (name, at) in [
        ("signature first byte flipped", 0),
        ("signature last byte flipped", 63),
    ] {
        let mut sig = STANDARD.decode(&envelope.signatures[0].sig).unwrap();
        sig[at] ^= 0x80;
        let mut e = envelope.clone();
        e.signatures[0].sig = STANDARD.encode(&sig);
        table.push((name, e.to_json(), "PLAN003"));
    }
    {
        // The payload type is covered by the signature (DSSE PAE).
        let mut e = envelope.clone();
        e.payload_type = "application/vnd.mvm.receipt.v1+json".into();
        table.push(("payloadType changed after signing", e.to_json(), "PLAN003"));
    }
    {
        // An untrusted key's signature presented under the trusted key's id.
        let mut e = Envelope::sign(PAYLOAD_TYPE, &body, &stranger);
        e.signatures[0].keyid = host.signer.keyid().to_string();
        table.push((
            "stranger's signature under the trusted keyid",
            e.to_json(),
            "PLAN003",
        ));
    }
    {
        // One good and one bad signature by trusted keys: every trusted signature must verify.
        let mut e = envelope.clone();
        let forged = host.signer.sign(b"some other message");
        e.signatures.push(EnvelopeSignature {
            keyid: host.signer.keyid().to_string(),
            sig: STANDARD.encode(forged),
        });
        table.push((
            "a second, bad signature by the trusted key",
            e.to_json(),
            "PLAN003",
        ));
    }

    // --- signer (PLAN002) ---
    table.push((
        "signed by an untrusted key",
        sign_plan(plan, &stranger),
        "PLAN002",
    ));
    {
        let mut e = envelope.clone();
        e.signatures[0].keyid = sha256_hex(b"no such key");
        table.push(("keyid of no trusted key", e.to_json(), "PLAN002"));
    }

    // --- payload type (PLAN004), properly signed ---
    for wrong in [
        "application/vnd.mvm.receipt.v1+json",
        "application/vnd.mvm.plan.v2+json",
        "application/json",
        "",
    ] {
        table.push((
            "wrong payloadType, properly signed",
            sign_bytes(wrong, &body, &host.signer),
            "PLAN004",
        ));
    }

    // --- schema version (PLAN005), properly signed ---
    table.push((
        "schema_version 2",
        sign_edited(plan, &host.signer, |v| v["schema_version"] = json!("2")),
        "PLAN005",
    ));
    table.push((
        "schema_version 2 with a field this build does not know",
        sign_edited(plan, &host.signer, |v| {
            v["schema_version"] = json!("2");
            v["gpu"] = json!({"count": 1});
        }),
        "PLAN005",
    ));
    table.push((
        "schema_version 0",
        sign_edited(plan, &host.signer, |v| v["schema_version"] = json!("0")),
        "PLAN005",
    ));

    // --- strict parse and plan rules (PLAN006), properly signed ---
    let edits: Vec<(&'static str, JsonEdit)> = vec![
        (
            "unknown top-level field",
            Box::new(|v| v["debug"] = json!(true)),
        ),
        (
            "unknown field inside rootfs.verity",
            Box::new(|v| v["rootfs"]["verity"]["format"] = json!(1)),
        ),
        (
            "unknown field inside policy",
            Box::new(|v| v["policy"]["privileged"] = json!(true)),
        ),
        (
            "missing nonce",
            Box::new(|v| {
                v.as_object_mut().unwrap().remove("nonce");
            }),
        ),
        (
            "schema_version not a string",
            Box::new(|v| v["schema_version"] = json!(1)),
        ),
        (
            "valid_until not RFC 3339",
            Box::new(|v| v["valid_until"] = json!("tomorrow")),
        ),
        (
            "cpu_cores negative",
            Box::new(|v| v["resources"]["cpu_cores"] = json!(-1)),
        ),
        // The profile's rules: grants no wider than the profile's, signed into the command
        // line exactly, no network under restrictive, resources within the ceilings.
        (
            "grants missing",
            Box::new(|v| {
                v["policy"].as_object_mut().unwrap().remove("grants");
            }),
        ),
        (
            "a terminal granted under standard",
            Box::new(|v| v["policy"]["grants"]["terminal"] = json!(true)),
        ),
        (
            "an unrestricted seccomp tier under standard",
            Box::new(|v| v["policy"]["grants"]["seccomp"] = json!("unrestricted")),
        ),
        (
            "the command line's grants wider than the plan's",
            Box::new(|v| {
                let cmdline = v["kernel"]["cmdline"].as_str().unwrap().replace(
                    "mvm.policy=standard,inet,host_copy",
                    "mvm.policy=unrestricted,inet,host_copy",
                );
                v["kernel"]["cmdline"] = json!(cmdline);
            }),
        ),
        (
            "the command line without its grants",
            Box::new(|v| {
                let cmdline = v["kernel"]["cmdline"]
                    .as_str()
                    .unwrap()
                    .replace(" mvm.policy=standard,inet,host_copy", "");
                v["kernel"]["cmdline"] = json!(cmdline);
            }),
        ),
        (
            "the grants twice on the command line",
            Box::new(|v| {
                let cmdline = format!(
                    "{} mvm.policy=standard,inet,host_copy",
                    v["kernel"]["cmdline"].as_str().unwrap()
                );
                v["kernel"]["cmdline"] = json!(cmdline);
            }),
        ),
        (
            "egress under restrictive",
            Box::new(|v| {
                v["policy"]["profile"] = json!("restrictive");
                v["policy"]["grants"]["seccomp"] = json!("essential");
                v["policy"]["grants"]["inet"] = json!(false);
                v["policy"]["grants"]["client_env"] = json!(false);
                v["policy"]["grants"]["host_copy"] = json!(false);
                v["policy"]["grants"]["unbound_secrets"] = json!(false);
                v["kernel"]["cmdline"] = json!("console=ttyS0 mvm.policy=essential");
            }),
        ),
        (
            "more memory than standard allows",
            Box::new(|v| v["resources"]["memory_mb"] = json!(32768)),
        ),
    ];
    for (name, edit) in edits {
        table.push((name, sign_edited(plan, &host.signer, edit), "PLAN006"));
    }
    {
        // Duplicate members: one parser might take the first, another the last.
        let text = String::from_utf8(body.clone()).unwrap();
        let twice = text.replacen('{', "{\"single_use\":false,", 1);
        assert!(twice.contains("\"single_use\":true"));
        table.push((
            "duplicate single_use member",
            sign_bytes(PAYLOAD_TYPE, twice.as_bytes(), &host.signer),
            "PLAN006",
        ));
        let twice = text.replacen("\"env\":{", "\"env\":{\"LANG\":\"C\",", 1);
        assert_ne!(twice, text);
        table.push((
            "duplicate env member",
            sign_bytes(PAYLOAD_TYPE, twice.as_bytes(), &host.signer),
            "PLAN006",
        ));
    }
    table.push((
        "payload is not JSON",
        sign_bytes(PAYLOAD_TYPE, b"not json", &host.signer),
        "PLAN006",
    ));
    table.push((
        "payload is a JSON array",
        sign_bytes(PAYLOAD_TYPE, b"[1,2]", &host.signer),
        "PLAN006",
    ));
    table.push((
        "payload is empty",
        sign_bytes(PAYLOAD_TYPE, b"", &host.signer),
        "PLAN006",
    ));

    let rules: Vec<(&'static str, PlanEdit)> = vec![
        (
            "kernel path with '/'",
            Box::new(|p| p.kernel.path = "boot/vmlinux".into()),
        ),
        (
            "kernel path absolute",
            Box::new(|p| p.kernel.path = "/vmlinux".into()),
        ),
        (
            "initramfs path '..'",
            Box::new(|p| p.initramfs.path = "..".into()),
        ),
        ("rootfs path '.'", Box::new(|p| p.rootfs.path = ".".into())),
        (
            "rootfs path empty",
            Box::new(|p| p.rootfs.path = String::new()),
        ),
        (
            "verity path '../x'",
            Box::new(|p| p.rootfs.verity.path = "../rootfs.verity".into()),
        ),
        (
            "path with NUL",
            Box::new(|p| p.kernel.path = "vm\0linux".into()),
        ),
        (
            "path of 256 bytes",
            Box::new(|p| p.kernel.path = "k".repeat(256)),
        ),
        (
            "kernel digest without prefix",
            Box::new(|p| p.kernel.digest = sha256_hex(b"k")),
        ),
        (
            "rootfs digest uppercase",
            Box::new(|p| p.rootfs.digest = format!("sha256:{}", sha256_hex(b"r").to_uppercase())),
        ),
        (
            "initramfs digest too short",
            Box::new(|p| p.initramfs.digest = format!("sha256:{}", &sha256_hex(b"i")[..63])),
        ),
        (
            "verity digest sha512",
            Box::new(|p| p.rootfs.verity.digest = format!("sha512:{}", sha256_hex(b"v"))),
        ),
        (
            "ir_digest bad",
            Box::new(|p| p.ir_digest = "sha256:xyz".into()),
        ),
        (
            "workload_id not an identifier",
            Box::new(|p| p.workload_id = "Hello World".into()),
        ),
        (
            "app not an identifier",
            Box::new(|p| p.app = "../web".into()),
        ),
        (
            "cmdline with NUL",
            Box::new(|p| p.kernel.cmdline = "console=ttyS0\0init=/bin/sh".into()),
        ),
        (
            "cmdline over 4096 bytes",
            Box::new(|p| p.kernel.cmdline = "x".repeat(4097)),
        ),
        (
            "verity root hash prefixed",
            Box::new(|p| p.rootfs.verity.root_hash = digest_of("root")),
        ),
        (
            "verity salt odd length",
            Box::new(|p| p.rootfs.verity.salt = "abc".into()),
        ),
        (
            "verity salt uppercase",
            Box::new(|p| p.rootfs.verity.salt = "AB".into()),
        ),
        (
            "verity salt over 256 bytes",
            Box::new(|p| p.rootfs.verity.salt = "ab".repeat(257)),
        ),
        (
            "verity algorithm sha1",
            Box::new(|p| p.rootfs.verity.hash_algorithm = "sha1".into()),
        ),
        (
            "data block size not a power of two",
            Box::new(|p| p.rootfs.verity.data_block_size = 4000),
        ),
        (
            "hash block size too small",
            Box::new(|p| p.rootfs.verity.hash_block_size = 256),
        ),
        (
            "hash block size too large",
            Box::new(|p| p.rootfs.verity.hash_block_size = 131072),
        ),
        (
            "zero data blocks",
            Box::new(|p| p.rootfs.verity.data_blocks = 0),
        ),
        ("zero vCPUs", Box::new(|p| p.resources.cpu_cores = 0)),
        ("33 vCPUs", Box::new(|p| p.resources.cpu_cores = 33)),
        ("32 MiB of memory", Box::new(|p| p.resources.memory_mb = 32)),
        (
            "env LD_PRELOAD",
            Box::new(|p| {
                p.policy
                    .env
                    .insert("LD_PRELOAD".into(), "/tmp/evil.so".into());
            }),
        ),
        (
            "env LD_LIBRARY_PATH",
            Box::new(|p| {
                p.policy.env.insert("LD_LIBRARY_PATH".into(), "/tmp".into());
            }),
        ),
        (
            "secret bound to LD_PRELOAD",
            Box::new(|p| {
                p.policy.secrets.push(SecretBinding {
                    env: "LD_PRELOAD".into(),
                    name: "lib".into(),
                    optional: true,
                })
            }),
        ),
        (
            "env name with '='",
            Box::new(|p| {
                p.policy.env.insert("A=B".into(), "x".into());
            }),
        ),
        (
            "env value with NUL",
            Box::new(|p| {
                p.policy.env.insert("OK".into(), "a\0b".into());
            }),
        ),
        (
            "secret name not an identifier",
            Box::new(|p| p.policy.secrets[0].name = "../etc/shadow".into()),
        ),
        (
            "egress host not a DNS name",
            Box::new(|p| p.policy.egress[0].host = "exa mple.com".into()),
        ),
        ("egress port 0", Box::new(|p| p.policy.egress[0].port = 0)),
        (
            "mount target relative",
            Box::new(|p| p.policy.mounts[0].target = "data".into()),
        ),
        (
            "mount target with '..'",
            Box::new(|p| p.policy.mounts[0].target = "/data/../etc".into()),
        ),
        (
            "entrypoint cwd relative",
            Box::new(|p| p.entrypoint.cwd = Some("work".into())),
        ),
        (
            "entrypoint argument with NUL",
            Box::new(|p| p.entrypoint.command.push("a\0b".into())),
        ),
        (
            "egress with network none",
            Box::new(|p| p.policy.network = NetworkMode::None),
        ),
        (
            "empty entrypoint",
            Box::new(|p| p.entrypoint.command.clear()),
        ),
        (
            "entrypoint argv[0] empty",
            Box::new(|p| p.entrypoint.command[0] = String::new()),
        ),
        ("nonce too short", Box::new(|p| p.nonce = "abcd".into())),
        ("nonce uppercase", Box::new(|p| p.nonce = "A".repeat(32))),
        ("nonce not hex", Box::new(|p| p.nonce = "g".repeat(32))),
        (
            "valid_until equal to valid_from",
            Box::new(|p| p.valid_until = p.valid_from),
        ),
        (
            "valid_until before valid_from",
            Box::new(|p| p.valid_until = Timestamp(p.valid_from.0 - Duration::seconds(1))),
        ),
    ];
    for (name, rule) in rules {
        let mut bad = plan.clone();
        rule(&mut bad);
        assert_ne!(&bad, plan, "{name}: the mutation changed nothing");
        table.push((name, host.sign(&bad), "PLAN006"));
    }

    // --- validity window, properly signed ---
    {
        let mut expired = plan.clone();
        expired.valid_from = Timestamp(now() - Duration::hours(2));
        expired.valid_until = Timestamp(now() - Duration::hours(1));
        table.push(("expired an hour ago", host.sign(&expired), "PLAN008"));
        expired.valid_until = Timestamp(now() - Duration::seconds(1));
        table.push(("expired a second ago", host.sign(&expired), "PLAN008"));
        let mut early = plan.clone();
        early.valid_from = Timestamp(now() + Duration::hours(1));
        early.valid_until = Timestamp(now() + Duration::hours(2));
        table.push(("not valid for another hour", host.sign(&early), "PLAN007"));
    }

    // --- envelope shape (PLAN001) ---
    let sig = envelope.signatures[0].sig.clone();
    let keyid = envelope.signatures[0].keyid.clone();
    let b64 = envelope.payload.clone();
    let shaped = |v: Value| serde_json::to_vec(&v).unwrap();
    let malformed: Vec<(&'static str, Vec<u8>)> = vec![
        ("empty input", Vec::new()),
        ("not JSON", b"this is not an envelope".to_vec()),
        ("truncated JSON", good[..good.len() / 2].to_vec()),
        ("not UTF-8", b"\xff\xfe\x00{".to_vec()),
        ("JSON null", b"null".to_vec()),
        ("JSON array", b"[]".to_vec()),
        ("empty object", b"{}".to_vec()),
        (
            "duplicate payload member",
            String::from_utf8(good.clone())
                .unwrap()
                .replacen(
                    '{',
                    &format!("{{\"payload\":\"{}\",", STANDARD.encode(b"{}")),
                    1,
                )
                .into_bytes(),
        ),
        (
            "missing payloadType",
            shaped(json!({"payload": b64, "signatures": [{"keyid": keyid, "sig": sig}]})),
        ),
        (
            "missing signatures",
            shaped(json!({"payload": b64, "payloadType": PAYLOAD_TYPE})),
        ),
        (
            "extra top-level field",
            shaped(json!({"payload": b64, "payloadType": PAYLOAD_TYPE,
                          "signatures": [{"keyid": keyid, "sig": sig}], "note": "hi"})),
        ),
        (
            "extra signature field",
            shaped(json!({"payload": b64, "payloadType": PAYLOAD_TYPE,
                          "signatures": [{"keyid": keyid, "sig": sig, "cert": ""}]})),
        ),
        (
            "snake_case payload_type",
            shaped(json!({"payload": b64, "payload_type": PAYLOAD_TYPE,
                          "signatures": [{"keyid": keyid, "sig": sig}]})),
        ),
        (
            "payload not base64",
            shaped(
                json!({"payload": "!!not base64!!", "payloadType": PAYLOAD_TYPE,
                          "signatures": [{"keyid": keyid, "sig": sig}]}),
            ),
        ),
        (
            "payload base64url",
            shaped(
                json!({"payload": b64.replace('+', "-").replace('/', "_") + "-_",
                          "payloadType": PAYLOAD_TYPE,
                          "signatures": [{"keyid": keyid, "sig": sig}]}),
            ),
        ),
        (
            "payload a number",
            shaped(json!({"payload": 7, "payloadType": PAYLOAD_TYPE,
                          "signatures": [{"keyid": keyid, "sig": sig}]})),
        ),
        (
            "no signatures",
            shaped(json!({"payload": b64, "payloadType": PAYLOAD_TYPE, "signatures": []})),
        ),
        (
            "signatures not a list",
            shaped(json!({"payload": b64, "payloadType": PAYLOAD_TYPE,
                          "signatures": {"keyid": keyid, "sig": sig}})),
        ),
        (
            "keyid uppercase",
            shaped(json!({"payload": b64, "payloadType": PAYLOAD_TYPE,
                          "signatures": [{"keyid": keyid.to_uppercase(), "sig": sig}]})),
        ),
        (
            "keyid empty",
            shaped(json!({"payload": b64, "payloadType": PAYLOAD_TYPE,
                          "signatures": [{"keyid": "", "sig": sig}]})),
        ),
        (
            "signature not base64",
            shaped(json!({"payload": b64, "payloadType": PAYLOAD_TYPE,
                          "signatures": [{"keyid": keyid, "sig": "%%%"}]})),
        ),
        (
            "signature of 63 bytes",
            shaped(json!({"payload": b64, "payloadType": PAYLOAD_TYPE,
                          "signatures": [{"keyid": keyid, "sig": STANDARD.encode([7u8; 63])}]})),
        ),
        (
            "signature of 65 bytes",
            shaped(json!({"payload": b64, "payloadType": PAYLOAD_TYPE,
                          "signatures": [{"keyid": keyid, "sig": STANDARD.encode([7u8; 65])}]})),
        ),
        (
            "nine signatures",
            shaped(json!({"payload": b64, "payloadType": PAYLOAD_TYPE,
                          "signatures": vec![json!({"keyid": keyid, "sig": sig}); 9]})),
        ),
    ];
    for (name, bytes) in malformed {
        table.push((name, bytes, "PLAN001"));
    }

    // --- size (INPUT001) ---
    {
        let mut big = good.clone();
        big.resize(MAX_ENVELOPE_BYTES as usize + 1, b' ');
        table.push(("envelope one byte over the limit", big, "INPUT001"));
        let mut huge = envelope.clone();
        huge.payload = STANDARD.encode(vec![b'x'; MAX_ENVELOPE_BYTES as usize]);
        table.push(("payload over the limit", huge.to_json(), "INPUT001"));
    }
    table
}

#[test]
fn every_mutation_is_refused_with_its_code_and_consumes_nothing() {
    let host = Host::new();
    let plan = valid_plan(true);
    let table = mutations(&host, &plan);
    assert!(table.len() > 90, "the table has {} rows", table.len());
    let admission = host.admission();
    let mut failures = Vec::new();
    for (name, bytes, expected) in &table {
        for (how, result) in [
            ("verify_plan", host.verify(bytes, now())),
            ("admit", admission.admit(bytes, now())),
        ] {
            match result {
                Err(e) if e.code() == *expected => {}
                Err(e) => failures.push(format!(
                    "{name} ({how}): expected {expected}, got {} ({e})",
                    e.code()
                )),
                Ok(v) => failures.push(format!(
                    "{name} ({how}): expected {expected}, admitted {}",
                    v.digest
                )),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n{}",
        failures.len(),
        table.len(),
        failures.join("\n")
    );

    // No refusal recorded anything, so the untouched plan is still admitted, once.
    assert!(
        host.recorded().is_empty(),
        "refusals recorded {:?}",
        host.recorded()
    );
    let good = host.sign(&plan);
    admission.admit(&good, now()).unwrap();
    assert_eq!(code(admission.admit(&good, now())), "PLAN009");
}

#[test]
fn the_unmutated_plan_passes_every_check_the_table_exercises() {
    // Guards the table above: a valid plan passes each check the table exercises, so each row
    // fails because of its own mutation.
    let host = Host::new();
    let plan = valid_plan(true);
    plan.check().unwrap();
    let bytes = host.sign(&plan);
    verify_signed_plan(&bytes, &host.trust, now()).unwrap();
    // The same plan, checked against a trust store without the key, is refused for the key.
    assert_eq!(
        code(verify_signed_plan(&bytes, &TrustStore::default(), now())),
        "PLAN002"
    );
    // And one hour and one minute later, for the time.
    assert_eq!(
        code(verify_signed_plan(
            &bytes,
            &host.trust,
            now() + Duration::minutes(61)
        )),
        "PLAN008"
    );
}

// ---------------------------------------------------------------------------------------------
// Single use
// ---------------------------------------------------------------------------------------------

#[test]
fn a_single_use_plan_is_admitted_once() {
    let host = Host::new();
    let plan = valid_plan(true);
    let bytes = host.sign(&plan);
    let admission = host.admission();

    admission.admit(&bytes, now()).unwrap();
    let err = admission.admit(&bytes, now()).unwrap_err();
    assert_eq!(err.code(), "PLAN009");
    assert!(err.to_string().contains(&plan.nonce), "{err}");
    // A fresh admission with its own ledger handle sees the same ledger.
    assert_eq!(code(host.admission().admit(&bytes, now())), "PLAN009");
    // Verifying an admitted single-use plan reports the replay.
    assert_eq!(code(host.verify(&bytes, now())), "PLAN009");
    // Re-encoding the same signed plan (pretty vs compact JSON) does not get around the ledger.
    let compact = serde_json::to_vec(&parse_envelope(&bytes)).unwrap();
    assert_ne!(compact, bytes);
    assert_eq!(code(admission.admit(&compact, now())), "PLAN009");
    // A new plan with a fresh nonce is a different plan.
    let mut next = plan.clone();
    next.nonce = fresh_nonce().unwrap();
    admission.admit(&host.sign(&next), now()).unwrap();
    assert_eq!(host.recorded().len(), 2);
}

#[test]
fn a_woken_vm_readmits_its_single_use_plan_without_the_ledger_but_with_every_other_check() {
    let host = Host::new();
    let plan = valid_plan(true);
    let bytes = host.sign(&plan);
    let admission = host.admission();
    let admitted = admission.admit(&bytes, now()).unwrap();
    let readmit = |bytes: &[u8], digest: &str, at| {
        admission
            .readmit_checked(bytes, at, digest, |_| Ok::<(), Error>(()))
            .map(|(verified, ())| verified)
    };
    // The same plan, for the VM it was admitted for: again and again, the ledger untouched.
    for _ in 0..2 {
        assert_eq!(readmit(&bytes, &admitted.digest, now()).unwrap(), admitted);
    }
    assert_eq!(host.recorded().len(), 1);
    // Another plan, even from the same signer, is not that VM's plan.
    let mut other = plan.clone();
    other.nonce = fresh_nonce().unwrap();
    assert_eq!(
        code(readmit(&host.sign(&other), &admitted.digest, now())),
        "PLAN011"
    );
    // Past its window, it is refused like any plan.
    let later = plan.valid_until.0 + Duration::seconds(1);
    assert_eq!(code(readmit(&bytes, &admitted.digest, later)), "PLAN008");
    // And a plan nobody trusts any more is refused.
    let stranger = Host::new();
    assert_eq!(
        code(
            stranger
                .admission()
                .readmit_checked(&bytes, now(), &admitted.digest, |_| Ok::<(), Error>(()))
                .map(drop)
        ),
        "PLAN002"
    );
}

#[test]
fn verifying_a_single_use_plan_never_consumes_it() {
    let host = Host::new();
    let plan = valid_plan(true);
    let bytes = host.sign(&plan);
    for _ in 0..25 {
        let verified = host.verify(&bytes, now()).unwrap();
        assert_eq!(verified.plan.nonce, plan.nonce);
    }
    assert!(host.recorded().is_empty());
    host.admission().admit(&bytes, now()).unwrap();
    assert_eq!(code(host.verify(&bytes, now())), "PLAN009");
}

#[test]
fn a_reusable_plan_is_admitted_many_times_and_never_recorded() {
    let host = Host::new();
    let plan = valid_plan(false);
    let bytes = host.sign(&plan);
    let admission = host.admission();
    for _ in 0..50 {
        assert_eq!(admission.admit(&bytes, now()).unwrap().plan, plan);
    }
    host.verify(&bytes, now()).unwrap();
    assert!(host.recorded().is_empty());

    // The same nonce on a single-use plan is a different story.
    let mut once = plan.clone();
    once.single_use = true;
    let once = host.sign(&once);
    admission.admit(&once, now()).unwrap();
    assert_eq!(code(admission.admit(&once, now())), "PLAN009");
    // The reusable plan with that nonce is still reusable: single_use is the signer's choice.
    admission.admit(&bytes, now()).unwrap();
}

#[test]
fn sixteen_threads_admitting_one_single_use_plan_admit_it_exactly_once() {
    for round in 0..3 {
        let host = Host::new();
        let plan = valid_plan(true);
        let bytes = Arc::new(host.sign(&plan));
        let trust = Arc::new(host.trust.clone());
        let dir = Arc::new(host.ledger_dir().to_path_buf());
        let barrier = Arc::new(Barrier::new(16));
        let handles: Vec<_> = (0..16)
            .map(|_| {
                let (bytes, trust, dir, barrier) =
                    (bytes.clone(), trust.clone(), dir.clone(), barrier.clone());
                thread::spawn(move || {
                    // Each thread has its own ledger handle: they contend through the lock file.
                    let admission = PlanAdmission::new((*trust).clone(), NonceLedger::at(&dir));
                    barrier.wait();
                    admission
                        .admit(&bytes, OffsetDateTime::now_utc())
                        .map(|v| v.plan.nonce)
                })
            })
            .collect();
        let results: Vec<Result<String, Error>> =
            handles.into_iter().map(|h| h.join().unwrap()).collect();
        let admitted = results.iter().filter(|r| r.is_ok()).count();
        let codes: Vec<&str> = results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .map(Error::code)
            .collect();
        assert_eq!(admitted, 1, "round {round}: {results:?}");
        assert_eq!(codes, vec!["PLAN009"; 15], "round {round}");
        assert_eq!(
            host.recorded().keys().cloned().collect::<Vec<_>>(),
            vec![plan.nonce]
        );
    }
}

#[test]
fn sixteen_threads_admitting_sixteen_plans_record_all_sixteen() {
    let host = Host::new();
    let plans: Vec<LaunchPlan> = (0..16).map(|_| valid_plan(true)).collect();
    let barrier = Arc::new(Barrier::new(16));
    let handles: Vec<_> = plans
        .iter()
        .map(|plan| {
            let bytes = host.sign(plan);
            let trust = host.trust.clone();
            let dir = host.ledger_dir().to_path_buf();
            let barrier = barrier.clone();
            thread::spawn(move || {
                let admission = PlanAdmission::new(trust, NonceLedger::at(&dir));
                barrier.wait();
                admission
                    .admit(&bytes, OffsetDateTime::now_utc())
                    .map(|v| v.plan.nonce)
            })
        })
        .collect();
    let admitted: Vec<String> = handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect();
    let mut expected: Vec<String> = plans.iter().map(|p| p.nonce.clone()).collect();
    assert_eq!(admitted, expected);
    expected.sort();
    // A lost update (two writers each rewriting the file from a stale read) would drop nonces.
    assert_eq!(
        host.recorded().keys().cloned().collect::<Vec<_>>(),
        expected
    );
    for plan in &plans {
        assert_eq!(
            code(host.admission().admit(&host.sign(plan), now())),
            "PLAN009"
        );
    }
    // No temporary files are left behind next to the ledger.
    let mut names: Vec<String> = fs::read_dir(host.ledger_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec!["nonces.json", "nonces.lock"]);
}

// ---------------------------------------------------------------------------------------------
// The ledger file
// ---------------------------------------------------------------------------------------------

#[test]
fn expired_nonces_are_pruned_on_the_next_record() {
    let host = Host::new();
    let admission = host.admission();
    let t0 = now();

    // Plan A expires in an hour; plan B in three hours.
    let a = valid_plan(true);
    let mut b = valid_plan(true);
    b.valid_until = Timestamp(t0 + Duration::hours(3));
    admission.admit(&host.sign(&a), t0).unwrap();
    admission.admit(&host.sign(&b), t0).unwrap();
    assert_eq!(host.recorded().len(), 2);

    // Two hours later A has expired; the next record drops it and keeps B.
    let later = t0 + Duration::hours(2);
    let mut c = valid_plan(true);
    c.valid_until = Timestamp(t0 + Duration::hours(4));
    admission.admit(&host.sign(&c), later).unwrap();
    let recorded = host.recorded();
    assert!(
        !recorded.contains_key(&a.nonce),
        "expired nonce kept: {recorded:?}"
    );
    assert!(recorded.contains_key(&b.nonce));
    assert!(recorded.contains_key(&c.nonce));
    assert_eq!(recorded.len(), 2);
    // Pruning A does not reopen it: A is refused as expired instead.
    assert_eq!(code(admission.admit(&host.sign(&a), later)), "PLAN008");
    // B is still refused as a replay.
    assert_eq!(code(admission.admit(&host.sign(&b), later)), "PLAN009");
}

#[test]
fn a_nonce_is_kept_until_the_instant_its_plan_expires() {
    let host = Host::new();
    let ledger = host.ledger();
    let t0 = now();
    let until = Timestamp(t0 + Duration::minutes(10));
    let n1 = fresh_nonce().unwrap();
    ledger.record(&n1, until, t0).unwrap();
    // One nanosecond before expiry the nonce is live.
    let n2 = fresh_nonce().unwrap();
    ledger
        .record(
            &n2,
            Timestamp(t0 + Duration::hours(1)),
            until.0 - Duration::nanoseconds(1),
        )
        .unwrap();
    assert!(ledger.contains(&n1).unwrap());
    assert_eq!(
        code(ledger.record(&n1, until, until.0 - Duration::nanoseconds(1))),
        "PLAN009"
    );
    // At expiry it is pruned.
    let n3 = fresh_nonce().unwrap();
    ledger
        .record(&n3, Timestamp(t0 + Duration::hours(1)), until.0)
        .unwrap();
    assert!(!ledger.contains(&n1).unwrap());
    assert!(ledger.contains(&n2).unwrap() && ledger.contains(&n3).unwrap());
}

#[test]
fn a_corrupt_ledger_fails_closed_and_is_left_as_found() {
    let garbage: Vec<(&str, Vec<u8>)> = vec![
        ("random bytes", vec![0x00, 0xff, 0x13, 0x37, b'{', 0x80]),
        ("empty file", Vec::new()),
        ("truncated JSON", br#"{"version":1,"nonces":{"ab"#.to_vec()),
        ("unknown version", br#"{"version":2,"nonces":{}}"#.to_vec()),
        (
            "unknown field",
            br#"{"version":1,"nonces":{},"extra":true}"#.to_vec(),
        ),
        (
            "bad timestamp",
            br#"{"version":1,"nonces":{"00":"soon"}}"#.to_vec(),
        ),
        ("JSON null", b"null".to_vec()),
    ];
    for (what, bytes) in garbage {
        let host = Host::new();
        fs::write(host.ledger_file(), &bytes).unwrap();
        let plan = valid_plan(true);
        let signed = host.sign(&plan);
        assert_eq!(
            code(host.admission().admit(&signed, now())),
            "PLAN010",
            "{what}: admit"
        );
        assert_eq!(
            code(host.verify(&signed, now())),
            "PLAN010",
            "{what}: verify"
        );
        assert_eq!(
            code(host.ledger().contains(&plan.nonce)),
            "PLAN010",
            "{what}: contains"
        );
        assert_eq!(
            fs::read(host.ledger_file()).unwrap(),
            bytes,
            "{what}: the corrupt ledger was rewritten"
        );
        // Still refused on a second attempt: the failure did not "repair" the ledger.
        assert_eq!(
            code(host.admission().admit(&signed, now())),
            "PLAN010",
            "{what}: admit again"
        );
    }
}

#[test]
fn a_ledger_over_its_size_cap_is_refused_not_read() {
    let host = Host::new();
    let file = fs::File::create(host.ledger_file()).unwrap();
    file.set_len(64 * 1024 * 1024 + 1).unwrap();
    let signed = host.sign(&valid_plan(true));
    let err = host.admission().admit(&signed, now()).unwrap_err();
    // Fails closed, as an unreadable ledger, and leaves the file for an operator to look at.
    assert_eq!(err.code(), "PLAN010", "{err}");
    let len = fs::metadata(host.ledger_file()).unwrap().len();
    assert_eq!(len, 64 * 1024 * 1024 + 1);
}

// ---------------------------------------------------------------------------------------------
// Random corruption of the envelope bytes
// ---------------------------------------------------------------------------------------------

/// One signed single-use plan shared by every proptest case. Its ledger is a path that does not
/// exist, which reads as an empty ledger (`verify_plan` never writes), so nothing is left behind.
struct Signed {
    signer: Signer,
    trust: TrustStore,
    ledger: NonceLedger,
    plan: LaunchPlan,
    bytes: Vec<u8>,
    digest: String,
}

fn signed_fixture() -> &'static Signed {
    static FIXTURE: std::sync::OnceLock<Signed> = std::sync::OnceLock::new();
    FIXTURE.get_or_init(|| {
        let signer = Signer::generate().unwrap();
        let plan = valid_plan(true);
        let bytes = sign_plan(&plan, &signer);
        Signed {
            trust: trust_of(&[&signer]),
            ledger: NonceLedger::at(Path::new("/nonexistent/mvm-test-ledger")),
            digest: sha256_prefixed(&payload(&plan)),
            signer,
            plan,
            bytes,
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// Flipping bytes anywhere in the envelope JSON never panics and never yields a plan other
    /// than the one that was signed.
    #[test]
    fn byte_flips_never_admit_a_different_plan(
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4)
    ) {
        let fixture = signed_fixture();
        let mut bytes = fixture.bytes.clone();
        for (index, xor) in &flips {
            let at = index.index(bytes.len());
            bytes[at] ^= xor;
        }
        let verify_at = fixture.plan.valid_from.0 + Duration::minutes(5);
        match verify_plan(&bytes, &fixture.trust, &fixture.ledger, verify_at) {
            Ok(verified) => {
                prop_assert_eq!(&verified.digest, &fixture.digest);
                prop_assert_eq!(&verified.plan, &fixture.plan);
                prop_assert_eq!(verified.keyid.as_str(), fixture.signer.keyid());
            }
            Err(e) => {
                // Only envelope-level codes can result: the signed payload cannot change.
                prop_assert!(
                    matches!(e.code(), "PLAN001" | "PLAN002" | "PLAN003" | "INPUT001"),
                    "unexpected refusal {} ({})", e.code(), e
                );
            }
        }
    }

}

proptest! {
    // Each case reaches an ed25519 verification, which is slow in an unoptimized build.
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Flipping a bit of the decoded payload always breaks the signature.
    #[test]
    fn payload_bit_flips_are_always_refused(index in any::<prop::sample::Index>(), bit in 0u8..8) {
        let fixture = signed_fixture();
        let mut envelope = parse_envelope(&fixture.bytes);
        let mut body = STANDARD.decode(&envelope.payload).unwrap();
        let at = index.index(body.len());
        body[at] ^= 1 << bit;
        envelope.payload = STANDARD.encode(&body);
        let verify_at = fixture.plan.valid_from.0 + Duration::minutes(5);
        let err = verify_plan(&envelope.to_json(), &fixture.trust, &fixture.ledger, verify_at)
            .unwrap_err();
        prop_assert_eq!(err.code(), "PLAN003");
    }
}
