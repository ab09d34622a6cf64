//! `mvm mcp` and `mvm tool run` against real sandboxes (busybox guests booted by
//! `mvm-runner`): driven by the official MCP clients — Python's `mcp` (`tests/mcp/suite.py`)
//! and TypeScript's `@modelcontextprotocol/sdk` (`tests/mcp/suite.mjs`) — and listed by the
//! MCP Inspector's CLI; the tool contract's failure classes and retention choices from the
//! command line. The clients come pinned from PyPI and npm, installed under the test target
//! directory.

mod support;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};

use mvm_builder::testing::TestLayout;
use serde_json::{json, Value};

use support::{describe, guest, text, wait};

/// The official Python MCP client, pinned.
const PYTHON_MCP: &str = "mcp==2.3.0";

/// The applets the suites' commands use.
const APPLETS: &[&str] = &["sh", "cat", "echo", "sleep", "printf", "true", "ls"];

/// The tests boot guests one at a time: the hosts have two cores.
static TURN: Mutex<()> = Mutex::new(());

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// One mvm home with a kernel, shared by every test here (its image is built into a bundle
/// once), an allowed busybox image and another that is not allowed.
struct Fixture {
    dir: PathBuf,
    image: String,
    denied: String,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = support::lasting_tempdir().keep();
        guest::mvm_json(&dir.join("home"), &["kernel", "fetch"], 0);
        let layout = TestLayout::new_in(&dir);
        let at = layout.dir.path().display().to_string();
        let image = format!("oci:{at}@{}", layout.busybox_with(APPLETS));
        let denied = format!("oci:{at}@{}", layout.busybox_with(&["sh"]));
        std::mem::forget(layout);
        Fixture { dir, image, denied }
    })
}

impl Fixture {
    fn home(&self) -> PathBuf {
        self.dir.join("home")
    }

    /// `command` with this home, the runner and agent under test, and the images.
    fn env<'a>(&self, command: &'a mut Command) -> &'a mut Command {
        command
            .env("MVM_HOME", self.home())
            .env("MVM_BIN", env!("CARGO_BIN_EXE_mvm"))
            .env("MVM_RUNNER", guest::runner())
            .env("MVM_AGENT", guest::static_agent())
            .env("MVM_TEST_IMAGE", &self.image)
            .env("MVM_TEST_DENIED", &self.denied)
    }

    /// The VMs of this home now.
    fn vms(&self) -> Vec<Value> {
        let listed = guest::mvm_json(&self.home(), &["ls"], 0);
        listed["vms"].as_array().cloned().unwrap_or_default()
    }

    /// Removes every VM of this home; returns them (a suite must leave none).
    fn clean(&self) -> Vec<Value> {
        let left = self.vms();
        for vm in &left {
            let _ = guest::mvm(
                &self.home(),
                &["rm", "--force", vm["name"].as_str().unwrap()],
            );
        }
        left
    }

    /// `mvm tool run LIMITS`, started, `request` written to its stdin.
    fn tool_start(&self, limits: &[&str], request: &Value) -> std::process::Child {
        let mut child = guest::command(&self.home(), &["tool", "run"])
            .args(limits)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(request.to_string().as_bytes())
            .unwrap();
        child
    }

    /// The one sandbox of this home, once its command has made `/tmp/started`; its name.
    fn started(&self) -> String {
        wait::eventually("the request's command running", wait::EVENTUALLY, || {
            let vm = self.vms().first().cloned().ok_or("no sandbox yet")?;
            let name = vm["name"].as_str().unwrap_or_default().to_string();
            let listed = guest::mvm(&self.home(), &["fs", "ls", &format!("{name}:/tmp")]);
            match text(&listed.stdout).contains("started") {
                true => Ok(name),
                false => Err(describe(&listed)),
            }
        })
    }

    /// The state file of the VM `name`.
    fn state(&self, name: &str) -> Value {
        let path = self.home().join("vms").join(name).join("state.json");
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    /// Waits until this home has no VM.
    fn wait_empty(&self) {
        wait::eventually("the sandbox removed", wait::EVENTUALLY, || {
            match self.vms().is_empty() {
                true => Ok(()),
                false => Err(format!("{:?}", self.vms())),
            }
        });
    }

    /// `mvm tool run LIMITS` with `request` on stdin, to its end.
    fn tool_run(&self, limits: &[&str], request: &Value) -> (Output, Value) {
        let child = self.tool_start(limits, request);
        let out = child.wait_with_output().unwrap();
        let response = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", describe(&out)));
        (out, response)
    }
}

