//! `mvm doctor` on this host, against state directories of its own: every row and the exit
//! status, with the real QEMU and the real `/dev/kvm`.

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use serde_json::Value;

mod support;

/// What `mvm doctor` printed and its exit status.
struct Report {
    status: i32,
    doc: Value,
}

impl Report {
    fn row(&self, name: &str) -> &Value {
        self.rows(name)
            .first()
            .copied()
            .unwrap_or_else(|| panic!("no {name} row in {:#}", self.doc))
    }

    fn rows(&self, name: &str) -> Vec<&Value> {
        self.doc["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["name"] == name)
            .collect()
    }

    fn status_of(&self, name: &str) -> &str {
        self.row(name)["status"].as_str().unwrap()
    }

    fn finding(&self, name: &str) -> &str {
        self.row(name)["finding"].as_str().unwrap()
    }

    fn fix(&self, name: &str) -> Option<&str> {
        self.row(name)["fix"].as_str()
    }
}

/// `mvm doctor` with `MVM_HOME=home` and `env` (and no `MVM_QEMU`/`MVM_AGENT` from outside).
fn doctor_command(home: &Path, env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mvm"));
    cmd.arg("doctor")
        .env("MVM_HOME", home)
        .env_remove("MVM_QEMU")
        .env_remove("MVM_AGENT");
    for (key, value) in env {
        cmd.env(key, value);
    }
    cmd
}

/// `mvm doctor --json`, parsed.
fn doctor(home: &Path, env: &[(&str, &str)]) -> Report {
    let out = doctor_command(home, env).arg("--json").output().unwrap();
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let status = out.status.code().unwrap();
    assert_eq!(doc["ok"], status == 0, "{doc:#}");
    Report { status, doc }
}

/// The smallest x86-64 ELF executable header with no program interpreter: what a static
/// binary looks like to the agent check.
fn static_elf(path: &Path) {
    let mut bytes = vec![0u8; 64];
    bytes[..6].copy_from_slice(b"\x7fELF\x02\x01");
    bytes[0x12] = 62;
    fs::write(path, bytes).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// A stored kernel: a stand-in bzImage and a release whose guest modules are all built in.
fn fetch_kernel(home: &Path, scratch: &Path) {
    let release = scratch.join("6.1.0-99-test");
    fs::create_dir_all(&release).unwrap();
    let builtin: String = mvm_builder::kernel::GUEST_MODULES
        .iter()
        .map(|m| format!("kernel/drivers/{m}.ko\n"))
        .collect();
    fs::write(release.join("modules.builtin"), builtin).unwrap();
    let vmlinuz = scratch.join("vmlinuz");
    fs::write(&vmlinuz, b"not really a bzImage").unwrap();
    support::mvm_json(
        home,
        &[
            "kernel",
            "fetch",
            "--vmlinuz",
            vmlinuz.to_str().unwrap(),
            "--modules",
            release.to_str().unwrap(),
        ],
        0,
    );
}

fn version_at_least_7_2(version: &str) -> bool {
    let numbers: Vec<u32> = version.split('.').map(|n| n.parse().unwrap()).collect();
    (numbers[0], numbers[1]) >= (7, 2)
}

#[test]
fn an_empty_home_on_this_host() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("state");
    let report = doctor(&home, &[]);

    // Virtualization: these machines are PVM, where auto must pick QEMU with TCG.
    if Path::new("/sys/module/kvm_pvm").exists() {
        assert_eq!(report.doc["backend"]["virtualization"], "pvm");
        assert_eq!(report.status_of("virtualization"), "ok");
        assert!(
            report.finding("virtualization").contains("PVM (kvm_pvm)"),
            "{}",
            report.finding("virtualization")
        );
        assert_eq!(report.doc["backend"]["backend"], "qemu");
        assert_eq!(report.doc["backend"]["accel"], "tcg");
    } else {
        println!(
            "SKIPPED the PVM assertion: /sys/module/kvm_pvm is absent, this host reports {}",
            report.doc["backend"]["virtualization"]
        );
    }

    // QEMU: installed by scripts/deps.
    assert_eq!(report.status_of("qemu"), "ok", "{}", report.finding("qemu"));
    let version = report.doc["backend"]["qemu"]["version"].as_str().unwrap();
    assert!(version_at_least_7_2(version), "QEMU {version}");
    assert!(report.finding("qemu").contains(version));

    assert_eq!(report.status_of("guest-kernel"), "fail");
    assert_eq!(report.fix("guest-kernel"), Some("mvm kernel fetch"));
    assert!(report.finding("guest-kernel").starts_with("KERNEL004"));
    assert_eq!(report.status_of("state-dir"), "ok");
    assert!(report.finding("state-dir").contains("does not exist yet"));
    assert_eq!(report.status_of("signing-key"), "warn");
    assert_eq!(report.fix("signing-key"), Some("mvm keys generate"));
    assert_eq!(report.status_of("registry"), "ok");
    assert!(report.finding("registry").starts_with("none configured"));
    assert_eq!(report.status, 1);
    // The doctor only reads: the state directory is still not there.
    assert!(!home.exists());

    // The same, for people: an aligned table with the fix under its row.
    let out = doctor_command(&home, &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("CHECK"), "{text}");
    let column = lines[0].find("STATUS").unwrap();
    let kernel = lines
        .iter()
        .position(|l| l.starts_with("guest-kernel"))
        .unwrap();
    assert_eq!(&lines[kernel][column..column + 4], "fail", "{text}");
    assert_eq!(
        lines[kernel + 1].trim_start(),
        "fix: mvm kernel fetch",
        "{text}"
    );
    assert!(text.contains("1 failed"), "{text}");
}

#[test]
fn a_ready_home_passes_and_a_tampered_kernel_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("state");
    // The fetch's audit entry is signed with the host key, which it generates.
    fetch_kernel(&home, tmp.path());
    let agent = tmp.path().join("mvm-agent");
    static_elf(&agent);
    let env = [("MVM_AGENT", agent.to_str().unwrap())];

