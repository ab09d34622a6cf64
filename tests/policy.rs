//! Policy profiles as `docs/policy.md` states them: its table's rows asked of `mvm policy
//! explain` under every profile, its socket row run in real guests booted under each profile,
//! and what a `restrictive` VM, a host's `[policy]` ceilings and the environment flags refuse.

mod support;

use std::fs;
use std::path::Path;

use mvm_builder::testing::TestLayout;
use serde_json::Value;

use support::{describe, guest, text};

const PROFILES: [&str; 4] = ["restrictive", "standard", "dev", "permissive"];

/// The rows of `docs/policy.md`'s table: the request cell and, per profile, allowed or not.
fn table_rows() -> Vec<(String, [bool; 4])> {
    let doc =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/policy.md")).unwrap();
    let header = "| request | restrictive | standard | dev | permissive | the rule |";
    let start = doc.find(header).expect("the table of docs/policy.md");
    doc[start..]
        .lines()
        .skip(2)
        .take_while(|line| line.starts_with('|'))
        .map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let answer = |cell: &str| match cell {
                "allowed" => true,
                "denied" => false,
                other => panic!("a cell of docs/policy.md says {other:?}: {line}"),
            };
            let answers = [
                answer(cells[2]),
                answer(cells[3]),
                answer(cells[4]),
                answer(cells[5]),
            ];
            (cells[1].trim_matches('`').to_string(), answers)
        })
        .collect()
}

#[test]
fn the_table_of_docs_policy_md_is_what_mvm_policy_explain_says() {
    let home = tempfile::tempdir().unwrap();
    let rows: Vec<_> = table_rows()
        .into_iter()
        .filter(|(request, _)| request.starts_with("--"))
        .collect();
    assert!(rows.len() >= 12, "{rows:?}");
    for (request, answers) in rows {
        let (flag, value) = request.split_once(' ').unwrap();
        for (profile, allowed) in PROFILES.iter().zip(answers) {
            let args = [
                "--json",
                "policy",
                "explain",
                "--profile",
                profile,
                flag,
                value,
            ];
            let out = support::mvm(home.path(), &args);
            assert_eq!(
                out.status.code(),
                Some(if allowed { 0 } else { 1 }),
                "{request} under {profile}: {}",
                describe(&out)
            );
            let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(answer["allowed"], allowed, "{request} under {profile}");
            assert!(
                !answer["rule"].as_str().unwrap().is_empty(),
                "{request} under {profile}: no rule named"
            );
        }
    }
}

#[test]
fn explain_names_the_rule_that_decided() {
    let home = tempfile::tempdir().unwrap();
    let ask = |args: &[&str]| {
        let mut all = vec!["--json", "policy", "explain"];
        all.extend_from_slice(args);
        let answer: Value =
            serde_json::from_slice(&support::mvm(home.path(), &all).stdout).unwrap();
        answer["rule"].as_str().unwrap().to_string()
    };
    assert!(ask(&["--env", "LD_PRELOAD"]).contains("denylist"));
    assert!(
        ask(&["--profile", "restrictive", "--env", "TOKEN_NAME"]).contains("restrictive profile")
    );
    assert!(ask(&["--profile", "restrictive", "--verb", "file_write"]).contains("host_copy"));
    assert!(ask(&["--host", "api.example.com"]).contains("no egress grant"));
    fs::write(
        home.path().join("config.toml"),
        "[policy]\nallow_client_env = false\n",
    )
    .unwrap();
    assert!(ask(&["--profile", "dev", "--env", "TOKEN_NAME"]).contains("allow_client_env"));
    fs::write(
        home.path().join("config.toml"),
        "[policy]\nmax_profle = \"dev\"\n",
    )
    .unwrap();
    let out = support::mvm(home.path(), &["policy", "show"]);
    assert_eq!(out.status.code(), Some(65), "{}", describe(&out));
    assert!(text(&out.stderr).contains("RUN059"), "{}", describe(&out));
}

/// The guest's answer to an `AF_INET` socket: `nc` to a port nothing listens on is refused by
/// the guest's kernel when the socket was made, by the filter when it was not.
fn socket_refused(stderr: &str) -> bool {
    match (
        stderr.contains("Operation not permitted"),
        stderr.contains("Connection refused"),
    ) {
        (true, false) => true,
        (false, true) => false,
        _ => panic!("nc said neither: {stderr}"),
    }
}

