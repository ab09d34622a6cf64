//! Requests and responses: the JSON payloads of request and response frames.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::service::{LogSlice, ServicesReport, StartServices};

/// A secret's bytes, hex-encoded on the wire; `Debug` never shows them.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretHex(pub String);

impl std::fmt::Debug for SecretHex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretHex(..)")
    }
}

/// How many bytes of the host's entropy [`Request::Renew`] carries: the kernel's whole input
/// pool's worth (512 bits).
pub const RENEW_ENTROPY_BYTES: usize = 64;

/// What the host asks of the agent. A request frame's stream id is the host's name for the
/// exchange: every frame the agent sends about it carries the same id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The first request on a channel: the host's protocol version. The agent answers with its
    /// own version and the boot timings, or refuses a version it does not speak.
    Hello {
        /// [`super::PROTOCOL_VERSION`] of the host.
        version: u32,
    },
    /// Run a command and stream its output.
    Exec(ExecRequest),
    /// Answered at once with [`Response::Echo`]: the channel's own round trip, the floor
    /// under every other request's.
    Echo,
    /// Write a file in the guest; its bytes follow in data frames on the same stream.
    FsWrite(FsWriteRequest),
    /// Read a file out of the guest; its bytes come back in data frames, then the answer.
    FsRead {
        /// The file, absolute, under the copy root (`/tmp`).
        path: String,
        /// `path` is a directory, sent as a tar stream (symlinks as symlinks).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        tar: bool,
    },
    /// Sends a signal to the process group of the command running for the exec request on
    /// `stream` (a client cancelling its command); answered [`Response::Done`].
    Signal {
        /// The exec request's stream id.
        stream: u32,
        /// The signal number, 1–31.
        signal: i32,
    },
    /// Sets the window size of the terminal of the command running for the exec request on
    /// `stream` (one started with [`ExecRequest::tty`]); answered [`Response::Done`]. The
    /// kernel then sends its foreground process group `SIGWINCH`.
    Resize {
        /// The exec request's stream id.
        stream: u32,
        /// Its new size.
        size: TtySize,
    },
    /// Starts a command in the background and answers at once with its handle; its output is
    /// kept (the last [`SPAWN_OUTPUT_TAIL`] bytes of each stream) for [`Request::Wait`].
    Spawn(ExecRequest),
    /// Waits up to `timeout_ms` for a spawned command to end. Once it has, its kept output
    /// comes in stdout/stderr frames before the answer, and the handle is released.
    Wait {
        /// The handle [`Response::Spawned`] gave.
        handle: u64,
        /// How long to wait; 0 only looks.
        timeout_ms: u64,
    },
    /// Sends a signal to a spawned command's process group.
    Kill {
        /// The handle [`Response::Spawned`] gave.
        handle: u64,
        /// The signal number, 1–31.
        signal: i32,
    },
    /// Lists the commands the agent runs or has kept an end for.
    Ps,
    /// Lists a directory under the file root.
    FsList {
        /// The directory, absolute.
        path: String,
    },
    /// Describes one path under the file root (a symlink itself, not its target).
    FsStat {
        /// The path, absolute.
        path: String,
    },
    /// Creates a directory (its parent must exist).
    FsMkdir {
        /// The new directory, absolute.
        path: String,
        /// Permission bits (at most 0o777).
        mode: u32,
    },
    /// Removes a file, a symlink, or a directory (with `recursive`, and everything in it).
    FsRemove {
        /// The path, absolute.
        path: String,
        /// Remove a directory that is not empty, with all it holds.
        #[serde(default)]
        recursive: bool,
    },
    /// Renames a path (both ends under the file root, on the same file system).
    FsMove {
        /// The path that exists.
        from: String,
        /// Its new name; an existing file there is replaced, a directory is not.
        to: String,
    },
    /// Stops the guest's vCPUs: answered by a VM's runner on its control socket (the agent
    /// refuses it).
    Pause,
    /// Lets a paused guest run again: answered by the runner, like [`Request::Pause`].
    Resume,
    /// Sets the guest's wall clock: sent by a VM's runner once the guest runs again after a
    /// pause or a cold save (its clock stood still meanwhile); clients cannot send it.
    SetClock {
        /// Nanoseconds since the Unix epoch, UTC.
        unix_nanos: u64,
    },
    /// Makes a guest restored from a boot snapshot a machine of its own, before anything else
    /// runs in it: the host's fresh entropy mixed into the kernel's pool and its RNG reseeded
    /// from it, a hostname of its own, the clock stepped to the host's. Sent by a VM's runner
    /// once; clients cannot send it.
    Renew {
        /// [`RENEW_ENTROPY_BYTES`] bytes from the host's RNG, hex.
        entropy: SecretHex,
        /// The guest's hostname from now on.
        hostname: String,
        /// Nanoseconds since the Unix epoch, UTC.
        unix_nanos: u64,
    },
    /// Pauses the guest and saves it cold — memory and device state to the VM's directory —
    /// then ends its runner: answered by the runner, like [`Request::Pause`].
    Save,
    /// Sync and power the guest off once the answer is sent.
    PowerOff,
    /// Serve the egress proxy on `127.0.0.1:3128` in the guest and point the commands started
    /// from now on at it (`HTTP_PROXY` and the rest); answered [`Response::Done`]. Sent by a
    /// VM's runner after the hello when its plan grants egress (again after a wake: it is a
    /// no-op once the proxy serves); clients cannot send it.
    ServeProxy,
    /// Trust this CA certificate (PEM) for TLS: the per-VM CA, name-constrained to the hosts
    /// the launch's secrets are bound to, whose leaves the host's egress side presents for
    /// them. The agent adds it to the guest's system bundle and points the commands started
    /// from now on at a bundle holding it (`SSL_CERT_FILE` and the rest); answered
    /// [`Response::Done`]. Sent by a VM's runner before [`Request::ServeProxy`]; clients cannot
    /// send it.
    TrustCa {
        /// One PEM certificate.
        pem: String,
    },
    /// Put one of the launch's secrets in the file `/run/secrets/NAME`, readable by the
    /// workload user alone (0400, in the root's writable layer, which is guest memory): an
    /// unbound secret's value, or a bound one's placeholder. Answered [`Response::Done`]. Sent
    /// by a VM's runner after the hello, before any command (again after a wake); clients
    /// cannot send it.
    SecretFile {
        /// The secret's name, which is the file's.
        name: String,
        /// What the file holds.
        value: SecretHex,
    },
    /// Mount the launch's disk whose virtio serial is `serial` (an ext4 filesystem in a host
    /// file) at `path`: `nosuid`, `nodev`, read-only when `read_only`; a writable one's root
    /// is given to the workload user. Answered [`Response::Done`]. Sent by a VM's runner after
    /// the hello, before any command (not again after a wake: the mount is in the guest's
    /// memory); clients cannot send it.
    Mount {
        /// The disk's virtio-blk serial (`mvm-disk0`, …), which the runner set.
        serial: String,
        /// Where to mount it: absolute, without `.` or `..` components.
        path: String,
        /// Mount it read-only.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        read_only: bool,
        /// The disk is an encrypted volume: the agent opens it with dm-crypt
        /// (`aes-xts-plain64`, 512-byte sectors) under this 64-byte key, hex, and mounts what
        /// that shows.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key: Option<SecretHex>,
    },
    /// Connect to `127.0.0.1:port` inside the guest for a forwarded port. The connection's
    /// bytes go both ways in data frames on this request's stream (an empty one ends that
    /// direction); the answer ends it: [`Response::Done`] once both directions have ended, or
    /// an error ([`codes::CONNECT_FAILED`] when nothing listens there). A close frame from the
    /// host tears it down at once (and is answered too). Sent by a VM's runner for a
    /// connection to a forwarded port; clients cannot send it.
    Connect {
        /// The guest's TCP port.
        port: u16,
    },
    /// Start the plan's services and its health probe; answered [`Response::Done`] once
    /// every service was started (one that could not be is reported by
    /// [`Request::Services`], not here). Sent by a VM's runner once, before the VM is ready;
    /// clients cannot send it.
    StartServices(StartServices),
    /// The services and the health verdict. With `changed_since`, the answer waits (at most
    /// `timeout_ms`) until the report's generation is past that one.
    Services {
        /// A generation an earlier answer gave.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        changed_since: Option<u64>,
        /// How long to wait for a change; 0 only looks.
        #[serde(default)]
        timeout_ms: u64,
    },
    /// A service's kept output from `offset` on, in stdout frames, then
    /// [`Response::ServiceLog`]. With nothing there yet, the answer waits (at most
    /// `timeout_ms`) for some.
    ServiceLog {
        /// The service.
        name: String,
        /// Where to read from: 0, or the `next_offset` of an earlier answer.
        offset: u64,
        /// How long to wait for output; 0 only looks.
        #[serde(default)]
        timeout_ms: u64,
    },
}

