//! Serving the host: the agent's side of the [protocol](mvm_protocol) over one channel.
//!
//! One thread, one `poll` over the channel and every running command's pipes and pidfd.
//! Commands run concurrently, each on the stream id of its request (up to [`MAX_COMMANDS`];
//! one more is answered `AGENT104`, busy). Output is forwarded as it arrives, each stream in
//! its own frames; a command's final response follows once it has ended and its pipes are
//! drained.
//!
//! The same loop serves the guest's TCP connections that cross the channel, each a tunnel
//! (`tunnel.rs`) polled with the rest: the egress proxy's clients, once the host asks for the
//! proxy (`egress.rs`), and the host's connections to forwarded ports (`forwarded.rs`).

pub mod cgroup;
pub mod channel;
pub mod disk;
mod egress;
pub mod exec;
pub mod files;
mod forwarded;
pub mod fsops;
mod renew;
pub mod seccomp;
pub mod secret_file;
pub mod service;
pub mod trust;
pub mod tty;
mod tunnel;
pub mod users;

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::process::WaitOptions;

use cgroup::{CommandGroup, CommandGroups};
use egress::Egress;
use exec::{Credentials, Running};
use files::{Download, FileAccess, FileRoots, Upload};
use forwarded::ForwardedPorts;
use mvm_protocol::cmdline::{GuestPolicy, SeccompTier};
use mvm_protocol::{
    codes, encode, flow, is_agent_stream, BootTimings, ErrorReply, ExecReply, ExecRequest,
    FileDone, Frame, FrameDecoder, FrameError, FrameKind, HelloReply, Integrity, ProcessInfo,
    Request, Response, PROTOCOL_VERSION,
};
use seccomp::WorkloadFilter;
use service::{Due, Services};
use trust::TrustPaths;

/// Bytes read from a pipe or the channel at a time; also the largest data frame sent.
const CHUNK: usize = 64 * 1024;
/// Commands that may run at once; one more is refused as busy (`AGENT104`).
pub const MAX_COMMANDS: usize = 32;
/// How long to wait for the host to connect before looking again.
const NOT_CONNECTED_PAUSE: Duration = Duration::from_millis(20);

/// How the agent serves.
pub struct ServeConfig {
    /// Who commands run as; `None` runs them as the agent itself (only for tests on a host).
    pub workload_user: Option<Credentials>,
    /// Reap every child that ends (PID 1 inherits every orphan in the guest), not only the
    /// commands it started.
    pub reap_orphans: bool,
    /// A cgroup2 directory in which each command gets a cgroup of its own, killed whole when
    /// the command ends (the guest's `/sys/fs/cgroup`); `None`: process groups only.
    pub command_groups: Option<PathBuf>,
    /// Where file operations may reach.
    pub file_roots: FileRoots,
    /// What the plan's profile grants in the guest (`mvm.policy=` of the kernel command line).
    pub policy: GuestPolicy,
    /// The syscall filter installed on every command, compiled from `policy`; `None` for the
    /// `unrestricted` tier.
    pub workload_filter: Option<WorkloadFilter>,
    /// Where a CA the host asks the guest to trust goes.
    pub trust: TrustPaths,
    /// Where the launch's secret files go (`/run/secrets` in the guest).
    pub secret_dir: PathBuf,
    /// The boot timings for the hello.
    pub timings: BootTimings,
    /// Reads whether the verified root has seen a corrupted block.
    pub integrity: fn() -> Integrity,
    /// Where the egress proxy listens once the host asks for it ([`crate::proxy::LISTEN`] in
    /// the guest). Commands are pointed at `LISTEN` whatever this is.
    pub proxy_listen: SocketAddr,
}

impl ServeConfig {
    /// Serving on a host rather than as the guest's PID 1 (tests, and tools driving the loop
    /// over a socket pair): commands run as the caller, only the agent's own children are
    /// reaped, no boot timings, a root that is always intact, and the proxy (when asked for)
    /// on a free loopback port — set `proxy_listen` to reach it.
    pub fn on_host() -> Self {
        Self {
            workload_user: None,
            file_roots: FileRoots::tmp(),
            policy: GuestPolicy {
                seccomp: SeccompTier::Unrestricted,
                inet: true,
                host_copy: true,
                files_anywhere: false,
                terminal: true,
            },
            workload_filter: None,
            trust: TrustPaths {
                dir: std::env::temp_dir().join(format!("mvm-agent-trust-{}", std::process::id())),
                system_bundle: None,
            },
            secret_dir: std::env::temp_dir()
                .join(format!("mvm-agent-secrets-{}", std::process::id())),
            reap_orphans: false,
            command_groups: None,
            timings: BootTimings::default(),
            integrity: || Integrity::Intact,
            proxy_listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        }
    }
}

/// Why serving ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The host asked for a power-off (and got its answer).
    PowerOff,
    /// The host closed the channel.
    HostGone,
}

/// Why serving failed: the channel broke or carried bytes that are not frames.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A malformed frame header.
    #[error("{0}")]
    Frame(#[from] FrameError),
    /// Reading or writing the channel failed.
    #[error("agent channel: {0}")]
    Io(#[from] io::Error),
}

impl ServeError {
    /// The stable code of this error: the frame error's, or `AGENT009` for the channel.
    pub fn code(&self) -> &'static str {
        match self {
            ServeError::Frame(e) => e.code(),
            ServeError::Io(_) => "AGENT009",
        }
    }
}

