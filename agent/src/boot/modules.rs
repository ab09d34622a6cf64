//! Loading the kernel modules the initramfs carries.
//!
//! The Debian cloud kernel has virtio, device-mapper, dm-verity, EROFS and overlayfs as
//! modules. The builder copies them to [`MODULE_DIR`] and lists their names in dependency
//! order in [`MODULE_LIST`]; each is loaded with `finit_module` from its file, so the kernel
//! reads the module itself. A module the kernel already has (`EEXIST`) is not an error.

use std::fs::{self, File};
use std::path::Path;

use rustix::io::Errno;

use super::BootError;

/// The load order: one module name a line (the builder's `etc/mvm/modules`).
pub const MODULE_LIST: &str = "/etc/mvm/modules";
/// Where the modules are, as `<name>.ko`.
pub const MODULE_DIR: &str = "/lib/modules";

/// Loads every module named in `list` from `dir`, in order.
pub fn load_listed(list: &Path, dir: &Path) -> Result<(), BootError> {
    let names = fs::read_to_string(list).map_err(BootError::system(list.display().to_string()))?;
    for name in names.lines().map(str::trim).filter(|l| !l.is_empty()) {
        load(name, &dir.join(format!("{name}.ko")))?;
    }
    Ok(())
}

fn load(name: &str, path: &Path) -> Result<(), BootError> {
    let failed = |source: std::io::Error| BootError::Module {
        name: name.to_string(),
        source,
    };
    let file = File::open(path).map_err(failed)?;
    match rustix::system::finit_module(&file, c"", 0) {
        Ok(()) | Err(Errno::EXIST) => Ok(()),
        Err(e) => Err(failed(e.into())),
    }
}
