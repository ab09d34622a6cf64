//! `mvm dev …`: the builder VM that stays up, which `mvm build --persona vm` (and `auto`)
//! builds in instead of booting a builder VM for each build.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;
use mvm_builder::builder_image::BuilderImage;
use mvm_runner::named_vm::VmHome;
use mvm_runner::state::{Phase, VmState};
use serde_json::json;

use super::Host;
use crate::output::Output;

/// The builder VM's name among the named VMs (`mvm ls`).
pub const BUILDER_VM: &str = "mvm-builder";

#[derive(Debug, Subcommand)]
pub enum DevCommand {
    /// Start the builder VM (`mvm builder fetch` first) from the builder's signed plan, as the
    /// named VM mvm-builder; returns once it is ready. `mvm build --persona vm` and `--persona
    /// auto` then build in it, without a boot for each build. A builder saved cold is woken.
    Up,
    /// The builder VM's state, and the builder image it would start from.
    Status,
    /// Print the builder VM's console (the guest kernel's and the agent's lines).
    Logs {
        /// Keep printing new lines while it runs.
        #[arg(short, long)]
        follow: bool,
    },
    /// Stop the builder VM and remove it: the next `mvm build --persona vm` boots one of its
    /// own, `--persona auto` builds on the host.
    Down,
}

/// The builder VM `mvm dev up` started, when it is running.
pub fn running_builder(host: &Host) -> Option<VmState> {
    VmHome::new(host.home.clone())
        .get(BUILDER_VM)
        .ok()?
        .state()
        .ok()
        .filter(|state| state.phase == Phase::Running)
}

pub fn run(cmd: DevCommand, out: &Output) -> anyhow::Result<ExitCode> {
    let host = Host::open()?;
    let vms = VmHome::new(host.home.clone());
    let builder = vms.get(BUILDER_VM).ok();
    let state = builder.as_ref().and_then(|vm| vm.state().ok());
    match cmd {
        DevCommand::Up => {
            let plan = host.home.root().join("builder/bundle/plan.dsse.json");
            BuilderImage::open(&host.home.root().join("builder/image")).map_err(super::coded)?;
            let mut mvm = mvm_ir::env::command(std::env::current_exe()?);
            if out.is_json() {
                mvm.arg("--json");
            }
            match state.map(|s| s.phase) {
                Some(Phase::Running) => {
                    out.result(json!({"vm": BUILDER_VM, "started": false}), || {
                        format!("{BUILDER_VM} is running already")
                    });
                    return Ok(ExitCode::SUCCESS);
                }
                Some(Phase::Cold | Phase::Paused) => mvm.args(["resume", BUILDER_VM]),
                Some(_) => {
                    // Stopped or failed: it goes, and a new one starts.
                    if let Some(vm) = builder {
                        vm.remove(true).map_err(super::vm::named_error)?;
                    }
                    mvm.args(["up", "--name", BUILDER_VM, "--plan"]).arg(&plan)
                }
                None => mvm.args(["up", "--name", BUILDER_VM, "--plan"]).arg(&plan),
            };
            passthrough(mvm)
        }
        DevCommand::Status => {
            let image = BuilderImage::open(&host.home.root().join("builder/image")).ok();
            let image_digest = image.as_ref().map(|i| i.manifest.image_digest.clone());
            out.result(json!({"vm": state, "image_digest": image_digest}), || {
                let vm = match &state {
                    Some(s) => format!(
                        "{BUILDER_VM} is {} (plan {})",
                        s.phase.name(),
                        s.plan_digest
                    ),
                    None => format!("{BUILDER_VM} is not started (`mvm dev up`)"),
                };
                let image = image_digest
                    .as_deref()
                    .unwrap_or("none (`mvm builder fetch`)");
                format!("{vm}\nbuilder image {image}")
            });
            Ok(ExitCode::SUCCESS)
        }
        DevCommand::Logs { follow } => {
            let mut mvm = mvm_ir::env::command(std::env::current_exe()?);
            mvm.args(["logs", BUILDER_VM]);
            if follow {
                mvm.arg("--follow");
            }
            passthrough(mvm)
        }
        DevCommand::Down => {
            let vm = vms.get(BUILDER_VM).map_err(super::vm::named_error)?;
            vm.remove(true).map_err(super::vm::named_error)?;
            out.result(json!({"removed": BUILDER_VM}), || {
                format!("removed {BUILDER_VM}")
            });
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Runs `mvm …` with this process's streams; its exit status.
fn passthrough(mut mvm: std::process::Command) -> anyhow::Result<ExitCode> {
    let status = mvm.status().context("starting mvm")?;
    Ok(ExitCode::from(
        status
            .code()
            .and_then(|c| u8::try_from(c).ok())
            .unwrap_or(1),
    ))
}
