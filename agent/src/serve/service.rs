//! The plan's services, supervised: each a spawned command whose output goes to a bounded
//! log, started again after it ends as its policy says (with a back-off that doubles up to
//! [`MAX_BACKOFF`], and at most its `max_restarts` times), and the app's health probe, run on
//! its interval.
//!
//! The agent's loop does the starting (a service is a spawned command like any other, in
//! its own process group and cgroup, under the workload's syscall filter); this module keeps
//! the books and says what is due.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::rc::Rc;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

use mvm_protocol::service::{
    is_service_name, Health, HealthInfo, HealthSpec, LogSlice, Probe, Restart, ServiceInfo,
    ServiceSpec, ServiceState, ServicesReport, StartServices, MAX_SERVICES, PROBE_OUTPUT_BYTES,
    SERVICE_LOG_BYTES,
};
use mvm_protocol::{codes, ErrorReply, ExecRequest, ExitStatus};

/// The first wait before a service is started again.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait before a service is started again.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A service that ran this long before it ended starts again after [`FIRST_BACKOFF`].
const STABLE_RUN: Duration = Duration::from_secs(10);
/// Between probes while the app has not been healthy yet.
const STARTING_INTERVAL: Duration = Duration::from_secs(1);

/// A service's output, the last [`SERVICE_LOG_BYTES`] of it, addressed by offsets that count
/// every byte it ever wrote.
#[derive(Debug, Default)]
pub struct LogRing {
    bytes: VecDeque<u8>,
    /// The offset of the first byte kept.
    start: u64,
}

impl LogRing {
    /// Appends output, forgetting the oldest beyond the limit.
    pub fn push(&mut self, bytes: &[u8]) {
        self.bytes.extend(bytes);
        let excess = self.bytes.len().saturating_sub(SERVICE_LOG_BYTES);
        self.bytes.drain(..excess);
        self.start += excess as u64;
    }

    /// The offset one past the last byte written.
    pub fn end(&self) -> u64 {
        self.start + self.bytes.len() as u64
    }

    /// The bytes from `offset` on and how many before them are gone; an offset past the end
    /// reads nothing.
    pub fn read_from(&self, offset: u64) -> (Vec<u8>, u64) {
        let skipped = self.start.saturating_sub(offset);
        let from = offset.max(self.start).min(self.end());
        let at = (from - self.start) as usize;
        (self.bytes.range(at..).copied().collect(), skipped)
    }
}

/// A log shared by a service and the process running for it.
pub type SharedLog = Rc<RefCell<LogRing>>;

/// One service and its books.
struct Service {
    spec: ServiceSpec,
    state: ServiceState,
    /// The handle and pid of its process while one runs.
    process: Option<(u64, u32)>,
    started: Instant,
    restarts: u32,
    backoff: Duration,
    /// When it is to be started (again).
    start_at: Option<Instant>,
    last_exit: Option<ExitStatus>,
    error: Option<String>,
    log: SharedLog,
}

impl Service {
    fn info(&self) -> ServiceInfo {
        ServiceInfo {
            name: self.spec.name.clone(),
            state: self.state,
            pid: self.process.map(|(_, pid)| pid),
            handle: self.process.map(|(handle, _)| handle),
            running_ms: self
                .process
                .map(|_| self.started.elapsed().as_millis() as u64),
            restarts: self.restarts,
            last_exit: self.last_exit,
            error: self.error.clone(),
        }
    }

    /// Whether it has stopped for good.
    fn is_over(&self) -> bool {
        matches!(self.state, ServiceState::Stopped | ServiceState::Failed)
    }

    fn note(&self, line: &str) {
        self.log
            .borrow_mut()
            .push(format!("[mvm] {line}\n").as_bytes());
    }
}

/// What the loop is to start now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Due {
    /// The service at this index, with its request.
    Service(usize, ExecRequest),
    /// A command probe.
    CommandProbe(ExecRequest),
}