/// Whether `path` may be a [`Request::Mount`]'s: absolute, every component a name (no `.`,
/// `..` or empty one), at most 4096 bytes, and neither `/` nor under the kernel's own
/// filesystems (`/proc`, `/sys`, `/dev`).
pub fn is_mount_point(path: &str) -> bool {
    let Some(names) = path.strip_prefix('/') else {
        return false;
    };
    let plain = names
        .split('/')
        .all(|name| !name.is_empty() && name != "." && name != "..");
    let first = names.split('/').next().unwrap_or_default();
    plain && path.len() <= 4096 && !["proc", "sys", "dev"].contains(&first)
}

/// Bytes of each output stream of a spawned command kept for [`Request::Wait`].
pub const SPAWN_OUTPUT_TAIL: usize = 64 * 1024;

/// A command to run inside the verified root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments; a program without a `/` is looked up in `PATH` from `env`.
    pub argv: Vec<String>,
    /// The whole environment of the command (nothing is inherited from the agent).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory, absolute; `/` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// The command and everything it started are killed after this many milliseconds.
    pub timeout_ms: u64,
    /// Give the command a standard input fed by data frames on the request's stream (an
    /// empty data frame closes it); without it, standard input is `/dev/null`. Not for
    /// [`Request::Spawn`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stdin: bool,
    /// Who runs it: a user of the guest's `/etc/passwd`, or `UID`, with `:GID` optionally;
    /// never root. The workload user (1000) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Run it on a pseudo-terminal of this size, made for it: the terminal is its standard
    /// input, output and error, and its controlling terminal (it leads a session of its own).
    /// Everything it writes comes in stdout frames; data frames are what is typed (`stdin`
    /// must be set). The runner gives one only where the plan's profile grants `terminal`.
    /// Not for [`Request::Spawn`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<TtySize>,
}

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TtySize {
    /// Rows, 1–[`TtySize::MAX`].
    pub rows: u16,
    /// Columns, 1–[`TtySize::MAX`].
    pub cols: u16,
}

