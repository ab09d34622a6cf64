//! Boot snapshots end to end (docs/boot-snapshots.md): a plan's first launch boots it and
//! saves it at its agent's hello, later launches restore that; every restored guest is a
//! machine of its own; a snapshot that does not verify, or is another plan's, is refused and
//! made anew, never used. Real guests under QEMU, one home of this file's own.

mod support;

use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};

use serde_json::{json, Value};
use support::{bundle, guest};

struct Fixture {
    _work: tempfile::TempDir,
    home: PathBuf,
    bundle: PathBuf,
    /// The same image built with another memory size: another plan.
    other: PathBuf,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let (work, home) = support::home_with_kernel();
        let built = bundle::build(&home, work.path());
        let other = work.path().join("other");
        let agent = guest::static_agent().to_str().unwrap();
        let args = [
            "build",
            "--image",
            &built.image,
            "--memory",
            "288",
            "--out",
            other.to_str().unwrap(),
            "--agent",
            agent,
            "--",
            "echo",
            "entrypoint",
        ];
        support::mvm_json(&home, &args, 0);
        Fixture {
            _work: work,
            home,
            bundle: built.bundle,
            other,
        }
    })
}

/// One test at a time: they share the home's snapshots.
fn turn() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(|e| e.into_inner())
}

fn plan(bundle: &Path) -> String {
    bundle.join("plan.dsse.json").to_str().unwrap().to_string()
}

/// `mvm --json run --plan BUNDLE [EXTRA…] -- sh -c SCRIPT`: its stdout, the run checked to
/// exit 0.
fn run(bundle: &Path, extra: &[&str], script: &str) -> String {
    let plan = plan(bundle);
    let mut args = vec!["run", "--plan", &plan];
    args.extend_from_slice(extra);
    args.extend(["--", "sh", "-c", script]);
    let ran = guest::mvm_json(&fixture().home, &args, 0);
    ran["stdout"].as_str().unwrap().to_string()
}

/// The audit events of the fixture's home from entry `from` on, with their fields.
fn events_since(from: usize) -> Vec<Value> {
    support::audit_events(&fixture().home).split_off(from)
}

fn audit_len() -> usize {
    events_since(0).len()
}

/// The fields of the events named `event`.
fn named<'a>(events: &'a [Value], event: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["event"] == event)
        .map(|e| &e["fields"])
        .collect()
}

/// The home's boot snapshots as `mvm snapshot ls` lists them.
fn snapshots() -> Vec<Value> {
    let listed = guest::mvm_json(&fixture().home, &["snapshot", "ls"], 0);
    listed["snapshots"].as_array().unwrap().clone()
}

/// The snapshot of `bundle`'s plan — the fixture's two plans differ in memory size — made
/// by a run if there is none.
fn snapshot_of(bundle: &Path) -> Value {
    let mib = match bundle == fixture().other {
        true => 288,
        false => 256,
    };
    let find = || {
        snapshots()
            .into_iter()
            .find(|s| s["memory_mib"] == mib && s["verified"] == true)
    };
    find().unwrap_or_else(|| {
        run(bundle, &[], "true");
        find().expect("the first run made the plan's boot snapshot")
    })
}

/// The file `name` of `snapshot`: `ram`, `state`, `manifest.dsse.json`.
fn snapshot_file(snapshot: &Value, name: &str) -> PathBuf {
    let key = snapshot["key"].as_str().unwrap();
    fixture().home.join("boot-snapshots").join(key).join(name)
}

