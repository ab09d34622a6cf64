//! The builder VM persona: the untrusted half of a build in a microVM booted from the builder
//! image ([`crate::builder_image`]), so that a hostile layer meets a guest kernel.
//!
//! The host pulls the image and checks every blob against its digest, as for the host persona
//! ([`crate::worker`]); network stays on the host. It then runs
//! [`crate::builder_image::WORKER`] `--in-vm DIR` in a builder VM through `launcher` (the
//! CLI's `mvm exec -i` of the builder `mvm dev up` started, or `mvm run -i` of the builder's
//! signed plan) and streams it one **job**: a tar of `request.json` (a [`WorkerRequest`] with
//! the guest's paths) and `blobs/sha256/<hex>`, exactly the image's blobs. In the guest,
//! [`serve_in_vm`] writes each blob to the job's own directory `DIR`, checking it hashes to its
//! name, builds as the host worker does, streams back a tar of `answer.json` and
//! `rootfs.erofs`, and empties `DIR`.
//!
//! The host trusts nothing of that but the image's bytes: it takes only those two entries,
//! checks the answer names the image asked for and the image's size, then computes the verity
//! tree and root hash itself ([`crate::rootfs::write_verity`]), refusing an answer whose root
//! hash differs. Signing happens on the host, after; no key enters the VM.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use mvm_ir::ErrorClass;
use sha2::{Digest, Sha256};

use crate::erofs::image_uuid;
use crate::nix_image::{NixImageError, NixStore, Realised};
use crate::rootfs::{write_verity, RootfsReport, RootfsRequest, ROOTFS_FILE};
use crate::worker::{
    check_outputs, claim_dir, pull_for_worker, run_job, Answer, SandboxReport, WorkerError,
    WorkerRequest, MAX_REQUEST_BYTES,
};
use mvm_ir::Coded;
use serde::{Deserialize, Serialize};

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
}

/// The builder VM worker's answer to a probe: what it can do, and its Nix store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    /// Its [`JOB_VERSION`].
    pub version: u32,
    /// The jobs it takes: `build_oci`, `build_nix`, `probe`.
    pub jobs: Vec<String>,
    /// What `nix-store --version` says in the builder.
    pub nix: String,
    /// The paths in its store (`/nix/store`).
    pub store_paths: u64,
}

