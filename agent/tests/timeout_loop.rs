//! The agent under the races that once left it without an answer: commands killed at their
//! timeout together with what they started, commands that close their pipes before the kill,
//! and commands whose leftovers hold their pipes after they exit — hundreds of times, on a
//! machine whose every core is kept busy, with the agent reaping orphans as PID 1 does (this
//! test process is their subreaper). Alone in its binary: it reaps every child of the process.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mvm_agent::serve::{Ended, ServeConfig};
use mvm_protocol::{ExecRequest, ExitStatus, FrameKind, Request, Response};
use support::{Agent, SILENCE};

/// Rounds of the loop; each runs every scenario once, at the same time.
const ROUNDS: u32 = 200;

struct Scenario {
    name: &'static str,
    script: &'static str,
    /// The timeout of round `round`, in milliseconds.
    timeout_ms: fn(u32) -> u64,
    status: ExitStatus,
    stdout: &'static [u8],
}

/// Timeouts from 1 ms up: the kill lands anywhere from before `sh` forks to long after.
fn short(round: u32) -> u64 {
    u64::from(1 + (round * 7) % 120)
}

fn long(_: u32) -> u64 {
    60_000
}

const SCENARIOS: [Scenario; 3] = [
    Scenario {
        name: "killed at its timeout with what it started",
        script: "sleep 30 & sleep 30",
        timeout_ms: short,
        status: ExitStatus::TimedOut,
        stdout: b"",
    },
    Scenario {
        name: "pipes closed before the kill",
        script: "exec >/dev/null 2>&1 </dev/null; sleep 30 & sleep 30",
        timeout_ms: short,
        status: ExitStatus::TimedOut,
        stdout: b"",
    },
    Scenario {
        name: "leftovers holding the pipes after the exit",
        script: "sleep 30 & echo started",
        timeout_ms: long,
        status: ExitStatus::Exited { code: 0 },
        stdout: b"started\n",
    },
];

/// Keeps every core busy until dropped.
struct BusyCores(Arc<AtomicBool>);

impl BusyCores {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        for _ in 0..cores {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            });
        }
        Self(stop)
    }
}

impl Drop for BusyCores {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// This process's children that have ended and are not reaped.
fn zombie_children() -> Vec<String> {
    let me = std::process::id().to_string();
    let mut zombies = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid …; comm may hold spaces, so read after its last ')'.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.first() == Some(&"Z") && fields.get(1) == Some(&me.as_str()) {
            zombies.push(format!("{head})"));
        }
    }
    zombies
}

#[test]
fn every_command_is_answered_and_reaped_through_hundreds_of_timeout_and_leftover_races() {
    rustix::process::set_child_subreaper(Some(rustix::process::getpid())).unwrap();
    let busy = BusyCores::start();
    let mut agent = Agent::start(ServeConfig {
        reap_orphans: true,
        ..ServeConfig::on_host()
    });
    let mut slowest = vec![Duration::ZERO; SCENARIOS.len()];
    let started = Instant::now();
    for round in 0..ROUNDS {
        let mut pending = HashMap::new();
        for (index, scenario) in SCENARIOS.iter().enumerate() {
            let stream = round * SCENARIOS.len() as u32 + index as u32 + 1;
            let exec = ExecRequest {
                argv: vec!["sh".into(), "-c".into(), scenario.script.into()],
                env: BTreeMap::new(),
                cwd: None,
                timeout_ms: (scenario.timeout_ms)(round),
                stdin: false,
                user: None,
                tty: None,
            };
            agent.send(stream, &Request::Exec(exec));
            pending.insert(stream, (index, Instant::now(), Vec::new()));
        }
        while !pending.is_empty() {
            let frame = agent.frame();
            let Some((_, _, stdout)) = pending.get_mut(&frame.stream) else {
                panic!("round {round}: a frame on stream {}", frame.stream);
            };
            match frame.kind {
                FrameKind::Stdout => stdout.extend(frame.payload),
                FrameKind::Stderr => {}
                FrameKind::Response => {
                    let (index, sent, stdout) = pending.remove(&frame.stream).unwrap();
                    let scenario = &SCENARIOS[index];
                    let answer: Response = serde_json::from_slice(&frame.payload).unwrap();
                    let Response::Exec(reply) = answer else {
                        panic!("round {round}, {}: {answer:?}", scenario.name);
                    };
                    assert_eq!(
                        reply.status, scenario.status,
                        "round {round}, {}",
                        scenario.name
                    );
                    assert_eq!(stdout, scenario.stdout, "round {round}, {}", scenario.name);
                    slowest[index] = slowest[index].max(sent.elapsed());
                }
                kind => panic!("round {round}: a {kind:?} frame"),
            }
        }
    }
    let took = started.elapsed();
    drop(busy);

    // Orphans are reaped as the loop turns: each echo is a turn.
    let deadline = Instant::now() + SILENCE;
    let mut zombies = zombie_children();
    while !zombies.is_empty() {
        assert!(
            Instant::now() < deadline,
            "children left unreaped: {zombies:?}"
        );
        agent.send(u32::MAX - 1, &Request::Echo);
        assert_eq!(agent.frame().kind, FrameKind::Response);
        std::thread::sleep(Duration::from_millis(50));
        zombies = zombie_children();
    }
    agent.send(u32::MAX, &Request::PowerOff);
    assert_eq!(agent.frame().kind, FrameKind::Response);
    assert_eq!(agent.ended().unwrap(), Ended::PowerOff);

    for (scenario, slowest) in SCENARIOS.iter().zip(&slowest) {
        eprintln!(
            "timeout loop: {ROUNDS} × {}: slowest answer {slowest:?}",
            scenario.name
        );
    }
    eprintln!("timeout loop: {ROUNDS} rounds in {took:?}, every core busy");
}
