//! The runner's own seccomp filter (`runner/src/seccomp.rs`), installed as a launch installs it
//! once its VM runs: what a runner never does is refused with `EPERM` — no new program, no new
//! process, no socket but `AF_UNIX`, no namespace, no `ptrace`, `mount`, `bpf`, `setuid`, no
//! executable memory — while what it does still works (threads, unix sockets, files renamed
//! into place, an audit append). With the own VMM in the process (its threads carry their own
//! filters), the filter goes on the calling thread, and that thread still pauses, saves,
//! resumes and stops the VM.
//!
//! Each case runs in a child process — this test binary started again with
//! `MVM_RUNNER_SECCOMP_CASE` set — which installs the filter and reports `case passed` at its
//! end; the parent checks that line. Without the filter the first case's `exec` of `/bin/true`
//! succeeds (the child becomes `true` and never says so), and every refusal it checks fails.

// The refusals are checked with raw syscalls, each with arguments that touch no memory of this
// process or that the kernel rejects before it reads them.
#![allow(unsafe_code)]

mod support;

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use mvm_ir::home::MvmHome;
use mvm_runner::backend::kvm::jailed::{Jail, JailedVm};
use mvm_runner::backend::kvm::OwnVm;
use mvm_runner::backend::VmProcess;
use mvm_runner::seccomp::{self, Reach};
use serde_json::json;
use support::plan_guest as guest;

const CASE_VAR: &str = "MVM_RUNNER_SECCOMP_CASE";
const PASSED: &str = "case passed";
const RUNNER: &str = env!("CARGO_BIN_EXE_mvm-runner");

/// Runs the test `test` again in a child with `CASE_VAR` set; asserts it reported passing.
fn run_case(test: &str) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CASE_VAR, "1")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success() && stdout.contains(PASSED),
        "{test}: {:?}\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
}

/// Whether this process is the child of [`run_case`].
fn in_child() -> bool {
    std::env::var_os(CASE_VAR).is_some()
}

/// The `Seccomp:` mode (2 = filter) and `Seccomp_filters:` count of this process's thread
/// `tid`.
fn seccomp_status(tid: &str) -> (String, String) {
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    (field("Seccomp:"), field("Seccomp_filters:"))
}

fn this_thread() -> String {
    rustix::thread::gettid().as_raw_nonzero().to_string()
}

/// This process's threads: (tid, name).
fn threads() -> Vec<(String, String)> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|entry| {
            let tid = entry.ok()?.file_name().into_string().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).ok()?;
            Some((tid, comm.trim().to_string()))
        })
        .collect()
}

