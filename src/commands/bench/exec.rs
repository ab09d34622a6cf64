//! `mvm bench exec`: a command's round trip on a warm VM against the bare channel's, measured
//! alternately in one run over the same control socket and agent channel.

use std::time::{Duration, Instant};

use anyhow::bail;
use mvm_protocol::{ExecRequest, ExitStatus};
use mvm_runner::client::OutputSink;
use serde_json::{json, Value};

use crate::commands::vm::connect;

/// Untimed rounds first: caches, the first fork in the guest.
const WARM_UP: usize = 10;

/// Round trips of `command` and of an echo request on the running VM `name`, `runs` of each.
pub fn exec(name: &str, runs: usize, command: &[String]) -> anyhow::Result<(Value, String)> {
    let mut client = connect(name, Default::default())?;
    let request = ExecRequest {
        argv: command.to_vec(),
        env: Default::default(),
        cwd: None,
        timeout_ms: 60_000,
        stdin: false,
        user: None,
        tty: None,
    };
    let limit = Duration::from_secs(90);
    let (mut execs, mut echoes) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    for round in 0..WARM_UP + runs {
        let started = Instant::now();
        client.echo(limit)?;
        let echo = started.elapsed();
        let started = Instant::now();
        let executed = client.exec(request.clone(), limit, &mut Discard)?;
        let exec = started.elapsed();
        if executed.reply.status != (ExitStatus::Exited { code: 0 }) {
            bail!("{command:?} did not exit 0: {:?}", executed.reply.status);
        }
        if round >= WARM_UP {
            echoes.push(echo.as_secs_f64() * 1000.0);
            execs.push(exec.as_secs_f64() * 1000.0);
        }
    }
    let (exec_p50, exec_p99) = (percentile(&execs, 50), percentile(&execs, 99));
    let (echo_p50, echo_p99) = (percentile(&echoes, 50), percentile(&echoes, 99));
    let ratio = exec_p50 / echo_p50;
    let value = json!({
        "runs": runs,
        "command": command,
        "exec_ms": {"p50": exec_p50, "p99": exec_p99},
        "echo_ms": {"p50": echo_p50, "p99": echo_p99},
        "ratio_p50": ratio,
        "goal_ratio": 1.5,
    });
    let text = format!(
        "exec {command:?} on {name} ({runs} runs after {WARM_UP} warm-up): p50 {exec_p50:.2} ms, p99 {exec_p99:.2} ms\n\
         echo over the same channel: p50 {echo_p50:.3} ms, p99 {echo_p99:.3} ms\n\
         ratio (p50) {ratio:.1} (goal ≤ 1.5 on hardware virtualization)"
    );
    Ok((value, text))
}

/// The `p`th percentile (nearest rank) of `samples`.
pub(super) fn percentile(samples: &[f64], p: usize) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len()).div_ceil(100).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Output is not part of the measurement.
pub(super) struct Discard;

impl OutputSink for Discard {
    fn stdout(&mut self, _: &[u8]) -> std::io::Result<()> {
        Ok(())
    }

    fn stderr(&mut self, _: &[u8]) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&samples, 50), 50.0);
        assert_eq!(percentile(&samples, 99), 99.0);
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 50), 2.0);
        assert_eq!(percentile(&[7.0], 99), 7.0);
    }
}
