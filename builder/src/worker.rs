//! The host builder persona: the untrusted half of a build ([`crate::rootfs`]) in a child
//! process with the fewest rights this host can take away.
//!
//! The parent ([`build_in_worker`]) pulls a registry or `oci:` image itself
//! ([`crate::oci::pull_image`]): every blob fetched into the blob cache and checked against its
//! digest, nothing parsed but the index and manifest, whose bytes matched their digests. It
//! hard-links exactly that image's blobs into a fresh directory in the cache, starts the worker
//! with a cleared environment (only `PATH` and `TMPDIR` = the output directory: no proxy
//! settings, no registry tokens), sends a [`RootfsRequest`] and that directory as JSON on stdin,
//! and reads one JSON answer on stdout. The worker ([`serve`]) first confines itself, before it
//! reads a byte of any image:
//!
//! - `no_new_privs`;
//! - Landlock (where the kernel has it): writes only to the output directory; reads only that,
//!   the image's blob directory (or its `oci-archive:` file, or the Nix store) and the system's
//!   libraries; no signals to other processes; and, from Landlock ABI 4, no TCP bind or connect;
//! - a seccomp filter refusing (`EPERM`) what a builder never needs: every socket (`socket` of
//!   any family, `socketpair`, `connect`, `bind`, `listen`, `accept`), ptrace and other
//!   processes' memory, mounts and namespaces, module and kexec loading, BPF, perf, keyrings,
//!   io_uring, reboot, swap, clock setting, userfaultfd.
//!
//! Why this shape:
//!
//! - The worker needs no network. Pulling is fetching bytes and hashing them, which the trusted
//!   parent does without interpreting them; everything that interprets image bytes (the config,
//!   gzip and zstd, tar) stays in the worker. So the worker is denied sockets outright, rather
//!   than filtered by address (loopback, link-local metadata), which a seccomp filter cannot
//!   read in `connect`'s memory argument anyway.
//! - A directory of hard links rather than descriptors passed down: Landlock confines by path,
//!   so a directory holding exactly the image's blobs limits the worker's reads to them with the
//!   rules it already has, costs no copy, and needs no descriptors carried across `exec`. The
//!   directory is read-only to the worker, which cannot change the cache's files through the
//!   links; it hashes each blob again as it reads it. The parent removes the directory when the
//!   worker has ended.
//! - An `oci-archive:` image is a tar file to parse, so the worker unpacks it, from the archive
//!   alone, into a private cache in its output directory. A Nix closure is realised by the
//!   parent; the worker only reads it from the store. Neither needs the network.
//!
//! What was enforced is reported back ([`SandboxReport`]) and recorded in the provenance. The
//! worker never sees signing keys: signing happens in the parent.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};

use mvm_ir::{Coded, ErrorClass};
use serde::{Deserialize, Serialize};

use crate::oci::{BlobCache, ImageRef, RegistryOptions, Transport};
use crate::rootfs::{build_rootfs, RootfsReport, RootfsRequest};

/// What confinement the worker achieved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxReport {
    /// `no_new_privs` is set.
    pub no_new_privs: bool,
    /// Landlock: `full`, `partial` or `unavailable` (kernel without Landlock).
    pub landlock: String,
    /// Landlock's network rules (TCP bind and connect denied): `full`, or `unavailable`
    /// (kernel without Landlock ABI 4).
    pub landlock_network: String,
    /// The seccomp deny-list is installed.
    pub seccomp: bool,
}

/// What the parent sends the worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WorkerRequest {
    /// What to build (without the cache's path: the worker is not given the cache).
    pub(crate) rootfs: RootfsRequest,
    /// A directory holding exactly the image's verified blobs (registry and `oci:` images).
    pub(crate) blobs: Option<PathBuf>,
    /// A nix_packages image for the builder VM to realise with its own Nix first (never
    /// given to a worker on the host, which starts no programs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) nix_eval: Option<crate::vm_persona::NixEval>,
}

/// The worker's one answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Answer {
    Built {
        report: Box<RootfsReport>,
        sandbox: SandboxReport,
    },
    Failed {
        code: String,
        class: ErrorClass,
        message: String,
    },
}

/// Why the worker could not build.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The build itself failed; `code` is the stable code of the cause.
    #[error("{message}")]
    Build {
        /// The cause's code (`OCI002`, `LAYER003`, …).
        code: String,
        /// The cause's class, as the worker gave it with the code.
        class: ErrorClass,
        /// What happened.
        message: String,
    },
    /// The worker could not be run or answered nonsense.
    #[error("builder worker: {0}")]
    Worker(String),
}

impl Coded for WorkerError {
    fn code(&self) -> &str {
        match self {
            WorkerError::Build { code, .. } => code,
            WorkerError::Worker(_) => "BUILD004",
        }
    }

    /// The cause's class, which the worker sends with its code; a worker that could not run
    /// (BUILD004) is I/O.
    fn class(&self) -> ErrorClass {
        match self {
            WorkerError::Build { class, .. } => *class,
            WorkerError::Worker(_) => ErrorClass::Io,
        }
    }
}

