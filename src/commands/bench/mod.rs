//! `mvm bench …`: measurements against the standard tools, in one run on the same input.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Subcommand;
use mvm_builder::bench::{self, Comparison};
use mvm_builder::erofs::Compression;
use serde_json::json;

use crate::output::Output;

mod api;
mod boot;
mod builder;
mod copy;
mod egress;
mod exec;
mod start;
mod vmm;
mod vmm_restore;
mod volume;

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
    /// Start: mvm-runner start → the agent ready for PLAN, booted cold (`--cold-boot`)
    /// against restored from the plan's boot snapshot (made first if need be), alternately;
    /// medians and the ratio (goal ≤ 0.2). Then the memory (PSS of runners and QEMUs) of
    /// --vms running sandboxes restored from the one snapshot against as many booted.
    Start {
        /// The plan (`plan.dsse.json` of a bundle); it must be reusable.
        #[arg(long)]
        plan: PathBuf,
        /// Starts of each kind.
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Sandboxes kept running at once for the memory figure (0: skip it).
        #[arg(long, default_value_t = 8)]
        vms: usize,
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
    /// The local API: `true`'s round trip through the Python SDK (which starts `mvm serve`
    /// if none runs) and through `mvm exec` (a process each), against the control socket's
    /// echo, on a running VM (`mvm up` first); p50, p99 and ratios.
    Api {
        /// The running VM.
        #[arg(long)]
        vm: String,
        /// Round trips of each.
        #[arg(long, default_value_t = 100)]
        runs: usize,
        /// A Python with the SDK installed (`pip install ./sdk/python`).
        #[arg(long, default_value = "python3")]
        python: String,
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
    /// Volumes: sequential writes (`conv=fsync`) and reads (`O_DIRECT`) of SIZE_MIB through an
    /// encrypted volume mounted at PATH in a running VM (`mvm up … --volume NAME:PATH`; its
    /// image needs busybox's `sh` and `dd`), against the same in the guest's /tmp (memory),
    /// timed in the guest (/proc/uptime around each dd); MB/s medians and ratios.
    Volume {
        /// The running VM.
        #[arg(long)]
        vm: String,
        /// Where the volume is mounted in it.
        #[arg(long)]
        path: String,
        /// Bytes per pass, in MiB (the volume and the guest's memory must hold them).
        #[arg(long, default_value_t = 64)]
        size_mib: u64,
        /// Passes of each kind.
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Egress: a guest's HTTP through its egress proxy to a server the bench runs on HOST:PORT,
    /// against the same fetch without the proxy path; p50/p99 of a small fetch, MB/s medians
    /// of a bulk one, and ratios.
    ///
    /// The bench serves `/small` (17 bytes) and `/bulk` (SIZE_MIB MiB) on HOST:PORT itself.
    /// The VM must be running (`mvm up … --allow-host HOST:PORT`; HOST an IP literal, which
    /// the operator lists in `[egress] allow_private` of $MVM_HOME/config.toml when it is a
    /// loopback or private address) and its image must have busybox (sh, wget, httpd, dd);
    /// the bench checks that a guest fetch reaches its server before it measures. Each round,
    /// on one connection to the VM:
    ///
    /// latency — `busybox wget -Y on -O /dev/null http://HOST:PORT/small` run as a command
    /// (an exec round trip: the command's fork and exit included) through the proxy; against
    /// the baseline, the same command with `-Y off` fetching the same 17 bytes from `busybox
    /// httpd` the bench starts on the guest's loopback (127.0.0.1:8089, stopped at the end):
    /// the same exec, wget and HTTP without the proxy path, so the difference is what the
    /// proxy path (guest proxy, agent channel, runner relay, host socket) adds; and the host
    /// fetching /small directly.
    ///
    /// bulk — the same wget of /bulk through the proxy; against `busybox dd if=/dev/zero
    /// bs=1M count=SIZE_MIB` as a command's stdout, discarded (the raw agent channel moving
    /// the same bytes), and the host fetching /bulk directly.
    Egress {
        /// The running VM, started with a grant of HOST:PORT.
        #[arg(long)]
        vm: String,
        /// Where the bench serves HTTP on this host (it must be free): the IP literal and
        /// port the VM is granted.
        #[arg(long, value_name = "HOST:PORT")]
        host: SocketAddr,
        /// Rounds, each timing all six fetches, after 3 untimed rounds of the small ones.
        #[arg(long, default_value_t = 20)]
        runs: usize,
        /// Size of /bulk, in MiB.
        #[arg(long, default_value_t = 64)]
        size_mib: u64,
    },
    /// mvm's own VMM on this host's /dev/kvm with the purpose-built test guest (assembled from
    /// source with as and ld): start → vCPU 0's first exit (goal ≤ 10 ms), the VMM's RSS
    /// without guest RAM (goal ≤ 3 MiB), allowed syscalls per thread (goal ≤ 40); medians,
    /// each boot in a fresh process. With --restore: a saved guest of 64 MiB, 1 GiB and 4 GiB
    /// restored with its RAM mapped from a flat image against read from a stream; restore
    /// start → first exit (goal ≤ 5 ms at every size).
    Vmm {
        /// Boots (with --restore: restores of each way), each in a fresh process.
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Measure restores instead of boots.
        #[arg(long)]
        restore: bool,
        /// One boot of this guest ELF in this process, its figures as JSON (what each run is).
        #[arg(long, hide = true, value_name = "ELF")]
        probe_guest: Option<PathBuf>,
        /// One restore of the guest saved in this directory, in this process, its figures as
        /// JSON (what each restore run is).
        #[arg(long, hide = true, value_name = "DIR", requires = "probe_way")]
        probe_restore: Option<PathBuf>,
        /// How the probe's restore brings RAM back.
        #[arg(long, hide = true, value_enum)]
        probe_way: Option<vmm_restore::RestoreWay>,
    },
    /// `mvm build --image IMAGE` in the builder VM (`mvm builder fetch` first) against the host
    /// persona, alternately; medians and the ratio.
    Builder {
        /// The image to build (REFERENCE@sha256:…).
        #[arg(
            long,
            required_unless_present = "workload",
            conflicts_with = "workload"
        )]
        image: Option<String>,
        /// A nix_packages workload to build instead (its directory or declaration), its
        /// packages looked up in --nix-packages.
        #[arg(long, value_name = "PATH", requires = "nix_packages")]
        workload: Option<std::path::PathBuf>,
        /// The Nix package set file of --workload (its directory goes into the builder VM).
        #[arg(long, value_name = "FILE")]
        nix_packages: Option<std::path::PathBuf>,
        /// For --workload: the host persona's Nix store (`nix-store --store DIR`); default the
        /// system's. The builder VM realises in its own.
        #[arg(long, value_name = "DIR")]
        nix_store: Option<std::path::PathBuf>,
        /// Builds with each persona.
        #[arg(long, default_value_t = 5)]
        runs: usize,
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
        BenchCommand::Api { vm, runs, python } => {
            let (value, text) = api::api(&vm, runs.max(1), &python)?;
            out.result(value, || text);
            return Ok(());
        }
        BenchCommand::Cp { vm, size_mib, runs } => {
            let (value, text) = copy::cp(&vm, size_mib.max(1), runs.max(1))?;
            out.result(value, || text);
            return Ok(());
        }
        BenchCommand::Volume {
            vm,
            path,
            size_mib,
            runs,
        } => {
            let (value, text) = volume::volume(&vm, &path, size_mib.max(1), runs.max(1))?;
            out.result(value, || text);
            return Ok(());
        }
        BenchCommand::Egress {
            vm,
            host,
            runs,
            size_mib,
        } => {
            let (value, text) = egress::egress(&vm, host, runs.max(1), size_mib.max(1))?;
            out.result(value, || text);
            return Ok(());
        }
        BenchCommand::Builder {
            image,
            workload,
            nix_packages,
            nix_store,
            runs,
        } => {
            let target = match (image, workload, nix_packages) {
                (Some(image), _, _) => builder::Target::Image(image),
                (None, Some(workload), Some(package_set)) => builder::Target::Nix {
                    workload,
                    package_set,
                    store: nix_store,
                },
                _ => anyhow::bail!("--image, or --workload with --nix-packages"),
            };
            let (value, text) = builder::builder(&target, runs.max(1), work.path())?;
            out.result(value, || text);
            return Ok(());
        }
        BenchCommand::Start { plan, runs, vms } => {
            let (value, text) = start::start(&plan, runs.max(1), vms)?;
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
        BenchCommand::Vmm {
            probe_restore: Some(dir),
            probe_way: Some(way),
            ..
        } => {
            println!("{}", vmm_restore::probe(&dir, way)?);
            return Ok(());
        }
        BenchCommand::Vmm {
            runs,
            restore: true,
            ..
        } => {
            let (value, text) = vmm_restore::restore(runs.max(1), work.path())?;
            out.result(value, || text);
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
