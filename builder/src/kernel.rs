//! Guest kernels: the Debian cloud kernel package, unpacked into `$MVM_HOME/kernels/<version>/`
//! with every file pinned by sha256.
//!
//! The cloud kernel has its virtio, device-mapper and EROFS drivers as modules, so a kernel
//! here is `vmlinuz` (a bzImage, booted by QEMU), `vmlinux` (the same kernel uncompressed, an
//! ELF for backends that load ELF directly), and the modules the guest agent loads, in load
//! order: [`GUEST_MODULES`] and everything they depend on (read from each module's `.modinfo`
//! `depends=`, as depmod would). `manifest.json` records the package it came from and the
//! sha256 of every file; [`KernelStore::open`] re-hashes them before a build uses them.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use object::{Object, ObjectSection};
use serde::{Deserialize, Serialize};

use crate::debian::{self, DebianError};
use mvm_ir::digest::sha256_prefixed;
use mvm_ir::fsutil::atomic_write;
use mvm_ir::{Coded, ErrorClass};

/// The modules the guest needs (and their dependencies come with them): virtio-mmio transport,
/// block, console and rng devices, device-mapper verity and crypt (volumes: AES-XTS), EROFS and
/// overlayfs.
pub const GUEST_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    "virtio_rng",
    "dm_mod",
    "dm_bufio",
    "dm_verity",
    "ecb",
    "xts",
    "dm_crypt",
    "erofs",
    "overlay",
];

/// The Debian package that tracks the current cloud kernel.
pub const DEBIAN_CLOUD_KERNEL: &str = "linux-image-cloud-amd64";

