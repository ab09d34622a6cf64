use std::sync::Barrier;

use super::*;

/// A stopped VM named `name` in `home`, as a runner leaves one.
fn stopped_vm(home: &VmHome, name: &str) {
    let dir = home.dir(name).unwrap();
    std::fs::create_dir_all(&dir).unwrap();
    state::write(
        &dir,
        &VmState {
            name: name.into(),
            vm: format!("vm-{name}"),
            plan_digest: format!("sha256:{}", "0".repeat(64)),
            runner_pid: 0,
            phase: Phase::Stopped,
            backend: None,
            reason: None,
            started_at: "2026-12-07T00:00:00Z".into(),
            boot_snapshot: None,
        },
    )
    .unwrap();
}

/// Removers racing for one VM: one removes it, the others find no VM of that name (never a
/// host failure), and nothing of it is left, aside or not.
#[test]
fn one_of_racing_removers_removes_a_vm_and_the_others_find_it_gone() {
    let tmp = tempfile::tempdir().unwrap();
    let home = VmHome::new(MvmHome::at(tmp.path().to_path_buf()));
    for round in 0..8 {
        let name = format!("race-{round}");
        stopped_vm(&home, &name);
        let start = Barrier::new(4);
        let results: Vec<Result<(), NamedVmError>> = std::thread::scope(|scope| {
            let removers: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        start.wait();
                        home.get(&name).and_then(|vm| vm.remove(true))
                    })
                })
                .collect();
            removers.into_iter().map(|r| r.join().unwrap()).collect()
        });
        let removed = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(removed, 1, "{results:?}");
        for result in results.iter().filter_map(|r| r.as_ref().err()) {
            assert!(
                matches!(result, NamedVmError::Unavailable(m) if m.contains("no VM named")),
                "{result:?}"
            );
        }
        assert!(home.list(|_, _| {}).is_empty());
    }
    let left: Vec<_> = std::fs::read_dir(tmp.path().join("vms"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
