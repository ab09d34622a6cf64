//! Boot snapshots: a plan's guest saved just after its agent said hello — memory and device
//! state, before any workload code ran — so that later launches of the same plan restore it
//! instead of booting (`docs/boot-snapshots.md`).
//!
//! A boot snapshot lives in `$MVM_HOME/boot-snapshots/<key>/`: `ram` (guest RAM, flat, which
//! restored guests map copy-on-write and so share), `state` (the backend's saved device
//! state), both mode 0400, and `manifest.dsse.json`, which this host's key signs. The key is the
//! digest of the snapshot's [`Shape`] — the plan's digest (which pins the kernel, initramfs,
//! command line and resources), the kernel's and initramfs's digests, the backend, its
//! accelerator and version, and the VM's size — so a
//! snapshot is only ever found for a launch that would have booted the very same machine.
//! Opening one checks the signature, the schema, that the manifest's shape is the one asked
//! for and that its files are what was saved ([`seal`]); a snapshot that fails any check is
//! refused and the caller makes it anew, never uses it.
//!
//! What a restored guest shares with its siblings (the kernel's RNG state, its hostname, its
//! clock) it is given anew before anything runs in it: the launch's `Renew` request.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use mvm_ir::home::MvmHome;
use mvm_ir::plan::Timestamp;
use mvm_ir::{Coded, ErrorClass};
use rustix::fs::{flock, FlockOperation};
use serde::{Deserialize, Serialize};

use crate::backend::{Pausable, SavedMemory};
use crate::codes;

pub mod seal;
#[cfg(test)]
mod tests;

use seal::Seal;

/// The directory of the home that holds the boot snapshots.
pub const STORE_DIR: &str = "boot-snapshots";
/// The device state: the backend's saved state without guest RAM (QEMU's migration stream
/// with `x-ignore-shared`).
const STATE_FILE: &str = "state";
/// Guest RAM, flat: what restored guests map copy-on-write.
const RAM_FILE: &str = "ram";
/// The signed manifest.
const MANIFEST_FILE: &str = "manifest.dsse.json";
/// The console of the boot that made it, for the logs of the VMs restored from it.
const CONSOLE_FILE: &str = "console.log";
/// The most of that console a restore passes on.
const MAX_CONSOLE_BYTES: u64 = 256 * 1024;
/// Touched on each restore: `mvm snapshot prune` goes by it.
const USED_FILE: &str = "used";
/// The socket the backend sends its state through while a snapshot is made.
const SAVE_SOCKET: &str = "snapshot-save.sock";
/// The manifest's DSSE payload type.
const PAYLOAD_TYPE: &str = "application/vnd.mvm.boot-snapshot+json";
/// The manifest's schema.
const SCHEMA_VERSION: &str = "mvm.boot-snapshot/v1";
/// The largest manifest read.
const MAX_MANIFEST_BYTES: u64 = 16 * 1024;

/// The disk the store's snapshots may take unless `config.toml` says otherwise: 8 GiB.
pub const DEFAULT_MAX_DISK_MIB: u64 = 8192;
/// How long a removal waits for the launches restoring a snapshot.
const REMOVE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
/// A snapshot restored this recently may be being mapped by a launch: never trimmed.
const IN_USE_FOR: std::time::Duration = std::time::Duration::from_secs(60);

/// The store's disk budget: the `[boot_snapshots]` section of `$MVM_HOME/config.toml`.
///
/// ```toml
/// [boot_snapshots]
/// max_disk_mib = 4096   # the snapshots of this home take at most 4 GiB (default 8192)
/// ```
///
/// Snapshots are a cache: one removed costs its plan's next launch a boot. When a new one
/// takes the store over its budget, the least recently used go ([`Store::trim`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// The most bytes the snapshots' files may take on disk.
    pub max_bytes: u64,
}

impl Budget {
    /// The budget `home`'s `config.toml` sets; the default where it sets none. An unknown key
    /// or a value out of bounds (1 MiB to 1 PiB) is refused, so that a typo cannot lift it.
    pub fn load(home: &MvmHome) -> Result<Self, BootSnapshotError> {
        let text = home
            .config_text()
            .map_err(|e| BootSnapshotError::Config(e.to_string()))?;
        Self::parse(text.as_deref().unwrap_or(""))
    }

