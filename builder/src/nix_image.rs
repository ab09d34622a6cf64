//! Nix images: a workload's `nix_packages` realised by the real Nix into a store closure, and
//! that closure as a root filesystem — every path at its own `/nix/store/…` name, and `/bin`
//! linking the packages' programs, as a Nix profile does.
//!
//! Two halves, like OCI images:
//!
//! - [`NixStore::closure`] runs in the `mvm` process (it starts Nix, which the confined worker
//!   may not): `nix-instantiate` of each attribute path of the package set, each derivation's
//!   output paths computed by mvm-nix and required to be the ones Nix realises
//!   (`nix-store --realise`), the closure (`nix-store -qR`) and each path's NAR hash as Nix
//!   recorded it (`nix-store -q --hash`).
//! - [`stage_closure`] runs in the confined worker: it reads each path from the store
//!   directory, requires mvm-nix's NAR sha256 of it to be the hash Nix recorded, and stages it
//!   into the tree (directories 0555, files 0444 or 0555, owned by root, as in a store).
//!
//! Nix runs with the caller's settings (`NIX_CONFIG`, `nix.conf`): pass `substituters =` there
//! to realise offline. A store other than the system's is a chroot store: `--store DIR`, its
//! files under `DIR/nix/store`, its paths still `/nix/store/…`.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use mvm_ir::{Coded, ErrorClass};
use mvm_nix::derivation::file::{DrvFile, StoreRoot};
use mvm_nix::derivation::hashing::DrvHasher;
use mvm_nix::StorePath;
use serde::{Deserialize, Serialize};

use crate::log_lines::{forward_lines, LogSink};
use crate::tree::{Metadata, NodeId, NodeKind, Tree};

/// The most store paths a closure may have (a large desktop closure has a few thousand).
pub(crate) const MAX_CLOSURE_PATHS: usize = 20_000;

/// Why a Nix image could not be made; its [`Coded::code`] is its stable code.
#[derive(Debug, thiserror::Error)]
pub enum NixImageError {
    /// A Nix program could not be started.
    #[error("cannot run {program}: {source} (install Nix: Debian's nix-bin)")]
    NoNix {
        /// The program.
        program: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Evaluating a package's attribute path failed (no such attribute, an evaluation error).
    #[error("evaluating {attr} in {set}: {message}")]
    Eval {
        /// The attribute path.
        attr: String,
        /// The package set.
        set: String,
        /// What Nix said.
        message: String,
    },
    /// Realising (building) a derivation, or a store query, failed.
    #[error("{what}: {message}")]
    Nix {
        /// What was asked of Nix.
        what: String,
        /// What Nix said.
        message: String,
    },
    /// Nix answered something mvm does not accept (not a store path, an unknown hash form).
    #[error("{0}")]
    Unexpected(String),
    /// A derivation, or a store path's contents, is not what mvm computes: a path Nix realised
    /// that the derivation does not give, or contents whose NAR hash differs from Nix's record.
    #[error("{0}")]
    Mismatch(String),
    /// The closure cannot be an image: two packages provide the same program, a file a root
    /// filesystem cannot hold, too many paths.
    #[error("{0}")]
    Unsupported(String),
    /// A file of the store could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl Coded for NixImageError {
    fn code(&self) -> &str {
        match self {
            NixImageError::NoNix { .. } => "NIXBUILD001",
            NixImageError::Eval { .. } => "NIXBUILD002",
            NixImageError::Nix { .. } | NixImageError::Unexpected(_) => "NIXBUILD003",
            NixImageError::Mismatch(_) => "NIXBUILD004",
            NixImageError::Unsupported(_) => "NIXBUILD005",
            NixImageError::Io { .. } => "NIXBUILD006",
        }
    }

    /// Paths or contents that are not what mvm computes (NIXBUILD004) are an integrity
    /// failure; Nix that cannot run or fails, and unreadable store files (NIXBUILD001, 003,
    /// 006) are I/O; an attribute or closure that cannot be an image is bad input.
    fn class(&self) -> ErrorClass {
        match self {
            NixImageError::Mismatch(_) => ErrorClass::Integrity,
            NixImageError::NoNix { .. }
            | NixImageError::Nix { .. }
            | NixImageError::Unexpected(_)
            | NixImageError::Io { .. } => ErrorClass::Io,
            NixImageError::Eval { .. } | NixImageError::Unsupported(_) => ErrorClass::InvalidInput,
        }
    }
}

/// One package of the workload: its attribute path, derivation and realised outputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NixPackage {
    /// The attribute path in the package set, as the workload names it.
    pub attr: String,
    /// The derivation's store path.
    pub drv: String,
    /// sha256 of the derivation file (its ATerm), hex.
    pub drv_sha256: String,
    /// Its output paths, by output name.
    pub outputs: BTreeMap<String, String>,
}

