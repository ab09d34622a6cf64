//! The rules of the crate graph (docs/architecture.md), read from `cargo metadata`: what may
//! depend on what. A dependency added against them fails here, not in review.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use serde_json::Value;

/// Each workspace crate's normal (not dev, not build) dependencies among the workspace's
/// crates, by package name.
fn workspace_graph() -> BTreeMap<String, BTreeSet<String>> {
    let output = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--manifest-path"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: Value = serde_json::from_slice(&output.stdout).unwrap();
    let members: BTreeSet<&str> = metadata["workspace_members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_str().unwrap())
        .collect();
    let name_of: BTreeMap<&str, &str> = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    let mut graph = BTreeMap::new();
    for node in metadata["resolve"]["nodes"].as_array().unwrap() {
        let id = node["id"].as_str().unwrap();
        if !members.contains(id) {
            continue;
        }
        let deps = node["deps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|dep| {
                let normal = dep["dep_kinds"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|kind| kind["kind"].is_null());
                normal && members.contains(dep["pkg"].as_str().unwrap())
            })
            .map(|dep| name_of[dep["pkg"].as_str().unwrap()].to_string())
            .collect();
        graph.insert(name_of[id].to_string(), deps);
    }
    graph
}

/// Every workspace crate `name` depends on, directly or not.
fn reaches(graph: &BTreeMap<String, BTreeSet<String>>, name: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![name.to_string()];
    while let Some(next) = todo.pop() {
        for dep in &graph[&next] {
            if seen.insert(dep.clone()) {
                todo.push(dep.clone());
            }
        }
    }
    seen
}

#[test]
fn the_vmm_stands_alone_and_the_runner_builds_on_it() {
    let graph = workspace_graph();
    assert!(graph.contains_key("mvm-vmm"), "{graph:?}");
    assert_eq!(
        reaches(&graph, "mvm-vmm"),
        BTreeSet::new(),
        "mvm-vmm depends on no other crate of mvm (no runner, builder, CLI, agent or IR)"
    );
    assert!(graph["mvm-runner"].contains("mvm-vmm"), "{graph:?}");
}

#[test]
fn the_runner_links_no_builder_no_cli_and_no_agent() {
    let graph = workspace_graph();
    let runner = reaches(&graph, "mvm-runner");
    for forbidden in ["mvm-builder", "mvm-nix", "mvm", "mvm-agent"] {
        assert!(
            !runner.contains(forbidden),
            "mvm-runner reaches {forbidden}: {runner:?}"
        );
    }
}

#[test]
fn the_api_builds_on_the_runner_and_knows_nothing_of_builds() {
    let graph = workspace_graph();
    let api = reaches(&graph, "mvm-api");
    assert!(api.contains("mvm-runner"), "{api:?}");
    // Images are built through the `Launcher` the CLI gives it.
    for forbidden in ["mvm-builder", "mvm-nix", "mvm", "mvm-agent"] {
        assert!(
            !api.contains(forbidden),
            "mvm-api reaches {forbidden}: {api:?}"
        );
    }
    // And the runner stays without an HTTP server.
    assert!(!reaches(&graph, "mvm-runner").contains("mvm-api"));
}

#[test]
fn the_mcp_server_builds_on_the_api_and_never_on_the_cli() {
    let graph = workspace_graph();
    let mcp = reaches(&graph, "mvm-mcp");
    assert!(
        mcp.contains("mvm-api") && mcp.contains("mvm-runner"),
        "{mcp:?}"
    );
    // Its sandboxes start through the API's `Launcher`: it never runs `mvm`.
    for forbidden in ["mvm-builder", "mvm-nix", "mvm", "mvm-agent"] {
        assert!(
            !mcp.contains(forbidden),
            "mvm-mcp reaches {forbidden}: {mcp:?}"
        );
    }
    assert!(!reaches(&graph, "mvm-runner").contains("mvm-mcp"));
}

/// The runner's top-level modules each one imports from (`crate::<module>` in its code, not
/// its comments), by the module's name.
fn runner_module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("runner/src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut files = vec![src.clone()];
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        if path.extension().is_none_or(|ext| ext != "rs") {
            continue;
        }
        let relative = path.strip_prefix(&src).unwrap();
        let first = relative.components().next().unwrap().as_os_str();
        let module = first.to_string_lossy().trim_end_matches(".rs").to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        let code = std::fs::read_to_string(&path).unwrap();
        let imports = graph.entry(module.clone()).or_default();
        for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
            for (at, _) in line.match_indices("crate::") {
                let name: String = line[at + "crate::".len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name != module {
                    imports.insert(name);
                }
            }
        }
    }
    graph
}

#[test]
fn no_module_of_the_runner_imports_from_one_that_imports_it() {
    let graph = runner_module_graph();
    for module in ["backend", "cold", "control", "launch"] {
        assert!(graph.contains_key(module), "{graph:?}");
    }
    for (module, imports) in &graph {
        let above = reaches(&graph, module);
        assert!(
            !above.contains(module),
            "{module} imports from a module that imports it: {module} -> {imports:?}; {graph:?}"
        );
    }
    // The order the backend seam sets: backend <- cold <- control <- launch.
    let order = ["backend", "cold", "control", "launch"];
    for (i, lower) in order.iter().enumerate() {
        for upper in &order[i + 1..] {
            assert!(
                !reaches(&graph, lower).contains(*upper),
                "{lower} reaches {upper}: {graph:?}"
            );
        }
    }
}