/// Why a kernel could not be fetched, unpacked or opened. Its [`Coded::code`] is stable.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// apt-get or dpkg-deb failed or is missing, or did not give the package asked for.
    #[error(transparent)]
    Debian(#[from] DebianError),
    /// The package does not hold a usable kernel.
    #[error("{0}")]
    BadPackage(String),
    /// A module the guest needs is not in the package (and not built in).
    #[error("module {0} is neither in the package nor built into the kernel")]
    MissingModule(String),
    /// No kernel has been fetched.
    #[error("no guest kernel in {0}; run `mvm kernel fetch`")]
    NoKernel(String),
    /// A stored kernel file no longer matches its pinned sha256.
    #[error("{path}: sha256 is {found}, pinned {pinned}")]
    DigestMismatch {
        /// The file.
        path: String,
        /// What the manifest pins.
        pinned: String,
        /// What it hashes to now.
        found: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl Coded for KernelError {
    fn code(&self) -> &str {
        match self {
            KernelError::Debian(DebianError::Tool { .. }) => "KERNEL001",
            KernelError::BadPackage(_) | KernelError::Debian(DebianError::BadPackage(_)) => {
                "KERNEL002"
            }
            KernelError::MissingModule(_) => "KERNEL003",
            KernelError::NoKernel(_) => "KERNEL004",
            KernelError::DigestMismatch { .. } => "KERNEL005",
            KernelError::Io { .. } | KernelError::Debian(DebianError::Io { .. }) => "KERNEL006",
        }
    }

    /// A stored file off its pin (KERNEL005) is an integrity failure; the tools and files of
    /// the host (KERNEL001, KERNEL006) are I/O; a package without what the guest needs is bad
    /// input.
    fn class(&self) -> ErrorClass {
        match self {
            KernelError::DigestMismatch { .. } => ErrorClass::Integrity,
            KernelError::Debian(DebianError::BadPackage(_)) => ErrorClass::InvalidInput,
            KernelError::Debian(_) | KernelError::Io { .. } => ErrorClass::Io,
            KernelError::BadPackage(_)
            | KernelError::MissingModule(_)
            | KernelError::NoKernel(_) => ErrorClass::InvalidInput,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> KernelError + '_ {
    move |source| KernelError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A file of a stored kernel and its pinned digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePin {
    /// Path relative to the kernel's directory.
    pub path: String,
    /// `sha256:` digest.
    pub digest: String,
}

/// A module, in load order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModulePin {
    /// Module name (`dm_verity`).
    pub name: String,
    /// The file.
    #[serde(flatten)]
    pub file: FilePin,
}

/// Where a kernel came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackagePin {
    /// Debian package name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// `sha256:` of the .deb file.
    pub digest: String,
}

/// `manifest.json` of a stored kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelManifest {
    /// The kernel release (`6.1.0-56-cloud-amd64`).
    pub release: String,
    /// The package it was unpacked from.
    pub package: PackagePin,
    /// The bzImage.
    pub vmlinuz: FilePin,
    /// The uncompressed ELF kernel, when it could be extracted.
    pub vmlinux: Option<FilePin>,
    /// Modules the guest agent loads, in this order.
    pub modules: Vec<ModulePin>,
}

/// A stored, verified kernel.
#[derive(Debug, Clone)]
pub struct GuestKernel {
    /// Its directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: KernelManifest,
}

impl GuestKernel {
    /// The absolute path of a pinned file.
    pub fn path(&self, pin: &FilePin) -> PathBuf {
        self.dir.join(&pin.path)
    }
}

/// The kernels of a host.
#[derive(Debug, Clone)]
pub struct KernelStore {
    dir: PathBuf,
}

impl KernelStore {
    /// The store in `dir` (e.g. `$MVM_HOME/kernels`).
    pub fn at(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    /// Downloads the current `package` (default [`DEBIAN_CLOUD_KERNEL`]) with apt and stores it.
    /// A metapackage is followed to the kernel image package it depends on.
    pub fn fetch_debian(&self, package: &str) -> Result<GuestKernel, KernelError> {
        let work = tempfile::tempdir().map_err(io_err(Path::new("temporary directory")))?;
        let mut deb = apt_download(package, work.path())?;
        let control = debian::field(&deb, "Depends")?;
        if !deb_has_kernel(&deb)? {
            // A metapackage: its first linux-image dependency is the kernel.
            let image = control
                .split(',')
                .map(|d| d.trim().split(' ').next().unwrap_or(""))
                .find(|d| d.starts_with("linux-image-"))
                .ok_or_else(|| {
                    KernelError::BadPackage(format!(
                        "{package} holds no kernel and depends on none"
                    ))
                })?;
            deb = apt_download(image, work.path())?;
        }
        self.import_deb(&deb)
    }

    /// Stores the kernel of the Debian package file `deb`.
    pub fn import_deb(&self, deb: &Path) -> Result<GuestKernel, KernelError> {
        let deb_bytes = fs::read(deb).map_err(io_err(deb))?;
        let package = PackagePin {
            name: debian::field(deb, "Package")?,
            version: debian::field(deb, "Version")?,
            digest: sha256_prefixed(&deb_bytes),
        };
        drop(deb_bytes);
        let unpacked = tempfile::tempdir().map_err(io_err(Path::new("temporary directory")))?;
        debian::run(
            "dpkg-deb",
            mvm_ir::env::command("dpkg-deb")
                .arg("-x")
                .arg(deb)
                .arg(unpacked.path()),
        )?;
        self.store(unpacked.path(), package)
    }

    /// Stores a user-supplied kernel: a bzImage and the `lib/modules/<release>` directory of
    /// the same build (its name is the release).
    pub fn import_files(&self, vmlinuz: &Path, modules: &Path) -> Result<GuestKernel, KernelError> {
        let release = modules
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| !n.is_empty() && !n.starts_with('.'))
            .ok_or_else(|| {
                KernelError::BadPackage(format!(
                    "{} does not name a kernel release",
                    modules.display()
                ))
            })?
            .to_string();
        let bytes = fs::read(vmlinuz).map_err(io_err(vmlinuz))?;
        let package = PackagePin {
            name: "user-supplied".into(),
            version: release.clone(),
            digest: sha256_prefixed(&bytes),
        };
        self.store_parts(&release, &bytes, modules, package)
    }

    /// Lays out an unpacked package's kernel and modules under `<store>/<release>/`.
    fn store(&self, root: &Path, package: PackagePin) -> Result<GuestKernel, KernelError> {
        let modules_root = root.join("lib/modules");
        let release = single_entry(&modules_root)?;
        let vmlinuz_src = root.join("boot").join(format!("vmlinuz-{release}"));
        let vmlinuz = fs::read(&vmlinuz_src).map_err(io_err(&vmlinuz_src))?;
        self.store_parts(&release, &vmlinuz, &modules_root.join(&release), package)
    }

    fn store_parts(
        &self,
        release: &str,
        vmlinuz: &[u8],
        release_dir: &Path,
        package: PackagePin,
    ) -> Result<GuestKernel, KernelError> {
        let release = release.to_string();
        let index = index_modules(release_dir)?;
        let builtin = fs::read_to_string(release_dir.join("modules.builtin")).unwrap_or_default();
        let builtin: Vec<String> = builtin
            .lines()
            .filter_map(|l| Path::new(l).file_stem()?.to_str().map(module_name))
            .collect();
        let order = load_order(&index, &builtin)?;

        fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        let staging = tempfile::tempdir_in(&self.dir).map_err(io_err(&self.dir))?;
        let write = |rel: &str, bytes: &[u8]| -> Result<FilePin, KernelError> {
            let path = staging.path().join(rel);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).map_err(io_err(parent))?;
            }
            fs::write(&path, bytes).map_err(io_err(&path))?;
            Ok(FilePin {
                path: rel.to_string(),
                digest: sha256_prefixed(bytes),
            })
        };
        let vmlinux = match extract_vmlinux(vmlinuz) {
            Some(elf) => Some(write("vmlinux", &elf)?),
            None => None,
        };
        let vmlinuz = write("vmlinuz", vmlinuz)?;
        let mut modules = Vec::new();
        for name in order {
            let src = &index[&name];
            let bytes = fs::read(src).map_err(io_err(src))?;
            modules.push(ModulePin {
                file: write(&format!("modules/{name}.ko"), &bytes)?,
                name,
            });
        }
        let manifest = KernelManifest {
            release: release.clone(),
            package,
            vmlinuz,
            vmlinux,
            modules,
        };
        let json = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| KernelError::BadPackage(e.to_string()))?;
        let manifest_path = staging.path().join("manifest.json");
        atomic_write(&manifest_path, &json, 0o644).map_err(|e| KernelError::Io {
            path: manifest_path.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        })?;
        // Replace any older copy of this release whole: a rename, never a half-written kernel.
        let dest = self.dir.join(&release);
        let staged = staging.keep();
        if dest.exists() {
            let old = self.dir.join(format!(".{release}.old"));
            let _ = fs::remove_dir_all(&old);
            fs::rename(&dest, &old).map_err(io_err(&dest))?;
            fs::rename(&staged, &dest).map_err(io_err(&dest))?;
            let _ = fs::remove_dir_all(&old);
        } else {
            fs::rename(&staged, &dest).map_err(io_err(&dest))?;
        }
        self.open(&release)
    }

    /// The stored kernel `release`, every file re-hashed against its pin.
    pub fn open(&self, release: &str) -> Result<GuestKernel, KernelError> {
        let dir = self.dir.join(release);
        let manifest_path = dir.join("manifest.json");
        let bytes = fs::read(&manifest_path).map_err(io_err(&manifest_path))?;
        let manifest: KernelManifest = serde_json::from_slice(&bytes)
            .map_err(|e| KernelError::BadPackage(format!("{}: {e}", manifest_path.display())))?;
        let kernel = GuestKernel { dir, manifest };
        let pins = std::iter::once(&kernel.manifest.vmlinuz)
            .chain(kernel.manifest.vmlinux.as_ref())
            .chain(kernel.manifest.modules.iter().map(|m| &m.file));
        for pin in pins {
            if pin.path.contains("..") || pin.path.starts_with('/') {
                return Err(KernelError::BadPackage(format!(
                    "manifest path {:?} leaves the kernel directory",
                    pin.path
                )));
            }
            let path = kernel.path(pin);
            let found = sha256_prefixed(&fs::read(&path).map_err(io_err(&path))?);
            if found != pin.digest {
                return Err(KernelError::DigestMismatch {
                    path: path.display().to_string(),
                    pinned: pin.digest.clone(),
                    found,
                });
            }
        }
        Ok(kernel)
    }

    /// The newest stored kernel (by release name).
    pub fn latest(&self) -> Result<GuestKernel, KernelError> {
        let mut releases: Vec<String> = fs::read_dir(&self.dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|name| {
                        !name.starts_with('.')
                            && self.dir.join(name).join("manifest.json").is_file()
                    })
                    .collect()
            })
            .unwrap_or_default();
        releases.sort_by_key(|r| version_key(r));
        let newest = releases
            .pop()
            .ok_or_else(|| KernelError::NoKernel(self.dir.display().to_string()))?;
        self.open(&newest)
    }
}