/// The errno of a raw syscall's result (`None`: it succeeded).
fn errno(result: libc::c_long) -> Option<i32> {
    (result == -1).then(|| std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
}

fn assert_refused(what: &str, error: Option<i32>) {
    assert_eq!(error, Some(libc::EPERM), "{what}: refused with EPERM");
}

fn io_errno(result: std::io::Result<impl Sized>) -> Option<i32> {
    result.err().map(|e| e.raw_os_error().unwrap_or(0))
}

/// What a runner never does, each refused with `EPERM`.
fn refusals() {
    // A new program: `execve` itself (`exec` replaces this process, no fork first).
    let exec = Command::new("/bin/true").exec();
    assert_refused("execve /bin/true", exec.raw_os_error());
    // A new process: `fork` as glibc makes it, and `Command::spawn` (posix_spawn).
    // SAFETY: a plain fork (no shared memory); a child, should one come to be, only `_exit`s.
    let forked =
        unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_long, 0, 0, 0, 0) };
    if forked == 0 {
        // SAFETY: ends the forked child at once.
        unsafe { libc::_exit(0) };
    }
    assert_refused("clone without CLONE_THREAD (fork)", errno(forked));
    assert_refused(
        "spawning /bin/true",
        io_errno(Command::new("/bin/true").status()),
    );
    // A thread in a new namespace: refused by the filter (the kernel would say EINVAL).
    let flags = libc::CLONE_VM | libc::CLONE_SIGHAND | libc::CLONE_THREAD | libc::CLONE_NEWUSER;
    // SAFETY: a combination the kernel refuses before it starts anything; no stack is used.
    let cloned = unsafe { libc::syscall(libc::SYS_clone, flags as libc::c_long, 0, 0, 0, 0) };
    assert_refused("clone of a thread with CLONE_NEWUSER", errno(cloned));
    // `clone3` is answered ENOSYS (glibc then falls back to `clone`), whatever its arguments.
    // SAFETY: a null argument struct of size 0, which the kernel would refuse (EINVAL).
    let clone3 = unsafe { libc::syscall(libc::SYS_clone3, 0, 0) };
    assert_eq!(errno(clone3), Some(libc::ENOSYS), "clone3");

    // No socket but AF_UNIX.
    assert_refused(
        "a TCP socket",
        io_errno(std::net::TcpListener::bind("127.0.0.1:0")),
    );
    assert_refused(
        "a UDP socket",
        io_errno(std::net::UdpSocket::bind("[::1]:0")),
    );
    for (name, family) in [
        ("AF_NETLINK", libc::AF_NETLINK),
        ("AF_PACKET", libc::AF_PACKET),
        ("AF_VSOCK", libc::AF_VSOCK),
    ] {
        // SAFETY: no pointers; no descriptor is opened when refused.
        let fd = unsafe { libc::socket(family, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        assert_refused(name, errno(fd.into()));
    }
    // SAFETY: `fds` is a valid array of two ints; refused before the kernel writes it.
    let pair = unsafe {
        let mut fds = [0; 2];
        libc::socketpair(libc::AF_INET, libc::SOCK_STREAM, 0, fds.as_mut_ptr())
    };
    assert_refused("an AF_INET socketpair", errno(pair.into()));

    // Privileges, namespaces, other processes, the kernel.
    // SAFETY: each call has only integer arguments or null pointers, which the kernel would
    // reject (EFAULT, EINVAL) or act on for this child alone (unshare, setuid to its own root).
    let raw = unsafe {
        [
            (
                "ptrace",
                libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0),
            ),
            (
                "unshare",
                libc::syscall(libc::SYS_unshare, libc::CLONE_NEWNS),
            ),
            ("setns", libc::syscall(libc::SYS_setns, -1, 0)),
            ("setuid", libc::syscall(libc::SYS_setuid, 0)),
            ("setresgid", libc::syscall(libc::SYS_setresgid, 0, 0, 0)),
            ("mount", libc::syscall(libc::SYS_mount, 0, 0, 0, 0, 0)),
            ("umount2", libc::syscall(libc::SYS_umount2, 0, 0)),
            ("chroot", libc::syscall(libc::SYS_chroot, 0)),
            ("bpf", libc::syscall(libc::SYS_bpf, 0, 0, 0)),
            ("keyctl", libc::syscall(libc::SYS_keyctl, 0, 0, 0, 0, 0)),
            ("init_module", libc::syscall(libc::SYS_init_module, 0, 0, 0)),
            (
                "finit_module",
                libc::syscall(libc::SYS_finit_module, -1, 0, 0),
            ),
            (
                "perf_event_open",
                libc::syscall(libc::SYS_perf_event_open, 0, 0, -1, -1, 0),
            ),
            ("userfaultfd", libc::syscall(libc::SYS_userfaultfd, 0)),
            (
                "io_uring_setup",
                libc::syscall(libc::SYS_io_uring_setup, 0, 0),
            ),
            (
                "process_vm_readv",
                libc::syscall(libc::SYS_process_vm_readv, 1, 0, 0, 0, 0, 0),
            ),
            (
                "mmap PROT_EXEC",
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                ) as libc::c_long,
            ),
        ]
    };
    for (name, result) in raw {
        assert_refused(name, errno(result));
    }
}

