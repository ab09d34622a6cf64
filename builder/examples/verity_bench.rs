//! Times mvm's dm-verity writer against `veritysetup format` on the same images: the
//! measurement behind `mvm bench verity`.
//!
//! `cargo run --release -p mvm-builder --example verity_bench -- [SIZE_MIB ...]` (default 256
//! and 1024). Each image (pseudo-random bytes, kept in /tmp between runs) is formatted 5 times
//! by each tool, alternating, after one untimed run that brings it into the page cache; the
//! medians and their ratio are printed. The two root hashes must agree.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use mvm_builder::verity::{format_file, VerityParams};

const RUNS: usize = 5;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let sizes: Result<Vec<u64>, _> = std::env::args().skip(1).map(|arg| arg.parse()).collect();
    let sizes_mib = match sizes {
        Ok(sizes) if !sizes.is_empty() => sizes,
        Ok(_) => vec![256, 1024],
        Err(error) => return Err(format!("sizes are whole MiB: {error}").into()),
    };
    let params = VerityParams::new(b"mvm verity bench salt, 32 bytes!".to_vec(), [0x42; 16]);
    let veritysetup = ["/usr/sbin/veritysetup", "/sbin/veritysetup"]
        .into_iter()
        .find(|path| Path::new(path).is_file())
        .unwrap_or("veritysetup");
    let threads = std::thread::available_parallelism().map_or(1, |threads| threads.get());
    println!("{threads} threads available");

    for size_mib in sizes_mib {
        let data = bench_image(size_mib)?;
        let (ours_path, theirs_path) = (
            data.with_extension("mvm.hash"),
            data.with_extension("vs.hash"),
        );
        let root = format_file(&data, &ours_path, &params)?.root_hash;

        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            let start = Instant::now();
            format_file(&data, &ours_path, &params)?;
            ours.push(start.elapsed());

            let _ = fs::remove_file(&theirs_path);
            let start = Instant::now();
            let output = Command::new(veritysetup)
                .args([
                    "format",
                    "--hash=sha256",
                    "--salt",
                    &hex::encode(&params.salt),
                ])
                .args(["--uuid=42424242-4242-4242-4242-424242424242"])
                .arg(&data)
                .arg(&theirs_path)
                .output()?;
            theirs.push(start.elapsed());
            let stdout = String::from_utf8_lossy(&output.stdout);
            if !output.status.success() || !stdout.contains(&hex::encode(root)) {
                return Err(format!("veritysetup disagrees or failed: {stdout}").into());
            }
        }
        let (ours, theirs) = (median(&mut ours), median(&mut theirs));
        let throughput = |time: Duration| size_mib as f64 / time.as_secs_f64();
        println!(
            "{size_mib} MiB: mvm {:.1} ms ({:.0} MiB/s), veritysetup {:.1} ms ({:.0} MiB/s), \
             mvm is {:.2}x faster (medians of {RUNS})",
            ours.as_secs_f64() * 1e3,
            throughput(ours),
            theirs.as_secs_f64() * 1e3,
            throughput(theirs),
            theirs.as_secs_f64() / ours.as_secs_f64(),
        );
        fs::remove_file(&ours_path)?;
        fs::remove_file(&theirs_path)?;
    }
    Ok(())
}

/// The image of `size_mib` MiB of pseudo-random bytes in /tmp, written once and reused.
fn bench_image(size_mib: u64) -> std::io::Result<PathBuf> {
    let path = PathBuf::from(format!("/tmp/mvm-verity-bench-{size_mib}MiB.img"));
    if fs::metadata(&path).is_ok_and(|meta| meta.len() == size_mib << 20) {
        return Ok(path);
    }
    let mut out = BufWriter::new(File::create(&path)?);
    let mut state = size_mib;
    for _ in 0..(size_mib << 17) {
        // splitmix64: fast, and fresh bytes in every block so nothing hashes alike.
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.write_all(&(z ^ (z >> 31)).to_le_bytes())?;
    }
    out.into_inner()?.sync_all()?;
    Ok(path)
}

fn median(times: &mut [Duration]) -> Duration {
    times.sort();
    times[times.len() / 2]
}