/// The tools as `tools/list` gives them: the eleven, every input strict and bounded, every
/// output with a schema; their size, the cost of offering them to a model, printed.
#[test]
fn the_tools_are_few_strict_and_small() {
    let home = tempfile::tempdir().unwrap();
    let listed = guest::mvm_json(home.path(), &["mcp", "--list-tools"], 0);
    let tools = listed["tools"].as_array().unwrap();
    let names: BTreeSet<&str> = tools.iter().filter_map(|t| t["name"].as_str()).collect();
    let expected: BTreeSet<&str> = [
        "sandbox_create",
        "sandbox_run_code",
        "sandbox_exec",
        "sandbox_files_read",
        "sandbox_files_write",
        "sandbox_files_list",
        "sandbox_list",
        "sandbox_pause",
        "sandbox_resume",
        "sandbox_stop",
        "sandbox_remove",
    ]
    .into();
    assert_eq!(names, expected);
    for tool in tools {
        let input = &tool["inputSchema"];
        assert_eq!(input["additionalProperties"], false, "{tool}");
        assert_eq!(tool["outputSchema"]["type"], "object", "{tool}");
        assert!(
            tool["description"].as_str().is_some_and(|d| d.len() < 300),
            "{tool}"
        );
    }
    let exec = tools.iter().find(|t| t["name"] == "sandbox_exec").unwrap();
    assert_eq!(exec["inputSchema"]["properties"]["command"]["minItems"], 1);
    assert_eq!(
        exec["inputSchema"]["properties"]["command"]["maxItems"],
        256
    );
    let bytes = serde_json::to_vec(&listed).unwrap().len();
    println!("tools/list: {} tools, {bytes} bytes", tools.len());
    assert!(bytes < 20_000, "tools/list is {bytes} bytes");
    // A server is started with pinned images only.
    let unpinned = guest::mvm_json(
        home.path(),
        &["mcp", "--allow-image", "registry.example.com/app:latest"],
        65,
    );
    assert_eq!(unpinned["error"]["code"], "MCP001", "{unpinned}");
}

#[test]
fn the_python_mcp_client_drives_real_sandboxes() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let fixture = fixture();
    let python = support::python_venv("mcp-venv", &[PYTHON_MCP]);
    let mut suite = Command::new(&python);
    suite.arg(repo().join("tests/mcp/suite.py"));
    let out = fixture.env(&mut suite).output().unwrap();
    let left = fixture.clean();
    assert!(out.status.success(), "{}", describe(&out));
    assert!(left.is_empty(), "the suite left VMs behind: {left:?}");
    assert!(text(&out.stdout).contains("python mcp client: ok"));

    // Every call is on the audit chain: the tool and its arguments' digest, not their values.
    let audit = guest::mvm_json(&fixture.home(), &["audit", "tail", "-n", "1000"], 0).to_string();
    assert!(audit.contains("\"mcp.call\""), "{audit}");
    assert!(audit.contains("sandbox_run_code"), "{audit}");
    assert!(audit.contains("arguments_sha256"), "{audit}");
    assert!(
        !audit.contains("one shot"),
        "an argument's value was audited"
    );
}

#[test]
fn the_typescript_mcp_client_and_the_inspector_drive_real_sandboxes() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let fixture = fixture();
    // The locked clients, installed where the test target keeps its files.
    let project = Path::new(env!("CARGO_TARGET_TMPDIR")).join("mcp-node");
    std::fs::create_dir_all(&project).unwrap();
    for file in ["package.json", "package-lock.json", "suite.mjs"] {
        std::fs::copy(repo().join("tests/mcp").join(file), project.join(file)).unwrap();
    }
    let installed = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--ignore-scripts"])
        .current_dir(&project)
        .output()
        .unwrap();
    assert!(
        installed.status.success(),
        "npm ci: {}",
        describe(&installed)
    );

    let mut suite = Command::new("node");
    suite.arg("suite.mjs").current_dir(&project);
    let out = fixture.env(&mut suite).output().unwrap();
    let left = fixture.clean();
    assert!(out.status.success(), "{}", describe(&out));
    assert!(left.is_empty(), "the suite left VMs behind: {left:?}");
    assert!(text(&out.stdout).contains("typescript mcp client: ok"));

    // The Inspector's CLI lists the tools (headless: no browser, no port).
    let mut inspector = Command::new(project.join("node_modules/.bin/mcp-inspector"));
    inspector.args(["--cli", "-q", "--format", "json", "-e"]);
    inspector.arg(format!("MVM_HOME={}", fixture.home().display()));
    inspector
        .arg(env!("CARGO_BIN_EXE_mvm"))
        .args([
            "mcp",
            "--allow-image",
            &fixture.image,
            "--method",
            "tools/list",
        ])
        .current_dir(&project);
    let listed = inspector.output().unwrap();
    assert!(listed.status.success(), "{}", describe(&listed));
    let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(
        listed["result"]["tools"].as_array().map(Vec::len),
        Some(11),
        "{listed}"
    );
}