/// What a runner does once filtered, which must still work.
fn still_works(dir: &std::path::Path, home: &MvmHome, audit: &mvm_ir::audit::HostAudit) {
    // A thread, which inherits the filter.
    let tid = std::thread::spawn(this_thread).join().unwrap();
    assert!(!tid.is_empty());
    // Unix sockets: a pair, a listener and a connection, the peer's credentials.
    let (mut a, mut b) = UnixStream::pair().unwrap();
    a.write_all(b"ping").unwrap();
    let mut got = [0; 4];
    b.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    let path = dir.join("control.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let client = UnixStream::connect(&path).unwrap();
    let (server, _) = listener.accept().unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    assert!(rustix::net::sockopt::socket_peercred(&server).is_ok());
    drop((client, server, listener));
    // Files written, synced and renamed into place, then removed; an audit entry appended.
    mvm_ir::fsutil::atomic_write(&dir.join("state.json"), b"{}", 0o600).unwrap();
    assert_eq!(std::fs::read(dir.join("state.json")).unwrap(), b"{}");
    std::fs::remove_file(dir.join("state.json")).unwrap();
    audit.append("test.filtered", json!({"ok": true})).unwrap();
    assert!(home.root().join("audit").exists());
    // Randomness and time.
    assert!(mvm_ir::plan::fresh_nonce().is_ok());
    std::thread::sleep(Duration::from_millis(1));
}

#[test]
fn the_runners_filter_refuses_what_a_runner_never_does_and_allows_its_work() {
    if !in_child() {
        run_case("the_runners_filter_refuses_what_a_runner_never_does_and_allows_its_work");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let home = MvmHome::at(dir.path().join("home"));
    // Opened before, as a launch opens it before the VM starts.
    let audit = mvm_ir::audit::HostAudit::open(&home).unwrap();
    assert_eq!(seccomp::install(false).unwrap(), Reach::Process);
    // Every thread of the process, the test harness's included, runs filtered.
    for (tid, name) in threads() {
        assert_eq!(seccomp_status(&tid).0, "2", "{name} ({tid})");
    }
    refusals();
    still_works(dir.path(), &home, &audit);
    println!("{PASSED}");
}

#[test]
fn with_egress_the_filter_lets_the_runner_resolve_and_dial_and_nothing_more() {
    if !in_child() {
        run_case("with_egress_the_filter_lets_the_runner_resolve_and_dial_and_nothing_more");
        return;
    }
    // A far end, listening before the filter (as the test's own; a runner never listens).
    let far = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = far.local_addr().unwrap();
    assert_eq!(seccomp::install(true).unwrap(), Reach::Process);
    // The host's resolver (files here; DNS over UDP is traced in tests/egress.rs), and a
    // dial with a timeout, as the relay makes it.
    let found: Vec<_> = std::net::ToSocketAddrs::to_socket_addrs(&("localhost", 80))
        .unwrap()
        .collect();
    assert!(found.iter().all(|a| a.ip().is_loopback()), "{found:?}");
    let mut dialled =
        std::net::TcpStream::connect_timeout(&address, Duration::from_secs(5)).unwrap();
    let (mut accepted, _) = far.accept().unwrap();
    dialled.write_all(b"out").unwrap();
    let mut back = [0; 3];
    accepted.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"out");
    // Still no raw, packet, netlink or vsock socket, no new program, no new process.
    for (name, family, kind) in [
        ("AF_INET raw", libc::AF_INET, libc::SOCK_RAW),
        ("AF_NETLINK", libc::AF_NETLINK, libc::SOCK_RAW),
        ("AF_PACKET", libc::AF_PACKET, libc::SOCK_RAW),
        ("AF_VSOCK", libc::AF_VSOCK, libc::SOCK_STREAM),
    ] {
        // SAFETY: no pointers; no descriptor is opened when refused.
        let fd = unsafe { libc::socket(family, kind | libc::SOCK_CLOEXEC, 0) };
        if family == libc::AF_INET {
            // Refused by the kernel without CAP_NET_RAW, by the filter with it: never opened.
            assert!(fd < 0, "{name}");
        } else {
            assert_refused(name, errno(fd.into()));
        }
    }
    let exec = Command::new("/bin/true").exec();
    assert_refused("execve /bin/true", exec.raw_os_error());
    assert_refused(
        "spawning /bin/true",
        io_errno(Command::new("/bin/true").status()),
    );
    println!("{PASSED}");
}

#[test]
fn the_own_vmm_is_paused_saved_resumed_and_stopped_from_a_filtered_runner_thread() {
    if let Some(reason) = guest::kvm_unavailable() {
        eprintln!("skipped: {reason}");
        return;
    }
    if !in_child() {
        run_case("the_own_vmm_is_paused_saved_resumed_and_stopped_from_a_filtered_runner_thread");
        return;
    }
    // The harness's main thread, which a runner does not have, waits unfiltered for this test's
    // thread: an allow-all filter on every thread first, so that `install`'s check that every
    // thread is filtered is about the threads that matter. (It refuses only `kexec_load`.)
    let allow_all = seccompiler::SeccompFilter::new(
        [(libc::SYS_kexec_load, vec![])].into_iter().collect(),
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::Errno(libc::EPERM as u32),
        seccompiler::TargetArch::x86_64,
    )
    .unwrap();
    seccompiler::apply_filter_all_threads(&seccompiler::BpfProgram::try_from(allow_all).unwrap())
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let files = guest::PlanFiles::new(dir.path());
    let plan = guest::test_plan();
    let log = File::create(dir.path().join("serial.log")).unwrap();
    let mut vm = VmProcess::Own(OwnVm::boot(files.spec(&plan), log).unwrap());
    let mut channel = vm.take_channel().unwrap();
    guest::wait_for_ping(&mut channel, &vm);

    // The VMM's threads carry filters of their own: `TSYNC` cannot replace them, and the filter
    // goes on this thread, the one that drives the VM.
    assert_eq!(seccomp::install(false).unwrap(), Reach::ThisThread);
    assert_eq!(seccomp_status(&this_thread()), ("2".into(), "2".into()));
    for (tid, name) in threads() {
        assert_eq!(seccomp_status(&tid).0, "2", "{name} ({tid})");
    }
    // Refused here too.
    let exec = Command::new("/bin/true").exec();
    assert_refused("execve /bin/true", exec.raw_os_error());
    assert_refused(
        "a TCP socket",
        io_errno(std::net::TcpListener::bind("127.0.0.1:0")),
    );

    // Paused, saved, resumed, as a named VM's control thread does it (on a thread started
    // after the install, which inherits the filter).
    let state = dir.path().join("vm.state");
    let saved = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let mut machine = vm.machine(dir.path()).unwrap();
                machine.pause().unwrap();
                let mut file = File::create(&state).unwrap();
                let saved = machine
                    .save(&dir.path().join("unused.sock"), &mut file)
                    .unwrap();
                file.sync_all().unwrap();
                machine.resume().unwrap();
                saved
            })
            .join()
            .unwrap()
    });
    assert!(saved.bytes > 0);
    channel.write_all(b"pong-from-host").unwrap();
    let tail = guest::assert_powered_off(&mut vm);
    guest::assert_contract_devices(&tail);
    vm.kill();
    println!("{PASSED}");
}

