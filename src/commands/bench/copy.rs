//! `mvm bench cp`: copies into and out of a warm VM, against the same bytes pushed through the
//! same channel as a command's standard input and output (no file, no digest), alternately in
//! one run.

use std::io::{Read, Seek};
use std::time::{Duration, Instant};

use anyhow::bail;
use mvm_protocol::{ExecRequest, ExitStatus, FsWriteRequest};
use mvm_runner::client::{AgentClient, OutputSink};
use serde_json::{json, Value};

use super::exec::{percentile, Discard};
use crate::commands::vm::connect;

/// Where the copies land in the guest.
const GUEST_FILE: &str = "/tmp/mvm-bench-cp.bin";

/// MB/s of `size_mib` copied in and out of the running VM `name`, against the raw channel.
pub fn cp(name: &str, size_mib: u64, runs: usize) -> anyhow::Result<(Value, String)> {
    let connection = || connect(name, Default::default());
    let size = size_mib << 20;
    let mut source = tempfile::tempfile()?;
    let mut block = vec![0u8; 1 << 20];
    for i in 0..size_mib {
        // Incompressible-looking bytes, different per MiB.
        for (j, byte) in block.iter_mut().enumerate() {
            *byte = (i as usize)
                .wrapping_mul(31)
                .wrapping_add(j.wrapping_mul(2_654_435_761) >> 13) as u8;
        }
        std::io::Write::write_all(&mut source, &block)?;
    }
    source.rewind()?;
    let (sha256, _) = mvm_ir::digest::sha256_reader(&mut source)?;
    let limit = Duration::from_secs(3600);
    let mb = size as f64 / 1e6;
    let mut samples: [Vec<f64>; 4] = Default::default();
    for _ in 0..runs {
        source.rewind()?;
        let request = FsWriteRequest {
            path: GUEST_FILE.into(),
            mode: 0o600,
            size,
            sha256: sha256.clone(),
            tar: false,
        };
        let started = Instant::now();
        connection()?.fs_write(request, &mut source, limit)?;
        samples[0].push(mb / started.elapsed().as_secs_f64());

        source.rewind()?;
        let started = Instant::now();
        let input = Box::new(source.try_clone()?.take(size)) as Box<dyn Read + Send>;
        run(
            &mut connection()?,
            &["sh", "-c", "cat > /dev/null"],
            Some(input),
            limit,
        )?;
        samples[1].push(mb / started.elapsed().as_secs_f64());

        let started = Instant::now();
        connection()?.fs_read(GUEST_FILE, false, &mut Discard, limit)?;
        samples[2].push(mb / started.elapsed().as_secs_f64());

        let started = Instant::now();
        run(&mut connection()?, &["cat", GUEST_FILE], None, limit)?;
        samples[3].push(mb / started.elapsed().as_secs_f64());
    }
    let [copy_in, raw_in, copy_out, raw_out] = samples.map(|s| percentile(&s, 50));
    let value = json!({
        "size_mib": size_mib,
        "runs": runs,
        "in_mb_s": {"copy": copy_in, "raw": raw_in, "ratio": copy_in / raw_in},
        "out_mb_s": {"copy": copy_out, "raw": raw_out, "ratio": copy_out / raw_out},
        "goal_ratio": 0.8,
    });
    let text = format!(
        "cp {size_mib} MiB on {name} (median of {runs}):\n\
         in:  {copy_in:.1} MB/s, raw channel {raw_in:.1} MB/s, ratio {:.2}\n\
         out: {copy_out:.1} MB/s, raw channel {raw_out:.1} MB/s, ratio {:.2} (goal ≥ 0.8)",
        copy_in / raw_in,
        copy_out / raw_out
    );
    Ok((value, text))
}

/// Runs `argv` to a successful end, its output discarded.
pub(super) fn run(
    client: &mut AgentClient,
    argv: &[&str],
    input: Option<Box<dyn Read + Send>>,
    limit: Duration,
) -> anyhow::Result<()> {
    run_into(client, argv, input, limit, &mut Discard)
}

/// Runs `argv` to a successful end, its output into `sink`.
pub(super) fn run_into(
    client: &mut AgentClient,
    argv: &[&str],
    input: Option<Box<dyn Read + Send>>,
    limit: Duration,
    sink: &mut dyn OutputSink,
) -> anyhow::Result<()> {
    let request = ExecRequest {
        argv: argv.iter().map(|a| a.to_string()).collect(),
        env: Default::default(),
        cwd: None,
        timeout_ms: limit.as_millis() as u64,
        stdin: false,
        user: None,
        tty: None,
    };
    let executed = client.exec_with_input(request, input, limit, sink)?;
    if executed.reply.status != (ExitStatus::Exited { code: 0 }) {
        bail!("{argv:?} did not exit 0: {:?}", executed.reply.status);
    }
    Ok(())
}
