//! The builder VM persona: the untrusted half of a build in a microVM booted from the builder
//! image ([`crate::builder_image`]), so that a hostile layer meets a guest kernel.
//!
//! The host pulls the image and checks every blob against its digest, as for the host persona
//! ([`crate::worker`]); network stays on the host. It then runs
//! [`crate::builder_image::WORKER`] `--in-vm DIR` in a builder VM through `launcher` (the
//! CLI's `mvm exec -i` of the builder `mvm dev up` started, or `mvm run -i` of the builder's
//! signed plan) and streams it one **job**: a tar of `request.json` (a versioned [`Job`]: a
//! [`WorkerRequest`] with the guest's paths, a probe, or a store query), then
//! `blobs/sha256/<hex>`, exactly the image's blobs, or `source/…`, a package set's directory.
//! In the guest, [`serve_in_vm`] writes each blob to the job's own directory `DIR`, checking it
//! hashes to its name, realises a package set with the VM's Nix, runs the confined worker as
//! the host does, and removes `DIR`. It answers with a tar too: any number of `event.json`
//! ([`JobEvent`]: progress, and the log lines of Nix and the worker as they are written), then
//! one result: `answer.json` (with `nix.json` and `rootfs.erofs`), `probe.json` or
//! `store.json`.
//!
//! The host trusts nothing of that but the image's bytes: it takes only those entries, each
//! JSON one bounded, checks the answer names the image asked for and the image's size, then
//! computes the verity tree and root hash itself ([`crate::rootfs::write_verity`]), refusing
//! an answer whose root hash differs. Signing happens on the host, after; no key enters the VM.
//! Cancelling (the `cancel` flag of [`build_in_vm`]) ends the job in the VM: the launcher is
//! sent `SIGTERM`, which `mvm exec` passes on to the worker's process group.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[cfg(test)]
use mvm_ir::ErrorClass;
#[cfg(test)]
use sha2::{Digest, Sha256};

use crate::erofs::image_uuid;
use crate::nix_image::Realised;
use crate::oci::{ImageRef, Transport};
use crate::rootfs::{write_verity, RootfsReport, RootfsRequest, ROOTFS_FILE};
use crate::worker::{
    check_outputs, pull_for_worker, Answer, SandboxReport, WorkerError, WorkerRequest,
    MAX_REQUEST_BYTES,
};
use serde::{Deserialize, Serialize};

mod guest;
pub use guest::serve_in_vm;

/// The start of a job's directory in the guest, `/tmp/mvm-job-<32 hex>` (the guest's `/tmp`
/// is its memory): a builder that stays up serves one build after another, or several at once.
const GUEST_JOB_PREFIX: &str = "/tmp/mvm-job-";

/// The version of the jobs the host sends the builder VM's worker and of its answers: a worker
/// of another version refuses the job, and the host its answer.
pub const JOB_VERSION: u32 = 1;

/// A job's `request.json`: its version and what is asked. Unknown fields are refused.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Job {
    /// [`JOB_VERSION`] of the host.
    version: u32,
    /// What is asked.
    request: JobRequest,
}

/// What a job asks of the builder VM's worker.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum JobRequest {
    /// Build an image (an OCI image from the blobs that come with it, or a Nix image from the
    /// package set's directory that does).
    Build(Box<WorkerRequest>),
    /// Say what the worker can do and what its store holds ([`Capabilities`]).
    Probe,
    /// List the valid paths of its store ([`StoreListing`]).
    Store,
    /// Collect its store's garbage: every path, the builder keeping no roots ([`Collected`]).
    CollectGarbage,
}

/// What the builder VM's worker says of a job while it runs, before its result: the answer
/// tar's `event.json` entries, as many as come, each at most [`MAX_EVENT_BYTES`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum JobEvent {
    /// The job arrived whole.
    Received {
        /// The bytes of its entries: the request, blobs and package set files.
        bytes: u64,
    },
    /// The VM's Nix instantiates and realises these packages on its store.
    Realising {
        /// Their attribute paths.
        packages: Vec<String>,
    },
    /// The confined worker builds the image.
    Building,
    /// A line of the job's log (Nix's, the worker's), as it was written: the receiver makes
    /// it printable.
    Log {
        /// The line, without its newline.
        line: String,
    },
}

/// The most bytes of one [`JobEvent`].
const MAX_EVENT_BYTES: u64 = 64 * 1024;

