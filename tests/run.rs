//! `mvm run` end to end: real Linux guests (the Debian cloud kernel) booted by `mvm-runner`
//! under QEMU (TCG here), the root opened through dm-verity by the guest agent, commands run
//! over the virtio-console channel.
//!
//! One image serves every test: busybox, plus `/data/canary.bin` (64 KiB that occur nowhere
//! else) for reading back and for flipping bytes. QEMU is started through a wrapper that
//! records every start, so that refusals can show that no VM process was spawned. Boots run one
//! at a time: the hosts have two cores.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard, OnceLock};

use base64::Engine as _;
use serde_json::Value;
use sha2::{Digest, Sha256};

mod support;

use support::bundle::{self, copy_dir, find, flip_byte};
use support::guest;
use support::wait::{eventually, EVENTUALLY};
use support::{describe, text};

struct Fixture {
    _work: tempfile::TempDir,
    home: PathBuf,
    /// The bundle every test may read but none may change (copy it first).
    bundle: PathBuf,
    /// `oci:DIR@sha256:…` of the image.
    image: String,
    canary: Vec<u8>,
    /// Where the wrapper records every start of QEMU, `--version` included.
    qemu_log: PathBuf,
    qemu_wrapper: PathBuf,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let (work, home) = support::home_with_kernel();

        let built = bundle::build(&home, work.path());
        let (bundle, image, canary) = (built.bundle, built.image, built.canary);

        let qemu = which("qemu-system-x86_64");
        let qemu_log = work.path().join("qemu-starts");
        let qemu_wrapper = work.path().join("qemu-wrapper");
        fs::write(
            &qemu_wrapper,
            format!(
                "#!/bin/sh\necho \"$$ $*\" >> '{}'\nexec '{}' \"$@\"\n",
                qemu_log.display(),
                qemu.display()
            ),
        )
        .unwrap();
        fs::set_permissions(
            &qemu_wrapper,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        Fixture {
            _work: work,
            home,
            bundle,
            image,
            canary,
            qemu_log,
            qemu_wrapper,
        }
    })
}

fn which(program: &str) -> PathBuf {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{program} is missing: .ci/run installs it (scripts/deps --test)"
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// One VM at a time.
fn turn() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(|e| e.into_inner())
}

fn qemu_starts() -> usize {
    fs::read_to_string(&fixture().qemu_log)
        .map(|log| log.lines().count())
        .unwrap_or(0)
}

/// `mvm ARGS` with the fixture's home (or `home`), runner and QEMU wrapper.
fn mvm_in(home: &Path, args: &[&str]) -> Output {
    mvm_command(home, args).output().unwrap()
}

/// The command `mvm_in` runs.
fn mvm_command(home: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mvm"));
    command
        .args(args)
        .env("MVM_HOME", home)
        .env("MVM_RUNNER", guest::runner())
        .env("MVM_AGENT", guest::static_agent())
        .env("MVM_QEMU", &fixture().qemu_wrapper);
    command
}

fn mvm(args: &[&str]) -> Output {
    mvm_in(&fixture().home, args)
}

fn plan_arg(bundle: &Path) -> String {
    bundle.join("plan.dsse.json").to_str().unwrap().to_string()
}

/// A private copy of the fixture's bundle, to change.
fn bundle_copy(dir: &Path) -> PathBuf {
    bundle::copy(&fixture().bundle, dir, "bundle")
}

fn plan_payload(bundle: &Path) -> Value {
    support::dsse_payload(&bundle.join("plan.dsse.json"))
}

/// The VM state directories under `home`.
fn vm_dirs(home: &Path) -> usize {
    fs::read_dir(home.join("vms")).map_or(0, |dir| dir.count())
}

/// Every audit entry in `home`, oldest first.
fn audit_entries(home: &Path) -> Vec<Value> {
    let mut entries = Vec::new();
    for entry in fs::read_dir(home.join("audit")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "jsonl") {
            for line in fs::read_to_string(path).unwrap().lines() {
                entries.push(serde_json::from_str(line).unwrap());
            }
        }
    }
    entries
}

#[test]
fn echo_hello_prints_hello_and_exits_0() {
    let _turn = turn();
    let plan = plan_arg(&fixture().bundle);
    let before = audit_entries(&fixture().home).len();
    let vms_before = vm_dirs(&fixture().home);
    let receipt_dir = tempfile::tempdir().unwrap();
    let receipt = receipt_dir.path().join("receipt.json");
    let receipt_arg = receipt.to_str().unwrap();
    let out = mvm(&[
        "run",
        "--plan",
        &plan,
        "--receipt",
        receipt_arg,
        "--",
        "echo",
        "hello",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(text(&out.stdout), "hello\n");
    // This run's entries (runs are one at a time): admitted, started, exited, one VM.
    let entries = audit_entries(&fixture().home).split_off(before);
    let events: Vec<&str> = entries
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        events,
        ["plan.admitted", "vm.started", "vm.exited"],
        "{entries:?}"
    );
    let vm = &entries[0]["fields"]["vm"];
    assert!(
        entries.iter().all(|e| &e["fields"]["vm"] == vm),
        "{entries:?}"
    );
    assert_eq!(entries[2]["fields"]["exit_status"], 0);
    // The signed receipt: this plan, this VM, the output by digest and size, never by value.
    let verified = mvm_ok_json(&["receipt", "verify", receipt_arg], 0);
    let r = &verified["receipt"];
    assert_eq!(r["vm"], entries[0]["fields"]["vm"], "{verified}");
    assert_eq!(r["plan_digest"], entries[0]["fields"]["plan_digest"]);
    assert_eq!(
        r["result"],
        serde_json::json!({"kind": "exited", "code": 0})
    );
    assert_eq!(r["stdout"]["bytes"], 6);
    let hello = format!("sha256:{:x}", Sha256::digest(b"hello\n"));
    assert_eq!(r["stdout"]["sha256"], hello.as_str());
    let argv = serde_json::to_vec(&["echo", "hello"]).unwrap();
    let argv_digest = format!("sha256:{:x}", Sha256::digest(&argv));
    assert_eq!(r["argv_sha256"], argv_digest.as_str());
    let envelope: Value = serde_json::from_slice(&fs::read(&receipt).unwrap()).unwrap();
    let payload = base64::engine::general_purpose::STANDARD
        .decode(envelope["payload"].as_str().unwrap())
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&payload).contains("hello"),
        "the receipt carries the command or its output"
    );
    flip_byte(&receipt, 150);
    let refused = mvm(&["receipt", "verify", receipt_arg]);
    assert_ne!(refused.status.code(), Some(0), "a flipped receipt verified");
    assert_eq!(
        vm_dirs(&fixture().home),
        vms_before,
        "the VM's state directory is left behind"
    );
    let verify = support::mvm_json(&fixture().home, &["audit", "verify"], 0);
    assert!(verify.to_string().contains("entries"), "{verify}");
}

