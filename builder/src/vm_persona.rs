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
use crate::rootfs::{write_verity, RootfsReport, RootfsRequest, ROOTFS_FILE};
use crate::worker::{
    check_outputs, claim_dir, pull_for_worker, run_job, Answer, SandboxReport, WorkerError,
    WorkerRequest, MAX_REQUEST_BYTES,
};

/// The start of a job's directory in the guest, `/tmp/mvm-job-<32 hex>` (the guest's `/tmp`
/// is its memory): a builder that stays up serves one build after another, or several at once.
const GUEST_JOB_PREFIX: &str = "/tmp/mvm-job-";

/// The largest image taken back from the VM.
const MAX_IMAGE_BYTES: u64 = 64 << 30;

/// Builds `request` in a builder VM: `launcher` gives the command that runs the worker there
/// as `--in-vm DIR` for the job directory `DIR` it is given. Its report (with the host's own
/// verity tree) and how the worker in the VM was confined.
pub fn build_in_vm(
    launcher: impl FnOnce(&str) -> Command,
    request: &RootfsRequest,
) -> Result<(RootfsReport, SandboxReport), WorkerError> {
    if request.nix.is_some() {
        return Err(WorkerError::Worker(
            "nix_packages images are not built in the builder VM yet: use --persona host".into(),
        ));
    }
    let blobs = pull_for_worker(request)?.ok_or_else(|| {
        WorkerError::Worker(
            "oci-archive: images are not built in the builder VM yet: use --persona host".into(),
        )
    })?;
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
        blobs: Some(guest.join("blobs")),
    };
    let request_json = serde_json::to_vec(&job).map_err(|e| WorkerError::Worker(e.to_string()))?;
    let mut child = launcher(&guest.to_string_lossy())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| WorkerError::Worker(format!("cannot start the builder VM: {e}")))?;
    let stdin = child.stdin.take();
    let blob_dir = blobs.dir.path().to_path_buf();
    let sender = std::thread::spawn(move || -> io::Result<()> {
        let Some(stdin) = stdin else {
            return Err(io::Error::other("no stdin"));
        };
        send_job(BufWriter::new(stdin), &request_json, &blob_dir)
    });
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| WorkerError::Worker("no stdout".into()))?;
    let received = receive_answer(stdout, &request.out_dir);
    let status = child.wait();
    // A builder VM that stopped reading its job makes the sender fail; its answer says why.
    let _ = sender.join();
    let answer = received.map_err(|e| {
        WorkerError::Worker(format!(
            "the builder VM's answer ({}): {e}",
            status.map_or_else(|e| e.to_string(), |s| s.to_string())
        ))
    })?;
    drop(blobs);
    let (report, sandbox) = answer.result(request)?;
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
    Ok((report, sandbox))
}

/// Writes the job tar: `request.json`, then every blob of `blobs` as `blobs/sha256/<hex>`.
fn send_job(to: impl Write, request_json: &[u8], blobs: &Path) -> io::Result<()> {
    let mut tar = tar::Builder::new(to);
    append(
        &mut tar,
        "request.json",
        request_json.len() as u64,
        request_json,
    )?;
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
    tar.into_inner()?.flush()
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

/// Reads the answer tar: the answer, and the image into `out_dir`; nothing else.
fn receive_answer(from: impl Read, out_dir: &Path) -> io::Result<Answer> {
    let mut archive = tar::Archive::new(from);
    let mut answer = None;
    for entry in archive.entries()? {
        let mut entry = entry?;
        if !entry.header().entry_type().is_file() {
            return Err(io::Error::other("an entry that is not a regular file"));
        }
        let path = entry.path()?.to_string_lossy().into_owned();
        match path.as_str() {
            "answer.json" if answer.is_none() => answer = Some(bounded_json(&mut entry)?),
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
    answer.ok_or_else(|| io::Error::other("no answer"))
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
    let answer = match received {
        Ok(job) => {
            // Temporary files go where the worker may write once confined, as on the host.
            std::env::set_var("TMPDIR", &job.rootfs.out_dir);
            run_job(&job)
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

/// Unpacks the job tar into `dir`: the request, and each blob checked against its name.
fn receive_job(from: impl Read, dir: &Path) -> io::Result<WorkerRequest> {
    let blobs = dir.join("blobs");
    fs::create_dir_all(blobs.join("sha256"))?;
    let mut archive = tar::Archive::new(from);
    let mut request: Option<WorkerRequest> = None;
    for entry in archive.entries()? {
        let mut entry = entry?;
        if !entry.header().entry_type().is_file() {
            return Err(io::Error::other("an entry that is not a regular file"));
        }
        let path = entry.path()?.to_string_lossy().into_owned();
        if path == "request.json" && request.is_none() {
            request = Some(bounded_json(&mut entry)?);
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
    let expected = Some(blobs);
    if request.blobs != expected || request.rootfs.out_dir != dir {
        return Err(io::Error::other("the request names other directories"));
    }
    Ok(request)
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

/// Writes the answer tar: `answer.json`, and the image when there is one.
fn send_answer(to: impl Write, answer: &Answer, image: Option<&Path>) -> io::Result<()> {
    let mut tar = tar::Builder::new(BufWriter::new(to));
    let json = serde_json::to_vec(answer).map_err(io::Error::other)?;
    append(&mut tar, "answer.json", json.len() as u64, json.as_slice())?;
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
        let request = WorkerRequest {
            rootfs: RootfsRequest {
                reference: "oci:/x".into(),
                digest: format!("sha256:{}", "0".repeat(64)),
                base_dir: guest.path().into(),
                cache_dir: PathBuf::new(),
                out_dir: guest.path().into(),
                insecure_registries: vec![],
                progress: false,
                nix: None,
                compression: Default::default(),
            },
            blobs: Some(guest.path().join("blobs")),
        };
        let json = serde_json::to_vec(&request).unwrap();
        let mut job = Vec::new();
        send_job(&mut job, &json, &blobs).unwrap();
        let got = receive_job(job.as_slice(), guest.path()).unwrap();
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
        send_answer(&mut bytes, &answer, None).unwrap();
        assert!(matches!(
            receive_answer(bytes.as_slice(), out.path()).unwrap(),
            Answer::Failed { .. }
        ));
        let mut tar = tar::Builder::new(Vec::new());
        append(&mut tar, "extra.txt", 1, b"x".as_slice()).unwrap();
        let bytes = tar.into_inner().unwrap();
        assert!(receive_answer(bytes.as_slice(), out.path()).is_err());
        assert!(fs::read_dir(out.path()).unwrap().next().is_none());
    }
}