impl TtySize {
    /// The most rows or columns taken: more than any screen holds.
    pub const MAX: u16 = 4096;

    /// Whether both sides are within 1–[`TtySize::MAX`].
    pub fn is_valid(&self) -> bool {
        (1..=Self::MAX).contains(&self.rows) && (1..=Self::MAX).contains(&self.cols)
    }
}

impl ExecRequest {
    /// Why the request cannot be run as given, if it cannot: empty argv, NUL bytes, a bad
    /// environment name, a relative working directory.
    pub fn problem(&self) -> Option<String> {
        if self.argv.is_empty() {
            return Some("argv is empty".into());
        }
        if self.argv.iter().any(|a| a.contains('\0')) {
            return Some("an argument contains a NUL byte".into());
        }
        for (name, value) in &self.env {
            if name.is_empty() || name.contains(['=', '\0']) || value.contains('\0') {
                return Some(format!("environment variable {name:?} is malformed"));
            }
        }
        if let Some(size) = self.tty {
            if !size.is_valid() {
                return Some(format!(
                    "a terminal of {} rows and {} columns: each must be 1-{}",
                    size.rows,
                    size.cols,
                    TtySize::MAX
                ));
            }
            if !self.stdin {
                return Some("a terminal needs the standard input it is".into());
            }
        }
        match &self.cwd {
            Some(cwd) if !cwd.starts_with('/') || cwd.contains('\0') => {
                Some(format!("working directory {cwd:?} is not an absolute path"))
            }
            _ => None,
        }
    }
}

