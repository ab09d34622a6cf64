//! The guest's serial console (ttyS0), kept in a bounded log.
//!
//! A guest can print without end, so the log file stops growing at [`LOG_LIMIT`] bytes (with a
//! note that it was cut), while the last [`TAIL_LIMIT`] bytes stay in memory for error
//! reports. The agent reports a failed boot as one `mvm-agent: error <CODE> <message>` line;
//! the first such line is kept apart so that the runner can say why a guest stopped.

use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

/// The most bytes of console output written to the log file.
pub const LOG_LIMIT: u64 = 4 << 20;
/// The most bytes of console output kept in memory for error reports.
pub const TAIL_LIMIT: usize = 16 << 10;

/// The agent's report of a failed boot, read off the console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentFailure {
    /// Its stable code (`AGENT0xx`).
    pub code: String,
    /// The whole line.
    pub line: String,
}

#[derive(Debug, Default)]
struct State {
    tail: Vec<u8>,
    partial_line: Vec<u8>,
    failure: Option<AgentFailure>,
    kernel_panic: bool,
    /// The agent said its channel is open: its boot is over, and no later line is a report of
    /// a failed boot (the workload runs from then on and may make the kernel print anything).
    booted: bool,
}

/// The console as it was seen so far; cheap to clone and read while the guest runs.
#[derive(Debug, Clone, Default)]
pub struct Console(Arc<Mutex<State>>);

impl Console {
    /// The last bytes of the console, as text.
    pub fn tail(&self) -> String {
        String::from_utf8_lossy(&self.lock().tail).into_owned()
    }

    /// The agent's first failure report, if it made one.
    pub fn agent_failure(&self) -> Option<AgentFailure> {
        self.lock().failure.clone()
    }

    /// Whether the guest kernel panicked.
    pub fn kernel_panicked(&self) -> bool {
        self.lock().kernel_panic
    }

    /// Says the guest's boot is over before it prints anything: a woken guest booted before it
    /// was saved and says `channel ready` no more, so no line of it is a boot report.
    pub fn boot_is_over(&self) {
        self.lock().booted = true;
    }

