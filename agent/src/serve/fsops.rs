//! File operations beyond copies (`fs_list`, `fs_stat`, `fs_mkdir`, `fs_remove`, `fs_move`),
//! confined to the file roots like copies, and carried out with the workload user's own
//! credentials: each runs on a short-lived thread that has dropped to that user (Linux keeps
//! credentials per thread), so the kernel decides what it may do — the sticky `/tmp`, file
//! modes, ownership — exactly as for a command the user runs. Nothing is followed through a
//! symlink: a symlink is listed, described, moved or removed, never entered.

use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, OwnedFd};

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags};
use rustix::io::Errno;

use super::exec::Credentials;
use super::files::{error, open_root, place, FileAccess, FileRoots};
use mvm_protocol::{codes, ErrorReply, FileInfo, FileKind, Request, Response};

/// Entries `fs_list` returns at most (the answer must fit in one frame).
pub const MAX_LISTED: usize = 1024;
/// How deep `fs_remove` goes into nested directories.
const MAX_DEPTH: usize = 128;

/// Carries out a file request as `access.user` (as the agent itself when `None`, on a host).
pub fn run(request: Request, access: FileAccess) -> Response {
    as_user(access.user, || carry_out(request, access.roots)).unwrap_or_else(Response::Error)
}

/// Runs `work` on a thread holding `user`'s credentials (the agent's own when `None`).
pub fn as_user<T: Send>(
    user: Option<Credentials>,
    work: impl FnOnce() -> Result<T, ErrorReply> + Send,
) -> Result<T, ErrorReply> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                if let Some(user) = user {
                    become_user(user)?;
                }
                work()
            })
            .join()
    })
    .unwrap_or_else(|_| Err(error(codes::FILE_IO, "the file operation failed".into())))
}

/// Drops this thread (only) to `user`: no supplementary groups, then gid, then uid — after
/// which it holds no capability.
fn become_user(user: Credentials) -> Result<(), ErrorReply> {
    let gid = rustix::process::Gid::from_raw(user.gid);
    let uid = rustix::process::Uid::from_raw(user.uid);
    rustix::thread::set_thread_groups(&[])
        .and_then(|()| rustix::thread::set_thread_res_gid(gid, gid, gid))
        .and_then(|()| rustix::thread::set_thread_res_uid(uid, uid, uid))
        .map_err(|e| {
            error(
                codes::FILE_IO,
                format!("dropping to the workload user: {e}"),
            )
        })
}

fn carry_out(request: Request, roots: &FileRoots) -> Result<Response, ErrorReply> {
    match request {
        Request::FsList { path } => list(&path, roots),
        Request::FsStat { path } => {
            let (dir, name) = parent_and_name(&path, roots)?;
            describe(&dir, &name, &path).map(Response::FsStat)
        }
        Request::FsMkdir { path, mode } => {
            if mode > 0o777 {
                return Err(error(
                    codes::BAD_REQUEST,
                    format!("mode {mode:o} is not 0..=0777"),
                ));
            }
            let target = place(&path, roots)?;
            rustix::fs::mkdirat(&target.dir, target.name.as_str(), Mode::from_raw_mode(mode))
                .map_err(|e| failed(&path, e))?;
            Ok(Response::Done)
        }
        Request::FsRemove { path, recursive } => {
            let target = place(&path, roots)?;
            let name = CString::new(target.name).map_err(|_| failed(&path, Errno::INVAL))?;
            remove(&target.dir, &name, recursive, 0).map_err(|e| failed(&path, e))?;
            Ok(Response::Done)
        }
        Request::FsMove { from, to } => {
            let source = place(&from, roots)?;
            let destination = place(&to, roots)?;
            rustix::fs::renameat(
                &source.dir,
                source.name.as_str(),
                &destination.dir,
                destination.name.as_str(),
            )
            .map_err(|e| failed(&from, e))?;
            Ok(Response::Done)
        }
        other => Err(error(
            codes::BAD_REQUEST,
            format!("{other:?} is not a file operation"),
        )),
    }
}