    /// The `[boot_snapshots]` section of `text`, a `config.toml`.
    pub fn parse(text: &str) -> Result<Self, BootSnapshotError> {
        #[derive(Deserialize)]
        struct File {
            #[serde(default)]
            boot_snapshots: Option<Section>,
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Section {
            max_disk_mib: Option<u64>,
        }
        let file: File =
            toml::from_str(text).map_err(|e| BootSnapshotError::Config(e.message().to_string()))?;
        let mib = file
            .boot_snapshots
            .and_then(|section| section.max_disk_mib)
            .unwrap_or(DEFAULT_MAX_DISK_MIB);
        if !(1..=1 << 30).contains(&mib) {
            return Err(BootSnapshotError::Config(format!(
                "max_disk_mib = {mib}: 1 to 1073741824"
            )));
        }
        Ok(Budget {
            max_bytes: mib << 20,
        })
    }
}

/// What a boot snapshot is a snapshot of: everything that decides what the booted guest holds
/// in memory and which machine its saved state expects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shape {
    /// The admitted plan's digest.
    pub plan_digest: String,
    /// `sha256:` of the kernel that booted.
    pub kernel_sha256: String,
    /// `sha256:` of the initramfs that booted.
    pub initramfs_sha256: String,
    /// `qemu` or `kvm`.
    pub backend: String,
    /// `tcg` or `kvm`.
    pub accel: String,
    /// The backend's version (QEMU's `--version`): a saved state loads only into its own.
    pub backend_version: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM, MiB.
    pub memory_mib: u64,
}

impl Shape {
    /// The snapshot's key: the hex sha256 of the shape as canonical JSON.
    pub fn key(&self) -> String {
        let canonical =
            mvm_ir::canonical::to_vec(self).expect("a shape is plain strings and numbers");
        mvm_ir::digest::sha256_hex(&canonical)
    }
}

/// What a boot snapshot is: signed by the host that made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`SCHEMA_VERSION`].
    pub schema_version: String,
    /// [`Shape::key`] of `shape`: the snapshot's directory name.
    pub key: String,
    /// What it is a snapshot of.
    pub shape: Shape,
    /// The device state's digest and size.
    pub state: SavedMemory,
    /// The state file as it was left, read-only: while it still looks so, it is not hashed
    /// again before use.
    pub state_seal: Seal,
    /// Guest RAM's digest and size.
    pub ram: SavedMemory,
    /// The RAM file as it was left.
    pub ram_seal: Seal,
    /// The VM that booted to make it (its audit entries tell of the boot).
    pub made_by: String,
    /// When it was made.
    pub made_at: Timestamp,
}

/// Why a boot snapshot could not be made or used. Codes are stable (`docs/errors.md`).
#[derive(Debug, thiserror::Error)]
pub enum BootSnapshotError {
    /// Making it failed; no snapshot was left.
    #[error("making the boot snapshot: {0}")]
    Make(String),
    /// It is not what this host made for this launch: refused, never used.
    #[error("the boot snapshot is refused: {0}")]
    Refused(String),
    /// The `[boot_snapshots]` section of `config.toml` is malformed.
    #[error("config.toml [boot_snapshots]: {0}")]
    Config(String),
}

impl Coded for BootSnapshotError {
    fn code(&self) -> &str {
        match self {
            BootSnapshotError::Make(_) => codes::RUN063,
            BootSnapshotError::Refused(_) => codes::RUN064,
            BootSnapshotError::Config(_) => codes::RUN066,
        }
    }

    fn class(&self) -> ErrorClass {
        ErrorClass::InvalidInput
    }
}

/// A boot snapshot verified for use: its manifest, its state file open (what was checked is
/// what is read) and its RAM file.
#[derive(Debug)]
pub struct BootSnapshot {
    /// Its verified manifest.
    pub manifest: Manifest,
    /// Its state file, open at its start.
    pub state: File,
    /// Its RAM file's path, for a backend that opens it itself (QEMU); checked as the
    /// manifest says, read-only, in the store only the host user can enter, and not removed
    /// while this is held.
    pub ram: PathBuf,
    /// The RAM file that was checked, open: what a backend that maps a descriptor maps.
    pub ram_file: File,
    /// Whether a file was hashed in full on opening (its seal did not hold), not just found
    /// sealed.
    pub hashed: bool,
    /// The console of the boot that made it (at most 256 KiB; not signed: what the guest
    /// printed, for people to read, never for a decision).
    pub console: Vec<u8>,
    /// A shared lock on its directory while it is restored: no removal (`mvm snapshot rm`,
    /// the budget's trim, a refusal) takes the directory from under it.
    hold: Option<File>,
}