/// Requests larger than this are refused by the worker.
pub(crate) const MAX_REQUEST_BYTES: u64 = 8 * 1024 * 1024;

/// Pulls the image of `request` (if it comes from a registry or an `oci:` layout), then runs
/// `program args…` as the worker for it and returns its report.
pub fn build_in_worker(
    program: &Path,
    args: &[&str],
    request: &RootfsRequest,
) -> Result<(RootfsReport, SandboxReport), WorkerError> {
    // The worker may only write below this; it must exist before it confines itself.
    std::fs::create_dir_all(&request.out_dir)
        .map_err(|e| WorkerError::Worker(format!("{}: {e}", request.out_dir.display())))?;
    // Removed when this function returns, after the worker has ended.
    let blobs = pull_for_worker(request)?;
    let job = WorkerRequest {
        rootfs: RootfsRequest {
            cache_dir: PathBuf::new(),
            ..request.clone()
        },
        blobs: blobs.as_ref().map(|blobs| blobs.dir.path().to_path_buf()),
        nix_eval: None,
    };
    let answer = run_worker(program, args, &job, Stdio::inherit())?;
    let (report, sandbox) = answer.result(request)?;
    check_outputs(&request.out_dir)?;
    Ok((report, sandbox))
}

/// Runs the worker `program args…` on `job` (whose `out_dir` exists: it may write only there)
/// with a cleared environment, in a process group of its own that is ended with it, and
/// returns its one answer. `stderr` takes what it writes there.
pub(crate) fn run_worker(
    program: &Path,
    args: &[&str],
    job: &WorkerRequest,
    stderr: Stdio,
) -> Result<Answer, WorkerError> {
    let mut command = mvm_ir::env::command(program);
    command
        .args(args)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("TMPDIR", &job.rootfs.out_dir)
        // Its own process group, so that everything it started can be ended with it.
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(stderr);
    let mut child = command
        .spawn()
        .map_err(|e| WorkerError::Worker(format!("cannot start {}: {e}", program.display())))?;
    let group = child.id();
    let request_json = serde_json::to_vec(job).map_err(|e| WorkerError::Worker(e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(&request_json)
            .map_err(|e| WorkerError::Worker(format!("sending the request: {e}")))?;
    }
    // Read the answer on a thread while waiting: a process the worker left behind could hold
    // stdout open, so the group is ended before the read is joined.
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| WorkerError::Worker("no stdout".into()))?;
    let reader = std::thread::spawn(move || {
        let mut answer = Vec::new();
        stdout
            .take(MAX_REQUEST_BYTES)
            .read_to_end(&mut answer)
            .map(|_| answer)
    });
    let status = child.wait();
    end_process_group(group);
    let status = status.map_err(|e| WorkerError::Worker(e.to_string()))?;
    let answer = reader
        .join()
        .map_err(|_| WorkerError::Worker("reading the answer failed".into()))?
        .map_err(|e| WorkerError::Worker(format!("reading the answer: {e}")))?;
    serde_json::from_slice::<Answer>(&answer)
        .map_err(|_| WorkerError::Worker(format!("exited with {status} without an answer")))
}

impl Answer {
    /// What the worker built for `request`, or why it could not.
    pub(crate) fn result(
        self,
        request: &RootfsRequest,
    ) -> Result<(RootfsReport, SandboxReport), WorkerError> {
        let (report, sandbox) = match self {
            Answer::Built { report, sandbox } => (*report, sandbox),
            Answer::Failed {
                code,
                class,
                message,
            } => {
                return Err(WorkerError::Build {
                    code,
                    class,
                    message,
                })
            }
        };
        // Trust nothing the worker left but what was asked of it.
        if report.image_digest != request.digest {
            return Err(WorkerError::Worker(format!(
                "built {} when {} was asked for",
                report.image_digest, request.digest
            )));
        }
        Ok((report, sandbox))
    }
}

/// A build's directory of exactly its image's blobs, in the cache, removed when dropped. It
/// is locked (`flock`) while its build lives, so that the directory of a build that was killed
/// is told apart from one in use, and removed by the next build.
pub(crate) struct ImageBlobs {
    pub(crate) dir: tempfile::TempDir,
    _in_use: File,
}

/// The prefix of [`ImageBlobs`] directories in the cache.
const IMAGE_BLOBS_PREFIX: &str = ".image-";
/// Held while an [`ImageBlobs`] directory is made and locked, or while abandoned ones are
/// looked for: no build sees another's directory between its making and its locking.
const IMAGE_BLOBS_LOCK: &str = ".image-blobs.lock";

impl ImageBlobs {
    /// A new, locked, empty directory in `cache_dir`; abandoned ones are removed first.
    fn create(cache_dir: &Path) -> std::io::Result<Self> {
        let (dir, in_use) = claim_dir(cache_dir, IMAGE_BLOBS_LOCK, IMAGE_BLOBS_PREFIX, || {
            let dir = tempfile::Builder::new()
                .prefix(IMAGE_BLOBS_PREFIX)
                .tempdir_in(cache_dir)?;
            let path = dir.path().to_path_buf();
            Ok((dir, path))
        })?;
        Ok(Self {
            dir,
            _in_use: in_use,
        })
    }
}

