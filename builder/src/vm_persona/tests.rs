use super::guest::{answer_build, answer_json, claim_job_dir, receive_job, AnswerStream};
use super::*;
use std::sync::{Arc, Mutex};

/// A writer whose bytes the test reads after.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Shared {
    fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }
}

/// What the guest side streams when `answer` is given the stream.
fn streamed(answer: impl FnOnce(&AnswerStream<Shared>)) -> Vec<u8> {
    let out = Shared::default();
    answer(&AnswerStream::new(out.clone()));
    out.bytes()
}

/// A build request whose job directory is `dir`.
fn guest_request(dir: &Path, blobs: Option<PathBuf>, nix_eval: Option<NixEval>) -> WorkerRequest {
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
        other => panic!("{other:?}, not a build"),
    }
}

/// A probe and a store query are their request alone, of this version, with no field
/// unknown; their answers are read back as they were sent, after any events.
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
        (JobRequest::Probe, 0)
    ));
    assert!(receive_job(job(probe, true).as_slice(), dir.path()).is_err());
    let store = br#"{"version":1,"request":"store"}"#;
    assert!(matches!(
        receive_job(job(store, false).as_slice(), dir.path()).unwrap(),
        (JobRequest::Store, 0)
    ));
    assert!(receive_job(job(store, true).as_slice(), dir.path()).is_err());
    let gc = br#"{"version":1,"request":"collect_garbage"}"#;
    assert!(matches!(
        receive_job(job(gc, false).as_slice(), dir.path()).unwrap(),
        (JobRequest::CollectGarbage, 0)
    ));
    assert!(receive_job(job(gc, true).as_slice(), dir.path()).is_err());
    let newer = br#"{"version":2,"request":"probe"}"#;
    let refused = receive_job(job(newer, false).as_slice(), dir.path()).unwrap_err();
    assert!(refused.to_string().contains("version 2"), "{refused}");
    let unknown = br#"{"version":1,"request":"probe","priority":9}"#;
    assert!(receive_job(job(unknown, false).as_slice(), dir.path()).is_err());

    let capabilities = Capabilities {
        version: JOB_VERSION,
        jobs: vec!["probe".into()],
        nix: "nix-store (Nix) 2.8.0".into(),
        store_paths: 3,
        jobs_running: 1,
    };
    let answer = streamed(|stream| {
        stream.event(&JobEvent::Received { bytes: 1 });
        assert!(answer_json(stream, "probe.json", &capabilities).unwrap());
    });
    let read: Capabilities = receive_one(answer.as_slice(), "probe.json").unwrap();
    assert_eq!(read, capabilities);
    let listing = StoreListing {
        paths: vec![format!("/nix/store/{}-hello", "a".repeat(32))],
    };
    let answer = streamed(|stream| assert!(answer_json(stream, "store.json", &listing).unwrap()));
    let read: StoreListing = receive_one(answer.as_slice(), "store.json").unwrap();
    assert_eq!(read, listing);
    assert!(receive_one::<StoreListing>(answer.as_slice(), "probe.json").is_err());
    let refusal = Answer::Failed {
        code: "BUILD004".into(),
        class: ErrorClass::Io,
        message: "reading the job".into(),
    };
    let failed = streamed(|stream| answer_build(stream, &refusal, None, None).unwrap());
    let said = receive_one::<Capabilities>(failed.as_slice(), "probe.json").unwrap_err();
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
    send_job(&mut job, &json, Some(&blobs), None, None).unwrap();
    let got = built(receive_job(job.as_slice(), guest.path()).unwrap().0);
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