#[test]
fn a_jailed_vmm_is_paused_resumed_and_killed_from_a_filtered_runner() {
    if let Some(reason) = guest::kvm_unavailable() {
        eprintln!("skipped: {reason}");
        return;
    }
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: a jail needs root");
        return;
    }
    if !in_child() {
        run_case("a_jailed_vmm_is_paused_resumed_and_killed_from_a_filtered_runner");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let files = guest::PlanFiles::new(dir.path());
    let spec = files.spec(&guest::test_plan());
    let root = dir.path().join("jail");
    let log = File::create(dir.path().join("serial.log")).unwrap();
    let jail = Jail {
        uid: 47_221,
        gid: 47_222,
    };
    // The runner's binary, re-executed as the jailed VMM: started before the filter, as in a
    // launch.
    let jailed = JailedVm::boot(Path::new(RUNNER), jail, &root, &spec, log).unwrap();
    let mut vm = VmProcess::Jailed(jailed);
    let mut channel = vm.take_channel().unwrap();
    guest::wait_for_ping(&mut channel, &vm);

    // No thread of this process has a filter of its own: every one gets this one.
    assert_eq!(seccomp::install(false).unwrap(), Reach::Process);
    for (tid, name) in threads() {
        assert_eq!(
            seccomp_status(&tid),
            ("2".into(), "1".into()),
            "{name} ({tid})"
        );
    }
    let exec = Command::new("/bin/true").exec();
    assert_refused("execve /bin/true", exec.raw_os_error());
    let mut machine = vm.machine(dir.path()).unwrap();
    machine.pause().unwrap();
    channel.write_all(b"pong-from-host").unwrap();
    assert_eq!(vm.wait_for_exit(Duration::from_millis(300)).unwrap(), None);
    machine.resume().unwrap();
    let tail = guest::assert_powered_off(&mut vm);
    guest::assert_contract_devices(&tail);
    vm.kill();
    assert!(!root.exists(), "the jail directory is removed");
    println!("{PASSED}");
}

#[test]
fn the_runners_list_compiles_and_stays_short() {
    let count = seccomp::allowed_count(false);
    let with_egress = seccomp::allowed_count(true);
    eprintln!("the runner's filter allows {count} syscalls, {with_egress} with egress");
    assert!(count > 0 && count <= 80, "{count}");
    assert!(
        with_egress > count && with_egress <= count + 8,
        "{with_egress}"
    );
    assert!(!seccomp::filter(false).unwrap().is_empty());
    assert!(!seccomp::filter(true).unwrap().is_empty());
}