/// The directory holding `path` and its name; a root itself is `(root, ".")`.
fn parent_and_name(path: &str, roots: &FileRoots) -> Result<(OwnedFd, String), ErrorReply> {
    if roots.is_root(path) {
        return Ok((open_root(path)?, ".".into()));
    }
    let target = place(path, roots)?;
    Ok((target.dir, target.name))
}

fn list(path: &str, roots: &FileRoots) -> Result<Response, ErrorReply> {
    let (parent, name) = parent_and_name(path, roots)?;
    if describe(&parent, &name, path)?.kind == FileKind::Symlink {
        return Err(error(
            codes::PATH_REFUSED,
            format!("{path}: a symlink, never followed"),
        ));
    }
    let dir = open_directory(&parent, &name).map_err(|e| failed(path, e))?;
    let mut entries = Vec::new();
    let mut truncated = false;
    let reader = Dir::read_from(&dir).map_err(|e| failed(path, e))?;
    for entry in reader {
        let entry = entry.map_err(|e| failed(path, e))?;
        let Ok(name) = entry.file_name().to_str() else {
            continue;
        };
        if name == "." || name == ".." {
            continue;
        }
        if entries.len() == MAX_LISTED {
            truncated = true;
            break;
        }
        // An entry removed while listing is left out.
        if let Ok(info) = describe(&dir, name, path) {
            entries.push(info);
        }
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Response::FsList { entries, truncated })
}

fn open_directory<P: rustix::path::Arg>(parent: &impl AsFd, name: P) -> Result<OwnedFd, Errno> {
    rustix::fs::openat(
        parent,
        name,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
    )
}

fn describe(dir: &impl AsFd, name: &str, path: &str) -> Result<FileInfo, ErrorReply> {
    let stat =
        rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| failed(path, e))?;
    let kind = match FileType::from_raw_mode(stat.st_mode) {
        FileType::RegularFile => FileKind::File,
        FileType::Directory => FileKind::Directory,
        FileType::Symlink => FileKind::Symlink,
        _ => FileKind::Other,
    };
    // A root is named by its last component, as a listing of its parent would.
    let name = match name {
        "." => path.rsplit('/').next().unwrap_or_default().to_string(),
        name => name.to_string(),
    };
    Ok(FileInfo {
        name,
        kind,
        size: stat.st_size as u64,
        mode: stat.st_mode & 0o7777,
        uid: stat.st_uid,
        modified: stat.st_mtime,
    })
}

/// Removes `name` in `dir`: a file or symlink is unlinked, a directory emptied first when
/// `recursive` (its entries through directory descriptors, never a path or a symlink).
fn remove(dir: &impl AsFd, name: &CStr, recursive: bool, depth: usize) -> Result<(), Errno> {
    let stat = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::Directory {
        return rustix::fs::unlinkat(dir, name, AtFlags::empty());
    }
    if recursive {
        if depth == MAX_DEPTH {
            return Err(Errno::LOOP);
        }
        let inner = open_directory(dir, name)?;
        let mut names = Vec::new();
        for entry in Dir::read_from(&inner)? {
            let entry = entry?;
            let entry_name = entry.file_name().to_bytes();
            if entry_name != b"." && entry_name != b".." {
                names.push(entry.file_name().to_owned());
            }
        }
        for entry_name in names {
            remove(&inner, &entry_name, true, depth + 1)?;
        }
    }
    rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)
}

pub(super) fn failed(path: &str, e: Errno) -> ErrorReply {
    let code = match e {
        Errno::EXIST | Errno::NOENT | Errno::NOTDIR | Errno::ISDIR | Errno::NOTEMPTY => {
            codes::FILE_STATE
        }
        Errno::ACCESS | Errno::PERM | Errno::LOOP | Errno::XDEV => codes::PATH_REFUSED,
        _ => codes::FILE_IO,
    };
    error(code, format!("{path}: {e}"))
}
