//! Commands the API runs in sandboxes. Each is an exec over its VM's control socket held by
//! a thread of the server for the command's life: its output becomes [`CommandEvent`]s, its
//! input comes from `POST …/stdin`, signals go to it through [`CommandSignals`], and its end
//! carries a signed receipt. A foreground command streams its events to the client that
//! started it, paced by that client; a background one keeps them (up to [`KEPT_BYTES`] of
//! output) for whoever connects to it.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use mvm_protocol::{ExecRequest, ExitStatus, Integrity, TtySize};
use mvm_runner::client::{AgentClient, CommandSignals, OutputSink};
use mvm_runner::control::MAX_TIMEOUT;
use mvm_runner::named_vm::{NamedVm, NamedVmError};
use tokio::sync::{mpsc, watch};

use crate::error::{ApiError, ErrorDetail};
use crate::model::{CommandEnd, CommandEvent, CommandInfo, PtySize, StartCommand};

/// A command's timeout when its caller gives none (E2B's default too).
pub const DEFAULT_TIMEOUT_S: u64 = 60;
/// The output a background command keeps for clients that connect later; older output is
/// dropped first.
pub const KEPT_BYTES: usize = 8 << 20;
/// How many ended commands a sandbox remembers, for `list` and late `events`.
const ENDED_KEPT: usize = 64;
/// The events in flight between a foreground command and its client.
const LIVE_EVENTS: usize = 64;
/// `TERM` for a command on a terminal, unless its caller sets one: what terminal emulators
/// (and E2B's terminals) say they are.
const PTY_TERM: &str = "xterm-256color";

/// One command's shared state.
pub struct Command {
    id: u64,
    argv: Vec<String>,
    /// Whether it runs on a terminal (`resize` applies).
    pty: bool,
    /// Until it ends: these hold the command's connection to the VM open, which counts
    /// against the VM's clients (RUN050) however long the command is remembered.
    signals: Mutex<Option<CommandSignals>>,
    stdin: Mutex<Option<io::PipeWriter>>,
    kept: Mutex<Kept>,
    /// The number of events kept so far (including dropped ones): subscribers wait on it.
    progress: watch::Sender<u64>,
}

/// A background command's events, kept for its subscribers.
#[derive(Default)]
struct Kept {
    /// Events from `first` on.
    events: Vec<CommandEvent>,
    /// The index of `events[0]` among all the command's events.
    first: u64,
    /// Output bytes in `events`.
    bytes: usize,
    /// Set once it ended (or failed to run).
    end: Option<CommandEvent>,
    /// Whether its events are kept (background) or go to one live client (foreground).
    keep_output: bool,
}

impl Command {
    /// Its id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// What `list` shows of it.
    pub fn info(&self) -> CommandInfo {
        let kept = lock(&self.kept);
        CommandInfo {
            id: self.id,
            argv: self.argv.clone(),
            running: kept.end.is_none(),
            end: match &kept.end {
                Some(CommandEvent::Ended(end)) => Some(end.clone()),
                _ => None,
            },
        }
    }

    /// Sends `signal` to it (and its process group).
    pub fn signal(&self, signal: i32) -> Result<(), ApiError> {
        if !(1..=31).contains(&signal) {
            return Err(ApiError::BadRequest(format!(
                "{signal} is not a signal (1-31)"
            )));
        }
        self.while_running("signalling the command", |signals| signals.send(signal))
    }

    /// Resizes its terminal.
    pub fn resize(&self, size: PtySize) -> Result<(), ApiError> {
        if !self.pty {
            return Err(ApiError::BadRequest(format!(
                "command {} has no terminal (start it with \"pty\")",
                self.id
            )));
        }
        let size = tty_size(size)?;
        self.while_running("resizing the command's terminal", |signals| {
            signals.resize(size)
        })
    }

    /// Does `act` on the command's connection while it runs (`doing` names it in an error);
    /// NotFound once it has ended.
    fn while_running(
        &self,
        doing: &'static str,
        act: impl FnOnce(&CommandSignals) -> io::Result<()>,
    ) -> Result<(), ApiError> {
        let ended = || ApiError::NotFound(format!("command {} has ended", self.id));
        if lock(&self.kept).end.is_some() {
            return Err(ended());
        }
        let signals = lock(&self.signals);
        act(signals.as_ref().ok_or_else(ended)?).map_err(ApiError::host(doing))
    }

