//! Sandboxes: named VMs with labels, environment and a time to live. Creating one builds its
//! image into a signed bundle (through the [`Launcher`]) and starts a runner, exactly as
//! `mvm up` does; every other verb is the runner library's [`NamedVm`]. A sandbox's own
//! record — labels, environment, timeout — lives beside its VM (`vms/<id>/client.json`, 0600)
//! and goes with it.

use std::collections::BTreeMap;
use std::path::Path;

use mvm_ir::fsutil::{atomic_write, read_capped};
use mvm_ir::policy::Profile;
use mvm_runner::disk::VolumeSpec;
use mvm_runner::named_vm::{NamedVm, NamedVmError, VmHome};
use mvm_runner::secrets::SecretRef;
use mvm_runner::state::{valid_name, Phase, VmState};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::error::ApiError;
use crate::model::{CreateSandbox, Sandbox};
use crate::Launcher;

/// A sandbox's record, beside its VM (its runner leaves it there when it ends).
pub const RECORD_FILE: &str = mvm_runner::state::CLIENT_RECORD;
/// How long a sandbox lives when its creator says nothing (E2B's default too).
pub const DEFAULT_TIMEOUT_S: u64 = 300;
/// The longest timeout taken: a day.
pub const MAX_TIMEOUT_S: u64 = 86_400;
/// The most labels, and the most environment variables, one sandbox takes.
const MAX_ENTRIES: usize = 256;
/// The largest label or variable, name and value together.
const MAX_ENTRY_BYTES: usize = 32 * 1024;
/// The most volumes one sandbox attaches: as many as a VM takes disks.
const MAX_VOLUMES: usize = mvm_runner::disk::MAX_DISKS;

/// What the API keeps about a sandbox beyond its VM's state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// Its labels.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// The environment of every command run in it.
    #[serde(default)]
    pub envs: BTreeMap<String, String>,
    /// Its time to live in seconds; 0 for none.
    #[serde(default)]
    pub timeout_s: u64,
    /// When it is removed (seconds since the epoch), while it has a timeout and is not cold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
}

impl Record {
    /// Its record in `dir`; an empty one for a VM not made through the API (`mvm up`).
    pub fn read(dir: &Path) -> Result<Record, ApiError> {
        match read_capped(&dir.join(RECORD_FILE), 4 << 20, "sandbox record") {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| ApiError::Host(format!("{}: {e}", dir.join(RECORD_FILE).display()))),
            Err(mvm_ir::Error::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(Record::default())
            }
            Err(e) => Err(ApiError::Host(e.to_string())),
        }
    }

    /// Writes it beside the VM, atomically, readable by its owner only (the environment
    /// may hold credentials).
    pub fn write(&self, dir: &Path) -> Result<(), ApiError> {
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| ApiError::Host(e.to_string()))?;
        atomic_write(&dir.join(RECORD_FILE), &bytes, 0o600)
            .map_err(|e| ApiError::Host(e.to_string()))
    }

    /// Starts its clock again: it expires `timeout_s` from now.
    fn restart_clock(&mut self) {
        self.expires_at = (self.timeout_s > 0)
            .then(|| OffsetDateTime::now_utc().unix_timestamp() + self.timeout_s as i64);
    }
}

/// The sandboxes of one mvm home.
pub struct Sandboxes {
    vms: VmHome,
    launcher: Box<dyn Launcher>,
}

impl Sandboxes {
    /// The sandboxes of `vms`, created through `launcher`.
    pub fn new(vms: VmHome, launcher: Box<dyn Launcher>) -> Self {
        Sandboxes { vms, launcher }
    }

    /// Creates and starts one; returns once its agent is ready. Blocking: an image may be
    /// built first.
    pub fn create(&self, spec: &CreateSandbox) -> Result<Sandbox, ApiError> {
        check_spec(spec)?;
        let id = match &spec.id {
            Some(id) => id.clone(),
            None => fresh_id()?,
        };
        if !valid_name(&id) {
            return Err(NamedVmError::BadName(id).into());
        }
        self.vms.check_free(&id)?;
        let runner = self.launcher.runner_for(&id, spec)?;
        let ready = self.vms.start(runner).map_err(launch_error)?;
        let vm = self.vms.get(&id)?;
        let mut record = Record {
            metadata: spec.metadata.clone(),
            envs: spec.envs.clone(),
            timeout_s: spec.timeout_s.unwrap_or(DEFAULT_TIMEOUT_S),
            expires_at: None,
        };
        record.restart_clock();
        if let Err(e) = record.write(vm.dir()) {
            // A sandbox without its record would live forever, unlabelled: not left behind.
            let _ = vm.remove(true);
            return Err(e);
        }
        Ok(describe(&ready, &record))
    }

