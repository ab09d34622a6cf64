//! The real Nix (Debian's `nix-bin`) run against a private store in a temporary directory,
//! for checking mvm's Nix formats against it. mvm-nix's tests use it, and the CLI's
//! `tests/nix.rs` includes this file by path.
//!
//! The store is a chroot store (`--store DIR`): its files live under `DIR/nix/store` while
//! its paths still read `/nix/store/…`, so nothing touches the host's `/nix` and each test
//! starts empty. Every command gets [`NIX_CONFIG`], and works offline as root or not.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use mvm_nix::StorePath;

/// Settings for every Nix command: no build users (the `nixbld` group does not exist here),
/// no binary caches (there is no network; an unreachable cache costs seconds a query), and
/// the `nix` command for `nix show-derivation`.
pub const NIX_CONFIG: &str =
    "build-users-group =\nsubstituters =\nexperimental-features = nix-command\n";

/// A private Nix store, and a directory for the expressions given to it.
pub struct RealNix {
    store_root: tempfile::TempDir,
    work: tempfile::TempDir,
}

impl RealNix {
    /// A fresh store, or `None` with the reason printed when Nix is not installed. In CI (`CI`
    /// set) a missing Nix fails the test instead: `scripts/deps --test` installs it there.
    pub fn find() -> Option<Self> {
        if Command::new("nix-instantiate")
            .arg("--version")
            .output()
            .is_err()
        {
            let reason = "nix-instantiate is not installed, so mvm's Nix formats cannot be \
                          checked against it (install Debian's nix-bin: scripts/deps --test)";
            assert!(std::env::var_os("CI").is_none(), "{reason}");
            eprintln!("skipping: {reason}");
            return None;
        }
        Some(Self {
            store_root: tempfile::tempdir().unwrap(),
            work: tempfile::tempdir().unwrap(),
        })
    }

    /// The directory the store lives under (`<root>/nix/store`).
    pub fn store_root(&self) -> &Path {
        self.store_root.path()
    }

    /// Where the object `path` lives on disk.
    pub fn file(&self, path: &StorePath) -> PathBuf {
        self.store_root().join("nix/store").join(path.base_name())
    }

    /// Runs a Nix program and returns its standard output; fails the test if it fails.
    pub fn run<S: AsRef<OsStr>>(&self, program: &str, args: &[S]) -> Vec<u8> {
        let out = Command::new(program)
            .args(args)
            .env("NIX_CONFIG", NIX_CONFIG)
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {:?}: {}\n{}",
            args.iter().map(|a| a.as_ref()).collect::<Vec<_>>(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Runs a Nix program on the private store.
    pub fn run_on_store(&self, program: &str, args: &[&OsStr]) -> Vec<u8> {
        let mut all = vec![OsStr::new("--store"), self.store_root().as_os_str()];
        all.extend_from_slice(args);
        self.run(program, &all)
    }

    /// `nix-instantiate` of the expression `expr` (written to `<label>.nix`): the `.drv`.
    pub fn instantiate(&self, label: &str, expr: &str) -> StorePath {
        let file = self.work.path().join(format!("{label}.nix"));
        std::fs::write(&file, expr).unwrap();
        let out = self.run_on_store("nix-instantiate", &[file.as_os_str()]);
        single_path(&out)
    }

    /// `nix-store --add PATH`.
    pub fn add(&self, path: &Path) -> StorePath {
        single_path(&self.run_on_store("nix-store", &[OsStr::new("--add"), path.as_os_str()]))
    }

    /// `nix-store -q --outputs DRV`.
    pub fn outputs(&self, drv: &StorePath) -> BTreeSet<StorePath> {
        self.query("--outputs", drv)
    }

    /// `nix-store -q --references PATH`.
    pub fn references(&self, path: &StorePath) -> BTreeSet<StorePath> {
        self.query("--references", path)
    }

    fn query(&self, what: &str, path: &StorePath) -> BTreeSet<StorePath> {
        let path = path.to_string();
        let out = self.run_on_store(
            "nix-store",
            &[OsStr::new("-q"), what.as_ref(), path.as_ref()],
        );
        paths(&out).collect()
    }
}

fn paths(out: &[u8]) -> impl Iterator<Item = StorePath> + '_ {
    std::str::from_utf8(out)
        .unwrap()
        .lines()
        .map(|line| StorePath::parse(line).unwrap_or_else(|e| panic!("{line}: {e}")))
}

fn single_path(out: &[u8]) -> StorePath {
    let all: Vec<StorePath> = paths(out).collect();
    assert_eq!(all.len(), 1, "{}", String::from_utf8_lossy(out));
    all.into_iter().next().unwrap()
}