/// The app's probe and its verdict.
struct Prober {
    spec: HealthSpec,
    begun: Instant,
    info: HealthInfo,
    next: Instant,
    /// A command probe's handle while it runs; `Some(None)` for a connection probe.
    in_flight: Option<Option<u64>>,
    /// Connection probes answer here, each followed by a byte on `wake`.
    results: Receiver<Result<String, String>>,
    sender: Sender<Result<String, String>>,
    wake: (OwnedFd, OwnedFd),
}

/// Every service of the VM, and its probe.
#[derive(Default)]
pub struct Services {
    list: Vec<Service>,
    prober: Option<Prober>,
    generation: u64,
    begun: bool,
}

impl Services {
    /// Takes the services to start (once): each is due at once.
    pub fn begin(&mut self, request: StartServices, now: Instant) -> Result<(), ErrorReply> {
        if self.begun {
            return Err(refusal(
                codes::NO_SUCH_SERVICE,
                "the services were started already",
            ));
        }
        if request.services.len() > MAX_SERVICES {
            let message = format!("at most {MAX_SERVICES} services");
            return Err(refusal(codes::BAD_REQUEST, &message));
        }
        for (i, spec) in request.services.iter().enumerate() {
            let repeated = request.services[..i].iter().any(|s| s.name == spec.name);
            if !is_service_name(&spec.name) || repeated {
                let message = format!("{:?} cannot name a service (or names two)", spec.name);
                return Err(refusal(codes::BAD_REQUEST, &message));
            }
            if spec.exec.stdin || spec.exec.tty.is_some() {
                let message = "a service has no standard input or terminal";
                return Err(refusal(codes::BAD_REQUEST, message));
            }
            if let Some(problem) = spec.exec.problem() {
                return Err(refusal(codes::BAD_REQUEST, &problem));
            }
        }
        if let Some(health) = &request.health {
            if let Some(problem) = health.probe.problem() {
                return Err(refusal(codes::BAD_REQUEST, &problem));
            }
            if health.interval_ms == 0 || health.timeout_ms == 0 || health.retries == 0 {
                let message = "a probe's interval, timeout and retries must not be 0";
                return Err(refusal(codes::BAD_REQUEST, message));
            }
        }
        let wake = request
            .health
            .as_ref()
            .map(|_| {
                rustix::pipe::pipe_with(
                    rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK,
                )
            })
            .transpose()
            .map_err(|e| refusal(codes::SPAWN_FAILED, &format!("a pipe for the probe: {e}")))?;
        self.begun = true;
        self.generation += 1;
        self.list = request
            .services
            .into_iter()
            .map(|spec| Service {
                spec,
                state: ServiceState::Restarting,
                process: None,
                started: now,
                restarts: 0,
                backoff: FIRST_BACKOFF,
                start_at: Some(now),
                last_exit: None,
                error: None,
                log: SharedLog::default(),
            })
            .collect();
        if let (Some(spec), Some(wake)) = (request.health, wake) {
            let (sender, results) = mpsc::channel();
            self.prober = Some(Prober {
                spec,
                begun: now,
                info: HealthInfo {
                    status: Health::Starting,
                    failures: 0,
                    probes: 0,
                    last_output: String::new(),
                },
                next: now,
                in_flight: None,
                results,
                sender,
                wake,
            });
        }
        Ok(())
    }

    /// The report's generation: it grows with every change a watcher would want to see.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The services and the health verdict.
    pub fn report(&self) -> ServicesReport {
        ServicesReport {
            generation: self.generation,
            services: self.list.iter().map(Service::info).collect(),
            health: self.prober.as_ref().map(|p| p.info.clone()),
        }
    }

