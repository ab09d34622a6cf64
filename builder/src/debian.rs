//! Debian packages from this host's apt, for the guest kernel ([`crate::kernel`]) and the
//! builder VM's image ([`crate::builder_image`]).
//!
//! apt checks what it downloads against the archive's signed Release files; mvm then pins each
//! package by the sha256 of its `.deb` in a manifest of its own. Packages are unpacked with
//! `dpkg-deb`, never installed: no maintainer script runs.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use mvm_ir::digest::sha256_prefixed;
use serde::{Deserialize, Serialize};

/// Why apt or dpkg-deb could not give a package.
#[derive(Debug, thiserror::Error)]
pub enum DebianError {
    /// A tool (apt-get, apt-cache, dpkg-deb) failed or is missing.
    #[error("{tool}: {reason}")]
    Tool {
        /// The command.
        tool: String,
        /// Its failure.
        reason: String,
    },
    /// A package name that is not one, or a package that is not what was asked for.
    #[error("{0}")]
    BadPackage(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The failure.
        #[source]
        source: io::Error,
    },
}

/// One downloaded package, pinned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebPin {
    /// Its name.
    pub package: String,
    /// Its version.
    pub version: String,
    /// `amd64` or `all`.
    pub architecture: String,
    /// `sha256:` of the `.deb`.
    pub sha256: String,
    /// Its size in bytes.
    pub size: u64,
}

/// Runs `command`; its output when it succeeded.
pub fn run(tool: &str, command: &mut Command) -> Result<Output, DebianError> {
    let output = command.output().map_err(|e| DebianError::Tool {
        tool: tool.to_string(),
        reason: format!("cannot run it ({e}); this needs Debian's apt-get and dpkg-deb"),
    })?;
    if !output.status.success() {
        return Err(DebianError::Tool {
            tool: tool.to_string(),
            reason: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(output)
}

/// Refuses what is not a Debian package name (it becomes an argument of apt).
pub fn check_name(package: &str) -> Result<(), DebianError> {
    let valid = package.len() >= 2
        && package.as_bytes()[0].is_ascii_alphanumeric()
        && package
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b));
    match valid {
        true => Ok(()),
        false => Err(DebianError::BadPackage(format!(
            "{package:?} is not a Debian package name"
        ))),
    }
}

/// `roots` and every package they depend on (Depends and Pre-Depends, recursively, as apt
/// resolves them here), sorted.
pub fn depends_closure(roots: &[&str]) -> Result<Vec<String>, DebianError> {
    for root in roots {
        check_name(root)?;
    }
    let output = run(
        "apt-cache depends",
        mvm_ir::env::command("apt-cache")
            .args(["depends", "--recurse", "--no-recommends", "--no-suggests"])
            .args([
                "--no-conflicts",
                "--no-breaks",
                "--no-replaces",
                "--no-enhances",
            ])
            .args(roots),
    )?;
    let closure = packages_of_depends(&String::from_utf8_lossy(&output.stdout));
    match roots.iter().find(|root| !closure.contains(**root)) {
        Some(missing) => Err(DebianError::BadPackage(format!(
            "apt knows no package {missing} (apt-get update?)"
        ))),
        None => Ok(closure.into_iter().collect()),
    }
}

/// The real packages `apt-cache depends --recurse` lists: its unindented lines, without the
/// virtual packages (`<name>`, whose providers it lists too) and other architectures' names.
fn packages_of_depends(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|line| !line.starts_with([' ', '<']) && !line.contains(':'))
        .map(str::trim)
        .filter(|name| check_name(name).is_ok())
        .map(str::to_string)
        .collect()
}