/// Serves requests on `channel` until the host asks for a power-off or goes away.
pub fn serve<C: Read + Write + AsFd>(
    channel: &mut C,
    config: &ServeConfig,
) -> Result<Ended, ServeError> {
    let mut agent = Agent::new(config)?;
    let mut decoder = FrameDecoder::new();
    let mut heard_from_host = false;
    let mut input = vec![0; CHUNK];
    loop {
        let ready = agent.wait(channel)?;
        let channel_events = ready.channel;

        if channel_events.contains(PollFlags::IN) {
            let n = match channel.read(&mut input) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            if n == 0 && heard_from_host {
                return Ok(Ended::HostGone);
            }
            if n == 0 {
                std::thread::sleep(NOT_CONNECTED_PAUSE);
            }
            heard_from_host |= n > 0;
            decoder.push(&input[..n]);
            while let Some(frame) = decoder.next_frame()? {
                if let Some(ended) = agent.handle(channel, frame)? {
                    return Ok(ended);
                }
            }
        } else if channel_events.intersects(PollFlags::HUP | PollFlags::ERR) {
            // A virtio-console port reports a hang-up while no host is connected.
            if heard_from_host {
                return Ok(Ended::HostGone);
            }
            std::thread::sleep(NOT_CONNECTED_PAUSE);
        }
        agent.progress(channel, &ready)?;
    }
}

/// Spawned commands whose end is kept for `wait` and `ps`; the oldest is forgotten first.
const MAX_KEPT_ENDS: usize = 64;
/// `wait` requests pending at once; one more is refused as busy.
const MAX_WAITS: usize = 64;
/// How often the cgroup of an ended command is killed and removed again until it is empty.
const EMPTYING_RETRY: Duration = Duration::from_millis(20);

/// Everything the agent is doing for the host.
struct Agent<'c> {
    config: &'c ServeConfig,
    /// Exec and spawned commands still running (or draining their output).
    running: Vec<Running>,
    /// Spawned commands that ended and were not yet waited for, oldest first.
    ended: VecDeque<Running>,
    waits: Vec<Waiter>,
    uploads: HashMap<u32, Upload>,
    downloads: Vec<Download>,
    next_handle: u64,
    buffer: Vec<u8>,
    /// Where commands get their cgroups, when they do.
    groups: Option<CommandGroups>,
    /// Cgroups of commands that ended, killed and removed once empty.
    emptying: Vec<CommandGroup>,
    /// The egress proxy, once the host asked for it.
    egress: Option<Egress>,
    /// Whether the host gave a CA to trust: commands then get [`trust::environment`].
    trusted_ca: bool,
    /// The host's connections to the guest's ports.
    forwarded: ForwardedPorts,
    /// The plan's services and health probe, once the host started them.
    services: Services,
    /// `services` and `service_log` requests waiting for a change.
    watches: Vec<Watch>,
}

/// A `services` or `service_log` request not answered yet.
struct Watch {
    stream: u32,
    deadline: Instant,
    what: Watched,
}

/// What a [`Watch`] waits for.
enum Watched {
    /// A report past this generation.
    Services(u64),
    /// Output of this service past this offset.
    Log(String, u64),
}

/// A `wait` request not answered yet.
struct Waiter {
    stream: u32,
    handle: u64,
    deadline: Instant,
}

impl<'c> Agent<'c> {
    fn new(config: &'c ServeConfig) -> Result<Self, ServeError> {
        let groups = config
            .command_groups
            .as_deref()
            .map(CommandGroups::new)
            .transpose()?;
        Ok(Self {
            config,
            running: Vec::new(),
            ended: VecDeque::new(),
            waits: Vec::new(),
            uploads: HashMap::new(),
            downloads: Vec::new(),
            next_handle: 1,
            buffer: vec![0; CHUNK],
            groups,
            emptying: Vec::new(),
            egress: None,
            trusted_ca: false,
            forwarded: ForwardedPorts::default(),
            services: Services::default(),
            watches: Vec::new(),
        })
    }

    /// Starts the services and the command probe that are due.
    fn start_due(&mut self, now: Instant) {
        for due in self.services.due(now) {
            let handle = self.next_handle;
            let (request, service) = match due {
                Due::Service(index, mut request) => {
                    request.timeout_ms = u64::MAX;
                    (request, Some(index))
                }
                Due::CommandProbe(request) => (request, None),
            };
            let outcome = self.start(0, &request, Some(handle)).map(|mut command| {
                if let (Some(spawned), Some(index)) = (command.spawned.as_mut(), service) {
                    spawned.log = Some(self.services.log(index));
                }
                let pid = command.info().pid;
                self.running.push(command);
                self.next_handle += 1;
                (handle, pid)
            });
            match service {
                Some(index) => self.services.started(index, outcome, now),
                None => self
                    .services
                    .probe_started(outcome.map(|(handle, _)| handle), now),
            }
        }
    }

    /// Answers the watches whose change came or whose time is up.
    fn answer_watches<C: Write>(
        &mut self,
        channel: &mut C,
        now: Instant,
    ) -> Result<(), ServeError> {
        let mut index = 0;
        while index < self.watches.len() {
            let watch = &self.watches[index];
            let due = watch.deadline <= now
                || match &watch.what {
                    Watched::Services(since) => self.services.generation() > *since,
                    Watched::Log(name, offset) => {
                        self.services.log_moved(name, *offset).unwrap_or(true)
                    }
                };
            if !due {
                index += 1;
                continue;
            }
            let watch = self.watches.swap_remove(index);
            match watch.what {
                Watched::Services(_) => {
                    let report = Response::Services(self.services.report());
                    send(channel, watch.stream, &report)?;
                }
                Watched::Log(name, offset) => {
                    answer_log(channel, watch.stream, &self.services, &name, offset)?;
                }
            }
        }
        Ok(())
    }

