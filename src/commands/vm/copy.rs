//! `mvm cp`: files and directories into and out of a running VM, checked by SHA-256 end to
//! end. A directory travels as a tar stream: packed here (symlinks as symlinks) and unpacked
//! by the agent into a new directory with the workload user's rights, or packed by the agent
//! and unpacked here into a new directory.
//!
//! What comes out of a guest is the guest's to choose, so a copy out takes no more than
//! `--max-size` bytes, keeps a file's holes as holes, and gives what it writes the modes the
//! user's umask allows and never group or other write.

use std::io::{self, Seek, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use mvm_protocol::{FileKind, FsWriteRequest, Request, Response};
use mvm_runner::client::{AgentClient, OutputSink};
use mvm_runner::state;
use serde_json::json;

use super::{agent_error, connect};
use crate::commands::{coded_as, coded_io};
use crate::output::Output;

/// How long one copy may take.
const COPY_TIMEOUT: Duration = Duration::from_secs(3600);
/// The block whose zeros become a hole in a file copied out.
const HOLE_BLOCK: usize = 4096;

/// Copy a file or a directory into or out of a running VM: `mvm cp PATH NAME:/tmp/path` or
/// `mvm cp NAME:/tmp/path PATH`. Guest paths are confined to /tmp and the workload user's home
/// when the image gives it one (and to what that user may read or write there); the bytes are checked by SHA-256 end to end. A directory is
/// copied whole to a new name (its destination must not exist), symlinks as symlinks.
#[derive(Debug, Args)]
pub struct CpArgs {
    /// Where from: a local file or directory, or NAME:/tmp/path.
    source: String,
    /// Where to: a local path, or NAME:/tmp/path.
    destination: String,
    /// The most bytes a copy out of a VM may bring (a directory: its tar stream), with an
    /// optional K, M, G or T suffix (powers of 1024). A guest file larger than this is
    /// refused before anything is written here.
    #[arg(long, value_name = "SIZE", default_value = "4G", value_parser = parse_size)]
    max_size: u64,
}

/// `SIZE` in bytes: digits with an optional K, M, G or T (and optional `iB` or `B`).
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim_end_matches("iB").trim_end_matches('B');
    let (digits, shift) = match trimmed.char_indices().last() {
        Some((at, unit @ ('K' | 'M' | 'G' | 'T' | 'k' | 'm' | 'g' | 't'))) => {
            let shift = match unit.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                _ => 40,
            };
            (&trimmed[..at], shift)
        }
        _ => (trimmed, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{text:?} is not a size such as 512M or 4G"))
}

/// `NAME:/path` as (NAME, /path), for a valid VM name.
fn guest_path(text: &str) -> Option<(&str, &str)> {
    let (name, path) = text.split_once(':')?;
    (state::valid_name(name) && path.starts_with('/')).then_some((name, path))
}

pub fn cp(args: CpArgs, out: &Output) -> anyhow::Result<()> {
    let (done, description) = match (guest_path(&args.source), guest_path(&args.destination)) {
        (None, Some((name, path))) => {
            let client = connect(name, Arc::default())?;
            let done = copy_in(client, Path::new(&args.source), path)?;
            (done, format!("{} → {name}:{path}", args.source))
        }
        (Some((name, path)), None) => {
            let client = connect(name, Arc::default())?;
            let done = copy_out(client, path, Path::new(&args.destination), args.max_size)?;
            (done, format!("{name}:{path} → {}", args.destination))
        }
        _ => {
            return Err(coded_as(
                "RUN038",
                "give exactly one side as NAME:/path (a running VM's name and a path in it)",
            ))
        }
    };
    out.result(json!({"copied": done.size, "sha256": done.sha256}), || {
        format!("{description}: {} bytes, {}", done.size, done.sha256)
    });
    Ok(())
}

fn copy_in(
    mut client: AgentClient,
    local: &Path,
    path: &str,
) -> anyhow::Result<mvm_protocol::FileDone> {
    let meta =
        std::fs::symlink_metadata(local).with_context(|| format!("reading {}", local.display()))?;
    let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777;
    let (mut file, tar) = if meta.is_file() {
        (std::fs::File::open(local)?, false)
    } else if meta.is_dir() {
        (pack(local)?, true)
    } else {
        return Err(coded_as(
            "RUN038",
            format!("{} is neither a file nor a directory", local.display()),
        ));
    };
    // Hashed first, so the guest can refuse bytes that do not match what was read.
    let (sha256, size) = mvm_ir::digest::sha256_reader(&mut file)?;
    file.rewind()?;
    let request = FsWriteRequest {
        path: path.into(),
        mode,
        size,
        sha256,
        tar,
    };
    client
        .fs_write(request, &mut file, COPY_TIMEOUT)
        .map_err(agent_error)
}

/// The directory as a tar stream in an unnamed temporary file, rewound.
fn pack(dir: &Path) -> anyhow::Result<std::fs::File> {
    let mut builder = tar::Builder::new(tempfile::tempfile()?);
    builder.follow_symlinks(false);
    builder
        .append_dir_all("", dir)
        .with_context(|| format!("packing {}", dir.display()))?;
    let mut file = builder.into_inner()?;
    file.rewind()?;
    Ok(file)
}

fn copy_out(
    mut client: AgentClient,
    path: &str,
    local: &Path,
    max_size: u64,
) -> anyhow::Result<mvm_protocol::FileDone> {
    let local = std::path::absolute(local)?;
    let dir = local.parent().context("the destination has no directory")?;
    let info = match client.call(&Request::FsStat { path: path.into() }, COPY_TIMEOUT, None) {
        Ok(Response::FsStat(info)) => info,
        Ok(other) => return Err(coded_io("RUN025", format!("unexpected answer {other:?}"))),
        Err(e) => return Err(agent_error(e)),
    };
    let too_large = || {
        coded_as(
            "RUN038",
            format!("{path} is larger than --max-size ({max_size} bytes)"),
        )
    };
    let tar = info.kind == FileKind::Directory;
    if !tar && info.size > max_size {
        return Err(too_large());
    }
    // The user's umask, and never group or other write, whatever the guest says.
    let mask = umask() | 0o022;
    if tar && local.exists() {
        return Err(coded_as(
            "RUN038",
            format!(
                "{} exists; a directory is copied to a new name",
                local.display()
            ),
        ));
    }
    let staging = tempfile::NamedTempFile::new_in(dir)?;
    let mut sink = FileSink::new(staging.as_file().try_clone()?, max_size);
    let read = client.fs_read(path, tar, &mut sink, COPY_TIMEOUT);
    if sink.over_limit {
        // The guest sent more than it said the file held, or a directory's stream ran over.
        return Err(too_large());
    }
    let done = read.map_err(agent_error)?;
    sink.finish()?;
    if !tar {
        use std::os::unix::fs::PermissionsExt;
        let mode = info.mode & 0o777 & !mask;
        staging
            .as_file()
            .set_permissions(std::fs::Permissions::from_mode(mode))?;
        staging.as_file().sync_all()?;
        staging.persist(&local)?;
        return Ok(done);
    }
    // The guest's archive is untrusted: unpacked into a fresh directory (entries may not
    // leave it, nothing is overwritten, no special bits), which then takes its name.
    let unpacked = tempfile::TempDir::new_in(dir)?;
    let mut archive = tar::Archive::new(staging.reopen()?);
    archive.set_overwrite(false);
    archive.set_preserve_permissions(false);
    archive.set_mask(mask);
    archive.set_unpack_xattrs(false);
    archive
        .unpack(unpacked.path())
        .map_err(|e| coded_as("RUN038", format!("unpacking {path}: {e}")))?;
    std::fs::rename(unpacked.keep(), &local)
        .with_context(|| format!("moving the copy to {}", local.display()))?;
    Ok(done)
}

/// The process's umask, read without changing it (`Umask:` in `/proc/self/status`); the
/// usual 022 where it cannot be read.
fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("Umask:"))?;
            u32::from_str_radix(line["Umask:".len()..].trim(), 8).ok()
        })
        .unwrap_or(0o022)
}

