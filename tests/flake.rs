//! The repository's Nix code against the real Nix (Debian's `nix-bin` 2.8), offline:
//!
//! - every `.nix` file in the repository parses (`nix-instantiate --parse`);
//! - `mkWorkload` (`modules/`) evaluates to IR that `mvm ir validate` accepts, with the same
//!   `mvm ir digest` as the same workload written by hand, and refuses what it must;
//! - `flake.lock` is a lock of `flake.nix`'s inputs (`nix flake metadata --no-update-lock-file`);
//! - the flake's outputs that do not need nixpkgs (`templates`, `lib.mkWorkload`) evaluate, and
//!   so do the templates' own flakes with this flake as their `mvm` input.
//!
//! nixpkgs cannot be fetched here, so nothing that needs it is evaluated: not `packages`,
//! `apps`, `devShells`, `checks`, nor mkWorkload's derivations (those are checked against a
//! stub `pkgs` only, below). Skipped, with the reason printed, only where Nix is not installed;
//! in CI a missing Nix fails.

mod support;

// mvm-nix's harness for the real Nix; this test uses part of it.
#[allow(dead_code)]
#[path = "../nix/tests/real_nix/mod.rs"]
mod real_nix;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use real_nix::RealNix;
use serde_json::Value;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// A private store and cache, and the Nix settings for flakes.
struct Nix {
    real: RealNix,
    tmp: tempfile::TempDir,
}

impl Nix {
    fn find() -> Option<Self> {
        Some(Self {
            real: RealNix::find()?,
            tmp: tempfile::tempdir().unwrap(),
        })
    }

    /// Runs a Nix program with flakes enabled, a private store and cache, and no network.
    fn run(&self, program: &str, args: &[&str]) -> Output {
        let flakes = matches!(program, "nix");
        let mut cmd = Command::new(program);
        if flakes {
            cmd.arg("--store")
                .arg(self.real.store_root())
                .arg("--offline");
        }
        cmd.args(args)
            .env(
                "NIX_CONFIG",
                format!(
                    "{}experimental-features = nix-command flakes\n",
                    real_nix::NIX_CONFIG
                ),
            )
            // The evaluation and fetcher caches: private, so one run cannot answer for another.
            .env("XDG_CACHE_HOME", self.tmp.path().join("cache"))
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"))
    }

