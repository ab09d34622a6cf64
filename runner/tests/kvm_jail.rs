//! `--jail`: the own VMM jailed in a child process, started the way the runner's launch starts
//! it (`JailedVm::boot`, the `mvm-runner` binary re-executed as `--vmm-child`), running the
//! purpose-built `virtio_check` guest on this host's `/dev/kvm` (PVM here, where Linux does not
//! boot). While the guest waits for the host's answer on the agent channel, the test looks at
//! the jailed VMM from outside through `/proc`; then the guest finishes and powers off. The
//! artifacts are the runner's to open: the jail's uid needs no access to them.
//! Skipped, with the reason printed, when `/dev/kvm` cannot be opened or the test is not root.

mod support;

use support::plan_guest as guest;

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use mvm_runner::backend::kvm::jailed::{Jail, JailedVm, MAX_FILES};
use mvm_runner::backend::kvm::spec_for_plan;
use mvm_runner::backend::VmProcess;

/// Ids no one else on a test host uses.
const JAIL: Jail = Jail {
    uid: 47_211,
    gid: 47_212,
};

const RUNNER: &str = env!("CARGO_BIN_EXE_mvm-runner");

fn not_root() -> Option<String> {
    let euid = rustix::process::geteuid().as_raw();
    (euid != 0).then(|| format!("a jail needs root; this test runs as uid {euid}"))
}

/// The child of `parent` (the jail's intermediate process): the VMM, PID 1 of its namespace.
fn only_child(parent: u32) -> u32 {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        if field(&status, "PPid") == parent.to_string() {
            children.push(pid);
        }
    }
    assert_eq!(children.len(), 1, "children of {parent}: {children:?}");
    children[0]
}

