//! The host builder persona: the untrusted half of a build ([`crate::rootfs`]) in a child
//! process with the fewest rights this host can take away.
//!
//! The parent ([`build_in_worker`]) starts the worker with a cleared environment (only `PATH`,
//! `TMPDIR` = the output directory, and the registry bearer tokens pass), sends a
//! [`RootfsRequest`] as JSON on stdin, and reads one JSON answer on stdout. The worker
//! ([`serve`]) first confines itself, before it reads a byte of any image:
//!
//! - `no_new_privs`;
//! - Landlock (where the kernel has it): writes only to the output and cache directories, reads
//!   only those, the image source, and the system files name resolution and TLS need;
//! - a seccomp filter refusing (`EPERM`) what a builder never needs: ptrace and other processes'
//!   memory, mounts and namespaces, module and kexec loading, BPF, perf, keyrings, reboot, swap,
//!   clock setting, userfaultfd.
//!
//! What was enforced is reported back ([`SandboxReport`]) and recorded in the provenance. The
//! worker never sees signing keys: signing happens in the parent.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};

use mvm_ir::{Coded, ErrorClass};
use serde::{Deserialize, Serialize};

use crate::oci::{ImageRef, Transport};
use crate::rootfs::{build_rootfs, RootfsReport, RootfsRequest};

/// What confinement the worker achieved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxReport {
    /// `no_new_privs` is set.
    pub no_new_privs: bool,
    /// Landlock: `full`, `partial` or `unavailable` (kernel without Landlock).
    pub landlock: String,
    /// The seccomp deny-list is installed.
    pub seccomp: bool,
}

/// The worker's one answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Answer {
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
const MAX_REQUEST_BYTES: u64 = 8 * 1024 * 1024;

/// Runs `program args…` as the worker for `request` and returns its report.
pub fn build_in_worker(
    program: &Path,
    args: &[&str],
    request: &RootfsRequest,
) -> Result<(RootfsReport, SandboxReport), WorkerError> {
    // The worker may only write below these; they must exist before it confines itself.
    crate::oci::BlobCache::at(&request.cache_dir)
        .map_err(|e| WorkerError::Worker(e.to_string()))?;
    std::fs::create_dir_all(&request.out_dir)
        .map_err(|e| WorkerError::Worker(format!("{}: {e}", request.out_dir.display())))?;
    let mut command = Command::new(program);
    command
        .args(args)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("TMPDIR", &request.out_dir)
        // Its own process group, so that everything it started can be ended with it.
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (key, value) in std::env::vars_os() {
        if passes_to_worker(&key.to_string_lossy(), request) {
            command.env(key, value);
        }
    }
    let mut child = command
        .spawn()
        .map_err(|e| WorkerError::Worker(format!("cannot start {}: {e}", program.display())))?;
    let group = child.id();
    let request_json =
        serde_json::to_vec(request).map_err(|e| WorkerError::Worker(e.to_string()))?;
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
    let (report, sandbox) = match serde_json::from_slice::<Answer>(&answer) {
        Ok(Answer::Built { report, sandbox }) => (*report, sandbox),
        Ok(Answer::Failed {
            code,
            class,
            message,
        }) => {
            return Err(WorkerError::Build {
                code,
                class,
                message,
            })
        }
        Err(_) => {
            return Err(WorkerError::Worker(format!(
                "exited with {status} without an answer"
            )))
        }
    };
    // Trust nothing the worker left but what was asked of it.
    if report.image_digest != request.digest {
        return Err(WorkerError::Worker(format!(
            "built {} when {} was asked for",
            report.image_digest, request.digest
        )));
    }
    check_outputs(&request.out_dir)?;
    Ok((report, sandbox))
}