/// The agent's final answer to a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    /// Answer to [`Request::Hello`].
    Hello(HelloReply),
    /// A command ran and ended (its output came before, in data frames).
    Exec(ExecReply),
    /// Answer to [`Request::Echo`].
    Echo,
    /// The file was written, checked and put in place.
    FsWrite(FileDone),
    /// The whole file was sent.
    FsRead(FileDone),
    /// A spawned command started.
    Spawned {
        /// Its handle for `wait`, `kill` and `ps`.
        handle: u64,
        /// Its process id in the guest (also its process group).
        pid: u32,
    },
    /// Answer to [`Request::Wait`]: the command as it is now (still running if the wait
    /// timed out).
    Wait(ProcessInfo),
    /// Answer to [`Request::Ps`].
    Ps {
        /// Spawned commands (running, or ended and not yet waited for) and the exec
        /// commands running, oldest first.
        processes: Vec<ProcessInfo>,
    },
    /// Answer to [`Request::FsList`], sorted by name.
    FsList {
        /// What the directory holds.
        entries: Vec<FileInfo>,
        /// More entries exist than one answer carries.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        truncated: bool,
    },
    /// Answer to [`Request::FsStat`].
    FsStat(FileInfo),
    /// A request without anything to report was carried out (`signal`, `kill`, `fs_mkdir`,
    /// `fs_remove`, `fs_move`).
    Done,
    /// The guest powers off next.
    PowerOff,
    /// Answer to an [`OpenRequest`]: the host connected; the connection's bytes follow in
    /// data frames both ways.
    Opened,
    /// Answer to [`Request::Services`].
    Services(ServicesReport),
    /// Answer to [`Request::ServiceLog`], after the output it carried.
    ServiceLog(LogSlice),
    /// The request failed (for an [`OpenRequest`]: refused or unreachable, the code says
    /// which).
    Error(ErrorReply),
}

/// An outbound connection the guest asks for (the payload of a
/// [`FrameKind::Open`](super::FrameKind::Open) frame). The host judges it against the plan's
/// egress grants before anything leaves the machine; the guest never resolves the name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenRequest {
    /// The destination as the guest's client named it: a DNS name or an IP literal.
    pub host: String,
    /// The TCP port.
    pub port: u16,
    /// How the client asked, for the audit: an HTTP `CONNECT`, a plain HTTP request forwarded
    /// by the proxy, or SOCKS5.
    pub via: Via,
    /// The proxy refused the client's request itself — this is its code (`PROXY…`) — and has
    /// answered the client: the host only records the refusal and answers with an error;
    /// nothing is dialled. `host` and `port` are then what could be read, or empty and 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub malformed: Option<String>,
}

/// How a guest client asked the proxy for a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// `CONNECT host:port` (a tunnel, usually TLS).
    Connect,
    /// An absolute-form HTTP request (`GET http://host/…`) the proxy forwards.
    Forward,
    /// A SOCKS5 `CONNECT`.
    Socks,
}

/// One command the agent knows of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessInfo {
    /// The spawn handle; `None` for an exec command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handle: Option<u64>,
    /// Its process id (and process group).
    pub pid: u32,
    /// The program it ran (`argv[0]` only: arguments may hold secrets).
    pub program: String,
    /// Milliseconds since it started.
    pub running_ms: u64,
    /// How it ended; `None` while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ExitStatus>,
}

/// One path, as [`Request::FsStat`] and [`Request::FsList`] describe it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileInfo {
    /// Its last component.
    pub name: String,
    /// What it is.
    pub kind: FileKind,
    /// Size in bytes (of the link text for a symlink).
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Last modification, seconds since the epoch.
    pub modified: i64,
}

/// The kind of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    /// A regular file.
    File,
    /// A directory.
    Directory,
    /// A symbolic link (never followed).
    Symlink,
    /// Anything else (fifo, socket, device).
    Other,
}

/// A file to write in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsWriteRequest {
    /// Where, absolute, under the copy root (`/tmp`).
    pub path: String,
    /// Permission bits (at most 0o777).
    pub mode: u32,
    /// How many bytes follow.
    pub size: u64,
    /// `sha256:` of those bytes: the file is put in place only if they match.
    pub sha256: String,
    /// The bytes are a tar stream, unpacked (once they match) into a new directory `path`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tar: bool,
}

/// A file copied whole, as the agent counted and hashed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDone {
    /// Its size.
    pub size: u64,
    /// `sha256:` of its bytes.
    pub sha256: String,
}

/// The agent's side of the hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HelloReply {
    /// [`super::PROTOCOL_VERSION`] of the agent.
    pub version: u32,
    /// The agent's crate version.
    pub agent: String,
    /// When each step of the boot finished.
    pub timings: BootTimings,
}

