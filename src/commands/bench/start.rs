//! `mvm bench start`: a sandbox's start — `mvm-runner` start → its agent ready — from a cold
//! boot against a restore from the plan's boot snapshot (docs/boot-snapshots.md), alternately
//! in one run; then the memory N sandboxes hold (the proportional set size of their runners
//! and QEMUs) restored from one snapshot against booted.

use std::path::Path;
use std::process::Stdio;

use anyhow::Context;
use mvm_runner::named_vm::VmHome;
use serde_json::{json, Value};

use super::boot::{median, runner_boot};
use crate::commands::bundle::runner_command;
use crate::commands::Host;

/// Starts `plan` `runs` times cold and as often restored, alternately, then `vms` named VMs
/// each way for their memory; reports medians, the ratio (goal ≤ 0.2) and the PSS sums.
pub fn start(plan: &Path, runs: usize, vms: usize) -> anyhow::Result<(Value, String)> {
    let runner = crate::commands::bundle::sibling("MVM_RUNNER", "mvm-runner")?;
    // The snapshot made first, not measured: a restore is what later launches do.
    runner_boot(&runner, plan, "true", &[])?;
    let (mut cold, mut restored) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        cold.push(runner_boot(&runner, plan, "true", &["--cold-boot"])?.0);
        restored.push(runner_boot(&runner, plan, "true", &[])?.0);
    }
    let (cold_ms, restored_ms) = (median(&cold), median(&restored));
    let ratio = restored_ms / cold_ms;
    let (restored_pss, cold_pss) = match vms {
        0 => (0, 0),
        _ => (pss_of(plan, vms, false)?, pss_of(plan, vms, true)?),
    };
    let mib = |kib: u64| kib as f64 / 1024.0;
    let value = json!({
        "runs": runs,
        "cold_boot_to_ready_ms": cold_ms,
        "restore_to_ready_ms": restored_ms,
        "ratio": ratio,
        "goal_ratio": 0.2,
        "samples": {"cold_boot_to_ready_ms": cold, "restore_to_ready_ms": restored},
        "pss": {"vms": vms, "restored_kib": restored_pss, "cold_boot_kib": cold_pss},
    });
    let mut text = format!(
        "start ({runs} runs each, alternately): cold boot → agent ready {cold_ms:.0} ms; boot snapshot restore → agent ready {restored_ms:.0} ms; ratio {ratio:.2} (goal ≤ 0.2)"
    );
    if vms > 0 {
        text.push_str(&format!(
            "\n  memory of {vms} running sandboxes (PSS of runners and QEMUs): restored {:.0} MiB, cold booted {:.0} MiB; ratio {:.2}",
            mib(restored_pss),
            mib(cold_pss),
            restored_pss as f64 / cold_pss.max(1) as f64
        ));
    }
    Ok((value, text))
}

/// Starts `count` named VMs of `plan` (booted when `cold_boot`, restored otherwise), sums
/// the PSS of their runners and QEMUs once all run, and removes them.
fn pss_of(plan: &Path, count: usize, cold_boot: bool) -> anyhow::Result<u64> {
    let vms = VmHome::new(Host::open()?.home);
    let names: Vec<String> = (0..count)
        .map(|i| format!("bench-start-{}-{i}", std::process::id()))
        .collect();
    let measured = (|| {
        let mut pids = Vec::new();
        for name in &names {
            let mut runner = runner_command(std::time::Duration::from_secs(120))?;
            runner
                .arg("--plan")
                .arg(plan)
                .args(["--name", name])
                .stdin(Stdio::null());
            if cold_boot {
                runner.arg("--cold-boot");
            }
            let state = vms
                .start(runner)
                .map_err(|e| anyhow::anyhow!("starting {name}: {e}"))?;
            pids.push(state.runner_pid);
        }
        let mut total = 0;
        for pid in pids {
            total += pss_kib(pid)?;
            for child in children(pid)? {
                total += pss_kib(child)?;
            }
        }
        anyhow::Ok(total)
    })();
    for name in &names {
        if let Ok(vm) = vms.get(name) {
            let _ = vm.remove(true);
        }
    }
    measured
}

/// The proportional set size of process `pid`, KiB (`/proc/PID/smaps_rollup`).
fn pss_kib(pid: u32) -> anyhow::Result<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .with_context(|| format!("the memory of process {pid}"))?;
    rollup
        .lines()
        .find_map(|line| line.strip_prefix("Pss:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no Pss in /proc/{pid}/smaps_rollup"))
}

/// The children of process `pid` (its QEMU), from every thread's list.
fn children(pid: u32) -> anyhow::Result<Vec<u32>> {
    let mut found = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let list = std::fs::read_to_string(task?.path().join("children")).unwrap_or_default();
        found.extend(
            list.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    found.sort_unstable();
    found.dedup();
    Ok(found)
}