/// The builder VM worker's answer to a probe: what it can do, and its Nix store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    /// Its [`JOB_VERSION`].
    pub version: u32,
    /// The jobs it takes: `build_oci`, `build_nix`, `probe`, `store`.
    pub jobs: Vec<String>,
    /// What `nix-store --version` says in the builder.
    pub nix: String,
    /// The paths in its store (`/nix/store`).
    pub store_paths: u64,
    /// The jobs running in it beside this probe (builds, which a cancel ends).
    pub jobs_running: u64,
}

/// The builder VM worker's answer to a store query: the valid paths of its store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreListing {
    /// Each valid store path, sorted.
    pub paths: Vec<String>,
}

/// The builder VM worker's answer to a garbage collection of its store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Collected {
    /// The valid paths it deleted.
    pub deleted: u64,
    /// The valid paths left.
    pub left: u64,
}

/// The most paths a store listing may hold.
const MAX_LISTED_PATHS: usize = 1_000_000;

/// Asks the builder VM's worker what it can do (`launcher` as for [`build_in_vm`]).
pub fn probe_in_vm(launcher: impl FnOnce(&str) -> Command) -> Result<Capabilities, WorkerError> {
    ask_in_vm(
        launcher,
        JobRequest::Probe,
        "probe.json",
        "probing the builder VM",
    )
}

/// Asks the builder VM's worker for the valid paths of its store (`launcher` as for
/// [`build_in_vm`]).
pub fn store_in_vm(launcher: impl FnOnce(&str) -> Command) -> Result<StoreListing, WorkerError> {
    let listing: StoreListing = ask_in_vm(
        launcher,
        JobRequest::Store,
        "store.json",
        "querying the builder VM's store",
    )?;
    let well_formed = listing.paths.len() <= MAX_LISTED_PATHS
        && listing.paths.windows(2).all(|w| w[0] < w[1])
        && listing
            .paths
            .iter()
            .all(|path| mvm_nix::StorePath::parse(path).is_ok());
    match well_formed {
        true => Ok(listing),
        false => Err(WorkerError::Worker(
            "the builder VM's store listing is not sorted, unique store paths".into(),
        )),
    }
}

/// Has the builder VM's worker collect its store's garbage (`launcher` as for
/// [`build_in_vm`]): refused while a Nix build runs in it.
pub fn collect_garbage_in_vm(
    launcher: impl FnOnce(&str) -> Command,
) -> Result<Collected, WorkerError> {
    ask_in_vm(
        launcher,
        JobRequest::CollectGarbage,
        "collected.json",
        "collecting the builder VM's store garbage",
    )
}

/// Sends the builder VM's worker a job that is its request alone, and reads the one JSON
/// entry `name` it answers with (its events dropped).
fn ask_in_vm<T: serde::de::DeserializeOwned>(
    launcher: impl FnOnce(&str) -> Command,
    request: JobRequest,
    name: &str,
    what: &str,
) -> Result<T, WorkerError> {
    let failed = |message: String| WorkerError::Worker(format!("{what}: {message}"));
    let id = mvm_ir::plan::fresh_nonce().map_err(|e| failed(e.to_string()))?;
    let job = Job {
        version: JOB_VERSION,
        request,
    };
    let json = serde_json::to_vec(&job).map_err(|e| failed(e.to_string()))?;
    let mut tar = tar::Builder::new(Vec::new());
    append(&mut tar, "request.json", json.len() as u64, json.as_slice())
        .map_err(|e| failed(e.to_string()))?;
    let job_tar = tar.into_inner().map_err(|e| failed(e.to_string()))?;
    let mut child = launcher(&format!("{GUEST_JOB_PREFIX}{id}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| failed(format!("cannot start: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A worker that refuses the job says why in its answer.
        let _ = stdin.write_all(&job_tar);
    }
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| failed("no stdout".into()))?;
    let answer = receive_one(stdout, name);
    let status = child.wait();
    answer.map_err(|e| {
        failed(format!(
            "{e} ({})",
            status.map_or_else(|e| e.to_string(), |s| s.to_string())
        ))
    })
}

