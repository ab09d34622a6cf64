//! One command run for an `exec` request: spawned, watched and ended.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{Pid, PidfdFlags, Signal, WaitOptions};

use mvm_protocol::flow::{cost, ReceiveWindow, SendWindow};
use mvm_protocol::{codes, ErrorReply, ExecRequest, ExitStatus, ProcessInfo, TtySize};

use super::cgroup::CommandGroup;
use super::seccomp::WorkloadFilter;

/// `PATH` for commands whose environment has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long output may keep arriving after the command exited, from processes it left
/// behind holding its pipes; then they are killed.
const DRAIN_GRACE: Duration = Duration::from_millis(200);
/// How often a command killed for its timeout is killed and looked for again until it is
/// reaped: a deadline kept, so no missed wake-up can leave it waiting.
const KILL_AGAIN: Duration = Duration::from_millis(200);
/// A deadline that never comes.
const NEVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
/// How long ending a command (power-off, a broken window) waits for it to be reaped.
const END_WAIT: Duration = Duration::from_secs(1);

/// Who a command runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials {
    /// User id.
    pub uid: u32,
    /// Group id (supplementary groups are dropped).
    pub gid: u32,
}

/// A command started for the request on `stream`.
#[derive(Debug)]
pub struct Running {
    /// The request's stream id.
    pub stream: u32,
    /// Set for a spawned command: its output is kept here instead of streamed.
    pub spawned: Option<Spawned>,
    /// Room left to stream its output to the host.
    pub window: SendWindow,
    /// Its standard input, when the request asked for one.
    pub stdin: Option<Stdin>,
    program: String,
    pid: Pid,
    pidfd: OwnedFd,
    /// Its standard output until end of file (its terminal, when it has one).
    pub stdout: Option<File>,
    /// Its standard error until end of file (none of its own when it has a terminal).
    pub stderr: Option<File>,
    /// Its terminal, to resize, when it asked for one.
    terminal: Option<OwnedFd>,
    /// Set once it has ended.
    pub status: Option<ExitStatus>,
    /// Its cgroup, when the agent gives commands one: everything it starts stays in it.
    group: Option<CommandGroup>,
    started: Instant,
    deadline: Instant,
    /// When it was last killed for its timeout.
    killed_at: Option<Instant>,
    drain_until: Option<Instant>,
    /// Bytes of standard output forwarded so far.
    pub stdout_bytes: u64,
    /// Bytes of standard error forwarded so far.
    pub stderr_bytes: u64,
}

impl Running {
    /// Whether this command's exchange is on `stream`. A spawned command was answered when it
    /// started: its stream is free again (a later client, a woken VM's new runner say, may
    /// reuse the id).
    pub fn holds(&self, stream: u32) -> bool {
        self.stream == stream && self.spawned.is_none()
    }