impl BootSnapshot {
    /// Lets go of the directory: to be removed, by this process too.
    pub fn release(&mut self) {
        self.hold = None;
    }
}

/// Locks the directory `dir` as `operation` says: shared while a launch checks and restores
/// its snapshot, exclusive while it is removed.
fn lock_dir(dir: &Path, operation: FlockOperation) -> io::Result<File> {
    let file = File::open(dir)?;
    flock(&file, operation)?;
    Ok(file)
}

/// Whether `held` is still the directory at `dir` (not renamed aside and replaced meanwhile).
fn still_at(held: &File, dir: &Path) -> bool {
    match (held.metadata(), fs::metadata(dir)) {
        (Ok(held), Ok(now)) => (held.dev(), held.ino()) == (now.dev(), now.ino()),
        _ => false,
    }
}

/// One entry of [`Store::list`].
#[derive(Debug)]
pub struct Listed {
    /// The directory's name.
    pub key: String,
    /// Its verified manifest, or why it does not verify.
    pub manifest: Result<Manifest, String>,
    /// The bytes its files take.
    pub bytes: u64,
    /// When it was last restored, or made.
    pub used: Option<SystemTime>,
}

/// The boot snapshots of a home.
#[derive(Debug, Clone)]
pub struct Store {
    home: MvmHome,
    dir: PathBuf,
}

impl Store {
    /// The store of `home`, made (mode 0700) if absent.
    pub fn of(home: &MvmHome) -> Result<Self, BootSnapshotError> {
        let dir = home
            .ensure(STORE_DIR)
            .map_err(|e| BootSnapshotError::Make(format!("the store: {e}")))?;
        Ok(Self {
            home: home.clone(),
            dir,
        })
    }

    /// The directory of the snapshot `key`; a key is 64 lowercase hex digits, nothing else.
    fn path(&self, key: &str) -> Result<PathBuf, BootSnapshotError> {
        let plain = key.len() == 64 && key.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        match plain {
            true => Ok(self.dir.join(key)),
            false => Err(BootSnapshotError::Refused(format!(
                "{key:?} is not a boot snapshot's key"
            ))),
        }
    }

    /// The snapshot of `shape`, verified; none when there is none. One that is there but
    /// does not verify is refused — the caller removes it and makes it anew.
    pub fn open(&self, shape: &Shape) -> Result<Option<BootSnapshot>, BootSnapshotError> {
        let key = shape.key();
        let dir = self.path(&key)?;
        let hold = match lock_dir(&dir, FlockOperation::LockShared) {
            Ok(hold) if still_at(&hold, &dir) => hold,
            // Removed while this waited for it: as if it were not there.
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(BootSnapshotError::Refused(format!("its directory: {e}"))),
        };
        let refused = BootSnapshotError::Refused;
        let manifest = self.manifest(&key).map_err(refused)?;
        if manifest.shape != *shape {
            return Err(refused("its manifest is of another plan or machine".into()));
        }
        let (state, state_hashed) =
            checked(&dir.join(STATE_FILE), &manifest.state, &manifest.state_seal)
                .map_err(|e| refused(format!("its state: {e}")))?;
        let (ram_file, ram_hashed) =
            checked(&dir.join(RAM_FILE), &manifest.ram, &manifest.ram_seal)
                .map_err(|e| refused(format!("its RAM: {e}")))?;
        let _ = fs::write(dir.join(USED_FILE), b"");
        let console =
            mvm_ir::fsutil::read_capped(&dir.join(CONSOLE_FILE), MAX_CONSOLE_BYTES, "boot console")
                .unwrap_or_default();
        Ok(Some(BootSnapshot {
            manifest,
            state,
            ram: dir.join(RAM_FILE),
            ram_file,
            hashed: state_hashed || ram_hashed,
            console,
            hold: Some(hold),
        }))
    }

