//! Embeds `templates/` into the `mvm` binary, so `mvm init` writes exactly the files that
//! `nix flake init -t` copies, from the one copy in the repository, with no Nix installed.
//! Writes `$OUT_DIR/templates.rs`: every template directory's files, sorted, as
//! `(relative path, include_str!(absolute path))`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::{env, fs};

fn files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        let kind = fs::symlink_metadata(&path).unwrap().file_type();
        if kind.is_dir() {
            files(root, &path, out);
        } else if kind.is_file() {
            out.push(path.strip_prefix(root).unwrap().to_path_buf());
        } else {
            panic!(
                "{}: templates hold only files and directories",
                path.display()
            );
        }
    }
}

fn main() {
    let templates = Path::new(env!("CARGO_MANIFEST_DIR")).join("templates");
    println!("cargo:rerun-if-changed={}", templates.display());
    let mut names: Vec<_> = fs::read_dir(&templates)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    names.sort();

    let mut code = String::from("&[\n");
    for dir in names {
        let name = dir.file_name().unwrap().to_str().unwrap().to_string();
        let mut paths = Vec::new();
        files(&dir, &dir, &mut paths);
        writeln!(code, "    ({name:?}, &[").unwrap();
        for rel in paths {
            let rel = rel.to_str().expect("template file names are UTF-8");
            let abs = dir.join(rel);
            let abs = abs.to_str().unwrap();
            writeln!(code, "        ({rel:?}, include_str!({abs:?})),").unwrap();
        }
        code.push_str("    ]),\n");
    }
    code.push(']');
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("templates.rs");
    fs::write(out, code).unwrap();
}