    /// Starts a command for `request` on `stream`, in a cgroup of its own when commands get
    /// one, pointed at the egress proxy once it serves.
    fn start(
        &mut self,
        stream: u32,
        request: &ExecRequest,
        spawn: Option<u64>,
    ) -> Result<Running, ErrorReply> {
        let group = match self.groups.as_mut().map(CommandGroups::create) {
            Some(Err(e)) => {
                let message = format!("making the command's cgroup: {e}");
                return Err(ErrorReply {
                    code: codes::SPAWN_FAILED.into(),
                    message,
                });
            }
            Some(Ok(group)) => Some(group),
            None => None,
        };
        let proxied;
        let request = match self.egress {
            Some(_) => {
                let trust = self.trusted_ca.then_some(&self.config.trust);
                proxied = with_proxy_environment(request, trust);
                &proxied
            }
            None => request,
        };
        let filter = self.config.workload_filter.clone();
        Running::start(
            stream,
            request,
            self.config.workload_user,
            spawn,
            group,
            filter,
        )
    }

    /// Answers one frame from the host; `Some` when serving ends.
    fn handle<C: Write>(
        &mut self,
        channel: &mut C,
        frame: Frame,
    ) -> Result<Option<Ended>, ServeError> {
        let carried = matches!(
            frame.kind,
            FrameKind::Response | FrameKind::Data | FrameKind::Credit | FrameKind::Close
        );
        if carried && is_agent_stream(frame.stream) {
            return self.for_egress(channel, frame).map(|()| None);
        }
        match frame.kind {
            FrameKind::Request => {}
            FrameKind::Data => return self.receive(channel, frame).map(|()| None),
            FrameKind::Close if self.forwarded.holds(frame.stream) => {
                self.forwarded.close(channel, frame.stream)?;
                return Ok(None);
            }
            FrameKind::Credit => {
                let Ok(bytes) = flow::parse_credit(&frame.payload) else {
                    let message = "a credit frame must carry 4 bytes".to_string();
                    send_error(channel, frame.stream, codes::FLOW, message)?;
                    return Ok(None);
                };
                self.grant(frame.stream, bytes);
                return Ok(None);
            }
            kind => {
                let message = format!("a {kind:?} frame from the host");
                send_error(channel, frame.stream, codes::BAD_REQUEST, message)?;
                return Ok(None);
            }
        }
        let stream = frame.stream;
        let request = match serde_json::from_slice::<Request>(&frame.payload) {
            Ok(request) => request,
            Err(e) => {
                send_error(channel, stream, codes::BAD_REQUEST, e.to_string())?;
                return Ok(None);
            }
        };
        let user = self.config.workload_user;
        let files = FileAccess {
            user,
            roots: &self.config.file_roots,
        };
        let busy = self.busy(stream);
        match request {
            Request::Hello { version } if version == PROTOCOL_VERSION => {
                let hello = Response::Hello(HelloReply {
                    version: PROTOCOL_VERSION,
                    agent: env!("CARGO_PKG_VERSION").into(),
                    timings: self.config.timings,
                });
                send(channel, stream, &hello)?;
            }
            Request::Hello { version } => {
                let message =
                    format!("the host speaks protocol {version}, this agent {PROTOCOL_VERSION}");
                send_error(channel, stream, codes::VERSION, message)?;
            }
            Request::Echo => send(channel, stream, &Response::Echo)?,
            Request::FsWrite(_) | Request::FsRead { .. } | Request::Exec(_) | Request::Spawn(_)
                if busy.is_some() =>
            {
                let (code, message) = busy.unwrap_or_default();
                send_error(channel, stream, code, message)?;
            }
            Request::FsWrite(_) if !self.config.policy.host_copy => {
                let message = "the plan's profile (restrictive) copies no file in from the host";
                send_error(channel, stream, codes::NOT_GRANTED, message.into())?;
            }
            Request::FsWrite(request) => match Upload::start(request, files) {
                Ok(upload) if upload.complete() => {
                    answer_upload(channel, stream, upload.finish(user))?;
                }
                Ok(upload) => {
                    self.uploads.insert(stream, upload);
                }
                Err(error) => send(channel, stream, &Response::Error(error))?,
            },
            Request::FsRead { path, tar } => {
                let file = match tar {
                    true => files::archive_directory(&path, files),
                    false => files::open_for_reading(&path, files).map(|(file, _)| file),
                };
                match file {
                    Ok(file) => self.downloads.push(Download::new(stream, file)),
                    Err(error) => send(channel, stream, &Response::Error(error))?,
                }
            }
            Request::Exec(request) => match self.start(stream, &request, None) {
                Ok(started) => self.running.push(started),
                Err(error) => send(channel, stream, &Response::Error(error))?,
            },
            Request::Spawn(request) => {
                let handle = self.next_handle;
                match self.start(stream, &request, Some(handle)) {
                    Ok(started) => {
                        self.next_handle += 1;
                        let pid = started.info().pid;
                        self.running.push(started);
                        send(channel, stream, &Response::Spawned { handle, pid })?;
                    }
                    Err(error) => send(channel, stream, &Response::Error(error))?,
                }
            }
            Request::Signal {
                stream: target,
                signal,
            } => {
                let command = self.running.iter().find(|c| c.holds(target));
                let outcome = match command {
                    Some(command) => command.signal(signal),
                    None => Err(no_such_process(&format!("stream {target}"))),
                };
                answer_done(channel, stream, outcome)?;
            }
            Request::Resize {
                stream: target,
                size,
            } => {
                let command = self.running.iter().find(|c| c.holds(target));
                let outcome = match command {
                    Some(command) => command.resize(size),
                    None => Err(no_such_process(&format!("stream {target}"))),
                };
                answer_done(channel, stream, outcome)?;
            }
            Request::Kill { handle, signal } => {
                let outcome = match self.spawned(handle) {
                    Some(command) => command.signal(signal),
                    None => Err(no_such_process(&format!("handle {handle}"))),
                };
                answer_done(channel, stream, outcome)?;
            }
            Request::Wait { handle, .. } if self.services.owns(handle) => {
                let message =
                    format!("handle {handle} is a service's: its supervisor waits for it");
                send_error(channel, stream, codes::NO_SUCH_PROCESS, message)?;
            }
            Request::Wait { handle, timeout_ms } => {
                if let Some(at) = self
                    .ended
                    .iter()
                    .position(|c| spawn_handle(c) == Some(handle))
                {
                    if let Some(ended) = self.ended.remove(at) {
                        answer_wait(channel, stream, &ended)?;
                    }
                } else if let Some(command) = self.spawned(handle) {
                    if timeout_ms == 0 {
                        send(channel, stream, &Response::Wait(command.info()))?;
                    } else if self.waits.len() >= MAX_WAITS {
                        let message = format!("{MAX_WAITS} waits are pending already");
                        send_error(channel, stream, codes::BUSY, message)?;
                    } else {
                        let deadline = Instant::now() + Duration::from_millis(timeout_ms);
                        self.waits.push(Waiter {
                            stream,
                            handle,
                            deadline,
                        });
                    }
                } else {
                    let error = no_such_process(&format!("handle {handle}"));
                    send(channel, stream, &Response::Error(error))?;
                }
            }
            Request::Ps => {
                let mut processes: Vec<ProcessInfo> = self
                    .running
                    .iter()
                    .chain(&self.ended)
                    .filter(|c| spawn_handle(c).is_none_or(|h| !self.services.is_probe(h)))
                    .map(Running::info)
                    .collect();
                processes.sort_by_key(|p| std::cmp::Reverse(p.running_ms));
                send(channel, stream, &Response::Ps { processes })?;
            }
            request @ (Request::FsList { .. }
            | Request::FsStat { .. }
            | Request::FsMkdir { .. }
            | Request::FsRemove { .. }
            | Request::FsMove { .. }) => {
                send(channel, stream, &fsops::run(request, files))?;
            }
            Request::SetClock { unix_nanos } => {
                answer_done(channel, stream, set_clock(unix_nanos))?;
            }
            Request::Renew {
                entropy,
                hostname,
                unix_nanos,
            } => {
                let renewed =
                    renew::renew(&entropy, &hostname).and_then(|()| set_clock(unix_nanos));
                answer_done(channel, stream, renewed)?;
            }
            Request::TrustCa { pem } => match trust::trust(&pem, &self.config.trust) {
                Ok(()) => {
                    self.trusted_ca = true;
                    send(channel, stream, &Response::Done)?;
                }
                Err(error) => send(channel, stream, &Response::Error(error))?,
            },
            Request::SecretFile { name, value } => {
                let owner = self.config.workload_user;
                match secret_file::put(&name, &value, &self.config.secret_dir, owner) {
                    Ok(()) => send(channel, stream, &Response::Done)?,
                    Err(error) => send(channel, stream, &Response::Error(error))?,
                }
            }
            Request::Mount {
                serial,
                path,
                read_only,
                key,
            } => {
                let owner = self.config.workload_user;
                let key = key.map(|key| zeroize::Zeroizing::new(key.0));
                match disk::mount_disk(
                    &serial,
                    &path,
                    read_only,
                    key.as_ref().map(|key| key.as_str()),
                    owner,
                ) {
                    Ok(()) => send(channel, stream, &Response::Done)?,
                    Err(error) => send(channel, stream, &Response::Error(error))?,
                }
            }
            Request::ServeProxy if self.egress.is_some() => send(channel, stream, &Response::Done)?,
            Request::ServeProxy => match Egress::listen(self.config.proxy_listen) {
                Ok(egress) => {
                    self.egress = Some(egress);
                    send(channel, stream, &Response::Done)?;
                }
                Err(e) => {
                    let message = format!("listening on {}: {e}", self.config.proxy_listen);
                    send_error(channel, stream, codes::PROXY_LISTEN, message)?;
                }
            },
            Request::Connect { .. } if self.taken(stream) => {
                let message = format!("stream {stream} already has an exchange going");
                send_error(channel, stream, codes::BAD_REQUEST, message)?;
            }
            Request::Connect { port } => {
                if let Err(error) = self.forwarded.connect(stream, port) {
                    send(channel, stream, &Response::Error(error))?;
                }
            }
            Request::StartServices(request) => {
                let now = Instant::now();
                match self.services.begin(request, now) {
                    Ok(()) => {
                        self.start_due(now);
                        send(channel, stream, &Response::Done)?;
                    }
                    Err(error) => send(channel, stream, &Response::Error(error))?,
                }
            }
            Request::Services { .. } | Request::ServiceLog { .. }
                if self.watches.len() >= MAX_WAITS =>
            {
                let message = format!("{MAX_WAITS} watches are pending already");
                send_error(channel, stream, codes::BUSY, message)?;
            }
            Request::Services {
                changed_since,
                timeout_ms,
            } => match changed_since {
                Some(since) if timeout_ms > 0 && self.services.generation() <= since => {
                    self.watches.push(Watch {
                        stream,
                        deadline: Instant::now() + Duration::from_millis(timeout_ms),
                        what: Watched::Services(since),
                    });
                }
                _ => send(channel, stream, &Response::Services(self.services.report()))?,
            },
            Request::ServiceLog {
                name,
                offset,
                timeout_ms,
            } => match self.services.read_log(&name, offset) {
                Some((bytes, slice)) if bytes.is_empty() && !slice.ended && timeout_ms > 0 => {
                    self.watches.push(Watch {
                        stream,
                        deadline: Instant::now() + Duration::from_millis(timeout_ms),
                        what: Watched::Log(name, offset),
                    });
                }
                _ => answer_log(channel, stream, &self.services, &name, offset)?,
            },
            Request::Pause | Request::Resume | Request::Save => {
                let message = "pause, resume and save are answered by the VM's runner".to_string();
                send_error(channel, stream, codes::BAD_REQUEST, message)?;
            }
            Request::PowerOff => {
                for command in self.running.drain(..) {
                    command.end(self.config.reap_orphans);
                }
                self.egress = None;
                self.forwarded.clear();
                send(channel, stream, &Response::PowerOff)?;
                return Ok(Some(Ended::PowerOff));
            }
        }
        Ok(None)
    }

