//! `mvm bench vmm --restore`: mvm's own VMM restoring a saved guest of 64 MiB, 1 GiB and
//! 4 GiB on this host's `/dev/kvm`, two ways, alternately, each restore in a fresh process:
//! RAM mapped copy-on-write from a flat image (how a boot snapshot is restored) against RAM
//! read from the streamed snapshot (how a cold state is woken). Measured: from the restore's
//! start (nothing open yet) to vCPU 0's first exit after it is resumed — the guest running
//! again — with a goal of ≤ 5 ms at every size; and how much guest RAM is resident then.
//!
//! The guest is the purpose-built `spin` with `tick`. Before it is saved, the host fills its
//! RAM above 16 MiB (a guest that has used its memory: page cache, heap), so both images hold
//! every page and a restore that reads them pays for all of them.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::ValueEnum;
use mvm_vmm::test_guest::{self, Console};
use mvm_vmm::vstate::memory;
use mvm_vmm::{self as vmm, snapshot, VmConfig};
use serde_json::{json, Value};

use super::boot::median;
use super::vmm::{fresh_probe, usable_kvm, Rss};

/// Guest RAM of each size restored, in MiB.
const SIZES_MIB: [u64; 3] = [64, 1024, 4096];
/// Where the host's fill of guest RAM starts: above the guest's code and stack.
const FILL_FROM: u64 = 16 << 20;
/// The goal: restore start → first exit, at every size.
const GOAL_MS: f64 = 5.0;
/// A guest that takes longer to tick (boot or after its restore) is hung.
const LIMIT: Duration = Duration::from_secs(60);
/// The saved guest's files in its directory.
const FLAT: &str = "memory.flat";
const STATE: &str = "state.json";
const STREAM: &str = "stream.snap";
const GUEST: &str = "guest.elf";

/// How a saved guest's RAM comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RestoreWay {
    /// Mapped copy-on-write from the flat image.
    Flat,
    /// Read from the streamed snapshot into fresh RAM.
    Copy,
}

impl RestoreWay {
    fn name(self) -> &'static str {
        match self {
            RestoreWay::Flat => "flat",
            RestoreWay::Copy => "copy",
        }
    }
}

/// Saves the ticking guest at each size, then restores each `runs` times each way,
/// alternately; reports medians and ratios.
pub fn restore(runs: usize, work: &Path) -> anyhow::Result<(Value, String)> {
    let virt = usable_kvm()?;
    let guest = test_guest::assemble(work, "spin", &[test_guest::LIB, test_guest::SPIN])
        .context("assembling the test guest")?;
    let mut sizes = Vec::new();
    let mut lines = Vec::new();
    for memory_mib in SIZES_MIB {
        let dir = work.join(format!("{memory_mib}-mib"));
        fs::create_dir(&dir)?;
        fs::copy(&guest, dir.join(GUEST))?;
        save(&dir, memory_mib).with_context(|| format!("saving the {memory_mib} MiB guest"))?;
        let mut samples: Vec<(RestoreWay, Value)> = Vec::new();
        for _ in 0..runs {
            for way in [RestoreWay::Flat, RestoreWay::Copy] {
                let args = [
                    "--probe-restore".as_ref(),
                    dir.as_os_str(),
                    "--probe-way".as_ref(),
                    way.name().as_ref(),
                ];
                let sample = fresh_probe(&args)
                    .with_context(|| format!("a {} restore of {memory_mib} MiB", way.name()))?;
                samples.push((way, sample));
            }
        }
        let median_of = |way: RestoreWay, key: &str| {
            median(
                &samples
                    .iter()
                    .filter(|(w, _)| *w == way)
                    .map(|(_, s)| s[key].as_f64().unwrap_or(f64::NAN))
                    .collect::<Vec<_>>(),
            )
        };
        let flat_ms = median_of(RestoreWay::Flat, "first_exit_ms");
        let copy_ms = median_of(RestoreWay::Copy, "first_exit_ms");
        let flat_rss = median_of(RestoreWay::Flat, "guest_rss_kib");
        let kvm_vm_ms = median_of(RestoreWay::Flat, "kvm_vm_ms");
        let copy_rss = median_of(RestoreWay::Copy, "guest_rss_kib") / 1024.0;
        for entry in fs::read_dir(&dir)? {
            fs::remove_file(entry?.path())?;
        }
        lines.push(format!(
            "  {memory_mib:>5} MiB: flat {flat_ms:.2} ms (goal ≤ {GOAL_MS} ms: {}), copy {copy_ms:.1} ms: \
             flat {:.0}x faster; a bare KVM VM with this RAM takes {kvm_vm_ms:.2} ms to make; \
             guest RAM resident then: flat {flat_rss:.0} KiB, copy {copy_rss:.0} MiB",
            if flat_ms <= GOAL_MS { "met" } else { "NOT met" },
            copy_ms / flat_ms,
        ));
        sizes.push(json!({
            "memory_mib": memory_mib,
            "flat_first_exit_ms": flat_ms,
            "copy_first_exit_ms": copy_ms,
            "ratio": copy_ms / flat_ms,
            "flat_guest_rss_kib": flat_rss,
            "kvm_vm_ms": kvm_vm_ms,
            "copy_guest_rss_mib": copy_rss,
            "samples": samples.iter().map(|(w, s)| json!({"way": w.name(), "sample": s})).collect::<Vec<_>>(),
        }));
    }
    let flat: Vec<f64> = sizes
        .iter()
        .map(|s| s["flat_first_exit_ms"].as_f64().unwrap_or(f64::NAN))
        .collect();
    let met = flat.iter().all(|ms| *ms <= GOAL_MS);
    let value = json!({
        "runs": runs,
        "virtualization": virt.to_string(),
        "guest": "spin with tick (vmm/tests/guest), 1 vCPU, RAM above 16 MiB filled before the save",
        "goal_first_exit_ms": GOAL_MS,
        "goal_met": met,
        "sizes": sizes,
    });
    let text = format!(
        "vmm restore ({runs} runs of each way, alternately, each a fresh process; {virt}; the spin test guest, \
         1 vCPU, RAM above 16 MiB filled), medians of restore start → vCPU 0's first exit after resume:\n{}\n  \
         flat at every size ≤ {GOAL_MS} ms: {}",
        lines.join("\n"),
        if met { "met" } else { "NOT met" },
    );
    Ok((value, text))
}