/// Asks the builder VM's worker what it can do (`launcher` as for [`build_in_vm`]).
pub fn probe_in_vm(launcher: impl FnOnce(&str) -> Command) -> Result<Capabilities, WorkerError> {
    let failed =
        |message: String| WorkerError::Worker(format!("probing the builder VM: {message}"));
    let id = mvm_ir::plan::fresh_nonce().map_err(|e| failed(e.to_string()))?;
    let job = Job {
        version: JOB_VERSION,
        request: JobRequest::Probe,
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
    let answer = receive_probe(stdout);
    let status = child.wait();
    let capabilities = answer.map_err(|e| {
        failed(format!(
            "{e} ({})",
            status.map_or_else(|e| e.to_string(), |s| s.to_string())
        ))
    })?;
    if capabilities.version != JOB_VERSION {
        return Err(failed(format!(
            "it speaks job version {}, this mvm {JOB_VERSION}: `mvm builder fetch` with this \
             mvm's worker, then `mvm dev down && mvm dev up`",
            capabilities.version
        )));
    }
    Ok(capabilities)
}

/// Reads a probe's answer: `probe.json`, or `answer.json` saying why there is none.
fn receive_probe(from: impl Read) -> io::Result<Capabilities> {
    let mut archive = tar::Archive::new(from);
    let mut entries = archive.entries()?;
    let mut entry = entries
        .next()
        .ok_or_else(|| io::Error::other("no answer"))??;
    let path = entry.path()?.to_string_lossy().into_owned();
    match path.as_str() {
        "probe.json" => bounded_json(&mut entry),
        "answer.json" => match bounded_json::<Answer>(&mut entry)? {
            Answer::Failed { code, message, .. } => {
                Err(io::Error::other(format!("{code}: {message}")))
            }
            Answer::Built { .. } => Err(io::Error::other("an image, not its capabilities")),
        },
        other => Err(io::Error::other(format!("an unexpected entry {other:?}"))),
    }
}

/// What this worker can do, and the paths in its store.
fn capabilities() -> Capabilities {
    let nix = mvm_ir::env::command("nix-store")
        .arg("--version")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .unwrap_or_default();
    let store_paths = fs::read_dir("/nix/store")
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| !e.file_name().as_encoded_bytes().starts_with(b"."))
                .count() as u64
        })
        .unwrap_or(0);
    Capabilities {
        version: JOB_VERSION,
        jobs: ["build_oci", "build_nix", "probe"]
            .map(String::from)
            .to_vec(),
        nix,
        store_paths,
    }
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
/// directory `DIR` it is given.
pub fn build_in_vm(
    launcher: impl FnOnce(&str) -> Command,
    request: &RootfsRequest,
    nix: Option<&NixJob>,
) -> Result<VmBuild, WorkerError> {
    if request.nix.is_some() {
        return Err(WorkerError::Worker(
            "a closure realised on the host is not built in the builder VM: its own Nix realises it".into(),
        ));
    }
    let refused = |message: String| WorkerError::Worker(message);
    let (blobs, source) = match nix {
        Some(job) => {
            let (dir, file) = source_dir(job).map_err(refused)?;
            let entries = source_entries(&dir).map_err(refused)?;
            (None, Some((entries, file)))
        }
        None => {
            let blobs = pull_for_worker(request)?.ok_or_else(|| {
                refused(
                    "oci-archive: images are not built in the builder VM yet: use --persona host"
                        .into(),
                )
            })?;
            (Some(blobs), None)
        }
    };
    fs::create_dir_all(&request.out_dir)
        .map_err(|e| WorkerError::Worker(format!("{}: {e}", request.out_dir.display())))?;
    let id = mvm_ir::plan::fresh_nonce().map_err(|e| WorkerError::Worker(e.to_string()))?;
    let guest = PathBuf::from(format!("{GUEST_JOB_PREFIX}{id}"));
    let job = WorkerRequest {
        rootfs: RootfsRequest {
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
        )
    });
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| WorkerError::Worker("no stdout".into()))?;
    let received = receive_answer(stdout, &request.out_dir);
    let status = child.wait();
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
/// then the package set's directory's `source` entries under `source/`.
fn send_job(
    to: impl Write,
    request_json: &[u8],
    blobs: Option<&Path>,
    source: Option<&[SourceEntry]>,
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

/// Reads the answer tar: the answer, the image into `out_dir`, and the closure the VM
/// realised for a Nix image; nothing else.
fn receive_answer(from: impl Read, out_dir: &Path) -> io::Result<(Answer, Option<Realised>)> {
    let mut archive = tar::Archive::new(from);
    let mut answer = None;
    let mut realised = None;
    for entry in archive.entries()? {
        let mut entry = entry?;
        if !entry.header().entry_type().is_file() {
            return Err(io::Error::other("an entry that is not a regular file"));
        }
        let path = entry.path()?.to_string_lossy().into_owned();
        match path.as_str() {
            "answer.json" if answer.is_none() => answer = Some(bounded_json(&mut entry)?),
            "nix.json" if answer.is_some() && realised.is_none() => {
                realised = Some(bounded_json(&mut entry)?)
            }
            "rootfs.erofs" if answer.is_some() => {
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
    let answer = answer.ok_or_else(|| io::Error::other("no answer"))?;
    Ok((answer, realised))
}

/// The worker's main in the builder VM (`mvm-build-worker --in-vm DIR`): read the job from
/// stdin into `DIR`, build there, answer on stdout, and empty `DIR`.
pub fn serve_in_vm(dir: &str) -> ExitCode {
    let job_dir = Path::new(dir);
    let is_job_dir = dir
        .strip_prefix(GUEST_JOB_PREFIX)
        .is_some_and(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()));
    // Held until this process ends: the job's directory is in use while it is locked.
    let mut _claimed = None;
    let received = match is_job_dir {
        true => claim_job_dir(job_dir).and_then(|lock| {
            _claimed = Some(lock);
            receive_job(io::stdin().lock(), job_dir)
        }),
        false => Err(io::Error::other(format!("{dir:?} is not a job directory"))),
    };
    let mut realised = None;
    let answer = match received {
        Ok(JobRequest::Probe) => {
            let sent = send_probe(io::stdout().lock(), &capabilities());
            let _ = fs::remove_dir_all(job_dir);
            return match sent {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::FAILURE,
            };
        }
        Ok(JobRequest::Build(mut job)) => {
            // Temporary files go where the worker may write once confined, as on the host;
            // Nix's own (its cache) into the job too.
            std::env::set_var("TMPDIR", &job.rootfs.out_dir);
            std::env::set_var("HOME", &job.rootfs.out_dir);
            match realise(&mut job) {
                Ok(nix) => {
                    realised = nix;
                    run_job(&job)
                }
                Err(e) => Answer::Failed {
                    code: e.code().to_string(),
                    class: e.class(),
                    message: e.to_string(),
                },
            }
        }
        Err(e) => Answer::Failed {
            code: "BUILD004".into(),
            class: ErrorClass::Io,
            message: format!("reading the job: {e}"),
        },
    };
    let image = job_dir.join(ROOTFS_FILE);
    let built = matches!(answer, Answer::Built { .. });
    let sent = send_answer(
        io::stdout().lock(),
        &answer,
        realised.as_ref(),
        built.then_some(image.as_path()),
    );
    if is_job_dir {
        // Its contents go; the directory itself stays when confinement forbids removing it.
        let _ = fs::remove_dir_all(job_dir);
    }
    match (built, sent) {
        (true, Ok(())) => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}

/// For a Nix image: realises the job's packages with the VM's Nix, on its store (`/nix`,
/// the builder's store disk when `mvm dev up` gave it one), before the worker confines
/// itself, and makes the job the closure's to stage.
fn realise(job: &mut WorkerRequest) -> Result<Option<Realised>, NixImageError> {
    let Some(eval) = &job.nix_eval else {
        return Ok(None);
    };
    let nix = NixStore::new(None, eval.package_set.to_string_lossy().into_owned());
    let realised = nix.closure(&eval.attrs)?;
    job.rootfs.digest = realised.closure.digest();
    job.rootfs.nix = Some(realised.closure.clone());
    Ok(Some(realised))
}

/// The name of the lock taken while a job directory is made and locked, or abandoned ones
/// are looked for, in the directory of the jobs.
const JOBS_LOCK: &str = ".mvm-jobs.lock";

/// Makes the job directory `dir` and locks it for as long as the returned file lives, first
/// removing the job directories beside it that no job holds: those of jobs that were killed
/// (a build cancelled with Ctrl-C, a host that went away), which a builder that stays up would
/// otherwise keep in its memory.
fn claim_job_dir(dir: &Path) -> io::Result<File> {
    let jobs = dir.parent().unwrap_or(Path::new("/"));
    // `mvm-job-` of `mvm-job-<id>`.
    let prefix = dir
        .file_name()
        .and_then(|name| name.to_str())
        .and_then(|name| name.rsplit_once('-'))
        .map(|(start, _)| format!("{start}-"))
        .ok_or_else(|| io::Error::other("not a job directory"))?;
    let ((), lock) = claim_dir(jobs, JOBS_LOCK, &prefix, || {
        fs::create_dir(dir)?;
        Ok(((), dir.to_path_buf()))
    })?;
    Ok(lock)
}

/// Unpacks the job tar into `dir`: the request, each blob checked against its name, and a
/// package set's directory under `source/`.
fn receive_job(from: impl Read, dir: &Path) -> io::Result<JobRequest> {
    let blobs = dir.join("blobs");
    fs::create_dir_all(blobs.join("sha256"))?;
    let mut archive = tar::Archive::new(from);
    let mut request: Option<WorkerRequest> = None;
    let mut source_bytes = 0u64;
    let mut source_entries = 0usize;
    let mut entries = archive.entries()?;
    while let Some(entry) = entries.next() {
        let mut entry = entry?;
        let path = entry.path()?.to_string_lossy().into_owned();
        if path.starts_with(&format!("{SOURCE_DIR}/")) && request.is_some() {
            source_entries += 1;
            source_bytes += entry.header().size()?;
            if source_entries > MAX_SOURCE_ENTRIES || source_bytes > MAX_SOURCE_BYTES {
                return Err(io::Error::other(
                    "the package set's directory is over its bounds",
                ));
            }
            // `unpack_in` refuses a path that would leave `dir`.
            if !entry.unpack_in(dir)? {
                return Err(io::Error::other(format!(
                    "an entry outside the job: {path:?}"
                )));
            }
            continue;
        }
        if !entry.header().entry_type().is_file() {
            return Err(io::Error::other("an entry that is not a regular file"));
        }
        if path == "request.json" && request.is_none() {
            let job: Job = bounded_json(&mut entry)?;
            if job.version != JOB_VERSION {
                return Err(io::Error::other(format!(
                    "a job of version {}: this worker takes version {JOB_VERSION} (`mvm builder \
                     fetch` with the host's mvm-build-worker)",
                    job.version
                )));
            }
            match job.request {
                JobRequest::Build(build) => request = Some(*build),
                // A probe is its request alone.
                JobRequest::Probe => {
                    return match entries.next() {
                        None => Ok(JobRequest::Probe),
                        Some(_) => Err(io::Error::other("a probe with entries after it")),
                    }
                }
            }
            continue;
        }
        let hex = path
            .strip_prefix("blobs/sha256/")
            .filter(|hex| mvm_ir::digest::is_sha256_hex(hex))
            .ok_or_else(|| io::Error::other(format!("an unexpected entry {path:?}")))?;
        let mut file = File::create(blobs.join("sha256").join(hex))?;
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = entry.read(&mut buffer)?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
            file.write_all(&buffer[..n])?;
        }
        if hex::encode(hasher.finalize()) != hex {
            return Err(io::Error::other(format!(
                "blob {hex} does not match its name"
            )));
        }
    }
    let request = request.ok_or_else(|| io::Error::other("no request"))?;
    let blobs_named = request.blobs.as_ref().is_none_or(|named| *named == blobs);
    let source = dir.join(SOURCE_DIR);
    let source_named = request
        .nix_eval
        .as_ref()
        .is_none_or(|eval| eval.package_set.parent() == Some(source.as_path()));
    if !blobs_named || !source_named || request.rootfs.out_dir != dir {
        return Err(io::Error::other("the request names other directories"));
    }
    Ok(JobRequest::Build(Box::new(request)))
}

/// A JSON document of at most [`MAX_REQUEST_BYTES`] from `from`.
fn bounded_json<T: serde::de::DeserializeOwned>(from: impl Read) -> io::Result<T> {
    let mut bytes = Vec::new();
    from.take(MAX_REQUEST_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_REQUEST_BYTES {
        return Err(io::Error::other("a document larger than its bound"));
    }
    serde_json::from_slice(&bytes).map_err(io::Error::other)
}

/// Writes a probe's answer: `probe.json`.
fn send_probe(to: impl Write, capabilities: &Capabilities) -> io::Result<()> {
    let mut tar = tar::Builder::new(BufWriter::new(to));
    let json = serde_json::to_vec(capabilities).map_err(io::Error::other)?;
    append(&mut tar, "probe.json", json.len() as u64, json.as_slice())?;
    tar.into_inner()?.flush()
}

/// Writes the answer tar: `answer.json`, the closure realised for a Nix image, and the image
/// when there is one.
fn send_answer(
    to: impl Write,
    answer: &Answer,
    realised: Option<&Realised>,
    image: Option<&Path>,
) -> io::Result<()> {
    let mut tar = tar::Builder::new(BufWriter::new(to));
    let json = serde_json::to_vec(answer).map_err(io::Error::other)?;
    append(&mut tar, "answer.json", json.len() as u64, json.as_slice())?;
    if let Some(realised) = realised {
        let json = serde_json::to_vec(realised).map_err(io::Error::other)?;
        append(&mut tar, "nix.json", json.len() as u64, json.as_slice())?;
    }
    if let Some(image) = image {
        let file = File::open(image)?;
        let size = file.metadata()?.len();
        append(&mut tar, "rootfs.erofs", size, file)?;
    }
    tar.into_inner()?.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A build request whose job directory is `dir`.
    fn guest_request(
        dir: &Path,
        blobs: Option<PathBuf>,
        nix_eval: Option<NixEval>,
    ) -> WorkerRequest {
        WorkerRequest {
            rootfs: RootfsRequest {
                reference: "oci:/x".into(),
                digest: format!("sha256:{}", "0".repeat(64)),
                base_dir: dir.into(),
                cache_dir: PathBuf::new(),
                out_dir: dir.into(),
                insecure_registries: vec![],
                progress: false,
                nix: None,
                compression: Default::default(),
            },
            blobs,
            nix_eval,
        }
    }

    /// `request.json` of a build job of this version.
    fn job_json(request: WorkerRequest) -> Vec<u8> {
        let job = Job {
            version: JOB_VERSION,
            request: JobRequest::Build(Box::new(request)),
        };
        serde_json::to_vec(&job).unwrap()
    }

    fn built(request: JobRequest) -> WorkerRequest {
        match request {
            JobRequest::Build(request) => *request,
            JobRequest::Probe => panic!("a probe, not a build"),
        }
    }

    /// A probe is its request alone, of this version, with no field unknown; its answer is
    /// read back as it was sent.
    #[test]
    fn a_probe_is_versioned_and_alone() {
        let dir = tempfile::tempdir().unwrap();
        let job = |json: &[u8], extra: bool| {
            let mut tar = tar::Builder::new(Vec::new());
            append(&mut tar, "request.json", json.len() as u64, json).unwrap();
            if extra {
                append(&mut tar, "blobs/sha256/00", 1, b"x".as_slice()).unwrap();
            }
            tar.into_inner().unwrap()
        };
        let probe = br#"{"version":1,"request":"probe"}"#;
        assert!(matches!(
            receive_job(job(probe, false).as_slice(), dir.path()).unwrap(),
            JobRequest::Probe
        ));
        assert!(receive_job(job(probe, true).as_slice(), dir.path()).is_err());
        let newer = br#"{"version":2,"request":"probe"}"#;
        let refused = receive_job(job(newer, false).as_slice(), dir.path()).unwrap_err();
        assert!(refused.to_string().contains("version 2"), "{refused}");
        let unknown = br#"{"version":1,"request":"probe","priority":9}"#;
        assert!(receive_job(job(unknown, false).as_slice(), dir.path()).is_err());

        let mut answer = Vec::new();
        let capabilities = Capabilities {
            version: JOB_VERSION,
            jobs: vec!["probe".into()],
            nix: "nix-store (Nix) 2.8.0".into(),
            store_paths: 3,
        };
        send_probe(&mut answer, &capabilities).unwrap();
        assert_eq!(receive_probe(answer.as_slice()).unwrap(), capabilities);
        let mut failed = Vec::new();
        let refusal = Answer::Failed {
            code: "BUILD004".into(),
            class: ErrorClass::Io,
            message: "reading the job".into(),
        };
        send_answer(&mut failed, &refusal, None, None).unwrap();
        let said = receive_probe(failed.as_slice()).unwrap_err();
        assert!(said.to_string().starts_with("BUILD004"), "{said}");
    }

    /// A job sent by the host side is read back by the guest side, and a blob altered on the
    /// way is refused.
    #[test]
    fn a_job_arrives_whole_and_an_altered_blob_is_refused() {
        let host = tempfile::tempdir().unwrap();
        let blobs = host.path().join("blobs");
        fs::create_dir_all(blobs.join("sha256")).unwrap();
        let blob = b"a layer";
        let hex = hex::encode(Sha256::digest(blob));
        fs::write(blobs.join("sha256").join(&hex), blob).unwrap();
        let guest = tempfile::tempdir().unwrap();
        let request = guest_request(guest.path(), Some(guest.path().join("blobs")), None);
        let json = job_json(request.clone());
        let mut job = Vec::new();
        send_job(&mut job, &json, Some(&blobs), None).unwrap();
        let got = built(receive_job(job.as_slice(), guest.path()).unwrap());
        assert_eq!(got.blobs, request.blobs);
        assert_eq!(
            fs::read(guest.path().join("blobs/sha256").join(&hex)).unwrap(),
            blob
        );

        let at = job.windows(blob.len()).position(|w| w == blob).unwrap();
        job[at] ^= 1;
        let refused = receive_job(job.as_slice(), guest.path()).unwrap_err();
        assert!(refused.to_string().contains("does not match"), "{refused}");
    }

    /// A package set's directory goes in: files with their executable bit, a symlink as a
    /// symlink, subdirectories (a read-only one too), not hidden entries; the request must name
    /// the package set inside it.
    #[test]
    fn a_package_sets_directory_goes_in_with_the_job() {
        use std::os::unix::fs::PermissionsExt;
        let host = tempfile::tempdir().unwrap();
        let set = host.path().join("set");
        fs::create_dir_all(set.join("bb")).unwrap();
        fs::write(set.join("pkgs.nix"), "{ }").unwrap();
        fs::write(set.join("bb/busybox"), b"\x7fELF").unwrap();
        fs::set_permissions(set.join("bb/busybox"), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", set.join("outside")).unwrap();
        fs::create_dir_all(set.join(".git")).unwrap();
        fs::write(set.join(".env"), "TOKEN=x").unwrap();
        fs::create_dir_all(set.join("sealed/inner")).unwrap();
        fs::write(set.join("sealed/inner/data"), "d").unwrap();
        for dir in ["sealed/inner", "sealed"] {
            fs::set_permissions(set.join(dir), fs::Permissions::from_mode(0o555)).unwrap();
        }
        let job = NixJob {
            package_set: set.join("pkgs.nix"),
            attrs: vec!["hello".into()],
        };
        let (dir, file) = source_dir(&job).unwrap();
        let entries = source_entries(&dir).unwrap();
        let names: Vec<String> = entries
            .iter()
            .map(|e| e.name.display().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "bb",
                "outside",
                "pkgs.nix",
                "sealed",
                "bb/busybox",
                "sealed/inner",
                "sealed/inner/data"
            ]
        );
        let guest = tempfile::tempdir().unwrap();
        let request = |package_set: PathBuf| {
            let eval = NixEval {
                package_set,
                attrs: job.attrs.clone(),
            };
            guest_request(guest.path(), None, Some(eval))
        };
        let sent = request(guest.path().join(SOURCE_DIR).join(&file));
        let mut tar = Vec::new();
        send_job(&mut tar, &job_json(sent.clone()), None, Some(&entries)).unwrap();
        let got = built(receive_job(tar.as_slice(), guest.path()).unwrap());
        assert_eq!(got.nix_eval, sent.nix_eval);
        let source = guest.path().join(SOURCE_DIR);
        assert_eq!(fs::read_to_string(source.join("pkgs.nix")).unwrap(), "{ }");
        let mode = fs::metadata(source.join("bb/busybox"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o111, 0o111);
        assert_eq!(
            fs::read_link(source.join("outside")).unwrap(),
            PathBuf::from("/etc/passwd")
        );
        assert_eq!(
            fs::read_to_string(source.join("sealed/inner/data")).unwrap(),
            "d"
        );
        assert!(!source.join(".env").exists() && !source.join(".git").exists());
        // The worker can empty the job afterwards.
        fs::remove_dir_all(&source).unwrap();
        for dir in ["sealed/inner", "sealed"] {
            fs::set_permissions(set.join(dir), fs::Permissions::from_mode(0o755)).unwrap();
        }

        let elsewhere = request(PathBuf::from("/etc/pkgs.nix"));
        let mut tar = Vec::new();
        send_job(&mut tar, &job_json(elsewhere), None, Some(&entries)).unwrap();
        let refused = receive_job(tar.as_slice(), guest.path()).unwrap_err();
        assert!(
            refused.to_string().contains("other directories"),
            "{refused}"
        );

        let lookup = NixJob {
            package_set: PathBuf::from("<nixpkgs>"),
            attrs: vec![],
        };
        assert!(source_dir(&lookup)
            .unwrap_err()
            .contains("--nix-packages FILE"));
    }

    /// The host takes the VM's closure only for the packages it asked for, their outputs in
    /// it, every path a store path with a sha256 NAR hash.
    #[test]
    fn a_closure_from_the_vm_is_checked_against_the_job() {
        use crate::nix_image::{ClosurePath, NixClosure, NixPackage};
        let out = "/nix/store/0c2jxfbk5w6y9wsvnq4dlrqgfb3y0ff6-hello".to_string();
        let realised = Realised {
            closure: NixClosure {
                store_root: PathBuf::from("/"),
                packages: vec![NixPackage {
                    attr: "hello".into(),
                    drv: "/nix/store/1c2jxfbk5w6y9wsvnq4dlrqgfb3y0ff6-hello.drv".into(),
                    drv_sha256: "0".repeat(64),
                    outputs: [("out".to_string(), out.clone())].into(),
                }],
                paths: vec![ClosurePath {
                    path: out.clone(),
                    nar_sha256: "a".repeat(64),
                }],
            },
            built: vec![out.clone()],
        };
        let job = NixJob {
            package_set: PathBuf::from("/set/pkgs.nix"),
            attrs: vec!["hello".into()],
        };
        check_realised(&job, realised.clone()).unwrap();
        let other = NixJob {
            attrs: vec!["greet".into()],
            ..job.clone()
        };
        assert!(check_realised(&other, realised.clone()).is_err());
        let mut missing = realised.clone();
        missing.closure.paths.clear();
        assert!(check_realised(&job, missing).is_err());
        let mut bad_hash = realised.clone();
        bad_hash.closure.paths[0].nar_sha256 = "sha256:x".into();
        assert!(check_realised(&job, bad_hash).is_err());
        let mut not_a_path = realised.clone();
        not_a_path.closure.paths[0].path = "/etc/passwd".into();
        assert!(check_realised(&job, not_a_path).is_err());
        let mut twice = realised.clone();
        twice.closure.paths.push(twice.closure.paths[0].clone());
        assert!(check_realised(&job, twice).is_err());
        let mut stray = realised.clone();
        stray.built = vec!["/nix/store/2c2jxfbk5w6y9wsvnq4dlrqgfb3y0ff6-other".into()];
        assert!(check_realised(&job, stray).is_err());
        let mut elsewhere = realised.clone();
        elsewhere.closure.store_root = PathBuf::from("/tmp/store");
        assert!(check_realised(&job, elsewhere).is_err());
        let mut not_a_drv = realised;
        not_a_drv.closure.packages[0].drv = out.clone();
        assert!(check_realised(&job, not_a_drv).is_err());
    }

    /// Only an answer and an image come back; anything else in the answer tar is refused.
    /// A job's directory is claimed beside the others: an abandoned one goes, one a job
    /// holds stays, and the same directory cannot be claimed twice.
    #[test]
    fn abandoned_job_directories_go_and_held_ones_stay() {
        let jobs = tempfile::tempdir().unwrap();
        let held = jobs.path().join(format!("mvm-job-{}", "a".repeat(32)));
        let abandoned = jobs.path().join(format!("mvm-job-{}", "b".repeat(32)));
        let other = jobs.path().join("mvm-other");
        for dir in [&abandoned, &other] {
            fs::create_dir_all(dir.join("blobs")).unwrap();
        }
        let holding = claim_job_dir(&held).unwrap();
        let mine = jobs.path().join(format!("mvm-job-{}", "c".repeat(32)));
        let _claimed = claim_job_dir(&mine).unwrap();
        assert!(held.exists() && mine.exists() && other.exists());
        assert!(!abandoned.exists());
        assert!(claim_job_dir(&held).is_err());
        drop(holding);
    }

    #[test]
    fn an_answer_with_anything_else_is_refused() {
        let out = tempfile::tempdir().unwrap();
        let answer = Answer::Failed {
            code: "LAYER001".into(),
            class: ErrorClass::InvalidInput,
            message: "refused".into(),
        };
        let mut bytes = Vec::new();
        send_answer(&mut bytes, &answer, None, None).unwrap();
        assert!(matches!(
            receive_answer(bytes.as_slice(), out.path()).unwrap(),
            (Answer::Failed { .. }, None)
        ));
        let mut tar = tar::Builder::new(Vec::new());
        append(&mut tar, "extra.txt", 1, b"x".as_slice()).unwrap();
        let bytes = tar.into_inner().unwrap();
        assert!(receive_answer(bytes.as_slice(), out.path()).is_err());
        assert!(fs::read_dir(out.path()).unwrap().next().is_none());
    }
}