    /// Writes `bytes` to its standard input.
    pub fn write_stdin(&self, bytes: &[u8]) -> Result<(), ApiError> {
        let mut stdin = lock(&self.stdin);
        let Some(pipe) = stdin.as_mut() else {
            return Err(ApiError::BadRequest(format!(
                "command {}'s input is closed (or was not kept open: start it with \"stdin\": true)",
                self.id
            )));
        };
        pipe.write_all(bytes)
            .map_err(ApiError::host("writing the command's input"))
    }

    /// Closes its standard input: it reads end of file.
    pub fn close_stdin(&self) {
        lock(&self.stdin).take();
    }

    /// Its events from the `from`th on: those kept, then each as it comes, until its end.
    /// `None` once the last was returned.
    pub async fn next_events(&self, from: u64) -> Option<(Vec<CommandEvent>, u64)> {
        let mut progress = self.progress.subscribe();
        loop {
            {
                let kept = lock(&self.kept);
                let next = kept.first + kept.events.len() as u64;
                if from < next {
                    let skip = from.saturating_sub(kept.first) as usize;
                    return Some((kept.events[skip..].to_vec(), next));
                }
                if let Some(end) = &kept.end {
                    // The end goes last, once.
                    return (from == next).then(|| (vec![end.clone()], next + 1));
                }
            }
            if progress.changed().await.is_err() {
                return None;
            }
        }
    }

    /// Keeps `event` (dropping the oldest output over [`KEPT_BYTES`]) and wakes subscribers.
    fn keep(&self, event: CommandEvent) {
        let mut kept = lock(&self.kept);
        match event {
            CommandEvent::Ended(_) | CommandEvent::Error(_) => kept.end = Some(event),
            _ if !kept.keep_output => return,
            _ => {
                kept.bytes += output_len(&event);
                kept.events.push(event);
                while kept.bytes > KEPT_BYTES && kept.events.len() > 1 {
                    let dropped = kept.events.remove(0);
                    kept.bytes -= output_len(&dropped);
                    kept.first += 1;
                }
            }
        }
        let total = kept.first + kept.events.len() as u64;
        drop(kept);
        self.progress.send_replace(total);
    }
}

/// `size` as the agent takes it, checked.
fn tty_size(size: PtySize) -> Result<TtySize, ApiError> {
    let tty = TtySize {
        rows: size.rows,
        cols: size.cols,
    };
    match tty.is_valid() {
        true => Ok(tty),
        false => Err(ApiError::BadRequest(format!(
            "a terminal of {}x{} (columns x rows): each must be 1-{}",
            size.cols,
            size.rows,
            TtySize::MAX
        ))),
    }
}