    /// Whether an exchange that takes a stream is going on `stream`.
    fn taken(&self, stream: u32) -> bool {
        self.uploads.contains_key(&stream)
            || self.downloads.iter().any(|d| d.stream == stream)
            || self.running.iter().any(|c| c.holds(stream))
            || self.forwarded.holds(stream)
    }

    /// Why a new exchange that takes a stream cannot start on `stream`, if it cannot.
    fn busy(&self, stream: u32) -> Option<(&'static str, String)> {
        if self.taken(stream) {
            return Some((
                codes::BAD_REQUEST,
                format!("stream {stream} already has an exchange going"),
            ));
        }
        (self.running.len() >= MAX_COMMANDS).then(|| {
            (
                codes::BUSY,
                format!("{MAX_COMMANDS} commands are already running"),
            )
        })
    }

    fn spawned(&self, handle: u64) -> Option<&Running> {
        self.running
            .iter()
            .find(|c| spawn_handle(c) == Some(handle))
    }

    /// Room handed back by the host for what the agent sends on `stream`.
    fn grant(&mut self, stream: u32, bytes: u64) {
        if let Some(command) = self.running.iter_mut().find(|c| c.holds(stream)) {
            command.window.grant(bytes);
        } else if let Some(download) = self.downloads.iter_mut().find(|d| d.stream == stream) {
            download.window.grant(bytes);
        } else {
            self.forwarded.grant(stream, bytes);
        }
    }