/// Milliseconds since the guest kernel started, at the end of each boot step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootTimings {
    /// The agent began (the kernel's own boot ends here).
    pub agent_ms: u64,
    /// Every kernel module was loaded.
    pub modules_ms: u64,
    /// The dm-verity device was live.
    pub verity_ms: u64,
    /// The verified root was mounted as `/`.
    pub root_ms: u64,
    /// The agent channel was open and served.
    pub channel_ms: u64,
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecReply {
    /// Its status.
    pub status: ExitStatus,
    /// Whether dm-verity had refused any block of the root by the time it ended. A command
    /// that read a corrupted block saw EIO; this says why.
    pub integrity: Integrity,
    /// Bytes it wrote to standard output (all sent in stdout frames before this reply).
    pub stdout_bytes: u64,
    /// Bytes it wrote to standard error.
    pub stderr_bytes: u64,
    /// From start to end, in milliseconds.
    pub duration_ms: u64,
}

/// A command's exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ExitStatus {
    /// It exited with this code.
    Exited {
        /// The exit code, 0–255.
        code: i32,
    },
    /// A signal ended it.
    Signaled {
        /// The signal number.
        signal: i32,
    },
    /// It ran past its timeout and was killed with everything it started.
    TimedOut,
}

/// The state of the verified root, read from dm-verity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Integrity {
    /// No block has failed verification.
    Intact,
    /// At least one block read did not match the signed hash tree.
    Corrupted,
}

/// A request the agent could not carry out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorReply {
    /// A stable code (`AGENT1xx`, or `AGENT007` for a program dm-verity refused to load).
    pub code: String,
    /// What happened.
    pub message: String,
}

/// The stable codes of [`ErrorReply`].
pub mod codes {
    /// The program could not be read: dm-verity refused one of its blocks.
    pub const INTEGRITY: &str = "AGENT007";
    /// The request is malformed: not JSON, unknown fields, or a [`super::ExecRequest::problem`].
    pub const BAD_REQUEST: &str = "AGENT100";
    /// The program does not exist.
    pub const NOT_FOUND: &str = "AGENT101";
    /// The program exists but cannot be executed.
    pub const NOT_EXECUTABLE: &str = "AGENT102";
    /// The program could not be started for another reason.
    pub const SPAWN_FAILED: &str = "AGENT103";
    /// Too many commands are running already.
    pub const BUSY: &str = "AGENT104";
    /// The host speaks a protocol version the agent does not.
    pub const VERSION: &str = "AGENT105";
    /// The working directory does not exist.
    pub const NO_CWD: &str = "AGENT106";
    /// A copy's path is outside the copy root, goes through a symlink, or names something the
    /// workload user could not read or write there.
    pub const PATH_REFUSED: &str = "AGENT107";
    /// A copied file's bytes do not match the size or digest announced: it was not kept.
    pub const COPY_MISMATCH: &str = "AGENT108";
    /// A file could not be read or written.
    pub const FILE_IO: &str = "AGENT109";
    /// No command or spawned process has that stream or handle (it may have ended).
    pub const NO_SUCH_PROCESS: &str = "AGENT110";
    /// The peer sent data past its stream's flow-control window, or on a stream not taking
    /// data.
    pub const FLOW: &str = "AGENT111";
    /// The path exists already (`fs_mkdir`), does not exist, or is the wrong kind.
    pub const FILE_STATE: &str = "AGENT112";
    /// The guest's clock could not be set.
    pub const CLOCK: &str = "AGENT113";
    /// No such user in the guest, or root.
    pub const USER: &str = "AGENT114";
    /// A forwarded port's connection could not be made: nothing listens on that port in the
    /// guest, or the guest refused it.
    pub const CONNECT_FAILED: &str = "AGENT115";
    /// The egress proxy could not listen on its address in the guest.
    pub const PROXY_LISTEN: &str = "AGENT116";
    /// The plan's profile (or the host's policy) does not grant what was asked: a file
    /// operation beyond `/tmp` and the home, a copy in from the host, a client's environment.
    pub const NOT_GRANTED: &str = "AGENT117";
    /// A launch's disk could not be mounted: no disk with its serial, not ext4, a mount
    /// point that cannot be made.
    pub const MOUNT_FAILED: &str = "AGENT118";
    /// A restored guest could not be made a machine of its own: the entropy is not
    /// [`super::RENEW_ENTROPY_BYTES`] bytes of hex, the kernel refused it or the reseed, or
    /// the hostname.
    pub const RENEW_FAILED: &str = "AGENT119";
    /// A terminal was asked for ([`super::ExecRequest::tty`]) where the plan's profile grants
    /// none (`restrictive`, `standard` without `terminal`).
    pub const NO_TERMINAL: &str = "AGENT120";
    /// No pseudo-terminal could be made for the command in the guest, or resized.
    pub const TERMINAL_FAILED: &str = "AGENT121";
    /// No service of that name, or the services were started already.
    pub const NO_SUCH_SERVICE: &str = "AGENT122";
    /// An encrypted volume could not be opened: its key is not 64 bytes, or dm-crypt refused
    /// the table.
    pub const VOLUME_FAILED: &str = "AGENT123";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_absolute_plain_and_not_the_kernels() {
        for good in ["/nix", "/work/data", "/run/cache"] {
            assert!(is_mount_point(good), "{good}");
        }
        for bad in [
            "",
            "/",
            "nix",
            "/work/../etc",
            "/./nix",
            "//",
            "/nix/",
            "/a//b",
            "/proc",
            "/sys/x",
            "/dev/pts",
        ] {
            assert!(!is_mount_point(bad), "{bad:?}");
        }
    }