    /// Starts `request` in its own process group, as `user` when given, with nothing inherited
    /// but what the request names. `no_new_privs` is already set on the agent and so on it.
    /// With `spawn`, a background command with that handle whose output is kept, not sent.
    /// With `group`, it enters that cgroup before it runs anything; with `filter`, the
    /// workload's syscall filter is installed just before `execve`.
    pub fn start(
        stream: u32,
        request: &ExecRequest,
        user: Option<Credentials>,
        spawn: Option<u64>,
        group: Option<CommandGroup>,
        filter: Option<WorkloadFilter>,
    ) -> Result<Self, ErrorReply> {
        if spawn.is_some() && (request.stdin || request.tty.is_some()) {
            return Err(error(
                codes::BAD_REQUEST,
                "a spawned command has no standard input or terminal",
            ));
        }
        if let Some(problem) = request.problem() {
            return Err(error(codes::BAD_REQUEST, problem));
        }
        let user = match &request.user {
            Some(spec) => Some(super::users::resolve(spec, Path::new("/etc/passwd"))?),
            None => user,
        };
        let cwd = request.cwd.as_deref().unwrap_or("/");
        if !Path::new(cwd).is_dir() {
            return Err(error(
                codes::NO_CWD,
                format!("working directory {cwd} does not exist"),
            ));
        }
        let mut command = Command::new(&request.argv[0]);
        command
            .args(&request.argv[1..])
            .env_clear()
            .envs(&request.env)
            .current_dir(cwd);
        let terminal = match request.tty {
            Some(size) => Some(terminal_for(&mut command, size, user)?),
            None => {
                command
                    .stdin(if request.stdin {
                        Stdio::piped()
                    } else {
                        Stdio::null()
                    })
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .process_group(0);
                None
            }
        };
        if !request.env.contains_key("PATH") {
            command.env("PATH", DEFAULT_PATH);
        }
        if let Some(user) = user {
            command.uid(user.uid).gid(user.gid);
        }
        if let Some(procs) = group.as_ref().map(CommandGroup::procs_fd) {
            // SAFETY: `cgroup::enter` makes one system call and allocates nothing, as code
            // between fork and exec must; `group` is held open until `spawn` has returned.
            #[allow(unsafe_code)]
            unsafe {
                command.pre_exec(move || super::cgroup::enter(procs));
            }
        }
        if let Some(filter) = filter {
            // SAFETY: `install` makes only `prctl` and `seccomp` calls and allocates nothing,
            // as code between fork and exec must; it runs after the user is set and the
            // cgroup entered, so the command and all it starts stay under the filter.
            #[allow(unsafe_code)]
            unsafe {
                command.pre_exec(move || filter.install());
            }
        }
        let started = Instant::now();
        let mut child = command
            .spawn()
            .map_err(|e| spawn_error(&request.argv[0], &e))?;
        // The command's copies of its terminal go: once it and all it started close theirs,
        // reading the terminal ends.
        drop(command);
        let pid = Pid::from_child(&child);
        let pidfd = rustix::process::pidfd_open(pid, PidfdFlags::empty()).map_err(|e| {
            let _ = rustix::process::kill_process_group(pid, Signal::KILL);
            let _ = child.wait();
            error(codes::SPAWN_FAILED, format!("pidfd_open: {e}"))
        })?;
        let (stdout, stderr, input, terminal) = match terminal {
            Some((output, input, sizing)) => (Some(output), None, Some(input), Some(sizing)),
            None => (
                child.stdout.take().map(file),
                child.stderr.take().map(file),
                child.stdin.take().map(file),
                None,
            ),
        };
        let stdin = match input {
            Some(pipe) => {
                rustix::io::ioctl_fionbio(&pipe, true).map_err(|e| {
                    let _ = rustix::process::kill_process_group(pid, Signal::KILL);
                    let _ = child.wait();
                    error(codes::SPAWN_FAILED, format!("stdin: {e}"))
                })?;
                Some(Stdin {
                    pipe: Some(pipe),
                    pending: VecDeque::new(),
                    closing: false,
                    window: ReceiveWindow::default(),
                })
            }
            None => None,
        };
        Ok(Self {
            stream,
            spawned: spawn.map(|handle| Spawned {
                handle,
                stdout: Tail::default(),
                stderr: Tail::default(),
                log: None,
            }),
            window: SendWindow::default(),
            stdin,
            program: request.argv[0].clone(),
            pid,
            pidfd,
            stdout,
            stderr,
            terminal,
            status: None,
            group,
            started,
            // A service's is as good as never (it runs as long as the VM).
            deadline: started
                .checked_add(Duration::from_millis(request.timeout_ms))
                .unwrap_or(started + NEVER),
            killed_at: None,
            drain_until: None,
            stdout_bytes: 0,
            stderr_bytes: 0,
        })
    }

    /// Sets the size of its terminal (the kernel tells it with `SIGWINCH`).
    pub fn resize(&self, size: TtySize) -> Result<(), ErrorReply> {
        if !size.is_valid() {
            return Err(error(
                codes::BAD_REQUEST,
                format!("a terminal of {} rows and {} columns", size.rows, size.cols),
            ));
        }
        let terminal = self
            .terminal
            .as_ref()
            .ok_or_else(|| error(codes::TERMINAL_FAILED, "the command has no terminal"))?;
        super::tty::resize(terminal.as_fd(), size).map_err(|e| {
            error(
                codes::TERMINAL_FAILED,
                format!("resizing its terminal: {e}"),
            )
        })
    }