/// An `oci-archive:` image goes in as the job's own file, which the request must name; an
/// archive the request does not name, or a request naming one that did not come, is refused.
#[test]
fn an_archive_goes_in_as_the_jobs_own_file() {
    let host = tempfile::tempdir().unwrap();
    let archive = host.path().join("image.tar");
    fs::write(&archive, b"an archive").unwrap();
    let guest = tempfile::tempdir().unwrap();
    let mut request = guest_request(guest.path(), None, None);
    request.rootfs.reference = format!("oci-archive:{}", guest.path().join(ARCHIVE_FILE).display());
    let mut job = Vec::new();
    send_job(
        &mut job,
        &job_json(request.clone()),
        None,
        None,
        Some(&archive),
    )
    .unwrap();
    let (got, bytes) = receive_job(job.as_slice(), guest.path()).unwrap();
    assert_eq!(built(got).rootfs.reference, request.rootfs.reference);
    assert!(bytes >= 10);
    assert_eq!(
        fs::read(guest.path().join(ARCHIVE_FILE)).unwrap(),
        b"an archive"
    );

    let mut missing = Vec::new();
    send_job(&mut missing, &job_json(request.clone()), None, None, None).unwrap();
    assert!(receive_job(missing.as_slice(), guest.path()).is_err());
    let mut elsewhere = request.clone();
    elsewhere.rootfs.reference = "oci-archive:/etc/passwd".into();
    for archive in [None, Some(archive.as_path())] {
        let mut job = Vec::new();
        send_job(&mut job, &job_json(elsewhere.clone()), None, None, archive).unwrap();
        let refused = receive_job(job.as_slice(), guest.path()).unwrap_err();
        assert!(refused.to_string().contains("other"), "{refused}");
    }
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
    send_job(
        &mut tar,
        &job_json(sent.clone()),
        None,
        Some(&entries),
        None,
    )
    .unwrap();
    let got = built(receive_job(tar.as_slice(), guest.path()).unwrap().0);
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
    send_job(&mut tar, &job_json(elsewhere), None, Some(&entries), None).unwrap();
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
    let bytes = streamed(|stream| answer_build(stream, &answer, None, None).unwrap());
    assert!(matches!(
        receive_answer(bytes.as_slice(), out.path(), &mut |_| {}).unwrap(),
        (Answer::Failed { .. }, None)
    ));
    let mut tar = tar::Builder::new(Vec::new());
    append(&mut tar, "extra.txt", 1, b"x".as_slice()).unwrap();
    let bytes = tar.into_inner().unwrap();
    assert!(receive_answer(bytes.as_slice(), out.path(), &mut |_| {}).is_err());
    assert!(fs::read_dir(out.path()).unwrap().next().is_none());
}

/// The job's events come before its answer, in order, each as it was sent (a log line too,
/// which the receiver makes printable); an event after the answer, or one over its bound, is
/// refused.
#[test]
fn events_come_before_the_answer_and_are_bounded() {
    let out = tempfile::tempdir().unwrap();
    let answer = Answer::Failed {
        code: "NIXBUILD001".into(),
        class: ErrorClass::InvalidInput,
        message: "no such attribute".into(),
    };
    let sent = vec![
        JobEvent::Received { bytes: 10 },
        JobEvent::Realising {
            packages: vec!["hello".into()],
        },
        JobEvent::Log {
            line: "building '/nix/store/x.drv'\u{1b}[2J".into(),
        },
        JobEvent::Building,
    ];
    let bytes = streamed(|stream| {
        for event in &sent {
            stream.event(event);
        }
        answer_build(stream, &answer, None, None).unwrap()
    });
    let mut seen = Vec::new();
    let (got, _) = receive_answer(bytes.as_slice(), out.path(), &mut |e| seen.push(e)).unwrap();
    assert!(matches!(got, Answer::Failed { code, .. } if code == "NIXBUILD001"));
    assert_eq!(seen, sent);

    let late = streamed(|stream| {
        let json = serde_json::to_vec(&answer).unwrap();
        stream.entry("answer.json", &json).unwrap();
        stream.event(&JobEvent::Building);
    });
    let refused = receive_answer(late.as_slice(), out.path(), &mut |_| {}).unwrap_err();
    assert!(refused.to_string().contains("event.json"), "{refused}");

    let flood = streamed(|stream| {
        stream.event(&JobEvent::Log {
            line: "x".repeat(MAX_EVENT_BYTES as usize),
        })
    });
    let refused = receive_answer(flood.as_slice(), out.path(), &mut |_| {}).unwrap_err();
    assert!(refused.to_string().contains("bound"), "{refused}");
    let unknown = streamed(|stream| {
        stream
            .entry("event.json", br#"{"progress":{"percent":50}}"#)
            .unwrap()
    });
    assert!(receive_answer(unknown.as_slice(), out.path(), &mut |_| {}).is_err());
}