    /// Every named VM as a sandbox, by id; with `labels`, only those that carry them all;
    /// with `state`, only those in it.
    pub fn list(
        &self,
        labels: &BTreeMap<String, String>,
        state: Option<&str>,
    ) -> Result<Vec<Sandbox>, ApiError> {
        let mut found = Vec::new();
        for seen in self.vms.list(|_, _| {}) {
            let Ok(vm) = self.vms.get(&seen.name) else {
                continue;
            };
            let record = Record::read(vm.dir()).unwrap_or_default();
            let matches = labels
                .iter()
                .all(|(key, value)| record.metadata.get(key) == Some(value))
                && state.is_none_or(|state| state == seen.phase.name());
            if matches {
                found.push(describe(&seen, &record));
            }
        }
        Ok(found)
    }

    /// The sandbox `id`.
    pub fn get(&self, id: &str) -> Result<Sandbox, ApiError> {
        let vm = self.vms.get(id)?;
        Ok(describe(&vm.state()?, &Record::read(vm.dir())?))
    }

    /// The VM behind the sandbox `id`.
    pub fn vm(&self, id: &str) -> Result<NamedVm, ApiError> {
        Ok(self.vms.get(id)?)
    }

    /// The environment every command in `id` gets.
    pub fn envs(&self, id: &str) -> Result<BTreeMap<String, String>, ApiError> {
        Ok(Record::read(self.vms.get(id)?.dir())?.envs)
    }

    /// Stops it if it runs and removes it.
    pub fn kill(&self, id: &str) -> Result<(), ApiError> {
        Ok(self.vms.get(id)?.remove(true)?)
    }

    /// Pauses it; `cold` saves it to disk, where it does not expire.
    pub fn pause(&self, id: &str, cold: bool) -> Result<Sandbox, ApiError> {
        let vm = self.vms.get(id)?;
        let seen = vm.pause(cold)?;
        let mut record = Record::read(vm.dir())?;
        if cold {
            record.expires_at = None;
            record.write(vm.dir())?;
        }
        Ok(describe(&seen, &record))
    }

    /// Lets it run again, from paused or from cold (a new runner wakes it); a sandbox woken
    /// from cold gets its whole timeout again.
    pub fn resume(&self, id: &str) -> Result<Sandbox, ApiError> {
        let vm = self.vms.get(id)?;
        let seen = vm.state()?;
        let mut record = Record::read(vm.dir())?;
        let seen = if !seen.phase.is_live() && vm.is_saved() {
            let ready = self
                .vms
                .start(self.launcher.waker(id)?)
                .map_err(launch_error)?;
            record.restart_clock();
            record.write(vm.dir())?;
            ready
        } else {
            vm.resume()?
        };
        Ok(describe(&seen, &record))
    }

    /// Gives it `timeout_s` more seconds from now (0: no limit).
    pub fn set_timeout(&self, id: &str, timeout_s: u64) -> Result<Sandbox, ApiError> {
        check_timeout(timeout_s)?;
        let vm = self.vms.get(id)?;
        let seen = vm.state()?;
        let mut record = Record::read(vm.dir())?;
        record.timeout_s = timeout_s;
        if seen.phase == Phase::Cold {
            record.expires_at = None;
        } else {
            record.restart_clock();
        }
        record.write(vm.dir())?;
        Ok(describe(&seen, &record))
    }

    /// Removes every sandbox whose time is up (not the cold ones, whose clock is stopped);
    /// returns their ids. Whether any sandbox still has a clock running is the second part:
    /// while one has, the server must stay up to end it.
    pub fn reap(&self, now: i64) -> (Vec<String>, bool) {
        let mut removed = Vec::new();
        let mut pending = false;
        for seen in self.vms.list(|_, _| {}) {
            let Ok(vm) = self.vms.get(&seen.name) else {
                continue;
            };
            let Ok(record) = Record::read(vm.dir()) else {
                continue;
            };
            let Some(at) = record.expires_at.filter(|_| seen.phase.is_live()) else {
                continue;
            };
            if at > now {
                pending = true;
            } else if vm.remove(true).is_ok() {
                removed.push(seen.name);
            }
        }
        (removed, pending)
    }
}

