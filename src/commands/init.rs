//! `mvm init`: a new workload from a template — the files of `templates/NAME`, embedded in the
//! binary at build time (see `build.rs`), so no Nix is needed and nothing can drift from what
//! `nix flake init -t <mvm>#NAME` copies. Never overwrites: if any file is already there,
//! nothing is written.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use clap::Args;
use mvm_ir::fsutil::atomic_create;
use mvm_ir::load::{parse_workload, Syntax};
use mvm_ir::validate::{is_identifier, validate};
use serde_json::json;

use super::{coded_as, coded_io};
use crate::output::Output;

/// Every template's files: `(name, [(relative path, contents)])`, sorted.
const EMBEDDED: &[(&str, &[(&str, &str)])] = include!(concat!(env!("OUT_DIR"), "/templates.rs"));

/// What each template is, and the workload id its files use (replaced by `--name`). The same
/// descriptions are in `flake.nix`'s `templates`; a test holds them equal.
const ABOUT: &[(&str, &str, &str)] = &[
    (
        "nix",
        "nix-workload",
        "mvm workload declared in Nix with mkWorkload (no mvm.toml)",
    ),
    (
        "node",
        "node-service",
        "mvm workload: a Node.js HTTP service on a forwarded port",
    ),
    (
        "oci",
        "oci-app",
        "mvm workload: an OCI image pinned by digest",
    ),
    (
        "python",
        "python-tool",
        "mvm workload: a Python tool with no network but the package index",
    ),
];

/// The template `mvm init` uses without `--template` (the flake's `templates.default`).
const DEFAULT_TEMPLATE: &str = "python";

/// Scaffold a new workload from a template: its declaration (mvm.toml or workload.nix), a
/// flake, a README and a CI workflow that publishes the signed plan and provenance.
///
/// Never overwrites: if any of the template's files exists in DIR, nothing is written
/// (INIT002, exit 74). Exit 74 when a directory cannot be made (INIT004) or a file
/// cannot be written; 65 for an unknown template (INIT001) or an invalid --name (INIT003).
#[derive(Debug, Args)]
pub struct InitArgs {
    /// The directory to write into (created if missing).
    #[arg(default_value = ".")]
    dir: PathBuf,
    /// The template (see --list).
    #[arg(short, long, default_value = DEFAULT_TEMPLATE)]
    template: String,
    /// The workload's id, instead of the template's own (1-63 of a-z 0-9 . _ -).
    #[arg(long)]
    name: Option<String>,
    /// List the templates and write nothing.
    #[arg(long, conflicts_with = "name")]
    list: bool,
}

/// One template: its files and what it is.
struct Template {
    name: &'static str,
    id: &'static str,
    description: &'static str,
    files: &'static [(&'static str, &'static str)],
}

fn templates() -> impl Iterator<Item = Template> {
    EMBEDDED.iter().map(|&(name, files)| {
        let &(_, id, description) = ABOUT
            .iter()
            .find(|(n, _, _)| *n == name)
            .unwrap_or(&(name, "", ""));
        Template {
            name,
            id,
            description,
            files,
        }
    })
}

pub fn run(args: InitArgs, out: &Output) -> anyhow::Result<()> {
    if args.list {
        let list: Vec<_> = templates()
            .map(|t| json!({"name": t.name, "id": t.id, "description": t.description, "files": t.files.iter().map(|f| f.0).collect::<Vec<_>>()}))
            .collect();
        out.result(json!({ "templates": list }), || {
            templates()
                .map(|t| {
                    let default = if t.name == DEFAULT_TEMPLATE {
                        " (default)"
                    } else {
                        ""
                    };
                    format!("{:<8} {}{default}", t.name, t.description)
                })
                .collect::<Vec<_>>()
                .join("\n")
        });
        return Ok(());
    }

    let template = templates()
        .find(|t| t.name == args.template)
        .ok_or_else(|| {
            let names: Vec<_> = templates().map(|t| t.name).collect();
            coded_as(
                "INIT001",
                format!(
                    "no template {:?}; the templates are {}",
                    args.template,
                    names.join(", ")
                ),
            )
        })?;
    let id = match &args.name {
        Some(name) if !is_identifier(name) => {
            return Err(coded_as(
                "INIT003",
                format!("--name {name:?} is not a workload id: 1-63 of [a-z0-9._-], starting with a letter or digit"),
            ))
        }
        Some(name) => name.as_str(),
        None => template.id,
    };
    let files = render(&template, id)?;
    let written = write_all(&args.dir, &files)?;

    let dir = args.dir.display().to_string();
    out.result(
        json!({"ok": true, "template": template.name, "id": id, "dir": dir, "files": written}),
        || {
            let declaration = super::declaration::FILE_NAMES
                .iter()
                .find(|name| files.iter().any(|(p, _)| p == *name))
                .map(|name| format!("mvm ir validate {}", args.dir.join(name).display()))
                .unwrap_or_default();
            format!(
                "wrote workload {id} from template {} into {dir}:\n  {}\nnext: {declaration}",
                template.name,
                written.join("\n  ")
            )
        },
    );
    Ok(())
}

