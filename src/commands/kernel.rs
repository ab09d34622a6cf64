//! `mvm kernel …`: the guest kernels this host builds with.

use std::path::PathBuf;

use clap::Subcommand;
use mvm_builder::kernel::{KernelStore, DEBIAN_CLOUD_KERNEL};
use serde_json::json;

use super::Host;
use crate::output::Output;

#[derive(Debug, Subcommand)]
pub enum KernelCommand {
    /// Download the Debian cloud kernel with apt (or store a given .deb, or a user-supplied
    /// bzImage and modules directory), extract vmlinuz, vmlinux and the guest's modules, and
    /// pin every file by sha256.
    Fetch {
        /// The Debian package (a metapackage is followed to its kernel).
        #[arg(long, default_value = DEBIAN_CLOUD_KERNEL, conflicts_with = "deb")]
        package: String,
        /// Store the kernel from this .deb file instead of downloading.
        #[arg(long, conflicts_with = "vmlinuz")]
        deb: Option<PathBuf>,
        /// Store a user-supplied kernel: this bzImage ...
        #[arg(long, requires = "modules")]
        vmlinuz: Option<PathBuf>,
        /// ... with the modules of the same build (a `lib/modules/<release>` directory).
        #[arg(long, requires = "vmlinuz")]
        modules: Option<PathBuf>,
    },
    /// Show the newest stored kernel, its modules and pins (re-verified).
    Show,
}

pub fn run(cmd: KernelCommand, out: &Output) -> anyhow::Result<()> {
    let host = Host::open()?;
    let store = KernelStore::at(&host.home.ensure("kernels")?);
    let kernel = match cmd {
        KernelCommand::Fetch {
            package,
            deb,
            vmlinuz,
            modules,
        } => {
            let kernel = match (deb, vmlinuz, modules) {
                (Some(deb), _, _) => store.import_deb(&deb),
                (None, Some(vmlinuz), Some(modules)) => store.import_files(&vmlinuz, &modules),
                _ => store.fetch_debian(&package),
            }
            .map_err(super::coded)?;
            host.audit(
                "kernel.fetch",
                json!({"release": kernel.manifest.release, "package": kernel.manifest.package.name,
                       "package_digest": kernel.manifest.package.digest}),
            )?;
            kernel
        }
        KernelCommand::Show => store.latest().map_err(super::coded)?,
    };
    let m = &kernel.manifest;
    out.result(json!({"dir": kernel.dir, "manifest": m}), || {
        let modules: Vec<&str> = m.modules.iter().map(|m| m.name.as_str()).collect();
        format!(
            "kernel {} ({} {})\nvmlinuz {}\nvmlinux {}\nmodules {}\nin {}",
            m.release,
            m.package.name,
            m.package.version,
            m.vmlinuz.digest,
            m.vmlinux
                .as_ref()
                .map_or("(not extracted)", |p| p.digest.as_str()),
            modules.join(" "),
            kernel.dir.display()
        )
    });
    Ok(())
}