/// Environment the worker gets besides `PATH` and `TMPDIR`: proxy and TLS settings, and the
/// bearer token for the image's own registry (never another registry's).
fn passes_to_worker(key: &str, request: &RootfsRequest) -> bool {
    const PASSED: &[&str] = &[
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "NO_PROXY",
        "no_proxy",
        "ALL_PROXY",
        "all_proxy",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
    ];
    if PASSED.contains(&key) {
        return true;
    }
    match crate::oci::ImageRef::new(&request.reference, &request.digest, &request.base_dir) {
        Ok(ImageRef {
            transport: Transport::Registry { registry, .. },
            ..
        }) => key == crate::oci::token_variable(&registry) || key == "MVM_OCI_BEARER_TOKEN",
        _ => false,
    }
}

/// The worker's output directory must hold exactly its two files, each a regular file (not a
/// symlink, FIFO or device a compromised worker could plant for the parent to read or sign).
fn check_outputs(dir: &Path) -> Result<(), WorkerError> {
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
        Ok(request) => match confine(&request) {
            // The host could not confine the worker: I/O, like a worker that cannot run.
            Err(message) => Answer::Failed {
                code: "BUILD005".into(),
                class: ErrorClass::Io,
                message,
            },
            Ok(sandbox) => match build_rootfs(&request) {
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
        },
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

fn read_request() -> Result<RootfsRequest, String> {
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
fn confine(request: &RootfsRequest) -> Result<SandboxReport, String> {
    let landlock = landlock_confine(request).map_err(|e| format!("landlock: {e}"))?;
    seccomp_confine().map_err(|e| format!("seccomp: {e}"))?;
    Ok(SandboxReport {
        no_new_privs: true,
        landlock,
        seccomp: true,
    })
}

fn landlock_confine(request: &RootfsRequest) -> Result<String, landlock::RulesetError> {
    use landlock::{
        path_beneath_rules, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr,
        RulesetStatus, Scope, ABI,
    };
    let abi = ABI::V6;
    let writable = [request.out_dir.as_path(), request.cache_dir.as_path()];
    // Name resolution, TLS roots and the dynamic loader's files; a local image source. Not the
    // declaration's directory: that may be a whole home directory.
    let source =
        match crate::oci::ImageRef::new(&request.reference, &request.digest, &request.base_dir) {
            Ok(ImageRef {
                transport: Transport::Layout(path) | Transport::Archive(path),
                ..
            }) => Some(path),
            _ => None,
        };
    let system = [
        "/etc",
        "/usr",
        "/lib",
        "/lib64",
        "/dev/urandom",
        "/proc/self",
    ]
    .map(Path::new);
    // A Nix image's store: read, never written.
    let nix_store = request.nix.as_ref().map(|c| c.store_root.join("nix/store"));
    let readable: Vec<&Path> = system
        .into_iter()
        .chain(source.as_deref())
        .chain(nix_store.as_deref())
        .collect();
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))?
        // No signals to processes outside the worker, no abstract unix sockets.
        .scope(Scope::from_all(abi))?
        .create()?
        .add_rules(path_beneath_rules(
            readable.iter().filter(|p| p.exists()),
            AccessFs::from_read(abi),
        ))?
        .add_rules(path_beneath_rules(writable, AccessFs::from_all(abi)))?
        .restrict_self()?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => "full",
        RulesetStatus::PartiallyEnforced => "partial",
        RulesetStatus::NotEnforced => "unavailable",
    }
    .to_string())
}