/// One store path of the closure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClosurePath {
    /// `/nix/store/<hash>-<name>`.
    pub path: String,
    /// sha256 of its NAR serialisation, hex, as Nix recorded it.
    pub nar_sha256: String,
}

/// A realised closure: what the worker stages and provenance records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NixClosure {
    /// The directory the store is under (`/` for the system's store).
    pub store_root: PathBuf,
    /// The workload's packages, in its order.
    pub packages: Vec<NixPackage>,
    /// Every path of the closure, sorted.
    pub paths: Vec<ClosurePath>,
}

impl NixClosure {
    /// `sha256:` over the closure's paths and NAR hashes: the image's identity, as an OCI
    /// image's manifest digest is.
    pub fn digest(&self) -> String {
        let mut listing = String::new();
        for p in &self.paths {
            listing.push_str(&format!("{} sha256:{}\n", p.path, p.nar_sha256));
        }
        mvm_ir::digest::sha256_prefixed(listing.as_bytes())
    }
}

/// A closure realised, and what realising it had to build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Realised {
    /// The closure.
    pub closure: NixClosure,
    /// The packages' outputs that were not in the store before: what this build realised
    /// (none when a store kept from an earlier build has them all).
    pub built: Vec<String>,
}

/// The real Nix, on one store, with one package set.
#[derive(Debug, Clone)]
pub struct NixStore {
    /// `--store DIR`, or none for the system's store.
    store: Option<PathBuf>,
    /// The Nix expression the attribute paths are looked up in (`<nixpkgs>` or a file).
    package_set: String,
    /// Where Nix's log lines go as it writes them, if anywhere.
    log: Option<LogSink>,
}

impl NixStore {
    /// Nix on the store under `store` (none: the system's store), looking packages up in
    /// `package_set` (`<nixpkgs>`, or a file whose value, or the value it returns when called
    /// with no arguments, is the package set).
    pub fn new(store: Option<PathBuf>, package_set: String) -> Self {
        Self {
            store,
            package_set,
            log: None,
        }
    }

    /// Passes the lines Nix writes to its standard error (its build log) to `log` as they come.
    pub fn with_log(self, log: LogSink) -> Self {
        Self {
            log: Some(log),
            ..self
        }
    }

    fn store_root(&self) -> PathBuf {
        self.store.clone().unwrap_or_else(|| PathBuf::from("/"))
    }

    /// Runs a Nix program on the store; its standard output, or what it said on failure.
    fn run(&self, program: &str, args: &[&OsStr]) -> Result<Result<String, String>, NixImageError> {
        let mut command = mvm_ir::env::command(program);
        if let Some(store) = &self.store {
            command.arg("--store").arg(store);
        }
        let no_nix = |source| NixImageError::NoNix {
            program: program.into(),
            source,
        };
        let mut child = command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(no_nix)?;
        // Its log as it comes, on a thread while its output is read; Nix's last lines say what
        // went wrong, its progress lines do not.
        let stderr = child.stderr.take();
        let log = self.log.clone();
        let tail = std::thread::spawn(move || {
            stderr.map_or_else(Vec::new, |stderr| forward_lines(stderr, log.as_ref(), 8))
        });
        let mut stdout = Vec::new();
        let read = child
            .stdout
            .take()
            .map_or(Ok(0), |mut out| out.read_to_end(&mut stdout));
        let status = child.wait().map_err(no_nix)?;
        let tail = tail.join().unwrap_or_default();
        read.map_err(no_nix)?;
        let stdout = String::from_utf8(stdout)
            .map_err(|_| NixImageError::Unexpected(format!("{program} printed non-UTF-8")))?;
        Ok(match status.success() {
            true => Ok(stdout),
            false => Err(tail.join("\n")),
        })
    }

    fn query(&self, what: &str, args: &[&OsStr]) -> Result<String, NixImageError> {
        self.run("nix-store", args)?
            .map_err(|message| NixImageError::Nix {
                what: what.into(),
                message,
            })
    }

