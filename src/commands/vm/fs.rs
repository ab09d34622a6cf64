//! `mvm fs`: look at and arrange files in a running VM, under /tmp (or the workload user's
//! home, when the image gives it one) and with the workload user's rights (the agent does each operation as that user; symlinks are never followed).

use mvm_ir::terminal::{printable, Newlines};
use std::sync::Arc;
use std::time::Duration;

use clap::Subcommand;
use mvm_protocol::{FileInfo, FileKind, Request, Response};
use serde_json::json;

use super::{agent_error, connect};
use crate::commands::{coded_as, coded_io};
use crate::output::Output;

/// How long one operation may take (a recursive remove of a large tree included).
const FS_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, Subcommand)]
pub enum FsCommand {
    /// List a directory: NAME:/tmp/dir.
    Ls {
        /// NAME:/tmp/dir
        target: String,
    },
    /// Describe one path (a symlink itself, not what it points to).
    Stat {
        /// NAME:/tmp/path
        target: String,
    },
    /// Create a directory (its parent must exist).
    Mkdir {
        /// NAME:/tmp/dir
        target: String,
        /// Permission bits, octal.
        #[arg(long, default_value = "755", value_parser = parse_mode)]
        mode: u32,
    },
    /// Remove a file, a symlink or an empty directory (with -r, a directory and all in it).
    Rm {
        /// NAME:/tmp/path
        target: String,
        /// Remove a directory and everything it holds.
        #[arg(short, long)]
        recursive: bool,
    },
    /// Rename a path within the VM (as rename(2): a file there is replaced).
    Mv {
        /// NAME:/tmp/from
        source: String,
        /// /tmp/to, in the same VM
        destination: String,
    },
}

fn parse_mode(text: &str) -> Result<u32, String> {
    u32::from_str_radix(text, 8)
        .ok()
        .filter(|mode| *mode <= 0o777)
        .ok_or_else(|| format!("{text:?} is not an octal mode up to 777"))
}

pub fn run(command: FsCommand, out: &Output) -> anyhow::Result<()> {
    let (target, stat) = match command {
        FsCommand::Ls { target } => (target, false),
        FsCommand::Stat { target } => (target, true),
        FsCommand::Mkdir { target, mode } => {
            let (name, path) = split(&target)?;
            return act(name, Request::FsMkdir { path, mode }, out);
        }
        FsCommand::Rm { target, recursive } => {
            let (name, path) = split(&target)?;
            return act(name, Request::FsRemove { path, recursive }, out);
        }
        FsCommand::Mv {
            source,
            destination,
        } => {
            let (name, from) = split(&source)?;
            let to = destination;
            return act(name, Request::FsMove { from, to }, out);
        }
    };
    let (name, path) = split(&target)?;
    let request = match stat {
        true => Request::FsStat { path },
        false => Request::FsList { path },
    };
    match ask(name, request)? {
        Response::FsList { entries, truncated } => {
            out.result(json!({"entries": entries, "truncated": truncated}), || {
                let mut lines: Vec<String> = entries.iter().map(line).collect();
                if truncated {
                    lines.push(format!("(only the first {} entries)", entries.len()));
                }
                lines.join("\n")
            });
        }
        Response::FsStat(info) => out.result(json!({"entry": info}), || line(&info)),
        other => return Err(coded_io("RUN025", format!("unexpected answer {other:?}"))),
    }
    Ok(())
}

/// `NAME:/path` split, or RUN038.
fn split(target: &str) -> anyhow::Result<(&str, String)> {
    target
        .split_once(':')
        .filter(|(name, path)| mvm_runner::state::valid_name(name) && path.starts_with('/'))
        .map(|(name, path)| (name, path.to_string()))
        .ok_or_else(|| coded_as("RUN038", format!("{target:?} is not NAME:/path")))
}

fn ask(name: &str, request: Request) -> anyhow::Result<Response> {
    let mut client = connect(name, Arc::default())?;
    client.call(&request, FS_TIMEOUT, None).map_err(agent_error)
}

fn act(name: &str, request: Request, out: &Output) -> anyhow::Result<()> {
    ask(name, request)?;
    out.result(json!({"done": true}), String::new);
    Ok(())
}

/// One `ls -l`-like line.
fn line(info: &FileInfo) -> String {
    let kind = match info.kind {
        FileKind::File => '-',
        FileKind::Directory => 'd',
        FileKind::Symlink => 'l',
        FileKind::Other => '?',
    };
    format!(
        "{kind}{:04o} {:>6} {:>12} {} {}",
        info.mode,
        info.uid,
        info.size,
        time::OffsetDateTime::from_unix_timestamp(info.modified)
            .ok()
            .and_then(|t| t
                .format(&time::format_description::well_known::Rfc3339)
                .ok())
            .unwrap_or_default(),
        printable(&info.name, Newlines::Escape)
    )
}