/// Numbers in a release compare as numbers (`6.1.0-56` after `6.1.0-9`).
fn version_key(release: &str) -> Vec<(u64, String)> {
    release
        .split(|c: char| !c.is_ascii_alphanumeric())
        .map(|part| (part.parse().unwrap_or(0), part.to_string()))
        .collect()
}

/// Module names treat `-` and `_` alike; the kernel's form uses `_`.
fn module_name(stem: &str) -> String {
    stem.replace('-', "_")
}

fn single_entry(dir: &Path) -> Result<String, KernelError> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map_err(|_| KernelError::BadPackage(format!("no {} in the package", dir.display())))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    if names.len() != 1 {
        return Err(KernelError::BadPackage(format!(
            "expected one kernel release in the package, found {names:?}"
        )));
    }
    Ok(names.remove(0))
}

/// Every `.ko` under `dir`, by module name.
fn index_modules(dir: &Path) -> Result<BTreeMap<String, PathBuf>, KernelError> {
    let mut index = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let path = entry.path();
            // Never follow symlinks: a package may hold links out of its own tree.
            let kind = entry.file_type().map_err(io_err(&path))?;
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file() && path.extension().is_some_and(|e| e == "ko") {
                if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                    index.insert(module_name(stem), path);
                }
            }
        }
    }
    Ok(index)
}

