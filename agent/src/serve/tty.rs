//! The pseudo-terminal of a command that asked for one ([`mvm_protocol::ExecRequest::tty`]):
//! a new pair from devpts, its replica the command's standard streams and controlling
//! terminal, its manager read and written by the agent as the command's output and input.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use mvm_protocol::TtySize;
use rustix::fs::{Gid, Mode, Uid};
use rustix::pty::OpenptFlags;
use rustix::termios::Winsize;

use super::exec::Credentials;

/// A new pseudo-terminal: the manager side, kept by the agent, and the replica side, for the
/// command.
#[derive(Debug)]
pub struct Pair {
    /// The agent's side.
    pub manager: OwnedFd,
    /// The command's side.
    pub replica: OwnedFd,
}

/// Opens a pair of `size`. The replica is opened through the manager (`TIOCGPTPEER`: no path
/// that could be swapped) and given to `owner` with mode 0620, as `login` does, so that the
/// command may reopen its terminal (`/dev/tty`) and others cannot read it.
pub fn open(size: TtySize, owner: Option<Credentials>) -> io::Result<Pair> {
    let flags = OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC;
    let manager = rustix::pty::openpt(flags)?;
    rustix::pty::grantpt(&manager)?;
    rustix::pty::unlockpt(&manager)?;
    let replica = rustix::pty::ioctl_tiocgptpeer(&manager, flags)?;
    if let Some(owner) = owner {
        rustix::fs::fchown(
            &replica,
            Some(Uid::from_raw(owner.uid)),
            Some(Gid::from_raw(owner.gid)),
        )?;
    }
    rustix::fs::fchmod(&replica, Mode::from_raw_mode(0o620))?;
    resize(manager.as_fd(), size)?;
    Ok(Pair { manager, replica })
}

/// Sets the terminal's size; the kernel sends its foreground process group `SIGWINCH`.
pub fn resize(manager: BorrowedFd<'_>, size: TtySize) -> io::Result<()> {
    let size = Winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    Ok(rustix::termios::tcsetwinsize(manager, size)?)
}

/// In the command's process, between fork and exec: a session of its own, whose controlling
/// terminal is its standard input (the replica). Two system calls, no allocation.
pub fn take_controlling_terminal() -> io::Result<()> {
    rustix::process::setsid()?;
    // The standard streams are set before the hooks that run before exec: stdin is the replica.
    Ok(rustix::process::ioctl_tiocsctty(rustix::stdio::stdin())?)
}

/// The manager twice over — one to read the command's output from, one to write its input to
/// — and once more to resize it by. All three share one open file, so one is non-blocking as
/// soon as the input's is made so: reading it must take `WouldBlock` as "nothing yet".
pub fn manager_handles(manager: OwnedFd) -> io::Result<(File, File, OwnedFd)> {
    let input = manager.try_clone()?;
    let sizing = manager.try_clone()?;
    Ok((File::from(manager), File::from(input), sizing))
}