#[test]
fn restored_sandboxes_are_machines_of_their_own() {
    let _turn = turn();
    let snapshot = snapshot_of(&fixture().bundle);
    let from = audit_len();
    let script = "cat /proc/sys/kernel/random/boot_id; hostname; \
                  head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s; \
                  cat /etc/machine-id";
    let host_now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    };
    let first = run(&fixture().bundle, &[], script);
    let second = run(&fixture().bundle, &[], script);
    let events = events_since(from);
    let started = named(&events, "vm.started");
    assert_eq!(started.len(), 2, "{events:?}");
    for vm in &started {
        assert_eq!(vm["boot_snapshot"], snapshot["key"], "restored: {vm}");
    }
    assert!(
        named(&events, "boot_snapshot.made").is_empty(),
        "{events:?}"
    );

    let lines = |out: &str| out.lines().map(str::to_string).collect::<Vec<_>>();
    let (a, b) = (lines(&first), lines(&second));
    assert_eq!((a.len(), b.len()), (5, 5), "{first}\n{second}");
    assert_ne!(a[0], b[0], "the same boot id in two restored sandboxes");
    assert_eq!(a[0].len(), 36, "{}", a[0]);
    assert_ne!(
        a[2], b[2],
        "the same random bytes in two restored sandboxes"
    );
    assert_eq!(a[2].len(), 64, "{}", a[2]);
    // A machine-id each (systemd's form), never the other's.
    assert_ne!(a[4], b[4], "the same machine-id in two restored sandboxes");
    for id in [&a[4], &b[4]] {
        let lower_hex = id
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c));
        assert!(id.len() == 32 && lower_hex, "{id}");
    }
    // Each its own hostname: its VM's id.
    for (out, vm) in [(&a, started[0]), (&b, started[1])] {
        assert_eq!(out[1], vm["vm"].as_str().unwrap(), "{out:?}");
        // The clock is the host's, not the snapshot's.
        let guest_now: i64 = out[3].parse().unwrap();
        assert!((guest_now - host_now()).abs() < 30, "{out:?}");
    }

    // What the restored guests wrote stayed their own: with its seal broken, the RAM file is
    // hashed in full before the next restore, and is still the one that was made.
    let ram = snapshot_file(&snapshot, "ram");
    tamper(&ram, |_| {});
    let from = audit_len();
    run(&fixture().bundle, &[], "true");
    let events = events_since(from);
    assert!(
        named(&events, "boot_snapshot.refused").is_empty(),
        "{events:?}"
    );
    assert_eq!(
        named(&events, "vm.started")[0]["boot_snapshot"],
        snapshot["key"]
    );

    // A cold boot neither restores nor makes a snapshot.
    let from = audit_len();
    run(&fixture().bundle, &["--cold-boot"], "true");
    let events = events_since(from);
    let vm = named(&events, "vm.started");
    assert_eq!(vm[0]["boot_snapshot"], Value::Null, "{events:?}");
    assert!(named(&events, "boot_snapshot.made").is_empty());
}

/// Changes `file` (read-only as the store leaves it) with `change`.
fn tamper(file: &Path, change: impl FnOnce(&mut Vec<u8>)) {
    fs::set_permissions(file, fs::Permissions::from_mode(0o600)).unwrap();
    let mut bytes = fs::read(file).unwrap();
    change(&mut bytes);
    fs::write(file, &bytes).unwrap();
    fs::set_permissions(file, fs::Permissions::from_mode(0o400)).unwrap();
}

/// The next run of the fixture's plan refuses its snapshot, makes a new one and restores
/// that; the new one verifies.
fn refused_and_made_anew(what: &str) {
    let from = audit_len();
    assert_eq!(run(&fixture().bundle, &[], "echo ok"), "ok\n", "{what}");
    let events = events_since(from);
    let refused = named(&events, "boot_snapshot.refused");
    assert_eq!(refused.len(), 1, "{what}: {events:?}");
    assert_eq!(named(&events, "boot_snapshot.made").len(), 1, "{what}");
    let started = named(&events, "vm.started");
    assert_eq!(started.len(), 1);
    assert_eq!(started[0]["boot_snapshot"], refused[0]["key"], "{what}");
    let listed = snapshots();
    let now = listed.iter().find(|s| s["key"] == refused[0]["key"]);
    assert_eq!(now.unwrap()["verified"], true, "{what}: {listed:?}");
}