/// The `depends=` of a module's `.modinfo` section.
fn module_depends(path: &Path) -> Result<Vec<String>, KernelError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    let bad = |why: String| KernelError::BadPackage(format!("{}: {why}", path.display()));
    let file = object::File::parse(&*bytes).map_err(|e| bad(e.to_string()))?;
    let section = file
        .section_by_name(".modinfo")
        .ok_or_else(|| bad("no .modinfo section".into()))?;
    let data = section.data().map_err(|e| bad(e.to_string()))?;
    Ok(data
        .split(|&b| b == 0)
        .filter_map(|field| field.strip_prefix(b"depends="))
        .flat_map(|deps| deps.split(|&b| b == b','))
        .filter(|d| !d.is_empty())
        .map(|d| module_name(&String::from_utf8_lossy(d)))
        .collect())
}

/// [`GUEST_MODULES`] and their dependencies, each after everything it depends on.
fn load_order(
    index: &BTreeMap<String, PathBuf>,
    builtin: &[String],
) -> Result<Vec<String>, KernelError> {
    fn visit(
        name: &str,
        index: &BTreeMap<String, PathBuf>,
        builtin: &[String],
        order: &mut Vec<String>,
        visiting: &mut Vec<String>,
    ) -> Result<(), KernelError> {
        if order.iter().any(|n| n == name) || builtin.iter().any(|n| n == name) {
            return Ok(());
        }
        if visiting.iter().any(|n| n == name) {
            return Err(KernelError::BadPackage(format!(
                "module dependency cycle through {name}"
            )));
        }
        let path = index
            .get(name)
            .ok_or_else(|| KernelError::MissingModule(name.to_string()))?;
        visiting.push(name.to_string());
        for dep in module_depends(path)? {
            visit(&dep, index, builtin, order, visiting)?;
        }
        visiting.pop();
        order.push(name.to_string());
        Ok(())
    }
    let mut order = Vec::new();
    for name in GUEST_MODULES {
        visit(name, index, builtin, &mut order, &mut Vec::new())?;
    }
    Ok(order)
}

