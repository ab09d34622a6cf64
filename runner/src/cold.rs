//! Cold VMs: a named VM paused and saved to its directory — memory and device state in
//! `cold/memory`, described by `cold/manifest.dsse.json`, which this host's key signs — with
//! its runner and QEMU (or the own VMM with it) gone, so it holds no memory or CPU until it is
//! woken. QEMU's state is its migration stream; the own VMM's is its snapshot file
//! ([`mvm_vmm::snapshot`]); the manifest says which backend saved it, and that one wakes it.
//!
//! Waking is a new runner's launch, in this order: the manifest's signature (this host's
//! key, nobody else's), its name and schema; the plan admitted again (signature, trusted
//! signer, validity window, kernel and initramfs digests — but not the single-use ledger:
//! this is the very VM that plan was admitted for, and the manifest names its digest); the
//! memory file hashed against the manifest before QEMU reads a byte of it, and what was
//! streamed into QEMU hashed again before the guest may run. A cold VM whose waking fails
//! stays cold, its files untouched.
//!
//! A saved state is current only once: each manifest carries a generation, and the VM's
//! current generation is kept outside its directory (`ledger/cold/<vm id>` in the home).
//! Saving advances it and signs the new value into the manifest; waking requires the
//! manifest's generation to be the current one and advances it before the guest runs. So an
//! older state put back into the VM's directory, or the same state woken a second time (a
//! single-use plan's VM replayed), is refused (RUN041).

use std::collections::BTreeMap;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use mvm_ir::fsutil::{atomic_write, read_capped};
use mvm_ir::home::MvmHome;
use mvm_ir::plan::Timestamp;
use mvm_ir::{Coded, ErrorClass};
use serde::{Deserialize, Serialize};

use crate::backend::{Pausable, SavedMemory, WakeError};
use crate::codes;

/// The directory, in a VM's directory, that holds its saved state.
pub const COLD_DIR: &str = "cold";
/// The saved memory and device state (QEMU's migration stream).
const MEMORY_FILE: &str = "memory";
/// The signed manifest.
const MANIFEST_FILE: &str = "manifest.dsse.json";
/// The socket QEMU sends its state through when saving (in the VM's directory).
const SAVE_SOCKET: &str = "save.sock";
/// The socket a waking QEMU takes its state from (in the VM's directory).
pub const WAKE_SOCKET: &str = "wake.sock";
/// The manifest's DSSE payload type.
const PAYLOAD_TYPE: &str = "application/vnd.mvm.cold-vm+json";
/// The manifest's schema: v2 added the generation; a v1 state cannot be shown current.
const SCHEMA_VERSION: &str = "mvm.cold-vm/v2";
/// The directory, in the home's ledger, of each VM's current generation.
const GENERATIONS_DIR: &str = "cold";
/// The largest manifest read.
const MAX_MANIFEST_BYTES: u64 = 64 * 1024;

fn qemu_backend() -> String {
    "qemu".into()
}

/// What a cold VM is: signed by the host that saved it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColdManifest {
    /// [`SCHEMA_VERSION`].
    pub schema_version: String,
    /// The VM's name.
    pub name: String,
    /// Its id (as in audit entries); a woken VM keeps it.
    pub vm: String,
    /// The digest of the plan it was admitted with.
    pub plan_digest: String,
    /// That plan's envelope (absolute): waking admits it again, and boots its artifacts.
    pub envelope: PathBuf,
    /// How QEMU ran it (`tcg`, `kvm`): a state is woken only as it was saved.
    pub accel: String,
    /// The backend that saved it (`qemu`, `kvm`: their states differ), which wakes it.
    /// Manifests from before the kvm backend could save have none: QEMU's.
    #[serde(default = "qemu_backend")]
    pub backend: String,
    /// The saved state.
    pub memory: SavedMemory,
    /// Which save of this VM it is: waking requires it to be the VM's current generation.
    pub generation: u64,
    /// The destinations its launch took away from the plan's egress grants (`--deny-host`):
    /// the woken VM keeps them — a wake never widens what the VM may reach.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_hosts: Vec<String>,
    /// Its forwarded ports, each with the host port it got: the woken VM listens on them again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<crate::forward::PortSpec>,
    /// Its launch's own variables (`--env`, `--allow-env`): the woken VM's commands get them
    /// again. (The saved memory holds them anyway, in the processes that were started.)
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// The secrets its launch asked for beyond the plan's (`NAME:ENV`): resolved again from
    /// the store when it wakes. Names only, never a value.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    /// The secrets its launch gave as files (`--secret-file`): written again when it wakes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret_files: Vec<String>,
    /// Its bound secrets' placeholders, by secret name: its processes hold them, so a wake
    /// keeps them. A placeholder is not a value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub placeholders: BTreeMap<String, String>,
    /// Whether its guest RAM is the named memory backend of a VM restored from a boot
    /// snapshot: the QEMU that wakes it names its RAM the same.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub named_ram: bool,
    /// When it was saved.
    pub saved_at: Timestamp,
}