/// A sandbox as the API shows it.
fn describe(seen: &VmState, record: &Record) -> Sandbox {
    let expires_at = record
        .expires_at
        .filter(|_| seen.phase.is_live())
        .and_then(crate::rfc3339);
    Sandbox {
        id: seen.name.clone(),
        state: seen.phase.name().into(),
        vm: seen.vm.clone(),
        plan_digest: seen.plan_digest.clone(),
        started_at: seen.started_at.clone(),
        boot_snapshot: seen.boot_snapshot.clone(),
        reason: seen.reason.clone(),
        metadata: record.metadata.clone(),
        expires_at,
    }
}

/// A runner that failed before its VM was ready, as the API reports it: with the code its
/// error line carries (`mvm-runner: error RUN012: …`).
fn launch_error(error: NamedVmError) -> ApiError {
    match error {
        NamedVmError::RunnerFailed { status, stderr } => {
            let said = stderr.trim();
            let code = said
                .split_whitespace()
                .find(|word| mvm_ir::is_code(word.trim_end_matches(':')))
                .map(|word| word.trim_end_matches(':').to_string());
            ApiError::Launch {
                code: code.unwrap_or_else(|| crate::error::codes::API007.into()),
                message: format!("the runner exited with status {status}: {said}"),
            }
        }
        other => other.into(),
    }
}

fn check_spec(spec: &CreateSandbox) -> Result<(), ApiError> {
    let sources = [&spec.image, &spec.plan, &spec.template]
        .iter()
        .filter(|source| source.is_some())
        .count();
    if sources != 1 {
        return Err(ApiError::BadRequest(
            "give one of an image, a plan or a template".into(),
        ));
    }
    if spec.plan.is_some()
        && (spec.cpus.is_some()
            || spec.memory_mib.is_some()
            || !spec.allow_hosts.is_empty()
            || spec.profile.is_some())
    {
        return Err(ApiError::BadRequest(
            "cpus, memory_mib, allow_hosts and profile are signed into a plan: give them with an image"
                .into(),
        ));
    }
    if let Some(name) = &spec.profile {
        match Profile::from_name(name) {
            Some(Profile::Permissive) => return Err(ApiError::BadRequest(
                "the permissive profile drops the guest's syscall filter: build its plan with `mvm build --profile permissive --ack-permissive` and create from the plan".into(),
            )),
            Some(_) => {}
            None => {
                return Err(ApiError::BadRequest(format!(
                    "profile {name:?} is not restrictive, standard or dev"
                )))
            }
        }
    }
    if spec.volumes.len() > MAX_VOLUMES {
        return Err(ApiError::BadRequest(format!(
            "{} volumes: at most {MAX_VOLUMES}",
            spec.volumes.len()
        )));
    }
    let mut names = std::collections::BTreeSet::new();
    for volume in &spec.volumes {
        let parsed = VolumeSpec::parse(volume).map_err(ApiError::BadRequest)?;
        if !names.insert(parsed.name) {
            return Err(ApiError::BadRequest(format!(
                "{volume:?}: a volume is attached once"
            )));
        }
    }
    if spec.secrets.len() > MAX_ENTRIES {
        return Err(ApiError::BadRequest(format!(
            "{} secrets: at most {MAX_ENTRIES}",
            spec.secrets.len()
        )));
    }
    for secret in &spec.secrets {
        SecretRef::parse(secret).map_err(|e| ApiError::BadRequest(format!("secrets: {e}")))?;
    }
    check_timeout(spec.timeout_s.unwrap_or(DEFAULT_TIMEOUT_S))?;
    check_entries("metadata", &spec.metadata)?;
    check_entries("envs", &spec.envs)
}

fn check_timeout(timeout_s: u64) -> Result<(), ApiError> {
    if timeout_s > MAX_TIMEOUT_S {
        return Err(ApiError::BadRequest(format!(
            "a timeout of {timeout_s} s is over the {MAX_TIMEOUT_S} s limit"
        )));
    }
    Ok(())
}

/// Labels and variables: bounded, with names a shell and a filter can use.
fn check_entries(what: &str, entries: &BTreeMap<String, String>) -> Result<(), ApiError> {
    entries_within(what, entries, MAX_ENTRIES, MAX_ENTRY_BYTES).map_err(ApiError::BadRequest)
}