#[test]
fn profiles_hold_in_real_guests() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    guest::mvm_json(&home, &["kernel", "fetch"], 0);
    let layout = TestLayout::new_in(dir.path());
    let digest = layout.busybox_with(&["sh", "nc", "env", "echo", "cat"]);
    let image = format!("oci:{}@{digest}", layout.dir.path().display());
    let socket_row = table_rows()
        .into_iter()
        .find(|(request, _)| request.starts_with("socket(AF_INET)"))
        .expect("the socket row of docs/policy.md")
        .1;

    // Refused before anything is built or booted.
    let build = |args: &[&str]| {
        let mut all = vec!["build", "--image", image.as_str(), "--out"];
        let out = dir.path().join("refused");
        let out = out.to_str().unwrap();
        all.push(out);
        all.extend_from_slice(args);
        guest::mvm(&home, &all)
    };
    for (args, why) in [
        (
            &[
                "--profile",
                "restrictive",
                "--allow-host",
                "api.example.com",
            ][..],
            "grants no egress",
        ),
        (&["--profile", "permissive"][..], "--ack-permissive"),
        (
            &["--profile", "restrictive", "--cpus", "4"][..],
            "at most 2",
        ),
    ] {
        let out = build(args);
        assert_eq!(out.status.code(), Some(65), "{args:?}: {}", describe(&out));
        let said = text(&out.stderr);
        assert!(
            said.contains("BUILD011") && said.contains(why),
            "{args:?}: {said}"
        );
    }
    let out = guest::mvm(
        &home,
        &["run", &image, "--env", "LD_PRELOAD=/tmp/x.so", "--", "true"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("never passed to a workload"),
        "{}",
        describe(&out)
    );

    // restrictive, as a named VM: no AF_INET socket, no copy in, no client variables.
    let name = "restricted";
    let up = guest::mvm(
        &home,
        &["up", &image, "--name", name, "--profile", "restrictive"],
    );
    let _vm = guest::RemoveOnDrop { home: &home, name };
    assert!(up.status.success(), "{}", describe(&up));
    let nc = guest::mvm(&home, &["exec", name, "--", "nc", "127.0.0.1", "9"]);
    assert_eq!(
        socket_refused(&text(&nc.stderr)),
        !socket_row[0],
        "restrictive"
    );
    let local = dir.path().join("note.txt");
    fs::write(&local, b"from the host").unwrap();
    let cp = guest::mvm(
        &home,
        &[
            "cp",
            local.to_str().unwrap(),
            &format!("{name}:/tmp/note.txt"),
        ],
    );
    assert!(!cp.status.success(), "{}", describe(&cp));
    assert!(text(&cp.stderr).contains("AGENT117"), "{}", describe(&cp));
    let env = guest::mvm(&home, &["exec", name, "--env", "FOO=1", "--", "env"]);
    assert!(!env.status.success(), "{}", describe(&env));
    assert!(text(&env.stderr).contains("AGENT117"), "{}", describe(&env));
    let ls = guest::mvm(&home, &["exec", name, "--", "cat", "/tmp/note.txt"]);
    assert!(
        !ls.status.success(),
        "the refused copy left a file: {}",
        describe(&ls)
    );
    drop(_vm);

    // standard, dev, permissive, one run each: the socket row, and the launch's variables.
    for (i, profile) in PROFILES.iter().enumerate().skip(1) {
        let mut args = vec![
            "run",
            image.as_str(),
            "--profile",
            profile,
            "--env",
            "GREETING=hello",
            "--allow-env",
            "MVM_TEST_PASSED",
        ];
        if *profile == "permissive" {
            args.push("--ack-permissive");
        }
        args.extend([
            "--",
            "sh",
            "-c",
            "echo $GREETING $MVM_TEST_PASSED; nc 127.0.0.1 9",
        ]);
        let out = guest::command(&home, &args)
            .env("MVM_TEST_PASSED", "from-the-host")
            .output()
            .unwrap();
        assert_eq!(
            text(&out.stdout).trim(),
            "hello from-the-host",
            "{profile}: {}",
            describe(&out)
        );
        assert_eq!(
            socket_refused(&text(&out.stderr)),
            !socket_row[i],
            "{profile}"
        );
    }

    // A host that runs standard plans at most, and no client variables.
    fs::write(
        home.join("config.toml"),
        "[policy]\nmax_profile = \"standard\"\nallow_client_env = false\n",
    )
    .unwrap();
    let out = guest::mvm(&home, &["run", &image, "--profile", "dev", "--", "true"]);
    assert_eq!(out.status.code(), Some(120), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("RUN059") && text(&out.stderr).contains("max_profile"),
        "{}",
        describe(&out)
    );
    let out = guest::mvm(
        &home,
        &["run", &image, "--env", "GREETING=hi", "--", "true"],
    );
    assert_eq!(out.status.code(), Some(120), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("RUN060") && text(&out.stderr).contains("allow_client_env"),
        "{}",
        describe(&out)
    );
    fs::remove_file(home.join("config.toml")).unwrap();
}
