//! The plan's guest policy as the agent enforces it: the workload's syscall filter per tier,
//! and the verbs a profile does not grant.

use super::*;
use crate::serve::seccomp::WorkloadFilter;

/// Prints, space-separated, the errno (0 for success) of: an `AF_INET` socket, an `AF_INET6`
/// socket, an `AF_UNIX` socket, `keyctl(KEYCTL_GET_KEYRING_ID, session)`, `unshare(0)`, and
/// `clone3(NULL, 0)` — then starts and joins a thread, which must work under every tier.
const PROBE: &str = r#"
import ctypes, socket, threading
libc = ctypes.CDLL(None, use_errno=True)
def call(nr, *args):
    return 0 if libc.syscall(nr, *args) >= 0 else ctypes.get_errno()
def sock(family):
    try:
        socket.socket(family, socket.SOCK_STREAM).close()
        return 0
    except OSError as e:
        return e.errno
t = threading.Thread(target=lambda: None)
t.start()
t.join()
print(sock(socket.AF_INET), sock(socket.AF_INET6), sock(socket.AF_UNIX),
      call(250, 0, -3, 0), call(272, 0), call(435, 0, 0))
"#;

fn policy(seccomp: SeccompTier, inet: bool) -> GuestPolicy {
    GuestPolicy {
        seccomp,
        inet,
        host_copy: true,
        files_anywhere: false,
        terminal: false,
    }
}

fn probe_under(policy: GuestPolicy) -> String {
    let mut host = Host::start_with(ServeConfig {
        workload_filter: WorkloadFilter::of(&policy).unwrap(),
        policy,
        ..ServeConfig::on_host()
    });
    host.exec(1, &["/usr/bin/python3", "-c", PROBE], 20_000);
    let (stdout, stderr, response, _) = host.exchange(1);
    host.power_off();
    match response {
        Response::Exec(reply) if reply.status == ExitStatus::Exited { code: 0 } => {}
        other => panic!("{other:?}: {}", String::from_utf8_lossy(&stderr)),
    }
    String::from_utf8(stdout).unwrap().trim().to_string()
}

#[test]
fn each_tier_refuses_what_its_table_says() {
    let (eperm, enosys, einval) = (libc::EPERM, libc::ENOSYS, libc::EINVAL);
    for (tier, inet, expected) in [
        (
            SeccompTier::Essential,
            false,
            [eperm, eperm, 0, eperm, eperm, enosys],
        ),
        (
            SeccompTier::Standard,
            false,
            [eperm, eperm, 0, eperm, eperm, enosys],
        ),
        (SeccompTier::Standard, true, [0, 0, 0, eperm, eperm, enosys]),
        (SeccompTier::Network, false, [0, 0, 0, eperm, eperm, enosys]),
        // No filter: the calls reach the kernel (`clone3` without arguments is invalid).
        (SeccompTier::Unrestricted, false, [0, 0, 0, 0, 0, einval]),
    ] {
        let expected = expected.map(|e| e.to_string()).join(" ");
        assert_eq!(
            probe_under(policy(tier, inet)),
            expected,
            "{tier:?} inet={inet}"
        );
    }
}

#[test]
fn a_filtered_command_cannot_take_its_filter_off() {
    // A second filter may only narrow; and `no_new_privs` stays. The command sees itself in
    // seccomp filter mode (2).
    let policy = policy(SeccompTier::Standard, false);
    let mut host = Host::start_with(ServeConfig {
        workload_filter: WorkloadFilter::of(&policy).unwrap(),
        policy,
        ..ServeConfig::on_host()
    });
    host.exec(
        1,
        &[
            "/bin/sh",
            "-c",
            "grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status",
        ],
        10_000,
    );
    let (stdout, _, _, _) = host.exchange(1);
    host.power_off();
    let status = String::from_utf8(stdout).unwrap();
    assert!(status.contains("Seccomp:\t2"), "{status}");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
}

#[test]
fn a_profile_without_host_copy_refuses_uploads_with_its_own_code() {
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let target = dir.path().join("copied");
    let mut host = Host::start_with(ServeConfig {
        policy: GuestPolicy {
            host_copy: false,
            ..policy(SeccompTier::Essential, false)
        },
        ..ServeConfig::on_host()
    });
    let refused = upload(&mut host, 1, target.to_str().unwrap(), b"", &sha256(b""));
    assert_eq!(error_code(&refused), codes::NOT_GRANTED, "{refused:?}");
    assert!(!target.exists());
    // Reading out is still granted.
    std::fs::write(&target, b"result").unwrap();
    let (bytes, read) = host.download(2, target.to_str().unwrap(), false);
    assert!(matches!(read, Response::FsRead(_)), "{read:?}");
    assert_eq!(bytes, b"result");
    host.power_off();
}

#[test]
fn files_anywhere_opens_the_whole_root_and_nothing_less_does() {
    let path = "/etc/hostname";
    for (roots, allowed) in [(FileRoots::anywhere(), true), (FileRoots::tmp(), false)] {
        let mut host = Host::start_with(ServeConfig {
            file_roots: roots,
            ..ServeConfig::on_host()
        });
        host.send(1, &Request::FsStat { path: path.into() });
        let (_, _, response, _) = host.exchange(1);
        host.power_off();
        match allowed {
            true => assert!(matches!(response, Response::FsStat(_)), "{response:?}"),
            false => assert_eq!(error_code(&response), codes::PATH_REFUSED),
        }
    }
}
