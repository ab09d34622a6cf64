//! Services end to end: a workload declared in the IR (a busybox image pulled from a real
//! registry on loopback) whose app runs busybox's `httpd` as a service with an HTTP health
//! check, in a real Linux VM (QEMU). `mvm up` returns only once the probe passed; the page is
//! then reachable from the host through the app's forwarded port; the service killed is
//! started again by its policy, which a following `mvm logs --service` shows as it happens.
//! A second app whose service keeps failing makes `mvm up` fail with RUN065, its log kept.

mod support;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use mvm_builder::testing::{LocalRegistry, TestLayout};
use serde_json::Value;

use support::{describe, guest, text};

const APPLETS: &[&str] = &["sh", "httpd", "mkdir", "sleep", "stat", "cat"];

/// The workload: `web` serves `/tmp/www` on the guest's port 8080 (forwarded to the host),
/// probed over HTTP, with the volume `site` mounted at `/srv/site`; `broken` fails at once,
/// started again once.
fn declaration(reference: &str, digest: &str) -> String {
    format!(
        r#"schema_version = "0"
id = "services"

[[apps]]
name = "web"
image = {{ kind = "oci_base", reference = "{reference}", digest = "{digest}" }}
resources = {{ cpu_cores = 1, memory_mb = 256 }}
threat_tier = "standard"
entrypoints = [
  {{ kind = "service", name = "httpd", command = ["sh", "-c", "mkdir -p /tmp/www && echo hello from a service > /tmp/www/index.html && echo serving && exec httpd -f -p 127.0.0.1:8080 -h /tmp/www"] }},
]
network = {{ ports = [{{ guest = 8080 }}] }}
mounts = [{{ volume = "site", target = "/srv/site" }}]
health_check = {{ http = {{ port = 8080, path = "/index.html" }}, interval_s = 2, timeout_s = 1, retries = 3 }}

[[apps]]
name = "broken"
image = {{ kind = "oci_base", reference = "{reference}", digest = "{digest}" }}
resources = {{ cpu_cores = 1, memory_mb = 256 }}
entrypoints = [
  {{ kind = "service", name = "crash", command = ["sh", "-c", "echo boom >&2; exit 3"], max_restarts = 1 }},
]

[[volumes]]
name = "site"
size_mb = 16
"#
    )
}

/// `mvm ARGS` in `home`, which must exit 0; its standard output.
fn ok(home: &Path, args: &[&str]) -> String {
    let out = guest::mvm(home, args);
    assert_eq!(out.status.code(), Some(0), "{args:?}: {}", describe(&out));
    text(&out.stdout)
}