/// Reads an answer that is the one JSON entry `name` (after any events), or `answer.json`
/// saying why there is none.
fn receive_one<T: serde::de::DeserializeOwned>(from: impl Read, name: &str) -> io::Result<T> {
    let mut archive = tar::Archive::new(from);
    let mut entries = archive.entries()?;
    let (path, mut entry) =
        next_result(&mut entries, &mut |_| {})?.ok_or_else(|| io::Error::other("no answer"))?;
    match path.as_str() {
        _ if path == name => bounded_json(&mut entry, MAX_REQUEST_BYTES),
        "answer.json" => match bounded_json::<Answer>(&mut entry, MAX_REQUEST_BYTES)? {
            Answer::Failed { code, message, .. } => {
                Err(io::Error::other(format!("{code}: {message}")))
            }
            Answer::Built { .. } => Err(io::Error::other(format!("an image, not {name}"))),
        },
        other => Err(io::Error::other(format!("an unexpected entry {other:?}"))),
    }
}

/// The next entry of an answer tar that is not an event, and its path; each event before it,
/// a regular file `event.json` of at most [`MAX_EVENT_BYTES`], goes to `on_event`.
fn next_result<'a, R: Read>(
    entries: &mut tar::Entries<'a, R>,
    on_event: &mut dyn FnMut(JobEvent),
) -> io::Result<Option<(String, tar::Entry<'a, R>)>> {
    for entry in entries {
        let mut entry = entry?;
        if !entry.header().entry_type().is_file() {
            return Err(io::Error::other("an entry that is not a regular file"));
        }
        let path = entry.path()?.to_string_lossy().into_owned();
        if path != "event.json" {
            return Ok(Some((path, entry)));
        }
        on_event(bounded_json(&mut entry, MAX_EVENT_BYTES)?);
    }
    Ok(None)
}

/// The largest image taken back from the VM.
const MAX_IMAGE_BYTES: u64 = 64 << 30;

/// The most bytes of files a package set's directory may send into the VM.
const MAX_SOURCE_BYTES: u64 = 256 << 20;
/// The most entries (files, directories, symlinks) it may send.
const MAX_SOURCE_ENTRIES: usize = 100_000;

/// A nix_packages image for the builder VM: the directory of its package set goes in with
/// the job, and the VM's own Nix evaluates and realises it there, on the VM's store.
#[derive(Debug, Clone)]
pub struct NixJob {
    /// The package set, a Nix file of the host; its whole directory goes in.
    pub package_set: PathBuf,
    /// The attribute paths of the workload's packages.
    pub attrs: Vec<String>,
}

/// What the VM's worker is asked to realise: a [`NixJob`] with the guest's paths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NixEval {
    /// The package set file, under the job's `source` directory.
    pub package_set: PathBuf,
    /// The attribute paths.
    pub attrs: Vec<String>,
}

/// What a build in the builder VM gave.
#[derive(Debug)]
pub struct VmBuild {
    /// The image, with the host's own verity tree.
    pub report: RootfsReport,
    /// How the worker in the VM was confined.
    pub sandbox: SandboxReport,
    /// For a nix_packages image: the closure the VM realised, and what it had to build.
    pub nix: Option<Realised>,
}

