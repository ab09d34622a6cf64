//! The guest agent boots a real Linux guest: a busybox image built into a bundle with the
//! static `mvm-agent` as `/init`, booted by QEMU (TCG, `microvm` with ACPI) with the plan's
//! signed kernel command line. The agent loads the kernel modules, opens the root through
//! dm-verity with the signed root hash, mounts it and reports `root ready`, then powers the
//! guest off, which ends QEMU. A flipped byte in the image is caught by dm-verity in the guest
//! and reported as an integrity error.
//!
//! The agent must be a static binary (the initramfs has no dynamic loader), which the root
//! package's build cannot give: this test builds it itself with cargo, `+crt-static` and an
//! explicit `--target` (so that build scripts stay dynamic), into its own directory under
//! `CARGO_TARGET_TMPDIR`, where it is kept between runs.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine as _;
use mvm_builder::testing::TestLayout;
use serde_json::Value;

mod support;

/// A boot under TCG reaches the agent in ~5 s; this bounds a hung guest.
const WATCHDOG: Duration = Duration::from_secs(90);
const TARGET: &str = "x86_64-unknown-linux-gnu";

/// The static `mvm-agent`, built once per test run.
fn static_agent() -> &'static Path {
    static AGENT: OnceLock<PathBuf> = OnceLock::new();
    AGENT.get_or_init(|| {
        let target_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("agent-static");
        let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["build", "--release", "-p", "mvm-agent", "--target", TARGET])
            .arg("--target-dir")
            .arg(&target_dir)
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "building the static agent: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let agent = target_dir.join(TARGET).join("release/mvm-agent");
        assert!(
            !has_interpreter(&fs::read(&agent).unwrap()),
            "{} asks for a dynamic loader: not static",
            agent.display()
        );
        agent
    })
}

/// Whether an ELF64 executable has a `PT_INTERP` program header (a dynamic loader to run it).
fn has_interpreter(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    assert_eq!(&elf[..5], b"\x7fELF\x02", "not an ELF64 file");
    let u16_at = |at: usize| usize::from(u16::from_le_bytes(elf[at..at + 2].try_into().unwrap()));
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (size, count) = (u16_at(0x36), u16_at(0x38));
    (0..count).any(|i| {
        let at = phoff + i * size;
        u32::from_le_bytes(elf[at..at + 4].try_into().unwrap()) == PT_INTERP
    })
}

/// `mvm --json ARGS`, which must succeed.
fn mvm(home: &Path, args: &[&str]) -> Value {
    support::mvm_json(home, args, 0)
}

/// A built bundle and what its plan says.
struct Bundle {
    dir: PathBuf,
    cmdline: String,
    root_hash: String,
}

/// The busybox image built into a bundle with the static agent, once for this file's tests.
fn bundle() -> &'static Bundle {
    static BUNDLE: OnceLock<(tempfile::TempDir, Bundle)> = OnceLock::new();
    &BUNDLE
        .get_or_init(|| {
            let work = tempfile::tempdir().unwrap();
            let home = work.path().join("home");
            mvm(&home, &["kernel", "fetch"]);
            let layout = TestLayout::new();
            let (digest, _) = layout.busybox();
            let image = format!("oci:{}@{digest}", layout.dir.path().display());
            let dir = work.path().join("bundle");
            let agent = static_agent().to_str().unwrap();
            let out = dir.to_str().unwrap();
            mvm(
                &home,
                &["build", "--image", &image, "--out", out, "--agent", agent],
            );
            let envelope: Value =
                serde_json::from_slice(&fs::read(dir.join("plan.dsse.json")).unwrap()).unwrap();
            let plan: Value = serde_json::from_slice(
                &base64::engine::general_purpose::STANDARD
                    .decode(envelope["payload"].as_str().unwrap())
                    .unwrap(),
            )
            .unwrap();
            let bundle = Bundle {
                dir,
                cmdline: plan["kernel"]["cmdline"].as_str().unwrap().into(),
                root_hash: plan["rootfs"]["verity"]["root_hash"]
                    .as_str()
                    .unwrap()
                    .into(),
            };
            (work, bundle)
        })
        .1
}

/// What a boot printed on the serial console, and whether QEMU ended by itself.
struct Boot {
    serial: String,
    powered_off: bool,
    took: Duration,
}