/// The guest's configuration in `dir`, with `memory_mib` of RAM, its console into `console`.
fn config(dir: &Path, memory_mib: u64, console: &Console, log: &str) -> anyhow::Result<VmConfig> {
    Ok(VmConfig {
        vcpus: 1,
        memory_mib,
        kernel: File::open(dir.join(GUEST))?,
        initrd: None,
        cmdline: "tick".into(),
        console_log: console.logging_into(File::create(dir.join(log))?),
        block: Vec::new(),
        console_port: None,
        rng: false,
        huge_pages: false,
    })
}

/// Waits until the guest behind `console` has ticked `ticks` times.
fn ticked(console: &Console, ticks: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + LIMIT;
    while console.tail().matches(".\n").count() < ticks {
        if Instant::now() > deadline {
            bail!("the guest did not tick: {:?}", console.tail());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(())
}

/// Boots the guest with `memory_mib`, lets it tick, pauses it, fills its RAM and saves it
/// both ways into `dir`.
fn save(dir: &Path, memory_mib: u64) -> anyhow::Result<()> {
    let console = Console::default();
    let vm = vmm::build(config(dir, memory_mib, &console, "boot.log")?)
        .map_err(|e| anyhow::anyhow!("error {}: {e}", e.code()))?;
    ticked(&console, 3)?;
    let machine = vm.machine();
    machine.pause()?;
    machine.fill_ram(FILL_FROM, 0xa5)?;
    let flat = File::create_new(dir.join(FLAT))?;
    let state = machine.save_flat(&flat)?;
    flat.sync_all()?;
    fs::write(dir.join(STATE), snapshot::state_json(&state)?)?;
    let mut stream = BufWriter::new(File::create_new(dir.join(STREAM))?);
    machine.save(&mut stream)?;
    stream.flush()?;
    vm.stop();
    Ok(())
}

/// One restore of the guest saved in `dir`, `way`, in this process, its figures as JSON.
pub fn probe(dir: &Path, way: RestoreWay) -> anyhow::Result<Value> {
    let console = Console::default();
    let started = Instant::now();
    let state = fs::read(dir.join(STATE))?;
    let saved = snapshot::parse(&state)?;
    let config = config(dir, saved.memory_mib, &console, "restore.log")?;
    let (ram, saved) = match way {
        RestoreWay::Flat => {
            let image = File::open(dir.join(FLAT))?;
            let ram =
                memory::map_flat(saved.memory_mib << 20, &image).map_err(anyhow::Error::msg)?;
            (ram, saved)
        }
        RestoreWay::Copy => {
            let ram = vmm::builder::guest_ram(&config)?;
            let mut reader = snapshot::SnapshotReader::new(&ram);
            std::io::copy(&mut File::open(dir.join(STREAM))?, &mut reader)?;
            let saved = snapshot::parse(&reader.finish()?)?;
            (ram, saved)
        }
    };
    let loaded = started.elapsed();
    let vm = vmm::restore(config, ram, &saved)?;
    vm.machine().resume()?;
    let deadline = Instant::now() + LIMIT;
    let first_exit = loop {
        if let Some(first_exit) = vm.time_to_first_exit() {
            break first_exit;
        }
        if Instant::now() > deadline {
            bail!("vCPU 0 never left the restored guest");
        }
        std::thread::sleep(Duration::from_micros(50));
    };
    let resident = Rss::read(&vm.guest_ram_host_ranges())?;
    // It runs on where it was: it ticks, and does not start over.
    ticked(&console, 1)?;
    let tail = console.tail();
    vm.stop();
    if tail.contains("spinning") {
        bail!("the restored guest started over: {tail:?}");
    }
    // What KVM alone spends on a VM with this much RAM (its memory slots' bookkeeping, which
    // grows with their size where KVM shadows the guest's page tables, as under PVM): a bare
    // KVM VM given the image mapped afresh, timed on its own.
    let image = File::open(dir.join(FLAT))?;
    let ram = memory::map_flat(saved.memory_mib << 20, &image).map_err(anyhow::Error::msg)?;
    let bare = Instant::now();
    let kvm_vm = mvm_vmm::vstate::vm::Vm::new(ram)?;
    let kvm_vm_took = bare.elapsed();
    drop(kvm_vm);
    Ok(json!({
        "first_exit_ms": (loaded + first_exit).as_secs_f64() * 1000.0,
        "load_ms": loaded.as_secs_f64() * 1000.0,
        "kvm_vm_ms": kvm_vm_took.as_secs_f64() * 1000.0,
        "guest_rss_kib": resident.guest_kib,
    }))
}
