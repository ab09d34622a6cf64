//! Encrypted persistent volumes end to end, in real Linux VMs (QEMU): a volume made here is
//! ciphertext on the host (an independent AES-XTS — Python's `cryptography`, on OpenSSL —
//! reads its ext4 superblock back with the volume's key, and no marker the guest wrote is in
//! the file), opened in the guest by the agent with dm-crypt, kept across VMs, attached to one
//! VM at a time, snapshotted and restored, still mountable after its VM's runner was killed
//! in the middle of writing, and moved through an archive sealed with a passphrase.

mod support;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use memchr::memmem;
use serde_json::Value;

use support::wait::eventually;
use support::{describe, guest, text};

const APPLETS: &[&str] = &["sh", "cat", "echo", "dd", "sync", "sleep", "stat", "ls"];

/// `mvm ARGS` in `home`, which must exit 0; its standard output.
fn ok(home: &Path, args: &[&str]) -> String {
    let out = guest::mvm(home, args);
    assert_eq!(out.status.code(), Some(0), "{args:?}: {}", describe(&out));
    text(&out.stdout)
}

/// `mvm up IMAGE --name NAME --volume data:/work`: the state `up` printed.
fn up_with_volume(home: &Path, image: &str, name: &str) -> Value {
    guest::mvm_json(
        home,
        &["up", image, "--name", name, "--volume", "data:/work"],
        0,
    )
}

/// `sh -c SCRIPT` in VM `name`: its stdout.
fn sh(home: &Path, name: &str, script: &str) -> String {
    ok(home, &["exec", name, "--", "sh", "-c", script])
}