    /// The verified manifest of the snapshot `key`.
    fn manifest(&self, key: &str) -> Result<Manifest, String> {
        let dir = self.path(key).map_err(|e| e.to_string())?;
        let manifest: Manifest = crate::host_signed::read(
            &self.home,
            &dir.join(MANIFEST_FILE),
            PAYLOAD_TYPE,
            MAX_MANIFEST_BYTES,
        )
        .map_err(|e| format!("its manifest: {e}"))?;
        if manifest.schema_version != SCHEMA_VERSION
            || manifest.key != key
            || manifest.shape.key() != key
        {
            return Err(format!(
                "its manifest is {} of {}, not {SCHEMA_VERSION} of {key}",
                manifest.schema_version, manifest.key
            ));
        }
        Ok(manifest)
    }

    /// Starts making the snapshot of `shape`: its directory, under a name no launch looks
    /// for, where the backend booting for it keeps guest RAM ([`Making::ram_path`]).
    pub fn making(&self, shape: &Shape) -> Result<Making, BootSnapshotError> {
        let key = shape.key();
        let part = self
            .dir
            .join(format!(".making-{key}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&part);
        DirBuilder::new()
            .mode(0o700)
            .create(&part)
            .map_err(|e| BootSnapshotError::Make(format!("its directory: {e}")))?;
        Ok(Making {
            store: self.clone(),
            dir: self.path(&key)?,
            part,
            shape: shape.clone(),
        })
    }

    /// Removes the snapshot `key`: once no launch is restoring it (its directory's lock;
    /// waited for up to 10 s, a restore takes well under one), renamed aside first, so no
    /// launch finds it half removed. A process must [`BootSnapshot::release`] a snapshot of
    /// its own before removing it.
    pub fn remove(&self, key: &str) -> Result<bool, BootSnapshotError> {
        let deadline = std::time::Instant::now() + REMOVE_WAIT;
        loop {
            match self.remove_if(key, FlockOperation::NonBlockingLockExclusive, || true)? {
                Removal::Busy if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Removal::Busy => {
                    return Err(BootSnapshotError::Make(format!(
                        "{key} is being restored; try again"
                    )))
                }
                Removal::Removed => return Ok(true),
                Removal::Gone => return Ok(false),
            }
        }
    }

    /// Removes the snapshot `key` when `still_wanted` says so once its directory is locked
    /// (never while a launch restores it).
    fn remove_if(
        &self,
        key: &str,
        operation: FlockOperation,
        still_wanted: impl Fn() -> bool,
    ) -> Result<Removal, BootSnapshotError> {
        let failed = |e: io::Error| BootSnapshotError::Make(format!("removing {key}: {e}"));
        let dir = self.path(key)?;
        let hold = match lock_dir(&dir, operation) {
            Ok(hold) if still_at(&hold, &dir) => hold,
            Ok(_) => return Ok(Removal::Gone),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Removal::Gone),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Removal::Busy),
            Err(e) => return Err(failed(e)),
        };
        if !still_wanted() {
            return Ok(Removal::Busy);
        }
        let aside = self
            .dir
            .join(format!(".removing-{key}-{}", std::process::id()));
        match fs::rename(&dir, &aside) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Removal::Gone),
            Err(e) => return Err(failed(e)),
        }
        fs::remove_dir_all(&aside).map_err(failed)?;
        drop(hold);
        Ok(Removal::Removed)
    }

    /// Every snapshot in the store, verified or with why it is not, by key.
    pub fn list(&self) -> io::Result<Vec<Listed>> {
        let mut listed = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let key = entry.file_name().to_string_lossy().into_owned();
            if key.starts_with('.') || !entry.file_type()?.is_dir() {
                continue;
            }
            let dir = entry.path();
            let bytes = match allocated_bytes(&dir) {
                Ok(bytes) => bytes,
                // Removed while listed.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            listed.push(Listed {
                manifest: self.manifest(&key),
                used: fs::metadata(dir.join(USED_FILE))
                    .and_then(|m| m.modified())
                    .ok(),
                key,
                bytes,
            });
        }
        listed.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(listed)
    }

    /// Removes the least recently used snapshots (those that do not verify first) until the
    /// store's snapshots take at most `budget` on disk, or none is left to remove: never
    /// `keep`, the one a launch is about to restore, nor one being restored (its directory
    /// locked) or restored in the last minute (its last use read again under the lock).
    /// Returns what it removed: each key and the bytes it took.
    pub fn trim(
        &self,
        budget: Budget,
        keep: &str,
    ) -> Result<Vec<(String, u64)>, BootSnapshotError> {
        let listed = self
            .list()
            .map_err(|e| BootSnapshotError::Make(format!("listing the store: {e}")))?;
        let mut taken: u64 = listed.iter().map(|entry| entry.bytes).sum();
        let mut candidates: Vec<&Listed> = listed
            .iter()
            .filter(|entry| entry.key != keep && !recently(entry.used))
            .collect();
        candidates.sort_by_key(|entry| (entry.manifest.is_ok(), entry.used));
        let mut removed = Vec::new();
        for entry in candidates {
            if taken <= budget.max_bytes {
                break;
            }
            let used = self.dir.join(&entry.key).join(USED_FILE);
            let unused = || !recently(fs::metadata(&used).and_then(|m| m.modified()).ok());
            let removal =
                self.remove_if(&entry.key, FlockOperation::NonBlockingLockExclusive, unused)?;
            if removal == Removal::Removed {
                removed.push((entry.key.clone(), entry.bytes));
                taken = taken.saturating_sub(entry.bytes);
            }
        }
        Ok(removed)
    }

    /// What a making or a removal left when its process was killed mid-way: the directories
    /// `.making-KEY-PID` and `.removing-KEY-PID` whose process is gone, with the bytes each
    /// takes. No launch ever looks in them.
    pub fn leftovers(&self) -> io::Result<Vec<(PathBuf, u64)>> {
        let mut left = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = [".making-", ".removing-"]
                .iter()
                .find_map(|prefix| name.strip_prefix(prefix))
                .and_then(|rest| rest.rsplit_once('-'))
                .and_then(|(_, pid)| pid.parse::<u32>().ok())
            else {
                continue;
            };
            if entry.file_type()?.is_dir() && !Path::new(&format!("/proc/{pid}")).exists() {
                left.push((entry.path(), allocated_bytes(&entry.path())?));
            }
        }
        left.sort();
        Ok(left)
    }
}

