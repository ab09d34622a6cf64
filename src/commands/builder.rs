//! `mvm builder …`: the builder VM's image and its signed plan.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use mvm_builder::builder_image::{BuilderImage, PACKAGES, WORKER};
use serde_json::{json, Value};

use super::bundle::sibling;
use super::{coded, coded_as, coded_io, Host};
use crate::output::Output;

/// The builder VM's memory unless `mvm dev up --memory` says otherwise: Nix evaluation and
/// EROFS writing want more than a workload's default, and the restrictive profile allows up
/// to 2 GiB.
pub const BUILDER_MEMORY_MIB: u32 = 1024;

#[derive(Debug, Subcommand)]
pub enum BuilderCommand {
    /// Make the builder VM's image: Nix, busybox and CA certificates with everything they
    /// depend on, downloaded with apt (checked against the archive's signatures) and pinned
    /// by sha256, plus the static build worker; then build it, as `mvm build` builds any
    /// image, into a signed plan bundle under the restrictive profile, with no network.
    Fetch {
        /// The static build worker (default: mvm-build-worker next to mvm).
        #[arg(long, env = "MVM_BUILD_WORKER", value_name = "PATH")]
        worker: Option<PathBuf>,
        /// The guest agent binary, `/init` of the initramfs (default: mvm-agent next to mvm).
        #[arg(long, env = "MVM_AGENT", value_name = "PATH")]
        agent: Option<PathBuf>,
    },
    /// Show the builder image: its packages, worker and plan (the image re-checked against
    /// its pin).
    Show,
}

pub fn run(cmd: BuilderCommand, out: &Output) -> anyhow::Result<()> {
    let host = Host::open()?;
    let dir = host.home.ensure("builder")?;
    let (image_dir, bundle_dir) = (dir.join("image"), dir.join("bundle"));
    let (image, built) = match cmd {
        BuilderCommand::Fetch { worker, agent } => {
            let worker = match worker {
                Some(path) => path,
                None => sibling("MVM_BUILD_WORKER", "mvm-build-worker")?,
            };
            let agent = match agent {
                Some(path) => path,
                None => sibling("MVM_AGENT", "mvm-agent")?,
            };
            if !worker.is_file() {
                return Err(coded_as(
                    "BUILDER003",
                    format!(
                        "the build worker {} was not found: scripts/install puts it next to mvm, \
                         or build it static and pass --worker (docs/build.md)",
                        worker.display()
                    ),
                ));
            }
            let image = BuilderImage::fetch(&image_dir, &worker).map_err(coded)?;
            let built = build(&image, &bundle_dir, &agent, 1, BUILDER_MEMORY_MIB)?;
            // Plans of other sizes (`mvm dev up --cpus/--memory`) are made again from this
            // fetch when next asked for, with its agent and kernel.
            match std::fs::remove_dir_all(dir.join("sized")) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(anyhow::Error::new(e).context("removing builder/sized"))
                }
                _ => {}
            }
            host.audit(
                "builder.fetch",
                json!({"image_digest": image.manifest.image_digest,
                       "packages": image.manifest.packages.len(),
                       "worker_sha256": image.manifest.worker_sha256,
                       "plan_digest": built["plan_digest"]}),
            )?;
            (image, built)
        }
        BuilderCommand::Show => {
            let image = BuilderImage::open(&image_dir).map_err(coded)?;
            (image, json!({"out": bundle_dir}))
        }
    };
    let m = &image.manifest;
    out.result(
        json!({"image": image.reference(), "manifest": m, "bundle": built}),
        || {
            let asked: Vec<String> = m
                .packages
                .iter()
                .filter(|p| PACKAGES.contains(&p.package.as_str()))
                .map(|p| format!("{} {}", p.package, p.version))
                .collect();
            let mut text = format!(
                "builder image {}\n{} packages ({} and what they depend on), each pinned by sha256\nworker {} at {WORKER}",
                image.reference(),
                m.packages.len(),
                asked.join(", "),
                m.worker_sha256,
            );
            if let Some(plan) = built["plan_digest"].as_str() {
                text.push_str(&format!(
                    "\nplan {plan}\nrootfs {} (verity root {})\nbundle {}",
                    built["rootfs_digest"].as_str().unwrap_or("?"),
                    built["root_hash"].as_str().unwrap_or("?"),
                    bundle_dir.display()
                ));
            }
            text
        },
    );
    Ok(())
}

/// Builds `image` into the bundle `out` with `mvm build`, under the restrictive profile, with
/// `cpus` vCPUs and `memory_mib` of memory; its JSON report.
pub fn build(
    image: &BuilderImage,
    out: &std::path::Path,
    agent: &std::path::Path,
    cpus: u32,
    memory_mib: u32,
) -> anyhow::Result<Value> {
    let built = mvm_ir::env::command(std::env::current_exe()?)
        .args(["--json", "build", "--image", &image.reference()])
        .arg("--out")
        .arg(out)
        .arg("--agent")
        .arg(agent)
        .args([
            "--cpus",
            &cpus.to_string(),
            "--memory",
            &memory_mib.to_string(),
        ])
        .args(["--profile", "restrictive"])
        // Its clients run the build worker and nothing else: no shell into the builder.
        .arg("--only-entrypoint")
        .args(["--valid-for", "365days"])
        .output()
        .context("starting mvm build")?;
    let report: Value = serde_json::from_slice(&built.stdout).unwrap_or(Value::Null);
    if !built.status.success() {
        let code = report["error"]["code"].as_str().unwrap_or("BUILDER005");
        let message = report["error"]["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&built.stderr).trim().to_string());
        let message = format!("building the builder image: {message}");
        // Its own class: a refusal of the input stays one (exit 65), the rest is I/O.
        return Err(match built.status.code() {
            Some(65) => coded_as(code, message),
            _ => coded_io(code, message),
        });
    }
    Ok(report)
}
