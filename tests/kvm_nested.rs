//! The `kvm` backend (mvm's own VMM) end to end on real Linux guests — nested, because these
//! hosts' `/dev/kvm` is PVM, on which no stock kernel boots (`../shared/PLATFORM-NOTES.md`).
//!
//! A QEMU (TCG) guest whose emulated CPU has AMD-V loads `kvm_amd` (`scripts/nested-kvm-guest`
//! builds and boots it), and a static `mvm run` (and `mvm-runner` directly) inside it runs
//! `--backend kvm` on a bundle built here by `mvm build` and signed by a key the copied
//! `MVM_HOME` trusts: the own VMM boots the Debian cloud kernel, the agent opens the root
//! through dm-verity and runs the commands over the virtio-console port (one run asks for
//! `auto`, which must pick the own VMM there: the outer guest has no QEMU). Three inner boots in one outer boot (each ~20 s
//! nested), every report printed on the outer console between markers and checked here. A
//! stall is not retried: the runner's boot timeout, or the outer watchdog, fails the test with
//! the console's tail.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde_json::Value;

mod support;

use support::{bundle, guest};

/// The outer QEMU's watchdog: the outer boot (~7 s), three inner boots and their commands.
const OUTER_TIMEOUT_S: u32 = 230;
/// Each inner boot's watchdog (the runner's `--boot-timeout`).
const INNER_BOOT_TIMEOUT: &str = "75s";

/// The runs the outer guest makes: a name, the bundle, how it is launched, the command
/// (already shell-quoted). The first goes through the CLI (`mvm run`, which starts the runner
/// beside it); the outer guest has no QEMU, so `auto` succeeds only by picking the own VMM.
const RUNS: [(&str, &str, &str, &str); 3] = [
    (
        "hello",
        "bundle",
        "/payload/mvm --json run --backend kvm",
        "echo hello",
    ),
    (
        "exit7",
        "bundle",
        "/payload/mvm-runner --json --backend auto",
        "sh -c 'echo to-stdout; echo to-stderr >&2; exit 7'",
    ),
    (
        "flipped",
        "flipped",
        "/payload/mvm-runner --json --backend kvm",
        "cat /data/canary.bin",
    ),
];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Copies the files of `from` (not its subdirectories) into `to`, modes kept.
fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    fs::set_permissions(to, fs::Permissions::from_mode(0o700)).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// The payload the outer guest runs: the CLI and the runner, the bundles, the home, and `run`.
fn payload(dir: &Path, home: &Path, built: &bundle::Built) -> PathBuf {
    let payload = dir.join("payload");
    fs::create_dir(&payload).unwrap();
    fs::copy(guest::runner(), payload.join("mvm-runner")).unwrap();
    fs::copy(guest::static_cli(), payload.join("mvm")).unwrap();
    bundle::copy(&built.bundle, &payload, "bundle");
    let flipped = bundle::copy(&built.bundle, &payload, "flipped");
    bundle::flip_canary_data(&flipped, &built.canary);
    // The inner runner's home: the keys (the host key signs its audit entries) and the trust
    // store (the plan's signer); it writes its VM directories and audit log there.
    let inner_home = payload.join("home");
    fs::create_dir(&inner_home).unwrap();
    fs::set_permissions(&inner_home, fs::Permissions::from_mode(0o700)).unwrap();
    for sub in ["keys", "trust"] {
        copy_dir(&home.join(sub), &inner_home.join(sub));
    }
    let mut run = String::from(
        "#!/bin/busybox sh\n\
         b=/bin/busybox\n\
         # Only emergencies on the console: the reports are lines of their own.\n\
         $b dmesg -n 1\n\
         export MVM_HOME=/payload/home PATH=/bin\n\
         up() { $b cut -d' ' -f1 /proc/uptime; }\n",
    );
    for (name, bundle, launch, command) in RUNS {
        run.push_str(&format!(
            "echo \"MVM-RUN-BEGIN {name} at $(up) s\"\n\
             {launch} --plan /payload/{bundle}/plan.dsse.json \
             --boot-timeout {INNER_BOOT_TIMEOUT} --timeout 30s -- {command} \
             >/tmp/{name}.json 2>/tmp/{name}.err\n\
             status=$?\n\
             echo \"MVM-REPORT-BEGIN {name}\"\n\
             $b cat /tmp/{name}.json\n\
             echo \"MVM-REPORT-END {name} status $status at $(up) s\"\n\
             $b cat /tmp/{name}.err\n"
        ));
    }
    let script = payload.join("run");
    fs::write(&script, run).unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    payload
}

/// What the outer guest said about one run.
#[derive(Debug)]
struct Run {
    /// The runner's exit status.
    status: i32,
    /// Its JSON report.
    report: Value,
    /// The outer guest's uptime when the run started and ended.
    began_s: f64,
    ended_s: f64,
}