/// The ELF kernel inside a bzImage whose payload is LZ4-compressed (the legacy frame format the
/// kernel build uses: a magic, then blocks each prefixed by its compressed length). `None` for
/// other compressions.
pub fn extract_vmlinux(bzimage: &[u8]) -> Option<Vec<u8>> {
    const MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
    const BLOCK: usize = 8 << 20;
    let start = bzimage.windows(4).position(|w| w == MAGIC)? + 4;
    let mut rest = &bzimage[start..];
    let mut out = Vec::new();
    let mut block = vec![0u8; BLOCK];
    while rest.len() >= 4 {
        let len = u32::from_le_bytes(rest[..4].try_into().ok()?) as usize;
        if len == u32::from_le_bytes(MAGIC) as usize {
            rest = &rest[4..];
            continue;
        }
        if len == 0 || len > rest.len() - 4 || len > lz4_flex::block::get_maximum_output_size(BLOCK)
        {
            break;
        }
        match lz4_flex::block::decompress_into(&rest[4..4 + len], &mut block) {
            Ok(n) => out.extend_from_slice(&block[..n]),
            Err(_) => break,
        }
        rest = &rest[4 + len..];
    }
    // The payload's end is not marked: the ELF headers say how long the file is.
    let elf = object::read::elf::ElfFile64::<object::Endianness>::parse(&*out).ok()?;
    let header = elf.elf_header();
    let endian = elf.endian();
    use object::read::elf::FileHeader;
    let table =
        usize::from(header.e_shnum(endian)).checked_mul(usize::from(header.e_shentsize(endian)))?;
    let end = usize::try_from(header.e_shoff(endian))
        .ok()?
        .checked_add(table)?;
    if end == 0 || end > out.len() {
        return None;
    }

    out.truncate(end);
    Some(out)
}

/// Downloads `package` into `dir`: its `.deb`.
fn apt_download(package: &str, dir: &Path) -> Result<PathBuf, KernelError> {
    let mut debs = debian::download(&[package.to_string()], dir)?;
    Ok(debs.remove(package).unwrap_or_default())
}

