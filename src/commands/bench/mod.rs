//! `mvm bench …`: measurements against the standard tools, in one run on the same input.

use std::path::PathBuf;

use clap::Subcommand;
use mvm_builder::bench::{self, Comparison};
use mvm_builder::erofs::Compression;
use serde_json::json;

use crate::output::Output;

mod boot;
mod copy;
mod exec;
mod vmm;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Tree → EROFS image (+ verity tree) against mkfs.erofs (+ veritysetup format) on the same
    /// directory; prints medians and ratios.
    Image {
        /// The directory to image.
        #[arg(long, default_value = "/usr/lib/python3.11")]
        source: PathBuf,
        /// Runs of each side.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Compress both images: `lz4`, `lz4hc` or `lz4hc,LEVEL` (mkfs.erofs `-zlz4`,
        /// `-zlz4hc,LEVEL`); `none` by default.
        #[arg(long, value_name = "ALGORITHM", default_value = "none")]
        compress: Compression,
    },
    /// Boot: mvm-runner start → the agent's hello for PLAN (running `true`), against plain
    /// QEMU on the same machine booting the same kernel with a minimal initramfs to a marker;
    /// medians, the ratio (goal ≤ 1.15) and the guest's own boot timings.
    Boot {
        /// The plan to boot (`plan.dsse.json` of a bundle from `mvm build`); it must be reusable.
        #[arg(long)]
        plan: PathBuf,
        /// Boots of each side.
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// The command each boot runs after the hello (it is not part of the measurement).
        #[arg(long, default_value = "true")]
        command: String,
    },
    /// Exec: a command's round trip on a running VM (`mvm up` first) against an echo request
    /// over the same channel, alternately; p50, p99 and the ratio.
    Exec {
        /// The running VM.
        #[arg(long)]
        vm: String,
        /// Round trips of each.
        #[arg(long, default_value_t = 1000)]
        runs: usize,
        /// The command (it must exist in the image and exit 0).
        #[arg(last = true, default_value = "true")]
        command: Vec<String>,
    },
    /// Copies: `mvm cp` into and out of a running VM (`mvm up` first; its image needs `sh` and
    /// `cat`) against the same bytes as a command's input and output over the same channel;
    /// MB/s medians and ratios (goal ≥ 0.8).
    Cp {
        /// The running VM.
        #[arg(long)]
        vm: String,
        /// Bytes per copy, in MiB (they land in the guest's /tmp, which is memory).
        #[arg(long, default_value_t = 64)]
        size_mib: u64,
        /// Copies of each kind.
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// mvm's own VMM on this host's /dev/kvm with the purpose-built test guest (assembled from
    /// source with as and ld): start → vCPU 0's first exit (goal ≤ 10 ms), the VMM's RSS
    /// without guest RAM (goal ≤ 3 MiB), allowed syscalls per thread (goal ≤ 40); medians,
    /// each boot in a fresh process.
    Vmm {
        /// Boots, each in a fresh process.
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// One boot of this guest ELF in this process, its figures as JSON (what each run is).
        #[arg(long, hide = true, value_name = "ELF")]
        probe_guest: Option<PathBuf>,
    },
    /// Verity hashing against veritysetup format on the same file; prints medians and the ratio.
    Verity {
        /// Image size in MiB.
        #[arg(long, default_value_t = 256)]
        size_mib: u64,
        /// Runs of each side.
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
}

pub fn run(cmd: BenchCommand, out: &Output) -> anyhow::Result<()> {
    let work = tempfile::Builder::new().prefix("mvm-bench-").tempdir()?;
    let results = match cmd {
        BenchCommand::Exec { vm, runs, command } => {
            let (value, text) = exec::exec(&vm, runs.max(1), &command)?;
            out.result(value, || text);
            return Ok(());
        }
        BenchCommand::Cp { vm, size_mib, runs } => {
            let (value, text) = copy::cp(&vm, size_mib.max(1), runs.max(1))?;
            out.result(value, || text);
            return Ok(());
        }
        BenchCommand::Boot {
            plan,
            runs,
            command,
        } => {
            let (value, text) = boot::boot(&plan, runs.max(1), &command, work.path())?;
            out.result(value, || text);
            return Ok(());
        }
        BenchCommand::Vmm {
            probe_guest: Some(guest),
            ..
        } => {
            println!("{}", vmm::probe(&guest)?);
            return Ok(());
        }
        BenchCommand::Vmm { runs, .. } => {
            let (value, text) = vmm::vmm(runs.max(1), work.path())?;
            out.result(value, || text);
            return Ok(());
        }
        BenchCommand::Image {
            source,
            runs,
            compress,
        } => bench::image(&source, work.path(), runs.max(1), compress)?,
        BenchCommand::Verity { size_mib, runs } => {
            vec![bench::verity(size_mib.max(1), work.path(), runs.max(1))?]
        }
    };
    out.result(json!({ "results": results }), || {
        results.iter().map(describe).collect::<Vec<_>>().join("\n")
    });
    Ok(())
}

fn describe(c: &Comparison) -> String {
    format!(
        "{}: mvm {:.1} ms, {} {:.1} ms (medians of {}): mvm {:.2}x faster\n  {}",
        c.what, c.mvm_ms, c.peer, c.peer_ms, c.runs, c.ratio, c.note
    )
}
