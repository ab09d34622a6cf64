//! What this host can run: its virtualization, its QEMU, and the backend a launch uses.
//!
//! Virtualization is classified from three facts — the CPU flags in `/proc/cpuinfo`, which
//! KVM modules are loaded (`/sys/module/<name>`), and whether `/dev/kvm` opens read-write —
//! by [`VirtKind::classify`], a pure function; [`VirtKind::detect`] only reads the facts.
//! Hardware virtualization needs all three (`vmx` with `kvm_intel`, or `svm` with `kvm_amd`,
//! and a `/dev/kvm` this user can open). A loaded `kvm_pvm` means `/dev/kvm` is PVM, on which
//! no stock kernel boots at a usable speed, so it is never taken for hardware virtualization.
//!
//! QEMU is `$MVM_QEMU`, else `qemu-system-x86_64` on `PATH`; its `--version` must say 7.2 or
//! newer, the first with `-M microvm,acpi=on` as mvm uses it.
//!
//! [`select`] turns a [`BackendChoice`] and the [`HostFacts`] into the backend to start, the
//! accelerator QEMU gets (`kvm` on hardware virtualization, `tcg` otherwise), and a sentence
//! saying why. Refusals are [`HostError`]s with stable codes.

use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::thread;
use std::time::{Duration, Instant};

use mvm_ir::{Coded, ErrorClass};

use crate::codes;

/// How far this build trusts mvm's own VMM: what `auto` picks on hardware virtualization,
/// since a test boots Linux on it and runs commands through the agent
/// (`tests/kvm_nested.rs`, nested in an emulated AMD-V guest; `docs/vmm.md`).
const OWN_VMM: OwnVmm = OwnVmm::Default;

/// Whether a build has mvm's own VMM, and whether `auto` picks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OwnVmm {
    /// Not in the build: `--backend kvm` is refused (RUN010).
    #[allow(dead_code)]
    Absent,
    /// Run when asked for; `auto` uses QEMU.
    #[allow(dead_code)]
    Explicit,
    /// What `auto` picks on hardware virtualization.
    Default,
}

/// The kernel module behind a PVM `/dev/kvm`.
pub const PVM_MODULE: &str = "kvm_pvm";
/// The QEMU binary mvm starts.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";
/// The environment variable naming the QEMU binary to use instead of the one on `PATH`.
pub const QEMU_ENV: &str = "MVM_QEMU";
/// The oldest QEMU with `-M microvm,acpi=on` as mvm uses it.
pub const MIN_QEMU: QemuVersion = QemuVersion {
    major: 7,
    minor: 2,
    patch: 0,
};
/// The command that installs a usable QEMU (Debian and derivatives).
pub const QEMU_INSTALL: &str = "apt-get install qemu-system-x86";

/// How long `qemu-system-x86_64 --version` may take.
const VERSION_TIMEOUT: Duration = Duration::from_secs(5);
/// The most of `--version`'s output that is read.
const MAX_VERSION_OUTPUT: u64 = 64 * 1024;

/// Why the host cannot run a launch the way it was asked. Its [`Coded::code`] is stable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// `--backend kvm` in a build without mvm's own VMM.
    #[error("the kvm backend is not in this build yet; use --backend qemu")]
    KvmBackendNotBuilt,
    /// `--backend kvm` on a host without hardware virtualization.
    #[error("the kvm backend needs hardware virtualization, and this host has {found}; use --backend qemu")]
    NoHardwareVirtualization {
        /// What the host has instead.
        found: String,
    },
    /// No QEMU that can be run.
    #[error("no usable {QEMU_BINARY}: {reason}; install it: {QEMU_INSTALL}")]
    NoQemu {
        /// What was looked for and what went wrong.
        reason: String,
    },
    /// A QEMU older than [`MIN_QEMU`].
    #[error("{} is QEMU {found}; mvm needs {MIN_QEMU} or newer for -M microvm,acpi=on; install it: {QEMU_INSTALL}", path.display())]
    QemuTooOld {
        /// The binary.
        path: PathBuf,
        /// Its version.
        found: QemuVersion,
    },
}

impl Coded for HostError {
    fn code(&self) -> &str {
        match self {
            HostError::KvmBackendNotBuilt => codes::RUN010,
            HostError::NoQemu { .. } => codes::RUN011,
            HostError::QemuTooOld { .. } => codes::RUN012,
            HostError::NoHardwareVirtualization { .. } => codes::RUN013,
        }
    }

    /// A host that cannot run the launch as asked (as the CLI has always classed `RUN…` codes
    /// other than RUN025, RUN031 and RUN032).
    fn class(&self) -> ErrorClass {
        ErrorClass::InvalidInput
    }
}