    /// Instantiates and realises every package, and returns the closure of their outputs.
    pub fn closure(&self, attrs: &[String]) -> Result<Realised, NixImageError> {
        let root = self.store_root();
        let mut hasher = DrvHasher::new(StoreRoot::new(&root));
        let mut packages = Vec::new();
        let mut built = Vec::new();
        for attr in attrs {
            let drv = self
                .run(
                    "nix-instantiate",
                    &[self.package_set.as_ref(), "-A".as_ref(), attr.as_ref()],
                )?
                .map_err(|message| NixImageError::Eval {
                    attr: attr.clone(),
                    set: self.package_set.clone(),
                    message,
                })?;
            let drv = single_store_path(&drv, "nix-instantiate")?;
            // mvm's own reading of the derivation: the paths it must realise to.
            let drv_file = StoreRoot::new(&root).file(&drv);
            let file = DrvFile::read(&drv_file).map_err(|e| {
                NixImageError::Mismatch(format!("{drv} (the derivation of {attr}): {e}"))
            })?;
            let drv_bytes = fs::read(&drv_file).map_err(|source| NixImageError::Io {
                path: drv_file.display().to_string(),
                source,
            })?;
            let computed = hasher
                .verified_output_paths(&file.derivation)
                .map_err(|e| NixImageError::Mismatch(format!("{drv}: {e}")))?;
            let drv_text = drv.to_string();
            // The outputs the store lacks are what realising builds.
            let output_paths: Vec<String> = computed.values().map(|p| p.to_string()).collect();
            let mut args: Vec<&OsStr> =
                vec!["--check-validity".as_ref(), "--print-invalid".as_ref()];
            args.extend(output_paths.iter().map(OsStr::new));
            let invalid = self.query(&format!("the outputs of {attr} in the store"), &args)?;
            let invalid = store_paths(&invalid, "nix-store --check-validity")?;
            built.extend(invalid.iter().map(ToString::to_string));
            let realised = self.query(
                &format!("realising {attr} ({drv_text})"),
                &["--realise".as_ref(), drv_text.as_ref()],
            )?;
            let realised: BTreeSet<String> = store_paths(&realised, "nix-store --realise")?
                .into_iter()
                .map(|p| p.to_string())
                .collect();
            let outputs: BTreeMap<String, String> = computed
                .iter()
                .map(|(name, path)| (name.clone(), path.to_string()))
                .collect();
            let expected: BTreeSet<String> = outputs.values().cloned().collect();
            if realised != expected {
                return Err(NixImageError::Mismatch(format!(
                    "{attr}: Nix realised {realised:?}, but its derivation {drv_text} gives {expected:?}"
                )));
            }
            packages.push(NixPackage {
                attr: attr.clone(),
                drv: drv_text,
                drv_sha256: hex::encode(mvm_ir::digest::sha256(&drv_bytes)),
                outputs,
            });
        }

        let tops: Vec<String> = packages
            .iter()
            .flat_map(|p| p.outputs.values().cloned())
            .collect();
        let mut args: Vec<&OsStr> = vec!["-qR".as_ref()];
        args.extend(tops.iter().map(OsStr::new));
        let listed = self.query("the closure (nix-store -qR)", &args)?;
        let mut closure: Vec<String> = store_paths(&listed, "nix-store -qR")?
            .into_iter()
            .map(|p| p.to_string())
            .collect();
        closure.sort();
        closure.dedup();
        if closure.len() > MAX_CLOSURE_PATHS {
            return Err(NixImageError::Unsupported(format!(
                "the closure has {} store paths, over the limit of {MAX_CLOSURE_PATHS}",
                closure.len()
            )));
        }
        let mut args: Vec<&OsStr> = vec!["-q".as_ref(), "--hash".as_ref()];
        args.extend(closure.iter().map(OsStr::new));
        let hashes = self.query("NAR hashes (nix-store -q --hash)", &args)?;
        let hashes: Vec<&str> = hashes.lines().collect();
        if hashes.len() != closure.len() {
            return Err(NixImageError::Unexpected(format!(
                "nix-store -q --hash gave {} hashes for {} paths",
                hashes.len(),
                closure.len()
            )));
        }
        let paths = closure
            .into_iter()
            .zip(hashes)
            .map(|(path, hash)| {
                let digest = hash
                    .strip_prefix("sha256:")
                    .and_then(|h| mvm_nix::nixbase32::decode_array::<32>(h).ok())
                    .ok_or_else(|| {
                        NixImageError::Unexpected(format!(
                            "{path}: NAR hash {hash:?} is not sha256"
                        ))
                    })?;
                Ok(ClosurePath {
                    path,
                    nar_sha256: hex::encode(digest),
                })
            })
            .collect::<Result<_, NixImageError>>()?;
        built.sort();
        built.dedup();
        Ok(Realised {
            closure: NixClosure {
                store_root: root,
                packages,
                paths,
            },
            built,
        })
    }
}

fn store_paths(text: &str, program: &str) -> Result<Vec<StorePath>, NixImageError> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|line| {
            StorePath::parse(line).map_err(|e| {
                NixImageError::Unexpected(format!(
                    "{program} printed {line:?}, not a store path: {e}"
                ))
            })
        })
        .collect()
}

fn single_store_path(text: &str, program: &str) -> Result<StorePath, NixImageError> {
    match store_paths(text, program)?.as_slice() {
        [one] => Ok(one.clone()),
        many => Err(NixImageError::Unexpected(format!(
            "{program} gave {} store paths; an attribute path must name one derivation",
            many.len()
        ))),
    }
}

