//! Benchmarks against the standard tools, measured in the same run on the same input:
//! tree → EROFS image + verity tree against `mkfs.erofs` + `veritysetup format`, and verity
//! hashing against `veritysetup format`. `mvm bench image` and `mvm bench verity` print them.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::erofs::{self, Compression, ErofsOptions};
use crate::tree::{Metadata, NodeId, NodeKind, Staging, Tree};
use crate::verity::{self, VerityParams};

/// A fixed uuid for both sides, so neither pays for deriving one.
const UUID: [u8; 16] = *b"mvm-bench-uuid!!";
const UUID_TEXT: &str = "6d766d2d-6265-6e63-682d-757569642121";
const SALT: &[u8; 32] = b"mvm verity bench salt, 32 bytes!";

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A peer tool failed or is missing.
    #[error("{0}")]
    Tool(String),
    /// A file could not be read or written.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The EROFS writer failed.
    #[error(transparent)]
    Erofs(#[from] erofs::ErofsError),
    /// The verity writer failed.
    #[error(transparent)]
    Verity(#[from] verity::VerityError),
}

/// Medians of one comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// What was measured.
    pub what: String,
    /// mvm's median, in milliseconds.
    pub mvm_ms: f64,
    /// The peer's median, in milliseconds.
    pub peer_ms: f64,
    /// The peer's command.
    pub peer: String,
    /// peer / mvm: how many times faster mvm is.
    pub ratio: f64,
    /// Runs of each.
    pub runs: usize,
    /// Details (sizes, counts).
    pub note: String,
    /// Output sizes in bytes, mvm's and the peer's, where the output is an image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sizes: Option<(u64, u64)>,
}

fn median(times: &mut [Duration]) -> f64 {
    times.sort();
    times[times.len() / 2].as_secs_f64() * 1e3
}

fn compare(
    what: String,
    peer: String,
    runs: usize,
    ours: &mut [Duration],
    theirs: &mut [Duration],
    note: String,
) -> Comparison {
    let (mvm_ms, peer_ms) = (median(ours), median(theirs));
    Comparison {
        what,
        mvm_ms,
        peer_ms,
        peer,
        ratio: peer_ms / mvm_ms,
        runs,
        note,
        sizes: None,
    }
}

/// `veritysetup format` of `data` into `hash` with the bench's salt and uuid.
fn veritysetup_format(data: &Path, hash: &Path) -> Command {
    let program = ["/usr/sbin/veritysetup", "/sbin/veritysetup"]
        .into_iter()
        .find(|path| Path::new(path).is_file())
        .unwrap_or("veritysetup");
    let mut command = mvm_ir::env::command(program);
    command
        .args([
            "format",
            "--hash=sha256",
            "--salt",
            &hex::encode(SALT),
            &format!("--uuid={UUID_TEXT}"),
        ])
        .arg(data)
        .arg(hash);
    command
}