impl HostError {
    /// The shell command that fixes this, when one command can.
    pub fn fix(&self) -> Option<&'static str> {
        match self {
            HostError::NoQemu { .. } | HostError::QemuTooOld { .. } => Some(QEMU_INSTALL),
            HostError::KvmBackendNotBuilt | HostError::NoHardwareVirtualization { .. } => None,
        }
    }
}

/// A CPU vendor's hardware virtualization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    /// Intel VT-x: CPU flag `vmx`, module `kvm_intel`.
    Intel,
    /// AMD-V: CPU flag `svm`, module `kvm_amd`.
    Amd,
}

impl Vendor {
    const ALL: [Vendor; 2] = [Vendor::Intel, Vendor::Amd];

    /// The `/proc/cpuinfo` flag of this vendor's virtualization extension.
    pub fn cpu_flag(self) -> &'static str {
        match self {
            Vendor::Intel => "vmx",
            Vendor::Amd => "svm",
        }
    }

    /// The KVM module for this vendor.
    pub fn module(self) -> &'static str {
        match self {
            Vendor::Intel => "kvm_intel",
            Vendor::Amd => "kvm_amd",
        }
    }
}

impl fmt::Display for Vendor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Vendor::Intel => "Intel VT-x",
            Vendor::Amd => "AMD-V",
        })
    }
}

/// Whether `/dev/kvm` can be used by this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DevKvm {
    /// There is no `/dev/kvm`.
    Missing,
    /// It opens read-write.
    ReadWrite,
    /// It exists but does not open read-write.
    Refused {
        /// The OS error.
        error: String,
    },
}

impl DevKvm {
    /// Opens `/dev/kvm` read-write and closes it at once. Callers that must not touch
    /// `/dev/kvm` before a plan is admitted call this only after admission.
    pub fn probe() -> Self {
        match OpenOptions::new().read(true).write(true).open("/dev/kvm") {
            Ok(_) => DevKvm::ReadWrite,
            Err(e) if e.kind() == io::ErrorKind::NotFound => DevKvm::Missing,
            Err(e) => DevKvm::Refused {
                error: e.to_string(),
            },
        }
    }
}

/// Why a present `/dev/kvm` cannot run stock kernels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnusableReason {
    /// Neither `vmx` nor `svm` is a CPU flag, and `kvm_pvm` is not loaded.
    NoCpuSupport,
    /// The CPU has the extension but its KVM module is not loaded.
    ModuleNotLoaded {
        /// The CPU's vendor.
        vendor: Vendor,
    },
    /// Hardware virtualization is there but `/dev/kvm` does not open read-write.
    DevKvmRefused {
        /// The CPU's vendor.
        vendor: Vendor,
        /// The OS error.
        error: String,
    },
}

impl UnusableReason {
    /// The shell command that fixes this, when one command can.
    pub fn fix(&self) -> Option<String> {
        match self {
            UnusableReason::NoCpuSupport => None,
            UnusableReason::ModuleNotLoaded { vendor } => {
                Some(format!("sudo modprobe {}", vendor.module()))
            }
            UnusableReason::DevKvmRefused { .. } => Some("sudo usermod -aG kvm \"$USER\"".into()),
        }
    }
}

impl fmt::Display for UnusableReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnusableReason::NoCpuSupport => {
                write!(f, "no vmx or svm CPU flag, and {PVM_MODULE} is not loaded")
            }
            UnusableReason::ModuleNotLoaded { vendor } => write!(
                f,
                "the CPU has {} but {} is not loaded",
                vendor.cpu_flag(),
                vendor.module()
            ),
            UnusableReason::DevKvmRefused { error, .. } => {
                write!(f, "/dev/kvm does not open read-write: {error}")
            }
        }
    }
}

/// The virtualization this host offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VirtKind {
    /// VMX or SVM, its KVM module loaded, and `/dev/kvm` usable: stock kernels boot on KVM.
    Hardware {
        /// Whose extension.
        vendor: Vendor,
    },
    /// `/dev/kvm` is PVM (`kvm_pvm`): a stock kernel's CPL0 code is emulated instruction by
    /// instruction, so stock kernels cannot boot on it at a usable speed.
    Pvm,
    /// `/dev/kvm` exists but cannot run stock kernels.
    Unusable {
        /// Why.
        reason: UnusableReason,
    },
    /// No `/dev/kvm`.
    NoKvm,
}