/// Builds `request` in a builder VM (or, with `nix`, the closure the VM's Nix realises for
/// it): `launcher` gives the command that runs the worker there as `--in-vm DIR` for the job
/// directory `DIR` it is given. What the job says while it runs goes to `on_event`; once
/// `cancel` is set, the job is ended in the VM and the build fails.
pub fn build_in_vm(
    launcher: impl FnOnce(&str) -> Command,
    request: &RootfsRequest,
    nix: Option<&NixJob>,
    on_event: &mut dyn FnMut(JobEvent),
    cancel: &AtomicBool,
) -> Result<VmBuild, WorkerError> {
    if request.nix.is_some() {
        return Err(WorkerError::Worker(
            "a closure realised on the host is not built in the builder VM: its own Nix realises it".into(),
        ));
    }
    let refused = |message: String| WorkerError::Worker(message);
    let (blobs, source, archive) = match nix {
        Some(job) => {
            let (dir, file) = source_dir(job).map_err(refused)?;
            let entries = source_entries(&dir).map_err(refused)?;
            (None, Some((entries, file)), None)
        }
        None => match pull_for_worker(request)? {
            Some(blobs) => (Some(blobs), None, None),
            None => (None, None, Some(archive_file(request)?)),
        },
    };
    fs::create_dir_all(&request.out_dir)
        .map_err(|e| WorkerError::Worker(format!("{}: {e}", request.out_dir.display())))?;
    let id = mvm_ir::plan::fresh_nonce().map_err(|e| WorkerError::Worker(e.to_string()))?;
    let guest = PathBuf::from(format!("{GUEST_JOB_PREFIX}{id}"));
    let job = WorkerRequest {
        rootfs: RootfsRequest {
            // An archive goes in as the job's own file.
            reference: match &archive {
                Some(_) => format!("oci-archive:{}", guest.join(ARCHIVE_FILE).display()),
                None => request.reference.clone(),
            },
            cache_dir: PathBuf::new(),
            base_dir: guest.clone(),
            out_dir: guest.clone(),
            progress: false,
            ..request.clone()
        },
        blobs: blobs.as_ref().map(|_| guest.join("blobs")),
        nix_eval: nix.zip(source.as_ref()).map(|(job, (_, file))| NixEval {
            package_set: guest.join(SOURCE_DIR).join(file),
            attrs: job.attrs.clone(),
        }),
    };
    let job = Job {
        version: JOB_VERSION,
        request: JobRequest::Build(Box::new(job)),
    };
    let request_json = serde_json::to_vec(&job).map_err(|e| WorkerError::Worker(e.to_string()))?;
    let mut child = launcher(&guest.to_string_lossy())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| WorkerError::Worker(format!("cannot start the builder VM: {e}")))?;
    let stdin = child.stdin.take();
    let blob_dir = blobs.as_ref().map(|blobs| blobs.dir.path().to_path_buf());
    let source_entries = source.map(|(entries, _)| entries);
    let sender = std::thread::spawn(move || -> io::Result<()> {
        let Some(stdin) = stdin else {
            return Err(io::Error::other("no stdin"));
        };
        send_job(
            BufWriter::new(stdin),
            &request_json,
            blob_dir.as_deref(),
            source_entries.as_deref(),
            archive.as_deref(),
        )
    });
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| WorkerError::Worker("no stdout".into()))?;
    let finished = AtomicBool::new(false);
    let launcher = child.id();
    let (received, status) = std::thread::scope(|scope| {
        scope.spawn(|| end_when_cancelled(launcher, cancel, &finished));
        let received = receive_answer(stdout, &request.out_dir, on_event);
        let status = child.wait();
        finished.store(true, Ordering::Relaxed);
        (received, status)
    });
    if cancel.load(Ordering::Relaxed) {
        return Err(refused(
            "cancelled: the job was ended in the builder VM".into(),
        ));
    }
    let sent = sender
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the job's sender panicked")));
    let (answer, realised) = received.map_err(|e| {
        WorkerError::Worker(format!(
            "the builder VM's answer ({}): {e}",
            status.map_or_else(|e| e.to_string(), |s| s.to_string())
        ))
    })?;
    // A builder VM that refused its job stops reading it, which makes the sender fail: its
    // answer says why. A build on a job that did not go in whole is never taken.
    if let (Err(e), Answer::Built { .. }) = (&sent, &answer) {
        return Err(refused(format!("the job did not go in whole: {e}")));
    }
    drop(blobs);
    // A Nix image is named by the digest of the closure the VM realised, checked first.
    let realised = match (nix, realised) {
        (Some(job), Some(realised)) => Some(check_realised(job, realised)?),
        (None, None) => None,
        (Some(_), None) if matches!(answer, Answer::Failed { .. }) => None,
        (Some(_), None) => return Err(refused("the builder VM realised no closure".into())),
        (None, Some(_)) => return Err(refused("the builder VM sent a closure unasked".into())),
    };
    let expected = RootfsRequest {
        digest: match &realised {
            Some(realised) => realised.closure.digest(),
            None => request.digest.clone(),
        },
        ..request.clone()
    };
    let (report, sandbox) = answer.result(&expected)?;
    let image = request.out_dir.join(ROOTFS_FILE);
    let size = fs::metadata(&image).map(|m| m.len()).unwrap_or(0);
    if size != report.image_size {
        return Err(WorkerError::Worker(format!(
            "the builder VM said its image has {} bytes; {size} arrived",
            report.image_size
        )));
    }
    let mut block0 = vec![0u8; 4096];
    File::open(&image)
        .and_then(|mut f| f.read_exact(&mut block0))
        .map_err(|e| WorkerError::Worker(format!("{}: {e}", image.display())))?;
    let uuid = image_uuid(&block0)
        .ok_or_else(|| WorkerError::Worker("the builder VM's image is not EROFS".into()))?;
    let claimed = report.root_hash.clone();
    let report = write_verity(&request.out_dir, uuid, report)
        .map_err(|e| WorkerError::Worker(format!("the verity tree of the VM's image: {e}")))?;
    if report.root_hash != claimed {
        return Err(WorkerError::Worker(format!(
            "the builder VM claimed verity root {claimed}; its image's is {}",
            report.root_hash
        )));
    }
    check_outputs(&request.out_dir)?;
    Ok(VmBuild {
        report,
        sandbox,
        nix: realised,
    })
}