/// A `/proc/<pid>/status` field's value, whitespace collapsed to single tabs.
fn field(status: &str, name: &str) -> String {
    let line = status
        .lines()
        .find(|line| line.starts_with(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in {status}"));
    let value = &line[name.len() + 1..];
    value.split_whitespace().collect::<Vec<_>>().join("\t")
}

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// A `/proc/<pid>/limits` row's soft and hard values.
fn limit(limits: &str, name: &str) -> (String, String) {
    let line = limits
        .lines()
        .find(|line| line.starts_with(name))
        .unwrap_or_else(|| panic!("no {name} in {limits}"));
    let mut values = line[name.len()..].split_whitespace();
    let soft = values.next().unwrap().to_string();
    (soft, values.next().unwrap().to_string())
}

/// Asserts from outside what the jail is: `vmm` is the jailed VMM's host pid, booted from
/// `files`.
fn assert_jailed(vmm: u32, files: &guest::PlanFiles) {
    let proc = Path::new("/proc").join(vmm.to_string());
    for ns in ["mnt", "pid", "ipc", "net", "uts"] {
        let theirs = std::fs::read_link(proc.join("ns").join(ns)).unwrap();
        let ours = std::fs::read_link(Path::new("/proc/self/ns").join(ns)).unwrap();
        assert_ne!(theirs, ours, "{ns} namespace");
    }
    let status = std::fs::read_to_string(proc.join("status")).unwrap();
    let (uid, gid) = (JAIL.uid.to_string(), JAIL.gid.to_string());
    assert_eq!(field(&status, "Uid"), [uid.as_str(); 4].join("\t"));
    assert_eq!(field(&status, "Gid"), [gid.as_str(); 4].join("\t"));
    assert_eq!(field(&status, "Groups"), "");
    assert_eq!(field(&status, "NSpid"), format!("{vmm}\t1"), "PID 1 inside");
    assert_eq!(field(&status, "NoNewPrivs"), "1");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(field(&status, caps), "0000000000000000", "{caps}");
    }
    // Every thread is filtered: those the VMM started (vCPUs, events, reaper) as unjailed,
    // and the main thread, which set the jail up, as the supervisor.
    for task in std::fs::read_dir(proc.join("task")).unwrap().flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap();
        assert_eq!(field(&status, "Seccomp"), "2", "{}", field(&status, "Name"));
    }
    assert!(
        names(&proc.join("task")).len() >= 4,
        "main, vCPU, events, reaper"
    );

    // Its root: dev/kvm, nothing else — no artifact, by any name.
    let root = proc.join("root");
    assert_eq!(names(&root), BTreeSet::from(["dev".to_string()]));
    assert_eq!(
        names(&root.join("dev")),
        BTreeSet::from(["kvm".to_string()])
    );
    let kvm = std::fs::metadata(root.join("dev/kvm")).unwrap();
    assert!(kvm.file_type().is_char_device());
    assert_eq!(kvm.rdev(), std::fs::metadata("/dev/kvm").unwrap().rdev());
    assert_eq!(
        (kvm.uid(), kvm.gid(), kvm.mode() & 0o777),
        (JAIL.uid, JAIL.gid, 0o600)
    );
    // The disks are descriptors the runner opened, read-only (the kernel and initramfs were
    // read and closed while the VM was built).
    let mut disks = BTreeSet::new();
    for fd in std::fs::read_dir(proc.join("fd")).unwrap().flatten() {
        let Ok(target) = std::fs::metadata(fd.path()) else {
            continue;
        };
        for artifact in [
            &files.kernel,
            &files.initramfs,
            &files.rootfs,
            &files.verity,
        ] {
            let host = std::fs::metadata(artifact).unwrap();
            if (target.dev(), target.ino()) == (host.dev(), host.ino()) {
                let fdinfo = proc.join("fdinfo").join(fd.file_name());
                let fdinfo = std::fs::read_to_string(fdinfo).unwrap();
                let flags = u32::from_str_radix(&field(&fdinfo, "flags"), 8).unwrap();
                assert_eq!(flags & 3, 0, "{} open read-only", artifact.display());
                disks.insert(artifact.clone());
            }
        }
    }
    assert_eq!(
        disks,
        BTreeSet::from([files.rootfs.clone(), files.verity.clone()])
    );
    let created = std::fs::File::create(root.join("new"));
    assert_eq!(
        created.unwrap_err().raw_os_error(),
        Some(libc::EROFS),
        "the jail's root is read-only"
    );
    // Its only mount: its root, read-only, not honouring set-uid bits.
    let mountinfo = std::fs::read_to_string(proc.join("mountinfo")).unwrap();
    let mut points = BTreeSet::new();
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let options: BTreeSet<&str> = fields[5].split(',').collect();
        let needed: &[&str] = match fields[4] {
            "/" => &["ro", "nosuid", "noexec"],
            _ => &["ro", "nosuid", "nodev", "noexec"],
        };
        assert!(needed.iter().all(|o| options.contains(o)), "{line}");
        points.insert(fields[4]);
    }
    assert_eq!(points, BTreeSet::from(["/"]), "{mountinfo}");

    let limits = std::fs::read_to_string(proc.join("limits")).unwrap();
    let files = MAX_FILES.to_string();
    assert_eq!(limit(&limits, "Max open files"), (files.clone(), files));
    assert_eq!(
        limit(&limits, "Max core file size"),
        ("0".into(), "0".into())
    );
    // Every disk is read-only: no file may grow at all.
    assert_eq!(limit(&limits, "Max file size"), ("0".into(), "0".into()));
}

/// A jailed VM of [`start`]: the VM, the host's end of the agent channel, the jail directory,
/// the files it boots from.
struct Started {
    vm: VmProcess,
    channel: UnixStream,
    root: PathBuf,
    files: guest::PlanFiles,
}