fn output_len(event: &CommandEvent) -> usize {
    match event {
        CommandEvent::Stdout { data } | CommandEvent::Stderr { data } => data.len(),
        _ => 0,
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The commands the API started, per sandbox.
#[derive(Default)]
pub struct Commands {
    by_sandbox: Mutex<HashMap<String, SandboxCommands>>,
}

#[derive(Default)]
struct SandboxCommands {
    next: u64,
    commands: BTreeMap<u64, Arc<Command>>,
}

/// A started command: its shared state and, for a foreground one, its live events.
pub struct Started {
    /// The command.
    pub command: Arc<Command>,
    /// Its events, for the client that started it in the foreground.
    pub live: Option<mpsc::Receiver<CommandEvent>>,
}

impl Commands {
    /// Starts `spec` in `vm` with the sandbox's environment `envs` under it: a thread holds
    /// its exec until it ends. Returns once the exec was asked of the agent.
    pub fn start(
        &self,
        vm: NamedVm,
        envs: BTreeMap<String, String>,
        spec: StartCommand,
    ) -> Result<Started, ApiError> {
        if spec.argv.is_empty() {
            return Err(ApiError::BadRequest("argv is empty".into()));
        }
        let timeout = match spec.timeout_s.unwrap_or(DEFAULT_TIMEOUT_S) {
            0 => MAX_TIMEOUT,
            seconds => Duration::from_secs(seconds).min(MAX_TIMEOUT),
        };
        let tty = spec.pty.map(tty_size).transpose()?;
        let mut env = envs;
        env.extend(spec.envs);
        if tty.is_some() {
            env.entry("TERM".into()).or_insert_with(|| PTY_TERM.into());
        }
        let request = ExecRequest {
            argv: spec.argv.clone(),
            env,
            cwd: spec.cwd,
            timeout_ms: timeout.as_millis() as u64,
            stdin: false,
            user: spec.user,
            tty,
        };
        // A terminal's input is always open: it is how keys reach it.
        let (input, stdin) = match spec.stdin || tty.is_some() {
            true => {
                let (reader, writer) = io::pipe().map_err(ApiError::host("a pipe for input"))?;
                (Some(Box::new(reader) as Box<dyn Read + Send>), Some(writer))
            }
            false => (None, None),
        };
        let client = vm.connect(Arc::default())?;
        let signals = client.signals_for_next();
        let name = vm.name().to_string();
        let mut sandboxes = lock(&self.by_sandbox);
        let commands = sandboxes.entry(name).or_default();
        commands.next += 1;
        let id = commands.next;
        let command = Arc::new(Command {
            id,
            argv: spec.argv,
            pty: tty.is_some(),
            signals: Mutex::new(Some(signals)),
            stdin: Mutex::new(stdin),
            kept: Mutex::new(Kept {
                keep_output: spec.background,
                ..Kept::default()
            }),
            progress: watch::channel(0).0,
        });
        commands.commands.insert(id, Arc::clone(&command));
        forget_old(commands);
        drop(sandboxes);
        let (live_tx, live) = match spec.background {
            true => (None, None),
            false => {
                let (tx, rx) = mpsc::channel(LIVE_EVENTS);
                (Some(tx), Some(rx))
            }
        };
        let running = Arc::clone(&command);
        std::thread::Builder::new()
            .name(format!("command-{id}"))
            .spawn(move || run(vm, client, request, input, running, live_tx))
            .map_err(ApiError::host("a thread for the command"))?;
        Ok(Started { command, live })
    }

    /// The command `id` of the sandbox `sandbox`.
    pub fn get(&self, sandbox: &str, id: u64) -> Result<Arc<Command>, ApiError> {
        lock(&self.by_sandbox)
            .get(sandbox)
            .and_then(|commands| commands.commands.get(&id).cloned())
            .ok_or_else(|| ApiError::NotFound(format!("{sandbox} has no command {id}")))
    }

    /// The sandbox's commands, by id.
    pub fn list(&self, sandbox: &str) -> Vec<CommandInfo> {
        lock(&self.by_sandbox)
            .get(sandbox)
            .map(|commands| commands.commands.values().map(|c| c.info()).collect())
            .unwrap_or_default()
    }

    /// Whether any command still runs: the server stays up for it.
    pub fn any_running(&self) -> bool {
        lock(&self.by_sandbox).values().any(|commands| {
            commands
                .commands
                .values()
                .any(|command| lock(&command.kept).end.is_none())
        })
    }

    /// Forgets a removed sandbox's commands.
    pub fn forget(&self, sandbox: &str) {
        lock(&self.by_sandbox).remove(sandbox);
    }
}

/// Keeps the last [`ENDED_KEPT`] ended commands; running ones are always kept.
fn forget_old(commands: &mut SandboxCommands) {
    let ended: Vec<u64> = commands
        .commands
        .iter()
        .filter(|(_, command)| lock(&command.kept).end.is_some())
        .map(|(id, _)| *id)
        .collect();
    for id in ended.iter().take(ended.len().saturating_sub(ENDED_KEPT)) {
        commands.commands.remove(id);
    }
}

/// The thread that holds one command's exec to its end.
fn run(
    vm: NamedVm,
    mut client: AgentClient,
    request: ExecRequest,
    input: Option<Box<dyn Read + Send>>,
    command: Arc<Command>,
    live: Option<mpsc::Sender<CommandEvent>>,
) {
    let mut sink = EventSink {
        command: &command,
        live: live.as_ref(),
    };
    // The first event: its id.
    let _ = sink.emit(CommandEvent::Started { id: command.id });
    let started = Instant::now();
    let ran = vm.run(&mut client, request, input, &mut sink, true);
    let end = match ran {
        Ok(ran) => {
            let (exit_code, signal, timed_out) = match ran.executed.reply.status {
                ExitStatus::Exited { code } => (code, None, false),
                ExitStatus::Signaled { signal } => (128 + signal, Some(signal), false),
                ExitStatus::TimedOut => (124, None, true),
            };
            CommandEvent::Ended(CommandEnd {
                exit_code,
                signal,
                timed_out,
                duration_ms: started.elapsed().as_millis() as u64,
                receipt: ran
                    .receipt
                    .map(|signed| mvm_ir::digest::sha256_hex(&signed))
                    .unwrap_or_default(),
                integrity_failure: ran.executed.reply.integrity == Integrity::Corrupted,
            })
        }
        Err(error) => CommandEvent::Error(failure(error)),
    };
    command.close_stdin();
    // The connection goes with the exec: an ended command is remembered, not connected.
    drop(client);
    lock(&command.signals).take();
    if let Some(live) = &live {
        let _ = live.blocking_send(end.clone());
    }
    command.keep(end);
}

/// Why a command could not run, with the code the CLI would show.
fn failure(error: NamedVmError) -> ErrorDetail {
    ApiError::from(error).detail()
}

/// Output as events: to the live client (waiting for room: the client paces the command),
/// and kept for a background command.
struct EventSink<'a> {
    command: &'a Command,
    live: Option<&'a mpsc::Sender<CommandEvent>>,
}

impl EventSink<'_> {
    fn emit(&mut self, event: CommandEvent) -> io::Result<()> {
        if let Some(live) = self.live {
            live.blocking_send(event.clone())
                .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away"))?;
        }
        self.command.keep(event);
        Ok(())
    }
}