    fn exec(argv: &[&str]) -> ExecRequest {
        ExecRequest {
            argv: argv.iter().map(|a| a.to_string()).collect(),
            env: BTreeMap::new(),
            cwd: None,
            timeout_ms: 1000,
            stdin: false,
            user: None,
            tty: None,
        }
    }

    #[test]
    fn requests_round_trip_with_their_op_tag() {
        let request = Request::Exec(exec(&["echo", "hi"]));
        let json = serde_json::to_string(&request).unwrap();
        assert_eq!(
            json,
            r#"{"op":"exec","argv":["echo","hi"],"env":{},"timeout_ms":1000}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), request);
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"hello","version":1}"#).unwrap(),
            Request::Hello { version: 1 }
        );
    }

    #[test]
    fn unknown_fields_and_ops_are_refused() {
        for json in [
            r#"{"op":"exec","argv":["x"],"timeout_ms":1,"uid":0}"#,
            r#"{"op":"hello","version":1,"extra":true}"#,
            r#"{"op":"reboot"}"#,
            r#"{"argv":["x"],"timeout_ms":1}"#,
        ] {
            assert!(serde_json::from_str::<Request>(json).is_err(), "{json}");
        }
    }

    #[test]
    fn responses_round_trip() {
        let reply = Response::Exec(ExecReply {
            status: ExitStatus::Exited { code: 7 },
            integrity: Integrity::Intact,
            stdout_bytes: 1,
            stderr_bytes: 2,
            duration_ms: 3,
        });
        let json = serde_json::to_string(&reply).unwrap();
        assert!(
            json.contains(r#""status":{"kind":"exited","code":7}"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<Response>(&json).unwrap(), reply);
    }

    #[test]
    fn malformed_exec_requests_are_named() {
        assert_eq!(exec(&["ls"]).problem(), None);
        assert!(exec(&[]).problem().unwrap().contains("empty"));
        assert!(exec(&["a\0b"]).problem().unwrap().contains("NUL"));
        let mut bad_env = exec(&["ls"]);
        bad_env.env.insert("A=B".into(), "x".into());
        assert!(bad_env.problem().is_some());
        let mut relative = exec(&["ls"]);
        relative.cwd = Some("tmp".into());
        assert!(relative.problem().unwrap().contains("absolute"));
    }

    #[test]
    fn a_terminal_needs_a_size_on_a_screen_and_its_input() {
        let mut terminal = exec(&["sh"]);
        terminal.stdin = true;
        terminal.tty = Some(TtySize { rows: 24, cols: 80 });
        assert_eq!(terminal.problem(), None);
        let json = serde_json::to_string(&Request::Exec(terminal.clone())).unwrap();
        assert!(json.contains(r#""tty":{"rows":24,"cols":80}"#), "{json}");
        for (rows, cols) in [(0, 80), (24, 0), (TtySize::MAX + 1, 80)] {
            let mut odd = terminal.clone();
            odd.tty = Some(TtySize { rows, cols });
            assert!(odd.problem().unwrap().contains("rows"), "{rows}x{cols}");
        }
        terminal.stdin = false;
        assert!(terminal.problem().unwrap().contains("standard input"));
        let resize = r#"{"op":"resize","stream":3,"size":{"rows":50,"cols":200}}"#;
        assert_eq!(
            serde_json::from_str::<Request>(resize).unwrap(),
            Request::Resize {
                stream: 3,
                size: TtySize {
                    rows: 50,
                    cols: 200
                }
            }
        );
    }
}
