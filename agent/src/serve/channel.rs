//! The agent channel: the virtio-console port the host names [`PORT_NAME`].
//!
//! The port appears once `virtio_console` is loaded and the device is probed; without udev,
//! its name is read from sysfs and its node (`/dev/vportNpM`, made by devtmpfs) opened
//! directly. A port is not a tty: bytes pass through untouched.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::boot::BootError;
use mvm_protocol::PORT_NAME;

/// Where the kernel lists virtio-console ports with their names.
const PORTS: &str = "/sys/class/virtio-ports";
/// How long the port may take to appear after its driver loaded.
pub const PORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Waits for the port named [`PORT_NAME`] and opens it for reading and writing.
pub fn open() -> Result<File, BootError> {
    let started = Instant::now();
    loop {
        if let Some(node) = find(Path::new(PORTS)).map_err(channel_error)? {
            return OpenOptions::new()
                .read(true)
                .write(true)
                .open(&node)
                .map_err(channel_error);
        }
        if started.elapsed() > PORT_TIMEOUT {
            return Err(channel_error(io::Error::other(format!(
                "no virtio-console port named {PORT_NAME} within {}s",
                PORT_TIMEOUT.as_secs()
            ))));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The device node of the port named [`PORT_NAME`] under `ports`, if it is there yet.
fn find(ports: &Path) -> io::Result<Option<String>> {
    let entries = match fs::read_dir(ports) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if name.trim_end() == PORT_NAME {
            let node = format!("/dev/{}", entry.file_name().to_string_lossy());
            if Path::new(&node).exists() {
                return Ok(Some(node));
            }
        }
    }
    Ok(None)
}

fn channel_error(source: io::Error) -> BootError {
    BootError::Channel { source }
}