#[test]
fn a_volume_is_ciphertext_here_kept_across_vms_locked_snapshotted_and_survives_a_kill() {
    let (_dir, home, image) = guest::home_and_busybox(APPLETS);
    let made = guest::mvm_json(&home, &["volume", "create", "data", "--size", "32M"], 0);
    assert_eq!(made["size_bytes"], 32 << 20);
    let store = mvm_ir::volume::VolumeStore::open(&mvm_ir::home::MvmHome::at(&home)).unwrap();
    let data = store.data_of("data");
    let key = store.key(&store.meta("data").unwrap()).unwrap();

    // Another implementation of XTS-AES-256 decrypts the ext4 superblock (bytes 1024-2047:
    // sectors 2 and 3, each tweaked by its number) and finds its magic, 0xEF53, at 0x38.
    let python = support::python_venv("volumes-cryptography", &["cryptography"]);
    let disk = fs::read(&data).unwrap();
    assert_eq!(disk.len(), 32 << 20);
    let decrypted = Command::new(&python)
        .args([
            "-c",
            "import sys\n\
             from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes\n\
             key = bytes.fromhex(sys.argv[1])\n\
             disk = sys.stdin.buffer.read()\n\
             out = b''\n\
             for sector in (2, 3):\n\
             \x20   tweak = sector.to_bytes(16, 'little')\n\
             \x20   d = Cipher(algorithms.AES(key), modes.XTS(tweak)).decryptor()\n\
             \x20   out += d.update(disk[sector * 512:(sector + 1) * 512]) + d.finalize()\n\
             sys.stdout.buffer.write(out)",
            &hex::encode(key.as_slice()),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(&disk[..4096])?;
            child.wait_with_output()
        })
        .unwrap();
    assert!(decrypted.status.success(), "{}", describe(&decrypted));
    assert_eq!(decrypted.stdout.len(), 1024);
    assert_eq!(
        &decrypted.stdout[0x38..0x3a],
        &[0x53, 0xef],
        "the ext4 magic"
    );
    assert_ne!(
        &disk[1024 + 0x38..1024 + 0x3a],
        &[0x53, 0xef],
        "stored encrypted"
    );

    // A file written in one VM; the volume is attached to it alone meanwhile.
    let _v1 = guest::RemoveOnDrop {
        home: &home,
        name: "v1",
    };
    up_with_volume(&home, &image, "v1");
    let marker = "mvm-volume-marker-7f3a9c";
    assert_eq!(
        sh(
            &home,
            "v1",
            &format!("echo {marker} > /work/note && sync && cat /work/note && stat -c %u /work")
        ),
        format!("{marker}\n1000\n")
    );
    let second = guest::mvm(
        &home,
        &["up", &image, "--name", "v2", "--volume", "data:/work"],
    );
    assert_ne!(second.status.code(), Some(0));
    assert!(
        text(&second.stderr).contains("RUN062"),
        "{}",
        describe(&second)
    );
    let busy = guest::mvm(&home, &["volume", "snapshot", "data"]);
    assert_eq!(busy.status.code(), Some(65), "{}", describe(&busy));
    assert!(
        text(&busy.stderr).contains("VOLUME004"),
        "{}",
        describe(&busy)
    );
    let listed = guest::mvm_json(&home, &["volume", "ls"], 0);
    assert_eq!(listed["volumes"][0]["attached"], true, "{listed}");
    ok(&home, &["rm", "--force", "v1"]);
    let _ = guest::mvm(&home, &["rm", "--force", "v2"]);

    // On the host: ciphertext only.
    let disk = fs::read(&data).unwrap();
    assert!(
        memmem::find(&disk, marker.as_bytes()).is_none(),
        "the marker in clear"
    );
    let snapshot = guest::mvm_json(&home, &["volume", "snapshot", "data", "--as", "s1"], 0);
    assert_eq!(snapshot["snapshot"]["name"], "s1");

    // A new VM finds the file; its runner killed while it writes, the volume mounts again.
    let _v3 = guest::RemoveOnDrop {
        home: &home,
        name: "v3",
    };
    let up = up_with_volume(&home, &image, "v3");
    assert_eq!(sh(&home, "v3", "cat /work/note"), format!("{marker}\n"));
    sh(&home, "v3", "echo second > /work/note && sync");
    ok(
        &home,
        &[
            "exec",
            "v3",
            "--detach",
            "--",
            "sh",
            "-c",
            "while :; do dd if=/dev/zero of=/work/big bs=64k count=64 2>/dev/null; done",
        ],
    );
    std::thread::sleep(Duration::from_secs(2));
    let runner = up["vm"]["runner_pid"].as_u64().unwrap().to_string();
    assert!(Command::new("kill")
        .args(["-KILL", &runner])
        .status()
        .unwrap()
        .success());
    eventually(
        "the killed runner is gone",
        Duration::from_secs(30),
        || match Path::new("/proc").join(&runner).exists() {
            true => Err(format!("runner {runner} still there")),
            false => Ok(()),
        },
    );
    ok(&home, &["rm", "--force", "v3"]);
    let _v4 = guest::RemoveOnDrop {
        home: &home,
        name: "v4",
    };
    // Read-only this time: the journal the killed VM left is replayed all the same, and the
    // workload cannot write.
    let args = ["up", &image, "--name", "v4", "--volume", "data:/work:ro"];
    guest::mvm_json(&home, &args, 0);
    assert_eq!(sh(&home, "v4", "cat /work/note"), "second\n");
    let wrote = guest::mvm(
        &home,
        &["exec", "v4", "--", "sh", "-c", "echo x > /work/note"],
    );
    assert_ne!(wrote.status.code(), Some(0), "{}", describe(&wrote));
    assert!(
        text(&wrote.stderr).contains("Read-only"),
        "{}",
        describe(&wrote)
    );
    ok(&home, &["rm", "--force", "v4"]);

    // The snapshot restored: the first content is back.
    let restored = guest::mvm_json(&home, &["volume", "restore", "data", "s1"], 0);
    assert_eq!(
        restored["restored"]["sha256"],
        snapshot["snapshot"]["sha256"]
    );
    let _v5 = guest::RemoveOnDrop {
        home: &home,
        name: "v5",
    };
    up_with_volume(&home, &image, "v5");
    assert_eq!(sh(&home, "v5", "cat /work/note"), format!("{marker}\n"));
    ok(&home, &["rm", "--force", "v5"]);

    // Exported with a passphrase and imported under another name: the same disk, the file
    // there. A wrong passphrase, or one flipped byte of the archived disk, imports nothing.
    let archive = home.parent().unwrap().join("data.mvmvol");
    let secret = home.parent().unwrap().join("passphrase");
    fs::write(&secret, "correct horse battery staple\n").unwrap();
    let wrong = home.parent().unwrap().join("wrong");
    fs::write(&wrong, "incorrect horse battery staple").unwrap();
    let exported = guest::mvm_json(
        &home,
        &[
            "volume",
            "export",
            "data",
            archive.to_str().unwrap(),
            "--passphrase-file",
            secret.to_str().unwrap(),
        ],
        0,
    );
    let archived = fs::read(&archive).unwrap();
    assert!(
        memmem::find(&archived, marker.as_bytes()).is_none(),
        "the marker in clear"
    );
    // `mvm volume import ARCHIVE --as copy --passphrase-file PASSPHRASE`.
    let import = |archive: &Path, passphrase: &Path| {
        let (archive, passphrase) = (archive.to_str().unwrap(), passphrase.to_str().unwrap());
        let args = [
            "volume",
            "import",
            archive,
            "--as",
            "copy",
            "--passphrase-file",
            passphrase,
        ];
        args.map(str::to_string)
    };
    let refused = |archive: &Path, passphrase: &Path| {
        let args = import(archive, passphrase);
        let out = guest::mvm(&home, &args.each_ref().map(String::as_str));
        assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
        assert!(
            text(&out.stderr).contains("VOLUME005"),
            "{}",
            describe(&out)
        );
    };
    refused(&archive, &wrong);
    let mut flipped = archived.clone();
    let at = flipped.len() / 2;
    flipped[at] ^= 1;
    let forged = home.parent().unwrap().join("forged.mvmvol");
    fs::write(&forged, &flipped).unwrap();
    refused(&forged, &secret);
    assert!(
        !store.dir_of("copy").exists(),
        "nothing kept of a refused import"
    );
    let args = import(&archive, &secret);
    let imported = guest::mvm_json(&home, &args.each_ref().map(String::as_str), 0);
    assert_eq!(imported["sha256"], exported["sha256"]);
    assert_ne!(imported["id"], made["id"]);
    let _v6 = guest::RemoveOnDrop {
        home: &home,
        name: "v6",
    };
    guest::mvm_json(
        &home,
        &["up", &image, "--name", "v6", "--volume", "copy:/work"],
        0,
    );
    assert_eq!(sh(&home, "v6", "cat /work/note"), format!("{marker}\n"));
    ok(&home, &["rm", "--force", "v6"]);

    // The key is nowhere but sealed: not in the audit log, the VMs' state or the plan.
    let key_hex = hex::encode(key.as_slice());
    let events = support::audit_events(&home);
    let attached: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "volume.attached")
        .collect();
    assert_eq!(attached.len(), 5, "{attached:?}");
    assert!(events.iter().any(|e| e["event"] == "volume.snapshot"));
    for file in walk(&home) {
        let bytes = fs::read(&file).unwrap_or_default();
        assert!(
            memmem::find(&bytes, key_hex.as_bytes()).is_none(),
            "the volume's key in {}",
            file.display()
        );
    }
}

/// Every regular file under `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(kind) if kind.is_dir() => files.extend(walk(&path)),
            Ok(kind) if kind.is_file() => files.push(path),
            _ => {}
        }
    }
    files
}