#[test]
fn a_tampered_boot_snapshot_is_refused_and_made_anew() {
    let _turn = turn();
    // A byte of guest RAM (a page the kernel holds, in the middle), and of the device state
    // at its start (QEMU's header), its middle and its end.
    let cases = [("ram", 0.5), ("state", 0.0), ("state", 0.5), ("state", 1.0)];
    for (file, at) in cases {
        let snapshot = snapshot_of(&fixture().bundle);
        tamper(&snapshot_file(&snapshot, file), |bytes| {
            let at = ((bytes.len() - 64) as f64 * at) as usize + 16;
            bytes[at] ^= 0x20;
        });
        refused_and_made_anew(&format!("{file} at {at}"));
    }

    // The manifest's signature.
    let snapshot = snapshot_of(&fixture().bundle);
    let manifest = snapshot_file(&snapshot, "manifest.dsse.json");
    let mut text = fs::read_to_string(&manifest).unwrap();
    let sig = text.find("\"sig\"").unwrap();
    let at = sig + text[sig + 5..].find('"').unwrap() + 5 + 3;
    let flipped = if &text[at..=at] == "A" { "B" } else { "A" };
    text.replace_range(at..=at, flipped);
    fs::write(&manifest, text).unwrap();
    let listed = snapshots();
    let entry = listed.iter().find(|s| s["key"] == snapshot["key"]).unwrap();
    assert_eq!(entry["verified"], false, "{entry}");
    refused_and_made_anew("signature");

    // `mvm snapshot prune` removes one that does not verify, and what a making killed
    // mid-way left — but not a making whose process is still running — and keeps the rest.
    let snapshot = snapshot_of(&fixture().bundle);
    fs::write(snapshot_file(&snapshot, "manifest.dsse.json"), b"{}").unwrap();
    let key = snapshot["key"].as_str().unwrap();
    let store = fixture().home.join("boot-snapshots");
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    let killed = store.join(format!(".making-{key}-{}", gone.id()));
    let running = store.join(format!(".making-{key}-{}", std::process::id()));
    for dir in [&killed, &running] {
        fs::create_dir(dir).unwrap();
        fs::write(dir.join("ram"), vec![7u8; 1 << 20]).unwrap();
    }
    let dry = guest::mvm_json(&fixture().home, &["snapshot", "prune", "--dry-run"], 0);
    assert_eq!(dry["leftovers"], 1, "{dry}");
    assert!(killed.exists() && snapshot_file(&snapshot, "ram").exists());
    let pruned = guest::mvm_json(&fixture().home, &["snapshot", "prune"], 0);
    assert_eq!(pruned["removed"], json!([key]), "{pruned}");
    assert_eq!(pruned["leftovers"], 1, "{pruned}");
    assert!(pruned["bytes"].as_u64().unwrap() > 1 << 20, "{pruned}");
    assert!(!snapshot_file(&snapshot, "ram").exists());
    assert!(!killed.exists() && running.exists());
    fs::remove_dir_all(&running).unwrap();

    // `mvm system df` counts what is left, as `snapshot ls` does.
    let left = snapshots();
    let df = guest::mvm_json(&fixture().home, &["system", "df"], 0);
    let row = df["usage"]
        .as_array()
        .unwrap()
        .iter()
        .find(|row| row["what"] == "boot snapshots")
        .unwrap_or_else(|| panic!("no boot snapshots row: {df}"));
    assert_eq!(row["count"], left.len(), "{df}");
    let bytes: u64 = left.iter().map(|s| s["bytes"].as_u64().unwrap()).sum();
    assert_eq!(row["size"], bytes, "{df}");
    assert_eq!(row["reclaimable"], bytes, "{df}");
}

#[test]
fn another_plans_boot_snapshot_is_never_used() {
    let _turn = turn();
    let mine = snapshot_of(&fixture().bundle);
    let theirs = snapshot_of(&fixture().other);
    assert_ne!(mine["key"], theirs["key"]);
    assert_eq!(theirs["memory_mib"], 288);

    // The other plan's snapshot put where this plan's is.
    let mine_dir = snapshot_file(&mine, "");
    let theirs_dir = snapshot_file(&theirs, "");
    for file in ["ram", "state", "manifest.dsse.json"] {
        let target = mine_dir.join(file);
        fs::set_permissions(&target, fs::Permissions::from_mode(0o600)).unwrap();
        fs::copy(theirs_dir.join(file), &target).unwrap();
    }
    refused_and_made_anew("another plan's");
    // Its guest has this plan's memory size, not the other's 288 MiB.
    let total = run(&fixture().bundle, &[], "grep MemTotal /proc/meminfo");
    let kib: u64 = total.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(kib < 256 * 1024, "{total}");

    // Removed by key prefix: the next run makes it anew.
    let key = mine["key"].as_str().unwrap();
    let removed = guest::mvm_json(&fixture().home, &["snapshot", "rm", &key[..12]], 0);
    assert_eq!(removed["removed"][0], key);
    let config = fixture().home.join("config.toml");
    let _config = RemoveFileOnDrop(config.clone());
    // A typo in the store's budget fails the launch that would make one, before it boots.
    fs::write(&config, "[boot_snapshots]\nmax_disk_mb = 150\n").unwrap();
    let from = audit_len();
    let out = guest::mvm(
        &fixture().home,
        &[
            "--json",
            "run",
            "--plan",
            &plan(&fixture().bundle),
            "--",
            "true",
        ],
    );
    assert_eq!(out.status.code(), Some(125), "{}", support::describe(&out));
    let said = format!(
        "{}{}",
        support::text(&out.stdout),
        support::text(&out.stderr)
    );
    assert!(said.contains("RUN066"), "{}", support::describe(&out));
    let events = events_since(from);
    for never in ["boot_snapshot.made", "vm.started"] {
        assert!(named(&events, never).is_empty(), "{never}: {events:?}");
    }
    // Made anew over a budget both snapshots do not fit in: the other plan's, unused for an
    // hour, is evicted; this one stays.
    fs::write(&config, "[boot_snapshots]\nmax_disk_mib = 150\n").unwrap();
    File::options()
        .write(true)
        .open(theirs_dir.join("used"))
        .unwrap()
        .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(3600))
        .unwrap();
    let from = audit_len();
    run(&fixture().bundle, &[], "true");
    let events = events_since(from);
    let made = named(&events, "boot_snapshot.made");
    assert_eq!(made.len(), 1, "{events:?}");
    let evicted = named(&events, "boot_snapshot.evicted");
    assert_eq!(evicted.len(), 1, "{events:?}");
    assert_eq!(evicted[0]["key"], theirs["key"], "{events:?}");
    assert_eq!(evicted[0]["max_bytes"], 150 << 20, "{events:?}");
    let listed = guest::mvm_json(&fixture().home, &["snapshot", "ls"], 0);
    assert_eq!(listed["max_disk_bytes"], 150 << 20, "{listed}");
    assert!(
        listed["disk_bytes"].as_u64().unwrap() <= 150 << 20,
        "{listed}"
    );
    let keys: Vec<&Value> = listed["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| &s["key"])
        .collect();
    assert_eq!(keys, vec![&made[0]["key"]], "{listed}");
}