/// Starts the `virtio_check` guest jailed, as the launch does, with its files in `dir` (each
/// given `mode` first); returns once the guest waits for the host's pong (the jail is built
/// and the VMM runs). `None`, the reason printed, when this host or user cannot run a jailed
/// VM.
fn start(dir: &Path, mode: u32) -> Option<Started> {
    if let Some(reason) = guest::kvm_unavailable().or_else(not_root) {
        eprintln!("skipped: {reason}");
        return None;
    }
    let files = guest::PlanFiles::new(dir);
    for file in [
        &files.kernel,
        &files.initramfs,
        &files.rootfs,
        &files.verity,
    ] {
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let spec = spec_for_plan(&guest::test_plan(), &files.own()).unwrap();
    let root = dir.join("jail");
    let serial_log = std::fs::File::create(dir.join("serial.log")).unwrap();
    let jailed = JailedVm::boot(Path::new(RUNNER), JAIL, &root, &spec, serial_log).unwrap();
    let mut vm = VmProcess::Jailed(jailed);
    let mut channel = vm
        .take_channel()
        .expect("connected before the child starts");
    guest::wait_for_ping(&mut channel, &vm);
    Some(Started {
        vm,
        channel,
        root,
        files,
    })
}

#[test]
fn a_jailed_vmm_is_confined_and_its_guest_still_boots() {
    let dir = tempfile::tempdir().unwrap();
    let Some(Started {
        mut vm,
        mut channel,
        root,
        files,
    }) = start(dir.path(), 0o644)
    else {
        return;
    };
    let vmm = only_child(vm.pid());
    assert_jailed(vmm, &files);
    channel.write_all(b"pong-from-host").unwrap();
    let tail = guest::assert_powered_off(&mut vm);
    guest::assert_contract_devices(&tail);
    let log = std::fs::read_to_string(dir.path().join("serial.log")).unwrap();
    assert!(log.ends_with("mvm-guest: ok\n"), "the runner's console log");
    vm.kill();
    assert!(!root.exists(), "the jail directory is removed");
    assert!(!Path::new("/proc").join(vmm.to_string()).exists());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&root.to_string_lossy().into_owned()));
}

#[test]
fn artifacts_only_root_can_read_boot_jailed() {
    let dir = tempfile::tempdir().unwrap();
    let Some(Started {
        mut vm,
        mut channel,
        files,
        ..
    }) = start(dir.path(), 0o600)
    else {
        return;
    };
    for artifact in [
        &files.kernel,
        &files.initramfs,
        &files.rootfs,
        &files.verity,
    ] {
        let meta = std::fs::metadata(artifact).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o600));
    }
    assert_jailed(only_child(vm.pid()), &files);
    channel.write_all(b"pong-from-host").unwrap();
    let tail = guest::assert_powered_off(&mut vm);
    guest::assert_contract_devices(&tail);
}

#[test]
fn a_jailed_vm_is_paused_and_resumed_through_its_control_socket() {
    let dir = tempfile::tempdir().unwrap();
    let Some(Started {
        mut vm,
        mut channel,
        ..
    }) = start(dir.path(), 0o644)
    else {
        return;
    };
    let mut machine = vm.machine(dir.path()).unwrap();
    machine.pause().unwrap();
    machine.pause().unwrap();
    // The answer the guest waits for: held by the paused device thread, and no vCPU runs to
    // take it, so the guest does not finish.
    channel.write_all(b"pong-from-host").unwrap();
    assert_eq!(vm.wait_for_exit(Duration::from_millis(700)).unwrap(), None);
    assert!(!vm.console().tail().contains("console received"));
    machine.resume().unwrap();
    let tail = guest::assert_powered_off(&mut vm);
    guest::assert_contract_devices(&tail);
    // The VM is over: the child answers no more.
    assert!(machine.pause().is_err());
    vm.kill();
}

