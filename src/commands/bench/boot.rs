//! `mvm bench boot`: how long `mvm-runner` takes from its start to the agent's hello, against
//! the floor — plain QEMU on the same machine and kernel, booting a minimal initramfs (static
//! busybox printing a marker) — measured alternately in one run.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use mvm_builder::initramfs::Initramfs;
use mvm_ir::admission::verify_signed_plan;
use mvm_ir::plan::{LaunchPlan, MAX_ENVELOPE_BYTES};
use mvm_runner::backend::qemu::command_line::{kernel_command_line, machine_arguments};
use mvm_runner::backend::select::{self, BackendChoice, HostFacts};
use serde_json::{json, Value};

use crate::commands::Host;

/// What the floor's init prints once it runs.
const FLOOR_MARKER: &str = "mvm-bench: floor init running";
/// A boot that takes longer than this is a hung guest, not a measurement.
const BOOT_LIMIT: Duration = Duration::from_secs(120);

/// Boots `plan` `runs` times through the runner and the floor as often, and reports medians.
pub fn boot(
    plan_path: &Path,
    runs: usize,
    command: &str,
    work: &Path,
) -> anyhow::Result<(Value, String)> {
    let host = Host::open()?;
    let bytes = mvm_ir::fsutil::read_capped(plan_path, MAX_ENVELOPE_BYTES, "plan envelope")?;
    let plan = verify_signed_plan(
        &bytes,
        &host.keys.trust_store()?,
        time::OffsetDateTime::now_utc(),
    )?
    .plan;
    let bundle = plan_path.parent().unwrap_or(Path::new("."));
    let floor_initramfs = floor_initramfs(work)?;
    let facts = HostFacts::detect();
    let selected = select::select(BackendChoice::Auto, &facts)?;
    let qemu = facts.qemu?.path;
    let runner = crate::commands::bundle::sibling("MVM_RUNNER", "mvm-runner")?;

    let (mut ours, mut floor, mut splits) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        // A boot, not a restore from the plan's boot snapshot (`mvm bench start` compares those).
        let (ready_ms, guest) = runner_boot(&runner, plan_path, command, &["--cold-boot"])?;
        ours.push(ready_ms);
        splits.push(guest);
        floor.push(floor_boot(
            &qemu,
            &plan,
            bundle,
            &floor_initramfs,
            selected.accel,
        )?);
    }
    let (ours_ms, floor_ms) = (median(&ours), median(&floor));
    let ratio = ours_ms / floor_ms;
    let split = |key: &str| {
        median(
            &splits
                .iter()
                .map(|g: &Value| g[key].as_f64().unwrap_or(0.0))
                .collect::<Vec<_>>(),
        )
    };
    let timings = json!({
        "agent_ms": split("agent_ms"), "modules_ms": split("modules_ms"),
        "verity_ms": split("verity_ms"), "root_ms": split("root_ms"), "channel_ms": split("channel_ms"),
    });
    let value = json!({
        "runs": runs,
        "accel": selected.accel.to_string(),
        "runner_to_hello_ms": ours_ms,
        "floor_ms": floor_ms,
        "ratio": ratio,
        "goal_ratio": 1.15,
        "guest_timings_ms": timings,
        "samples": {"runner_to_hello_ms": ours, "floor_ms": floor},
    });
    let text = format!(
        "boot ({} runs, accel {}): mvm-runner start → agent hello {ours_ms:.0} ms; floor (QEMU, same kernel, busybox initramfs to a marker) {floor_ms:.0} ms; ratio {ratio:.2} (goal ≤ 1.15)\n  inside the guest (ms since kernel start, medians): agent {:.0}, modules {:.0}, verity {:.0}, root {:.0}, channel {:.0}",
        runs,
        selected.accel,
        split("agent_ms"),
        split("modules_ms"),
        split("verity_ms"),
        split("root_ms"),
        split("channel_ms"),
    );
    Ok((value, text))
}

/// One `mvm-runner [EXTRA…] --json -- COMMAND`: its start-to-ready time and the guest's own
/// boot timings.
pub(super) fn runner_boot(
    runner: &Path,
    plan: &Path,
    command: &str,
    extra: &[&str],
) -> anyhow::Result<(f64, Value)> {
    let out = mvm_ir::env::command(runner)
        .arg("--plan")
        .arg(plan)
        .args(extra)
        .args(["--json", "--", command])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {}", runner.display()))?;
    let report: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "the runner's report: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if !out.status.success() {
        bail!("the runner failed: {report}");
    }
    let timings = &report["timings_ms"];
    let ready = timings["ready"]
        .as_f64()
        .context("no ready time in the report")?;
    Ok((ready, timings["guest"].clone()))
}

/// The floor's initramfs: static busybox as `/bin/busybox` and an `/init` script that mounts
/// devtmpfs, prints the marker on the serial console and powers off.
fn floor_initramfs(work: &Path) -> anyhow::Result<PathBuf> {
    let busybox = std::fs::read("/bin/busybox")
        .context("/bin/busybox (the busybox-static package) builds the floor's initramfs")?;
    let mut initramfs = Initramfs::new();
    initramfs.add_file("bin/busybox", 0o755, busybox)?;
    initramfs.add_dir("dev", 0o755)?;
    let init = format!(
        "#!/bin/busybox sh\n/bin/busybox mount -t devtmpfs devtmpfs /dev\necho '{FLOOR_MARKER}' > /dev/ttyS0\n/bin/busybox poweroff -f\n"
    );
    initramfs.add_file("init", 0o755, init.into_bytes())?;
    let path = work.join("floor-initramfs");
    let mut file = std::fs::File::create(&path)?;
    initramfs.write_gzip(&mut file)?;
    Ok(path)
}

/// One floor boot: from starting QEMU to the marker on its console.
fn floor_boot(
    qemu: &Path,
    plan: &LaunchPlan,
    bundle: &Path,
    initramfs: &Path,
    accel: select::Accel,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut child = mvm_ir::env::command(qemu)
        .args(machine_arguments(plan, accel))
        .arg("-kernel")
        .arg(bundle.join(&plan.kernel.path))
        .arg("-initrd")
        .arg(initramfs)
        .arg("-append")
        .arg(kernel_command_line(plan, accel))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting QEMU for the floor")?;
    let mut console = child.stdout.take().context("no console")?;
    let mut seen = Vec::new();
    let mut buffer = [0; 4096];
    let elapsed = loop {
        let n = console.read(&mut buffer)?;
        if n == 0 || started.elapsed() > BOOT_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the floor guest never printed its marker");
        }
        seen.extend_from_slice(&buffer[..n]);
        if seen
            .windows(FLOOR_MARKER.len())
            .any(|w| w == FLOOR_MARKER.as_bytes())
        {
            break started.elapsed();
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    Ok(elapsed.as_secs_f64() * 1000.0)
}

/// The median of `samples` (NaN for none).
pub(super) fn median(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}