/// The agent tool contract from the command line: each failure class with its exit status,
/// and each retention choice honoured.
#[test]
fn tool_run_keeps_its_contract() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let fixture = fixture();
    let default = ["--default-image", fixture.image.as_str()];

    // Validation: an unknown field, nothing to run. No sandbox is made.
    for bad in [
        json!({"language": "shell", "command": ["true"], "priority": 1}),
        json!({"language": "shell"}),
        json!({"language": "cobol", "command": ["true"]}),
    ] {
        let (out, response) = fixture.tool_run(&default, &bad);
        assert_eq!(out.status.code(), Some(65), "{}", describe(&out));
        assert_eq!(response["ok"], false);
        assert_eq!(response["error"]["class"], "validation", "{response}");
        assert_eq!(response["error"]["code"], "MCP001", "{response}");
    }
    // Policy: a path outside /tmp, an image not allowed.
    for (bad, code) in [
        (
            json!({"language": "shell", "files": [{"path": "../../etc/profile", "content": "x"}]}),
            "MCP001",
        ),
        (
            json!({"language": "shell", "image": fixture.denied, "command": ["true"]}),
            "MCP002",
        ),
    ] {
        let (out, response) = fixture.tool_run(&default, &bad);
        assert_eq!(out.status.code(), Some(77), "{}", describe(&out));
        assert_eq!(response["error"]["class"], "policy", "{response}");
        assert_eq!(response["error"]["code"], code, "{response}");
    }
    // Guest: an allowed image that cannot be built.
    let missing = format!("oci:/nonexistent@sha256:{}", "0".repeat(64));
    let (out, response) = fixture.tool_run(
        &["--allow-image", &missing],
        &json!({"language": "shell", "image": missing, "command": ["true"]}),
    );
    assert_eq!(out.status.code(), Some(70), "{}", describe(&out));
    assert_eq!(response["error"]["class"], "guest", "{response}");
    assert!(
        fixture.clean().is_empty(),
        "a request that could not start left a VM"
    );

    // Files go under /tmp/work, where the command runs; the first file is the program. The
    // sandbox is destroyed after; the receipt stays.
    let (out, response) = fixture.tool_run(
        &default,
        &json!({
            "language": "shell",
            "files": [
                {"path": "main.sh", "content": "cat data/in.txt; pwd; echo err >&2; exit 5"},
                {"path": "data/in.txt", "content": "hello\n"}
            ]
        }),
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(response["ok"], true, "{response}");
    assert_eq!(response["exit_code"], 5, "{response}");
    assert_eq!(response["stdout"], "hello\n/tmp/work\n", "{response}");
    assert_eq!(response["stderr"], "err\n", "{response}");
    assert_eq!(response["retention"], "destroy", "{response}");
    assert!(response.get("error").is_none(), "{response}");
    let receipt = response["audit_id"].as_str().unwrap();
    let receipt = receipt.strip_prefix("sha256:").unwrap();
    assert!(fixture
        .home()
        .join("receipts")
        .join(format!("{receipt}.json"))
        .is_file());
    assert!(fixture.vms().is_empty(), "destroy left {:?}", fixture.vms());

    // Timeout: the command is killed, the class says so.
    let (out, response) = fixture.tool_run(
        &default,
        &json!({"language": "shell", "command": ["sleep", "30"], "timeout_seconds": 1}),
    );
    assert_eq!(out.status.code(), Some(124), "{}", describe(&out));
    assert_eq!(response["timed_out"], true, "{response}");
    assert_eq!(response["error"]["class"], "timeout", "{response}");
    assert!(fixture.vms().is_empty());

    // Guest (or transport): the sandbox goes away under its running command (removed from
    // outside).
    let child = fixture.tool_start(
        &default,
        &json!({"language": "shell", "command": ["sh", "-c", ": > /tmp/started; sleep 30"]}),
    );
    let name = fixture.started();
    // The request removes its sandbox once its command failed, which may race this removal:
    // one of the two removes it.
    let _ = guest::mvm(&fixture.home(), &["rm", "--force", &name]);
    let out = child.wait_with_output().unwrap();
    let response: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(response["ok"], false, "{response}");
    // The runner answers the command "the VM is stopping" (AGENT103), or its channel closes
    // first.
    let failed = (out.status.code(), response["error"]["class"].as_str());
    assert!(
        matches!(
            failed,
            (Some(70), Some("guest")) | (Some(74), Some("transport"))
        ),
        "{}",
        describe(&out)
    );
    fixture.wait_empty();

    // Transport: the sandbox's runner is killed under the running command; its channel
    // closes. The request removes what is left.
    let child = fixture.tool_start(
        &default,
        &json!({"language": "shell", "command": ["sh", "-c", ": > /tmp/started; sleep 30"]}),
    );
    let name = fixture.started();
    let runner = fixture.state(&name)["runner_pid"].as_i64().unwrap();
    let killed = Command::new("kill")
        .args(["-KILL", &runner.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = child.wait_with_output().unwrap();
    let response: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(74), "{}", describe(&out));
    assert_eq!(response["error"]["class"], "transport", "{response}");
    fixture.wait_empty();

    // Cleanup: the command ran, but its sandbox could not be saved cold as asked (the host's
    // record of the VM's saved generations is not a file). The result stands, the sandbox is
    // kept running, and the response says what went wrong.
    let child = fixture.tool_start(
        &default,
        &json!({
            "language": "shell",
            "command": ["sh", "-c", ": > /tmp/started; sleep 5; echo done"],
            "state": {"retention": "cold"}
        }),
    );
    let name = fixture.started();
    let vm = fixture.state(&name)["vm"].as_str().unwrap().to_string();
    let obstacle = fixture.home().join("ledger").join("cold").join(&vm);
    std::fs::create_dir_all(obstacle.join("not-a-generation")).unwrap();
    let out = child.wait_with_output().unwrap();
    std::fs::remove_dir_all(&obstacle).unwrap();
    let response: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(75), "{}", describe(&out));
    assert_eq!(response["ok"], true, "{response}");
    assert_eq!(response["exit_code"], 0, "{response}");
    assert_eq!(response["stdout"], "done\n", "{response}");
    assert_eq!(response["error"]["class"], "cleanup", "{response}");
    assert_eq!(response["error"]["code"], "MCP006", "{response}");
    let vms = fixture.vms();
    assert_eq!(vms.len(), 1, "{vms:?}");
    assert_eq!(vms[0]["phase"], "running", "{vms:?}");
    let _ = guest::mvm(&fixture.home(), &["rm", "--force", &name]);

    // Stop and cold keep the sandbox, stopped or saved.
    for (retention, phase) in [("stop", "stopped"), ("cold", "cold")] {
        let (out, response) = fixture.tool_run(
            &default,
            &json!({"language": "shell", "command": ["true"], "state": {"retention": retention}}),
        );
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
        assert_eq!(response["retention"], retention, "{response}");
        let vms = fixture.vms();
        assert_eq!(vms.len(), 1, "{vms:?}");
        assert_eq!(vms[0]["name"], response["sandbox_id"], "{vms:?}");
        assert_eq!(vms[0]["phase"], phase, "{vms:?}");
        let _ = guest::mvm(
            &fixture.home(),
            &["rm", "--force", vms[0]["name"].as_str().unwrap()],
        );
    }
    assert!(fixture.clean().is_empty(), "the contract tests left VMs");
}

