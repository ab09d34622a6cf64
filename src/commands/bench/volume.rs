//! `mvm bench volume`: sequential writes and reads through an encrypted volume mounted in a
//! running VM (dm-crypt, then ext4, then the virtio disk) against the same on the guest's
//! `/tmp` (memory), timed in the guest (its `/proc/uptime` read before and after each `dd`,
//! 10 ms steps: busybox's `dd` reports no rate), alternately in one run.

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
    let write = |file: &str| format!("dd if=/dev/zero of={file} bs=1M count={size_mib} conv=fsync");
    let read = |file: &str, direct: bool| {
        let flag = if direct { " iflag=direct" } else { "" };
        format!("dd if={file} of=/dev/null bs=1M{flag}")
    };
    let bytes = size_mib << 20;
    let mut samples: [Vec<f64>; 4] = Default::default();
    for _ in 0..runs {
        samples[0].push(timed(name, &write(&on_volume), bytes)?);
        samples[1].push(timed(name, &write(&in_memory), bytes)?);
        samples[2].push(timed(name, &read(&on_volume, true), bytes)?);
        samples[3].push(timed(name, &read(&in_memory, false), bytes)?);
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
        "volume at {path} on {name}, {size_mib} MiB (median of {runs}, timed in the guest):\n\
         write (fsync): {volume_write:.1} MB/s, /tmp {memory_write:.1} MB/s, ratio {:.2}\n\
         read (O_DIRECT): {volume_read:.1} MB/s, /tmp {memory_read:.1} MB/s, ratio {:.2}",
        volume_write / memory_write,
        volume_read / memory_read
    );
    Ok((value, text))
}

/// Runs `dd` (`command`, moving `bytes`) in VM `name` between two readings of the guest's
/// `/proc/uptime`: MB/s.
fn timed(name: &str, command: &str, bytes: u64) -> anyhow::Result<f64> {
    let mut client = connect(name, Default::default())?;
    let mut said = Collected::default();
    let limit = Duration::from_secs(3600);
    let script = format!("cat /proc/uptime; {command} 2>/dev/null || exit 1; cat /proc/uptime");
    run_into(&mut client, &["sh", "-c", &script], None, limit, &mut said)?;
    let report = String::from_utf8_lossy(&said.0).into_owned();
    let seconds = elapsed(&report).with_context(|| format!("no uptimes in {report:?}"))?;
    Ok(bytes as f64 / 1e6 / seconds.max(0.01))
}

/// Seconds between the two `/proc/uptime` lines of `report`.
fn elapsed(report: &str) -> Option<f64> {
    let mut uptimes = report
        .lines()
        .filter_map(|line| line.split_whitespace().next()?.parse::<f64>().ok());
    let (start, end) = (uptimes.next()?, uptimes.next()?);
    (end >= start).then_some(end - start)
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
    fn the_time_is_between_the_two_uptimes() {
        assert_eq!(elapsed("100.25 180.00\n101.75 181.00\n"), Some(1.5));
        assert_eq!(elapsed("100.25 180.00\n"), None);
        assert_eq!(elapsed("5.00 1\n4.00 1\n"), None);
        assert_eq!(elapsed("sh: dd: not found\n"), None);
    }
}
