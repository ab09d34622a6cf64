//! A VM in a child process of the runner: QEMU, or the own VMM jailed ([`crate::backend::kvm::jailed`]).
//!
//! The child runs in a process group of its own and is killed with the runner:
//! `PR_SET_PDEATHSIG` in the child before it execs (checked against a runner that already
//! died), and the whole group killed when the [`ChildVm`] is dropped. Its standard output is
//! the guest's serial console, recorded by [`crate::console_log`]; its standard error is kept for
//! error reports.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

use crate::console_log::{self, Console};

/// The most bytes of the child's own error output kept.
const STDERR_LIMIT: usize = 16 << 10;

/// A running VM process.
#[derive(Debug)]
pub struct ChildVm {
    child: Child,
    console: Console,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
}

impl ChildVm {
    /// Starts `command` (its program, arguments, environment and standard input set by the
    /// caller), its console recorded into `serial_log`. Call it from the thread that outlives
    /// the VM: the kernel's parent-death signal follows the thread that forked, not the
    /// process.
    pub fn spawn(command: &mut Command, serial_log: File) -> io::Result<Self> {
        command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        die_with_runner(command);
        let mut child = command.spawn()?;
        let console = Console::default();
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("no stdout"))?;
        let stderr_pipe = child
            .stderr
            .take()
            .ok_or_else(|| io::Error::other("no stderr"))?;
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            console_log::record(stdout, serial_log, console.clone())?,
            keep_stderr(stderr_pipe, Arc::clone(&stderr))?,
        ];
        Ok(Self {
            child,
            console,
            stderr,
            readers,
        })
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The guest's console so far.
    pub fn console(&self) -> &Console {
        &self.console
    }

    /// The child's exit status, if it has exited.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// Waits up to `timeout` for the child to exit by itself.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                self.join_readers();
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// What the child wrote to its standard error (the last bytes, if it wrote much).
    pub fn stderr(&self) -> String {
        let bytes = self.stderr.lock().unwrap_or_else(PoisonError::into_inner);
        String::from_utf8_lossy(&bytes).trim().to_string()
    }

    /// Kills the child and everything in its process group, and reaps it.
    pub fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let pid = Pid::from_child(&self.child);
            let _ = rustix::process::kill_process_group(pid, Signal::KILL);
            let _ = self.child.wait();
        }
        self.join_readers();
    }

    fn join_readers(&mut self) {
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}

impl Drop for ChildVm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Makes the child get SIGKILL when the runner's spawning thread dies, and refuse to start if
/// the runner is already gone by the time the signal is armed.
#[allow(unsafe_code)]
fn die_with_runner(command: &mut Command) {
    let runner = rustix::process::getpid();
    // SAFETY: the closure runs in the forked child before exec; it only makes two raw system
    // calls through rustix (prctl and getppid), which do not allocate or take locks, and
    // builds its error from a constant errno without allocating.
    unsafe {
        command.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
            if rustix::process::getppid() != Some(runner) {
                return Err(io::Error::from_raw_os_error(
                    rustix::io::Errno::SRCH.raw_os_error(),
                ));
            }
            Ok(())
        });
    }
}

fn keep_stderr(
    mut pipe: impl Read + Send + 'static,
    kept: Arc<Mutex<Vec<u8>>>,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("vm-stderr".into())
        .spawn(move || {
            let mut buffer = [0; 4096];
            loop {
                let n = match pipe.read(&mut buffer) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut kept = kept.lock().unwrap_or_else(PoisonError::into_inner);
                kept.extend_from_slice(&buffer[..n]);
                let excess = kept.len().saturating_sub(STDERR_LIMIT);
                kept.drain(..excess);
            }
        })
}