/// Makes a directory in `parent` with `make` and locks it (`flock`) for as long as the
/// returned file lives: it is in use while it is locked. First removes the directories of
/// `parent` named `prefix…` that nobody holds, those of work that was killed. Under the lock
/// `parent/lock_name`, so that no one sees another's directory between its making and its
/// locking.
pub(crate) fn claim_dir<T>(
    parent: &Path,
    lock_name: &str,
    prefix: &str,
    make: impl FnOnce() -> std::io::Result<(T, PathBuf)>,
) -> std::io::Result<(T, File)> {
    let guard = File::create(parent.join(lock_name))?;
    guard.lock()?;
    for entry in std::fs::read_dir(parent)?.flatten() {
        let abandoned = entry.file_name().to_string_lossy().starts_with(prefix)
            && entry.file_type().is_ok_and(|t| t.is_dir())
            && File::open(entry.path()).is_ok_and(|dir| dir.try_lock().is_ok());
        if abandoned {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let (made, path) = make()?;
    let in_use = File::open(path)?;
    in_use.lock()?;
    Ok((made, in_use))
}

/// Pulls a registry or `oci:` image into the cache (every blob verified now) and returns a
/// fresh directory in the cache holding exactly its blobs, for the worker to read. A Nix or
/// `oci-archive:` image has none: the worker reads its closure or archive itself.
pub(crate) fn pull_for_worker(request: &RootfsRequest) -> Result<Option<ImageBlobs>, WorkerError> {
    if request.nix.is_some() {
        return Ok(None);
    }
    let image =
        ImageRef::new(&request.reference, &request.digest, &request.base_dir).map_err(failed)?;
    if let Transport::Archive(_) = image.transport {
        return Ok(None);
    }
    let cache = BlobCache::at(&request.cache_dir).map_err(failed)?;
    let registry = RegistryOptions {
        insecure_registries: request.insecure_registries.clone(),
        progress: request.progress,
    };
    let pulled = crate::oci::pull_image(&image, &registry, &cache).map_err(failed)?;
    let blobs = ImageBlobs::create(&request.cache_dir)
        .map_err(|e| WorkerError::Worker(format!("{}: {e}", request.cache_dir.display())))?;
    cache
        .select(&pulled.blobs, blobs.dir.path())
        .map_err(failed)?;
    Ok(Some(blobs))
}

/// A cause that failed the build in the parent, under its own code and class.
fn failed(e: impl Coded + std::fmt::Display) -> WorkerError {
    WorkerError::Build {
        code: e.code().to_string(),
        class: e.class(),
        message: e.to_string(),
    }
}

/// The worker's output directory must hold exactly its two files, each a regular file (not a
/// symlink, FIFO or device a compromised worker could plant for the parent to read or sign).
pub(crate) fn check_outputs(dir: &Path) -> Result<(), WorkerError> {
    let bad = |why: String| WorkerError::Worker(format!("{}: {why}", dir.display()));
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| bad(e.to_string()))? {
        let entry = entry.map_err(|e| bad(e.to_string()))?;
        let kind = entry.file_type().map_err(|e| bad(e.to_string()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !kind.is_file() {
            return Err(bad(format!("{name} is not a regular file")));
        }
        names.push(name);
    }
    names.sort();
    let mut expected = vec![
        crate::rootfs::ROOTFS_FILE.to_string(),
        crate::rootfs::VERITY_FILE.to_string(),
    ];
    expected.sort();
    if names != expected {
        return Err(bad(format!("holds {names:?}, expected {expected:?}")));
    }
    Ok(())
}

/// Kills whatever the worker left running in its process group.
fn end_process_group(group: u32) {
    let Ok(group) = libc::pid_t::try_from(group) else {
        return;
    };
    // SAFETY: killpg only sends a signal; `group` is the id of the child we spawned as the
    // leader of its own new process group, so no unrelated process can be signalled.
    #[allow(unsafe_code)]
    unsafe {
        libc::killpg(group, libc::SIGKILL);
    }
}

/// The worker's main: confine, read the request from stdin, build, answer on stdout.
pub fn serve() -> ExitCode {
    let answer = match read_request() {
        Err(message) => Answer::Failed {
            code: "BUILD004".into(),
            class: ErrorClass::Io,
            message,
        },
        Ok(job) if job.nix_eval.is_some() => Answer::Failed {
            code: "BUILD004".into(),
            class: ErrorClass::Io,
            message: "Nix is realised by the builder VM's worker, never by this one".into(),
        },
        Ok(job) => run_job(&job),
    };
    let ok = matches!(answer, Answer::Built { .. });
    let mut stdout = std::io::stdout().lock();
    let written = serde_json::to_writer(&mut stdout, &answer).is_ok() && stdout.flush().is_ok();
    if ok && written {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Confines this process, then builds `job`.
fn run_job(job: &WorkerRequest) -> Answer {
    match confine(job) {
        // The host could not confine the worker: I/O, like a worker that cannot run.
        Err(message) => Answer::Failed {
            code: "BUILD005".into(),
            class: ErrorClass::Io,
            message,
        },
        Ok(sandbox) => match build_rootfs(&job.rootfs, job.blobs.as_deref()) {
            Ok(report) => Answer::Built {
                report: Box::new(report),
                sandbox,
            },
            Err(e) => Answer::Failed {
                code: e.code().to_string(),
                class: e.class(),
                message: e.to_string(),
            },
        },
    }
}

fn read_request() -> Result<WorkerRequest, String> {
    let mut bytes = Vec::new();
    std::io::stdin()
        .lock()
        .take(MAX_REQUEST_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("reading the request: {e}"))?;
    if bytes.len() as u64 > MAX_REQUEST_BYTES {
        return Err("request too large".into());
    }
    serde_json::from_slice(&bytes).map_err(|e| format!("bad request: {e}"))
}

/// Applies Landlock (best effort: absent on some kernels) and the seccomp deny-list
/// (required). Both set `no_new_privs`.
pub(crate) fn confine(job: &WorkerRequest) -> Result<SandboxReport, String> {
    let (landlock, landlock_network) =
        landlock_confine(job).map_err(|e| format!("landlock: {e}"))?;
    seccomp_confine().map_err(|e| format!("seccomp: {e}"))?;
    Ok(SandboxReport {
        no_new_privs: true,
        landlock,
        landlock_network,
        seccomp: true,
    })
}

/// How far the file-system rules (`full`, `partial`, `unavailable`) and the network rules
/// (`full`, `unavailable`) are enforced.
fn landlock_confine(job: &WorkerRequest) -> Result<(String, String), landlock::RulesetError> {
    use landlock::{
        path_beneath_rules, Access, AccessFs, AccessNet, LandlockStatus, Ruleset, RulesetAttr,
        RulesetCreatedAttr, RulesetStatus, Scope, ABI,
    };
    let abi = ABI::V6;
    let request = &job.rootfs;
    // Only the output directory: not the blob cache, whose other images are none of its
    // business.
    let writable = [request.out_dir.as_path()];
    // An archive is read whole by the worker; a registry or layout image only from its blob
    // directory. Not the declaration's directory: that may be a whole home directory.
    let archive =
        match crate::oci::ImageRef::new(&request.reference, &request.digest, &request.base_dir) {
            Ok(ImageRef {
                transport: Transport::Archive(path),
                ..
            }) if request.nix.is_none() => Some(path),
            _ => None,
        };
    // The system's libraries and the dynamic loader's files; not `/etc`: name resolution and
    // TLS roots were for the network, which the worker does not have.
    let system = ["/usr", "/lib", "/lib64", "/dev/urandom", "/proc/self"].map(Path::new);
    // A Nix image's store: read, never written.
    let nix_store = request.nix.as_ref().map(|c| c.store_root.join("nix/store"));
    let readable: Vec<&Path> = system
        .into_iter()
        .chain(archive.as_deref())
        .chain(job.blobs.as_deref())
        .chain(nix_store.as_deref())
        .collect();
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))?
        // No TCP bind or connect (where the kernel has network rules); no rule allows any port.
        .handle_access(AccessNet::from_all(abi))?
        // No signals to processes outside the worker, no abstract unix sockets.
        .scope(Scope::from_all(abi))?
        .create()?
        .add_rules(path_beneath_rules(
            readable.iter().filter(|p| p.exists()),
            AccessFs::from_read(abi),
        ))?
        .add_rules(path_beneath_rules(writable, AccessFs::from_all(abi)))?
        .restrict_self()?;
    let network = match status.landlock {
        LandlockStatus::Available { effective_abi, .. }
            if effective_abi >= ABI::V4 && status.ruleset != RulesetStatus::NotEnforced =>
        {
            "full"
        }
        _ => "unavailable",
    };
    let files = match status.ruleset {
        RulesetStatus::FullyEnforced => "full",
        RulesetStatus::PartiallyEnforced => "partial",
        RulesetStatus::NotEnforced => "unavailable",
    };
    Ok((files.to_string(), network.to_string()))
}

/// System calls a builder never makes; each is refused with `EPERM`.
const DENIED_SYSCALLS: &[libc::c_long] = &[
    // The network, of any family: registries are pulled by the parent.
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_connect,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_pidfd_getfd,
    libc::SYS_kcmp,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_mount_setattr,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_adjtimex,
    libc::SYS_userfaultfd,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_iopl,
    libc::SYS_ioperm,
];

/// `clone` flags that create namespaces: a `clone` with any of them is refused too.
const NAMESPACE_FLAGS: &[libc::c_int] = &[
    libc::CLONE_NEWNS,
    libc::CLONE_NEWCGROUP,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
    0x80, // CLONE_NEWTIME
];

/// The x32 ABI's system call numbers are the x86_64 ones with this bit set.
const X32_SYSCALL_BIT: libc::c_long = 0x4000_0000;

fn seccomp_confine() -> Result<(), seccompiler::Error> {
    use seccompiler::{
        BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
        SeccompRule, TargetArch,
    };
    let mut rules: std::collections::BTreeMap<i64, Vec<SeccompRule>> = DENIED_SYSCALLS
        .iter()
        .flat_map(|&nr| [(nr, vec![]), (nr | X32_SYSCALL_BIT, vec![])])
        .collect();
    let mut clone_rules = Vec::new();
    for &flag in NAMESPACE_FLAGS {
        let flag = flag as u64;
        let condition = SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(flag),
            flag,
        )?;
        clone_rules.push(SeccompRule::new(vec![condition])?);
    }
    rules.insert(libc::SYS_clone, clone_rules);
    rules.insert(libc::SYS_clone | X32_SYSCALL_BIT, vec![]);
    let deny = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        TargetArch::x86_64,
    )?;
    let program: BpfProgram = deny.try_into()?;
    seccompiler::apply_filter(&program)?;
    // clone3 passes its flags in memory a filter cannot read: answer "not implemented", and the
    // C library falls back to clone, whose flags the filter above checks.
    let clone3 = SeccompFilter::new(
        [
            (libc::SYS_clone3, vec![]),
            (libc::SYS_clone3 | X32_SYSCALL_BIT, vec![]),
        ]
        .into_iter()
        .collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )?;
    let program: BpfProgram = clone3.try_into()?;
    seccompiler::apply_filter(&program)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blob_directory_left_by_a_killed_build_is_removed_and_one_in_use_kept() {
        let cache = tempfile::tempdir().unwrap();
        let abandoned = cache.path().join(".image-abandoned");
        let busy = cache.path().join(".image-busy");
        for dir in [&abandoned, &busy] {
            std::fs::create_dir(dir).unwrap();
            std::fs::write(dir.join("blob"), b"linked").unwrap();
        }
        let holder = File::open(&busy).unwrap();
        holder.lock().unwrap();
        let blobs = ImageBlobs::create(cache.path()).unwrap();
        assert!(!abandoned.exists(), "the killed build's directory is left");
        assert!(busy.join("blob").exists(), "a directory in use was removed");
        let other = File::open(blobs.dir.path()).unwrap();
        assert!(other.try_lock().is_err(), "the new directory is not locked");
        let made = blobs.dir.path().to_path_buf();
        drop(blobs);
        assert!(!made.exists());
    }
    use crate::bundle::BundleError;
    use crate::kernel::KernelError;
    use crate::layer::{LayerError, LayerErrorKind};
    use crate::nix_image::NixImageError;
    use crate::oci::OciError;
    use crate::rootfs::RootfsError;

    const CHILD: &str = "MVM_WORKER_CONFINEMENT_CHILD";
    const LAYER: &str = "MVM_WORKER_CONFINEMENT_LAYER";
    const PORT: &str = "MVM_WORKER_CONFINEMENT_PORT";
    /// The blob of the image the worker builds, and one of another image, both in the cache.
    const OWN_BLOB: &[u8] = b"this image";
    const OTHER_BLOB: &[u8] = b"another image";
    /// The worker's blob directory, inside the cache as the parent makes it.
    const IMAGE_BLOBS: &str = "cache/.image-test";

    /// Each builder code has the class the CLI's table of codes gave it before the types
    /// carried their classes (integrity: OCI002, KERNEL005, NIXBUILD004; I/O: OCI007, OCI008,
    /// LAYER011, BUILD003-005, KERNEL001, KERNEL006, NIXBUILD001, 003, 006; else invalid
    /// input), and keeps it through the worker's answer.
    #[test]
    fn each_code_has_its_class_and_keeps_it_through_the_worker() {
        use ErrorClass::{Integrity, InvalidInput, Io};
        let s = String::new;
        let io = || std::io::Error::other("x");
        let layer = |kind| OciError::Layer {
            digest: s(),
            source: LayerError {
                kind,
                path: s(),
                message: s(),
                source: None,
            },
        };
        let errors: Vec<(Box<dyn Coded>, &str, ErrorClass)> = vec![
            (
                Box::new(OciError::BadReference {
                    reference: s(),
                    reason: s(),
                }),
                "OCI001",
                InvalidInput,
            ),
            (
                Box::new(OciError::DigestMismatch {
                    what: "blob",
                    digest: s(),
                    reason: s(),
                }),
                "OCI002",
                Integrity,
            ),
            (
                Box::new(OciError::Registry {
                    registry: s(),
                    reason: s(),
                }),
                "OCI007",
                Io,
            ),
            (
                Box::new(OciError::Io {
                    path: s(),
                    source: io(),
                }),
                "OCI008",
                Io,
            ),
            (
                Box::new(OciError::Decompress {
                    digest: s(),
                    reason: s(),
                }),
                "OCI009",
                InvalidInput,
            ),
            (
                Box::new(layer(LayerErrorKind::Traversal)),
                "LAYER001",
                InvalidInput,
            ),
            (Box::new(layer(LayerErrorKind::Io)), "LAYER011", Io),
            (
                Box::new(KernelError::Debian(crate::debian::DebianError::Tool {
                    tool: s(),
                    reason: s(),
                })),
                "KERNEL001",
                Io,
            ),
            (
                Box::new(KernelError::NoKernel(s())),
                "KERNEL004",
                InvalidInput,
            ),
            (
                Box::new(KernelError::DigestMismatch {
                    path: s(),
                    pinned: s(),
                    found: s(),
                }),
                "KERNEL005",
                Integrity,
            ),
            (
                Box::new(KernelError::Io {
                    path: s(),
                    source: io(),
                }),
                "KERNEL006",
                Io,
            ),
            (
                Box::new(NixImageError::NoNix {
                    program: s(),
                    source: io(),
                }),
                "NIXBUILD001",
                Io,
            ),
            (
                Box::new(NixImageError::Eval {
                    attr: s(),
                    set: s(),
                    message: s(),
                }),
                "NIXBUILD002",
                InvalidInput,
            ),
            (Box::new(NixImageError::Unexpected(s())), "NIXBUILD003", Io),
            (
                Box::new(NixImageError::Mismatch(s())),
                "NIXBUILD004",
                Integrity,
            ),
            (
                Box::new(NixImageError::Unsupported(s())),
                "NIXBUILD005",
                InvalidInput,
            ),
            (
                Box::new(NixImageError::Io {
                    path: s(),
                    source: io(),
                }),
                "NIXBUILD006",
                Io,
            ),
            (
                Box::new(RootfsError::Io {
                    path: s(),
                    source: io(),
                }),
                "BUILD003",
                Io,
            ),
            (
                Box::new(RootfsError::Oci(OciError::DigestMismatch {
                    what: "blob",
                    digest: s(),
                    reason: s(),
                })),
                "OCI002",
                Integrity,
            ),
            (
                Box::new(BundleError::Io {
                    path: s(),
                    source: io(),
                }),
                "BUILD003",
                Io,
            ),
            (Box::new(WorkerError::Worker(s())), "BUILD004", Io),
        ];
        for (error, code, class) in &errors {
            assert_eq!((error.code(), error.class()), (*code, *class));
            // Through the worker: the answer it writes, read back by the parent.
            let answer = Answer::Failed {
                code: error.code().to_string(),
                class: error.class(),
                message: s(),
            };
            let json = serde_json::to_vec(&answer).unwrap();
            let Answer::Failed { code, class, .. } = serde_json::from_slice(&json).unwrap() else {
                panic!("not a failure");
            };
            let received = WorkerError::Build {
                code,
                class,
                message: s(),
            };
            assert_eq!(
                (received.code(), received.class()),
                (error.code(), error.class())
            );
        }
    }

    /// The worker starts with nothing of the parent's environment but `PATH` and `TMPDIR`: no
    /// proxy settings, no registry tokens. The test re-runs itself with a token and a proxy set,
    /// and a shell stands in for the worker and writes its environment down.
    #[test]
    fn the_worker_gets_only_path_and_tmpdir() {
        const ENV_CHILD: &str = "MVM_WORKER_ENV_CHILD";
        let Some(dir) = std::env::var_os(ENV_CHILD) else {
            let root = tempfile::tempdir().unwrap();
            let status = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "worker::tests::the_worker_gets_only_path_and_tmpdir",
                    "--test-threads=1",
                ])
                .env(ENV_CHILD, root.path())
                .env("MVM_OCI_BEARER_TOKEN", "secret")
                .env("HTTPS_PROXY", "http://127.0.0.1:9")
                .status()
                .unwrap();
            assert!(status.success());
            let env = std::fs::read_to_string(root.path().join("env")).unwrap();
            let names: std::collections::BTreeSet<&str> = env
                .lines()
                .filter_map(|line| line.split_once('=').map(|(name, _)| name))
                // The shell's own.
                .filter(|name| *name != "PWD")
                .collect();
            assert_eq!(names, ["PATH", "TMPDIR"].into(), "{env}");
            return;
        };
        let root = Path::new(&dir);
        // An archive image: nothing is pulled before the worker starts.
        let request = RootfsRequest {
            reference: format!("oci-archive:{}", root.join("none.tar").display()),
            digest: digest_of(b"none"),
            base_dir: root.to_path_buf(),
            cache_dir: root.join("cache"),
            out_dir: root.join("out"),
            insecure_registries: vec![],
            progress: false,
            nix: None,
            compression: Default::default(),
        };
        let dump = root.join("env");
        let shell = ["-c", "env > \"$0\"", dump.to_str().unwrap()];
        let err = build_in_worker(Path::new("/bin/sh"), &shell, &request).unwrap_err();
        assert_eq!(err.code(), "BUILD004", "{err}");
    }

    /// Re-runs this test binary as a child that confines itself as the worker does, then tries
    /// what a hostile image parser might: write outside its directories or into its blob
    /// directory, read a file it was not given or another image's blob in the cache, reach a
    /// TCP listener on loopback, open any socket, create a namespace, mount, ptrace. Each must
    /// fail; writing inside its output directory and reading its own image's blob must still
    /// work. A second child applies Landlock alone, to show its network rules by themselves.
    #[test]
    fn the_worker_confinement_holds() {
        if let Some(dirs) = std::env::var_os(CHILD) {
            let root = Path::new(&dirs);
            std::process::exit(match std::env::var(LAYER).as_deref() {
                Ok("landlock") => probe_landlock_network(root),
                _ => probe(root),
            });
        }
        let root = tempfile::tempdir().unwrap();
        for dir in ["out", "outside", "secret"] {
            std::fs::create_dir_all(root.path().join(dir)).unwrap();
        }
        std::fs::write(root.path().join("secret/key"), b"k").unwrap();
        // The cache holds this image's blob and another image's; the worker is handed a
        // directory of the first only, as the parent does.
        let cache = BlobCache::at(&root.path().join("cache")).unwrap();
        for blob in [OWN_BLOB, OTHER_BLOB] {
            std::fs::write(blob_path(&root.path().join("cache"), blob), blob).unwrap();
        }
        cache
            .select(&[digest_of(OWN_BLOB)], &root.path().join(IMAGE_BLOBS))
            .unwrap();
        // A listener the child must not reach.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        for layer in ["landlock", "all"] {
            let status = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "worker::tests::the_worker_confinement_holds",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD, root.path())
                .env(LAYER, layer)
                .env(PORT, port.to_string())
                .status()
                .unwrap();
            assert_eq!(
                status.code(),
                Some(0),
                "the child confined by {layer} reported a failure (see its output)"
            );
        }
        assert!(!root.path().join("outside/planted").exists());
        listener.set_nonblocking(true).unwrap();
        assert!(listener.accept().is_err(), "a child reached the listener");
        assert_eq!(
            std::fs::read(blob_path(&root.path().join("cache"), OWN_BLOB)).unwrap(),
            OWN_BLOB,
            "the cache's file is unchanged"
        );
    }

    fn digest_of(blob: &[u8]) -> String {
        mvm_ir::digest::sha256_prefixed(blob)
    }

    /// Where `blob` lies in the cache directory `dir`.
    fn blob_path(dir: &Path, blob: &[u8]) -> PathBuf {
        dir.join("sha256").join(&digest_of(blob)["sha256:".len()..])
    }

    /// The worker's request in the test's directory `root`: a registry image whose blob
    /// directory is [`IMAGE_BLOBS`].
    fn job(root: &Path) -> WorkerRequest {
        WorkerRequest {
            rootfs: RootfsRequest {
                reference: "127.0.0.1:5000/x".into(),
                digest: digest_of(OWN_BLOB),
                base_dir: root.join("out"),
                // Named, yet not granted.
                cache_dir: root.join("cache"),
                out_dir: root.join("out"),
                insecure_registries: vec![],
                progress: false,
                nix: None,
                compression: Default::default(),
            },
            blobs: Some(root.join(IMAGE_BLOBS)),
            nix_eval: None,
        }
    }

    /// A TCP connect to the test's listener, and a TCP bind, each refused with `errno`.
    fn tcp_refused(errno: i32, failed: &mut Option<i32>, number: i32) {
        let port: u16 = std::env::var(PORT).unwrap().parse().unwrap();
        let attempts = [
            (
                "a TCP connect to the loopback listener",
                std::net::TcpStream::connect(("127.0.0.1", port)).map(drop),
            ),
            (
                "a TCP bind",
                std::net::TcpListener::bind("127.0.0.1:0").map(drop),
            ),
        ];
        for (what, result) in attempts {
            let found = result.as_ref().err().and_then(|e| e.raw_os_error());
            if found != Some(errno) {
                eprintln!("{what} was not refused with errno {errno} ({result:?})");
                failed.get_or_insert(number);
            }
        }
    }

    /// The first child's side: Landlock alone (no seccomp) refuses TCP with `EACCES` where the
    /// kernel has network rules.
    fn probe_landlock_network(root: &Path) -> i32 {
        let (files, network) = match landlock_confine(&job(root)) {
            Ok(status) => status,
            Err(e) => {
                eprintln!("landlock: {e}");
                return 1;
            }
        };
        eprintln!("landlock alone: files {files}, network {network}");
        if network != "full" {
            eprintln!("this kernel has no Landlock network rules (ABI 4): NOT checked here");
            return 0;
        }
        let mut failed = None;
        tcp_refused(libc::EACCES, &mut failed, 2);
        failed.unwrap_or(0)
    }

    /// The second child's side: 0 if every probe behaved, else the number of the first that
    /// did not.
    fn probe(root: &Path) -> i32 {
        let report = match confine(&job(root)) {
            Ok(report) => report,
            Err(e) => {
                eprintln!("confine: {e}");
                return 1;
            }
        };
        eprintln!("sandbox: {report:?}");
        // Every probe runs; the first that misbehaved names the exit status.
        let mut failed = None;
        if std::fs::write(root.join("out/ok"), b"ok").is_err() {
            eprintln!("cannot write the output directory");
            return 2;
        }
        // Landlock, where the kernel has it, confines the file system.
        if report.landlock == "unavailable" {
            eprintln!("this kernel has no Landlock: file-system confinement NOT checked here");
        } else {
            if std::fs::write(root.join("outside/planted"), b"x").is_ok() {
                eprintln!("wrote outside its directories");
                return 3;
            }
            if std::fs::read(root.join("secret/key")).is_ok() {
                eprintln!("read a file it was not given");
                return 4;
            }
            if std::fs::read(blob_path(&root.join("cache"), OTHER_BLOB)).is_ok() {
                eprintln!("read another image's blob in the cache");
                failed.get_or_insert(5);
            }
            if std::fs::read(blob_path(&root.join(IMAGE_BLOBS), OWN_BLOB)).ok()
                != Some(OWN_BLOB.into())
            {
                eprintln!("cannot read its own image's blob");
                failed.get_or_insert(6);
            }
            let blob = blob_path(&root.join(IMAGE_BLOBS), OWN_BLOB);
            if std::fs::OpenOptions::new().write(true).open(&blob).is_ok()
                || std::fs::remove_file(&blob).is_ok()
            {
                eprintln!("could change its blob directory (a link to the cache's file)");
                failed.get_or_insert(7);
            }
        }
        // seccomp refuses these with EPERM whatever the kernel.
        // Each call's errno is read right after it returns.
        let with_errno = |result: libc::c_long| (result, std::io::Error::last_os_error());
        let denied = |what: &str, (result, error): (libc::c_long, std::io::Error)| -> bool {
            let errno = error.raw_os_error();
            let refused = result == -1 && errno == Some(libc::EPERM);
            if !refused {
                eprintln!("{what} was not refused with EPERM (result {result}, errno {errno:?})");
            }
            refused
        };
        let mut pair = [-1 as libc::c_int; 2];
        // SAFETY: raw syscalls with constant, valid arguments (socketpair writes at most two
        // ints into `pair`, which holds two); each is expected to fail.
        #[allow(unsafe_code)]
        let results = unsafe {
            [
                (
                    "unshare",
                    with_errno(libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUSER)),
                ),
                (
                    "mount",
                    with_errno(libc::syscall(
                        libc::SYS_mount,
                        c"none".as_ptr(),
                        c"/tmp".as_ptr(),
                        c"tmpfs".as_ptr(),
                        0,
                        0,
                    )),
                ),
                (
                    "ptrace",
                    with_errno(libc::syscall(
                        libc::SYS_ptrace,
                        libc::PTRACE_TRACEME,
                        0,
                        0,
                        0,
                    )),
                ),
                ("bpf", with_errno(libc::syscall(libc::SYS_bpf, 0, 0, 0))),
                (
                    "clone(CLONE_NEWUSER)",
                    with_errno(libc::syscall(
                        libc::SYS_clone,
                        libc::CLONE_NEWUSER | libc::SIGCHLD,
                        0,
                        0,
                        0,
                        0,
                    )),
                ),
                (
                    "fsopen",
                    with_errno(libc::syscall(libc::SYS_fsopen, c"tmpfs".as_ptr(), 0)),
                ),
                (
                    "socket(AF_UNIX)",
                    with_errno(libc::syscall(
                        libc::SYS_socket,
                        libc::AF_UNIX,
                        libc::SOCK_STREAM,
                        0,
                    )),
                ),
                (
                    "socketpair(AF_UNIX)",
                    with_errno(libc::syscall(
                        libc::SYS_socketpair,
                        libc::AF_UNIX,
                        libc::SOCK_STREAM,
                        0,
                        pair.as_mut_ptr(),
                    )),
                ),
                (
                    "socket(AF_INET6, SOCK_DGRAM)",
                    with_errno(libc::syscall(
                        libc::SYS_socket,
                        libc::AF_INET6,
                        libc::SOCK_DGRAM,
                        0,
                    )),
                ),
                (
                    "x32 mount",
                    with_errno(libc::syscall(
                        libc::SYS_mount | X32_SYSCALL_BIT,
                        0,
                        0,
                        0,
                        0,
                        0,
                    )),
                ),
            ]
        };
        for (i, (what, result)) in results.into_iter().enumerate() {
            if !denied(what, result) {
                failed.get_or_insert(10 + i as i32);
            }
        }
        // Threads still start (clone3 is refused with ENOSYS; the C library falls back to clone).
        if std::thread::spawn(|| 7).join().ok() != Some(7) {
            eprintln!("a thread could not be started");
            failed.get_or_insert(30);
        }
        // No network: the listener the test opened on loopback is out of reach, and no socket of
        // any family opens (seccomp refuses socket() itself, before Landlock is asked).
        tcp_refused(libc::EPERM, &mut failed, 31);
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").map(drop);
        if udp.as_ref().err().and_then(|e| e.raw_os_error()) != Some(libc::EPERM) {
            eprintln!("a UDP socket was not refused with EPERM ({udp:?})");
            failed.get_or_insert(32);
        }
        failed.unwrap_or(0)
    }
}
