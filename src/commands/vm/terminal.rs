//! `mvm exec -t` and `mvm shell`: a command on a terminal in the guest, driven from this one.
//!
//! This terminal goes into raw mode, so every key — Ctrl-C, Ctrl-Z and Ctrl-D among them —
//! reaches the guest's terminal as a byte, and the guest's line discipline acts on it as a
//! terminal would (a signal to the foreground job, end of input). The guest's terminal
//! follows this one's size, at the start and on every `SIGWINCH`. However the command ends —
//! its exit, a signal to `mvm`, the VM going away, an error — this terminal's settings are
//! put back as they were.

use std::io;
use std::os::fd::BorrowedFd;
use std::process::ExitCode;
use std::thread::JoinHandle;

use anyhow::Context;
use mvm_protocol::{ExecRequest, TtySize};
use mvm_runner::client::CommandSignals;
use mvm_runner::control::MAX_TIMEOUT;
use rustix::termios::{OptionalActions, Termios};
use signal_hook::consts::SIGWINCH;
use signal_hook::iterator::{Handle, Signals};

use super::exec::{connected, run_on};

/// A login shell on a terminal in a running VM: bash where the image has it, else sh.
#[derive(Debug, clap::Args)]
pub struct ShellArgs {
    /// The VM.
    name: String,
    /// Run it as this guest user (a name from the image's /etc/passwd, or UID[:GID]; never
    /// root). Default: the workload user, uid 1000.
    #[arg(long, value_name = "USER")]
    user: Option<String>,
}

/// What `mvm shell` runs: the best shell the image has, as a login shell.
const SHELL: &str = "command -v bash >/dev/null 2>&1 && exec bash -l; exec sh -l";

/// `mvm shell NAME`: `mvm exec -t NAME` of a login shell.
pub fn shell(args: ShellArgs) -> anyhow::Result<ExitCode> {
    let request = ExecRequest {
        argv: ["/bin/sh", "-c", SHELL].map(String::from).to_vec(),
        env: Default::default(),
        cwd: None,
        timeout_ms: MAX_TIMEOUT.as_millis() as u64,
        stdin: true,
        user: args.user,
        tty: None,
    };
    run(&args.name, request)
}

/// The size given when standard input is not a terminal.
const DEFAULT_SIZE: TtySize = TtySize { rows: 24, cols: 80 };

/// Runs `request` on a terminal in the VM `name`, fed by this process's standard input.
pub fn run(name: &str, mut request: ExecRequest) -> anyhow::Result<ExitCode> {
    let stdin = rustix::stdio::stdin();
    let host = rustix::termios::isatty(stdin).then_some(stdin);
    request.tty = Some(host.and_then(size_of).unwrap_or(DEFAULT_SIZE));
    request.stdin = true;
    if let Ok(term) = std::env::var("TERM") {
        if !term.is_empty() && term.bytes().all(|b| b.is_ascii_graphic()) {
            request.env.entry("TERM".into()).or_insert(term);
        }
    }
    let (named, mut client) = connected(name)?;
    // `mvm` hung up on, or told to end: the command's terminal is gone, as it would be.
    client.interrupt_as_hangup();
    // Raw only once the VM is there to type to; put back as soon as the command is over (and
    // on every other path out, when dropped), before anything is said of how it ended.
    let mut raw = host.map(RawMode::enter).transpose()?;
    let _resizing = host
        .map(|tty| Resizing::start(client.signals_for_next(), tty))
        .transpose()?;
    let stdin = Some(Box::new(io::stdin()) as Box<dyn io::Read + Send>);
    run_on(&named, &mut client, request, stdin, None, &mut || {
        raw.take();
    })
}

/// The terminal's size, if it has one.
fn size_of(tty: BorrowedFd<'_>) -> Option<TtySize> {
    let size = rustix::termios::tcgetwinsize(tty).ok()?;
    let size = TtySize {
        rows: size.ws_row,
        cols: size.ws_col,
    };
    size.is_valid().then_some(size)
}

/// This terminal in raw mode until dropped, then as it was.
struct RawMode {
    tty: BorrowedFd<'static>,
    saved: Termios,
}

impl RawMode {
    fn enter(tty: BorrowedFd<'static>) -> anyhow::Result<Self> {
        let saved = rustix::termios::tcgetattr(tty).context("reading the terminal's settings")?;
        let mut raw = saved.clone();
        raw.make_raw();
        // `Now`, not `Flush`: what was typed ahead still reaches the guest.
        rustix::termios::tcsetattr(tty, OptionalActions::Now, &raw)
            .context("putting the terminal in raw mode")?;
        Ok(Self { tty, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // Drain: what the guest printed last is on the screen before the line discipline
        // changes under it.
        let _ = rustix::termios::tcsetattr(self.tty, OptionalActions::Drain, &self.saved);
    }
}

/// Passes this terminal's new size to the guest's on every `SIGWINCH`, until dropped.
struct Resizing {
    signals: Handle,
    thread: Option<JoinHandle<()>>,
}

impl Resizing {
    fn start(command: CommandSignals, tty: BorrowedFd<'static>) -> anyhow::Result<Self> {
        let mut signals = Signals::new([SIGWINCH]).context("watching SIGWINCH")?;
        let handle = signals.handle();
        let thread = std::thread::Builder::new()
            .name("resize".into())
            .spawn(move || {
                for _ in signals.forever() {
                    // The command may have ended already: its answer is the exec's to drop.
                    if let Some(size) = size_of(tty) {
                        let _ = command.resize(size);
                    }
                }
            })?;
        Ok(Self {
            signals: handle,
            thread: Some(thread),
        })
    }
}

impl Drop for Resizing {
    fn drop(&mut self) {
        self.signals.close();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