impl VirtKind {
    /// Classifies a host from the text of its `/proc/cpuinfo`, the KVM modules loaded
    /// (`kvm_intel`, `kvm_amd`, `kvm_pvm`; others are ignored) and the state of `/dev/kvm`.
    pub fn classify(cpuinfo: &str, loaded_modules: &[&str], dev_kvm: &DevKvm) -> Self {
        let refused = match dev_kvm {
            DevKvm::Missing => return VirtKind::NoKvm,
            DevKvm::ReadWrite => None,
            DevKvm::Refused { error } => Some(error),
        };
        // A PVM host may also have a vendor module loaded; which one backs /dev/kvm cannot be
        // told from here, so the safe answer (never boot a stock kernel on PVM) wins.
        if loaded_modules.contains(&PVM_MODULE) {
            return VirtKind::Pvm;
        }
        let flags = cpu_flags(cpuinfo);
        let with_flag: Vec<Vendor> = Vendor::ALL
            .into_iter()
            .filter(|v| flags.contains(&v.cpu_flag()))
            .collect();
        let Some(&first) = with_flag.first() else {
            return VirtKind::Unusable {
                reason: UnusableReason::NoCpuSupport,
            };
        };
        let Some(vendor) = with_flag
            .into_iter()
            .find(|v| loaded_modules.contains(&v.module()))
        else {
            return VirtKind::Unusable {
                reason: UnusableReason::ModuleNotLoaded { vendor: first },
            };
        };
        match refused {
            None => VirtKind::Hardware { vendor },
            Some(error) => VirtKind::Unusable {
                reason: UnusableReason::DevKvmRefused {
                    vendor,
                    error: error.clone(),
                },
            },
        }
    }

    /// Reads this host's facts and classifies them. Opens `/dev/kvm` (see [`DevKvm::probe`]).
    pub fn detect() -> Self {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let loaded: Vec<&str> = [Vendor::Intel.module(), Vendor::Amd.module(), PVM_MODULE]
            .into_iter()
            .filter(|m| Path::new("/sys/module").join(m).exists())
            .collect();
        Self::classify(&cpuinfo, &loaded, &DevKvm::probe())
    }

    /// A stable one-word name: `hardware`, `pvm`, `unusable` or `none`.
    pub fn name(&self) -> &'static str {
        match self {
            VirtKind::Hardware { .. } => "hardware",
            VirtKind::Pvm => "pvm",
            VirtKind::Unusable { .. } => "unusable",
            VirtKind::NoKvm => "none",
        }
    }
}

impl fmt::Display for VirtKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VirtKind::Hardware { vendor } => {
                write!(f, "hardware virtualization ({vendor}, {})", vendor.module())
            }
            VirtKind::Pvm => write!(f, "PVM ({PVM_MODULE})"),
            VirtKind::Unusable { reason } => {
                write!(f, "a /dev/kvm stock kernels cannot use ({reason})")
            }
            VirtKind::NoKvm => f.write_str("no /dev/kvm"),
        }
    }
}

/// The flags of the first `flags` line of `/proc/cpuinfo` text.
fn cpu_flags(cpuinfo: &str) -> Vec<&str> {
    cpuinfo
        .lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(key, _)| key.trim() == "flags")
        .map(|(_, flags)| flags.split_whitespace().collect())
        .unwrap_or_default()
}

/// A QEMU release number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct QemuVersion {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Patch level (0 when the version names none).
    pub patch: u32,
}

impl QemuVersion {
    /// The version in `qemu-system-x86_64 --version` output: the first
    /// `QEMU emulator version X.Y[.Z]`, whatever follows it (`(Debian 1:7.2+dfsg-7+deb12u18)`).
    pub fn parse(version_output: &str) -> Option<Self> {
        const MARKER: &str = "QEMU emulator version ";
        let at = version_output.find(MARKER)? + MARKER.len();
        let word = version_output[at..]
            .lines()
            .next()?
            .split_whitespace()
            .next()?;
        let mut parts = word.split('.').map(|part| {
            let digits = part.len() - part.trim_start_matches(|c: char| c.is_ascii_digit()).len();
            part[..digits].parse::<u32>().ok()
        });
        let major = parts.next()??;
        let minor = parts.next()??;
        let patch = match parts.next() {
            Some(patch) => patch?,
            None => 0,
        };
        Some(Self {
            major,
            minor,
            patch,
        })
    }
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// A QEMU that runs and is new enough.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuBinary {
    /// Where it is.
    pub path: PathBuf,
    /// What its `--version` says.
    pub version: QemuVersion,
}

impl QemuBinary {
    /// `$MVM_QEMU`, else `qemu-system-x86_64` on `PATH`, checked with `--version`.
    pub fn discover() -> Result<Self, HostError> {
        let path = Self::locate(
            std::env::var_os(QEMU_ENV).as_deref(),
            std::env::var_os("PATH").as_deref(),
        )?;
        Self::probe(&path)
    }