    /// A frame the host sent on one of the agent's own streams: about a proxied connection.
    /// Without a proxy, or for a stream no longer in use, it is dropped.
    fn for_egress<C: Write>(&mut self, channel: &mut C, frame: Frame) -> Result<(), ServeError> {
        let Some(egress) = self.egress.as_mut() else {
            return Ok(());
        };
        let stream = frame.stream;
        match frame.kind {
            FrameKind::Response => egress.answer(channel, stream, &frame.payload),
            FrameKind::Data => egress.receive(channel, stream, &frame.payload),
            FrameKind::Credit => match flow::parse_credit(&frame.payload) {
                Ok(bytes) => {
                    egress.grant(stream, bytes);
                    Ok(())
                }
                Err(_) => egress.tear_down(channel, stream),
            },
            // A close: the only other kind carried here.
            _ => {
                egress.close(stream);
                Ok(())
            }
        }
    }

    /// Hands a data frame to the upload or the standard input on its stream. Data for neither
    /// is dropped (the host streams an upload without waiting for its answer, which may have
    /// been a refusal).
    fn receive<C: Write>(&mut self, channel: &mut C, frame: Frame) -> Result<(), ServeError> {
        let stream = frame.stream;
        if self.forwarded.holds(stream) {
            return self.forwarded.receive(channel, stream, &frame.payload);
        }
        if let Some(upload) = self.uploads.get_mut(&stream) {
            if frame.payload.is_empty() {
                // The host gave the upload up: its temporary goes with it.
                let message = upload.abandoned();
                self.uploads.remove(&stream);
                return send_error(channel, stream, codes::COPY_MISMATCH, message);
            }
            if !upload.window.take(frame.payload.len()) {
                self.uploads.remove(&stream);
                return send_error(channel, stream, codes::FLOW, overrun());
            }
            if let Err(error) = upload.write(&frame.payload) {
                self.uploads.remove(&stream);
                return send(channel, stream, &Response::Error(error));
            }
            let back = flow::cost(frame.payload.len());
            upload.window.restore(back);
            if upload.complete() {
                if let Some(upload) = self.uploads.remove(&stream) {
                    answer_upload(channel, stream, upload.finish(self.config.workload_user))?;
                }
                return Ok(());
            }
            return send_credit(channel, stream, back);
        }
        let Some(at) = self
            .running
            .iter()
            .position(|c| c.holds(stream) && c.stdin.is_some())
        else {
            return Ok(());
        };
        let received = self.running[at]
            .stdin
            .as_mut()
            .and_then(|stdin| stdin.receive(&frame.payload));
        match received {
            Some(back) => send_credit(channel, stream, back),
            None => {
                // The host broke its window: the exchange ends here, with this one answer,
                // and the command with it.
                let ended = self.running.swap_remove(at);
                self.emptying.extend(ended.end(self.config.reap_orphans));
                send_error(channel, stream, codes::FLOW, overrun())
            }
        }
    }