/// Writes a copied file's bytes (which arrive as output) to a new file: at most `limit` of
/// them, each block of [`HOLE_BLOCK`] zeros left a hole.
struct FileSink {
    file: std::fs::File,
    written: u64,
    limit: u64,
    over_limit: bool,
}

impl FileSink {
    fn new(file: std::fs::File, limit: u64) -> Self {
        Self {
            file,
            written: 0,
            limit,
            over_limit: false,
        }
    }

    /// Gives the file its whole length (a hole at its end is not written).
    fn finish(&self) -> io::Result<()> {
        self.file.set_len(self.written)
    }
}

impl OutputSink for FileSink {
    fn stdout(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        if self.written + bytes.len() as u64 > self.limit {
            self.over_limit = true;
            return Err(io::Error::other("over --max-size"));
        }
        while !bytes.is_empty() {
            // Up to the next block boundary, so that a block's zeros are seen whole.
            let into_block = (self.written % HOLE_BLOCK as u64) as usize;
            let (piece, rest) = bytes.split_at(bytes.len().min(HOLE_BLOCK - into_block));
            // The file is new and written front to back: zeros not written read as zeros.
            if piece.iter().all(|b| *b == 0) {
                self.file.seek(io::SeekFrom::Current(piece.len() as i64))?;
            } else {
                self.file.write_all(piece)?;
            }
            self.written += piece.len() as u64;
            bytes = rest;
        }
        Ok(())
    }

    fn stderr(&mut self, _: &[u8]) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1k"), Ok(1024));
        for bad in ["", "0", "G", "-1", "4X", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn zero_blocks_become_holes_and_the_limit_holds() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let mut sink = FileSink::new(file.reopen().unwrap(), 64 << 20);
        let mut bytes = vec![0u8; 32 << 20];
        bytes[100] = 1;
        bytes[(32 << 20) - 1] = 2;
        // In uneven pieces, as frames come.
        for piece in bytes.chunks(65_531) {
            sink.stdout(piece).unwrap();
        }
        sink.stdout(&[0; 5000]).unwrap();
        sink.finish().unwrap();
        bytes.extend([0; 5000]);
        assert_eq!(std::fs::read(file.path()).unwrap(), bytes);
        let allocated = std::fs::metadata(file.path()).unwrap().blocks() * 512;
        assert!(allocated < 1 << 20, "{allocated} bytes allocated");

        let mut small = FileSink::new(tempfile::tempfile().unwrap(), 10);
        small.stdout(b"0123456789").unwrap();
        assert!(small.stdout(b"x").is_err());
        assert!(small.over_limit);
    }

    #[test]
    fn the_umask_is_read_without_changing_it() {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(status.contains(&format!("Umask:\t{:04o}", umask())));
    }
}