/// Boots `bundle` with `rootfs` as `/dev/vda`. One QEMU at a time: the hosts have two cores.
fn boot(bundle: &Bundle, rootfs: &Path) -> Boot {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let version = Command::new("qemu-system-x86_64").arg("--version").output();
    assert!(
        version.is_ok_and(|v| v.status.success()),
        "qemu-system-x86_64 is missing: .ci/run installs it (scripts/deps --test: qemu-system-x86)"
    );
    let drive = |id: &str, file: &Path| {
        [
            "-drive".to_string(),
            format!(
                "id={id},file={},format=raw,if=none,readonly=on",
                file.display()
            ),
            "-device".to_string(),
            format!("virtio-blk-device,drive={id}"),
        ]
    };
    let started = Instant::now();
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "microvm,acpi=on",
            "-accel",
            "tcg",
            "-icount",
            "shift=auto",
        ])
        .args([
            "-cpu",
            "qemu64",
            "-m",
            "256",
            "-nodefaults",
            "-no-user-config",
        ])
        .args(["-nographic", "-no-reboot", "-serial", "stdio"])
        .arg("-kernel")
        .arg(bundle.dir.join("vmlinuz"))
        .arg("-initrd")
        .arg(bundle.dir.join("initramfs"))
        .args(["-append", &bundle.cmdline])
        // Order matters: the image is vda, its hash tree vdb.
        .args(drive("root", rootfs))
        .args(drive("verity", &bundle.dir.join("rootfs.verity")))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let serial = Arc::new(Mutex::new(Vec::new()));
    let reader = {
        let serial = Arc::clone(&serial);
        let mut stdout = qemu.stdout.take().unwrap();
        thread::spawn(move || {
            let mut buf = [0; 4096];
            while let Ok(n @ 1..) = stdout.read(&mut buf) {
                serial.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        })
    };
    let powered_off = loop {
        if let Some(status) = qemu.try_wait().unwrap() {
            let mut stderr = String::new();
            qemu.stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .unwrap();
            assert!(status.success(), "qemu failed ({status}): {stderr}");
            break true;
        }
        if started.elapsed() > WATCHDOG {
            qemu.kill().unwrap();
            qemu.wait().unwrap();
            break false;
        }
        thread::sleep(Duration::from_millis(50));
    };
    reader.join().unwrap();
    let serial = String::from_utf8_lossy(&serial.lock().unwrap()).into_owned();
    Boot {
        serial,
        powered_off,
        took: started.elapsed(),
    }
}

#[test]
fn the_agent_opens_the_verified_root_and_powers_off() {
    let bundle = bundle();
    let boot = boot(bundle, &bundle.dir.join("rootfs.erofs"));
    let log = &boot.serial;
    assert!(boot.powered_off, "no power-off within {WATCHDOG:?}:\n{log}");
    let ready = format!("mvm-agent: root ready {}", bundle.root_hash);
    assert!(
        log.lines().any(|l| l.trim_end() == ready),
        "no `{ready}`:\n{log}"
    );
    assert!(
        log.lines().any(|l| l.trim_end() == "from the base layer")
            && log.contains("mvm-agent: /bin/sh -c cat /etc/motd exit status: 0"),
        "the image's shell printed /etc/motd through dm-verity:\n{log}"
    );
    assert!(!log.contains("mvm-agent: error"), "{log}");
    assert!(
        log.contains("mvm-agent: boot ms kernel=0 agent="),
        "no boot timings:\n{log}"
    );
    eprintln!("{}\n(QEMU ran {:?})", agent_lines(log), boot.took);
}

#[test]
fn a_flipped_byte_in_the_image_is_an_integrity_error() {
    let bundle = bundle();
    let work = tempfile::tempdir().unwrap();
    let image = fs::read(bundle.dir.join("rootfs.erofs")).unwrap();
    // /etc/motd is inline in the image's first block, beside the superblock: the mount itself
    // reads it. /bin/busybox's ELF header begins a data block that only the exec reads.
    for (bytes, caught) in [
        (
            &b"from the base layer\n"[..],
            "integrity: mounting /dev/mapper/mvm-root",
        ),
        (&b"\x7fELF\x02\x01\x01"[..], "integrity: /bin/sh"),
    ] {
        let at = image
            .windows(bytes.len())
            .position(|w| w == bytes)
            .expect("the image holds the bytes");
        let mut tampered = image.clone();
        tampered[at + 4] ^= 0x01;
        let path = work.path().join("rootfs.erofs");
        fs::write(&path, tampered).unwrap();

        let boot = boot(bundle, &path);
        let log = &boot.serial;
        assert!(boot.powered_off, "no power-off within {WATCHDOG:?}:\n{log}");
        assert!(
            log.contains(&format!("mvm-agent: error AGENT007 {caught}")),
            "dm-verity refused the block ({caught}):\n{log}"
        );
        assert!(
            !log.lines().any(|l| l.trim_end() == "from the base layer"),
            "{log}"
        );
        eprintln!("{}", agent_lines(log));
    }
}

/// The agent's own console lines, for the test's output.
fn agent_lines(serial: &str) -> String {
    serial
        .lines()
        .filter(|l| l.contains("mvm-agent: ") || l.contains("verity"))
        .collect::<Vec<_>>()
        .join("\n")
}