    /// What is due to be started now; a connection probe that is due is started here, on a
    /// thread of its own.
    pub fn due(&mut self, now: Instant) -> Vec<Due> {
        let mut due = Vec::new();
        for (index, service) in self.list.iter_mut().enumerate() {
            if service.start_at.is_some_and(|at| at <= now) {
                service.start_at = None;
                due.push(Due::Service(index, service.spec.exec.clone()));
            }
        }
        if let Some(prober) = self.prober.as_mut() {
            if prober.in_flight.is_none() && prober.next <= now {
                match &prober.spec.probe {
                    Probe::Command { exec } => {
                        let mut exec = exec.clone();
                        exec.timeout_ms = prober.spec.timeout_ms;
                        due.push(Due::CommandProbe(exec));
                        // Its handle is given when it started.
                        prober.in_flight = Some(None);
                    }
                    probe => {
                        let probe = probe.clone();
                        let timeout = Duration::from_millis(prober.spec.timeout_ms);
                        let sender = prober.sender.clone();
                        let wake = prober.wake.1.try_clone();
                        prober.in_flight = Some(None);
                        std::thread::spawn(move || {
                            let _ = sender.send(connect_probe(&probe, timeout));
                            if let Ok(wake) = wake {
                                let _ = rustix::io::write(wake, &[1]);
                            }
                        });
                    }
                }
            }
        }
        due
    }

    /// The log a service's process writes to.
    pub fn log(&self, index: usize) -> SharedLog {
        Rc::clone(&self.list[index].log)
    }

    /// A due service was started (with its handle and pid), or could not be: a program that
    /// cannot start will not start later either, so it is not tried again.
    pub fn started(&mut self, index: usize, outcome: Result<(u64, u32), ErrorReply>, now: Instant) {
        let service = &mut self.list[index];
        match outcome {
            Ok((handle, pid)) => {
                service.state = ServiceState::Running;
                service.process = Some((handle, pid));
                service.started = now;
                service.error = None;
                service.note(&format!("started (pid {pid})"));
            }
            Err(error) => {
                service.state = ServiceState::Failed;
                let message = format!("{}: {}", error.code, error.message);
                service.note(&format!("could not start: {message}"));
                service.error = Some(message);
            }
        }
        self.generation += 1;
    }

    /// A command probe started with `handle`, or could not start (a failed probe).
    pub fn probe_started(&mut self, outcome: Result<u64, ErrorReply>, now: Instant) {
        match outcome {
            Ok(handle) => {
                if let Some(prober) = self.prober.as_mut() {
                    prober.in_flight = Some(Some(handle));
                }
            }
            Err(error) => {
                let message = format!("{}: {}", error.code, error.message);
                self.probed(Err(message), now);
            }
        }
    }

    /// Whether `handle` is a service's or the probe's process: its end is this module's.
    pub fn owns(&self, handle: u64) -> bool {
        self.is_probe(handle)
            || self
                .list
                .iter()
                .any(|s| s.process.map(|p| p.0) == Some(handle))
    }

    /// Whether `handle` is the running command probe's.
    pub fn is_probe(&self, handle: u64) -> bool {
        self.prober
            .as_ref()
            .is_some_and(|p| p.in_flight == Some(Some(handle)))
    }

