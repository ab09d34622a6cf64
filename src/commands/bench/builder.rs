//! `mvm bench builder`: `mvm build` of one image in the builder VM (the running one `mvm dev
//! up` started, else one booted for each build) against the host persona, alternately; medians
//! and the ratio.

use std::path::Path;
use std::time::Instant;

use anyhow::bail;
use serde_json::{json, Value};

use super::exec::percentile;

/// Builds `image` `runs` times with each persona (into `work`) and compares the medians.
pub fn builder(image: &str, runs: usize, work: &Path) -> anyhow::Result<(Value, String)> {
    let mut times = [Vec::new(), Vec::new()];
    for run in 0..runs {
        for (side, persona) in ["vm", "host"].iter().enumerate() {
            let out = work.join(format!("{persona}-{run}"));
            let started = Instant::now();
            let built = mvm_ir::env::command(std::env::current_exe()?)
                .args([
                    "--json",
                    "build",
                    "--image",
                    image,
                    "--persona",
                    persona,
                    "--out",
                ])
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