    /// Waits until the channel, a pipe, a pidfd or a socket is ready, a download can go on, or
    /// the next deadline; returns what is ready.
    fn wait<'a>(&'a self, channel: &'a impl AsFd) -> Result<Ready, ServeError> {
        let mut fds = vec![PollFd::new(channel, PollFlags::IN)];
        // Where each command's descriptors are in `fds`: stdout, stderr, pidfd, stdin.
        let mut positions = Vec::with_capacity(self.running.len());
        for command in self.running.iter() {
            // Output is read only while it can be sent (a spawned command's is kept).
            let may_read = command.spawned.is_some() || command.window.room() > 0;
            let readable = |pipe: Option<BorrowedFd<'a>>| pipe.filter(|_| may_read);
            let descriptors = [
                (
                    readable(command.stdout.as_ref().map(AsFd::as_fd)),
                    PollFlags::IN,
                ),
                (
                    readable(command.stderr.as_ref().map(AsFd::as_fd)),
                    PollFlags::IN,
                ),
                (command.pidfd().map(AsFd::as_fd), PollFlags::IN),
                (
                    command
                        .stdin
                        .as_ref()
                        .filter(|stdin| stdin.wants_to_write())
                        .and_then(|stdin| stdin.pipe.as_ref())
                        .map(AsFd::as_fd),
                    PollFlags::OUT,
                ),
            ];
            positions.push(descriptors.map(|(fd, flags)| {
                fd.map(|fd| {
                    fds.push(PollFd::from_borrowed_fd(fd, flags));
                    fds.len() - 1
                })
            }));
        }
        if let Some(wake) = self.services.wake_fd() {
            fds.push(PollFd::from_borrowed_fd(wake, PollFlags::IN));
        }
        let egress = self.egress.iter().flat_map(Egress::interests);
        let mut sockets = Vec::new();
        for (key, fd, flags) in egress.chain(self.forwarded.interests()) {
            fds.push(PollFd::from_borrowed_fd(fd, flags));
            sockets.push((key, fds.len() - 1));
        }
        let now = Instant::now();
        let emptying = (!self.emptying.is_empty()).then(|| now + EMPTYING_RETRY);
        let deadlines = self
            .running
            .iter()
            .filter_map(|command| command.next_deadline(now))
            .chain(self.waits.iter().map(|w| w.deadline))
            .chain(self.watches.iter().map(|w| w.deadline))
            .chain(self.services.next_deadline())
            .chain(emptying)
            .chain(self.egress.as_ref().and_then(Egress::next_deadline));
        let download_ready = self.downloads.iter().any(|d| d.window.room() > 0);
        let timeout = if download_ready {
            Some(now)
        } else {
            deadlines.min()
        }
        .map(|deadline| {
            let left = deadline.saturating_duration_since(now);
            Timespec {
                tv_sec: left.as_secs() as i64,
                tv_nsec: i64::from(left.subsec_nanos()),
            }
        });
        match rustix::event::poll(&mut fds, timeout.as_ref()) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => {
                return Ok(Ready {
                    channel: PollFlags::empty(),
                    commands: self.running.iter().map(|_| PipeEvents::default()).collect(),
                    sockets: HashMap::new(),
                })
            }
            Err(e) => return Err(ServeError::Io(e.into())),
        }
        let ready = |at: Option<usize>| {
            at.is_some_and(|i| {
                fds[i]
                    .revents()
                    .intersects(PollFlags::IN | PollFlags::OUT | PollFlags::HUP | PollFlags::ERR)
            })
        };
        let commands = positions
            .iter()
            // A ready pidfd only wakes the loop: every turn looks for ended commands.
            .map(|[stdout, stderr, _pidfd, stdin]| PipeEvents {
                stdout: ready(*stdout),
                stderr: ready(*stderr),
                stdin: ready(*stdin),
            })
            .collect();
        let sockets = sockets
            .into_iter()
            .map(|(key, at)| (key, fds[at].revents()))
            .filter(|(_, flags)| !flags.is_empty())
            .collect();
        Ok(Ready {
            channel: fds[0].revents(),
            commands,
            sockets,
        })
    }

    /// Everything that can move without the host: output forwarded, input written, downloads
    /// sent, ended commands answered, waits and deadlines handled, sockets served.
    fn progress<C: Write>(&mut self, channel: &mut C, ready: &Ready) -> Result<(), ServeError> {
        let events = &ready.commands;
        if self.config.reap_orphans {
            reap_all(&mut self.running)?;
        }
        self.emptying.retain(|group| !group.try_remove());
        let now = Instant::now();
        for (command, events) in self.running.iter_mut().zip(events) {
            forward_output(channel, command, events, &mut self.buffer)?;
            // Looked for at every turn, not only when its pidfd said so: an end is never
            // missed, whatever woke the loop.
            if !self.config.reap_orphans {
                command.reap()?;
            }
            if events.stdin {
                if let Some(stdin) = command.stdin.as_mut() {
                    let freed = stdin.flush();
                    if freed > 0 {
                        send_credit(channel, command.stream, freed)?;
                    }
                }
            }
            command.enforce_deadline(now);
        }
        self.send_downloads(channel)?;
        self.answer_ended(channel, now)?;
        self.services.collect(now);
        self.start_due(now);
        self.answer_watches(channel, now)?;
        if let Some(egress) = self.egress.as_mut() {
            egress.progress(channel, &ready.sockets, now, &mut self.buffer)?;
        }
        self.forwarded
            .progress(channel, &ready.sockets, &mut self.buffer)?;
        let mut index = 0;
        while index < self.waits.len() {
            if self.waits[index].deadline > now {
                index += 1;
                continue;
            }
            let waiter = self.waits.swap_remove(index);
            match self.spawned(waiter.handle) {
                Some(command) => send(channel, waiter.stream, &Response::Wait(command.info()))?,
                None => {
                    let error = no_such_process(&format!("handle {}", waiter.handle));
                    send(channel, waiter.stream, &Response::Error(error))?;
                }
            }
        }
        Ok(())
    }

    /// Sends what the windows of the downloads allow; a finished one gets its answer.
    fn send_downloads<C: Write>(&mut self, channel: &mut C) -> Result<(), ServeError> {
        let mut index = 0;
        while index < self.downloads.len() {
            let download = &mut self.downloads[index];
            let mut outcome = Ok(Some(0));
            while download.window.room() > 0 {
                outcome = download.next_chunk(&mut self.buffer);
                match outcome {
                    Ok(Some(n)) => {
                        write_frame(channel, FrameKind::Data, download.stream, &self.buffer[..n])?
                    }
                    _ => break,
                }
            }
            match outcome {
                Ok(Some(_)) => index += 1,
                Ok(None) => {
                    let download = self.downloads.swap_remove(index);
                    let stream = download.stream;
                    send(channel, stream, &Response::FsRead(download.finish()))?;
                }
                Err(e) => {
                    let stream = self.downloads.swap_remove(index).stream;
                    send_error(channel, stream, codes::FILE_IO, e.to_string())?;
                }
            }
        }
        Ok(())
    }

    /// Answers the commands that have ended: an exec gets its reply; a spawned command is
    /// kept for `wait` (and answered to the waits pending on it).
    fn answer_ended<C: Write>(&mut self, channel: &mut C, now: Instant) -> Result<(), ServeError> {
        let mut index = 0;
        while index < self.running.len() {
            let command = &mut self.running[index];
            let Some(status) = command.status.filter(|_| command.finished(now)) else {
                index += 1;
                continue;
            };
            let mut command = self.running.swap_remove(index);
            // What it left behind goes with it, however it got away.
            command.kill_leftovers();
            self.emptying.extend(command.take_group());
            if let Some(handle) = spawn_handle(&command).filter(|h| self.services.owns(*h)) {
                let output = command
                    .spawned
                    .as_ref()
                    .map(|s| [s.stdout.bytes(), s.stderr.bytes()].concat())
                    .unwrap_or_default();
                self.services.ended(handle, status, &output, now);
                continue;
            }
            let Some(handle) = spawn_handle(&command) else {
                let reply = ExecReply {
                    status,
                    integrity: (self.config.integrity)(),
                    stdout_bytes: command.stdout_bytes,
                    stderr_bytes: command.stderr_bytes,
                    duration_ms: command.elapsed_ms(),
                };
                send(channel, command.stream, &Response::Exec(reply))?;
                continue;
            };
            let waiting: Vec<u32> = self
                .waits
                .iter()
                .filter(|w| w.handle == handle)
                .map(|w| w.stream)
                .collect();
            if waiting.is_empty() {
                if self.ended.len() == MAX_KEPT_ENDS {
                    self.ended.pop_front();
                }
                self.ended.push_back(command);
            } else {
                self.waits.retain(|w| w.handle != handle);
                for stream in waiting {
                    answer_wait(channel, stream, &command)?;
                }
            }
        }
        Ok(())
    }
}

