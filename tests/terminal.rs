//! `mvm shell` and `mvm exec -t` end to end, driven the way a person drives them: through a
//! real pseudo-terminal on the host, made by this test, whose session `mvm` leads — so the
//! host kernel's line discipline, raw mode, `SIGWINCH` and all are the real ones. The guest is
//! a real Linux VM (QEMU), its shell busybox's `ash`.
//!
//! One `dev` VM serves the session tests (the `dev` profile grants a terminal); a `standard`
//! one is there to be refused.

mod support;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rustix::pty::OpenptFlags;
use rustix::termios::{Termios, Winsize};

use support::guest;

const APPLETS: &[&str] = &["sh", "tty", "stty", "sleep", "echo", "kill", "id", "cat"];

struct Fixture {
    _dir: tempfile::TempDir,
    home: PathBuf,
    image: String,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let (dir, home, image) = guest::home_and_busybox(APPLETS);
        Fixture {
            _dir: dir,
            home,
            image,
        }
    })
}

/// A VM `name` of the fixture's image under `profile`, removed when dropped.
fn up(name: &'static str, profile: &str) -> guest::RemoveOnDrop<'static> {
    let fixture = fixture();
    let args = ["up", &fixture.image, "--name", name, "--profile", profile];
    guest::mvm_json(&fixture.home, &args, 0);
    guest::RemoveOnDrop {
        home: &fixture.home,
        name,
    }
}

/// `mvm ARGS` on a pseudo-terminal of its own, as its controlling terminal: what a person at
/// a terminal starts.
struct Session {
    manager: File,
    child: Child,
    /// Everything the terminal showed so far.
    seen: Vec<u8>,
    /// Where the last [`Session::expect`] matched: the next one looks past it.
    mark: usize,
    /// The terminal's settings before `mvm` started.
    cooked: Termios,
}

impl Session {
    fn start(args: &[&str], size: (u16, u16)) -> Session {
        let flags = OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC;
        let manager = rustix::pty::openpt(flags).unwrap();
        rustix::pty::grantpt(&manager).unwrap();
        rustix::pty::unlockpt(&manager).unwrap();
        let replica = rustix::pty::ioctl_tiocgptpeer(&manager, flags).unwrap();
        resize(&manager, size);
        let cooked = rustix::termios::tcgetattr(&replica).unwrap();
        let stdio = || Stdio::from(replica.try_clone().unwrap());
        let mut command = guest::command(&fixture().home, args);
        command
            .env("TERM", "xterm-256color")
            .stdin(stdio())
            .stdout(stdio())
            .stderr(stdio());
        // SAFETY: `setsid` and `TIOCSCTTY` are two system calls that allocate nothing, as code
        // between fork and exec must; stdin is the replica by then.
        #[allow(unsafe_code)]
        unsafe {
            command.pre_exec(|| {
                rustix::process::setsid()?;
                Ok(rustix::process::ioctl_tiocsctty(rustix::stdio::stdin())?)
            });
        }
        let child = command.spawn().unwrap();
        drop(command);
        drop(replica);
        rustix::io::ioctl_fionbio(&manager, true).unwrap();
        Session {
            manager: File::from(manager),
            child,
            seen: Vec::new(),
            mark: 0,
            cooked,
        }
    }

    /// Types `keys`.
    fn send(&mut self, keys: &str) {
        self.manager.write_all(keys.as_bytes()).unwrap();
    }

    /// Reads what the terminal shows until it shows `needle` (past the last match), within 30 s.
    fn expect(&mut self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let found = memchr::memmem::find(&self.seen[self.mark..], needle.as_bytes());
            if let Some(at) = found {
                self.mark += at + needle.len();
                return;
            }
            assert!(
                Instant::now() < deadline && self.read_some(),
                "the terminal never showed {needle:?}; it showed:\n{}",
                String::from_utf8_lossy(&self.seen)
            );
        }
    }

    /// Reads what there is, waiting up to 100 ms; false once the terminal's other side is gone.
    fn read_some(&mut self) -> bool {
        let mut poll = [rustix::event::PollFd::new(
            &self.manager,
            rustix::event::PollFlags::IN,
        )];
        let wait = rustix::event::Timespec::try_from(Duration::from_millis(100)).unwrap();
        let _ = rustix::event::poll(&mut poll, Some(&wait));
        let mut buffer = [0; 4096];
        match self.manager.read(&mut buffer) {
            Ok(0) => false,
            Ok(n) => {
                self.seen.extend_from_slice(&buffer[..n]);
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => true,
            // EIO: every process holding the replica has ended.
            Err(_) => false,
        }
    }

    /// Waits for `mvm` to end (reading what it still prints); its exit status, and whether
    /// the terminal's settings are as they were before it started.
    fn end(mut self) -> (Option<i32>, bool, String) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "mvm did not end; the terminal showed:\n{}",
                String::from_utf8_lossy(&self.seen)
            );
            self.read_some();
        };
        let now = rustix::termios::tcgetattr(&self.manager).unwrap();
        let restored = now.local_modes == self.cooked.local_modes
            && now.input_modes == self.cooked.input_modes
            && now.output_modes == self.cooked.output_modes;
        let seen = String::from_utf8_lossy(&self.seen).into_owned();
        (status.code(), restored, seen)
    }
}

