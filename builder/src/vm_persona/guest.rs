//! The builder VM's side: [`serve_in_vm`], the worker's main there.
//!
//! It stays unconfined, to realise Nix and to pass the job's log on while it runs, and builds
//! the image in a child, this program in its host mode ([`crate::worker::serve`]), confined as
//! on the host: Landlock and seccomp hold per thread, so only a process of its own holds them
//! whole.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use mvm_ir::{Coded, ErrorClass};
use sha2::{Digest, Sha256};

use super::{
    append, bounded_json, Capabilities, Collected, Job, JobEvent, JobRequest, StoreListing,
    ARCHIVE_FILE, GUEST_JOB_PREFIX, JOB_VERSION, MAX_LISTED_PATHS, MAX_SOURCE_BYTES,
    MAX_SOURCE_ENTRIES, SOURCE_DIR,
};
use crate::log_lines::{forward_lines, LogSink};
use crate::nix_image::{NixImageError, NixStore, Realised};
use crate::rootfs::ROOTFS_FILE;
use crate::worker::{claim_dir, run_worker, Answer, WorkerRequest, MAX_REQUEST_BYTES};

/// The answer tar on stdout, shared with the threads that pass a job's log on as events.
pub(super) struct AnswerStream<W: Write>(Arc<Mutex<tar::Builder<W>>>);

impl<W: Write> Clone for AnswerStream<W> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<W: Write + Send + 'static> AnswerStream<W> {
    pub(super) fn new(to: W) -> Self {
        Self(Arc::new(Mutex::new(tar::Builder::new(to))))
    }

    /// Appends the entry `name` holding `bytes`, and flushes it to the host.
    pub(super) fn entry(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let mut tar = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        append(&mut tar, name, bytes.len() as u64, bytes)?;
        tar.get_mut().flush()
    }

    /// Sends `event`; a host that no longer reads learns nothing more, and the job goes on.
    pub(super) fn event(&self, event: &JobEvent) {
        if let Ok(json) = serde_json::to_vec(event) {
            let _ = self.entry("event.json", &json);
        }
    }

    /// Log lines as [`JobEvent::Log`] events.
    pub(super) fn log_sink(&self) -> LogSink {
        let stream = self.clone();
        LogSink::new(move |line| {
            stream.event(&JobEvent::Log {
                line: line.to_string(),
            })
        })
    }

    /// Appends `name` with the bytes of `file`, then ends the tar.
    fn finish(&self, file: Option<(&str, &Path)>) -> io::Result<()> {
        let mut tar = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((name, path)) = file {
            let file = File::open(path)?;
            let size = file.metadata()?.len();
            append(&mut tar, name, size, file)?;
        }
        tar.finish()?;
        tar.get_mut().flush()
    }
}

/// The worker's main in the builder VM (`mvm-build-worker --in-vm DIR`): read the job from
/// stdin into `DIR`, do it there, answer on stdout, and remove `DIR`.
pub fn serve_in_vm(dir: &str) -> ExitCode {
    let stream = AnswerStream::new(BufWriter::new(io::stdout()));
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
    let answered = match received {
        Ok((JobRequest::Probe, _)) => answer_json(&stream, "probe.json", &capabilities(job_dir)),
        Ok((JobRequest::Store, _)) => match store_listing() {
            Ok(listing) => answer_json(&stream, "store.json", &listing),
            Err(e) => answer_build(&stream, &failed(&e), None, None).map(|()| false),
        },
        Ok((JobRequest::CollectGarbage, _)) => match collect_garbage() {
            Ok(collected) => answer_json(&stream, "collected.json", &collected),
            Err(answer) => answer_build(&stream, &answer, None, None).map(|()| false),
        },
        Ok((JobRequest::Build(mut job), bytes)) => {
            stream.event(&JobEvent::Received { bytes });
            let (answer, realised) = build(&mut job, &stream);
            let image = job_dir.join(ROOTFS_FILE);
            let image = matches!(answer, Answer::Built { .. }).then_some(image.as_path());
            answer_build(&stream, &answer, realised.as_ref(), image).map(|()| image.is_some())
        }
        Err(e) => {
            let answer = Answer::Failed {
                code: "BUILD004".into(),
                class: ErrorClass::Io,
                message: format!("reading the job: {e}"),
            };
            answer_build(&stream, &answer, None, None).map(|()| false)
        }
    };
    if is_job_dir {
        let _ = fs::remove_dir_all(job_dir);
    }
    match answered {
        Ok(true) => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}

/// Answers with the one JSON entry `name`.
pub(super) fn answer_json<W: Write + Send + 'static>(
    stream: &AnswerStream<W>,
    name: &str,
    value: &impl serde::Serialize,
) -> io::Result<bool> {
    let json = serde_json::to_vec(value).map_err(io::Error::other)?;
    stream.entry(name, &json)?;
    stream.finish(None).map(|()| true)
}