fn spawn_handle(command: &Running) -> Option<u64> {
    command.spawned.as_ref().map(|s| s.handle)
}

/// Sends an ended spawned command's kept output, then its status.
fn answer_wait<C: Write>(
    channel: &mut C,
    stream: u32,
    command: &Running,
) -> Result<(), ServeError> {
    if let Some(spawned) = &command.spawned {
        for (kind, tail) in [
            (FrameKind::Stdout, &spawned.stdout),
            (FrameKind::Stderr, &spawned.stderr),
        ] {
            for chunk in tail.bytes().chunks(CHUNK) {
                write_frame(channel, kind, stream, chunk)?;
            }
        }
    }
    send(channel, stream, &Response::Wait(command.info()))
}

/// Sends a service's log from `offset` on in stdout frames, then how far it went.
fn answer_log<C: Write>(
    channel: &mut C,
    stream: u32,
    services: &Services,
    name: &str,
    offset: u64,
) -> Result<(), ServeError> {
    let Some((bytes, slice)) = services.read_log(name, offset) else {
        let message = format!("no service is named {name:?}");
        return send_error(channel, stream, codes::NO_SUCH_SERVICE, message);
    };
    for chunk in bytes.chunks(CHUNK) {
        write_frame(channel, FrameKind::Stdout, stream, chunk)?;
    }
    send(channel, stream, &Response::ServiceLog(slice))
}

fn answer_done<C: Write>(
    channel: &mut C,
    stream: u32,
    outcome: Result<(), ErrorReply>,
) -> Result<(), ServeError> {
    match outcome {
        Ok(()) => send(channel, stream, &Response::Done),
        Err(error) => send(channel, stream, &Response::Error(error)),
    }
}

/// Sets the guest's wall clock (the agent is the guest's root; commands are not).
fn set_clock(unix_nanos: u64) -> Result<(), ErrorReply> {
    let time = Timespec {
        tv_sec: (unix_nanos / 1_000_000_000) as i64,
        tv_nsec: (unix_nanos % 1_000_000_000) as i64,
    };
    rustix::time::clock_settime(rustix::time::ClockId::Realtime, time).map_err(|e| ErrorReply {
        code: codes::CLOCK.into(),
        message: format!("setting the clock: {e}"),
    })
}

