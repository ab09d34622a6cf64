//! `mvm bench api`: a command's round trip through the Python SDK (and so `mvm serve`) and
//! through `mvm exec` (a process each), against the control socket's own echo, on the same
//! running VM in one run.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use super::exec::percentile;
use crate::commands::vm::connect;

/// Untimed rounds of each first.
const WARM_UP: usize = 5;
/// The SDK's side, run by `python`.
const SDK_RUNS: &str = include_str!("api/sdk_runs.py");

/// Round trips of `true` on the running VM `name`: `runs` through the SDK (run by
/// `python`, which must have the SDK installed), through `mvm exec`, and echoes.
pub fn api(name: &str, runs: usize, python: &str) -> anyhow::Result<(Value, String)> {
    let limit = Duration::from_secs(60);
    let mut client = connect(name, Default::default())?;
    let mut echoes = Vec::with_capacity(runs);
    for round in 0..WARM_UP + runs {
        let started = Instant::now();
        client.echo(limit)?;
        if round >= WARM_UP {
            echoes.push(started.elapsed().as_secs_f64() * 1000.0);
        }
    }
    drop(client);
    let mvm = std::env::current_exe()?;
    let mut execs = Vec::with_capacity(runs);
    for round in 0..WARM_UP + runs {
        let started = Instant::now();
        let status = mvm_ir::env::command(&mvm)
            .args(["exec", name, "--", "true"])
            .status()
            .context("running mvm exec")?;
        if !status.success() {
            bail!("mvm exec {name} -- true: {status}");
        }
        if round >= WARM_UP {
            execs.push(started.elapsed().as_secs_f64() * 1000.0);
        }
    }
    // The SDK starts `mvm serve` (this mvm) when none answers.
    let sdk = mvm_ir::env::command(python)
        .args([
            "-c",
            SDK_RUNS,
            name,
            &runs.to_string(),
            &WARM_UP.to_string(),
        ])
        .env("MVM_BIN", &mvm)
        .output()
        .with_context(|| format!("running {python}"))?;
    if !sdk.status.success() {
        bail!(
            "the Python SDK's runs failed ({}): {}\n(is the SDK installed for {python}? `pip install ./sdk/python`, or --python)",
            sdk.status,
            String::from_utf8_lossy(&sdk.stderr).trim()
        );
    }
    let sdks: Vec<f64> =
        serde_json::from_slice(&sdk.stdout).context("the Python SDK's runs' output")?;
    let p = |samples: &[f64]| (percentile(samples, 50), percentile(samples, 99));
    let ((sdk50, sdk99), (exec50, exec99), (echo50, echo99)) = (p(&sdks), p(&execs), p(&echoes));
    let value = json!({
        "runs": runs,
        "sdk_ms": {"p50": sdk50, "p99": sdk99},
        "mvm_exec_ms": {"p50": exec50, "p99": exec99},
        "echo_ms": {"p50": echo50, "p99": echo99},
        "sdk_over_echo_p50": sdk50 / echo50,
        "mvm_exec_over_echo_p50": exec50 / echo50,
        "sdk_over_mvm_exec_p50": sdk50 / exec50,
    });
    let text = format!(
        "`true` on {name} ({runs} runs of each after {WARM_UP} warm-up):\n\
         Python SDK (mvm serve): p50 {sdk50:.2} ms, p99 {sdk99:.2} ms\n\
         mvm exec (a process):   p50 {exec50:.2} ms, p99 {exec99:.2} ms\n\
         control socket echo:    p50 {echo50:.3} ms, p99 {echo99:.3} ms\n\
         ratios (p50): SDK/echo {:.1}, mvm exec/echo {:.1}, SDK/mvm exec {:.2}",
        sdk50 / echo50,
        exec50 / echo50,
        sdk50 / exec50
    );
    Ok((value, text))
}