#[test]
fn the_exit_status_is_the_commands_and_its_streams_stay_apart() {
    let _turn = turn();
    let plan = plan_arg(&fixture().bundle);
    let out = mvm(&[
        "--json",
        "run",
        "--plan",
        &plan,
        "--",
        "sh",
        "-c",
        "cat /data/canary.bin; echo to-stderr >&2; cat /etc/motd >&2; exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7), "{}", describe(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let stdout = base64::engine::general_purpose::STANDARD
        .decode(report["stdout"]["base64"].as_str().unwrap())
        .unwrap();
    assert!(stdout == fixture().canary, "the canary read back differs");
    assert_eq!(report["stderr"], "to-stderr\nfrom the image\n");
    assert_eq!(report["exit_status"], 7);
    assert_eq!(report["status"]["kind"], "exited");
    let guest = &report["timings_ms"]["guest"];
    assert!(guest["channel_ms"].as_u64().unwrap() >= guest["root_ms"].as_u64().unwrap());
}

#[test]
fn commands_run_as_an_unprivileged_user() {
    let _turn = turn();
    let plan = plan_arg(&fixture().bundle);
    let out = mvm(&[
        "run",
        "--plan",
        &plan,
        "--",
        "sh",
        "-c",
        "id -u; id -g; grep NoNewPrivs /proc/self/status; /bin/busybox ln /srv/secret.txt /tmp/link || echo no-link; cat /srv/secret.txt",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("1000\n1000\n"), "{stdout}");
    assert!(stdout.contains("NoNewPrivs:\t1"), "{stdout}");
    // No hard link to a root-only file either (fs.protected_hardlinks).
    assert!(stdout.contains("no-link"), "{stdout}");
    assert!(
        text(&out.stderr).contains("Permission denied"),
        "{}",
        describe(&out)
    );
}

#[test]
fn a_command_past_its_timeout_exits_124() {
    let _turn = turn();
    let plan = plan_arg(&fixture().bundle);
    let out = mvm(&[
        "run",
        "--plan",
        &plan,
        "--timeout",
        "2s",
        "--",
        "sleep",
        "60",
    ]);
    assert_eq!(out.status.code(), Some(124), "{}", describe(&out));
}

#[test]
fn plans_are_refused_before_any_vm_process_starts() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let expect_refused = |plan: &str, home: &Path, what: &str, code_prefix: &str| {
        let _turn = turn();
        let before = qemu_starts();
        let vms_before = vm_dirs(home);
        let out = mvm_in(home, &["--json", "run", "--plan", plan, "--", "echo", "no"]);
        assert_eq!(out.status.code(), Some(120), "{what}: {}", describe(&out));
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        let code = report["error"]["code"].as_str().unwrap();
        assert!(code.starts_with(code_prefix), "{what}: {code}");
        assert_eq!(qemu_starts(), before, "{what}: QEMU was started");
        assert_eq!(vm_dirs(home), vms_before, "{what}: a VM directory was made");
        code.to_string()
    };

    // Unsigned: the signatures removed.
    let unsigned = bundle_copy(&subdir(dir.path(), "unsigned"));
    let mut envelope: Value =
        serde_json::from_slice(&fs::read(unsigned.join("plan.dsse.json")).unwrap()).unwrap();
    envelope["signatures"] = Value::Array(vec![]);
    fs::write(unsigned.join("plan.dsse.json"), envelope.to_string()).unwrap();
    expect_refused(&plan_arg(&unsigned), &f.home, "unsigned", "PLAN");

    // Tampered: more memory, the old signature.
    let tampered = bundle_copy(&subdir(dir.path(), "tampered"));
    let mut payload = plan_payload(&tampered);
    payload["resources"]["memory_mb"] = 4096.into();
    envelope = serde_json::from_slice(&fs::read(tampered.join("plan.dsse.json")).unwrap()).unwrap();
    envelope["payload"] = base64::engine::general_purpose::STANDARD
        .encode(payload.to_string())
        .into();
    fs::write(tampered.join("plan.dsse.json"), envelope.to_string()).unwrap();
    expect_refused(&plan_arg(&tampered), &f.home, "tampered", "PLAN");

    // Signed by a key this host does not trust: another home.
    let stranger = dir.path().join("stranger-home");
    expect_refused(&plan_arg(&f.bundle), &stranger, "untrusted", "PLAN");

    // Expired: re-signed with a one-second window.
    let expired = bundle_copy(&subdir(dir.path(), "expired"));
    let unsigned_plan = dir.path().join("plan.json");
    fs::write(&unsigned_plan, plan_payload(&expired).to_string()).unwrap();
    let signed = plan_arg(&expired);
    let sign = mvm(&[
        "plan",
        "sign",
        unsigned_plan.to_str().unwrap(),
        "--valid-for",
        "1s",
        "-o",
        &signed,
    ]);
    assert!(sign.status.success(), "{}", describe(&sign));
    std::thread::sleep(std::time::Duration::from_millis(2100));
    expect_refused(&signed, &f.home, "expired", "PLAN");

    // A kernel or an initramfs that is not the one pinned.
    for file in ["vmlinuz", "initramfs"] {
        let changed = bundle_copy(&subdir(dir.path(), file));
        flip_byte(&changed.join(file), 4096);
        let code = expect_refused(&plan_arg(&changed), &f.home, file, "RUN");
        assert_eq!(code, "RUN002", "{file}");
    }
}

#[test]
fn the_vm_dies_with_its_runner_and_its_socket_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let f = fixture();
    let _turn = turn();
    let before = qemu_starts();
    let mut runner = Command::new(guest::runner())
        .args(["--plan", &plan_arg(&f.bundle), "--", "sleep", "60"])
        .env("MVM_HOME", &f.home)
        .env("MVM_QEMU", &f.qemu_wrapper)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The wrapper logs "<pid> <args>" as it execs QEMU (the same pid); `--version` first.
    let qemu_pid = wait_for_qemu(before);
    let vm_dir = fs::read_dir(f.home.join("vms"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|dir| dir.join("agent.sock").exists())
        .expect("the running VM's directory");
    let mode = |path: &Path| fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&vm_dir), 0o700);
    assert_eq!(mode(&vm_dir.join("agent.sock")), 0o600);
    assert_eq!(mode(&vm_dir.join("kernel")), 0o600);

    runner.kill().unwrap();
    runner.wait().unwrap();
    let proc = Path::new("/proc").join(&qemu_pid);
    eventually("QEMU ends with its runner", EVENTUALLY, || {
        match proc.exists() {
            true => Err(format!("QEMU {qemu_pid} still runs")),
            false => Ok(()),
        }
    });
    // The killed runner could not clean up; this test's directory goes with the fixture.
    fs::remove_dir_all(vm_dir).unwrap();
}