/// Removes a file when dropped: the home's `config.toml`, which the other tests must not see.
struct RemoveFileOnDrop(PathBuf);

impl Drop for RemoveFileOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

#[test]
fn a_named_vm_restored_from_a_boot_snapshot_serves_and_saves_cold() {
    let _turn = turn();
    let snapshot = snapshot_of(&fixture().bundle);
    let home = &fixture().home;
    let plan = plan(&fixture().bundle);
    let up = guest::mvm_json(home, &["up", "--plan", &plan, "--name", "restored"], 0);
    let _remove = guest::RemoveOnDrop {
        home,
        name: "restored",
    };
    let events = events_since(0);
    let started = named(&events, "vm.started");
    let last = started.last().unwrap();
    assert_eq!(last["boot_snapshot"], snapshot["key"], "{up}");
    // The VM's state says so too, as `mvm up`, `mvm ls` and the API's sandboxes show it.
    assert_eq!(up["vm"]["boot_snapshot"], snapshot["key"], "{up}");
    let exec = |command: &str| {
        let out = guest::mvm(home, &["exec", "restored", "--", "sh", "-c", command]);
        assert_eq!(out.status.code(), Some(0), "{}", support::describe(&out));
        support::text(&out.stdout)
    };
    assert_eq!(
        exec("hostname"),
        format!("{}\n", last["vm"].as_str().unwrap())
    );
    // Saved cold and woken like any other VM.
    let saved = guest::mvm_json(home, &["pause", "restored", "--cold"], 0);
    assert_eq!(saved["vm"]["phase"], "cold", "{saved}");
    guest::mvm_json(home, &["resume", "restored"], 0);
    assert_eq!(exec("echo woken"), "woken\n");
}

#[test]
fn make_prepares_a_plans_snapshot_ahead_of_time() {
    let _turn = turn();
    let plan = plan(&fixture().other);
    let made = guest::mvm_json(&fixture().home, &["snapshot", "make", "--plan", &plan], 0);
    let key = made["key"].as_str().unwrap().to_string();
    assert!(made["ready_ms"].as_u64().unwrap() > 0, "{made}");
    // Made again: the one there is used.
    let from = audit_len();
    let again = guest::mvm_json(&fixture().home, &["snapshot", "make", "--plan", &plan], 0);
    assert_eq!(again["key"], key.as_str());
    assert!(named(&events_since(from), "boot_snapshot.made").is_empty());
    // Not for a launch that boots.
    let out = guest::mvm(
        &fixture().home,
        &["--json", "snapshot", "make", "--plan", &plan, "--cold-boot"],
    );
    assert_ne!(out.status.code(), Some(0), "{}", support::describe(&out));
}
