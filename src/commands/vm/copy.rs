//! `mvm cp`: files and directories into and out of a running VM, checked by SHA-256 end to
//! end. A directory travels as a tar stream: packed here (symlinks as symlinks) and unpacked
//! by the agent into a new directory with the workload user's rights, or packed by the agent
//! and unpacked here into a new directory.

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

/// Copy a file or a directory into or out of a running VM: `mvm cp PATH NAME:/tmp/path` or
/// `mvm cp NAME:/tmp/path PATH`. Guest paths are confined to /tmp (and to what the workload
/// user may read or write there); the bytes are checked by SHA-256 end to end. A directory is
/// copied whole to a new name (its destination must not exist), symlinks as symlinks.
#[derive(Debug, Args)]
pub struct CpArgs {
    /// Where from: a local file or directory, or NAME:/tmp/path.
    source: String,
    /// Where to: a local path, or NAME:/tmp/path.
    destination: String,
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
            let done = copy_out(client, path, Path::new(&args.destination))?;
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
) -> anyhow::Result<mvm_protocol::FileDone> {
    let local = std::path::absolute(local)?;
    let dir = local.parent().context("the destination has no directory")?;
    let kind = match client.call(&Request::FsStat { path: path.into() }, COPY_TIMEOUT, None) {
        Ok(Response::FsStat(info)) => info.kind,
        Ok(other) => return Err(coded_io("RUN025", format!("unexpected answer {other:?}"))),
        Err(e) => return Err(agent_error(e)),
    };
    let tar = kind == FileKind::Directory;
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
    let mut sink = FileSink(staging.as_file().try_clone()?);
    let done = client
        .fs_read(path, tar, &mut sink, COPY_TIMEOUT)
        .map_err(agent_error)?;
    if !tar {
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
    archive.set_unpack_xattrs(false);
    archive
        .unpack(unpacked.path())
        .map_err(|e| coded_as("RUN038", format!("unpacking {path}: {e}")))?;
    std::fs::rename(unpacked.keep(), &local)
        .with_context(|| format!("moving the copy to {}", local.display()))?;
    Ok(done)
}

/// Writes a copied file's bytes (which arrive as output) to a file.
struct FileSink(std::fs::File);

impl OutputSink for FileSink {
    fn stdout(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.0.write_all(bytes)
    }

    fn stderr(&mut self, _: &[u8]) -> io::Result<()> {
        Ok(())
    }
}