    let report = doctor(&home, &env);
    for row in report.doc["checks"].as_array().unwrap() {
        assert_eq!(row["status"], "ok", "{row}");
        assert!(row["fix"].is_null(), "{row}");
    }
    assert_eq!(report.status, 0);
    assert!(report.finding("guest-kernel").starts_with("6.1.0-99-test"));
    assert!(report.finding("guest-agent").starts_with("static x86-64"));

    // `mvm build` takes its agent from the same place (`--agent` > `$MVM_AGENT` > next to mvm).
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/hello");
    let out = Command::new(env!("CARGO_BIN_EXE_mvm"))
        .args(["--json", "build", example.to_str().unwrap()])
        .args(["--out", tmp.path().join("bundle").to_str().unwrap()])
        .env("MVM_HOME", &home)
        .env("MVM_AGENT", "/nonexistent/mvm-agent")
        .output()
        .unwrap();
    let refused: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(refused["error"]["code"], "BUILD008", "{refused:#}");
    assert!(refused["error"]["message"]
        .as_str()
        .unwrap()
        .contains("/nonexistent/mvm-agent"));

    // A stored kernel file changed on disk is caught by its pin.
    fs::write(home.join("kernels/6.1.0-99-test/vmlinuz"), b"changed").unwrap();
    let report = doctor(&home, &env);
    assert_eq!(report.status_of("guest-kernel"), "fail");
    assert!(report.finding("guest-kernel").starts_with("KERNEL005"));
    assert_eq!(report.fix("guest-kernel"), Some("mvm kernel fetch"));
    assert_eq!(report.status, 1);
}

#[test]
fn a_writable_state_dir_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("state");
    fs::create_dir_all(home.join("keys")).unwrap();
    fs::set_permissions(home.join("keys"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::set_permissions(&home, fs::Permissions::from_mode(0o777)).unwrap();
    let report = doctor(&home, &[]);
    assert_eq!(report.status_of("state-dir"), "fail");
    assert_eq!(
        report.fix("state-dir"),
        Some(format!("chmod 700 {}", home.display()).as_str())
    );
    assert!(report.finding("state-dir").contains("mode 0777"));
    assert_eq!(report.status, 1);

    // The home fixed, a keys directory others can read still fails.
    fs::set_permissions(&home, fs::Permissions::from_mode(0o700)).unwrap();
    fs::set_permissions(home.join("keys"), fs::Permissions::from_mode(0o755)).unwrap();
    let report = doctor(&home, &[]);
    assert_eq!(report.status_of("state-dir"), "fail");
    assert_eq!(
        report.fix("state-dir"),
        Some(format!("chmod 700 {}", home.join("keys").display()).as_str())
    );
}

#[test]
fn a_missing_qemu_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let report = doctor(&tmp.path().join("state"), &[("MVM_QEMU", "/nonexistent")]);
    assert_eq!(report.status_of("qemu"), "fail");
    assert!(report.finding("qemu").starts_with("RUN011"));
    assert!(report.finding("qemu").contains("MVM_QEMU=/nonexistent"));
    assert_eq!(report.fix("qemu"), Some("apt-get install qemu-system-x86"));
    assert_eq!(report.doc["backend"]["error"]["code"], "RUN011");
    assert!(report.doc["backend"]["qemu"].is_null());
    assert_eq!(report.status, 1);
}