/// Waits for the wrapper to log a VM start after the first `before` lines; returns QEMU's pid.
fn wait_for_qemu(before: usize) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let log = fs::read_to_string(&fixture().qemu_log).unwrap_or_default();
        let started = log
            .lines()
            .skip(before)
            .find(|line| line.contains("-M microvm"))
            .map(|line| line.split_whitespace().next().unwrap().to_string());
        if let Some(pid) = started {
            return pid;
        }
        assert!(std::time::Instant::now() < deadline, "QEMU never started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn a_stopped_run_tears_its_vm_down_and_says_so() {
    let f = fixture();
    let _turn = turn();
    let (before, vms_before) = (qemu_starts(), vm_dirs(&f.home));
    let audit_before = audit_entries(&f.home).len();
    let plan = plan_arg(&f.bundle);
    let run = mvm_command(&f.home, &["run", "--plan", &plan, "--", "sleep", "60"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let qemu_pid = wait_for_qemu(before);
    // SIGTERM to mvm alone: it passes it on to the runner.
    let status = Command::new("kill")
        .args(["-TERM", &run.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = run.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", describe(&out));
    assert!(text(&out.stderr).contains("RUN033"), "{}", describe(&out));
    assert!(
        !Path::new("/proc").join(&qemu_pid).exists(),
        "QEMU still runs"
    );
    assert_eq!(
        vm_dirs(&f.home),
        vms_before,
        "the VM's directory was left behind"
    );
    let entries = audit_entries(&f.home).split_off(audit_before);
    let exited = entries
        .iter()
        .find(|e| e["event"] == "vm.exited")
        .expect("vm.exited");
    assert_eq!(exited["fields"]["reason"], "RUN033", "{exited}");
}

#[test]
fn a_single_use_plan_runs_once_and_a_reusable_one_again() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let once = bundle_copy(dir.path());
    let unsigned_plan = dir.path().join("plan.json");
    fs::write(&unsigned_plan, plan_payload(&once).to_string()).unwrap();
    let signed = plan_arg(&once);
    let sign = mvm(&[
        "plan",
        "sign",
        unsigned_plan.to_str().unwrap(),
        "--single-use",
        "-o",
        &signed,
    ]);
    assert!(sign.status.success(), "{}", describe(&sign));

    let _turn = turn();
    let first = mvm(&["run", "--plan", &signed, "--", "echo", "once"]);
    assert_eq!(first.status.code(), Some(0), "{}", describe(&first));
    assert_eq!(text(&first.stdout), "once\n");
    let before = qemu_starts();
    let again = mvm(&["--json", "run", "--plan", &signed, "--", "echo", "twice"]);
    assert_eq!(again.status.code(), Some(120), "{}", describe(&again));
    let report: Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(report["error"]["code"], "PLAN009");
    assert_eq!(qemu_starts(), before);

    // The reusable plan of the other tests boots again and again; here once more.
    let reusable = mvm(&[
        "run",
        "--plan",
        &plan_arg(&f.bundle),
        "--",
        "cat",
        "/etc/motd",
    ]);
    assert_eq!(
        text(&reusable.stdout),
        "from the image\n",
        "{}",
        describe(&reusable)
    );
}

/// The first 4 KiB block of the image holding canary bytes, and where it starts.
fn canary_block(image: &[u8]) -> (usize, Vec<u8>) {
    bundle::canary_block(image, &fixture().canary)
}

/// Flips a byte in the canary's data in the bundle's image.
fn flip_canary_data(bundle: &Path) {
    bundle::flip_canary_data(bundle, &fixture().canary);
}

/// `mvm --json run [EXTRA…]` of `bundle`'s plan with `command`, which must end as an integrity
/// failure (exit 121, RUN020); returns the report.
fn run_expecting_integrity_failure(bundle: &Path, extra: &[&str], command: &[&str]) -> Value {
    let _turn = turn();
    let plan = plan_arg(bundle);
    let mut args = vec!["--json", "run", "--plan", &plan];
    args.extend_from_slice(extra);
    args.push("--");
    args.extend_from_slice(command);
    let out = mvm(&args);
    assert_eq!(out.status.code(), Some(121), "{}", describe(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["error"]["code"], "RUN020", "{report}");
    report
}

#[test]
fn a_flipped_byte_in_a_files_data_is_an_integrity_failure() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = bundle_copy(dir.path());
    flip_canary_data(&bundle);

    // Restored from the plan's boot snapshot, whose guest never read the canary: its first
    // read meets the flipped byte.
    let report = run_expecting_integrity_failure(&bundle, &[], &["cat", "/data/canary.bin"]);
    let log = fs::read_to_string(report["error"]["serial_log"].as_str().unwrap()).unwrap();
    assert!(log.contains("restored from boot snapshot"), "{log}");
}

#[test]
fn a_root_that_fails_verification_at_mount_is_an_integrity_failure() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = bundle_copy(dir.path());
    // The EROFS superblock lives in the first block: the mount itself reads a bad block. A
    // guest restored from the plan's boot snapshot mounted its root when it was made.
    flip_byte(&bundle.join("rootfs.erofs"), 1024 + 8);

    let report = run_expecting_integrity_failure(&bundle, &["--cold-boot"], &["echo", "never"]);
    assert!(
        report["error"]["message"]
            .as_str()
            .unwrap()
            .contains("AGENT007"),
        "{report}"
    );
    let log = report["error"]["serial_log"].as_str().unwrap();
    assert!(fs::read_to_string(log)
        .unwrap()
        .contains("mvm-agent: error AGENT007"));
}

#[test]
fn a_flipped_byte_in_the_hash_tree_is_an_integrity_failure() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = bundle_copy(dir.path());
    let plan = plan_payload(&bundle);
    let salt = hex(plan["rootfs"]["verity"]["salt"].as_str().unwrap());
    let (_, block) = canary_block(&fs::read(bundle.join("rootfs.erofs")).unwrap());
    // dm-verity's leaf hash of that block: sha256(salt || block).
    let leaf: Vec<u8> = Sha256::new()
        .chain_update(&salt)
        .chain_update(&block)
        .finalize()
        .to_vec();
    let tree = bundle.join("rootfs.verity");
    let at = find(&fs::read(&tree).unwrap(), &leaf);
    flip_byte(&tree, at + 5);

    // Booted: a guest restored from the plan's boot snapshot holds the hash blocks its boot
    // read and checked, and would not read the flipped one.
    run_expecting_integrity_failure(&bundle, &["--cold-boot"], &["cat", "/data/canary.bin"]);
}

#[test]
fn run_builds_an_image_once_then_reuses_the_bundle() {
    let f = fixture();
    let _turn = turn();
    let out = mvm(&["run", &f.image, "--", "echo", "from an image"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(text(&out.stdout), "from an image\n");
    let built = fs::read_dir(f.home.join("runs")).unwrap().count();
    let again = mvm(&["run", &f.image, "--", "echo", "from an image"]);
    assert_eq!(
        text(&again.stdout),
        "from an image\n",
        "{}",
        describe(&again)
    );
    assert!(
        !text(&again.stderr).contains("built "),
        "rebuilt: {}",
        describe(&again)
    );
    assert_eq!(fs::read_dir(f.home.join("runs")).unwrap().count(), built);
}

fn hex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

fn subdir(parent: &Path, name: &str) -> PathBuf {
    let dir = parent.join(name);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `mvm ARGS` and returns its parsed JSON output, asserting the exit status.
fn mvm_ok_json(args: &[&str], status: i32) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = mvm(&all);
    assert_eq!(
        out.status.code(),
        Some(status),
        "{args:?}: {}",
        describe(&out)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

fn vm_phase(name: &str) -> Option<String> {
    let listed = mvm_ok_json(&["ls"], 0);
    listed["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|vm| vm["name"] == name)
        .map(|vm| vm["phase"].as_str().unwrap().to_string())
}

#[test]
fn a_named_vm_serves_execs_until_it_is_stopped_and_removed() {
    let f = fixture();
    let _turn = turn();
    let plan = plan_arg(&f.bundle);
    let before = qemu_starts();
    let _cleanup = RemoveOnDrop("web");
    let up = mvm_ok_json(&["up", "--plan", &plan, "--name", "web"], 0);
    assert_eq!(up["vm"]["phase"], "running", "{up}");
    let qemu_pid = wait_for_qemu(before);
    assert_eq!(vm_phase("web").as_deref(), Some("running"));
    mvm_ok_json(&["wait", "web", "--for", "ready", "--timeout", "5s"], 0);
    let logs = mvm(&["logs", "web"]);
    assert!(
        text(&logs.stdout).contains("mvm-agent: channel ready"),
        "{}",
        describe(&logs)
    );
    // The name is taken while the VM exists.
    let again = mvm(&["--json", "up", "--plan", &plan, "--name", "web"]);
    assert!(
        text(&again.stdout).contains("RUN034"),
        "{}",
        describe(&again)
    );

    let receipts = tempfile::tempdir().unwrap();
    let first_receipt = receipts.path().join("first.json");
    let out = mvm(&[
        "exec",
        "web",
        "--env",
        "GREETING=hi",
        "--receipt",
        first_receipt.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "echo $GREETING; exit 9",
    ]);
    assert_eq!(out.status.code(), Some(9), "{}", describe(&out));
    assert_eq!(text(&out.stdout), "hi\n");
    // Recorded by digest, never by value.
    let entries = audit_entries(&f.home);
    // Written before the answer reached the client: no race.
    let exec = entries.last().unwrap();
    assert_eq!(exec["event"], "vm.exec.ended", "{exec}");
    assert_eq!(entries[entries.len() - 2]["event"], "vm.exec.started");
    assert_eq!(exec["fields"]["outcome"]["status"]["code"], 9, "{exec}");
    let argv = serde_json::to_vec(&["sh", "-c", "echo $GREETING; exit 9"]).unwrap();
    let digest = format!("sha256:{:x}", Sha256::digest(&argv));
    assert_eq!(exec["fields"]["argv_sha256"], digest.as_str());
    assert!(!entries.iter().any(|e| e.to_string().contains("GREETING")));
    // Receipts chain: the next one names this one.
    let second_receipt = receipts.path().join("second.json");
    let again = mvm(&[
        "exec",
        "web",
        "--receipt",
        second_receipt.to_str().unwrap(),
        "--",
        "echo",
    ]);
    assert_eq!(again.status.code(), Some(0), "{}", describe(&again));
    let first = mvm_ok_json(&["receipt", "verify", first_receipt.to_str().unwrap()], 0);
    let second = mvm_ok_json(&["receipt", "verify", second_receipt.to_str().unwrap()], 0);
    assert_eq!(first["receipt"]["result"]["code"], 9);
    assert_eq!(second["receipt"]["previous"], first["digest"], "{second}");

    // Output arrives while the command still runs.
    let mut slow = Command::new(env!("CARGO_BIN_EXE_mvm"))
        .args([
            "exec",
            "web",
            "--",
            "sh",
            "-c",
            "echo first; sleep 3; echo second",
        ])
        .env("MVM_HOME", &f.home)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let mut first = [0u8; 6];
    std::io::Read::read_exact(slow.stdout.as_mut().unwrap(), &mut first).unwrap();
    let first_after = started.elapsed();
    assert_eq!(&first, b"first\n");
    let rest = slow.wait_with_output().unwrap();
    assert_eq!(text(&rest.stdout), "second\n");
    assert!(
        started.elapsed() - first_after >= std::time::Duration::from_secs(2),
        "the first line came only at the end"
    );

    // Eight commands at once over the one channel, each with its own output.
    let together = std::time::Instant::now();
    let runs: Vec<_> = (0..8)
        .map(|i| {
            let home = f.home.clone();
            std::thread::spawn(move || {
                Command::new(env!("CARGO_BIN_EXE_mvm"))
                    .args([
                        "exec",
                        "web",
                        "--",
                        "sh",
                        "-c",
                        &format!("sleep 1; echo run {i}"),
                    ])
                    .env("MVM_HOME", home)
                    .output()
                    .unwrap()
            })
        })
        .collect();
    for (i, run) in runs.into_iter().enumerate() {
        let out = run.join().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
        assert_eq!(text(&out.stdout), format!("run {i}\n"));
    }
    // Side by side, not one after another (each sleeps a second).
    assert!(
        together.elapsed() < std::time::Duration::from_secs(6),
        "eight one-second commands took {:?}",
        together.elapsed()
    );

    // A variable the IR refuses everywhere is refused here too.
    let preload = mvm(&["exec", "web", "--env", "LD_PRELOAD=/tmp/x.so", "--", "echo"]);
    assert_eq!(preload.status.code(), Some(125), "{}", describe(&preload));
    assert!(
        text(&preload.stderr).contains("AGENT100"),
        "{}",
        describe(&preload)
    );

    // Files in and out, checked end to end; guest paths stay under /tmp.
    let files = tempfile::tempdir().unwrap();
    let local = files.path().join("in.bin");
    let bytes: Vec<u8> = (0u32..(4 << 20) / 4)
        .flat_map(|i| (i.wrapping_mul(2_654_435_761)).to_le_bytes())
        .collect();
    fs::write(&local, &bytes).unwrap();
    let copied = mvm_ok_json(&["cp", local.to_str().unwrap(), "web:/tmp/in.bin"], 0);
    let digest = format!("sha256:{:x}", Sha256::digest(&bytes));
    assert_eq!(copied["sha256"], digest.as_str(), "{copied}");
    let summed = mvm(&[
        "exec",
        "web",
        "--",
        "/bin/busybox",
        "sha256sum",
        "/tmp/in.bin",
    ]);
    assert!(
        text(&summed.stdout).starts_with(&digest["sha256:".len()..]),
        "{}",
        describe(&summed)
    );
    let back = files.path().join("out.bin");
    mvm_ok_json(&["cp", "web:/tmp/in.bin", back.to_str().unwrap()], 0);
    assert!(
        fs::read(&back).unwrap() == bytes,
        "the file came back different"
    );
    let escape = mvm(&["--json", "cp", local.to_str().unwrap(), "web:/etc/evil"]);
    assert!(
        text(&escape.stdout).contains("AGENT107"),
        "{}",
        describe(&escape)
    );
    let root_only = mvm(&[
        "--json",
        "cp",
        "web:/tmp/../srv/secret.txt",
        back.to_str().unwrap(),
    ]);
    assert!(
        text(&root_only.stdout).contains("AGENT107"),
        "{}",
        describe(&root_only)
    );
    assert!(audit_entries(&f.home)
        .iter()
        .any(|e| e["event"] == "vm.copy"));

    // The exec benchmark runs against a warm VM (figures are not checked here).
    let bench = mvm_ok_json(
        &["bench", "exec", "--vm", "web", "--runs", "3", "--", "echo"],
        0,
    );
    assert!(bench["exec_ms"]["p50"].as_f64().unwrap() > 0.0, "{bench}");
    assert!(bench["echo_ms"]["p50"].as_f64().unwrap() > 0.0, "{bench}");

    let stopped = mvm_ok_json(&["stop", "web"], 0);
    assert_eq!(stopped["vm"]["phase"], "stopped", "{stopped}");
    mvm_ok_json(&["wait", "web", "--for", "stopped"], 0);
    // A stopped VM never becomes ready.
    mvm_ok_json(&["wait", "web", "--for", "ready"], 1);
    assert!(
        !Path::new("/proc").join(&qemu_pid).exists(),
        "QEMU still runs"
    );
    let refused = mvm(&["exec", "web", "--", "true"]);
    assert_ne!(refused.status.code(), Some(0));
    assert!(
        text(&refused.stderr).contains("RUN036"),
        "{}",
        describe(&refused)
    );
    mvm_ok_json(&["rm", "web"], 0);
    assert!(
        !f.home.join("vms/web").exists(),
        "the VM's directory is left behind"
    );
    assert_eq!(vm_phase("web"), None);
}

#[test]
fn a_vm_whose_runner_is_killed_shows_failed_and_can_be_removed() {
    let f = fixture();
    let _turn = turn();
    let _cleanup = RemoveOnDrop("victim");
    let up = mvm_ok_json(
        &["up", "--plan", &plan_arg(&f.bundle), "--name", "victim"],
        0,
    );
    let runner_pid = up["vm"]["runner_pid"].as_u64().unwrap().to_string();
    let killed = Command::new("kill")
        .args(["-KILL", &runner_pid])
        .status()
        .unwrap();
    assert!(killed.success());
    eventually(
        "the killed runner is gone",
        EVENTUALLY,
        || match Path::new("/proc").join(&runner_pid).exists() {
            true => Err(format!("runner {runner_pid} still there")),
            false => Ok(()),
        },
    );
    let listed = mvm_ok_json(&["ls"], 0);
    let victim = listed["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|vm| vm["name"] == "victim")
        .cloned()
        .unwrap();
    assert_eq!(victim["phase"], "failed", "{victim}");
    assert!(
        victim["reason"].as_str().unwrap().contains("runner"),
        "{victim}"
    );
    mvm_ok_json(&["rm", "victim"], 0);
    assert!(!f.home.join("vms/victim").exists());
    support::mvm_json(&f.home, &["audit", "verify"], 0);
}

#[test]
fn a_named_vm_whose_root_fails_verification_stops_as_failed() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = bundle_copy(dir.path());
    flip_canary_data(&bundle);

    let _turn = turn();
    let _cleanup = RemoveOnDrop("tampered");
    mvm_ok_json(
        &["up", "--plan", &plan_arg(&bundle), "--name", "tampered"],
        0,
    );
    let out = mvm(&["exec", "tampered", "--", "cat", "/data/canary.bin"]);
    assert_eq!(out.status.code(), Some(121), "{}", describe(&out));
    // The root cannot be trusted any more: the VM stops by itself, as failed.
    mvm_ok_json(
        &["wait", "tampered", "--for", "stopped", "--timeout", "30s"],
        0,
    );
    assert_eq!(vm_phase("tampered").as_deref(), Some("failed"));
    let listed = mvm_ok_json(&["ls"], 0);
    assert!(listed.to_string().contains("RUN020"), "{listed}");
    mvm_ok_json(&["rm", "tampered"], 0);
}

/// Removes a named VM when dropped, so that a failing test leaves no runner behind.
struct RemoveOnDrop(&'static str);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = mvm(&["rm", "--force", self.0]);
    }
}

/// Starts `sh -c SCRIPT` in the background in VM `name`; its handle.
fn detach(name: &str, script: &str) -> u64 {
    let spawned = mvm_ok_json(&["exec", name, "--detach", "--", "sh", "-c", script], 0);
    spawned["handle"].as_u64().unwrap()
}

/// `mvm ARGS` fails, saying `code`.
fn refused_with(args: &[&str], code: &str) {
    let out = mvm(&[&["--json"], args].concat());
    assert_ne!(out.status.code(), Some(0), "{args:?}: {}", describe(&out));
    assert!(
        text(&out.stdout).contains(code) || text(&out.stderr).contains(code),
        "{args:?} should fail with {code}: {}",
        describe(&out)
    );
}

/// `mvm ARGS` with `input` on its standard input.
fn mvm_with_input(args: &[&str], input: &[u8]) -> Output {
    let mut child = mvm_command(&fixture().home, args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = std::io::Write::write_all(&mut stdin, &input);
    });
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    out
}

/// The pid of the QEMU of the VM `name`.
fn qemu_of(name: &str, home: &Path) -> String {
    processes_of(name, home)
        .into_iter()
        .find(|(_, cmdline)| cmdline.contains("qemu-system"))
        .map(|(pid, _)| pid)
        .unwrap_or_else(|| panic!("no QEMU for {name}"))
}

/// Clock ticks of CPU time process `pid` used over `period`.
fn cpu_ticks_over(pid: &str, period: std::time::Duration) -> u64 {
    let ticks = || {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    let before = ticks();
    std::thread::sleep(period);
    ticks() - before
}

/// Processes whose command line names the VM `name` (its runner, its QEMU): (pid, cmdline).
fn processes_of(name: &str, home: &Path) -> Vec<(String, String)> {
    let vm_dir = home.join("vms").join(name);
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = text(&cmdline).replace('\0', " ");
        if cmdline.contains(&format!("--name {name} "))
            || cmdline.contains(&format!("--wake {name} "))
            || cmdline.contains(vm_dir.to_str().unwrap())
        {
            found.push((entry.file_name().to_string_lossy().into_owned(), cmdline));
        }
    }
    found
}

#[test]
fn a_named_vm_takes_input_runs_background_commands_and_moves_large_files() {
    let f = fixture();
    let _turn = turn();
    let _cleanup = RemoveOnDrop("big");
    // 1 GiB: /tmp (half of it) holds the 256 MiB file.
    let up = mvm_ok_json(&["up", &f.image, "--memory", "1024", "--name", "big"], 0);
    assert_eq!(up["vm"]["phase"], "running", "{up}");

    // Paused, the guest's vCPUs stop (QEMU spends no CPU on a busy loop) and commands are
    // refused; resumed, it runs again.
    detach("big", "while :; do :; done");
    let qemu = qemu_of("big", &f.home);
    let busy = cpu_ticks_over(&qemu, std::time::Duration::from_secs(2));
    let paused = mvm_ok_json(&["pause", "big"], 0);
    assert_eq!(paused["vm"]["phase"], "paused", "{paused}");
    assert_eq!(vm_phase("big").as_deref(), Some("paused"));
    let idle = cpu_ticks_over(&qemu, std::time::Duration::from_secs(2));
    assert!(
        idle * 10 < busy,
        "paused, QEMU used {idle} ticks against {busy} running"
    );
    refused_with(&["exec", "big", "--", "true"], "RUN039");
    mvm_ok_json(&["resume", "big"], 0);
    assert_eq!(vm_phase("big").as_deref(), Some("running"));
    let busy_again = cpu_ticks_over(&qemu, std::time::Duration::from_secs(2));
    assert!(
        busy_again * 2 > busy,
        "resumed: {busy_again} ticks against {busy}"
    );
    let events: Vec<_> = audit_entries(&f.home)
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_string())
        .collect();
    assert!(events.iter().any(|e| e == "vm.paused") && events.iter().any(|e| e == "vm.resumed"));
    let listed = mvm_ok_json(&["ps", "big"], 0);
    let busy_handle = listed["processes"][0]["handle"]
        .as_u64()
        .unwrap()
        .to_string();
    mvm_ok_json(&["kill", "big", &busy_handle, "--signal", "KILL"], 0);
    mvm(&["wait", "big", "--process", &busy_handle, "--timeout", "20s"]);

    // Standard input, small and larger than a window.
    let echoed = mvm_with_input(&["exec", "big", "-i", "--", "cat"], b"hello stdin\n");
    assert_eq!(
        text(&echoed.stdout),
        "hello stdin\n",
        "{}",
        describe(&echoed)
    );
    let input = vec![b'x'; 3 * 1024 * 1024 + 7];
    let counted = mvm_with_input(
        &["exec", "big", "-i", "--", "/bin/busybox", "wc", "-c"],
        &input,
    );
    assert_eq!(
        text(&counted.stdout).trim(),
        input.len().to_string(),
        "{}",
        describe(&counted)
    );

    // A background command: listed, killed, its end collected once.
    let handle_number = detach("big", "echo started; exec sleep 600");
    let handle = handle_number.to_string();
    let listed = mvm_ok_json(&["ps", "big"], 0);
    let process = listed["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["handle"] == handle_number)
        .cloned()
        .unwrap_or_else(|| panic!("{listed}"));
    assert!(process["status"].is_null(), "{process}");
    assert!(
        !listed.to_string().contains("600"),
        "arguments are not shown: {listed}"
    );
    mvm_ok_json(&["kill", "big", &handle, "--signal", "KILL"], 0);
    let waited = mvm(&["wait", "big", "--process", &handle, "--timeout", "20s"]);
    assert_eq!(waited.status.code(), Some(128 + 9), "{}", describe(&waited));
    assert_eq!(text(&waited.stdout), "started\n");
    refused_with(
        &["wait", "big", "--process", &handle, "--timeout", "1s"],
        "AGENT110",
    );

    // Ctrl-C on `mvm exec` is the command's: it ends by SIGINT, as it would locally.
    let mut sleeper = mvm_command(&f.home, &["exec", "big", "--", "sleep", "600"])
        .spawn()
        .unwrap();
    running_in("big", "sleep");
    let interrupted = std::time::Instant::now();
    Command::new("kill")
        .args(["-INT", &sleeper.id().to_string()])
        .status()
        .unwrap();
    let status = sleeper.wait().unwrap();
    assert_eq!(status.code(), Some(128 + 2));
    assert!(interrupted.elapsed() < std::time::Duration::from_secs(15));
    let listed = mvm_ok_json(&["ps", "big"], 0);
    assert_eq!(listed["processes"], serde_json::json!([]), "{listed}");

    // Files arranged in the guest.
    mvm_ok_json(&["fs", "mkdir", "big:/tmp/d", "--mode", "700"], 0);
    mvm_ok_json(&["fs", "mv", "big:/tmp/d", "/tmp/e"], 0);
    let stat = mvm_ok_json(&["fs", "stat", "big:/tmp/e"], 0);
    assert_eq!(stat["entry"]["kind"], "directory", "{stat}");
    assert_eq!(stat["entry"]["mode"], 0o700, "{stat}");
    assert_eq!(
        stat["entry"]["uid"], 1000,
        "made as the workload user: {stat}"
    );
    refused_with(&["fs", "mkdir", "big:/etc/x"], "AGENT107");

    // A directory in and out as a tar stream, symlinks as symlinks.
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    fs::create_dir_all(tree.join("sub")).unwrap();
    fs::write(tree.join("a.txt"), b"alpha\n").unwrap();
    fs::write(tree.join("sub/b.bin"), vec![3u8; 200_000]).unwrap();
    std::os::unix::fs::symlink("a.txt", tree.join("link")).unwrap();
    mvm_ok_json(&["cp", tree.to_str().unwrap(), "big:/tmp/e/tree"], 0);
    let read = mvm(&["exec", "big", "--", "cat", "/tmp/e/tree/link"]);
    assert_eq!(text(&read.stdout), "alpha\n", "{}", describe(&read));
    let listed = mvm_ok_json(&["fs", "ls", "big:/tmp/e/tree"], 0);
    let names: Vec<_> = listed["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e["kind"].as_str().unwrap()))
        .collect();
    assert_eq!(
        names,
        [("a.txt", "file"), ("link", "symlink"), ("sub", "directory")]
    );
    let back = work.path().join("back");
    mvm_ok_json(&["cp", "big:/tmp/e/tree", back.to_str().unwrap()], 0);
    assert_eq!(
        fs::read(back.join("sub/b.bin")).unwrap(),
        vec![3u8; 200_000]
    );
    assert_eq!(
        fs::read_link(back.join("link")).unwrap(),
        Path::new("a.txt")
    );
    mvm_ok_json(&["fs", "rm", "-r", "big:/tmp/e"], 0);
    refused_with(&["fs", "stat", "big:/tmp/e"], "AGENT112");

    // 256 MiB in and out, the same SHA-256 on both sides.
    let large = work.path().join("large.bin");
    {
        let mut file = std::io::BufWriter::new(fs::File::create(&large).unwrap());
        for i in 0u32..(256 << 20) / 32 {
            std::io::Write::write_all(&mut file, &Sha256::digest(i.to_le_bytes())).unwrap();
        }
    }
    let digest = format!("sha256:{:x}", Sha256::digest(fs::read(&large).unwrap()));
    let started = std::time::Instant::now();
    let copied = mvm_ok_json(&["cp", large.to_str().unwrap(), "big:/tmp/large.bin"], 0);
    let inward = started.elapsed();
    assert_eq!(copied["sha256"], digest.as_str(), "{copied}");
    assert_eq!(copied["copied"], 256 << 20);
    let returned = work.path().join("returned.bin");
    let started = std::time::Instant::now();
    let copied = mvm_ok_json(&["cp", "big:/tmp/large.bin", returned.to_str().unwrap()], 0);
    let outward = started.elapsed();
    assert_eq!(copied["sha256"], digest.as_str(), "{copied}");
    let returned_digest = format!("sha256:{:x}", Sha256::digest(fs::read(&returned).unwrap()));
    assert_eq!(returned_digest, digest);
    eprintln!("256 MiB copied in {inward:?}, out {outward:?} (TCG guest)");
    mvm_ok_json(&["fs", "rm", "big:/tmp/large.bin"], 0);
    let size = std::env::var("MVM_TEST_BENCH_CP_MIB").unwrap_or("16".into());
    let bench = mvm_ok_json(
        &[
            "bench",
            "cp",
            "--vm",
            "big",
            "--size-mib",
            &size,
            "--runs",
            "1",
        ],
        0,
    );
    for direction in ["in_mb_s", "out_mb_s"] {
        assert!(bench[direction]["copy"].as_f64().unwrap() > 0.0, "{bench}");
        assert!(bench[direction]["raw"].as_f64().unwrap() > 0.0, "{bench}");
    }
    eprintln!("bench cp: {bench}");

    // Stopped and removed: nothing of the VM is left — no process, no socket, no file.
    mvm_ok_json(&["stop", "big"], 0);
    mvm_ok_json(&["rm", "big"], 0);
    assert!(!f.home.join("vms/big").exists());
    eventually("nothing of the VM runs", EVENTUALLY, || {
        let left = processes_of("big", &f.home);
        match left.is_empty() {
            true => Ok(()),
            false => Err(format!("{left:?}")),
        }
    });
}

#[test]
fn run_with_input_feeds_the_command_and_leaves_no_vm_behind() {
    let f = fixture();
    let _turn = turn();
    // More than one flow-control window, and an exit status of the command's own.
    let input = vec![b'y'; 1024 * 1024 + 5];
    let ran = mvm_with_input(
        &["run", &f.image, "-i", "--", "sh", "-c", "wc -c; exit 3"],
        &input,
    );
    assert_eq!(ran.status.code(), Some(3), "{}", describe(&ran));
    assert_eq!(text(&ran.stdout).trim(), input.len().to_string());
    let listed = mvm_ok_json(&["ls"], 0);
    assert!(
        !listed.to_string().contains("\"run-"),
        "the run's VM is removed: {listed}"
    );
    assert!(fs::read_dir(f.home.join("vms")).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("run-")));
    refused_with(&["run", &f.image, "-i", "--", "true"], "RUN029");
}

/// Waits until `mvm ps NAME` lists a running `program` (a command started by another `mvm`).
fn running_in(name: &str, program: &str) {
    eventually(&format!("{program} runs in {name}"), EVENTUALLY, || {
        let listed = mvm_ok_json(&["ps", name], 0);
        let runs = listed["processes"].as_array().is_some_and(|processes| {
            processes
                .iter()
                .any(|p| p["program"] == program && p["status"].is_null())
        });
        match runs {
            true => Ok(()),
            false => Err(listed.to_string()),
        }
    });
}

/// `mvm exec NAME -- sh -c SCRIPT`'s standard output, trimmed.
fn sh_in(name: &str, script: &str) -> String {
    sh_in_as(name, &[], script)
}

/// `sh_in` with `--user USER` when given.
fn sh_in_as(name: &str, user: &[&str], script: &str) -> String {
    let args = [&["exec", name], user, &["--", "sh", "-c", script]].concat();
    let out = mvm(&args);
    assert!(out.status.success(), "{script}: {}", describe(&out));
    text(&out.stdout).trim().to_string()
}

/// `tests/support/tamper.c`, built static into `dir`.
fn tamper_program(dir: &Path) -> PathBuf {
    let program = dir.join("tamper");
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/tamper.c");
    let built = Command::new("cc")
        .args(["-static", "-O1", "-o"])
        .arg(&program)
        .arg(source)
        .output()
        .unwrap();
    assert!(built.status.success(), "cc: {}", describe(&built));
    program
}

#[test]
fn commands_cannot_trace_each_other_reach_into_the_kernel_or_leave_anything_behind() {
    let f = fixture();
    let _turn = turn();
    let _cleanup = RemoveOnDrop("guarded");
    // Two vCPUs (under TCG: a thread each, no `-icount`): everything below runs on both.
    mvm_ok_json(&["up", &f.image, "--name", "guarded", "--cpus", "2"], 0);
    assert_eq!(sh_in("guarded", "nproc"), "2");

    // The guest kernel's settings, as the agent set them.
    let knobs: Vec<&str> = mvm_agent::boot::hardening::SYSCTLS
        .iter()
        .map(|(knob, _)| *knob)
        .collect();
    let read = sh_in(
        "guarded",
        &format!(
            "for k in {}; do echo $k=$(cat /proc/sys/$k); done",
            knobs.join(" ")
        ),
    );
    let expected: Vec<String> = mvm_agent::boot::hardening::SYSCTLS
        .iter()
        .map(|(knob, value)| format!("{knob}={value}"))
        .collect();
    assert_eq!(read.lines().collect::<Vec<_>>(), expected);
    // What they close, seen from a command: no kernel log, no kernel addresses, no user
    // namespace.
    let probes = sh_in(
        "guarded",
        "/bin/busybox dmesg >/dev/null 2>&1 && echo dmesg-read; \
         /bin/busybox head -c 16 /proc/kallsyms; echo; \
         /bin/busybox unshare -U true 2>/dev/null && echo userns-made; true",
    );
    assert_eq!(probes, "0000000000000000", "{probes}");

    // A process left running cannot attach to a later command to change its exit status.
    let work = tempfile::tempdir().unwrap();
    let tamper = tamper_program(work.path());
    mvm_ok_json(&["cp", tamper.to_str().unwrap(), "guarded:/tmp/tamper"], 0);
    sh_in("guarded", "/bin/busybox chmod 755 /tmp/tamper");
    mvm_ok_json(
        &[
            "exec",
            "guarded",
            "--detach",
            "--",
            "/tmp/tamper",
            "tamper-victim",
            "/tmp/tamper.log",
        ],
        0,
    );
    eventually("the tamperer waits", EVENTUALLY, || {
        let log = sh_in("guarded", "cat /tmp/tamper.log 2>/dev/null; true");
        log.contains("waiting").then_some(()).ok_or(log)
    });
    let victim = mvm(&[
        "exec",
        "guarded",
        "--",
        "sh",
        "-c",
        "sleep 3; exit 1",
        "tamper-victim",
    ]);
    assert_eq!(victim.status.code(), Some(1), "{}", describe(&victim));
    let log = sh_in("guarded", "cat /tmp/tamper.log");
    assert!(
        log.contains("refused") && !log.contains("attached"),
        "{log}"
    );

    // Sixteen chains, each forking its successor into a new session and exiting, left
    // behind by a command: all gone once it has ended.
    let chain = "echo >> /tmp/heartbeat; /bin/busybox setsid sh -c \"$0\" \"$0\" >/dev/null 2>&1 &";
    let left = sh_in(
        "guarded",
        &format!(
            "for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16; do \
             /bin/busybox setsid sh -c '{chain}' '{chain}' >/dev/null 2>&1 & done; sleep 1; \
             /bin/busybox wc -c < /tmp/heartbeat"
        ),
    );
    assert!(left.parse::<u64>().unwrap() > 16, "the chains ran: {left}");
    let beats = || sh_in("guarded", "/bin/busybox wc -c < /tmp/heartbeat");
    eventually("the chains stop", EVENTUALLY, || {
        let before = beats();
        std::thread::sleep(std::time::Duration::from_secs(2));
        let after = beats();
        (before == after)
            .then_some(())
            .ok_or(format!("{before} then {after}"))
    });

    // What is copied out takes the modes the umask allows, never group or other write; a
    // file keeps its holes; more than --max-size is refused before anything is written.
    sh_in(
        "guarded",
        "/bin/busybox mkdir -m 777 /tmp/outdir && echo x > /tmp/outdir/open && \
         /bin/busybox chmod 666 /tmp/outdir/open && \
         /bin/busybox truncate -s 8M /tmp/sparse && echo end >> /tmp/sparse && \
         /bin/busybox chmod 666 /tmp/sparse",
    );
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let umask = status
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .map(|m| u32::from_str_radix(m.trim(), 8).unwrap())
        .unwrap();
    let allowed = |mode: u32| mode & !(umask | 0o022);
    let host = tempfile::tempdir().unwrap();
    let mode_of = |path: &Path| {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    };
    let dir_out = host.path().join("outdir");
    mvm_ok_json(&["cp", "guarded:/tmp/outdir", dir_out.to_str().unwrap()], 0);
    assert_eq!(mode_of(&dir_out), allowed(0o777));
    assert_eq!(mode_of(&dir_out.join("open")), allowed(0o666));
    let sparse = host.path().join("sparse");
    mvm_ok_json(&["cp", "guarded:/tmp/sparse", sparse.to_str().unwrap()], 0);
    assert_eq!(mode_of(&sparse), allowed(0o666));
    let written = fs::read(&sparse).unwrap();
    assert_eq!(written.len(), (8 << 20) + 4);
    assert!(written.ends_with(b"end\n") && written[..8 << 20].iter().all(|b| *b == 0));
    let allocated = std::os::unix::fs::MetadataExt::blocks(&fs::metadata(&sparse).unwrap()) * 512;
    assert!(
        allocated < 1 << 20,
        "{allocated} bytes allocated for a file of holes"
    );
    let capped = host.path().join("capped");
    refused_with(
        &[
            "cp",
            "--max-size",
            "1M",
            "guarded:/tmp/sparse",
            capped.to_str().unwrap(),
        ],
        "RUN038",
    );
    assert_eq!(
        fs::read_dir(host.path()).unwrap().count(),
        2,
        "something was left"
    );

    // Names, messages and console lines from the guest are shown, never obeyed: no escape
    // byte reaches the terminal, and a name is one line. JSON keeps the exact names.
    let title = "\u{1b}]0;owned\u{7}";
    sh_in(
        "guarded",
        "/bin/busybox mkdir /tmp/names && cd /tmp/names && \
         /bin/busybox touch \"$(printf '\\033]0;owned\\007')\" \"$(printf 'two\\nlines')\" plain",
    );
    let listed = mvm(&["fs", "ls", "guarded:/tmp/names"]);
    assert!(listed.status.success(), "{}", describe(&listed));
    assert!(!listed.stdout.contains(&0x1b), "{}", describe(&listed));
    assert_eq!(
        text(&listed.stdout).lines().count(),
        3,
        "{}",
        describe(&listed)
    );
    assert!(
        text(&listed.stdout).contains("\\x1b]0;owned\\x07"),
        "{}",
        describe(&listed)
    );
    let exact = mvm_ok_json(&["fs", "ls", "guarded:/tmp/names"], 0);
    let names: Vec<&str> = exact["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&title) && names.contains(&"two\nlines"),
        "{names:?}"
    );
    let refused = mvm(&["exec", "guarded", "--", "/tmp/\u{1b}[2Jnothing"]);
    assert_eq!(refused.status.code(), Some(127), "{}", describe(&refused));
    assert!(!refused.stderr.contains(&0x1b), "{}", describe(&refused));

    mvm_ok_json(&["stop", "guarded"], 0);
    let console = f.home.join("vms/guarded/serial.log");
    let mut log = fs::OpenOptions::new().append(true).open(&console).unwrap();
    std::io::Write::write_all(&mut log, b"\x1b]0;owned\x07 said the console\r\n").unwrap();
    let logs = mvm(&["logs", "guarded"]);
    assert!(logs.status.success(), "{}", describe(&logs));
    assert!(!logs.stdout.contains(&0x1b), "{}", describe(&logs));
    assert!(
        text(&logs.stdout).contains("\\x1b]0;owned\\x07 said the console\n"),
        "{}",
        describe(&logs)
    );
    mvm_ok_json(&["rm", "guarded"], 0);
}

#[test]
fn a_vm_saved_cold_holds_nothing_refuses_a_changed_state_and_wakes_where_it_left_off() {
    let f = fixture();
    let _turn = turn();
    let _cleanup = RemoveOnDrop("sleeper");
    let up = mvm_ok_json(&["up", &f.image, "--name", "sleeper"], 0);
    let vm_id = up["vm"]["vm"].as_str().unwrap().to_string();
    // What only the guest's memory holds: a file on its tmpfs and a background counter.
    sh_in("sleeper", "echo kept > /tmp/mark");
    let counter = detach(
        "sleeper",
        "i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.2; done",
    );

    // A command in flight: its answer would be lost, so the save is refused and the VM runs on.
    let running = mvm_command(&f.home, &["exec", "sleeper", "--", "sleep", "6"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    running_in("sleeper", "sleep");
    refused_with(&["pause", "sleeper", "--cold"], "RUN040");
    assert_eq!(vm_phase("sleeper").as_deref(), Some("running"));
    assert!(running.wait_with_output().unwrap().status.success());

    // A copy whose client dies half way leaves no temporary in the guest.
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.bin");
    fs::write(&big, vec![7u8; 64 << 20]).unwrap();
    let mut copy = mvm_command(
        &f.home,
        &["cp", big.to_str().unwrap(), "sleeper:/tmp/big.bin"],
    )
    .spawn()
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    copy.kill().unwrap();
    copy.wait().unwrap();
    let left = eventually(
        "the abandoned copy's temporary is removed",
        EVENTUALLY,
        || {
            // Names only (a glob reads the directory, stats nothing): `ls` fails on a
            // temporary removed between its listing and its stat, the very moment awaited here.
            let left = sh_in("sleeper", "cd /tmp && for f in .* *; do echo \"$f\"; done");
            match left.contains(".mvm-copy-") {
                true => Err(left),
                false => Ok(left),
            }
        },
    );
    assert!(!left.contains("big.bin"), "{left}");

    let before = sh_in("sleeper", "cat /tmp/count").parse::<u64>().unwrap();
    let saved = mvm_ok_json(&["pause", "sleeper", "--cold"], 0);
    assert_eq!(saved["vm"]["phase"], "cold", "{saved}");
    // Cold: no runner, no QEMU, no socket; the saved state is private to the runner's user.
    assert_eq!(processes_of("sleeper", &f.home), vec![]);
    let dir = f.home.join("vms").join("sleeper");
    for gone in ["control.sock", "qmp.sock", "agent.sock", "kernel"] {
        assert!(!dir.join(gone).exists(), "{gone} is left");
    }
    let memory = dir.join("cold").join("memory");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&memory).unwrap().permissions().mode() & 0o777,
        0o600
    );
    refused_with(&["exec", "sleeper", "--", "true"], "RUN036");
    // Cold, it will not get ready by itself: `mvm wait` says so at once.
    let waited = mvm(&["wait", "sleeper", "--for", "ready", "--timeout", "30s"]);
    assert_eq!(waited.status.code(), Some(1), "{}", describe(&waited));

    // A saved state changed by one byte is refused before QEMU starts; it stays cold.
    let starts = qemu_starts();
    flip_byte(&memory, 4096);
    let refused = mvm(&["resume", "sleeper"]);
    assert_eq!(refused.status.code(), Some(120), "{}", describe(&refused));
    assert!(
        text(&refused.stderr).contains("RUN041"),
        "{}",
        describe(&refused)
    );
    assert_eq!(
        qemu_starts(),
        starts,
        "no QEMU for a state that does not verify"
    );
    assert_eq!(vm_phase("sleeper").as_deref(), Some("cold"));
    flip_byte(&memory, 4096);
    // This state, kept aside: once woken it is never current again.
    let aside = tempfile::tempdir().unwrap();
    copy_dir(&dir.join("cold"), &aside.path().join("cold"));

    // Woken: the same VM, its file and its counter there, counting on from where it stopped;
    // its clock, which stood still while it was cold, is the host's again.
    std::thread::sleep(std::time::Duration::from_secs(5));
    let woken = mvm_ok_json(&["resume", "sleeper"], 0);
    assert_eq!(woken["vm"]["phase"], "running", "{woken}");
    assert_eq!(woken["vm"]["vm"], vm_id.as_str());
    let guest_now = sh_in("sleeper", "date +%s").parse::<i64>().unwrap();
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (guest_now - host_now).abs() <= 2,
        "guest clock {guest_now}, host {host_now}"
    );
    assert_eq!(sh_in("sleeper", "cat /tmp/mark"), "kept");
    let after = sh_in("sleeper", "cat /tmp/count").parse::<u64>().unwrap();
    assert!(after >= before, "{after} < {before}");
    eventually("the counter runs on", EVENTUALLY, || {
        let later = sh_in("sleeper", "cat /tmp/count").parse::<u64>().unwrap();
        match later > after {
            true => Ok(()),
            false => Err(format!("{later} after {after}")),
        }
    });
    // Commands may run as another user of the image, or a numeric one; never as root.
    let as_user = |user: &str| sh_in_as("sleeper", &["--user", user], "echo $(id -u):$(id -g)");
    assert_eq!(as_user("builder"), "2000:2001");
    assert_eq!(as_user("1234:4321"), "1234:4321");
    for root in ["root", "0", "builder:0"] {
        refused_with(
            &["exec", "sleeper", "--user", root, "--", "true"],
            "AGENT114",
        );
    }
    let listed = mvm_ok_json(&["ps", "sleeper"], 0);
    assert!(
        listed["processes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["handle"] == counter && p["status"].is_null()),
        "{listed}"
    );
    assert!(
        !dir.join("cold").exists(),
        "a running VM keeps no stale state"
    );
    let mut entries = audit_entries(&f.home);
    entries.sort_by_key(|e| e["seq"].as_u64());
    let events: Vec<String> = entries
        .iter()
        .filter(|e| e["fields"]["vm"] == vm_id.as_str())
        .map(|e| e["event"].as_str().unwrap().to_string())
        .collect();
    let order = ["vm.saved", "plan.readmitted", "vm.woken"]
        .map(|event| events.iter().position(|e| e == event));
    assert!(
        order.iter().all(Option::is_some) && order.windows(2).all(|w| w[0] < w[1]),
        "{events:?}"
    );

    // Changed and saved again: the state kept aside (older, and woken once already) is
    // refused when put back, before QEMU starts; the VM stays cold.
    sh_in("sleeper", "echo changed > /tmp/mark");
    mvm_ok_json(&["pause", "sleeper", "--cold"], 0);
    let newer = aside.path().join("newer");
    fs::rename(dir.join("cold"), &newer).unwrap();
    copy_dir(&aside.path().join("cold"), &dir.join("cold"));
    let starts = qemu_starts();
    let replayed = mvm(&["resume", "sleeper"]);
    assert_eq!(replayed.status.code(), Some(120), "{}", describe(&replayed));
    let said = text(&replayed.stderr);
    assert!(
        said.contains("RUN041") && said.contains("generation"),
        "{}",
        describe(&replayed)
    );
    assert_eq!(qemu_starts(), starts, "no QEMU for an older state");
    assert_eq!(vm_phase("sleeper").as_deref(), Some("cold"));
    fs::remove_dir_all(dir.join("cold")).unwrap();
    fs::rename(&newer, dir.join("cold")).unwrap();

    // Stopped while cold: the saved state is discarded.
    let stopped = mvm_ok_json(&["stop", "sleeper"], 0);
    assert_eq!(stopped["vm"]["phase"], "stopped", "{stopped}");
    assert!(!dir.join("cold").exists());
    refused_with(&["resume", "sleeper"], "RUN036");
    let verified = mvm(&["audit", "verify"]);
    assert!(verified.status.success(), "{}", describe(&verified));
}

#[test]
fn eight_vms_serve_a_hundred_execs_each_without_a_failure() {
    const NAMES: [&str; 8] = [
        "fleet0", "fleet1", "fleet2", "fleet3", "fleet4", "fleet5", "fleet6", "fleet7",
    ];
    let f = fixture();
    let _turn = turn();
    let plan = plan_arg(&f.bundle);
    let _cleanup: Vec<_> = NAMES.iter().map(|name| RemoveOnDrop(name)).collect();
    // Booted one after another (eight TCG boots at once on two cores can stall), then all up
    // together.
    for name in NAMES {
        let up = mvm_ok_json(&["up", "--plan", &plan, "--name", name], 0);
        assert_eq!(up["vm"]["phase"], "running", "{up}");
    }
    let started = std::time::Instant::now();
    let workers: Vec<_> = NAMES
        .iter()
        .map(|name| {
            let home = f.home.clone();
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                for n in 0..100 {
                    let out = Command::new(env!("CARGO_BIN_EXE_mvm"))
                        .args(["exec", name, "--", "echo", &format!("{name}-{n}")])
                        .env("MVM_HOME", &home)
                        .output()
                        .unwrap();
                    if out.status.code() != Some(0) || text(&out.stdout) != format!("{name}-{n}\n")
                    {
                        failures.push(describe(&out));
                    }
                }
                failures
            })
        })
        .collect();
    let failures: Vec<String> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    eprintln!("800 execs across 8 VMs in {:?}", started.elapsed());
    assert_eq!(failures, Vec::<String>::new());
    for name in NAMES {
        mvm_ok_json(&["stop", name], 0);
        mvm_ok_json(&["rm", name], 0);
    }
}

/// The `Seccomp:` and `Seccomp_filters:` fields of every thread of process `pid`.
fn seccomp_of_threads(pid: &str) -> Vec<(String, String, u32)> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|entry| {
            let tid = entry.ok()?.file_name().into_string().ok()?;
            let status = fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()?;
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim().to_string())
                    .unwrap_or_default()
            };
            let filters = field("Seccomp_filters:").parse().unwrap_or(0);
            Some((tid, field("Seccomp:"), filters))
        })
        .collect()
}