    /// A process of this module's ended: a service is set to start again (or not), a probe
    /// gives its verdict.
    pub fn ended(&mut self, handle: u64, status: ExitStatus, output: &[u8], now: Instant) {
        if self.is_probe(handle) {
            let text = clip(&String::from_utf8_lossy(output));
            let verdict = match status {
                ExitStatus::Exited { code: 0 } => Ok(text),
                ExitStatus::TimedOut => Err(format!("timed out; {text}")),
                other => Err(format!("{}; {text}", describe(other))),
            };
            return self.probed(verdict, now);
        }
        let Some(service) = self
            .list
            .iter_mut()
            .find(|s| s.process.map(|p| p.0) == Some(handle))
        else {
            return;
        };
        service.process = None;
        service.last_exit = Some(status);
        if now.duration_since(service.started) >= STABLE_RUN {
            service.backoff = FIRST_BACKOFF;
        }
        let wanted = match service.spec.restart {
            Restart::Never => false,
            Restart::OnFailure => status != ExitStatus::Exited { code: 0 },
            Restart::Always => true,
        };
        let ended = describe(status);
        if wanted && service.restarts < service.spec.max_restarts {
            service.state = ServiceState::Restarting;
            service.start_at = Some(now + service.backoff);
            service.restarts += 1;
            let wait = service.backoff;
            service.note(&format!("{ended}; starting again in {} s", wait.as_secs()));
            service.backoff = (service.backoff * 2).min(MAX_BACKOFF);
        } else if wanted {
            service.state = ServiceState::Failed;
            let limit = service.spec.max_restarts;
            service.note(&format!("{ended}; not started again: {limit} restarts"));
        } else {
            service.state = ServiceState::Stopped;
            service.note(&format!("{ended}; not started again (restart policy)"));
        }
        self.generation += 1;
    }

    /// Takes the connection probes' results that came in.
    pub fn collect(&mut self, now: Instant) {
        let Some(prober) = self.prober.as_mut() else {
            return;
        };
        let mut drained = [0u8; 16];
        while matches!(rustix::io::read(&prober.wake.0, &mut drained), Ok(n) if n > 0) {}
        let results: Vec<_> = prober.results.try_iter().collect();
        for result in results {
            self.probed(result, now);
        }
    }

    fn probed(&mut self, result: Result<String, String>, now: Instant) {
        let Some(prober) = self.prober.as_mut() else {
            return;
        };
        prober.in_flight = None;
        let info = &mut prober.info;
        let before = info.status;
        info.probes += 1;
        match result {
            Ok(output) => {
                info.last_output = output;
                info.failures = 0;
                info.status = Health::Healthy;
            }
            Err(output) => {
                info.last_output = output;
                // While it starts, failures do not count (until its first pass).
                let starting =
                    now < prober.begun + Duration::from_millis(prober.spec.start_period_ms);
                if !(starting && info.status == Health::Starting) {
                    info.failures += 1;
                }
                if info.failures >= prober.spec.retries {
                    info.status = Health::Unhealthy;
                }
            }
        }
        let interval = Duration::from_millis(prober.spec.interval_ms);
        prober.next = now
            + match info.status {
                Health::Starting => STARTING_INTERVAL.min(interval),
                _ => interval,
            };
        if info.status != before {
            self.generation += 1;
        }
    }

    /// The earliest moment something is due.
    pub fn next_deadline(&self) -> Option<Instant> {
        let starts = self.list.iter().filter_map(|s| s.start_at);
        let probe = self
            .prober
            .as_ref()
            .filter(|p| p.in_flight.is_none())
            .map(|p| p.next);
        starts.chain(probe).min()
    }

    /// The descriptor that becomes readable when a connection probe has answered.
    pub fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        self.prober.as_ref().map(|p| p.wake.0.as_fd())
    }

    /// Whether a reader at `offset` of service `name`'s log has something to be told: output
    /// past it, or the end of the service; `None` when there is no such service.
    pub fn log_moved(&self, name: &str, offset: u64) -> Option<bool> {
        let service = self.list.iter().find(|s| s.spec.name == name)?;
        Some(service.log.borrow().end() > offset || service.is_over())
    }

    /// A service's log from `offset` on, or `None` when there is no such service.
    pub fn read_log(&self, name: &str, offset: u64) -> Option<(Vec<u8>, LogSlice)> {
        let service = self.list.iter().find(|s| s.spec.name == name)?;
        let log = service.log.borrow();
        let (bytes, skipped) = log.read_from(offset);
        let slice = LogSlice {
            // The kept log is never more than one answer carries: it is read to its end.
            next_offset: log.end(),
            skipped,
            ended: service.is_over(),
        };
        Some((bytes, slice))
    }
}