/// Answers a build: `answer.json`, the closure realised for a Nix image, and the image when
/// there is one.
pub(super) fn answer_build<W: Write + Send + 'static>(
    stream: &AnswerStream<W>,
    answer: &Answer,
    realised: Option<&Realised>,
    image: Option<&Path>,
) -> io::Result<()> {
    let json = serde_json::to_vec(answer).map_err(io::Error::other)?;
    stream.entry("answer.json", &json)?;
    if let Some(realised) = realised {
        let json = serde_json::to_vec(realised).map_err(io::Error::other)?;
        stream.entry("nix.json", &json)?;
    }
    stream.finish(image.map(|image| ("rootfs.erofs", image)))
}

/// A cause the worker failed the job for, as its answer.
fn failed(e: &(impl Coded + std::fmt::Display)) -> Answer {
    Answer::Failed {
        code: e.code().to_string(),
        class: e.class(),
        message: e.to_string(),
    }
}

/// Builds `job`: realises a package set with the VM's Nix, then runs the confined worker on
/// it, each passing its log lines on.
fn build<W: Write + Send + 'static>(
    job: &mut WorkerRequest,
    stream: &AnswerStream<W>,
) -> (Answer, Option<Realised>) {
    // Temporary files go into the job, where the confined worker may write, as on the host;
    // Nix's own (its cache) too.
    std::env::set_var("TMPDIR", &job.rootfs.out_dir);
    std::env::set_var("HOME", &job.rootfs.out_dir);
    let log = stream.log_sink();
    // A Nix build holds the store from realising to staging: no garbage is collected meanwhile.
    let _store = match job
        .nix_eval
        .is_some()
        .then(|| store_lock(false))
        .transpose()
    {
        Ok(held) => held,
        Err(e) => {
            return (
                Answer::Failed {
                    code: "BUILD004".into(),
                    class: ErrorClass::Io,
                    message: format!("{STORE_LOCK}: {e}"),
                },
                None,
            )
        }
    };
    let realised = match realise(job, stream, &log) {
        Ok(realised) => realised,
        Err(e) => return (failed(&e), None),
    };
    stream.event(&JobEvent::Building);
    let answer = match std::env::current_exe().and_then(|exe| Ok((exe, io::pipe()?))) {
        Ok((exe, (reader, writer))) => {
            let forward = std::thread::spawn(move || forward_lines(reader, Some(&log), 0));
            let job = WorkerRequest {
                nix_eval: None,
                ..job.clone()
            };
            // The pipe's writer goes with the worker's command: when it returns, its log ends.
            let answer = run_worker(&exe, &[], &job, writer.into());
            let _ = forward.join();
            answer.unwrap_or_else(|e| failed(&e))
        }
        Err(e) => Answer::Failed {
            code: "BUILD004".into(),
            class: ErrorClass::Io,
            message: format!("starting the confined worker: {e}"),
        },
    };
    (answer, realised)
}

/// For a Nix image: realises the job's packages with the VM's Nix, on its store (`/nix`,
/// the builder's store disk when `mvm dev up` gave it one), and makes the job the closure's
/// to stage.
fn realise<W: Write + Send + 'static>(
    job: &mut WorkerRequest,
    stream: &AnswerStream<W>,
    log: &LogSink,
) -> Result<Option<Realised>, NixImageError> {
    let Some(eval) = &job.nix_eval else {
        return Ok(None);
    };
    stream.event(&JobEvent::Realising {
        packages: eval.attrs.clone(),
    });
    let nix =
        NixStore::new(None, eval.package_set.to_string_lossy().into_owned()).with_log(log.clone());
    let realised = nix.closure(&eval.attrs)?;
    job.rootfs.digest = realised.closure.digest();
    job.rootfs.nix = Some(realised.closure.clone());
    Ok(Some(realised))
}

/// What this worker can do, the paths in its store, and the jobs running beside the one in
/// `own` (whose directories are locked).
pub(super) fn capabilities(own: &Path) -> Capabilities {
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
    let jobs = own.parent().unwrap_or(Path::new("/"));
    let prefix = Path::new(GUEST_JOB_PREFIX)
        .file_name()
        .map(|p| p.as_encoded_bytes().to_vec())
        .unwrap_or_default();
    let jobs_running = fs::read_dir(jobs)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_name().as_encoded_bytes().starts_with(&prefix))
                .filter(|e| e.path() != own)
                .filter(|e| File::open(e.path()).is_ok_and(|dir| dir.try_lock().is_err()))
                .count() as u64
        })
        .unwrap_or(0);
    Capabilities {
        version: JOB_VERSION,
        jobs: [
            "build_oci",
            "build_nix",
            "probe",
            "store",
            "collect_garbage",
        ]
        .map(String::from)
        .to_vec(),
        nix,
        store_paths,
        jobs_running,
    }
}

/// Held shared by each Nix build from realising to staging, exclusive by a garbage collection.
const STORE_LOCK: &str = "/tmp/.mvm-store.lock";

