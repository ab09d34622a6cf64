//! Measures tree → EROFS image against `mkfs.erofs` on the same host directory.
//!
//! ```text
//! cargo run --release -p mvm-builder --example erofs_bench -- SOURCE_DIR WORK_DIR [RUNS]
//! ```
//!
//! SOURCE_DIR is staged once into a [`Tree`] (owners forced to root, like `--all-root`; xattrs
//! left out), then written RUNS times (default 5) with a fixed uuid, and RUNS times with a
//! uuid derived from content; `mkfs.erofs -U <uuid> -T 0 --all-root` builds the same directory
//! RUNS times. Medians are printed; the last images stay in WORK_DIR for inspection.

use std::collections::BTreeMap;
use std::error::Error;
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use mvm_builder::erofs::{write_image, ErofsOptions};
use mvm_builder::tree::{Metadata, NodeId, NodeKind, Staging, Tree};

const UUID: &str = "6d766d00-0000-4000-8000-000000000001";

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (source, work) = match &args[..] {
        [_, source, work, ..] => (Path::new(source), Path::new(work)),
        _ => return Err("usage: erofs_bench SOURCE_DIR WORK_DIR [RUNS]".into()),
    };
    let runs: usize = args.get(3).map_or(Ok(5), |runs| runs.parse())?;
    fs::create_dir_all(work)?;

    let started = Instant::now();
    let mut tree = Tree::new(Staging::temp_file_in(work)?);
    tree.node_mut(Tree::ROOT).meta.mode = fs::metadata(source)?.mode() & 0o7777;
    let mut hardlinks = BTreeMap::new();
    stage(&mut tree, source, Tree::ROOT, &mut hardlinks)?;
    let staged = tree.staging().staged_bytes();
    println!(
        "staged {} ({} MiB of file content) in {:?}",
        source.display(),
        staged >> 20,
        started.elapsed()
    );

    let fixed_uuid = ErofsOptions {
        uuid: Some(parse_uuid(UUID)),
        ..ErofsOptions::default()
    };
    let ours = work.join("mvm.erofs");
    let fixed = median(runs, || {
        let mut out = File::create(&ours)?;
        let summary = write_image(&tree, &mut out, &fixed_uuid)?;
        Ok(format!(
            "{} inodes, {} blocks",
            summary.inodes, summary.blocks
        ))
    })?;
    let derived = median(runs, || {
        let mut out = File::create(&ours)?;
        write_image(&tree, &mut out, &ErofsOptions::default())?;
        Ok(String::new())
    })?;

    let theirs = work.join("mkfs.erofs");
    let mkfs = median(runs, || {
        let status = Command::new("mkfs.erofs")
            .args(["--quiet", "-U", UUID, "-T", "0", "--all-root"])
            .arg(&theirs)
            .arg(source)
            .status()?;
        if !status.success() {
            return Err("mkfs.erofs failed".into());
        }
        Ok(String::new())
    })?;

    println!(
        "tree → image, fixed uuid:   median {fixed:?} ({:.2}x faster than mkfs.erofs)",
        ratio(mkfs, fixed)
    );
    println!(
        "tree → image, derived uuid: median {derived:?} ({:.2}x faster than mkfs.erofs)",
        ratio(mkfs, derived)
    );
    println!("mkfs.erofs -U -T 0 --all-root: median {mkfs:?}");
    println!(
        "image sizes: ours {} bytes, mkfs.erofs {} bytes",
        fs::metadata(&ours)?.len(),
        fs::metadata(&theirs)?.len()
    );
    Ok(())
}

fn ratio(slow: Duration, fast: Duration) -> f64 {
    slow.as_secs_f64() / fast.as_secs_f64()
}

/// Runs `job` `runs` times and returns the median wall time, printing each run.
fn median(
    runs: usize,
    mut job: impl FnMut() -> Result<String, Box<dyn Error>>,
) -> Result<Duration, Box<dyn Error>> {
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        let note = job()?;
        let took = started.elapsed();
        println!("  {took:?} {note}");
        times.push(took);
    }
    times.sort();
    Ok(times[times.len() / 2])
}

/// Copies `dir` into `parent`, keeping modes, symlinks, devices, fifos and hardlinks.
fn stage(
    tree: &mut Tree,
    dir: &Path,
    parent: NodeId,
    hardlinks: &mut BTreeMap<(u64, u64), NodeId>,
) -> Result<(), Box<dyn Error>> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name();
        let stat = fs::symlink_metadata(&path)?;
        let file_type = stat.file_type();
        if !file_type.is_dir() && stat.nlink() > 1 {
            if let Some(&id) = hardlinks.get(&(stat.dev(), stat.ino())) {
                tree.link(parent, name.as_bytes(), id);
                continue;
            }
        }
        let meta = Metadata {
            mode: stat.mode() & 0o7777,
            ..Metadata::default()
        };
        let (major, minor) = (libc_major(stat.rdev()), libc_minor(stat.rdev()));
        let id = if file_type.is_dir() {
            let id = tree.add(NodeKind::Directory(BTreeMap::new()), meta);
            tree.link(parent, name.as_bytes(), id);
            stage(tree, &path, id, hardlinks)?;
            continue;
        } else if file_type.is_file() {
            tree.add_file(&mut File::open(&path)?, meta)?
        } else if file_type.is_symlink() {
            let target = fs::read_link(&path)?.into_os_string();
            tree.add(NodeKind::Symlink(target.as_bytes().to_vec()), meta)
        } else if file_type.is_char_device() {
            tree.add(NodeKind::CharDevice { major, minor }, meta)
        } else if file_type.is_block_device() {
            tree.add(NodeKind::BlockDevice { major, minor }, meta)
        } else if file_type.is_fifo() {
            tree.add(NodeKind::Fifo, meta)
        } else {
            continue; // sockets are not part of an image
        };
        tree.link(parent, name.as_bytes(), id);
        hardlinks.insert((stat.dev(), stat.ino()), id);
    }
    Ok(())
}

fn libc_major(dev: u64) -> u32 {
    (((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff)) as u32
}

fn libc_minor(dev: u64) -> u32 {
    ((dev & 0xff) | ((dev >> 12) & !0xff)) as u32
}

fn parse_uuid(text: &str) -> [u8; 16] {
    let hex: Vec<u8> = text.bytes().filter(|b| *b != b'-').collect();
    let mut uuid = [0u8; 16];
    for (byte, pair) in uuid.iter_mut().zip(hex.chunks(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).unwrap_or("00"), 16).unwrap_or(0);
    }
    uuid
}