/// The file an `oci-archive:` image is, in the job's directory in the guest.
const ARCHIVE_FILE: &str = "image.tar";

/// The largest `oci-archive:` file sent into the VM.
const MAX_ARCHIVE_BYTES: u64 = 64 << 30;

/// The file of an `oci-archive:` image: a regular file of at most [`MAX_ARCHIVE_BYTES`],
/// which goes into the VM whole, its worker unpacking it as the host persona's does.
fn archive_file(request: &RootfsRequest) -> Result<PathBuf, WorkerError> {
    let image = ImageRef::new(&request.reference, &request.digest, &request.base_dir)
        .map_err(|e| WorkerError::Worker(e.to_string()))?;
    let Transport::Archive(path) = image.transport else {
        return Err(WorkerError::Worker(format!(
            "{}: neither pulled nor an archive",
            request.reference
        )));
    };
    let meta =
        fs::metadata(&path).map_err(|e| WorkerError::Worker(format!("{}: {e}", path.display())))?;
    if !meta.is_file() || meta.len() > MAX_ARCHIVE_BYTES {
        return Err(WorkerError::Worker(format!(
            "{} is not a regular file of at most {} GiB",
            path.display(),
            MAX_ARCHIVE_BYTES >> 30
        )));
    }
    Ok(path)
}

/// The job's directory of the package set's files, in the guest.
const SOURCE_DIR: &str = "source";

/// The package set's directory and its file name in it; a lookup path (`<nixpkgs>`) is not
/// a file that can go in.
fn source_dir(job: &NixJob) -> Result<(PathBuf, PathBuf), String> {
    let file = fs::canonicalize(&job.package_set).map_err(|e| {
        format!(
            "the package set {} ({e}): the builder VM evaluates a package set file sent with \
             the job; pass --nix-packages FILE",
            job.package_set.display()
        )
    })?;
    match (file.parent(), file.file_name()) {
        (Some(dir), Some(name)) if file.is_file() => Ok((dir.to_path_buf(), name.into())),
        _ => Err(format!("the package set {} is not a file", file.display())),
    }
}

/// The closure the VM says it realised for `job`, if it is well formed: the packages asked
/// for, in order, each with a `.drv` store path, a sha256 of it and at least one output, every
/// output in the closure; the closure's paths store paths, sorted, each once, with sha256 NAR
/// hashes, no more than a closure may have; what it says it built among the outputs; the
/// system's store. What the paths hold is the builder's word: the host cannot read the VM's
/// store, only the image, whose verity tree it computes itself.
fn check_realised(job: &NixJob, realised: Realised) -> Result<Realised, WorkerError> {
    let refused =
        |message: String| WorkerError::Worker(format!("the builder VM's closure: {message}"));
    let closure = &realised.closure;
    if closure.store_root != Path::new("/") {
        return Err(refused(format!(
            "a store under {}",
            closure.store_root.display()
        )));
    }
    let attrs: Vec<&String> = closure.packages.iter().map(|p| &p.attr).collect();
    if attrs != job.attrs.iter().collect::<Vec<_>>() {
        return Err(refused(format!("packages {attrs:?}, not {:?}", job.attrs)));
    }
    if closure.paths.len() > crate::nix_image::MAX_CLOSURE_PATHS {
        return Err(refused(format!("{} paths", closure.paths.len())));
    }
    if !closure
        .paths
        .windows(2)
        .all(|pair| pair[0].path < pair[1].path)
    {
        return Err(refused("its paths are not sorted, each once".into()));
    }
    let store_path =
        |path: &str| mvm_nix::StorePath::parse(path).map_err(|e| refused(format!("{path}: {e}")));
    for path in &closure.paths {
        store_path(&path.path)?;
        if !mvm_ir::digest::is_sha256_hex(&path.nar_sha256) {
            return Err(refused(format!(
                "{}: NAR hash {:?}",
                path.path, path.nar_sha256
            )));
        }
    }
    let paths: std::collections::BTreeSet<&str> =
        closure.paths.iter().map(|p| p.path.as_str()).collect();
    let mut outputs = std::collections::BTreeSet::new();
    for package in &closure.packages {
        let drv = store_path(&package.drv)?;
        if !drv.name().ends_with(".drv") || !mvm_ir::digest::is_sha256_hex(&package.drv_sha256) {
            return Err(refused(format!("{}: its derivation", package.attr)));
        }
        if package.outputs.is_empty() {
            return Err(refused(format!("{} has no outputs", package.attr)));
        }
        for (name, output) in &package.outputs {
            let valid_name = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b));
            if !valid_name || !paths.contains(output.as_str()) {
                return Err(refused(format!("{}: output {name} {output}", package.attr)));
            }
            outputs.insert(output.as_str());
        }
    }
    if let Some(stray) = realised
        .built
        .iter()
        .find(|b| !outputs.contains(b.as_str()))
    {
        return Err(refused(format!(
            "it built {stray}, which is no package's output"
        )));
    }
    Ok(realised)
}