/// Why a VM could not be saved or woken. Codes are stable (`docs/errors.md`).
#[derive(Debug, thiserror::Error)]
pub enum ColdError {
    /// Saving failed or was refused; the VM runs on as it was.
    #[error("saving the VM cold: {0}")]
    Save(String),
    /// The saved state is not what this host saved: nothing was started, the VM stays cold.
    #[error("the cold VM does not verify: {0}")]
    Unverified(String),
    /// QEMU could not take the saved state; the VM stays cold.
    #[error("waking the VM: {0}")]
    Wake(String),
}

/// A backend that could not wake the VM: what it read was not what was saved (RUN041), or
/// it could not take it (RUN042).
impl From<WakeError> for ColdError {
    fn from(e: WakeError) -> Self {
        match e {
            WakeError::Changed { .. } => ColdError::Unverified(e.to_string()),
            WakeError::Refused(reason) => ColdError::Wake(reason),
        }
    }
}

impl ColdError {
    /// The stable code.
    pub fn code(&self) -> &'static str {
        match self {
            ColdError::Save(_) => codes::RUN040,
            ColdError::Unverified(_) => codes::RUN041,
            ColdError::Wake(_) => codes::RUN042,
        }
    }
}

/// Delegates to the inherent [`ColdError::code`], which stays for callers without the trait.
impl Coded for ColdError {
    fn code(&self) -> &str {
        ColdError::code(self)
    }

    /// As the CLI has always classed `RUN…` codes other than RUN025, RUN031 and RUN032.
    fn class(&self) -> ErrorClass {
        ErrorClass::InvalidInput
    }
}

/// Saves a named VM cold: what its runner needs to know beyond the machine.
#[derive(Debug, Clone)]
pub struct ColdSaver {
    /// The VM's directory.
    pub dir: PathBuf,
    /// Where the host key is.
    pub home: MvmHome,
    /// The manifest to write, its memory and time still to fill in.
    pub manifest: ColdManifest,
}

impl ColdSaver {
    /// Saves the (paused) VM behind `machine`: its state to `cold/memory`, written whole
    /// before it is named so, then the signed manifest. A failure leaves no cold state.
    pub fn save(&self, machine: &mut dyn Pausable) -> Result<ColdManifest, ColdError> {
        let cold = self.dir.join(COLD_DIR);
        let saved = self.save_into(&cold, machine);
        if saved.is_err() {
            let _ = fs::remove_dir_all(&cold);
        }
        saved
    }

    fn save_into(
        &self,
        cold: &Path,
        machine: &mut dyn Pausable,
    ) -> Result<ColdManifest, ColdError> {
        let failed = |what: &str| {
            let what = what.to_string();
            move |e: io::Error| ColdError::Save(format!("{what}: {e}"))
        };
        let _ = fs::remove_dir_all(cold);
        DirBuilder::new()
            .mode(0o700)
            .create(cold)
            .map_err(failed("creating the cold directory"))?;
        let part = cold.join("memory.part");
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&part)
            .map_err(failed("creating the memory file"))?;
        let memory = machine
            .save(&self.dir.join(SAVE_SOCKET), &mut file)
            .map_err(failed("the VM's state"))?;
        file.sync_all().map_err(failed("writing the memory file"))?;
        fs::rename(&part, cold.join(MEMORY_FILE)).map_err(failed("naming the memory file"))?;
        // Advanced before anything names it: every state saved earlier is stale from here.
        let generations = Generations::of(&self.home).map_err(ColdError::Save)?;
        let generation = generations
            .current(&self.manifest.vm)
            .and_then(|current| {
                let next = current + 1;
                generations.set(&self.manifest.vm, next).map(|()| next)
            })
            .map_err(ColdError::Save)?;
        let manifest = ColdManifest {
            schema_version: SCHEMA_VERSION.into(),
            memory,
            generation,
            saved_at: Timestamp::now(),
            ..self.manifest.clone()
        };
        crate::host_signed::write(
            &self.home,
            &cold.join(MANIFEST_FILE),
            PAYLOAD_TYPE,
            &manifest,
        )
        .map_err(|e| ColdError::Save(format!("the manifest: {e}")))?;
        Ok(manifest)
    }
}

