//! The VMM's seccomp filters (`vmm/src/seccomp.rs`): every thread the VMM starts runs
//! filtered while a test guest runs on this host's `/dev/kvm`, and a syscall a thread's list
//! does not allow kills the whole process with SIGSYS.
//!
//! The killing cases run in a child process — this test binary started again with
//! `MVM_SECCOMP_CASE` set — which starts a thread through the same `spawn_filtered` and
//! `filter` the VMM uses and makes one syscall on it; the parent reads how the child ended.

// The cases are raw syscalls, each with arguments a filter looks at.
#![allow(unsafe_code)]

use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::Duration;

use mvm_vmm::seccomp::{self, ThreadKind};
use mvm_vmm::test_guest::{self as guest, Console};
use mvm_vmm::{self as vmm, GuestExit, VmConfig};

const CASE_VAR: &str = "MVM_SECCOMP_CASE";

/// The `Seccomp:` mode (2 = filter) and `Seccomp_filters:` count of thread `tid` of this
/// process.
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

#[test]
fn every_vmm_thread_runs_filtered_while_the_guest_runs() {
    if let Some(reason) = guest::kvm_unavailable() {
        eprintln!("skipped: {reason}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = guest::build(dir.path(), &["lib", "spin"]);
    let console = Console::default();
    let vm = vmm::build(VmConfig {
        vcpus: 2,
        cmdline: "spin".into(),
        ..guest::config(dir.path(), kernel, &console)
    })
    .unwrap();
    assert_eq!(vm.wait(Duration::from_millis(300)), None, "the guest spins");
    let mut seen = Vec::new();
    for (tid, name) in threads() {
        let (mode, filters) = seccomp_status(&tid);
        if ["vcpu0", "vcpu1", "vmm-events", "vmm-reaper"].contains(&name.as_str()) {
            assert_eq!(mode, "2", "{name} runs in seccomp filter mode");
            assert_eq!(filters, "1", "{name} has its one filter");
            seen.push(name);
        }
    }
    // The thread that built the VM is not filtered: filters are per thread.
    let this = rustix::thread::gettid().as_raw_nonzero().to_string();
    assert_eq!(seccomp_status(&this).0, "0");
    seen.sort();
    assert_eq!(seen, ["vcpu0", "vcpu1", "vmm-events", "vmm-reaper"]);
    assert_eq!(vm.stop(), GuestExit::Stopped);
    assert!(console.tail().contains("mvm-guest: spinning"));
}

/// What a child does on its filtered thread, by name.
fn child_case(case: &str) {
    let (kind, call): (ThreadKind, fn()) = match case {
        "vcpu-socket" => (ThreadKind::Vcpu, socket),
        "vcpu-ioctl-not-kvm-run" => (ThreadKind::Vcpu, ioctl_tcgets),
        "vcpu-ioctl-kvm-run" => (ThreadKind::Vcpu, ioctl_kvm_run),
        "events-socket" => (ThreadKind::Events, socket),
        "events-mmap-exec" => (ThreadKind::Events, mmap_exec),
        "events-mmap" => (ThreadKind::Events, mmap_data),
        "reaper-socket" => (ThreadKind::Reaper, socket),
        "reaper-tgkill-sigkill" => (ThreadKind::Reaper, tgkill_sigkill),
        "reaper-tgkill-kick" => (ThreadKind::Reaper, tgkill_kick),
        "supervisor-socket" => (ThreadKind::Supervisor, socket),
        "supervisor-tgkill-sigkill" => (ThreadKind::Supervisor, tgkill_sigkill),
        "supervisor-tgkill-kick" => (ThreadKind::Supervisor, tgkill_kick),
        "main-socket" => {
            // Not on a filtered thread: nothing stops it.
            socket();
            return;
        }
        other => panic!("unknown case {other}"),
    };
    let thread = seccomp::spawn_filtered("filtered".into(), seccomp::filter(kind).unwrap(), call)
        .expect("the filter installs");
    thread.join().unwrap();
}

fn socket() {
    // SAFETY: no pointers; the descriptor, if any, is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    if fd >= 0 {
        // SAFETY: a descriptor this function opened.
        unsafe { libc::close(fd) };
    }
}

fn ioctl_tcgets() {
    let mut termios = std::mem::MaybeUninit::<libc::termios>::uninit();
    // SAFETY: on fd -1 the kernel fails with EBADF before it writes `termios`.
    unsafe { libc::ioctl(-1, libc::TCGETS, termios.as_mut_ptr()) };
}

fn ioctl_kvm_run() {
    // SAFETY: `KVM_RUN` takes no argument; fd -1 fails with EBADF.
    unsafe { libc::ioctl(-1, 0xae80) };
}

fn mmap_with(prot: libc::c_int) {
    // SAFETY: a fresh anonymous mapping, unmapped at once.
    unsafe {
        let at = libc::mmap(
            std::ptr::null_mut(),
            4096,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if at != libc::MAP_FAILED {
            libc::munmap(at, 4096);
        }
    }
}

fn mmap_exec() {
    mmap_with(libc::PROT_READ | libc::PROT_EXEC);
}

fn mmap_data() {
    mmap_with(libc::PROT_READ | libc::PROT_WRITE);
}

fn tgkill_with(signal: libc::c_int) {
    // SAFETY: no pointers; thread id 0 does not exist, so nothing is signalled (EINVAL).
    unsafe { libc::syscall(libc::SYS_tgkill, std::process::id(), 0, signal) };
}

fn tgkill_sigkill() {
    tgkill_with(libc::SIGKILL);
}

fn tgkill_kick() {
    tgkill_with(mvm_vmm::vstate::kick::kick_signal());
}

/// Runs `case` in a child; the signal that ended it, if one did.
fn run_case(case: &str) -> Option<i32> {
    let status = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "an_unlisted_syscall_kills_the_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CASE_VAR, case)
        .output()
        .unwrap();
    if status.status.signal().is_none() {
        assert!(
            status.status.success(),
            "{case}: {}",
            String::from_utf8_lossy(&status.stderr)
        );
    }
    status.status.signal()
}

#[test]
fn an_unlisted_syscall_kills_the_process() {
    if let Ok(case) = std::env::var(CASE_VAR) {
        child_case(&case);
        return;
    }
    for (case, killed) in [
        ("vcpu-socket", true),
        ("vcpu-ioctl-not-kvm-run", true),
        ("vcpu-ioctl-kvm-run", false),
        ("events-socket", true),
        ("events-mmap-exec", true),
        ("events-mmap", false),
        ("reaper-socket", true),
        ("reaper-tgkill-sigkill", true),
        ("reaper-tgkill-kick", false),
        ("supervisor-socket", true),
        ("supervisor-tgkill-sigkill", true),
        ("supervisor-tgkill-kick", false),
        ("main-socket", false),
    ] {
        let signal = run_case(case);
        let expected = killed.then_some(libc::SIGSYS);
        assert_eq!(signal, expected, "{case}");
    }
}

#[test]
fn every_thread_kind_allows_at_most_40_syscalls() {
    let counts = seccomp::allowed_counts();
    assert_eq!(counts.len(), ThreadKind::ALL.len());
    for (kind, count) in counts {
        eprintln!("{}: {count} syscalls", kind.name());
        assert!(count > 0 && count <= 40, "{}: {count}", kind.name());
        // Each compiles to a filter the kernel takes (checked by installing them above).
        assert!(!seccomp::filter(kind).unwrap().is_empty());
    }
}
