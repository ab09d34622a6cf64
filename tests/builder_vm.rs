//! The builder VM's image (`mvm builder fetch`): Nix, busybox and CA certificates with what
//! they depend on, from this host's apt, each `.deb` pinned (checked here against the
//! archive's own SHA256 field), plus the static build worker; built into a signed plan that
//! boots, and Nix runs in it. The same packages and worker give the same image, byte for byte;
//! a stored image off its pin is refused. `mvm build --persona vm` builds in it: the same bytes
//! as the host persona (from a layout, an archive and a registry), and hostile layers refused
//! with the same codes. `mvm dev up` keeps its
//! Nix store on a disk that outlives it, and a `nix_packages` workload realised by the VM's Nix
//! gives the host persona's bytes.

mod support;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use mvm_builder::testing::{layer_of, Entry, LocalRegistry, TestLayout};
use support::{describe, guest, text, wait};

#[test]
fn the_builder_vm_image_is_pinned_and_builds_the_same_bytes_as_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    guest::mvm_json(&home, &["kernel", "fetch"], 0);
    let worker = guest::static_worker().to_str().unwrap().to_string();

    let fetched = guest::mvm_json(&home, &["builder", "fetch", "--worker", &worker], 0);
    let manifest = &fetched["manifest"];
    let packages = manifest["packages"].as_array().unwrap();
    for wanted in ["nix-bin", "busybox-static", "ca-certificates", "libc6"] {
        assert!(
            packages.iter().any(|p| p["package"] == wanted),
            "{wanted} is missing: {manifest}"
        );
    }
    // Each pin is the archive's own: apt's index says the same SHA256 for that version.
    for pinned in packages
        .iter()
        .filter(|p| p["package"] == "nix-bin" || p["package"] == "libc6")
    {
        let name = pinned["package"].as_str().unwrap();
        let version = pinned["version"].as_str().unwrap();
        let shown = Command::new("apt-cache")
            .args(["show", &format!("{name}={version}")])
            .output()
            .unwrap();
        let sha = text(&shown.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("SHA256: ").map(str::to_string))
            .unwrap_or_else(|| panic!("{}", describe(&shown)));
        assert_eq!(pinned["sha256"], format!("sha256:{sha}"), "{pinned}");
    }
    let worker_digest = format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
            fs::read(&worker).unwrap()
        ))
    );
    assert_eq!(manifest["worker_sha256"], worker_digest.as_str());
    let bundle = &fetched["bundle"];
    let plan = home.join("builder/bundle/plan.dsse.json");
    assert!(plan.is_file(), "{fetched}");

    // The same packages and worker: the same image, rootfs and verity root.
    let again = guest::mvm_json(&home, &["builder", "fetch", "--worker", &worker], 0);
    assert_eq!(again["manifest"]["image_digest"], manifest["image_digest"]);
    assert_eq!(again["bundle"]["rootfs_digest"], bundle["rootfs_digest"]);
    assert_eq!(again["bundle"]["root_hash"], bundle["root_hash"]);

    let doctor = guest::mvm(&home, &["--json", "doctor"]);
    let doctor: serde_json::Value = serde_json::from_slice(&doctor.stdout).unwrap();
    let row = doctor["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "builder-image")
        .cloned()
        .unwrap_or_default();
    assert_eq!(row["status"], "ok", "{doctor}");

    // The worker and the CA bundle are where they belong in the image's layers.
    let (worker_mode, certificates) = image_files(&home.join("builder/image/blobs/sha256"));
    assert_eq!(worker_mode, Some(0o755));
    assert!(certificates > 100, "{certificates} certificates");
    // Its plan is no shell: clients run the worker and nothing else.
    let plan_arg = plan.to_str().unwrap();
    let shell = guest::mvm_json(&home, &["run", "--plan", plan_arg, "--", "sh"], 125);
    assert_eq!(shell["error"]["code"], "RUN029", "{shell}");
    let plan_payload = support::dsse_payload(&plan);
    assert_eq!(
        plan_payload["policy"]["grants"]["any_command"], false,
        "{plan_payload}"
    );

    // Builds in the builder VM: the same image and verity tree as the host persona's, a plan
    // that differs only in its nonce and window, and it boots.
    let layout = TestLayout::new();
    let busybox = format!(
        "oci:{}@{}",
        layout.dir.path().display(),
        layout.busybox_with(&["cat", "echo"])
    );
    let bundle_of = |persona: &str| {
        let out = dir.path().join(persona);
        let built = guest::mvm_json(
            &home,
            &[
                "build",
                "--image",
                &busybox,
                "--persona",
                persona,
                "--out",
                out.to_str().unwrap(),
                "--",
                "echo",
                "built in the builder VM",
            ],
            0,
        );
        (out, built)
    };
    let (in_vm, vm_report) = bundle_of("vm");
    let (on_host, host_report) = bundle_of("host");
    for file in ["rootfs.erofs", "rootfs.verity"] {
        assert!(
            fs::read(in_vm.join(file)).unwrap() == fs::read(on_host.join(file)).unwrap(),
            "{file} differs between the personas"
        );
    }
    assert_eq!(vm_report["root_hash"], host_report["root_hash"]);
    let plan_of = |bundle: &Path| {
        let mut plan = support::dsse_payload(&bundle.join("plan.dsse.json"));
        for moving in ["nonce", "valid_from", "valid_until"] {
            plan.as_object_mut().unwrap().remove(moving);
        }
        plan
    };
    assert_eq!(plan_of(&in_vm), plan_of(&on_host));
    // Its provenance names the builder VM: its signed plan and its image.
    assert_built_by(
        &in_vm,
        &again["bundle"]["plan_digest"],
        &manifest["image_digest"],
    );
    let plan = in_vm.join("plan.dsse.json");
    let ran = guest::mvm(&home, &["run", "--plan", plan.to_str().unwrap()]);
    assert!(ran.status.success(), "{}", describe(&ran));
    assert_eq!(text(&ran.stdout), "built in the builder VM\n");

    // A builder VM killed mid-build fails the build with a code and publishes nothing; the
    // next build succeeds. Restored from its boot snapshot, a builder VM builds this image in
    // about a second: the build is held (SIGSTOP) as soon as its VM is there, so that the VM is
    // removed before the build can end, then let go on (SIGCONT) to find it gone.
    let killed = dir.path().join("killed");
    let build = guest::command(
        &home,
        &[
            "--json",
            "build",
            "--image",
            &busybox,
            "--persona",
            "vm",
            "--out",
            killed.to_str().unwrap(),
        ],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let pid = rustix::process::Pid::from_child(&build);
    let deadline = std::time::Instant::now() + wait::EVENTUALLY;
    let builder = loop {
        let entry = fs::read_dir(home.join("vms"))
            .into_iter()
            .flatten()
            .flatten()
            .find(|entry| entry.path().join("state.json").exists());
        if let Some(entry) = entry {
            break entry.file_name().to_string_lossy().into_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no builder VM appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    };
    rustix::process::kill_process(pid, rustix::process::Signal::STOP).unwrap();
    let removed = guest::mvm(&home, &["rm", "--force", &builder]);
    rustix::process::kill_process(pid, rustix::process::Signal::CONT).unwrap();
    assert!(removed.status.success(), "{}", describe(&removed));
    let failed = build.wait_with_output().unwrap();
    assert_eq!(failed.status.code(), Some(74), "{}", describe(&failed));
    let said: serde_json::Value = serde_json::from_slice(&failed.stdout).unwrap();
    assert_eq!(said["error"]["code"], "BUILD004", "{said}");
    assert!(
        !killed.exists(),
        "a failed build published {}",
        killed.display()
    );
    let (_, rebuilt) = bundle_of("vm");
    assert_eq!(rebuilt["root_hash"], vm_report["root_hash"]);

    // `mvm dev up`: a builder that stays up. `--persona auto` builds in it (the same bytes),
    // each job in a directory of its own, removed after; after `mvm dev down` it builds on the
    // host, saying so.
    let _builder = guest::RemoveOnDrop {
        home: &home,
        name: "mvm-builder",
    };
    let up = guest::mvm(&home, &["dev", "up"]);
    assert!(up.status.success(), "{}", describe(&up));
    let status = guest::mvm_json(&home, &["dev", "status"], 0);
    assert_eq!(status["vm"]["phase"], "running", "{status}");
    // Its worker answers a probe: the job version, what it takes, its Nix, an empty store.
    let worker = &status["worker"];
    assert_eq!(worker["version"], 1, "{status}");
    assert_eq!(
        worker["jobs"],
        serde_json::json!([
            "build_oci",
            "build_nix",
            "probe",
            "store",
            "collect_garbage"
        ]),
        "{status}"
    );
    assert!(
        worker["nix"]
            .as_str()
            .is_some_and(|nix| nix.starts_with("nix-store (Nix) 2.")),
        "{status}"
    );
    assert_eq!(worker["store_paths"], 0, "{status}");
    assert_eq!(worker["jobs_running"], 0, "{status}");
    let (in_dev, _) = bundle_of("auto");
    assert!(
        fs::read(in_dev.join("rootfs.erofs")).unwrap()
            == fs::read(on_host.join("rootfs.erofs")).unwrap()
    );
    // The same image as an `oci-archive:` goes into the builder whole, which unpacks it: the
    // same bytes again.
    let archive = dir.path().join("busybox.tar");
    support::tar_dir(layout.dir.path(), &archive);
    let from_archive = dir.path().join("from-archive");
    let archived = guest::mvm_json(
        &home,
        &[
            "build",
            "--image",
            &format!(
                "oci-archive:{}@{}",
                archive.display(),
                busybox.rsplit_once('@').unwrap().1
            ),
            "--persona",
            "vm",
            "--out",
            from_archive.to_str().unwrap(),
        ],
        0,
    );
    assert_eq!(archived["root_hash"], vm_report["root_hash"], "{archived}");
    // And from a registry on loopback: the host pulls and checks each blob, the builder gets
    // exactly those; the same bytes as the host persona's build of it.
    let registry = LocalRegistry::start();
    let pushed = TestLayout::new();
    let digest = pushed.busybox_with(&["cat", "echo"]);
    let size = fs::metadata(pushed.blob_path(&digest)).unwrap().len();
    fs::write(
        pushed.dir.path().join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{digest}","size":{size},"annotations":{{"org.opencontainers.image.ref.name":"1"}}}}]}}"#
        ),
    )
    .unwrap();
    registry.push(pushed.dir.path(), "1", "mvm/busybox");
    let pulled = format!("{}/mvm/busybox@{digest}", registry.address);
    let from_registry = |persona: &str| {
        let out = dir.path().join(format!("registry-{persona}"));
        guest::mvm_json(
            &home,
            &[
                "build",
                "--image",
                &pulled,
                "--persona",
                persona,
                "--out",
                out.to_str().unwrap(),
            ],
            0,
        );
        fs::read(out.join("rootfs.erofs")).unwrap()
    };
    assert!(
        from_registry("vm") == from_registry("host"),
        "the registry image differs between the personas"
    );

    // Hostile layers are refused in the VM with the host's codes: a hardlink to nothing, a
    // symlink climbing out of the root, the same path twice.
    let corpus = [
        layer_of(&[Entry::Hardlink("etc/passwd", "missing/target")]),
        layer_of(&[
            Entry::Symlink("etc", "../../outside"),
            Entry::File("etc/passwd", b"x", 0o644),
        ]),
        layer_of(&[Entry::File("a", b"x", 0o644), Entry::File("a", b"y", 0o644)]),
    ];
    let mut codes = BTreeSet::new();
    for (n, hostile) in corpus.into_iter().enumerate() {
        let (digest, _) = layout.image(
            "amd64",
            &[(
                "application/vnd.oci.image.layer.v1.tar",
                hostile.clone(),
                hostile,
            )],
        );
        let reference = format!("oci:{}@{digest}", layout.dir.path().display());
        let refused = |persona: &str| {
            let out = dir.path().join(format!("hostile-{n}-{persona}"));
            let failed = guest::mvm(
                &home,
                &[
                    "--json",
                    "build",
                    "--image",
                    &reference,
                    "--persona",
                    persona,
                    "--out",
                    out.to_str().unwrap(),
                ],
            );
            assert_eq!(failed.status.code(), Some(65), "{}", describe(&failed));
            assert!(!out.exists(), "a refused build left {}", out.display());
            let said: serde_json::Value = serde_json::from_slice(&failed.stdout).unwrap();
            said["error"]["code"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        };
        let code = refused("vm");
        assert!(code.starts_with("LAYER"), "{code}");
        assert_eq!(code, refused("host"));
        codes.insert(code);
    }
    assert_eq!(codes.len(), 3, "{codes:?}");
    let provenance = support::dsse_payload(&in_dev.join("provenance.dsse.json"));
    let internal = &provenance["predicate"]["buildDefinition"]["internalParameters"];
    assert_eq!(internal["persona"], "vm", "{provenance}");
    assert_eq!(
        internal["builder_vm"]["plan_digest"], status["vm"]["plan_digest"],
        "{provenance}"
    );
    // Each job's directory goes with it: the worker that removes it is not confined.
    let tmp = guest::mvm_json(&home, &["fs", "ls", "mvm-builder:/tmp"], 0);
    let names: Vec<&str> = tmp["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert!(names.contains(&".mvm-jobs.lock"), "{tmp}");
    assert!(
        !names.iter().any(|name| name.starts_with("mvm-job-")),
        "a job left its directory behind: {tmp}"
    );
    // No shell into the builder, and no file changed in it from outside.
    let shell = guest::mvm(&home, &["exec", "mvm-builder", "--", "sh", "-c", "true"]);
    assert_eq!(shell.status.code(), Some(125), "{}", describe(&shell));
    assert!(
        text(&shell.stderr).contains("AGENT117"),
        "{}",
        describe(&shell)
    );
    let mkdir = guest::mvm_json(&home, &["fs", "mkdir", "mvm-builder:/tmp/x"], 65);
    assert_eq!(mkdir["error"]["code"], "AGENT117", "{mkdir}");

    // A nix_packages workload: realised by the builder's own Nix on its store disk (mounted at
    // /nix), the same bytes as the host persona's Nix gives.
    // What the job does is said as it happens: its steps, and Nix's log.
    let nix = NixWorkload::new(dir.path());
    let built = nix.output(&home, "vm", &dir.path().join("nix-vm"), false);
    assert!(built.status.success(), "{}", describe(&built));
    let said = text(&built.stderr);
    let steps = [
        "builder: the job is in (",
        "builder: realising hello\n",
        "builder: hello is being built\n",
        "builder: building the image\n",
    ];
    let at: Vec<Option<usize>> = steps.iter().map(|step| said.find(step)).collect();
    assert!(
        at.iter().all(Option::is_some) && at.windows(2).all(|w| w[0] < w[1]),
        "{}",
        describe(&built)
    );
    let vm_nix: serde_json::Value = serde_json::from_slice(&built.stdout).unwrap();
    assert!(vm_nix["nix_built"].as_u64() >= Some(1), "{vm_nix}");
    // The store's valid paths, as the builder's Nix lists them: the package and its
    // derivation.
    let listed = guest::mvm_json(&home, &["dev", "store"], 0);
    let paths: Vec<&str> = listed["paths"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p.as_str())
        .collect();
    assert!(
        paths.iter().any(|p| p.ends_with("-hello"))
            && paths.iter().any(|p| p.ends_with("-hello.drv"))
            && paths.windows(2).all(|w| w[0] < w[1]),
        "{listed}"
    );
    let host_nix = nix.build(&home, "host", &dir.path().join("nix-host"));
    assert!(vm_nix["root_hash"].is_string(), "{vm_nix}");
    assert_eq!(vm_nix["root_hash"], host_nix["root_hash"]);
    // `auto` cannot send a host store in: it builds on the host, saying so.
    let auto = nix.output(&home, "auto", &dir.path().join("nix-auto"), true);
    assert!(auto.status.success(), "{}", describe(&auto));
    assert!(
        text(&auto.stderr).contains("realises only a package set file"),
        "{}",
        describe(&auto)
    );
    assert!(
        fs::read(dir.path().join("nix-vm/rootfs.erofs")).unwrap()
            == fs::read(dir.path().join("nix-host/rootfs.erofs")).unwrap(),
        "the Nix image differs between the personas"
    );

    // A build cancelled while the builder's Nix builds (SIGTERM, as Ctrl-C's SIGINT) ends its
    // job in the builder, fails with BUILD013 and publishes nothing.
    let cancelled = dir.path().join("cancelled");
    let mut slow = nix
        .command(&home, &nix.slow_app, "vm", &cancelled, false)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Its stderr line by line: the derivation's first line says Nix is building it.
    let (lines, said) = std::sync::mpsc::channel();
    let stderr = std::io::BufReader::new(slow.stderr.take().unwrap());
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        for line in stderr.lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let mut stderr = Vec::new();
    let deadline = std::time::Instant::now() + wait::EVENTUALLY;
    while !stderr.iter().any(|l: &String| l == "builder: slow starts") {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match said.recv_timeout(left) {
            Ok(line) => stderr.push(line),
            Err(_) => panic!("the slow derivation never started: {stderr:?}"),
        }
    }
    let status = guest::mvm_json(&home, &["dev", "status"], 0);
    assert_eq!(status["worker"]["jobs_running"], 1, "{status}");
    let pid = rustix::process::Pid::from_raw(slow.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let slow = slow.wait_with_output().unwrap();
    reader.join().unwrap();
    stderr.extend(said.try_iter());
    assert_eq!(
        slow.status.code(),
        Some(74),
        "{}: {stderr:?}",
        describe(&slow)
    );
    let said: serde_json::Value = serde_json::from_slice(&slow.stdout).unwrap();
    assert_eq!(said["error"]["code"], "BUILD013", "{said}");
    assert!(!cancelled.exists());
    wait::eventually("the cancelled job gone", wait::EVENTUALLY, || {
        let status = guest::mvm_json(&home, &["dev", "status"], 0);
        match status["worker"]["jobs_running"].as_u64() {
            Some(0) => Ok(()),
            _ => Err(status.to_string()),
        }
    });
    // The disks the store is one of: any ext4 file, mounted nosuid,nodev, the workload user's
    // to write, read-only with `:ro`; what the guest writes is in the host file after.
    let tools = layout.busybox_with(&["sh", "grep", "echo", "touch", "stat", "id"]);
    let tools_image = format!("oci:{}@{tools}", layout.dir.path().display());
    let tools_bundle = dir.path().join("tools");
    guest::mvm_json(
        &home,
        &[
            "build",
            "--image",
            &tools_image,
            "--out",
            tools_bundle.to_str().unwrap(),
        ],
        0,
    );
    let (data, readonly) = (dir.path().join("data.ext4"), dir.path().join("ro.ext4"));
    for disk in [&data, &readonly] {
        let made = Command::new(mkfs_ext4())
            .args(["-q", "-F"])
            .arg(disk)
            .arg("64M")
            .output()
            .unwrap();
        assert!(made.status.success(), "{}", describe(&made));
    }
    let script = "grep -E ' /(data|ro) ' /proc/mounts; echo kept > /data/file; \
                  touch /ro/file 2>/dev/null || echo read-only; \
                  [ \"$(stat -c %u /data)\" = \"$(id -u)\" ] && echo owned";
    // `mvm --json run` of the tools image with `disks`, its command `sh -c script`.
    let run_tools = |disks: &[String], script: &str| {
        let plan = tools_bundle.join("plan.dsse.json");
        let mut args = vec!["--json", "run", "--plan", plan.to_str().unwrap()];
        for disk in disks {
            args.extend(["--disk", disk.as_str()]);
        }
        args.extend(["--", "sh", "-c", script]);
        guest::mvm(&home, &args)
    };
    let ran = run_tools(
        &[
            format!("{}:/data", data.display()),
            format!("{}:/ro:ro", readonly.display()),
        ],
        script,
    );
    assert!(ran.status.success(), "{}", describe(&ran));
    let ran: serde_json::Value = serde_json::from_slice(&ran.stdout).unwrap();
    let said = ran["stdout"].as_str().unwrap_or_default();
    let lines: Vec<&str> = said.lines().collect();
    assert_eq!(lines.len(), 4, "{said}");
    assert!(lines[0].contains(" /data ext4 rw,nosuid,nodev"), "{said}");
    assert!(lines[1].contains(" /ro ext4 ro,nosuid,nodev"), "{said}");
    assert_eq!(&lines[2..], ["read-only", "owned"], "{said}");
    let debugfs = mkfs_ext4().with_file_name("debugfs");
    let kept = Command::new(debugfs)
        .args(["-R", "cat /file"])
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(text(&kept.stdout), "kept\n", "{}", describe(&kept));

    // The store disk serves the builder alone; its store is not reset while the builder is up.
    let store = home.join("builder/store.ext4");
    let second = run_tools(&[format!("{}:/nix", store.display())], "true");
    assert_eq!(second.status.code(), Some(125), "{}", describe(&second));
    let second: serde_json::Value = serde_json::from_slice(&second.stdout).unwrap();
    assert_eq!(second["error"]["code"], "RUN062", "{second}");
    assert!(
        second["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("attached to another VM")),
        "{second}"
    );
    let reset = guest::mvm_json(&home, &["dev", "reset"], 65);
    assert_eq!(reset["error"]["code"], "BUILDER007", "{reset}");
    guest::mvm_json(&home, &["dev", "down"], 0);
    let on_host_again = dir.path().join("after-down");
    let built = guest::mvm(
        &home,
        &[
            "build",
            "--image",
            &busybox,
            "--persona",
            "auto",
            "--out",
            on_host_again.to_str().unwrap(),
        ],
    );
    assert!(built.status.success(), "{}", describe(&built));
    assert!(
        text(&built.stderr).contains("no builder VM runs"),
        "{}",
        describe(&built)
    );

    // The store outlives the builder: up again, at another size (a plan of its own, from the
    // same image), the same workload realises nothing, and its image boots and runs. `mvm dev
    // reset` then removes the store. A size over the builder's profile is refused unbooted.
    let too_big = guest::mvm_json(&home, &["dev", "up", "--memory", "4096"], 65);
    assert_eq!(too_big["error"]["code"], "BUILD011", "{too_big}");
    let up = guest::mvm(&home, &["dev", "up", "--cpus", "2", "--memory", "1536"]);
    assert!(up.status.success(), "{}", describe(&up));
    let sized = guest::mvm_json(&home, &["dev", "status"], 0);
    assert_ne!(
        sized["vm"]["plan_digest"], status["vm"]["plan_digest"],
        "{sized}"
    );
    // Its store is the one the first builder filled: the workload's closure and derivations.
    assert!(
        sized["worker"]["store_paths"].as_u64() >= Some(3),
        "{sized}"
    );
    let sized_plans: Vec<_> = fs::read_dir(home.join("builder/sized"))
        .unwrap()
        .map(|entry| support::dsse_payload(&entry.unwrap().path().join("plan.dsse.json")))
        .collect();
    assert_eq!(sized_plans.len(), 1);
    assert_eq!(sized_plans[0]["resources"]["cpu_cores"], 2);
    assert_eq!(sized_plans[0]["resources"]["memory_mb"], 1536);
    assert_eq!(sized_plans[0]["policy"]["grants"]["any_command"], false);
    let again = nix.build(&home, "vm", &dir.path().join("nix-vm-again"));
    assert_eq!(again["nix_built"], 0, "{again}");
    assert_built_by(
        &dir.path().join("nix-vm-again"),
        &sized["vm"]["plan_digest"],
        &manifest["image_digest"],
    );
    assert!(again["root_hash"].is_string(), "{again}");
    assert_eq!(again["root_hash"], vm_nix["root_hash"]);
    let nix_plan = dir.path().join("nix-vm-again/plan.dsse.json");
    let ran = guest::mvm(&home, &["run", "--plan", nix_plan.to_str().unwrap()]);
    assert!(ran.status.success(), "{}", describe(&ran));
    assert_eq!(text(&ran.stdout), "hello from nix\n");
    // Its garbage collected: the builder keeps no roots, so the whole store goes.
    let collected = guest::mvm_json(&home, &["dev", "gc"], 0);
    assert!(collected["deleted"].as_u64() >= Some(3), "{collected}");
    assert_eq!(collected["left"], 0, "{collected}");
    let listed = guest::mvm_json(&home, &["dev", "store"], 0);
    assert_eq!(listed["paths"], serde_json::json!([]), "{listed}");
    guest::mvm_json(&home, &["dev", "down"], 0);
    let gone = guest::mvm_json(&home, &["dev", "gc"], 65);
    assert_eq!(gone["error"]["code"], "BUILDER008", "{gone}");
    let reset = guest::mvm_json(&home, &["dev", "reset"], 0);
    assert_eq!(reset["removed"], true, "{reset}");
    assert!(!store.exists());

    // A stored image that no longer matches its pin is refused, by `show` and by the doctor.
    let digest = manifest["image_digest"].as_str().unwrap();
    let blob = home
        .join("builder/image/blobs/sha256")
        .join(&digest["sha256:".len()..]);
    let mut bytes = fs::read(&blob).unwrap();
    bytes[10] ^= 1;
    fs::write(&blob, bytes).unwrap();
    let shown = guest::mvm_json(&home, &["builder", "show"], 1);
    assert_eq!(shown["error"]["code"], "BUILDER004", "{shown}");
    let doctor = guest::mvm(&home, &["--json", "doctor"]);
    assert_eq!(doctor.status.code(), Some(1), "{}", describe(&doctor));
}

/// A nix_packages workload whose one package is a script run by a static busybox the
/// package set holds: realised offline by the real Nix, on a private store on the host
/// persona's side.
struct NixWorkload {
    app: PathBuf,
    /// A workload whose package takes ten minutes to build: one to cancel.
    slow_app: PathBuf,
    package_set: PathBuf,
    store: PathBuf,
}

impl NixWorkload {
    fn new(dir: &Path) -> Self {
        let set = dir.join("package-set");
        fs::create_dir_all(set.join("bb")).unwrap();
        fs::copy("/bin/busybox", set.join("bb/busybox")).unwrap();
        fs::write(
            set.join("pkgs.nix"),
            r#"let bb = ./bb; in {
  hello = derivation {
    name = "hello";
    system = "x86_64-linux";
    builder = "${bb}/busybox";
    args = [ "sh" "-c" ''
      echo "hello is being built" >&2
      mkdir -p $out/bin
      printf '#!${bb}/busybox sh\necho hello from nix\n' > $out/bin/hello
      chmod 555 $out/bin/hello
    '' ];
  };
  slow = derivation {
    name = "slow";
    system = "x86_64-linux";
    builder = "${bb}/busybox";
    args = [ "sh" "-c" "echo slow starts >&2; ${bb}/busybox sleep 600; ${bb}/busybox mkdir $out" ];
  };
}
"#,
        )
        .unwrap();
        let app = |name: &str, package: &str| {
            let app = dir.join(name);
            fs::create_dir_all(&app).unwrap();
            fs::write(
                app.join("mvm.toml"),
                format!(
                    r#"schema_version = "0"
id = "{package}"
[[apps]]
name = "main"
entrypoints = [{{ kind = "command", command = ["{package}"] }}]
image = {{ kind = "nix_packages", packages = ["{package}"] }}
resources = {{ cpu_cores = 1, memory_mb = 256 }}
"#
                ),
            )
            .unwrap();
            app
        };
        let store = dir.join("host-store");
        fs::create_dir_all(&store).unwrap();
        Self {
            app: app("nix-app", "hello"),
            slow_app: app("slow-app", "slow"),
            package_set: set.join("pkgs.nix"),
            store,
        }
    }

    /// `mvm build` of the workload in `persona` (the host's on the private store), its report.
    fn build(&self, home: &Path, persona: &str, out: &Path) -> serde_json::Value {
        let built = self.output(home, persona, out, persona == "host");
        assert!(built.status.success(), "{}", describe(&built));
        serde_json::from_slice(&built.stdout).unwrap()
    }

    /// `mvm build` of the workload in `persona`, on the private store when `private_store`.
    fn output(&self, home: &Path, persona: &str, out: &Path, private_store: bool) -> Output {
        self.command(home, &self.app, persona, out, private_store)
            .output()
            .unwrap()
    }

    /// `mvm --json build` of the workload `app` in `persona`, on the private store when
    /// `private_store`.
    fn command(
        &self,
        home: &Path,
        app: &Path,
        persona: &str,
        out: &Path,
        private_store: bool,
    ) -> std::process::Command {
        let mut command = guest::command(home, &["--json", "build"]);
        command
            .arg(app)
            .args(["--persona", persona, "--nix-packages"])
            .arg(&self.package_set)
            .arg("--out")
            .arg(out)
            .env(
                "NIX_CONFIG",
                "build-users-group =\nsubstituters =\nexperimental-features = nix-command\n",
            );
        if private_store {
            command.arg("--nix-store").arg(&self.store);
        }
        command
    }
}

/// The build worker's mode and the number of certificates in the CA bundle, read from the
/// builder image's layers (uncompressed tars) in `blobs`.
fn image_files(blobs: &Path) -> (Option<u32>, usize) {
    let (mut worker_mode, mut certificates) = (None, 0);
    for blob in fs::read_dir(blobs).unwrap() {
        let file = fs::File::open(blob.unwrap().path()).unwrap();
        let mut archive = tar::Archive::new(file);
        let Ok(entries) = archive.entries() else {
            continue;
        };
        for entry in entries {
            let Ok(mut entry) = entry else { break };
            let path = entry.path().unwrap().to_string_lossy().into_owned();
            match path.trim_start_matches("./") {
                "usr/libexec/mvm/mvm-build-worker" => {
                    worker_mode = entry.header().mode().ok().map(|m| m & 0o7777)
                }
                "etc/ssl/certs/ca-certificates.crt" => {
                    let mut bundle = String::new();
                    std::io::Read::read_to_string(&mut entry, &mut bundle).unwrap();
                    certificates = bundle.matches("BEGIN CERTIFICATE").count();
                }
                _ => {}
            }
        }
    }
    (worker_mode, certificates)
}

/// `mkfs.ext4` of e2fsprogs, in the sbin directory a user's `PATH` may lack.
fn mkfs_ext4() -> PathBuf {
    ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"]
        .into_iter()
        .map(PathBuf::from)
        .find(|path| path.is_file())
        .expect("e2fsprogs must be installed (scripts/deps installs it)")
}

/// The provenance of `bundle` says it was built in the builder VM of `plan_digest`, from the
/// builder image `image_digest`.
fn assert_built_by(
    bundle: &Path,
    plan_digest: &serde_json::Value,
    image_digest: &serde_json::Value,
) {
    let provenance = support::dsse_payload(&bundle.join("provenance.dsse.json"));
    let internal = &provenance["predicate"]["buildDefinition"]["internalParameters"];
    assert_eq!(internal["persona"], "vm", "{provenance}");
    assert_eq!(
        &internal["builder_vm"]["plan_digest"], plan_digest,
        "{provenance}"
    );
    assert_eq!(
        &internal["builder_vm"]["image_digest"], image_digest,
        "{provenance}"
    );
}
