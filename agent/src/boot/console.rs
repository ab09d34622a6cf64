//! The serial console (`/dev/console`, ttyS0) and powering the guest off.
//!
//! The initramfs carries no device nodes, so the kernel could not give `/init` a console:
//! [`Console::open`] mounts devtmpfs on `/dev` first, opens `/dev/console` and makes it the
//! agent's stdin, stdout and stderr. The host reads this console: every line the agent writes
//! here starts with `mvm-agent: `.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;

use rustix::system::RebootCommand;

use super::{mounts, BootError};

/// The console, also installed as the agent's standard streams.
#[derive(Debug)]
pub struct Console(File);

impl Console {
    /// Mounts devtmpfs on `/dev` and opens `/dev/console`.
    pub fn open() -> Result<Self, BootError> {
        mounts::mount_devtmpfs()?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(rustix::fs::OFlags::NOCTTY.bits() as i32)
            .open("/dev/console")
            .map_err(BootError::system("/dev/console"))?;
        let stdio = |r: rustix::io::Result<()>| {
            r.map_err(|e| BootError::System {
                what: "console as standard streams".into(),
                source: e.into(),
            })
        };
        stdio(rustix::stdio::dup2_stdin(&file))?;
        stdio(rustix::stdio::dup2_stdout(&file))?;
        stdio(rustix::stdio::dup2_stderr(&file))?;
        Ok(Self(file))
    }

    /// Writes `mvm-agent: <message>` as one line. A console that cannot be written to leaves
    /// nothing to report the failure on, so write errors are dropped.
    pub fn line(&mut self, message: &str) {
        let _ = self
            .0
            .write_all(format!("mvm-agent: {message}\n").as_bytes());
    }

    /// Reports a failed boot as `mvm-agent: error <code> <message>`.
    pub fn error(&mut self, error: &BootError) {
        self.line(&format!("error {} {error}", error.code()));
    }

    /// Flushes the filesystems, waits until the console has sent everything (otherwise the
    /// last lines race the power-off) and powers the guest off.
    pub fn power_off(self) -> ! {
        power_off(Some(&self.0))
    }
}

/// Powers the guest off after syncing and draining `console` if there is one. The kernel does
/// not return from a successful power-off; if it fails, PID 1 must still not exit (that is a
/// kernel panic), so it parks.
pub fn power_off(console: Option<&File>) -> ! {
    rustix::fs::sync();
    if let Some(console) = console {
        let _ = rustix::termios::tcdrain(console);
    }
    let _ = rustix::system::reboot(RebootCommand::PowerOff);
    loop {
        std::thread::park();
    }
}

/// Opens `/dev/console` again, if it can be, for the panic hook's last word.
pub fn reopen() -> Option<File> {
    OpenOptions::new().write(true).open("/dev/console").ok()
}