    /// Readable when the process has ended.
    pub fn pidfd(&self) -> Option<&OwnedFd> {
        self.status.is_none().then_some(&self.pidfd)
    }

    /// The process id, which is also its process group id.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The next moment something must happen without any input. Until it is reaped that is
    /// always some moment — its timeout, then the next kill — so that no lost wake-up can
    /// leave it unreaped; once reaped, the end of the drain grace. Past that, only its pipes
    /// and the host's credit move it on, and they wake the agent themselves.
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        match (self.status, self.killed_at, self.drain_until) {
            (None, None, _) => Some(self.deadline),
            (None, Some(killed), _) => Some(killed + KILL_AGAIN),
            (Some(_), _, Some(until)) if until > now => Some(until),
            (Some(_), _, _) => None,
        }
    }

    /// Milliseconds since it started.
    pub fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// What `ps` says of it.
    pub fn info(&self) -> ProcessInfo {
        ProcessInfo {
            handle: self.spawned.as_ref().map(|s| s.handle),
            pid: self.pid.as_raw_nonzero().get() as u32,
            program: self.program.clone(),
            running_ms: self.elapsed_ms(),
            status: self.status,
        }
    }

    /// Sends `signal` to its process group (while it runs: after it ended, the group may be
    /// gone and its id reused).
    pub fn signal(&self, signal: i32) -> Result<(), ErrorReply> {
        let signal = (1..=31)
            .contains(&signal)
            .then(|| Signal::from_named_raw(signal))
            .flatten()
            .ok_or_else(|| error(codes::BAD_REQUEST, format!("{signal} is not a signal")))?;
        if self.status.is_some() {
            return Err(error(codes::NO_SUCH_PROCESS, "it has ended"));
        }
        rustix::process::kill_process_group(self.pid, signal)
            .map_err(|e| error(codes::NO_SUCH_PROCESS, e.to_string()))
    }

    /// Records its exit status, found by whoever reaped it.
    pub fn exited(&mut self, status: rustix::process::WaitStatus) {
        if self.status.is_some() {
            return;
        }
        self.status = Some(match (status.exit_status(), status.terminating_signal()) {
            _ if self.killed_at.is_some() => ExitStatus::TimedOut,
            (Some(code), _) => ExitStatus::Exited { code },
            (None, Some(signal)) => ExitStatus::Signaled { signal },
            (None, None) => return,
        });
        self.drain_until = Some(Instant::now() + DRAIN_GRACE);
    }

    /// Reaps it if it has ended (when nothing else reaps the agent's children).
    pub fn reap(&mut self) -> io::Result<()> {
        if self.status.is_none() {
            if let Some((_, status)) =
                rustix::process::waitpid(Some(self.pid), WaitOptions::NOHANG)?
            {
                self.exited(status);
            }
        }
        Ok(())
    }

    /// Kills it and its process group once its time is up, and again at every
    /// [`KILL_AGAIN`] until it is reaped (as usual), then reported as timed out.
    pub fn enforce_deadline(&mut self, now: Instant) {
        let due = match self.killed_at {
            None => self.deadline,
            Some(killed) => killed + KILL_AGAIN,
        };
        if self.status.is_none() && now >= due {
            let _ = rustix::process::kill_process_group(self.pid, Signal::KILL);
            self.killed_at = Some(now);
        }
    }

    /// Whether the reply can be sent: it has ended and its output is all read. Processes it
    /// left behind holding its pipes get the drain grace, then are killed; what they wrote
    /// before is still sent, as the window allows.
    pub fn finished(&mut self, now: Instant) -> bool {
        if self.status.is_none() {
            return false;
        }
        if self.stdout.is_none() && self.stderr.is_none() {
            return true;
        }
        if self.drain_until.is_none_or(|until| now < until) {
            return false;
        }
        self.kill_leftovers();
        let unread = |pipe: Option<BorrowedFd<'_>>| {
            pipe.is_some_and(|pipe| rustix::io::ioctl_fionread(pipe).is_ok_and(|n| n > 0))
        };
        !unread(self.stdout.as_ref().map(AsFd::as_fd))
            && !unread(self.stderr.as_ref().map(AsFd::as_fd))
    }

    /// Ends everything it left behind: in its process group (whose id stays reserved while
    /// the group has members, so this cannot hit an unrelated process) and in its cgroup.
    pub fn kill_leftovers(&self) {
        let _ = rustix::process::kill_process_group(self.pid, Signal::KILL);
        if let Some(group) = &self.group {
            group.kill();
        }
    }

    /// Its cgroup, to be removed once empty: it has ended and its leftovers were killed.
    pub fn take_group(&mut self) -> Option<CommandGroup> {
        self.group.take()
    }

    /// Ends it now, with its process group and cgroup, and reaps it (waiting up to
    /// [`END_WAIT`] for the kill to land) unless `reaped_elsewhere`: a command given up leaves
    /// no zombie behind. Returns its cgroup, to be removed once empty.
    pub fn end(mut self, reaped_elsewhere: bool) -> Option<CommandGroup> {
        self.kill_leftovers();
        if self.status.is_some() || reaped_elsewhere {
            return self.group.take();
        }
        let mut pidfd = [rustix::event::PollFd::new(
            &self.pidfd,
            rustix::event::PollFlags::IN,
        )];
        let wait = rustix::event::Timespec::try_from(END_WAIT).unwrap_or_default();
        let _ = rustix::event::poll(&mut pidfd, Some(&wait));
        let _ = self.reap();
        self.group.take()
    }
}