/// A cold VM's saved state, its manifest verified and its memory file hashed.
#[derive(Debug)]
pub struct ColdState {
    /// The verified manifest.
    pub manifest: ColdManifest,
    /// The memory file, open: what was hashed is what is streamed.
    pub memory: File,
}

/// Opens the cold state in the VM directory `dir` of the VM `name`: the manifest must be
/// signed by this host's key and name this VM, and the memory file must hash to what it says.
pub fn open(dir: &Path, name: &str, home: &MvmHome) -> Result<ColdState, ColdError> {
    let unverified = |what: String| ColdError::Unverified(what);
    let cold = dir.join(COLD_DIR);
    let manifest: ColdManifest = crate::host_signed::read(
        home,
        &cold.join(MANIFEST_FILE),
        PAYLOAD_TYPE,
        MAX_MANIFEST_BYTES,
    )
    .map_err(|e| unverified(format!("its manifest: {e}")))?;
    if manifest.schema_version != SCHEMA_VERSION || manifest.name != name {
        return Err(unverified(format!(
            "its manifest is {} of {}, not {SCHEMA_VERSION} of {name}",
            manifest.schema_version, manifest.name
        )));
    }
    let current = Generations::of(home)
        .and_then(|generations| generations.current(&manifest.vm))
        .map_err(unverified)?;
    if manifest.generation != current {
        return Err(unverified(format!(
            "its state is generation {} of {}, the current one is {current}: \
             an older or already woken state",
            manifest.generation, manifest.vm
        )));
    }
    let path = cold.join(MEMORY_FILE);
    let mut memory = File::open(&path).map_err(|e| unverified(format!("its memory: {e}")))?;
    let (sha256, bytes) = mvm_ir::digest::sha256_reader(&mut memory)
        .map_err(|e| unverified(format!("its memory: {e}")))?;
    check_memory(&manifest, &SavedMemory { sha256, bytes })?;
    io::Seek::rewind(&mut memory).map_err(|e| unverified(format!("its memory: {e}")))?;
    Ok(ColdState { manifest, memory })
}

/// Makes the opened state stale before its guest runs again: the VM's generation moves past
/// the manifest's, so the same state is never woken twice. Checked again here, under the
/// VM's lock, in case another save happened since [`open`].
pub fn consume(home: &MvmHome, manifest: &ColdManifest) -> Result<(), ColdError> {
    let generations = Generations::of(home).map_err(ColdError::Unverified)?;
    let current = generations
        .current(&manifest.vm)
        .map_err(ColdError::Unverified)?;
    if current != manifest.generation {
        return Err(ColdError::Unverified(format!(
            "its state is generation {}, the current one is {current}",
            manifest.generation
        )));
    }
    generations
        .set(&manifest.vm, current + 1)
        .map_err(ColdError::Wake)
}

/// Gives a consumed state back: its guest was never let run (resuming it failed).
pub fn unconsume(home: &MvmHome, manifest: &ColdManifest) -> Result<(), ColdError> {
    Generations::of(home)
        .and_then(|generations| generations.set(&manifest.vm, manifest.generation))
        .map_err(ColdError::Wake)
}

