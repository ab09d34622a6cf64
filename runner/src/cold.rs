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

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use mvm_ir::dsse::Envelope;
use mvm_ir::fsutil::{atomic_write, read_capped};
use mvm_ir::home::MvmHome;
use mvm_ir::keys::{KeyStore, TrustStore};
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
/// The manifest's schema.
const SCHEMA_VERSION: &str = "mvm.cold-vm/v1";
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
        let manifest = ColdManifest {
            schema_version: SCHEMA_VERSION.into(),
            memory,
            saved_at: Timestamp::now(),
            ..self.manifest.clone()
        };
        let signer = KeyStore::new(self.home.clone())
            .host_signer()
            .map_err(|e| ColdError::Save(format!("the host key: {e}")))?;
        let payload = mvm_ir::canonical::to_vec(&manifest)
            .map_err(|e| ColdError::Save(format!("the manifest: {e}")))?;
        let envelope = Envelope::sign(PAYLOAD_TYPE, &payload, &signer).to_json();
        atomic_write(&cold.join(MANIFEST_FILE), &envelope, 0o600)
            .map_err(|e| ColdError::Save(format!("writing the manifest: {e}")))?;
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
    let bytes = read_capped(
        &cold.join(MANIFEST_FILE),
        MAX_MANIFEST_BYTES,
        "cold manifest",
    )
    .map_err(|e| unverified(e.to_string()))?;
    let host_key = KeyStore::new(home.clone())
        .host_signer()
        .map_err(|e| unverified(format!("the host key: {e}")))?
        .verifying_key();
    let mut trust = TrustStore::default();
    trust.insert(host_key);
    let verified = Envelope::parse(&bytes)
        .and_then(|envelope| envelope.verify(&trust))
        .map_err(|e| unverified(format!("its manifest: {e}")))?;
    if verified.payload_type != PAYLOAD_TYPE {
        return Err(unverified(format!(
            "its manifest is a {}",
            verified.payload_type
        )));
    }
    let manifest: ColdManifest = serde_json::from_slice(&verified.payload)
        .map_err(|e| unverified(format!("its manifest: {e}")))?;
    if manifest.schema_version != SCHEMA_VERSION || manifest.name != name {
        return Err(unverified(format!(
            "its manifest is {} of {}, not {SCHEMA_VERSION} of {name}",
            manifest.schema_version, manifest.name
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
    use std::io::Write;

    /// A machine whose "state" is a fixed byte string; a broken one fails half way.
    struct FakeMachine {
        state: Vec<u8>,
        broken: bool,
    }

    impl Pausable for FakeMachine {
        fn pause(&mut self) -> io::Result<()> {
            Ok(())
        }
        fn resume(&mut self) -> io::Result<()> {
            Ok(())
        }
        fn save(&mut self, _socket: &Path, into: &mut File) -> io::Result<SavedMemory> {
            if self.broken {
                into.write_all(&self.state[..self.state.len() / 2])?;
                return Err(io::Error::other("QEMU's migration failed"));
            }
            into.write_all(&self.state)?;
            let (sha256, bytes) = mvm_ir::digest::sha256_reader(&self.state[..])?;
            Ok(SavedMemory { sha256, bytes })
        }
    }

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
