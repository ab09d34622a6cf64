//! Workload IR: the `hello` example, round trips and digests, one table case per validation code,
//! strict parsing of JSON and TOML, and the error codes and classes of every refusal.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use mvm_ir::load::{ir_digest, load_workload, parse_workload, Syntax, MAX_DOCUMENT_BYTES};
use mvm_ir::validate::{validate, Severity};
use mvm_ir::workload::{EnvValue, Image, NetworkMode, Source, ThreatTier, Workload};
use mvm_ir::{canonical, Error, ErrorClass};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// Documents and helpers
// ---------------------------------------------------------------------------------------------

/// The `hello` document, exactly as the brief gives it.
const HELLO: &str = r#"{"schema_version": "0", "id": "hello",
 "apps": [{"name": "main",
   "image": {"kind": "oci_base", "reference": "127.0.0.1:5000/busybox",
             "digest": "sha256:9e2bbca079387d7965c3a9cee6d0c53f4f4e63ff7637877a83c4c05f2a666112"},
   "resources": {"cpu_cores": 1, "memory_mb": 256},
   "entrypoints": [{"kind": "command", "command": ["/bin/echo", "hi"]}],
   "env": {"GREETING": {"kind": "literal", "value": "hi"},
           "API_KEY": {"kind": "secret_ref", "name": "api-key"}},
   "network": {"mode": "none", "egress": {"allowlist": [{"host": "api.example.com", "port": 443}]}}}]}"#;

/// The canonical (RFC 8785) form of `HELLO`, pinned: digests are taken over these bytes, so any
/// change to field names, defaults or canonicalization changes every published `ir_digest`.
const HELLO_CANONICAL: &str = concat!(
    r#"{"apps":[{"entrypoints":[{"command":["/bin/echo","hi"],"kind":"command"}],"#,
    r#""env":{"API_KEY":{"kind":"secret_ref","name":"api-key"},"GREETING":{"kind":"literal","value":"hi"}},"#,
    r#""image":{"digest":"sha256:9e2bbca079387d7965c3a9cee6d0c53f4f4e63ff7637877a83c4c05f2a666112","#,
    r#""kind":"oci_base","reference":"127.0.0.1:5000/busybox"},"name":"main","#,
    r#""network":{"egress":{"allowlist":[{"host":"api.example.com","port":443}]},"mode":"none"},"#,
    r#""resources":{"cpu_cores":1,"memory_mb":256}}],"id":"hello","schema_version":"0"}"#
);

const DIGEST: &str = "sha256:9e2bbca079387d7965c3a9cee6d0c53f4f4e63ff7637877a83c4c05f2a666112";

/// A valid workload that uses every field and every variant of the IR, and draws no issue at all
/// (not even a warning). The table cases below mutate copies of it.
fn rich() -> Value {
    json!({
        "schema_version": "0",
        "id": "rich-1",
        "apps": [
            {
                "name": "api",
                "source": {"kind": "path", "path": "src/api"},
                "image": {
                    "kind": "oci_base",
                    "reference": "registry.example.com:5000/team/python",
                    "digest": DIGEST
                },
                "resources": {"cpu_cores": 2, "memory_mb": 512, "rootfs_size_mb": 1024},
                "entrypoints": [
                    {"kind": "service", "name": "api", "command": ["/usr/bin/python3", "-m", "api"], "cwd": "/srv/api", "restart": "always", "max_restarts": 10},
                    {"kind": "command", "command": ["migrate"]}
                ],
                "env": {
                    "GREETING": {"kind": "literal", "value": "hi"},
                    "API_KEY": {"kind": "secret_ref", "name": "api-key"},
                    "SENTRY_DSN": {"kind": "secret_ref", "name": "sentry.dsn", "optional": true}
                },
                "network": {
                    "mode": "allowlist",
                    "egress": {"allowlist": [
                        {"host": "api.example.com", "port": 443},
                        {"host": "*.githubusercontent.com", "port": 443},
                        {"host": "10.0.0.1", "port": 5432},
                        {"host": "::1", "port": 8080}
                    ]},
                    "ports": [{"guest": 8000, "host": 18000}, {"guest": 9000}]
                },
                "mounts": [
                    {"volume": "data", "target": "/var/lib/data"},
                    {"volume": "cache", "target": "/cache", "read_only": true}
                ],
                "files": [
                    {"path": "/etc/api/config.toml", "content": "debug = false\n", "mode": "0640"},
                    {"path": "/etc/motd", "content": "hello\n"}
                ],
                "health_check": {
                    "command": ["/usr/bin/curl", "-f", "http://127.0.0.1:8000/health"],
                    "interval_s": 10,
                    "timeout_s": 2,
                    "retries": 3
                },
                "threat_tier": "standard"
            },
            {
                "name": "worker",
                "source": {
                    "kind": "git",
                    "url": "https://git.example.com/team/worker.git",
                    "rev": "0123456789abcdef0123456789abcdef01234567"
                },
                "image": {"kind": "nix_packages", "packages": ["python3", "python3Packages.requests"]},
                "resources": {"cpu_cores": 1, "memory_mb": 256},
                "entrypoints": [{"kind": "command", "command": ["worker"]}],
                "mounts": [{"volume": "data", "target": "/data", "read_only": true}],
                "threat_tier": "trusted"
            }
        ],
        "volumes": [{"name": "data", "size_mb": 1024}, {"name": "cache", "size_mb": 64}]
    })
}

fn from_value(doc: &Value) -> Workload {
    serde_json::from_value(doc.clone()).expect("document parses")
}

fn parse_json(text: &str) -> Workload {
    parse_workload(text.as_bytes(), Syntax::Json).expect("JSON parses")
}

fn parse_toml(text: &str) -> Workload {
    parse_workload(text.as_bytes(), Syntax::Toml).expect("TOML parses")
}