fn deb_has_kernel(deb: &Path) -> Result<bool, KernelError> {
    let output = debian::run(
        "dpkg-deb",
        mvm_ir::env::command("dpkg-deb").arg("-c").arg(deb),
    )?;
    Ok(String::from_utf8_lossy(&output.stdout).contains("./boot/vmlinuz-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The real Debian cloud kernel: fetched with apt, unpacked, modules ordered by their own
    /// `.modinfo`, the ELF kernel extracted (and checked against the `lz4` tool), every file
    /// pinned; a changed file is caught when the kernel is opened.
    #[test]
    fn debian_cloud_kernel_is_fetched_ordered_and_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let store = KernelStore::at(dir.path());
        let kernel = store.fetch_debian(DEBIAN_CLOUD_KERNEL).expect("apt-get download of the cloud kernel (needs Debian's apt and the package lists: apt-get update)");
        let m = &kernel.manifest;
        assert!(m.release.ends_with("-cloud-amd64"), "{}", m.release);
        assert!(m.package.name.starts_with("linux-image-"));
        let names: Vec<&str> = m.modules.iter().map(|m| m.name.as_str()).collect();
        let at = |n: &str| {
            names
                .iter()
                .position(|m| *m == n)
                .unwrap_or_else(|| panic!("{n} missing from {names:?}"))
        };
        for n in GUEST_MODULES {
            at(n);
        }
        assert!(at("dm_mod") < at("dm_bufio") && at("dm_bufio") < at("dm_verity"));
        assert!(at("ecb") < at("xts") && at("dm_mod") < at("dm_crypt"));
        assert!(at("virtio_ring") < at("virtio") && at("virtio") < at("virtio_mmio"));
        assert!(at("virtio") < at("virtio_blk"));

        let vmlinux = fs::read(
            kernel.path(
                m.vmlinux
                    .as_ref()
                    .expect("the cloud kernel is LZ4: vmlinux extracted"),
            ),
        )
        .unwrap();
        assert_eq!(&vmlinux[..4], b"\x7fELF");
        // The lz4 tool decompresses the same payload to the same bytes (it may add padding).
        let vmlinuz = fs::read(kernel.path(&m.vmlinuz)).unwrap();
        let offset = vmlinuz
            .windows(4)
            .position(|w| w == [0x02, 0x21, 0x4c, 0x18])
            .unwrap();
        let payload = dir.path().join("payload.lz4");
        fs::write(&payload, &vmlinuz[offset..]).unwrap();
        let out = std::process::Command::new("lz4")
            .arg("-dc")
            .arg(&payload)
            .output()
            .expect("the lz4 tool must be installed (.ci/run installs lz4)");
        assert!(out.stdout.len() >= vmlinux.len());
        assert!(
            out.stdout[..vmlinux.len()] == vmlinux[..],
            "vmlinux differs from lz4's output"
        );

        // A user-supplied kernel (bzImage + modules directory) is stored the same way.
        let modules_src = kernel.dir.join("modules");
        let other = tempfile::tempdir().unwrap();
        let release_dir = other.path().join("6.1.0-test");
        fs::create_dir_all(release_dir.join("kernel")).unwrap();
        for entry in fs::read_dir(&modules_src).unwrap() {
            let entry = entry.unwrap();
            fs::copy(
                entry.path(),
                release_dir.join("kernel").join(entry.file_name()),
            )
            .unwrap();
        }
        let custom = KernelStore::at(&dir.path().join("custom"))
            .import_files(&kernel.path(&m.vmlinuz), &release_dir)
            .unwrap();
        assert_eq!(custom.manifest.release, "6.1.0-test");
        assert_eq!(custom.manifest.package.name, "user-supplied");
        assert_eq!(custom.manifest.vmlinuz.digest, m.vmlinuz.digest);
        let custom_names: Vec<&str> = custom
            .manifest
            .modules
            .iter()
            .map(|m| m.name.as_str())
            .collect();
        assert_eq!(custom_names, names);

        // Opening again re-verifies; a changed module is caught.
        let again = store.latest().unwrap();
        assert_eq!(again.manifest, kernel.manifest);
        let module = kernel.path(&m.modules[0].file);
        let mut bytes = fs::read(&module).unwrap();
        bytes[100] ^= 1;
        fs::write(&module, bytes).unwrap();
        assert_eq!(store.latest().unwrap_err().code(), "KERNEL005");
    }

    #[test]
    fn no_kernel_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            KernelStore::at(dir.path()).latest().unwrap_err().code(),
            "KERNEL004"
        );
        assert_eq!(
            KernelStore::at(dir.path())
                .fetch_debian("bad name;rm")
                .unwrap_err()
                .code(),
            "KERNEL002"
        );
    }

    #[test]
    fn release_order_compares_numbers() {
        let mut r = [
            "6.1.0-9-cloud-amd64",
            "6.1.0-56-cloud-amd64",
            "6.1.0-10-cloud-amd64",
        ];
        r.sort_by_key(|r| version_key(r));
        assert_eq!(r.last(), Some(&"6.1.0-56-cloud-amd64"));
    }
}