#[test]
fn a_jailed_vmm_dies_with_its_parent() {
    let dir = tempfile::tempdir().unwrap();
    let Some(Started { mut vm, root, .. }) = start(dir.path(), 0o644) else {
        return;
    };
    let parent = vm.pid();
    let vmm = only_child(parent);
    // Only the parent (the child the runner started), not its process group.
    let pid = rustix::process::Pid::from_raw(i32::try_from(parent).unwrap()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
    let stat = Path::new("/proc").join(vmm.to_string()).join("stat");
    let deadline = Instant::now() + Duration::from_secs(5);
    // Gone, or a zombie waiting for whoever it was handed to.
    while std::fs::read_to_string(&stat).is_ok_and(|stat| !stat.contains(") Z ")) {
        assert!(
            Instant::now() < deadline,
            "the jailed VMM outlived its parent"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    vm.kill();
    assert!(!root.exists(), "the jail directory is removed");
}

#[test]
fn a_jail_whose_artifact_cannot_be_opened_is_refused_before_it_starts() {
    let dir = tempfile::tempdir().unwrap();
    let files = guest::PlanFiles::new(dir.path());
    let spec = spec_for_plan(&guest::test_plan(), &files.own()).unwrap();
    std::fs::remove_file(&files.rootfs).unwrap();
    let root = dir.path().join("jail");
    let serial_log = std::fs::File::create(dir.path().join("serial.log")).unwrap();
    let refused = JailedVm::boot(Path::new(RUNNER), JAIL, &root, &spec, serial_log).unwrap_err();
    assert_eq!(refused.code(), "RUN046");
    let message = refused.to_string();
    assert!(
        message.contains("jail: opening the artifacts: ") && message.contains("rootfs.erofs"),
        "{message}"
    );
    assert!(!root.exists(), "nothing was started");
}

#[test]
fn a_jail_that_cannot_be_built_fails_with_its_step() {
    if let Some(reason) = guest::kvm_unavailable().or_else(not_root) {
        eprintln!("skipped: {reason}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let files = guest::PlanFiles::new(dir.path());
    let mut spec = spec_for_plan(&guest::test_plan(), &files.own()).unwrap();
    // The runner opens a directory for reading as it would a disk; the child refuses it.
    let not_a_file = dir.path().join("not-a-file");
    std::fs::create_dir(&not_a_file).unwrap();
    std::fs::set_permissions(&not_a_file, std::fs::Permissions::from_mode(0o755)).unwrap();
    spec.disks[1].path = not_a_file;
    let root = dir.path().join("jail");
    let serial_log = std::fs::File::create(dir.path().join("serial.log")).unwrap();
    let jailed = JailedVm::boot(Path::new(RUNNER), JAIL, &root, &spec, serial_log).unwrap();
    let mut vm = VmProcess::Jailed(jailed);
    let ended = vm.wait_for_exit(guest::TIMEOUT).unwrap().unwrap();
    assert!(
        ended.contains("error RUN046: jail: inherited descriptor: disk verity "),
        "{ended}"
    );
    assert!(ended.contains("not-a-file"), "{ended}");
    assert!(ended.contains("not a regular file"), "{ended}");
    vm.kill();
    assert!(!root.exists());
}

#[test]
fn a_jail_is_refused_with_qemu_without_root_and_for_root_ids() {
    let refusal = |args: &[&str], uid: Option<u32>| {
        let mut command = Command::new(RUNNER);
        command
            .args(args)
            .args(["--plan", "/nonexistent/plan.dsse.json"]);
        if let Some(uid) = uid {
            std::os::unix::process::CommandExt::uid(&mut command, uid);
        }
        let output = command.output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        (output.status.code(), stderr)
    };
    let (code, stderr) = refusal(&["--jail", "--backend", "qemu"], None);
    assert_eq!(code, Some(125));
    assert!(stderr.contains("error RUN043"), "{stderr}");
    let (code, stderr) = refusal(&["--jail", "--backend", "kvm", "--jail-uid", "0"], None);
    assert_eq!(code, Some(125));
    assert!(stderr.contains("error RUN045"), "{stderr}");
    let (code, stderr) = refusal(&["--jail-uid", "1000"], None);
    assert_eq!(code, Some(125), "--jail-uid without --jail: {stderr}");
    if not_root().is_some() {
        eprintln!("not root: the non-root refusal is shown by the runner's own uid");
        let (code, stderr) = refusal(&["--jail", "--backend", "kvm"], None);
        assert_eq!(code, Some(125));
        assert!(stderr.contains("error RUN044"), "{stderr}");
        return;
    }
    let (code, stderr) = refusal(&["--jail", "--backend", "kvm"], Some(JAIL.uid));
    assert_eq!(code, Some(125));
    assert!(stderr.contains("error RUN044"), "{stderr}");
}