/// Writes the job tar: `request.json`, then every blob of `blobs` as `blobs/sha256/<hex>`,
/// the package set's directory's `source` entries under `source/`, or the `archive` as
/// [`ARCHIVE_FILE`].
fn send_job(
    to: impl Write,
    request_json: &[u8],
    blobs: Option<&Path>,
    source: Option<&[SourceEntry]>,
    archive: Option<&Path>,
) -> io::Result<()> {
    let mut tar = tar::Builder::new(to);
    // A symlink of the package set goes in as a symlink, never as what it points at.
    tar.follow_symlinks(false);
    append(
        &mut tar,
        "request.json",
        request_json.len() as u64,
        request_json,
    )?;
    if let Some(blobs) = blobs {
        let blobs = blobs.join("sha256");
        let mut names: Vec<_> = fs::read_dir(&blobs)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        names.sort();
        for name in names {
            let file = File::open(blobs.join(&name))?;
            let size = file.metadata()?.len();
            let path = format!("blobs/sha256/{}", name.to_string_lossy());
            append(&mut tar, &path, size, file)?;
        }
    }
    if let Some(archive) = archive {
        let file = File::open(archive)?;
        let size = file.metadata()?.len();
        append(&mut tar, ARCHIVE_FILE, size, file)?;
    }
    for entry in source.unwrap_or_default() {
        let name = Path::new(SOURCE_DIR).join(&entry.name);
        match entry.directory {
            // Writable by its owner in the guest, whatever it is here (a directory copied
            // from a Nix store is read-only): the worker unpacks into it and removes it.
            true => {
                let mut header = tar::Header::new_gnu();
                header.set_metadata(&fs::symlink_metadata(&entry.path)?);
                header.set_mode(header.mode()? | 0o700);
                tar.append_data(&mut header, &name, io::empty())?;
            }
            false => tar.append_path_with_name(&entry.path, &name)?,
        }
    }
    tar.into_inner()?.flush()
}

/// One file, directory or symlink of a package set's directory.
#[derive(Debug)]
struct SourceEntry {
    /// Where it is on the host.
    path: PathBuf,
    /// Its path under the directory.
    name: PathBuf,
    /// A directory (else a file or a symlink, sent as it is).
    directory: bool,
}