fn no_such_process(what: &str) -> ErrorReply {
    ErrorReply {
        code: codes::NO_SUCH_PROCESS.into(),
        message: format!("no command runs for {what}"),
    }
}

fn overrun() -> String {
    format!("data past the stream's {}-byte window", flow::WINDOW)
}

fn answer_upload<C: Write>(
    channel: &mut C,
    stream: u32,
    done: Result<FileDone, ErrorReply>,
) -> Result<(), ServeError> {
    match done {
        Ok(done) => send(channel, stream, &Response::FsWrite(done)),
        Err(error) => send(channel, stream, &Response::Error(error)),
    }
}

/// What one `poll` found ready.
struct Ready {
    /// The channel's events.
    channel: PollFlags,
    /// Each running command's, in order.
    commands: Vec<PipeEvents>,
    /// The sockets that have events.
    sockets: HashMap<SocketKey, PollFlags>,
}

/// A socket the loop polls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum SocketKey {
    /// The egress proxy's listener.
    Listener,
    /// An egress proxy client, by its number.
    Client(u64),
    /// A forwarded connection, by its stream.
    Forwarded(u32),
}

/// A command's request with the egress proxy's environment added — and the trusted CA's, when
/// there is one — under its own: a variable the request sets wins.
fn with_proxy_environment(request: &ExecRequest, trust: Option<&TrustPaths>) -> ExecRequest {
    let mut request = request.clone();
    let proxy = crate::proxy::environment()
        .into_iter()
        .map(|(name, value)| (name, value.to_string()));
    let ca = trust.map(trust::environment).unwrap_or_default();
    for (name, value) in proxy.chain(ca) {
        request.env.entry(name.into()).or_insert(value);
    }
    request
}

/// What `poll` reported for one running command's descriptors.
#[derive(Debug, Default)]
struct PipeEvents {
    stdout: bool,
    stderr: bool,
    stdin: bool,
}

/// Forwards what the command's pipes have, each as its own kind of data frame, as far as its
/// window allows; a spawned command's output is kept instead.
fn forward_output<C: Write>(
    channel: &mut C,
    command: &mut Running,
    events: &PipeEvents,
    buffer: &mut [u8],
) -> Result<(), ServeError> {
    for (kind, ready) in [
        (FrameKind::Stdout, events.stdout),
        (FrameKind::Stderr, events.stderr),
    ] {
        if !ready {
            continue;
        }
        let limit = match command.spawned {
            Some(_) => buffer.len(),
            None => command.window.room().min(buffer.len()),
        };
        let pipe = match kind {
            FrameKind::Stdout => command.stdout.as_mut().map(|p| p as &mut dyn Read),
            _ => command.stderr.as_mut().map(|p| p as &mut dyn Read),
        };
        let Some(pipe) = pipe.filter(|_| limit > 0) else {
            continue;
        };
        let Some(n) = exec::read_available(pipe, &mut buffer[..limit]) else {
            match kind {
                FrameKind::Stdout => command.stdout = None,
                _ => command.stderr = None,
            }
            continue;
        };
        if n == 0 {
            continue;
        }
        let bytes = &buffer[..n];
        match (&mut command.spawned, kind) {
            (Some(spawned), kind) => spawned.keep(kind == FrameKind::Stdout, bytes),
            (None, _) => {
                write_frame(channel, kind, command.stream, bytes)?;
                command.window.spend(n);
            }
        }
        match kind {
            FrameKind::Stdout => command.stdout_bytes += n as u64,
            _ => command.stderr_bytes += n as u64,
        }
    }
    Ok(())
}

/// Reaps every child that has ended, recording a command's status when it is one.
fn reap_all(running: &mut [Running]) -> Result<(), ServeError> {
    loop {
        // `wait`, not `waitpid(None, …)`: that one waits only for the agent's own process
        // group, and every command runs in a group of its own.
        match rustix::process::wait(WaitOptions::NOHANG) {
            Ok(Some((pid, status))) => {
                if let Some(command) = running.iter_mut().find(|c| c.pid() == pid) {
                    command.exited(status);
                }
            }
            Ok(None) | Err(rustix::io::Errno::CHILD) => return Ok(()),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(ServeError::Io(e.into())),
        }
    }
}

fn send_credit<C: Write>(channel: &mut C, stream: u32, bytes: u64) -> Result<(), ServeError> {
    write_frame(
        channel,
        FrameKind::Credit,
        stream,
        &flow::credit_payload(bytes),
    )
}

fn send<C: Write>(channel: &mut C, stream: u32, response: &Response) -> Result<(), ServeError> {
    let payload = serde_json::to_vec(response).map_err(io::Error::other)?;
    write_frame(channel, FrameKind::Response, stream, &payload)
}

fn send_error<C: Write>(
    channel: &mut C,
    stream: u32,
    code: &str,
    message: String,
) -> Result<(), ServeError> {
    let error = ErrorReply {
        code: code.into(),
        message,
    };
    send(channel, stream, &Response::Error(error))
}

fn write_frame<C: Write>(
    channel: &mut C,
    kind: FrameKind,
    stream: u32,
    payload: &[u8],
) -> Result<(), ServeError> {
    channel.write_all(&encode(kind, stream, payload)?)?;
    Ok(())
}

#[cfg(test)]
mod tests;