impl OutputSink for EventSink<'_> {
    fn stdout(&mut self, bytes: &[u8]) -> io::Result<()> {
        let data = base64::engine::general_purpose::STANDARD.encode(bytes);
        self.emit(CommandEvent::Stdout { data })
    }

    fn stderr(&mut self, bytes: &[u8]) -> io::Result<()> {
        let data = base64::engine::general_purpose::STANDARD.encode(bytes);
        self.emit(CommandEvent::Stderr { data })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(keep_output: bool) -> Command {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let client =
            mvm_runner::client::AgentClient::over_control_socket(a, Arc::default()).unwrap();
        Command {
            id: 1,
            argv: vec!["true".into()],
            pty: false,
            signals: Mutex::new(Some(client.signals_for_next())),
            stdin: Mutex::new(None),
            kept: Mutex::new(Kept {
                keep_output,
                ..Kept::default()
            }),
            progress: watch::channel(0).0,
        }
    }

    fn output(n: usize) -> CommandEvent {
        CommandEvent::Stdout {
            data: "a".repeat(n),
        }
    }

    #[tokio::test]
    async fn a_subscriber_gets_what_was_kept_then_the_end_once() {
        let command = command(true);
        command.keep(output(3));
        command.keep(output(4));
        let (events, next) = command.next_events(0).await.unwrap();
        assert_eq!((events.len(), next), (2, 2));
        let end = CommandEvent::Error(ErrorDetail {
            code: "RUN025".into(),
            message: "closed".into(),
        });
        command.keep(end.clone());
        assert_eq!(command.next_events(2).await.unwrap(), (vec![end], 3));
        assert!(command.next_events(3).await.is_none());
        assert!(!command.info().running);
    }

    #[test]
    fn old_output_goes_first_past_the_limit_and_foreground_output_is_not_kept() {
        let command = command(true);
        for _ in 0..3 {
            command.keep(output(KEPT_BYTES / 2));
        }
        let kept = lock(&command.kept);
        assert_eq!((kept.first, kept.events.len()), (1, 2));
        drop(kept);
        let foreground = super::tests::command(false);
        foreground.keep(output(10));
        assert!(lock(&foreground.kept).events.is_empty());
    }

    #[test]
    fn signals_and_input_are_refused_clearly() {
        let command = command(true);
        assert!(matches!(command.signal(0), Err(ApiError::BadRequest(_))));
        assert!(matches!(
            command.write_stdin(b"x"),
            Err(ApiError::BadRequest(_))
        ));
    }
}
