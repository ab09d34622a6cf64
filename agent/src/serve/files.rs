//! Copying files in and out of the guest (`fs_write`, `fs_read`), confined to the file roots.
//!
//! The agent is root, so it never does for a copy what the workload user could not: paths must
//! be absolute and under one of the [`FileRoots`], written without `.`, `..` or empty
//! components; every directory on the way is resolved beneath the root with no symlinks followed
//! (`openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`); a file read must be one the workload
//! user could read; a file is written only where that user could write it, is owned by it,
//! and is put in place (renamed over the target) only once its size and SHA-256 match what the
//! host announced.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::rand::GetRandomFlags;
use sha2::{Digest, Sha256};

use super::exec::Credentials;
use mvm_protocol::flow::{ReceiveWindow, SendWindow};
use mvm_protocol::{codes, ErrorReply, FileDone, FsWriteRequest};

/// The directory tree every guest has for file operations.
pub const TMP_ROOT: &str = "/tmp";
/// The longest path accepted.
const MAX_PATH: usize = 4096;

/// The directory trees file operations may touch: [`TMP_ROOT`], and the workload user's home
/// when the image gives it one of its own (E2B's `/home/user`, say). Nothing else: the rest of
/// the root is the image's, verified and not the workload's to rewrite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRoots(Vec<String>);

impl FileRoots {
    /// [`TMP_ROOT`] alone.
    pub fn tmp() -> Self {
        Self(vec![TMP_ROOT.into()])
    }

    /// [`TMP_ROOT`], and `user`'s home in `passwd` when it is a directory of the user's own:
    /// a clean absolute path other than `/` and outside `/tmp`, reached through no symlink,
    /// owned by `user`.
    pub fn with_home_of(user: Credentials, passwd: &std::path::Path) -> Self {
        let mut roots = Self::tmp();
        if let Some(home) = super::users::home_of(user.uid, passwd) {
            let clean = home.strip_prefix('/').and_then(clean_components);
            let owned = || {
                open_root(&home)
                    .ok()
                    .and_then(|dir| rustix::fs::fstat(&dir).ok())
                    .is_some_and(|stat| stat.st_uid == user.uid)
            };
            if clean.is_some_and(|c| c[0] != TMP_ROOT.trim_start_matches('/')) && owned() {
                roots.0.push(home);
            }
        }
        roots
    }

    /// The whole root filesystem: the dev profile's `files_anywhere` (the kernel still checks
    /// the workload user's permissions, and the verified root is read-only).
    pub fn anywhere() -> Self {
        Self(vec!["/".into()])
    }

    /// The roots, as announced to the host and named in refusals.
    pub fn paths(&self) -> &[String] {
        &self.0
    }

    /// The root holding `path` and the rest of `path` below it (`""` for the root itself).
    fn split<'p>(&self, path: &'p str) -> Option<(&str, &'p str)> {
        self.0.iter().find_map(|root| {
            if root == "/" {
                return path.strip_prefix('/').map(|inside| ("/", inside));
            }
            let rest = path.strip_prefix(root.as_str())?;
            match rest.strip_prefix('/') {
                Some(inside) => Some((root.as_str(), inside)),
                None => rest.is_empty().then_some((root.as_str(), "")),
            }
        })
    }

    /// Whether `path` is one of the roots itself.
    pub(super) fn is_root(&self, path: &str) -> bool {
        self.0.iter().any(|root| root == path)
    }
}

/// Who file operations act as and where they may reach.
#[derive(Debug, Clone, Copy)]
pub struct FileAccess<'a> {
    /// The workload user (the agent itself when `None`, on a host).
    pub user: Option<Credentials>,
    /// Where.
    pub roots: &'a FileRoots,
}

/// The components of a relative path, when none is empty, `.` or `..`.
fn clean_components(path: &str) -> Option<Vec<&str>> {
    let components: Vec<&str> = path.split('/').collect();
    let clean = components
        .iter()
        .all(|c| !c.is_empty() && *c != "." && *c != "..");
    clean.then_some(components)
}

/// A path checked and split: the directory it is in (opened beneath the root) and its name.
pub(super) struct Place {
    pub(super) dir: OwnedFd,
    pub(super) name: String,
}