fn to_toml(doc: &Value) -> String {
    toml::to_string(doc).expect("a null-free document converts to TOML")
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

/// Splits an RFC 6901 pointer into the pointer of the parent and the last (unescaped) token.
fn split(pointer: &str) -> (&str, String) {
    let at = pointer.rfind('/').expect("pointer has a token");
    (&pointer[..at], unescape(&pointer[at + 1..]))
}

/// Sets the value at `pointer`: a new or replaced member of an object, a replaced array item,
/// or (`-`) an appended array item.
fn set(doc: &mut Value, pointer: &str, value: Value) {
    let (parent, token) = split(pointer);
    match doc.pointer_mut(parent) {
        Some(Value::Object(map)) => {
            map.insert(token, value);
        }
        Some(Value::Array(items)) if token == "-" => items.push(value),
        Some(Value::Array(items)) => items[token.parse::<usize>().expect("array index")] = value,
        other => panic!("no container at {parent:?}: {other:?}"),
    }
}

/// Removes the value at `pointer`, which must exist.
fn remove(doc: &mut Value, pointer: &str) {
    let (parent, token) = split(pointer);
    let removed = match doc.pointer_mut(parent) {
        Some(Value::Object(map)) => map.remove(&token),
        Some(Value::Array(items)) => Some(items.remove(token.parse::<usize>().expect("index"))),
        _ => None,
    };
    assert!(removed.is_some(), "nothing to remove at {pointer}");
}

fn codes_and_pointers(workload: &Workload) -> Vec<(&'static str, String)> {
    validate(workload)
        .issues
        .into_iter()
        .map(|i| (i.code, i.pointer))
        .collect()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hello")
}

// ---------------------------------------------------------------------------------------------
// 1. The hello example
// ---------------------------------------------------------------------------------------------

#[test]
fn hello_validates_with_exactly_one_warning() {
    let workload = parse_json(HELLO);
    let report = validate(&workload);
    assert!(!report.has_errors(), "{report}");
    assert_eq!(report.issues.len(), 1, "{report}");
    let issue = &report.issues[0];
    assert_eq!(issue.code, "IR101");
    assert_eq!(issue.severity, Severity::Warning);
    assert_eq!(issue.pointer, "/apps/0/network/egress/allowlist");
    assert!(!issue.message.is_empty());

    // What the types hold: the secret is a reference, never a value.
    let app = &workload.apps[0];
    assert_eq!(
        app.env["API_KEY"],
        EnvValue::SecretRef {
            name: "api-key".into(),
            optional: false
        }
    );
    assert_eq!(app.network.mode, NetworkMode::None);
    assert_eq!(
        app.threat_tier,
        ThreatTier::Untrusted,
        "the default tier is untrusted"
    );
    assert!(
        matches!(&app.image, Image::OciBase { reference, .. } if reference == "127.0.0.1:5000/busybox")
    );
}

#[test]
fn hello_example_files_load_to_the_same_workload_and_digest() {
    let dir = examples_dir();
    let (from_json, json_report) = load_workload(&dir.join("workload.json")).unwrap();
    let (from_toml, toml_report) = load_workload(&dir.join("mvm.toml")).unwrap();

    assert_eq!(
        from_json,
        parse_json(HELLO),
        "examples/hello/workload.json is the hello document"
    );
    assert_eq!(from_json, from_toml, "mvm.toml maps 1:1 onto the JSON");
    assert_eq!(json_report, toml_report);
    assert_eq!(
        json_report
            .issues
            .iter()
            .map(|i| i.code)
            .collect::<Vec<_>>(),
        ["IR101"]
    );
    assert_eq!(
        ir_digest(&from_json).unwrap(),
        ir_digest(&from_toml).unwrap()
    );
}

#[test]
fn hello_canonical_form_and_digest_are_pinned() {
    let workload = parse_json(HELLO);
    let canonical = canonical::to_vec(&workload).unwrap();
    assert_eq!(
        String::from_utf8(canonical.clone()).unwrap(),
        HELLO_CANONICAL
    );
    // Computed independently: printf '%s' "$HELLO_CANONICAL" | sha256sum
    assert_eq!(
        ir_digest(&workload).unwrap(),
        "sha256:23e2b89e346b242ca2b4baa135a3a6dd441d58f9d25d29b274f4c10cd9467ab7"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Round trips, canonical stability, digests
// ---------------------------------------------------------------------------------------------

#[test]
fn rich_workload_is_valid_and_uses_every_variant() {
    let workload = from_value(&rich());
    assert!(
        validate(&workload).issues.is_empty(),
        "{}",
        validate(&workload)
    );

    let [api, worker] = &workload.apps[..] else {
        panic!("two apps")
    };
    assert!(matches!(api.source, Some(Source::Path { .. })));
    assert!(matches!(worker.source, Some(Source::Git { .. })));
    assert!(matches!(api.image, Image::OciBase { .. }));
    assert!(matches!(worker.image, Image::NixPackages { .. }));
    assert!(matches!(api.env["GREETING"], EnvValue::Literal { .. }));
    assert!(matches!(
        api.env["API_KEY"],
        EnvValue::SecretRef {
            optional: false,
            ..
        }
    ));
    assert!(matches!(
        api.env["SENTRY_DSN"],
        EnvValue::SecretRef { optional: true, .. }
    ));
    assert_eq!(api.network.mode, NetworkMode::Allowlist);
    assert_eq!(api.network.ports[0].host, Some(18000));
    assert_eq!(api.network.ports[1].host, None);
    assert!(api.mounts[1].read_only && !api.mounts[0].read_only);
    assert_eq!(api.files[0].mode.as_deref(), Some("0640"));
    assert_eq!(api.files[1].mode, None);
    assert_eq!(api.health_check.as_ref().unwrap().retries, 3);
    assert_eq!(api.resources.rootfs_size_mb, Some(1024));
    assert_eq!(
        (api.threat_tier, worker.threat_tier),
        (ThreatTier::Standard, ThreatTier::Trusted)
    );
    assert_eq!(workload.volumes.len(), 2);
}

#[test]
fn json_round_trip_preserves_the_value() {
    for doc in [rich(), serde_json::from_str(HELLO).unwrap()] {
        let workload = from_value(&doc);
        let compact = serde_json::to_string(&workload).unwrap();
        let pretty = serde_json::to_string_pretty(&workload).unwrap();
        assert_eq!(parse_json(&compact), workload);
        assert_eq!(parse_json(&pretty), workload);
        // Serializing writes back exactly the fields that were given (no defaults invented,
        // none dropped), so the document itself survives too.
        assert_eq!(serde_json::to_value(&workload).unwrap(), doc);
    }
}

#[test]
fn toml_round_trip_preserves_the_value() {
    for doc in [rich(), serde_json::from_str(HELLO).unwrap()] {
        let workload = from_value(&doc);
        let text = toml::to_string(&workload).unwrap();
        assert_eq!(parse_toml(&text), workload, "through TOML:\n{text}");
        assert_eq!(
            ir_digest(&parse_toml(&text)).unwrap(),
            ir_digest(&workload).unwrap()
        );
    }
}

#[test]
fn canonical_serialization_is_stable() {
    let workload = from_value(&rich());
    let canonical = canonical::to_vec(&workload).unwrap();
    // Deterministic, a fixed point, and the same as canonicalizing any other rendering.
    assert_eq!(canonical::to_vec(&workload).unwrap(), canonical);
    assert_eq!(
        parse_json(std::str::from_utf8(&canonical).unwrap()),
        workload
    );
    assert_eq!(canonical::canonicalize(&canonical).unwrap(), canonical);
    let pretty = serde_json::to_vec_pretty(&workload).unwrap();
    assert_eq!(canonical::canonicalize(&pretty).unwrap(), canonical);
    // No insignificant white space, members sorted.
    let text = String::from_utf8(canonical).unwrap();
    assert!(!text.contains(": ") && !text.contains(", ") && !text.contains('\n'));
    assert!(text.starts_with(r#"{"apps":[{"entrypoints":"#), "{text}");
    assert!(text
        .ends_with(r#""volumes":[{"name":"data","size_mb":1024},{"name":"cache","size_mb":64}]}"#));
}

#[test]
fn formatting_and_key_order_do_not_change_the_digest() {
    let expected = ir_digest(&parse_json(HELLO)).unwrap();

    let doc: Value = serde_json::from_str(HELLO).unwrap();
    let compact = serde_json::to_string(&doc).unwrap();
    let pretty = serde_json::to_string_pretty(&doc).unwrap();
    // Members hand-written in reverse order, with odd white space.
    let reordered = r#"
    {
      "apps" : [ {
        "network":{"egress":{"allowlist":[{"port":443,"host":"api.example.com"}]},"mode":"none"},
        "env":{"API_KEY":{"name":"api-key","kind":"secret_ref"},"GREETING":{"value":"hi","kind":"literal"}},
        "entrypoints":[{"command":["/bin/echo","hi"],"kind":"command"}],
        "resources":{"memory_mb":256,"cpu_cores":1},
        "image":{"digest":"sha256:9e2bbca079387d7965c3a9cee6d0c53f4f4e63ff7637877a83c4c05f2a666112",
                 "reference":"127.0.0.1:5000/busybox","kind":"oci_base"},
        "name":"main"
      } ],
      "id"	:	"hello",
      "schema_version":"0"
    }"#;
    // TOML with everything inline, keys in another order.
    let inline_toml = r#"
        id = "hello"
        schema_version = "0"
        apps = [{ network = { egress = { allowlist = [{ port = 443, host = "api.example.com" }] }, mode = "none" },
                  env = { API_KEY = { name = "api-key", kind = "secret_ref" }, GREETING = { value = "hi", kind = "literal" } },
                  entrypoints = [{ command = ["/bin/echo", "hi"], kind = "command" }],
                  resources = { memory_mb = 256, cpu_cores = 1 },
                  image = { digest = "sha256:9e2bbca079387d7965c3a9cee6d0c53f4f4e63ff7637877a83c4c05f2a666112", reference = "127.0.0.1:5000/busybox", kind = "oci_base" },
                  name = "main" }]
    "#;
    let toml_file = std::fs::read_to_string(examples_dir().join("mvm.toml")).unwrap();
    for json_text in [compact.as_str(), pretty.as_str(), reordered] {
        assert_eq!(
            ir_digest(&parse_json(json_text)).unwrap(),
            expected,
            "{json_text}"
        );
    }
    for toml_text in [inline_toml, toml_file.as_str(), to_toml(&doc).as_str()] {
        assert_eq!(
            ir_digest(&parse_toml(toml_text)).unwrap(),
            expected,
            "{toml_text}"
        );
    }
}

#[test]
fn explicit_defaults_do_not_change_the_digest() {
    let mut doc: Value = serde_json::from_str(HELLO).unwrap();
    let expected = ir_digest(&from_value(&doc)).unwrap();
    set(&mut doc, "/apps/0/env/API_KEY/optional", json!(false));
    set(&mut doc, "/apps/0/network/ports", json!([]));
    set(&mut doc, "/apps/0/mounts", json!([]));
    set(&mut doc, "/apps/0/files", json!([]));
    set(&mut doc, "/apps/0/threat_tier", json!("untrusted"));
    set(&mut doc, "/volumes", json!([]));
    assert_eq!(ir_digest(&from_value(&doc)).unwrap(), expected);

    let mut bare: Value = serde_json::from_str(HELLO).unwrap();
    remove(&mut bare, "/apps/0/network");
    remove(&mut bare, "/apps/0/env");
    let bare_digest = ir_digest(&from_value(&bare)).unwrap();
    set(
        &mut bare,
        "/apps/0/network",
        json!({"mode": "none", "egress": {"allowlist": []}}),
    );
    set(&mut bare, "/apps/0/env", json!({}));
    assert_eq!(ir_digest(&from_value(&bare)).unwrap(), bare_digest);
}

#[test]
fn every_change_of_meaning_changes_the_digest() {
    let base = ir_digest(&from_value(&rich())).unwrap();
    let changes: &[(&str, Value)] = &[
        ("/id", json!("rich-2")),
        ("/apps/0/env/API_KEY/optional", json!(true)),
        ("/apps/0/env/GREETING/value", json!("hello")),
        ("/apps/0/threat_tier", json!("untrusted")),
        ("/apps/0/network/mode", json!("none")),
        ("/apps/0/network/egress/allowlist/0/port", json!(80)),
        ("/apps/0/network/ports/1/host", json!(19000)),
        ("/apps/0/mounts/0/read_only", json!(true)),
        ("/apps/0/files/1/mode", json!("0600")),
        ("/apps/0/resources/rootfs_size_mb", json!(2048)),
        ("/apps/0/entrypoints/0/cwd", json!("/srv")),
        (
            "/apps/1/source/rev",
            json!("1123456789abcdef0123456789abcdef01234567"),
        ),
        ("/apps/1/image/packages/1", json!("python3Packages.httpx")),
        ("/apps/0/health_check/retries", json!(4)),
        ("/volumes/1/size_mb", json!(65)),
    ];
    let mut seen = BTreeSet::from([base.clone()]);
    for (pointer, value) in changes {
        let mut doc = rich();
        set(&mut doc, pointer, value.clone());
        let digest = ir_digest(&from_value(&doc)).unwrap();
        assert!(
            seen.insert(digest),
            "changing {pointer} left the digest unchanged or colliding"
        );
    }
    // Order is meaning too: the first entrypoint is the default.
    let mut doc = rich();
    let entrypoints = doc["apps"][0]["entrypoints"].as_array_mut().unwrap();
    entrypoints.reverse();
    assert_ne!(ir_digest(&from_value(&doc)).unwrap(), base);
}

mod round_trip_properties {
    use super::*;
    use mvm_ir::workload::{
        App, Egress, EgressGrant, Entrypoint, FileSpec, HealthCheck, HttpProbe, Mount, Network,
        PortForward, Resources, RestartPolicy, Volume,
    };
    use proptest::collection::{btree_map, vec};
    use proptest::option;
    use proptest::prelude::*;

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![any::<String>(), "[a-z0-9._/-]{0,12}"]
    }

    fn app() -> impl Strategy<Value = App> {
        let source = option::of(prop_oneof![
            text().prop_map(|path| Source::Path { path }),
            (text(), text()).prop_map(|(url, rev)| Source::Git { url, rev }),
        ]);
        let image = prop_oneof![
            (text(), text()).prop_map(|(reference, digest)| Image::OciBase { reference, digest }),
            vec(text(), 0..3).prop_map(|packages| Image::NixPackages { packages }),
        ];
        let resources = (any::<u32>(), any::<u32>(), option::of(any::<u32>())).prop_map(
            |(cpu_cores, memory_mb, rootfs_size_mb)| Resources {
                cpu_cores,
                memory_mb,
                rootfs_size_mb,
            },
        );
        let restart = prop_oneof![
            Just(RestartPolicy::Never),
            Just(RestartPolicy::OnFailure),
            Just(RestartPolicy::Always),
        ];
        let entrypoints = vec(
            prop_oneof![
                (vec(text(), 0..3), option::of(text()))
                    .prop_map(|(command, cwd)| Entrypoint::Command { command, cwd }),
                (
                    text(),
                    vec(text(), 0..3),
                    option::of(text()),
                    restart,
                    option::of(any::<u32>())
                )
                    .prop_map(|(name, command, cwd, restart, max_restarts)| {
                        Entrypoint::Service {
                            name,
                            command,
                            cwd,
                            restart,
                            max_restarts,
                        }
                    }),
            ],
            0..3,
        );
        let env = btree_map(
            text(),
            prop_oneof![
                text().prop_map(|value| EnvValue::Literal { value }),
                (text(), any::<bool>())
                    .prop_map(|(name, optional)| EnvValue::SecretRef { name, optional }),
            ],
            0..3,
        );
        let network = (
            any::<bool>(),
            vec(
                (text(), any::<u16>()).prop_map(|(host, port)| EgressGrant { host, port }),
                0..3,
            ),
            vec(
                (any::<u16>(), option::of(any::<u16>()))
                    .prop_map(|(guest, host)| PortForward { guest, host }),
                0..3,
            ),
        )
            .prop_map(|(allow, allowlist, ports)| Network {
                mode: if allow {
                    NetworkMode::Allowlist
                } else {
                    NetworkMode::None
                },
                egress: Egress { allowlist },
                ports,
            });
        let mounts = vec(
            (text(), text(), any::<bool>()).prop_map(|(volume, target, read_only)| Mount {
                volume,
                target,
                read_only,
            }),
            0..3,
        );
        let files = vec(
            (text(), text(), option::of(text())).prop_map(|(path, content, mode)| FileSpec {
                path,
                content,
                mode,
            }),
            0..3,
        );
        let probe = (
            option::of(vec(text(), 0..3)),
            option::of(any::<u16>()),
            option::of((any::<u16>(), text()).prop_map(|(port, path)| HttpProbe { port, path })),
        );
        let health_check = option::of(
            (
                probe,
                any::<u32>(),
                any::<u32>(),
                any::<u32>(),
                any::<u32>(),
            )
                .prop_map(
                    |(
                        (command, tcp_port, http),
                        interval_s,
                        timeout_s,
                        retries,
                        start_period_s,
                    )| {
                        HealthCheck {
                            command,
                            tcp_port,
                            http,
                            interval_s,
                            timeout_s,
                            retries,
                            start_period_s,
                        }
                    },
                ),
        );
        let tier = prop_oneof![
            Just(ThreatTier::Untrusted),
            Just(ThreatTier::Standard),
            Just(ThreatTier::Trusted)
        ];
        (
            (text(), source, image, resources, entrypoints, env),
            (network, mounts, files, health_check, tier),
        )
            .prop_map(
                |(
                    (name, source, image, resources, entrypoints, env),
                    (network, mounts, files, health_check, threat_tier),
                )| App {
                    name,
                    source,
                    image,
                    resources,
                    entrypoints,
                    env,
                    network,
                    mounts,
                    files,
                    health_check,
                    threat_tier,
                },
            )
    }

    fn workload() -> impl Strategy<Value = Workload> {
        (
            text(),
            text(),
            vec(app(), 0..3),
            vec(
                (text(), any::<u32>()).prop_map(|(name, size_mb)| Volume { name, size_mb }),
                0..3,
            ),
        )
            .prop_map(|(schema_version, id, apps, volumes)| Workload {
                schema_version,
                id,
                apps,
                volumes,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever the values (valid or not), every syntax carries a workload without loss,
        /// and the canonical form is a fixed point.
        #[test]
        fn any_workload_survives_json_canonical_and_toml(w in workload()) {
            let json = serde_json::to_vec(&w).unwrap();
            prop_assert_eq!(&parse_workload(&json, Syntax::Json).unwrap(), &w);

            let canonical = canonical::to_vec(&w).unwrap();
            prop_assert_eq!(&parse_workload(&canonical, Syntax::Json).unwrap(), &w);
            prop_assert_eq!(canonical::canonicalize(&canonical).unwrap(), canonical);

            let toml_text = toml::to_string(&w).unwrap();
            prop_assert_eq!(&parse_workload(toml_text.as_bytes(), Syntax::Toml).unwrap(), &w);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Validation: one case per code
// ---------------------------------------------------------------------------------------------

struct Case {
    code: &'static str,
    pointer: &'static str,
    mutate: fn(&mut Value),
}

fn case(code: &'static str, pointer: &'static str, mutate: fn(&mut Value)) -> Case {
    Case {
        code,
        pointer,
        mutate,
    }
}

fn many<T>(n: usize, item: impl Fn(usize) -> T) -> Vec<T> {
    (0..n).map(item).collect()
}

fn validation_cases() -> Vec<Case> {
    vec![
        case("IR001", "/schema_version", |d| {
            set(d, "/schema_version", json!("1"))
        }),
        case("IR001", "/schema_version", |d| {
            set(d, "/schema_version", json!(""))
        }),
        case("IR002", "/id", |d| set(d, "/id", json!("Rich"))),
        case("IR002", "/id", |d| set(d, "/id", json!(""))),
        case("IR002", "/id", |d| set(d, "/id", json!("-rich"))),
        case("IR002", "/id", |d| set(d, "/id", json!("a".repeat(64)))),
        case("IR002", "/apps/0/name", |d| {
            set(d, "/apps/0/name", json!("my api"))
        }),
        case("IR002", "/volumes/1/name", |d| {
            set(d, "/volumes/1/name", json!("_cache"));
            set(d, "/apps/0/mounts/1/volume", json!("_cache"));
        }),
        case("IR003", "/apps", |d| {
            set(d, "/apps", json!([]));
            remove(d, "/volumes");
        }),
        case("IR004", "/apps/1/name", |d| {
            set(d, "/apps/1/name", json!("api"))
        }),
        case("IR004", "/volumes/2/name", |d| {
            set(d, "/volumes/-", json!({"name": "data", "size_mb": 1}))
        }),
        case("IR005", "/apps/0/image/reference", |d| {
            set(
                d,
                "/apps/0/image/reference",
                json!("registry.example.com:5000/team/python:3.12"),
            )
        }),
        case("IR005", "/apps/0/image/reference", |d| {
            set(
                d,
                "/apps/0/image/reference",
                json!("Registry.example.com/team/python"),
            )
        }),
        case("IR005", "/apps/0/image/reference", |d| {
            let other = format!("registry.example.com/python@sha256:{}", "0".repeat(64));
            set(d, "/apps/0/image/reference", json!(other))
        }),
        case("IR005", "/apps/0/image/reference", |d| {
            set(d, "/apps/0/image/reference", json!(""))
        }),
        case("IR005", "/apps/0/image/reference", |d| {
            set(
                d,
                "/apps/0/image/reference",
                json!("registry.example.com//python"),
            )
        }),
        case("IR005", "/apps/0/image/reference", |d| {
            set(d, "/apps/0/image/reference", json!("busybox"))
        }),
        case("IR005", "/apps/0/image/reference", |d| {
            set(d, "/apps/0/image/reference", json!("library/busybox"))
        }),
        case("IR005", "/apps/0/image/reference", |d| {
            set(d, "/apps/0/image/reference", json!("oci:"))
        }),
        case("IR006", "/apps/0/image/digest", |d| {
            set(
                d,
                "/apps/0/image/digest",
                json!(DIGEST.to_uppercase().replace("SHA256", "sha256")),
            )
        }),
        case("IR006", "/apps/0/image/digest", |d| {
            set(
                d,
                "/apps/0/image/digest",
                json!(DIGEST.trim_start_matches("sha256:")),
            )
        }),
        case("IR006", "/apps/0/image/digest", |d| {
            set(d, "/apps/0/image/digest", json!("sha256:abc"))
        }),
        case("IR007", "/apps/0/entrypoints", |d| {
            set(d, "/apps/0/entrypoints", json!([]))
        }),
        case("IR007", "/apps/0/entrypoints/1/command", |d| {
            set(d, "/apps/0/entrypoints/1/command", json!([]))
        }),
        case("IR007", "/apps/0/entrypoints/1/command", |d| {
            set(d, "/apps/0/entrypoints/1/command/0", json!(""))
        }),
        case("IR007", "/apps/0/entrypoints/0/command/2", |d| {
            set(d, "/apps/0/entrypoints/0/command/2", json!("a\u{0}b"))
        }),
        case("IR007", "/apps/0/entrypoints/0/command/1", |d| {
            set(
                d,
                "/apps/0/entrypoints/0/command/1",
                json!("x".repeat(64 * 1024 + 1)),
            )
        }),
        case("IR007", "/apps/0/health_check/command", |d| {
            set(d, "/apps/0/health_check/command", json!([]))
        }),
        case("IR008", "/apps/0/resources/cpu_cores", |d| {
            set(d, "/apps/0/resources/cpu_cores", json!(0))
        }),
        case("IR008", "/apps/0/resources/cpu_cores", |d| {
            set(d, "/apps/0/resources/cpu_cores", json!(33))
        }),
        case("IR008", "/apps/0/resources/memory_mb", |d| {
            set(d, "/apps/0/resources/memory_mb", json!(63))
        }),
        case("IR008", "/apps/0/resources/memory_mb", |d| {
            set(d, "/apps/0/resources/memory_mb", json!(65537))
        }),
        case("IR008", "/apps/0/resources/rootfs_size_mb", |d| {
            set(d, "/apps/0/resources/rootfs_size_mb", json!(15))
        }),
        case("IR008", "/apps/0/resources/rootfs_size_mb", |d| {
            set(d, "/apps/0/resources/rootfs_size_mb", json!(1_048_577))
        }),
        case("IR008", "/volumes/0/size_mb", |d| {
            set(d, "/volumes/0/size_mb", json!(0))
        }),
        case("IR008", "/volumes/0/size_mb", |d| {
            set(d, "/volumes/0/size_mb", json!(1_048_577))
        }),
        case("IR009", "/apps/0/entrypoints/0/cwd", |d| {
            set(d, "/apps/0/entrypoints/0/cwd", json!("srv/api"))
        }),
        case("IR009", "/apps/0/mounts/0/target", |d| {
            set(d, "/apps/0/mounts/0/target", json!("/var/../etc"))
        }),
        case("IR009", "/apps/0/mounts/0/target", |d| {
            set(d, "/apps/0/mounts/0/target", json!("/var/./lib"))
        }),
        case("IR009", "/apps/0/mounts/0/target", |d| {
            set(d, "/apps/0/mounts/0/target", json!("/var//lib"))
        }),
        case("IR009", "/apps/0/files/1/path", |d| {
            set(d, "/apps/0/files/1/path", json!("etc/motd"))
        }),
        case("IR009", "/apps/0/files/1/path", |d| {
            set(
                d,
                "/apps/0/files/1/path",
                json!(format!("/{}", "a".repeat(4096))),
            )
        }),
        case("IR010", "/apps/0/env/DB_PASSWORD/value", |d| {
            set(
                d,
                "/apps/0/env/DB_PASSWORD",
                json!({"kind": "literal", "value": "hunter2"}),
            )
        }),
        case("IR010", "/apps/0/env/SIGNING_KEY/value", |d| {
            set(
                d,
                "/apps/0/env/SIGNING_KEY",
                json!({"kind": "literal", "value": "abc"}),
            )
        }),
        case("IR010", "/apps/0/env/GREETING/value", |d| {
            set(
                d,
                "/apps/0/env/GREETING/value",
                json!("ghp_0123456789abcdefghij"),
            )
        }),
        case("IR010", "/apps/0/env/GREETING/value", |d| {
            set(
                d,
                "/apps/0/env/GREETING/value",
                json!("-----BEGIN OPENSSH PRIVATE KEY-----"),
            )
        }),
        case("IR011", "/apps/0/env/1BAD", |d| {
            set(
                d,
                "/apps/0/env/1BAD",
                json!({"kind": "literal", "value": "x"}),
            )
        }),
        case("IR011", "/apps/0/env/A~1B~0C", |d| {
            set(
                d,
                "/apps/0/env/A~1B~0C",
                json!({"kind": "literal", "value": "x"}),
            )
        }),
        case("IR011", "/apps/0/env/", |d| {
            set(d, "/apps/0/env/", json!({"kind": "literal", "value": "x"}))
        }),
        case("IR011", "/apps/0/env/GREETING/value", |d| {
            set(d, "/apps/0/env/GREETING/value", json!("a\u{0}b"))
        }),
        case("IR011", "/apps/0/env/GREETING/value", |d| {
            set(
                d,
                "/apps/0/env/GREETING/value",
                json!("x".repeat(64 * 1024 + 1)),
            )
        }),
        case("IR012", "/apps/0/env/LD_PRELOAD", |d| {
            set(
                d,
                "/apps/0/env/LD_PRELOAD",
                json!({"kind": "literal", "value": "/tmp/x.so"}),
            )
        }),
        case("IR012", "/apps/0/env/NODE_OPTIONS", |d| {
            set(
                d,
                "/apps/0/env/NODE_OPTIONS",
                json!({"kind": "secret_ref", "name": "node-opts"}),
            )
        }),
        case("IR013", "/apps/0/env/API_KEY/name", |d| {
            set(d, "/apps/0/env/API_KEY/name", json!("API KEY"))
        }),
        case("IR013", "/apps/0/env/SENTRY_DSN/name", |d| {
            set(d, "/apps/0/env/SENTRY_DSN/name", json!("../../etc/shadow"))
        }),
        case("IR014", "/apps/0/network/egress/allowlist/0/host", |d| {
            set(d, "/apps/0/network/egress/allowlist/0/host", json!("api"))
        }),
        case("IR014", "/apps/0/network/egress/allowlist/0/host", |d| {
            set(
                d,
                "/apps/0/network/egress/allowlist/0/host",
                json!("-api.example.com"),
            )
        }),
        case("IR014", "/apps/0/network/egress/allowlist/1/host", |d| {
            set(d, "/apps/0/network/egress/allowlist/1/host", json!("*"))
        }),
        case("IR014", "/apps/0/network/egress/allowlist/0/host", |d| {
            set(
                d,
                "/apps/0/network/egress/allowlist/0/host",
                json!("https://api.example.com"),
            )
        }),
        case("IR014", "/apps/0/network/egress/allowlist/2/port", |d| {
            set(d, "/apps/0/network/egress/allowlist/2/port", json!(0))
        }),
        case("IR015", "/apps/0/network/ports/1", |d| {
            set(d, "/apps/0/network/ports/1/guest", json!(0))
        }),
        case("IR015", "/apps/0/network/ports/0", |d| {
            set(d, "/apps/0/network/ports/0/host", json!(0))
        }),
        case("IR015", "/apps/0/network/ports/1/guest", |d| {
            set(d, "/apps/0/network/ports/1/guest", json!(8000))
        }),
        case("IR015", "/apps/0/network/ports/1/host", |d| {
            set(d, "/apps/0/network/ports/1/host", json!(18000))
        }),
        case("IR016", "/apps/1/image/packages", |d| {
            set(d, "/apps/1/image/packages", json!([]))
        }),
        case("IR016", "/apps/1/image/packages/1", |d| {
            set(
                d,
                "/apps/1/image/packages/1",
                json!("python3Packages..requests"),
            )
        }),
        case("IR016", "/apps/1/image/packages/0", |d| {
            set(d, "/apps/1/image/packages/0", json!("3python"))
        }),
        case("IR016", "/apps/1/image/packages/0", |d| {
            set(d, "/apps/1/image/packages/0", json!("python3; rm -rf /"))
        }),
        case("IR017", "/apps/0/mounts/0/volume", |d| {
            set(d, "/apps/0/mounts/0/volume", json!("missing"))
        }),
        case("IR017", "/apps/0/mounts/1/target", |d| {
            set(d, "/apps/0/mounts/1/target", json!("/var/lib/data"))
        }),
        case("IR018", "/apps/0/files/1/path", |d| {
            set(d, "/apps/0/files/1/path", json!("/etc/api/config.toml"))
        }),
        case("IR018", "/apps/0/files/0/content", |d| {
            set(
                d,
                "/apps/0/files/0/content",
                json!("x".repeat(1024 * 1024 + 1)),
            )
        }),
        case("IR018", "/apps/0/files/0/mode", |d| {
            set(d, "/apps/0/files/0/mode", json!("0999"))
        }),
        case("IR018", "/apps/0/files/0/mode", |d| {
            set(d, "/apps/0/files/0/mode", json!("06440"))
        }),
        case("IR018", "/apps/0/files/0/mode", |d| {
            set(d, "/apps/0/files/0/mode", json!("rw-r--r--"))
        }),
        case("IR018", "/apps/0/files/0/mode", |d| {
            set(d, "/apps/0/files/0/mode", json!("64"))
        }),
        case("IR019", "/apps/0/health_check/interval_s", |d| {
            set(d, "/apps/0/health_check/interval_s", json!(3601))
        }),
        case("IR019", "/apps/0/health_check/timeout_s", |d| {
            set(d, "/apps/0/health_check/timeout_s", json!(0))
        }),
        case("IR019", "/apps/0/health_check/timeout_s", |d| {
            set(d, "/apps/0/health_check/timeout_s", json!(11))
        }),
        case("IR019", "/apps/0/health_check/retries", |d| {
            set(d, "/apps/0/health_check/retries", json!(0))
        }),
        case("IR019", "/apps/0/health_check/retries", |d| {
            set(d, "/apps/0/health_check/retries", json!(101))
        }),
        case("IR019", "/apps/0/health_check", |d| {
            remove(d, "/apps/0/health_check/command")
        }),
        case("IR019", "/apps/0/health_check", |d| {
            set(d, "/apps/0/health_check/tcp_port", json!(8000))
        }),
        case("IR019", "/apps/0/health_check", |d| {
            remove(d, "/apps/0/health_check/command");
            set(d, "/apps/0/health_check/tcp_port", json!(0))
        }),
        case("IR019", "/apps/0/health_check/http/path", |d| {
            remove(d, "/apps/0/health_check/command");
            set(
                d,
                "/apps/0/health_check/http",
                json!({"port": 8000, "path": "/a b"}),
            )
        }),
        case("IR019", "/apps/0/health_check/start_period_s", |d| {
            set(d, "/apps/0/health_check/start_period_s", json!(3601))
        }),
        case("IR022", "/apps/0/entrypoints/0/name", |d| {
            set(d, "/apps/0/entrypoints/0/name", json!("Api"))
        }),
        case("IR022", "/apps/0/entrypoints/1/name", |d| {
            set(
                d,
                "/apps/0/entrypoints/1",
                json!({"kind": "service", "name": "api", "command": ["migrate"]}),
            )
        }),
        case("IR022", "/apps/0/entrypoints/0/max_restarts", |d| {
            set(d, "/apps/0/entrypoints/0/max_restarts", json!(1001))
        }),
        case("IR020", "/apps/0/source/path", |d| {
            set(d, "/apps/0/source/path", json!("../api"))
        }),
        case("IR020", "/apps/0/source/path", |d| {
            set(d, "/apps/0/source/path", json!("src/../../api"))
        }),
        case("IR020", "/apps/0/source/path", |d| {
            set(d, "/apps/0/source/path", json!("/srv/api"))
        }),
        case("IR020", "/apps/0/source/path", |d| {
            set(d, "/apps/0/source/path", json!(""))
        }),
        case("IR020", "/apps/1/source/url", |d| {
            set(
                d,
                "/apps/1/source/url",
                json!("http://git.example.com/team/worker.git"),
            )
        }),
        case("IR020", "/apps/1/source/url", |d| {
            set(d, "/apps/1/source/url", json!("file:///home/me/worker"))
        }),
        case("IR020", "/apps/1/source/rev", |d| {
            set(d, "/apps/1/source/rev", json!("main"))
        }),
        case("IR020", "/apps/1/source/rev", |d| {
            set(d, "/apps/1/source/rev", json!("0123456"))
        }),
        case("IR021", "/apps", |d| {
            // Copies of the first app, which mounts every volume.
            let api = d["apps"][0].clone();
            let apps = many(65, |i| {
                let mut app = api.clone();
                app["name"] = json!(format!("app-{i}"));
                app
            });
            set(d, "/apps", json!(apps));
        }),
        case("IR021", "/apps/0/entrypoints", |d| {
            set(
                d,
                "/apps/0/entrypoints",
                json!(many(65, |i| json!({
                    "kind": "service", "name": format!("s{i}"), "command": ["true"]
                }))),
            )
        }),
        case("IR021", "/apps/0/entrypoints/1/command", |d| {
            set(
                d,
                "/apps/0/entrypoints/1/command",
                json!(many(4097, |i| i.to_string())),
            )
        }),
        case("IR021", "/apps/0/health_check/command", |d| {
            set(
                d,
                "/apps/0/health_check/command",
                json!(many(4097, |i| i.to_string())),
            )
        }),
        case("IR021", "/apps/0/env", |d| {
            let env: serde_json::Map<String, Value> = many(1025, |i| {
                (format!("VAR_{i}"), json!({"kind": "literal", "value": "v"}))
            })
            .into_iter()
            .collect();
            set(d, "/apps/0/env", Value::Object(env));
        }),
        case("IR021", "/apps/0/network/egress/allowlist", |d| {
            set(
                d,
                "/apps/0/network/egress/allowlist",
                json!(many(
                    1025,
                    |i| json!({"host": "api.example.com", "port": i + 1})
                )),
            )
        }),
        case("IR021", "/apps/0/files", |d| {
            set(
                d,
                "/apps/0/files",
                json!(many(
                    1025,
                    |i| json!({"path": format!("/f/{i}"), "content": ""})
                )),
            )
        }),
        case("IR021", "/apps/1/image/packages", |d| {
            set(
                d,
                "/apps/1/image/packages",
                json!(many(1025, |i| format!("p{i}"))),
            )
        }),
        case("IR021", "/apps/0/network/ports", |d| {
            set(
                d,
                "/apps/0/network/ports",
                json!(many(1025, |i| json!({"guest": i + 1}))),
            )
        }),
        case("IR021", "/apps/0/mounts", |d| {
            set(
                d,
                "/apps/0/mounts",
                json!(many(
                    1025,
                    |i| json!({"volume": if i == 0 { "cache" } else { "data" }, "target": format!("/m/{i}")})
                )),
            )
        }),
        case("IR021", "/volumes", |d| {
            // 1025 volumes, every one mounted: 514 by the first app, 512 by the second.
            for i in 0..1023 {
                let name = format!("v{i}");
                set(d, "/volumes/-", json!({"name": name, "size_mb": 1}));
                let app = if i < 512 { 0 } else { 1 };
                set(
                    d,
                    &format!("/apps/{app}/mounts/-"),
                    json!({"volume": name, "target": format!("/v/{i}")}),
                );
            }
        }),
        case("IR101", "/apps/0/network/egress/allowlist", |d| {
            set(d, "/apps/0/network/mode", json!("none"))
        }),
        case("IR102", "/volumes/2/name", |d| {
            set(d, "/volumes/-", json!({"name": "spare", "size_mb": 1}))
        }),
        case("IR103", "/apps/0/health_check", |d| {
            set(
                d,
                "/apps/0/entrypoints/0",
                json!({"kind": "command", "command": ["api"]}),
            )
        }),
    ]
}

/// Every code `validate.rs` can emit, read from its source: a new code without a case here fails.
fn codes_in_validator_source() -> BTreeSet<String> {
    let source = include_str!("../src/validate.rs");
    let mut codes = BTreeSet::new();
    for (at, _) in source.match_indices("\"IR") {
        let code = &source[at + 1..];
        let digits = &code[2..];
        if digits.len() > 3
            && digits.as_bytes()[..3].iter().all(u8::is_ascii_digit)
            && digits.as_bytes()[3] == b'"'
        {
            codes.insert(code[..5].to_string());
        }
    }
    codes
}

#[test]
fn the_table_covers_every_code_the_validator_emits() {
    let in_source = codes_in_validator_source();
    let expected: BTreeSet<String> = (1..=22)
        .map(|n| format!("IR{n:03}"))
        .chain(["IR101".into(), "IR102".into(), "IR103".into()])
        .collect();
    assert_eq!(
        in_source, expected,
        "the validator's codes changed; update the table"
    );
    let in_table: BTreeSet<String> = validation_cases()
        .iter()
        .map(|c| c.code.to_string())
        .collect();
    assert_eq!(in_table, in_source);
}

#[test]
fn each_case_triggers_exactly_its_code_at_its_pointer() {
    let base = from_value(&rich());
    assert_eq!(codes_and_pointers(&base), []);
    for (n, case) in validation_cases().into_iter().enumerate() {
        let mut doc = rich();
        (case.mutate)(&mut doc);
        let workload = from_value(&doc);
        let report = validate(&workload);
        let found: Vec<_> = report
            .issues
            .iter()
            .map(|i| (i.code, i.pointer.as_str()))
            .collect();
        assert_eq!(
            found,
            [(case.code, case.pointer)],
            "case {n} ({} at {}):\n{report}",
            case.code,
            case.pointer
        );
        let issue = &report.issues[0];
        let warning = case.code.starts_with("IR1");
        let expected_severity = if warning {
            Severity::Warning
        } else {
            Severity::Error
        };
        assert_eq!(issue.severity, expected_severity, "case {n}");
        assert_eq!(report.has_errors(), !warning, "case {n}");
        assert!(
            issue.message.len() > 10,
            "case {n}: message {:?}",
            issue.message
        );
        // The pointer resolves in the mutated document.
        assert!(
            doc.pointer(case.pointer).is_some(),
            "case {n}: {} does not resolve",
            case.pointer
        );
    }
}

#[test]
fn boundary_values_and_near_misses_are_accepted() {
    let accepted: &[(&str, Value)] = &[
        ("/apps/0/resources/cpu_cores", json!(32)),
        ("/apps/0/resources/memory_mb", json!(64)),
        ("/apps/0/resources/memory_mb", json!(65536)),
        ("/apps/0/resources/rootfs_size_mb", json!(16)),
        ("/apps/0/resources/rootfs_size_mb", json!(1_048_576)),
        ("/volumes/1/size_mb", json!(1)),
        ("/id", json!("a".repeat(63))),
        ("/id", json!("0.a_b-c")),
        (
            "/apps/0/image/reference",
            json!(format!("registry.example.com:5000/team/python@{DIGEST}")),
        ),
        ("/apps/0/image/reference", json!("localhost/python")),
        ("/apps/0/image/reference", json!("oci:./Images/Python 3")),
        (
            "/apps/0/image/reference",
            json!("oci-archive:/srv/python.tar"),
        ),
        (
            "/apps/0/network/egress/allowlist/0/host",
            json!("2001:db8::1"),
        ),
        (
            "/apps/0/network/egress/allowlist/0/host",
            json!("*.example.com"),
        ),
        ("/apps/0/network/egress/allowlist/0/port", json!(65535)),
        ("/apps/0/files/0/mode", json!("755")),
        ("/apps/0/files/0/mode", json!("4755")),
        ("/apps/0/files/0/content", json!("x".repeat(1024 * 1024))),
        ("/apps/0/mounts/0/target", json!("/")),
        ("/apps/0/entrypoints/0/cwd", json!("/")),
        (
            "/apps/0/env/API_TOKEN",
            json!({"kind": "literal", "value": ""}),
        ),
        (
            "/apps/0/env/_PRIVATE",
            json!({"kind": "literal", "value": "x"}),
        ),
        (
            "/apps/0/env/MY_LD_PRELOAD",
            json!({"kind": "literal", "value": "x"}),
        ),
        ("/apps/0/health_check/timeout_s", json!(10)),
        ("/apps/0/health_check/interval_s", json!(3600)),
        ("/apps/0/health_check/retries", json!(100)),
        ("/apps/1/image/packages/0", json!("_private.python3-full'")),
        (
            "/apps/1/source/url",
            json!("ssh://git@git.example.com/team/worker.git"),
        ),
        ("/apps/0/source/path", json!("./src/api")),
        ("/apps/0/network/ports/1/host", json!(19000)),
    ];
    for (pointer, value) in accepted {
        let mut doc = rich();
        set(&mut doc, pointer, value.clone());
        let workload = from_value(&doc);
        assert_eq!(codes_and_pointers(&workload), [], "{pointer} = {value}");
    }
}

#[test]
fn every_problem_is_reported_at_once_in_document_order() {
    let mut doc = rich();
    set(&mut doc, "/schema_version", json!("2"));
    set(&mut doc, "/id", json!("Rich"));
    set(&mut doc, "/apps/0/resources/cpu_cores", json!(0));
    set(
        &mut doc,
        "/apps/0/env/LD_PRELOAD",
        json!({"kind": "literal", "value": "x.so"}),
    );
    set(
        &mut doc,
        "/apps/0/network/egress/allowlist/1/port",
        json!(0),
    );
    set(&mut doc, "/apps/0/files/1/mode", json!("999"));
    set(&mut doc, "/apps/1/name", json!("api"));
    set(&mut doc, "/apps/1/source/rev", json!("HEAD"));
    set(
        &mut doc,
        "/volumes/-",
        json!({"name": "spare", "size_mb": 0}),
    );
    let expected = [
        ("IR001", "/schema_version"),
        ("IR002", "/id"),
        ("IR008", "/apps/0/resources/cpu_cores"),
        ("IR012", "/apps/0/env/LD_PRELOAD"),
        ("IR014", "/apps/0/network/egress/allowlist/1/port"),
        ("IR018", "/apps/0/files/1/mode"),
        ("IR004", "/apps/1/name"),
        ("IR020", "/apps/1/source/rev"),
        ("IR008", "/volumes/2/size_mb"),
        ("IR102", "/volumes/2/name"),
    ];
    let workload = from_value(&doc);
    let found = codes_and_pointers(&workload);
    let found: Vec<_> = found.iter().map(|(c, p)| (*c, p.as_str())).collect();
    assert_eq!(found, expected);

    // Loading refuses the workload with IR000 and carries the same complete report.
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "workload.json", doc.to_string().as_bytes());
    let err = load_workload(&path).unwrap_err();
    assert_eq!(
        (err.code(), err.class()),
        ("IR000", ErrorClass::InvalidInput)
    );
    let Error::InvalidWorkload(report) = &err else {
        panic!("expected InvalidWorkload, got {err:?}")
    };
    assert_eq!(report, &validate(&workload));
    let shown = err.to_string();
    for (code, pointer) in expected {
        assert!(shown.contains(&format!("{code} at {pointer}")), "{shown}");
    }
}

#[test]
fn warnings_alone_do_not_refuse_a_workload() {
    let mut doc = rich();
    set(&mut doc, "/apps/0/network/mode", json!("none"));
    set(
        &mut doc,
        "/volumes/-",
        json!({"name": "spare", "size_mb": 1}),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "workload.json", doc.to_string().as_bytes());
    let (workload, report) = load_workload(&path).unwrap();
    assert_eq!(workload, from_value(&doc));
    assert!(!report.has_errors());
    assert_eq!(
        report.issues.iter().map(|i| i.code).collect::<Vec<_>>(),
        ["IR101", "IR102"]
    );
    // A health check without a service to probe is only a warning.
    set(
        &mut doc,
        "/apps/0/entrypoints/0",
        json!({"kind": "command", "command": ["/usr/bin/python3", "-m", "api"]}),
    );
    let report = validate(&from_value(&doc));
    assert!(!report.has_errors());
    assert_eq!(
        report.issues.iter().map(|i| i.code).collect::<Vec<_>>(),
        ["IR101", "IR103", "IR102"]
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Strict parsing
// ---------------------------------------------------------------------------------------------

/// Parses `doc` as JSON and as TOML; both must be refused with INPUT003, the message naming
/// `needle`.
fn assert_refused_in_both_syntaxes(doc: &Value, needle: &str, what: &str) {
    let json = serde_json::to_vec(doc).unwrap();
    let toml_text = to_toml(doc);
    for (syntax, bytes) in [
        (Syntax::Json, json.as_slice()),
        (Syntax::Toml, toml_text.as_bytes()),
    ] {
        let err = match parse_workload(bytes, syntax) {
            Ok(w) => panic!("{what}: {syntax:?} accepted as {w:?}"),
            Err(err) => err,
        };
        assert_eq!(err.code(), "INPUT003", "{what} ({syntax:?}): {err}");
        assert_eq!(err.class(), ErrorClass::InvalidInput, "{what}");
        assert!(matches!(err, Error::Parse { .. }), "{what}");
        let message = err.to_string();
        assert!(
            message.contains(needle),
            "{what} ({syntax:?}): {message:?} lacks {needle:?}"
        );
    }
}

#[test]
fn both_syntaxes_accept_the_unmutated_document() {
    // The refusals below are meaningful only if the untouched documents parse.
    let doc = rich();
    let json = serde_json::to_vec(&doc).unwrap();
    assert_eq!(
        parse_workload(&json, Syntax::Json).unwrap(),
        from_value(&doc)
    );
    assert_eq!(parse_toml(&to_toml(&doc)), from_value(&doc));
}

#[test]
fn unknown_fields_are_refused_at_every_level() {
    let objects = [
        "",
        "/apps/0",
        "/apps/0/source",
        "/apps/1/source",
        "/apps/0/image",
        "/apps/1/image",
        "/apps/0/resources",
        "/apps/0/entrypoints/0",
        "/apps/0/env/GREETING",
        "/apps/0/env/API_KEY",
        "/apps/0/network",
        "/apps/0/network/egress",
        "/apps/0/network/egress/allowlist/0",
        "/apps/0/network/ports/0",
        "/apps/0/mounts/0",
        "/apps/0/files/0",
        "/apps/0/health_check",
        "/volumes/0",
    ];
    for at in objects {
        let mut doc = rich();
        assert!(
            doc.pointer(at).is_some_and(Value::is_object),
            "{at} is an object"
        );
        set(&mut doc, &format!("{at}/surprise"), json!(1));
        assert_refused_in_both_syntaxes(&doc, "surprise", &format!("unknown field at {at:?}"));
    }
    // A plausible misspelling is refused, not silently ignored (which would drop the grant).
    let mut doc = rich();
    remove(&mut doc, "/apps/0/network/egress");
    set(&mut doc, "/apps/0/network/egres", json!({"allowlist": []}));
    assert_refused_in_both_syntaxes(&doc, "egres", "misspelt egress");
}

#[test]
fn missing_or_unknown_kind_is_refused() {
    for at in [
        "/apps/0/source",
        "/apps/1/source",
        "/apps/0/image",
        "/apps/1/image",
        "/apps/0/entrypoints/0",
        "/apps/0/env/GREETING",
        "/apps/0/env/API_KEY",
    ] {
        let mut doc = rich();
        remove(&mut doc, &format!("{at}/kind"));
        assert_refused_in_both_syntaxes(&doc, "kind", &format!("missing kind at {at}"));

        let mut doc = rich();
        set(&mut doc, &format!("{at}/kind"), json!("teleport"));
        assert_refused_in_both_syntaxes(&doc, "teleport", &format!("unknown kind at {at}"));
    }
    // A kind that exists, but on another union, is unknown here; and kinds are case-sensitive.
    let mut doc = rich();
    set(&mut doc, "/apps/0/image/kind", json!("literal"));
    assert_refused_in_both_syntaxes(&doc, "literal", "env kind on image");
    let mut doc = rich();
    set(&mut doc, "/apps/0/image/kind", json!("OciBase"));
    assert_refused_in_both_syntaxes(&doc, "OciBase", "Rust-cased kind");
    // Fields of another variant are unknown fields of this one.
    let mut doc = rich();
    set(&mut doc, "/apps/0/image/packages", json!(["python3"]));
    assert_refused_in_both_syntaxes(&doc, "packages", "nix field on oci_base");
    // Unit enums refuse unknown values too.
    let mut doc = rich();
    set(&mut doc, "/apps/0/network/mode", json!("open"));
    assert_refused_in_both_syntaxes(&doc, "open", "unknown network mode");
    let mut doc = rich();
    set(&mut doc, "/apps/0/threat_tier", json!("paranoid"));
    assert_refused_in_both_syntaxes(&doc, "paranoid", "unknown threat tier");
}

#[test]
fn missing_required_fields_are_refused() {
    let required = [
        "/schema_version",
        "/id",
        "/apps",
        "/apps/0/name",
        "/apps/0/image",
        "/apps/0/resources",
        "/apps/0/entrypoints",
        "/apps/0/resources/cpu_cores",
        "/apps/0/resources/memory_mb",
        "/apps/0/image/reference",
        "/apps/0/image/digest",
        "/apps/1/image/packages",
        "/apps/0/source/path",
        "/apps/1/source/url",
        "/apps/1/source/rev",
        "/apps/0/entrypoints/0/command",
        "/apps/0/env/GREETING/value",
        "/apps/0/env/API_KEY/name",
        "/apps/0/network/egress/allowlist/0/host",
        "/apps/0/network/egress/allowlist/0/port",
        "/apps/0/network/ports/0/guest",
        "/apps/0/mounts/0/volume",
        "/apps/0/mounts/0/target",
        "/apps/0/files/0/path",
        "/apps/0/files/0/content",
        "/apps/0/entrypoints/0/name",
        "/apps/0/health_check/interval_s",
        "/apps/0/health_check/timeout_s",
        "/apps/0/health_check/retries",
        "/volumes/0/name",
        "/volumes/0/size_mb",
    ];
    for pointer in required {
        let mut doc = rich();
        remove(&mut doc, pointer);
        let field = split(pointer).1;
        assert_refused_in_both_syntaxes(&doc, &format!("missing field `{field}`"), pointer);
    }
}

#[test]
fn wrong_types_are_refused() {
    let wrong: &[(&str, Value)] = &[
        ("/schema_version", json!(0)),
        ("/id", json!(["hello"])),
        ("/apps", json!({"name": "main"})),
        ("/apps/0", json!("main")),
        ("/apps/0/resources/cpu_cores", json!("2")),
        ("/apps/0/resources/cpu_cores", json!(-1)),
        ("/apps/0/resources/cpu_cores", json!(2.5)),
        ("/apps/0/resources/cpu_cores", json!(true)),
        ("/apps/0/resources/memory_mb", json!(4_294_967_296u64)),
        ("/apps/0/network/egress/allowlist/0/port", json!(65536)),
        ("/apps/0/network/egress/allowlist/0/port", json!(-443)),
        ("/apps/0/network/egress/allowlist/0/port", json!("443")),
        ("/apps/0/network/ports/0/host", json!(70000)),
        (
            "/apps/0/entrypoints/0/command",
            json!("/usr/bin/python3 -m api"),
        ),
        ("/apps/0/entrypoints/0/command/0", json!(7)),
        (
            "/apps/0/entrypoints",
            json!({"kind": "command", "command": ["x"]}),
        ),
        ("/apps/0/env", json!([["GREETING", "hi"]])),
        ("/apps/0/env/GREETING", json!("hi")),
        ("/apps/0/env/SENTRY_DSN/optional", json!("yes")),
        ("/apps/0/mounts/0/read_only", json!(1)),
        ("/apps/0/files/0/mode", json!(420)),
        ("/apps/0/image/kind", json!(1)),
        ("/apps/1/image/packages", json!("python3")),
        ("/apps/0/network/mode", json!(false)),
        (
            "/apps/0/network/egress/allowlist",
            json!({"host": "api.example.com", "port": 443}),
        ),
        ("/apps/0/threat_tier", json!(2)),
        ("/apps/0/health_check", json!(["/bin/true"])),
        ("/volumes/0/size_mb", json!("1GiB")),
    ];
    for (pointer, value) in wrong {
        let mut doc = rich();
        set(&mut doc, pointer, value.clone());
        assert_refused_in_both_syntaxes(&doc, "", &format!("{pointer} = {value}"));
    }
}

#[test]
fn json_specific_malformations_are_refused() {
    let hello_with = |from: &str, to: &str| HELLO.replacen(from, to, 1);
    let cases = [
        ("empty", String::new()),
        ("not JSON", "schema_version = \"0\"".to_string()),
        ("truncated", HELLO[..HELLO.len() - 1].to_string()),
        ("trailing garbage", format!("{HELLO} {{}}")),
        (
            "trailing comma",
            hello_with("\"id\": \"hello\",", "\"id\": \"hello\",,"),
        ),
        ("comment", format!("// hello\n{HELLO}")),
        (
            "duplicate field",
            hello_with("\"id\": \"hello\",", "\"id\": \"hello\", \"id\": \"evil\","),
        ),
        (
            "duplicate field in a tagged union",
            hello_with("\"value\": \"hi\"", "\"value\": \"hi\", \"value\": \"x\""),
        ),
        (
            "null for a required field",
            hello_with("\"id\": \"hello\"", "\"id\": null"),
        ),
        ("top-level array", format!("[{HELLO}]")),
        (
            "lone surrogate",
            hello_with("\"value\": \"hi\"", "\"value\": \"\\ud800\""),
        ),
    ];
    for (what, text) in cases {
        let err = parse_workload(text.as_bytes(), Syntax::Json).unwrap_err();
        assert_eq!(
            (err.code(), err.class()),
            ("INPUT003", ErrorClass::InvalidInput),
            "{what}: {err}"
        );
    }
    // Invalid UTF-8 inside a JSON string is a parse error too.
    let mut bytes = HELLO.as_bytes().to_vec();
    let at = HELLO.find("\"hi\"}").unwrap() + 1;
    bytes[at] = 0xff;
    let err = parse_workload(&bytes, Syntax::Json).unwrap_err();
    assert_eq!(err.code(), "INPUT003", "{err}");
}

#[test]
fn duplicate_env_names_are_refused() {
    // serde_json would otherwise keep the last of two members silently: a reviewer reading the
    // first would approve a value that is not the one run.
    let text = HELLO.replacen(
        r#""GREETING": {"kind": "literal", "value": "hi"},"#,
        r#""GREETING": {"kind": "literal", "value": "hi"}, "GREETING": {"kind": "literal", "value": "bye"},"#,
        1,
    );
    assert_ne!(text, HELLO);
    let err = parse_workload(text.as_bytes(), Syntax::Json).unwrap_err();
    assert_eq!(
        (err.code(), err.class()),
        ("INPUT003", ErrorClass::InvalidInput),
        "{err}"
    );
    assert!(err.to_string().contains("GREETING"), "{err}");

    let toml_text = std::fs::read_to_string(examples_dir().join("mvm.toml"))
        .unwrap()
        .replacen(
            "GREETING = {",
            "GREETING = { kind = \"literal\", value = \"bye\" }\nGREETING = {",
            1,
        );
    let err = parse_workload(toml_text.as_bytes(), Syntax::Toml).unwrap_err();
    assert_eq!(err.code(), "INPUT003", "{err}");
}

#[test]
fn toml_specific_malformations_are_refused() {
    let cases = [
        ("not TOML", HELLO.to_string()),
        (
            "datetime for a string",
            "schema_version = 1979-05-27T07:32:00Z\nid = \"x\"\napps = []".to_string(),
        ),
        ("float for an integer", {
            let mut doc = rich();
            set(&mut doc, "/apps/0/resources/cpu_cores", json!(1.0));
            to_toml(&doc)
        }),
        (
            "unterminated string",
            "schema_version = \"0\nid = \"x\"\napps = []".to_string(),
        ),
        (
            "redefined table",
            "schema_version = \"0\"\nid = \"x\"\napps = []\n[a]\n[a]".to_string(),
        ),
    ];
    for (what, text) in cases {
        let err = parse_workload(text.as_bytes(), Syntax::Toml).unwrap_err();
        assert_eq!(
            (err.code(), err.class()),
            ("INPUT003", ErrorClass::InvalidInput),
            "{what}: {err}"
        );
    }
}

#[test]
fn invalid_utf8_in_toml_is_input002() {
    let toml_text = std::fs::read(examples_dir().join("mvm.toml")).unwrap();
    let at = toml_text.windows(4).position(|w| w == b"\"hi\"").unwrap() + 1;
    for bad in [
        &[0xffu8][..],
        &[0xc3],
        &[0xed, 0xa0, 0x80],
        &[0xf8, 0x88, 0x80, 0x80, 0x80],
    ] {
        let mut bytes = toml_text.clone();
        bytes.splice(at..at + 1, bad.iter().copied());
        let err = parse_workload(&bytes, Syntax::Toml).unwrap_err();
        assert_eq!(
            (err.code(), err.class()),
            ("INPUT002", ErrorClass::InvalidInput),
            "{err}"
        );
        assert!(matches!(err, Error::NotUtf8 { .. }));

        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "mvm.toml", &bytes);
        let err = load_workload(&path).unwrap_err();
        assert_eq!(err.code(), "INPUT002", "{err}");
    }
}

#[test]
fn documents_over_one_mib_are_input001_and_one_mib_is_not() {
    let limit = usize::try_from(MAX_DOCUMENT_BYTES).unwrap();
    assert_eq!(limit, 1024 * 1024);
    let dir = tempfile::tempdir().unwrap();

    // A valid document padded with white space to exactly the limit is read.
    let mut exact = HELLO.as_bytes().to_vec();
    exact.resize(limit, b' ');
    assert_eq!(
        parse_workload(&exact, Syntax::Json).unwrap(),
        parse_json(HELLO)
    );
    let path = write(dir.path(), "exact.json", &exact);
    assert!(load_workload(&path).is_ok());
    let mut exact_toml = std::fs::read(examples_dir().join("mvm.toml")).unwrap();
    exact_toml.resize(limit, b'\n');
    assert_eq!(
        parse_workload(&exact_toml, Syntax::Toml).unwrap(),
        parse_json(HELLO)
    );

    // One byte more is refused before parsing, in both syntaxes and through files.
    let mut over = exact.clone();
    over.push(b' ');
    let mut over_toml = exact_toml.clone();
    over_toml.push(b'\n');
    for (bytes, syntax) in [(&over, Syntax::Json), (&over_toml, Syntax::Toml)] {
        let err = parse_workload(bytes, syntax).unwrap_err();
        assert_eq!(
            (err.code(), err.class()),
            ("INPUT001", ErrorClass::InvalidInput),
            "{err}"
        );
        assert!(
            matches!(err, Error::TooLarge { size, limit: l, .. } if size == MAX_DOCUMENT_BYTES + 1 && l == MAX_DOCUMENT_BYTES)
        );
    }
    // Size is checked before UTF-8 and syntax: oversized garbage is INPUT001, not INPUT002/3.
    let garbage = vec![0xffu8; limit + 1];
    assert_eq!(
        parse_workload(&garbage, Syntax::Toml).unwrap_err().code(),
        "INPUT001"
    );
    assert_eq!(
        parse_workload(&garbage, Syntax::Json).unwrap_err().code(),
        "INPUT001"
    );

    for (name, bytes) in [
        ("over.json", &over),
        ("over.toml", &over_toml),
        ("huge.json", &vec![b' '; 8 * limit]),
    ] {
        let path = write(dir.path(), name, bytes);
        let err = load_workload(&path).unwrap_err();
        assert_eq!(
            (err.code(), err.class()),
            ("INPUT001", ErrorClass::InvalidInput),
            "{name}: {err}"
        );
    }
}

#[test]
fn deeply_nested_json_is_an_error_not_a_crash() {
    let depth = 100_000;
    let documents = [
        "[".repeat(depth),
        format!("{}{}", "[".repeat(depth), "]".repeat(depth)),
        "{\"a\":".repeat(depth),
        format!(r#"{{"schema_version": {}"#, "[".repeat(depth)),
        // Inside a tagged union, whose content serde buffers before it knows the variant.
        HELLO.replacen(
            r#""kind": "oci_base","#,
            &format!(r#""kind": "oci_base", "x": {}"#, "[".repeat(depth)),
            1,
        ),
        HELLO.replacen(
            r#""kind": "literal","#,
            &format!(r#""x": {}"#, "{\"a\":".repeat(depth)),
            1,
        ),
    ];
    for doc in documents {
        let err = parse_workload(doc.as_bytes(), Syntax::Json).unwrap_err();
        assert_eq!(
            (err.code(), err.class()),
            ("INPUT003", ErrorClass::InvalidInput),
            "{err}"
        );
    }
}

#[test]
fn deeply_nested_toml_is_an_error_not_a_crash() {
    let depth = 100_000;
    let documents = [
        format!("x = {}", "[".repeat(depth)),
        format!("x = {}1{}", "[".repeat(depth), "]".repeat(depth)),
        format!("x = {}1{}", "{ a = ".repeat(depth), " }".repeat(depth)),
        format!("x = {}", "{ a = ".repeat(depth)),
        format!("{} = 1", vec!["a"; depth].join(".")),
        format!("[{}]", vec!["a"; depth].join(".")),
        format!("[[{}]]", vec!["a"; depth].join(".")),
        format!(
            "schema_version = {}\"0\"{}",
            "[".repeat(depth),
            "]".repeat(depth)
        ),
        // Deep nesting where the IR expects a value, after valid content.
        std::fs::read_to_string(examples_dir().join("mvm.toml"))
            .unwrap()
            .replacen(
                "cpu_cores = 1",
                &format!("cpu_cores = {}1{}", "[".repeat(depth), "]".repeat(depth)),
                1,
            ),
    ];
    for doc in documents {
        assert!(doc.len() as u64 <= MAX_DOCUMENT_BYTES);
        let err = parse_workload(doc.as_bytes(), Syntax::Toml).unwrap_err();
        assert_eq!(
            (err.code(), err.class()),
            ("INPUT003", ErrorClass::InvalidInput),
            "{err}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Error codes and classes, and syntax selection
// ---------------------------------------------------------------------------------------------

#[test]
fn missing_file_is_io001() {
    let dir = tempfile::tempdir().unwrap();
    let err = load_workload(&dir.path().join("absent.json")).unwrap_err();
    assert_eq!((err.code(), err.class()), ("IO001", ErrorClass::Io));
    assert!(err.to_string().contains("absent.json"), "{err}");
    // A directory is not a declaration either.
    let err = load_workload(dir.path()).unwrap_err();
    assert_eq!(
        (err.code(), err.class()),
        ("IO001", ErrorClass::Io),
        "{err}"
    );
}

#[test]
fn syntax_follows_the_file_extension() {
    assert_eq!(Syntax::of_path(Path::new("mvm.toml")), Syntax::Toml);
    assert_eq!(Syntax::of_path(Path::new("dir.json/x.toml")), Syntax::Toml);
    assert_eq!(Syntax::of_path(Path::new("workload.json")), Syntax::Json);
    assert_eq!(Syntax::of_path(Path::new("workload")), Syntax::Json);
    assert_eq!(Syntax::of_path(Path::new("-")), Syntax::Json);
    assert_eq!(Syntax::of_path(Path::new("mvm.toml.json")), Syntax::Json);

    // Loading dispatches on it: TOML text in a .json file is a JSON parse error, and the reverse.
    let dir = tempfile::tempdir().unwrap();
    let toml_text = std::fs::read(examples_dir().join("mvm.toml")).unwrap();
    let path = write(dir.path(), "workload.json", &toml_text);
    assert_eq!(load_workload(&path).unwrap_err().code(), "INPUT003");
    let path = write(dir.path(), "mvm.toml", HELLO.as_bytes());
    assert_eq!(load_workload(&path).unwrap_err().code(), "INPUT003");
    let path = write(dir.path(), "renamed.toml", &toml_text);
    assert_eq!(load_workload(&path).unwrap().0, parse_json(HELLO));
}

#[test]
fn validation_work_grows_linearly_with_the_document() {
    // ~1 MiB of volumes and mounts that do not match: a quadratic volume/mount cross-check took
    // seconds here (6.7 s in a debug build); with sets it takes milliseconds.
    let mut doc = rich();
    set(
        &mut doc,
        "/volumes",
        json!(many(
            14_000,
            |i| json!({"name": format!("v{i}"), "size_mb": 1})
        )),
    );
    set(
        &mut doc,
        "/apps/0/mounts",
        json!(many(
            14_000,
            |i| json!({"volume": format!("w{i}"), "target": format!("/{i}")})
        )),
    );
    let text = doc.to_string();
    assert!(text.len() as u64 <= MAX_DOCUMENT_BYTES);
    let workload = parse_json(&text);
    let started = std::time::Instant::now();
    let report = validate(&workload);
    let took = started.elapsed();
    assert!(
        took < std::time::Duration::from_secs(2),
        "validation took {took:?}"
    );
    let codes: BTreeSet<_> = report.issues.iter().map(|i| i.code).collect();
    assert_eq!(codes, BTreeSet::from(["IR017", "IR021", "IR102"]));
}