/// Stages the closure into `tree`: each path, after its NAR hash is checked, at its
/// `/nix/store/…` name, and `/bin` with a symlink to every program in the packages' `bin`
/// directories (two packages with the same program are refused, as `buildEnv` refuses them).
pub fn stage_closure(closure: &NixClosure, tree: &mut Tree) -> Result<(), NixImageError> {
    let dir_meta = |mode| Metadata {
        mode,
        ..Metadata::default()
    };
    let nix = tree.add(NodeKind::Directory(BTreeMap::new()), dir_meta(0o755));
    tree.link(Tree::ROOT, b"nix", nix);
    let store = tree.add(NodeKind::Directory(BTreeMap::new()), dir_meta(0o555));
    tree.link(nix, b"store", store);
    let disk_store = closure.store_root.join("nix/store");
    for entry in &closure.paths {
        let path = StorePath::parse(&entry.path)
            .map_err(|e| NixImageError::Unexpected(format!("{}: {e}", entry.path)))?;
        let on_disk = disk_store.join(path.base_name());
        let nar = mvm_nix::nar::nar_sha256(&on_disk)
            .map_err(|e| NixImageError::Unsupported(format!("{}: {e}", on_disk.display())))?;
        if hex::encode(nar) != entry.nar_sha256 {
            return Err(NixImageError::Mismatch(format!(
                "{}: its contents hash to sha256:{} as a NAR, but Nix recorded sha256:{}",
                entry.path,
                hex::encode(nar),
                entry.nar_sha256
            )));
        }
        let node = stage_path(tree, &on_disk)?;
        tree.link(store, path.base_name().as_bytes(), node);
    }

    let bin = tree.add(NodeKind::Directory(BTreeMap::new()), dir_meta(0o755));
    let mut provider: BTreeMap<Vec<u8>, &str> = BTreeMap::new();
    for package in &closure.packages {
        for output in package.outputs.values() {
            let base = output.trim_start_matches("/nix/store/");
            let Some(out_bin) = tree
                .lookup(store, base.as_bytes())
                .and_then(|out| tree.lookup(out, b"bin"))
            else {
                continue;
            };
            let names: Vec<Vec<u8>> = tree
                .entries(out_bin)
                .map(|e| e.keys().cloned().collect())
                .unwrap_or_default();
            for name in names {
                if let Some(other) = provider.insert(name.clone(), &package.attr) {
                    if other != package.attr {
                        return Err(NixImageError::Unsupported(format!(
                            "{other} and {} both provide bin/{}",
                            package.attr,
                            String::from_utf8_lossy(&name)
                        )));
                    }
                    continue;
                }
                let mut target = format!("{output}/bin/").into_bytes();
                target.extend_from_slice(&name);
                let link = tree.add(NodeKind::Symlink(target), dir_meta(0o777));
                tree.link(bin, &name, link);
            }
        }
    }
    tree.link(Tree::ROOT, b"bin", bin);
    Ok(())
}

/// Adds the file, symlink or directory tree at `path` to `tree` (not linked anywhere yet),
/// with the metadata a store gives it: owned by root, read-only, executable where the owner
/// may execute. Never follows a symlink.
fn stage_path(tree: &mut Tree, path: &Path) -> Result<NodeId, NixImageError> {
    let io = |source| NixImageError::Io {
        path: path.display().to_string(),
        source,
    };
    let meta = fs::symlink_metadata(path).map_err(io)?;
    let kind = meta.file_type();
    let mode = |executable| Metadata {
        mode: if executable { 0o555 } else { 0o444 },
        ..Metadata::default()
    };
    if kind.is_symlink() {
        use std::os::unix::ffi::OsStrExt;
        let target = fs::read_link(path).map_err(io)?;
        Ok(tree.add(
            NodeKind::Symlink(target.as_os_str().as_bytes().to_vec()),
            Metadata {
                mode: 0o777,
                ..Metadata::default()
            },
        ))
    } else if kind.is_file() {
        use std::os::unix::fs::PermissionsExt;
        let executable = meta.permissions().mode() & 0o100 != 0;
        let mut file = fs::File::open(path).map_err(io)?;
        tree.add_file(&mut file, mode(executable)).map_err(io)
    } else if kind.is_dir() {
        let dir = tree.add(NodeKind::Directory(BTreeMap::new()), mode(true));
        let mut names: Vec<PathBuf> = fs::read_dir(path)
            .map_err(io)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()
            .map_err(io)?;
        names.sort();
        for child in names {
            let node = stage_path(tree, &child)?;
            use std::os::unix::ffi::OsStrExt;
            let name = child.file_name().unwrap_or_default().as_bytes().to_vec();
            tree.link(dir, &name, node);
        }
        Ok(dir)
    } else {
        Err(NixImageError::Unsupported(format!(
            "{}: a store path holds only files, symlinks and directories",
            path.display()
        )))
    }
}