/// Every file, directory and symlink under `dir`, in name order, parents first, within
/// [`MAX_SOURCE_BYTES`] and [`MAX_SOURCE_ENTRIES`]. Hidden entries (`.git`, `.env`, `.ssh`)
/// and files of other kinds are left out; `/` and the home directory are refused whole.
fn source_entries(dir: &Path) -> Result<Vec<SourceEntry>, String> {
    let home = std::env::var_os("HOME").and_then(|home| fs::canonicalize(home).ok());
    if dir == Path::new("/") || home.as_deref() == Some(dir) {
        return Err(format!(
            "the package set is in {}, which would go into the builder VM whole: give it a \
             directory of its own",
            dir.display()
        ));
    }
    let mut entries = Vec::new();
    let mut bytes = 0u64;
    let mut pending = vec![PathBuf::new()];
    while let Some(below) = pending.pop() {
        let read = |e: io::Error| format!("{}: {e}", dir.join(&below).display());
        let mut names: Vec<_> = fs::read_dir(dir.join(&below))
            .map_err(read)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(read)?;
        names.sort();
        let mut subdirectories = Vec::new();
        for name in names
            .into_iter()
            .filter(|n| !n.as_encoded_bytes().starts_with(b"."))
        {
            let name = below.join(name);
            let path = dir.join(&name);
            let meta =
                fs::symlink_metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let kind = meta.file_type();
            if !(kind.is_dir() || kind.is_file() || kind.is_symlink()) {
                continue;
            }
            bytes += if kind.is_file() { meta.len() } else { 0 };
            if entries.len() >= MAX_SOURCE_ENTRIES || bytes > MAX_SOURCE_BYTES {
                return Err(format!(
                    "the package set's directory {} holds over {MAX_SOURCE_ENTRIES} entries or \
                     {} MiB: give it a directory of its own",
                    dir.display(),
                    MAX_SOURCE_BYTES >> 20
                ));
            }
            if kind.is_dir() {
                subdirectories.push(name.clone());
            }
            entries.push(SourceEntry {
                path,
                name,
                directory: kind.is_dir(),
            });
        }
        // Depth first, in name order: the stack takes them last first.
        pending.extend(subdirectories.into_iter().rev());
    }
    Ok(entries)
}

fn append(
    tar: &mut tar::Builder<impl Write>,
    path: &str,
    size: u64,
    bytes: impl Read,
) -> io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mode(0o600);
    header.set_size(size);
    tar.append_data(&mut header, path, bytes)
}

/// Sends the launcher `SIGTERM` once `cancel` is set (`mvm exec` passes it on to the job's
/// process group in the VM, `mvm run` ends its VM), unless the job has `finished`.
fn end_when_cancelled(launcher: u32, cancel: &AtomicBool, finished: &AtomicBool) {
    while !finished.load(Ordering::Relaxed) {
        if cancel.load(Ordering::Relaxed) {
            let Ok(pid) = libc::pid_t::try_from(launcher) else {
                return;
            };
            // SAFETY: kill only sends a signal, to our own child, which is not reaped (and its
            // pid not reused) before `finished` is set.
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads the answer tar: its events to `on_event`, then the answer, the image into `out_dir`,
/// and the closure the VM realised for a Nix image; nothing else.
fn receive_answer(
    from: impl Read,
    out_dir: &Path,
    on_event: &mut dyn FnMut(JobEvent),
) -> io::Result<(Answer, Option<Realised>)> {
    let mut archive = tar::Archive::new(from);
    let mut entries = archive.entries()?;
    let (path, mut entry) =
        next_result(&mut entries, on_event)?.ok_or_else(|| io::Error::other("no answer"))?;
    if path != "answer.json" {
        return Err(io::Error::other(format!("an unexpected entry {path:?}")));
    }
    let answer: Answer = bounded_json(&mut entry, MAX_REQUEST_BYTES)?;
    let mut realised = None;
    let mut image = false;
    for entry in entries {
        let mut entry = entry?;
        if !entry.header().entry_type().is_file() {
            return Err(io::Error::other("an entry that is not a regular file"));
        }
        let path = entry.path()?.to_string_lossy().into_owned();
        match path.as_str() {
            "nix.json" if realised.is_none() && !image => {
                realised = Some(bounded_json(&mut entry, MAX_REQUEST_BYTES)?)
            }
            "rootfs.erofs" if !image => {
                image = true;
                if entry.header().size()? > MAX_IMAGE_BYTES {
                    return Err(io::Error::other("the image is too large"));
                }
                let mut file = File::create(out_dir.join(ROOTFS_FILE))?;
                io::copy(&mut entry, &mut file)?;
                file.sync_all()?;
            }
            other => return Err(io::Error::other(format!("an unexpected entry {other:?}"))),
        }
    }
    Ok((answer, realised))
}

/// A JSON document of at most `bound` bytes from `from`.
fn bounded_json<T: serde::de::DeserializeOwned>(from: impl Read, bound: u64) -> io::Result<T> {
    let mut bytes = Vec::new();
    from.take(bound + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > bound {
        return Err(io::Error::other("a document larger than its bound"));
    }
    serde_json::from_slice(&bytes).map_err(io::Error::other)
}

#[cfg(test)]
mod tests;