/// System calls a builder never makes; each is refused with `EPERM`.
const DENIED_SYSCALLS: &[libc::c_long] = &[
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
    // No unix-domain sockets: a compromised parser must not reach a docker or ssh-agent socket.
    let unix = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::AF_UNIX as u64,
    )?;
    rules.insert(libc::SYS_socket, vec![SeccompRule::new(vec![unix])?]);
    rules.insert(libc::SYS_clone | X32_SYSCALL_BIT, vec![]);
    rules.insert(libc::SYS_socket | X32_SYSCALL_BIT, vec![]);
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
    use crate::bundle::BundleError;
    use crate::kernel::KernelError;
    use crate::layer::{LayerError, LayerErrorKind};
    use crate::nix_image::NixImageError;
    use crate::oci::OciError;
    use crate::rootfs::RootfsError;

    const CHILD: &str = "MVM_WORKER_CONFINEMENT_CHILD";

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
                Box::new(KernelError::Tool {
                    tool: s(),
                    reason: s(),
                }),
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

    /// Re-runs this test binary as a child that confines itself as the worker does, then tries
    /// what a hostile image parser might: write outside its directories, read a file it was not
    /// given, create a namespace, mount, ptrace. Each must fail; writing inside its output
    /// directory must still work.
    #[test]
    fn the_worker_confinement_holds() {
        if let Some(dirs) = std::env::var_os(CHILD) {
            std::process::exit(probe(Path::new(&dirs)));
        }
        let root = tempfile::tempdir().unwrap();
        for dir in ["out", "cache", "outside", "secret"] {
            std::fs::create_dir(root.path().join(dir)).unwrap();
        }
        std::fs::write(root.path().join("secret/key"), b"k").unwrap();
        let status = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "worker::tests::the_worker_confinement_holds",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, root.path())
            .status()
            .unwrap();
        assert_eq!(
            status.code(),
            Some(0),
            "the confined child reported a failure (see its output)"
        );
        assert!(!root.path().join("outside/planted").exists());
    }

    /// The child's side: 0 if every probe behaved, else the number of the first that did not.
    fn probe(root: &Path) -> i32 {
        let request = RootfsRequest {
            reference: "127.0.0.1:5000/x".into(),
            digest: format!("sha256:{}", "0".repeat(64)),
            base_dir: root.join("out"),
            cache_dir: root.join("cache"),
            out_dir: root.join("out"),
            insecure_registries: vec![],
            allow_devices: false,
            progress: false,
            nix: None,
        };
        let report = match confine(&request) {
            Ok(report) => report,
            Err(e) => {
                eprintln!("confine: {e}");
                return 1;
            }
        };
        eprintln!("sandbox: {report:?}");
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
        }
        // seccomp refuses these with EPERM whatever the kernel.
        let denied = |what: &str, result: libc::c_long| -> bool {
            let errno = std::io::Error::last_os_error().raw_os_error();
            let refused = result == -1 && errno == Some(libc::EPERM);
            if !refused {
                eprintln!("{what} was not refused with EPERM (result {result}, errno {errno:?})");
            }
            refused
        };
        // SAFETY: raw syscalls with constant, valid arguments; each is expected to fail.
        #[allow(unsafe_code)]
        let results = unsafe {
            [
                (
                    "unshare",
                    libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUSER),
                ),
                (
                    "mount",
                    libc::syscall(
                        libc::SYS_mount,
                        c"none".as_ptr(),
                        c"/tmp".as_ptr(),
                        c"tmpfs".as_ptr(),
                        0,
                        0,
                    ),
                ),
                (
                    "ptrace",
                    libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0),
                ),
                ("bpf", libc::syscall(libc::SYS_bpf, 0, 0, 0)),
                (
                    "clone(CLONE_NEWUSER)",
                    libc::syscall(
                        libc::SYS_clone,
                        libc::CLONE_NEWUSER | libc::SIGCHLD,
                        0,
                        0,
                        0,
                        0,
                    ),
                ),
                (
                    "fsopen",
                    libc::syscall(libc::SYS_fsopen, c"tmpfs".as_ptr(), 0),
                ),
                (
                    "socket(AF_UNIX)",
                    libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0),
                ),
                (
                    "x32 mount",
                    libc::syscall(libc::SYS_mount | X32_SYSCALL_BIT, 0, 0, 0, 0, 0),
                ),
            ]
        };
        for (i, (what, result)) in results.into_iter().enumerate() {
            if !denied(what, result) {
                return 10 + i as i32;
            }
        }
        // Threads still start (clone3 is refused with ENOSYS; the C library falls back to clone).
        if std::thread::spawn(|| 7).join().ok() != Some(7) {
            eprintln!("a thread could not be started");
            return 30;
        }
        // And the network is still there for registries.
        if std::net::TcpListener::bind("127.0.0.1:0").is_err() {
            eprintln!("an inet socket could not be opened");
            return 31;
        }
        0
    }
}