/// A spawned command's handle and the last of its output.
#[derive(Debug)]
pub struct Spawned {
    /// Its handle.
    pub handle: u64,
    /// The end of its standard output.
    pub stdout: Tail,
    /// The end of its standard error.
    pub stderr: Tail,
    /// Where a service's output goes instead (both streams, as they come).
    pub log: Option<super::service::SharedLog>,
}

impl Spawned {
    /// Keeps output of the stream `stdout` (or stderr).
    pub fn keep(&mut self, stdout: bool, bytes: &[u8]) {
        match (&self.log, stdout) {
            (Some(log), _) => log.borrow_mut().push(bytes),
            (None, true) => self.stdout.push(bytes),
            (None, false) => self.stderr.push(bytes),
        }
    }
}

/// The last [`SPAWN_OUTPUT_TAIL`](mvm_protocol::SPAWN_OUTPUT_TAIL) bytes written to a
/// stream.
#[derive(Debug, Default)]
pub struct Tail(VecDeque<u8>);

impl Tail {
    /// Appends bytes, forgetting the oldest beyond the limit.
    pub fn push(&mut self, bytes: &[u8]) {
        let limit = mvm_protocol::SPAWN_OUTPUT_TAIL;
        let bytes = &bytes[bytes.len().saturating_sub(limit)..];
        let excess = (self.0.len() + bytes.len()).saturating_sub(limit);
        self.0.drain(..excess);
        self.0.extend(bytes);
    }

    /// The bytes kept.
    pub fn bytes(&self) -> Vec<u8> {
        self.0.iter().copied().collect()
    }
}

/// A command's standard input, fed from data frames without ever blocking the agent: bytes
/// wait in `pending` (at most a window's worth) until the pipe takes them, and only then is
/// their room handed back to the host.
#[derive(Debug)]
pub struct Stdin {
    /// The pipe (or the terminal), until it is closed.
    pub pipe: Option<File>,
    pending: VecDeque<u8>,
    closing: bool,
    /// What the host may still send.
    pub window: ReceiveWindow,
}