/// The number after `prefix` in `line`, up to the next space.
fn number_after(line: &str, prefix: &str) -> Option<f64> {
    let rest = &line[line.find(prefix)? + prefix.len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// The run `name` on the outer console, or why it is not there.
fn parse_run(console: &str, name: &str) -> Result<Run, String> {
    let lines: Vec<&str> = console.lines().map(|l| l.trim_end_matches('\r')).collect();
    let began = lines
        .iter()
        .find_map(|l| number_after(l, &format!("MVM-RUN-BEGIN {name} at ")))
        .ok_or_else(|| format!("run {name} never started"))?;
    let start = lines
        .iter()
        .position(|l| *l == format!("MVM-REPORT-BEGIN {name}"))
        .ok_or_else(|| format!("run {name} never ended (a stall?)"))?;
    let end_prefix = format!("MVM-REPORT-END {name} status ");
    let end = start
        + lines[start..]
            .iter()
            .position(|l| l.starts_with(&end_prefix))
            .ok_or_else(|| format!("run {name}'s report is cut off"))?;
    let end_line = lines[end];
    let status = number_after(end_line, &end_prefix).ok_or("no exit status")? as i32;
    let ended = number_after(end_line, " at ").ok_or("no end time")?;
    let json = lines[start + 1..end].concat();
    let report = serde_json::from_str(&json)
        .map_err(|e| format!("run {name}'s report is not JSON ({e}): {json}"))?;
    Ok(Run {
        status,
        report,
        began_s: began,
        ended_s: ended,
    })
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[test]
fn the_kvm_backend_boots_linux_runs_commands_and_verifies_the_root_nested() {
    let work = tempfile::tempdir().unwrap();
    let home = work.path().join("home");
    support::mvm_json(&home, &["kernel", "fetch"], 0);
    let built = bundle::build(&home, work.path());
    let payload = payload(work.path(), &home, &built);

    let started = Instant::now();
    let out = Command::new(repo().join("scripts/nested-kvm-guest"))
        .arg(&payload)
        .arg(OUTER_TIMEOUT_S.to_string())
        .env(
            "MVM_NESTED_KERNEL_ROOT",
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("nested-kernel"),
        )
        .output()
        .unwrap();
    let whole_s = started.elapsed().as_secs_f64();
    let console = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let context = || {
        format!(
            "outer QEMU status {:?} after {whole_s:.0} s\n--- outer console (last lines) ---\n{}\n\
             --- stderr ---\n{}",
            out.status.code(),
            tail(&console, 60),
            tail(&stderr, 20)
        )
    };
    assert_ne!(
        out.status.code(),
        Some(124),
        "the outer guest stalled: its {OUTER_TIMEOUT_S} s watchdog ended it\n{}",
        context()
    );
    assert!(out.status.success(), "{}", context());
    let runs: Vec<Run> = RUNS
        .iter()
        .map(|(name, ..)| {
            parse_run(&console, name).unwrap_or_else(|e| panic!("{e}\n{}", context()))
        })
        .collect();
    let outer_init_s = console
        .lines()
        .find_map(|l| number_after(l, "outer: init at "))
        .unwrap_or(f64::NAN);
    eprintln!(
        "nested kvm backend: outer /init at {outer_init_s} s of its uptime; inner runs {}; \
         whole {whole_s:.0} s",
        runs.iter()
            .zip(RUNS)
            .map(|(run, (name, ..))| format!(
                "{name} {:.1} s (ready {} ms)",
                run.ended_s - run.began_s,
                run.report["timings_ms"]["ready"]
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );

    // echo hello through `mvm run`: its output, exit 0, the own VMM.
    let hello = &runs[0];
    assert_eq!(hello.status, 0, "{:?}\n{}", hello, context());
    assert_eq!(hello.report["stdout"], "hello\n", "{:?}", hello);
    assert_eq!(hello.report["stderr"], "", "{:?}", hello);
    assert_eq!(hello.report["exit_status"], 0, "{:?}", hello);
    assert_eq!(hello.report["accel"], "kvm", "{:?}", hello);
    assert_eq!(hello.report["status"]["kind"], "exited", "{:?}", hello);

    // The command's own exit status, its streams apart; `auto` picked the own VMM.
    let exit7 = &runs[1];
    assert_eq!(exit7.status, 7, "{:?}\n{}", exit7, context());
    assert_eq!(exit7.report["exit_status"], 7, "{:?}", exit7);
    assert_eq!(exit7.report["stdout"], "to-stdout\n", "{:?}", exit7);
    assert_eq!(exit7.report["stderr"], "to-stderr\n", "{:?}", exit7);
    assert_eq!(exit7.report["accel"], "kvm", "{:?}", exit7);

    // Verified boot: a flipped byte in a file's data is an integrity failure (dm-verity in the
    // guest), not the file's bytes.
    let flipped = &runs[2];
    assert_eq!(flipped.status, 121, "{:?}\n{}", flipped, context());
    assert_eq!(flipped.report["error"]["code"], "RUN020", "{:?}", flipped);
    assert!(flipped.report.get("stdout").is_none(), "{:?}", flipped);
}
