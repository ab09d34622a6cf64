//! `mvm bench builder`: `mvm build` of one image, or one nix_packages workload, in the builder
//! VM (the running one `mvm dev up` started, else one booted for each build) against the host
//! persona, alternately; medians and the ratio.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::bail;
use serde_json::{json, Value};

use super::exec::percentile;

/// What is built.
#[derive(Debug)]
pub enum Target {
    /// An image (`REFERENCE@sha256:…`).
    Image(String),
    /// A nix_packages workload, its package set file, and the host persona's store.
    Nix {
        /// The workload's directory or declaration.
        workload: PathBuf,
        /// The package set file.
        package_set: PathBuf,
        /// The host persona's Nix store (the system's when none).
        store: Option<PathBuf>,
    },
}

impl Target {
    /// The arguments of `mvm build` for it, in `persona`.
    fn build_args(&self, persona: &str) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> = vec!["--json".into(), "build".into()];
        match self {
            Target::Image(image) => args.extend(["--image".into(), image.into()]),
            Target::Nix {
                workload,
                package_set,
                store,
            } => {
                args.extend([workload.into(), "--nix-packages".into(), package_set.into()]);
                if let (Some(store), "host") = (store, persona) {
                    args.extend(["--nix-store".into(), store.into()]);
                }
            }
        }
        args.extend(["--persona".into(), persona.into()]);
        args
    }

    fn label(&self) -> String {
        match self {
            Target::Image(image) => image.clone(),
            Target::Nix { workload, .. } => format!("the Nix workload {}", workload.display()),
        }
    }
}

/// Builds `target` `runs` times with each persona (into `work`) and compares the medians.
pub fn builder(target: &Target, runs: usize, work: &Path) -> anyhow::Result<(Value, String)> {
    let mut times = [Vec::new(), Vec::new()];
    for run in 0..runs {
        for (side, persona) in ["vm", "host"].iter().enumerate() {
            let out = work.join(format!("{persona}-{run}"));
            let started = Instant::now();
            let built = mvm_ir::env::command(std::env::current_exe()?)
                .args(target.build_args(persona))
                .arg("--out")
                .arg(&out)
                .output()?;
            if !built.status.success() {
                bail!(
                    "mvm build --persona {persona} failed: {}",
                    String::from_utf8_lossy(&built.stdout).trim()
                );
            }
            times[side].push(started.elapsed().as_secs_f64() * 1000.0);
            std::fs::remove_dir_all(&out)?;
        }
    }
    let [vm, host] = times.map(|t| percentile(&t, 50));
    let ratio = vm / host;
    let builder = match crate::commands::dev::running_builder(&crate::commands::Host::open()?) {
        Some(_) => "in the running builder (`mvm dev up`)",
        None => "a builder VM booted for each build",
    };
    let image = target.label();
    let value = json!({
        "image": image,
        "runs": runs,
        "vm_ms_p50": vm,
        "host_ms_p50": host,
        "ratio": ratio,
        "builder": builder,
    });
    let text = format!(
        "mvm build of {image}: builder VM {vm:.0} ms ({builder}), host persona {host:.0} ms (medians of {runs}): the VM takes {ratio:.2}x the host's time"
    );
    Ok((value, text))
}