/// What the files of `dir` take on disk: a RAM file is sparse where the guest never wrote.
fn allocated_bytes(dir: &Path) -> io::Result<u64> {
    Ok(fs::read_dir(dir)?
        .filter_map(|file| file.ok()?.metadata().ok())
        .map(|metadata| std::os::unix::fs::MetadataExt::blocks(&metadata) * 512)
        .sum())
}

/// What came of a removal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Removal {
    Removed,
    /// It was not there (any more).
    Gone,
    /// A launch holds it, or it is still wanted.
    Busy,
}

/// Whether a snapshot last used at `used` may be in use: used within [`IN_USE_FOR`], or at
/// a time after now (the clock went back: no age can be told).
fn recently(used: Option<SystemTime>) -> bool {
    used.is_some_and(|used| {
        SystemTime::now()
            .duration_since(used)
            .map_or(true, |age| age < IN_USE_FOR)
    })
}

/// A boot snapshot being made: removed unless [`Making::finish`]ed.
#[derive(Debug)]
pub struct Making {
    store: Store,
    /// Where it goes once made.
    dir: PathBuf,
    /// Where it is made.
    part: PathBuf,
    shape: Shape,
}

impl Making {
    /// The file the booting guest's RAM is to be kept in (the backend makes it).
    pub fn ram_path(&self) -> PathBuf {
        self.part.join(RAM_FILE)
    }