/// Opens the root `root` itself, through no symlink on the way (a home's parent is the
/// image's, but the overlay above it is writable).
pub(super) fn open_root(root: &str) -> Result<OwnedFd, ErrorReply> {
    rustix::fs::openat2(
        rustix::fs::CWD,
        root,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
        ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|e| error(codes::FILE_IO, format!("{root}: {e}")))
}

/// Resolves `path` under one of `roots` without following any symlink.
pub(super) fn place(path: &str, roots: &FileRoots) -> Result<Place, ErrorReply> {
    let refused = |why: &str| error(codes::PATH_REFUSED, format!("{path:?}: {why}"));
    if path.len() > MAX_PATH || path.contains('\0') {
        return Err(refused("not a path"));
    }
    let (root, inside) = roots
        .split(path)
        .filter(|(_, inside)| !inside.is_empty())
        .ok_or_else(|| {
            refused(&format!(
                "file operations are confined to {} (the dev profile opens the whole root)",
                roots.paths().join(" and ")
            ))
        })?;
    let components =
        clean_components(inside).ok_or_else(|| refused("empty, `.` or `..` components"))?;
    let (name, parents) = components
        .split_last()
        .ok_or_else(|| refused("no file name"))?;
    let root = open_root(root)?;
    let dir = if parents.is_empty() {
        root
    } else {
        rustix::fs::openat2(
            &root,
            parents.join("/"),
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        )
        .map_err(|e| refused(&format!("its directory: {e}")))?
    };
    Ok(Place {
        dir,
        name: (*name).to_string(),
    })
}

/// Whether `user` (everyone, in tests without one) may do `access` (2 write) on a directory
/// with this owner and mode: checked before an upload makes its temporary there as root.
fn allowed(stat: &rustix::fs::Stat, user: Option<Credentials>, access: u32) -> bool {
    let Some(user) = user else {
        return true;
    };
    let mode = stat.st_mode;
    (stat.st_uid == user.uid && mode & (access << 6) != 0)
        || (stat.st_gid == user.gid && mode & (access << 3) != 0)
        || mode & access != 0
}

/// Opens the file at `path` for reading as the workload user: on a thread with its
/// credentials, so the kernel checks every directory on the way as well as the file (a
/// readable file in a directory the user may not enter stays unread).
pub fn open_for_reading(path: &str, access: FileAccess) -> Result<(File, u64), ErrorReply> {
    let fd = super::fsops::as_user(access.user, || {
        let place = place(path, access.roots)?;
        rustix::fs::openat(
            &place.dir,
            place.name.as_str(),
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
            Mode::empty(),
        )
        .map_err(|e| error(codes::PATH_REFUSED, format!("{path}: {e}")))
    })?;
    let stat = rustix::fs::fstat(&fd).map_err(|e| error(codes::FILE_IO, format!("{path}: {e}")))?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
        return Err(error(
            codes::PATH_REFUSED,
            format!("{path}: not a regular file"),
        ));
    }
    Ok((File::from(fd), stat.st_size as u64))
}

/// A file being written: its bytes go to a private temporary beside the target, which takes
/// the target's place only once it is whole and matches.
pub struct Upload {
    place: Place,
    temporary: String,
    file: File,
    hasher: Sha256,
    received: u64,
    request: FsWriteRequest,
    /// What the host may still send.
    pub window: ReceiveWindow,
}