#[test]
fn a_qemu_older_than_7_2_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let qemu = tmp.path().join("qemu-system-x86_64");
    // Written by a child process: a file this (multi-threaded) test process held open for
    // writing could fail to execute with ETXTBSY.
    let made = Command::new("sh")
        .arg("-c")
        .arg(r#"printf 'QEMU emulator version 6.2.0 (Debian 1:6.2+dfsg-2ubuntu6)\n' > "$0.tmp"; printf '#!/bin/sh\ncat "%s"\n' "$0.tmp" > "$0"; chmod 755 "$0""#)
        .arg(&qemu)
        .status()
        .unwrap();
    assert!(made.success());
    let report = doctor(
        &tmp.path().join("state"),
        &[("MVM_QEMU", qemu.to_str().unwrap())],
    );
    assert_eq!(report.status_of("qemu"), "fail");
    assert!(
        report.finding("qemu").starts_with("RUN012"),
        "{}",
        report.finding("qemu")
    );
    assert!(report.finding("qemu").contains("QEMU 6.2.0"));
    assert_eq!(report.fix("qemu"), Some("apt-get install qemu-system-x86"));
    assert_eq!(report.doc["backend"]["error"]["code"], "RUN012");
}

#[test]
fn a_state_dir_of_another_user_fails() {
    let me = fs::metadata("/proc/self").unwrap().uid();
    if me != 0 {
        println!("SKIPPED: giving a directory to another user needs root (uid {me})");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("state");
    fs::create_dir(&home).unwrap();
    fs::set_permissions(&home, fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&home, Some(65534), None).unwrap();
    let report = doctor(&home, &[]);
    assert_eq!(report.status_of("state-dir"), "fail");
    assert!(report.finding("state-dir").contains("owned by uid 65534"));
    assert_eq!(
        report.fix("state-dir"),
        Some(format!("sudo chown 0 {}", home.display()).as_str())
    );
}

#[test]
fn the_agent_must_be_a_static_binary() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("state");
    let build = "RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build -p mvm-agent --release --target x86_64-unknown-linux-gnu";
    let missing = doctor(&home, &[("MVM_AGENT", "/nonexistent/mvm-agent")]);
    assert_eq!(missing.status_of("guest-agent"), "warn");
    assert!(missing
        .finding("guest-agent")
        .contains("/nonexistent/mvm-agent"));
    assert_eq!(missing.fix("guest-agent"), Some(build));
    // /bin/sh is dynamically linked on Debian.
    let dynamic = doctor(&home, &[("MVM_AGENT", "/bin/sh")]);
    assert_eq!(dynamic.status_of("guest-agent"), "warn");
    assert!(dynamic
        .finding("guest-agent")
        .contains("dynamically linked"));
    assert_eq!(dynamic.fix("guest-agent"), Some(build));
}

#[test]
fn signing_key_states() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("state");
    support::mvm_json(&home, &["keys", "generate"], 0);
    let report = doctor(&home, &[]);
    assert_eq!(report.status_of("signing-key"), "ok");
    let key = home.join("keys/default.key");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let report = doctor(&home, &[]);
    assert_eq!(report.status_of("signing-key"), "fail");
    assert!(report.finding("signing-key").starts_with("KEY004"));
    assert_eq!(
        report.fix("signing-key"),
        Some(format!("chmod 600 {}", key.display()).as_str())
    );
    fs::write(&key, "not a key").unwrap();
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    let report = doctor(&home, &[]);
    assert_eq!(report.status_of("signing-key"), "fail");
    assert!(report.finding("signing-key").starts_with("KEY005"));
    assert_eq!(
        report.fix("signing-key"),
        Some(format!("mv {0} {0}.bad && mvm keys generate", key.display()).as_str())
    );
}

#[test]
fn configured_registries_are_probed_over_tcp() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("state");
    fs::create_dir_all(&home).unwrap();
    fs::set_permissions(&home, fs::Permissions::from_mode(0o700)).unwrap();
    let listening = TcpListener::bind("127.0.0.1:0").unwrap();
    let open = listening.local_addr().unwrap();
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    fs::write(
        home.join("config.toml"),
        format!("[registries]\ninsecure = [\"{open}\", \"{closed}\"]\n"),
    )
    .unwrap();
    let report = doctor(&home, &[]);
    let rows = report.rows("registry");
    assert_eq!(rows.len(), 2, "{:#}", report.doc);
    assert_eq!(rows[0]["status"], "ok", "{}", rows[0]);
    assert!(rows[0]["finding"]
        .as_str()
        .unwrap()
        .starts_with(&open.to_string()));
    assert_eq!(rows[1]["status"], "warn", "{}", rows[1]);
    assert!(
        rows[1]["finding"]
            .as_str()
            .unwrap()
            .contains("cannot connect"),
        "{}",
        rows[1]
    );

    fs::write(home.join("config.toml"), "[registries]\nmirrors = 1\n").unwrap();
    let report = doctor(&home, &[]);
    assert_eq!(report.status_of("registry"), "fail");
    assert!(report.finding("registry").starts_with("INPUT003"));
    assert!(report.finding("registry").contains("config.toml"));
}