    /// The binary to use: `override_path` (the value of `$MVM_QEMU`) when set and not empty,
    /// else the first executable `qemu-system-x86_64` in the directories of `search_path`
    /// (empty entries, which would mean the working directory, are skipped).
    pub fn locate(
        override_path: Option<&OsStr>,
        search_path: Option<&OsStr>,
    ) -> Result<PathBuf, HostError> {
        if let Some(path) = override_path.filter(|p| !p.is_empty()) {
            let path = PathBuf::from(path);
            return if is_executable_file(&path) {
                Ok(path)
            } else {
                Err(HostError::NoQemu {
                    reason: format!("{QEMU_ENV}={} is not an executable file", path.display()),
                })
            };
        }
        search_path
            .into_iter()
            .flat_map(std::env::split_paths)
            .filter(|dir| !dir.as_os_str().is_empty())
            .map(|dir| dir.join(QEMU_BINARY))
            .find(|candidate| is_executable_file(candidate))
            .ok_or_else(|| HostError::NoQemu {
                reason: format!("not on PATH, and {QEMU_ENV} is not set"),
            })
    }

    /// Runs `path --version` (for at most 5 s) and checks what it says.
    pub fn probe(path: &Path) -> Result<Self, HostError> {
        let output = version_output(path, VERSION_TIMEOUT).map_err(|reason| HostError::NoQemu {
            reason: format!("`{} --version` {reason}", path.display()),
        })?;
        Self::from_version_output(path, &output)
    }

    /// The binary at `path` given what its `--version` printed: refused when that names no
    /// QEMU version or one older than [`MIN_QEMU`].
    pub fn from_version_output(path: &Path, output: &str) -> Result<Self, HostError> {
        let version = QemuVersion::parse(output).ok_or_else(|| HostError::NoQemu {
            reason: format!(
                "`{} --version` printed no QEMU version: {:?}",
                path.display(),
                output.lines().next().unwrap_or("")
            ),
        })?;
        if version < MIN_QEMU {
            return Err(HostError::QemuTooOld {
                path: path.to_path_buf(),
                found: version,
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            version,
        })
    }
}

fn is_executable_file(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// What `path --version` prints on stdout, or why it printed nothing usable.
fn version_output(path: &Path, timeout: Duration) -> Result<String, String> {
    let mut child = mvm_ir::env::command(path)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("could not be run: {e}"))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("did not finish within {} s", timeout.as_secs()));
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("could not be waited for: {e}"));
            }
        }
    };
    if !status.success() {
        return Err(format!("failed ({status})"));
    }
    let mut bytes = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        stdout
            .take(MAX_VERSION_OUTPUT)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("output could not be read: {e}"))?;
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// What this host has, as [`select`] needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    /// Its virtualization.
    pub virt: VirtKind,
    /// Its QEMU, or why there is none that mvm can use.
    pub qemu: Result<QemuBinary, HostError>,
}

impl HostFacts {
    /// Reads this host: [`VirtKind::detect`] and [`QemuBinary::discover`].
    pub fn detect() -> Self {
        Self {
            virt: VirtKind::detect(),
            qemu: QemuBinary::discover(),
        }
    }
}

/// The backends that boot a plan (named as `--backend` names them, also in a VM's state).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// mvm's own VMM on `/dev/kvm` (hardware virtualization only).
    Kvm,
    /// A supervised `qemu-system-x86_64 -M microvm`.
    Qemu,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Kvm => "kvm",
            Backend::Qemu => "qemu",
        })
    }
}

/// The accelerator a VM runs with (QEMU's `-accel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// KVM on hardware virtualization.
    Kvm,
    /// QEMU's tiny code generator: instruction translation, no `/dev/kvm`.
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// The backend a user asks for (`--backend auto|qemu|kvm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// The best this host and build can do.
    #[default]
    Auto,
    /// QEMU, whatever the host.
    Qemu,
    /// mvm's own VMM; refused without hardware virtualization.
    Kvm,
}

impl fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendChoice::Auto => "auto",
            BackendChoice::Qemu => "qemu",
            BackendChoice::Kvm => "kvm",
        })
    }
}

/// A backend name other than `auto`, `qemu` or `kvm` (a usage error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown backend {0:?}: use auto, qemu or kvm")]
pub struct UnknownBackend(pub String);

impl FromStr for BackendChoice {
    type Err = UnknownBackend;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(BackendChoice::Auto),
            "qemu" => Ok(BackendChoice::Qemu),
            "kvm" => Ok(BackendChoice::Kvm),
            other => Err(UnknownBackend(other.to_string())),
        }
    }
}

/// The backend a launch uses on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selected {
    /// The backend.
    pub backend: Backend,
    /// The accelerator: QEMU's `-accel` for the qemu backend; always `kvm` for the kvm one.
    pub accel: Accel,
    /// Why, in a sentence for people.
    pub reason: String,
}

/// The backend for `choice` on a host with `facts`: `auto` is mvm's own VMM on hardware
/// virtualization and QEMU with TCG anywhere else (QEMU with `-accel kvm` on hardware in a
/// build whose own VMM is absent or only explicit); `qemu` is QEMU, with KVM where the hardware allows; `kvm` is mvm's own VMM,
/// refused on hosts without hardware virtualization (RUN013) — such as PVM, where no stock
/// kernel boots — and in a build without it (RUN010). A QEMU backend needs a usable QEMU
/// (RUN011, RUN012).
pub fn select(choice: BackendChoice, facts: &HostFacts) -> Result<Selected, HostError> {
    select_in_build(choice, facts, OWN_VMM)
}