/// Takes [`STORE_LOCK`]: shared, waiting for a collection to end; or exclusive, failing at
/// once when a build holds it.
fn store_lock(exclusive: bool) -> io::Result<File> {
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(STORE_LOCK)?;
    match exclusive {
        false => lock.lock_shared()?,
        true => lock.try_lock().map_err(io::Error::other)?,
    }
    Ok(lock)
}

/// Deletes every path of the VM's store (the builder keeps no roots), unless a Nix build holds
/// it (BUILDER009); what was deleted and what is left.
fn collect_garbage() -> Result<Collected, Answer> {
    let _collecting = store_lock(true).map_err(|_| Answer::Failed {
        code: "BUILDER009".into(),
        class: ErrorClass::InvalidInput,
        message: "a Nix build is running in the builder: collect its garbage once it ends".into(),
    })?;
    let before = store_listing().map_err(|e| failed(&e))?.paths.len() as u64;
    let out = mvm_ir::env::command("nix-store")
        .arg("--gc")
        .output()
        .map_err(|source| {
            failed(&NixImageError::NoNix {
                program: "nix-store".into(),
                source,
            })
        })?;
    if !out.status.success() {
        return Err(failed(&NixImageError::Nix {
            what: "collecting the store's garbage (nix-store --gc)".into(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        }));
    }
    let left = store_listing().map_err(|e| failed(&e))?.paths.len() as u64;
    Ok(Collected {
        deleted: before.saturating_sub(left),
        left,
    })
}

/// The valid paths of the VM's store, as its Nix lists them.
fn store_listing() -> Result<StoreListing, NixImageError> {
    let out = mvm_ir::env::command("nix")
        .args(["--extra-experimental-features", "nix-command"])
        .args(["path-info", "--all"])
        .output()
        .map_err(|source| NixImageError::NoNix {
            program: "nix".into(),
            source,
        })?;
    if !out.status.success() {
        return Err(NixImageError::Nix {
            what: "the store's paths (nix path-info --all)".into(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let mut paths: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    paths.sort();
    paths.dedup();
    paths.truncate(MAX_LISTED_PATHS);
    Ok(StoreListing { paths })
}

/// The name of the lock taken while a job directory is made and locked, or abandoned ones
/// are looked for, in the directory of the jobs.
const JOBS_LOCK: &str = ".mvm-jobs.lock";

/// Makes the job directory `dir` and locks it for as long as the returned file lives, first
/// removing the job directories beside it that no job holds: those of jobs that were killed
/// (a build cancelled with Ctrl-C, a host that went away), which a builder that stays up would
/// otherwise keep in its memory.
pub(super) fn claim_job_dir(dir: &Path) -> io::Result<File> {
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
/// package set's directory under `source/`; with the bytes of those.
pub(super) fn receive_job(from: impl Read, dir: &Path) -> io::Result<(JobRequest, u64)> {
    let blobs = dir.join("blobs");
    fs::create_dir_all(blobs.join("sha256"))?;
    let mut archive = tar::Archive::new(from);
    let mut request: Option<WorkerRequest> = None;
    let mut source_bytes = 0u64;
    let mut source_entries = 0usize;
    let mut bytes = 0u64;
    let mut archived = false;
    let mut entries = archive.entries()?;
    while let Some(entry) = entries.next() {
        let mut entry = entry?;
        let path = entry.path()?.to_string_lossy().into_owned();
        bytes += entry.header().size()?;
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
        if path == ARCHIVE_FILE && request.is_some() && !archived {
            archived = true;
            let mut file = File::create(dir.join(ARCHIVE_FILE))?;
            io::copy(&mut entry, &mut file)?;
            continue;
        }
        if path == "request.json" && request.is_none() {
            let job: Job = bounded_json(&mut entry, MAX_REQUEST_BYTES)?;
            if job.version != JOB_VERSION {
                return Err(io::Error::other(format!(
                    "a job of version {}: this worker takes version {JOB_VERSION} (`mvm builder \
                     fetch` with the host's mvm-build-worker)",
                    job.version
                )));
            }
            match job.request {
                JobRequest::Build(build) => request = Some(*build),
                // A probe or a store query is its request alone.
                alone => {
                    return match entries.next() {
                        None => Ok((alone, 0)),
                        Some(_) => Err(io::Error::other("a query with entries after it")),
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
    // An archive came exactly when the request names it as the job's own file.
    let archive = format!("oci-archive:{}", dir.join(ARCHIVE_FILE).display());
    let is_archive = request.rootfs.reference.starts_with("oci-archive:");
    let archive_named =
        archived == is_archive && (!is_archive || request.rootfs.reference == archive);
    if !blobs_named || !source_named || !archive_named || request.rootfs.out_dir != dir {
        return Err(io::Error::other("the request names other directories"));
    }
    Ok((JobRequest::Build(Box::new(request)), bytes))
}