/// `GET /index.html` on the host's `port`: the whole answer.
fn get(port: u64) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port as u16)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
        .write_all(b"GET /index.html HTTP/1.0\r\nHost: web.example.com\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

#[test]
fn a_service_is_up_when_healthy_restarted_by_its_policy_and_logged() {
    let (work, home) = support::home_with_kernel();
    let layout = TestLayout::new_in(work.path());
    let digest = layout.busybox_with(APPLETS);
    fs::write(
        layout.dir.path().join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{digest}","size":{},"annotations":{{"org.opencontainers.image.ref.name":"1"}}}}]}}"#,
            fs::metadata(layout.blob_path(&digest)).unwrap().len()
        ),
    )
    .unwrap();
    let registry = LocalRegistry::start();
    registry.push(layout.dir.path(), "1", "mvm/services");
    let reference = format!("{}/mvm/services", registry.address);
    let declared = work.path().join("mvm.toml");
    fs::write(&declared, declaration(&reference, &digest)).unwrap();
    let validated = ok(&home, &["ir", "validate", declared.to_str().unwrap()]);
    assert!(!validated.contains("warning"), "{validated}");
    let build = |app: &str| {
        let out = work.path().join(app);
        ok(
            &home,
            &[
                "build",
                declared.to_str().unwrap(),
                "--app",
                app,
                "--out",
                out.to_str().unwrap(),
                "--agent",
                guest::static_agent().to_str().unwrap(),
            ],
        );
        out.join("plan.dsse.json")
    };
    let (web, broken) = (build("web"), build("broken"));
    drop(registry);

    // The plan mounts the volume `site`: without it here, `up` says how to make it.
    let missing = guest::mvm(
        &home,
        &["up", "--plan", web.to_str().unwrap(), "--name", "web"],
    );
    assert_ne!(missing.status.code(), Some(0));
    let said = text(&missing.stderr);
    assert!(
        said.contains("VOLUME001") && said.contains("mvm volume create site --size"),
        "{said}"
    );
    let _ = guest::mvm(&home, &["rm", "--force", "web"]);
    guest::mvm_json(&home, &["volume", "create", "site", "--size", "16M"], 0);

    // `up` returns once the probe passed: the page is there at once, through the forwarded port.
    let _web = guest::RemoveOnDrop {
        home: &home,
        name: "web",
    };
    let started = Instant::now();
    let up = guest::mvm_json(
        &home,
        &["up", "--plan", web.to_str().unwrap(), "--name", "web"],
        0,
    );
    eprintln!("mvm up (healthy): {:.1?}", started.elapsed());
    assert_eq!(up["services"]["health"]["status"], "healthy", "{up}");
    assert!(
        up["services"]["health"]["last_output"]
            .as_str()
            .unwrap()
            .starts_with("HTTP/1.1 200"),
        "{up}"
    );
    let ports = guest::mvm_json(&home, &["port", "ls", "web"], 0);
    let port = ports["ports"][0]["host"].as_u64().unwrap();
    let page = get(port);
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.ends_with("hello from a service\n"), "{page}");
    let table = ok(&home, &["ls"]);
    let row = table.lines().find(|l| l.starts_with("web ")).unwrap();
    assert!(
        row.contains(" running ") && row.contains(" healthy "),
        "{table}"
    );

    // Killed, it is started again (on-failure: a signal is a failure), as a following reader
    // of its log sees; the probe passes again and the page is back.
    let services = guest::listed(&home, "web")["services"].clone();
    let handle = services["services"][0]["handle"].as_u64().unwrap();
    let mut follower = guest::command(&home, &["logs", "web", "--service", "httpd", "-f"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(follower.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.starts_with("[mvm] started (pid "), "{first}");
    assert_eq!(lines.next().unwrap().unwrap(), "serving");
    ok(
        &home,
        &["kill", "web", &handle.to_string(), "--signal", "KILL"],
    );
    assert_eq!(
        lines.next().unwrap().unwrap(),
        "[mvm] killed by signal 9; starting again in 1 s"
    );
    let again = lines.next().unwrap().unwrap();
    assert!(again.starts_with("[mvm] started (pid "), "{again}");
    assert_ne!(again, first);
    let _ = follower.kill();
    let _ = follower.wait();
    let waited = guest::mvm_json(&home, &["wait", "web", "--healthy", "--timeout", "60s"], 0);
    assert_eq!(waited["services"]["services"][0]["restarts"], 1, "{waited}");
    assert_eq!(waited["services"]["services"][0]["state"], "running");
    assert_eq!(
        waited["services"]["services"][0]["last_exit"],
        serde_json::json!({"kind": "signaled", "signal": 9})
    );
    assert!(get(port).ends_with("hello from a service\n"));
    let log = ok(&home, &["logs", "web", "--service", "httpd"]);
    assert_eq!(log.matches("serving\n").count(), 2, "{log}");
    let unknown = guest::mvm(&home, &["logs", "web", "--service", "nope"]);
    assert!(
        text(&unknown.stderr).contains("AGENT122"),
        "{}",
        describe(&unknown)
    );
    ok(&home, &["rm", "--force", "web"]);

    // A service that keeps failing: `up` says why, with RUN065, and leaves the VM to look at.
    let _broken = guest::RemoveOnDrop {
        home: &home,
        name: "broken",
    };
    let out = guest::mvm(
        &home,
        &[
            "up",
            "--plan",
            broken.to_str().unwrap(),
            "--name",
            "broken",
            "--cold-boot",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let said = text(&out.stderr);
    for part in ["RUN065", "service crash exited with 3", "(1 restarts)"] {
        assert!(said.contains(part), "{said}");
    }
    let log = ok(&home, &["logs", "broken", "--service", "crash"]);
    assert_eq!(log.matches("boom\n").count(), 2, "{log}");
    assert!(
        log.contains("[mvm] exited with 3; not started again: 1 restarts"),
        "{log}"
    );
    let table = ok(&home, &["ls"]);
    let row = table.lines().find(|l| l.starts_with("broken ")).unwrap();
    assert!(
        row.contains(" running ") && row.contains(" failed "),
        "{table}"
    );
    let events: Vec<Value> = support::audit_events(&home)
        .into_iter()
        .filter(|e| e["event"] == "vm.services.started")
        .collect();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(
        events[0]["fields"]["services"],
        serde_json::json!(["httpd"])
    );
}