/// `python` and `node` requests in a real distribution's image (Debian's `python3` and
/// `nodejs`): the first file is run with the language's interpreter, in `/tmp/work` beside
/// the request's other files.
#[test]
fn python_and_node_requests_run_in_a_real_distribution() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let fixture = fixture();
    let debian = &support::debian::bookworm().reference;
    let python = "import json, sys\n\
                  data = json.load(open('data.json'))\n\
                  print(json.dumps({'python': sys.version_info[0], 'sum': sum(data)}))\n";
    let node = "const data = JSON.parse(require('fs').readFileSync('data.json'));\n\
                console.log(JSON.stringify({node: typeof process.versions.node, \
                sum: data.reduce((a, b) => a + b, 0)}));\n";
    for (language, main, program, expected) in [
        (
            "python",
            "main.py",
            python,
            "{\"python\": 3, \"sum\": 42}\n",
        ),
        (
            "node",
            "main.js",
            node,
            "{\"node\":\"string\",\"sum\":42}\n",
        ),
    ] {
        let (out, response) = fixture.tool_run(
            &["--allow-image", debian],
            &json!({
                "language": language,
                "image": debian,
                "files": [
                    {"path": main, "content": program},
                    {"path": "data.json", "content": "[1, 2, 39]"}
                ]
            }),
        );
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
        assert_eq!(response["exit_code"], 0, "{response}");
        assert_eq!(response["stdout"], expected, "{language}: {response}");
    }
    assert!(fixture.clean().is_empty(), "destroy left a VM");
}