fn run(command: &mut Command, what: &str) -> Result<String, BenchError> {
    let output = command.output().map_err(|e| {
        BenchError::Tool(format!(
            "{what}: {e} (install erofs-utils and cryptsetup-bin)"
        ))
    })?;
    if !output.status.success() {
        return Err(BenchError::Tool(format!(
            "{what}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Tree → EROFS image → verity tree for the host directory `source`, against `mkfs.erofs -U
/// <uuid> -T 0 --all-root` + `veritysetup format` on the same directory, both compressing as
/// `compression` says (`mkfs.erofs -zlz4`, `-zlz4hc,LEVEL`). The tree is staged once, outside
/// the timing (mkfs.erofs reads the directory inside its timing); both sides write through
/// the page cache, neither syncs.
pub fn image(
    source: &Path,
    work: &Path,
    runs: usize,
    compression: Compression,
) -> Result<Vec<Comparison>, BenchError> {
    fs::create_dir_all(work)?;
    let started = Instant::now();
    let mut tree = Tree::new(Staging::temp_file_in(work)?);
    tree.node_mut(Tree::ROOT).meta.mode = fs::metadata(source)?.mode() & 0o7777;
    stage_host_dir(&mut tree, source, Tree::ROOT, &mut BTreeMap::new())?;
    let staging = started.elapsed();
    let staged_mib = tree.staging().staged_bytes() >> 20;

    let options = ErofsOptions {
        uuid: Some(UUID),
        compression,
        ..ErofsOptions::default()
    };
    let mut mkfs_args = vec!["--quiet", "-U", UUID_TEXT, "-T", "0", "--all-root"];
    let mkfs_compression = match compression {
        Compression::None => None,
        Compression::Lz4 => Some("-zlz4".to_string()),
        Compression::Lz4Hc { level } => Some(format!("-zlz4hc,{level}")),
    };
    mkfs_args.extend(mkfs_compression.as_deref());
    let peer = match &mkfs_compression {
        Some(flag) => format!("mkfs.erofs {flag}"),
        None => "mkfs.erofs".to_string(),
    };
    let params = VerityParams::new(SALT.to_vec(), UUID);
    let (ours_img, ours_hash) = (work.join("mvm.erofs"), work.join("mvm.verity"));
    let (peer_img, peer_hash) = (work.join("mkfs.erofs"), work.join("mkfs.verity"));
    let (mut image_ours, mut image_peer, mut both_ours, mut both_peer) =
        (vec![], vec![], vec![], vec![]);
    let mut inodes = 0;
    for _ in 0..runs {
        let start = Instant::now();
        inodes = erofs::write_image(&tree, &mut File::create(&ours_img)?, &options)?.inodes;
        let imaged = start.elapsed();
        verity::format(
            &File::open(&ours_img)?,
            &mut File::create(&ours_hash)?,
            &params,
        )?;
        image_ours.push(imaged);
        both_ours.push(start.elapsed());

        let _ = fs::remove_file(&peer_img);
        let start = Instant::now();
        run(
            mvm_ir::env::command("mkfs.erofs")
                .args(&mkfs_args)
                .arg(&peer_img)
                .arg(source),
            "mkfs.erofs",
        )?;
        let imaged = start.elapsed();
        let _ = fs::remove_file(&peer_hash);
        run(
            &mut veritysetup_format(&peer_img, &peer_hash),
            "veritysetup format",
        )?;
        image_peer.push(imaged);
        both_peer.push(start.elapsed());
    }
    let sizes = (
        fs::metadata(&ours_img)?.len(),
        fs::metadata(&peer_img)?.len(),
    );
    let note = format!(
        "{} inodes, {staged_mib} MiB staged in {:.0} ms (not timed); compression {compression}; \
         images {} vs {} bytes (mvm's {:.3}x the size of mkfs.erofs's)",
        inodes,
        staging.as_secs_f64() * 1e3,
        sizes.0,
        sizes.1,
        sizes.0 as f64 / sizes.1 as f64
    );
    let results = vec![
        Comparison {
            sizes: Some(sizes),
            ..compare(
                "tree → EROFS image".into(),
                peer.clone(),
                runs,
                &mut image_ours,
                &mut image_peer,
                note.clone(),
            )
        },
        compare(
            "tree → EROFS image + verity tree".into(),
            format!("{peer} + veritysetup format"),
            runs,
            &mut both_ours,
            &mut both_peer,
            note,
        ),
    ];
    for path in [ours_img, ours_hash, peer_img, peer_hash] {
        let _ = fs::remove_file(path);
    }
    Ok(results)
}

/// The verity tree of a `size_mib` MiB image of pseudo-random bytes, against `veritysetup
/// format` on the same file; both root hashes must agree.
pub fn verity(size_mib: u64, work: &Path, runs: usize) -> Result<Comparison, BenchError> {
    fs::create_dir_all(work)?;
    let data = random_image(work, size_mib)?;
    let params = VerityParams::new(SALT.to_vec(), UUID);
    let (ours_path, peer_path) = (work.join("mvm.hash"), work.join("veritysetup.hash"));
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let start = Instant::now();
        let root =
            verity::format(&File::open(&data)?, &mut File::create(&ours_path)?, &params)?.root_hash;
        ours.push(start.elapsed());

        let _ = fs::remove_file(&peer_path);
        let start = Instant::now();
        let stdout = run(
            &mut veritysetup_format(&data, &peer_path),
            "veritysetup format",
        )?;
        theirs.push(start.elapsed());
        if !stdout.contains(&hex::encode(root)) {
            return Err(BenchError::Tool(format!(
                "veritysetup's root hash differs from mvm's:\n{stdout}"
            )));
        }
    }
    for path in [&data, &ours_path, &peer_path] {
        let _ = fs::remove_file(path);
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    Ok(compare(
        format!("verity tree of {size_mib} MiB"),
        "veritysetup format".into(),
        runs,
        &mut ours,
        &mut theirs,
        format!("same root hash every run; {threads} threads"),
    ))
}

/// An image of pseudo-random bytes (every block distinct).
fn random_image(dir: &Path, size_mib: u64) -> std::io::Result<PathBuf> {
    let path = dir.join(format!("bench-{size_mib}MiB.img"));
    let mut out = BufWriter::new(File::create(&path)?);
    let mut state = size_mib;
    for _ in 0..(size_mib << 17) {
        // splitmix64
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.write_all(&(z ^ (z >> 31)).to_le_bytes())?;
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(path)
}

/// Stages the host directory `dir` under `parent`: modes, symlinks, devices, fifos and
/// hardlinks kept, owners forced to root (as `mkfs.erofs --all-root`), xattrs left out.
fn stage_host_dir(
    tree: &mut Tree,
    dir: &Path,
    parent: NodeId,
    hardlinks: &mut BTreeMap<(u64, u64), NodeId>,
) -> std::io::Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
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
        let rdev = stat.rdev();
        let (major, minor) = (
            (((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff)) as u32,
            ((rdev & 0xff) | ((rdev >> 12) & !0xff)) as u32,
        );
        let id = if file_type.is_dir() {
            let id = tree.add(NodeKind::Directory(BTreeMap::new()), meta);
            tree.link(parent, name.as_bytes(), id);
            stage_host_dir(tree, &path, id, hardlinks)?;
            continue;
        } else if file_type.is_file() {
            tree.add_file(&mut File::open(&path)?, meta)?
        } else if file_type.is_symlink() {
            tree.add(
                NodeKind::Symlink(fs::read_link(&path)?.into_os_string().as_bytes().to_vec()),
                meta,
            )
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