fn resize(manager: &impl AsFd, (rows, cols): (u16, u16)) {
    let size = Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    rustix::termios::tcsetwinsize(manager, size).unwrap();
}

#[test]
fn a_shell_on_a_terminal_behaves_as_a_terminal_and_gives_the_terminal_back() {
    let _vm = up("term", "dev");
    let mut shell = Session::start(&["shell", "term"], (30, 100));
    // Values the shell computes, so that the typed line's echo never matches.
    shell.send("echo ready-$((40+2))\r");
    shell.expect("ready-42");
    shell.send("tty; id -u\r");
    shell.expect("/dev/pts/");
    shell.expect("1000");
    shell.send("stty size; echo term=$TERM.\r");
    shell.expect("30 100");
    shell.expect("term=xterm-256color.");

    // A resize of this terminal reaches the guest's: the kernel signals `mvm`, `mvm` tells
    // the agent, the agent sets the guest terminal's size.
    resize(&shell.manager, (41, 123));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        shell.send("echo rows-$(stty size | tr ' ' x)-end\r");
        shell.expect("-end");
        let tail = String::from_utf8_lossy(&shell.seen[shell.mark.saturating_sub(40)..]);
        if tail.contains("rows-41x123-end") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the guest's terminal did not follow the resize"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Ctrl-C interrupts the foreground job, not the shell; Ctrl-Z stops it.
    shell.send("sleep 300\r");
    std::thread::sleep(Duration::from_millis(500));
    shell.send("\x03");
    shell.send("echo after-$((2+3))\r");
    shell.expect("after-5");
    shell.send("sleep 300\r");
    std::thread::sleep(Duration::from_millis(500));
    shell.send("\x1a");
    shell.expect("Stopped");
    shell.send("kill -9 %1; echo killed-$((3+4))\r");
    shell.expect("killed-7");

    shell.send("exit 3\r");
    let (status, restored, seen) = shell.end();
    assert_eq!(status, Some(3), "{seen}");
    assert!(restored, "the host terminal was left changed:\n{seen}");
}

#[test]
fn a_terminal_outlives_no_vm_and_is_refused_where_the_plan_grants_none() {
    let vm = up("term-gone", "dev");
    // Ctrl-D at the start of a line: the guest terminal's end of input, at which `cat` ends.
    let mut cat = Session::start(&["exec", "-t", "term-gone", "--", "cat"], (24, 80));
    cat.send("typed\r");
    cat.expect("typed\r\n"); // the guest terminal's echo
    cat.expect("typed\r\n"); // what cat wrote back
    cat.send("\x04");
    let (status, restored, seen) = cat.end();
    assert_eq!(status, Some(0), "{seen}");
    assert!(restored, "the host terminal was left changed:\n{seen}");

    // `mvm` told to end (as when its terminal closes): the command gets the hangup a shell
    // ends on, and `mvm` gives the terminal back.
    let mut shell = Session::start(&["exec", "-t", "term-gone", "--", "sh"], (24, 80));
    shell.send("echo on-$((4+4))\r");
    shell.expect("on-8");
    let pid = rustix::process::Pid::from_child(&shell.child);
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let (status, restored, seen) = shell.end();
    assert_eq!(status, Some(129), "SIGHUP ended the shell: {seen}");
    assert!(restored, "the host terminal was left changed:\n{seen}");

    // The VM goes away under a session: `mvm` ends, the terminal is given back.
    let mut shell = Session::start(&["exec", "-t", "term-gone", "--", "sh"], (24, 80));
    shell.send("echo up-$((5+5))\r");
    shell.expect("up-10");
    guest::mvm_json(&fixture().home, &["rm", "--force", "term-gone"], 0);
    let (status, restored, seen) = shell.end();
    assert_ne!(status, Some(0), "{seen}");
    assert!(restored, "the host terminal was left changed:\n{seen}");
    drop(vm);

    // A standard plan grants no terminal: refused before anything runs.
    let _standard = up("no-term", "standard");
    let shell = Session::start(&["exec", "-t", "no-term", "--", "sh"], (24, 80));
    let (status, restored, seen) = shell.end();
    assert_ne!(status, Some(0), "{seen}");
    assert!(restored, "the host terminal was left changed:\n{seen}");
    // Said once the terminal was given back: its line ends as a cooked terminal ends lines.
    let said = &seen[seen.find("AGENT120").unwrap_or_else(|| panic!("{seen:?}"))..];
    assert!(said.contains("\r\n"), "said while raw: {said:?}");
    // As `mvm shell` is.
    let shell = Session::start(&["shell", "no-term"], (24, 80));
    let (status, _, seen) = shell.end();
    assert_ne!(status, Some(0), "{seen}");
    assert!(seen.contains("AGENT120"), "{seen}");
}
