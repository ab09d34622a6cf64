//! `mvm bench vmm`: mvm's own VMM on this host's `/dev/kvm`, with the purpose-built
//! `boot_check` test guest (assembled from source): start → vCPU 0's first exit, the memory
//! the VMM itself takes (guest RAM left out), and how many syscalls each of its threads may
//! make under seccomp.
//!
//! Each boot runs in a fresh process (this binary again, with the hidden `--probe-guest`), so
//! no boot finds the allocator, thread stacks or code pages warmed by the one before.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use mvm_runner::backend::select::VirtKind;
use mvm_vmm::{self as vmm, seccomp, test_guest, GuestExit, VmConfig};
use serde_json::{json, Value};

use super::boot::median;

/// Guest RAM for each boot.
const MEMORY_MIB: u64 = 64;
/// The guest's command line (its marker first).
const CMDLINE: &str = "mvm-test-guest console=ttyS0";
/// A boot that takes longer is a hung guest (under PVM it takes ~30 ms).
const BOOT_LIMIT: Duration = Duration::from_secs(60);
/// The goals this bench checks.
const GOAL_FIRST_EXIT_MS: f64 = 10.0;
const GOAL_RSS_MIB: f64 = 3.0;
const GOAL_SYSCALLS: usize = 40;

/// Boots the test guest `runs` times, each in a fresh process, and reports medians.
pub fn vmm(runs: usize, work: &Path) -> anyhow::Result<(Value, String)> {
    let virt = usable_kvm()?;
    let guest = test_guest::assemble(
        work,
        "boot_check",
        &[test_guest::LIB, test_guest::BOOT_CHECK],
    )
    .context("assembling the test guest")?;
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        samples.push(fresh_probe(&["--probe-guest".as_ref(), guest.as_os_str()])?);
    }
    let median_of = |key: &str| {
        median(
            &samples
                .iter()
                .map(|s| s[key].as_f64().unwrap_or(f64::NAN))
                .collect::<Vec<_>>(),
        )
    };
    let first_exit_ms = median_of("first_exit_ms");
    let power_off_ms = median_of("power_off_ms");
    let vmm_rss_mib = median_of("vmm_rss_kib") / 1024.0;
    let process_rss_mib = median_of("process_rss_kib") / 1024.0;
    let guest_rss_mib = median_of("guest_rss_kib") / 1024.0;
    let syscalls: Vec<(String, usize)> = seccomp::allowed_counts()
        .into_iter()
        .map(|(kind, n)| (kind.name().to_string(), n))
        .collect();
    let most = syscalls.iter().map(|(_, n)| *n).max().unwrap_or(0);
    let hello = hello_comparison(&virt);
    let value = json!({
        "runs": runs,
        "virtualization": virt.to_string(),
        "guest": "boot_check (vmm/tests/guest), 1 vCPU, 64 MiB",
        "start_to_first_exit_ms": first_exit_ms,
        "goal_start_to_first_exit_ms": GOAL_FIRST_EXIT_MS,
        "start_to_power_off_ms": power_off_ms,
        "vmm_rss_mib": vmm_rss_mib,
        "goal_vmm_rss_mib": GOAL_RSS_MIB,
        "process_rss_mib": process_rss_mib,
        "guest_rss_mib": guest_rss_mib,
        "allowed_syscalls": syscalls.iter().map(|(kind, n)| (kind.clone(), json!(n))).collect::<serde_json::Map<_, _>>(),
        "goal_allowed_syscalls": GOAL_SYSCALLS,
        "hello_vs_qemu": hello.clone(),
        "samples": samples,
    });
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    let text = format!(
        "vmm ({runs} runs, each a fresh process; {virt}; the boot_check test guest, 1 vCPU, {MEMORY_MIB} MiB), medians:\n  \
         vmm::build → vCPU 0's first exit: {first_exit_ms:.2} ms (goal ≤ {GOAL_FIRST_EXIT_MS} ms: {}); → the guest's power-off: {power_off_ms:.1} ms\n  \
         VMM RSS, guest RAM left out: {vmm_rss_mib:.2} MiB (goal ≤ {GOAL_RSS_MIB} MiB: {}) — the resident set the VM added to its process; \
         the whole process: {process_rss_mib:.2} MiB (the mvm binary's own pages included); guest RAM resident: {guest_rss_mib:.2} MiB\n  \
         seccomp, allowed syscalls per thread: {} (goal ≤ {GOAL_SYSCALLS}: {})\n  \
         boot → agent hello vs qemu-system-x86_64 -M microvm -enable-kvm: {}",
        verdict(first_exit_ms <= GOAL_FIRST_EXIT_MS),
        verdict(vmm_rss_mib <= GOAL_RSS_MIB),
        syscalls
            .iter()
            .map(|(kind, n)| format!("{kind} {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        verdict(most <= GOAL_SYSCALLS),
        hello["note"].as_str().unwrap_or_default(),
    );
    Ok((value, text))
}

/// This host's virtualization, when the own VMM can run on it.
pub(super) fn usable_kvm() -> anyhow::Result<VirtKind> {
    let virt = VirtKind::detect();
    if matches!(virt, VirtKind::NoKvm | VirtKind::Unusable { .. }) {
        bail!("mvm's own VMM needs a usable /dev/kvm; this host has {virt}");
    }
    Ok(virt)
}

/// Runs `mvm bench vmm ARGS` (a hidden probe) as a fresh process, so that no run finds
/// anything warmed by the one before; returns the JSON report it prints.
pub(super) fn fresh_probe(args: &[&OsStr]) -> anyhow::Result<Value> {
    let out = mvm_ir::env::command(std::env::current_exe()?)
        .args(["bench", "vmm"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("starting a probe")?;
    if !out.status.success() {
        bail!(
            "a probe failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("a probe's report")
}

/// Why the boot → hello comparison with QEMU on KVM is not part of this bench here.
fn hello_comparison(virt: &VirtKind) -> Value {
    let note = match virt {
        VirtKind::Hardware { .. } => format!(
            "not measured by this bench: it needs a plan booted by the kvm backend; this host has {virt}, so `mvm bench boot --plan …` can compare"
        ),
        _ => format!(
            "skipped: it needs hardware virtualization (vmx or svm with kvm_intel or kvm_amd) to boot Linux on either side; this host has {virt}, on which a stock kernel does not boot at a usable speed (docs/vmm.md)"
        ),
    };
    json!({"measured": false, "note": note})
}

/// One boot of `guest` in this process (the hidden `--probe-guest`): prints its figures as
/// JSON on stdout.
pub fn probe(guest: &Path) -> anyhow::Result<Value> {
    let dir = tempfile::Builder::new()
        .prefix("mvm-bench-vmm-")
        .tempdir()?;
    let before = Rss::read(&[])?;
    let started = Instant::now();
    let vm = vmm::build(VmConfig {
        vcpus: 1,
        memory_mib: MEMORY_MIB,
        kernel: std::fs::File::open(guest).with_context(|| guest.display().to_string())?,
        initrd: None,
        cmdline: CMDLINE.into(),
        console_log: Box::new(std::fs::File::create(dir.path().join("serial.log"))?),
        block: Vec::new(),
        console_port: None,
        rng: false,
        huge_pages: false,
    })
    .map_err(|e| anyhow::anyhow!("error {}: {e}", e.code()))?;
    let exit = vm.wait(BOOT_LIMIT);
    let power_off = started.elapsed();
    let running = Rss::read(&vm.guest_ram_host_ranges())?;
    let first_exit = vm.time_to_first_exit();
    let end = vm.stop();
    if exit != Some(GuestExit::PowerOff) {
        bail!("the test guest did not power off: {end:?}");
    }
    let first_exit = first_exit.context("vCPU 0 never left the guest")?;
    Ok(json!({
        "first_exit_ms": first_exit.as_secs_f64() * 1000.0,
        "power_off_ms": power_off.as_secs_f64() * 1000.0,
        "vmm_rss_kib": running.total_kib.saturating_sub(running.guest_kib).saturating_sub(before.total_kib),
        "process_rss_kib": running.total_kib - running.guest_kib,
        "guest_rss_kib": running.guest_kib,
    }))
}

/// This process's resident set, split into guest RAM and the rest.
pub(super) struct Rss {
    total_kib: u64,
    /// Of it, inside guest RAM.
    pub(super) guest_kib: u64,
}

impl Rss {
    /// Reads `/proc/self/smaps`; mappings inside `guest` count as guest RAM.
    pub(super) fn read(guest: &[std::ops::Range<usize>]) -> anyhow::Result<Rss> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").context("/proc/self/smaps")?;
        let (mut total_kib, mut guest_kib, mut in_guest) = (0, 0, false);
        for line in smaps.lines() {
            if let Some(kib) = line.strip_prefix("Rss:") {
                let kib: u64 = kib.trim().trim_end_matches("kB").trim().parse()?;
                total_kib += kib;
                if in_guest {
                    guest_kib += kib;
                }
            } else if let Some((range, _)) = line.split_once(' ') {
                // A mapping's header: `start-end perms …` (hex addresses).
                let bounds = range.split_once('-').and_then(|(start, end)| {
                    Some((
                        usize::from_str_radix(start, 16).ok()?,
                        usize::from_str_radix(end, 16).ok()?,
                    ))
                });
                if let Some((start, end)) = bounds {
                    in_guest = guest.iter().any(|r| start < r.end && r.start < end);
                }
            }
        }
        Ok(Rss {
            total_kib,
            guest_kib,
        })
    }
}