impl Upload {
    /// Starts writing `request.path` (as the workload user would be allowed to).
    pub fn start(request: FsWriteRequest, access: FileAccess) -> Result<Self, ErrorReply> {
        let path = request.path.clone();
        let user = access.user;
        if request.mode > 0o777 {
            return Err(error(
                codes::BAD_REQUEST,
                format!("mode {:o} is not 0..=0777", request.mode),
            ));
        }
        // Resolved as the user: every directory on the way must be one it may enter.
        let place = super::fsops::as_user(user, || place(&path, access.roots))?;
        let dir_stat =
            rustix::fs::fstat(&place.dir).map_err(|e| error(codes::FILE_IO, e.to_string()))?;
        if !allowed(&dir_stat, user, 2) {
            return Err(error(
                codes::PATH_REFUSED,
                format!("{path}: the workload user cannot write in its directory"),
            ));
        }
        match rustix::fs::statat(&place.dir, place.name.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(_) if request.tar => {
                return Err(error(
                    codes::FILE_STATE,
                    format!("{path}: exists; a directory is copied to a new name"),
                ));
            }
            Ok(existing) => {
                let regular = FileType::from_raw_mode(existing.st_mode) == FileType::RegularFile;
                let owned = user.is_none_or(|u| existing.st_uid == u.uid);
                if !regular || !owned {
                    return Err(error(
                        codes::PATH_REFUSED,
                        format!("{path}: exists and is not a file of the workload user"),
                    ));
                }
            }
            Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(error(codes::FILE_IO, format!("{path}: {e}"))),
        }
        let (temporary, fd) = create_temporary(&place.dir)
            .map_err(|e| error(codes::FILE_IO, format!("{path}: {e}")))?;
        if let Some(user) = user {
            let owner = rustix::fs::fchown(
                &fd,
                Some(rustix::fs::Uid::from_raw(user.uid)),
                Some(rustix::fs::Gid::from_raw(user.gid)),
            );
            if let Err(e) = owner {
                let _ = rustix::fs::unlinkat(&place.dir, temporary.as_str(), AtFlags::empty());
                return Err(error(codes::FILE_IO, format!("{path}: {e}")));
            }
        }
        Ok(Self {
            place,
            temporary,
            file: File::from(fd),
            hasher: Sha256::new(),
            received: 0,
            request,
            window: ReceiveWindow::default(),
        })
    }

    /// Appends bytes; an error (more bytes than announced, a failed write) ends the upload.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), ErrorReply> {
        self.received += bytes.len() as u64;
        if self.received > self.request.size {
            return Err(error(
                codes::COPY_MISMATCH,
                format!("more than the {} bytes announced", self.request.size),
            ));
        }
        self.hasher.update(bytes);
        self.file
            .write_all(bytes)
            .map_err(|e| error(codes::FILE_IO, format!("{}: {e}", self.request.path)))
    }

    /// Why an upload the host ended early failed.
    pub fn abandoned(&self) -> String {
        format!(
            "{}: the host ended the copy after {} of {} bytes",
            self.request.path, self.received, self.request.size
        )
    }

    /// Whether every byte announced has arrived.
    pub fn complete(&self) -> bool {
        self.received == self.request.size
    }

    /// Checks the bytes and puts the file in place (or, for a tar stream, unpacks it into the
    /// new directory as `user`).
    pub fn finish(self, user: Option<Credentials>) -> Result<FileDone, ErrorReply> {
        let sha256 = format!("sha256:{}", hex::encode(self.hasher.clone().finalize()));
        if sha256 != self.request.sha256 {
            return Err(error(
                codes::COPY_MISMATCH,
                format!(
                    "{} arrived as {sha256}, announced {}",
                    self.request.path, self.request.sha256
                ),
            ));
        }
        let io = |e: std::io::Error| error(codes::FILE_IO, format!("{}: {e}", self.request.path));
        if self.request.tar {
            self.unpack(user)?;
            return Ok(FileDone {
                size: self.received,
                sha256,
            });
        }
        rustix::fs::fchmod(&self.file, Mode::from_raw_mode(self.request.mode))
            .map_err(|e| io(e.into()))?;
        self.file.sync_all().map_err(io)?;
        rustix::fs::renameat(
            &self.place.dir,
            self.temporary.as_str(),
            &self.place.dir,
            self.place.name.as_str(),
        )
        .map_err(|e| io(e.into()))?;
        Ok(FileDone {
            size: self.received,
            sha256,
        })
    }
}

impl Upload {
    /// Unpacks the (checked) tar stream into a new directory, as `user`: the kernel holds it
    /// to what that user may create; the archive's own paths may not leave the directory.
    fn unpack(&self, user: Option<Credentials>) -> Result<(), ErrorReply> {
        let path = &self.request.path;
        super::fsops::as_user(user, || {
            rustix::fs::mkdirat(
                &self.place.dir,
                self.place.name.as_str(),
                Mode::from_raw_mode(self.request.mode.max(0o700)),
            )
            .map_err(|e| super::fsops::failed(path, e))?;
            let archive = rustix::fs::openat(
                &self.place.dir,
                self.temporary.as_str(),
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| super::fsops::failed(path, e))?;
            let target = rustix::fs::openat(
                &self.place.dir,
                self.place.name.as_str(),
                OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| super::fsops::failed(path, e))?;
            // The directory just made, named through its descriptor. The kernel holds what
            // follows to the user's rights; the tar crate keeps the entries inside it.
            let inside = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&target));
            let mut archive = tar::Archive::new(File::from(archive));
            archive.set_preserve_permissions(true);
            archive.set_overwrite(false);
            archive.unpack(&inside).map_err(|e| {
                error(
                    codes::COPY_MISMATCH,
                    format!("{path}: unpacking the archive: {e}"),
                )
            })
        })
    }
}