/// The template's files with its workload id replaced by `id`; a declaration that would not
/// validate is refused before anything is written.
fn render(template: &Template, id: &str) -> anyhow::Result<Vec<(&'static str, String)>> {
    let files: Vec<(&str, String)> = template
        .files
        .iter()
        .map(|&(path, text)| (path, text.replace(template.id, id)))
        .collect();
    for (path, text) in &files {
        if *path == "mvm.toml" {
            let workload = parse_workload(text.as_bytes(), Syntax::Toml)
                .map_err(|e| coded_as("INIT003", format!("mvm.toml with id {id:?}: {e}")))?;
            if validate(&workload).has_errors() || workload.id != id {
                return Err(coded_as(
                    "INIT003",
                    format!("mvm.toml with id {id:?} would not validate"),
                ));
            }
        }
    }
    Ok(files)
}

/// Writes every file under `dir`, each atomically and only where nothing is; checks them all
/// first, so an existing file means nothing is written. Returns the paths written.
fn write_all(dir: &Path, files: &[(&'static str, String)]) -> anyhow::Result<Vec<String>> {
    let existing: Vec<&str> = files
        .iter()
        .map(|(path, _)| *path)
        .filter(|path| fs::symlink_metadata(dir.join(path)).is_ok())
        .collect();
    if !existing.is_empty() {
        return Err(exists(dir, &existing));
    }
    let mut written = Vec::new();
    for (path, text) in files {
        let target = dir.join(path);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)
                .map_err(|e| coded_io("INIT004", format!("creating {}: {e}", parent.display())))?;
        }
        match atomic_create(&target, text.as_bytes(), 0o644) {
            Ok(()) => written.push(path.to_string()),
            // Something appeared since the check: keep it, and say what was written.
            Err(mvm_ir::Error::Io { source, .. }) if source.kind() == ErrorKind::AlreadyExists => {
                let err = exists(dir, &[path]);
                return Err(if written.is_empty() {
                    err
                } else {
                    err.context(format!("already written: {}", written.join(", ")))
                });
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(written)
}

fn exists(dir: &Path, paths: &[&str]) -> anyhow::Error {
    coded_io(
        "INIT002",
        format!(
            "{} already in {}; mvm init never overwrites (remove them or pick another directory)",
            paths.join(", "),
            dir.display()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_embedded_template_is_described_and_has_its_id() {
        let embedded: Vec<_> = EMBEDDED.iter().map(|t| t.0).collect();
        let described: Vec<_> = ABOUT.iter().map(|t| t.0).collect();
        assert_eq!(embedded, described);
        assert!(embedded.contains(&DEFAULT_TEMPLATE));
        for t in templates() {
            assert!(
                t.files.iter().any(|(_, text)| text.contains(t.id)),
                "{}: no file names the workload id {}",
                t.name,
                t.id
            );
        }
    }

    #[test]
    fn a_name_replaces_the_template_id_everywhere() {
        let python = templates().find(|t| t.name == "python").unwrap();
        let files = render(&python, "my-tool").unwrap();
        assert!(files.iter().all(|(_, text)| !text.contains("python-tool")));
        let toml = &files.iter().find(|f| f.0 == "mvm.toml").unwrap().1;
        assert!(toml.contains("id = \"my-tool\""), "{toml}");
    }
}
