//! One command run for an `exec` request: spawned, watched and ended.

use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{ChildStderr, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{Pid, PidfdFlags, Signal, WaitOptions};

use crate::protocol::{codes, ErrorReply, ExecRequest, ExitStatus};

/// `PATH` for commands whose environment has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long output may keep arriving after the command exited, from processes it left
/// behind holding its pipes; then they are killed.
const DRAIN_GRACE: Duration = Duration::from_millis(200);

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
    pid: Pid,
    pidfd: OwnedFd,
    /// Its standard output until end of file.
    pub stdout: Option<ChildStdout>,
    /// Its standard error until end of file.
    pub stderr: Option<ChildStderr>,
    /// Set once it has ended.
    pub status: Option<ExitStatus>,
    started: Instant,
    deadline: Instant,
    timed_out: bool,
    drain_until: Option<Instant>,
    /// Bytes of standard output forwarded so far.
    pub stdout_bytes: u64,
    /// Bytes of standard error forwarded so far.
    pub stderr_bytes: u64,
}

impl Running {
    /// Starts `request` in its own process group, as `user` when given, with nothing inherited
    /// but what the request names. `no_new_privs` is already set on the agent and so on it.
    pub fn start(
        stream: u32,
        request: &ExecRequest,
        user: Option<Credentials>,
    ) -> Result<Self, ErrorReply> {
        if let Some(problem) = request.problem() {
            return Err(error(codes::BAD_REQUEST, problem));
        }
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
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if !request.env.contains_key("PATH") {
            command.env("PATH", DEFAULT_PATH);
        }
        if let Some(user) = user {
            command.uid(user.uid).gid(user.gid);
        }
        let started = Instant::now();
        let mut child = command
            .spawn()
            .map_err(|e| spawn_error(&request.argv[0], &e))?;
        let pid = Pid::from_child(&child);
        let pidfd = rustix::process::pidfd_open(pid, PidfdFlags::empty()).map_err(|e| {
            let _ = rustix::process::kill_process_group(pid, Signal::KILL);
            let _ = child.wait();
            error(codes::SPAWN_FAILED, format!("pidfd_open: {e}"))
        })?;
        Ok(Self {
            stream,
            pid,
            pidfd,
            stdout: child.stdout.take(),
            stderr: child.stderr.take(),
            status: None,
            started,
            deadline: started + Duration::from_millis(request.timeout_ms),
            timed_out: false,
            drain_until: None,
            stdout_bytes: 0,
            stderr_bytes: 0,
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

    /// The next moment something must happen without any input: the timeout, the end of the
    /// drain grace once it has exited, or a look again soon after a kill.
    pub fn next_deadline(&self) -> Instant {
        match self.drain_until {
            Some(until) => until,
            None if self.timed_out => Instant::now() + DRAIN_GRACE,
            None => self.deadline,
        }
    }

    /// Milliseconds since it started.
    pub fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Records its exit status, found by whoever reaped it.
    pub fn exited(&mut self, status: rustix::process::WaitStatus) {
        if self.status.is_some() {
            return;
        }
        self.status = Some(match (status.exit_status(), status.terminating_signal()) {
            _ if self.timed_out => ExitStatus::TimedOut,
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

    /// Kills it and its process group once its time is up; it is then reaped as usual and
    /// reported as timed out.
    pub fn enforce_deadline(&mut self, now: Instant) {
        if self.status.is_none() && !self.timed_out && now >= self.deadline {
            let _ = rustix::process::kill_process_group(self.pid, Signal::KILL);
            self.timed_out = true;
        }
    }

    /// Whether the reply can be sent: it has ended and its output is all read, or the grace
    /// for output after its end has passed.
    pub fn finished(&self, now: Instant) -> bool {
        self.status.is_some()
            && ((self.stdout.is_none() && self.stderr.is_none())
                || self.drain_until.is_some_and(|until| now >= until))
    }

    /// Ends everything it left behind in its process group. The process group id stays
    /// reserved while the group has members, so this cannot hit an unrelated process.
    pub fn kill_leftovers(&self) {
        let _ = rustix::process::kill_process_group(self.pid, Signal::KILL);
    }
}

/// Kills every process of `uid`, however it left the command's process group (`setsid`,
/// `setpgid`): the workload user owns nothing that outlives its command. Processes of that
/// user can fork while being killed, so this goes round until a pass finds none (bounded, as
/// a fork bomb outrunning it for that long is stopped by the power-off anyway).
pub fn kill_user_processes(uid: u32) {
    for _ in 0..100 {
        let mut found = false;
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return;
        };
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|name| name.parse::<i32>().ok())
                .and_then(Pid::from_raw)
            else {
                continue;
            };
            let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
            if real_uid(&status) == Some(uid) {
                found = true;
                let _ = rustix::process::kill_process(pid, Signal::KILL);
            }
        }
        if !found {
            return;
        }
    }
}

/// The real user id from the text of `/proc/<pid>/status`.
fn real_uid(status: &str) -> Option<u32> {
    let line = status.lines().find(|line| line.starts_with("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Reads what `pipe` has (it was reported readable, so this does not block). `None` at end of
/// file or on error, which closes it.
pub fn read_available(pipe: &mut impl Read, buffer: &mut [u8]) -> Option<usize> {
    match pipe.read(buffer) {
        Ok(0) | Err(_) => None,
        Ok(n) => Some(n),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_real_uid_is_read_from_proc_status() {
        let status = "Name:\tsleep\nUmask:\t0022\nUid:\t1000\t1000\t1000\t1000\nGid:\t1000\n";
        assert_eq!(real_uid(status), Some(1000));
        assert_eq!(real_uid("Name:\tx\n"), None);
        assert_eq!(real_uid("Uid:\tnope\n"), None);
        let own = std::fs::read_to_string("/proc/self/status").unwrap();
        assert_eq!(real_uid(&own), Some(rustix::process::getuid().as_raw()));
    }
}