fn refusal(code: &str, message: &str) -> ErrorReply {
    ErrorReply {
        code: code.into(),
        message: message.into(),
    }
}

/// How a process ended, in words.
fn describe(status: ExitStatus) -> String {
    match status {
        ExitStatus::Exited { code } => format!("exited with {code}"),
        ExitStatus::Signaled { signal } => format!("killed by signal {signal}"),
        ExitStatus::TimedOut => "timed out".into(),
    }
}

/// At most [`PROBE_OUTPUT_BYTES`] of `text`, its end kept (where errors are).
fn clip(text: &str) -> String {
    let mut from = text.len().saturating_sub(PROBE_OUTPUT_BYTES);
    while !text.is_char_boundary(from) {
        from += 1;
    }
    text[from..].to_string()
}

/// Runs a TCP or HTTP probe against the guest's loopback, within `timeout` in all.
fn connect_probe(probe: &Probe, timeout: Duration) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    let port = match probe {
        Probe::Tcp { port } | Probe::Http { port, .. } => *port,
        Probe::Command { .. } => return Err("not a connection probe".into()),
    };
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&address, timeout)
        .map_err(|e| format!("connecting to {address}: {e}"))?;
    let Probe::Http { path, .. } = probe else {
        return Ok(format!("connected to {address}"));
    };
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: mvm-health\r\nConnection: close\r\n\r\n"
    );
    stream
        .set_write_timeout(Some(left()))
        .and_then(|()| stream.write_all(request.as_bytes()))
        .map_err(|e| format!("sending GET {path}: {e}"))?;
    let mut answer = Vec::new();
    let mut buffer = [0u8; 1024];
    while !answer.contains(&b'\n') && answer.len() < PROBE_OUTPUT_BYTES {
        stream
            .set_read_timeout(Some(left()))
            .map_err(|e| e.to_string())?;
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buffer[..n]),
            Err(e) => return Err(format!("reading the answer to GET {path}: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&answer);
    let status_line = text.lines().next().unwrap_or_default().trim().to_string();
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse::<u16>().ok());
    match status {
        Some(code) if (200..400).contains(&code) => Ok(status_line),
        Some(_) => Err(status_line),
        None => Err(format!("not an HTTP answer: {:?}", clip(&status_line))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_keeps_its_end_and_counts_what_it_forgot() {
        let mut log = LogRing::default();
        log.push(b"hello ");
        assert_eq!(log.read_from(0), (b"hello ".to_vec(), 0));
        assert_eq!(log.read_from(3), (b"lo ".to_vec(), 0));
        assert_eq!(log.read_from(99), (Vec::new(), 0));
        log.push(&vec![b'x'; SERVICE_LOG_BYTES]);
        assert_eq!(log.end(), 6 + SERVICE_LOG_BYTES as u64);
        let (bytes, skipped) = log.read_from(0);
        assert_eq!(skipped, 6);
        assert_eq!(bytes.len(), SERVICE_LOG_BYTES);
        assert!(bytes.iter().all(|&b| b == b'x'));
    }

    fn spec(restart: Restart, max_restarts: u32) -> StartServices {
        StartServices {
            services: vec![ServiceSpec {
                name: "web".into(),
                exec: ExecRequest {
                    argv: vec!["true".into()],
                    env: Default::default(),
                    cwd: None,
                    timeout_ms: 0,
                    stdin: false,
                    user: None,
                    tty: None,
                },
                restart,
                max_restarts,
            }],
            health: None,
        }
    }

    #[test]
    fn a_failing_service_backs_off_then_fails_at_its_limit() {
        let now = Instant::now();
        let mut services = Services::default();
        services.begin(spec(Restart::OnFailure, 2), now).unwrap();
        assert!(services.begin(spec(Restart::OnFailure, 2), now).is_err());
        let mut at = now;
        let mut waits = Vec::new();
        for handle in 1..=3 {
            let due = services.due(at);
            assert!(matches!(due.as_slice(), [Due::Service(0, _)]), "{due:?}");
            services.started(0, Ok((handle, 100 + handle as u32)), at);
            assert!(services.owns(handle));
            services.ended(handle, ExitStatus::Exited { code: 1 }, b"", at);
            if let Some(next) = services.next_deadline() {
                waits.push(next - at);
                at = next;
            }
        }
        assert_eq!(waits, [Duration::from_secs(1), Duration::from_secs(2)]);
        let report = services.report();
        assert_eq!(report.services[0].state, ServiceState::Failed);
        assert_eq!(report.services[0].restarts, 2);
        let (log, slice) = services.read_log("web", 0).unwrap();
        let log = String::from_utf8(log).unwrap();
        assert!(log.contains("not started again: 2 restarts"), "{log}");
        assert!(slice.ended);
        assert!(services.read_log("nope", 0).is_none());
    }

    #[test]
    fn a_clean_exit_ends_an_on_failure_service_but_not_an_always_one() {
        for (restart, state) in [
            (Restart::OnFailure, ServiceState::Stopped),
            (Restart::Never, ServiceState::Stopped),
            (Restart::Always, ServiceState::Restarting),
        ] {
            let now = Instant::now();
            let mut services = Services::default();
            services.begin(spec(restart, 5), now).unwrap();
            services.due(now);
            services.started(0, Ok((7, 70)), now);
            services.ended(7, ExitStatus::Exited { code: 0 }, b"", now);
            assert_eq!(services.report().services[0].state, state, "{restart:?}");
        }
    }

    #[test]
    fn probes_pass_fail_and_count_only_after_the_start_period() {
        let now = Instant::now();
        let mut services = Services::default();
        let mut request = spec(Restart::Always, 5);
        request.health = Some(HealthSpec {
            probe: Probe::Tcp { port: 1 },
            interval_ms: 5000,
            timeout_ms: 1000,
            retries: 2,
            start_period_ms: 10_000,
        });
        services.begin(request, now).unwrap();
        let health = |s: &Services| s.report().health.unwrap();
        services.probed(Err("refused".into()), now);
        services.probed(Err("refused".into()), now);
        assert_eq!(health(&services).status, Health::Starting);
        assert_eq!(health(&services).failures, 0);
        // Probed again a second later while it starts.
        assert_eq!(services.next_deadline(), Some(now));
        let later = now + Duration::from_secs(11);
        services.probed(Err("refused".into()), later);
        services.probed(Err("refused".into()), later);
        assert_eq!(health(&services).status, Health::Unhealthy);
        let generation = services.generation();
        services.probed(Ok("HTTP/1.0 200 OK".into()), later);
        assert_eq!(health(&services).status, Health::Healthy);
        assert!(services.generation() > generation);
        assert_eq!(health(&services).last_output, "HTTP/1.0 200 OK");
    }

    #[test]
    fn an_http_probe_reads_the_status_line() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let serve = std::thread::spawn(move || {
            for status in ["200 OK", "503 Service Unavailable"] {
                let (mut client, _) = listener.accept().unwrap();
                let mut request = [0u8; 512];
                let n = client.read(&mut request).unwrap();
                assert!(request[..n].starts_with(b"GET /ready HTTP/1.1\r\n"));
                let answer = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
                client.write_all(answer.as_bytes()).unwrap();
            }
        });
        let probe = Probe::Http {
            port,
            path: "/ready".into(),
        };
        let timeout = Duration::from_secs(5);
        assert_eq!(connect_probe(&probe, timeout), Ok("HTTP/1.1 200 OK".into()));
        assert_eq!(
            connect_probe(&probe, timeout),
            Err("HTTP/1.1 503 Service Unavailable".into())
        );
        serve.join().unwrap();
        let closed = Probe::Tcp { port };
        assert!(connect_probe(&closed, timeout)
            .unwrap_err()
            .contains("connecting"));
    }
}