/// Downloads `packages` into `dir` with one `apt-get download`; each one's `.deb`.
pub fn download(packages: &[String], dir: &Path) -> Result<BTreeMap<String, PathBuf>, DebianError> {
    for package in packages {
        check_name(package)?;
    }
    run(
        "apt-get download",
        mvm_ir::env::command("apt-get")
            .args(["download", "-q"])
            .args(packages)
            .current_dir(dir),
    )?;
    let mut debs = BTreeMap::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        // `NAME_VERSION_ARCH.deb`: a package name has no `_`.
        if let Some((package, _)) = name.strip_suffix(".deb").and_then(|n| n.split_once('_')) {
            debs.insert(package.to_string(), path.clone());
        }
    }
    match packages.iter().find(|p| !debs.contains_key(*p)) {
        Some(missing) => Err(DebianError::BadPackage(format!(
            "apt-get download {missing} left no .deb"
        ))),
        None => Ok(debs),
    }
}

/// A control field of `deb`.
pub fn field(deb: &Path, name: &str) -> Result<String, DebianError> {
    let output = run(
        "dpkg-deb",
        mvm_ir::env::command("dpkg-deb")
            .arg("-f")
            .arg(deb)
            .arg(name),
    )?;
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// `deb` pinned: checked to be `package` for amd64 (or for any architecture).
pub fn pin(package: &str, deb: &Path) -> Result<DebPin, DebianError> {
    let bytes = fs::read(deb).map_err(io_err(deb))?;
    let pin = DebPin {
        package: field(deb, "Package")?,
        version: field(deb, "Version")?,
        architecture: field(deb, "Architecture")?,
        sha256: sha256_prefixed(&bytes),
        size: bytes.len() as u64,
    };
    if pin.package != package || !["amd64", "all"].contains(&pin.architecture.as_str()) {
        return Err(DebianError::BadPackage(format!(
            "{} holds {} for {}, not {package} for amd64",
            deb.display(),
            pin.package,
            pin.architecture
        )));
    }
    Ok(pin)
}

/// The files of `deb`, as one uncompressed tar stream (`dpkg-deb --fsys-tarfile`).
pub fn files_tar(deb: &Path) -> Result<Vec<u8>, DebianError> {
    let output = run(
        "dpkg-deb --fsys-tarfile",
        mvm_ir::env::command("dpkg-deb")
            .arg("--fsys-tarfile")
            .arg(deb),
    )?;
    Ok(output.stdout)
}

/// An I/O error on `path`.
pub fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DebianError + '_ {
    move |source| DebianError::Io {
        path: path.display().to_string(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_closure_is_the_real_packages_apt_lists() {
        let text = "nix-bin\n  Depends: bzip2\n  Depends: <awk>\n    mawk\nbzip2\n  Depends: libc6\n<awk>\nmawk\nlibc6:i386\nlibc6\n";
        let got: Vec<String> = packages_of_depends(text).into_iter().collect();
        assert_eq!(got, ["bzip2", "libc6", "mawk", "nix-bin"]);
    }

    #[test]
    fn only_package_names_reach_apt() {
        for bad in [
            "", "a", "-rf", "Nix", "nix bin", "nix;rm", "../x", "nix_bin",
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        for good in ["nix-bin", "libstdc++6", "perl-modules-5.36", "g++"] {
            assert!(check_name(good).is_ok(), "{good:?}");
        }
    }

    /// The real apt: the builder's packages resolve, and one downloads, pinned.
    #[test]
    fn a_real_package_resolves_downloads_and_pins() {
        let closure = depends_closure(&["busybox-static"])
            .expect("apt-cache depends busybox-static (needs Debian's apt and its package lists)");
        assert!(
            closure.contains(&"busybox-static".to_string()),
            "{closure:?}"
        );
        let dir = tempfile::tempdir().unwrap();
        let debs = download(&["busybox-static".to_string()], dir.path()).unwrap();
        let pinned = pin("busybox-static", &debs["busybox-static"]).unwrap();
        assert_eq!(pinned.architecture, "amd64");
        assert!(
            pinned.sha256.starts_with("sha256:") && pinned.size > 100_000,
            "{pinned:?}"
        );
        let tar = files_tar(&debs["busybox-static"]).unwrap();
        let mut archive = tar::Archive::new(tar.as_slice());
        let names: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert!(names.iter().any(|n| n == "./bin/busybox"), "{names:?}");
        assert!(pin("libc6", &debs["busybox-static"]).is_err());
    }
}