    /// Feeds console bytes: kept in the tail, and scanned line by line.
    pub fn feed(&self, bytes: &[u8]) {
        let mut state = self.lock();
        state.tail.extend_from_slice(bytes);
        let excess = state.tail.len().saturating_sub(TAIL_LIMIT);
        state.tail.drain(..excess);
        for &byte in bytes {
            if byte == b'\n' {
                let line = std::mem::take(&mut state.partial_line);
                scan_line(&mut state, &String::from_utf8_lossy(&line));
            } else if state.partial_line.len() < 4096 {
                state.partial_line.push(byte);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn scan_line(state: &mut State, line: &str) {
    let line = line.trim_end_matches('\r');
    if is_kernel_panic(line) {
        state.kernel_panic = true;
    }
    if state.failure.is_some() || state.booted {
        return;
    }
    if line.starts_with("mvm-agent: channel ready") {
        state.booted = true;
        return;
    }
    // Only a whole line from the agent, never text inside another line.
    let Some(report) = line.strip_prefix("mvm-agent: error ") else {
        return;
    };
    let code = report.split_whitespace().next().unwrap_or_default();
    if code.len() == 8 && code.starts_with("AGENT") && code[5..].bytes().all(|b| b.is_ascii_digit())
    {
        state.failure = Some(AgentFailure {
            code: code.to_string(),
            line: line.to_string(),
        });
    }
}

/// Whether `line` is the kernel's own panic message: it begins the line (after the kernel's
/// optional `[ seconds]` stamp), so no text a workload gets the kernel to print inside a line
/// (a process name in a segfault report, say) counts.
fn is_kernel_panic(line: &str) -> bool {
    let message = match line.strip_prefix('[') {
        Some(stamped) => stamped.split_once("] ").map_or("", |(_, rest)| rest),
        None => line,
    };
    message.starts_with("Kernel panic - not syncing")
}

/// The console log file: the first [`LOG_LIMIT`] bytes of the console, then a note that it
/// was cut; every byte also goes to the [`Console`].
#[derive(Debug)]
pub struct BoundedLog {
    log: File,
    console: Console,
    logged: u64,
    cut: bool,
}

impl BoundedLog {
    /// A log writing into `log` and feeding `console`.
    pub fn new(log: File, console: Console) -> Self {
        BoundedLog {
            log,
            console,
            logged: 0,
            cut: false,
        }
    }

    /// Records console bytes.
    pub fn record(&mut self, bytes: &[u8]) {
        self.console.feed(bytes);
        let room = LOG_LIMIT.saturating_sub(self.logged);
        let take = (bytes.len() as u64).min(room) as usize;
        if take > 0 && self.log.write_all(&bytes[..take]).is_ok() {
            self.logged += take as u64;
        }
        if take < bytes.len() && !self.cut {
            self.cut = true;
            let _ = writeln!(self.log, "\n[mvm: console log cut at {LOG_LIMIT} bytes]");
        }
    }
}

/// The own VMM's console writer (`mvm_vmm::VmConfig::console_log`): every write recorded.
impl Write for BoundedLog {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.record(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.log.flush()
    }
}

/// Copies `source` (the backend's console output) into `log` up to [`LOG_LIMIT`] bytes and
/// into `console`, on a thread of its own, until end of file.
pub fn record(
    mut source: impl Read + Send + 'static,
    log: File,
    console: Console,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("serial".into())
        .spawn(move || {
            let mut buffer = [0; 8192];
            let mut log = BoundedLog::new(log, console);
            loop {
                let n = match source.read(&mut buffer) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => return,
                };
                log.record(&buffer[..n]);
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_agent_error_is_kept_however_the_bytes_arrive() {
        let console = Console::default();
        let text = "[    1.0] boot\r\nmvm-agent: error AGENT007 integrity: /bin/sh: EIO\nmvm-agent: error AGENT001 later\n";
        for chunk in text.as_bytes().chunks(3) {
            console.feed(chunk);
        }
        let failure = console.agent_failure().unwrap();
        assert_eq!(failure.code, "AGENT007");
        assert!(failure.line.ends_with("/bin/sh: EIO"));
        assert!(!console.kernel_panicked());
    }

    #[test]
    fn lookalikes_are_not_agent_errors_and_panics_are_seen() {
        let console = Console::default();
        console.feed(b"mvm-agent: error AGENTXYZ no\nmvm-agent: error AGENT0071 no\n");
        console.feed(b"[ 1.0] process 'mvm-agent: error AGENT007 x' started\n");
        console.feed(b"Kernel panic - not syncing: Attempted to kill init!\n");
        assert_eq!(console.agent_failure(), None);
        assert!(console.kernel_panicked());
    }

    #[test]
    fn only_the_kernels_own_panic_line_is_a_panic() {
        for line in [
            "Kernel panic - not syncing: Attempted to kill init!",
            "[    2.301234] Kernel panic - not syncing: VFS: Unable to mount root fs",
        ] {
            let console = Console::default();
            console.feed(format!("{line}\n").as_bytes());
            assert!(console.kernel_panicked(), "{line}");
        }
        let console = Console::default();
        console.feed(b"[   9.1] Kernel panic[812]: segfault at 0 ip 0 sp 0 error 4\n");
        console.feed(b"audit: comm=\"Kernel panic - not syncing\"\n");
        console.feed(b"Kernel panic: a lookalike\n");
        assert!(!console.kernel_panicked());
    }

    #[test]
    fn a_woken_guest_makes_no_boot_report() {
        let console = Console::default();
        console.boot_is_over();
        console.feed(b"mvm-agent: error AGENT007 printed after a wake\n");
        assert_eq!(console.agent_failure(), None);
    }

    #[test]
    fn nothing_after_the_boot_counts_as_a_boot_failure() {
        let console = Console::default();
        console.feed(b"mvm-agent: root ready ab\nmvm-agent: channel ready, boot ms x\n");
        console.feed(b"mvm-agent: error AGENT007 printed by a workload through the kernel\n");
        assert_eq!(console.agent_failure(), None);
    }

    #[test]
    fn the_tail_and_the_log_are_bounded() {
        let console = Console::default();
        console.feed(&vec![b'x'; 3 * TAIL_LIMIT]);
        console.feed(b"end");
        let tail = console.tail();
        assert_eq!(tail.len(), TAIL_LIMIT);
        assert!(tail.ends_with("xend"));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        let flood = io::repeat(b'y').take(LOG_LIMIT + 100_000);
        record(flood, File::create(&path).unwrap(), Console::default())
            .unwrap()
            .join()
            .unwrap();
        let log = std::fs::read(&path).unwrap();
        assert!(log.len() as u64 <= LOG_LIMIT + 100);
        assert!(String::from_utf8_lossy(&log[log.len() - 60..]).contains("log cut"));
    }
}
