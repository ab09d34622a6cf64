//! The image's own config, honoured as `docker run` honours it, end to end in real guests:
//! Entrypoint + Cmd (a `--` command replaces Cmd, `--entrypoint` replaces Entrypoint), Env
//! under the plan's, WorkingDir as the cwd, User as the default user of every command (`mvm
//! exec` without `--user` too), and root mapped to the workload user, said once.
//!
//! Boots cost seconds under TCG: one named VM serves the exec-side checks, and three `mvm run`s
//! the rest.

use std::fs;
use std::path::PathBuf;
use std::process::Output;
use std::sync::OnceLock;

use mvm_builder::testing::{gzip, layer_of, Entry, TestLayout, TAR_GZIP};
use serde_json::{json, Value};

mod support;

use support::guest;
use support::{describe, text};

struct Fixture {
    _work: tempfile::TempDir,
    home: PathBuf,
    /// The layouts live as long as the test process.
    _layouts: Vec<TestLayout>,
    /// `oci:DIR@sha256:…` of the image whose config sets Entrypoint, Cmd, Env, WorkingDir and
    /// `User 2000`.
    configured: String,
    /// The same with `User root`.
    rooted: String,
}

/// A busybox image with `app` (2000) in its `/etc/passwd` and `runtime` as its config.
fn image(runtime: Value) -> (TestLayout, String) {
    let layout = TestLayout::new();
    let busybox = fs::read("/bin/busybox").expect("busybox-static");
    let root = layer_of(&[
        Entry::Dir("bin"),
        Entry::File("bin/busybox", &busybox, 0o755),
        Entry::Symlink("bin/sh", "busybox"),
        Entry::Symlink("bin/echo", "busybox"),
        Entry::Symlink("bin/id", "busybox"),
        Entry::Symlink("bin/pwd", "busybox"),
        Entry::Dir("etc"),
        Entry::File(
            "etc/passwd",
            b"root:x:0:0::/root:/bin/sh\napp:x:2000:2000::/srv:/bin/sh\n",
            0o644,
        ),
        Entry::Dir("srv"),
    ]);
    let (digest, _) = layout.image_with_config("amd64", runtime, &[(TAR_GZIP, gzip(&root), root)]);
    let reference = format!("oci:{}@{digest}", layout.dir.path().display());
    (layout, reference)
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let (work, home) = support::home_with_kernel();
        let config = |user: &str| {
            json!({
                "Entrypoint": ["/bin/sh", "-c"],
                "Cmd": ["echo $GREETING from $(pwd) as $(id -u)"],
                "Env": ["PATH=/bin", "GREETING=hello"],
                "WorkingDir": "/srv",
                "User": user,
            })
        };
        let (configured_layout, configured) = image(config("2000"));
        let (rooted_layout, rooted) = image(config("root"));
        Fixture {
            _work: work,
            home,
            _layouts: vec![configured_layout, rooted_layout],
            configured,
            rooted,
        }
    })
}

/// `mvm ARGS` with the fixture's home, the static runner and agent.
fn mvm(args: &[&str]) -> Output {
    guest::mvm(&fixture().home, args)
}

/// `mvm ARGS`, which must exit 0; its standard output.
fn ok(args: &[&str]) -> String {
    let out = mvm(args);
    assert_eq!(out.status.code(), Some(0), "{args:?}: {}", describe(&out));
    text(&out.stdout)
}

const ROOT_MAPPED: &str = "the image runs as root; mvm runs it as the workload user 1000";

/// One test, so that the boots run one at a time (the hosts have two cores).
#[test]
fn an_image_runs_with_its_own_config_as_docker_run_would() {
    let f = fixture();

    // `mvm run IMAGE`: Entrypoint + Cmd, in WorkingDir, with Env, as User.
    assert_eq!(
        ok(&["run", &f.configured]),
        "hello from /srv as 2000\n",
        "docker run IMAGE"
    );
    // `mvm run IMAGE -- ARG`: the argument replaces Cmd and follows Entrypoint.
    assert_eq!(
        ok(&["run", &f.configured, "--", "echo replaced in $(pwd)"]),
        "replaced in /srv\n",
        "docker run IMAGE ARG"
    );
    // `--entrypoint PROGRAM` replaces Entrypoint and drops Cmd; the plan is what runs.
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("echo");
    ok(&[
        "build",
        "--image",
        &f.configured,
        "--out",
        out.to_str().unwrap(),
        "--agent",
        guest::static_agent().to_str().unwrap(),
        "--entrypoint",
        "/bin/echo",
        "--",
        "hi",
    ]);
    let plan = support::dsse_payload(&out.join("plan.dsse.json"));
    assert_eq!(plan["entrypoint"]["command"], json!(["/bin/echo", "hi"]));

    // `User root`: the workload user instead, said once, by the build `mvm run` starts.
    let rooted = mvm(&["run", &f.rooted]);
    assert_eq!(rooted.status.code(), Some(0), "{}", describe(&rooted));
    assert_eq!(text(&rooted.stdout), "hello from /srv as 1000\n");
    assert_eq!(
        text(&rooted.stderr).matches(ROOT_MAPPED).count(),
        1,
        "{}",
        describe(&rooted)
    );

    // A named VM of the image: every command, `mvm exec` without `--user` too, runs as the
    // image's User in its WorkingDir with its Env; `--user` still picks another.
    let _cleanup = guest::RemoveOnDrop {
        home: &f.home,
        name: "configured",
    };
    ok(&["up", &f.configured, "--name", "configured"]);
    assert_eq!(
        ok(&[
            "exec",
            "configured",
            "--",
            "sh",
            "-c",
            "echo $GREETING; pwd; id -u; id -g"
        ]),
        "hello\n/srv\n2000\n2000\n"
    );
    assert_eq!(
        ok(&["exec", "configured", "--user", "1000", "--", "id", "-u"]),
        "1000\n"
    );
    assert_eq!(
        ok(&[
            "exec",
            "configured",
            "--env",
            "GREETING=hi",
            "--",
            "sh",
            "-c",
            "echo $GREETING"
        ]),
        "hi\n",
        "--env overrides the image's Env by name"
    );
    ok(&["rm", "--force", "configured"]);
}