    /// Saves the paused VM behind `machine`, made by the VM `made_by` whose boot printed
    /// `console`: its state (without RAM, which is in [`Making::ram_path`]) through a socket
    /// in `socket_dir`; both files synced, hashed, made read-only and sealed; the signed
    /// manifest; then the directory named by its key. Returns it opened, as [`Store::open`]
    /// would. When another launch made the same snapshot meanwhile, theirs stays and this
    /// one's open files serve this launch.
    pub fn finish(
        self,
        made_by: &str,
        machine: &mut dyn Pausable,
        socket_dir: &Path,
        console: &[u8],
    ) -> Result<BootSnapshot, BootSnapshotError> {
        let failed = |what: &'static str| {
            move |e: io::Error| BootSnapshotError::Make(format!("{what}: {e}"))
        };
        let state_path = self.part.join(STATE_FILE);
        let mut state_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&state_path)
            .map_err(failed("its state file"))?;
        let state = machine
            .save(&socket_dir.join(SAVE_SOCKET), &mut state_file)
            .map_err(failed("the VM's state"))?;
        let state_seal = seal_file(&state_file, &state_path).map_err(failed("its state file"))?;
        io::Seek::rewind(&mut state_file).map_err(failed("its state file"))?;
        let ram_path = self.ram_path();
        let ram_file = File::open(&ram_path).map_err(failed("its RAM file"))?;
        let (sha256, bytes) =
            mvm_ir::digest::sha256_reader(&ram_file).map_err(failed("its RAM file"))?;
        let ram = SavedMemory { sha256, bytes };
        let ram_seal = seal_file(&ram_file, &ram_path).map_err(failed("its RAM file"))?;
        let manifest = Manifest {
            schema_version: SCHEMA_VERSION.into(),
            key: self.shape.key(),
            shape: self.shape.clone(),
            state,
            state_seal,
            ram,
            ram_seal,
            made_by: made_by.to_string(),
            made_at: Timestamp::now(),
        };
        crate::host_signed::write(
            &self.store.home,
            &self.part.join(MANIFEST_FILE),
            PAYLOAD_TYPE,
            &manifest,
        )
        .map_err(|e| BootSnapshotError::Make(format!("its manifest: {e}")))?;
        let console = &console[console.len().saturating_sub(MAX_CONSOLE_BYTES as usize)..];
        mvm_ir::fsutil::atomic_write(&self.part.join(CONSOLE_FILE), console, 0o600)
            .map_err(|e| BootSnapshotError::Make(format!("its console: {e}")))?;
        let _ = fs::write(self.part.join(USED_FILE), b"");
        match fs::rename(&self.part, &self.dir) {
            Ok(()) => Ok(BootSnapshot {
                manifest,
                state: state_file,
                ram: self.dir.join(RAM_FILE),
                ram_file,
                hashed: false,
                console: console.to_vec(),
                // Just used: no trim takes it in the moment before it is locked.
                hold: Some(
                    lock_dir(&self.dir, FlockOperation::LockShared)
                        .map_err(|e| BootSnapshotError::Make(format!("locking it: {e}")))?,
                ),
            }),
            // Another launch made it first: theirs stays, and serves this launch too.
            Err(_) if self.dir.exists() => self.store.open(&self.shape)?.ok_or_else(|| {
                BootSnapshotError::Make("the one another launch made is gone".into())
            }),
            Err(e) => Err(BootSnapshotError::Make(format!("naming it: {e}"))),
        }
    }
}

impl Drop for Making {
    fn drop(&mut self) {
        // Gone once named; a failed or abandoned one leaves nothing.
        let _ = fs::remove_dir_all(&self.part);
    }
}

/// Syncs `file` (at `path`), makes it read-only and returns its seal.
fn seal_file(file: &File, path: &Path) -> io::Result<Seal> {
    file.sync_all()?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o400))?;
    Seal::of(file)
}

/// Opens the file at `path`, which must be what `saved` says: checked by `seal` alone while it
/// holds, hashed in full otherwise. Returns it open at its start, and whether it was hashed.
fn checked(path: &Path, saved: &SavedMemory, seal: &Seal) -> Result<(File, bool), String> {
    let mut file = File::open(path).map_err(|e| e.to_string())?;
    if seal::holds(seal, &file).map_err(|e| e.to_string())? {
        return Ok((file, false));
    }
    let (sha256, bytes) = mvm_ir::digest::sha256_reader(&mut file).map_err(|e| e.to_string())?;
    SavedMemory { sha256, bytes }
        .check(saved)
        .map_err(|e| e.to_string())?;
    io::Seek::rewind(&mut file).map_err(|e| e.to_string())?;
    Ok((file, true))
}