    /// Like [`Nix::run`], and the command must succeed; returns its standard output.
    fn ok(&self, program: &str, args: &[&str]) -> String {
        let out = self.run(program, args);
        assert!(
            out.status.success(),
            "{program} {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `nix-instantiate --eval --strict --json` of an expression.
    fn eval(&self, expr: &str) -> Result<Value, String> {
        let out = self.run(
            "nix-instantiate",
            &["--eval", "--strict", "--json", "--expr", expr],
        );
        if out.status.success() {
            Ok(serde_json::from_slice(&out.stdout).unwrap())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// A copy of the flake's files in a fresh directory, as `path:` flake reference.
    fn flake_copy(&self, name: &str) -> PathBuf {
        let dir = self.tmp.path().join(name);
        fs::create_dir_all(&dir).unwrap();
        for file in ["flake.nix", "flake.lock", "Cargo.toml"] {
            fs::copy(Path::new(REPO).join(file), dir.join(file)).unwrap();
        }
        for sub in ["modules", "templates"] {
            copy_tree(&Path::new(REPO).join(sub), &dir.join(sub));
        }
        dir
    }
}

fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Writes `ir` to a file and returns `mvm ir digest` of it, after `mvm ir validate` accepts it.
fn validated_digest(dir: &Path, label: &str, ir: &Value) -> String {
    let file = dir.join(format!("{label}.json"));
    fs::write(&file, serde_json::to_vec(ir).unwrap()).unwrap();
    digest_of(dir, &file)
}

fn digest_of(dir: &Path, file: &Path) -> String {
    let home = dir.join("state");
    let file = file.to_str().unwrap();
    let valid = support::mvm_json(&home, &["ir", "validate", file], 0);
    assert_eq!(valid["ok"], true, "{valid}");
    let digest = support::mvm_json(&home, &["ir", "digest", file], 0);
    assert_eq!(digest["ir_digest"], valid["ir_digest"]);
    digest["ir_digest"].as_str().unwrap().to_string()
}

fn mk_workload(spec: &str) -> String {
    format!("((import {REPO}/modules).mkWorkload ({spec}))")
}

/// Every `.nix` file under `dir`, skipping build output and VCS data.
fn nix_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let path = entry.path();
        let name = entry.file_name();
        if entry.file_type().unwrap().is_dir() {
            if !matches!(
                name.to_str(),
                Some(".git" | "target" | "corpus" | "artifacts")
            ) {
                nix_files(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "nix") {
            out.push(path);
        }
    }
}

#[test]
fn every_nix_file_in_the_repository_parses() {
    let Some(nix) = Nix::find() else { return };
    let mut files = Vec::new();
    nix_files(Path::new(REPO), &mut files);
    files.sort();
    let rel: Vec<_> = files
        .iter()
        .map(|f| f.strip_prefix(REPO).unwrap().to_str().unwrap().to_string())
        .collect();
    // The search finds what is known to be there, so it cannot pass by finding nothing.
    for known in [
        "flake.nix",
        "modules/default.nix",
        "modules/mk-workload.nix",
        "templates/nix/flake.nix",
        "templates/nix/workload.nix",
        "templates/python/flake.nix",
    ] {
        assert!(rel.iter().any(|r| r == known), "{known} not found: {rel:?}");
    }
    let failures: Vec<String> = files
        .iter()
        .filter_map(|file| {
            let out = nix.run("nix-instantiate", &["--parse", file.to_str().unwrap()]);
            (!out.status.success()).then(|| {
                format!(
                    "{}: {}",
                    file.display(),
                    String::from_utf8_lossy(&out.stderr)
                )
            })
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // And a file that does not parse is found out.
    let broken = nix.tmp.path().join("broken.nix");
    fs::write(&broken, "{ a = 1; ").unwrap();
    assert!(!nix
        .run("nix-instantiate", &["--parse", broken.to_str().unwrap()])
        .status
        .success());
}

#[test]
fn mk_workload_gives_the_ir_of_the_hand_written_example() {
    let Some(nix) = Nix::find() else { return };
    let spec = r#"{
      name = "hello";
      image = {
        reference = "127.0.0.1:5000/busybox";
        digest = "sha256:9e2bbca079387d7965c3a9cee6d0c53f4f4e63ff7637877a83c4c05f2a666112";
      };
      entrypoint = [ "/bin/echo" "hi" ];
      env.GREETING = "hi";
      secrets.API_KEY = "api-key";
      network = { mode = "none"; egress.allowlist = [ "api.example.com:443" ]; };
    }"#;
    let ir = nix.eval(&format!("{}.ir", mk_workload(spec))).unwrap();
    // The `app` is named "main", as in the example.
    assert_eq!(ir["apps"][0]["name"], "main");
    let tmp = nix.tmp.path();
    let ours = validated_digest(tmp, "hello", &ir);
    let example = Path::new(REPO).join("examples/hello");
    assert_eq!(ours, digest_of(tmp, &example.join("mvm.toml")));
    assert_eq!(ours, digest_of(tmp, &example.join("workload.json")));

    // `json` is the same document as a string.
    let json = nix.eval(&format!("{}.json", mk_workload(spec))).unwrap();
    let reparsed: Value = serde_json::from_str(json.as_str().unwrap()).unwrap();
    assert_eq!(reparsed, ir);
}

/// Every attribute mkWorkload maps, and every shortcut, against the IR written out by hand.
#[test]
fn mk_workload_maps_every_field_and_shortcut() {
    let Some(nix) = Nix::find() else { return };
    let spec = r#"{
      name = "shop";
      profile = "dev";
      volumes = [ { name = "data"; size_mb = 64; } ];
      apps = [
        {
          name = "web";
          source = { path = "./web"; };
          packages = [ "nodejs" "python3Packages.requests" ];
          entrypoints = [
            { kind = "service"; name = "web"; command = [ "node" "server.js" ]; restart = "always"; }
            { command = [ "node" "-v" ]; cwd = "/srv"; }
          ];
          resources = { cpu_cores = 2; memory_mb = 1024; rootfs_size_mb = 512; };
          env = { A = "1"; };
          secrets = { TOKEN = "shop-token"; MAYBE = { name = "opt-secret"; optional = true; }; };
          network = {
            egress.allowlist = [ "api.example.com:443" { host = "*.example.org"; port = 8443; } ];
            ports = [ 8080 { guest = 9090; host = 19090; } ];
          };
          mounts = [ { volume = "data"; target = "/data"; read_only = true; } ];
          files = [ { path = "/etc/shop.conf"; content = "x=1\n"; mode = "0600"; } ];
          health_check = {
            http = { port = 8080; path = "/health"; };
            interval_s = 5; timeout_s = 2; retries = 3; start_period_s = 10;
          };
          threat_tier = "trusted";
        }
        {
          name = "job";
          source = { url = "https://example.com/job.git"; rev = "0123456789abcdef0123456789abcdef01234567"; };
          image = { reference = "registry.example/job"; digest = "sha256:0000000000000000000000000000000000000000000000000000000000000000"; };
          entrypoint = [ "/job" ];
          cwd = "/work";
        }
      ];
    }"#;
    let by_hand = serde_json::json!({
      "schema_version": "0", "id": "shop",
      "volumes": [{"name": "data", "size_mb": 64}],
      "apps": [
        {"name": "web", "source": {"kind": "path", "path": "./web"},
         "image": {"kind": "nix_packages", "packages": ["nodejs", "python3Packages.requests"]},
         "entrypoints": [{"kind": "service", "name": "web", "command": ["node", "server.js"],
                          "restart": "always"},
                         {"kind": "command", "command": ["node", "-v"], "cwd": "/srv"}],
         "resources": {"cpu_cores": 2, "memory_mb": 1024, "rootfs_size_mb": 512},
         "env": {"A": {"kind": "literal", "value": "1"},
                 "TOKEN": {"kind": "secret_ref", "name": "shop-token"},
                 "MAYBE": {"kind": "secret_ref", "name": "opt-secret", "optional": true}},
         "network": {"mode": "allowlist",
                     "egress": {"allowlist": [{"host": "api.example.com", "port": 443},
                                              {"host": "*.example.org", "port": 8443}]},
                     "ports": [{"guest": 8080}, {"guest": 9090, "host": 19090}]},
         "mounts": [{"volume": "data", "target": "/data", "read_only": true}],
         "files": [{"path": "/etc/shop.conf", "content": "x=1\n", "mode": "0600"}],
         "health_check": {"http": {"port": 8080, "path": "/health"}, "interval_s": 5,
                          "timeout_s": 2, "retries": 3, "start_period_s": 10},
         "threat_tier": "trusted"},
        {"name": "job",
         "source": {"kind": "git", "url": "https://example.com/job.git",
                    "rev": "0123456789abcdef0123456789abcdef01234567"},
         "image": {"kind": "oci_base", "reference": "registry.example/job",
                   "digest": "sha256:0000000000000000000000000000000000000000000000000000000000000000"},
         "entrypoints": [{"kind": "command", "command": ["/job"], "cwd": "/work"}],
         "resources": {"cpu_cores": 1, "memory_mb": 256}}
      ]
    });
    let result = nix.eval(&mk_workload(spec)).unwrap();
    assert_eq!(result["ir"], by_hand);
    let tmp = nix.tmp.path();
    assert_eq!(
        validated_digest(tmp, "ours", &result["ir"]),
        validated_digest(tmp, "by-hand", &by_hand)
    );
    assert_eq!(result["profile"], "dev");
    assert_eq!(result["buildArgs"], serde_json::json!(["--profile", "dev"]));
    assert_eq!(
        result["packages"],
        serde_json::json!({"web": ["nodejs", "python3Packages.requests"]})
    );
    // Without pkgs there are no derivations.
    assert!(result.get("roots").is_none() && result.get("workloadJson").is_none());
}

#[test]
fn mk_workload_refuses_what_the_ir_would_not_carry() {
    let Some(nix) = Nix::find() else { return };
    let base = r#"name = "w"; packages = [ "hello" ]; entrypoint = [ "hello" ];"#;
    for (extra, expected) in [
        ("memory = 512;", "unknown attribute(s) memory"),
        (
            "resources.memory = 512;",
            "app.resources: unknown attribute(s) memory",
        ),
        (
            "image = { reference = \"r.example/x\"; digest = \"sha256:00\"; };",
            "either packages (Nix) or image (OCI)",
        ),
        (
            "env.A = \"1\"; secrets.A = \"a\";",
            "A given in both env and secrets",
        ),
        ("env.A = 1;", "app.env.A: expected a string, got a int"),
        (
            "network.egress.allowlist = [ \"example.com\" ];",
            "example.com is not host:port",
        ),
        (
            "profile = \"lax\";",
            "lax is not one of restrictive, standard, dev, permissive",
        ),
        (
            "apps = [ ];",
            "with apps, give packages, entrypoint inside each app",
        ),
        ("entrypoints = [ ];", "either entrypoint or entrypoints"),
    ] {
        let err = nix
            .eval(&format!(
                "{}.ir",
                mk_workload(&format!("{{ {base} {extra} }}"))
            ))
            .expect_err(extra);
        assert!(err.contains(expected), "{extra}: {err}");
    }
    // The base itself is accepted: the refusals above are the extras'.
    nix.eval(&format!("{}.ir", mk_workload(&format!("{{ {base} }}"))))
        .unwrap();
}

/// The derivation half needs nixpkgs, which cannot be fetched here: it is evaluated against a
/// stub `pkgs` whose functions return their arguments. This shows how package attribute paths
/// are resolved and what each derivation is given — not that nixpkgs builds it.
#[test]
fn mk_workload_derivations_against_a_stub_pkgs() {
    let Some(nix) = Nix::find() else { return };
    let stub = r#"{
      writeText = name: text: { outPath = "/stub/${name}"; inherit name text; };
      buildEnv = args: { buildEnv = args; };
      runCommand = name: env: script: { runCommand = { inherit name script; }; };
      python3 = "python3-drv";
      python3Packages.requests = "requests-drv";
    }"#;
    let spec = |packages: &str| {
        format!(
            r#"{{ name = "tool"; packages = {packages}; entrypoint = [ "python3" ];
                 pkgs = {stub}; mvm = "mvm-drv"; }}"#
        )
    };
    let w = mk_workload(&spec(r#"[ "python3" "python3Packages.requests" ]"#));
    let result = nix
        .eval(&format!(
            "let w = {w}; in {{ inherit (w) workloadJson roots check json; }}"
        ))
        .unwrap();
    // A set with an outPath is written as that path in JSON, as a derivation is.
    assert_eq!(result["workloadJson"], "/stub/tool-workload.json");
    let text = nix.eval(&format!("({w}).workloadJson.text")).unwrap();
    assert_eq!(text, result["json"]);
    assert_eq!(
        result["roots"]["main"]["buildEnv"],
        serde_json::json!({"name": "mvm-tool-main-root", "paths": ["python3-drv", "requests-drv"]})
    );
    let script = result["check"]["runCommand"]["script"].as_str().unwrap();
    assert!(
        script.contains("mvm ir validate /stub/tool-workload.json"),
        "{script}"
    );

    let err = nix
        .eval(&format!(
            "{}.roots",
            mk_workload(&spec(r#"[ "python3Packages.nope" ]"#))
        ))
        .unwrap_err();
    assert!(
        err.contains("nixpkgs has no python3Packages.nope (no attribute nope)"),
        "{err}"
    );
    // The IR half never touches pkgs: a pkgs that fails when used still gives the IR.
    let ir = nix
        .eval(&format!(
            r#"((import {REPO}/modules).mkWorkload {{ name = "t"; packages = [ "x" ]; entrypoint = [ "x" ]; pkgs = throw "pkgs used"; }}).ir"#
        ))
        .unwrap();
    assert_eq!(ir["id"], "t");
}

#[test]
fn flake_lock_locks_the_flake_inputs() {
    let Some(nix) = Nix::find() else { return };
    let flake = nix.flake_copy("mvm");
    let reference = format!("path:{}", flake.display());
    let meta: Value = serde_json::from_str(&nix.ok(
        "nix",
        &[
            "flake",
            "metadata",
            "--json",
            "--no-update-lock-file",
            &reference,
        ],
    ))
    .unwrap();
    let nixpkgs = &meta["locks"]["nodes"]["nixpkgs"];
    assert_eq!(nixpkgs["locked"]["type"], "github");
    assert_eq!(nixpkgs["original"]["ref"], "nixos-25.11");
    assert_eq!(nixpkgs["locked"]["rev"].as_str().unwrap().len(), 40);

    // The check is real: an input the lock does not match is refused (offline, it cannot be
    // locked anew).
    let text = fs::read_to_string(flake.join("flake.nix")).unwrap();
    fs::write(
        flake.join("flake.nix"),
        text.replace("nixos-25.11", "nixos-24.05"),
    )
    .unwrap();
    let stale = nix.run(
        "nix",
        &[
            "flake",
            "metadata",
            "--json",
            "--no-update-lock-file",
            &reference,
        ],
    );
    assert!(!stale.status.success());
}

#[test]
fn flake_templates_and_lib_evaluate() {
    let Some(nix) = Nix::find() else { return };
    let flake = nix.flake_copy("mvm");
    let reference = format!("path:{}", flake.display());
    let templates: Value = serde_json::from_str(&nix.ok(
        "nix",
        &["eval", "--json", &format!("{reference}#templates")],
    ))
    .unwrap();
    let listed = support::mvm_json(&nix.tmp.path().join("state"), &["init", "--list"], 0);
    let listed = listed["templates"].as_array().unwrap();
    // One template per directory of templates/, described as `mvm init --list` describes it.
    let mut dirs: Vec<String> = fs::read_dir(Path::new(REPO).join("templates"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    dirs.sort();
    let mut names: Vec<&String> = templates.as_object().unwrap().keys().collect();
    names.retain(|n| *n != "default");
    assert_eq!(names, dirs.iter().collect::<Vec<_>>());
    assert_eq!(listed.len(), dirs.len());
    for t in listed {
        let name = t["name"].as_str().unwrap();
        assert_eq!(templates[name]["description"], t["description"], "{name}");
        let path = templates[name]["path"].as_str().unwrap();
        assert!(path.ends_with(&format!("-{name}")), "{path}");
    }
    assert_eq!(templates["default"], templates["python"]);

    // lib.mkWorkload is modules' mkWorkload.
    let spec = r#"{ name = "x"; packages = [ "hello" ]; entrypoint = [ "hello" ]; }"#;
    let via_flake: Value = serde_json::from_str(&nix.ok(
        "nix",
        &[
            "eval",
            "--json",
            "--apply",
            &format!("f: (f {spec}).ir"),
            &format!("{reference}#lib.mkWorkload"),
        ],
    ))
    .unwrap();
    assert_eq!(
        via_flake,
        nix.eval(&format!("{}.ir", mk_workload(spec))).unwrap()
    );
}

/// Each template's own flake, with this flake as its `mvm` input, evaluates to the IR of its
/// declaration: for mvm.toml templates, the digest of mvm.toml itself.
#[test]
fn template_flakes_evaluate_with_this_flake_as_mvm() {
    let Some(nix) = Nix::find() else { return };
    let mvm = nix.flake_copy("mvm");
    let tmp = nix.tmp.path();
    for entry in fs::read_dir(Path::new(REPO).join("templates")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        let dir = tmp.join(format!("template-{name}"));
        copy_tree(&Path::new(REPO).join("templates").join(&name), &dir);
        let json = nix.ok(
            "nix",
            &[
                "eval",
                "--raw",
                "--no-write-lock-file",
                "--override-input",
                "mvm",
                &format!("path:{}", mvm.display()),
                &format!("path:{}#workloads.default.json", dir.display()),
            ],
        );
        let ir: Value = serde_json::from_str(&json).unwrap();
        let digest = validated_digest(tmp, &name, &ir);
        let toml = dir.join("mvm.toml");
        if toml.exists() {
            assert_eq!(digest, digest_of(tmp, &toml), "{name}");
        } else {
            let direct = nix
                .eval(&format!(
                    "{}.ir",
                    mk_workload(&format!("import {}/workload.nix", dir.display()))
                ))
                .unwrap();
            assert_eq!(ir, direct, "{name}");
        }
    }
}

/// `mvm ir validate` and `mvm ir digest` read a workload.nix, evaluated with the mkWorkload
/// built into mvm: the same digest as evaluating it with `modules/`, refusals with their codes.
#[test]
fn mvm_reads_workload_nix_declarations() {
    let Some(nix) = Nix::find() else { return };
    let tmp = nix.tmp.path();
    let home = tmp.join("state");
    let template = Path::new(REPO).join("templates/nix/workload.nix");
    let direct = nix
        .eval(&format!(
            "{}.ir",
            mk_workload(&format!("import {}", template.display()))
        ))
        .unwrap();
    let via_mvm = support::mvm_json(&home, &["ir", "digest", template.to_str().unwrap()], 0);
    assert_eq!(
        via_mvm["ir_digest"].as_str().unwrap(),
        validated_digest(tmp, "direct", &direct)
    );

    let write = |name: &str, text: &str| {
        let path = tmp.join(name);
        fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let base = r#"name = "x"; packages = [ "a" ]; entrypoint = [ "a" ];"#;
    for (name, text, status, code) in [
        (
            "typo.nix",
            format!("{{ {base} memory = 1; }}"),
            65,
            "NIXDECL002",
        ),
        ("syntax.nix", "{ name = ".to_string(), 65, "NIXDECL002"),
        (
            "permissive.nix",
            format!("{{ {base} profile = \"permissive\"; }}"),
            65,
            "NIXDECL003",
        ),
        (
            "bad-id.nix",
            r#"{ name = "X"; packages = [ "a" ]; entrypoint = [ "a" ]; }"#.to_string(),
            65,
            "IR000",
        ),
    ] {
        let file = write(name, &text);
        let refused = support::mvm_json(&home, &["ir", "validate", &file], status);
        assert_eq!(refused["error"]["code"], code, "{name}: {refused}");
    }
    let typo = write("typo2.nix", &format!("{{ {base} memory = 1; }}"));
    let refused = support::mvm_json(&home, &["ir", "validate", &typo], 65);
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(message.contains("unknown attribute(s) memory"), "{message}");
}