/// Why `entries` (labels or variables, named `what`) are not at most `most` names, each
/// non-empty with no `=` or NUL, with a value without NUL, `most_bytes` together; if they
/// are not. The MCP server holds its clients to tighter bounds than the API's.
pub fn entries_within(
    what: &str,
    entries: &BTreeMap<String, String>,
    most: usize,
    most_bytes: usize,
) -> Result<(), String> {
    if entries.len() > most {
        return Err(format!("{what}: {} entries, over {most}", entries.len()));
    }
    for (key, value) in entries {
        let fine = !key.is_empty()
            && !key.contains(['=', '\0'])
            && !value.contains('\0')
            && key.len() + value.len() <= most_bytes;
        if !fine {
            return Err(format!(
                "{what}: {key:?} is not a name (non-empty, no '=' or NUL) with a value up to {most_bytes} bytes"
            ));
        }
    }
    Ok(())
}

/// `sbx-` and 12 random hex digits.
fn fresh_id() -> Result<String, ApiError> {
    let nonce = mvm_ir::plan::fresh_nonce().map_err(|e| ApiError::Host(e.to_string()))?;
    Ok(format!("sbx-{}", &nonce[..12]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_are_checked_before_anything_starts() {
        let image = CreateSandbox {
            image: Some("oci:x@sha256:00".into()),
            ..Default::default()
        };
        assert!(check_spec(&image).is_ok());
        let both = CreateSandbox {
            plan: Some("/p".into()),
            ..image.clone()
        };
        assert!(check_spec(&both).is_err());
        assert!(check_spec(&CreateSandbox::default()).is_err());
        let template = CreateSandbox {
            template: Some("base".into()),
            ..Default::default()
        };
        assert!(check_spec(&template).is_ok());
        let two = CreateSandbox {
            template: Some("base".into()),
            ..image.clone()
        };
        assert!(check_spec(&two).is_err());
        let widened = CreateSandbox {
            plan: Some("/p".into()),
            allow_hosts: vec!["api.example.com".into()],
            ..Default::default()
        };
        assert!(check_spec(&widened).is_err());
        let forever = CreateSandbox {
            timeout_s: Some(MAX_TIMEOUT_S + 1),
            ..image.clone()
        };
        assert!(check_spec(&forever).is_err());
        let bad_env = CreateSandbox {
            envs: BTreeMap::from([("A=B".into(), "c".into())]),
            ..image.clone()
        };
        assert!(check_spec(&bad_env).is_err());
        let with = |profile: &str, secrets: &[&str]| CreateSandbox {
            profile: Some(profile.into()),
            secrets: secrets.iter().map(|s| s.to_string()).collect(),
            ..image.clone()
        };
        assert!(check_spec(&with("restrictive", &["api-token", "db:DB_PASSWORD"])).is_ok());
        for refused in [
            with("permissive", &[]),
            with("lax", &[]),
            with("dev", &["Not A Name"]),
            with("dev", &["db:LD_PRELOAD"]),
            CreateSandbox {
                plan: Some("/p".into()),
                profile: Some("dev".into()),
                ..Default::default()
            },
        ] {
            assert!(check_spec(&refused).is_err(), "{refused:?}");
        }
    }

    #[test]
    fn a_failed_runner_keeps_its_code() {
        let error = launch_error(NamedVmError::RunnerFailed {
            status: 120,
            stderr: "mvm-runner: error PLAN004: the plan expired\n".into(),
        });
        assert_eq!(error.code(), "PLAN004");
        let silent = launch_error(NamedVmError::RunnerFailed {
            status: 125,
            stderr: String::new(),
        });
        assert_eq!(silent.code(), "API007");
    }

    #[test]
    fn records_round_trip_and_a_vm_without_one_has_an_empty_one() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Record::read(dir.path()).unwrap().metadata.is_empty());
        let mut record = Record {
            metadata: BTreeMap::from([("team".into(), "ml".into())]),
            timeout_s: 60,
            ..Default::default()
        };
        record.restart_clock();
        record.write(dir.path()).unwrap();
        let read = Record::read(dir.path()).unwrap();
        assert_eq!(read.metadata["team"], "ml");
        let left = read.expires_at.unwrap() - OffsetDateTime::now_utc().unix_timestamp();
        assert!((58..=60).contains(&left), "{left}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(RECORD_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