/// Writes the directory `path` as a tar stream into an anonymous memory file, as `user`
/// (symlinks are archived as symlinks, never followed), ready to be sent from its start.
pub fn archive_directory(path: &str, access: FileAccess) -> Result<File, ErrorReply> {
    let place = place(path, access.roots)?;
    super::fsops::as_user(access.user, || {
        let dir = rustix::fs::openat(
            &place.dir,
            place.name.as_str(),
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| super::fsops::failed(path, e))?;
        // In memory (the guest's /tmp is memory too): overlayfs has no O_TMPFILE.
        let scratch = rustix::fs::memfd_create("mvm-archive", rustix::fs::MemfdFlags::CLOEXEC)
            .map_err(|e| error(codes::FILE_IO, format!("a temporary for {path}: {e}")))?;
        let inside = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&dir));
        let mut builder = tar::Builder::new(File::from(scratch));
        builder.follow_symlinks(false);
        builder.mode(tar::HeaderMode::Deterministic);
        let io = |e: std::io::Error| error(codes::FILE_IO, format!("{path}: {e}"));
        builder.append_dir_all("", &inside).map_err(io)?;
        let mut file = builder.into_inner().map_err(io)?;
        std::io::Seek::rewind(&mut file).map_err(io)?;
        Ok(file)
    })
}

impl Drop for Upload {
    /// An upload that did not finish leaves nothing behind (after a successful rename the
    /// temporary name no longer exists, and this does nothing).
    fn drop(&mut self) {
        let _ = rustix::fs::unlinkat(&self.place.dir, self.temporary.as_str(), AtFlags::empty());
    }
}

/// A file being sent to the host a chunk at a time, as its stream's window allows, so a large
/// copy shares the channel with everything else.
pub struct Download {
    /// The request's stream id.
    pub stream: u32,
    /// Room left to send on the stream.
    pub window: SendWindow,
    file: File,
    hasher: Sha256,
    size: u64,
}

impl Download {
    /// Starts sending `file` on `stream`.
    pub fn new(stream: u32, file: File) -> Self {
        Self {
            stream,
            window: SendWindow::default(),
            file,
            hasher: Sha256::new(),
            size: 0,
        }
    }

    /// Reads the next chunk that fits the window into `buffer`: `Some(n)` bytes, or `None`
    /// at the end of the file.
    pub fn next_chunk(&mut self, buffer: &mut [u8]) -> std::io::Result<Option<usize>> {
        let room = self.window.room().min(buffer.len());
        loop {
            match self.file.read(&mut buffer[..room]) {
                Ok(0) => return Ok(None),
                Ok(n) => {
                    self.hasher.update(&buffer[..n]);
                    self.size += n as u64;
                    self.window.spend(n);
                    return Ok(Some(n));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The size and digest of what was sent.
    pub fn finish(self) -> FileDone {
        FileDone {
            size: self.size,
            sha256: format!("sha256:{}", hex::encode(self.hasher.finalize())),
        }
    }
}

pub(super) fn error(code: &str, message: String) -> ErrorReply {
    ErrorReply {
        code: code.into(),
        message,
    }
}

/// Creates the file an upload is written to, beside its destination, under a name nobody can
/// guess — the workload could otherwise make that name first and so block every copy — and
/// exclusively (never an existing file, never through a symlink).
fn create_temporary(dir: &OwnedFd) -> rustix::io::Result<(String, OwnedFd)> {
    let mut tries = 0;
    loop {
        let mut random = [0u8; 12];
        let mut filled = 0;
        while filled < random.len() {
            filled += rustix::rand::getrandom(&mut random[filled..], GetRandomFlags::empty())?;
        }
        let name = format!(".mvm-copy-{}", hex::encode(random));
        let created = rustix::fs::openat(
            dir,
            name.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        );
        match created {
            Err(rustix::io::Errno::EXIST) if tries < 8 => tries += 1,
            created => return created.map(|fd| (name, fd)),
        }
    }
}
