//! The jailed VMM's control socket: the runner asks for a pause or a resume, a byte each, and
//! the child answers each with a line, `ok` or why not.

use std::io::{self, BufRead, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use mvm_vmm::MicroVm;

use crate::backend::Pausable;

/// What the runner asks of the jailed VMM over its control socket, a byte each; the child
/// answers each with a line, `ok` or why not.
const PAUSE: u8 = b'p';
const RESUME: u8 = b'r';
/// The longest the runner waits for the child's answer: its pause has a deadline of its own.
const CONTROL_ANSWER: Duration = Duration::from_secs(mvm_vmm::pause::PAUSE_TIMEOUT.as_secs() + 2);
/// The longest answer read.
const ANSWER_LIMIT: u64 = 512;

/// The runner's end of the jailed VMM's control socket: pauses and resumes the VM in the
/// child ([`serve_control`] is the other end). One request at a time (the runner's
/// control socket holds it under a lock).
#[derive(Debug)]
pub struct JailControl(UnixStream);

impl JailControl {
    /// The runner's end `socket` of the control socket.
    pub fn new(socket: UnixStream) -> Self {
        JailControl(socket)
    }

    fn ask(&mut self, request: u8) -> io::Result<()> {
        self.0.set_read_timeout(Some(CONTROL_ANSWER))?;
        self.0.write_all(&[request])?;
        let mut answer = Vec::new();
        io::BufReader::new((&self.0).take(ANSWER_LIMIT)).read_until(b'\n', &mut answer)?;
        match answer.strip_suffix(b"\n") {
            Some(b"ok") => Ok(()),
            Some(reason) => Err(io::Error::other(
                String::from_utf8_lossy(reason).into_owned(),
            )),
            None => Err(io::Error::other("the jailed VMM did not answer")),
        }
    }
}

impl Pausable for JailControl {
    fn pause(&mut self) -> io::Result<()> {
        self.ask(PAUSE)
    }

    fn resume(&mut self) -> io::Result<()> {
        self.ask(RESUME)
    }
}

/// Answers the runner's requests on `control` until the VM ends, or until the runner closes
/// its end (then the VM is stopped: nobody would be left to supervise it).
pub fn serve_control(vm: &MicroVm, mut control: UnixStream) {
    use rustix::event::{poll, PollFd, PollFlags};
    let machine = vm.machine();
    while vm.ended().is_none() {
        let mut fds = [
            PollFd::new(&control, PollFlags::IN),
            PollFd::from_borrowed_fd(vm.exit_eventfd(), PollFlags::IN),
        ];
        if poll(&mut fds, None).is_err_and(|e| e != rustix::io::Errno::INTR) {
            return;
        }
        if fds[0].revents().is_empty() {
            continue;
        }
        let mut request = [0u8];
        match control.read(&mut request) {
            Ok(1) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            _ => return,
        }
        let answer = match request[0] {
            PAUSE => machine.pause(),
            RESUME => machine.resume(),
            other => {
                let _ = writeln!(control, "unknown request {other:#04x}");
                continue;
            }
        };
        let written = match answer {
            Ok(()) => control.write_all(b"ok\n"),
            Err(e) => writeln!(control, "{e}"),
        };
        if written.is_err() {
            return;
        }
    }
}
