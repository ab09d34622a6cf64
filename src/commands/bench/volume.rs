//! `mvm bench volume`: sequential writes and reads through an encrypted volume mounted in a
//! running VM (dm-crypt, then ext4, then the virtio disk) against the same on the guest's
//! `/tmp` (memory), timed by the guest's own `dd`, alternately in one run.

use std::time::Duration;

use anyhow::Context;
use mvm_runner::client::OutputSink;
use serde_json::{json, Value};

use super::copy::run_into;
use super::exec::percentile;
use crate::commands::vm::connect;

/// The file the bench writes, under the volume's mount point and under `/tmp`.
const FILE: &str = "mvm-bench-volume.bin";

/// MB/s medians of writing (`conv=fsync`) and reading `size_mib` MiB on the volume mounted at
/// `path` in VM `name` (reads `O_DIRECT`, past the page cache), against `/tmp`.
pub fn volume(
    name: &str,
    path: &str,
    size_mib: u64,
    runs: usize,
) -> anyhow::Result<(Value, String)> {
    let on_volume = format!("{}/{FILE}", path.trim_end_matches('/'));
    let in_memory = format!("/tmp/{FILE}");
    let write =
        |file: &str| format!("dd if=/dev/zero of={file} bs=1M count={size_mib} conv=fsync 2>&1");
    let read = |file: &str, direct: bool| {
        let flag = if direct { " iflag=direct" } else { "" };
        format!("dd if={file} of=/dev/null bs=1M{flag} 2>&1")
    };
    let mut samples: [Vec<f64>; 4] = Default::default();
    for _ in 0..runs {
        samples[0].push(timed(name, &write(&on_volume))?);
        samples[1].push(timed(name, &write(&in_memory))?);
        samples[2].push(timed(name, &read(&on_volume, true))?);
        samples[3].push(timed(name, &read(&in_memory, false))?);
    }
    let mut client = connect(name, Default::default())?;
    let argv = ["rm", "-f", on_volume.as_str(), in_memory.as_str()];
    super::copy::run(&mut client, &argv, None, Duration::from_secs(60))?;
    let [volume_write, memory_write, volume_read, memory_read] =
        samples.map(|s| percentile(&s, 50));
    let value = json!({
        "vm": name,
        "path": path,
        "size_mib": size_mib,
        "runs": runs,
        "write_mb_s": {"volume": volume_write, "tmpfs": memory_write,
                       "ratio": volume_write / memory_write},
        "read_mb_s": {"volume": volume_read, "tmpfs": memory_read,
                      "ratio": volume_read / memory_read},
    });
    let text = format!(
        "volume at {path} on {name}, {size_mib} MiB (median of {runs}, the guest's dd):\n\
         write (fsync): {volume_write:.1} MB/s, /tmp {memory_write:.1} MB/s, ratio {:.2}\n\
         read (O_DIRECT): {volume_read:.1} MB/s, /tmp {memory_read:.1} MB/s, ratio {:.2}",
        volume_write / memory_write,
        volume_read / memory_read
    );
    Ok((value, text))
}

/// Runs `script` (a `dd`, its report on stdout) in VM `name`: MB/s from the bytes and seconds
/// `dd` reported.
fn timed(name: &str, script: &str) -> anyhow::Result<f64> {
    let mut client = connect(name, Default::default())?;
    let mut said = Collected::default();
    let limit = Duration::from_secs(3600);
    run_into(&mut client, &["sh", "-c", script], None, limit, &mut said)?;
    let report = String::from_utf8_lossy(&said.0).into_owned();
    dd_rate(&report).with_context(|| format!("no dd report in {report:?}"))
}

/// MB/s from a `dd` report: `BYTES bytes (…) copied, SECONDS s[econds], …` (busybox and GNU).
fn dd_rate(report: &str) -> Option<f64> {
    let line = report.lines().find(|line| line.contains(" bytes"))?;
    let bytes: f64 = line.split_whitespace().next()?.parse().ok()?;
    let after = line.split("copied, ").nth(1)?;
    let seconds: f64 = after.split_whitespace().next()?.parse().ok()?;
    (seconds > 0.0).then(|| bytes / 1e6 / seconds)
}

/// A command's output, kept.
#[derive(Default)]
struct Collected(Vec<u8>);

impl OutputSink for Collected {
    fn stdout(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }

    fn stderr(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stdout(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dd_reports_are_read_from_busybox_and_gnu() {
        let busybox = "32+0 records in\n32+0 records out\n\
                       33554432 bytes (32.0MB) copied, 0.500000 seconds, 64.0MB/s\n";
        assert_eq!(dd_rate(busybox), Some(33554432.0 / 1e6 / 0.5));
        let gnu = "33554432 bytes (34 MB, 32 MiB) copied, 0.25 s, 134 MB/s\n";
        assert_eq!(dd_rate(gnu), Some(33554432.0 / 1e6 / 0.25));
        assert_eq!(dd_rate("dd: can't open"), None);
        assert_eq!(dd_rate("1 bytes copied, 0 s"), None);
    }
}