/// Forgets the generation of the VM `vm`: once it is removed, no state of it may wake.
pub fn forget(home: &MvmHome, vm: &str) -> io::Result<()> {
    let generations = Generations::of(home).map_err(io::Error::other)?;
    let path = generations.path(vm).map_err(io::Error::other)?;
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Each VM's current generation: a decimal number in a file named by its VM id.
struct Generations {
    dir: PathBuf,
}

impl Generations {
    fn of(home: &MvmHome) -> Result<Self, String> {
        let ledger = home.ledger_dir().map_err(|e| format!("the ledger: {e}"))?;
        let dir = ledger.join(GENERATIONS_DIR);
        DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(&dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(Self { dir })
    }

    /// The file of `vm`, whose id must be a plain name (the manifest is signed, but a path
    /// is never built from what a file says without looking).
    fn path(&self, vm: &str) -> Result<PathBuf, String> {
        let plain = !vm.is_empty()
            && vm.len() <= 64
            && vm
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        match plain {
            true => Ok(self.dir.join(vm)),
            false => Err(format!("{vm:?} is not a VM id")),
        }
    }

    /// The current generation of `vm`; 0 before its first save.
    fn current(&self, vm: &str) -> Result<u64, String> {
        let path = self.path(vm)?;
        if !path.exists() {
            return Ok(0);
        }
        let bytes = read_capped(&path, 32, "cold generation").map_err(|e| e.to_string())?;
        std::str::from_utf8(&bytes)
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .ok_or_else(|| format!("{}: not a generation", path.display()))
    }

    fn set(&self, vm: &str, generation: u64) -> Result<(), String> {
        let path = self.path(vm)?;
        atomic_write(&path, format!("{generation}\n").as_bytes(), 0o600)
            .map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// Whether `seen` is the memory `manifest` describes.
pub fn check_memory(manifest: &ColdManifest, seen: &SavedMemory) -> Result<(), ColdError> {
    Ok(seen.check(&manifest.memory)?)
}

/// Whether the VM directory `dir` holds a cold state (verified or not).
pub fn is_saved(dir: &Path) -> bool {
    dir.join(COLD_DIR).join(MANIFEST_FILE).exists()
}

/// Removes a cold state: once its VM runs again, or is stopped for good.
pub fn discard(dir: &Path) -> io::Result<()> {
    match fs::remove_dir_all(dir.join(COLD_DIR)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::fake::FakeMachine;
    use mvm_ir::dsse::Envelope;

    fn saver(home: &Path) -> ColdSaver {
        let dir = home.join("vms").join("box");
        fs::create_dir_all(&dir).unwrap();
        ColdSaver {
            dir,
            home: MvmHome::at(home),
            manifest: ColdManifest {
                schema_version: String::new(),
                name: "box".into(),
                vm: "vm-0123456789ab".into(),
                plan_digest: format!("sha256:{}", "a".repeat(64)),
                envelope: "/bundle/plan.dsse.json".into(),
                accel: "tcg".into(),
                backend: "qemu".into(),
                memory: SavedMemory {
                    sha256: String::new(),
                    bytes: 0,
                },
                generation: 0,
                deny_hosts: vec![],
                ports: vec![],
                env: BTreeMap::new(),
                secrets: vec![],
                secret_files: vec![],
                placeholders: BTreeMap::new(),
                named_ram: false,
                saved_at: Timestamp::now(),
            },
        }
    }

    #[test]
    fn a_saved_vm_opens_and_any_change_to_it_is_refused() {
        let home = tempfile::tempdir().unwrap();
        let saver = saver(home.path());
        let state = b"guest memory and devices".repeat(1000);
        let mut machine = FakeMachine {
            state: state.clone(),
            broken: false,
        };
        let saved = saver.save(&mut machine).unwrap();
        assert_eq!(saved.memory.bytes, state.len() as u64);

        let opened = open(&saver.dir, "box", &saver.home).unwrap();
        assert_eq!(opened.manifest, saved);
        assert!(open(&saver.dir, "other", &saver.home).is_err());

        // One flipped byte in the memory file.
        let memory = saver.dir.join(COLD_DIR).join(MEMORY_FILE);
        let mut bytes = fs::read(&memory).unwrap();
        bytes[100] ^= 1;
        fs::write(&memory, &bytes).unwrap();
        let error = open(&saver.dir, "box", &saver.home).unwrap_err();
        assert_eq!(error.code(), "RUN041", "{error}");
        bytes[100] ^= 1;
        fs::write(&memory, &bytes).unwrap();
        open(&saver.dir, "box", &saver.home).unwrap();

        // A manifest signed by another key, or edited.
        let manifest_path = saver.dir.join(COLD_DIR).join(MANIFEST_FILE);
        let good = fs::read(&manifest_path).unwrap();
        let other = mvm_ir::keys::Signer::generate().unwrap();
        let payload = Envelope::parse(&good).unwrap().decode_payload().unwrap();
        fs::write(
            &manifest_path,
            Envelope::sign(PAYLOAD_TYPE, &payload, &other).to_json(),
        )
        .unwrap();
        assert_eq!(
            open(&saver.dir, "box", &saver.home).unwrap_err().code(),
            "RUN041"
        );
        let edited = String::from_utf8(good.clone()).unwrap().replacen(
            "\"payload\": \"",
            "\"payload\": \"e",
            1,
        );
        fs::write(&manifest_path, edited).unwrap();
        assert_eq!(
            open(&saver.dir, "box", &saver.home).unwrap_err().code(),
            "RUN041"
        );
        fs::write(&manifest_path, &good).unwrap();
        open(&saver.dir, "box", &saver.home).unwrap();

        discard(&saver.dir).unwrap();
        assert!(!is_saved(&saver.dir));
        discard(&saver.dir).unwrap();
    }

    /// Copies the cold directory of `saver`'s VM to `to`, or back from it.
    fn copy_state(from: &Path, to: &Path) {
        let _ = fs::remove_dir_all(to);
        fs::create_dir_all(to).unwrap();
        for file in [MANIFEST_FILE, MEMORY_FILE] {
            fs::copy(from.join(file), to.join(file)).unwrap();
        }
    }

    #[test]
    fn a_state_wakes_once_and_an_older_one_never() {
        let home = tempfile::tempdir().unwrap();
        let saver = saver(home.path());
        let cold = saver.dir.join(COLD_DIR);
        let aside = home.path().join("aside");
        let mut machine = FakeMachine {
            state: b"first".repeat(100),
            broken: false,
        };
        assert_eq!(saver.save(&mut machine).unwrap().generation, 1);
        copy_state(&cold, &aside);

        // Woken: consumed before the guest runs; the same state put back is refused.
        let opened = open(&saver.dir, "box", &saver.home).unwrap();
        consume(&saver.home, &opened.manifest).unwrap();
        let error = consume(&saver.home, &opened.manifest).unwrap_err();
        assert_eq!(error.code(), "RUN041", "{error}");
        discard(&saver.dir).unwrap();
        copy_state(&aside, &cold);
        let error = open(&saver.dir, "box", &saver.home).unwrap_err();
        assert_eq!(error.code(), "RUN041", "{error}");
        assert!(error.to_string().contains("generation 1"), "{error}");

        // Changed and saved again: the newer state opens, the older one still does not.
        machine.state = b"second".repeat(100);
        assert_eq!(saver.save(&mut machine).unwrap().generation, 3);
        let newer = home.path().join("newer");
        copy_state(&cold, &newer);
        open(&saver.dir, "box", &saver.home).unwrap();
        copy_state(&aside, &cold);
        assert_eq!(
            open(&saver.dir, "box", &saver.home).unwrap_err().code(),
            "RUN041"
        );
        copy_state(&newer, &cold);

        // A guest that could not be let run gives its state back.
        let opened = open(&saver.dir, "box", &saver.home).unwrap();
        consume(&saver.home, &opened.manifest).unwrap();
        unconsume(&saver.home, &opened.manifest).unwrap();
        open(&saver.dir, "box", &saver.home).unwrap();

        // Removed: its generation is forgotten, and no state of it wakes.
        forget(&saver.home, "vm-0123456789ab").unwrap();
        assert_eq!(
            open(&saver.dir, "box", &saver.home).unwrap_err().code(),
            "RUN041"
        );
        assert!(forget(&saver.home, "../escape").is_err());
    }

    #[test]
    fn a_failed_save_leaves_no_cold_state() {
        let home = tempfile::tempdir().unwrap();
        let saver = saver(home.path());
        let mut broken = FakeMachine {
            state: b"guest memory".to_vec(),
            broken: true,
        };
        let error = saver.save(&mut broken).unwrap_err();
        assert_eq!(error.code(), "RUN040");
        assert!(!saver.dir.join(COLD_DIR).exists());
    }
}
