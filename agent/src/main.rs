//! `mvm-agent`: `/init` of the guest's initramfs.
//!
//! It boots the verified root (see [`mvm_agent::boot`]), reports it on the console, opens the
//! agent channel and serves the host (see [`mvm_agent::serve`]) until the host asks for a
//! power-off or goes away. Whatever fails is reported as one `mvm-agent: error <code>
//! <message>` line, followed by a power-off: PID 1 must never exit or panic, which would panic
//! the kernel.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;

use mvm_agent::boot::{self, console, devmapper, hardening, loopback, BootError, Booted};
use mvm_agent::proxy;
use mvm_agent::serve::seccomp::WorkloadFilter;
use mvm_agent::serve::{self, exec::Credentials, files::FileRoots, Ended, ServeConfig};
use mvm_protocol::{BootTimings, Integrity};

/// The unprivileged user and group every workload command runs as.
const WORKLOAD_USER: Credentials = Credentials {
    uid: 1000,
    gid: 1000,
};

fn main() {
    let started = boot::since_kernel_start();
    std::panic::set_hook(Box::new(|info| {
        let mut last_word = console::reopen();
        if let Some(console) = last_word.as_mut() {
            let _ = writeln!(
                console,
                "mvm-agent: error {} panic: {info}",
                boot::PANIC_CODE
            );
        }
        console::power_off(last_word.as_ref())
    }));
    let Ok(mut console) = console::Console::open() else {
        // Nowhere to say it: the power-off itself tells the host the guest failed early.
        console::power_off(None)
    };
    let booted = boot::run(started).and_then(|booted| {
        console.line(&format!("root ready {}", booted.verity.root_hash));
        if let Err(e) = loopback::bring_up() {
            // Commands still run; only what goes through 127.0.0.1 (the egress proxy, forwarded
            // ports) will not.
            console.line(&format!("warning: bringing the loopback interface up: {e}"));
        }
        prepare_for_workloads()?;
        // Compiled before the host is served: no command runs without the plan's filter.
        let filter = WorkloadFilter::of(&booted.policy).map_err(|e| BootError::System {
            what: "the workload's seccomp filter".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let channel = serve::channel::open()?;
        Ok((booted, filter, channel))
    });
    let (booted, workload_filter, mut channel) = match booted {
        Ok(ready) => ready,
        Err(error) => {
            console.error(&error);
            console.power_off()
        }
    };
    let config = ServeConfig {
        workload_user: Some(WORKLOAD_USER),
        file_roots: match booted.policy.files_anywhere {
            true => FileRoots::anywhere(),
            // Read from the verified root's own passwd.
            false => FileRoots::with_home_of(WORKLOAD_USER, std::path::Path::new("/etc/passwd")),
        },
        policy: booted.policy,
        workload_filter,
        trust: mvm_agent::serve::trust::TrustPaths::guest(),
        secret_dir: "/run/secrets".into(),
        reap_orphans: true,
        command_groups: Some(hardening::COMMAND_CGROUPS.into()),
        timings: timings(&booted),
        integrity: root_integrity,
        proxy_listen: proxy::LISTEN,
    };
    console.line(&format!("channel ready, boot ms {}", booted.timings));
    match serve::serve(&mut channel, &config) {
        Ok(Ended::PowerOff) => console.line("power-off requested"),
        Ok(Ended::HostGone) => console.line("the host closed the channel"),
        Err(error) => console.line(&format!("error {} {error}", error.code())),
    }
    console.power_off()
}

/// What every command can count on and cannot undo: a world-writable `/tmp` in the overlay;
/// the guest kernel's settings and the commands' cgroups ([`hardening`]); and `no_new_privs`
/// on the agent, inherited by everything it starts, so no set-uid program in the image can
/// take a command back to root.
fn prepare_for_workloads() -> Result<(), BootError> {
    let system = |what: &str| {
        let what = what.to_string();
        move |source| BootError::System { what, source }
    };
    fs::create_dir_all("/tmp").map_err(system("/tmp"))?;
    fs::set_permissions("/tmp", fs::Permissions::from_mode(0o1777)).map_err(system("/tmp"))?;
    hardening::apply()?;
    rustix::thread::set_no_new_privs(true).map_err(|e| BootError::System {
        what: "no_new_privs".into(),
        source: e.into(),
    })
}

fn timings(booted: &Booted) -> BootTimings {
    BootTimings {
        agent_ms: booted.timings.agent,
        modules_ms: booted.timings.modules,
        verity_ms: booted.timings.verity,
        root_ms: booted.timings.root,
        channel_ms: boot::since_kernel_start(),
    }
}

/// The verified root's state from dm-verity. A status that cannot be read counts as corrupted:
/// the host must not report a clean run it cannot vouch for.
fn root_integrity() -> Integrity {
    match devmapper::verity_corrupted(boot::ROOT_DM_NAME) {
        Ok(false) => Integrity::Intact,
        Ok(true) | Err(_) => Integrity::Corrupted,
    }
}