/// Asserts that every thread of the runner of the VM `up` (an `mvm up` or `mvm resume` answer)
/// runs seccomp-filtered.
fn assert_runner_filtered(up: &Value) {
    let runner = up["vm"]["runner_pid"].as_u64().unwrap().to_string();
    let threads = seccomp_of_threads(&runner);
    assert!(!threads.is_empty(), "runner {runner}: {up}");
    for (tid, mode, filters) in threads {
        assert_eq!(
            mode, "2",
            "runner {runner}, thread {tid}: seccomp filter mode"
        );
        assert!(
            filters >= 1,
            "runner {runner}, thread {tid}: {filters} filters"
        );
    }
}

#[test]
fn a_named_vms_runner_runs_seccomp_filtered_through_execs_a_cold_save_and_a_wake() {
    let f = fixture();
    let _turn = turn();
    let _cleanup = RemoveOnDrop("confined");
    let up = mvm_ok_json(
        &["up", "--plan", &plan_arg(&f.bundle), "--name", "confined"],
        0,
    );
    assert_runner_filtered(&up);
    // Its work goes on under the filter: commands, a file both ways, a cold save, a wake.
    assert_eq!(sh_in("confined", "echo kept > /tmp/mark; echo ok"), "ok");
    let dir = tempfile::tempdir().unwrap();
    let copied = dir.path().join("mark");
    let out = mvm(&["cp", "confined:/tmp/mark", copied.to_str().unwrap()]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(fs::read_to_string(&copied).unwrap(), "kept\n");
    let saved = mvm_ok_json(&["pause", "confined", "--cold"], 0);
    assert_eq!(saved["vm"]["phase"], "cold", "{saved}");
    let woken = mvm_ok_json(&["resume", "confined"], 0);
    assert_eq!(woken["vm"]["phase"], "running", "{woken}");
    assert_runner_filtered(&woken);
    assert_eq!(sh_in("confined", "cat /tmp/mark"), "kept");
    mvm_ok_json(&["stop", "confined"], 0);
    assert_eq!(vm_phase("confined").as_deref(), Some("stopped"));
    mvm_ok_json(&["rm", "confined"], 0);
}