impl Stdin {
    /// Takes a data frame's bytes (an empty frame closes the input once the rest is written).
    /// Returns the room to hand back at once — the frame's header, and its bytes when the pipe
    /// is closed already — or `None` if the host overran its window.
    pub fn receive(&mut self, bytes: &[u8]) -> Option<u64> {
        if !self.window.take(bytes.len()) {
            return None;
        }
        let back = if bytes.is_empty() {
            self.closing = true;
            // With nothing left to write, no flush would come to close it: closed now.
            if self.pending.is_empty() {
                self.pipe = None;
            }
            cost(0)
        } else if self.pipe.is_some() {
            self.pending.extend(bytes);
            cost(0)
        } else {
            cost(bytes.len())
        };
        self.window.restore(back);
        Some(back)
    }

    /// Whether there is something to write.
    pub fn wants_to_write(&self) -> bool {
        self.pipe.is_some() && !self.pending.is_empty()
    }

    /// Writes what the pipe takes, closes it when asked and all is written (or when the
    /// command closed its end); returns the room to hand back to the host.
    pub fn flush(&mut self) -> u64 {
        let mut freed = 0;
        while let Some(pipe) = self.pipe.as_mut() {
            let (front, _) = self.pending.as_slices();
            if front.is_empty() {
                break;
            }
            match pipe.write(front) {
                Ok(n) => {
                    self.pending.drain(..n);
                    freed += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The command closed its input: what it did not read is dropped.
                Err(_) => {
                    freed += self.pending.len() as u64;
                    self.pending.clear();
                    self.pipe = None;
                }
            }
        }
        if self.closing && self.pending.is_empty() {
            self.pipe = None;
        }
        self.window.restore(freed);
        freed
    }
}

/// Reads what `pipe` has (it was reported readable). `None` at end of file or on error, which
/// closes it — a terminal reads as an error (`EIO`) once the command and all it started have
/// closed it; `Some(0)` when a non-blocking one had nothing after all.
pub fn read_available(pipe: &mut (impl Read + ?Sized), buffer: &mut [u8]) -> Option<usize> {
    match pipe.read(buffer) {
        Ok(0) => None,
        Ok(n) => Some(n),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Some(0),
        Err(_) => None,
    }
}

/// A child's pipe end as a file.
fn file(pipe: impl Into<OwnedFd>) -> File {
    File::from(pipe.into())
}

/// Makes `command` run on a new terminal of `size`, owned by `user`: its standard streams,
/// and its controlling terminal in a session of its own (whose id is its process group's, as
/// a command without a terminal has). Returns the agent's handles on the terminal.
fn terminal_for(
    command: &mut Command,
    size: TtySize,
    user: Option<Credentials>,
) -> Result<(File, File, OwnedFd), ErrorReply> {
    let failed = |e: io::Error| error(codes::TERMINAL_FAILED, format!("a terminal: {e}"));
    let pair = super::tty::open(size, user).map_err(failed)?;
    let stdio = || pair.replica.try_clone().map(Stdio::from).map_err(failed);
    command.stdin(stdio()?).stdout(stdio()?).stderr(stdio()?);
    // SAFETY: `take_controlling_terminal` makes two system calls and allocates nothing, as
    // code between fork and exec must; it is registered first, so it runs before the cgroup
    // is entered and the syscall filter installed.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(super::tty::take_controlling_terminal);
    }
    super::tty::manager_handles(pair.manager).map_err(failed)
}

fn spawn_error(program: &str, e: &io::Error) -> ErrorReply {
    use rustix::io::Errno;
    let errno = e.raw_os_error().map(Errno::from_raw_os_error);
    match errno {
        Some(Errno::NOENT) => error(codes::NOT_FOUND, format!("{program}: command not found")),
        Some(Errno::ACCESS | Errno::NOEXEC | Errno::ISDIR | Errno::PERM) => error(
            codes::NOT_EXECUTABLE,
            format!("{program}: cannot execute: {e}"),
        ),
        Some(Errno::IO) => error(
            codes::INTEGRITY,
            format!("{program}: the verified root refused a block of it: {e}"),
        ),
        _ => error(codes::SPAWN_FAILED, format!("{program}: {e}")),
    }
}

fn error(code: &str, message: impl Into<String>) -> ErrorReply {
    ErrorReply {
        code: code.into(),
        message: message.into(),
    }
}