fn select_in_build(
    choice: BackendChoice,
    facts: &HostFacts,
    own: OwnVmm,
) -> Result<Selected, HostError> {
    let hardware = matches!(facts.virt, VirtKind::Hardware { .. });
    if choice == BackendChoice::Kvm {
        if own == OwnVmm::Absent {
            return Err(HostError::KvmBackendNotBuilt);
        }
        if !hardware {
            return Err(HostError::NoHardwareVirtualization {
                found: facts.virt.to_string(),
            });
        }
    }
    let picked =
        choice == BackendChoice::Kvm || own == OwnVmm::Default && choice == BackendChoice::Auto;
    if hardware && picked {
        return Ok(Selected {
            backend: Backend::Kvm,
            accel: Accel::Kvm,
            reason: format!("{}: using mvm's own VMM", facts.virt),
        });
    }
    if let Err(no_qemu) = &facts.qemu {
        return Err(no_qemu.clone());
    }
    let (accel, reason) = match &facts.virt {
        VirtKind::Hardware { .. } if choice == BackendChoice::Qemu => (
            Accel::Kvm,
            format!("--backend qemu on {}: using QEMU with KVM", facts.virt),
        ),
        VirtKind::Hardware { .. } if own == OwnVmm::Absent => (
            Accel::Kvm,
            format!(
                "{}: mvm's own VMM is not in this build yet; using QEMU with KVM",
                facts.virt
            ),
        ),
        VirtKind::Hardware { .. } => (
            Accel::Kvm,
            format!(
                "{}: using QEMU with KVM (mvm's own VMM has not booted Linux in its tests yet; \
                 ask for it with --backend kvm)",
                facts.virt
            ),
        ),
        VirtKind::Pvm => (
            Accel::Tcg,
            format!("/dev/kvm is PVM ({PVM_MODULE}): stock kernels cannot boot on it; using QEMU with TCG"),
        ),
        VirtKind::Unusable { reason } => (
            Accel::Tcg,
            format!("/dev/kvm cannot run stock kernels here ({reason}); using QEMU with TCG"),
        ),
        VirtKind::NoKvm => (
            Accel::Tcg,
            "no /dev/kvm on this host; using QEMU with TCG".to_string(),
        ),
    };
    Ok(Selected {
        backend: Backend::Qemu,
        accel,
        reason,
    })
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const INTEL_CPUINFO: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\n\
        flags\t\t: fpu vme de pse tsc msr pae vmx sse sse2 hypervisor\nbugs\t\t: spectre_v1\n";
    const AMD_CPUINFO: &str = "processor\t: 0\nvendor_id\t: AuthenticAMD\n\
        flags\t\t: fpu vme de pse tsc msr pae svm sse sse2\n";
    /// What these machines report: no vmx or svm.
    const PLAIN_CPUINFO: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\n\
        flags\t\t: fpu vme de pse tsc msr pae sse sse2 hypervisor\n";
    const DEBIAN_VERSION: &str = "QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)\n\
        Copyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers\n";

    fn refused() -> DevKvm {
        DevKvm::Refused {
            error: "Permission denied (os error 13)".into(),
        }
    }

    #[test]
    fn classifies_every_combination() {
        use DevKvm::{Missing, ReadWrite};
        let rw = ReadWrite;
        let cases: Vec<(&str, &str, &[&str], DevKvm, VirtKind)> = vec![
            (
                "vmx + kvm_intel",
                INTEL_CPUINFO,
                &["kvm_intel"],
                rw.clone(),
                VirtKind::Hardware {
                    vendor: Vendor::Intel,
                },
            ),
            (
                "svm + kvm_amd",
                AMD_CPUINFO,
                &["kvm_amd"],
                rw.clone(),
                VirtKind::Hardware {
                    vendor: Vendor::Amd,
                },
            ),
            (
                "vmx without its module",
                INTEL_CPUINFO,
                &[],
                rw.clone(),
                VirtKind::Unusable {
                    reason: UnusableReason::ModuleNotLoaded {
                        vendor: Vendor::Intel,
                    },
                },
            ),
            (
                "vmx with the other vendor's module",
                INTEL_CPUINFO,
                &["kvm_amd"],
                rw.clone(),
                VirtKind::Unusable {
                    reason: UnusableReason::ModuleNotLoaded {
                        vendor: Vendor::Intel,
                    },
                },
            ),
            (
                "svm + kvm_amd, /dev/kvm refused",
                AMD_CPUINFO,
                &["kvm_amd"],
                refused(),
                VirtKind::Unusable {
                    reason: UnusableReason::DevKvmRefused {
                        vendor: Vendor::Amd,
                        error: "Permission denied (os error 13)".into(),
                    },
                },
            ),
            (
                "pvm",
                PLAIN_CPUINFO,
                &["kvm_pvm"],
                rw.clone(),
                VirtKind::Pvm,
            ),
            (
                "pvm beside a vendor module is still pvm",
                INTEL_CPUINFO,
                &["kvm_intel", "kvm_pvm"],
                rw.clone(),
                VirtKind::Pvm,
            ),
            (
                "/dev/kvm with nothing behind it we know",
                PLAIN_CPUINFO,
                &[],
                rw.clone(),
                VirtKind::Unusable {
                    reason: UnusableReason::NoCpuSupport,
                },
            ),
            (
                "unreadable cpuinfo",
                "",
                &["kvm_intel"],
                rw.clone(),
                VirtKind::Unusable {
                    reason: UnusableReason::NoCpuSupport,
                },
            ),
            ("nothing", PLAIN_CPUINFO, &[], Missing, VirtKind::NoKvm),
            (
                "hardware but no /dev/kvm",
                INTEL_CPUINFO,
                &["kvm_intel"],
                Missing,
                VirtKind::NoKvm,
            ),
        ];
        for (what, cpuinfo, modules, dev_kvm, expected) in cases {
            assert_eq!(
                VirtKind::classify(cpuinfo, modules, &dev_kvm),
                expected,
                "{what}"
            );
        }
    }

    #[test]
    fn a_flag_is_a_whole_word_of_the_flags_line() {
        let tricky = "model name\t: vmx svm marketing\nflags\t\t: fpu vmxx nosvm\n";
        assert_eq!(
            VirtKind::classify(tricky, &["kvm_intel", "kvm_amd"], &DevKvm::ReadWrite),
            VirtKind::Unusable {
                reason: UnusableReason::NoCpuSupport
            }
        );
    }

    #[test]
    fn unusable_hosts_name_their_fix() {
        let unloaded = UnusableReason::ModuleNotLoaded {
            vendor: Vendor::Amd,
        };
        assert_eq!(unloaded.fix().as_deref(), Some("sudo modprobe kvm_amd"));
        assert_eq!(
            unloaded.to_string(),
            "the CPU has svm but kvm_amd is not loaded"
        );
        assert_eq!(UnusableReason::NoCpuSupport.fix(), None);
        let refused = UnusableReason::DevKvmRefused {
            vendor: Vendor::Intel,
            error: "Permission denied (os error 13)".into(),
        };
        assert_eq!(
            refused.fix().as_deref(),
            Some("sudo usermod -aG kvm \"$USER\"")
        );
    }

    #[test]
    fn parses_qemu_versions() {
        let v = |major, minor, patch| {
            Some(QemuVersion {
                major,
                minor,
                patch,
            })
        };
        assert_eq!(QemuVersion::parse(DEBIAN_VERSION), v(7, 2, 19));
        assert_eq!(
            QemuVersion::parse("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"),
            v(7, 2, 22)
        );
        assert_eq!(
            QemuVersion::parse("QEMU emulator version 7.2.0\n"),
            v(7, 2, 0)
        );
        assert_eq!(
            QemuVersion::parse("QEMU emulator version 8.2.2 (Debian 1:8.2.2+ds-0ubuntu1.4)"),
            v(8, 2, 2)
        );
        assert_eq!(
            QemuVersion::parse("QEMU emulator version 10.1"),
            v(10, 1, 0)
        );
        assert_eq!(
            QemuVersion::parse("QEMU emulator version 9.0.0-rc1"),
            v(9, 0, 0)
        );
        for garbage in [
            "",
            "garbage",
            "QEMU emulator version",
            "QEMU emulator version \n7.2.0",
            "QEMU emulator version x.y.z",
            "QEMU emulator version 7",
            "QEMU emulator version 7.",
            "QEMU emulator version .2.0",
            "QEMU emulator version 99999999999.2.0",
            "qemu emulator version 7.2.0",
        ] {
            assert_eq!(QemuVersion::parse(garbage), None, "{garbage:?}");
        }
    }

    #[test]
    fn qemu_older_than_7_2_is_refused() {
        let path = Path::new("/usr/bin/qemu-system-x86_64");
        let ok = QemuBinary::from_version_output(path, DEBIAN_VERSION).unwrap();
        assert_eq!(ok.version.to_string(), "7.2.19");
        assert_eq!(
            QemuBinary::from_version_output(path, "QEMU emulator version 7.2.0")
                .unwrap()
                .version,
            MIN_QEMU
        );
        let old = QemuBinary::from_version_output(
            path,
            "QEMU emulator version 7.1.0 (Debian 1:7.1+dfsg-2)",
        )
        .unwrap_err();
        assert_eq!(old.code(), "RUN012");
        assert!(old.to_string().contains("QEMU 7.1.0"), "{old}");
        assert_eq!(old.fix(), Some(QEMU_INSTALL));
        let garbage = QemuBinary::from_version_output(path, "Usage: foo\n").unwrap_err();
        assert_eq!(garbage.code(), "RUN011");
        assert!(garbage.to_string().contains("Usage: foo"), "{garbage}");
    }

    fn write_executable(path: &Path, text: &str) {
        fs::write(path, text).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn locates_qemu_by_override_then_path() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        fs::create_dir_all(&a).unwrap();
        fs::create_dir_all(&b).unwrap();
        // Not executable in a: skipped for b's.
        fs::write(a.join(QEMU_BINARY), "").unwrap();
        write_executable(&b.join(QEMU_BINARY), "");
        let search = std::env::join_paths(["", a.to_str().unwrap(), b.to_str().unwrap()]).unwrap();
        assert_eq!(
            QemuBinary::locate(None, Some(&search)).unwrap(),
            b.join(QEMU_BINARY)
        );
        assert_eq!(
            QemuBinary::locate(Some(OsStr::new("")), Some(&search)).unwrap(),
            b.join(QEMU_BINARY)
        );
        let chosen = b.join(QEMU_BINARY);
        assert_eq!(
            QemuBinary::locate(Some(chosen.as_os_str()), None).unwrap(),
            chosen
        );
        let missing =
            QemuBinary::locate(Some(OsStr::new("/nonexistent")), Some(&search)).unwrap_err();
        assert_eq!(missing.code(), "RUN011");
        assert!(
            missing.to_string().contains("MVM_QEMU=/nonexistent"),
            "{missing}"
        );
        assert!(missing.to_string().contains(QEMU_INSTALL), "{missing}");
        let empty = QemuBinary::locate(None, Some(OsStr::new(a.to_str().unwrap()))).unwrap_err();
        assert_eq!(empty.code(), "RUN011");
        assert_eq!(QemuBinary::locate(None, None).unwrap_err().code(), "RUN011");
    }

    /// Every program in one test: a file written and executed while another test thread forks
    /// can fail with ETXTBSY.
    #[test]
    fn probes_a_qemu_by_running_it() {
        let tmp = tempfile::tempdir().unwrap();
        let good = tmp.path().join("good");
        write_executable(
            &good,
            &format!("#!/bin/sh\nprintf '%s' '{DEBIAN_VERSION}'\n"),
        );
        assert_eq!(
            QemuBinary::probe(&good).unwrap().version.to_string(),
            "7.2.19"
        );
        let failing = tmp.path().join("failing");
        write_executable(&failing, "#!/bin/sh\nexit 3\n");
        let err = QemuBinary::probe(&failing).unwrap_err();
        assert_eq!(err.code(), "RUN011");
        assert!(err.to_string().contains("failed"), "{err}");
        let hanging = tmp.path().join("hanging");
        write_executable(&hanging, "#!/bin/sh\nexec sleep 30\n");
        let started = Instant::now();
        let err = version_output(&hanging, Duration::from_millis(200)).unwrap_err();
        assert!(err.contains("did not finish"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
        let not_a_program = tmp.path().join("text");
        write_executable(&not_a_program, "no interpreter line\0\u{1}");
        assert_eq!(
            QemuBinary::probe(&not_a_program).unwrap_err().code(),
            "RUN011"
        );
    }

    fn facts(virt: VirtKind) -> HostFacts {
        HostFacts {
            virt,
            qemu: Ok(QemuBinary {
                path: PathBuf::from("/usr/bin/qemu-system-x86_64"),
                version: MIN_QEMU,
            }),
        }
    }

    #[test]
    fn auto_on_pvm_is_qemu_with_tcg() {
        let selected = select(BackendChoice::Auto, &facts(VirtKind::Pvm)).unwrap();
        assert_eq!(
            (selected.backend, selected.accel),
            (Backend::Qemu, Accel::Tcg)
        );
        assert_eq!(
            selected.reason,
            "/dev/kvm is PVM (kvm_pvm): stock kernels cannot boot on it; using QEMU with TCG"
        );
        for virt in [
            VirtKind::NoKvm,
            VirtKind::Unusable {
                reason: UnusableReason::NoCpuSupport,
            },
        ] {
            let selected = select(BackendChoice::Auto, &facts(virt.clone())).unwrap();
            assert_eq!(
                (selected.backend, selected.accel),
                (Backend::Qemu, Accel::Tcg),
                "{virt}"
            );
            let explicit = select(BackendChoice::Qemu, &facts(virt)).unwrap();
            assert_eq!(explicit, selected);
        }
    }

    #[test]
    fn hardware_gets_kvm_acceleration() {
        let intel = facts(VirtKind::Hardware {
            vendor: Vendor::Intel,
        });
        // This build: auto and an explicit kvm are mvm's own VMM; qemu is QEMU with KVM.
        let auto = select(BackendChoice::Auto, &intel).unwrap();
        assert_eq!((auto.backend, auto.accel), (Backend::Kvm, Accel::Kvm));
        assert!(auto.reason.contains("mvm's own VMM"), "{}", auto.reason);
        let qemu = select(BackendChoice::Qemu, &intel).unwrap();
        assert_eq!((qemu.backend, qemu.accel), (Backend::Qemu, Accel::Kvm));
        let kvm = select(BackendChoice::Kvm, &intel).unwrap();
        assert_eq!((kvm.backend, kvm.accel), (Backend::Kvm, Accel::Kvm));
        // A build that only runs it when asked for keeps auto on QEMU with KVM.
        let auto = select_in_build(BackendChoice::Auto, &intel, OwnVmm::Explicit).unwrap();
        assert_eq!((auto.backend, auto.accel), (Backend::Qemu, Accel::Kvm));
        assert!(auto.reason.contains("--backend kvm"), "{}", auto.reason);
        // A build without the VMM refuses it ...
        let err = select_in_build(BackendChoice::Kvm, &intel, OwnVmm::Absent).unwrap_err();
        assert_eq!(err.code(), "RUN010");
        assert_eq!(
            err.to_string(),
            "the kvm backend is not in this build yet; use --backend qemu"
        );
        let auto = select_in_build(BackendChoice::Auto, &intel, OwnVmm::Absent).unwrap();
        assert!(
            auto.reason.contains("not in this build yet"),
            "{}",
            auto.reason
        );
        let qemu = select_in_build(BackendChoice::Qemu, &intel, OwnVmm::Default).unwrap();
        assert_eq!((qemu.backend, qemu.accel), (Backend::Qemu, Accel::Kvm));
        // Without hardware virtualization the VMM is never used, whatever the build.
        for own in [OwnVmm::Explicit, OwnVmm::Default] {
            let err = select_in_build(BackendChoice::Kvm, &facts(VirtKind::Pvm), own).unwrap_err();
            assert_eq!(err.code(), "RUN013");
            assert!(err.to_string().contains("PVM (kvm_pvm)"), "{err}");
            let auto = select_in_build(BackendChoice::Auto, &facts(VirtKind::Pvm), own).unwrap();
            assert_eq!((auto.backend, auto.accel), (Backend::Qemu, Accel::Tcg));
        }
    }

    #[test]
    fn a_qemu_backend_needs_a_usable_qemu() {
        let no_qemu = |virt| HostFacts {
            virt,
            qemu: Err(HostError::NoQemu {
                reason: "qemu-system-x86_64 is not on PATH".into(),
            }),
        };
        for choice in [BackendChoice::Auto, BackendChoice::Qemu] {
            let err = select(choice, &no_qemu(VirtKind::Pvm)).unwrap_err();
            assert_eq!(err.code(), "RUN011");
            assert_eq!(err.fix(), Some("apt-get install qemu-system-x86"));
        }
        // Without QEMU, hardware virtualization still runs the VMM when asked for.
        let hardware = no_qemu(VirtKind::Hardware {
            vendor: Vendor::Amd,
        });
        assert_eq!(
            select(BackendChoice::Kvm, &hardware).unwrap().backend,
            Backend::Kvm
        );
        // And for auto in this build; a build that only runs it when asked for needs QEMU.
        assert_eq!(
            select(BackendChoice::Auto, &hardware).unwrap().backend,
            Backend::Kvm
        );
        assert_eq!(
            select_in_build(BackendChoice::Auto, &hardware, OwnVmm::Explicit)
                .unwrap_err()
                .code(),
            "RUN011"
        );
    }

    #[test]
    fn backend_choice_round_trips() {
        for choice in [BackendChoice::Auto, BackendChoice::Qemu, BackendChoice::Kvm] {
            assert_eq!(choice.to_string().parse::<BackendChoice>(), Ok(choice));
        }
        assert_eq!(BackendChoice::default(), BackendChoice::Auto);
        let err = "firecracker".parse::<BackendChoice>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown backend \"firecracker\": use auto, qemu or kvm"
        );
        assert!("".parse::<BackendChoice>().is_err());
        assert!("KVM".parse::<BackendChoice>().is_err());
    }

    /// The real host, whatever it is: detection never panics, and on these machines (PVM)
    /// says so.
    #[test]
    fn detects_this_host() {
        let virt = VirtKind::detect();
        if Path::new("/sys/module/kvm_pvm").exists() && Path::new("/dev/kvm").exists() {
            assert_eq!(virt, VirtKind::Pvm);
        } else {
            println!("not a PVM host; detected {virt}");
        }
    }
}
